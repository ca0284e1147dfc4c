//! The range walker and the per-page snapshot over real x86_64 tables built
//! in a host arena, checked against literal expectations and against a plain
//! model of what the test mapped.

use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use hmm_core::pt::{snapshot, walk, Pfn, Span};
use hmm_core::{Error, PhysMem, VaRange};
use proptest::prelude::*;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};

type L4 = X86_64Level4;
type L5 = X86_64Level5;

const PAGE: u64 = 1 << 12;
const M2: u64 = 1 << 21;
const G1: u64 = 1 << 30;
const G512: u64 = 1 << 39;
const T256: u64 = 1 << 48;

/// Physical address of the arena's first frame.
const ARENA_BASE: u64 = 1 << 30;

// ------------------------------------------------------------------ arena

/// Simulated physical memory: `frames` zeroed 4 KiB frames at `ARENA_BASE`.
struct Arena {
    words: Vec<AtomicU64>,
    next: Cell<usize>,
}

impl Arena {
    fn new(frames: usize) -> Self {
        Self { words: (0..frames * 512).map(|_| AtomicU64::new(0)).collect(), next: Cell::new(0) }
    }

    fn frames(&self) -> usize {
        self.words.len() / 512
    }

    fn alloc(&self) -> u64 {
        let i = self.next.get();
        assert!(i < self.frames(), "test arena exhausted");
        self.next.set(i + 1);
        ARENA_BASE + i as u64 * PAGE
    }

    fn word(&self, pa: u64) -> &AtomicU64 {
        assert!(pa >= ARENA_BASE && pa.is_multiple_of(8), "bad table address {pa:#x}");
        &self.words[((pa - ARENA_BASE) / 8) as usize]
    }
}

// SAFETY: every address inside the arena maps to its own word of `words`,
// which lives (and does not move) as long as the arena; the pointer is derived
// from the whole vector, so it is valid for the entire frame; the words are
// atomics, so shared mutation through the pointer is sound. Addresses outside
// the arena panic instead of returning a dangling pointer.
unsafe impl PhysMem for Arena {
    fn ptr(&self, pa: u64) -> *mut u8 {
        let end = ARENA_BASE + self.frames() as u64 * PAGE;
        assert!((ARENA_BASE..end).contains(&pa), "walker touched {pa:#x}, outside the arena");
        let i = ((pa - ARENA_BASE) / 8) as usize;
        // SAFETY: `i < words.len()` by the assertion above.
        let p = unsafe { self.words.as_ptr().add(i) } as *mut u8;
        // SAFETY: the byte offset within the word is below 8.
        unsafe { p.add((pa % 8) as usize) }
    }
}

// ------------------------------------------------------------------ tables + model

/// What the test put in one table entry.
#[derive(Clone, Copy, Debug)]
enum Node {
    Table { frame: u64, flags: LeafFlags },
    Entry(PteView),
}

const FULL_DIR: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::EXEC);

fn shift_of(level: usize) -> u32 {
    12 + 9 * level as u32
}
fn mask_of(level: usize) -> u64 {
    (1u64 << shift_of(level)) - 1
}
/// Index of `va` at `level`, computed here rather than by the library.
fn idx(va: u64, level: usize) -> u64 {
    (va >> shift_of(level)) & 511
}

fn leaf_flags(write: bool, user: bool) -> LeafFlags {
    let mut f = LeafFlags::READ | LeafFlags::EXEC | LeafFlags::ACCESSED;
    f.set(LeafFlags::WRITE, write);
    f.set(LeafFlags::USER, user);
    f
}

/// Real x86_64 tables in an arena plus a model: (level, entry base) -> node.
struct Space<F: PteFormat> {
    arena: Arena,
    root: u64,
    model: BTreeMap<(usize, u64), Node>,
    _format: PhantomData<F>,
}

impl<F: PteFormat> Space<F> {
    fn levels() -> usize {
        <F::Geometry as PagingGeometry>::LEVELS
    }

    fn new(frames: usize) -> Self {
        let arena = Arena::new(frames);
        let root = arena.alloc();
        Self { arena, root, model: BTreeMap::new(), _format: PhantomData }
    }

    fn slot(&self, table: u64, va: u64, level: usize) -> &AtomicU64 {
        self.arena.word(table + idx(va, level) * 8)
    }

    fn write(&self, table: u64, va: u64, level: usize, view: &PteView) {
        let raw = F::encode(view, level).unwrap_or_else(|e| panic!("encode {view:?} at {level}: {e}"));
        self.slot(table, va, level).store(raw, Ordering::Release);
    }

    /// The table holding `va`'s entry at `level`, creating missing tables
    /// with full permissions; `None` if a non-table entry is in the way.
    fn table_for(&mut self, va: u64, level: usize) -> Option<u64> {
        let mut table = self.root;
        for l in (level + 1..Self::levels()).rev() {
            let key = (l, va & !mask_of(l));
            table = match self.model.get(&key) {
                Some(Node::Table { frame, .. }) => *frame,
                Some(Node::Entry(_)) => return None,
                None => {
                    let frame = self.arena.alloc();
                    self.write(table, va, l, &PteView::Table { frame, flags: FULL_DIR });
                    self.model.insert(key, Node::Table { frame, flags: FULL_DIR });
                    frame
                }
            };
        }
        Some(table)
    }

    /// Whether `view` could be set at (`va`, `level`) without replacing anything.
    fn is_free(&self, va: u64, level: usize) -> bool {
        if self.model.contains_key(&(level, va & !mask_of(level))) {
            return false;
        }
        (level + 1..Self::levels()).all(|l| !matches!(self.model.get(&(l, va & !mask_of(l))), Some(Node::Entry(_))))
    }

    fn try_set(&mut self, va: u64, level: usize, view: PteView) -> bool {
        assert_eq!(va & mask_of(level), 0, "unaligned test mapping");
        if !self.is_free(va, level) {
            return false;
        }
        let table = self.table_for(va, level).expect("checked by is_free");
        self.write(table, va, level, &view);
        self.model.insert((level, va), Node::Entry(view));
        true
    }

    fn set(&mut self, va: u64, level: usize, view: PteView) {
        assert!(self.try_set(va, level, view), "test mapping {va:#x} at {level} overlaps an earlier one");
    }

    fn map(&mut self, va: u64, level: usize, frame: u64, write: bool, user: bool) {
        self.set(va, level, PteView::Leaf { frame, flags: leaf_flags(write, user) });
    }

    /// Stores a raw value the format may consider malformed; `view` is what
    /// the test expects it to decode to.
    fn set_raw(&mut self, va: u64, level: usize, raw: u64, view: PteView) {
        assert!(self.is_free(va, level));
        let table = self.table_for(va, level).unwrap();
        self.slot(table, va, level).store(raw, Ordering::Release);
        self.model.insert((level, va & !mask_of(level)), Node::Entry(view));
    }

