//! Edges of the fault / snapshot / retry / registration protocol that
//! mutation testing (cargo-mutants over src/fault.rs, src/mirror.rs,
//! src/notifier/registry.rs; `cargo xtask verify --long`) found untested:
//! each test asserts an exact outcome, so that the mutants named in its doc
//! comment fail it.
//!
//! Most tests run on [`TestSpace`], a tiny hand-made kernel: real x86_64
//! 4-level tables in the test kit's simulated memory, a list of regions, a
//! notifier registry, and hooks that let a test make the kernel invalidate
//! from inside `read_lock`, `region` or `handle_fault`. That makes
//! collisions deterministic (no threads), and lets a test write entries a
//! real kernel would not hand out (kernel-only leaves, malformed entries,
//! leaves at the very top of the upper half). The registry tests use a
//! [`Waiter`] that runs, in place of waiting, what another thread would do
//! meanwhile: postponed removals become single-threaded and deterministic.

mod common;

use common::{kernel, range, MIB, PAGE, RW};
use core::ops::ControlFlow;
use core::pin::pin;
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PteFormat, PteView, SpecialEntry};
use hmm_core::notifier::{FixedStore, Waiter};
use hmm_core::pt::{Pfn, Span};
use hmm_core::{
    range_fault, AddressSpace, DeviceOps, Error, Event, FaultStats, FrameAllocator, Interval, InvalidateRange, Mirror,
    MirrorConfig, Notifier, NotifierRegistry, RangeFault, Region, RegionFlags, VaRange,
};
use hmm_testkit::{CountingAllocator, RegionKind, SimPhys};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

type L4 = X86_64Level4;

/// A hook run by the kernel on `read_lock` or `region` (with the address).
type Hook = Arc<dyn Fn(&TestSpace, u64) + Send + Sync>;
/// A replacement fault handler.
type FaultHook = Arc<dyn Fn(&TestSpace, VaRange, bool) -> hmm_core::Result<()> + Send + Sync>;

/// Hooks stop misbehaving after this many calls, so a mutant that loops
/// forever fails the test's assertions instead of hanging it.
const RUNAWAY: u64 = 1_000;

/// A 4 KiB leaf's flags.
fn leaf(write: bool, user: bool) -> LeafFlags {
    let mut f = LeafFlags::READ | LeafFlags::EXEC | LeafFlags::ACCESSED;
    f.set(LeafFlags::WRITE, write);
    f.set(LeafFlags::USER, user);
    f
}

const DIR: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::EXEC);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A minimal kernel: real 4-level tables, regions, a registry, hooks.
struct TestSpace {
    alloc: Arc<CountingAllocator>,
    root: u64,
    /// Table frames below the root and data frames, freed on drop.
    frames: Mutex<Vec<u64>>,
    regions: Mutex<Vec<Region>>,
    notifiers: NotifierRegistry<FixedStore<4>, StepWait>,
    on_read_lock: Mutex<Option<Hook>>,
    on_fault: Mutex<Option<FaultHook>>,
    read_locks: AtomicU64,
    region_calls: AtomicU64,
    fault_calls: AtomicU64,
}

/// The "read lock" of a [`TestSpace`]: tables are only freed on drop.
struct Guard<'a>(PhantomData<&'a TestSpace>);

impl TestSpace {
    fn new(alloc: &Arc<CountingAllocator>) -> Self {
        let root = alloc.alloc_frame().expect("root");
        alloc.phys().zero(root, PAGE);
        Self {
            alloc: alloc.clone(),
            root,
            frames: Mutex::default(),
            regions: Mutex::default(),
            notifiers: NotifierRegistry::new(),
            on_read_lock: Mutex::default(),
            on_fault: Mutex::default(),
            read_locks: AtomicU64::new(0),
            region_calls: AtomicU64::new(0),
            fault_calls: AtomicU64::new(0),
        }
    }

    fn sim(&self) -> &SimPhys {
        self.alloc.phys()
    }

    fn add_region(&self, r: VaRange, flags: RegionFlags) {
        lock(&self.regions).push(Region { range: r, flags });
    }

    fn set_read_lock_hook(&self, h: Option<Hook>) {
        *lock(&self.on_read_lock) = h;
    }

    fn set_fault_hook(&self, h: Option<FaultHook>) {
        *lock(&self.on_fault) = h;
    }

    fn new_frame(&self) -> u64 {
        let f = self.alloc.alloc_frame().expect("test memory");
        self.sim().zero(f, PAGE);
        lock(&self.frames).push(f);
        f
    }

    /// The entry of `va` at `level`, creating directories above it.
    fn slot(&self, va: u64, level: usize) -> &std::sync::atomic::AtomicU64 {
        let mut table = self.root;
        for l in (level + 1..4).rev() {
            let entry = self.sim().word(table + ((va >> (12 + 9 * l)) & 511) * 8);
            table = match L4::decode(entry.load(Ordering::Acquire), l) {
                PteView::Table { frame, .. } => frame,
                PteView::Absent => {
                    let frame = self.new_frame();
                    let raw = L4::encode(&PteView::Table { frame, flags: DIR }, l).unwrap();
                    entry.store(raw, Ordering::Release);
                    frame
                }
                other => panic!("{other:?} in the way of {va:#x} at level {l}"),
            };
        }
        self.sim().word(table + ((va >> (12 + 9 * level)) & 511) * 8)
    }

    /// Maps the 4 KiB page at `va` to `frame`.
    fn map(&self, va: u64, frame: u64, write: bool, user: bool) {
        let raw = L4::encode(&PteView::Leaf { frame, flags: leaf(write, user) }, 0).unwrap();
        self.slot(va, 0).store(raw, Ordering::Release);
    }

    /// Maps `va` to a fresh frame; returns it.
    fn map_new(&self, va: u64, write: bool) -> u64 {
        let f = self.new_frame();
        self.map(va, f, write, true);
        f
    }

    /// Stores a raw entry at `level` (the test vouches for what it decodes to).
    fn set_raw(&self, va: u64, level: usize, raw: u64) {
        self.slot(va, level).store(raw, Ordering::Release);
    }

    /// The 4 KiB leaf at `va`, if any (tables are never created by this).
    fn leaf_at(&self, va: u64) -> Option<(u64, bool)> {
        let mut table = self.root;
        for l in (0..4).rev() {
            let raw = self.sim().word(table + ((va >> (12 + 9 * l)) & 511) * 8).load(Ordering::Acquire);
            match L4::decode(raw, l) {
                PteView::Table { frame, .. } if l > 0 => table = frame,
                PteView::Leaf { frame, flags } if l == 0 => return Some((frame, flags.contains(LeafFlags::WRITE))),
                _ => return None,
            }
        }
        None
    }

    /// Unmaps the page at `va`, bracketed by an invalidation as the
    /// `AddressSpace` contract asks.
    fn zap(&self, va: u64, event: Event) {
        let inv = self.notifiers.invalidate_range_start(VaRange::new::<L4>(va, PAGE).unwrap(), event, true).unwrap();
        self.slot(va, 0).store(0, Ordering::Release);
        self.notifiers.invalidate_range_end(inv);
    }

    /// An invalidation of `r` that changes no entry (a protection change
    /// of pages that happen to be absent, say).
    fn invalidate(&self, r: VaRange, event: Event) {
        let inv = self.notifiers.invalidate_range_start(r, event, true).unwrap();
        self.notifiers.invalidate_range_end(inv);
    }

