//! What the shared process code needs from the hart ([`Cpu`]): Sv39, the
//! user half, `satp` and `sfence.vma`, the fault probe.

use hmm_core::arch::riscv64::Sv39;
use hmm_demo_kernel::Cpu;

use crate::{csr, paging, trap};

/// The riscv64 hart with Sv39 paging.
pub struct Sv39Cpu;

// SAFETY: (1) every root copies `paging::kernel_root`'s slots 0 and 2,
// which map MMIO and all of RAM at VA = PA; user addresses (64..256 GiB)
// are root slots 64..255. (2) `sfence.vma va, zero` drops this hart's
// translations of `va` after the table stores before it. (3) The same
// fence makes the next walk see those stores (RISC-V may have cached the
// invalid entry).
unsafe impl Cpu for Sv39Cpu {
    type Format = Sv39;
    const KERNEL_SLOTS: &'static [usize] = &paging::KERNEL_SLOTS;
    /// Root slot 64 (64 GiB), far from the kernel slots.
    const USER_START: u64 = 64 << 30;
    /// End of the user half of Sv39 (addresses with bit 38 clear).
    const USER_END: u64 = 1 << 38;
    /// No memory type: PBMT stays 0, the PMAs decide.
    const USER_MEMORY_TYPE: u64 = 0;
    const MEMORY_TYPE_MASK: u64 = 0;

    unsafe fn set_root(root: u64) {
        // SAFETY: the caller guarantees `root` maps everything in use.
        unsafe { csr::enable_sv39(root) };
    }

    fn flush_tlb_page(va: u64) {
        csr::flush_page(va);
    }

    fn publish_new_entry(va: u64) {
        csr::flush_page(va);
    }

    fn probe_load(va: u64) -> Result<u64, u64> {
        trap::probe_load(va)
    }
}
