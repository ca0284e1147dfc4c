//! Miri-sized tests of every path of hmm-core (and of the test kit) that
//! dereferences raw pointers: the walker and the snapshot over a heap arena,
//! the device-side mirror table, the notifier registry's `RawCell` and its
//! type-erased notifier pointers, and a whole `Mirror` fault / invalidate /
//! fork / teardown cycle on a model kernel.
//!
//! Everything runs over a few dozen frames of simulated RAM, so the file
//! finishes in about a minute under `cargo +nightly miri test --test
//! miri_smoke` (tests named `long_*` take longer and are skipped by
//! `cargo xtask verify`'s quick mode). Natively it is a fast regression test.

mod common;

use common::{assert_mirror_coherent, counters, device, pattern, watchdog, R, RW};
use core::ops::ControlFlow;
use core::pin::pin;
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use hmm_core::notifier::{FixedStore, VecStore};
use hmm_core::pt::{snapshot, walk, MapError, MirrorTable, Pfn, Reclaim, Span};
use hmm_core::{
    AddressSpace, BitmapFrameAllocator, Error, Event, FrameAllocator, Interval, InvalidateRange, Mirror, MirrorConfig,
    Notifier, NotifierRegistry, PhysMem, RegionFlags, VaRange,
};
use hmm_testkit::dmirror::{self, prot};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, PAGE};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type L4 = X86_64Level4;
type L5 = X86_64Level5;

const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;

fn r4(start: u64, len: u64) -> VaRange {
    VaRange::new::<L4>(start, len).expect("valid 4-level range")
}

// ------------------------------------------------------------------ a tiny arena

/// `frames` zeroed frames of "physical memory" at physical address `BASE`,
/// and a frame allocator over them (counting, with one injectable failure).
///
/// Words are reached with `as_ptr().add(i)`, never by indexing the vector:
/// under Stacked Borrows, `&self.words[i]` retags the whole arena on every
/// access, which makes Miri runs over even a few hundred KiB take minutes.
struct Arena {
    words: Vec<AtomicU64>,
    free: Mutex<Vec<u64>>,
    live: AtomicUsize,
    fail_at: AtomicUsize,
}

const BASE: u64 = 1 << 30;

impl Arena {
    fn new(frames: usize) -> Self {
        Self {
            words: (0..frames * 512).map(|_| AtomicU64::new(0)).collect(),
            free: Mutex::new((0..frames as u64).rev().map(|i| BASE + i * PAGE).collect()),
            live: AtomicUsize::new(0),
            fail_at: AtomicUsize::new(0),
        }
    }

    /// A zeroed table frame.
    fn alloc(&self) -> u64 {
        let f = self.alloc_frame().expect("arena exhausted");
        (0..512).for_each(|i| self.slot(f, i).store(0, Ordering::Relaxed));
        f
    }

    fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// The `k`-th next allocation fails (1 = the very next).
    fn fail_at(&self, k: usize) {
        self.fail_at.store(k, Ordering::Relaxed);
    }

    fn word(&self, pa: u64) -> &AtomicU64 {
        assert!(
            pa >= BASE && pa.is_multiple_of(8) && pa - BASE < self.words.len() as u64 * 8,
            "{pa:#x} outside the arena"
        );
        // SAFETY: in bounds (checked above); `Vec::as_ptr` does not retag the
        // whole vector, and the word lives as long as `self`.
        unsafe { &*self.words.as_ptr().add(((pa - BASE) / 8) as usize) }
    }

    fn slot(&self, table: u64, index: usize) -> &AtomicU64 {
        self.word(table + index as u64 * 8)
    }

    /// Writes `view` for `va` at `level` into the table rooted at `root`,
    /// creating directories with `dir` permissions as needed.
    fn set<F: PteFormat>(&self, root: u64, va: u64, level: usize, view: PteView, dir: LeafFlags) {
        let mut table = root;
        let top = <F::Geometry as PagingGeometry>::LEVELS - 1;
        for l in (level + 1..=top).rev() {
            let slot = self.slot(table, <F::Geometry as PagingGeometry>::index(va, l));
            table = match F::decode(slot.load(Ordering::Acquire), l) {
                PteView::Table { frame, .. } => frame,
                _ => {
                    let frame = self.alloc();
                    slot.store(F::encode(&PteView::Table { frame, flags: dir }, l).unwrap(), Ordering::Release);
                    frame
                }
            };
        }
        let raw = F::encode(&view, level).unwrap_or_else(|e| panic!("encode {view:?} at {level}: {e}"));
        self.slot(table, <F::Geometry as PagingGeometry>::index(va, level)).store(raw, Ordering::Release);
    }
}

