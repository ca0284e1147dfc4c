//! The invalidation path never touches the heap, and the retry budget turns
//! an invalidation storm into `Busy`, never a hang.
//!
//! A `#[global_allocator]` wrapper around `System` counts, per thread, every
//! heap operation (alloc, realloc, dealloc) made while that thread's "forbid"
//! flag is set. The tests set the flag around
//! `NotifierRegistry::invalidate_range_start` / `invalidate_range_end` called
//! directly on a model kernel's registry (the model's own mutations allocate,
//! so they stay outside), with populated mirrors whose devices do not
//! allocate: what runs under the flag is exactly the registry and the
//! mirrors' callbacks (clear, device invalidate + flush, prune).

mod common;

use common::*;
use core::pin::pin;
use hmm_core::{AddressSpace, DeviceOps, Error, Event, Mirror, MirrorConfig, VaRange};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, SimFile};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// The guarding allocator
// ---------------------------------------------------------------------------

struct Guarded;

thread_local! {
    static FORBID: Cell<bool> = const { Cell::new(false) };
    static HEAP_OPS: Cell<u64> = const { Cell::new(0) };
    static LAST_SIZE: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator may run while thread-locals are torn down.
    if FORBID.try_with(Cell::get).unwrap_or(false) {
        let _ = HEAP_OPS.try_with(|c| c.set(c.get() + 1));
        let _ = LAST_SIZE.try_with(|c| c.set(size));
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping
// touches only const-initialised thread-locals (no allocation, no panic).
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Guarded = Guarded;

/// Runs `f` with heap use forbidden on this thread; returns its result and
/// the number of heap operations it made.
fn forbidden<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = HEAP_OPS.with(Cell::get);
    FORBID.with(|c| c.set(true));
    let r = f();
    FORBID.with(|c| c.set(false));
    (r, HEAP_OPS.with(Cell::get) - before)
}

#[test]
fn the_guard_sees_allocations() {
    let (v, ops) = forbidden(|| vec![1u8; 10]);
    assert!(ops >= 1, "the guard must count a Vec allocation");
    assert_eq!(LAST_SIZE.with(Cell::get), 10);
    let ((), ops) = forbidden(|| drop(v));
    assert_eq!(ops, 1, "and a free");
    let (x, ops) = forbidden(|| [1u64; 64].iter().sum::<u64>());
    assert_eq!((x, ops), (64, 0));
}

// ---------------------------------------------------------------------------
// A device that never allocates
// ---------------------------------------------------------------------------

/// Counts its calls in atomics; `update` can be held (spinning) to keep the
/// mirror's update lock taken.
#[derive(Default)]
struct QuietDevice {
    updates: AtomicU64,
    invalidates: AtomicU64,
    flushes: AtomicU64,
    hold: AtomicBool,
    holding: AtomicBool,
}

impl DeviceOps for QuietDevice {
    fn update(&self, _range: VaRange) -> Result<(), i32> {
        self.updates.fetch_add(1, Ordering::Relaxed);
        while self.hold.load(Ordering::Acquire) {
            self.holding.store(true, Ordering::Release);
            std::hint::spin_loop();
        }
        self.holding.store(false, Ordering::Release);
        Ok(())
    }
    fn invalidate(&self, _range: VaRange, _event: Event) {
        self.invalidates.fetch_add(1, Ordering::Relaxed);
    }
    fn flush(&self, _range: VaRange) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }
}

type QMirror<'s> = Mirror<'s, ModelSpace, QuietDevice, CountingAllocator>;

fn quiet<'s>(space: &'s ModelSpace, alloc: &'s CountingAllocator, r: VaRange, owner: Option<u16>) -> QMirror<'s> {
    let config = MirrorConfig { owner, ..MirrorConfig::default() };
    Mirror::new(space, alloc, QuietDevice::default(), r, config).expect("mirror")
}

const ANON: u64 = 0x1000_0000;
const THP: u64 = 0x4000_0000 - 2 * MIB;
const HUGETLB: u64 = 0x80_0000_0000;
const SHARED: u64 = 0x2000_0000;

/// A model kernel with four populated regions: 4 KiB anonymous (crossing a
/// 2 MiB boundary), THP (two leaves around a 1 GiB boundary), 2 MiB hugetlb
/// at a 512 GiB boundary, a shared file.
fn populated() -> (Arc<CountingAllocator>, ModelSpace, Vec<VaRange>) {
    let (alloc, space) = kernel(64 * MIB);
    let file = SimFile::new(&alloc, 32);
    let regions = vec![
        space.map(ANON + 2 * MIB - 64 * PAGE, 128 * PAGE, RW, RegionKind::PrivateAnon).unwrap(),
        space.map(THP, 4 * MIB, RW, RegionKind::Thp).unwrap(),
        space.map(HUGETLB, 2 * MIB, RW, RegionKind::HugeTlb2M).unwrap(),
        space.map(SHARED, 32 * PAGE, RW, RegionKind::SharedFile { file, offset: 0 }).unwrap(),
    ];
    (alloc, space, regions)
}

