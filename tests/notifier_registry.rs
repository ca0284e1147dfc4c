//! `NotifierRegistry`: the sequence protocol, callbacks, deferred insert and
//! remove, non-blockable refusal, release, capacity, and the overlap index
//! (checked against brute force; `tests/notifier_index.rs` has its model
//! test).

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::notifier::{EntryStore, FixedStore, Registration, VecStore, Waiter};
use hmm_core::{Error, Event, Interval, InvalidateRange, Notifier, NotifierRegistry, VaRange};
use proptest::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

#[path = "common/watchdog.rs"]
mod watchdog;

type L4 = X86_64Level4;
const PAGE: u64 = 4096;

/// `[page * 4 KiB, (page + pages) * 4 KiB)`.
fn pages(page: u64, pages: u64) -> VaRange {
    VaRange::new::<L4>(page * PAGE, pages * PAGE).unwrap()
}

/// A driver notifier that counts its callbacks.
struct Counter {
    interval: Interval,
    calls: AtomicUsize,
    last_seq: AtomicU64,
    last: Mutex<Option<Seen>>,
    /// Refuse non-blockable invalidations (as if the driver lock were taken).
    refuse_nonblocking: bool,
    /// Set by a test once `remove` returned; a callback after that is a bug.
    removed: AtomicBool,
    late_calls: AtomicUsize,
}

impl Counter {
    fn new(range: VaRange) -> Self {
        Self {
            interval: Interval::new(range),
            calls: AtomicUsize::new(0),
            last_seq: AtomicU64::new(0),
            last: Mutex::new(None),
            refuse_nonblocking: false,
            removed: AtomicBool::new(false),
            late_calls: AtomicUsize::new(0),
        }
    }

    fn refusing(range: VaRange) -> Self {
        Self { refuse_nonblocking: true, ..Self::new(range) }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn last(&self) -> Option<Seen> {
        *self.last.lock().unwrap()
    }
}

/// What a callback was told (an `InvalidateRange` cannot be kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    range: VaRange,
    event: Event,
    blockable: bool,
}

impl Notifier for Counter {
    fn interval(&self) -> &Interval {
        &self.interval
    }

    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        if self.removed.load(Ordering::SeqCst) {
            self.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        if self.refuse_nonblocking && !inv.blockable {
            return false;
        }
        *self.last.lock().unwrap() = Some(Seen { range: inv.range, event: inv.event, blockable: inv.blockable });
        self.last_seq.store(inv.seq(), Ordering::SeqCst);
        self.interval.set_seq(inv);
        self.calls.fetch_add(1, Ordering::SeqCst);
        true
    }
}

type Registry = NotifierRegistry<VecStore>;

/// Registers `n`; dropping (or removing) the returned registration
/// unregisters it.
///
/// Every caller keeps `n` alive and in place until its registration is gone
/// (each test declares its notifiers before the registry, and registrations
/// borrow the registry, so both are dropped before the notifiers).
fn add<'r, S: EntryStore, W: Waiter>(
    reg: &'r NotifierRegistry<S, W>,
    n: &Counter,
) -> hmm_core::Result<Registration<'r, S, W>> {
    // SAFETY: see above: `n` outlives its registration.
    unsafe { reg.insert(n) }
}

// ------------------------------------------------------------------ a waiter the tests can watch

/// Counts callers currently inside `wait_until`, one counter per test (`ID`),
/// so a test can see deterministically that a thread is waiting.
#[derive(Default)]
struct Watch<const ID: usize>;

static WAITING: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

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

/// Spins until a thread waits in `Watch<ID>` or `finished` is set; returns
/// true if it is waiting.
fn until_waiting_or_finished<const ID: usize>(finished: &AtomicBool) -> bool {
    loop {
        if WAITING[ID].load(Ordering::SeqCst) > 0 {
            return true;
        }
        if finished.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::yield_now();
    }
}

// ------------------------------------------------------------------ sequence

