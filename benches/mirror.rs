//! Mirror fault costs, each against a baseline measured in the same run.
//!
//! Figures (one `RATIO <name> <value>` line each, after criterion's output):
//! - `huge_vs_512x4k_per_byte_{cold,warm}`: a fault of one populated 2 MiB
//!   CPU leaf against a fault of 512 populated 4 KiB pages (the same 2 MiB),
//!   per byte (goal >= 100); `huge_vs_1x4k_per_byte_{cold,warm}`: against a
//!   one-page fault, per byte. Before every fault the mirror is cleared (a
//!   registry invalidation, untimed): cold, all of it, so each fault maps
//!   into an empty table and allocates its directories; warm, only the
//!   faulted range, with a pinned page next to it keeping the directories.
//! - `disjoint_same_mirror_throughput`: faults of 64 populated pages while
//!   another thread invalidates other pages of the same mirror back to
//!   back, over faults with that thread idle (goal >= 0.5);
//!   `disjoint_other_mirror_throughput`: the invalidator on another
//!   mirror's range. The faulted pages are cleared (untimed) between faults.
//!   `..._total`: the same over the summed times of all rounds, so rare long
//!   stalls count (a spinning lock holder preempted on a loaded machine).
//!   Retried fractions, Busy counts and the spread of fault times are
//!   printed as `FIGURE` lines.
//! - `overlap_4_running_vs_0`: a 1-page fault while 4 invalidations of
//!   other pages of the mirror are running (started, not ended) over the
//!   same fault with none: the price of tracking running ranges.
//! - Table figures (`FIGURE`): entries and table bytes per 2 MiB mirrored
//!   (64 MiB mirrored in 2 MiB leaves, and in 4 KiB pages), handler calls
//!   for one fault of a 16,384-page missing run.
//!
//! Ratios come from interleaved rounds (A then B then A ...; the median of
//! the per-round ratios), so a noisy, shared machine shifts both sides
//! alike; criterion's own lines run one after the other and are not
//! comparable across benchmarks on a loaded machine. Run
//! `cargo bench --bench mirror` (under half a minute on two cores).

use criterion::Criterion;
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::{AddressSpace, DeviceOps, Event, Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;
const GIB: u64 = 1 << 30;
const RW: RegionFlags = RegionFlags::READ.union(RegionFlags::WRITE);

/// A device with nothing to program: the mirror's own costs only.
#[derive(Default)]
struct Quiet;

impl DeviceOps for Quiet {
    fn update(&self, _range: VaRange) -> Result<(), i32> {
        Ok(())
    }
    fn invalidate(&self, _range: VaRange, _event: Event) {}
    fn flush(&self, _range: VaRange) {}
}

type M<'s> = Mirror<'s, ModelSpace, Quiet, CountingAllocator>;

fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(start, len).unwrap()
}

fn kernel(ram: u64) -> (Arc<CountingAllocator>, ModelSpace) {
    let alloc = CountingAllocator::with_size(ram);
    let space = ModelSpace::new(&alloc).unwrap();
    (alloc, space)
}

fn mirror<'s>(space: &'s ModelSpace, alloc: &'s CountingAllocator, r: VaRange) -> Pin<Box<M<'s>>> {
    let m = Box::pin(Mirror::new(space, alloc, Quiet, r, MirrorConfig::default()).unwrap());
    m.as_ref().register().unwrap();
    m
}

/// Clears `r` from every mirror over it; the CPU keeps its pages.
fn invalidate(space: &ModelSpace, r: VaRange) {
    let reg = space.notifiers();
    let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
    reg.invalidate_range_end(inv);
}

/// Maps and populates (CPU writes) `len` bytes at `at`.
fn populated(space: &ModelSpace, at: u64, len: u64, kind: RegionKind) -> VaRange {
    let r = space.map(at, len, RW, kind).unwrap();
    for p in (0..len).step_by(PAGE as usize) {
        space.write_bytes(at + p, &[1]).unwrap();
    }
    r
}

/// `n` faults of `r`, each after an untimed invalidation of `clear`; the
/// time of the faults.
fn faults(m: &M<'_>, space: &ModelSpace, clear: VaRange, r: VaRange, n: u64) -> Duration {
    let mut t = Duration::ZERO;
    for _ in 0..n {
        invalidate(space, clear);
        let t0 = Instant::now();
        m.fault(r, false).unwrap();
        t += t0.elapsed();
    }
    t
}