    /// The default fault handler: a fresh frame for every absent page,
    /// upgrade in place for a write to a read-only one.
    fn default_fault(&self, r: VaRange, write: bool) -> hmm_core::Result<()> {
        for va in pages(r) {
            match self.leaf_at(va) {
                None => {
                    self.map_new(va, write);
                }
                Some((frame, false)) if write => self.map(va, frame, true, true),
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn snapshot(&self, r: VaRange) -> Vec<Pfn> {
        let mut out = vec![Pfn(0xdead); r.pages(12) as usize];
        // SAFETY: `root` is live for the lifetime of `self`; tables are freed
        // only on drop.
        unsafe { hmm_core::pt::snapshot::<L4, SimPhys>(self.sim(), self.root, r, &mut out) }.unwrap();
        out
    }

    fn walk(&self, r: VaRange) -> Vec<(Span, PteView)> {
        let mut seen = Vec::new();
        let mut v = |span: Span, e: PteView| -> ControlFlow<()> {
            seen.push((span, e));
            ControlFlow::Continue(())
        };
        // SAFETY: as in `snapshot`.
        let flow = unsafe { hmm_core::pt::walk::<L4, SimPhys, _>(self.sim(), self.root, r, &mut v) }.unwrap();
        assert_eq!(flow, ControlFlow::Continue(()));
        seen
    }
}

impl Drop for TestSpace {
    fn drop(&mut self) {
        if !self.notifiers.is_released() {
            self.notifiers.release();
        }
        for f in lock(&self.frames).drain(..).chain([self.root]) {
            // SAFETY: every frame came from `alloc` and nothing uses it any more.
            unsafe { self.alloc.free_frame(f) };
        }
    }
}

// SAFETY: 1. `root` is allocated in `new` and freed in `drop`. 2. No table
// frame is freed before `drop`. 3. Every removal of a translation (`zap`)
// is bracketed by `invalidate_range_start`/`end`, and frames are freed only
// on drop. 4. Entries are written with atomic stores.
unsafe impl AddressSpace for TestSpace {
    type Format = L4;
    type Phys = SimPhys;
    type Store = FixedStore<4>;
    type Wait = StepWait;
    type ReadGuard<'a> = Guard<'a>;

    fn phys(&self) -> &SimPhys {
        self.sim()
    }

    fn root(&self) -> u64 {
        self.root
    }

    fn notifiers(&self) -> &NotifierRegistry<FixedStore<4>, StepWait> {
        &self.notifiers
    }

    fn read_lock(&self) -> Guard<'_> {
        self.read_locks.fetch_add(1, Ordering::Relaxed);
        let hook = lock(&self.on_read_lock).clone();
        if let Some(h) = hook {
            h(self, 0);
        }
        Guard(PhantomData)
    }

    fn region(&self, _: &Guard<'_>, va: u64) -> Option<Region> {
        self.region_calls.fetch_add(1, Ordering::Relaxed);
        lock(&self.regions).iter().copied().find(|r| r.range.contains_addr(va))
    }

    fn handle_fault(&self, _: &Guard<'_>, r: VaRange, write: bool) -> hmm_core::Result<()> {
        self.fault_calls.fetch_add(1, Ordering::Relaxed);
        let hook = lock(&self.on_fault).clone();
        match hook {
            Some(h) => h(self, r, write),
            None => self.default_fault(r, write),
        }
    }
}

thread_local! {
    /// What "another thread" does while a [`StepWait`] waits (see [`with_step`]).
    static STEP: Cell<Option<*mut (dyn FnMut() + 'static)>> = const { Cell::new(None) };
}

/// The waiter of a [`TestSpace`]: while the condition is false it runs the
/// test's step (see [`with_step`]), or spins if there is none.
#[derive(Default)]
struct StepWait;

impl Waiter for StepWait {
    fn wait_until(&self, done: &dyn Fn() -> bool) {
        while !done() {
            match STEP.with(Cell::get) {
                // SAFETY: set by `with_step`, which clears it before the
                // closure goes away; only this thread runs it.
                Some(step) => unsafe { (*step)() },
                None => std::hint::spin_loop(),
            }
        }
    }
    fn wake_all(&self) {}
}

/// Runs `f` with `step` as what happens while this thread waits.
fn with_step<R>(step: &mut dyn FnMut(), f: impl FnOnce() -> R) -> R {
    let step: *mut (dyn FnMut() + '_) = step;
    // SAFETY: lifetime erasure only: the pointer is cleared below, before
    // `step` can go away (a panic in `f` fails the test anyway).
    let step: *mut (dyn FnMut() + 'static) = unsafe { std::mem::transmute(step) };
    STEP.with(|s| s.set(Some(step)));
    let r = f();
    STEP.with(|s| s.set(None));
    r
}

/// Invalidations a test started and ends later (while a fault waits).
type Running = Arc<Mutex<Vec<hmm_core::notifier::Invalidation>>>;

/// A read-lock hook that, on its first `limit` calls, starts an
/// invalidation of `victim` and leaves it running in `running`.
fn start_on_read_lock(victim: VaRange, limit: u64, running: &Running) -> Hook {
    let n = AtomicU64::new(0);
    let running = running.clone();
    Arc::new(move |s: &TestSpace, _: u64| {
        if n.fetch_add(1, Ordering::Relaxed) < limit.min(RUNAWAY) {
            let inv = s.notifiers.invalidate_range_start(victim, Event::Clear, true).unwrap();
            lock(&running).push(inv);
        }
    })
}

/// Ends every invalidation in `running`.
fn end_all(s: &TestSpace, running: &Running) {
    for inv in lock(running).drain(..) {
        s.notifiers.invalidate_range_end(inv);
    }
}

/// Every page address of `r` (works for a range ending at 2^64).
fn pages(r: VaRange) -> impl Iterator<Item = u64> {
    (0..r.pages(12)).map(move |i| r.start() + i * PAGE)
}

/// A device that remembers what it was told to map.
#[derive(Default)]
struct Dev {
    map: Mutex<BTreeSet<u64>>,
    updates: AtomicU64,
}

impl DeviceOps for Dev {
    fn update(&self, r: VaRange) -> Result<(), i32> {
        self.updates.fetch_add(1, Ordering::Relaxed);
        lock(&self.map).extend(pages(r));
        Ok(())
    }

    fn invalidate(&self, r: VaRange, _: Event) {
        lock(&self.map).retain(|va| !r.contains_addr(*va));
    }

    fn flush(&self, _: VaRange) {}
}

type TMirror<'s> = Mirror<'s, TestSpace, Dev, CountingAllocator>;

fn test_mirror<'s>(s: &'s TestSpace, alloc: &'s CountingAllocator, r: VaRange, config: MirrorConfig) -> TMirror<'s> {
    Mirror::new(s, alloc, Dev::default(), r, config).expect("mirror")
}

fn budget(max_retries: u32) -> MirrorConfig {
    MirrorConfig { max_retries, ..MirrorConfig::default() }
}

/// `range_fault` over `r` with an unregistered interval (no invalidation can
/// reach it, so the sequence never moves).
fn fault_once<S: AddressSpace>(
    s: &S,
    r: VaRange,
    default_flags: u64,
    mask: u64,
    pfns: &mut [Pfn],
) -> hmm_core::Result<FaultStats> {
    let watcher = Counting { interval: Interval::new(r), calls: AtomicU64::new(0) };
    // SAFETY: `watcher` outlives the registration, dropped at the end of
    // this function (it is declared first).
    let _watching = unsafe { s.notifiers().insert(&watcher) }?;
    let seq = s.notifiers().read_begin(&watcher.interval);
    let guard = s.read_lock();
    let mut req = RangeFault { range: r, default_flags, pfn_flags_mask: mask, pfns, dev_private_owner: None };
    range_fault(s, &guard, &watcher.interval, seq, &mut req)
}

const BASE: u64 = 0x1000_0000;
/// A PML4 slot (512 GiB) whose entry is malformed.
const BAD_SLOT: u64 = 3 << 39;

// ------------------------------------------------------------------ 1

/// A kernel-only leaf (no USER bit) and a malformed entry (a PML4 entry with
/// the huge bit) inside a readable region, with no fault request: the call
/// succeeds and reports those pages as ERROR, the others as they are, and
/// never calls the fault handler.
///
/// Kills, in `fill_region`: `Class::Error => want & Pfn::REQ_FAULT == 0`
/// with `==` replaced by `!=` (the page becomes "must fault", and an Error
/// page that must fault fails the whole call with `Error::Fault`); in
/// `classify`, the `Leaf { .. } | Invalid(_) => Class::Error` arm reached
/// by a kernel-only leaf or a malformed entry; and the hole branch of
/// `range_fault` (`& Pfn::REQ_FAULT != 0` with `==`).
#[test]
fn kernel_only_and_malformed_entries_are_errors_without_a_fault_request() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 6 * PAGE);
        s.add_region(range(BASE, 5 * PAGE), RW);
        let user_rw = s.map_new(BASE, true);
        let kernel = s.new_frame();
        s.map(BASE + PAGE, kernel, true, false);
        // BASE + 2 pages: absent.
        let user_ro = s.map_new(BASE + 3 * PAGE, false);
        let kernel_ro = s.new_frame();
        s.map(BASE + 4 * PAGE, kernel_ro, false, false);
        // BASE + 5 pages: no region (a hole).
        let want = vec![
            Pfn::valid(user_rw, true, 0),
            Pfn::ERROR_ENTRY,
            Pfn::NONE,
            Pfn::valid(user_ro, false, 0),
            Pfn::ERROR_ENTRY,
            Pfn::ERROR_ENTRY,
        ];
        for mask in [0, u64::MAX] {
            let mut pfns = vec![Pfn::NONE; 6];
            let stats = fault_once(&s, r, 0, mask, &mut pfns).expect("no request: the call must not fail");
            assert_eq!(pfns, want, "mask {mask:#x}");
            assert_eq!(stats, FaultStats::default(), "nothing faulted");
        }
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), 0);
        // The pure table snapshot agrees except for the hole (tables know no regions).
        assert_eq!(&s.snapshot(r)[..5], &want[..5]);

        // A fault request on the kernel-only page (per page or for all) fails;
        // on the absent page only, it faults that page and reports the rest.
        let mut pfns = vec![Pfn::NONE; 6];
        pfns[1] = Pfn(Pfn::REQ_FAULT);
        assert_eq!(fault_once(&s, r, 0, Pfn::REQ_FAULT, &mut pfns), Err(Error::Fault));
        let mut pfns = vec![Pfn::NONE; 2];
        assert_eq!(fault_once(&s, range(BASE, 2 * PAGE), Pfn::REQ_FAULT, 0, &mut pfns), Err(Error::Fault));
        let mut pfns = vec![Pfn::NONE; 1];
        assert_eq!(fault_once(&s, range(BASE + 5 * PAGE, PAGE), Pfn::REQ_FAULT, 0, &mut pfns), Err(Error::Fault));
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), 0, "an ERROR page is never handed to the handler");
        let mut pfns = vec![Pfn::NONE; 6];
        pfns[2] = Pfn(Pfn::REQ_FAULT);
        let stats = fault_once(&s, r, 0, Pfn::REQ_FAULT, &mut pfns).unwrap();
        assert_eq!(stats, FaultStats { handler_calls: 1, pages_faulted: 1 });
        let (frame, write) = s.leaf_at(BASE + 2 * PAGE).expect("faulted in");
        assert!(!write);
        let mut want = want.clone();
        want[2] = Pfn::valid(frame, false, 0);
        assert_eq!(pfns, want);

        // A malformed PML4 entry (huge bit at level 3): its whole 512 GiB slot
        // is ERROR, with or without a region.
        s.set_raw(BAD_SLOT, 3, 0x87);
        let bad = range(BAD_SLOT + 4 * PAGE, 3 * PAGE);
        s.add_region(range(BAD_SLOT, 6 * PAGE), RW);
        let mut pfns = vec![Pfn::NONE; 3];
        let stats = fault_once(&s, bad, 0, 0, &mut pfns).expect("no request: the call must not fail");
        assert_eq!(pfns, [Pfn::ERROR_ENTRY; 3]);
        assert_eq!(stats.handler_calls, 0);
        assert_eq!(s.snapshot(bad), [Pfn::ERROR_ENTRY; 3]);
        let mut pfns = vec![Pfn::NONE; 3];
        assert_eq!(fault_once(&s, bad, Pfn::REQ_FAULT, 0, &mut pfns), Err(Error::Fault));

        // Mirror::snapshot (default flags 0) reports the same.
        let m = pin!(test_mirror(&s, &alloc, common::user(), MirrorConfig::default()));
        m.as_ref().register().unwrap();
        let mut out = vec![Pfn::NONE; 6];
        m.snapshot(r, &mut out).unwrap();
        assert_eq!(out, want);
        let mut out = vec![Pfn::NONE; 3];
        m.snapshot(bad, &mut out).unwrap();
        assert_eq!(out, [Pfn::ERROR_ENTRY; 3]);
        assert_eq!(m.fault(range(BASE + PAGE, PAGE), false), Err(Error::Fault));
        assert_eq!(m.fault(bad, false), Err(Error::Fault));
        assert_eq!(m.translate(BASE + PAGE), None);
    }
    assert_eq!(alloc.live(), 0);
}

