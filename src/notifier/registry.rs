//! The per-address-space registry: the sequence, the active count, and the
//! notifiers.

use super::index::{IntervalTree, Key};
use super::store::{Entry, EntryStore};
use super::MAX_PENDING;
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
///
/// It is `Sync` only when its [`EntryStore`] is: invalidations on several
/// threads read the store at once. A store with unsynchronised interior
/// mutability makes a registry that cannot be shared:
/// ```compile_fail
/// # use hmm_core::notifier::{Entry, EntryStore, FixedStore, NotifierRegistry};
/// #[derive(Default)]
/// struct Counting {
///     inner: FixedStore<4>,
///     reads: core::cell::Cell<u64>,
/// }
/// impl EntryStore for Counting {
///     fn entries(&self) -> &[Entry] {
///         self.reads.set(self.reads.get() + 1);
///         self.inner.entries()
///     }
///     fn entries_mut(&mut self) -> &mut [Entry] { self.inner.entries_mut() }
///     fn insert(&mut self, i: usize, e: Entry) -> Result<(), Entry> { self.inner.insert(i, e) }
///     fn remove(&mut self, i: usize) -> Entry { self.inner.remove(i) }
///     fn room(&self) -> Option<usize> { self.inner.room() }
///     fn spare(&self) -> usize { self.inner.spare() }
/// }
/// fn sync<T: Sync>() {}
/// sync::<NotifierRegistry<Counting>>();
/// ```
/// while the stores hmm-core ships can:
/// ```
/// # use hmm_core::notifier::{FixedStore, NotifierRegistry};
/// fn sync<T: Sync>() {}
/// sync::<NotifierRegistry<FixedStore<4>>>();
/// ```
pub struct NotifierRegistry<S: EntryStore, W: Waiter = SpinWait> {
    /// Count of running invalidations; a short spin lock, never held across
    /// a callback or a wait.
    active: LockCell<SpinLock, State>,
    // INVARIANT: `store` (tree and entries) is modified only with `active`
    // locked and the sequence even; it is read either with `active` locked or
    // by an invalidation that found an overlap (it made the sequence odd, and
    // the sequence stays odd until every running invalidation ended, so no
    // modification can run). Postponed operations live in `active`.
    store: RawCell<IntervalTree<S>>,
    seq: AtomicU64,
    /// Invalidations ended so far (changed under `active`): a reader waiting
    /// through back-to-back overlapping invalidations, whose sequence stays
    /// odd, still sees each one end and can count it against its budget.
    ended: AtomicU64,
    released: AtomicBool,
    waiter: W,
}

/// Running invalidations and the operations postponed until they end.
#[derive(Debug, Default)]
struct State {
    active: usize,
    deferred: heapless::Vec<Deferred, MAX_PENDING>,
    /// Ranges of the running invalidations, as far as they fit; the others
    /// are counted in `untracked` and count as covering everything.
    running: heapless::Vec<VaRange, MAX_RUNNING>,
    untracked: usize,
}

/// Running invalidations whose ranges are tracked one by one; more count as
/// covering every address until they end.
const MAX_RUNNING: usize = 8;

/// The invalidations running at one moment, as a fault about to commit into
/// an interval sees them (see [`NotifierRegistry::running`]).
#[derive(Debug, Default)]
pub(crate) struct Running {
    ranges: heapless::Vec<VaRange, MAX_RUNNING>,
    all: bool,
}

impl Running {
    /// Whether one of them may change a translation of `range`.
    pub(crate) fn overlaps(&self, range: &VaRange) -> bool {
        self.all || self.ranges.iter().any(|r| r.overlaps(range))
    }
}

/// An insert or remove postponed until no invalidation is running.
#[derive(Clone, Copy, Debug)]
struct Deferred {
    insert: bool,
    /// The entry to insert or remove.
    entry: Entry,
    interval: NonNull<Interval>,
}

