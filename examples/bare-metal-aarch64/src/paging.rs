//! VMSAv8-64 stage-1 tables (4 KiB granule, 48-bit, `TTBR0_EL1`) in
//! hmm-core's encoding ([`Aarch64Va48`]): every entry the kernel writes is
//! `Aarch64Va48::encode` / `Aarch64Va48::directory` output, plus the memory
//! type (AttrIndx, SH), which the format leaves to the kernel as opaque
//! bits; every entry it reads goes through `Aarch64Va48::decode`.
//!
//! Our level `l` is Arm level `3 - l`: the root (level 3) is Arm's level 0,
//! 512 GiB a slot. The kernel half is root slot 0, a static level-2 table
//! (Arm level 1) with two global 1 GiB identity blocks: 0..1 GiB (MMIO:
//! PL011, GIC, ...; Device-nGnRE, never executable) and 1..2 GiB (RAM from
//! 0x4000_0000; Normal write-back, inner shareable, EL1-executable). Every
//! process root links the same table in slot 0.

use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};

use hmm_core::arch::aarch64::Aarch64Va48;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::{Error, Result};

use crate::memory::{self, Frames};

/// Levels of the 48-bit format; the root is level 3.
pub const ROOT_LEVEL: usize = 3;
/// Root slots the kernel half uses (the identity table).
pub const KERNEL_SLOTS: [usize; 1] = [0];
/// Memory type of normal memory: AttrIndx 0 (`sysreg::MAIR` Attr0, so no
/// bit), SH = inner shareable. Encode writes both fields as 0; they are
/// opaque bits.
pub const NORMAL: u64 = 0b11 << 8;
/// Memory type of MMIO: AttrIndx 1 (Device-nGnRE).
const DEVICE: u64 = 1 << 2;
/// The memory-type fields (AttrIndx, SH) of a leaf.
pub const MEMORY_TYPE: u64 = 0b111 << 2 | 0b11 << 8;

/// A 4 KiB table for the kernel's static half.
#[repr(C, align(4096))]
struct Table([AtomicU64; 512]);

static KERNEL_ROOT: Table = Table([const { AtomicU64::new(0) }; 512]);
static KERNEL_L2: Table = Table([const { AtomicU64::new(0) }; 512]);

/// Entry `index` of the table at physical address `table`.
///
/// # Safety
/// `table` must be a live table frame (identity mapped) that stays
/// allocated while the reference is used; `index < 512`.
pub unsafe fn entry(table: u64, index: usize) -> &'static AtomicU64 {
    debug_assert!(index < 512);
    // SAFETY: by the caller, an aligned, live, identity-mapped table frame;
    // entries are only accessed atomically.
    unsafe { AtomicU64::from_ptr((table as *mut u64).add(index)) }
}

/// The raw leaf for `frame` at `level` with `flags` and memory type
/// `memory_type` (bits of [`MEMORY_TYPE`]).
pub fn leaf(frame: u64, level: usize, flags: LeafFlags, memory_type: u64) -> u64 {
    let raw = Aarch64Va48::encode(&PteView::Leaf { frame, flags }, level).expect("Aarch64Va48 encodes aligned leaves");
    debug_assert_eq!(memory_type & !Aarch64Va48::opaque_bits(raw, level), 0);
    raw | memory_type
}

/// Fills the kernel's static tables (see the module docs) and returns the
/// root's physical address. Runs with the MMU off: plain stores, no
/// allocator.
pub fn kernel_root() -> u64 {
    let kernel = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::GLOBAL | LeafFlags::ACCESSED | LeafFlags::DIRTY;
    let l2 = ptr::addr_of!(KERNEL_L2) as u64;
    let root = ptr::addr_of!(KERNEL_ROOT) as u64;
    KERNEL_L2.0[0].store(leaf(0, 2, kernel, DEVICE), Ordering::Relaxed);
    KERNEL_L2.0[1].store(leaf(memory::RAM_START, 2, kernel | LeafFlags::EXEC, NORMAL), Ordering::Relaxed);
    let dir = Aarch64Va48::directory(l2, ROOT_LEVEL).expect("a 4 KiB-aligned table below 2^48");
    KERNEL_ROOT.0[0].store(dir, Ordering::Relaxed);
    root
}

/// The level-0 entry for `va` in the tables under `root`, creating missing
/// directories from `create`. `Err(Fault)`: a directory is missing (without
/// `create`) or a block of another level is in the way; `Err(NoMemory)`.
///
/// # Safety
/// `root` must be a live root whose tables stay allocated while the result
/// is used (the process frees them only when dropped).
pub unsafe fn slot(root: u64, va: u64, create: Option<&Frames>) -> Result<&'static AtomicU64> {
    let mut table = root;
    for level in (1..=ROOT_LEVEL).rev() {
        // SAFETY: `table` is `root` or a table linked below it (caller).
        let e = unsafe { entry(table, Aarch64Va48::index(va, level)) };
        let mut raw = e.load(Ordering::Acquire);
        if Aarch64Va48::decode(raw, level) == PteView::Absent {
            let frames = create.ok_or(Error::Fault)?;
            let frame = memory::alloc_zeroed(frames).ok_or(Error::NoMemory)?;
            let dir = Aarch64Va48::directory(frame, level)?;
            // The zeroed table must reach the walker before the link to it.
            Aarch64Va48::publish_table_writes();
            raw = match e.compare_exchange(raw, dir, Ordering::AcqRel, Ordering::Acquire) {
                // Was invalid: no TLB holds it, no invalidation needed.
                Ok(_) => dir,
                Err(now) => {
                    // SAFETY: never linked, still ours.
                    unsafe { memory::free(frames, frame) };
                    now
                }
            };
        }
        match Aarch64Va48::decode(raw, level) {
            PteView::Table { frame, .. } => table = frame,
            _ => return Err(Error::Fault),
        }
    }
    // SAFETY: `table` is now a live level-0 table under `root`.
    Ok(unsafe { entry(table, Aarch64Va48::index(va, 0)) })
}