#[test]
fn sequence_is_even_when_idle_and_odd_during_an_overlapping_invalidation() {
    let a = Counter::new(pages(1, 4)); // [0x1000, 0x4fff]
    let reg = Registry::new();
    assert_eq!(reg.seq() % 2, 0);
    let _ra = add(&reg, &a).unwrap();
    assert_eq!((reg.len(), reg.is_empty()), (1, false));
    let before = reg.seq();
    assert_eq!(before % 2, 0);

    let inv = reg.invalidate_range_start(pages(4, 2), Event::Unmap, true).unwrap();
    let during = reg.seq();
    assert_eq!(during % 2, 1, "odd while invalidating");
    assert_eq!(during, before + 1);
    assert_eq!(inv.seq(), during);
    assert_eq!(a.calls(), 1);
    assert_eq!(a.last_seq.load(Ordering::SeqCst), during);
    assert_eq!(a.last(), Some(Seen { range: pages(4, 2), event: Event::Unmap, blockable: true }));
    reg.invalidate_range_end(inv);
    assert_eq!(reg.seq(), before + 2);
    assert_eq!(a.calls(), 1, "end does not call back");

    // Again: the sequence keeps growing, callbacks see the new odd value.
    let inv = reg.invalidate_range_start(pages(1, 1), Event::ProtectionVma, true).unwrap();
    assert_eq!((reg.seq(), inv.seq(), a.last_seq.load(Ordering::SeqCst)), (before + 3, before + 3, before + 3));
    reg.invalidate_range_end(inv);
    assert_eq!(reg.seq(), before + 4);
}

#[test]
fn an_invalidation_that_overlaps_nothing_leaves_the_sequence_alone() {
    let a = Counter::new(pages(16, 4)); // [0x10000, 0x13fff]
    let reg = Registry::new();
    // Empty registry.
    let inv = reg.invalidate_range_start(pages(16, 4), Event::Unmap, true).unwrap();
    assert_eq!((reg.seq(), inv.seq()), (0, 0));
    reg.invalidate_range_end(inv);
    assert_eq!(reg.seq(), 0);

    let _ra = add(&reg, &a).unwrap();
    let seq = reg.seq();
    // Touching but not overlapping on either side, and far away.
    for r in [pages(0, 16), pages(20, 1), pages(20, 100), pages(0x1_0000, 1)] {
        let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
        assert_eq!(reg.seq(), seq, "{r:?}");
        assert_eq!(inv.seq(), 0);
        reg.invalidate_range_end(inv);
        assert_eq!(reg.seq(), seq);
    }
    assert_eq!(a.calls(), 0);
    // One page of overlap at either edge is enough.
    for r in [pages(0, 17), pages(19, 1)] {
        let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
        assert_eq!(reg.seq() % 2, 1, "{r:?}");
        reg.invalidate_range_end(inv);
    }
    assert_eq!(a.calls(), 2);
    assert_eq!(reg.seq(), seq + 4);
}

#[test]
fn callbacks_run_exactly_for_overlapping_notifiers() {
    let a = Counter::new(pages(0, 10));
    let b = Counter::new(pages(5, 10));
    let c = Counter::new(pages(20, 1));
    let d = Counter::new(VaRange::new::<L4>(0xffff_8000_0000_0000, 16 * PAGE).unwrap());
    let e = Counter::new(pages(5, 10)); // same interval as b
    let reg = Registry::new();
    let _regs: Vec<_> = [&a, &b, &c, &d, &e].into_iter().map(|n| add(&reg, n).unwrap()).collect();
    assert_eq!(reg.len(), 5);
    let calls = || [&a, &b, &c, &d, &e].map(|n| n.calls());

    let inv = reg.invalidate_range_start(pages(9, 2), Event::Migrate { owner: 7 }, true).unwrap();
    assert_eq!(calls(), [1, 1, 0, 0, 1]);
    for n in [&a, &b, &e] {
        assert_eq!(n.last_seq.load(Ordering::SeqCst), inv.seq());
        assert_eq!(n.last().unwrap().event, Event::Migrate { owner: 7 });
        assert_eq!(n.last().unwrap().range, pages(9, 2));
    }
    reg.invalidate_range_end(inv);

    let inv = reg.invalidate_range_start(pages(10, 10), Event::SoftDirty, true).unwrap();
    assert_eq!(calls(), [1, 2, 0, 0, 2]);
    reg.invalidate_range_end(inv);
    let inv = reg.invalidate_range_start(pages(0, 21), Event::Exclusive { owner: 1 }, true).unwrap();
    assert_eq!(calls(), [2, 3, 1, 0, 3]);
    reg.invalidate_range_end(inv);
    let high = VaRange::new::<L4>(0xffff_8000_0000_f000, PAGE).unwrap();
    let inv = reg.invalidate_range_start(high, Event::ProtectionPage, true).unwrap();
    assert_eq!(calls(), [2, 3, 1, 1, 3]);
    assert_eq!(d.last().unwrap().event, Event::ProtectionPage);
    reg.invalidate_range_end(inv);
}

