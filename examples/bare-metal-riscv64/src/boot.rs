//! The entry point and the trap vector, in assembly.
//!
//! OpenSBI (`-bios default`) enters `_start` at 0x8020_0000 in S-mode with
//! paging off, interrupts off, `a0` = hart id and `a1` = device tree. The
//! entry sets the stack, zeroes `.bss` and calls `kmain(hart, dtb)`.
//!
//! `trap_entry` (installed in `stvec` by [`crate::csr::set_trap_vector`])
//! saves every integer register but `sp` on the current stack, calls
//! [`crate::trap::trap_handler`] and returns with `sret`: to the faulting
//! instruction after a resolved page fault, or past it after a probe. The
//! kernel only traps from S-mode, so the stack is always the kernel's.

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .globl _start
_start:
    la sp, __stack_top
    la t0, __bss_start
    la t1, __bss_end
1:
    bgeu t0, t1, 2f
    sd zero, 0(t0)
    addi t0, t0, 8
    j 1b
2:
    call kmain
3:
    wfi
    j 3b

    .text
    .balign 4
    .globl trap_entry
trap_entry:
    addi sp, sp, -256
    sd x1, 8(sp)
    sd x3, 24(sp)
    sd x4, 32(sp)
    sd x5, 40(sp)
    sd x6, 48(sp)
    sd x7, 56(sp)
    sd x8, 64(sp)
    sd x9, 72(sp)
    sd x10, 80(sp)
    sd x11, 88(sp)
    sd x12, 96(sp)
    sd x13, 104(sp)
    sd x14, 112(sp)
    sd x15, 120(sp)
    sd x16, 128(sp)
    sd x17, 136(sp)
    sd x18, 144(sp)
    sd x19, 152(sp)
    sd x20, 160(sp)
    sd x21, 168(sp)
    sd x22, 176(sp)
    sd x23, 184(sp)
    sd x24, 192(sp)
    sd x25, 200(sp)
    sd x26, 208(sp)
    sd x27, 216(sp)
    sd x28, 224(sp)
    sd x29, 232(sp)
    sd x30, 240(sp)
    sd x31, 248(sp)
    call trap_handler
    ld x1, 8(sp)
    ld x3, 24(sp)
    ld x4, 32(sp)
    ld x5, 40(sp)
    ld x6, 48(sp)
    ld x7, 56(sp)
    ld x8, 64(sp)
    ld x9, 72(sp)
    ld x10, 80(sp)
    ld x11, 88(sp)
    ld x12, 96(sp)
    ld x13, 104(sp)
    ld x14, 112(sp)
    ld x15, 120(sp)
    ld x16, 128(sp)
    ld x17, 136(sp)
    ld x18, 144(sp)
    ld x19, 152(sp)
    ld x20, 160(sp)
    ld x21, 168(sp)
    ld x22, 176(sp)
    ld x23, 184(sp)
    ld x24, 192(sp)
    ld x25, 200(sp)
    ld x26, 208(sp)
    ld x27, 216(sp)
    ld x28, 224(sp)
    ld x29, 232(sp)
    ld x30, 240(sp)
    ld x31, 248(sp)
    addi sp, sp, 256
    sret
"#
);

unsafe extern "C" {
    /// The trap vector above.
    pub fn trap_entry();
    /// First byte past the kernel image, stack included (linker.ld).
    static __kernel_end: u8;
}

/// Physical (= virtual: identity map) address of the first byte past the
/// kernel image, 4 KiB aligned.
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(__kernel_end) as u64
}