    /// Gives the existing directory entry at (`va`, `level`) the permissions `flags`.
    fn restrict_dir(&mut self, va: u64, level: usize, flags: LeafFlags) -> bool {
        let key = (level, va & !mask_of(level));
        let Some(Node::Table { frame, .. }) = self.model.get(&key).copied() else {
            return false;
        };
        let parent = self.table_for(va, level).unwrap();
        self.write(parent, va, level, &PteView::Table { frame, flags });
        self.model.insert(key, Node::Table { frame, flags });
        true
    }

    // ---------------- expectations from the model alone

    /// The visits a correct walk of `[start, last]` makes.
    fn reference(&self, range: VaRange) -> Vec<Visit> {
        let mut out = Vec::new();
        self.reference_in(Self::levels() - 1, range.start(), range.last(), FULL_DIR, &mut out);
        out
    }

    fn reference_in(&self, level: usize, start: u64, last: u64, allowed: LeafFlags, out: &mut Vec<Visit>) {
        let mask = mask_of(level);
        let mut va = start;
        loop {
            let base = va & !mask;
            let entry_last = (va | mask).min(last);
            match self.model.get(&(level, base)) {
                Some(Node::Table { flags, .. }) => self.reference_in(level - 1, va, entry_last, allowed & *flags, out),
                Some(Node::Entry(view)) => {
                    out.push(Visit::new(va, entry_last, level, base, restricted(*view, allowed)))
                }
                None => out.push(Visit::new(va, entry_last, level, base, PteView::Absent)),
            }
            if entry_last == last {
                return;
            }
            va = entry_last + 1;
        }
    }

    /// What the snapshot must report for the page at `va`.
    fn expected(&self, va: u64) -> Pfn {
        let mut allowed = FULL_DIR;
        for level in (0..Self::levels()).rev() {
            let base = va & !mask_of(level);
            match self.model.get(&(level, base)) {
                None => return Pfn::NONE,
                Some(Node::Table { flags, .. }) => allowed &= *flags,
                Some(Node::Entry(PteView::Leaf { frame, flags })) => {
                    let user = flags.contains(LeafFlags::USER) && allowed.contains(LeafFlags::USER);
                    let write = flags.contains(LeafFlags::WRITE) && allowed.contains(LeafFlags::WRITE);
                    return if user {
                        Pfn::valid(frame + (va & mask_of(level) & !(PAGE - 1)), write, 9 * level as u32)
                    } else {
                        Pfn::ERROR_ENTRY
                    };
                }
                Some(Node::Entry(PteView::ProtNone { .. } | PteView::Invalid(_))) => return Pfn::ERROR_ENTRY,
                Some(Node::Entry(_)) => return Pfn::NONE,
            }
        }
        unreachable!("level 0 always ends the descent")
    }

    // ---------------- calling the library

    fn walk_all(&self, range: VaRange) -> Vec<Visit> {
        let mut out = Vec::new();
        let mut record = |span: Span, entry: PteView| {
            out.push(Visit::from_span(span, entry));
            ControlFlow::<()>::Continue(())
        };
        // SAFETY: `root` is a live root table of format `F` in `arena`, and
        // every table stays allocated as long as `self`.
        let r = unsafe { walk::<F, _, _>(&self.arena, self.root, range, &mut record) };
        assert_eq!(r, Ok(ControlFlow::Continue(())));
        out
    }

    fn snapshot(&self, range: VaRange) -> Vec<Pfn> {
        let mut out = vec![Pfn(0xdead_beef); range.pages(12) as usize];
        // SAFETY: as in `walk_all`.
        let r = unsafe { snapshot::<F, _>(&self.arena, self.root, range, &mut out) };
        assert_eq!(r, Ok(()), "snapshot of {range:?}");
        out
    }

    /// Walk and snapshot of `range` agree with the model.
    #[track_caller]
    fn check(&self, range: VaRange) {
        self.check_walk(range);
        self.check_snapshot(range);
    }

    #[track_caller]
    fn check_walk(&self, range: VaRange) -> Vec<Visit> {
        let visits = self.walk_all(range);
        check_partition(range, &visits);
        let expected = self.reference(range);
        if visits != expected {
            let at = visits.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(visits.len().min(expected.len()));
            panic!(
                "walk of {range:?}: {} visits, expected {}; first difference at #{at}: {:?} vs {:?}",
                visits.len(),
                expected.len(),
                visits.get(at),
                expected.get(at)
            );
        }
        visits
    }

    #[track_caller]
    fn check_snapshot(&self, range: VaRange) {
        let out = self.snapshot(range);
        for (i, got) in out.iter().enumerate() {
            let va = range.start() + i as u64 * PAGE;
            let want = self.expected(va);
            assert_eq!(*got, want, "snapshot page {va:#x}: got {:#x}, expected {:#x}", got.0, want.0);
        }
    }
}

fn restricted(view: PteView, allowed: LeafFlags) -> PteView {
    let perms = LeafFlags::WRITE | LeafFlags::USER | LeafFlags::EXEC;
    let cut = |f: LeafFlags| f - (perms - allowed);
    match view {
        PteView::Leaf { frame, flags } => PteView::Leaf { frame, flags: cut(flags) },
        PteView::ProtNone { frame, flags } => PteView::ProtNone { frame, flags: cut(flags) },
        other => other,
    }
}

/// One visit as the walker reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Visit {
    start: u64,
    last: u64,
    level: usize,
    shift: u32,
    base: u64,
    view: PteView,
}

impl Visit {
    fn new(start: u64, last: u64, level: usize, base: u64, view: PteView) -> Self {
        Self { start, last, level, shift: shift_of(level), base, view }
    }
    fn from_span(span: Span, view: PteView) -> Self {
        Self {
            start: span.range.start(),
            last: span.range.last(),
            level: span.level,
            shift: span.shift,
            base: span.entry_base(),
            view,
        }
    }
}

/// Model-free checks: the visits tile the range in order, each lies within
/// one entry, is clipped only by the range, and is never a table.
#[track_caller]
fn check_partition(range: VaRange, visits: &[Visit]) {
    assert!(!visits.is_empty());
    assert_eq!(visits[0].start, range.start(), "first visit");
    assert_eq!(visits[visits.len() - 1].last, range.last(), "last visit");
    for w in visits.windows(2) {
        assert_eq!(w[1].start, w[0].last.wrapping_add(1), "gap or overlap between {:?} and {:?}", w[0], w[1]);
    }
    for v in visits {
        let mask = mask_of(v.level);
        assert_eq!(v.shift, shift_of(v.level), "{v:?}");
        assert_eq!(v.base, v.start & !mask, "{v:?}");
        assert!(v.start <= v.last && v.last <= v.base | mask, "visit spans two entries: {v:?}");
        assert!(v.start == v.base || v.start == range.start(), "visit clipped without reason: {v:?}");
        assert!(v.last == v.base | mask || v.last == range.last(), "visit clipped without reason: {v:?}");
        assert!(!matches!(v.view, PteView::Table { .. }), "walker reported a table: {v:?}");
    }
}