impl FrameAllocator for Arena {
    fn alloc_frame(&self) -> Option<u64> {
        if self.fail_at.load(Ordering::Relaxed) > 0 && self.fail_at.fetch_sub(1, Ordering::Relaxed) == 1 {
            return None;
        }
        let f = self.free.lock().unwrap().pop()?;
        // Poison, as a real allocator's leftovers would be.
        (0..512).for_each(|i| self.slot(f, i).store(0xdead_beef_dead_beef, Ordering::Relaxed));
        self.live.fetch_add(1, Ordering::Relaxed);
        Some(f)
    }

    unsafe fn free_frame(&self, frame: u64) {
        let mut free = self.free.lock().unwrap();
        assert!(!free.contains(&frame) && frame.is_multiple_of(PAGE), "double or foreign free of {frame:#x}");
        free.push(frame);
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

// SAFETY: every address of the arena maps to its own word of `words`, which
// never moves while the arena lives; the pointer is derived from the whole
// vector (valid for every frame); the words are atomics, so shared mutation
// is sound. Addresses outside the arena panic.
unsafe impl PhysMem for Arena {
    fn ptr(&self, pa: u64) -> *mut u8 {
        assert!(pa >= BASE && pa - BASE < self.words.len() as u64 * 8, "{pa:#x} outside the arena");
        self.words.as_ptr().cast::<u8>().cast_mut().wrapping_add((pa - BASE) as usize)
    }
}

const USER_RW: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER);
const FULL_DIR: LeafFlags = USER_RW.union(LeafFlags::EXEC);

fn visits<F: PteFormat>(arena: &Arena, root: u64, range: VaRange) -> Vec<(Span, PteView)> {
    let mut out = Vec::new();
    let mut visit = |span: Span, entry: PteView| -> ControlFlow<()> {
        out.push((span, entry));
        ControlFlow::Continue(())
    };
    // SAFETY: `root` is a table of `arena`, which outlives the walk.
    let flow = unsafe { walk::<F, Arena, _>(arena, root, range, &mut visit) }.unwrap();
    assert_eq!(flow, ControlFlow::Continue(()));
    out
}

fn snap<F: PteFormat>(arena: &Arena, root: u64, range: VaRange) -> Vec<Pfn> {
    let mut out = vec![Pfn::NONE; range.pages(12) as usize];
    // SAFETY: as in `visits`.
    unsafe { snapshot::<F, Arena>(arena, root, range, &mut out) }.unwrap();
    out
}

// ------------------------------------------------------------------ walker + snapshot

#[test]
fn walk_and_snapshot_over_a_small_arena() {
    let arena = Arena::new(12);
    let root = arena.alloc();
    // A 4 KiB leaf, a 2 MiB leaf, a 1 GiB leaf (frames outside the arena: the
    // walker never dereferences a leaf's frame), PROT_NONE, swap, a kernel
    // leaf, and a read-only directory over a writable leaf.
    arena.set::<L4>(root, 0x4000_3000, 0, PteView::Leaf { frame: 0x7_0000_1000, flags: USER_RW }, FULL_DIR);
    arena.set::<L4>(root, 0x4020_0000, 1, PteView::Leaf { frame: 0x7_0020_0000, flags: USER_RW }, FULL_DIR);
    arena.set::<L4>(root, 2 * G1, 2, PteView::Leaf { frame: 0x8_4000_0000, flags: USER_RW }, FULL_DIR);
    arena.set::<L4>(root, 0x4000_4000, 0, PteView::ProtNone { frame: 0x7_0000_2000, flags: USER_RW }, FULL_DIR);
    arena.set::<L4>(root, 0x4000_5000, 0, PteView::Special(SpecialEntry::Swap { offset: 77 }), FULL_DIR);
    arena.set::<L4>(root, 0x4000_6000, 0, PteView::Leaf { frame: 0x7_0000_3000, flags: LeafFlags::READ }, FULL_DIR);
    let ro_dir = LeafFlags::READ | LeafFlags::USER;
    arena.set::<L4>(root, 0x80_0000_0000, 0, PteView::Leaf { frame: 0x7_0000_4000, flags: USER_RW }, ro_dir);

    let v = visits::<L4>(&arena, root, r4(0x4000_3000, 4 * PAGE));
    assert_eq!(v.len(), 4);
    assert_eq!(v[0].1, PteView::Leaf { frame: 0x7_0000_1000, flags: USER_RW });
    assert!(matches!(v[1].1, PteView::ProtNone { .. }));
    assert_eq!(v[2].1, PteView::Special(SpecialEntry::Swap { offset: 77 }));
    // One visit for the whole 2 MiB leaf, clipped; holes one per empty entry.
    let v = visits::<L4>(&arena, root, r4(0x4020_1000, M2));
    assert_eq!(v[0].0.level, 1);
    assert_eq!(v[0].0.range, r4(0x4020_1000, M2 - PAGE));
    // A 1 GiB leaf is one step.
    assert_eq!(visits::<L4>(&arena, root, r4(2 * G1, G1)).len(), 1);

    let s = snap::<L4>(&arena, root, r4(0x4000_2000, 6 * PAGE));
    assert_eq!(
        s,
        [
            Pfn::NONE,
            Pfn::valid(0x7_0000_1000, true, 0),
            Pfn::ERROR_ENTRY,
            Pfn::NONE,
            Pfn::ERROR_ENTRY, // not user-accessible
            Pfn::NONE,
        ]
    );
    let s = snap::<L4>(&arena, root, r4(0x4020_0000 + 5 * PAGE, 2 * PAGE));
    assert_eq!(s, [Pfn::valid(0x7_0020_5000, true, 9), Pfn::valid(0x7_0020_6000, true, 9)]);
    let s = snap::<L4>(&arena, root, r4(2 * G1 + 3 * M2, PAGE));
    assert_eq!(s, [Pfn::valid(0x8_4000_0000 + 3 * M2, true, 18)]);
    // The read-only directory makes its leaf read-only.
    assert_eq!(snap::<L4>(&arena, root, r4(0x80_0000_0000, PAGE)), [Pfn::valid(0x7_0000_4000, false, 0)]);
    // The whole lower half in one walk, and the top of the upper half.
    assert!(visits::<L4>(&arena, root, r4(0, 1 << 47)).len() > 256);
    let top = VaRange::from_bounds::<L4>(u64::MAX - 2 * PAGE + 1, u64::MAX).unwrap_err();
    assert_eq!(top, Error::Unaligned);
    let top = VaRange::new::<L4>(0u64.wrapping_sub(2 * PAGE), 2 * PAGE).unwrap();
    assert_eq!(snap::<L4>(&arena, root, top), [Pfn::NONE; 2]);
    // A slice of the wrong length is refused before any read.
    let mut short = [Pfn::NONE; 1];
    // SAFETY: as in `visits`.
    assert_eq!(unsafe { snapshot::<L4, Arena>(&arena, root, r4(0, 2 * PAGE), &mut short) }, Err(Error::BadLength));
}

#[test]
fn five_level_walk_over_a_small_arena() {
    let arena = Arena::new(8);
    let root = arena.alloc();
    let va = 0x00ff_8000_0000_0000u64 & !0xfff; // root index 511 of the lower half
    arena.set::<L5>(root, va, 0, PteView::Leaf { frame: 0x9_0000_0000, flags: USER_RW }, FULL_DIR);
    let range = VaRange::new::<L5>(va, 2 * PAGE).unwrap();
    assert_eq!(snap::<L5>(&arena, root, range), [Pfn::valid(0x9_0000_0000, true, 0), Pfn::NONE]);
    let high = VaRange::new::<L5>(0xff00_0000_0000_0000, PAGE).unwrap();
    assert_eq!(snap::<L5>(&arena, root, high), [Pfn::NONE]);
    // A 5-level range given to a 4-level walk is refused.
    assert_eq!(
        // SAFETY: as in `visits`.
        unsafe { snapshot::<L4, Arena>(&arena, root, range, &mut [Pfn::NONE; 2]) },
        Err(Error::NonCanonical)
    );
}

#[test]
fn visitor_break_stops_the_walk() {
    let arena = Arena::new(6);
    let root = arena.alloc();
    for i in 0..4 {
        arena.set::<L4>(root, 0x1000 * (i + 1), 0, PteView::Leaf { frame: 0x5000 * (i + 1), flags: USER_RW }, FULL_DIR);
    }
    let mut seen = 0;
    let mut visit = |_: Span, entry: PteView| {
        seen += 1;
        if matches!(entry, PteView::Leaf { .. }) {
            ControlFlow::Break(seen)
        } else {
            ControlFlow::Continue(())
        }
    };
    // SAFETY: as in `visits`.
    let flow = unsafe { walk::<L4, Arena, _>(&arena, root, r4(0, 8 * PAGE), &mut visit) }.unwrap();
    assert_eq!(flow, ControlFlow::Break(2));
}

// ------------------------------------------------------------------ mirror table

#[test]
fn mirror_table_map_clear_reclaim_destroy() {
    let arena = Arena::new(16);
    let (t, mut w) = MirrorTable::<L4>::new(&arena, &arena).unwrap();
    assert_eq!((w.stats().frames, arena.live()), (1, 1));
    // Three pages across a 2 MiB and a 1 GiB boundary: PDPT, two PDs, two PTs.
    let r = r4(G1 - PAGE, 3 * PAGE);
    assert_eq!(w.map(&arena, &arena, r, 0x40_0000, true), Ok((3, 0)));
    assert_eq!((w.stats().frames, arena.live()), (6, 6));
    let e = t.translate(&arena, G1 - PAGE + 0x123).unwrap();
    assert_eq!((e.frame(), e.is_write(), e.order(), e.is_dirty()), (0x40_0000, true, 0, false));
    assert_eq!(t.translate(&arena, G1 + PAGE).map(|e| e.frame()), Some(0x40_2000));
    assert_eq!(t.translate(&arena, 5 * G1), None);
    // Clearing the only page under a PT and PD unlinks both; they are freed
    // only by `reclaim` (after the device flushed).
    let mut reclaim = Reclaim::new();
    let c = w.clear(&arena, r4(G1 - PAGE, PAGE), &mut reclaim);
    assert_eq!((c.entries, c.pages, c.extent), (1, 1, Some(r4(G1 - PAGE, PAGE))));
    assert_eq!((w.stats().frames, arena.live()), (6, 6));
    w.reclaim(&t, &arena, &mut reclaim);
    assert_eq!((w.stats().frames, arena.live()), (4, 4), "the emptied PT and PD went back");
    assert_eq!(t.translate(&arena, G1 - PAGE), None);
    assert!(t.translate(&arena, G1 + PAGE).is_some());
    // A 2 MiB run, aligned in both spaces, is one entry (one new PD).
    assert_eq!(w.map(&arena, &arena, r4(2 * G1, M2), 0x20_0000, false), Ok((1, 1)));
    assert_eq!((w.stats().frames, w.stats().huge_leaves), (5, 1));
    let e = t.translate(&arena, 2 * G1 + 5 * PAGE).unwrap();
    assert_eq!((e.frame(), e.is_write(), e.order()), (0x20_0000 + 5 * PAGE, false, 9));
    // Clearing one page of it clears it whole.
    let c = w.clear(&arena, r4(2 * G1 + PAGE, PAGE), &mut reclaim);
    assert_eq!((c.entries, c.pages, c.extent), (1, 512, Some(r4(2 * G1, M2))));
    w.reclaim(&t, &arena, &mut reclaim);
    assert_eq!((w.stats().frames, w.stats().huge_leaves, arena.live()), (4, 0, 4));
    // A map that runs out of memory leaves linked empty directories until a
    // clear (and a flush) returns them.
    arena.fail_at(2);
    assert_eq!(w.map(&arena, &arena, r4(7 * G1, 2 * PAGE), 0x40_0000, true), Err(MapError::Failed(Error::NoMemory)));
    assert_eq!(w.clear(&arena, r4(7 * G1, 2 * PAGE), &mut reclaim).entries, 0);
    w.reclaim(&t, &arena, &mut reclaim);
    assert_eq!((w.stats().frames, arena.live()), (4, 4));
    // Destroy frees everything, entries or not.
    w.destroy(&t, &arena, &arena);
    assert_eq!((arena.live(), t.root(), t.translate(&arena, G1 + PAGE)), (0, 0, None));
}

#[test]
fn mirror_table_of_the_simulated_ram() {
    // The same through hmm-testkit's `SimPhys` and `CountingAllocator`, kept
    // tiny: every `SimPhys::ptr` call retags the whole arena under Stacked
    // Borrows.
    let alloc = CountingAllocator::with_size(8 * PAGE);
    let phys = alloc.phys().clone();
    let (t, mut w) = MirrorTable::<L4>::new(&*phys, &*alloc).unwrap();
    let r = r4(0x20_0000, 2 * PAGE);
    w.map(&*phys, &*alloc, r, 0x20_0000, false).unwrap();
    assert_eq!(t.translate(&*phys, 0x20_1000).map(|e| e.frame()), Some(0x20_1000));
    let mut reclaim = Reclaim::new();
    assert_eq!(w.clear(&*phys, r, &mut reclaim).entries, 2);
    w.reclaim(&t, &*alloc, &mut reclaim);
    assert_eq!((w.stats().frames, alloc.live()), (1, 1));
    w.destroy(&t, &*phys, &*alloc);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn bitmap_allocator_hands_out_each_frame_once() {
    let bits = [AtomicU64::new(0), AtomicU64::new(0)];
    let a = BitmapFrameAllocator::new(BASE, 70, &bits).unwrap();
    let mut got: Vec<u64> = std::iter::from_fn(|| a.alloc_frame()).collect();
    assert_eq!(got.len(), 70);
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), 70);
    for f in got {
        // SAFETY: each frame came from `a` once and is not used afterwards.
        unsafe { a.free_frame(f) };
    }
    assert_eq!(a.live(), 0);
}

