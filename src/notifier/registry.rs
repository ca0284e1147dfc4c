//! The per-address-space registry: the sequence, the active count, and the
//! notifiers.

use super::index::{for_each_overlap, insertion_point, rebuild};
use super::store::{Deferred, Entry, EntryStore};
use super::{Event, Interval, InvalidateRange, Notifier, REGISTERED, UNREGISTERED};
use crate::range::VaRange;
use crate::sync::shim::{AtomicBool, AtomicU64, RawCell};
use crate::sync::{LockCell, SpinLock, SpinWait, Waiter};
use crate::{Error, Result};
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

/// The notifiers of one address space and its invalidation sequence.
///
/// The sequence is even when idle and odd while at least one invalidation
/// that overlaps a registered interval is running.
pub struct NotifierRegistry<S: EntryStore, W: Waiter = SpinWait> {
    /// Count of running invalidations; a short spin lock, never held across
    /// a callback or a wait.
    active: LockCell<SpinLock, usize>,
    // INVARIANT: `store` entries are modified only with `active` locked and
    // zero; they are read either with `active` locked or by an invalidation
    // counted in `active` (so no modification can run). Postponed operations
    // are touched only with `active` locked.
    store: RawCell<S>,
    seq: AtomicU64,
    released: AtomicBool,
    waiter: W,
}

// SAFETY: all shared access to `store` follows the invariant above; `S` is
// Send, and entries point to `Sync` notifiers.
unsafe impl<S: EntryStore, W: Waiter> Sync for NotifierRegistry<S, W> {}
// SAFETY: the registry owns its store, which is Send.
unsafe impl<S: EntryStore, W: Waiter + Send> Send for NotifierRegistry<S, W> {}

impl<S: EntryStore, W: Waiter> Default for NotifierRegistry<S, W> {
    fn default() -> Self {
        Self::new()
    }
}

/// A running invalidation; hand it to
/// [`invalidate_range_end`](NotifierRegistry::invalidate_range_end).
#[must_use = "every invalidate_range_start must be matched by invalidate_range_end"]
#[derive(Debug)]
pub struct Invalidation {
    counted: bool,
    seq: u64,
}

