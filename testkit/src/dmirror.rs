//! A dummy device in the manner of Linux's `dmirror` (test_hmm.c): it reaches
//! process memory only through its [`Mirror`], caches translations in a
//! device TLB that keeps stale entries until the mirror flushes it, and checks
//! every access against the CPU's current mapping, so a missed or late
//! invalidation shows up as a stale access (and as wrong data).

use hmm_core::arch::{PagingGeometry, PteFormat};
use hmm_core::pt::{MirrorEntry, Pfn};
use hmm_core::{AddressSpace, DeviceOps, Error, Event, FrameAllocator, Mirror, PhysMem, VaRange};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Snapshot byte encoding of the Linux selftests (`HMM_DMIRROR_PROT_*`).
pub mod prot {
    /// The device must not access the page.
    pub const ERROR: u8 = 0xff;
    /// Not present.
    pub const NONE: u8 = 0x00;
    /// Mapped read-only.
    pub const READ: u8 = 0x01;
    /// Mapped writable.
    pub const WRITE: u8 = 0x02;
    /// Part of a 2 MiB leaf.
    pub const PMD: u8 = 0x04;
    /// Part of a 1 GiB leaf.
    pub const PUD: u8 = 0x08;
    /// The shared zero page.
    pub const ZERO: u8 = 0x10;
    /// Device-private memory of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private memory of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
}

/// Answers "does the CPU map `va` to `frame` right now (writable if `write`)?".
pub type CpuCheck = Box<dyn Fn(u64, u64, bool) -> bool + Send + Sync>;

#[derive(Clone, Copy, Debug)]
struct TlbEntry {
    frame: u64,
    write: bool,
}

#[derive(Default)]
struct Tlb {
    entries: BTreeMap<u64, TlbEntry>,
    /// Bumped by every flush: a fill that raced a flush is dropped.
    generation: u64,
}

/// Counters of the dummy device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Times the device had to call its fault routine.
    pub faults: u64,
    /// Pages copied to or from process memory.
    pub cpages: u64,
    /// Accesses through a translation the CPU no longer had (must stay 0).
    pub stale: u64,
    /// `update` calls.
    pub updates: u64,
    /// `flush` calls.
    pub flushes: u64,
}

/// The dummy device. Give it to [`Mirror::new`].
pub struct DummyDevice<P: PhysMem + Send + Sync> {
    phys: Arc<P>,
    tlb: Mutex<Tlb>,
    check: Option<CpuCheck>,
    zero_frame: Option<u64>,
    faults: AtomicU64,
    cpages: AtomicU64,
    stale: AtomicU64,
    updates: AtomicU64,
    flushes: AtomicU64,
    /// `update` call number (1-based) that fails; 0 = none.
    fail_update_at: AtomicU64,
    events: Mutex<Vec<(VaRange, Event)>>,
    on_update: Mutex<Option<UpdateHook>>,
}

/// Called inside `update`, with the mirror's update lock held.
pub type UpdateHook = Box<dyn Fn() + Send + Sync>;

impl<P: PhysMem + Send + Sync> DummyDevice<P> {
    /// A device reading memory through `phys`; `check` verifies each access
    /// against the CPU; `zero_frame` lets snapshots report ZERO.
    pub fn new(phys: Arc<P>, check: Option<CpuCheck>, zero_frame: Option<u64>) -> Self {
        Self {
            phys,
            tlb: Mutex::default(),
            check,
            zero_frame,
            faults: AtomicU64::new(0),
            cpages: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fail_update_at: AtomicU64::new(0),
            events: Mutex::default(),
            on_update: Mutex::default(),
        }
    }

    /// Runs `hook` inside every `update` (the mirror's update lock is held
    /// then), e.g. to stall a commit while a test invalidates.
    pub fn on_update(&self, hook: Option<UpdateHook>) {
        *self.on_update.lock().unwrap() = hook;
    }