/// Owner ids of the three mirrors of the invalidation test.
const OWNERS: [Option<u16>; 3] = [None, Some(7), Some(9)];

fn fault_all(m: &QMirror<'_>, regions: &[VaRange], write: bool) {
    for r in regions {
        m.fault(*r, write).unwrap();
    }
}

fn mirrored(m: &QMirror<'_>, r: VaRange) -> usize {
    (0..r.pages(12)).filter(|i| m.translate(r.start() + i * PAGE).is_some()).count()
}

#[test]
fn invalidations_and_mirror_callbacks_never_allocate() {
    let (alloc, space, regions) = populated();
    let reg = space.notifiers();
    let mut rounds = 0;
    {
        let whole = pin!(quiet(&space, &alloc, user(), OWNERS[0]));
        let window = pin!(quiet(&space, &alloc, range(THP, 4 * MIB), OWNERS[1]));
        let other = pin!(quiet(&space, &alloc, user(), OWNERS[2]));
        for m in [whole.as_ref(), window.as_ref(), other.as_ref()] {
            m.register().unwrap();
        }
        let all = [&*whole, &*window, &*other];
        let refill = || {
            fault_all(&whole, &regions, true);
            fault_all(&other, &regions, false);
            window.fault(regions[1], true).unwrap();
        };
        let events = [
            Event::Unmap,
            Event::Clear,
            Event::ProtectionVma,
            Event::ProtectionPage,
            Event::SoftDirty,
            Event::Migrate { owner: 7 },
            Event::Exclusive { owner: 9 },
            Event::Migrate { owner: 3 },
        ];
        // Ranges: each region whole, a piece of one (a split 2 MiB directory
        // of the mirror), one crossing two regions, everything.
        let mut ranges = regions.clone();
        ranges.push(range(THP + 2 * MIB - 8 * PAGE, 16 * PAGE));
        ranges.push(range(ANON, 0x1000_0000 + 64 * PAGE));
        ranges.push(range(0, USER_END));
        for &event in &events {
            for &r in &ranges {
                for blockable in [true, false] {
                    refill();
                    let frames: Vec<usize> = all.iter().map(|m| m.table_frames()).collect();
                    let stats: Vec<_> = all.iter().map(|m| m.stats()).collect();
                    let seq = reg.seq();
                    let (ok, ops) = forbidden(|| {
                        let inv = reg.invalidate_range_start(r, event, blockable)?;
                        reg.invalidate_range_end(inv);
                        Ok::<_, Error>(())
                    });
                    assert_eq!(ops, 0, "{event:?} {r:x?} blockable={blockable}: {ops} heap operations");
                    ok.unwrap();
                    assert!(reg.seq() > seq && reg.seq() % 2 == 0);
                    // The callbacks did their work: nothing left mirrored in
                    // the range and emptied directories freed, except in the
                    // mirror that started the migration / exclusive access.
                    for (((m, before), stats), owner) in all.iter().zip(&frames).zip(&stats).zip(OWNERS) {
                        let skipped = matches!(event,
                            Event::Migrate { owner: o } | Event::Exclusive { owner: o } if Some(o) == owner);
                        if skipped {
                            assert_eq!(m.stats(), *stats, "{event:?}: its own event must be skipped");
                        } else {
                            let left: usize =
                                regions.iter().filter_map(|g| g.intersect(&r)).map(|x| mirrored(m, x)).sum();
                            assert_eq!(left, 0, "{event:?} {r:x?}: entries survived");
                            assert!(m.table_frames() <= *before);
                        }
                    }
                    rounds += 1;
                }
            }
        }
        // Nested and interleaved invalidations.
        refill();
        let ((), ops) = forbidden(|| {
            let a = reg.invalidate_range_start(regions[0], Event::Unmap, true).unwrap();
            let b = reg.invalidate_range_start(regions[1], Event::Clear, false).unwrap();
            let c = reg.invalidate_range_start(range(0, USER_END), Event::SoftDirty, true).unwrap();
            reg.invalidate_range_end(b);
            reg.invalidate_range_end(a);
            reg.invalidate_range_end(c);
        });
        assert_eq!(ops, 0, "nested invalidations: {ops} heap operations");
        // A range no notifier covers (only the window mirror is left).
        whole.unregister().unwrap();
        other.unregister().unwrap();
        let ((), ops) = forbidden(|| {
            let inv = reg.invalidate_range_start(regions[0], Event::Unmap, true).unwrap();
            assert_eq!(inv.seq(), 0, "nothing overlaps");
            reg.invalidate_range_end(inv);
        });
        assert_eq!(ops, 0);
        // Release: every mirror gets a Release of everything.
        window.fault(regions[1], true).unwrap();
        let ((), ops) = forbidden(|| reg.release());
        assert_eq!(ops, 0, "release: {ops} heap operations");
        assert_eq!(mirrored(&window, regions[1]), 0);
        assert_eq!(window.table_frames(), 1, "release pruned every directory");
        for m in all {
            let d = m.device();
            assert_eq!(d.invalidates.load(Ordering::Relaxed), d.flushes.load(Ordering::Relaxed));
        }
    }
    println!("allocation-free invalidation rounds: {rounds} (+ nested, non-overlapping, release)");
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn refused_non_blockable_invalidation_never_allocates() {
    watchdog::bounded("a fault held inside its device update, and its release", watchdog::BOUND, || {
        let (alloc, space, regions) = populated();
        let reg = space.notifiers();
        {
            let m = pin!(quiet(&space, &alloc, user(), None));
            m.as_ref().register().unwrap();
            fault_all(&m, &regions, true);
            let m = &*m;
            std::thread::scope(|s| {
                m.device().hold.store(true, Ordering::Release);
                let t = s.spawn(|| m.fault(regions[0], true));
                // The fault now holds the mirror's update lock inside `update`.
                while !m.device().holding.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                let seq = reg.seq();
                let (r, ops) = forbidden(|| reg.invalidate_range_start(regions[1], Event::Unmap, false).map(|_| ()));
                assert_eq!(r, Err(Error::WouldBlock));
                assert_eq!(ops, 0, "refusal path: {ops} heap operations");
                assert!(reg.seq() > seq && reg.seq() % 2 == 0, "the refused invalidation ended itself");
                m.device().hold.store(false, Ordering::Release);
                t.join().unwrap().unwrap();
            });
            assert_eq!(reg.len(), 1);
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

/// A removal postponed by a running invalidation is applied by that
/// invalidation's end, which must not allocate; the remove then returns Ok
/// and the mirror is gone for good: a later fault is refused and a later
/// unmap cannot leave a stale entry behind.
#[test]
fn removal_postponed_by_an_invalidation() {
    watchdog::bounded("an unregister postponed by a running invalidation", watchdog::BOUND, || {
        let (alloc, space, regions) = populated();
        let reg = space.notifiers();
        {
            let m = pin!(quiet(&space, &alloc, user(), None));
            m.as_ref().register().unwrap();
            fault_all(&m, &regions, true);
            let m = &*m;
            let (inv, ops) = forbidden(|| reg.invalidate_range_start(regions[0], Event::Clear, true).unwrap());
            assert_eq!(ops, 0);
            let removed = std::thread::scope(|s| {
                let t = s.spawn(|| m.unregister());
                // Give the remove time to find the invalidation running and
                // postpone itself (if it comes later, it simply removes).
                std::thread::sleep(std::time::Duration::from_millis(50));
                let ((), ops) = forbidden(|| reg.invalidate_range_end(inv));
                assert_eq!(ops, 0, "end applying a postponed removal: {ops} heap operations");
                t.join().unwrap()
            });
            assert_eq!(reg.len(), 0);
            // Whatever unregister said, the mirror must be dead now.
            let late = m.fault(regions[0], true);
            space.unmap(regions[0]).unwrap();
            let stale = mirrored(m, regions[0]);
            let registered = hmm_core::Notifier::interval(m).is_registered();
            assert_eq!(
                (removed, registered, late, stale, m.table_frames()),
                (Ok(()), false, Err(Error::Unregistered), 0, 0),
                "(unregister, still marked registered, a later fault, entries left after an unmap, table frames)"
            );
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

/// `invalidate_range_end` applies postponed inserts. With the `VecStore` the
/// model kernel uses, that insert grows the entry vector when it is full:
/// a heap allocation inside the invalidation path.
#[test]
fn applying_a_deferred_insert_never_allocates() {
    let mut worst = 0;
    for registered in 0..10 {
        let (alloc, space, regions) = populated();
        let reg = space.notifiers();
        {
            let mirrors: Vec<_> = (0..registered).map(|_| Box::pin(quiet(&space, &alloc, user(), None))).collect();
            for m in &mirrors {
                m.as_ref().register().unwrap();
                fault_all(m, &regions, false);
            }
            let late = Box::pin(quiet(&space, &alloc, user(), None));
            let inv = reg.invalidate_range_start(regions[0], Event::Clear, true).unwrap();
            // Deferred: it takes effect when the invalidation ends.
            late.as_ref().register().unwrap();
            let ((), ops) = forbidden(|| reg.invalidate_range_end(inv));
            worst = worst.max(ops);
            assert_eq!(reg.len(), registered + 1);
            drop(late);
            drop(mirrors);
            assert_eq!(ops, 0, "{registered} registered + 1 deferred insert: {ops} heap operations in end");
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    }
    println!("worst heap operations in invalidate_range_end: {worst}");
}

// ---------------------------------------------------------------------------
// Retry budget
// ---------------------------------------------------------------------------

/// A free-running thread keeps the faulting range under invalidation almost
/// all the time (start, a few microseconds, end, start again; its start/end
/// checked to never allocate) against faults with budgets 0, 1, 4, 16 and
/// 64: every fault either succeeds within its budget or returns `Busy`
/// having retried exactly `max_retries + 1` times; none hangs; once the
/// invalidator stops, every fault succeeds. How often the two threads
/// actually collide is up to the scheduler (see the lockstep test for a
/// collision on every attempt).
#[test]
fn adversarial_invalidator_bounded_by_the_retry_budget() {
    watchdog::bounded("faults against a back-to-back invalidator", watchdog::BOUND, || {
        let (alloc, space) = kernel(16 * MIB);
        let buf = space.map(ANON, 32 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        let budgets = [0u32, 1, 4, 16, 64];
        let reg = space.notifiers();
        let mut report = Vec::new();
        {
            let mirrors: Vec<_> = budgets
                .iter()
                .map(|&b| {
                    let config = MirrorConfig { max_retries: b, ..MirrorConfig::default() };
                    Box::pin(Mirror::new(&space, &*alloc, QuietDevice::default(), user(), config).unwrap())
                })
                .collect();
            for m in &mirrors {
                m.as_ref().register().unwrap();
            }
            let stop = AtomicBool::new(false);
            let storms = AtomicU64::new(0);
            std::thread::scope(|s| {
                let invalidator = s.spawn(|| {
                    let mut heap = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let (inv, ops) = forbidden(|| reg.invalidate_range_start(buf, Event::Clear, true).unwrap());
                        let t0 = std::time::Instant::now();
                        while t0.elapsed() < std::time::Duration::from_micros(20) {
                            std::hint::spin_loop();
                        }
                        let ((), ops2) = forbidden(|| reg.invalidate_range_end(inv));
                        heap += ops + ops2;
                        storms.fetch_add(1, Ordering::Relaxed);
                    }
                    heap
                });
                while storms.load(Ordering::Relaxed) < 10 {
                    std::thread::yield_now();
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
                for (m, &budget) in mirrors.iter().zip(&budgets) {
                    let (mut worst, mut busy, mut ok) = (0, 0, 0);
                    let mut round = 0;
                    // At least 100 faults; with a budget of 0, go on (for at
                    // most a few seconds) until one collided.
                    while round < 100 || (budget == 0 && busy == 0 && std::time::Instant::now() < deadline) {
                        let before = m.stats().retries;
                        let r = m.fault(buf, round % 2 == 0);
                        let took = m.stats().retries - before;
                        worst = worst.max(took);
                        match r {
                            Ok(()) => {
                                // Retries the fault's own progress caused (COW breaks
                                // invalidate the mirror too) are free, one per page.
                                assert!(took <= budget as u64 + 32, "budget {budget}: Ok after {took} retries");
                                ok += 1;
                            }
                            Err(Error::Busy) => {
                                assert!(
                                    (budget as u64 + 1..=budget as u64 + 33).contains(&took),
                                    "budget {budget}: Busy after {took} retries"
                                );
                                busy += 1;
                            }
                            Err(e) => panic!("budget {budget}: unexpected {e:?}"),
                        }
                        round += 1;
                    }
                    report.push((budget, worst, ok, busy));
                }
                stop.store(true, Ordering::Relaxed);
                let heap = invalidator.join().unwrap();
                assert_eq!(heap, 0, "the invalidator's start/end made {heap} heap operations");
            });
            for m in &mirrors {
                m.fault(buf, true).unwrap();
                assert_eq!(mirrored(m, buf), 32, "once the invalidator stopped the fault succeeds");
            }
            println!("invalidations by the adversary: {}", storms.load(Ordering::Relaxed));
        }
        for (budget, worst, ok, busy) in &report {
            println!("max_retries {budget:>2}: worst retries seen {worst:>2}, {ok} ok, {busy} busy");
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

/// An invalidator thread that, while armed, keeps at least one invalidation
/// of the faulting range running at every moment (it starts the next before
/// it ends the last): each fault returns `Busy` after exactly
/// `max_retries + 1` collisions, for budgets 0 to 64, and succeeds at once
/// when the invalidator stops. The invalidator's start/end never allocate.
#[test]
fn overlapping_storm_exhausts_every_budget_exactly() {
    watchdog::bounded("faults against an overlapping invalidation storm", watchdog::BOUND, || {
        let (alloc, space) = kernel(16 * MIB);
        let buf = space.map(ANON, 32 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        let reg = space.notifiers();
        let (armed, idle, stop) = (AtomicBool::new(false), AtomicBool::new(true), AtomicBool::new(false));
        let mut worst = 0;
        std::thread::scope(|s| {
            let invalidator = s.spawn(|| {
                let mut heap = 0;
                let mut running = None;
                loop {
                    if !armed.load(Ordering::Acquire) {
                        if let Some(inv) = running.take() {
                            let ((), ops) = forbidden(|| reg.invalidate_range_end(inv));
                            heap += ops;
                        }
                        idle.store(true, Ordering::Release);
                        if stop.load(Ordering::Acquire) {
                            return heap;
                        }
                        std::hint::spin_loop();
                        continue;
                    }
                    let (next, ops) = forbidden(|| reg.invalidate_range_start(buf, Event::Clear, true).unwrap());
                    heap += ops;
                    if let Some(inv) = running.replace(next) {
                        let ((), ops) = forbidden(|| reg.invalidate_range_end(inv));
                        heap += ops;
                    }
                    // Only now is an invalidation surely running.
                    idle.store(false, Ordering::Release);
                }
            });
            let settle = |on: bool| {
                armed.store(on, Ordering::Release);
                while idle.load(Ordering::Acquire) == on {
                    std::hint::spin_loop();
                }
            };
            for budget in [0u32, 1, 4, 16, 64] {
                let config = MirrorConfig { max_retries: budget, ..MirrorConfig::default() };
                let m = pin!(Mirror::new(&space, &*alloc, QuietDevice::default(), user(), config).unwrap());
                m.as_ref().register().unwrap();
                settle(true);
                for write in [false, true] {
                    let before = m.stats().retries;
                    assert_eq!(m.fault(buf, write), Err(Error::Busy), "budget {budget}");
                    let took = m.stats().retries - before;
                    assert_eq!(took, budget as u64 + 1, "budget {budget}: retries before Busy");
                    worst = worst.max(took);
                    assert_eq!(m.translate(buf.start()), None, "nothing committed");
                }
                settle(false);
                let before = m.stats().retries;
                m.fault(buf, true).unwrap();
                assert_eq!(m.stats().retries, before, "no invalidation, no retry");
                assert!(m.translate(buf.last() & !(PAGE - 1)).is_some());
            }
            stop.store(true, Ordering::Release);
            assert_eq!(invalidator.join().unwrap(), 0, "the invalidator's start/end touched the heap");
        });
        println!("overlapping storm: worst retries seen {worst} (budget 64 + 1)");
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

/// With nobody else touching the address space, a device write fault over
/// 130 pages whose odd pages map the zero page and even pages are private:
/// every zero page needs a copy-on-write, each copy-on-write invalidates the
/// mirror's own interval, and `range_fault` returns `Busy` after each run it
/// faulted. The retry count is kept across all batches of one fault, so 65
/// self-inflicted collisions exhaust the default budget of 64 and the fault
/// fails with `Busy` although no concurrent invalidation ever happened.
#[test]
fn uncontended_fault_does_not_exhaust_the_retry_budget() {
    let (alloc, space) = kernel(16 * MIB);
    let n = 130;
    space.map(ANON, n * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for i in 0..n {
        if i % 2 == 0 {
            space.write_bytes(ANON + i * PAGE, b"x").unwrap();
        } else {
            space.read_bytes(ANON + i * PAGE, &mut [0u8; 1]).unwrap();
        }
    }
    {
        let m = pin!(quiet(&space, &alloc, user(), None));
        m.as_ref().register().unwrap();
        let r = m.fault(range(ANON, n * PAGE), true);
        let s = m.stats();
        println!("uncontended write fault of {n} pages: {r:?}, {s:?}");
        assert_eq!(r, Ok(()), "no concurrent invalidation, yet the fault gave up after {} retries", s.retries);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}