impl Invalidation {
    /// The sequence the callbacks received (0 when nothing overlapped).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Whether `a` is the notifier at address `b`.
fn same(a: NonNull<dyn Notifier>, b: *const ()) -> bool {
    core::ptr::eq(a.as_ptr().cast::<()>(), b)
}

impl<S: EntryStore, W: Waiter> NotifierRegistry<S, W> {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            active: LockCell::new(0),
            store: RawCell::new(S::default()),
            seq: AtomicU64::new(0),
            released: AtomicBool::new(false),
            waiter: W::default(),
        }
    }

    /// Registers `notifier` over its interval. If an invalidation is running,
    /// the insert takes effect when the last one ends, and a
    /// [`read_begin`](Self::read_begin) meanwhile waits.
    ///
    /// Errors: [`Error::Released`], [`Error::Capacity`], and [`Error::Busy`]
    /// if the interval is already registered.
    ///
    /// # Safety
    /// `notifier` must stay at its address and alive until [`remove`](Self::remove)
    /// of it has returned (the registry keeps a pointer to it).
    pub unsafe fn insert(&self, notifier: &dyn Notifier) -> Result<()> {
        let interval = notifier.interval();
        let range = interval.range();
        // SAFETY: lifetime erasure only; the caller keeps `notifier` alive and
        // in place until `remove` returns, after which the pointer is gone.
        let ptr: NonNull<dyn Notifier> = unsafe { core::mem::transmute(NonNull::from(notifier)) };
        let entry = Entry { start: range.start(), last: range.last(), max_last: range.last(), notifier: ptr };
        let active = self.active.lock();
        if self.released.load(Ordering::Acquire) {
            return Err(Error::Released);
        }
        if interval.is_registered() {
            return Err(Error::Busy);
        }
        let seq = self.seq.load(Ordering::Relaxed);
        // SAFETY: `active` is locked (invariant on `store`); entries change
        // only when it is zero.
        unsafe {
            self.store.with_mut(|store| {
                if store.room() == Some(0) {
                    return Err(Error::Capacity);
                }
                if *active == 0 {
                    // An even sequence minus one: never equal to the
                    // registry's, so read_begin does not wait.
                    interval.seq.store(seq.wrapping_sub(1), Ordering::Release);
                    let at = insertion_point(store.entries(), entry.start);
                    store.insert(at, entry).map_err(|_| Error::Capacity)?;
                    rebuild(store.entries_mut());
                } else {
                    // Equal to the running (odd) sequence: read_begin waits
                    // for the end, which applies the insert.
                    interval.seq.store(seq, Ordering::Release);
                    store.defer(Deferred { insert: true, entry }).map_err(|_| Error::Capacity)?;
                }
                Ok(())
            })
        }?;
        interval.state.store(REGISTERED, Ordering::Release);
        Ok(())
    }

    /// Unregisters `notifier`. If an invalidation is running, waits for it to
    /// end. After return no callback of `notifier` runs or will run.
    /// Removing an unregistered notifier is [`Error::Unregistered`].
    ///
    /// Must not be called from an invalidation callback.
    pub fn remove(&self, notifier: &dyn Notifier) -> Result<()> {
        let target = notifier as *const dyn Notifier as *const ();
        loop {
            let wait_seq = {
                let active = self.active.lock();
                if !notifier.interval().is_registered() {
                    return Err(Error::Unregistered);
                }
                // SAFETY: `active` is locked (invariant on `store`); entries
                // change only when it is zero.
                let done = unsafe {
                    self.store.with_mut(|store| {
                        // A pending insert never reached the tree: cancel it.
                        if let Some(i) =
                            store.deferred().iter().position(|d| d.insert && same(d.entry.notifier, target))
                        {
                            store.undefer(i);
                            return true;
                        }
                        let Some(at) = store.entries().iter().position(|e| same(e.notifier, target)) else {
                            return true;
                        };
                        if *active == 0 {
                            store.remove(at);
                            rebuild(store.entries_mut());
                            return true;
                        }
                        // Postpone to the end of the running invalidations;
                        // with no room, wait for them and try again.
                        let entry = store.entries()[at];
                        let _ = store.defer(Deferred { insert: false, entry });
                        false
                    })
                };
                if done {
                    notifier.interval().state.store(UNREGISTERED, Ordering::Release);
                    return Ok(());
                }
                self.seq.load(Ordering::Relaxed)
            };
            // The last running invalidation applies the postponed remove, then
            // changes the sequence.
            self.waiter.wait_until(&|| self.seq.load(Ordering::Acquire) != wait_seq);
        }
    }

    /// Starts an invalidation of `range`: makes the sequence odd (if anything
    /// overlaps), then calls every overlapping notifier. Returns the token
    /// for [`invalidate_range_end`](Self::invalidate_range_end).
    ///
    /// With `blockable = false`, a callback may refuse; then the invalidation
    /// is ended here and [`Error::WouldBlock`] returned (do not call `end`).
    pub fn invalidate_range_start(&self, range: VaRange, event: Event, blockable: bool) -> Result<Invalidation> {
        let cur_seq = {
            let mut active = self.active.lock();
            // SAFETY: `active` is locked: no modification runs.
            let overlaps = unsafe {
                self.store.with(|store| !for_each_overlap(store.entries(), range.start(), range.last(), &mut |_| false))
            };
            if !overlaps {
                return Ok(Invalidation { counted: false, seq: 0 });
            }
            if *active == 0 {
                self.seq.fetch_add(1, Ordering::AcqRel);
            }
            *active += 1;
            self.seq.load(Ordering::Relaxed)
        };
        let inv = InvalidateRange { range, event, blockable };
        let mut call = |e: &Entry| {
            // SAFETY: a registered notifier stays alive until its removal,
            // which cannot complete while this invalidation is counted.
            let n = unsafe { e.notifier.as_ref() };
            n.invalidate(&inv, cur_seq) || blockable
        };
        // SAFETY: this invalidation is counted in `active`, so the entries
        // cannot change until it ends (invariant on `store`).
        let all_agreed = unsafe {
            self.store.with(|store| for_each_overlap(store.entries(), range.start(), range.last(), &mut call))
        };
        let token = Invalidation { counted: true, seq: cur_seq };
        if !all_agreed {
            self.invalidate_range_end(token);
            return Err(Error::WouldBlock);
        }
        Ok(token)
    }

    /// Ends an invalidation. When the last running one ends, the sequence
    /// becomes even, postponed inserts/removes apply, and waiters wake.
    pub fn invalidate_range_end(&self, inv: Invalidation) {
        if !inv.counted {
            return;
        }
        {
            let mut active = self.active.lock();
            *active -= 1;
            if *active == 0 {
                // SAFETY: locked with no invalidation running.
                unsafe { self.store.with_mut(apply_deferred) };
                self.seq.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.waiter.wake_all();
    }

    /// Tears the address space down: every notifier gets a [`Event::Release`]
    /// invalidation of everything, further inserts fail with
    /// [`Error::Released`], and faults report [`Error::Released`].
    pub fn release(&self) {
        self.released.store(true, Ordering::Release);
        let all = VaRange::all();
        if let Ok(inv) = self.invalidate_range_start(all, Event::Release, true) {
            self.invalidate_range_end(inv);
        }
    }

    /// Whether [`release`](Self::release) ran.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Starts a read-side critical section for `interval`: waits while an
    /// invalidation covering it runs, then returns its sequence.
    pub fn read_begin(&self, interval: &Interval) -> u64 {
        loop {
            let seq = interval.seq();
            if seq != self.seq.load(Ordering::Acquire) {
                return seq;
            }
            self.waiter.wait_until(&|| self.seq.load(Ordering::Acquire) != seq);
        }
    }

    /// Whether an invalidation hit `interval` since `read_begin` returned
    /// `seq`. Authoritative only under the driver update lock that the
    /// callback takes around [`Interval::set_seq`].
    pub fn read_retry(&self, interval: &Interval, seq: u64) -> bool {
        interval.seq() != seq
    }

    /// Lockless early hint of [`read_retry`](Self::read_retry): a true answer
    /// is final, a false one must be confirmed under the driver lock.
    pub fn check_retry(&self, interval: &Interval, seq: u64) -> bool {
        interval.seq() != seq
    }

    /// Number of registered notifiers (pending inserts excluded).
    pub fn len(&self) -> usize {
        let _active = self.active.lock();
        // SAFETY: `active` is locked.
        unsafe { self.store.with(|s| s.entries().len()) }
    }

    /// Whether no notifier is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address-space sequence (odd while invalidating).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// Applies postponed inserts and removes, in order.
fn apply_deferred<S: EntryStore>(store: &mut S) {
    if store.deferred().is_empty() {
        return;
    }
    while !store.deferred().is_empty() {
        let op = store.undefer(0);
        if op.insert {
            let at = insertion_point(store.entries(), op.entry.start);
            // Room was reserved when the insert was accepted.
            let _ = store.insert(at, op.entry);
        } else if let Some(at) =
            store.entries().iter().position(|e| same(e.notifier, op.entry.notifier.as_ptr().cast::<()>()))
        {
            store.remove(at);
        }
    }
    rebuild(store.entries_mut());
}