#[test]
fn nested_invalidations_share_one_odd_sequence() {
    let a = Counter::new(pages(0, 4));
    let b = Counter::new(pages(8, 4));
    let reg = Registry::new();
    let _ra = add(&reg, &a).unwrap();
    let _rb = add(&reg, &b).unwrap();
    let i1 = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    let s = reg.seq();
    let i2 = reg.invalidate_range_start(pages(8, 1), Event::Unmap, true).unwrap();
    assert_eq!((reg.seq(), i1.seq(), i2.seq()), (s, s, s));
    assert_eq!(b.last_seq.load(Ordering::SeqCst), s);
    reg.invalidate_range_end(i1);
    assert_eq!(reg.seq(), s, "still odd while the second runs");
    reg.invalidate_range_end(i2);
    assert_eq!(reg.seq(), s + 1);
}

// ------------------------------------------------------------------ read side

#[test]
fn read_begin_and_read_retry_detect_an_invalidation() {
    let a = Counter::new(pages(0, 4));
    let b = Counter::new(pages(100, 4));
    let reg = Registry::new();
    let _ra = add(&reg, &a).unwrap();
    let _rb = add(&reg, &b).unwrap();

    let s = reg.read_begin(&a.interval);
    assert!(!reg.read_retry(&a.interval, s));
    assert!(!reg.check_retry(&a.interval, s));

    // An invalidation of b only: a's read stays valid.
    let inv = reg.invalidate_range_start(pages(100, 1), Event::Unmap, true).unwrap();
    assert!(!reg.read_retry(&a.interval, s));
    reg.invalidate_range_end(inv);
    assert!(!reg.read_retry(&a.interval, s));

    // An invalidation of a: detected while running and after it ended.
    let inv = reg.invalidate_range_start(pages(3, 1), Event::Unmap, true).unwrap();
    assert!(reg.read_retry(&a.interval, s));
    assert!(reg.check_retry(&a.interval, s));
    reg.invalidate_range_end(inv);
    assert!(reg.read_retry(&a.interval, s));

    // A fresh read_begin is valid again, and differs from the old one.
    let s2 = reg.read_begin(&a.interval);
    assert_ne!(s2, s);
    assert!(!reg.read_retry(&a.interval, s2));

    // Repeated invalidations never bring an old sequence back.
    let mut seen = vec![s, s2];
    for _ in 0..5 {
        let inv = reg.invalidate_range_start(pages(0, 1), Event::Clear, true).unwrap();
        reg.invalidate_range_end(inv);
        let s = reg.read_begin(&a.interval);
        assert!(!seen.contains(&s));
        seen.push(s);
    }
}