// ------------------------------------------------------------------ 2

/// `Mirror::snapshot` retries while invalidations collide and gives up with
/// `Busy` once the retries exceed `max_retries`: with a kernel that
/// invalidates the mirrored range every time the address-space lock is
/// taken, that is exactly `max_retries + 1` walks, all counted as retries.
/// With exactly `max_retries` collisions it still succeeds.
///
/// Kills, in `Mirror::over_budget`: `retries > max_retries` with `>=` or
/// `==` (one walk fewer; the `max_retries`-collision snapshot fails), `<`
/// (no walk at all), `||` with `&&` (never gives up: the hook stops
/// colliding after `RUNAWAY` and the snapshot succeeds instead of `Busy`),
/// the body replaced by `true` / `false`; in `snapshot`: `retries += 1`
/// replaced (`-=` underflows, `*=` never gives up) and the `bump` of the
/// retry counter deleted.
#[test]
fn snapshot_gives_up_after_exactly_max_retries_collisions() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 4 * PAGE);
        s.add_region(r, RW);
        let frame = s.map_new(BASE, true);
        const MAX: u32 = 3;
        let m = pin!(test_mirror(&s, &alloc, r, budget(MAX)));
        m.as_ref().register().unwrap();
        // Collide on the first `limit` walks (and stop after RUNAWAY).
        let collide = |limit: u64| -> Hook {
            let n = AtomicU64::new(0);
            Arc::new(move |s: &TestSpace, _: u64| {
                if n.fetch_add(1, Ordering::Relaxed) < limit.min(RUNAWAY) {
                    s.invalidate(range(BASE + 2 * PAGE, PAGE), Event::ProtectionPage);
                }
            })
        };
        s.set_read_lock_hook(Some(collide(u64::MAX)));
        let mut out = vec![Pfn::NONE; 4];
        assert_eq!(m.snapshot(r, &mut out), Err(Error::Busy));
        assert_eq!(m.stats().retries, MAX as u64 + 1, "retries until they exceed the budget");
        assert_eq!(s.read_locks.load(Ordering::Relaxed), MAX as u64 + 1, "one walk per retry");
        assert_eq!(s.region_calls.load(Ordering::Relaxed), 0, "each walk stopped at the sequence check");

        // Exactly MAX collisions: the last allowed walk succeeds.
        s.set_read_lock_hook(Some(collide(MAX as u64)));
        let before = m.stats().retries;
        let mut out = vec![Pfn(0xdead); 4];
        m.snapshot(r, &mut out).unwrap();
        assert_eq!(out, [Pfn::valid(frame, true, 0), Pfn::NONE, Pfn::NONE, Pfn::NONE]);
        assert_eq!(m.stats().retries - before, MAX as u64);

        // No collision, no retry.
        s.set_read_lock_hook(None);
        let before = m.stats().retries;
        m.snapshot(r, &mut out).unwrap();
        assert_eq!(m.stats().retries, before);
        assert_eq!(m.stats().faults, 0, "a snapshot is not a fault");
    }
    assert_eq!(alloc.live(), 0);
}

static SNAPSHOT_CLOCK: AtomicU64 = AtomicU64::new(0);

fn snapshot_tick() -> u64 {
    SNAPSHOT_CLOCK.fetch_add(1, Ordering::Relaxed)
}