fn range<G: PagingGeometry>(start: u64, len: u64) -> VaRange {
    VaRange::new::<G>(start, len).unwrap_or_else(|e| panic!("range {start:#x}+{len:#x}: {e}"))
}

fn hole(start: u64, last: u64, level: usize) -> Visit {
    Visit::new(start, last, level, start & !mask_of(level), PteView::Absent)
}

const VALID: u64 = Pfn::VALID;
const WRITE: u64 = Pfn::WRITE;
const ERROR: u64 = Pfn::ERROR;

// ------------------------------------------------------------------ holes

#[test]
fn empty_table_is_one_visit_per_root_entry() {
    let s = Space::<L4>::new(4);
    assert_eq!(s.walk_all(range::<L4>(0, 2 * G512)), [hole(0, G512 - 1, 3), hole(G512, 2 * G512 - 1, 3)]);
    // Clipped at both ends.
    assert_eq!(
        s.walk_all(range::<L4>(0x1000, G512 + 0x1000)),
        [hole(0x1000, 0x7f_ffff_ffff, 3), hole(0x80_0000_0000, 0x80_0000_1fff, 3)]
    );
    // The whole lower half: 256 root entries.
    let all = s.check_walk(range::<L4>(0, 1 << 47));
    assert_eq!(all.len(), 256);
    assert!(all.iter().all(|v| v.view == PteView::Absent && v.level == 3));
    // A single page in the middle of nothing.
    assert_eq!(s.walk_all(range::<L4>(0x1234_5000, PAGE)), [hole(0x1234_5000, 0x1234_5fff, 3)]);
    assert_eq!(s.snapshot(range::<L4>(0x1234_5000, 3 * PAGE)), [Pfn::NONE; 3]);
}

#[test]
fn holes_at_every_level_are_one_span_per_empty_entry() {
    let mut s = Space::<L4>::new(8);
    // PML4 0, PDPT 1, PD 1, PT 3.
    s.map(0x4020_3000, 0, 0x1_2345_6000, true, true);
    let leaf = PteView::Leaf { frame: 0x1_2345_6000, flags: leaf_flags(true, true) };

    // The 1 GiB of PDPT entry 1.
    let v = s.check_walk(range::<L4>(0x4000_0000, G1));
    assert_eq!(v.len(), 1 + 3 + 1 + 508 + 510);
    assert_eq!(v[0], hole(0x4000_0000, 0x401f_ffff, 1));
    assert_eq!(v[1], hole(0x4020_0000, 0x4020_0fff, 0));
    assert_eq!(v[3], hole(0x4020_2000, 0x4020_2fff, 0));
    assert_eq!(v[4], Visit::new(0x4020_3000, 0x4020_3fff, 0, 0x4020_3000, leaf));
    assert_eq!(v[5], hole(0x4020_4000, 0x4020_4fff, 0));
    assert_eq!(v[512], hole(0x403f_f000, 0x403f_ffff, 0));
    assert_eq!(v[513], hole(0x4040_0000, 0x405f_ffff, 1));
    assert_eq!(v[1022], hole(0x7fe0_0000, 0x7fff_ffff, 1));

    // Two root entries: holes at levels 3, 2, 1 and 0 around the page.
    let v = s.check_walk(range::<L4>(0, 2 * G512));
    assert_eq!(v.len(), 511 + 511 + 511 + 1 + 1);
    assert_eq!(v[0], hole(0, G1 - 1, 2));
    assert_eq!(v[1], hole(0x4000_0000, 0x401f_ffff, 1));
    assert_eq!(v[2], hole(0x4020_0000, 0x4020_0fff, 0));
    assert_eq!(v[5].view, leaf);
    assert_eq!(v[v.len() - 2], hole(0x7f_c000_0000, 0x7f_ffff_ffff, 2));
    assert_eq!(v[v.len() - 1], hole(G512, 2 * G512 - 1, 3));

    // A range inside one empty page-table entry, and one ending on the leaf.
    assert_eq!(s.walk_all(range::<L4>(0x4020_1000, PAGE)), [hole(0x4020_1000, 0x4020_1fff, 0)]);
    assert_eq!(s.walk_all(range::<L4>(0x4020_2000, 2 * PAGE)).len(), 2);

    assert_eq!(s.snapshot(range::<L4>(0x4020_2000, 3 * PAGE)), [Pfn::NONE, Pfn(VALID | WRITE | 0x12_3456), Pfn::NONE]);
    s.check_snapshot(range::<L4>(0x4000_0000, 2 * M2));
}

// ------------------------------------------------------------------ huge leaves

#[test]
fn huge_leaves_are_one_clipped_visit() {
    let mut s = Space::<L4>::new(8);
    s.map(0x4020_0000, 1, 0x1_0000_0000, true, true); // 2 MiB
    s.map(0x8000_0000, 2, 0x40_0000_0000, false, true); // 1 GiB
    let l2m = PteView::Leaf { frame: 0x1_0000_0000, flags: leaf_flags(true, true) };
    let l1g = PteView::Leaf { frame: 0x40_0000_0000, flags: leaf_flags(false, true) };

    let r = range::<L4>(0x4030_0000, 0x8010_0000 - 0x4030_0000);
    let v = s.check_walk(r);
    assert_eq!(v.len(), 1 + 510 + 1);
    assert_eq!(v[0], Visit::new(0x4030_0000, 0x403f_ffff, 1, 0x4020_0000, l2m));
    assert_eq!(v[0].shift, 21);
    assert_eq!(v[1], hole(0x4040_0000, 0x405f_ffff, 1));
    assert_eq!(v[511], Visit::new(0x8000_0000, 0x800f_ffff, 2, 0x8000_0000, l1g));
    assert_eq!(v[511].shift, 30);

    // A whole 1 GiB leaf and the whole 2 MiB leaf: one visit each.
    assert_eq!(s.walk_all(range::<L4>(0x8000_0000, G1)), [Visit::new(0x8000_0000, 0xbfff_ffff, 2, 0x8000_0000, l1g)]);
    assert_eq!(s.walk_all(range::<L4>(0x4020_0000, M2)), [Visit::new(0x4020_0000, 0x403f_ffff, 1, 0x4020_0000, l2m)]);
    // One page in the middle of the 1 GiB leaf.
    assert_eq!(s.walk_all(range::<L4>(0x9234_5000, PAGE)), [Visit::new(0x9234_5000, 0x9234_5fff, 2, 0x8000_0000, l1g)]);

    let out = s.snapshot(r);
    assert_eq!(out.len(), 0x3fe00);
    // Every page of the 2 MiB leaf: its own frame, WRITE, order 9.
    for (i, p) in out[..256].iter().enumerate() {
        assert_eq!(*p, Pfn(VALID | WRITE | 9 << 55 | (0x10_0100 + i as u64)), "page {i}");
    }
    assert!(out[256..256 + 510 * 512].iter().all(|p| *p == Pfn::NONE));
    // Every page of the 1 GiB leaf: read-only, order 18.
    for (i, p) in out[256 + 510 * 512..].iter().enumerate() {
        assert_eq!(*p, Pfn(VALID | 18 << 55 | (0x400_0000 + i as u64)), "page {i}");
        assert_eq!((p.phys(), p.order(), p.is_write()), (0x40_0000_0000 + i as u64 * PAGE, 18, false));
    }
    // Frames inside the 1 GiB leaf far from its start.
    assert_eq!(s.snapshot(range::<L4>(0xbfff_f000, PAGE)), [Pfn(VALID | 18 << 55 | 0x403_ffff)]);
    s.check_snapshot(range::<L4>(0x4000_0000, 3 * M2));
}