#[test]
fn read_begin_waits_while_its_interval_is_invalidated() {
    watchdog::bounded("read_begin waiting for the end of an invalidation of its interval", watchdog::BOUND, || {
        let a = Counter::new(pages(0, 4));
        let b = Counter::new(pages(100, 4));
        let reg = NotifierRegistry::<VecStore, Watch<0>>::new();
        let _ra = add(&reg, &a).unwrap();
        let _rb = add(&reg, &b).unwrap();

        // An invalidation of b does not hold up a reader of a.
        let inv = reg.invalidate_range_start(pages(100, 1), Event::Unmap, true).unwrap();
        let s = reg.read_begin(&a.interval);
        assert!(!reg.read_retry(&a.interval, s));
        reg.invalidate_range_end(inv);

        let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
        let finished = AtomicBool::new(false);
        std::thread::scope(|t| {
            let reader = t.spawn(|| {
                let s = reg.read_begin(&a.interval);
                finished.store(true, Ordering::SeqCst);
                s
            });
            assert!(
                until_waiting_or_finished::<0>(&finished),
                "read_begin returned during an invalidation of its interval"
            );
            assert!(!finished.load(Ordering::SeqCst));
            let cur = inv.seq();
            reg.invalidate_range_end(inv);
            let s = reader.join().unwrap();
            assert_eq!(s, cur, "read_begin returns the sequence the callback stored");
            assert!(!reg.read_retry(&a.interval, s));
        });
    });
}

// ------------------------------------------------------------------ insert / remove during invalidation

#[test]
fn insert_during_an_invalidation_is_deferred() {
    watchdog::bounded("read_begin of a pending insert waiting for the invalidations to end", watchdog::BOUND, || {
        let a = Counter::new(pages(0, 8));
        let b = Counter::new(pages(4, 8));
        let reg = NotifierRegistry::<VecStore, Watch<1>>::new();
        let _ra = add(&reg, &a).unwrap();

        let i1 = reg.invalidate_range_start(pages(0, 16), Event::Unmap, true).unwrap();
        let _rb = add(&reg, &b).unwrap();
        assert!(b.interval.is_registered());
        assert_eq!(reg.len(), 1, "pending inserts are not counted");
        assert_eq!(b.calls(), 0);
        // A nested invalidation of the same range does not call it either.
        let i2 = reg.invalidate_range_start(pages(4, 1), Event::Unmap, true).unwrap();
        assert_eq!((a.calls(), b.calls()), (2, 0));
        // Its reader waits for the end of both.
        let finished = AtomicBool::new(false);
        std::thread::scope(|t| {
            let reader = t.spawn(|| {
                let s = reg.read_begin(&b.interval);
                finished.store(true, Ordering::SeqCst);
                s
            });
            assert!(until_waiting_or_finished::<1>(&finished), "read_begin of a pending interval did not wait");
            reg.invalidate_range_end(i1);
            assert_eq!(reg.len(), 1, "applied only when the last invalidation ends");
            assert!(!finished.load(Ordering::SeqCst), "read_begin returned while an invalidation still runs");
            reg.invalidate_range_end(i2);
            let s = reader.join().unwrap();
            assert_eq!(reg.len(), 2);
            // Registered now: the next invalidation calls it, and the reader sees it.
            let i3 = reg.invalidate_range_start(pages(11, 1), Event::Unmap, true).unwrap();
            assert_eq!((a.calls(), b.calls()), (2, 1));
            assert!(reg.read_retry(&b.interval, s));
            reg.invalidate_range_end(i3);
        });
    });
}

/// The kernel brackets every change with start/end even when no notifier
/// overlaps. A notifier inserted inside such a bracket over the changing
/// range must not be able to complete a read that misses the change: its
/// `read_begin` must wait for the end, or its `read_retry` must fire.
#[test]
fn insert_during_an_uncounted_invalidation_cannot_miss_it() {
    watchdog::bounded("read_begin of an interval inserted during an invalidation", watchdog::BOUND, || {
        let x = Counter::new(pages(0, 8));
        let reg = NotifierRegistry::<VecStore, Watch<2>>::new();
        let inv = reg.invalidate_range_start(pages(0, 8), Event::Unmap, true).unwrap();
        let _rx = add(&reg, &x).unwrap();
        let finished = AtomicBool::new(false);
        std::thread::scope(|t| {
            let reader = t.spawn(|| {
                let s = reg.read_begin(&x.interval);
                finished.store(true, Ordering::SeqCst);
                s
            });
            let waiting = until_waiting_or_finished::<2>(&finished);
            // ... here the kernel changes the page table and frees frames ...
            reg.invalidate_range_end(inv);
            let s = reader.join().unwrap();
            assert!(
                waiting || reg.read_retry(&x.interval, s),
                "a read that began mid-invalidation was not told to retry"
            );
        });
    });
}

