//! Notifier registry costs (goal G4 of issue 10), each against a baseline or
//! a second population measured in the same run, in interleaved rounds.
//!
//! Lines printed (see the report protocol in `xtask`):
//! - `g4_invalidate_vs_madv_dontneed_per_page`: an invalidation of N pages
//!   (512 and 16,384) delivered through the registry to one registered
//!   `Mirror` whose table maps them (model kernel; the pages are faulted
//!   back, untimed, before each one), per page, over `madvise(MADV_DONTNEED)`
//!   of N populated 4 KiB pages of this process (THP off; populated again,
//!   untimed, with `MADV_POPULATE_WRITE` before each one, whose cost is a
//!   `FIGURE`). The ratio is the worse of the two sizes.
//!   `g4_invalidate_registry_only_vs_madv_dontneed_per_page`: the same with a
//!   notifier that does nothing (the registry's own path).
//! - `g4_invalidate_1page_{10k,100k}_us`: a one-page invalidation (start +
//!   end) hitting one of 10,000 / 100,000 registered disjoint no-op
//!   intervals (a random one each time), in microseconds;
//!   `g4_invalidate_growth_100k_vs_10k`: their ratio (a logarithmic lookup
//!   gives about 1.25). A `FIGURE` adds the same page invalidated every time
//!   (the lookup with its path in the cache).
//! - `g4_insert_100k_vs_1k`: the average insert with 100,000 intervals
//!   registered over the same with 1,000 (inserts in random gaps, then
//!   removed; removal cost is a `FIGURE`).
//! - `PLOT notifiers {invalidate_1page,insert,remove} <n> <ns>` for 1k, 10k,
//!   100k intervals (and 1M in full mode when registering is fast enough;
//!   measured on its own, after the others, so that its 100 MB does not
//!   evict their trees between batches).
//!
//! `HMM_BENCH_QUICK=1` runs fewer rounds. The populations are registered
//! one by one, so with an O(n) insert most of the time goes into building the
//! 100,000 (about 25 s on two cores); with an O(log n) one, 1M takes seconds.
//! Every population is checked (every target page hits an interval) after it
//! is built and after the insert rounds.

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::notifier::{NotifierRegistry, Registration, VecStore};
use hmm_core::{
    AddressSpace, DeviceOps, Event, Interval, InvalidateRange, Mirror, MirrorConfig, Notifier, RegionFlags, VaRange,
};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const RW: RegionFlags = RegionFlags::READ.union(RegionFlags::WRITE);

type Reg = NotifierRegistry<VecStore>;

fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(start, len).unwrap()
}

/// How many interleaved rounds to run.
#[derive(Clone, Copy)]
struct Plan {
    min_rounds: usize,
    max_rounds: usize,
    /// Rounds stop after `min_rounds` once this much time went by.
    budget: Duration,
}

/// Runs every arm once (warm-up), then rounds of every arm, rotating which
/// goes first, so a noisy machine shifts all arms alike; returns each arm's
/// per-round results.
fn interleave<T>(plan: Plan, arms: &mut [&mut dyn FnMut() -> T]) -> Vec<Vec<T>> {
    for arm in arms.iter_mut() {
        arm();
    }
    let t0 = Instant::now();
    let k = arms.len();
    let mut out: Vec<Vec<T>> = (0..k).map(|_| Vec::new()).collect();
    for round in 0..plan.max_rounds {
        if round >= plan.min_rounds && t0.elapsed() > plan.budget {
            break;
        }
        for j in 0..k {
            let i = (round + j) % k;
            out[i].push(arms[i]());
        }
    }
    out
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median of the per-round ratios `num / den`.
fn ratio(num: &[f64], den: &[f64]) -> f64 {
    median(&num.iter().zip(den).map(|(n, d)| n / d).collect::<Vec<_>>())
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// A deterministic pseudo-random sequence (xorshift64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A random permutation of `0..n`.
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i as u64 + 1) as usize);
        }
        p
    }
}

/// `v` as a plain decimal with at least three significant digits (a tiny
/// ratio must not print as 0.000).
fn plain(v: f64) -> String {
    let decimals = if v >= 1.0 || v <= 0.0 { 3 } else { (2 - v.log10().floor() as i32).max(3) as usize };
    format!("{v:.decimals$}")
}

