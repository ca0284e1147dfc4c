//! The riscv64-only check: `sv39-live`, `satp` runs the process's root.

use hmm_core::AddressSpace;
use hmm_demo_kernel::{ArchChecks, Process, Report};

use crate::cpu::Sv39Cpu;
use crate::csr;

impl ArchChecks for Sv39Cpu {
    fn mmu_live(r: &mut Report, process: &Process<Self>) {
        let satp = process.root();
        let live_satp = csr::satp();
        r.check(
            "sv39-live",
            live_satp >> 60 == 8 && (live_satp & ((1 << 44) - 1)) << 12 == satp,
            format_args!("satp {live_satp:#x}, root {satp:#x}"),
        );
    }
}
