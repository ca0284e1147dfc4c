//! Fake x86_64 4-level tables in a heap arena, and the minimal kernel
//! (`AddressSpace`) `range_fault` needs over them.
//!
//! Physical address = [`BASE`] + offset in the arena. Leaves point to fake
//! frames outside the arena: nothing reads data frames.

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::notifier::FixedStore;
use hmm_core::sync::SpinWait;
use hmm_core::{
    AddressSpace, Error, Interval, InvalidateRange, Notifier, NotifierRegistry, PhysMem, Region, RegionFlags, Result,
    VaRange,
};
use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Physical address of the arena's first frame.
pub const BASE: u64 = 1 << 30;
/// 4 KiB leaves: up to 1 GiB of them from here.
pub const VA_4K: u64 = 0x1000_0000_0000;
/// 2 MiB leaves: 1 GiB of them from here.
pub const VA_2M: u64 = 0x2000_0000_0000;
/// 1 GiB leaves: 4 GiB of them from here.
pub const VA_1G: u64 = 0x3000_0000_0000;
/// Pages mapped with 4 KiB leaves (1 GiB).
pub const PAGES_4K: u64 = 1 << 18;
/// Leaves of 2 MiB mapped (1 GiB).
pub const LEAVES_2M: u64 = 512;
/// Leaves of 1 GiB mapped (4 GiB).
pub const LEAVES_1G: u64 = 4;
const FAKE_4K: u64 = 0x10_0000_0000;
const FAKE_2M: u64 = 0x20_0000_0000;
const FAKE_1G: u64 = 0x40_0000_0000;
const PAGE: u64 = 4096;
const RW_USER: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER);

/// Page-aligned, zeroed frames on the heap, reached through a raw pointer
/// only (so `hmm_core`, the `x86_64` crate and the hand walk may all read
/// them without one holding a Rust reference the others would alias).
pub struct Arena {
    base: *mut u64,
    layout: Layout,
    frames: u64,
    next: u64,
}

// SAFETY: `base` is a live, 4 KiB-aligned allocation of `frames` frames that
// is neither moved nor freed before the arena drops; every table handed to
// hmm-core is one of its frames, and distinct frames do not overlap.
unsafe impl PhysMem for Arena {
    #[inline]
    fn ptr(&self, pa: u64) -> *mut u8 {
        self.base.cast::<u8>().wrapping_add((pa - BASE) as usize)
    }
}

impl Arena {
    fn new(frames: u64) -> Self {
        let layout = Layout::from_size_align((frames * PAGE) as usize, PAGE as usize).unwrap();
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) }.cast::<u64>();
        assert!(!base.is_null(), "arena allocation failed");
        Self { base, layout, frames, next: 0 }
    }

    fn alloc(&mut self) -> u64 {
        assert!(self.next < self.frames, "arena too small");
        self.next += 1;
        BASE + (self.next - 1) * PAGE
    }

    /// The arena's first byte: what an offset mapper adds to a physical address
    /// (minus [`BASE`]).
    pub fn host_base(&self) -> *mut u64 {
        self.base
    }

    fn slot(&mut self, table: u64, idx: usize) -> &mut u64 {
        assert!(table >= BASE && table < BASE + self.next * PAGE && idx < 512);
        // SAFETY: `table` is an allocated frame of the arena (checked) and
        // `idx < 512` keeps the entry inside it; `&mut self` excludes others.
        unsafe { &mut *self.ptr(table).cast::<u64>().add(idx) }
    }

    /// The table at `level` (1..=2) below `root` covering `va`, created on the way.
    fn table_for(&mut self, root: u64, va: u64, level: usize) -> u64 {
        let mut table = root;
        for l in (level + 1..X86_64Level4::LEVELS).rev() {
            let idx = X86_64Level4::index(va, l);
            table = match X86_64Level4::decode(*self.slot(table, idx), l) {
                PteView::Table { frame, .. } => frame,
                _ => {
                    let t = self.alloc();
                    let dir = PteView::Table { frame: t, flags: RW_USER };
                    *self.slot(table, idx) = X86_64Level4::encode(&dir, l).unwrap();
                    t
                }
            };
        }
        table
    }

    /// Maps `count` leaves of `level` from `va` to consecutive fake frames from `frame`.
    fn map(&mut self, root: u64, va: u64, count: u64, level: usize, frame: u64) {
        let size = 1u64 << X86_64Level4::level_shift(level);
        for i in 0..count {
            let v = va + i * size;
            let table = self.table_for(root, v, level);
            let leaf = PteView::Leaf { frame: frame + i * size, flags: RW_USER };
            *self.slot(table, X86_64Level4::index(v, level)) = X86_64Level4::encode(&leaf, level).unwrap();
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.base.cast(), self.layout) };
    }
}

