//! PVH entry: the very first instructions the kernel executes.
//!
//! QEMU (`-kernel kernel.elf`) loads the ELF segments at their physical
//! addresses, finds the 32-bit entry point in the Xen ELF note below
//! (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18) and jumps there in 32-bit protected
//! mode with paging off, flat segments, and `%ebx` = physical address of the
//! `hvm_start_info` structure (see `pvh.rs`).
//!
//! The stub then
//! 1. zeroes `.bss` (QEMU already does, but the PVH contract does not say so),
//! 2. loads a GDT that has 32-bit and 64-bit code segments,
//! 3. checks for long mode (exits QEMU with the failure code if absent),
//! 4. builds early page tables: the first 4 GiB identity mapped with 2 MiB
//!    pages (the top GiB — MMIO incl. the local APIC — uncached),
//! 5. enables PAE, EFER.LME and paging (+ CR0.WP),
//! 6. far-jumps into 64-bit code, sets the boot stack and calls
//!    `kernel_main(start_info_paddr)`.
//!
//! The same PML4 (`boot_pml4`) stays the kernel's page table forever:
//! `memory::paging` later adds the high "offset map" of all RAM to it, and the
//! application processors load it too.
//!
//! SSE is NOT enabled: `x86_64-unknown-none` is a soft-float target (no
//! `sse`/`sse2` target features), so compiled Rust never touches XMM
//! registers. `objdump -d` of the kernel shows no xmm use.

use core::arch::global_asm;

use crate::qemu_exit::ExitCode;

/// Size of the boot CPU's stack.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    /* ---- Xen PVH ELF note: tells QEMU where the 32-bit entry is. ---- */
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz: QEMU reads a 64-bit value for ELF64 */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad pvh_start32

    /* ---- 32-bit entry ---- */
    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %ebp                 /* keep start_info; cpuid clobbers ebx */

    /* zero .bss (page tables and boot stack live there) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_reload_cs
pvh_reload_cs:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $boot_stack_top, %esp

    /* long mode available? (CPUID 0x80000001:EDX bit 29) */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb pvh_no_long_mode
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 29), %edx
    jz pvh_no_long_mode

    /* PML4[0] -> PDPT; PDPT[0..4] -> four page directories */
    movl $boot_pdpt, %eax
    orl $0x3, %eax                  /* present | writable */
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt
    addl $4096, %eax
    movl %eax, boot_pdpt + 8
    addl $4096, %eax
    movl %eax, boot_pdpt + 16
    addl $4096, %eax
    movl %eax, boot_pdpt + 24

    /* 2048 PD entries: entry k maps [k * 2 MiB, (k + 1) * 2 MiB) */
    xorl %ecx, %ecx
pvh_pd_loop:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                 /* present | writable | 2 MiB page */
    cmpl $1536, %ecx
    jb pvh_pd_cached
    orl $0x18, %eax                 /* 3..4 GiB is MMIO: PCD | PWT */
pvh_pd_cached:
    movl %eax, boot_pd(, %ecx, 8)
    incl %ecx
    cmpl $2048, %ecx
    jb pvh_pd_loop

    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $(1 << 5), %eax             /* CR4.PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax             /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax           /* CR0.PG | CR0.WP | CR0.PE */
    movl %eax, %cr0
    ljmp $0x18, $pvh_long_mode

pvh_no_long_mode:
    movw $0xf4, %dx                 /* isa-debug-exit: fail loudly */
    movl ${fail}, %eax
    outl %eax, %dx
pvh_dead32:
    hlt
    jmp pvh_dead32

    /* ---- 64-bit ---- */
    .code64
pvh_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %ebp, %edi                 /* arg 0: start_info paddr (zero-extended) */
    xorl %ebp, %ebp
    call kernel_main
pvh_dead64:
    cli
    hlt
    jmp pvh_dead64

    /* ---- boot GDT: null, code32 (0x08), data (0x10), code64 (0x18) ---- */
    .section .rodata.boot, "a", @progbits
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    /* ---- early page tables and boot stack (zeroed above) ---- */
    .section .bss.boot, "aw", @nobits
    .p2align 12
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .p2align 4
boot_stack_bottom:
    .skip {stack_size}
boot_stack_top:
"#,
    fail = const ExitCode::Failure as u32,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);
