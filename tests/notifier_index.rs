//! The registry's interval tree: random insert / remove / overlap-query
//! sequences (immediate, and postponed by a running invalidation) against a
//! naive model, with the tree invariants (order, balance, heights, subtree
//! `max_last`, slot bookkeeping) checked after every step; sorted and
//! reversed bulk loads; plus an ignored timing probe (`--release --
//! --ignored`).

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::notifier::{EntryStore, FixedStore, Invalidation, Registration, VecStore, Waiter};
use hmm_core::sync::SpinWait;
use hmm_core::{Error, Event, Interval, InvalidateRange, Notifier, NotifierRegistry, VaRange};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant};

type L4 = X86_64Level4;
const PAGE: u64 = 4096;

/// `[page * 4 KiB, (page + pages) * 4 KiB)`.
fn pages(page: u64, pages: u64) -> VaRange {
    VaRange::new::<L4>(page * PAGE, pages * PAGE).unwrap()
}

/// A notifier that records its sequence, as a driver does.
struct Quiet {
    interval: Interval,
}

impl Notifier for Quiet {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.interval.set_seq(inv);
        true
    }
}

fn quiet(range: VaRange) -> Quiet {
    Quiet { interval: Interval::new(range) }
}

/// Registers `n`. Callers keep `n` alive and in place until the
/// registration is gone (notifiers are declared before their registry).
fn add<'r, S: EntryStore, W: Waiter>(reg: &'r NotifierRegistry<S, W>, n: &dyn Notifier) -> Registration<'r, S, W> {
    // SAFETY: see above.
    unsafe { reg.insert(n) }.unwrap()
}

/// A notifier that logs its id on every callback, in call order.
struct Logged<'a> {
    interval: Interval,
    id: usize,
    log: &'a Mutex<Vec<usize>>,
}

impl Notifier for Logged<'_> {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.log.lock().unwrap().push(self.id);
        self.interval.set_seq(inv);
        true
    }
}

/// Counts callers inside `wait_until`, one counter per test (`ID`), so a
/// test sees deterministically that an insert or remove waits.
#[derive(Default)]
struct Watch<const ID: usize>;

static WAITING: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

impl<const ID: usize> Waiter for Watch<ID> {
    fn wait_until(&self, done: &dyn Fn() -> bool) {
        WAITING[ID].fetch_add(1, Ordering::SeqCst);
        while !done() {
            std::thread::yield_now();
        }
        WAITING[ID].fetch_sub(1, Ordering::SeqCst);
    }
    fn wake_all(&self) {}
}

/// Spins until `handle`'s thread finished or `waiting` threads wait in
/// `Watch<ID>`; true if it finished.
fn finished_or_waiting<const ID: usize, T>(handle: &ScopedJoinHandle<'_, T>, waiting: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if handle.is_finished() {
            return true;
        }
        if WAITING[ID].load(Ordering::SeqCst) >= waiting {
            return false;
        }
        assert!(Instant::now() < deadline, "an insert or remove neither finished nor waits");
        std::thread::yield_now();
    }
}

// ------------------------------------------------------------------ the model

/// One step of a random history.
#[derive(Clone, Debug)]
enum Op {
    /// Registers notifier `i` if it is not, unregisters it otherwise.
    Toggle(usize),
    /// Invalidates `[page, page + pages)` and checks who was called.
    Query(u64, u64),
    /// The same invalidation, left running while notifiers are toggled
    /// (inserts postponed, removes postponed or waiting), then ended.
    During((u64, u64), Vec<usize>),
}

fn interval_pages() -> impl Strategy<Value = (u64, u64)> {
    // Few distinct starts: many equal starts and nested intervals.
    (0u64..48, prop_oneof![3 => 1u64..4, 2 => 1u64..24, 1 => 1u64..64])
}

fn query_pages() -> impl Strategy<Value = (u64, u64)> {
    (0u64..72, prop_oneof![3 => 1u64..3, 2 => 1u64..16, 1 => 1u64..80])
}

fn ops(pool: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0..pool).prop_map(Op::Toggle),
        3 => query_pages().prop_map(|(p, n)| Op::Query(p, n)),
        2 => (query_pages(), prop::collection::vec(0..pool, 1..15)).prop_map(|(q, t)| Op::During(q, t)),
    ];
    prop::collection::vec(op, 1..160)
}