/// What the bench prints, in protocol order at the end.
#[derive(Default)]
struct Report {
    figures: Vec<String>,
    plots: Vec<String>,
    ratios: Vec<String>,
}

impl Report {
    fn ratio(&mut self, name: &str, value: f64, goal: &str, ours: String, baseline: String) {
        self.ratios.push(format!("RATIO {name} {} (goal {goal})", plain(value)));
        self.ratios.push(format!("DETAIL {name} | {ours} | {baseline}"));
    }

    fn plot(&mut self, series: &str, n: usize, y: f64) {
        self.plots.push(format!("PLOT notifiers {series} {n} {y:.1}"));
    }

    fn print(&self) {
        for line in self.figures.iter().map(|f| format!("FIGURE {f}")).chain(self.plots.clone()) {
            println!("{line}");
        }
        for line in &self.ratios {
            println!("{line}");
        }
    }
}

// --- Notifiers --------------------------------------------------------------

/// A notifier that only records the invalidation: the registry's own cost.
struct Noop {
    interval: Interval,
}

impl Noop {
    fn new(start: u64, pages: u64) -> Self {
        Self { interval: Interval::new(range(start, pages * PAGE)) }
    }
}

impl Notifier for Noop {
    fn interval(&self) -> &Interval {
        &self.interval
    }

    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.interval.set_seq(inv);
        true
    }
}

/// One invalidation of `r`, start and end.
fn invalidate<S: hmm_core::notifier::EntryStore>(reg: &NotifierRegistry<S>, r: VaRange) -> u64 {
    let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
    let seq = inv.seq();
    reg.invalidate_range_end(inv);
    seq
}

// --- Invalidation per page against madvise(MADV_DONTNEED) ------------------

/// A device with nothing to program: the mirror's own costs only.
struct Quiet;

impl DeviceOps for Quiet {
    fn update(&self, _range: VaRange) -> Result<(), i32> {
        Ok(())
    }
    fn invalidate(&self, _range: VaRange, _event: Event) {}
    fn flush(&self, _range: VaRange) {}
}

type M<'s> = Mirror<'s, ModelSpace, Quiet, CountingAllocator>;

/// `pages` populated 4 KiB pages of this process (THP off, so the kernel
/// zaps as many entries as the mirror clears).
struct RealPages {
    ptr: *mut libc::c_void,
    len: usize,
    /// False when the kernel refused `MADV_POPULATE_WRITE` (before 5.14):
    /// pages are then touched one by one.
    native_populate: bool,
}

impl RealPages {
    fn new(pages: u64) -> Self {
        let len = (pages * PAGE) as usize;
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap");
        // SAFETY: advice on our own mapping (a failure only leaves THP on).
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        let mut me = Self { ptr, len, native_populate: true };
        // SAFETY: populating our own mapping changes no contents.
        me.native_populate = unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) } == 0;
        me.populate();
        me
    }

    /// Faults every page in, writable.
    fn populate(&self) {
        if self.native_populate {
            // SAFETY: our own mapping; populating changes no contents.
            let rc = unsafe { libc::madvise(self.ptr, self.len, libc::MADV_POPULATE_WRITE) };
            assert_eq!(rc, 0, "MADV_POPULATE_WRITE");
            return;
        }
        for off in (0..self.len).step_by(PAGE as usize) {
            // SAFETY: `off` is inside our read-write mapping.
            unsafe { self.ptr.cast::<u8>().add(off).write_volatile(1) };
        }
    }

    /// Zaps every page (they read as zero again).
    fn dontneed(&self) {
        // SAFETY: our own private anonymous mapping, which nothing borrows.
        let rc = unsafe { libc::madvise(self.ptr, self.len, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0, "MADV_DONTNEED");
    }
}

impl Drop for RealPages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Per-round ns per page of the three arms for one size, and of populating.
struct PerPage {
    mirror: Vec<f64>,
    registry: Vec<f64>,
    dontneed: Vec<f64>,
    populate: Vec<f64>,
}

