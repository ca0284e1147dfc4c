//! The kernel half of the VMSAv8-64 stage-1 tables (4 KiB granule, 48-bit,
//! `TTBR0_EL1`) in hmm-core's encoding ([`Aarch64Va48`], through the shared
//! `paging`), and the memory types the kernel ORs into the bits the format
//! leaves opaque (AttrIndx, SH).
//!
//! Our level `l` is Arm level `3 - l`: the root (level 3) is Arm's level 0,
//! 512 GiB a slot. The kernel half is root slot 0, a static level-2 table
//! (Arm level 1) with two global 1 GiB identity blocks: 0..1 GiB (MMIO:
//! PL011, GIC, ...; Device-nGnRE, never executable) and 1..2 GiB (RAM from
//! 0x4000_0000; Normal write-back, inner shareable, EL1-executable). Every
//! process root links the same table in slot 0.

use core::ops::Range;
use core::ptr;
use core::sync::atomic::{AtomicU64, Ordering};

use hmm_core::arch::aarch64::Aarch64Va48;
use hmm_core::arch::{LeafFlags, PteFormat};
use hmm_demo_kernel::paging::{leaf, root_level};

/// RAM of QEMU virt with `-m 128M`.
pub const RAM: Range<u64> = 0x4000_0000..0x4000_0000 + (128 << 20);
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

/// Fills the kernel's static tables (see the module docs) and returns the
/// root's physical address. Runs with the MMU off: plain stores, no
/// allocator.
pub fn kernel_root() -> u64 {
    let kernel = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::GLOBAL | LeafFlags::ACCESSED | LeafFlags::DIRTY;
    let l2 = ptr::addr_of!(KERNEL_L2) as u64;
    let root = ptr::addr_of!(KERNEL_ROOT) as u64;
    KERNEL_L2.0[0].store(leaf::<Aarch64Va48>(0, 2, kernel, DEVICE), Ordering::Relaxed);
    KERNEL_L2.0[1].store(leaf::<Aarch64Va48>(RAM.start, 2, kernel | LeafFlags::EXEC, NORMAL), Ordering::Relaxed);
    let dir = Aarch64Va48::directory(l2, root_level::<Aarch64Va48>()).expect("a 4 KiB-aligned table below 2^48");
    KERNEL_ROOT.0[0].store(dir, Ordering::Relaxed);
    root
}
