//! What a device driver plugs into a [`Mirror`](crate::Mirror), its
//! configuration and its counters.

use crate::notifier::Event;
use crate::range::VaRange;
use core::sync::atomic::{AtomicU64, Ordering};

/// What the device driver provides.
///
/// The device reads its translations from the mirror's table, in its own
/// format: a hardware walker from [`Mirror::root`](crate::Mirror::root), a
/// device model through [`Mirror::translate`](crate::Mirror::translate)
/// (lock-free). These callbacks only tell it when to look again and when to
/// forget.
///
/// # Locks held, and what a callback must not do
/// - All three run with the mirror's **update lock** held, so they never run
///   concurrently for one mirror.
/// - [`update`](Self::update) runs inside [`Mirror::fault`](crate::Mirror::fault),
///   with the address-space **read lock** held as well.
/// - [`invalidate`](Self::invalidate) and [`flush`](Self::flush) run from
///   the kernel's invalidation (with whatever locks the kernel holds while
///   it changes its page tables, often its address-space write lock), from
///   a fault (replacing a huge entry, undoing a failed `update`, returning
///   directories after `NoMemory`), or from unregister / drop.
/// - None may allocate memory the kernel might reclaim through an
///   invalidation, call into this mirror (`fault`, `snapshot`, `register`,
///   `unregister`: they take the update lock, a deadlock) or into the
///   address space's notifier registry. `translate`, `root` and `stats` are
///   lock-free and allowed.
/// - `flush` may wait for the device's in-flight accesses, provided those
///   never wait for the update lock or the read lock (`translate` does not).
pub trait DeviceOps: Sync {
    /// Valid entries for every page of `range` were just written to the
    /// table (one call per run a fault mapped; `range` may extend past the
    /// faulted pages to whole huge entries). On `Err(code)` the mirror
    /// clears the range again (`invalidate` + `flush`) and the fault fails
    /// with [`Error::Device`](crate::Error::Device).
    fn update(&self, range: VaRange) -> core::result::Result<(), i32>;
    /// Entries of `range` were cleared from the table (or directories on the
    /// path to it unlinked): stop starting new accesses through cached
    /// translations of it. Always followed by [`flush`](Self::flush) of the
    /// same range, before the update lock is released; skipped (both) when
    /// the table held nothing there. `range` may be wider than the kernel's
    /// invalidation: a huge entry goes whole.
    fn invalidate(&self, range: VaRange, event: Event);
    /// Drops every cached translation of `range` and every cached directory
    /// entry on the path to an address in it; when it returns the device no
    /// longer uses any of them, and no longer reads a directory it found
    /// through them. Only then are the frames of cleared translations
    /// handed back to the kernel, and unlinked directories freed.
    fn flush(&self, range: VaRange);
}

/// Retry budget and identity of a mirror.
#[derive(Clone, Copy, Debug)]
pub struct MirrorConfig {
    /// Collisions a fault may take before returning
    /// [`Error::Busy`](crate::Error::Busy). A collision is an invalidation
    /// that overlaps the pages the fault still has to map, found running
    /// when it is about to map them, or ending while another overlapping one
    /// still runs as it waits. Invalidations of other pages never count, and
    /// neither do the fault's own (its handler breaking COW). A fault returns
    /// within its budget plus one invalidation's length. Default 64.
    pub max_retries: u32,
    /// Optional clock for a time budget (any monotonic tick), read when a
    /// fault starts and at every collision. Default `None`.
    pub clock: Option<fn() -> u64>,
    /// Ticks a fault may spend retrying before `Busy` (with `clock`).
    /// Default `u64::MAX`.
    pub max_ticks: u64,
    /// Owner id of this device: its device-private pages are mirrored, and
    /// Migrate/Exclusive invalidations it started itself are skipped.
    /// Default `None`.
    pub owner: Option<u16>,
}

/// Logs the numbers; the clock is shown only as present or not.
#[cfg(feature = "defmt")]
#[cfg_attr(docsrs, doc(cfg(feature = "defmt")))]
impl defmt::Format for MirrorConfig {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "MirrorConfig {{ max_retries: {=u32}, clock: {=bool}, max_ticks: {=u64}, owner: {} }}",
            self.max_retries,
            self.clock.is_some(),
            self.max_ticks,
            self.owner
        );
    }
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self { max_retries: 64, clock: None, max_ticks: u64::MAX, owner: None }
    }
}

/// Counters of one mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MirrorStats {
    /// Device faults handled (calls to [`Mirror::fault`](crate::Mirror::fault)
    /// that passed validation).
    pub faults: u64,
    /// Collisions (see [`MirrorConfig::max_retries`]).
    pub retries: u64,
    /// Calls to the kernel's fault handler: one per contiguous missing run.
    pub handler_calls: u64,
    /// 4 KiB pages written into the table by faults.
    pub pages_mapped: u64,
    /// Leaf entries written by faults.
    pub entries_mapped: u64,
    /// Of those, huge entries (a 2 MiB or 1 GiB leaf as one entry).
    pub huge_mapped: u64,
    /// Invalidation callbacks that tore something down.
    pub invalidations: u64,
    /// 4 KiB pages whose entries invalidations removed.
    pub pages_invalidated: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) faults: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) handler_calls: AtomicU64,
    pub(super) pages_mapped: AtomicU64,
    pub(super) entries_mapped: AtomicU64,
    pub(super) huge_mapped: AtomicU64,
    pub(super) invalidations: AtomicU64,
    pub(super) pages_invalidated: AtomicU64,
}

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// [`bump`] for the counters only ever changed under the writer lock
/// (pages, entries and huge entries mapped; invalidations, pages
/// invalidated): a load and a store, no locked read-modify-write on the
/// fault path. Readers may see a slightly old value, never a torn one.
pub(super) fn bump_locked(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

impl Counters {
    pub(super) fn read(&self) -> MirrorStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MirrorStats {
            faults: get(&self.faults),
            retries: get(&self.retries),
            handler_calls: get(&self.handler_calls),
            pages_mapped: get(&self.pages_mapped),
            entries_mapped: get(&self.entries_mapped),
            huge_mapped: get(&self.huge_mapped),
            invalidations: get(&self.invalidations),
            pages_invalidated: get(&self.pages_invalidated),
        }
    }
}
