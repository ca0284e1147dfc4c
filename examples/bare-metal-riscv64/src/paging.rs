//! The kernel half of the Sv39 tables, in hmm-core's encoding ([`Sv39`],
//! through the shared `paging`): two 1 GiB identity leaves, global: root
//! slot 0 (MMIO: UART, test finisher, ...; read-write) and slot 2 (RAM at
//! 0x8000_0000; read-write-execute). Every process root copies them.

use core::ops::Range;
use core::sync::atomic::Ordering;

use hmm_core::arch::LeafFlags;
use hmm_core::arch::riscv64::Sv39;
use hmm_demo_kernel::memory::{self, Frames};
use hmm_demo_kernel::paging::{entry, leaf, root_level};

/// RAM of QEMU virt with `-m 128M`.
pub const RAM: Range<u64> = 0x8000_0000..0x8000_0000 + (128 << 20);
/// Root slots the kernel half uses (MMIO and RAM identity leaves).
pub const KERNEL_SLOTS: [usize; 2] = [0, 2];

/// Builds the kernel's root table (see the module docs), paging off.
pub fn kernel_root(frames: &Frames) -> Option<u64> {
    let root = memory::alloc_zeroed(frames)?;
    let top = root_level::<Sv39>();
    let kernel = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::GLOBAL | LeafFlags::ACCESSED | LeafFlags::DIRTY;
    // SAFETY: `root` is our fresh table; slots 0 and 2 are below 512.
    unsafe {
        entry(root, 0).store(leaf::<Sv39>(0, top, kernel, 0), Ordering::Relaxed);
        entry(root, 2).store(leaf::<Sv39>(RAM.start, top, kernel | LeafFlags::EXEC, 0), Ordering::Relaxed);
    }
    Some(root)
}