/// The time budget of `snapshot`: a clock that advances one tick per read
/// and `max_ticks = 5` allow exactly five colliding walks (elapsed 1..=5),
/// the sixth check (elapsed 6) gives up.
///
/// Kills, in `over_budget`: `> self.config.max_ticks` with `>=` / `==` /
/// `<`, and the deletion of the `(Some(clock), Some(t0))` match arm.
#[test]
fn snapshot_time_budget_is_exact() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 2 * PAGE);
        s.add_region(r, RW);
        let config = MirrorConfig { max_retries: 1000, clock: Some(snapshot_tick), max_ticks: 5, owner: None };
        let m = pin!(test_mirror(&s, &alloc, r, config));
        m.as_ref().register().unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let calls = n.clone();
        s.set_read_lock_hook(Some(Arc::new(move |s: &TestSpace, _: u64| {
            if calls.fetch_add(1, Ordering::Relaxed) < RUNAWAY {
                s.invalidate(range(BASE, PAGE), Event::Clear);
            }
        })));
        let mut out = vec![Pfn::NONE; 2];
        assert_eq!(m.snapshot(r, &mut out), Err(Error::Busy));
        assert_eq!(n.load(Ordering::Relaxed), 5, "walks while the elapsed ticks are at most max_ticks");
        assert_eq!(m.stats().retries, 5);
        assert_eq!(SNAPSHOT_CLOCK.load(Ordering::Relaxed), 7, "one read at the start, one per budget check");
    }
    assert_eq!(alloc.live(), 0);
}

/// `Mirror::fault` counts a collision when an invalidation of one of its
/// pages is still running as it is about to map them (started here at every
/// read lock, ended only while the fault waits): `max_retries + 1` of them,
/// then `Busy`, with no handler call and nothing left mapped; `max_retries`
/// collisions still succeed.
///
/// Kills, in `Mirror::fault`: the collision's `retries += 1` (`*=`: never
/// gives up) and its `bump`, the budget check before waiting; in
/// `over_budget`, the same operator mutants as the snapshot test.
#[test]
fn fault_gives_up_after_exactly_max_retries_collisions() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 4 * PAGE);
        s.add_region(r, RW);
        const MAX: u32 = 4;
        let m = pin!(test_mirror(&s, &alloc, r, budget(MAX)));
        m.as_ref().register().unwrap();
        let running = Running::default();
        let mut end = || end_all(&s, &running);
        let victim = range(BASE + 3 * PAGE, PAGE);
        s.set_read_lock_hook(Some(start_on_read_lock(victim, u64::MAX, &running)));
        assert_eq!(with_step(&mut end, || m.fault(r, true)), Err(Error::Busy));
        end_all(&s, &running);
        assert_eq!(m.stats().retries, MAX as u64 + 1);
        assert_eq!(s.read_locks.load(Ordering::Relaxed), MAX as u64 + 1, "one attempt per collision");
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), 0, "no attempt got past the collision check");
        assert_eq!(m.translate(BASE), None);

        s.set_read_lock_hook(Some(start_on_read_lock(victim, MAX as u64, &running)));
        let before = m.stats().retries;
        with_step(&mut end, || m.fault(r, true)).unwrap();
        assert_eq!(m.stats().retries - before, MAX as u64);
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), 1, "one run, one handler call");
        for va in pages(r) {
            let (frame, write) = s.leaf_at(va).unwrap();
            assert!(write);
            assert_eq!(m.translate(va).map(|e| (e.frame(), e.is_write())), Some((frame, true)));
        }
    }
    assert_eq!(alloc.live(), 0);
}

/// Invalidations of other pages of the same mirror cost a fault nothing,
/// even while they are still running when it maps: an invalidation of the
/// mirror's last page started at every read lock (and never ended during
/// the fault) leaves a fault of the first three pages at zero retries, one
/// attempt, and everything mapped. The budget is 0: one collision would be
/// `Busy`.
///
/// Kills, in `Running::overlaps` and `Mirror::fault`: any check that treats
/// a running invalidation of the mirror as a collision regardless of the
/// pages (the coarse per-interval sequence the mirror used to retry on).
#[test]
fn a_running_invalidation_of_other_pages_is_no_collision() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 4 * PAGE);
        s.add_region(r, RW);
        let frames: Vec<u64> = pages(r).map(|va| s.map_new(va, true)).collect();
        let m = pin!(test_mirror(&s, &alloc, r, budget(0)));
        m.as_ref().register().unwrap();
        let running = Running::default();
        s.set_read_lock_hook(Some(start_on_read_lock(range(BASE + 3 * PAGE, PAGE), u64::MAX, &running)));
        let mine = range(BASE, 3 * PAGE);
        m.fault(mine, false).unwrap();
        assert_eq!(lock(&running).len(), 1, "the other page's invalidation was still running");
        end_all(&s, &running);
        assert_eq!(m.stats().retries, 0);
        assert_eq!(s.read_locks.load(Ordering::Relaxed), 1, "one attempt");
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), 0);
        for (va, frame) in pages(mine).zip(&frames) {
            assert_eq!(m.translate(va).map(|e| e.frame()), Some(*frame));
        }
        assert_eq!(m.translate(BASE + 3 * PAGE), None, "not asked for");
    }
    assert_eq!(alloc.live(), 0);
}

// ------------------------------------------------------------------ 3