// ------------------------------------------------------------------ notifier registry

struct Counter {
    interval: Interval,
    calls: AtomicUsize,
}

impl Counter {
    fn new(range: VaRange) -> Self {
        Self { interval: Interval::new(range), calls: AtomicUsize::new(0) }
    }
}

impl Notifier for Counter {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.interval.set_seq(inv);
        self.calls.fetch_add(1, Ordering::SeqCst);
        true
    }
}

#[test]
fn registry_insert_defer_invalidate_remove_release() {
    let a = Counter::new(r4(0x1000, 4 * PAGE));
    let b = Counter::new(r4(0x10_0000, 4 * PAGE));
    let c = Counter::new(r4(0x2000, PAGE));
    let full = Counter::new(r4(0x3000, PAGE));
    {
        let reg = NotifierRegistry::<FixedStore<3>>::new();
        // SAFETY: every notifier outlives the registry and its registrations
        // (declared before them).
        let (_ra, rb) = unsafe { (reg.insert(&a).unwrap(), reg.insert(&b).unwrap()) };
        let inv = reg.invalidate_range_start(r4(0x2000, PAGE), Event::Unmap, true).unwrap();
        assert_eq!(reg.seq() % 2, 1);
        assert_eq!((a.calls.load(Ordering::SeqCst), b.calls.load(Ordering::SeqCst)), (1, 0));
        // An insert during an invalidation is deferred to its end.
        // SAFETY: as above.
        let _rc = unsafe { reg.insert(&c) }.unwrap();
        assert_eq!(reg.len(), 2);
        // SAFETY: as above.
        assert_eq!(unsafe { reg.insert(&full) }.err(), Some(Error::Capacity), "the pending insert holds the last slot");
        reg.invalidate_range_end(inv);
        assert_eq!(reg.len(), 3);
        let seq = reg.read_begin(&c.interval);
        assert!(!reg.read_retry(&c.interval, seq));
        let inv = reg.invalidate_range_start(r4(0, 1 << 47), Event::Clear, true).unwrap();
        reg.invalidate_range_end(inv);
        assert!(reg.read_retry(&c.interval, seq));
        assert_eq!(c.calls.load(Ordering::SeqCst), 1);
        rb.remove();
        assert!(!b.interval.is_registered());
        reg.release();
        assert_eq!((a.calls.load(Ordering::SeqCst), c.calls.load(Ordering::SeqCst)), (3, 2));
        // SAFETY: as above.
        assert_eq!(unsafe { reg.insert(&b) }.err(), Some(Error::Released));
    }
    {
        // The growable store, with a remove of a pending insert.
        let reg = NotifierRegistry::<VecStore>::new();
        let inv = reg.invalidate_range_start(r4(0x1000, PAGE), Event::Unmap, true).unwrap();
        // SAFETY: `full` outlives the registry.
        let rf = unsafe { reg.insert(&full) }.unwrap();
        rf.remove();
        reg.invalidate_range_end(inv);
        assert!(reg.is_empty());
    }
}

