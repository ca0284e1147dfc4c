//! Ends the QEMU run through the SiFive test finisher of virt (0x10_0000):
//! `0x5555` makes QEMU exit with status 0, `(code << 16) | 0x3333` with
//! status `code`.

const FINISHER: usize = 0x10_0000;
const PASS: u32 = 0x5555;
const FAIL: u32 = 0x3333;
/// QEMU's exit status when the kernel reports a failure.
pub const FAIL_STATUS: u32 = 3;

/// Ends the run: status 0 if `passed`, [`FAIL_STATUS`] otherwise.
pub fn exit(passed: bool) -> ! {
    let word = if passed { PASS } else { FAIL_STATUS << 16 | FAIL };
    // SAFETY: FINISHER is the test device's only register on virt, identity
    // mapped; writing it stops the machine and touches no memory.
    unsafe { core::ptr::write_volatile(FINISHER as *mut u32, word) };
    loop {
        crate::csr::wait_for_interrupt();
    }
}
