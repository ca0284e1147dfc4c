//! Fake x86_64 4-level tables in a heap arena (`arena.rs`), and the minimal
//! kernel (`AddressSpace`) `range_fault` needs over them.

use crate::arena::Arena;
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::LeafFlags;
use hmm_core::notifier::FixedStore;
use hmm_core::sync::SpinWait;
use hmm_core::{
    AddressSpace, Error, Interval, InvalidateRange, Notifier, NotifierRegistry, Region, RegionFlags, Result, VaRange,
};

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
const RW_USER: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER);

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
        arena.map::<X86_64Level4>(root, VA_4K, PAGES_4K, 0, FAKE_4K, RW_USER);
        arena.map::<X86_64Level4>(root, VA_2M, LEAVES_2M, 1, FAKE_2M, RW_USER);
        arena.map::<X86_64Level4>(root, VA_1G, LEAVES_1G, 2, FAKE_1G, RW_USER);
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
