//! The Rust half of the trap vector (`boot::trap_entry`): page faults go to
//! the process's fault handler ([`crate::PROCESS`]); a fault of a
//! [`probe_load`] that nothing resolves is recorded and the load skipped;
//! anything else is fatal (a FAIL line, QEMU exits with the failure status).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_demo_kernel::println;

use crate::{csr, exit};

const LOAD_PAGE_FAULT: u64 = 13;
const STORE_PAGE_FAULT: u64 = 15;

/// Set while a [`probe_load`] runs.
static PROBING: AtomicBool = AtomicBool::new(false);
/// The faulting address the probe saw, plus one (0: no fault).
static PROBE_FAULT: AtomicU64 = AtomicU64::new(0);

#[unsafe(no_mangle)]
extern "C" fn trap_handler() {
    let trap = csr::trap();
    let page_fault = matches!(trap.cause, LOAD_PAGE_FAULT | STORE_PAGE_FAULT);
    let write = trap.cause == STORE_PAGE_FAULT;
    if page_fault && crate::PROCESS.get().is_some_and(|p| p.cpu_page_fault(trap.tval, write)) {
        return; // `sret` retries the access through the new entry.
    }
    if page_fault && PROBING.load(Ordering::Relaxed) {
        PROBE_FAULT.store(trap.tval + 1, Ordering::Relaxed);
        // SAFETY: the kernel's code is identity mapped and readable; `epc`
        // is the probe's load, whose low bits give its length (2 when
        // compressed); the probe expects to go on after it.
        unsafe {
            let low = core::ptr::read_volatile(trap.epc as *const u16);
            csr::set_epc(trap.epc + if low & 3 == 3 { 4 } else { 2 });
        }
        return;
    }
    println!("FAIL trap: scause {:#x} stval {:#x} sepc {:#x}", trap.cause, trap.tval, trap.epc);
    exit::exit(false);
}

/// A CPU load of the word at `va` (through the MMU) that may fault: the
/// value, or `Err(address)` when a page fault nothing could resolve hit it.
pub fn probe_load(va: u64) -> Result<u64, u64> {
    PROBE_FAULT.store(0, Ordering::Relaxed);
    PROBING.store(true, Ordering::Relaxed);
    let value: u64;
    // SAFETY: a load from `va`: a page fault there is either resolved by
    // the process (then the load completes) or skipped by the trap handler
    // (then `value` keeps 0); it writes nothing but the output register.
    unsafe { core::arch::asm!("ld {v}, 0({a})", a = in(reg) va, v = inout(reg) 0u64 => value, options(nostack)) };
    PROBING.store(false, Ordering::Relaxed);
    match PROBE_FAULT.load(Ordering::Relaxed) {
        0 => Ok(value),
        at => Err(at - 1),
    }
}
