//! Physical frames and the offset map.
//!
//! The kernel maps all RAM at [`PHYS_OFFSET`] (see `paging::init_offset_map`),
//! so any physical address `p` below the mapped top is reachable at virtual
//! address `p + PHYS_OFFSET`. This is how the kernel touches frames it does
//! not otherwise map: page-table pages of a process, user data pages, freed
//! frames being poisoned.

use core::sync::atomic::{AtomicU64, Ordering};

/// Size of a base page / frame.
pub const PAGE_SIZE: u64 = 4096;

/// Virtual address where physical address 0 appears (PML4 slot 256, the
/// start of the upper canonical half).
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;

/// End of the physical range the offset map covers (set once at boot).
static MAPPED_TOP: AtomicU64 = AtomicU64::new(0);

pub(super) fn set_mapped_top(top: u64) {
    MAPPED_TOP.store(top, Ordering::Release);
}

/// End of the physical range reachable through [`phys_to_virt`].
pub fn mapped_top() -> u64 {
    MAPPED_TOP.load(Ordering::Acquire)
}

/// Offset-map virtual address of physical address `paddr`.
///
/// Computing the pointer is safe; dereferencing it is only valid for
/// `paddr < mapped_top()` and under the usual aliasing rules.
pub fn phys_to_virt(paddr: u64) -> *mut u8 {
    debug_assert!(paddr < mapped_top(), "{paddr:#x} is above the offset map");
    (paddr + PHYS_OFFSET) as *mut u8
}

/// A 4 KiB-aligned physical frame, identified by its start address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysFrame(u64);

impl PhysFrame {
    /// The frame containing `paddr`.
    pub const fn containing(paddr: u64) -> Self {
        Self(paddr & !(PAGE_SIZE - 1))
    }

    /// Physical start address.
    pub const fn start(self) -> u64 {
        self.0
    }

    /// The frame's contents through the offset map.
    pub fn as_ptr<T>(self) -> *mut T {
        phys_to_virt(self.0).cast()
    }
}

impl core::fmt::Display for PhysFrame {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "frame@{:#x}", self.0)
    }
}