/// p50 / p99 / max of `v` (ns), as text.
fn spread(v: &mut [u64]) -> String {
    v.sort_unstable();
    let at = |q: usize| v[(v.len() * q / 100).min(v.len() - 1)];
    format!("p50 {} p99 {} max {}", at(50), at(99), v[v.len() - 1])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// What [`interleaved`] measured.
struct Paired {
    /// Median ns per operation of `a` and of `b`.
    a: f64,
    b: f64,
    /// Median of the per-round ratios `b / a`.
    ratio: f64,
    /// Total time of `b` over total time of `a` (tails included).
    total_ratio: f64,
}

/// Interleaved rounds of batches of `n` operations of variants `a` and `b`
/// (the order alternates per round); each returns the time of its batch.
fn interleaved(
    rounds: usize,
    n: u64,
    a: &mut dyn FnMut(u64) -> Duration,
    b: &mut dyn FnMut(u64) -> Duration,
) -> Paired {
    let (mut ta, mut tb, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    a(n);
    b(n);
    for round in 0..rounds {
        let (x, y) = if round % 2 == 0 {
            let x = a(n);
            (x, b(n))
        } else {
            let y = b(n);
            (a(n), y)
        };
        let (x, y) = (x.as_nanos() as f64 / n as f64, y.as_nanos() as f64 / n as f64);
        ta.push(x);
        tb.push(y);
        ratio.push(y / x);
    }
    let total_ratio = tb.iter().sum::<f64>() / ta.iter().sum::<f64>();
    Paired { a: median(&mut ta), b: median(&mut tb), ratio: median(&mut ratio), total_ratio }
}

/// What the invalidator thread does.
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const STOP: u8 = 2;

/// A thread invalidating single pages of `target`, back to back, while
/// `mode` is RUNNING; `count` counts its invalidations.
fn invalidator(space: &ModelSpace, target: VaRange, mode: &AtomicU8, count: &AtomicU64) {
    let pages = target.pages(12);
    let mut i = 0;
    loop {
        match mode.load(Ordering::Acquire) {
            STOP => return,
            IDLE => std::thread::sleep(Duration::from_micros(200)),
            _ => {
                invalidate(space, range(target.start() + (i % pages) * PAGE, PAGE));
                count.fetch_add(1, Ordering::Relaxed);
                i += 7;
            }
        }
    }
}

/// Sets the invalidator's mode and, when starting it, waits until it runs.
fn set_mode(mode: &AtomicU8, count: &AtomicU64, to: u8) {
    mode.store(to, Ordering::Release);
    if to == RUNNING {
        let c = count.load(Ordering::Relaxed);
        while count.load(Ordering::Relaxed) < c + 2 {
            std::hint::spin_loop();
        }
    }
}

/// Faults that retried, and Busy faults, in a batch under contention.
#[derive(Default)]
struct Contention {
    /// Times of the faults, and of the untimed clears between them (ns).
    fault_ns: Vec<u64>,
    clear_ns: Vec<u64>,
    faults: u64,
    retried: u64,
    busy: u64,
}

/// `n` faults of `r` (cleared between, untimed), counting retried and Busy
/// faults.
fn contended_faults(m: &M<'_>, space: &ModelSpace, r: VaRange, n: u64, stats: &mut Contention) -> Duration {
    let mut t = Duration::ZERO;
    for _ in 0..n {
        let t0 = Instant::now();
        invalidate(space, r);
        stats.clear_ns.push(t0.elapsed().as_nanos() as u64);
        let before = m.stats().retries;
        let t0 = Instant::now();
        let res = m.fault(r, false);
        let took = t0.elapsed();
        stats.fault_ns.push(took.as_nanos() as u64);
        t += took;
        stats.faults += 1;
        stats.retried += (m.stats().retries > before) as u64;
        match res {
            Ok(()) => {}
            Err(hmm_core::Error::Busy) => stats.busy += 1,
            Err(e) => panic!("fault under contention: {e:?}"),
        }
    }
    t
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 31 } else { 3 };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(700))
        .configure_from_args();
    let mut figures: Vec<String> = Vec::new();
    let mut ratios: Vec<(String, f64)> = Vec::new();

    // --- 2 MiB leaf vs 4 KiB pages ----------------------------------------
    // Cold: the whole mirror is cleared before each fault, so every fault
    // starts from an empty table (directories allocated again). Warm: only
    // the faulted range is cleared, and a pinned page next to it keeps the
    // directories above it (the 512-page fault still gets a fresh leaf
    // table: its 512 entries filled the one cleared).
    for warm in [false, true] {
        let (alloc, space) = kernel(64 * MIB);
        let huge = populated(&space, GIB, HUGE, RegionKind::Thp);
        let small = populated(&space, 2 * GIB, HUGE, RegionKind::PrivateAnon);
        let one = range(3 * GIB, PAGE);
        let pins = [
            populated(&space, GIB + HUGE, PAGE, RegionKind::PrivateAnon),
            populated(&space, 2 * GIB + HUGE, PAGE, RegionKind::PrivateAnon),
            populated(&space, 3 * GIB, 2 * PAGE, RegionKind::PrivateAnon),
        ];
        let m = mirror(&space, &alloc, range(0, 1 << 47));
        m.fault(huge, false).unwrap();
        assert_eq!(m.stats().huge_mapped, 1, "the THP is mirrored as one 2 MiB entry");
        let name = if warm { "warm" } else { "cold" };
        let all = m.range();
        let clear = |r: VaRange| if warm { r } else { all };
        if warm {
            for p in pins {
                m.fault(p, false).unwrap();
            }
        }
        let mut g = c.benchmark_group(format!("fault_{name}"));
        g.bench_function("huge_2m", |b| b.iter_custom(|n| faults(&m, &space, clear(huge), huge, n)));
        g.bench_function("small_512x4k", |b| b.iter_custom(|n| faults(&m, &space, clear(small), small, n)));
        g.bench_function("small_1x4k", |b| b.iter_custom(|n| faults(&m, &space, clear(one), one, n)));
        g.finish();
        let big = interleaved(rounds, 20, &mut |n| faults(&m, &space, clear(huge), huge, n), &mut |n| {
            faults(&m, &space, clear(small), small, n)
        });
        let single = interleaved(rounds, 50, &mut |n| faults(&m, &space, clear(huge), huge, n), &mut |n| {
            faults(&m, &space, clear(one), one, n)
        });
        figures.push(format!(
            "fault_{name} ns: huge_2m {:.0} (paired with 1x4k: {:.0}), small_512x4k {:.0}, small_1x4k {:.0}",
            big.a, single.a, big.b, single.b
        ));
        // Per byte: both 2 MiB in the first pair; 2 MiB against 4 KiB in
        // the second.
        ratios.push((format!("huge_vs_512x4k_per_byte_{name}"), big.ratio));
        ratios.push((format!("huge_vs_1x4k_per_byte_{name}"), single.ratio * 512.0));
    }

    // --- Throughput next to a disjoint invalidator -----------------------
    for other_mirror in [false, true] {
        let (alloc, space) = kernel(64 * MIB);
        let blocks = populated(&space, 3 * GIB, 2 * HUGE, RegionKind::PrivateAnon);
        let (a, b) = (range(3 * GIB, 64 * PAGE), range(3 * GIB + HUGE, HUGE));
        // Same mirror: one over both blocks. Other mirror: one over each.
        let (m, _mb) = if other_mirror {
            (mirror(&space, &alloc, range(3 * GIB, HUGE)), Some(mirror(&space, &alloc, b)))
        } else {
            (mirror(&space, &alloc, blocks), None)
        };
        let name = if other_mirror { "other_mirror" } else { "same_mirror" };
        let (mode, count) = (AtomicU8::new(IDLE), AtomicU64::new(0));
        let mut quiet = Contention::default();
        let mut busy = Contention::default();
        std::thread::scope(|s| {
            s.spawn(|| invalidator(&space, b, &mode, &count));
            let mut g = c.benchmark_group(format!("disjoint_{name}"));
            g.bench_function("uncontended_64p", |bch| {
                bch.iter_custom(|n| contended_faults(&m, &space, a, n, &mut Contention::default()))
            });
            set_mode(&mode, &count, RUNNING);
            g.bench_function("contended_64p", |bch| {
                bch.iter_custom(|n| contended_faults(&m, &space, a, n, &mut Contention::default()))
            });
            set_mode(&mode, &count, IDLE);
            g.finish();
            let (mut during, mut busy_time) = (0u64, Duration::ZERO);
            let p = interleaved(
                rounds,
                200,
                &mut |n| {
                    set_mode(&mode, &count, IDLE);
                    contended_faults(&m, &space, a, n, &mut quiet)
                },
                &mut |n| {
                    set_mode(&mode, &count, RUNNING);
                    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
                    let t = contended_faults(&m, &space, a, n, &mut busy);
                    during += count.load(Ordering::Relaxed) - c0;
                    busy_time += t0.elapsed();
                    set_mode(&mode, &count, IDLE);
                    t
                },
            );
            mode.store(STOP, Ordering::Release);
            // Throughput ratio: contended over uncontended, the inverse of
            // the time ratio; the median per round, and over all rounds
            // (rare multi-millisecond stalls included: a spinning lock
            // holder preempted on a loaded machine).
            ratios.push((format!("disjoint_{name}_throughput"), 1.0 / p.ratio));
            ratios.push((format!("disjoint_{name}_throughput_total"), 1.0 / p.total_ratio));
            figures.push(format!(
                "disjoint_{name}: fault ns uncontended {:.0} contended {:.0}; contended: {} faults, {} retried \
                 ({:.4}), {} busy; uncontended: {} retried, {} busy; the other thread's invalidations during \
                 contended batches: {during} ({:.0} ns apart)",
                p.a,
                p.b,
                busy.faults,
                busy.retried,
                busy.retried as f64 / busy.faults.max(1) as f64,
                busy.busy,
                quiet.retried,
                quiet.busy,
                busy_time.as_nanos() as f64 / during.max(1) as f64,
            ));
            figures.push(format!(
                "disjoint_{name} spread (ns): faults uncontended {} / contended {}; clears between faults \
                 uncontended {} / contended {}",
                spread(&mut quiet.fault_ns),
                spread(&mut busy.fault_ns),
                spread(&mut quiet.clear_ns),
                spread(&mut busy.clear_ns),
            ));
        });
    }

    // --- The overlap mechanism: 0 vs 4 running invalidations --------------
    {
        let (alloc, space) = kernel(64 * MIB);
        let blk = populated(&space, 3 * GIB, HUGE, RegionKind::PrivateAnon);
        let m = mirror(&space, &alloc, blk);
        let page = range(3 * GIB, PAGE);
        let reg = space.notifiers();
        let with_running = |n: u64| {
            let running: Vec<_> = (0..4)
                .map(|i| reg.invalidate_range_start(range(3 * GIB + (100 + 50 * i) * PAGE, PAGE), Event::Clear, true))
                .map(Result::unwrap)
                .collect();
            let before = m.stats().retries;
            let t = faults(&m, &space, blk, page, n);
            assert_eq!(m.stats().retries, before, "running invalidations of other pages cost no retry");
            for inv in running {
                reg.invalidate_range_end(inv);
            }
            t
        };
        let mut g = c.benchmark_group("overlap");
        g.bench_function("fault_1p_0_running", |b| b.iter_custom(|n| faults(&m, &space, blk, page, n)));
        g.bench_function("fault_1p_4_running", |b| b.iter_custom(with_running));
        g.finish();
        let p = interleaved(rounds, 200, &mut |n| faults(&m, &space, blk, page, n), &mut { with_running });
        figures.push(format!("overlap fault ns: 0 running {:.0}, 4 running {:.0}", p.a, p.b));
        ratios.push(("overlap_4_running_vs_0".into(), p.ratio));
    }

    // --- Table figures ----------------------------------------------------
    {
        let (alloc, space) = kernel(256 * MIB);
        let len = 64 * MIB;
        let blocks = (len / HUGE) as f64;
        for (name, at, kind) in
            [("2m_leaves", 4 * GIB, RegionKind::Thp), ("4k_pages", 5 * GIB, RegionKind::PrivateAnon)]
        {
            let r = populated(&space, at, len, kind);
            let m = mirror(&space, &alloc, r);
            m.fault(r, false).unwrap();
            let t = m.table_stats();
            figures.push(format!(
                "table {name}: per 2 MiB mirrored {:.1} entries, {:.0} table bytes ({} leaves, {} huge, {} frames for \
                 {} MiB)",
                t.leaves as f64 / blocks,
                t.frames as f64 * PAGE as f64 / blocks,
                t.leaves,
                t.huge_leaves,
                t.frames,
                len / MIB
            ));
        }
        let run = space.map(6 * GIB, 16384 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        let m = mirror(&space, &alloc, run);
        let calls = space.handle_fault_calls();
        m.fault(run, true).unwrap();
        figures.push(format!(
            "handler_calls 16384-page missing run: {} (mirror counter {}), retries {}",
            space.handle_fault_calls() - calls,
            m.stats().handler_calls,
            m.stats().retries
        ));
    }

    c.final_summary();
    for f in &figures {
        println!("FIGURE {f}");
    }
    for (name, r) in &ratios {
        println!("RATIO {name} {r:.3}");
    }
}
