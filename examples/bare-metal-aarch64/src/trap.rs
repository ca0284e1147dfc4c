//! The Rust half of the vector table (`boot::vectors`): data aborts go to
//! the process's fault handler ([`crate::PROCESS`]); a fault of a
//! [`probe_load`] that nothing resolves is recorded and the load skipped;
//! anything else is fatal (a FAIL line, QEMU exits with the failure status).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_demo_kernel::println;

use crate::{exit, sysreg};

/// Vector slot: synchronous exception from the current EL with SP_ELx.
const SLOT_SYNC_EL1H: u64 = 4;
/// `ESR_EL1.EC` of a data abort taken without a change of EL.
const EC_DATA_ABORT_SAME_EL: u64 = 0x25;
/// `ESR_EL1.ISS` bits of a data abort: write not read, FAR not valid.
const ISS_WNR: u64 = 1 << 6;
const ISS_FNV: u64 = 1 << 10;
/// `ESR_EL1.ISS.DFSC` of a level-0 translation fault and of a level-3
/// permission fault (the first and the last translation-related codes).
const DFSC_TRANSLATION_L0: u64 = 0x04;
const DFSC_PERMISSION_L3: u64 = 0x0f;

/// Set while a [`probe_load`] runs.
static PROBING: AtomicBool = AtomicBool::new(false);
/// The faulting address the probe saw, plus one (0: no fault).
static PROBE_FAULT: AtomicU64 = AtomicU64::new(0);
/// The last resolved fault: instruction and address.
static LAST_RESOLVED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Whether the same access faulted again right after its fault was
/// resolved: the handler found nothing to fix (a spurious fault, already
/// flushed), so what blocks the access is something else (e.g. PAN set).
fn repeated(elr: u64, far: u64) -> bool {
    let last = [LAST_RESOLVED[0].swap(elr, Ordering::Relaxed), LAST_RESOLVED[1].swap(far, Ordering::Relaxed)];
    last == [elr, far]
}

/// A data abort on a translation: its address and whether it was a write.
/// Translation (DFSC 0b0001xx), access flag (0b0010xx) and permission
/// (0b0011xx) faults of any level, [`DFSC_TRANSLATION_L0`] ..=
/// [`DFSC_PERMISSION_L3`]; the rest (alignment, external aborts...) is not.
fn page_fault(t: &sysreg::Trap) -> Option<(u64, bool)> {
    let ec = t.esr >> 26 & 0x3f;
    let dfsc = t.esr & 0x3f;
    let translation = (DFSC_TRANSLATION_L0..=DFSC_PERMISSION_L3).contains(&dfsc);
    (ec == EC_DATA_ABORT_SAME_EL && translation && t.esr & ISS_FNV == 0).then_some((t.far, t.esr & ISS_WNR != 0))
}

#[unsafe(no_mangle)]
extern "C" fn trap_handler(slot: u64) {
    let trap = sysreg::trap();
    if exit::exiting() {
        // The semihosting HLT trapped: QEMU runs without -semihosting.
        println!("(no semihosting: QEMU needs -semihosting to end the run; parking the CPU)");
        loop {
            sysreg::wait_for_interrupt();
        }
    }
    let fault = if slot == SLOT_SYNC_EL1H { page_fault(&trap) } else { None };
    if let Some((va, write)) = fault {
        if !repeated(trap.elr, va) && crate::PROCESS.get().is_some_and(|p| p.cpu_page_fault(va, write)) {
            return; // `eret` retries the access through the new entry.
        }
        LAST_RESOLVED[0].store(0, Ordering::Relaxed);
        if PROBING.load(Ordering::Relaxed) {
            PROBE_FAULT.store(va + 1, Ordering::Relaxed);
            // SAFETY: `elr` is the probe's load, a 4-byte A64 instruction;
            // the probe expects to go on after it.
            unsafe { sysreg::set_elr(trap.elr + 4) };
            return;
        }
    }
    println!("FAIL trap: vector slot {slot}, ESR {:#x} FAR {:#x} ELR {:#x}", trap.esr, trap.far, trap.elr);
    exit::exit(false);
}

/// A CPU load of the word at `va` (through the MMU) that may fault: the
/// value, or `Err(address)` when a fault nothing could resolve hit it.
pub fn probe_load(va: u64) -> Result<u64, u64> {
    PROBE_FAULT.store(0, Ordering::Relaxed);
    PROBING.store(true, Ordering::Relaxed);
    let value: u64;
    // SAFETY: a load from `va`: a fault there is either resolved by the
    // process (then the load completes) or skipped by the trap handler (then
    // `value` keeps 0); it writes nothing but the output register.
    unsafe { core::arch::asm!("ldr {v}, [{a}]", a = in(reg) va, v = inout(reg) 0u64 => value, options(nostack)) };
    PROBING.store(false, Ordering::Relaxed);
    match PROBE_FAULT.load(Ordering::Relaxed) {
        0 => Ok(value),
        at => Err(at - 1),
    }
}
