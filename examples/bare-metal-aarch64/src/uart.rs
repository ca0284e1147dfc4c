//! The PL011 UART of QEMU virt at 0x0900_0000 (usable without setup on
//! QEMU), polled: the byte output of the shared console.

const UART: usize = 0x0900_0000;
/// Flag register; bit 5 = transmit FIFO full.
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;

/// Sends `byte` once the transmit FIFO has room.
pub fn putc(byte: u8) {
    // SAFETY: UART (data register) and UART + FR are the PL011's
    // registers on virt, identity mapped as Device memory once the MMU is
    // on (Device by default before); volatile 32-bit accesses are what
    // the device expects.
    unsafe {
        while core::ptr::read_volatile((UART + FR) as *const u32) & FR_TXFF != 0 {}
        core::ptr::write_volatile(UART as *mut u32, u32::from(byte));
    }
}
