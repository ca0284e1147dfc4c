//! What every section of the mirror bench shares: the model kernel set-up,
//! interleaved timing, and the report protocol's lines.

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::{AddressSpace, DeviceOps, Event, Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind};
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
pub const HUGE: u64 = 2 * MIB;
pub const GIB: u64 = 1 << 30;
pub const RW: RegionFlags = RegionFlags::READ.union(RegionFlags::WRITE);

/// A device with nothing to program: the mirror's own costs only.
#[derive(Default)]
pub struct Quiet;

impl DeviceOps for Quiet {
    fn update(&self, _range: VaRange) -> Result<(), i32> {
        Ok(())
    }
    fn invalidate(&self, _range: VaRange, _event: Event) {}
    fn flush(&self, _range: VaRange) {}
}

pub type M<'s> = Mirror<'s, ModelSpace, Quiet, CountingAllocator>;

/// How long to measure: `HMM_BENCH_QUICK=1` asks for fewer rounds.
#[derive(Clone, Copy)]
pub struct Mode {
    pub quick: bool,
}

impl Mode {
    pub fn from_env() -> Self {
        Self { quick: std::env::var("HMM_BENCH_QUICK").is_ok_and(|v| v == "1") }
    }

    /// Interleaved rounds per pair (odd, so the median is one round).
    pub fn rounds(self) -> usize {
        if self.quick {
            9
        } else {
            51
        }
    }

    /// `full` in a full run, `quick` in a quick one.
    pub fn pick<T>(self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

pub fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(start, len).unwrap()
}

/// A model kernel with `ram` bytes of (lazily zeroed) simulated RAM.
pub fn kernel(ram: u64) -> (Arc<CountingAllocator>, ModelSpace) {
    let alloc = CountingAllocator::with_size(ram);
    let space = ModelSpace::new(&alloc).unwrap();
    (alloc, space)
}

/// A registered mirror of `r` with the default budget.
pub fn mirror<'s>(space: &'s ModelSpace, alloc: &'s CountingAllocator, r: VaRange) -> Pin<Box<M<'s>>> {
    let m = Box::pin(Mirror::new(space, alloc, Quiet, r, MirrorConfig::default()).unwrap());
    m.as_ref().register().unwrap();
    m
}

/// Clears `r` from every mirror over it through the registry; the CPU keeps
/// its pages (what a kernel's invalidation without a table change does).
pub fn invalidate(space: &ModelSpace, r: VaRange) {
    let reg = space.notifiers();
    let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
    reg.invalidate_range_end(inv);
}

/// Maps `len` bytes at `at` of `kind` and populates them (a CPU write per
/// 4 KiB page).
pub fn populated(space: &ModelSpace, at: u64, len: u64, kind: RegionKind) -> VaRange {
    let r = space.map(at, len, RW, kind).unwrap();
    for p in (0..len).step_by(PAGE as usize) {
        space.write_bytes(at + p, &[1]).unwrap();
    }
    r
}

/// The cost of reading the clock twice (median of many), measured once.
pub fn timer_overhead() -> Duration {
    static OVERHEAD: OnceLock<Duration> = OnceLock::new();
    *OVERHEAD.get_or_init(|| {
        let mut v: Vec<f64> = (0..20_001)
            .map(|_| {
                let t0 = Instant::now();
                t0.elapsed().as_nanos() as f64
            })
            .collect();
        Duration::from_nanos(median(&mut v) as u64)
    })
}

/// The time of `f`, less the clock's own cost: single operations of a few
/// hundred ns are timed one by one (the state is reset, untimed, between
/// them), and 20-odd ns of clock reads would shrink every ratio.
pub fn timed(f: impl FnOnce()) -> Duration {
    let t0 = Instant::now();
    f();
    t0.elapsed().saturating_sub(timer_overhead())
}

/// Median of `v` (sorted in place); 0 for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// p50 / p99 / max of `v` (ns), as text.
pub fn spread(v: &mut [u64]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.sort_unstable();
    let at = |q: usize| v[(v.len() * q / 100).min(v.len() - 1)];
    format!("p50 {} p99 {} max {}", at(50), at(99), v[v.len() - 1])
}

/// What [`interleaved`] measured.
pub struct Paired {
    /// Median ns per operation of `a` and of `b`.
    pub a: f64,
    pub b: f64,
    /// Median of the per-round ratios `b / a`.
    pub ratio: f64,
    /// Total time of `b` over total time of `a` (tails included).
    pub total_ratio: f64,
}

/// Interleaved rounds of batches of `n` operations of variants `a` and `b`
/// (which goes first alternates per round, after one untimed warm-up batch
/// of each); each returns the time of its batch. On a shared, noisy machine
/// both sides of a round see the same load, so the median of the per-round
/// ratios is far steadier than either time.
pub fn interleaved(
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

/// Median ns per operation of `rounds` batches of `n` (one warm-up batch).
pub fn rounds_median(rounds: usize, n: u64, f: &mut dyn FnMut(u64) -> Duration) -> f64 {
    f(n);
    let mut v: Vec<f64> = (0..rounds).map(|_| f(n).as_nanos() as f64 / n as f64).collect();
    median(&mut v)
}

/// A plain decimal: integers without a fraction, otherwise 1 place after
/// the point from 100 up, 3 from 0.1 up, 4 significant digits below.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if v.fract() == 0.0 && a < 1e15 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.3}")
    } else {
        let places = (3 - a.log10().floor() as i32).clamp(4, 12) as usize;
        format!("{v:.places$}")
    }
}

/// The protocol's lines, printed as they come (so a slow section shows
/// progress) and flushed.
pub fn line(text: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// `RATIO` and its `DETAIL`: `goal` is `"<op> <target>"`.
pub fn ratio(name: &str, value: f64, goal: &str, hmm: &str, baseline: &str) {
    line(format!("RATIO {name} {} (goal {goal})", num(value)));
    line(format!("DETAIL {name} | {hmm} | {baseline}"));
}

pub fn plot(id: &str, series: &str, x: u64, y: f64) {
    line(format!("PLOT {id} {series} {x} {}", num(y)));
}

pub fn figure(text: String) {
    line(format!("FIGURE {text}"));
}