#[test]
fn registry_remove_waits_for_a_running_invalidation_on_another_thread() {
    watchdog::bounded("remove waiting for a running invalidation", watchdog::BOUND, || {
        let a = Counter::new(r4(0x1000, 4 * PAGE));
        let reg = NotifierRegistry::<VecStore>::new();
        // SAFETY: `a` outlives the registry.
        let ra = unsafe { reg.insert(&a) }.unwrap();
        let inv = reg.invalidate_range_start(r4(0x1000, PAGE), Event::Unmap, true).unwrap();
        let removed = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                ra.remove();
                removed.store(true, Ordering::SeqCst);
            });
            let r = s.spawn(|| reg.read_begin(&a.interval));
            for _ in 0..3 {
                std::thread::yield_now();
            }
            assert!(!removed.load(Ordering::SeqCst), "remove returned during the invalidation");
            reg.invalidate_range_end(inv);
            t.join().unwrap();
            r.join().unwrap();
        });
        assert!(reg.is_empty());
        assert_eq!(a.calls.load(Ordering::SeqCst), 1);
    });
}

// ------------------------------------------------------------------ a whole mirror on the model kernel

const BUF: u64 = 0x1000_0000;

fn small_kernel(frames: u64) -> (Arc<CountingAllocator>, ModelSpace) {
    let alloc = CountingAllocator::with_size(frames * PAGE);
    let space = ModelSpace::new(&alloc).expect("space");
    (alloc, space)
}

