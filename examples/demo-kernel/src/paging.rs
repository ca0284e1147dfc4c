//! Tables in the CPU's hmm-core format `F`: every entry written here is
//! `F::encode` / `F::directory` output (plus the memory type the kernel
//! ORs into the bits `F` leaves opaque), and every entry read goes through
//! `F::decode`. Levels are hmm-core's: 0 is the leaf table, the root is
//! [`root_level`].

use core::sync::atomic::{AtomicU64, Ordering};

use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::{Error, Result};

use crate::memory::{self, Frames};

/// The root's level in format `F`.
pub const fn root_level<F: PteFormat>() -> usize {
    F::Geometry::LEVELS - 1
}

/// Entry `index` of the table at physical address `table`.
///
/// # Safety
/// `table` must be a live table frame in RAM (identity mapped) that stays
/// allocated while the reference is used; `index < 512`.
pub unsafe fn entry(table: u64, index: usize) -> &'static AtomicU64 {
    debug_assert!(index < 512);
    // SAFETY: by the caller, an aligned, live, identity-mapped table frame;
    // entries are only accessed atomically.
    unsafe { AtomicU64::from_ptr(memory::words(table).add(index)) }
}

/// The raw leaf for `frame` at `level` with `flags` and the memory-type
/// bits `memory_type` (bits `F` leaves opaque; 0 for none).
pub fn leaf<F: PteFormat>(frame: u64, level: usize, flags: LeafFlags, memory_type: u64) -> u64 {
    let raw = F::encode(&PteView::Leaf { frame, flags }, level).expect("the format encodes aligned RAM leaves");
    debug_assert_eq!(memory_type & !F::opaque_bits(raw, level), 0);
    raw | memory_type
}

/// The level-0 entry for `va` in the tables under `root`, creating missing
/// directories from `create`. `Err(Fault)`: a directory is missing (without
/// `create`) or a leaf of another level is in the way; `Err(NoMemory)`.
///
/// # Safety
/// `root` must be a live root whose tables stay allocated while the result
/// is used (the process never frees them).
pub unsafe fn slot<F: PteFormat>(root: u64, va: u64, create: Option<&Frames>) -> Result<&'static AtomicU64> {
    let mut table = root;
    for level in (1..=root_level::<F>()).rev() {
        // SAFETY: `table` is `root` or a table linked below it (caller).
        let e = unsafe { entry(table, F::Geometry::index(va, level)) };
        let mut raw = e.load(Ordering::Acquire);
        if F::decode(raw, level) == PteView::Absent {
            let frames = create.ok_or(Error::Fault)?;
            let frame = memory::alloc_zeroed(frames).ok_or(Error::NoMemory)?;
            let dir = F::directory(frame, level)?;
            // The zeroed table must reach the walker before the link to it.
            F::publish_table_writes();
            raw = match e.compare_exchange(raw, dir, Ordering::AcqRel, Ordering::Acquire) {
                // Was invalid and an empty directory adds no translation: no
                // TLB maintenance.
                Ok(_) => dir,
                Err(now) => {
                    // SAFETY: never linked, still ours.
                    unsafe { memory::free(frames, frame) };
                    now
                }
            };
        }
        match F::decode(raw, level) {
            PteView::Table { frame, .. } => table = frame,
            _ => return Err(Error::Fault),
        }
    }
    // SAFETY: `table` is now a live level-0 table under `root`.
    Ok(unsafe { entry(table, F::Geometry::index(va, 0)) })
}

/// Table frames linked below the level-`level` table `table`.
///
/// # Safety
/// As [`slot`]: `table` and the tables below it stay allocated.
pub unsafe fn tables_below<F: PteFormat>(table: u64, level: usize) -> usize {
    if level == 0 {
        return 0;
    }
    let mut n = 0;
    for j in 0..F::Geometry::entries(level) {
        // SAFETY: a live table (caller); `j` is below its entry count.
        let raw = unsafe { entry(table, j) }.load(Ordering::Acquire);
        if let PteView::Table { frame, .. } = F::decode(raw, level) {
            // SAFETY: a table linked below a live one (caller).
            n += 1 + unsafe { tables_below::<F>(frame, level - 1) };
        }
    }
    n
}
