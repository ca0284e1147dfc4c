//! `cargo xtask demo --arch riscv64`: builds the riscv64 demo kernel
//! (`examples/bare-metal-riscv64`) and boots it on QEMU `virt` (steps in
//! `guest.rs`):
//!
//! * target `riscv64gc-unknown-none-elf`; QEMU from `qemu-system-misc`,
//!   whose `qemu-system-data` dependency ships OpenSBI;
//! * `-M virt -bios default`: OpenSBI enters the kernel at 0x8020_0000 in
//!   S-mode;
//! * the kernel ends the run through the SiFive test finisher: exit status
//!   0 when every check passed, 3 when one failed.

use std::path::Path;

use crate::guest::{self, Guest};

const RISCV64: Guest = Guest {
    arch: "riscv64",
    target: "riscv64gc-unknown-none-elf",
    kernel_dir: "examples/bare-metal-riscv64",
    kernel_bin: "hmm-bare-metal-riscv64",
    qemu: "qemu-system-riscv64",
    apt_package: "qemu-system-misc",
    machine_args: &["-M", "virt", "-accel", "tcg", "-m", "128M", "-smp", "1", "-bios", "default"],
    // `exit::FAIL_STATUS` of the kernel.
    exit_failure: 3,
};

/// Builds and boots the riscv64 demo kernel; `Ok` only if it passed.
pub fn demo(repo_root: &Path) -> Result<(), String> {
    guest::demo(repo_root, &RISCV64)
}
