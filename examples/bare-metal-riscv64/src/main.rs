//! `hmm-bare-metal-riscv64`: a small riscv64 kernel for QEMU `virt` that
//! runs hmm-core on live Sv39 tables: a process address space whose
//! entries the hart's MMU really translates through (demand-zero and
//! copy-on-write faults, write-protect, unmap, each change bracketed by
//! hmm-core's invalidation hooks and followed by `sfence.vma`), and a device
//! that reaches the process's memory only through its hmm-core `Mirror`.
//! One hart: the device runs between the CPU's steps. The process, the
//! device, the frame pool and the checks are `hmm-demo-kernel`'s, shared
//! with the aarch64 kernel; see README.md.
//!
//! Module map (one job each):
//! * `boot`    — entry from OpenSBI, trap vector (assembly)
//! * `uart`    — ns16550a console output (`putc`)
//! * `exit`    — SiFive test finisher: QEMU exit status 0 / 3
//! * `csr`     — satp, sfence.vma, sstatus.SUM, stvec, trap CSRs, time
//! * `trap`    — page faults to the process, fault probes, fatal traps
//! * `paging`  — the kernel half of the Sv39 tables (identity map)
//! * `cpu`     — `hmm_demo_kernel::Cpu` for Sv39
//! * `checks`  — the riscv64-only check (`sv39-live`)

#![no_std]
#![no_main]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

mod boot;
mod checks;
mod cpu;
mod csr;
mod exit;
mod paging;
mod trap;
mod uart;

use core::panic::PanicInfo;

use hmm_demo_kernel::{Process, console, demo, memory, println};
use spin::Once;

use cpu::Sv39Cpu;

/// The demo's one process: static, so the trap handler may reach it.
static PROCESS: Once<Process<Sv39Cpu>> = Once::new();

/// Ends the run with a FAIL line.
fn fail(what: &str) -> ! {
    println!("FAIL boot: {what}");
    exit::exit(false)
}

/// Called by `boot::_start` on the boot hart, paging off.
#[unsafe(no_mangle)]
extern "C" fn kmain(hart: u64, dtb: u64) -> ! {
    console::set_putc(uart::putc);
    println!("hmm-core riscv64 demo: hart {hart}, device tree at {dtb:#x}, kernel ends at {:#x}", boot::kernel_end());
    csr::set_trap_vector(boot::trap_entry);
    let pool = boot::kernel_end();
    // QEMU puts the device tree near the top of RAM: the pool must miss it.
    if (pool..pool + memory::POOL_BYTES).contains(&dtb) {
        fail("frame pool does not fit in RAM below the device tree");
    }
    // SAFETY: paging is off, and every table the kernel runs on maps RAM at
    // VA = PA (`paging::kernel_root`); the pool after the image is free RAM.
    let frames = unsafe { memory::init(paging::RAM, pool) }.unwrap_or_else(|e| fail(e));
    let kernel_root = paging::kernel_root(frames).unwrap_or_else(|| fail("no frame for the kernel root"));
    let process = Process::new(kernel_root, frames).unwrap_or_else(|_| fail("no frame for the process root"));
    let process = PROCESS.call_once(|| process);
    process.enter();
    csr::allow_user_access();
    println!("Sv39 on: satp {:#x}; user accesses from S-mode through the MMU (sstatus.SUM)", csr::satp());
    let start = csr::time();
    let report = demo::run(process, frames);
    let micros = (csr::time() - start) / 10;
    exit::exit(report.close(micros))
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAIL panic: {info}");
    exit::exit(false)
}