// ------------------------------------------------------------------ snapshot semantics

#[test]
fn snapshot_reports_each_kind_of_entry() {
    let mut s = Space::<L4>::new(16);
    let base = 0x4000_0000;
    s.map(base, 0, 0x10_0000, true, true);
    s.map(base + 0x1000, 0, 0x10_1000, false, true);
    s.map(base + 0x2000, 0, 0x10_2000, true, false); // supervisor
    s.set(base + 0x3000, 0, PteView::ProtNone { frame: 0x10_3000, flags: leaf_flags(true, true) });
    s.set(base + 0x4000, 0, PteView::Special(SpecialEntry::Swap { offset: 77 }));
    s.set(base + 0x5000, 0, PteView::Special(SpecialEntry::Migration { frame: 0x10_5000, write: true }));
    s.set(base + 0x6000, 0, PteView::Special(SpecialEntry::DevicePrivate { frame: 0x10_6000, owner: 3, write: true }));
    s.set(
        base + 0x7000,
        0,
        PteView::Special(SpecialEntry::DeviceExclusive { frame: 0x10_7000, owner: 3, write: true }),
    );
    s.set(base + 0x8000, 0, PteView::Special(SpecialEntry::Other(0xdead_0000)));
    // base + 0x9000: absent.
    let no_exec = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER;
    s.set(base + 0xa000, 0, PteView::Leaf { frame: 0x10_a000, flags: no_exec });
    let status = no_exec | LeafFlags::ACCESSED | LeafFlags::DIRTY | LeafFlags::GLOBAL;
    s.set(base + 0xb000, 0, PteView::Leaf { frame: 0x10_b000, flags: status });
    s.set(base + 0xc000, 0, PteView::Leaf { frame: 0, flags: no_exec });

    let out = s.snapshot(range::<L4>(base, 0xd000));
    assert_eq!(
        out,
        [
            Pfn(0xc000_0000_0000_0100),
            Pfn(0x8000_0000_0000_0101),
            Pfn(0x2000_0000_0000_0000),
            Pfn(0x2000_0000_0000_0000),
            Pfn(0),
            Pfn(0),
            Pfn(0),
            Pfn(0),
            Pfn(0),
            Pfn(0),
            Pfn(0xc000_0000_0000_010a),
            Pfn(0xc000_0000_0000_010b),
            Pfn(0xc000_0000_0000_0000),
        ]
    );
    assert_eq!(out[1].0 & Pfn::FLAGS, VALID);
    assert_eq!(out[2].0 & Pfn::FLAGS, ERROR);
    s.check(range::<L4>(base, 0xd000));
    // The walker hands the special entries over unchanged.
    let v = s.walk_all(range::<L4>(base + 0x6000, PAGE));
    assert_eq!(v[0].view, PteView::Special(SpecialEntry::DevicePrivate { frame: 0x10_6000, owner: 3, write: true }));
}

#[test]
fn prot_none_and_specials_at_every_leaf_level() {
    let mut s = Space::<L4>::new(16);
    // 4 KiB, 2 MiB and 1 GiB PROT_NONE.
    s.set(0x4000_0000, 0, PteView::ProtNone { frame: 0x5000, flags: leaf_flags(true, true) });
    s.set(0x4020_0000, 1, PteView::ProtNone { frame: 0x20_0000, flags: leaf_flags(true, true) });
    s.set(0x8000_0000, 2, PteView::ProtNone { frame: 0x4000_0000, flags: leaf_flags(true, true) });
    // Specials at 2 MiB and 1 GiB.
    s.set(0x4040_0000, 1, PteView::Special(SpecialEntry::Migration { frame: 0x40_0000, write: false }));
    s.set(0xc000_0000, 2, PteView::Special(SpecialEntry::Swap { offset: 9 }));
    // Supervisor 2 MiB and 1 GiB leaves.
    s.map(0x4060_0000, 1, 0x60_0000, true, false);
    s.map(0x1_0000_0000, 2, 0x1_0000_0000, true, false);

    let at = |va: u64, n: u64| s.snapshot(range::<L4>(va, n * PAGE));
    assert_eq!(at(0x4000_0000, 2), [Pfn::ERROR_ENTRY, Pfn::NONE]);
    assert!(at(0x4020_0000, 512).iter().all(|p| *p == Pfn::ERROR_ENTRY));
    assert!(at(0x8000_0000, 1024).iter().all(|p| *p == Pfn::ERROR_ENTRY));
    assert!(at(0xbfff_f000, 1).iter().all(|p| *p == Pfn::ERROR_ENTRY));
    assert!(at(0x4040_0000, 512).iter().all(|p| *p == Pfn::NONE));
    assert!(at(0xc000_0000, 1024).iter().all(|p| *p == Pfn::NONE));
    assert!(at(0x4060_0000, 512).iter().all(|p| *p == Pfn::ERROR_ENTRY));
    assert!(at(0x1_0000_0000, 512).iter().all(|p| *p == Pfn::ERROR_ENTRY));
    assert_eq!(at(0x1_3fff_f000, 2), [Pfn::ERROR_ENTRY, Pfn::NONE]);

    // The walker reports each of them as one visit at its level.
    let v = s.check_walk(range::<L4>(0x8000_0000, 2 * G1));
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].view, PteView::ProtNone { frame: 0x4000_0000, flags: leaf_flags(true, true) });
    assert_eq!((v[0].level, v[1].level), (2, 2));
    assert_eq!(v[1].view, PteView::Special(SpecialEntry::Swap { offset: 9 }));
    s.check(range::<L4>(0x4000_0000, 4 * M2));
}