// SAFETY: `store` is modified only by one thread at a time (with `active`
// locked and no invalidation running, invariant above), but it is *read*
// concurrently by every running invalidation, outside the lock: hence
// `S: Sync` (a store with unsynchronised interior mutability must not be
// shared) as well as `S: Send` (the thread holding the lock mutates it).
// Entries point to `Sync` notifiers.
unsafe impl<S: EntryStore + Sync, W: Waiter> Sync for NotifierRegistry<S, W> {}
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
    seq: u64,
    range: VaRange,
    tracked: bool,
}

impl Invalidation {
    /// The sequence the callbacks received (0 when nothing overlapped).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A notifier's place in a registry: returned by
/// [`NotifierRegistry::insert`], it is the only way to take the notifier out
/// again ([`remove`](Self::remove), or dropping it). Whoever registered a
/// notifier owns its registration, so no other code can detach it (a
/// [`Mirror`](crate::Mirror) keeps its own private, which is how it makes
/// sure it is emptied before it stops receiving invalidations).
///
/// The registry itself offers no way to remove a notifier it is shown:
/// ```compile_fail
/// # use hmm_core::notifier::{FixedStore, NotifierRegistry};
/// # use hmm_core::Notifier;
/// fn detach(reg: &NotifierRegistry<FixedStore<4>>, n: &dyn Notifier) {
///     let _ = reg.remove(n);
/// }
/// ```
#[must_use = "dropping a Registration unregisters the notifier at once"]
pub struct Registration<'r, S: EntryStore, W: Waiter = SpinWait> {
    registry: &'r NotifierRegistry<S, W>,
    notifier: NonNull<dyn Notifier>,
    /// The notifier's interval, as inserted.
    interval: NonNull<Interval>,
}

// SAFETY: the pointers name a `Notifier` and an `Interval`, both `Sync`;
// the registration only hands them back to its registry, which is `Sync`.
unsafe impl<S: EntryStore + Sync, W: Waiter> Send for Registration<'_, S, W> {}
// SAFETY: `&Registration` allows nothing but reading the registry reference.
unsafe impl<S: EntryStore + Sync, W: Waiter> Sync for Registration<'_, S, W> {}

impl<S: EntryStore, W: Waiter> core::fmt::Debug for Registration<'_, S, W> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Registration").field("interval", &self.interval).finish()
    }
}

impl<S: EntryStore, W: Waiter> Registration<'_, S, W> {
    /// Unregisters the notifier. If an invalidation is running, waits for it
    /// to end; after return no callback of the notifier runs or will run.
    ///
    /// Must not be called from an invalidation callback (it would wait for
    /// itself).
    pub fn remove(self) {
        // `Drop` does the work.
    }
}

impl<S: EntryStore, W: Waiter> Drop for Registration<'_, S, W> {
    fn drop(&mut self) {
        self.registry.remove(self.notifier, self.interval);
    }
}

