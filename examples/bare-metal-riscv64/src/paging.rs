//! Sv39 tables in hmm-core's encoding ([`Sv39`]): every entry the kernel
//! writes is `Sv39::encode` / `Sv39::directory` output, and every entry it
//! reads goes through `Sv39::decode`.
//!
//! The kernel half is two 1 GiB identity leaves, global: root slot 0 (MMIO:
//! UART, test finisher, ...; read-write) and slot 2 (RAM at 0x8000_0000;
//! read-write-execute). Every process root copies them.

use core::sync::atomic::{AtomicU64, Ordering};

use hmm_core::arch::riscv64::Sv39;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::{Error, Result};

use crate::memory::{self, Frames};

/// Levels of Sv39; the root is level 2.
pub const ROOT_LEVEL: usize = 2;
/// Root slots the kernel half uses (MMIO and RAM identity leaves).
pub const KERNEL_SLOTS: [usize; 2] = [0, 2];

/// Entry `index` of the table at physical address `table`.
///
/// # Safety
/// `table` must be a live Sv39 table frame (identity mapped) that stays
/// allocated while the reference is used; `index < 512`.
pub unsafe fn entry(table: u64, index: usize) -> &'static AtomicU64 {
    debug_assert!(index < 512);
    // SAFETY: by the caller, an aligned, live, identity-mapped table frame;
    // entries are only accessed atomically.
    unsafe { AtomicU64::from_ptr(memory::words(table).add(index)) }
}

/// The raw leaf for `frame` at `level` with `flags`.
pub fn leaf(frame: u64, level: usize, flags: LeafFlags) -> u64 {
    Sv39::encode(&PteView::Leaf { frame, flags }, level).expect("Sv39 encodes aligned RAM leaves")
}

/// Builds the kernel's root table (see the module docs).
pub fn kernel_root(frames: &Frames) -> Option<u64> {
    let root = memory::alloc_zeroed(frames)?;
    let kernel = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::GLOBAL | LeafFlags::ACCESSED | LeafFlags::DIRTY;
    // SAFETY: `root` is our fresh table; slots 0 and 2 are below 512.
    unsafe {
        entry(root, 0).store(leaf(0, ROOT_LEVEL, kernel), Ordering::Relaxed);
        entry(root, 2).store(leaf(memory::RAM_START, ROOT_LEVEL, kernel | LeafFlags::EXEC), Ordering::Relaxed);
    }
    Some(root)
}

/// The level-0 entry for `va` in the tables under `root`, creating missing
/// directories from `create`. `Err(Fault)`: a directory is missing (without
/// `create`) or a leaf of another level is in the way; `Err(NoMemory)`.
///
/// # Safety
/// `root` must be a live Sv39 root whose tables stay allocated while the
/// result is used (the process frees them only when dropped).
pub unsafe fn slot(root: u64, va: u64, create: Option<&Frames>) -> Result<&'static AtomicU64> {
    let mut table = root;
    for level in (1..=ROOT_LEVEL).rev() {
        // SAFETY: `table` is `root` or a table linked below it (caller).
        let e = unsafe { entry(table, Sv39::index(va, level)) };
        let mut raw = e.load(Ordering::Acquire);
        if Sv39::decode(raw, level) == PteView::Absent {
            let frames = create.ok_or(Error::Fault)?;
            let frame = memory::alloc_zeroed(frames).ok_or(Error::NoMemory)?;
            let dir = Sv39::directory(frame, level)?;
            // An empty directory adds no translation: no TLB maintenance.
            raw = match e.compare_exchange(raw, dir, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => dir,
                Err(now) => {
                    // SAFETY: never linked, still ours.
                    unsafe { memory::free(frames, frame) };
                    now
                }
            };
        }
        match Sv39::decode(raw, level) {
            PteView::Table { frame, .. } => table = frame,
            _ => return Err(Error::Fault),
        }
    }
    // SAFETY: `table` is now a live level-0 table under `root`.
    Ok(unsafe { entry(table, Sv39::index(va, 0)) })
}