/// A model kernel with `pages` populated pages at 1 GiB and a mirror of
/// them, registered and faulted.
fn mirrored(pages: u64) -> (Arc<CountingAllocator>, ModelSpace, VaRange) {
    let alloc = CountingAllocator::with_size(pages * PAGE * 2 + 16 * MIB);
    let space = ModelSpace::new(&alloc).unwrap();
    let r = space.map(GIB, pages * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for p in 0..pages {
        space.write_bytes(GIB + p * PAGE, &[1]).unwrap();
    }
    (alloc, space, r)
}

fn per_page(pages: u64, quick: bool) -> PerPage {
    let (alloc, space, r) = mirrored(pages);
    let m: Pin<Box<M<'_>>> = Box::pin(Mirror::new(&space, &*alloc, Quiet, r, MirrorConfig::default()).unwrap());
    m.as_ref().register().unwrap();
    m.fault(r, false).unwrap();
    assert!(m.translate(r.last()).is_some(), "mirrored");
    invalidate(space.notifiers(), r);
    assert!(m.translate(r.last()).is_none(), "the invalidation reached the mirror");

    let lone = Reg::new();
    let noop = Noop::new(r.start(), pages);
    // SAFETY: `noop` outlives `_registration`, declared after it.
    let _registration = unsafe { lone.insert(&noop) }.unwrap();

    let real = RealPages::new(pages);
    // Invalidations per batch: 8,192 pages' worth, and at least two.
    let batch = (8192 / pages).max(2);
    let per = (batch * pages) as f64;
    let mut populate = Vec::new();
    let mut mirror_arm = || {
        let mut t = Duration::ZERO;
        for _ in 0..batch {
            m.fault(r, false).unwrap();
            let t0 = Instant::now();
            invalidate(space.notifiers(), r);
            t += t0.elapsed();
        }
        ns(t) / per
    };
    let mut registry_arm = || {
        let ops = 1000;
        let t0 = Instant::now();
        for _ in 0..ops {
            invalidate(&lone, r);
        }
        ns(t0.elapsed()) / (ops * pages) as f64
    };
    let mut dontneed_arm = || {
        let (mut t, mut fill) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..batch {
            let t0 = Instant::now();
            real.populate();
            let t1 = Instant::now();
            real.dontneed();
            t += t1.elapsed();
            fill += t1 - t0;
        }
        populate.push(ns(fill) / per);
        ns(t) / per
    };
    let plan = Plan {
        min_rounds: if quick { 7 } else { 31 },
        max_rounds: if quick { 7 } else { 31 },
        budget: Duration::from_secs(if quick { 2 } else { 8 }),
    };
    let mut out = interleave(plan, &mut [&mut mirror_arm, &mut registry_arm, &mut dontneed_arm]);
    let dontneed = out.pop().unwrap();
    let registry = out.pop().unwrap();
    let mirror = out.pop().unwrap();
    // The warm-up round populated too: keep the timed rounds only.
    let populate = populate.split_off(1);
    if !real.native_populate {
        eprintln!("MADV_POPULATE_WRITE refused: pages are populated by touching them");
    }
    PerPage { mirror, registry, dontneed, populate }
}

fn invalidation_vs_madvise(report: &mut Report, quick: bool) {
    let sizes = [512u64, 16384];
    let runs: Vec<PerPage> = sizes.iter().map(|&p| per_page(p, quick)).collect();
    let text = |pick: &dyn Fn(&PerPage) -> &Vec<f64>| {
        sizes.iter().zip(&runs).map(|(p, r)| format!("{p} p {} ns/page", plain(median(pick(r))))).collect::<Vec<_>>()
    };
    let (mirror, registry, dontneed, populate) =
        (text(&|r| &r.mirror), text(&|r| &r.registry), text(&|r| &r.dontneed), text(&|r| &r.populate));
    let worst =
        |pick: &dyn Fn(&PerPage) -> &Vec<f64>| runs.iter().map(|r| ratio(pick(r), &r.dontneed)).fold(0.0, f64::max);
    for (p, r) in sizes.iter().zip(&runs) {
        report.figures.push(format!(
            "invalidate {p} pages (ns/page, median of {} rounds): through the registry to a Mirror {:.2}, registry \
             alone (no-op notifier) {:.4}, madvise(MADV_DONTNEED) {:.2}, MADV_POPULATE_WRITE {:.2}; mirror / dontneed \
             {:.3}",
            r.mirror.len(),
            median(&r.mirror),
            median(&r.registry),
            median(&r.dontneed),
            median(&r.populate),
            ratio(&r.mirror, &r.dontneed),
        ));
    }
    let baseline = format!("madvise(MADV_DONTNEED) of populated 4 KiB pages: {}", dontneed.join(", "));
    report.ratio(
        "g4_invalidate_vs_madv_dontneed_per_page",
        worst(&|r| &r.mirror),
        "<= 0.1",
        format!("invalidate through the registry to one Mirror: {} (worse size's ratio)", mirror.join(", ")),
        baseline.clone(),
    );
    report.ratio(
        "g4_invalidate_registry_only_vs_madv_dontneed_per_page",
        worst(&|r| &r.registry),
        "<= 0.1",
        format!("invalidate through the registry to one no-op notifier: {}", registry.join(", ")),
        baseline,
    );
    report
        .figures
        .push(format!("madvise(MADV_POPULATE_WRITE) of 4 KiB pages (baseline only): {}", populate.join(", ")));
}

// --- Many intervals: 1-page invalidation, insert, remove --------------------

/// Where the intervals of a population live: spread over 64 TiB.
const BASE: u64 = GIB;
const SPAN: u64 = 1 << 46;
/// Pages per registered interval.
const LEN: u64 = 4;

/// A registry holding `n` disjoint intervals of `LEN` pages `stride` bytes
/// apart, spare notifiers (in the gaps) for the insert rounds, and pages to
/// invalidate, each inside a registered interval.
struct Population {
    n: usize,
    reg: Box<Reg>,
    stride: u64,
    spares: Box<[Noop]>,
    /// Spares are inserted in this order and removed in `rm_order`.
    order: Vec<usize>,
    rm_order: Vec<usize>,
    /// Insert batches per round (spares are few next to a small `n`).
    reps: usize,
    targets: Vec<VaRange>,
    build: Duration,
}

impl Population {
    /// Registers `n` intervals, one by one in address order. The notifiers
    /// are leaked (they live as long as the process) and their registrations
    /// forgotten: tearing down 100,000 registrations costs as much as
    /// building them, and nothing measures it.
    fn new(n: usize, spares_cap: usize) -> Self {
        let stride = (SPAN / n as u64) & !(2 * PAGE - 1);
        let reg = Box::new(Reg::new());
        let notifiers: &'static [Noop] =
            Box::leak((0..n as u64).map(|i| Noop::new(BASE + i * stride, LEN)).collect::<Box<[Noop]>>());
        let t0 = Instant::now();
        for n in notifiers {
            // SAFETY: the notifier is leaked, so alive and in place for
            // ever: its registration may be forgotten.
            std::mem::forget(unsafe { reg.insert(n) }.unwrap());
        }
        let build = t0.elapsed();
        assert_eq!(reg.len(), n);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        let k = spares_cap.min(n / 10);
        let gap = n / k;
        let spares = (0..k)
            .map(|i| {
                let j = (i * gap) as u64 + rng.below(gap as u64);
                Noop::new(BASE + j * stride + stride / 2, LEN)
            })
            .collect();
        let targets =
            (0..4096).map(|_| range(BASE + rng.below(n as u64) * stride + rng.below(LEN) * PAGE, PAGE)).collect();
        let (order, rm_order) = (rng.permutation(k), rng.permutation(k));
        let reps = (spares_cap / k).max(1);
        Self { n, reg, stride, spares, order, rm_order, reps, targets, build }
    }

    /// Mean ns of `ops` one-page invalidations, each hitting one interval.
    fn invalidate_1page(&self, ops: usize) -> f64 {
        let t0 = Instant::now();
        for t in self.targets.iter().cycle().take(ops) {
            invalidate(&self.reg, *t);
        }
        ns(t0.elapsed()) / ops as f64
    }

    /// Mean ns of `ops` invalidations of one and the same page.
    fn invalidate_same(&self, ops: usize) -> f64 {
        let t0 = Instant::now();
        for _ in 0..ops {
            invalidate(&self.reg, self.targets[0]);
        }
        ns(t0.elapsed()) / ops as f64
    }

    /// Mean ns of one insert and of one removal of a spare, over `reps`
    /// batches that insert every spare, then remove every one.
    fn insert_remove(&self) -> [f64; 2] {
        let (mut ins, mut rm) = (Duration::ZERO, Duration::ZERO);
        let mut regs: Vec<Option<Registration<'_, VecStore>>> = (0..self.spares.len()).map(|_| None).collect();
        for _ in 0..self.reps {
            let t0 = Instant::now();
            for &i in &self.order {
                // SAFETY: `self.spares` outlives `regs`, which is emptied
                // below, and is never moved meanwhile.
                regs[i] = Some(unsafe { self.reg.insert(&self.spares[i]) }.unwrap());
            }
            let t1 = Instant::now();
            for &i in &self.rm_order {
                drop(regs[i].take());
            }
            ins += t1 - t0;
            rm += t1.elapsed();
        }
        let ops = (self.reps * self.spares.len()) as f64;
        [ns(ins) / ops, ns(rm) / ops]
    }

    /// A sanity check, untimed: every target hits a registered interval,
    /// and the population has `n` intervals.
    fn check(&self, when: &str) {
        for t in &self.targets {
            assert_ne!(invalidate(&self.reg, *t), 0, "{} intervals, {when}: {t:?} overlaps an interval", self.n);
        }
        assert_eq!(self.reg.len(), self.n, "{when}");
        assert!(self.stride >= 2 * LEN * PAGE);
    }
}

/// Builds the populations: 1k, 10k, 100k, and 1M in full mode when the
/// 100k build says it takes under about 15 s.
fn populations(report: &mut Report, quick: bool) -> Vec<Population> {
    let cap = 1000;
    let mut pops: Vec<Population> = Vec::new();
    for n in [1_000, 10_000, 100_000, 1_000_000] {
        if n == 1_000_000 {
            let last = pops.last().unwrap();
            let estimate = last.build.as_secs_f64() * 10.0 * 1.5;
            if quick || estimate > 15.0 {
                let why = if quick {
                    "quick mode".to_string()
                } else {
                    format!("registering them would take ~{estimate:.0} s")
                };
                report.figures.push(format!("1,000,000 intervals skipped ({why})"));
                break;
            }
        }
        eprintln!("registering {n} intervals ...");
        let p = Population::new(n, cap);
        eprintln!("  {:.2} s", p.build.as_secs_f64());
        p.check("after registering");
        report.figures.push(format!(
            "registering {n} disjoint intervals one by one (address order): {:.3} s, {:.0} ns per insert on average",
            p.build.as_secs_f64(),
            ns(p.build) / n as f64
        ));
        pops.push(p);
    }
    pops
}

/// Per-round figures of each population, from interleaved rounds: ns per
/// 1-page invalidation, per insert, per removal.
struct Measured {
    inv: Vec<Vec<f64>>,
    /// The same page every time: the lookup with its path in the cache.
    hot: Vec<Vec<f64>>,
    ins: Vec<Vec<f64>>,
    rm: Vec<Vec<f64>>,
}

/// Interleaved rounds over `pops`: 1-page invalidations, then inserts and
/// removals.
fn measure(pops: &[Population], quick: bool) -> Measured {
    let rounds = if quick { 9 } else { 31 };
    let plan = Plan { min_rounds: 7, max_rounds: rounds, budget: Duration::from_secs(3) };
    let mut arms: Vec<Box<dyn FnMut() -> f64 + '_>> =
        pops.iter().map(|p| Box::new(move || p.invalidate_1page(4096)) as Box<dyn FnMut() -> f64>).collect();
    let mut refs: Vec<&mut dyn FnMut() -> f64> = arms.iter_mut().map(|a| &mut **a as _).collect();
    let inv = interleave(plan, &mut refs);
    drop(arms);
    let mut arms: Vec<Box<dyn FnMut() -> f64 + '_>> =
        pops.iter().map(|p| Box::new(move || p.invalidate_same(4096)) as Box<dyn FnMut() -> f64>).collect();
    let mut refs: Vec<&mut dyn FnMut() -> f64> = arms.iter_mut().map(|a| &mut **a as _).collect();
    let hot = interleave(Plan { max_rounds: 7, ..plan }, &mut refs);
    drop(arms);
    let plan = Plan { min_rounds: 3, max_rounds: rounds, budget: Duration::from_secs(if quick { 2 } else { 10 }) };
    let mut arms: Vec<Box<dyn FnMut() -> [f64; 2] + '_>> =
        pops.iter().map(|p| Box::new(move || p.insert_remove()) as Box<dyn FnMut() -> [f64; 2]>).collect();
    let mut refs: Vec<&mut dyn FnMut() -> [f64; 2]> = arms.iter_mut().map(|a| &mut **a as _).collect();
    let res = interleave(plan, &mut refs);
    drop(arms);
    for p in pops {
        p.check("after the insert rounds");
    }
    let column = |j: usize| res.iter().map(|v| v.iter().map(|x| x[j]).collect()).collect();
    Measured { inv, hot, ins: column(0), rm: column(1) }
}

/// Plots and figures of every population.
fn plot(report: &mut Report, pops: &[Population], m: &Measured, note: &str) {
    for (i, p) in pops.iter().enumerate() {
        report.plot("invalidate_1page", p.n, median(&m.inv[i]));
        report.plot("insert", p.n, median(&m.ins[i]));
        report.plot("remove", p.n, median(&m.rm[i]));
        report.figures.push(format!(
            "{} intervals{note}: 1-page invalidate {:.0} ns (the same page every time: {:.0} ns), insert {:.0} ns, remove {:.0} ns (medians of {} and {} \
             rounds; inserts of {} notifiers at random gaps, then removals)",
            p.n,
            median(&m.inv[i]),
            median(&m.hot[i]),
            median(&m.ins[i]),
            median(&m.rm[i]),
            m.inv[i].len(),
            m.ins[i].len(),
            p.reps * p.spares.len()
        ));
    }
}

fn many_intervals(report: &mut Report, quick: bool) {
    let pops = populations(report, quick);
    // 1M is measured on its own: its 100 MB would evict the others' trees
    // from the cache between their batches, and the goal figures must not
    // depend on whether it runs.
    let (goal, extra) = pops.split_at(3);
    eprintln!("1-page invalidations, inserts and removals ...");
    let m = measure(goal, quick);
    plot(report, goal, &m, "");
    if !extra.is_empty() {
        eprintln!("the same at 1,000,000 ...");
        let x = measure(extra, quick);
        plot(report, extra, &x, " (measured alone)");
    }
    let (k1, k10, k100) = (0, 1, 2);
    let us = |k: usize| median(&m.inv[k]) / 1000.0;
    let reference = format!("1,000 intervals: {:.3} us", us(k1));
    for (k, name, text) in
        [(k10, "g4_invalidate_1page_10k_us", "10,000"), (k100, "g4_invalidate_1page_100k_us", "100,000")]
    {
        report.ratio(
            name,
            us(k),
            "<= 1.0",
            format!("1-page invalidate start+end, {text} intervals: {:.3} us", us(k)),
            reference.clone(),
        );
    }
    report.ratio(
        "g4_invalidate_growth_100k_vs_10k",
        ratio(&m.inv[k100], &m.inv[k10]),
        "<= 1.5",
        format!("100,000 intervals: {:.0} ns", median(&m.inv[k100])),
        format!("10,000 intervals: {:.0} ns (logarithmic growth: ~1.25)", median(&m.inv[k10])),
    );
    let text = |k: usize, n: &str| {
        format!("insert with {n} registered: {:.0} ns (remove {:.0} ns)", median(&m.ins[k]), median(&m.rm[k]))
    };
    report.ratio(
        "g4_insert_100k_vs_1k",
        ratio(&m.ins[k100], &m.ins[k1]),
        "<= 3",
        text(k100, "100,000"),
        text(k1, "1,000"),
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench`:
        // measuring belongs to `cargo bench` (and `cargo xtask bench`).
        println!("not run as a benchmark (use cargo bench or cargo xtask bench)");
        return;
    }
    let quick = std::env::var("HMM_BENCH_QUICK").is_ok_and(|v| v == "1");
    let t0 = Instant::now();
    let mut report = Report::default();
    eprintln!("invalidation vs madvise ...");
    invalidation_vs_madvise(&mut report, quick);
    many_intervals(&mut report, quick);
    report.figures.push(format!(
        "notifier bench ran {:.1} s ({})",
        t0.elapsed().as_secs_f64(),
        if quick { "quick" } else { "full" }
    ));
    report.print();
}