/// The same request bit in `default_flags` and in the per-page input (let
/// through by `pfn_flags_mask`) means the same as having it once:
/// `request = (input & mask) | default`, a write request implies a fault.
/// Each case runs on its own fresh anonymous region of the model kernel.
///
/// Kills, in `request`: `(input & mask) | default` with `|` -> `^` (both
/// bits set cancel out: no fault), `&` -> `|` (a mask of 0 no longer
/// ignores the input), `&` -> `^` (a mask of REQ_FAULT turns an input write
/// request into a write), and `r | Pfn::REQ_FAULT` -> `r ^ Pfn::REQ_FAULT`
/// (write + fault requested: the fault bit is dropped); in `fill_region`,
/// the run's `w || write` -> `&&` (a run whose first page wants only a read
/// is faulted for read, and its write pages need a second handler call).
#[test]
fn a_request_bit_given_twice_counts_once() {
    let (alloc, space) = kernel(16 * MIB);
    let zero = space.zero_frame().unwrap();
    let fault = Pfn::REQ_FAULT;
    let write = Pfn::REQ_WRITE;
    // (name, default_flags, mask, per-page input, expected kind of every page)
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Want {
        Absent,
        ZeroRead,
        Written,
    }
    let cases: &[(&str, u64, u64, u64, Want)] = &[
        ("fault, once by default", fault, 0, 0, Want::ZeroRead),
        ("fault, once per page", 0, u64::MAX, fault, Want::ZeroRead),
        ("fault, in both", fault, u64::MAX, fault, Want::ZeroRead),
        ("fault, in both, mask = fault", fault, fault, fault, Want::ZeroRead),
        ("write+fault, once by default", fault | write, 0, 0, Want::Written),
        ("write+fault, once per page", 0, u64::MAX, fault | write, Want::Written),
        ("write+fault, in both", fault | write, u64::MAX, fault | write, Want::Written),
        ("write alone, in both (implies fault)", write, u64::MAX, write, Want::Written),
        ("fault by default, write per page", fault, u64::MAX, write, Want::Written),
        ("input ignored with mask 0", 0, 0, fault | write, Want::Absent),
        ("write input masked off", 0, fault, fault | write, Want::ZeroRead),
        ("both masked off", 0, !(fault | write), fault | write, Want::Absent),
    ];
    for (i, &(name, default_flags, mask, input, want)) in cases.iter().enumerate() {
        let r = space.map(BASE + i as u64 * 16 * PAGE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        let calls = space.handle_fault_calls();
        let mut pfns = vec![Pfn(input); 4];
        let stats = fault_once(&space, r, default_flags, mask, &mut pfns).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let handler = space.handle_fault_calls() - calls;
        match want {
            Want::Absent => {
                assert_eq!(pfns, [Pfn::NONE; 4], "{name}");
                assert_eq!((stats.handler_calls, handler), (0, 0), "{name}");
            }
            Want::ZeroRead => {
                assert_eq!(pfns, [Pfn::valid(zero, false, 0); 4], "{name}");
                assert_eq!(stats, FaultStats { handler_calls: 1, pages_faulted: 4 }, "{name}");
                assert_eq!(handler, 1, "{name}");
            }
            Want::Written => {
                assert!(pfns.iter().all(|p| p.is_valid() && p.is_write() && p.phys() != zero), "{name}: {pfns:x?}");
                assert_eq!(stats, FaultStats { handler_calls: 1, pages_faulted: 4 }, "{name}");
                assert_eq!(handler, 1, "{name}");
            }
        }
        assert_eq!(pfns, space.oracle().expected_pfns(r), "{name}: output is what the kernel maps");
    }
    // Per-page requests that differ inside one missing run: the run is
    // faulted once, for write if any page of it wants write.
    let r = space.map(BASE + 256 * PAGE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let calls = space.handle_fault_calls();
    let mut pfns = vec![Pfn(fault), Pfn(fault | write), Pfn(fault), Pfn(write)];
    let stats = fault_once(&space, r, 0, u64::MAX, &mut pfns).unwrap();
    assert_eq!(stats, FaultStats { handler_calls: 1, pages_faulted: 4 }, "one run, one write fault");
    assert_eq!(space.handle_fault_calls() - calls, 1);
    assert!(pfns.iter().all(|p| p.is_valid() && p.is_write()), "{pfns:x?}");
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// Device-private entries: those of the owner named in the request are
/// reported as they are (VALID, their device frame, their write bit), those
/// of another device and every one without an owner are "not present" (the
/// kernel's fault handler migrates them back), both from `range_fault` and
/// from a mirror whose `MirrorConfig::owner` is set.
///
/// Kills, in `classify`: the match guard `Some(o) == owner` replaced by
/// `true` (another device's page would be mirrored) or `false` (the owner's
/// own page would be faulted back), and `==` -> `!=`.
#[test]
fn device_private_pages_are_valid_only_for_their_owner() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 4 * PAGE);
        s.add_region(r, RW);
        let private = |frame: u64, owner: u16, write: bool| {
            L4::encode(&PteView::Special(SpecialEntry::DevicePrivate { frame, owner, write }), 0).unwrap()
        };
        let (mine, theirs) = (0x7_0000_0000u64, 0x7_1000_0000u64);
        s.set_raw(BASE, 0, private(mine, 5, true));
        s.set_raw(BASE + PAGE, 0, private(theirs, 6, true));
        s.set_raw(BASE + 2 * PAGE, 0, private(mine + PAGE, 5, false));
        let cpu = s.map_new(BASE + 3 * PAGE, true);
        let run = |owner: Option<u16>, default_flags: u64| {
            let watcher = Counting { interval: Interval::new(r), calls: AtomicU64::new(0) };
            // SAFETY: `watcher` is declared first: it outlives the registration.
            let _watching = unsafe { s.notifiers().insert(&watcher) }.unwrap();
            let interval = &watcher.interval;
            let guard = s.read_lock();
            let mut pfns = vec![Pfn(0xdead); 4];
            let mut req =
                RangeFault { range: r, default_flags, pfn_flags_mask: 0, pfns: &mut pfns, dev_private_owner: owner };
            let stats = range_fault(&s, &guard, interval, s.notifiers().read_begin(interval), &mut req);
            (stats, pfns)
        };
        let (stats, pfns) = run(Some(5), 0);
        assert_eq!(stats, Ok(FaultStats::default()));
        assert_eq!(
            pfns,
            [Pfn::valid(mine, true, 0), Pfn::NONE, Pfn::valid(mine + PAGE, false, 0), Pfn::valid(cpu, true, 0)]
        );
        let (_, pfns) = run(Some(6), 0);
        assert_eq!(pfns, [Pfn::NONE, Pfn::valid(theirs, true, 0), Pfn::NONE, Pfn::valid(cpu, true, 0)]);
        let (_, pfns) = run(None, 0);
        assert_eq!(pfns, [Pfn::NONE, Pfn::NONE, Pfn::NONE, Pfn::valid(cpu, true, 0)]);
        // A read fault for owner 5: only the other device's page goes to the
        // handler (which here brings it back to a fresh CPU frame).
        let calls = s.fault_calls.load(Ordering::Relaxed);
        s.set_fault_hook(Some(Arc::new(|s: &TestSpace, fr: VaRange, write| {
            for va in pages(fr) {
                s.map_new(va, write);
            }
            Ok(())
        })));
        let (stats, pfns) = run(Some(5), Pfn::REQ_FAULT);
        assert_eq!(stats, Ok(FaultStats { handler_calls: 1, pages_faulted: 1 }));
        assert_eq!(s.fault_calls.load(Ordering::Relaxed) - calls, 1);
        let back = s.leaf_at(BASE + PAGE).expect("migrated back").0;
        assert_eq!(
            pfns,
            [
                Pfn::valid(mine, true, 0),
                Pfn::valid(back, false, 0),
                Pfn::valid(mine + PAGE, false, 0),
                Pfn::valid(cpu, true, 0)
            ]
        );
        // A mirror owning device 5 snapshots the same way.
        let config = MirrorConfig { owner: Some(5), ..MirrorConfig::default() };
        let m = pin!(test_mirror(&s, &alloc, r, config));
        m.as_ref().register().unwrap();
        let mut out = vec![Pfn::NONE; 4];
        m.snapshot(r, &mut out).unwrap();
        assert_eq!(out, pfns);
    }
    assert_eq!(alloc.live(), 0);
}

// ------------------------------------------------------------------ 4

/// A kernel whose memory holds one resident page of the region at a time:
/// the handler makes the last page of the run it is given present and
/// evicts the others (an invalidation, as reclaim does). A 3-page fault
/// keeps making "progress" (resuming at each run's start): its first 3
/// handler calls are free, each later one costs a retry, so with a budget
/// of 2 it stops after 3 + 2 + 1 = 6 calls with `Busy` and nothing mapped.
/// Once the kernel stops thrashing the same fault succeeds at once, with one
/// handler call for the missing run.
///
/// Kills, in `Mirror::fault`: `calls > range.pages(12)` with `>=` (5 calls)
/// or `<` / `==` (never or once), `calls += 1` -> `*=` (never gives up), and
/// the `retries += 1` there (never gives up).
#[test]
fn handler_calls_are_free_once_per_page() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let n = 3u64;
        let r = range(BASE, n * PAGE);
        s.add_region(r, RW);
        const MAX: u32 = 2;
        let m = pin!(test_mirror(&s, &alloc, r, budget(MAX)));
        m.as_ref().register().unwrap();
        let evictions = Arc::new(AtomicU64::new(0));
        let ev = evictions.clone();
        s.set_fault_hook(Some(Arc::new(move |s: &TestSpace, fr: VaRange, write| {
            if s.fault_calls.load(Ordering::Relaxed) > RUNAWAY {
                return Err(Error::Fault);
            }
            let keep = fr.last() & !(PAGE - 1);
            for va in pages(r).filter(|&va| va != keep && s.leaf_at(va).is_some()) {
                ev.fetch_add(1, Ordering::Relaxed);
                s.zap(va, Event::Migrate { owner: 7 });
            }
            s.map_new(keep, write);
            Ok(())
        })));
        assert_eq!(m.fault(r, true), Err(Error::Busy));
        let calls = n + MAX as u64 + 1;
        assert_eq!(m.stats().retries, MAX as u64 + 1, "the calls beyond one per page");
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), calls);
        assert_eq!(s.read_locks.load(Ordering::Relaxed), calls, "one attempt per handler call");
        assert_eq!(evictions.load(Ordering::Relaxed), calls - 1, "every call but the first evicts one page");
        for va in pages(r) {
            assert_eq!(m.translate(va), None, "a failed fault leaves nothing");
        }

        // The thrash left the last page resident: one run, one call.
        s.set_fault_hook(None);
        let before = (m.stats().retries, s.fault_calls.load(Ordering::Relaxed));
        m.fault(r, true).unwrap();
        assert_eq!(m.stats().retries, before.0);
        assert_eq!(s.fault_calls.load(Ordering::Relaxed) - before.1, 1, "pages 0 and 1, one call");
        for va in pages(r) {
            assert_eq!(m.translate(va).map(|e| e.frame()), s.leaf_at(va).map(|l| l.0));
        }
    }
    assert_eq!(alloc.live(), 0);
}

