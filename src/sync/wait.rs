//! Waiting for an invalidation to finish.

/// Blocks a caller until a condition holds; woken by [`wake_all`](Self::wake_all).
///
/// `wait_until` may return only once `done()` is true; it may call `done`
/// any number of times. Implementations must tolerate a wake with no waiter
/// and a waiter that finds `done()` already true.
pub trait Waiter: Default + Sync {
    /// Waits until `done()` returns true.
    fn wait_until(&self, done: &dyn Fn() -> bool);
    /// Wakes every waiter so it re-checks its condition.
    fn wake_all(&self);
}

/// Busy-waits: correct anywhere, wasteful where a scheduler exists.
#[derive(Debug, Default)]
pub struct SpinWait;

impl Waiter for SpinWait {
    fn wait_until(&self, done: &dyn Fn() -> bool) {
        while !done() {
            super::shim::spin_hint();
        }
    }
    fn wake_all(&self) {}
}
