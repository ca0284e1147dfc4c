//! The entry point and the exception vector table, in assembly.
//!
//! QEMU (`-kernel` with an ELF) enters `_start` with the MMU and caches off,
//! at EL1 on `virt` by default, at EL2 with `virtualization=on`. From EL2 the
//! entry drops to EL1 (AArch64 EL1, EL1 counter access, `eret` to EL1h with
//! interrupts masked). Then it enables FP/SIMD at EL1 (`CPACR_EL1.FPEN`:
//! Rust may use the vector registers), sets the stack, zeroes `.bss` and
//! calls `kmain(el)` with the exception level QEMU started it at.
//!
//! `vectors` (installed in `VBAR_EL1` by [`crate::sysreg::set_vectors`]):
//! 16 slots of 0x80 bytes; each saves `x0`/`x1`, puts its slot number in
//! `x0` and joins `trap_common`, which saves the other integer registers on
//! the current stack, calls [`crate::trap::trap_handler`]`(slot)` and
//! returns with `eret`: to the faulting instruction after a resolved page
//! fault, or past it after a probe. The kernel runs at EL1h (SP_EL1) and
//! only traps from there (slot 4), so the stack is always the kernel's.

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .globl _start
_start:
    mrs x19, CurrentEL
    ubfx x19, x19, #2, #2
    cmp x19, #2
    b.ne 1f
    mov x0, #(1 << 31)
    msr hcr_el2, x0
    mov x0, #3
    msr cnthctl_el2, x0
    msr cntvoff_el2, xzr
    mov x0, #0x3c5
    msr spsr_el2, x0
    adr x0, 1f
    msr elr_el2, x0
    eret
1:
    mov x0, #(3 << 20)
    msr cpacr_el1, x0
    isb
    adrp x0, __stack_top
    add x0, x0, :lo12:__stack_top
    mov sp, x0
    adrp x0, __bss_start
    add x0, x0, :lo12:__bss_start
    adrp x1, __bss_end
    add x1, x1, :lo12:__bss_end
2:
    cmp x0, x1
    b.hs 3f
    str xzr, [x0], #8
    b 2b
3:
    mov x0, x19
    bl kmain
4:
    wfi
    b 4b

    .text
    .balign 2048
    .globl vectors
vectors:
    .irp slot, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    .balign 0x80
    sub sp, sp, #256
    stp x0, x1, [sp, #0]
    mov x0, #\slot
    b trap_common
    .endr

trap_common:
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x19, [sp, #144]
    stp x20, x21, [sp, #160]
    stp x22, x23, [sp, #176]
    stp x24, x25, [sp, #192]
    stp x26, x27, [sp, #208]
    stp x28, x29, [sp, #224]
    str x30, [sp, #240]
    bl trap_handler
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x19, [sp, #144]
    ldp x20, x21, [sp, #160]
    ldp x22, x23, [sp, #176]
    ldp x24, x25, [sp, #192]
    ldp x26, x27, [sp, #208]
    ldp x28, x29, [sp, #224]
    ldr x30, [sp, #240]
    ldp x0, x1, [sp, #0]
    add sp, sp, #256
    eret
"#
);

unsafe extern "C" {
    /// The exception vector table above (2 KiB aligned).
    pub fn vectors();
    /// First byte past the kernel image, stack included (linker.ld).
    static __kernel_end: u8;
}

/// Physical (= virtual: identity map) address of the first byte past the
/// kernel image, 4 KiB aligned.
pub fn kernel_end() -> u64 {
    core::ptr::addr_of!(__kernel_end) as u64
}
