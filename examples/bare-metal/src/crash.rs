//! Deliberate crashes (`crash=pf|gp|ud|df|panic|ap-pf` on the command line).
//!
//! They exist to prove the failure paths: each must print a diagnostic on the
//! serial console and end QEMU with exit status 35 — never hang, never reset
//! silently. `xtask`'s runner reports them as errors.

use core::arch::asm;
use core::ptr::read_volatile;

use crate::pvh::Crash;
use crate::smp;

/// An address in a PML4 slot the kernel never maps.
const UNMAPPED: u64 = 0x0000_4000_0000_0000;
/// An address in the non-canonical hole.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000 - 0x1000_0000_0000;

fn page_fault() -> u64 {
    // SAFETY: not safe at all — this read faults on purpose; the #PF handler
    // reports it and exits QEMU, so execution never continues past it.
    unsafe { read_volatile(UNMAPPED as *const u64) }
}

fn ap_page_fault_job(_cpu: usize, _args: [u64; 4]) -> [u64; 4] {
    [page_fault(), 0, 0, 0]
}

/// Triggers `kind`. Does not return (the handlers exit QEMU).
pub fn now(kind: Crash) -> ! {
    println!("crash={kind:?} requested: faulting on purpose");
    match kind {
        Crash::PageFault => {
            page_fault();
        }
        Crash::GeneralProtection => {
            // SAFETY: faults on purpose (#GP on a non-canonical address); the
            // handler exits QEMU.
            unsafe { read_volatile(NON_CANONICAL as *const u64) };
        }
        // SAFETY: `ud2` raises #UD, whose handler exits QEMU.
        Crash::InvalidOpcode => unsafe { asm!("ud2") },
        Crash::DoubleFault => {
            // SAFETY: on purpose: with RSP on an unmapped page the CPU cannot
            // push the #PF frame, which escalates to #DF; #DF runs on the IST1
            // stack and its handler exits QEMU.
            unsafe { asm!("mov rsp, {0}", "push rax", in(reg) UNMAPPED + 0x1000, options(noreturn)) }
        }
        Crash::Panic => panic!("crash=panic requested"),
        Crash::ApPageFault => {
            let r = smp::run_on(1, ap_page_fault_job, [0; 4]);
            panic!("AP 1 did not fault (answer {r:?})");
        }
    }
    panic!("crash={kind:?} did not crash")
}