#[test]
fn remove_during_an_invalidation_waits_for_its_end() {
    watchdog::bounded("remove waiting for a running invalidation", watchdog::BOUND, || {
        let a = Counter::new(pages(0, 8));
        let b = Counter::new(pages(0, 8));
        let reg = NotifierRegistry::<VecStore, Watch<3>>::new();
        let ra = add(&reg, &a).unwrap();
        let rb = add(&reg, &b).unwrap();
        let inv = reg.invalidate_range_start(pages(2, 1), Event::Unmap, true).unwrap();
        assert_eq!(a.calls(), 1);
        let finished = AtomicBool::new(false);
        std::thread::scope(|t| {
            let remover = t.spawn(|| {
                ra.remove();
                a.removed.store(true, Ordering::SeqCst);
                finished.store(true, Ordering::SeqCst);
            });
            assert!(until_waiting_or_finished::<3>(&finished), "remove returned while an invalidation was running");
            assert!(!finished.load(Ordering::SeqCst));
            reg.invalidate_range_end(inv);
            remover.join().unwrap();
        });
        assert!(!a.interval.is_registered());
        assert_eq!(reg.len(), 1);
        // No callback after remove returned.
        let inv = reg.invalidate_range_start(pages(0, 8), Event::Unmap, true).unwrap();
        assert_eq!((a.calls(), b.calls()), (1, 2));
        reg.invalidate_range_end(inv);
        assert_eq!(a.late_calls.load(Ordering::SeqCst), 0);
        // Removing while idle is immediate, and it can be registered again.
        rb.remove();
        assert!(reg.is_empty());
        let ra = add(&reg, &a).unwrap();
        assert_eq!(reg.len(), 1);
        ra.remove();
        assert!(reg.is_empty());
    });
}

#[test]
fn removing_a_pending_insert_cancels_it() {
    watchdog::bounded("remove of a pending insert", watchdog::BOUND, || {
        let a = Counter::new(pages(0, 8));
        let b = Counter::new(pages(0, 8));
        let reg = NotifierRegistry::<VecStore, Watch<4>>::new();
        let _ra = add(&reg, &a).unwrap();
        let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
        let rb = add(&reg, &b).unwrap();
        // Does not wait: the insert never reached the index. (Removed from
        // another thread so a wrong wait fails the test instead of hanging it.)
        let finished = AtomicBool::new(false);
        std::thread::scope(|t| {
            let remover = t.spawn(|| {
                rb.remove();
                finished.store(true, Ordering::SeqCst);
            });
            let waited = until_waiting_or_finished::<4>(&finished);
            reg.invalidate_range_end(inv);
            remover.join().unwrap();
            assert!(!waited, "remove of a pending insert waited for the invalidation");
        });
        assert!(!b.interval.is_registered());
        assert_eq!(reg.len(), 1);
        let inv = reg.invalidate_range_start(pages(0, 8), Event::Unmap, true).unwrap();
        reg.invalidate_range_end(inv);
        assert_eq!((a.calls(), b.calls()), (2, 0));
    });
}