#[test]
fn directory_permissions_restrict_leaves() {
    let mut s = Space::<L4>::new(16);
    // PDPT entry 2 (0x8000_0000..): read-only directory.
    s.map(0x8000_0000, 0, 0x1000, true, true);
    s.map(0x8020_0000, 1, 0x20_0000, true, true);
    s.set(0x8040_0000, 0, PteView::ProtNone { frame: 0x3000, flags: leaf_flags(true, true) });
    assert!(s.restrict_dir(0x8000_0000, 2, LeafFlags::READ | LeafFlags::USER | LeafFlags::EXEC));
    // PDPT entry 3 (0xc000_0000..): supervisor-only directory.
    s.map(0xc000_0000, 0, 0x4000, true, true);
    assert!(s.restrict_dir(0xc000_0000, 2, LeafFlags::READ | LeafFlags::WRITE | LeafFlags::EXEC));
    // PD entry for 0x1_0020_0000: no-execute directory (snapshot unaffected).
    s.map(0x1_0020_0000, 0, 0x5000, true, true);
    assert!(s.restrict_dir(0x1_0020_0000, 1, LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER));
    // PML4 entry 1: read-only root entry over a 1 GiB leaf.
    s.map(G512, 2, 0x40_0000_0000, true, true);
    assert!(s.restrict_dir(G512, 3, LeafFlags::READ | LeafFlags::USER | LeafFlags::EXEC));

    let ro = LeafFlags::READ | LeafFlags::USER | LeafFlags::EXEC | LeafFlags::ACCESSED;
    let one = |va| s.walk_all(range::<L4>(va, PAGE))[0].view;
    assert_eq!(one(0x8000_0000), PteView::Leaf { frame: 0x1000, flags: ro });
    assert_eq!(one(0x8020_0000), PteView::Leaf { frame: 0x20_0000, flags: ro });
    assert_eq!(one(0x8040_0000), PteView::ProtNone { frame: 0x3000, flags: ro });
    assert_eq!(
        one(0xc000_0000),
        PteView::Leaf {
            frame: 0x4000,
            flags: LeafFlags::READ | LeafFlags::WRITE | LeafFlags::EXEC | LeafFlags::ACCESSED
        }
    );
    assert_eq!(
        one(0x1_0020_0000),
        PteView::Leaf {
            frame: 0x5000,
            flags: LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER | LeafFlags::ACCESSED
        }
    );
    assert_eq!(one(G512 + 0x1000), PteView::Leaf { frame: 0x40_0000_0000, flags: ro });

    assert_eq!(s.snapshot(range::<L4>(0x8000_0000, PAGE)), [Pfn(VALID | 0x1)]);
    assert_eq!(s.snapshot(range::<L4>(0x8020_0000, PAGE)), [Pfn(VALID | 9 << 55 | 0x200)]);
    assert_eq!(s.snapshot(range::<L4>(0x8040_0000, PAGE)), [Pfn::ERROR_ENTRY]);
    assert_eq!(s.snapshot(range::<L4>(0xc000_0000, PAGE)), [Pfn::ERROR_ENTRY]);
    assert_eq!(s.snapshot(range::<L4>(0x1_0020_0000, PAGE)), [Pfn(VALID | WRITE | 0x5)]);
    assert_eq!(s.snapshot(range::<L4>(G512 + G1 - PAGE, PAGE)), [Pfn(VALID | 18 << 55 | 0x403_ffff)]);
    // The unrestricted neighbour directory is untouched.
    s.map(0x4000_0000, 0, 0x6000, true, true);
    assert_eq!(s.snapshot(range::<L4>(0x4000_0000, PAGE)), [Pfn(VALID | WRITE | 0x6)]);
    s.check(range::<L4>(0x8000_0000, 3 * M2));
    s.check(range::<L4>(0xc000_0000, 2 * M2));
    s.check_walk(range::<L4>(0, 2 * G512));
}

#[test]
fn malformed_entries_are_errors() {
    let mut s = Space::<L4>::new(8);
    // Huge bit in a PML4 entry: a 512 GiB "leaf" does not exist.
    s.set_raw(2 * G512, 3, 0x0000_0000_0000_0087, PteView::Invalid(0x87));
    // Non-present software entry at level 3.
    s.set_raw(3 * G512, 3, 0x0000_0000_0000_0400, PteView::Invalid(0x400));
    let v = s.check_walk(range::<L4>(2 * G512 - PAGE, 2 * G512 + 2 * PAGE));
    assert_eq!(v.len(), 4);
    assert_eq!(v[1], Visit::new(2 * G512, 3 * G512 - 1, 3, 2 * G512, PteView::Invalid(0x87)));
    assert_eq!(v[2], Visit::new(3 * G512, 4 * G512 - 1, 3, 3 * G512, PteView::Invalid(0x400)));
    assert_eq!(
        s.snapshot(range::<L4>(3 * G512 - 2 * PAGE, 4 * PAGE)),
        [Pfn::ERROR_ENTRY, Pfn::ERROR_ENTRY, Pfn::ERROR_ENTRY, Pfn::ERROR_ENTRY]
    );
    s.check_snapshot(range::<L4>(2 * G512 - 8 * PAGE, 16 * PAGE));
}

// ------------------------------------------------------------------ address-space corners

#[test]
fn ranges_crossing_pml4_boundaries() {
    let mut s = Space::<L4>::new(32);
    s.map(G512 - PAGE, 0, 0x7000, true, true);
    s.map(G512, 0, 0x8000, false, true);
    s.map(2 * G512 - M2, 1, 0x20_0000, true, true);
    s.map(2 * G512, 2, 0x4000_0000, true, true);
    s.map(3 * G512 - G1, 2, 0x8000_0000, false, true);
    s.map(3 * G512 + 4 * M2 + 5 * PAGE, 0, 0x9000, true, true);

    let r = range::<L4>(G512 - 4 * PAGE, 8 * PAGE);
    let v = s.check_walk(r);
    assert_eq!(v[3].start, G512 - PAGE);
    assert_eq!(
        v[4],
        Visit::new(G512, G512 + PAGE - 1, 0, G512, PteView::Leaf { frame: 0x8000, flags: leaf_flags(false, true) })
    );
    assert_eq!(
        s.snapshot(r),
        [Pfn::NONE, Pfn::NONE, Pfn::NONE, Pfn(VALID | WRITE | 0x7), Pfn(VALID | 0x8), Pfn::NONE, Pfn::NONE, Pfn::NONE]
    );
    s.check(range::<L4>(2 * G512 - M2 - 2 * PAGE, M2 + 4 * PAGE));
    s.check(range::<L4>(3 * G512 - 3 * PAGE, 4 * M2 + 8 * PAGE));
    // Several root entries in one walk.
    s.check_walk(range::<L4>(0, 5 * G512));
    s.check_walk(range::<L4>(G512 - G1, 2 * G512 + 2 * G1));
    s.check_snapshot(range::<L4>(3 * G512 - 2 * M2, 4 * M2));
}

