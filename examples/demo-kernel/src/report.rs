//! The check runner: each check prints `PASS <name>` or
//! `FAIL <name>: <why>`; the run closes with `N passed, M failed (T us)`,
//! the line `cargo xtask demo` looks for.

use core::fmt;

use crate::println;

/// Passed and failed checks.
#[derive(Default)]
pub struct Report {
    /// Checks that passed.
    pub passed: u32,
    /// Checks that failed.
    pub failed: u32,
}

impl Report {
    /// Counts and prints one check; `why` is printed only when it failed.
    pub fn check(&mut self, name: &str, ok: bool, why: fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {why}");
        }
    }

    /// Prints the closing line (the run took `micros`); whether the run
    /// passed: at least one check, none failed.
    pub fn close(&self, micros: u64) -> bool {
        println!("{} passed, {} failed ({micros} us)", self.passed, self.failed);
        self.failed == 0 && self.passed > 0
    }
}
