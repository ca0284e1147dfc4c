//! `Mirror`: a device's mirror of an address space, with its own device-side
//! table, device page faults handled end to end, and invalidation.
//!
//! Built on the modern primitives: an [`Interval`] in the address space's
//! [`NotifierRegistry`](crate::NotifierRegistry), [`range_fault`] into a
//! stack array, and the sequence retry under the mirror's update lock.
//!
//! # Lock order
//! mirror registration lock (register / unregister / drop only) ->
//! address-space read lock (taken and dropped inside the walk) -> mirror
//! update lock -> registry lock. The invalidation callback takes only the
//! update lock, never allocates, and frees emptied directories after the
//! device flushed.

use crate::arch::{PagingGeometry, PteFormat};
use crate::fault::{range_fault, RangeFault};
use crate::frame::FrameAllocator;
use crate::notifier::{Event, Interval, InvalidateRange, Notifier, Registration};
use crate::pt::{MirrorEntry, MirrorTable, Pfn};
use crate::range::VaRange;
use crate::space::AddressSpace;
use crate::sync::{LockCell, RawLock, SpinLock};
use crate::{Error, Result};
use core::marker::PhantomPinned;
use core::pin::Pin;
use core::sync::atomic::{AtomicU64, Ordering};

/// Pages handled per `range_fault` call: the output array lives on the stack.
const BATCH: usize = 64;

/// What the device driver provides.
pub trait DeviceOps: Sync {
    /// Programs the device's translations for `range` from `pfns` (one per
    /// page, all VALID). Called under the update lock. On `Err(code)` the
    /// mirror clears the range again (calling [`invalidate`](Self::invalidate))
    /// and the fault fails with [`Error::Device`].
    fn update(&self, range: VaRange, pfns: &[Pfn]) -> core::result::Result<(), i32>;
    /// Removes every device translation inside `range`. Called under the update
    /// lock, from invalidation callbacks: must not allocate or wait on a
    /// fault-side lock.
    fn invalidate(&self, range: VaRange, event: Event);
    /// Flushes the device TLB for `range`; when it returns, the device no
    /// longer uses any translation of `range` it dropped.
    fn flush(&self, range: VaRange);
}

/// Retry budget and identity of a mirror.
#[derive(Clone, Copy, Debug)]
pub struct MirrorConfig {
    /// Retries (collisions with invalidations) each 64-page batch of a fault
    /// may take before returning [`Error::Busy`]. A collision is a walk
    /// redone because an invalidation hit the mirror, or, while waiting for
    /// a running invalidation to end, one invalidation ending while another
    /// still covers the mirror; so waiting is bounded too: a fault returns
    /// within its budget plus one invalidation's length, whatever the
    /// invalidation pattern. Retries caused by the fault's own progress (its
    /// handler breaking COW invalidates the mirror too) are free, at most one
    /// per page. Default 64.
    pub max_retries: u32,
    /// Optional clock for a time budget (any monotonic tick), read when a
    /// fault starts and at every collision. Default `None`.
    pub clock: Option<fn() -> u64>,
    /// Ticks a fault may spend retrying before [`Error::Busy`] (with
    /// `clock`). Default `u64::MAX`.
    pub max_ticks: u64,
    /// Owner id of this device: its device-private pages are mirrored, and
    /// Migrate/Exclusive invalidations it started itself are skipped.
    pub owner: Option<u16>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self { max_retries: 64, clock: None, max_ticks: u64::MAX, owner: None }
    }
}

/// Counters of one mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Device faults handled (calls to [`Mirror::fault`] that passed validation).
    pub faults: u64,
    /// Times a fault redid its walk because an invalidation collided.
    pub retries: u64,
    /// Pages written into the mirror by faults.
    pub pages_mapped: u64,
    /// Invalidation callbacks that tore something down.
    pub invalidations: u64,
    /// Mirror entries removed by invalidations.
    pub pages_invalidated: u64,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    retries: AtomicU64,
    pages_mapped: AtomicU64,
    invalidations: AtomicU64,
    pages_invalidated: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A registration in the notifier registry of `S`.
