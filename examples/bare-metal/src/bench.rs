//! `mode=bench`: goal G1q of issue 10, the snapshot cost inside the guest.
//!
//! Under QEMU TCG the cost of guest code follows its instruction count, so a
//! ratio measured here says how much work `range_fault` does per page,
//! whatever the host. Two cases, each over 64 MiB of a real process address
//! space of this kernel (x86_64 tables built by `process.rs`):
//! * 4 KiB pages, populated up front (`mmap_populate`);
//! * 2 MiB leaves, faulted in up front (one `Pfn` per 4 KiB page by
//!   contract, so the same 16,384 output words).
//!
//! The baseline is the guest's own stream of 16,384 8-byte stores into the
//! same output array: the floor of any method that writes one word per page.
//! Rounds run the three measurements interleaved, in a rotating order, and
//! each ratio is the median of the per-round ratios. The results are printed
//! in the report protocol of `cargo xtask bench` (`RATIO`, `DETAIL`,
//! `FIGURE`), which collects them from the serial output.

use core::hint::black_box;

use hmm_core::pt::Pfn;
use hmm_core::{AddressSpace, Interval, InvalidateRange, Notifier, RangeFault, RegionFlags, range_fault};

use crate::memory::{FRAMES, PAGE_SIZE};
use crate::process::{self, HUGE_SIZE, Process, range};
use crate::sync::SpinLock;
use crate::{Machine, cpu};

/// Bytes covered by each case.
const BYTES: u64 = 64 << 20;
/// 4 KiB pages (and output words) per case.
const PAGES: usize = (BYTES / PAGE_SIZE) as usize;
/// Measured rounds (odd: the median is one of them); one more warms up.
const ROUNDS: usize = 31;
/// Where the 4 KiB case maps (PML4 slot 1).
const SMALL_BASE: u64 = process::USER_START;
/// Where the 2 MiB case maps, 1 GiB further (its own page directory).
const HUGE_BASE: u64 = process::USER_START + (1 << 30);
/// What Linux's `hmm_range_fault` costs in a comparable TCG guest, as a
/// multiple of the same store stream (measured outside this project).
const LINUX_4K: &str = "13x";
const LINUX_2M: &str = "0.85x";

/// The output array shared by all measurements (128 KiB, in .bss).
static OUT: SpinLock<[Pfn; PAGES]> = SpinLock::new([Pfn::NONE; PAGES]);

/// A notifier that only records invalidations: `range_fault` needs a
/// registered interval, and nothing invalidates during the benchmark.
struct Watch {
    interval: Interval,
}

impl Notifier for Watch {
    fn interval(&self) -> &Interval {
        &self.interval
    }

    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.interval.set_seq(inv);
        true
    }
}

/// Which measurement.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Store,
    Small,
    Huge,
}

const CASES: [Case; 3] = [Case::Store, Case::Small, Case::Huge];

/// Runs the benchmark and prints the report lines; false on any failure.
pub fn run(_: &Machine) -> bool {
    println!("=== bench: range_fault snapshot vs. a store stream, {} MiB, {ROUNDS} rounds ===", BYTES >> 20);
    let free = FRAMES.stats().free;
    match measure() {
        Ok(ticks) => {
            report(&ticks);
            println!("bench: done ({} frames free before, {} after)", free, FRAMES.stats().free);
            true
        }
        Err(what) => {
            println!("bench: FAILED: {what}");
            false
        }
    }
}

/// TSC ticks per round, per case (indexed like [`CASES`]).
type Ticks = [[u64; ROUNDS]; 3];