/// The kernel in miniature: the arena's tables, one RW user region over all
/// three areas, a read lock, and a registry with one interval.
pub struct BenchSpace {
    arena: Arena,
    root: u64,
    region: Region,
    lock: spin::RwLock<()>,
    notifiers: NotifierRegistry<FixedStore<1>, SpinWait>,
}

impl BenchSpace {
    /// Builds 1 GiB of 4 KiB leaves at [`VA_4K`], 1 GiB of 2 MiB leaves at
    /// [`VA_2M`] and 4 GiB of 1 GiB leaves at [`VA_1G`].
    pub fn new() -> Self {
        // Root, three PDPTs, two PDs, one PT per 512 pages, and slack.
        let mut arena = Arena::new(PAGES_4K / 512 + 16);
        let root = arena.alloc();
        arena.map(root, VA_4K, PAGES_4K, 0, FAKE_4K);
        arena.map(root, VA_2M, LEAVES_2M, 1, FAKE_2M);
        arena.map(root, VA_1G, LEAVES_1G, 2, FAKE_1G);
        let region = Region { range: Self::whole(), flags: RegionFlags::READ | RegionFlags::WRITE };
        Self { arena, root, region, lock: spin::RwLock::new(()), notifiers: NotifierRegistry::new() }
    }

    /// Everything the bench maps (the region and the interval).
    pub fn whole() -> VaRange {
        VaRange::from_bounds::<X86_64Level4>(VA_4K, VA_1G + (LEAVES_1G << 30)).unwrap()
    }

    /// The arena holding the tables.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }
}

// SAFETY: the tables live in the arena for the space's lifetime and are never
// changed after `new` (so nothing needs invalidating); the bench is
// single-threaded, so plain stores during construction precede every read.
unsafe impl AddressSpace for BenchSpace {
    type Format = X86_64Level4;
    type Phys = Arena;
    type Store = FixedStore<1>;
    type Wait = SpinWait;
    type ReadGuard<'g>
        = spin::RwLockReadGuard<'g, ()>
    where
        Self: 'g;

    fn phys(&self) -> &Arena {
        &self.arena
    }
    fn root(&self) -> u64 {
        self.root
    }
    fn notifiers(&self) -> &NotifierRegistry<FixedStore<1>, SpinWait> {
        &self.notifiers
    }
    fn read_lock(&self) -> Self::ReadGuard<'_> {
        self.lock.read()
    }
    fn region<'g>(&'g self, _guard: &Self::ReadGuard<'g>, va: u64) -> Option<Region> {
        self.region.range.contains_addr(va).then_some(self.region)
    }
    fn handle_fault<'g>(&'g self, _guard: &Self::ReadGuard<'g>, _range: VaRange, _write: bool) -> Result<()> {
        // Snapshot mode never faults; reaching this is a bench bug.
        Err(Error::Fault)
    }
}

/// A driver's notifier that only records the sequence (nothing invalidates).
pub struct Note {
    /// The interval `range_fault` checks.
    pub interval: Interval,
}

impl Notifier for Note {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.interval.set_seq(inv);
        true
    }
}
