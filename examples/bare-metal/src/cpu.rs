//! Thin wrappers around x86_64 instructions (port I/O, control registers,
//! MSRs, TSC, TLB) so the rest of the kernel has no inline `asm!`.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
/// Port I/O can reprogram arbitrary hardware; the caller must know what the
/// device at `port` does with the value.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
/// Same as [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags)) }
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
/// Same as [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// Reads can have side effects on devices (e.g. popping a FIFO).
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

/// Reads a model-specific register.
///
/// # Safety
/// Reading an MSR the CPU does not implement raises #GP.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// Writing an MSR changes how the CPU behaves; the caller must know the
/// effect of `value` on `msr` (and the MSR must exist, or this raises #GP).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    let (lo, hi) = (value as u32, (value >> 32) as u32);
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nomem, nostack, preserves_flags)) }
}

/// `cpuid` leaf `leaf` (subleaf 0): `[eax, ebx, ecx, edx]`.
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Turns on EFER.NXE (so the no-execute bit of page-table entries is honoured
/// instead of being a reserved bit) if the CPU has it. Returns whether it is on.
pub fn enable_nx() -> bool {
    const IA32_EFER: u32 = 0xc000_0080;
    const NXE: u64 = 1 << 11;
    if cpuid(0x8000_0000)[0] < 0x8000_0001 || cpuid(0x8000_0001)[3] & (1 << 20) == 0 {
        return false;
    }
    // SAFETY: IA32_EFER exists in long mode; setting NXE (checked supported
    // above) only makes bit 63 of page-table entries meaningful, and no table
    // in use sets it yet.
    unsafe { wrmsr(IA32_EFER, rdmsr(IA32_EFER) | NXE) };
    true
}

/// Current value of CR2 (the faulting linear address after a #PF).
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects; we always run at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Current value of CR3 (physical address of the active PML4 plus flags).
pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects; we always run at CPL 0.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Loads CR3: switches to the page tables rooted at `pml4` and flushes every
/// non-global TLB entry.
///
/// # Safety
/// `pml4` must be a valid PML4 that maps the running code, its stack and
/// everything the caller touches next exactly as the current one does.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: forwarded to the caller (see function docs).
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) }
}

/// Reloads CR3 with its current value, flushing all non-global TLB entries.
pub fn flush_tlb_all() {
    // SAFETY: writing back the value CR3 already holds keeps the same address
    // space; the only effect is dropping cached translations.
    unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags)) }
}

/// Drops the TLB entry (if any) for the page containing `va`.
pub fn invlpg(va: u64) {
    // SAFETY: invalidating a TLB entry never changes what memory holds; at
    // worst the next access re-walks the page tables.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) }
}

/// Time-stamp counter. Under QEMU TCG it follows the host's clock, so it is
/// a usable (uncalibrated) time base for delays and timeouts.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC is unprivileged and side-effect free (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes `int3` (vector 3). The IDT handler records it and returns.
pub fn breakpoint() {
    // SAFETY: the IDT installed by `idt::init` handles #BP and returns to the
    // next instruction with all registers restored.
    unsafe { asm!("int3", options(nomem, nostack)) }
}

/// Stops this CPU for good (interrupts off, `hlt` in a loop).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this CPU; with IF=0 only NMI/INIT/SMI
        // could wake it, and the loop puts it straight back to sleep.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Conservative upper bound on the TSC rate, in ticks per microsecond. Delays
/// assume this rate, so on any real host (TSC <= 5 GHz) a delay lasts at least
/// as long as requested. There is no PIT/HPET calibration on purpose.
pub const TSC_TICKS_PER_US_MAX: u64 = 5_000;

/// A point in the future, measured with the TSC.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// A deadline at least `us` microseconds from now (see
    /// [`TSC_TICKS_PER_US_MAX`]).
    pub fn after_us(us: u64) -> Self {
        Self(rdtsc().saturating_add(us.saturating_mul(TSC_TICKS_PER_US_MAX)))
    }

    /// Whether the deadline has passed.
    pub fn expired(self) -> bool {
        rdtsc() >= self.0
    }
}

/// Busy-waits at least `us` microseconds.
pub fn delay_us(us: u64) {
    let deadline = Deadline::after_us(us);
    while !deadline.expired() {
        core::hint::spin_loop();
    }
}
