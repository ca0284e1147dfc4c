//! Local APIC (xAPIC, memory mapped at 0xfee0_0000): CPU identification and
//! the INIT / STARTUP inter-processor interrupts used to wake the APs, and
//! NMIs for TLB shootdowns.
//!
//! The registers are reached through the boot identity map, whose 3..4 GiB
//! range is mapped with PCD|PWT (uncached), as MMIO must be.

use core::ptr::{read_volatile, write_volatile};

use crate::cpu;

/// Physical (== identity-mapped virtual) base of the local APIC registers.
const LAPIC_BASE: u64 = 0xfee0_0000;
const IA32_APIC_BASE_MSR: u32 = 0x1b;

const REG_ID: u64 = 0x20;
const REG_SVR: u64 = 0xf0;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;

const ICR_DELIVERY_NMI: u32 = 0b100 << 8;
const ICR_DELIVERY_INIT: u32 = 0b101 << 8;
const ICR_DELIVERY_STARTUP: u32 = 0b110 << 8;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_SEND_PENDING: u32 = 1 << 12;

fn read(reg: u64) -> u32 {
    // SAFETY: LAPIC_BASE is identity mapped (uncached) by the boot page tables
    // and `reg` is one of the architectural register offsets above.
    unsafe { read_volatile((LAPIC_BASE + reg) as *const u32) }
}

fn write(reg: u64, value: u32) {
    // SAFETY: as in `read`; callers only write registers whose effects are
    // described next to the call.
    unsafe { write_volatile((LAPIC_BASE + reg) as *mut u32, value) }
}

/// Checks the APIC is in xAPIC mode at the expected base and software-enables
/// it (spurious vector 0xff). Boot CPU, once.
pub fn init() {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let base = unsafe { cpu::rdmsr(IA32_APIC_BASE_MSR) };
    assert!(base & (1 << 11) != 0, "local APIC globally disabled");
    assert!(base & (1 << 10) == 0, "x2APIC mode active; this kernel drives the xAPIC");
    assert_eq!(base & 0xffff_f000, LAPIC_BASE, "local APIC not at {LAPIC_BASE:#x}");
    // Spurious vector 0xff + APIC software enable. Interrupts stay masked
    // (IF=0), so no vector is ever delivered.
    write(REG_SVR, read(REG_SVR) | 0x1ff);
}

/// APIC ID of the calling CPU. QEMU numbers CPUs 0..n, so this is also our
/// CPU index.
pub fn current_id() -> u32 {
    read(REG_ID) >> 24
}

/// Waits until the previous IPI left the APIC. Returns false after ~100 ms.
fn wait_icr_idle() -> bool {
    let deadline = cpu::Deadline::after_us(100_000);
    while read(REG_ICR_LOW) & ICR_SEND_PENDING != 0 {
        if deadline.expired() {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn send_ipi(apic_id: u32, command: u32) -> Result<(), &'static str> {
    write(REG_ESR, 0); // clear stale errors
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, command); // writing the low half sends the IPI
    if wait_icr_idle() { Ok(()) } else { Err("IPI stuck in send-pending state") }
}

/// Sends INIT (level assert) to `apic_id`: the target resets and waits for a
/// STARTUP IPI.
pub fn send_init(apic_id: u32) -> Result<(), &'static str> {
    send_ipi(apic_id, ICR_DELIVERY_INIT | ICR_LEVEL_ASSERT)
}

/// Sends a STARTUP IPI: the target starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u32, page: u8) -> Result<(), &'static str> {
    send_ipi(apic_id, ICR_DELIVERY_STARTUP | ICR_LEVEL_ASSERT | u32::from(page))
}

/// Sends an NMI to `apic_id`. NMIs arrive even with interrupts disabled
/// (IF=0), which is how this kernel asks another CPU to flush its TLB.
pub fn send_nmi(apic_id: u32) -> Result<(), &'static str> {
    send_ipi(apic_id, ICR_DELIVERY_NMI | ICR_LEVEL_ASSERT)
}