fn small_mirror<'s>(space: &'s ModelSpace, alloc: &'s CountingAllocator) -> common::DevMirror<'s> {
    Mirror::new(space, alloc, device(space), r4(BUF, 64 * PAGE), MirrorConfig::default()).expect("mirror")
}

#[test]
fn model_mirror_fault_invalidate_fork_teardown_cycle() {
    let (alloc, space) = small_kernel(96);
    let buf = space.map(BUF, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let ro = space.map(BUF + 16 * PAGE, 2 * PAGE, R, RegionKind::PrivateAnon).unwrap();
    let shared = space.map(BUF + 32 * PAGE, 2 * PAGE, RW, RegionKind::SharedAnon).unwrap();
    let data = pattern(8 * PAGE as usize, 0x5a);
    {
        let m = pin!(small_mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        // Device write then read: demand-zero faults, mirror and device TLB.
        dmirror::write(&m, buf.start() + 3, &data[3..]).unwrap();
        assert_eq!(dmirror::read(&m, buf.start() + 3, data.len() - 3).unwrap(), &data[3..]);
        let mut cpu = vec![0u8; data.len()];
        space.read_bytes(buf.start(), &mut cpu).unwrap();
        assert_eq!(&cpu[3..], &data[3..]);
        assert_mirror_coherent(&m, &space, m.range());
        assert_eq!(m.table_frames(), 4);
        // Read-only region: the zero page, mirrored read-only; writes refused.
        assert_eq!(dmirror::read(&m, ro.start(), 16).unwrap(), [0; 16]);
        assert_eq!(dmirror::write(&m, ro.start(), &[1]), Err(Error::Perm));
        assert_eq!(dmirror::snapshot(&m, ro).unwrap(), [prot::ZERO | prot::READ, prot::NONE]);
        // Shared memory.
        dmirror::write(&m, shared.start() + PAGE, b"shared").unwrap();
        // Outside every region, outside the mirror.
        assert_eq!(m.fault(r4(BUF + 8 * PAGE, PAGE), false), Err(Error::Fault));
        assert_eq!(m.fault(r4(BUF + 64 * PAGE, PAGE), false), Err(Error::OutOfRange));

        // mprotect read-only: the mirror loses write, data stays.
        space.protect(buf, R).unwrap();
        assert!(m.translate(buf.start()).is_none_or(|e| !e.is_write()));
        assert_mirror_coherent(&m, &space, m.range());
        assert_eq!(dmirror::read(&m, buf.start() + PAGE, 8).unwrap(), &data[PAGE as usize..PAGE as usize + 8]);
        space.protect(buf, RW).unwrap();

        // Fork: private pages become copy-on-write in both; a child write
        // breaks COW, the parent's mirror keeps the parent's frames.
        let child = space.fork().unwrap();
        child.write_bytes(buf.start(), b"child").unwrap();
        assert_mirror_coherent(&m, &space, m.range());
        dmirror::write(&m, buf.start(), b"parent").unwrap();
        let mut back = [0u8; 6];
        child.read_bytes(buf.start(), &mut back[..5]).unwrap();
        assert_eq!(&back[..5], b"child");
        child.read_bytes(shared.start() + PAGE, &mut back).unwrap();
        assert_eq!(&back, b"shared", "shared memory is shared with the child");
        drop(child);
        assert_mirror_coherent(&m, &space, m.range());

        // Zap, unmap, snapshot; every invalidation empties mirror entries
        // and frees emptied directories.
        space.clear(r4(buf.start(), 2 * PAGE)).unwrap();
        assert_eq!(m.translate(buf.start()), None);
        // Page 2 is still write-protected from the fork (until a write fault).
        let snap = dmirror::snapshot(&m, r4(buf.start(), 3 * PAGE)).unwrap();
        assert_eq!(snap, [prot::NONE, prot::NONE, prot::READ]);
        space.unmap(buf).unwrap();
        space.unmap(ro).unwrap();
        assert_mirror_coherent(&m, &space, m.range());
        let mut pfns = vec![Pfn::NONE; 2];
        m.snapshot(r4(buf.start(), 2 * PAGE), &mut pfns).unwrap();
        assert_eq!(pfns, [Pfn::ERROR_ENTRY; 2], "no region: ERROR");
        counters(&m);
        let s = m.stats();
        assert!(s.invalidations > 0 && s.pages_invalidated > 0 && s.pages_mapped > 0, "{s:?}");
        m.unregister().unwrap();
        assert_eq!(m.table_frames(), 0);
        assert_eq!(m.fault(r4(BUF, PAGE), false), Err(Error::Unregistered));
    }
    space.check_tables();
    drop(space);
    assert_eq!(alloc.live(), 0, "no frame leaked");
}

#[test]
fn model_mirror_failure_paths_leave_nothing_behind() {
    let (alloc, space) = small_kernel(64);
    space.map(BUF, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.map(BUF + 8 * PAGE, 2 * PAGE, RW, RegionKind::Io).unwrap();
    {
        let m = pin!(small_mirror(&space, &alloc));
        assert_eq!(m.fault(r4(BUF, PAGE), false), Err(Error::Unregistered));
        m.as_ref().register().unwrap();
        assert_eq!(m.as_ref().register(), Err(Error::Busy));
        assert_eq!(m.fault(r4(BUF + 8 * PAGE, PAGE), false), Err(Error::Fault), "IO region");
        // Every allocation of one fault fails once, in turn.
        for k in 1.. {
            space.clear(r4(BUF, 4 * PAGE)).unwrap();
            let before = alloc.injected_failures();
            alloc.fail_at(k);
            let r = m.fault(r4(BUF, 4 * PAGE), true);
            alloc.clear_failures();
            assert_mirror_coherent(&m, &space, m.range());
            if alloc.injected_failures() == before {
                r.unwrap();
                break;
            }
            assert_eq!(r, Err(Error::NoMemory), "allocation {k}");
        }
        // The device refuses an update: the batch is cleared again.
        m.device().fail_update_at(1);
        space.clear(r4(BUF, 4 * PAGE)).unwrap();
        assert_eq!(m.fault(r4(BUF, 4 * PAGE), true), Err(Error::Device(-5)));
        assert_eq!(m.translate(BUF), None);
        // A non-blockable invalidation goes through when nobody holds the lock.
        m.fault(r4(BUF, PAGE), false).unwrap();
        let inv = space.notifiers().invalidate_range_start(r4(BUF, PAGE), Event::Unmap, false).unwrap();
        space.notifiers().invalidate_range_end(inv);
        assert_eq!(m.translate(BUF), None);
        counters(&m);
    }
    // Drop without unregister, then a released space refuses new mirrors.
    space.release();
    assert_eq!(
        Mirror::new(&space, &*alloc, device(&space), r4(BUF, PAGE), MirrorConfig::default()).err(),
        Some(Error::Released)
    );
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn model_mirror_fault_racing_unmap_on_another_thread() {
    watchdog::bounded("faults racing unmap/map/protect", watchdog::BOUND, || {
        let (alloc, space) = small_kernel(64);
        let buf = space.map(BUF, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        {
            let m = pin!(small_mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let m = &*m;
            std::thread::scope(|s| {
                s.spawn(|| {
                    for _ in 0..3 {
                        // Any of these may fail while the region is gone.
                        let _ = dmirror::read(m, buf.start(), 2 * PAGE as usize);
                        let _ = m.fault(buf, true);
                    }
                });
                for _ in 0..2 {
                    space.unmap(buf).unwrap();
                    space.map(BUF, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
                    space.protect(buf, R).unwrap();
                    space.protect(buf, RW).unwrap();
                }
            });
            assert_mirror_coherent(m, &space, m.range());
            counters(m);
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

#[test]
fn long_model_mirror_of_a_transparent_huge_page() {
    // 2 MiB of RAM for the huge page plus tables: slower under Miri (the
    // allocator poisons the whole chunk), so quick mode skips `long_*`.
    let (alloc, space) = small_kernel(2 * 512 + 64);
    let buf = space.map(0x4000_0000, M2, RW, RegionKind::Thp).unwrap();
    {
        let m = pin!(Mirror::new(&space, &*alloc, device(&space), buf, MirrorConfig::default()).unwrap());
        m.as_ref().register().unwrap();
        m.fault(r4(buf.start(), 2 * PAGE), true).unwrap();
        let snap = dmirror::snapshot(&m, r4(buf.start(), 2 * PAGE)).unwrap();
        assert_eq!(snap, [prot::WRITE | prot::PMD; 2]);
        // Protecting one page splits the huge leaf.
        space.protect(r4(buf.start() + PAGE, PAGE), R).unwrap();
        assert_mirror_coherent(&m, &space, buf);
        let snap = dmirror::snapshot(&m, r4(buf.start(), 2 * PAGE)).unwrap();
        assert_eq!(snap, [prot::WRITE, prot::READ]);
        counters(&m);
    }
    space.protect(buf, RegionFlags::READ).unwrap();
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// A device reading a page while the CPU writes it. The dummy device reads
/// and writes simulated RAM with atomic 8-byte bus accesses, as `SimPhys`
/// does, so under Miri this is free of data races (it was ignored there while
/// the device used volatile byte reads).
#[test]
fn model_device_read_racing_cpu_write() {
    watchdog::bounded("device reads racing CPU writes", watchdog::BOUND, || {
        let (alloc, space) = small_kernel(64);
        let buf = space.map(BUF, PAGE, RW, RegionKind::PrivateAnon).unwrap();
        space.write_bytes(buf.start(), &[1; 64]).unwrap();
        {
            let m = pin!(small_mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let m = &*m;
            std::thread::scope(|s| {
                s.spawn(|| {
                    for _ in 0..2 {
                        let got = dmirror::read(m, buf.start(), 64).unwrap();
                        assert!(got.iter().all(|&b| b <= 1), "{got:?}");
                    }
                });
                for i in 0..2u8 {
                    space.write_bytes(buf.start(), &[i; 64]).unwrap();
                }
            });
            counters(m);
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}
