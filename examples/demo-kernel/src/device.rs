//! The "device": it reaches the process's memory only through its hmm-core
//! [`Mirror`], a table in hmm-core's software format over the CPU's
//! geometry (`SoftFormat`, the default). Its MMU is [`Mirror::translate`] (a
//! lock-free walk of that table); a miss or a write to a read-only entry is
//! a device fault, [`Mirror::fault`], which hmm-core resolves against the
//! live CPU tables. Data moves through the identity map at the physical
//! address the translation gives. It runs on the same CPU as the CPU side,
//! between its steps, so it caches nothing: [`DeviceOps`] only counts the
//! callbacks.

use core::sync::atomic::{AtomicU64, Ordering};

use hmm_core::{DeviceOps, Error, Event, Mirror, Result, VaRange};

use crate::Cpu;
use crate::memory::{self, Frames};
use crate::process::{self, PAGE, Process};

/// The mirror type: this device, the kernel's frame pool, `SoftFormat` over
/// the geometry of `C`'s format.
pub type DevMirror<'a, C> = Mirror<'a, Process<C>, Device, Frames>;

/// Callback counters.
#[derive(Debug, Default)]
pub struct Device {
    /// `update` calls.
    pub updates: AtomicU64,
    /// `invalidate` calls.
    pub invalidates: AtomicU64,
    /// `flush` calls.
    pub flushes: AtomicU64,
}

impl DeviceOps for Device {
    fn update(&self, _range: VaRange) -> core::result::Result<(), i32> {
        self.updates.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn invalidate(&self, _range: VaRange, _event: Event) {
        self.invalidates.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&self, _range: VaRange) {
        // No TLB, no accesses in flight: nothing to drain.
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The physical address of `va` as the device's MMU finds it, raising a
/// device fault when the mirror has no (writable, if `write`) entry.
pub fn translate<C: Cpu>(mirror: &DevMirror<'_, C>, va: u64, write: bool) -> Result<u64> {
    for _ in 0..4 {
        match mirror.translate(va) {
            Some(e) if !write || e.is_write() => return Ok(e.frame() + (va & (PAGE - 1))),
            _ => mirror.fault(process::range::<C>(va & !(PAGE - 1), PAGE), write)?,
        }
    }
    Err(Error::Busy)
}

/// A device load of the word at `va`.
pub fn read<C: Cpu>(mirror: &DevMirror<'_, C>, va: u64) -> Result<u64> {
    let pa = translate(mirror, va, false)?;
    // SAFETY: `pa` is inside a frame the mirror maps, which the kernel frees
    // only after the invalidation that clears this entry; identity mapped.
    Ok(unsafe { core::ptr::read_volatile(memory::words(pa & !(PAGE - 1)).add((pa as usize & 0xfff) / 8)) })
}

/// A device store of `value` to the word at `va`.
pub fn write<C: Cpu>(mirror: &DevMirror<'_, C>, va: u64, value: u64) -> Result<()> {
    let pa = translate(mirror, va, true)?;
    // SAFETY: as in `read`, and the entry is writable.
    unsafe { core::ptr::write_volatile(memory::words(pa & !(PAGE - 1)).add((pa as usize & 0xfff) / 8), value) };
    Ok(())
}