#[test]
fn high_half_addresses() {
    let mut s = Space::<L4>::new(32);
    let hh = 0xffff_8000_0000_0000;
    s.map(hh, 0, 0x1000, true, true);
    s.map(hh + M2, 1, 0x20_0000, true, true);
    s.map(hh + G1, 2, 0x4000_0000, false, true);
    s.map(hh + G512 - PAGE, 0, 0x2000, true, true);
    s.map(hh + G512, 0, 0x3000, true, true);
    s.map(0xffff_ffff_0000_0000, 2, 0xc000_0000, true, true);
    s.map(0xffff_ffff_ffc0_0000, 1, 0x40_0000, true, true);
    // The same slots in the lower half stay empty.
    s.map(0x1000, 0, 0x1000, true, true);

    let v = s.check_walk(range::<L4>(hh, 2 * PAGE));
    assert_eq!(
        v[0],
        Visit::new(hh, hh + PAGE - 1, 0, hh, PteView::Leaf { frame: 0x1000, flags: leaf_flags(true, true) })
    );
    assert_eq!(v[1], hole(hh + PAGE, hh + 2 * PAGE - 1, 0));
    assert_eq!(s.snapshot(range::<L4>(hh, 2 * PAGE)), [Pfn(VALID | WRITE | 1), Pfn::NONE]);
    assert_eq!(s.snapshot(range::<L4>(0, 2 * PAGE)), [Pfn::NONE, Pfn(VALID | WRITE | 1)]);
    s.check(range::<L4>(hh, 4 * M2));
    s.check(range::<L4>(hh + G512 - 2 * PAGE, 4 * PAGE));
    s.check_walk(range::<L4>(hh, 4 * G512));
    s.check_snapshot(range::<L4>(hh + G1 - PAGE, 2 * PAGE));
    // Near (but not at) the top of the address space.
    s.check(range::<L4>(0xffff_ffff_ffa0_0000, 0x40_0000));
    s.check_walk(range::<L4>(0xffff_ff80_0000_0000, G512 - M2));
    s.check_snapshot(range::<L4>(0xffff_ffff_3fff_e000, 4 * PAGE));
}

/// `last = u64::MAX`: the walk must stop after the last entry, not wrap.
#[test]
fn range_ending_at_the_top_of_the_address_space() {
    let mut s = Space::<L4>::new(16);
    s.map(0xffff_ffff_ffe0_0000, 1, 0x20_0000, true, true);
    let top = VaRange::new::<L4>(0xffff_ffff_ffe0_0000, 0x20_0000).expect("top 2 MiB is a valid range");
    assert_eq!(top.last(), u64::MAX);
    assert_eq!(top.end(), None);
    let leaf = PteView::Leaf { frame: 0x20_0000, flags: leaf_flags(true, true) };
    assert_eq!(s.walk_all(top), [Visit::new(0xffff_ffff_ffe0_0000, u64::MAX, 1, 0xffff_ffff_ffe0_0000, leaf)]);
    let out = s.snapshot(top);
    assert_eq!(out.len(), 512);
    assert_eq!(out[511], Pfn(VALID | WRITE | 9 << 55 | 0x3ff));
    s.check(top);
    // The last page alone, and the whole upper half.
    s.check(range::<L4>(u64::MAX - PAGE + 1, PAGE));
    let v = s.check_walk(range::<L4>(0xffff_8000_0000_0000, 1 << 47));
    assert_eq!(v.last().unwrap().last, u64::MAX);
    // 5-level.
    let mut s5 = Space::<L5>::new(16);
    s5.map(u64::MAX - PAGE + 1, 0, 0x1000, false, true);
    s5.check(range::<L5>(u64::MAX - 4 * PAGE + 1, 4 * PAGE));
    s5.check_walk(range::<L5>(0xff00_0000_0000_0000, 1 << 56));
}

#[test]
fn five_level_tables() {
    let mut s = Space::<L5>::new(64);
    // Only canonical with LA57.
    s.map(0x0000_8000_0000_0000, 0, 0x1000, true, true);
    s.map(T256 - M2, 1, 0x20_0000, true, true);
    s.map(T256, 2, 0x4000_0000, true, true);
    s.map(0x00ff_ffff_ffff_f000, 0, 0x2000, false, true);
    s.map(0xff00_0000_0000_0000, 0, 0x3000, true, true);
    s.map(0xffff_8000_0000_0000, 1, 0x40_0000, true, false);
    s.map(0x1000, 0, 0x4000, true, true);

    let v = s.check_walk(range::<L5>(0x0000_8000_0000_0000, PAGE));
    assert_eq!(
        v,
        [Visit::new(
            0x0000_8000_0000_0000,
            0x0000_8000_0000_0fff,
            0,
            0x0000_8000_0000_0000,
            PteView::Leaf { frame: 0x1000, flags: leaf_flags(true, true) }
        )]
    );
    // Crossing a PML5 entry (256 TiB).
    let r = range::<L5>(T256 - 2 * PAGE, 4 * PAGE);
    assert_eq!(
        s.snapshot(r),
        [
            Pfn(VALID | WRITE | 9 << 55 | 0x3fe),
            Pfn(VALID | WRITE | 9 << 55 | 0x3ff),
            Pfn(VALID | WRITE | 18 << 55 | 0x4_0000),
            Pfn(VALID | WRITE | 18 << 55 | 0x4_0001),
        ]
    );
    let v = s.check_walk(r);
    assert_eq!(v.len(), 2);
    assert_eq!((v[0].level, v[0].base, v[1].level, v[1].base), (1, T256 - M2, 2, T256));
    s.check(range::<L5>(T256 - 4 * M2, 8 * M2));
    // Top of the 57-bit lower half.
    s.check(range::<L5>(0x00ff_ffff_ffe0_0000, M2));
    assert_eq!(s.snapshot(range::<L5>(0x00ff_ffff_ffff_f000, PAGE)), [Pfn(VALID | 2)]);
    // Upper half: PML5 slot 256 and 511.
    s.check(range::<L5>(0xff00_0000_0000_0000, 2 * PAGE));
    assert_eq!(s.snapshot(range::<L5>(0xff00_0000_0000_0000, PAGE)), [Pfn(VALID | WRITE | 3)]);
    s.check(range::<L5>(0xffff_8000_0000_0000 - PAGE, M2 + 2 * PAGE));
    // Many root entries at once; empty PML5 entries are one visit each.
    let v = s.check_walk(range::<L5>(0, 1 << 56));
    assert!(v.iter().filter(|v| v.level == 4).count() >= 250);
    s.check_walk(range::<L5>(0xff00_0000_0000_0000, (1 << 56) - G1));
}