#[test]
fn no_callback_after_remove_returns_under_concurrent_invalidations() {
    watchdog::bounded("insert/remove rounds against a concurrent invalidator", watchdog::BOUND, || {
        let ns: Vec<Counter> = (0..4).map(|i| Counter::new(pages(i * 4, 8))).collect();
        let reg = Registry::new();
        let stop = AtomicBool::new(false);
        std::thread::scope(|t| {
            t.spawn(|| {
                let mut k = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let inv = reg.invalidate_range_start(pages(k % 20, 3), Event::Clear, true).unwrap();
                    std::hint::spin_loop();
                    reg.invalidate_range_end(inv);
                    k += 1;
                }
            });
            for round in 0..400 {
                let n = &ns[round % ns.len()];
                n.removed.store(false, Ordering::SeqCst);
                let r = add(&reg, n).unwrap();
                std::thread::yield_now();
                r.remove();
                n.removed.store(true, Ordering::SeqCst);
            }
            stop.store(true, Ordering::SeqCst);
        });
        assert!(reg.is_empty());
        for n in &ns {
            assert_eq!(n.late_calls.load(Ordering::SeqCst), 0, "callback after remove returned");
        }
        assert_eq!(reg.seq() % 2, 0);
    });
}

// ------------------------------------------------------------------ non-blockable, release

#[test]
fn non_blockable_invalidation_refused_by_a_callback() {
    let a = Counter::new(pages(0, 8));
    let r = Counter::refusing(pages(4, 8));
    let reg = Registry::new();
    let _ra = add(&reg, &a).unwrap();
    let _rr = add(&reg, &r).unwrap();
    let seq = reg.seq();
    assert_eq!(reg.invalidate_range_start(pages(0, 16), Event::Unmap, false).err(), Some(Error::WouldBlock));
    assert_eq!(reg.seq() % 2, 0, "sequence back to even after a refusal");
    assert_eq!(reg.seq(), seq + 2);
    assert_eq!(r.calls(), 0);

    // Not stuck: inserts apply at once, later invalidations work.
    let c = Counter::new(pages(100, 1));
    let _rc = add(&reg, &c).unwrap();
    assert_eq!(reg.len(), 3);
    // Non-blockable but only touching a (which agrees): fine.
    let inv = reg.invalidate_range_start(pages(0, 2), Event::Unmap, false).unwrap();
    assert_eq!(reg.seq() % 2, 1);
    reg.invalidate_range_end(inv);
    // Blockable: the refusing notifier takes it.
    let inv = reg.invalidate_range_start(pages(0, 16), Event::Unmap, true).unwrap();
    assert_eq!(r.calls(), 1);
    assert_eq!(r.last_seq.load(Ordering::SeqCst), inv.seq());
    reg.invalidate_range_end(inv);
    assert_eq!(reg.seq() % 2, 0);
}

#[test]
fn release_calls_every_notifier_then_refuses_inserts() {
    let a = Counter::new(pages(0, 1));
    let b = Counter::new(pages(0x7_ffff_fff0, 0x10)); // top of the lower half
    let c = Counter::new(VaRange::new::<L4>(0xffff_8000_0000_0000, PAGE).unwrap());
    let late = Counter::new(pages(5, 1));
    let reg = Registry::new();
    let regs: Vec<_> = [&a, &b, &c].into_iter().map(|n| add(&reg, n).unwrap()).collect();
    assert!(!reg.is_released());
    reg.release();
    assert!(reg.is_released());
    for n in [&a, &b, &c] {
        assert_eq!(n.calls(), 1);
        let inv = n.last().unwrap();
        assert_eq!(inv.event, Event::Release);
        assert!(inv.blockable);
        assert_eq!((inv.range.start(), inv.range.last()), (0, u64::MAX));
    }
    assert_eq!(reg.seq() % 2, 0);
    assert_eq!(add(&reg, &late).err(), Some(Error::Released));
    assert!(!late.interval.is_registered());
    // Drivers still unregister afterwards.
    for r in regs {
        r.remove();
    }
    assert!(reg.is_empty());
}

// ------------------------------------------------------------------ errors

