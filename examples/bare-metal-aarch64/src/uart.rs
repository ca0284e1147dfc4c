//! The PL011 UART of QEMU virt at 0x0900_0000 (usable without setup on
//! QEMU), polled; `print!`/`println!`.

use core::fmt::{self, Write};

const UART: usize = 0x0900_0000;
/// Flag register; bit 5 = transmit FIFO full.
const FR: usize = 0x18;
const FR_TXFF: u32 = 1 << 5;

/// Writes bytes to the UART; a unit type, the device is global.
pub struct Uart;

impl Uart {
    fn put(byte: u8) {
        // SAFETY: UART (data register) and UART + FR are the PL011's
        // registers on virt, identity mapped as Device memory once the MMU is
        // on (Device by default before); volatile 32-bit accesses are what
        // the device expects.
        unsafe {
            while core::ptr::read_volatile((UART + FR) as *const u32) & FR_TXFF != 0 {}
            core::ptr::write_volatile(UART as *mut u32, u32::from(byte));
        }
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                Self::put(b'\r');
            }
            Self::put(b);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn print(args: fmt::Arguments<'_>) {
    let _ = Uart.write_fmt(args);
}

/// Prints to the UART.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::uart::print(format_args!($($arg)*)) };
}

/// Prints a line to the UART.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::uart::print(format_args!("{}\n", format_args!($($arg)*))) };
}