/// With a handler that breaks copy-on-write of every page it is asked for
/// (a new frame plus an invalidation of the old one), a 64-page write fault
/// over 64 read-only (and mirrored) pages succeeds with a budget of 0: one
/// handler call for the whole run, and the fault's own invalidations, over
/// before it maps again, are no collision.
#[test]
fn cow_breaks_of_a_whole_run_cost_no_budget() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 64 * PAGE);
        s.add_region(r, RW);
        let old: Vec<u64> = pages(r).map(|va| s.map_new(va, false)).collect();
        let m = pin!(test_mirror(&s, &alloc, r, budget(0)));
        m.as_ref().register().unwrap();
        m.fault(r, false).unwrap();
        assert_eq!(m.stats().retries, 0);
        s.set_fault_hook(Some(Arc::new(|s: &TestSpace, fr: VaRange, write| {
            assert!(write);
            for va in pages(fr) {
                s.zap(va, Event::ProtectionPage);
                s.map_new(va, true);
            }
            Ok(())
        })));
        m.fault(r, true).unwrap();
        assert_eq!(m.stats().retries, 0, "the fault's own COW breaks are no collision");
        assert_eq!(s.fault_calls.load(Ordering::Relaxed), 1, "one contiguous run");
        for (va, old) in pages(r).zip(old) {
            let e = m.translate(va).unwrap();
            assert!(e.is_write() && e.frame() != old && Some(e.frame()) == s.leaf_at(va).map(|l| l.0));
        }
    }
    assert_eq!(alloc.live(), 0);
}

/// Inside one `range_fault` call, a handler that leaves the same page
/// missing is called exactly `MAX_FAULTS_WITHOUT_PROGRESS` = 8 times, then
/// the page is reported as `Error::Fault`; a handler that makes one page of
/// progress per call is never stopped (20 pages, 20 calls), and neither is
/// one that gets the page right on its 8th call.
///
/// Kills, in `range_fault`: `stuck_count >= MAX_FAULTS_WITHOUT_PROGRESS`
/// with `>` (a 9th call) or `<` / `==`, `stuck_count += 1` -> `*=` (never
/// stops: the hook fails with `NoMemory` after `RUNAWAY` calls) or `-=`,
/// and `stuck_at == Some(missing.start())` -> `!=` (progress counted as
/// being stuck).
#[test]
fn a_stuck_page_fails_after_exactly_eight_handler_calls() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let r = range(BASE, 20 * PAGE);
        s.add_region(r, RW);
        let calls = |s: &TestSpace| s.fault_calls.load(Ordering::Relaxed);
        // Never makes the page present.
        s.set_fault_hook(Some(Arc::new(|s: &TestSpace, _: VaRange, _| {
            if s.fault_calls.load(Ordering::Relaxed) > RUNAWAY {
                return Err(Error::NoMemory);
            }
            Ok(())
        })));
        let mut pfns = vec![Pfn::NONE; 20];
        assert_eq!(fault_once(&s, r, Pfn::REQ_FAULT, 0, &mut pfns), Err(Error::Fault));
        assert_eq!(calls(&s), 8, "MAX_FAULTS_WITHOUT_PROGRESS calls, then the page is given up");
        // Maps read-only when asked for write: still missing (for a write).
        let before = calls(&s);
        s.set_fault_hook(Some(Arc::new(|s: &TestSpace, fr: VaRange, _| {
            if s.fault_calls.load(Ordering::Relaxed) > RUNAWAY {
                return Err(Error::NoMemory);
            }
            if s.leaf_at(fr.start()).is_none() {
                s.map_new(fr.start(), false);
            }
            Ok(())
        })));
        let mut pfns = vec![Pfn::NONE; 20];
        assert_eq!(fault_once(&s, r, Pfn::REQ_WRITE, 0, &mut pfns), Err(Error::Fault));
        assert_eq!(calls(&s) - before, 8);
        // One page of progress per call: every call moves the run's start.
        let before = calls(&s);
        s.set_fault_hook(Some(Arc::new(|s: &TestSpace, fr: VaRange, write| {
            s.map_new(fr.start(), write);
            Ok(())
        })));
        let r2 = range(BASE + PAGE, 19 * PAGE);
        let mut pfns = vec![Pfn::NONE; 19];
        let stats = fault_once(&s, r2, Pfn::REQ_FAULT, 0, &mut pfns).unwrap();
        assert_eq!(stats.handler_calls, 19);
        assert_eq!(calls(&s) - before, 19);
        assert!(pfns.iter().all(|p| p.is_valid()));
        // Present on the 8th call for the same page: just in time.
        let n = Arc::new(AtomicU64::new(0));
        let seen = n.clone();
        s.set_fault_hook(Some(Arc::new(move |s: &TestSpace, fr: VaRange, _| {
            if seen.fetch_add(1, Ordering::Relaxed) == 7 {
                s.default_fault(fr, true)?;
            }
            Ok(())
        })));
        let mut pfns = vec![Pfn::NONE; 20];
        let stats = fault_once(&s, r, Pfn::REQ_WRITE, 0, &mut pfns).unwrap();
        assert_eq!((stats.handler_calls, n.load(Ordering::Relaxed)), (8, 8));
        assert!(pfns.iter().all(|p| p.is_valid() && p.is_write()));
        // Five calls per page, three pages: the count starts over per page.
        let n = Arc::new(AtomicU64::new(0));
        let seen = n.clone();
        s.set_fault_hook(Some(Arc::new(move |s: &TestSpace, fr: VaRange, write| {
            if seen.fetch_add(1, Ordering::Relaxed) % 5 == 4 {
                s.map_new(fr.start(), write);
            }
            Ok(())
        })));
        let r3 = range(BASE + 32 * PAGE, 3 * PAGE);
        s.add_region(r3, RW);
        let mut pfns = vec![Pfn::NONE; 3];
        let stats = fault_once(&s, r3, Pfn::REQ_FAULT, 0, &mut pfns).unwrap();
        assert_eq!(stats.handler_calls, 15);
        assert!(pfns.iter().all(|p| p.is_valid()));
    }
    assert_eq!(alloc.live(), 0);
}

// ------------------------------------------------------------------ 5

