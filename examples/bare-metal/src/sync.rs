//! Synchronisation primitives for a kernel with no OS underneath.
//!
//! Interrupts stay disabled on every CPU for the whole run (nothing but CPU
//! exceptions is ever delivered), so a plain spin lock cannot be re-entered by
//! an interrupt handler. The only handler that prints while something else may
//! hold a lock is the fatal path, which uses [`SpinLock::try_lock_for`] and
//! never blocks forever.

use core::cell::UnsafeCell;
use core::hint::spin_loop;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

/// A test-and-test-and-set spin lock protecting a `T`.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out at most one `&mut T` at a time (guarded by the
// `locked` flag with acquire/release ordering), so sharing the lock between
// CPUs is sound whenever `T` itself may be sent between CPUs.
unsafe impl<T: Send> Sync for SpinLock<T> {}
// SAFETY: moving the lock moves the `T`; fine when `T: Send`.
unsafe impl<T: Send> Send for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// Creates an unlocked lock (usable in `static` initialisers).
    pub const fn new(value: T) -> Self {
        Self { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// Spins until the lock is free, then takes it.
    pub fn lock(&self) -> SpinLockGuard<'_, T> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            while self.locked.load(Ordering::Relaxed) {
                spin_loop();
            }
        }
    }

    /// Takes the lock if it is free right now.
    pub fn try_lock(&self) -> Option<SpinLockGuard<'_, T>> {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinLockGuard { lock: self })
    }

    /// Tries for roughly `spins` iterations; used by panic/exception paths that
    /// must make progress even if the lock holder died mid-critical-section.
    pub fn try_lock_for(&self, spins: usize) -> Option<SpinLockGuard<'_, T>> {
        for _ in 0..spins {
            if let Some(guard) = self.try_lock() {
                return Some(guard);
            }
            spin_loop();
        }
        None
    }
}

/// Proof of holding a [`SpinLock`]; unlocks on drop.
pub struct SpinLockGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinLockGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while `locked` is held by us, so no
        // other reference to the value can exist.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the unique borrow.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinLockGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A `static` cell for data that is written only during single-threaded
/// initialisation on the boot CPU (IDT, GDT, TSSs, stacks) and afterwards only
/// read, or handed to the hardware by address.
///
/// It does not synchronise anything by itself: every access goes through the
/// raw pointer from [`InitCell::get`] inside an `unsafe` block whose `SAFETY:`
/// comment explains why no other CPU is touching the value at that time.
pub struct InitCell<T>(UnsafeCell<T>);

// SAFETY: all mutation happens before the application processors are started
// (documented at every use), so cross-CPU access is read-only.
unsafe impl<T: Send> Sync for InitCell<T> {}

impl<T> InitCell<T> {
    /// Wraps `value`.
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// Raw pointer to the value; see the type-level docs for the rules.
    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}