/// Builds the address space, checks one snapshot of each case, then times
/// the rounds.
fn measure() -> Result<Ticks, &'static str> {
    let p = Process::new(&FRAMES).map_err(|_| "no frame for the process root")?;
    let (small, huge) = (range(SMALL_BASE, BYTES), range(HUGE_BASE, BYTES));
    let rw = RegionFlags::READ | RegionFlags::WRITE;
    // Contents do not matter: the snapshot only reads the tables.
    p.mmap_populate(small, rw, &mut |_, _| {}).map_err(|_| "cannot populate the 4 KiB region")?;
    p.mmap(huge, rw, true).map_err(|_| "cannot map the 2 MiB region")?;
    p.handle_fault(&p.read_lock(), huge, true).map_err(|_| "cannot fault in the 2 MiB leaves")?;

    let watches = [small, huge].map(|r| Watch { interval: Interval::new(r) });
    // SAFETY: `watches` stays in place until the registrations are removed
    // at the end of this function, before it drops.
    let registrations = [&watches[0], &watches[1]].map(|w| unsafe { p.notifiers().insert(w) });
    let registered = registrations.iter().all(Result::is_ok);
    let result = (|| {
        if !registered {
            return Err("cannot register the intervals");
        }
        check(&p, &watches[0].interval, 0)?;
        check(&p, &watches[1].interval, 9)?;
        let mut ticks = [[0; ROUNDS]; 3];
        for round in 0..=ROUNDS {
            for k in 0..CASES.len() {
                let i = (round + k) % CASES.len();
                let t = match CASES[i] {
                    Case::Store => store_stream(),
                    Case::Small => snapshot(&p, &watches[0].interval)?,
                    Case::Huge => snapshot(&p, &watches[1].interval)?,
                };
                if round > 0 {
                    ticks[i][round - 1] = t; // round 0 warms up
                }
            }
        }
        Ok(ticks)
    })();
    for r in registrations.into_iter().flatten() {
        r.remove();
    }
    result
}

/// One `range_fault` snapshot of `interval`'s range into [`OUT`]; its ticks.
fn snapshot(p: &Process, interval: &Interval) -> Result<u64, &'static str> {
    let mut out = OUT.lock();
    let guard = p.read_lock();
    let seq = p.notifiers().read_begin(interval);
    let mut req = RangeFault {
        range: interval.range(),
        default_flags: 0,
        pfn_flags_mask: 0,
        pfns: &mut out[..],
        dev_private_owner: None,
    };
    let t0 = cpu::rdtsc();
    let done = range_fault(p, &guard, interval, seq, &mut req);
    let t = cpu::rdtsc() - t0;
    match done {
        Ok(stats) if stats.handler_calls == 0 => Ok(t),
        Ok(_) => Err("the snapshot called the fault handler"),
        Err(_) => Err("range_fault failed"),
    }
}

/// The baseline: one 8-byte store per output word; its ticks.
fn store_stream() -> u64 {
    let mut out = OUT.lock();
    let t0 = cpu::rdtsc();
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = Pfn(black_box(i as u64));
    }
    let t = cpu::rdtsc() - t0;
    black_box(&mut out[..]);
    t
}

/// Takes one snapshot and checks every page is valid, writable, of `order`.
fn check(p: &Process, interval: &Interval, order: u32) -> Result<(), &'static str> {
    snapshot(p, interval)?;
    let out = OUT.lock();
    if out.iter().all(|pfn| pfn.is_valid() && pfn.is_write() && pfn.order() == order) {
        Ok(())
    } else {
        Err("the snapshot does not report every page valid, writable, of the leaf's order")
    }
}

/// Prints the RATIO, DETAIL and FIGURE lines.
fn report(ticks: &Ticks) {
    let store = median(ticks[0]);
    for (i, name, goal, linux, what) in [
        (1, "g1q_guest_snapshot_4k_vs_store", "<= 6", LINUX_4K, "4 KiB pages"),
        (2, "g1q_guest_snapshot_2m_vs_store", "<= 0.4", LINUX_2M, "2 MiB leaves"),
    ] {
        let ratio = median(core::array::from_fn(|r| ticks[i][r] * 1000 / ticks[0][r].max(1)));
        println!("RATIO {name} {} (goal {goal})", Milli(ratio));
        println!(
            "DETAIL {name} | range_fault snapshot, {what}: {} ticks/page | 8-byte store stream: {} ticks/page (Linux hmm_range_fault in a TCG guest: ~{linux})",
            Centi(median(ticks[i]) * 100 / PAGES as u64),
            Centi(store * 100 / PAGES as u64),
        );
    }
    println!(
        "FIGURE QEMU TCG, 1 CPU: {} MiB = {PAGES} pages per case, {ROUNDS} interleaved rounds, median TSC ticks per call: store stream {store}, snapshot 4 KiB {}, snapshot 2 MiB {} ({} leaves)",
        BYTES >> 20,
        median(ticks[1]),
        median(ticks[2]),
        BYTES / HUGE_SIZE,
    );
}

/// Median of the rounds.
fn median(mut v: [u64; ROUNDS]) -> u64 {
    v.sort_unstable();
    v[ROUNDS / 2]
}

/// Thousandths printed as a decimal (`1234` -> `1.234`).
struct Milli(u64);

impl core::fmt::Display for Milli {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

/// Hundredths printed as a decimal (`1234` -> `12.34`).
struct Centi(u64);

impl core::fmt::Display for Centi {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}
