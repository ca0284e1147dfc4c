//! The seam through which hmm-core reaches physical memory.
//!
//! Page tables and frames are named by physical address; a kernel reaches them
//! through some mapping (an offset map of all RAM, a temporary window, a host
//! test arena). hmm-core never assumes which: it asks [`PhysMem`].

pub(crate) use crate::sync::shim::AtomicEntry;

/// Turns a physical address into a pointer the current code may use.
///
/// # Safety
/// An implementation must guarantee, for every physical address `pa` of a
/// page-table frame or data frame the kernel hands to hmm-core (a table root,
/// a `Table` entry's frame, a frame from the kernel's
/// [`FrameAllocator`](crate::FrameAllocator)):
/// 1. `ptr(pa)` is non-null, 8-byte aligned when `pa` is, and valid for reads
///    and writes of the whole 4 KiB frame containing `pa` for as long as the
///    frame is in use by the caller (the table is live or the frame allocated).
/// 2. The pointer stays valid when used from any CPU or thread that shares
///    `self`, and concurrent access through it is through atomics (tables) or
///    with the kernel's own synchronisation (data).
/// 3. Distinct frames map to non-overlapping memory.
pub unsafe trait PhysMem {
    /// Pointer to the byte at physical address `pa`.
    fn ptr(&self, pa: u64) -> *mut u8;
}

/// Access to every frame through a fixed virtual offset (`va = pa + offset`),
/// the usual choice of a 64-bit kernel that maps all RAM.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OffsetPhysMem {
    offset: u64,
}

impl OffsetPhysMem {
    /// Creates the mapping.
    ///
    /// # Safety
    /// Every physical frame hmm-core will be given must be mapped read-write at
    /// `pa + offset` in every address space where this value is used, for as
    /// long as this value exists.
    pub const unsafe fn new(offset: u64) -> Self {
        Self { offset }
    }

    /// The offset this mapping adds.
    pub const fn offset(&self) -> u64 {
        self.offset
    }
}

// SAFETY: `new`'s contract makes `pa + offset` a valid mapping of `pa` for the
// lifetime of the value; distinct frames get distinct addresses.
unsafe impl PhysMem for OffsetPhysMem {
    #[inline]
    fn ptr(&self, pa: u64) -> *mut u8 {
        pa.wrapping_add(self.offset) as *mut u8
    }
}

/// The 64-bit entry `index` of the table at physical address `table`.
///
/// An `AtomicU64` over the entry (under `--cfg loom`, a wrapper with the same
/// methods that loom can see: `crate::sync::loom_pte`).
///
/// # Safety
/// `table` must be a live, 4 KiB-aligned page-table frame of `phys`, and
/// `index` must be below the table's entry count (at most 512).
#[inline]
pub(crate) unsafe fn entry<P: PhysMem + ?Sized>(phys: &P, table: u64, index: usize) -> &AtomicEntry {
    debug_assert!(index < 512 && table & 0xfff == 0);
    // SAFETY: by `PhysMem`'s contract the frame is valid and 8-byte aligned for
    // reads and writes; `index < 512` keeps the entry inside it; all access to
    // table entries goes through atomics, so sharing it is sound.
    unsafe { AtomicEntry::from_ptr((phys.ptr(table) as *mut u64).add(index)) }
}