/// The last page of the 4-level user half, 0x7fff_ffff_f000, on the model
/// kernel: walk, table snapshot, `range_fault`, `Mirror::fault`,
/// `Mirror::snapshot` and an unmap all see exactly that page.
///
/// Kills the off-by-one mutants of the range arithmetic at a range's end,
/// e.g. `next_page`'s `<` -> `<=` (a step past the end), on the model
/// kernel's real fault path.
#[test]
fn last_user_page() {
    let (alloc, space) = kernel(16 * MIB);
    let top = 0x7fff_ffff_f000;
    let r = range(top - 3 * PAGE, 4 * PAGE);
    assert_eq!(r.last(), (1 << 47) - 1);
    space.map(r.start(), 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(top, b"top").unwrap();
    {
        let visits = {
            let mut v = Vec::new();
            let _g = space.read_lock();
            let mut visit = |span: Span, e: PteView| -> ControlFlow<()> {
                v.push((span.range, span.level, matches!(e, PteView::Leaf { .. })));
                ControlFlow::Continue(())
            };
            // SAFETY: the model's root is live and the read lock keeps its tables.
            let flow = unsafe { hmm_core::pt::walk::<L4, SimPhys, _>(space.phys(), space.root(), r, &mut visit) };
            assert_eq!(flow, Ok(ControlFlow::Continue(())));
            v
        };
        assert_eq!(visits.len(), 4, "{visits:x?}");
        assert_eq!(visits[3], (range(top, PAGE), 0, true));
        assert!(visits[..3].iter().all(|v| v.1 == 0 && !v.2));
        let p = space.snapshot(r);
        assert_eq!(&p[..3], &[Pfn::NONE; 3]);
        let frame = p[3].phys();
        assert_eq!(p[3], Pfn::valid(frame, true, 0));
        let zero = space.zero_frame().unwrap();
        let mut pfns = vec![Pfn::NONE; 4];
        let stats = fault_once(&space, r, Pfn::REQ_FAULT, 0, &mut pfns).unwrap();
        assert_eq!(stats, FaultStats { handler_calls: 1, pages_faulted: 3 });
        assert_eq!(
            pfns,
            [
                Pfn::valid(zero, false, 0),
                Pfn::valid(zero, false, 0),
                Pfn::valid(zero, false, 0),
                Pfn::valid(frame, true, 0)
            ]
        );

        let m = pin!(common::mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        m.fault(range(top, PAGE), true).unwrap();
        assert_eq!(m.translate(top).map(|e| (e.frame(), e.is_write())), Some((frame, true)));
        m.fault(r, true).unwrap();
        assert_eq!(m.stats().pages_mapped, 5);
        let mut out = vec![Pfn::NONE; 4];
        m.snapshot(r, &mut out).unwrap();
        assert_eq!(out, space.oracle().expected_pfns(r));
        assert_eq!(hmm_testkit::dmirror::read(&m, top, 3).unwrap(), b"top");
        space.unmap(range(top, PAGE)).unwrap();
        assert_eq!(m.translate(top), None);
        assert!(m.translate(top - PAGE).is_some());
        common::counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// A range ending at 2^64 (the top page of the upper half, `last =
/// u64::MAX`): walk, table snapshot, `range_fault` (snapshot and fault),
/// a mirror over the whole upper half faulting, snapshotting, invalidating
/// and pruning its top page. Nothing may compute `last + 1` or step a page
/// past the top.
///
/// Kills `next_page`'s `va + (page - 1) < last` with `-` -> `+` or `/`:
/// below the top both compare the same, at the top page `va + page + 1`
/// overflows (every other test's ranges end lower, so only this one sees
/// it); likewise `fill_region`'s `va + ((1 << page_shift) - 1)`. Also
/// `next_page`'s `<` -> `<=` and `Mirror::fault`'s `chunk.last() ==
/// range.last()` -> `!=`, which would compute `u64::MAX + 1`.
#[test]
fn range_ending_at_two_to_the_64() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    {
        let s = TestSpace::new(&alloc);
        let top = 0xffff_ffff_ffff_f000u64;
        let r = VaRange::new::<L4>(top - 3 * PAGE, 4 * PAGE).unwrap();
        assert_eq!((r.last(), r.end()), (u64::MAX, None));
        let upper = VaRange::new::<L4>(0xffff_8000_0000_0000, 1 << 47).unwrap();
        s.add_region(r, RW);
        let f1 = s.map_new(top - 2 * PAGE, false);
        let f3 = s.map_new(top, true);

        let seen = s.walk(r);
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3].0.range, VaRange::new::<L4>(top, PAGE).unwrap());
        assert_eq!(seen[3].1, PteView::Leaf { frame: f3, flags: leaf(true, true) });
        assert_eq!(s.walk(upper).last().unwrap().0.range.last(), u64::MAX);
        let want = [Pfn::NONE, Pfn::valid(f1, false, 0), Pfn::NONE, Pfn::valid(f3, true, 0)];
        assert_eq!(s.snapshot(r), want);
        assert_eq!(s.snapshot(VaRange::new::<L4>(top, PAGE).unwrap()), [want[3]]);

        let mut pfns = vec![Pfn(0xdead); 4];
        assert_eq!(fault_once(&s, r, 0, 0, &mut pfns), Ok(FaultStats::default()));
        assert_eq!(pfns, want);
        let mut pfns = vec![Pfn::NONE; 4];
        let stats = fault_once(&s, r, Pfn::REQ_FAULT | Pfn::REQ_WRITE, 0, &mut pfns).unwrap();
        // One run: pages 0-2 (page 1 is mapped but needs write).
        assert_eq!(stats, FaultStats { handler_calls: 1, pages_faulted: 3 });
        assert!(pfns.iter().all(|p| p.is_valid() && p.is_write()));
        assert_eq!(pfns[3], Pfn::valid(f3, true, 0));
        assert_eq!(pfns[1], Pfn::valid(f1, true, 0), "upgraded in place");

        let m = pin!(test_mirror(&s, &alloc, upper, MirrorConfig::default()));
        m.as_ref().register().unwrap();
        let frames = m.table_frames();
        m.fault(VaRange::new::<L4>(top, PAGE).unwrap(), false).unwrap();
        assert_eq!(m.translate(top).map(|e| (e.frame(), e.is_write())), Some((f3, true)));
        assert_eq!(m.translate(u64::MAX).map(|e| e.frame()), Some(f3));
        assert_eq!(m.table_frames(), frames + 3);
        m.fault(r, true).unwrap();
        assert_eq!(m.stats().pages_mapped, 5);
        assert_eq!(lock(&m.device().map).len(), 4);
        let mut out = vec![Pfn::NONE; 4];
        m.snapshot(r, &mut out).unwrap();
        assert_eq!(out, pfns);
        // An invalidation of the top page reaches the mirror and the device.
        s.zap(top, Event::Unmap);
        assert_eq!(m.translate(top), None);
        assert!(!lock(&m.device().map).contains(&top));
        assert!(m.translate(top - PAGE).is_some());
        s.invalidate(r, Event::Clear);
        assert_eq!(m.table_frames(), frames, "emptied directories up to the top are freed");
        m.fault(r, false).unwrap();
        assert!(m.translate(top).is_some());
        assert_eq!(m.stats().retries, 0);
    }
    assert_eq!(alloc.live(), 0);
}

// ------------------------------------------------------------------ registry

thread_local! {
    /// What [`HookWait`] does instead of waiting, last pushed first.
    static WAIT_HOOKS: RefCell<Vec<Box<dyn FnOnce()>>> = RefCell::default();
}

fn push_wait_hook(hook: impl FnOnce() + 'static) {
    WAIT_HOOKS.with(|h| h.borrow_mut().push(Box::new(hook)));
}

fn wait_hooks_left() -> usize {
    WAIT_HOOKS.with(|h| h.borrow().len())
}

/// A waiter that never blocks: while the condition is false it runs the next
/// hook (what another thread would do meanwhile), and panics when none is
/// left instead of hanging. Makes the registry's waits single-threaded and
/// deterministic.
#[derive(Default)]
struct HookWait;

impl Waiter for HookWait {
    fn wait_until(&self, done: &dyn Fn() -> bool) {
        while !done() {
            let hook = WAIT_HOOKS.with(|h| h.borrow_mut().pop());
            hook.expect("the registry waits for something no test hook will do")();
        }
    }
    fn wake_all(&self) {}
}

type HookRegistry = NotifierRegistry<FixedStore<8>, HookWait>;

/// Counts its callbacks.
struct Counting {
    interval: Interval,
    calls: AtomicU64,
}

impl Notifier for Counting {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.interval.set_seq(inv);
        true
    }
}

/// A registry and notifiers that live for the rest of the test process, so
/// that wait hooks (`'static`) may hold registrations and tokens.
fn leaked(ranges: &[VaRange]) -> (&'static HookRegistry, Vec<&'static Counting>) {
    let reg: &'static HookRegistry = Box::leak(Box::default());
    let ns = ranges
        .iter()
        .map(|&r| &*Box::leak(Box::new(Counting { interval: Interval::new(r), calls: AtomicU64::new(0) })))
        .collect();
    (reg, ns)
}

fn calls(n: &Counting) -> u64 {
    n.calls.load(Ordering::Relaxed)
}

/// Removing B while an invalidation runs and A's insert is postponed to its
/// end: B's removal is postponed too and waits; the end applies both (A in,
/// B out) before anything else can run, and B's removal leaves A's pending
/// insert alone.
///
/// Kills, in `NotifierRegistry::remove`: `d.insert && same(..)` -> `||` in
/// the search for a pending insert (B's removal would cancel A's insert and
/// return without waiting), and `delete !` before
/// `state.deferred.iter().any(..)` (B's removal would not be postponed: the
/// end of the invalidation would leave B in the store). Also checks that a
/// `Registration`'s `Debug` names it.
#[test]
fn a_removal_during_an_invalidation_waits_and_leaves_other_pending_inserts() {
    let r = range(BASE, 4 * PAGE);
    let (reg, ns) = leaked(&[r, r]);
    let (a, b) = (ns[0], ns[1]);
    // SAFETY: `b` is leaked: it never moves or goes away.
    let reg_b = unsafe { reg.insert(b) }.unwrap();
    assert!(format!("{reg_b:?}").starts_with("Registration"), "{reg_b:?}");
    let inv = reg.invalidate_range_start(r, Event::Unmap, true).unwrap();
    assert_eq!(calls(b), 1);
    // SAFETY: as for `b`.
    let reg_a = unsafe { reg.insert(a) }.unwrap();
    assert!(a.interval.is_registered());
    assert_eq!(reg.len(), 1, "A's insert waits for the end of the invalidation");
    let seen = Rc::new(Cell::new(None));
    let at_end = seen.clone();
    push_wait_hook(move || {
        reg.invalidate_range_end(inv);
        at_end.set(Some(reg.len()));
    });
    reg_b.remove();
    assert_eq!(wait_hooks_left(), 0, "B's removal waited for the running invalidation");
    assert_eq!(seen.get(), Some(1), "the end of the invalidation inserted A and removed B");
    assert!(a.interval.is_registered() && !b.interval.is_registered());
    let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!((calls(a), calls(b)), (1, 1), "A is called from now on, B never again");
    reg_a.remove();
    assert!(reg.is_empty() && !a.interval.is_registered());
}

