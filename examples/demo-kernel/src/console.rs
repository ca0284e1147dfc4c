//! `print!`/`println!` over the byte output the kernel supplies
//! ([`set_putc`]: its UART); `\n` goes out as `\r\n`.

use core::fmt::{self, Write};

use spin::Once;

/// The kernel's byte output.
static PUTC: Once<fn(u8)> = Once::new();

/// Sends everything printed from now on to `putc`, one byte at a time
/// (first call wins; output before it is dropped).
pub fn set_putc(putc: fn(u8)) {
    PUTC.call_once(|| putc);
}

/// Writes through a `putc`.
struct Console(fn(u8));

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                (self.0)(b'\r');
            }
            (self.0)(b);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(&putc) = PUTC.get() {
        let _ = Console(putc).write_fmt(args);
    }
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