impl<S: EntryStore, W: Waiter> NotifierRegistry<S, W> {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            active: LockCell::new(State::default()),
            store: RawCell::new(IntervalTree::default()),
            seq: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            released: AtomicBool::new(false),
            waiter: W::default(),
        }
    }

    /// Registers `notifier` over its interval. If an invalidation is running,
    /// the insert takes effect when the last one ends, and a
    /// [`read_begin`](Self::read_begin) meanwhile waits.
    ///
    /// The interval is marked registered under the registry lock that checks
    /// it, so of two concurrent inserts of one notifier exactly one succeeds.
    ///
    /// Errors: [`Error::Released`], [`Error::Capacity`], and [`Error::Busy`]
    /// if the interval is already registered.
    ///
    /// # Safety
    /// `notifier` must stay at its address and alive until the returned
    /// [`Registration`] has been dropped or [removed](Registration::remove)
    /// (the registry keeps a pointer to it); the registration must not be
    /// leaked (`mem::forget`) while the notifier may still go away.
    pub unsafe fn insert(&self, notifier: &dyn Notifier) -> Result<Registration<'_, S, W>> {
        let interval = notifier.interval();
        let range = interval.range();
        // SAFETY: lifetime erasure only; the caller keeps `notifier` alive and
        // in place until `remove` returns, after which the pointer is gone.
        let ptr: NonNull<dyn Notifier> = unsafe { core::mem::transmute(NonNull::from(notifier)) };
        let at = NonNull::from(interval);
        let entry = Entry::leaf(ptr, range.start(), range.last());
        loop {
            let wait_seq = {
                let mut state = self.active.lock();
                if self.released.load(Ordering::Acquire) {
                    return Err(Error::Released);
                }
                if interval.is_registered() {
                    return Err(Error::Busy);
                }
                if state.active == 0 {
                    // SAFETY: `active` is locked and zero: nobody reads the
                    // store outside the lock (invariant on `store`).
                    unsafe {
                        self.store.with_mut(|tree| {
                            tree.insert(entry).map_err(|_| Error::Capacity)?;
                            tree.reserve_spare();
                            Ok(())
                        })
                    }?;
                    // An even sequence minus one: never equal to the
                    // registry's, so read_begin does not wait.
                    let seq = self.seq.load(Ordering::Relaxed);
                    interval.seq.store(seq.wrapping_sub(1), Ordering::Release);
                    interval.state.store(REGISTERED, Ordering::Release);
                    break;
                }
                let pending = state.deferred.iter().filter(|d| d.insert).count();
                // SAFETY: a shared read, as invalidations do (invariant on `store`).
                let (room, spare) = unsafe { self.store.with(|tree| (tree.room(), tree.spare())) };
                if pending >= room {
                    return Err(Error::Capacity);
                }
                // A running invalidation may be changing this range even if
                // it overlapped nothing when it started: count the new
                // interval as invalidated (odd sequence, read_begin waits).
                let seq = self.seq.load(Ordering::Relaxed) | 1;
                self.seq.store(seq, Ordering::Release);
                if pending < spare && state.deferred.push(Deferred { insert: true, entry, interval: at }).is_ok() {
                    // Inserted when the last invalidation ends.
                    interval.seq.store(seq, Ordering::Release);
                    interval.state.store(REGISTERED, Ordering::Release);
                    break;
                }
                seq
            };
            // No room to postpone without allocating: wait for the end.
            self.waiter.wait_until(&|| self.seq.load(Ordering::Acquire) != wait_seq);
        }
        Ok(Registration { registry: self, notifier: ptr, interval: at })
    }

    /// Takes `notifier` out (see [`Registration::remove`]): at once when no
    /// invalidation runs, otherwise postponed to the end of the last one,
    /// waiting for it. The interval is marked unregistered under the
    /// registry lock, when its entry leaves the store.
    fn remove(&self, notifier: NonNull<dyn Notifier>, at: NonNull<Interval>) {
        // SAFETY: the notifier is registered, so it and its interval are
        // alive (insert's contract).
        let interval = unsafe { at.as_ref() };
        let key = Key::new(interval.range().start(), notifier);
        loop {
            let waiting_for = {
                let mut state = self.active.lock();
                let seq = self.seq.load(Ordering::Relaxed);
                if let Some(i) = state.deferred.iter().position(|d| d.insert && d.interval == at) {
                    // A pending insert never reached the tree: cancel it.
                    state.deferred.remove(i);
                    interval.state.store(UNREGISTERED, Ordering::Release);
                    return;
                }
                if seq & 1 == 0 {
                    // SAFETY: `active` is locked and the sequence even:
                    // nobody reads the store outside the lock. (Absent from
                    // the tree: a postponed remove of ours was applied by the
                    // last invalidation, which marked it.)
                    unsafe { self.store.with_mut(|tree| tree.remove(key)) };
                    interval.state.store(UNREGISTERED, Ordering::Release);
                    return;
                }
                // Invalidations may be calling it: postpone to the end of the
                // last one (with no room, wait and retry).
                if !state.deferred.iter().any(|d| !d.insert && d.interval == at)
                    // SAFETY: a shared read, as invalidations do.
                    && unsafe { self.store.with(|tree| tree.contains(key)) }
                {
                    let range = interval.range();
                    let entry = Entry::leaf(notifier, range.start(), range.last());
                    let _ = state.deferred.push(Deferred { insert: false, entry, interval: at });
                }
                seq
            };
            // The last running invalidation applies the postponed remove, then
            // makes the sequence even.
            self.waiter.wait_until(&|| self.seq.load(Ordering::Acquire) != waiting_for);
        }
    }

    /// Starts an invalidation of `range`: makes the sequence odd (if anything
    /// overlaps), then calls every overlapping notifier. Returns the token
    /// for [`invalidate_range_end`](Self::invalidate_range_end).
    ///
    /// With `blockable = true` it never fails. With `blockable = false`, a
    /// callback may refuse; then the invalidation is ended here and
    /// [`Error::WouldBlock`] returned (do not call `end`).
    pub fn invalidate_range_start(&self, range: VaRange, event: Event, blockable: bool) -> Result<Invalidation> {
        let (cur_seq, tracked, first, mut walk) = {
            let mut active = self.active.lock();
            // Every invalidation is counted, overlapping or not: an interval
            // inserted meanwhile must wait for it (see `insert`).
            active.active += 1;
            let tracked = active.running.push(range).is_ok();
            active.untracked += !tracked as usize;
            // SAFETY: `active` is locked: no modification runs.
            let (walk, first) = unsafe {
                self.store.with(|tree| {
                    let mut walk = tree.overlaps(range.start(), range.last());
                    let first = tree.next_overlap(&mut walk).map(|e| e.notifier);
                    (walk, first)
                })
            };
            let Some(first) = first else {
                return Ok(Invalidation { seq: 0, range, tracked });
            };
            let seq = self.seq.load(Ordering::Relaxed) | 1;
            self.seq.store(seq, Ordering::Release);
            (seq, tracked, first, walk)
        };
        let inv = InvalidateRange::new(range, event, blockable, cur_seq);
        let call = |n: NonNull<dyn Notifier>| {
            // SAFETY: a registered notifier stays alive until its removal,
            // which waits while the sequence is odd, as it is until this
            // invalidation ends.
            let n = unsafe { n.as_ref() };
            n.invalidate(&inv) || blockable
        };
        let all_agreed = call(first)
            // SAFETY: this invalidation found an overlap and made the sequence
            // odd; it stays odd until this one ends, so the entries cannot
            // change (invariant on `store`) and the walk resumes where it
            // stopped.
            && unsafe {
                self.store.with(|tree| {
                    while let Some(e) = tree.next_overlap(&mut walk) {
                        if !call(e.notifier) {
                            return false;
                        }
                    }
                    true
                })
            };
        let token = Invalidation { seq: cur_seq, range, tracked };
        if !all_agreed {
            self.invalidate_range_end(token);
            return Err(Error::WouldBlock);
        }
        Ok(token)
    }

    /// Ends an invalidation. When the last running one ends, the sequence
    /// becomes even, postponed inserts/removes apply, and waiters wake.
    pub fn invalidate_range_end(&self, inv: Invalidation) {
        {
            let mut state = self.active.lock();
            state.active -= 1;
            if inv.tracked {
                if let Some(i) = state.running.iter().position(|r| *r == inv.range) {
                    state.running.swap_remove(i);
                }
            } else {
                state.untracked -= 1;
            }
            // Only changed under `active`: a plain increment, no RMW.
            self.ended.store(self.ended.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
            let seq = self.seq.load(Ordering::Relaxed);
            if state.active == 0 && seq & 1 == 1 {
                let deferred = core::mem::take(&mut state.deferred);
                // SAFETY: locked with no invalidation running.
                unsafe { self.store.with_mut(|tree| apply_deferred(tree, &deferred)) };
                self.seq.store(seq + 1, Ordering::Release);
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
    ///
    /// Waits without bound: overlapping invalidations that keep starting
    /// before the last one ends keep it waiting. A caller with a budget uses
    /// [`read_begin_bounded`](Self::read_begin_bounded).
    pub fn read_begin(&self, interval: &Interval) -> u64 {
        self.read_begin_bounded(interval, &mut || false).unwrap_or_else(|| interval.seq())
    }

    /// [`read_begin`](Self::read_begin) that can give up: whenever an
    /// invalidation ends while another still covers `interval` (the sequence
    /// stays odd), it calls `give_up`, and returns `None` once that says
    /// true. So a caller waits at most one invalidation's length past the
    /// moment its budget runs out, whatever the invalidation pattern.
    pub fn read_begin_bounded(&self, interval: &Interval, give_up: &mut dyn FnMut() -> bool) -> Option<u64> {
        // No invalidation can reach an unregistered interval: nothing to wait for.
        if !interval.is_registered() {
            return Some(interval.seq());
        }
        loop {
            let seq = interval.seq();
            if seq != self.seq.load(Ordering::Acquire) {
                return Some(seq);
            }
            let ended = self.ended.load(Ordering::Acquire);
            self.waiter
                .wait_until(&|| self.seq.load(Ordering::Acquire) != seq || self.ended.load(Ordering::Acquire) != ended);
            if interval.seq() == self.seq.load(Ordering::Acquire) && give_up() {
                return None;
            }
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

    /// The invalidations running now, for a fault of `interval` that holds
    /// the driver update lock: one that started before this call may have
    /// run its callback already and be changing entries, so the fault must
    /// not commit pages it overlaps; one that starts later calls the
    /// callback, which waits for the update lock. While `interval`'s insert
    /// is still postponed (no callback reaches it yet), everything overlaps.
    pub(crate) fn running(&self, interval: &Interval) -> Running {
        running(&self.active.lock(), interval)
    }

    /// Waits until no running invalidation overlaps `range` of `interval`
    /// (see [`running`](Self::running)). Whenever one ends while an
    /// overlapping one still runs, asks `give_up`; false once it said true.
    pub(crate) fn wait_quiet(&self, interval: &Interval, range: VaRange, give_up: &mut dyn FnMut() -> bool) -> bool {
        let mut waited = false;
        loop {
            let (busy, ended) = {
                let state = self.active.lock();
                (running(&state, interval).overlaps(&range), self.ended.load(Ordering::Acquire))
            };
            if !busy {
                return true;
            }
            // Outside the lock: `give_up` may read the caller's clock.
            if waited && give_up() {
                return false;
            }
            self.waiter.wait_until(&|| self.ended.load(Ordering::Acquire) != ended);
            waited = true;
        }
    }

    /// Number of registered notifiers (pending inserts excluded).
    pub fn len(&self) -> usize {
        let _active = self.active.lock();
        // SAFETY: `active` is locked.
        unsafe { self.store.with(|tree| tree.len()) }
    }

    /// Checks the interval tree's invariants (order, balance, heights,
    /// subtree `max_last`, slot bookkeeping): for tests.
    #[doc(hidden)]
    pub fn check_invariants(&self) -> core::result::Result<(), &'static str> {
        let _active = self.active.lock();
        // SAFETY: `active` is locked: no modification runs.
        unsafe { self.store.with(|tree| tree.check()) }
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

/// The running invalidations as `interval` sees them (see
/// [`NotifierRegistry::running`]).
fn running(state: &State, interval: &Interval) -> Running {
    Running { ranges: state.running.clone(), all: state.untracked > 0 || pending_insert(state, interval) }
}

/// Whether `interval`'s insert waits for the running invalidations to end.
fn pending_insert(state: &State, interval: &Interval) -> bool {
    state.deferred.iter().any(|d| d.insert && core::ptr::eq(d.interval.as_ptr(), interval))
}

/// Applies postponed inserts and removes, in order. Never allocates: room
/// for the inserts was checked when they were postponed.
fn apply_deferred<S: EntryStore>(tree: &mut IntervalTree<S>, deferred: &[Deferred]) {
    for op in deferred {
        if op.insert {
            let _ = tree.insert(op.entry);
        } else if tree.remove(op.entry.key()).is_some() {
            // SAFETY: its remover is waiting for this invalidation to end, so
            // the notifier and its interval are alive (insert's contract).
            let interval = unsafe { op.interval.as_ref() };
            interval.state.store(UNREGISTERED, Ordering::Release);
        }
    }
}