#[test]
fn visitor_can_stop_the_walk() {
    let mut s = Space::<L4>::new(16);
    for i in 0..6 {
        s.map(0x4000_0000 + i * 3 * PAGE, 0, 0x10_0000 + i * PAGE, true, true);
    }
    s.map(0x4020_0000, 1, 0x20_0000, true, true);
    let r = range::<L4>(0x4000_0000, 2 * M2);
    let all = s.walk_all(r);

    let mut seen = Vec::new();
    let mut leaves = 0;
    let mut stop_at_third_leaf = |span: Span, e: PteView| {
        seen.push(Visit::from_span(span, e));
        if matches!(e, PteView::Leaf { .. }) {
            leaves += 1;
            if leaves == 3 {
                return ControlFlow::Break(span.range.start());
            }
        }
        ControlFlow::Continue(())
    };
    // SAFETY: `s.root` is a live L4 root in `s.arena`.
    let r2 = unsafe { walk::<L4, _, _>(&s.arena, s.root, r, &mut stop_at_third_leaf) };
    assert_eq!(r2, Ok(ControlFlow::Break(0x4000_6000)));
    assert_eq!(seen.len(), 7);
    assert_eq!(seen[..], all[..7]);

    // Breaking on the very first visit, and on a huge leaf.
    let mut n = 0;
    // SAFETY: as above.
    let r3 = unsafe {
        walk::<L4, _, _>(&s.arena, s.root, r, &mut |_: Span, _: PteView| {
            n += 1;
            ControlFlow::Break("first")
        })
    };
    assert_eq!((r3, n), (Ok(ControlFlow::Break("first")), 1));
    let mut huge_seen = 0;
    // SAFETY: as above.
    let r4 = unsafe {
        walk::<L4, _, _>(&s.arena, s.root, range::<L4>(0x4000_0000, G1), &mut |span: Span, _: PteView| {
            if span.level == 1 && span.entry_base() == 0x4020_0000 {
                huge_seen += 1;
                return ControlFlow::Break(span.range.last());
            }
            ControlFlow::Continue(())
        })
    };
    assert_eq!((r4, huge_seen), (Ok(ControlFlow::Break(0x403f_ffff)), 1));
}

// ------------------------------------------------------------------ bad input

#[test]
fn ranges_the_walker_never_sees() {
    // Unaligned, empty, wrapping, non-canonical, past the VA width: the range
    // type refuses them before any walk.
    assert_eq!(VaRange::new::<L4>(0x1001, PAGE), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0x1000, 0x800), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0x1000, 0), Err(Error::Empty));
    assert_eq!(VaRange::new::<L4>(0xffff_ffff_ffff_f000, 0x2000), Err(Error::Wrapping));
    assert_eq!(VaRange::new::<L4>(0x0000_8000_0000_0000, PAGE), Err(Error::NonCanonical));
    assert_eq!(VaRange::new::<L4>(0x0000_7fff_ffff_f000, 2 * PAGE), Err(Error::OutOfRange));
    assert_eq!(VaRange::new::<L5>(0x00ff_ffff_ffff_f000, 2 * PAGE), Err(Error::OutOfRange));
}

#[test]
fn walk_and_snapshot_reject_a_range_of_another_geometry() {
    let mut s = Space::<L4>::new(8);
    s.map(0x1000, 0, 0x1000, true, true);
    let cases = [
        // Canonical only with LA57.
        (0x0000_8000_0000_0000, PAGE, Error::NonCanonical),
        (0xff00_0000_0000_0000, PAGE, Error::NonCanonical),
        (0xffff_7fff_ffff_f000, 2 * PAGE, Error::NonCanonical),
        // Starts canonical, runs past the 48-bit lower half.
        (0x0000_7fff_ffff_f000, 2 * PAGE, Error::OutOfRange),
        (0, 1 << 48, Error::OutOfRange),
    ];
    for (start, len, err) in cases {
        let r = range::<L5>(start, len);
        let mut called = false;
        // SAFETY: `s.root` is a live L4 root in `s.arena`.
        let w = unsafe {
            walk::<L4, _, _>(&s.arena, s.root, r, &mut |_: Span, _: PteView| {
                called = true;
                ControlFlow::<()>::Continue(())
            })
        };
        assert_eq!(w, Err(err), "walk of {r:?}");
        assert!(!called, "visitor called for a rejected range {r:?}");
        let mut out = vec![Pfn(0x5a5a); 2];
        // SAFETY: as above.
        let snap = unsafe { snapshot::<L4, _>(&s.arena, s.root, r, &mut out) };
        assert!(snap.is_err(), "snapshot of {r:?}");
        assert_eq!(out, [Pfn(0x5a5a); 2], "output written for a rejected range");
    }
    // Exactly at the edge: accepted by both.
    let r = range::<L5>(0x0000_7fff_ffff_f000, PAGE);
    // SAFETY: as above.
    let w =
        unsafe { walk::<L4, _, _>(&s.arena, s.root, r, &mut |_: Span, _: PteView| ControlFlow::<()>::Continue(())) };
    assert_eq!(w, Ok(ControlFlow::Continue(())));
}

#[test]
fn snapshot_rejects_a_slice_of_the_wrong_length() {
    let mut s = Space::<L4>::new(8);
    s.map(0x4000_0000, 1, 0x20_0000, true, true);
    let r = range::<L4>(0x4000_0000, 4 * PAGE);
    for len in [0, 1, 3, 5, 512] {
        let mut out = vec![Pfn(0x5a5a); len];
        // SAFETY: `s.root` is a live L4 root in `s.arena`.
        let res = unsafe { snapshot::<L4, _>(&s.arena, s.root, r, &mut out) };
        assert_eq!(res, Err(Error::BadLength), "len {len}");
        assert!(out.iter().all(|p| *p == Pfn(0x5a5a)), "output written with a bad length");
    }
    let mut out = vec![Pfn(0x5a5a); 4];
    // SAFETY: as above.
    assert_eq!(unsafe { snapshot::<L4, _>(&s.arena, s.root, r, &mut out) }, Ok(()));
    assert_eq!(out[3], Pfn(VALID | WRITE | 9 << 55 | 0x203));
}

// ------------------------------------------------------------------ property test

/// Addresses where mistakes happen: 512 GiB (and 256 TiB) boundaries in both
/// halves, the ends of the halves.
fn centers(la57: bool) -> Vec<u64> {
    let mut c = vec![0, G512, 2 * G512, 255 * G512, 0xffff_8000_0000_0000, 0xffff_8000_0000_0000 + G512];
    c.push(0xffff_ff80_0000_0000);
    if la57 {
        c.extend([T256, 2 * T256, 0x00ff_0000_0000_0000, 0xff00_0000_0000_0000, 0xff01_0000_0000_0000]);
    }
    c
}

/// An address near a boundary: center + a GiB + b 2 MiB + c pages.
fn near_boundary(la57: bool) -> impl Strategy<Value = u64> {
    let n = centers(la57).len();
    let small = prop_oneof![Just(0i64), Just(1), Just(-1), Just(511), Just(-511), -3i64..=3];
    (0..n, -2i64..=2, small.clone(), small).prop_map(move |(i, a, b, c)| {
        let off = a * G1 as i64 + b * M2 as i64 + c * PAGE as i64;
        centers(la57)[i].wrapping_add(off as u64)
    })
}