/// Two removals postponed by the same invalidation (C's, then B's from inside
/// C's wait, as another thread would): the end of the invalidation takes
/// both out of the store.
///
/// Kills, in `NotifierRegistry::remove`: `!d.insert && same(..)` -> `||`
/// in the check for an already postponed removal (C's postponed removal
/// would be taken for B's, B's would not be postponed, and B would stay in
/// the store after the invalidation ended), and the `delete !` before
/// `state.deferred.iter().any(..)` again.
#[test]
fn two_removals_postponed_by_one_invalidation_both_apply_at_its_end() {
    let r = range(BASE, 4 * PAGE);
    let (reg, ns) = leaked(&[r, range(BASE + 2 * PAGE, 4 * PAGE)]);
    let (b, c) = (ns[0], ns[1]);
    // SAFETY: `b` and `c` are leaked: they never move or go away.
    let (reg_b, reg_c) = unsafe { (reg.insert(b).unwrap(), reg.insert(c).unwrap()) };
    let inv = reg.invalidate_range_start(range(BASE, 8 * PAGE), Event::Unmap, true).unwrap();
    assert_eq!((calls(b), calls(c)), (1, 1));
    let seen = Rc::new(Cell::new(None));
    let at_end = seen.clone();
    // Last pushed runs first: C's wait removes B, B's wait ends the invalidation.
    push_wait_hook(move || {
        reg.invalidate_range_end(inv);
        at_end.set(Some(reg.len()));
    });
    push_wait_hook(move || reg_b.remove());
    reg_c.remove();
    assert_eq!(wait_hooks_left(), 0);
    assert_eq!(seen.get(), Some(0), "the end of the invalidation removed both");
    assert!(reg.is_empty() && !b.interval.is_registered() && !c.interval.is_registered());
    let inv = reg.invalidate_range_start(range(BASE, 8 * PAGE), Event::Clear, true).unwrap();
    reg.invalidate_range_end(inv);
    assert_eq!((calls(b), calls(c)), (1, 1));
}

/// `unregister` tells the device to drop everything (one `Release`
/// invalidation of the whole mirror, then a flush) when the mirror held
/// translations, and says nothing when it held none: the device must not keep
/// a translation of a mirror that no invalidation reaches any more. (Drop
/// empties the mirror through the same code.)
///
/// Kills `clear_device` -> `()`, and `> 0` -> `== 0` / `< 0` / `>= 0` in it.
#[test]
fn unregister_empties_the_device_exactly_when_it_maps_something() {
    let (alloc, space) = kernel(16 * MIB);
    let buf = range(0x4000_0000, 4 * PAGE);
    space.map(buf.start(), 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for mapped in [false, true] {
        let m = pin!(common::mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        if mapped {
            hmm_testkit::dmirror::read(&m, buf.start(), 8).unwrap();
            assert!(m.device().tlb_len() > 0, "the device cached a translation");
        }
        let before = m.device().events().len();
        m.unregister().unwrap();
        let new: Vec<_> = m.device().events()[before..].to_vec();
        if mapped {
            assert_eq!(new, vec![(common::user(), hmm_core::Event::Release)], "what unregister told the device");
            assert_eq!(m.device().tlb_len(), 0, "the device TLB was flushed");
        } else {
            assert!(new.is_empty(), "unregister of an empty mirror told the device {new:?}");
        }
        assert_eq!(hmm_testkit::dmirror::read(&m, buf.start(), 8).err(), Some(hmm_core::Error::Unregistered));
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

// ------------------------------------------------------------------ snapshot fast path

/// One page's CPU entry in [`snapshot_fast_path_matches_the_general_path`].
fn entry_for(kind: u8, frame: u64) -> u64 {
    let special = |s: SpecialEntry| L4::encode(&PteView::Special(s), 0).unwrap();
    match kind % 10 {
        0 => 0,
        1 => L4::encode(&PteView::Leaf { frame, flags: leaf(true, true) }, 0).unwrap(),
        2 => L4::encode(&PteView::Leaf { frame, flags: leaf(false, true) }, 0).unwrap(),
        3 => L4::encode(&PteView::Leaf { frame, flags: leaf(true, false) }, 0).unwrap(),
        4 => L4::encode(&PteView::ProtNone { frame, flags: leaf(true, true) }, 0).unwrap(),
        5 => special(SpecialEntry::Swap { offset: frame >> 12 }),
        6 => special(SpecialEntry::Migration { frame, write: true }),
        7 => special(SpecialEntry::DevicePrivate { frame, owner: 5, write: kind & 0x10 != 0 }),
        8 => special(SpecialEntry::DevicePrivate { frame, owner: 6, write: true }),
        // PAT bit (bit 7) on a 4 KiB leaf: still an ordinary leaf.
        _ => L4::encode(&PteView::Leaf { frame, flags: leaf(true, true) }, 0).unwrap() | 0x80,
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// `range_fault` with no request bit anywhere takes the snapshot fill
    /// (`pt::snapshot::fill`); with request bits in the mask but none in any
    /// input word it runs the general per-page loop. Over every kind of
    /// 4 KiB entry, a 2 MiB leaf, a read-only and a kernel-only directory,
    /// both must write the same words.
    #[test]
    fn snapshot_fast_path_matches_the_general_path(
        kinds in proptest::collection::vec(0u8..32, 1024),
        owner in proptest::option::of(5u16..7),
        start in 0u64..1024,
        len in 1u64..1536,
    ) {
        let alloc = CountingAllocator::with_size(16 * MIB);
        {
            let s = TestSpace::new(&alloc);
            s.add_region(range(BASE, 2048 * PAGE), RW);
            for (i, &k) in kinds.iter().enumerate() {
                s.set_raw(BASE + i as u64 * PAGE, 0, entry_for(k, 0x8_0000_0000 + i as u64 * PAGE));
            }
            // Pages 1024..1536: a 2 MiB leaf; 1536..2048: absent.
            let huge = PteView::Leaf { frame: 0x9_0000_0000, flags: leaf(true, true) };
            s.set_raw(BASE + 1024 * PAGE, 1, L4::encode(&huge, 1).unwrap());
            // The first leaf table's directory entry read-only for even seeds,
            // kernel-only for odd ones.
            let dir = s.slot(BASE, 1);
            let raw = dir.load(Ordering::Acquire);
            let cut = if kinds[0] % 2 == 0 { 1 << 1 } else { 1 << 2 };
            dir.store(raw & !cut, Ordering::Release);

            let r = range(BASE + start * PAGE, len.min(2048 - start) * PAGE);
            let run = |mask: u64| {
                let watcher = Counting { interval: Interval::new(r), calls: AtomicU64::new(0) };
                // SAFETY: `watcher` is declared first: it outlives the registration.
                let _watching = unsafe { s.notifiers().insert(&watcher) }.unwrap();
                let interval = &watcher.interval;
                let guard = s.read_lock();
                let mut pfns = vec![Pfn::NONE; r.pages(12) as usize];
                let mut req =
                    RangeFault { range: r, default_flags: 0, pfn_flags_mask: mask, pfns: &mut pfns, dev_private_owner: owner };
                let stats = range_fault(&s, &guard, interval, s.notifiers().read_begin(interval), &mut req);
                (stats, pfns)
            };
            let (fast_stats, fast) = run(0);
            let (general_stats, general) = run(Pfn::REQ_FAULT | Pfn::REQ_WRITE);
            proptest::prop_assert_eq!(fast_stats, Ok(FaultStats::default()));
            proptest::prop_assert_eq!(general_stats, Ok(FaultStats::default()));
            if let Some(i) = fast.iter().zip(&general).position(|(a, b)| a != b) {
                proptest::prop_assert!(false, "page {i}: fast {:#x}, general {:#x}", fast[i].0, general[i].0);
            }
        }
        proptest::prop_assert_eq!(alloc.live(), 0);
    }
}
