//! `Mirror`: a device's mirror of an address space, kept in a table in the
//! device's own page-table format, with device page faults handled end to
//! end and invalidations torn down before the kernel changes a frame.
//!
//! # Locks
//! Order: mirror registration lock (register / unregister / drop only) ->
//! address-space read lock -> mirror update lock -> registry lock. hmm-core
//! never takes the read lock twice in one thread, and never holds it across
//! a wait for an invalidation. The invalidation callback takes only the
//! update lock and never allocates. Device walkers take no lock at all (see
//! [`crate::pt::MirrorTable`] for the protocol that makes that safe).
//!
//! # Retries only where an invalidation overlapped
//! A fault maps pages under the update lock, reading the CPU tables while it
//! holds it. An invalidation that starts after the fault took the lock
//! reaches the callback, which waits for the lock and then clears whatever
//! the fault mapped. The only danger is an invalidation that already ran
//! its callback and is still changing entries: the registry tracks the
//! ranges of running invalidations, and the fault does not map pages one of
//! them overlaps (it waits for it to end, counting a collision). So
//! invalidations of other pages of the same mirror cost a fault nothing,
//! and [`Error::Busy`] means the fault's own pages kept being invalidated.
//! The price is one registry-lock round trip per attempt (see
//! `benches/mirror.rs`).

mod device;
mod fault;

pub use device::{DeviceOps, MirrorConfig, MirrorStats};

use crate::arch::soft::SoftFormat;
use crate::arch::{DeviceFormat, PteFormat};
use crate::fault::{range_fault, RangeFault};
use crate::frame::FrameAllocator;
use crate::notifier::{Event, Interval, InvalidateRange, Notifier, Registration};
use crate::pt::{MirrorEntry, MirrorTable, Pfn, Reclaim, TableStats, TableWriter};
use crate::range::VaRange;
use crate::space::AddressSpace;
use crate::sync::{LockCell, RawLock, SpinLock};
use crate::{Error, Result};
use core::marker::PhantomPinned;
use core::pin::Pin;
use device::{bump, bump_locked, Counters};

/// A registration in the notifier registry of `S`.
type SpaceRegistration<'s, S> = Registration<'s, <S as AddressSpace>::Store, <S as AddressSpace>::Wait>;

/// Geometry of the CPU tables of `S`.
type CpuGeometry<S> = <<S as AddressSpace>::Format as PteFormat>::Geometry;

/// A device's mirror of `[range]` of an address space, in a table of device
/// format `F` (by default the software format over the CPU's geometry).
///
/// Create it with [`new`](Self::new), pin it, then [`register`](Self::register).
/// Pinning with `core::pin::pin!` ties the mirror to the stack frame; for a
/// mirror that outlives the function that made it, use `Box::pin` (or a
/// static):
/// ```ignore
/// let mirror = Box::pin(Mirror::new(&space, &alloc, device, range, MirrorConfig::default())?);
/// mirror.as_ref().register()?;
/// ```
/// Dropping it unregisters it (waiting for a running invalidation), tells the
/// device to drop everything, and frees its table. It cannot be cloned.
pub struct Mirror<'s, S, D, A, F = SoftFormat<CpuGeometry<S>>, L = SpinLock>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
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
    /// What walkers share: root and walk gate (no lock).
    table: MirrorTable<F>,
    // The update lock. INVARIANT: `None` once unregistered; every device
    // translation is backed by a valid entry of the table.
    writer: LockCell<L, Option<TableWriter<F>>>,
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
    /// A mirror of `range` in the software device format over the CPU's
    /// geometry, with a spinning update lock.
    ///
    /// Errors: `range` invalid for the CPU geometry ([`Error::OutOfRange`]
    /// etc.), [`Error::NoMemory`] for the root, [`Error::Released`].
    pub fn new(space: &'s S, alloc: &'s A, device: D, range: VaRange, config: MirrorConfig) -> Result<Self> {
        Self::with_format(space, alloc, device, range, config)
    }
}