    /// Counters so far.
    pub fn counters(&self) -> DeviceCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceCounters {
            faults: g(&self.faults),
            cpages: g(&self.cpages),
            stale: g(&self.stale),
            updates: g(&self.updates),
            flushes: g(&self.flushes),
        }
    }

    /// Resets `faults` and `cpages` (as the selftests do per command).
    pub fn reset_counters(&self) {
        self.faults.store(0, Ordering::Relaxed);
        self.cpages.store(0, Ordering::Relaxed);
    }

    /// Makes the `k`-th next `update` call fail with code -5 (EIO).
    pub fn fail_update_at(&self, k: u64) {
        let done = self.updates.load(Ordering::Relaxed);
        self.fail_update_at.store(done + k, Ordering::Relaxed);
    }

    /// Invalidation events received, in order.
    pub fn events(&self) -> Vec<(VaRange, Event)> {
        self.events.lock().unwrap().clone()
    }

    /// Number of cached translations.
    pub fn tlb_len(&self) -> usize {
        self.tlb.lock().unwrap().entries.len()
    }

    fn snapshot_byte(&self, p: Pfn) -> u8 {
        if p.is_error() {
            return prot::ERROR;
        }
        if !p.is_valid() {
            return prot::NONE;
        }
        let mut b = if p.is_write() { prot::WRITE } else { prot::READ };
        match p.order() {
            9 => b |= prot::PMD,
            18 => b |= prot::PUD,
            _ => {}
        }
        if Some(p.phys()) == self.zero_frame {
            b |= prot::ZERO;
        }
        b
    }
}

impl<P: PhysMem + Send + Sync> DeviceOps for DummyDevice<P> {
    fn update(&self, _range: VaRange) -> Result<(), i32> {
        if let Some(hook) = self.on_update.lock().unwrap().as_ref() {
            hook();
        }
        let n = self.updates.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.fail_update_at.load(Ordering::Relaxed) {
            return Err(-5);
        }
        Ok(())
    }

    fn invalidate(&self, range: VaRange, event: Event) {
        // Recording allocates: tests that forbid allocation in callbacks use
        // a device without recording (see `DummyDevice::events`). The lock is
        // uncontended here.
        if let Ok(mut ev) = self.events.try_lock() {
            if ev.capacity() > ev.len() {
                ev.push((range, event));
            }
        }
    }

