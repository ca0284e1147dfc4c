//! `hmm-demo-kernel`: everything the bare-metal demo kernels
//! (`bare-metal-riscv64`, `bare-metal-aarch64`) do the same way, written
//! once over hmm-core's `PteFormat` and a small [`Cpu`] trait each kernel
//! implements. A kernel keeps its boot code, trap vector, CSR or system
//! register access, UART, exit, paging bootstrap and the checks only its
//! architecture can make ([`ArchChecks`]); see README.md.
//!
//! Module map (one job each):
//! * `console` — `print!`/`println!` over the kernel's `putc`
//! * `cpu`     — the [`Cpu`] trait: format, user half, TLB maintenance, probe
//! * `memory`  — frame pool (`BitmapFrameAllocator`), identity map
//! * `paging`  — table walks and leaves in the CPU's hmm-core format
//! * `process` — the address space: `hmm_core::AddressSpace`
//! * `device`  — the device: `hmm_core::DeviceOps`, reads and writes
//! * `report`  — the check runner: `PASS`/`FAIL` lines, the closing line
//! * `demo`    — the shared checks, [`ArchChecks`] hooks for the others

#![no_std]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod console;
pub mod cpu;
pub mod demo;
pub mod device;
pub mod memory;
pub mod paging;
pub mod process;
pub mod report;

pub use cpu::Cpu;
pub use demo::ArchChecks;
pub use process::Process;
pub use report::Report;