impl<'s, S, D, A, F, L> Mirror<'s, S, D, A, F, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
    L: RawLock,
{
    /// A mirror of `range` with an empty table of device format `F` and
    /// update lock `L` (see [`Mirror::new`] for the defaults).
    ///
    /// Errors: [`Error::BadGeometry`] if `F`'s geometry is inconsistent or
    /// unsupported (checked at run time: a geometry whose index bits do not
    /// cover `VA_BITS` would alias distinct addresses), `range` invalid for
    /// the CPU geometry or not translatable by `F` ([`Error::OutOfRange`]
    /// etc.), [`Error::NoMemory`] for the root, [`Error::Released`].
    pub fn with_format(space: &'s S, alloc: &'s A, device: D, range: VaRange, config: MirrorConfig) -> Result<Self> {
        MirrorTable::<F>::check_geometry()?;
        range.check::<CpuGeometry<S>>()?;
        range.check::<F::Geometry>()?;
        if space.notifiers().is_released() {
            return Err(Error::Released);
        }
        let (table, writer) = MirrorTable::new(space.phys(), alloc)?;
        Ok(Self {
            space,
            alloc,
            device,
            interval: Interval::new(range),
            registration: LockCell::new(None),
            table,
            writer: LockCell::new(Some(writer)),
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
        if this.writer.lock().is_none() {
            return Err(Error::Unregistered);
        }
        // SAFETY: `self` is pinned, so it stays at this address until dropped;
        // the registration stays inside `self` and `Drop` drops it (removing
        // the entry) before the memory goes away.
        *registration = Some(unsafe { this.space.notifiers().insert(this) }?);
        Ok(())
    }

    /// Unregisters: clears the mirror and the device, then leaves the
    /// registry (waiting for a running invalidation) and frees the table.
    /// Later faults fail with [`Error::Unregistered`].
    ///
    /// The mirror is emptied under the update lock *before* it stops receiving
    /// invalidations, so no fault can commit a translation that no
    /// invalidation would reach.
    pub fn unregister(&self) -> Result<()> {
        let mut registration = self.registration.lock();
        let Some(registration) = registration.take() else {
            return Err(Error::Unregistered);
        };
        let writer = self.take_emptied();
        // Waits for a running invalidation to end.
        registration.remove();
        if let Some(w) = writer {
            w.destroy(&self.table, self.space.phys(), self.alloc);
        }
        Ok(())
    }

    /// Takes the writer out under the update lock, the table emptied of
    /// translations (table and device), so no fault can map into it any more.
    fn take_emptied(&self) -> Option<TableWriter<F>> {
        let mut guard = self.writer.lock();
        let mut writer = guard.take();
        if let Some(w) = writer.as_mut() {
            self.clear_range(w, self.interval.range(), Event::Release);
        }
        writer
    }

    /// Clears `range` from the table, has the device invalidate and flush
    /// what was there, and only then frees the directories left empty
    /// (repeating while more were unlinked than one pass can hold). Under
    /// the update lock. Returns the 4 KiB pages whose entries went.
    fn clear_range(&self, w: &mut TableWriter<F>, range: VaRange, event: Event) -> u64 {
        let phys = self.space.phys();
        let mut reclaim = Reclaim::new();
        let mut pages = 0;
        loop {
            let c = w.clear(phys, range, &mut reclaim);
            pages += c.pages;
            if c.entries == 0 && reclaim.is_empty() {
                return pages;
            }
            let flush = c.extent.map_or(range, |e| e.hull(&range));
            F::publish_table_writes();
            self.device.invalidate(flush, event);
            self.device.flush(flush);
            let more = reclaim.overflowed();
            w.reclaim(&self.table, self.alloc, &mut reclaim);
            if !more {
                return pages;
            }
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
        self.counters.read()
    }

    /// The mirror's translation of `va`, found by walking the table without
    /// any lock, as the device's MMU would: what a device model calls on a
    /// TLB miss. Never waits (a `flush` may wait for callers of it).
    pub fn translate(&self, va: u64) -> Option<MirrorEntry> {
        self.table.translate(self.space.phys(), va)
    }

    /// Physical address of the table's root, in format `F`: what a driver
    /// hands its hardware. 0 once unregistered.
    ///
    /// [`unregister`](Self::unregister) and drop free the root (after
    /// clearing the table, with `invalidate` + `flush` only if it held
    /// something): detach the hardware from it before either. A software
    /// walker from the root with its own grace period must therefore not
    /// rely on a final `flush` to learn that the root goes away.
    pub fn root(&self) -> u64 {
        self.table.root()
    }

    /// Table frames the mirror holds (root, directories, companions), 0 once
    /// unregistered.
    pub fn table_frames(&self) -> usize {
        self.table_stats().frames
    }

    /// Frames and live entries of the table (all zero once unregistered).
    pub fn table_stats(&self) -> TableStats {
        self.writer.lock().as_ref().map_or(TableStats::default(), |w| w.stats())
    }

    /// Reports the CPU view of `range` into `out` (one [`Pfn`] per page)
    /// without faulting anything in and without touching the mirror: Linux's
    /// snapshot mode of `hmm_range_fault`, retried within the budget (any
    /// invalidation of the mirror since the walk began counts).
    ///
    /// Errors: as [`fault`](Self::fault), plus [`Error::BadLength`].
    pub fn snapshot(&self, range: VaRange, out: &mut [Pfn]) -> Result<()> {
        self.check_fault_range(range)?;
        let started = self.config.clock.map(|c| c());
        let mut retries = 0;
        loop {
            if self.over_budget(started, retries) {
                return Err(Error::Busy);
            }
            let begun = self.space.notifiers().read_begin_bounded(&self.interval, &mut || {
                retries += 1;
                bump(&self.counters.retries, 1);
                self.over_budget(started, retries)
            });
            let Some(seq) = begun else {
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

    /// Validation shared by `fault` and `snapshot`.
    fn check_fault_range(&self, range: VaRange) -> Result<()> {
        range.check::<CpuGeometry<S>>()?;
        if !self.interval.range().contains(&range) {
            return Err(Error::OutOfRange);
        }
        if !self.interval.is_registered() {
            return Err(Error::Unregistered);
        }
        Ok(())
    }

    fn over_budget(&self, started: Option<u64>, retries: u32) -> bool {
        let timed_out = match (self.config.clock, started) {
            (Some(clock), Some(t0)) => clock().wrapping_sub(t0) > self.config.max_ticks,
            _ => false,
        };
        retries > self.config.max_retries || timed_out
    }
}

impl<S, D, A, F, L> Notifier for Mirror<'_, S, D, A, F, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
    L: RawLock,
{
    fn interval(&self) -> &Interval {
        &self.interval
    }

    /// Takes the update lock (only tries when `!inv.blockable`), clears the
    /// overlap from the table, has the device invalidate and flush it, then
    /// frees emptied directories. Never allocates.
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        if let Event::Migrate { owner } | Event::Exclusive { owner } = inv.event {
            // The device's own migration handles its mirror itself.
            if Some(owner) == self.config.owner {
                return true;
            }
        }
        let mut writer = if inv.blockable {
            self.writer.lock()
        } else {
            match self.writer.try_lock() {
                Some(w) => w,
                None => return false,
            }
        };
        self.interval.set_seq(inv);
        let (Some(range), Some(w)) = (inv.range.intersect(&self.interval.range()), writer.as_mut()) else {
            return true;
        };
        let pages = self.clear_range(w, range, inv.event);
        if pages > 0 {
            bump_locked(&self.counters.invalidations, 1);
            bump_locked(&self.counters.pages_invalidated, pages);
        }
        true
    }
}

impl<S, D, A, F, L> Drop for Mirror<'_, S, D, A, F, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
    L: RawLock,
{
    fn drop(&mut self) {
        // Empty mirror and device under the update lock first (callbacks may
        // still run until `remove` returns), so no translation outlives the
        // registration; then leave the registry, then free the table.
        let writer = self.take_emptied();
        // Through the lock, not `get_mut`: the registry's pointer to `self`
        // is shared, and a `&mut` to a field would invalidate it (Stacked
        // Borrows) before `remove` reads the interval through it.
        let registration = self.registration.lock().take();
        if let Some(registration) = registration {
            // Waits for a running invalidation; afterwards no callback can
            // reach `self`, so the memory may go.
            registration.remove();
        }
        if let Some(w) = writer {
            w.destroy(&self.table, self.space.phys(), self.alloc);
        }
    }
}
