//! The ns16550a UART of QEMU virt at 0x1000_0000 (OpenSBI configured it),
//! polled: the byte output of the shared console.

const UART: usize = 0x1000_0000;
/// Line status register: bit 5 = transmit holding register empty.
const LSR: usize = 5;
const LSR_THRE: u8 = 1 << 5;

/// Sends `byte` once the transmit holding register is empty.
pub fn putc(byte: u8) {
    // SAFETY: UART and UART + LSR are the ns16550a's registers on virt,
    // identity mapped (device memory) before and after paging is on;
    // volatile byte accesses are what the device expects.
    unsafe {
        while core::ptr::read_volatile((UART + LSR) as *const u8) & LSR_THRE == 0 {}
        core::ptr::write_volatile(UART as *mut u8, byte);
    }
}
