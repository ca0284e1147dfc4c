//! Interrupt descriptor table: every CPU exception (vectors 0..32) has a
//! handler, so a crash is never silent and never a hang.
//!
//! The entry stubs are plain assembly (the `x86-interrupt` ABI is not stable):
//! each pushes a dummy error code when the CPU does not supply one, then the
//! vector number, saves all general-purpose registers and calls
//! [`exception_dispatch`] with a pointer to the resulting [`ExceptionFrame`].
//!
//! * `#BP` (vector 3) is recoverable: it is counted and execution resumes
//!   (used by the test suite to prove the IDT works).
//! * NMI (vector 2) is a TLB shootdown request from another CPU (`tlb.rs`).
//! * `#PF` (vector 14) on a user address of the running process is resolved
//!   by `process::cpu_page_fault` (demand-zero, COW) and the access retried.
//! * Everything else is fatal: the handler prints vector, error code, CR2,
//!   RIP and registers, then exits QEMU with the failure code.
//! * `#DF` runs on the per-CPU IST1 stack (see `gdt.rs`).

use core::arch::{asm, global_asm};
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::gdt::{DOUBLE_FAULT_IST, KERNEL_CS};
use crate::qemu_exit::{self, ExitCode};
use crate::sync::InitCell;
use crate::{apic, cpu, process, serial, tlb};

global_asm!(
    r#"
    .section .text.isr, "ax", @progbits
    .macro ISR_NOERR vec
isr_stub_\vec:
    pushq $0
    pushq $\vec
    jmp isr_common
    .endm
    .macro ISR_ERR vec
isr_stub_\vec:
    pushq $\vec
    jmp isr_common
    .endm

    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR   8
    ISR_NOERR 9
    ISR_ERR   10
    ISR_ERR   11
    ISR_ERR   12
    ISR_ERR   13
    ISR_ERR   14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR   17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR   21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR   29
    ISR_ERR   30
    ISR_NOERR 31

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    /* 22 qwords pushed since the CPU aligned RSP to 16: still aligned */
    movq %rsp, %rdi
    cld
    call exception_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                  /* vector + error code */
    iretq

    .section .rodata.isr, "a", @progbits
    .p2align 3
    .global isr_stub_table
isr_stub_table:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_stub_\vec
    .endr
"#,
    options(att_syntax)
);

unsafe extern "C" {
    /// Addresses of the 32 exception entry stubs above.
    static isr_stub_table: [u64; 32];
}

/// Register state saved by `isr_common`, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    // pushed by the CPU
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl IdtEntry {
    const MISSING: Self =
        Self { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    fn interrupt_gate(handler: u64, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate (IF cleared)
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

static IDT: InitCell<[IdtEntry; 256]> = InitCell::new([IdtEntry::MISSING; 256]);

/// Number of `#BP` exceptions handled so far (all CPUs).
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);

/// Fills the IDT. Boot CPU only, before any AP starts.
pub fn init() {
    // SAFETY: single-threaded init (no AP running yet); the stub table is a
    // read-only array emitted by the assembly above.
    unsafe {
        let idt = &mut *IDT.get();
        for (vector, &stub) in isr_stub_table.iter().enumerate() {
            let ist = if vector == 8 { DOUBLE_FAULT_IST } else { 0 };
            idt[vector] = IdtEntry::interrupt_gate(stub, ist);
        }
    }
}

/// Loads the IDT on the calling CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let pointer = Pointer { limit: (size_of::<[IdtEntry; 256]>() - 1) as u16, base: IDT.get() as u64 };
    // SAFETY: the IDT is a static filled by `init` and never modified again;
    // `lidt` only reads the 10-byte pointer.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating point",
        20 => "#VE virtualization",
        21 => "#CP control protection",
        _ => "reserved",
    }
}

/// Called by `isr_common` with the saved state of the interrupted code.
#[unsafe(no_mangle)]
extern "C" fn exception_dispatch(frame: &mut ExceptionFrame) {
    match frame.vector {
        // int3 is a trap: RIP already points past it, so just resume.
        3 => {
            BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
        }
        // A TLB shootdown request (see `tlb.rs`).
        2 => tlb::nmi(),
        // A user page the running process has not mapped (yet) or write
        // protected: demand-zero or COW; the faulting access is retried.
        14 if process::cpu_page_fault(cpu::read_cr2(), frame.error_code) => {}
        _ => fatal(frame),
    }
}

fn fatal(f: &ExceptionFrame) -> ! {
    let cr2 = cpu::read_cr2();
    serial::emergency_print(format_args!(
        "\n!!! CPU EXCEPTION on cpu {}: {} (vector {})\n    error code: {:#x}{}\n    CR2: {:#018x}  RIP: {:#018x}  CS: {:#x}  RFLAGS: {:#x}\n    RSP: {:#018x}  SS: {:#x}\n    rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x}\n    rsi {:#x} rdi {:#x} rbp {:#x}\n    r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x}\n    r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}\n    (resolve RIP with: addr2line -e target/x86_64-unknown-none/release/hmm-bare-metal {:#x})\n",
        apic::current_id(),
        vector_name(f.vector),
        f.vector,
        f.error_code,
        PageFaultBits(f.vector, f.error_code),
        cr2,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
        f.rip,
    ));
    qemu_exit::exit(ExitCode::Failure)
}

/// Decodes a #PF error code for humans (prints nothing for other vectors).
struct PageFaultBits(u64, u64);

impl core::fmt::Display for PageFaultBits {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 != 14 {
            return Ok(());
        }
        let e = self.1;
        write!(
            f,
            " [{} {} {}{}{}]",
            if e & 1 != 0 { "protection-violation" } else { "not-present" },
            if e & 2 != 0 { "write" } else { "read" },
            if e & 4 != 0 { "user" } else { "supervisor" },
            if e & 8 != 0 { " reserved-bit" } else { "" },
            if e & 16 != 0 { " instruction-fetch" } else { "" },
        )
    }
}
