//! A grace period for lock-free table walkers.
//!
//! A software walker (a device model's `translate`) reads a mirror table
//! while the mirror unlinks and frees directories. It walks inside
//! [`WalkGate::enter`]; the mirror unlinks a directory, has the device flush,
//! then calls [`WalkGate::synchronize`], which returns once every walker
//! that might still hold a pointer to the directory has left. Only then is
//! the frame freed. Two reader counts and an epoch (a two-slot SRCU): a
//! walker entering after the epoch flip cannot see the unlinked directory,
//! so `synchronize` waits only for the walkers of the old slot, and a steady
//! stream of new walkers cannot starve it.

use super::shim::{fence, spin_hint, AtomicU64};
use core::sync::atomic::Ordering;

/// Readers of a table and the epoch they entered in.
#[derive(Debug)]
pub struct WalkGate {
    epoch: AtomicU64,
    readers: [AtomicU64; 2],
}

/// A walker inside the gate; leaving is dropping it.
#[derive(Debug)]
#[must_use = "the walk is protected only while the guard lives"]
pub struct WalkGuard<'a> {
    gate: &'a WalkGate,
    slot: usize,
}

impl Default for WalkGate {
    fn default() -> Self {
        Self::new()
    }
}

impl WalkGate {
    /// A gate with no walker inside.
    pub fn new() -> Self {
        Self { epoch: AtomicU64::new(0), readers: [AtomicU64::new(0), AtomicU64::new(0)] }
    }

    /// Enters: until the guard drops, no frame unlinked after this call
    /// returned is freed, nor one unlinked before a `synchronize` still
    /// waiting. Never blocks (it retries only if an epoch flip raced it).
    pub fn enter(&self) -> WalkGuard<'_> {
        loop {
            let epoch = self.epoch.load(Ordering::Relaxed);
            let slot = (epoch & 1) as usize;
            self.readers[slot].fetch_add(1, Ordering::Relaxed);
            // Pairs with the fence in `synchronize`: either that flip sees
            // this count, or this walker sees the flip (and everything
            // unlinked before it) and goes to the new slot.
            fence(Ordering::SeqCst);
            // Acquire: a walker that sees a flip sees the unlinks before it.
            if self.epoch.load(Ordering::Acquire) == epoch {
                return WalkGuard { gate: self, slot };
            }
            self.readers[slot].fetch_sub(1, Ordering::Release);
        }
    }

    /// Waits until every walker that entered before this call has left.
    /// Frames unlinked before the call may be freed when it returns.
    ///
    /// Callers must be serialised (the mirror calls it under its update
    /// lock); walkers never wait for it, so it cannot deadlock with them.
    pub fn synchronize(&self) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        // Release: a walker that reads the new epoch sees every unlink before.
        self.epoch.store(epoch.wrapping_add(1), Ordering::Release);
        fence(Ordering::SeqCst);
        let old = &self.readers[(epoch & 1) as usize];
        // Acquire: the walkers' reads happen before whatever follows (a free).
        while old.load(Ordering::Acquire) != 0 {
            spin_hint();
        }
    }
}

impl Drop for WalkGuard<'_> {
    fn drop(&mut self) {
        // Release: this walker's reads happen before a free that waited.
        self.gate.readers[self.slot].fetch_sub(1, Ordering::Release);
    }
}
