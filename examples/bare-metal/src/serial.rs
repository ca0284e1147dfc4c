//! COM1 (16550 UART at I/O port 0x3f8) console and the `print!`/`println!`
//! macros. QEMU connects it to the host with `-serial stdio`.
//!
//! All CPUs print through one [`SpinLock`], and each `println!` is a single
//! locked write, so lines from different CPUs never interleave.

use core::fmt::{self, Write};

use crate::cpu;
use crate::sync::SpinLock;

/// I/O base of COM1.
const COM1: u16 = 0x3f8;

/// A 16550 UART at a fixed I/O base.
pub struct Uart {
    base: u16,
}

impl Uart {
    /// Programs 115200 baud, 8N1, FIFOs on, UART interrupts off.
    fn init(&mut self) {
        let b = self.base;
        // SAFETY: these are the standard 16550 programming steps on the UART
        // at `b`, which QEMU always provides for COM1 on our machine type.
        unsafe {
            cpu::outb(b + 1, 0x00); // IER: no UART interrupts
            cpu::outb(b + 3, 0x80); // LCR: DLAB=1 to set the divisor
            cpu::outb(b, 0x01); // DLL: divisor 1 -> 115200 baud
            cpu::outb(b + 1, 0x00); // DLM
            cpu::outb(b + 3, 0x03); // LCR: 8 data bits, no parity, 1 stop
            cpu::outb(b + 2, 0xc7); // FCR: enable + clear FIFOs
            cpu::outb(b + 4, 0x03); // MCR: DTR | RTS
        }
    }

    fn write_byte(&mut self, byte: u8) {
        // Bounded wait for "transmit holding register empty", so a missing
        // UART can slow us down but never hang the kernel.
        for _ in 0..100_000 {
            // SAFETY: reading the line status register has no side effects.
            if unsafe { cpu::inb(self.base + 5) } & 0x20 != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: writing the transmit register only sends the byte.
        unsafe { cpu::outb(self.base, byte) }
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
        Ok(())
    }
}

static CONSOLE: SpinLock<Uart> = SpinLock::new(Uart { base: COM1 });

/// Initialises COM1. Called first thing in `kernel_main`.
pub fn init() {
    CONSOLE.lock().init();
}

/// Backend of `print!`/`println!`.
pub fn print(args: fmt::Arguments<'_>) {
    // Writing to the UART cannot fail.
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Printing for the panic and fatal-exception paths: never blocks forever.
///
/// If the lock cannot be taken quickly (its holder may be the CPU that just
/// crashed), it writes to the UART without the lock; a garbled line is better
/// than a silent hang.
pub fn emergency_print(args: fmt::Arguments<'_>) {
    match CONSOLE.try_lock_for(10_000_000) {
        Some(mut console) => {
            let _ = console.write_fmt(args);
        }
        None => {
            let _ = Uart { base: COM1 }.write_fmt(args);
        }
    }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::serial::print(format_args!($($arg)*)));
}

/// Prints a line to the serial console (one atomic write per line).
#[macro_export]
macro_rules! println {
    () => ($crate::serial::print(format_args!("\n")));
    ($($arg:tt)*) => ($crate::serial::print(format_args!("{}\n", format_args!($($arg)*))));
}
