//! The ns16550a UART of QEMU virt at 0x1000_0000 (OpenSBI configured it),
//! polled; `print!`/`println!`.

use core::fmt::{self, Write};

const UART: usize = 0x1000_0000;
/// Line status register: bit 5 = transmit holding register empty.
const LSR: usize = 5;
const LSR_THRE: u8 = 1 << 5;

/// Writes bytes to the UART; a unit type, the device is global.
pub struct Uart;

impl Uart {
    fn put(byte: u8) {
        // SAFETY: UART and UART + LSR are the ns16550a's registers on virt,
        // identity mapped (device memory) before and after paging is on;
        // volatile byte accesses are what the device expects.
        unsafe {
            while core::ptr::read_volatile((UART + LSR) as *const u8) & LSR_THRE == 0 {}
            core::ptr::write_volatile(UART as *mut u8, byte);
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