    fn flush(&self, range: VaRange) {
        let mut tlb = self.tlb.lock().unwrap();
        tlb.generation += 1;
        let stale: Vec<u64> = tlb.entries.range(range.start()..=range.last()).map(|(va, _)| *va).collect();
        for va in stale {
            tlb.entries.remove(&va);
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
}

impl<P: PhysMem + Send + Sync> DummyDevice<P> {
    /// Pre-sizes the event log so recording never allocates inside a callback.
    pub fn reserve_events(&self, n: usize) {
        self.events.lock().unwrap().reserve(n);
    }
}

/// The mirror type the device functions accept.
pub type DeviceMirror<'s, S, P, A> = Mirror<'s, S, DummyDevice<P>, A>;

const PAGE: u64 = 4096;

/// Device READ of `len` bytes at `va`: through the TLB, then the mirror, then
/// a device fault over the rest of the range. Returns the bytes.
pub fn read<S, P, A>(m: &DeviceMirror<'_, S, P, A>, va: u64, len: usize) -> Result<Vec<u8>, Error>
where
    S: AddressSpace + Sync,
    P: PhysMem + Send + Sync,
    A: FrameAllocator + Sync,
{
    let mut out = vec![0u8; len];
    access(m, va, len, false, &mut |off, ptr, n| {
        // SAFETY: `ptr` points into a frame the device holds a live
        // translation for (checked against the CPU), valid for `n` bytes.
        unsafe { bus_read(ptr, &mut out[off..off + n]) }
    })?;
    Ok(out)
}

/// Device WRITE of `data` at `va`.
pub fn write<S, P, A>(m: &DeviceMirror<'_, S, P, A>, va: u64, data: &[u8]) -> Result<(), Error>
where
    S: AddressSpace + Sync,
    P: PhysMem + Send + Sync,
    A: FrameAllocator + Sync,
{
    access(m, va, data.len(), true, &mut |off, ptr, n| {
        // SAFETY: as in `read`, with a writable translation.
        unsafe { bus_write(ptr, &data[off..off + n]) }
    })
}

/// The naturally aligned 8-byte word holding the byte at `ptr`, and the
/// byte's offset in it.
///
/// # Safety
/// The word must lie in simulated RAM (a frame the device maps).
unsafe fn bus_word<'a>(ptr: *mut u8) -> (&'a AtomicU64, usize) {
    let skip = ptr.addr() & 7;
    // SAFETY: frames are 4 KiB aligned, so the aligned word holding `ptr`
    // lies in the same frame; every word of simulated RAM is an `AtomicU64`
    // (kernel and device touch it only atomically, as the bus does).
    (unsafe { AtomicU64::from_ptr(ptr.wrapping_sub(skip).cast::<u64>()) }, skip)
}

/// Copies `out.len()` bytes from device-visible memory at `ptr` with 8-byte
/// atomic bus reads. The device never reads RAM non-atomically: the kernel
/// thread writes the same words atomically, and a non-atomic read would be a
/// data race (and trips Miri's weak-memory emulation, which cannot follow a
/// non-atomic read of atomically written memory: "cannot have empty store
/// buffer when previous write was atomic").
///
/// # Safety
/// `[ptr, ptr + out.len())` lies in one frame of simulated RAM.
unsafe fn bus_read(ptr: *mut u8, out: &mut [u8]) {
    let mut done = 0;
    while done < out.len() {
        // SAFETY: inside the frame, by the caller's contract.
        let (word, skip) = unsafe { bus_word(ptr.wrapping_add(done)) };
        let n = (8 - skip).min(out.len() - done);
        let bytes = word.load(Ordering::Acquire).to_le_bytes();
        out[done..done + n].copy_from_slice(&bytes[skip..skip + n]);
        done += n;
    }
}

/// Writes `data` to device-visible memory at `ptr` with 8-byte atomic bus
/// writes (read-modify-write for partial words), for the reasons of
/// [`bus_read`].
///
/// # Safety
/// `[ptr, ptr + data.len())` lies in one frame of simulated RAM.
unsafe fn bus_write(ptr: *mut u8, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: inside the frame, by the caller's contract.
        let (word, skip) = unsafe { bus_word(ptr.wrapping_add(done)) };
        let n = (8 - skip).min(data.len() - done);
        let merge = |cur: u64| {
            let mut bytes = cur.to_le_bytes();
            bytes[skip..skip + n].copy_from_slice(&data[done..done + n]);
            Some(u64::from_le_bytes(bytes))
        };
        let _ = word.fetch_update(Ordering::AcqRel, Ordering::Relaxed, merge);
        done += n;
    }
}

/// SNAPSHOT: one byte per page of `range`, no faults taken.
pub fn snapshot<S, P, A>(m: &DeviceMirror<'_, S, P, A>, range: VaRange) -> Result<Vec<u8>, Error>
where
    S: AddressSpace + Sync,
    P: PhysMem + Send + Sync,
    A: FrameAllocator + Sync,
{
    let shift = <<S::Format as PteFormat>::Geometry as PagingGeometry>::PAGE_SHIFT;
    let mut pfns = vec![Pfn::NONE; range.pages(shift) as usize];
    m.snapshot(range, &mut pfns)?;
    Ok(pfns.into_iter().map(|p| m.device().snapshot_byte(p)).collect())
}

fn access<S, P, A>(
    m: &DeviceMirror<'_, S, P, A>,
    va: u64,
    len: usize,
    write: bool,
    copy: &mut dyn FnMut(usize, *mut u8, usize),
) -> Result<(), Error>
where
    S: AddressSpace + Sync,
    P: PhysMem + Send + Sync,
    A: FrameAllocator + Sync,
{
    let dev = m.device();
    let end = va + len as u64;
    let mut cur = va;
    while cur < end {
        let page = cur & !(PAGE - 1);
        let n = ((page + PAGE).min(end) - cur) as usize;
        loop {
            let generation = {
                let tlb = dev.tlb.lock().unwrap();
                if let Some(e) = tlb.entries.get(&page).filter(|e| e.write || !write) {
                    if let Some(check) = &dev.check {
                        if !check(page, e.frame, write) {
                            dev.stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    copy((cur - va) as usize, dev.phys.ptr(e.frame + (cur - page)), n);
                    dev.cpages.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                tlb.generation
            };
            // TLB miss: walk the device table.
            match m.translate(page).filter(|e: &MirrorEntry| e.is_write() || !write) {
                Some(e) => {
                    let mut tlb = dev.tlb.lock().unwrap();
                    // A flush since the walk may have removed this entry:
                    // retry the walk rather than cache a stale translation.
                    if tlb.generation == generation {
                        tlb.entries.insert(page, TlbEntry { frame: e.frame(), write: e.is_write() });
                    }
                }
                None => {
                    dev.faults.fetch_add(1, Ordering::Relaxed);
                    let last_page = (end - 1) & !(PAGE - 1);
                    let range = VaRange::from_bounds::<<S::Format as PteFormat>::Geometry>(page, last_page + PAGE)?;
                    m.fault(range, write)?;
                }
            }
        }
        cur = page + PAGE;
    }
    Ok(())
}