type SpaceRegistration<'s, S> = Registration<'s, <S as AddressSpace>::Store, <S as AddressSpace>::Wait>;

/// Geometry of the CPU tables of `S`.
type CpuGeometry<S> = <<S as AddressSpace>::Format as PteFormat>::Geometry;

/// A device's mirror of `[range]` of an address space.
///
/// Create it with [`new`](Self::new), pin it, then [`register`](Self::register).
/// Dropping it unregisters it (waiting for a running invalidation), tells the
/// device to drop everything, and frees its table. It cannot be cloned.
pub struct Mirror<'s, S, D, A, G = CpuGeometry<S>, L = SpinLock>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    G: PagingGeometry,
    L: RawLock,
{
    space: &'s S,
    alloc: &'s A,
    device: D,
    interval: Interval,
    // INVARIANT: `Some` exactly while the mirror is registered (or pending
    // registration); only the mirror itself holds it, so nothing else can
    // take the mirror out of the registry without emptying it first.
    registration: LockCell<L, Option<SpaceRegistration<'s, S>>>,
    // INVARIANT: `None` once unregistered; every device translation is backed
    // by a valid entry of this table.
    table: LockCell<L, Option<MirrorTable<G>>>,
    config: MirrorConfig,
    counters: Counters,
    _pinned: PhantomPinned,
}

impl<'s, S, D, A> Mirror<'s, S, D, A>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
{
    /// A mirror of `range` whose device-side table has the CPU's geometry,
    /// with a spinning update lock.
    ///
    /// Errors: `range` invalid for the CPU geometry ([`Error::OutOfRange`]
    /// etc.), [`Error::NoMemory`] for the root, [`Error::Released`].
    pub fn new(space: &'s S, alloc: &'s A, device: D, range: VaRange, config: MirrorConfig) -> Result<Self> {
        Self::with_geometry(space, alloc, device, range, config)
    }
}

