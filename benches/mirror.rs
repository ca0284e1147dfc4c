//! Mirror fault costs and table sizes, each against a baseline measured in
//! the same run; prints the report protocol's `RATIO` / `DETAIL` / `PLOT` /
//! `FIGURE` lines (see `benches/mirror/kit.rs`).
//!
//! - G2 (`g2.rs`): a fault of a populated 2 MiB or 1 GiB CPU leaf against
//!   one of 512 populated 4 KiB pages, per byte; the per-page cost of
//!   faults of 1, 512 and 16,384 pages (`PLOT pages mirror_fault`).
//! - G3 (`g3.rs`): a fault of unpopulated memory against the kernel's fault
//!   handler alone doing the same work; handler calls per missing run.
//! - G5 (`g5.rs`): fault throughput next to a thread invalidating other
//!   pages, retries and Busy; a fault loop over pages that thread keeps
//!   invalidating, with a watchdog counting starved faults.
//! - G7 (`g7.rs`): table bytes per mirrored 4 KiB page and per 2 MiB leaf,
//!   and frames left once everything is unmapped (exact counts).
//!
//! Times come from interleaved rounds (A, B, A, B ...; the median of the
//! per-round ratios), so a noisy, shared machine shifts both sides alike.
//! Run `cargo bench --bench mirror` (about 20 s, 10 of them the overlap
//! loop); `HMM_BENCH_QUICK=1` for fewer rounds and a 2 s overlap loop
//! (under 10 s); `HMM_MIRROR_ONLY=g2,g5` for some sections only.

#[path = "mirror/g2.rs"]
mod g2;
#[path = "mirror/g3.rs"]
mod g3;
#[path = "mirror/g5.rs"]
mod g5;
#[path = "mirror/g7.rs"]
mod g7;
#[path = "mirror/kit.rs"]
mod kit;

use std::time::Instant;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench`:
        // measuring belongs to `cargo bench` (and `cargo xtask bench`).
        println!("not run as a benchmark (use cargo bench or cargo xtask bench)");
        return;
    }
    let mode = kit::Mode::from_env();
    let t0 = Instant::now();
    let at = |name: &str| kit::figure(format!("mirror bench: {name} done at {:.1} s", t0.elapsed().as_secs_f64()));
    kit::figure(format!(
        "mirror bench: {} mode; a clock read pair costs {} ns, subtracted from each timed operation",
        if mode.quick { "quick" } else { "full" },
        kit::timer_overhead().as_nanos()
    ));
    let only = std::env::var("HMM_MIRROR_ONLY").unwrap_or_default();
    let sections: [(&str, &dyn Fn()); 4] =
        [("g7", &g7::run), ("g2", &|| g2::run(mode)), ("g3", &|| g3::run(mode)), ("g5", &|| g5::run(mode))];
    for (name, run) in sections {
        if only.is_empty() || only.split(',').any(|o| o == name) {
            run();
            at(name);
        }
    }
}
