//! A hang guard for threaded tests: a lost wake-up or a wait that never ends
//! must fail the test with a message, not keep the test binary (and CI, and
//! a mutation run) waiting forever.
//!
//! [`bounded`] runs the test body on a thread of its own and waits for it at
//! most `bound`. A body panic propagates unchanged (message and payload, so
//! `#[should_panic(expected = ...)]` still works). When the body does not
//! finish in time, the test thread panics with the watchdog message: libtest
//! reports the test as failed and goes on with the others. The stuck thread
//! cannot be killed; it is left detached (hence `'static` for the body), and
//! the test binary still exits when its last test is done, because the
//! process exits without joining detached threads (checked by experiment
//! with a body that never ends). It may keep spinning on a core until then.
//!
//! The bound only guards against hangs; it is never an assertion of speed,
//! so it is generous (debug build, two slow cores, tests running in
//! parallel).
//!
//! Under Miri the body runs inline, unguarded. Miri's clock is virtual (it
//! advances per basic block executed), and a heavy threaded test runs for
//! many minutes there (`concurrent_alloc_free_never_hands_out_a_frame_twice`
//! about 12 min), so no bound would be both safe and shorter than the limit
//! `cargo xtask verify` already puts on each Miri run (30 min). Miri itself
//! reports a deadlock (every thread blocked) at once; a spinning hang is left
//! to that limit.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// The default bound for one test.
pub const BOUND: Duration = Duration::from_secs(90);

/// Runs `body` on its own thread and returns its result; panics (failing the
/// test) if it has not finished within `bound`. `what` names what the test
/// waits for, for the message.
#[track_caller]
pub fn bounded<T, F>(what: &str, bound: Duration, body: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if cfg!(miri) {
        return body();
    }
    let (done, finished) = mpsc::sync_channel::<()>(1);
    // Named like the test thread, so a panic in the body reads as before.
    let name = std::thread::current().name().unwrap_or("watched").to_owned();
    let body = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let out = body();
            let _ = done.send(());
            out
        })
        .expect("watchdog: spawning the test body");
    match finished.recv_timeout(bound) {
        // Finished, or panicked (the sender dropped while unwinding).
        Ok(()) | Err(RecvTimeoutError::Disconnected) => match body.join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(RecvTimeoutError::Timeout) => panic!(
            "watchdog: {what} did not finish in {} s (a hang: likely a lost wake-up or a wait that never ends)",
            bound.as_secs()
        ),
    }
}
