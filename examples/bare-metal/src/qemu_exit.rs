//! Ends the QEMU run through the `isa-debug-exit` device
//! (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
//!
//! QEMU exits with status `(value << 1) | 1`, so the host-side runner can tell
//! a kernel-reported success (33) from a failure (35), a triple fault or
//! shutdown (0, thanks to `-no-reboot`) and a hang (its own timeout).

use crate::cpu;

/// I/O port of the isa-debug-exit device.
const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The two outcomes the kernel reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// QEMU exit status 33.
    Success = 0x10,
    /// QEMU exit status 35.
    Failure = 0x11,
}

/// Terminates the whole virtual machine (all CPUs) with `code`.
pub fn exit(code: ExitCode) -> ! {
    // SAFETY: port 0xf4 is the isa-debug-exit device; writing to it makes
    // QEMU exit immediately and has no other effect.
    unsafe { cpu::outl(DEBUG_EXIT_PORT, code as u32) };
    // Only reached when the device is missing (e.g. QEMU started by hand
    // without it): stop instead of running on.
    cpu::halt_forever()
}
