//! The model kernel wrapped for the race and fault-injection tests: every
//! `AddressSpace` call is delegated to the [`ModelSpace`], with [`Hooks`]
//! run at fixed points of the fault loop.

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::notifier::VecStore;
use hmm_core::sync::SpinWait;
use hmm_core::{AddressSpace, NotifierRegistry, Region, Result, VaRange};
use hmm_testkit::{ModelReadGuard, ModelSpace, SimPhys};

/// What runs around the delegated calls; every hook does nothing by default.
pub trait Hooks {
    /// Before the model's read lock is taken.
    fn before_read_lock(&self, _inner: &ModelSpace) {}
    /// After the model's read lock was dropped (when the read guard drops).
    fn after_read_unlock(&self, _inner: &ModelSpace) {}
    /// Under the read lock, before the model looks `va` up.
    fn region(&self, _inner: &ModelSpace, _va: u64) {}
    /// Under the read lock, before the model's fault handler; an error is
    /// returned instead of calling it.
    fn handle_fault(&self, _r: VaRange, _write: bool) -> Result<()> {
        Ok(())
    }
}

/// The model kernel `inner`, with `hooks` run around its calls.
pub struct Hooked<'a, H> {
    pub inner: &'a ModelSpace,
    pub hooks: H,
}

impl<'a, H> Hooked<'a, H> {
    pub fn new(inner: &'a ModelSpace, hooks: H) -> Self {
        Self { inner, hooks }
    }
}

/// The model's read guard, plus the `after_read_unlock` hook on drop.
pub struct HookedGuard<'g, 'a, H: Hooks> {
    inner: Option<ModelReadGuard<'g>>,
    owner: &'g Hooked<'a, H>,
}

impl<'g, H: Hooks> HookedGuard<'g, '_, H> {
    fn model(&self) -> &ModelReadGuard<'g> {
        self.inner.as_ref().expect("live guard")
    }
}

impl<H: Hooks> Drop for HookedGuard<'_, '_, H> {
    fn drop(&mut self) {
        drop(self.inner.take());
        self.owner.hooks.after_read_unlock(self.owner.inner);
    }
}

// SAFETY: every obligation is the model kernel's, whose root, tables, read
// lock and registry these are (delegated unchanged). The hooks only see the
// model through `&ModelSpace`, so any kernel change they make goes through the
// model's own mutations, which take its write lock and invalidate as the
// contract asks; the read-lock hooks run while no read guard of this space is
// held (before the model's read lock is taken, after it was dropped), and a
// failing `handle_fault` hook returns before the model is called, changing
// nothing.
unsafe impl<'a, H: Hooks + Sync> AddressSpace for Hooked<'a, H> {
    type Format = X86_64Level4;
    type Phys = SimPhys;
    type Store = VecStore;
    type Wait = SpinWait;
    type ReadGuard<'g>
        = HookedGuard<'g, 'a, H>
    where
        Self: 'g;

    fn phys(&self) -> &SimPhys {
        self.inner.phys()
    }
    fn root(&self) -> u64 {
        self.inner.root()
    }
    fn notifiers(&self) -> &NotifierRegistry<VecStore, SpinWait> {
        self.inner.notifiers()
    }
    fn read_lock(&self) -> HookedGuard<'_, 'a, H> {
        self.hooks.before_read_lock(self.inner);
        HookedGuard { inner: Some(self.inner.read_lock()), owner: self }
    }
    fn region<'g>(&'g self, guard: &HookedGuard<'g, 'a, H>, va: u64) -> Option<Region> {
        self.hooks.region(self.inner, va);
        self.inner.region(guard.model(), va)
    }
    fn handle_fault<'g>(&'g self, guard: &HookedGuard<'g, 'a, H>, r: VaRange, write: bool) -> Result<()> {
        self.hooks.handle_fault(r, write)?;
        self.inner.handle_fault(guard.model(), r, write)
    }
    fn zero_frame(&self) -> Option<u64> {
        self.inner.zero_frame()
    }
}
