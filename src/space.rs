//! What a kernel provides for one process address space.

use crate::arch::PteFormat;
use crate::notifier::{EntryStore, NotifierRegistry, Waiter};
use crate::phys::PhysMem;
use crate::range::VaRange;
use crate::Result;
use bitflags::bitflags;

bitflags! {
    /// Permissions and kind of a region (a VMA).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct RegionFlags: u32 {
        /// Readable.
        const READ = 1 << 0;
        /// Writable.
        const WRITE = 1 << 1;
        /// Executable.
        const EXEC = 1 << 2;
        /// IO or raw-PFN mapping: devices must never access it through HMM.
        const IO = 1 << 3;
        /// Shared mapping: writes are visible to every mapper (no COW).
        const SHARED = 1 << 4;
    }
}

#[cfg(feature = "defmt")]
#[cfg_attr(docsrs, doc(cfg(feature = "defmt")))]
impl defmt::Format for RegionFlags {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "RegionFlags({=u32:#x})", self.bits());
    }
}

/// A region of an address space, as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    /// Addresses the region covers.
    pub range: VaRange,
    /// Permissions and kind.
    pub flags: RegionFlags,
}

/// The kernel's side of one process address space.
///
/// # Safety
/// hmm-core walks the tables rooted at [`root`](Self::root) without taking the
/// kernel's page-table lock, and relies on the kernel's invalidation calls for
/// coherence. An implementation must guarantee:
/// 1. `root()` is the live root table of format `Format`, reachable through
///    `phys()`, for the lifetime of `self`.
/// 2. While a [`ReadGuard`](Self::ReadGuard) exists, no table frame reachable
///    from the root is freed or reused (entries may change; tables stay).
/// 3. Every change that removes, replaces or downgrades a user translation
///    (unmap, protection change, COW break, migration, reclaim, teardown) is
///    bracketed by [`NotifierRegistry::invalidate_range_start`] before the
///    entry changes and [`NotifierRegistry::invalidate_range_end`] after it, on
///    the registry returned by [`notifiers`](Self::notifiers); the old frame is
///    not freed or reused before `invalidate_range_start` has returned.
/// 4. Table entries are written with atomic stores (readers load atomically).
pub unsafe trait AddressSpace {
    /// CPU page-table format.
    type Format: PteFormat;
    /// How hmm-core reaches the tables.
    type Phys: PhysMem + ?Sized;
    /// Storage of the notifier registry (`Sync`: invalidations read it
    /// concurrently).
    type Store: EntryStore + Sync;
    /// How a waiter waits for an invalidation to finish.
    type Wait: Waiter;
    /// Proof that the address-space read lock is held.
    type ReadGuard<'a>
    where
        Self: 'a;

    /// Physical-memory access for the tables.
    fn phys(&self) -> &Self::Phys;
    /// Physical address of the root table.
    fn root(&self) -> u64;
    /// The address space's notifier registry.
    fn notifiers(&self) -> &NotifierRegistry<Self::Store, Self::Wait>;
    /// Takes the read lock (blocks region changes and table frees).
    ///
    /// hmm-core takes it once per fault attempt or snapshot walk, never twice
    /// in one thread (no nesting), holds no mirror lock when it takes it, and
    /// never waits for an invalidation while holding it. Data frames may be
    /// freed while a guard is held, once the invalidation of their
    /// translation has started (contract item 3): hmm-core reads a frame
    /// address and maps it under the mirror's update lock, which that
    /// invalidation's callback takes before it returns.
    fn read_lock(&self) -> Self::ReadGuard<'_>;
    /// The region containing `va`, if any.
    ///
    /// Called with the read lock held and, from
    /// [`Mirror::fault`](crate::Mirror::fault), with that mirror's update
    /// lock held as well: it must not start an invalidation, fault anything
    /// in, or wait for anything an invalidation holds (a lookup only).
    fn region<'g>(&'g self, guard: &Self::ReadGuard<'g>, va: u64) -> Option<Region>;
    /// Makes `range` (inside one region) present, writable if `write`, as a
    /// CPU fault would: demand-zero, zero page for reads, COW break for
    /// writes. Errors: [`Error::NoMemory`](crate::Error::NoMemory),
    /// [`Error::Fault`](crate::Error::Fault).
    ///
    /// Called with the read lock held and no mirror lock, once per
    /// contiguous missing run: it may invalidate (a COW break, reclaim to
    /// find memory), and those callbacks take mirror update locks, which are
    /// free then. It must not take the address-space write lock (this
    /// thread holds the read lock).
    fn handle_fault<'g>(&'g self, guard: &Self::ReadGuard<'g>, range: VaRange, write: bool) -> Result<()>;
    /// The shared zero frame, if the kernel has one (reported as such).
    fn zero_frame(&self) -> Option<u64> {
        None
    }
}
