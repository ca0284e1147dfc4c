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
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

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

/// A fair (FIFO) spin lock protecting a `T`: the device TLB's lock, which
/// the device takes back to back while a flush on another CPU must still get
/// its turn promptly (a test-and-set lock lets the device win every time).
pub struct TicketLock<T> {
    next: AtomicU32,
    serving: AtomicU32,
    value: UnsafeCell<T>,
}

// SAFETY: as for `SpinLock`: one holder at a time (the ticket being served),
// handed over with acquire/release.
unsafe impl<T: Send> Sync for TicketLock<T> {}

impl<T> TicketLock<T> {
    /// Creates an unlocked lock.
    pub const fn new(value: T) -> Self {
        Self { next: AtomicU32::new(0), serving: AtomicU32::new(0), value: UnsafeCell::new(value) }
    }

    /// Waits for this caller's turn, then holds the lock.
    pub fn lock(&self) -> TicketGuard<'_, T> {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        while self.serving.load(Ordering::Acquire) != ticket {
            spin_loop();
        }
        TicketGuard { lock: self }
    }
}

/// Proof of holding a [`TicketLock`]; passes it on when dropped.
pub struct TicketGuard<'a, T> {
    lock: &'a TicketLock<T>,
}

impl<T> Deref for TicketGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: only the holder of the ticket being served has a guard.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for TicketGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the unique borrow.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for TicketGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.serving.fetch_add(1, Ordering::Release);
    }
}

/// A reader-writer spin lock protecting a `T`, writer-preferring: once a
/// writer waits, new readers hold off, so a CPU that takes the read side in a
/// tight loop (the device faulting) cannot starve the CPU that wants to
/// change the address space. Not re-entrant: a CPU holding the read side must
/// not take it again (a waiting writer would deadlock it).
pub struct RwLock<T> {
    /// Bits 0..30: readers; [`WRITER`]: held for writing; [`WAITING`]: a
    /// writer wants in.
    state: AtomicU32,
    value: UnsafeCell<T>,
}

const WRITER: u32 = 1 << 31;
const WAITING: u32 = 1 << 30;

// SAFETY: readers share `&T` (so `T: Sync`), a writer gets the only `&mut T`
// (so `T: Send`); the state word hands out access with acquire/release.
unsafe impl<T: Send + Sync> Sync for RwLock<T> {}

impl<T> RwLock<T> {
    /// Creates an unlocked lock.
    pub const fn new(value: T) -> Self {
        Self { state: AtomicU32::new(0), value: UnsafeCell::new(value) }
    }

    /// Takes the read side, waiting while a writer holds or wants the lock.
    pub fn read(&self) -> RwReadGuard<'_, T> {
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s & (WRITER | WAITING) == 0
                && self.state.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                return RwReadGuard { lock: self };
            }
            spin_loop();
        }
    }

    /// Takes the write side, waiting for readers and other writers to leave.
    pub fn write(&self) -> RwWriteGuard<'_, T> {
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s & !WAITING == 0 {
                if self.state.compare_exchange_weak(s, WRITER, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return RwWriteGuard { lock: self };
                }
            } else if s & WAITING == 0 {
                self.state.fetch_or(WAITING, Ordering::Relaxed);
            }
            spin_loop();
        }
    }
}

/// Shared access to an [`RwLock`]'s value; releases on drop.
pub struct RwReadGuard<'a, T> {
    lock: &'a RwLock<T>,
}

impl<T> Deref for RwReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: while a read guard exists the state counts it, so no writer
        // holds the lock and nobody has `&mut T`.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> Drop for RwReadGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.state.fetch_sub(1, Ordering::Release);
    }
}

/// Exclusive access to an [`RwLock`]'s value; releases on drop.
pub struct RwWriteGuard<'a, T> {
    lock: &'a RwLock<T>,
}

impl<T> Deref for RwWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the WRITER bit excludes every reader and other writer.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for RwWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the unique borrow.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for RwWriteGuard<'_, T> {
    fn drop(&mut self) {
        // Keeps a WAITING bit another writer may have set meanwhile.
        self.lock.state.fetch_and(!WRITER, Ordering::Release);
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
