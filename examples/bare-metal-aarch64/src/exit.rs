//! Ends the QEMU run through Arm semihosting (QEMU needs `-semihosting`):
//! `HLT #0xF000` with `w0` = SYS_EXIT (0x18) and `x1` pointing at the
//! AArch64 parameter block {reason, subcode}. With reason
//! ADP_Stopped_ApplicationExit (0x20026) QEMU exits with status `subcode`:
//! 0 when every check passed, [`FAIL_STATUS`] otherwise.

use core::sync::atomic::{AtomicBool, Ordering};

const SYS_EXIT: u32 = 0x18;
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;
/// QEMU's exit status when the kernel reports a failure.
pub const FAIL_STATUS: u64 = 3;

/// Set once the kernel tries to exit: a trap after that means semihosting
/// is off (the `HLT` was undefined), see [`exiting`].
static EXITING: AtomicBool = AtomicBool::new(false);

/// Whether [`exit`] already ran (for the trap handler).
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Ends the run: status 0 if `passed`, [`FAIL_STATUS`] otherwise.
pub fn exit(passed: bool) -> ! {
    EXITING.store(true, Ordering::Relaxed);
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, if passed { 0 } else { FAIL_STATUS }];
    // SAFETY: the semihosting call reads the two-word block (identity
    // mapped, on our stack) and stops the machine; without `-semihosting`
    // the HLT traps and the trap handler parks the CPU.
    unsafe { core::arch::asm!("hlt #0xf000", in("w0") SYS_EXIT, in("x1") block.as_ptr(), options(nostack)) };
    loop {
        crate::sysreg::wait_for_interrupt();
    }
}
