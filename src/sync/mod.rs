//! Locking and waiting without a scheduler.
//!
//! hmm-core spins by default. A kernel with a scheduler plugs in its own
//! [`RawLock`] (a sleeping mutex) and [`Waiter`] (a wait queue).

mod lock;
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_pte;
pub(crate) mod shim;
mod wait;
mod walk_gate;

pub use lock::{LockCell, LockGuard, RawLock, SpinLock};
pub use wait::{SpinWait, Waiter};
pub use walk_gate::{WalkGate, WalkGuard};