impl<'s, S, D, A, G, L> Mirror<'s, S, D, A, G, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    G: PagingGeometry,
    L: RawLock,
{
    /// A mirror of `range` with an empty device-side table of geometry `G`
    /// and update lock `L` (see [`Mirror::new`] for the defaults).
    ///
    /// Errors: [`Error::BadGeometry`] if `G` is inconsistent or unsupported
    /// (checked at run time: a geometry whose index bits do not cover
    /// `VA_BITS` would alias distinct addresses), `range` invalid for the CPU
    /// geometry or not translatable by `G` ([`Error::OutOfRange`] etc.),
    /// [`Error::NoMemory`] for the root, [`Error::Released`].
    pub fn with_geometry(space: &'s S, alloc: &'s A, device: D, range: VaRange, config: MirrorConfig) -> Result<Self> {
        MirrorTable::<G>::check_geometry()?;
        range.check::<CpuGeometry<S>>()?;
        range.check::<G>()?;
        if space.notifiers().is_released() {
            return Err(Error::Released);
        }
        let table = MirrorTable::new(space.phys(), alloc)?;
        Ok(Self {
            space,
            alloc,
            device,
            interval: Interval::new(range),
            registration: LockCell::new(None),
            table: LockCell::new(Some(table)),
            config,
            counters: Counters::default(),
            _pinned: PhantomPinned,
        })
    }

    /// Registers the mirror with the address space; from now on invalidations
    /// reach it. Errors: [`Error::Released`], [`Error::Capacity`],
    /// [`Error::Unregistered`] after [`unregister`](Self::unregister),
    /// [`Error::Busy`] if already registered (also when two threads register
    /// at once: exactly one succeeds).
    ///
    /// May wait for running invalidations to end (when the registry has no
    /// room to postpone the insert); must not be called from a callback.
    pub fn register(self: Pin<&Self>) -> Result<()> {
        let this: &Self = self.get_ref();
        let mut registration = this.registration.lock();
        if registration.is_some() {
            return Err(Error::Busy);
        }
        if this.table.lock().is_none() {
            return Err(Error::Unregistered);
        }
        // SAFETY: `self` is pinned, so it stays at this address until dropped;
        // the registration stays inside `self` and `Drop` drops it (removing
        // the entry) before the memory goes away.
        *registration = Some(unsafe { this.space.notifiers().insert(this) }?);
        Ok(())
    }

    /// Unregisters: clears the mirror and the device, then leaves the
    /// registry (waiting for a running invalidation). Later faults fail with
    /// [`Error::Unregistered`].
    ///
    /// The mirror is emptied under the update lock *before* it stops receiving
    /// invalidations, so no fault can commit a translation that no
    /// invalidation would reach.
    pub fn unregister(&self) -> Result<()> {
        let mut registration = self.registration.lock();
        let Some(registration) = registration.take() else {
            return Err(Error::Unregistered);
        };
        let table = self.take_emptied();
        // Waits for a running invalidation to end.
        registration.remove();
        if let Some(t) = table {
            t.destroy(self.space.phys(), self.alloc);
        }
        Ok(())
    }

    /// Takes the table out under the update lock, emptied of translations
    /// (mirror and device), so no fault can commit into it any more.
    fn take_emptied(&self) -> Option<MirrorTable<G>> {
        let mut guard = self.table.lock();
        let mut table = guard.take();
        if let Some(t) = table.as_mut() {
            self.clear_device(t, Event::Release);
        }
        table
    }

    /// Removes every translation from the table and the device (entries only;
    /// directories stay until destroyed or pruned).
    fn clear_device(&self, table: &mut MirrorTable<G>, event: Event) {
        let range = self.interval.range();
        if table.clear(self.space.phys(), range) > 0 {
            self.device.invalidate(range, event);
            self.device.flush(range);
        }
    }

    /// The device this mirror drives.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The mirrored range.
    pub fn range(&self) -> VaRange {
        self.interval.range()
    }

    /// Counters so far.
    pub fn stats(&self) -> MirrorStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MirrorStats {
            faults: get(&c.faults),
            retries: get(&c.retries),
            pages_mapped: get(&c.pages_mapped),
            invalidations: get(&c.invalidations),
            pages_invalidated: get(&c.pages_invalidated),
        }
    }

    /// The mirror's translation of `va` (what a device walker would find).
    pub fn translate(&self, va: u64) -> Option<MirrorEntry> {
        self.table.lock().as_ref()?.lookup(self.space.phys(), va)
    }

    /// Table frames the mirror holds (root included), 0 once unregistered.
    pub fn table_frames(&self) -> usize {
        self.table.lock().as_ref().map_or(0, |t| t.table_frames())
    }

    /// Handles a device page fault on `range`: makes every page present (and
    /// writable if `write`) in the CPU tables, mirrors it, and programs the
    /// device — retrying while invalidations collide, within the budget.
    ///
    /// Errors: range validation errors, [`Error::OutOfRange`] outside the
    /// mirror, [`Error::Unregistered`], [`Error::Released`], [`Error::Busy`]
    /// (budget spent), [`Error::Fault`], [`Error::Perm`], [`Error::NoMemory`],
    /// [`Error::Device`]. On error, pages of earlier batches stay mirrored
    /// (they are valid translations); the failing batch is not.
    pub fn fault(&self, range: VaRange, write: bool) -> Result<()> {
        range.check::<CpuGeometry<S>>()?;
        if !self.interval.range().contains(&range) {
            return Err(Error::OutOfRange);
        }
        if !self.interval.is_registered() {
            return Err(Error::Unregistered);
        }
        bump(&self.counters.faults, 1);
        let page_shift = CpuGeometry::<S>::PAGE_SHIFT;
        let started = self.config.clock.map(|c| c());
        let mut va = range.start();
        loop {
            let pages = (range.pages(page_shift) - ((va - range.start()) >> page_shift)).min(BATCH as u64);
            let chunk = VaRange::from_inclusive(va, va + ((pages << page_shift) - 1));
            self.fault_batch(chunk, write, started)?;
            if chunk.last() == range.last() {
                return Ok(());
            }
            va = chunk.last() + 1;
        }
    }

    /// Reports the CPU view of `range` into `out` (one [`Pfn`] per page)
    /// without faulting anything in and without touching the mirror: Linux's
    /// snapshot mode of `hmm_range_fault`, retried within the budget.
    ///
    /// Errors: as [`fault`](Self::fault), plus [`Error::BadLength`].
    pub fn snapshot(&self, range: VaRange, out: &mut [Pfn]) -> Result<()> {
        range.check::<CpuGeometry<S>>()?;
        if !self.interval.range().contains(&range) {
            return Err(Error::OutOfRange);
        }
        if !self.interval.is_registered() {
            return Err(Error::Unregistered);
        }
        let started = self.config.clock.map(|c| c());
        let mut retries = 0;
        loop {
            if self.over_budget(started, retries) {
                return Err(Error::Busy);
            }
            let Some(seq) = self.read_begin(started, &mut retries) else {
                return Err(Error::Busy);
            };
            let guard = self.space.read_lock();
            let mut req = RangeFault {
                range,
                default_flags: 0,
                pfn_flags_mask: 0,
                pfns: &mut *out,
                dev_private_owner: self.config.owner,
            };
            match range_fault(self.space, &guard, &self.interval, seq, &mut req) {
                Err(Error::Busy) => {
                    retries += 1;
                    bump(&self.counters.retries, 1);
                }
                other => return other.map(|_| ()),
            }
        }
    }

    /// `read_begin` within the budget: every invalidation that ends while
    /// another keeps the mirror invalidated counts as a collision; `None`
    /// once the budget is spent.
    fn read_begin(&self, started: Option<u64>, retries: &mut u32) -> Option<u64> {
        self.space.notifiers().read_begin_bounded(&self.interval, &mut || {
            *retries += 1;
            bump(&self.counters.retries, 1);
            self.over_budget(started, *retries)
        })
    }

    fn over_budget(&self, started: Option<u64>, retries: u32) -> bool {
        let timed_out = match (self.config.clock, started) {
            (Some(clock), Some(t0)) => clock().wrapping_sub(t0) > self.config.max_ticks,
            _ => false,
        };
        retries > self.config.max_retries || timed_out
    }

    fn fault_batch(&self, chunk: VaRange, write: bool, started: Option<u64>) -> Result<()> {
        let notifiers = self.space.notifiers();
        let mut buf = [Pfn::NONE; BATCH];
        let pfns = &mut buf[..chunk.pages(CpuGeometry::<S>::PAGE_SHIFT) as usize];
        let flags = Pfn::REQ_FAULT | if write { Pfn::REQ_WRITE } else { 0 };
        let mut retries = 0u32;
        let mut progress_retries = 0usize;
        loop {
            if self.over_budget(started, retries) {
                return Err(Error::Busy);
            }
            let Some(seq) = self.read_begin(started, &mut retries) else {
                return Err(Error::Busy);
            };
            let walked = {
                let guard = self.space.read_lock();
                let mut req = RangeFault {
                    range: chunk,
                    default_flags: flags,
                    pfn_flags_mask: 0,
                    pfns: &mut *pfns,
                    dev_private_owner: self.config.owner,
                };
                range_fault(self.space, &guard, &self.interval, seq, &mut req)
            };
            let progressed = match walked {
                Err(Error::Busy) => {
                    retries += 1;
                    bump(&self.counters.retries, 1);
                    continue;
                }
                Err(e) => return Err(e),
                Ok(stats) => stats.handler_calls > 0,
            };
            let mut table = self.table.lock();
            if notifiers.read_retry(&self.interval, seq) {
                drop(table);
                // A walk that faulted pages in moved the sequence itself; that
                // retry is progress, not contention (bounded by the pages).
                if progressed && progress_retries < pfns.len() {
                    progress_retries += 1;
                } else {
                    retries += 1;
                }
                bump(&self.counters.retries, 1);
                continue;
            }
            if notifiers.is_released() {
                return Err(Error::Released);
            }
            let Some(table) = table.as_mut() else {
                return Err(Error::Unregistered);
            };
            return self.commit(table, chunk, pfns);
        }
    }

    /// Writes `pfns` into the table and the device; under the update lock with
    /// the sequence confirmed. On failure the table is as before for `chunk`
    /// minus any earlier translations in it (cleared, never stale).
    fn commit(&self, table: &mut MirrorTable<G>, chunk: VaRange, pfns: &[Pfn]) -> Result<()> {
        let phys = self.space.phys();
        table.reserve(phys, self.alloc, chunk)?;
        let base = chunk.start();
        let shift = CpuGeometry::<S>::PAGE_SHIFT;
        table.set(phys, chunk, &mut |va| {
            let p = pfns[((va - base) >> shift) as usize];
            p.is_valid().then(|| MirrorEntry::new(p.phys(), p.is_write(), 0))
        });
        if let Err(code) = self.device.update(chunk, pfns) {
            table.clear(phys, chunk);
            self.device.invalidate(chunk, Event::Clear);
            self.device.flush(chunk);
            table.prune(phys, self.alloc, chunk);
            return Err(Error::Device(code));
        }
        bump(&self.counters.pages_mapped, pfns.len() as u64);
        Ok(())
    }
}

