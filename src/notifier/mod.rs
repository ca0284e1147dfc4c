//! Interval notifiers with sequence retry.
//!
//! A device driver registers a [`Notifier`] over a virtual range. The kernel
//! brackets every page-table change with
//! [`NotifierRegistry::invalidate_range_start`] /
//! [`NotifierRegistry::invalidate_range_end`]; each overlapping notifier's
//! callback tears down device mappings and calls [`Interval::set_seq`] under
//! its driver lock. A device fault brackets its walk with
//! [`NotifierRegistry::read_begin`] and [`NotifierRegistry::read_retry`] (the
//! latter under the same driver lock) and retries when they differ.
//!
//! # Where a kernel must call the hooks
//! Before (start) and after (end) every change that removes, replaces or
//! downgrades a user translation: unmap (`Event::Unmap`), zap without unmap
//! (`Clear`), mprotect (`ProtectionVma`), per-page protection or COW break
//! (`ProtectionPage`), soft-dirty tracking (`SoftDirty`), page migration or
//! reclaim (`Migrate`), device-exclusive conversion (`Exclusive`), and address
//! space teardown ([`NotifierRegistry::release`]). Frames may be freed only
//! after `invalidate_range_start` returned (and the CPU TLB was flushed).
//!
//! # Lock order
//! address-space read lock -> driver update lock -> registry lock.
//! The registry lock is a short spin lock never held across a callback or a
//! wait. Invalidation callbacks take only the driver update lock; they never
//! allocate and never wait on a fault-side lock.

/// Inserts and removes that can wait for the end of running invalidations;
/// more wait for them to end first.
pub const MAX_PENDING: usize = 16;

mod index;
mod registry;
mod store;

pub(crate) use registry::Running;
pub use registry::{Invalidation, NotifierRegistry, Registration};
#[cfg(feature = "alloc")]
#[cfg_attr(docsrs, doc(cfg(feature = "alloc")))]
pub use store::VecStore;
pub use store::{Entry, EntryStore, FixedStore};

use crate::range::VaRange;
use crate::sync::shim::{AtomicU64, AtomicU8};
pub use crate::sync::Waiter;
use core::sync::atomic::Ordering;

/// Why translations are being invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Event {
    /// The range is being unmapped.
    Unmap,
    /// Pages are zapped but the region stays (e.g. MADV_DONTNEED).
    Clear,
    /// Protection of a whole region changes (mprotect).
    ProtectionVma,
    /// Protection of individual pages changes (COW break, write-protect).
    ProtectionPage,
    /// Soft-dirty tracking clears write access.
    SoftDirty,
    /// The whole address space is going away.
    Release,
    /// Pages migrate; `owner` is the device that started it (it may skip).
    Migrate {
        /// Device id that initiated the migration.
        owner: u16,
    },
    /// A device takes exclusive access; `owner` is that device.
    Exclusive {
        /// Device id taking exclusive access.
        owner: u16,
    },
}

/// One invalidation as a callback sees it.
///
/// Only the registry makes one (its sequence is private), and it is neither
/// `Clone` nor `Copy`: a callback can record the sequence of the invalidation
/// it is in ([`Interval::set_seq`]) but cannot forge another one, or replay
/// an old one later, to make a fault that raced an invalidation believe
/// nothing happened. So safe code cannot get a stale frame committed by
/// calling a notifier's callback or `set_seq` itself.
///
/// ```compile_fail
/// # use hmm_core::{Event, InvalidateRange, VaRange};
/// let forged = InvalidateRange { range: VaRange::all(), event: Event::Clear, blockable: true };
/// ```
/// ```compile_fail
/// # use hmm_core::InvalidateRange;
/// fn keep(inv: &InvalidateRange) -> InvalidateRange {
///     inv.clone()
/// }
/// ```
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InvalidateRange {
    /// Addresses whose translations change.
    pub range: VaRange,
    /// Why.
    pub event: Event,
    /// Whether the callback may wait (take a sleeping lock). When false (the
    /// OOM reaper's case), a callback that would have to wait returns false.
    pub blockable: bool,
    /// The registry's (odd) sequence during this invalidation.
    seq: u64,
}

impl InvalidateRange {
    pub(crate) fn new(range: VaRange, event: Event, blockable: bool, seq: u64) -> Self {
        Self { range, event, blockable, seq }
    }

    /// The registry's sequence during this invalidation (odd).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A registered interval's state: its range and its sequence.
///
/// Embed one in the driver's notifier object.
#[derive(Debug)]
pub struct Interval {
    range: VaRange,
    seq: AtomicU64,
    state: AtomicU8,
}

const UNREGISTERED: u8 = 0;
const REGISTERED: u8 = 1;

impl Interval {
    /// An unregistered interval over `range`.
    pub fn new(range: VaRange) -> Self {
        Self { range, seq: AtomicU64::new(0), state: AtomicU8::new(UNREGISTERED) }
    }

    /// The covered range.
    pub const fn range(&self) -> VaRange {
        self.range
    }

    /// Records that invalidation `inv` has run. Call it from the callback,
    /// under the driver update lock, every time.
    pub fn set_seq(&self, inv: &InvalidateRange) {
        self.seq.store(inv.seq, Ordering::Release);
    }

    /// Whether the interval is registered (or pending registration).
    pub fn is_registered(&self) -> bool {
        self.state.load(Ordering::Acquire) == REGISTERED
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// A driver's invalidation callback over one [`Interval`].
pub trait Notifier: Sync {
    /// The interval this notifier covers.
    fn interval(&self) -> &Interval;

    /// Tears down device mappings of `inv.range` (clipped to the interval by
    /// the callee as needed), calls `self.interval().set_seq(inv)` under
    /// the driver update lock, and returns true. Returns false only when
    /// `inv.blockable` is false and it would have to wait.
    ///
    /// Runs inside [`NotifierRegistry::invalidate_range_start`], on the
    /// kernel's thread, with whatever locks the kernel holds while it changes
    /// its tables (often the address-space write lock) and no registry lock;
    /// callbacks of other invalidations may run at the same time on other
    /// threads. The entries of `inv.range` still hold their old frames, which
    /// are not freed before this returns.
    ///
    /// Must not allocate, must not wait on a fault-side lock (the
    /// address-space read lock, or a lock held across a driver's
    /// `range_fault`), and must not call back into the registry.
    fn invalidate(&self, inv: &InvalidateRange) -> bool;
}
