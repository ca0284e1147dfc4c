//! The demo's readable trace: `trace!` prints a line tagged with the CPU it
//! runs on, but only while tracing is on (the demo turns it off for its
//! many-round race, the tests never turn it on).

use core::sync::atomic::{AtomicBool, Ordering};

static ON: AtomicBool = AtomicBool::new(false);

/// Turns tracing on or off; returns the previous setting.
pub fn set(on: bool) -> bool {
    ON.swap(on, Ordering::Relaxed)
}

/// Whether tracing is on.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Prints `[cpuN] ...` while tracing is on.
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace::on() {
            println!("      [cpu{}] {}", $crate::apic::current_id(), format_args!($($arg)*));
        }
    };
}
