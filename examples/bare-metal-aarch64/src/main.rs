//! `hmm-bare-metal-aarch64`: a small aarch64 kernel for QEMU `virt` that
//! runs hmm-core on live VMSAv8-64 stage-1 tables (4 KiB granule, 48-bit,
//! `TTBR0_EL1`): a process address space whose entries the MMU really
//! translates through (demand-zero, copy-on-write and PROT_NONE hint
//! faults, write-protect, unmap, each change bracketed by hmm-core's
//! invalidation hooks and followed by `tlbi vae1is; dsb ish; isb`), and a
//! device that reaches the process's memory only through its hmm-core
//! `Mirror`. One core: the device runs between the CPU's steps. The
//! process, the device, the frame pool and the shared checks are
//! `hmm-demo-kernel`'s, shared with the riscv64 kernel; see README.md.
//!
//! Module map (one job each):
//! * `boot`    — entry (EL2 -> EL1 if needed), vector table (assembly)
//! * `uart`    — PL011 console output (`putc`)
//! * `exit`    — semihosting SYS_EXIT: QEMU exit status 0 / 3
//! * `sysreg`  — MAIR/TCR/TTBR/SCTLR, TLBI, PAN, VBAR, ESR/FAR/ELR, AT, counter
//! * `trap`    — data aborts to the process, fault probes, fatal exceptions
//! * `paging`  — the kernel half of the 48-bit tables, memory types
//! * `cpu`     — `hmm_demo_kernel::Cpu` for `Aarch64Va48`
//! * `checks`  — the aarch64-only checks (`mmu-live`, `at-s1e1w`, AT in
//!   `write-protect`, `prot-none-hint`)

#![no_std]
#![no_main]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

mod boot;
mod checks;
mod cpu;
mod exit;
mod paging;
mod sysreg;
mod trap;
mod uart;

use core::panic::PanicInfo;

use hmm_demo_kernel::{Process, console, demo, memory, println};
use spin::Once;

use cpu::Aarch64Cpu;

/// The demo's one process: static, so the trap handler may reach it.
static PROCESS: Once<Process<Aarch64Cpu>> = Once::new();

/// Ends the run with a FAIL line.
fn fail(what: &str) -> ! {
    println!("FAIL boot: {what}");
    exit::exit(false)
}

/// Called by `boot::_start` at EL1, MMU off; `boot_el` is the exception
/// level QEMU entered the kernel at (2: `_start` dropped to EL1).
#[unsafe(no_mangle)]
extern "C" fn kmain(boot_el: u64) -> ! {
    console::set_putc(uart::putc);
    sysreg::set_vectors(boot::vectors);
    let el = sysreg::current_el();
    println!(
        "hmm-core aarch64 demo: entered at EL{boot_el}, running at EL{el}, kernel ends at {:#x}",
        boot::kernel_end()
    );
    if el != 1 {
        fail("not at EL1 (EL3 entry is not supported)");
    }
    let kernel_root = paging::kernel_root();
    // SAFETY: the kernel root identity maps RAM (code, stack, tables, frame
    // pool) and the MMIO window with the memory types of `sysreg::MAIR`.
    unsafe { sysreg::enable_mmu(kernel_root) };
    // SAFETY: the kernel root, in every process root, identity maps RAM;
    // the pool after the image is free RAM (the device tree QEMU passes
    // sits below the image, at the start of RAM).
    let frames = unsafe { memory::init(paging::RAM, boot::kernel_end()) }.unwrap_or_else(|e| fail(e));
    let process = Process::new(kernel_root, frames).unwrap_or_else(|_| fail("no frame for the process root"));
    let process = PROCESS.call_once(|| process);
    process.enter();
    sysreg::allow_user_access();
    let (ttbr0, tcr, sctlr) = sysreg::mmu_registers();
    println!(
        "MMU on: TTBR0_EL1 {ttbr0:#x}, TCR_EL1 {tcr:#x}, SCTLR_EL1 {sctlr:#x}; FEAT_PAN {}, PAN {}",
        sysreg::has_pan(),
        sysreg::pan()
    );
    let (start, freq) = sysreg::counter();
    let report = demo::run(process, frames);
    let micros = (sysreg::counter().0 - start) * 1_000_000 / freq.max(1);
    exit::exit(report.close(micros))
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAIL panic: {info}");
    exit::exit(false)
}