/// The registry under test next to what it should hold.
struct Model<'a, S: EntryStore, const ID: usize> {
    reg: &'a NotifierRegistry<S, Watch<ID>>,
    ns: &'a [Logged<'a>],
    log: &'a Mutex<Vec<usize>>,
    /// Registrations, `Some` for every registered (or pending) notifier.
    regs: Vec<Option<Registration<'a, S, Watch<ID>>>>,
    /// Capacity of a `FixedStore`.
    cap: Option<usize>,
}

impl<'a, S: EntryStore + Sync, const ID: usize> Model<'a, S, ID> {
    fn live(&self) -> usize {
        self.regs.iter().filter(|r| r.is_some()).count()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.reg.check_invariants(), Ok(()));
        prop_assert_eq!(self.reg.len(), self.live());
        Ok(())
    }

    /// Starts an invalidation of `q`; checks it called exactly the
    /// registered notifiers overlapping `q`, in start order.
    fn start(&self, q: VaRange) -> Result<Invalidation, TestCaseError> {
        self.log.lock().unwrap().clear();
        let inv = self.reg.invalidate_range_start(q, Event::Unmap, true).unwrap();
        let mut got = core::mem::take(&mut *self.log.lock().unwrap());
        let starts: Vec<u64> = got.iter().map(|&i| self.ns[i].interval.range().start()).collect();
        prop_assert!(starts.is_sorted(), "called out of start order: {:?}", starts);
        let want: Vec<usize> = (0..self.ns.len())
            .filter(|&i| self.regs[i].is_some() && self.ns[i].interval.range().overlaps(&q))
            .collect();
        got.sort_unstable();
        prop_assert_eq!(&got, &want, "query {:?}", q);
        prop_assert_eq!(inv.seq() != 0, !want.is_empty());
        Ok(inv)
    }

    fn toggle(&mut self, i: usize) -> Result<(), TestCaseError> {
        match self.regs[i].take() {
            Some(r) => r.remove(),
            // SAFETY: the notifiers outlive the registry.
            None => match unsafe { self.reg.insert(&self.ns[i]) } {
                Ok(r) => {
                    prop_assert!(self.cap.is_none_or(|c| self.live() < c), "inserted past the capacity");
                    self.regs[i] = Some(r);
                }
                Err(e) => {
                    prop_assert_eq!(e, Error::Capacity);
                    prop_assert_eq!(Some(self.live()), self.cap);
                }
            },
        }
        self.check()
    }

    /// Toggles `toggles` while an invalidation of `q` runs, each insert or
    /// remove on a thread of its own until it returns or waits; then ends
    /// the invalidation and collects them.
    fn during(&mut self, q: VaRange, toggles: &[usize]) -> Result<(), TestCaseError> {
        let inv = self.start(q)?;
        let (reg, ns) = (self.reg, self.ns);
        // In the tree at the start (removes are postponed, so they stay).
        let mut in_tree = self.live();
        let mut pending = vec![false; ns.len()];
        let mut busy = vec![false; ns.len()];
        std::thread::scope(|s| -> Result<(), TestCaseError> {
            let mut inserts = Vec::new();
            let mut removes = Vec::new();
            for &i in toggles {
                if busy[i] {
                    continue;
                }
                let waiting = inserts.len() + removes.len() + 1;
                match self.regs[i].take() {
                    // Cancels a postponed insert at once.
                    Some(r) if pending[i] => {
                        r.remove();
                        pending[i] = false;
                    }
                    Some(r) => {
                        let h = s.spawn(move || r.remove());
                        if finished_or_waiting::<ID, _>(&h, waiting) {
                            // Nothing ran over it yet: removed at once.
                            h.join().unwrap();
                            in_tree -= 1;
                        } else {
                            busy[i] = true;
                            removes.push(h);
                        }
                    }
                    None => {
                        // SAFETY: the notifiers outlive the registry.
                        let h = s.spawn(move || unsafe { reg.insert(&ns[i]) });
                        let queued = pending.iter().filter(|p| **p).count();
                        if !finished_or_waiting::<ID, _>(&h, waiting) {
                            busy[i] = true;
                            inserts.push((i, h));
                            continue;
                        }
                        match h.join().unwrap() {
                            Ok(r) => {
                                prop_assert!(
                                    self.cap.is_none_or(|c| in_tree + queued < c),
                                    "postponed past the capacity"
                                );
                                self.regs[i] = Some(r);
                                pending[i] = true;
                            }
                            Err(e) => {
                                prop_assert_eq!(e, Error::Capacity);
                                prop_assert_eq!(self.cap, Some(in_tree + queued));
                            }
                        }
                    }
                }
            }
            reg.invalidate_range_end(inv);
            for h in removes {
                h.join().unwrap();
            }
            for (i, h) in inserts {
                self.regs[i] = Some(h.join().unwrap().expect("a waiting insert goes in after the end"));
            }
            Ok(())
        })?;
        self.check()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Toggle(i) => self.toggle(*i),
            Op::Query(p, n) => {
                let inv = self.start(pages(*p, *n))?;
                self.reg.invalidate_range_end(inv);
                Ok(())
            }
            Op::During((p, n), toggles) => self.during(pages(*p, *n), toggles),
        }
    }
}

