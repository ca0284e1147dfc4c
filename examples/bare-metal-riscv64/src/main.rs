//! `hmm-bare-metal-riscv64`: a small riscv64 kernel for QEMU `virt` that
//! runs hmm-core on live Sv39 tables: a process address space whose
//! entries the hart's MMU really translates through (demand-zero and
//! copy-on-write faults, write-protect, unmap, each change bracketed by
//! hmm-core's invalidation hooks and followed by `sfence.vma`), and a device
//! that reaches the process's memory only through its hmm-core `Mirror`.
//! One hart: the device runs between the CPU's steps. See README.md.
//!
//! Module map (one job each):
//! * `boot`    — entry from OpenSBI, trap vector (assembly)
//! * `uart`    — ns16550a console, `print!`/`println!`
//! * `exit`    — SiFive test finisher: QEMU exit status 0 / 3
//! * `csr`     — satp, sfence.vma, sstatus.SUM, stvec, trap CSRs, time
//! * `trap`    — page faults to the process, fault probes, fatal traps
//! * `memory`  — frame pool (`BitmapFrameAllocator`), identity map
//! * `paging`  — Sv39 tables with hmm-core's `Sv39` encoding
//! * `process` — the address space: `hmm_core::AddressSpace`
//! * `device`  — the device: `hmm_core::DeviceOps`, reads and writes
//! * `demo`    — the checks, `PASS`/`FAIL` lines

#![no_std]
#![no_main]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

#[macro_use]
mod uart;

mod boot;
mod csr;
mod demo;
mod device;
mod exit;
mod memory;
mod paging;
mod process;
mod trap;

use core::panic::PanicInfo;

use spin::Once;

use process::Process;

/// The demo's one process: static, so the trap handler may reach it.
static PROCESS: Once<Process> = Once::new();

/// Ends the run with a FAIL line.
fn fail(what: &str) -> ! {
    println!("FAIL boot: {what}");
    exit::exit(false)
}

/// Called by `boot::_start` on the boot hart, paging off.
#[unsafe(no_mangle)]
extern "C" fn kmain(hart: u64, dtb: u64) -> ! {
    println!("hmm-core riscv64 demo: hart {hart}, device tree at {dtb:#x}, kernel ends at {:#x}", boot::kernel_end());
    csr::set_trap_vector(boot::trap_entry);
    let frames = memory::init(boot::kernel_end(), dtb).unwrap_or_else(|e| fail(e));
    let kernel_root = paging::kernel_root(frames).unwrap_or_else(|| fail("no frame for the kernel root"));
    let process = Process::new(kernel_root, frames).unwrap_or_else(|_| fail("no frame for the process root"));
    let process = PROCESS.call_once(|| process);
    process.enter();
    csr::allow_user_access();
    println!("Sv39 on: satp {:#x}; user accesses from S-mode through the MMU (sstatus.SUM)", csr::satp());
    let start = csr::time();
    let report = demo::run(process, frames);
    let micros = (csr::time() - start) / 10;
    println!("{} passed, {} failed ({micros} us)", report.passed, report.failed);
    exit::exit(report.failed == 0 && report.passed > 0)
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAIL panic: {info}");
    exit::exit(false)
}