#[test]
fn fixed_store_capacity() {
    let ns: Vec<Counter> = (0..4).map(|i| Counter::new(pages(i * 8, 8))).collect();
    let reg = NotifierRegistry::<FixedStore<2>>::new();
    let r0 = add(&reg, &ns[0]).unwrap();
    let r1 = add(&reg, &ns[1]).unwrap();
    assert_eq!(add(&reg, &ns[2]).err(), Some(Error::Capacity));
    assert!(!ns[2].interval.is_registered());
    assert_eq!(reg.len(), 2);
    r0.remove();
    let _r2 = add(&reg, &ns[2]).unwrap();
    assert_eq!(reg.len(), 2);
    // Pending inserts count against the capacity.
    r1.remove();
    let inv = reg.invalidate_range_start(pages(16, 1), Event::Unmap, true).unwrap();
    let _r3 = add(&reg, &ns[3]).unwrap();
    assert_eq!(add(&reg, &ns[0]).err(), Some(Error::Capacity));
    reg.invalidate_range_end(inv);
    assert_eq!(reg.len(), 2);
    let inv = reg.invalidate_range_start(pages(0, 32), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!(ns.iter().map(|n| n.calls()).collect::<Vec<_>>(), [0, 0, 2, 1]);
}

#[test]
fn double_insert_is_refused() {
    let a = Counter::new(pages(0, 8));
    let reg = Registry::new();
    let _ra = add(&reg, &a).unwrap();
    assert_eq!(add(&reg, &a).err(), Some(Error::Busy));
    assert_eq!(reg.len(), 1);
    // While pending, too.
    let b = Counter::new(pages(0, 8));
    let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    let _rb = add(&reg, &b).unwrap();
    assert_eq!(add(&reg, &b).err(), Some(Error::Busy));
    reg.invalidate_range_end(inv);
    assert_eq!(reg.len(), 2);
    // One registration, one callback each.
    let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!((a.calls(), b.calls()), (2, 1));
}

/// Removing a notifier that was never inserted, or removing it twice, can no
/// longer be written: only a `Registration` unregisters, and `remove` consumes
/// it. What is left: removing and dropping a registration both unregister.
#[test]
fn removing_an_unregistered_notifier() {
    let a = Counter::new(pages(0, 8));
    let b = Counter::new(pages(0, 8));
    let reg = Registry::new();
    let rb = add(&reg, &b).unwrap();
    {
        let _ra = add(&reg, &a).unwrap();
        assert_eq!(reg.len(), 2);
    }
    assert!(!a.interval.is_registered(), "dropping a registration unregisters");
    assert_eq!(reg.len(), 1);
    rb.remove();
    assert!(!b.interval.is_registered());
    assert!(reg.is_empty());
}

/// A notifier registered in one registry cannot be inserted into (or, since
/// only its `Registration` unregisters it, removed from) another: it stays
/// registered where it is, otherwise the driver frees it while the first
/// registry still calls it (and can never remove it from there).
#[test]
fn removing_from_the_wrong_registry_changes_nothing() {
    let a = Counter::new(pages(0, 8));
    let r1 = Registry::new();
    let r2 = Registry::new();
    let ra = add(&r1, &a).unwrap();
    assert_eq!(add(&r2, &a).err(), Some(Error::Busy));
    assert!(a.interval.is_registered());
    let inv = r1.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    r1.invalidate_range_end(inv);
    assert_eq!(a.calls(), 1);
    ra.remove();
    assert!(r1.is_empty());
}

// ------------------------------------------------------------------ the overlap index

#[test]
fn ten_thousand_intervals_only_the_overlapping_ones_are_called() {
    // Notifier i covers pages [4i, 4i + 2); one more covers everything from 0.
    let ns: Vec<Counter> = (0..10_000).map(|i| Counter::new(pages(4 * i, 2))).collect();
    let big = Counter::new(pages(0, 40_000));
    let reg = Registry::new();
    let _regs: Vec<_> = ns.iter().map(|n| add(&reg, n).unwrap()).collect();
    let rbig = add(&reg, &big).unwrap();
    assert_eq!(reg.len(), 10_001);
    let total = || ns.iter().map(|n| n.calls()).sum::<usize>();

    // Pages 20001..=20004: the tail of #5000 and the head of #5001.
    let inv = reg.invalidate_range_start(pages(20_001, 4), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!(total(), 2);
    assert_eq!((ns[5000].calls(), ns[5001].calls(), big.calls()), (1, 1, 1));

    // A gap between two notifiers: only the big one.
    let inv = reg.invalidate_range_start(pages(39_998, 2), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!((total(), big.calls()), (2, 2));

    // The first and the last notifier.
    let inv = reg.invalidate_range_start(pages(0, 1), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    let inv = reg.invalidate_range_start(pages(39_997, 1), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!((total(), ns[0].calls(), ns[9999].calls(), big.calls()), (4, 1, 1, 4));

    // Past everything: nothing, and the sequence stays.
    let seq = reg.seq();
    let inv = reg.invalidate_range_start(pages(40_000, 100), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!((total(), big.calls(), reg.seq()), (4, 4, seq));

    // A 100-page range: 25 small ones.
    let inv = reg.invalidate_range_start(pages(1000, 100), Event::Unmap, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!(total(), 29);
    assert!(ns[250..275].iter().all(|n| n.calls() == 1));
    assert_eq!((ns[249].calls(), ns[275].calls()), (0, 0));

    // After removing the big one, a gap query calls nobody.
    rbig.remove();
    let inv = reg.invalidate_range_start(pages(39_998, 2), Event::Unmap, true).unwrap();
    assert_eq!(inv.seq(), 0);
    reg.invalidate_range_end(inv);
    assert_eq!((total(), big.calls()), (29, 5));
}

fn interval_pages() -> impl Strategy<Value = (u64, u64)> {
    let len = prop_oneof![8 => 1u64..4, 4 => 1u64..64, 1 => 1u64..3000];
    (0u64..3000, len)
}

fn query_pages() -> impl Strategy<Value = (u64, u64)> {
    let len = prop_oneof![6 => 1u64..8, 3 => 1u64..200, 1 => 1u64..4000];
    (0u64..3200, len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn overlap_lookup_matches_brute_force(
        intervals in prop::collection::vec(interval_pages(), 1..2000),
        removals in prop::collection::vec(any::<prop::sample::Index>(), 0..64),
        queries in prop::collection::vec(query_pages(), 1..12),
    ) {
        let ns: Vec<Counter> = intervals.iter().map(|&(p, n)| Counter::new(pages(p, n))).collect();
        let reg = Registry::new();
        let mut regs: Vec<_> = ns.iter().map(|n| Some(add(&reg, n).unwrap())).collect();
        let mut live = vec![true; ns.len()];
        let mut expected = vec![0usize; ns.len()];
        let run = |reg: &Registry, live: &[bool], expected: &mut [usize]| -> Result<(), TestCaseError> {
            for &(p, n) in &queries {
                let q = pages(p, n);
                let inv = reg.invalidate_range_start(q, Event::Unmap, true).unwrap();
                let mut hits = 0;
                for (i, m) in ns.iter().enumerate() {
                    if live[i] && m.interval.range().overlaps(&q) {
                        expected[i] += 1;
                        hits += 1;
                        prop_assert_eq!(m.last_seq.load(Ordering::SeqCst), inv.seq());
                    }
                }
                prop_assert_eq!(inv.seq() != 0, hits > 0, "query {:?}", q);
                reg.invalidate_range_end(inv);
                for (i, m) in ns.iter().enumerate() {
                    prop_assert_eq!(m.calls(), expected[i], "notifier {} {:?}, query {:?}", i, m.interval.range(), q);
                }
            }
            Ok(())
        };
        prop_assert_eq!(reg.check_invariants(), Ok(()));
        run(&reg, &live, &mut expected)?;
        for ix in &removals {
            let i = ix.index(ns.len());
            if live[i] {
                regs[i].take().expect("live notifiers are registered").remove();
                live[i] = false;
            }
        }
        prop_assert_eq!(reg.check_invariants(), Ok(()));
        prop_assert_eq!(reg.len(), live.iter().filter(|l| **l).count());
        run(&reg, &live, &mut expected)?;
    }
}