/// Runs `ops` over notifiers on `ranges` in a registry over `S`.
fn run<S: EntryStore + Sync, const ID: usize>(
    cap: Option<usize>,
    ranges: &[(u64, u64)],
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let log = Mutex::new(Vec::new());
    let ns: Vec<Logged> = ranges
        .iter()
        .enumerate()
        .map(|(id, &(p, n))| Logged { interval: Interval::new(pages(p, n)), id, log: &log })
        .collect();
    let reg = NotifierRegistry::<S, Watch<ID>>::new();
    let mut model = Model { reg: &reg, ns: &ns, log: &log, regs: (0..ns.len()).map(|_| None).collect(), cap };
    for op in ops {
        model.apply(op)?;
    }
    // Everything registered is found by one invalidation of everything.
    let inv = model.start(VaRange::all())?;
    reg.invalidate_range_end(inv);
    Ok(())
}

const POOL: usize = 40;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 2 } else { 96 }))]

    #[test]
    fn vec_store_matches_the_model(
        ranges in prop::collection::vec(interval_pages(), POOL),
        ops in ops(POOL),
    ) {
        run::<VecStore, 0>(None, &ranges, &ops)?;
    }

    #[test]
    fn fixed_store_matches_the_model(
        ranges in prop::collection::vec(interval_pages(), POOL),
        ops in ops(POOL),
    ) {
        run::<FixedStore<24>, 1>(Some(24), &ranges, &ops)?;
    }
}