#[derive(Clone, Debug)]
struct MapOp {
    va: u64,
    level: usize,
    kind: u8,
    write: bool,
    user: bool,
    frame: u64,
}

fn map_op(la57: bool) -> impl Strategy<Value = MapOp> {
    let level = prop_oneof![5 => Just(0usize), 3 => Just(1usize), 2 => Just(2usize)];
    (near_boundary(la57), level, 0u8..12, any::<bool>(), any::<bool>(), any::<u64>())
        .prop_map(|(va, level, kind, write, user, frame)| MapOp { va, level, kind, write, user, frame })
}

#[derive(Clone, Debug)]
struct DirOp {
    va: u64,
    level: usize,
    drop: LeafFlags,
}

fn dir_op(la57: bool) -> impl Strategy<Value = DirOp> {
    let levels: usize = if la57 { 4 } else { 3 };
    let drop = prop_oneof![Just(LeafFlags::WRITE), Just(LeafFlags::USER), Just(LeafFlags::EXEC)];
    (near_boundary(la57), 1..=levels, drop).prop_map(|(va, level, drop)| DirOp { va, level, drop })
}

fn apply<F: PteFormat>(s: &mut Space<F>, maps: &[MapOp], dirs: &[DirOp]) {
    for m in maps {
        let va = m.va & !mask_of(m.level);
        if !<F::Geometry as PagingGeometry>::is_canonical(va) {
            continue;
        }
        let frame = m.frame & 0x000f_ffff_ffff_f000 & !mask_of(m.level);
        let flags = leaf_flags(m.write, m.user);
        let view = match m.kind {
            0..=6 => PteView::Leaf { frame, flags },
            7 => PteView::ProtNone { frame, flags },
            8 => PteView::Special(SpecialEntry::Swap { offset: m.frame >> 13 }),
            9 => PteView::Special(SpecialEntry::DevicePrivate { frame, owner: 1, write: m.write }),
            10 => PteView::Special(SpecialEntry::Migration { frame, write: m.write }),
            _ => PteView::Special(SpecialEntry::Other(0xc00 | (m.frame & !0xfff & !(1 << 63)))),
        };
        s.try_set(va, m.level, view);
    }
    for d in dirs {
        let key = (d.level, d.va & !mask_of(d.level));
        if let Some(Node::Table { flags, .. }) = s.model.get(&key).copied() {
            s.restrict_dir(d.va, d.level, flags - d.drop);
        }
    }
}

/// A valid range, or `None`. Ranges ending at the very top of the address
/// space are left to `range_ending_at_the_top_of_the_address_space` (they
/// currently panic inside `VaRange::check`).
fn sized_range<G: PagingGeometry>(start: u64, pages: u64) -> Option<VaRange> {
    let start = start & !(PAGE - 1);
    if start.wrapping_add(pages * PAGE) == 0 {
        return None;
    }
    VaRange::new::<G>(start, pages * PAGE).ok()
}

/// Where a checked range starts: near a mapped entry (most of the time) or
/// near a boundary.
#[derive(Clone, Debug)]
enum At {
    Map(usize, i64),
    Anywhere(u64),
}

fn at(la57: bool) -> impl Strategy<Value = At> {
    let delta =
        prop_oneof![Just(0i64), Just(-1), Just(-2), Just(-511), Just(-512), Just(-513), Just(-(1 << 18) - 1), -4i64..4];
    prop_oneof![3 => (any::<usize>(), delta).prop_map(|(i, d)| At::Map(i, d)), 1 => near_boundary(la57).prop_map(At::Anywhere)]
}

fn resolve(at: &At, maps: &[MapOp]) -> u64 {
    match *at {
        At::Map(i, delta) => {
            let m = &maps[i % maps.len()];
            (m.va & !mask_of(m.level)).wrapping_add((delta * PAGE as i64) as u64)
        }
        At::Anywhere(va) => va,
    }
}

fn check_random<F: PteFormat>(
    maps: &[MapOp],
    dirs: &[DirOp],
    walks: &[(At, u64)],
    snaps: &[(At, u64)],
) -> Result<(), TestCaseError> {
    let mut s = Space::<F>::new(4 * maps.len() + 2);
    apply(&mut s, maps, dirs);
    let mut checked = 0;
    for (at, pages) in walks {
        if let Some(r) = sized_range::<F::Geometry>(resolve(at, maps), *pages) {
            s.check_walk(r);
            checked += 1;
        }
    }
    for (at, pages) in snaps {
        if let Some(r) = sized_range::<F::Geometry>(resolve(at, maps), *pages) {
            s.check_snapshot(r);
            checked += 1;
        }
    }
    // Every mapped entry, snapshotted around both of its edges.
    for (&(level, base), node) in s.model.iter() {
        if let Node::Entry(_) = node {
            let size = 1u64 << shift_of(level);
            for r in [
                sized_range::<F::Geometry>(base.wrapping_sub(2 * PAGE), 4),
                sized_range::<F::Geometry>(base.wrapping_add(size).wrapping_sub(2 * PAGE), 4),
            ]
            .into_iter()
            .flatten()
            {
                s.check_snapshot(r);
            }
        }
    }
    prop_assume!(checked > 0);
    Ok(())
}

fn walk_len() -> impl Strategy<Value = u64> {
    // In pages: up to a little over two 512 GiB entries.
    prop_oneof![
        Just(1u64),
        Just(512),
        Just(513),
        Just(1 << 18),
        Just((1 << 18) + 513),
        Just(3 << 18),
        Just((1 << 28) + 1),
        1u64..2048
    ]
}

fn snap_len() -> impl Strategy<Value = u64> {
    prop_oneof![Just(1u64), Just(2), Just(511), Just(512), Just(513), Just(1024), 1u64..1100]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_tables_match_the_model_level4(
        maps in prop::collection::vec(map_op(false), 1..24),
        dirs in prop::collection::vec(dir_op(false), 0..4),
        walks in prop::collection::vec((at(false), walk_len()), 1..6),
        snaps in prop::collection::vec((at(false), snap_len()), 1..4),
    ) {
        check_random::<L4>(&maps, &dirs, &walks, &snaps)?;
    }

    #[test]
    fn random_tables_match_the_model_level5(
        maps in prop::collection::vec(map_op(true), 1..24),
        dirs in prop::collection::vec(dir_op(true), 0..4),
        walks in prop::collection::vec((at(true), walk_len()), 1..6),
        snaps in prop::collection::vec((at(true), snap_len()), 1..4),
    ) {
        check_random::<L5>(&maps, &dirs, &walks, &snaps)?;
    }
}
