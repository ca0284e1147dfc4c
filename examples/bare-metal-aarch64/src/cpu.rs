//! What the shared process code needs from the core ([`Cpu`]): the 48-bit
//! format, the user half, `TTBR0_EL1` and the TLB maintenance, the fault
//! probe.

use hmm_core::arch::aarch64::Aarch64Va48;
use hmm_demo_kernel::Cpu;

use crate::{paging, sysreg, trap};

/// The aarch64 core at EL1 with 48-bit, 4 KiB-granule stage-1 tables.
pub struct Aarch64Cpu;

// SAFETY: (1) every root links `paging::kernel_root`'s identity table in
// slot 0, which maps MMIO and all of RAM at VA = PA; user addresses
// (512 GiB..256 TiB) are root slots 1..511. (2) `sysreg::flush_page` is
// `dsb ishst; tlbi vae1is; dsb ish; isb`: the stores reach the walkers,
// then every translation of `va` is gone. (3) `sysreg::publish_new_entry`
// is `dsb ishst; isb`, enough where the entry was invalid (Arm TLBs never
// cache a faulting entry).
unsafe impl Cpu for Aarch64Cpu {
    type Format = Aarch64Va48;
    const KERNEL_SLOTS: &'static [usize] = &paging::KERNEL_SLOTS;
    /// Root slot 1 (512 GiB), the one after the kernel's.
    const USER_START: u64 = 1 << 39;
    /// End of the 48-bit TTBR0 half.
    const USER_END: u64 = 1 << 48;
    const USER_MEMORY_TYPE: u64 = paging::NORMAL;
    const MEMORY_TYPE_MASK: u64 = paging::MEMORY_TYPE;

    unsafe fn set_root(root: u64) {
        // SAFETY: the caller guarantees `root` maps everything in use.
        unsafe { sysreg::set_ttbr0(root) };
    }

    fn flush_tlb_page(va: u64) {
        sysreg::flush_page(va);
    }

    fn publish_new_entry(_va: u64) {
        sysreg::publish_new_entry();
    }

    /// A stale TLB entry (Arm may keep the one that faulted until
    /// invalidated): drop it.
    fn spurious_fault(va: u64) {
        sysreg::flush_page(va);
    }

    fn probe_load(va: u64) -> Result<u64, u64> {
        trap::probe_load(va)
    }
}