/// A growable store postpones only the inserts its spare slots hold (the
/// invalidation path never allocates); the others wait for the end and go
/// in then, into a tree that stays sound.
#[test]
fn postponed_inserts_beyond_the_spare_slots_wait_for_the_end() {
    let log = Mutex::new(Vec::new());
    let ns: Vec<Logged> =
        (0..24).map(|id| Logged { interval: Interval::new(pages(id as u64 % 5, 3)), id, log: &log }).collect();
    let reg = NotifierRegistry::<VecStore, Watch<2>>::new();
    let mut regs = Vec::new();
    // Postponed inserts use up the room a fresh store reserved.
    let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    regs.extend(ns[..14].iter().map(|n| add(&reg, n)));
    reg.invalidate_range_end(inv);
    assert_eq!(reg.len(), 14);
    reg.check_invariants().unwrap();
    let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    let waited = std::thread::scope(|s| {
        let mut waiting = Vec::new();
        for n in &ns[14..] {
            // SAFETY: the notifiers outlive the registry.
            let h = s.spawn(|| unsafe { reg.insert(n) }.unwrap());
            if finished_or_waiting::<2, _>(&h, waiting.len() + 1) {
                regs.push(h.join().unwrap());
            } else {
                waiting.push(h);
            }
        }
        reg.invalidate_range_end(inv);
        let waited = waiting.len();
        regs.extend(waiting.into_iter().map(|h| h.join().unwrap()));
        waited
    });
    assert!(waited > 0, "every insert was postponed: the end must have allocated");
    assert_eq!(reg.len(), ns.len());
    reg.check_invariants().unwrap();
    log.lock().unwrap().clear();
    let inv = reg.invalidate_range_start(VaRange::all(), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    let mut got = core::mem::take(&mut *log.lock().unwrap());
    got.sort_unstable();
    assert_eq!(got, (0..ns.len()).collect::<Vec<_>>());
}

// ------------------------------------------------------------------ bulk loads

/// Sorted, reversed and interleaved loads and unloads keep the tree
/// balanced (a missed rotation shows as a tree too high, a stale
/// `max_last` as a wrong answer); checked after every step.
#[test]
fn sorted_and_reversed_loads_stay_balanced() {
    const N: usize = if cfg!(miri) { 40 } else { 600 };
    type Reg<'r> = Registration<'r, FixedStore<N>>;
    let log = Mutex::new(Vec::new());
    let ns: Vec<Logged> = (0..N)
        .map(|id| Logged { interval: Interval::new(pages(id as u64, 1 + (id as u64 * 7) % 13)), id, log: &log })
        .collect();
    let reg = NotifierRegistry::<FixedStore<N>, SpinWait>::new();
    let mut regs: Vec<Option<Reg>> = (0..N).map(|_| None).collect();
    let orders: [fn(usize) -> usize; 3] = [|i| i, |i| N - 1 - i, |i| if i % 2 == 0 { i / 2 } else { N - 1 - i / 2 }];
    let check_queries = |regs: &[Option<Reg>]| {
        for q in [pages(0, 1), pages(N as u64 / 2, 3), pages(N as u64 - 5, 40), pages(N as u64 + 20, 1)] {
            let inv = reg.invalidate_range_start(q, Event::Unmap, true).unwrap();
            reg.invalidate_range_end(inv);
            let mut got = core::mem::take(&mut *log.lock().unwrap());
            got.sort_unstable();
            let want: Vec<usize> =
                (0..N).filter(|&k| regs[k].is_some() && ns[k].interval.range().overlaps(&q)).collect();
            assert_eq!(got, want, "query {q:?}");
        }
    };
    for load in orders {
        for unload in orders {
            for i in 0..N {
                let k = load(i);
                regs[k] = Some(add(&reg, &ns[k]));
                reg.check_invariants().unwrap();
            }
            check_queries(&regs);
            for i in 0..N {
                let k = unload(i);
                regs[k].take().unwrap().remove();
                reg.check_invariants().unwrap();
                if i == N / 2 {
                    check_queries(&regs);
                }
            }
            assert!(reg.is_empty());
        }
    }
}

/// A small deterministic generator (xorshift64*), so the probe needs no
/// dependency and places intervals the same way on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per insert of `batch` intervals at random places into a
/// registry of `n` (notifier `i` covering pages `[4i, 4i + 2)`, registered in
/// address order), per remove of them right after (so along warm paths), and
/// per one-page invalidation of a random registered page and of one page
/// again and again; medians of `rounds`.
fn probe(n: u64, batch: usize, rounds: usize) -> [f64; 4] {
    let base: Vec<Quiet> = (0..n).map(|i| quiet(pages(4 * i, 2))).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n);
    let extra: Vec<Quiet> = (0..batch).map(|_| quiet(pages(rng.below(4 * n), 1 + rng.below(8)))).collect();
    let reg = NotifierRegistry::<VecStore>::new();
    let _regs: Vec<_> = base.iter().map(|q| add(&reg, q)).collect();
    let (mut ins, mut rem, mut inv, mut hot) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let regs: Vec<_> = extra.iter().map(|q| add(&reg, q)).collect();
        ins.push(t.elapsed().as_nanos() as f64 / batch as f64);
        let t = Instant::now();
        drop(regs);
        rem.push(t.elapsed().as_nanos() as f64 / batch as f64);
        let queries: Vec<VaRange> = (0..10_000).map(|_| pages(4 * rng.below(n), 1)).collect();
        let t = Instant::now();
        for q in &queries {
            let i = reg.invalidate_range_start(*q, Event::Unmap, true).unwrap();
            reg.invalidate_range_end(i);
        }
        inv.push(t.elapsed().as_nanos() as f64 / queries.len() as f64);
        let q = pages(4 * (n / 2), 1);
        let t = Instant::now();
        for _ in 0..10_000 {
            let i = reg.invalidate_range_start(q, Event::Unmap, true).unwrap();
            reg.invalidate_range_end(i);
        }
        hot.push(t.elapsed().as_nanos() as f64 / 10_000.0);
    }
    [median(ins), median(rem), median(inv), median(hot)]
}

/// Prints per-insert, per-remove and one-page invalidation costs at 1,000,
/// 10,000 and 100,000 intervals. A probe, not an assertion: run with
/// `cargo test --release -p hmm-core --features alloc --test notifier_index -- --ignored --nocapture`.
#[test]
#[ignore = "timing probe; run in release with --ignored --nocapture"]
fn timing_probe() {
    for (n, batch) in [(1_000u64, 200usize), (10_000, 200), (100_000, 200)] {
        let [ins, rem, inv, hot] = probe(n, batch, 7);
        println!(
            "n={n:>7}: insert {ins:>8.0} ns, remove {rem:>8.0} ns, 1-page invalidation {inv:>4.0} ns \
             (random page), {hot:>4.0} ns (same page)"
        );
    }
}
