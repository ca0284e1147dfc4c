//! The one place that chooses real or loom-modelled primitives, so the
//! concurrency protocol (registry, intervals, update lock, waiting) can be
//! model-checked with `RUSTFLAGS="--cfg loom"` without a second copy of it.

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8};
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8};

/// A page-table entry in `PhysMem` memory (see [`crate::phys::entry`]): a
/// plain `AtomicU64` over that memory, or under loom the same word with the
/// same methods, modelled so that loom sees its accesses (`super::loom_pte`).
#[cfg(not(loom))]
pub(crate) type AtomicEntry = core::sync::atomic::AtomicU64;
#[cfg(loom)]
pub(crate) use super::loom_pte::AtomicEntry;

/// Called in every busy-wait loop: a pause hint, or a yield to loom's scheduler.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// An `UnsafeCell` whose accesses loom can track.
#[derive(Debug)]
pub(crate) struct RawCell<T> {
    #[cfg(not(loom))]
    inner: core::cell::UnsafeCell<T>,
    #[cfg(loom)]
    inner: loom::cell::UnsafeCell<T>,
}

impl<T> RawCell<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(not(loom))]
        let inner = core::cell::UnsafeCell::new(value);
        #[cfg(loom)]
        let inner = loom::cell::UnsafeCell::new(value);
        Self { inner }
    }

    /// Shared access.
    ///
    /// # Safety
    /// No mutable access may overlap the call.
    #[inline]
    pub(crate) unsafe fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        #[cfg(not(loom))]
        // SAFETY: the caller excludes overlapping mutable access.
        return f(unsafe { &*self.inner.get() });
        #[cfg(loom)]
        // SAFETY: as above; loom checks it.
        return self.inner.with(|p| f(unsafe { &*p }));
    }

    /// Exclusive access.
    ///
    /// # Safety
    /// No other access may overlap the call.
    #[inline]
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(not(loom))]
        // SAFETY: the caller excludes overlapping access.
        return f(unsafe { &mut *self.inner.get() });
        #[cfg(loom)]
        // SAFETY: as above; loom checks it.
        return self.inner.with_mut(|p| f(unsafe { &mut *p }));
    }
}
