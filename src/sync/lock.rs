//! The driver update lock: the one lock a fault's commit and an invalidation
//! callback both take.

use super::shim::{spin_hint, AtomicU32};
use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::Ordering;

/// A mutual-exclusion lock with no data.
///
/// # Safety
/// 1. Between a `lock` (or a `try_lock` returning true) and the matching
///    `unlock`, no other caller's `lock` returns or `try_lock` returns true.
/// 2. `unlock` has release semantics and acquiring has acquire semantics, so
///    writes made while holding the lock are seen by the next holder.
pub unsafe trait RawLock: Default + Sync {
    /// Acquires the lock, waiting as long as needed.
    fn lock(&self);
    /// Acquires the lock if free, without waiting.
    fn try_lock(&self) -> bool;
    /// Releases the lock.
    ///
    /// # Safety
    /// The caller holds the lock.
    unsafe fn unlock(&self);
}

/// A ticket spin lock: waiters are served in arrival order, so a thread
/// that releases and at once retakes the lock (an invalidator running
/// back to back) cannot keep a waiting fault out.
#[derive(Debug)]
pub struct SpinLock {
    /// The next ticket to hand out.
    next: AtomicU32,
    /// The ticket that holds the lock.
    serving: AtomicU32,
}

impl Default for SpinLock {
    fn default() -> Self {
        Self { next: AtomicU32::new(0), serving: AtomicU32::new(0) }
    }
}

// SAFETY: tickets are unique (one fetch-add or compare-exchange hands each
// out), and only the holder of ticket `serving` passes `lock`, so one holder
// at a time; acquiring loads `serving` with Acquire, unlock stores it with
// Release.
unsafe impl RawLock for SpinLock {
    fn lock(&self) {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        while self.serving.load(Ordering::Acquire) != ticket {
            spin_hint();
        }
    }

    fn try_lock(&self) -> bool {
        // Free exactly when no ticket is out beyond the one being served.
        let serving = self.serving.load(Ordering::Acquire);
        self.next.compare_exchange(serving, serving.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    unsafe fn unlock(&self) {
        // Only the holder writes `serving`.
        let next = self.serving.load(Ordering::Relaxed).wrapping_add(1);
        self.serving.store(next, Ordering::Release);
    }
}

/// Data guarded by a [`RawLock`].
#[derive(Debug, Default)]
pub struct LockCell<L: RawLock, T> {
    lock: L,
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` happens only through a guard, which exists only
// while the lock is held, so sharing the cell shares `T` by exclusive turns.
unsafe impl<L: RawLock, T: Send> Sync for LockCell<L, T> {}

impl<L: RawLock, T> LockCell<L, T> {
    /// Wraps `data`.
    pub fn new(data: T) -> Self {
        Self { lock: L::default(), data: UnsafeCell::new(data) }
    }

    /// Locks, waiting as needed.
    pub fn lock(&self) -> LockGuard<'_, L, T> {
        self.lock.lock();
        LockGuard { cell: self, _not_send: PhantomData }
    }

    /// Locks if free.
    pub fn try_lock(&self) -> Option<LockGuard<'_, L, T>> {
        // `then`, not `then_some`: a guard built eagerly and dropped on
        // failure would unlock a lock someone else holds.
        self.lock.try_lock().then(|| LockGuard { cell: self, _not_send: PhantomData })
    }

    /// Exclusive access without locking (the borrow proves exclusivity).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }
}

/// Holds a [`LockCell`] locked; unlocks on drop.
///
/// Like `std::sync::MutexGuard` it is `Sync` only when `T` is (a shared
/// `&LockGuard` hands out `&T` to every thread that has it), and never `Send`:
/// a kernel's sleeping lock may have to be released by the thread that took it.
///
/// ```
/// # use hmm_core::sync::{LockGuard, SpinLock};
/// fn sync<T: Sync>() {}
/// sync::<LockGuard<'static, SpinLock, u64>>();
/// ```
/// A guard of a `Cell` cannot be shared (threads would race on the cell):
/// ```compile_fail
/// # use hmm_core::sync::{LockGuard, SpinLock};
/// fn sync<T: Sync>() {}
/// sync::<LockGuard<'static, SpinLock, core::cell::Cell<u64>>>();
/// ```
/// nor sent to another thread:
/// ```compile_fail
/// # use hmm_core::sync::{LockGuard, SpinLock};
/// fn send<T: Send>() {}
/// send::<LockGuard<'static, SpinLock, u64>>();
/// ```
pub struct LockGuard<'a, L: RawLock, T> {
    cell: &'a LockCell<L, T>,
    /// Not `Send`, and `Sync` only through the impl below.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: `&LockGuard` gives only `&T` (through `Deref`), so sharing the guard
// shares `T`: sound exactly when `T: Sync`.
unsafe impl<L: RawLock, T: Sync> Sync for LockGuard<'_, L, T> {}

impl<L: RawLock, T> Deref for LockGuard<'_, L, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held.
        unsafe { &*self.cell.data.get() }
    }
}

impl<L: RawLock, T> DerefMut for LockGuard<'_, L, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while the lock is held, and `&mut self`
        // makes this the only reference through the guard.
        unsafe { &mut *self.cell.data.get() }
    }
}

impl<L: RawLock, T> Drop for LockGuard<'_, L, T> {
    fn drop(&mut self) {
        // SAFETY: the guard was created by a successful lock.
        unsafe { self.cell.lock.unlock() }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A refused `try_lock` leaves the holder's lock held (it once built a
    /// guard eagerly and dropped it, unlocking the holder's lock), and
    /// tickets are handed out in order.
    #[test]
    fn refused_try_lock_keeps_the_lock_held() {
        let cell = LockCell::<SpinLock, u32>::new(0);
        let held = cell.lock();
        assert!(cell.try_lock().is_none());
        assert!(cell.try_lock().is_none(), "a refused try_lock released the holder's lock");
        drop(held);
        let mut again = cell.try_lock().expect("free after the holder left");
        *again += 1;
        drop(again);
        assert_eq!(*cell.lock(), 1);
    }
}