impl<S, D, A, G, L> Notifier for Mirror<'_, S, D, A, G, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    G: PagingGeometry,
    L: RawLock,
{
    fn interval(&self) -> &Interval {
        &self.interval
    }

    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        if let Event::Migrate { owner } | Event::Exclusive { owner } = inv.event {
            // The device's own migration handles its mirror itself.
            if Some(owner) == self.config.owner {
                return true;
            }
        }
        let mut table = if inv.blockable {
            self.table.lock()
        } else {
            match self.table.try_lock() {
                Some(t) => t,
                None => return false,
            }
        };
        self.interval.set_seq(inv);
        let (Some(range), Some(table)) = (inv.range.intersect(&self.interval.range()), table.as_mut()) else {
            return true;
        };
        let phys = self.space.phys();
        let cleared = table.clear(phys, range);
        if cleared > 0 {
            self.device.invalidate(range, inv.event);
            self.device.flush(range);
            table.prune(phys, self.alloc, range);
            bump(&self.counters.invalidations, 1);
            bump(&self.counters.pages_invalidated, cleared);
        }
        true
    }
}

impl<S, D, A, G, L> Drop for Mirror<'_, S, D, A, G, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    G: PagingGeometry,
    L: RawLock,
{
    fn drop(&mut self) {
        // Empty mirror and device under the update lock first (callbacks may
        // still run until `remove` returns), so no translation outlives the
        // registration; then leave the registry, then free the table.
        let table = self.take_emptied();
        // Through the lock, not `get_mut`: the registry's pointer to `self`
        // is shared, and a `&mut` to a field would invalidate it (Stacked
        // Borrows) before `remove` reads the interval through it.
        let registration = self.registration.lock().take();
        if let Some(registration) = registration {
            // Waits for a running invalidation; afterwards no callback can
            // reach `self`, so the memory may go.
            registration.remove();
        }
        if let Some(table) = table {
            table.destroy(self.space.phys(), self.alloc);
        }
    }
}
