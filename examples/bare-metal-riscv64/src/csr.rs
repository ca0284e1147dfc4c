//! The few supervisor CSRs and instructions the kernel needs.

use core::arch::asm;

/// `satp.MODE` for Sv39.
const SATP_SV39: u64 = 8 << 60;
/// `sstatus.SUM`: S-mode loads and stores may access U = 1 pages.
const SSTATUS_SUM: u64 = 1 << 18;

/// Switches translation to the Sv39 table rooted at `root` (ASID 0) and
/// flushes this hart's TLB.
///
/// # Safety
/// `root` must be a complete Sv39 table that maps the running code, its
/// stack and every address the kernel touches afterwards as before.
pub unsafe fn enable_sv39(root: u64) {
    let satp = SATP_SV39 | root >> 12;
    // SAFETY: the caller guarantees the new table maps everything in use;
    // the `sfence.vma` after the write discards translations of the old one.
    unsafe { asm!("csrw satp, {0}", "sfence.vma", in(reg) satp, options(nostack)) };
}

/// The current `satp`.
pub fn satp() -> u64 {
    let v: u64;
    // SAFETY: reading a CSR has no side effect.
    unsafe { asm!("csrr {0}, satp", out(reg) v, options(nomem, nostack)) };
    v
}

/// `sfence.vma va, zero`: this hart drops cached translations of `va` (all
/// address spaces), after the table stores before it.
pub fn flush_page(va: u64) {
    // SAFETY: a fence only orders and drops cached translations; it reads
    // and writes no memory. No `nomem`: earlier table stores stay before it.
    unsafe { asm!("sfence.vma {0}, zero", in(reg) va, options(nostack)) };
}

/// Lets S-mode loads and stores reach user (U = 1) pages, the way a kernel
/// copies to and from user memory.
pub fn allow_user_access() {
    // SAFETY: setting SUM only widens which pages S-mode may access; the
    // kernel touches user addresses only on purpose.
    unsafe { asm!("csrs sstatus, {0}", in(reg) SSTATUS_SUM, options(nomem, nostack)) };
}

/// Installs the direct-mode trap vector `handler` (4-byte aligned).
pub fn set_trap_vector(handler: unsafe extern "C" fn()) {
    // SAFETY: `handler` is `boot::trap_entry`, which saves and restores the
    // interrupted context; interrupts stay disabled, so only exceptions
    // arrive there.
    unsafe { asm!("csrw stvec, {0}", in(reg) handler as usize, options(nomem, nostack)) };
}

/// What a trap handler reads: cause, trap value, exception PC.
#[derive(Clone, Copy, Debug)]
pub struct Trap {
    /// `scause`.
    pub cause: u64,
    /// `stval`: the faulting address of a page fault.
    pub tval: u64,
    /// `sepc`: the trapping instruction.
    pub epc: u64,
}

/// Reads the trap CSRs (inside the trap handler).
pub fn trap() -> Trap {
    let (cause, tval, epc): (u64, u64, u64);
    // SAFETY: reading CSRs has no side effect.
    unsafe {
        asm!("csrr {0}, scause", "csrr {1}, stval", "csrr {2}, sepc",
            out(reg) cause, out(reg) tval, out(reg) epc, options(nomem, nostack))
    };
    Trap { cause, tval, epc }
}

/// Sets where `sret` returns to.
///
/// # Safety
/// `epc` must be the address of an instruction boundary of the interrupted
/// code where it can go on with its saved registers.
pub unsafe fn set_epc(epc: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("csrw sepc, {0}", in(reg) epc, options(nomem, nostack)) };
}

/// The `time` counter (10 MHz on QEMU virt).
pub fn time() -> u64 {
    let t: u64;
    // SAFETY: reading the time CSR has no side effect (OpenSBI delegates it).
    unsafe { asm!("rdtime {0}", out(reg) t, options(nomem, nostack)) };
    t
}

/// Waits for an interrupt (a pause when none can come).
pub fn wait_for_interrupt() {
    // SAFETY: `wfi` only stalls the hart.
    unsafe { asm!("wfi", options(nomem, nostack)) };
}
