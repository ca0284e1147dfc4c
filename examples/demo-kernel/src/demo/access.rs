//! How the checks touch the region: its pages, the patterns CPU and device
//! store, and accesses from either side.

use core::ptr;

use hmm_core::Error;

use crate::Cpu;
use crate::device::{self, DevMirror};
use crate::process::PAGE;

/// Pages of the user region.
pub const PAGES: u64 = 16;
/// 64-bit words per page.
pub const WORDS: u64 = PAGE / 8;

/// Address of page `i` of the region (it starts at `C::USER_START`).
pub fn user_page<C: Cpu>(i: u64) -> u64 {
    C::USER_START + i * PAGE
}

/// What the CPU stores in word `w` of the page at `va`, generation `g`.
pub fn pattern(va: u64, g: u64, w: u64) -> u64 {
    0xc0de << 48 | (va >> 12 & 0xffff_ffff) << 16 | g << 12 | w
}

/// What the device stores.
pub fn dev_pattern(va: u64, w: u64) -> u64 {
    0xd0e5 << 48 | (va >> 12 & 0xffff_ffff) << 16 | w
}

/// CPU stores of generation `g` to every word of the page at `va`.
pub fn cpu_fill(va: u64, g: u64) {
    for w in 0..WORDS {
        // SAFETY: `va` is in the process's writable region; the store goes
        // through the MMU and a fault is resolved by the trap handler.
        unsafe { ptr::write_volatile((va + w * 8) as *mut u64, pattern(va, g, w)) };
    }
}

/// CPU load of word `w` of the page at `va`.
pub fn cpu_read(va: u64, w: u64) -> u64 {
    // SAFETY: as in `cpu_fill`, a load.
    unsafe { ptr::read_volatile((va + w * 8) as *const u64) }
}

/// Whether the device reads `expect(w)` in every word of the page at `va`.
pub fn device_sees<C: Cpu>(mirror: &DevMirror<'_, C>, va: u64, expect: impl Fn(u64) -> u64) -> Result<bool, Error> {
    for w in 0..WORDS {
        if device::read(mirror, va + w * 8)? != expect(w) {
            return Ok(false);
        }
    }
    Ok(true)
}
