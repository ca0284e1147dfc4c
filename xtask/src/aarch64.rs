//! `cargo xtask demo --arch aarch64`: builds the aarch64 demo kernel
//! (`examples/bare-metal-aarch64`) and boots it on QEMU `virt` (steps in
//! `guest.rs`):
//!
//! * target `aarch64-unknown-none`; QEMU from `qemu-system-arm`;
//! * `-M virt -cpu cortex-a72`, no firmware: QEMU loads the ELF and enters
//!   it at EL1 with the MMU off (the kernel also drops from EL2 when started
//!   with `virtualization=on`);
//! * `-semihosting`: the kernel ends the run with the semihosting SYS_EXIT
//!   call (ADP_Stopped_ApplicationExit and a status): exit status 0 when
//!   every check passed, 3 when one failed.

use std::path::Path;

use crate::guest::{self, Guest};

const AARCH64: Guest = Guest {
    arch: "aarch64",
    target: "aarch64-unknown-none",
    kernel_dir: "examples/bare-metal-aarch64",
    kernel_bin: "hmm-bare-metal-aarch64",
    qemu: "qemu-system-aarch64",
    apt_package: "qemu-system-arm",
    machine_args: &["-M", "virt", "-cpu", "cortex-a72", "-accel", "tcg", "-m", "128M", "-smp", "1", "-semihosting"],
    // `exit::FAIL_STATUS` of the kernel.
    exit_failure: 3,
};

/// Builds and boots the aarch64 demo kernel; `Ok` only if it passed.
pub fn demo(repo_root: &Path) -> Result<(), String> {
    guest::demo(repo_root, &AARCH64)
}
