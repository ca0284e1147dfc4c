//! The retry budget bounds *waiting* too: a fault that finds its mirror
//! being invalidated waits in `read_begin`, and under overlapping
//! back-to-back invalidations the registry's sequence never turns even, so
//! an unbounded wait never ends. Each invalidation that ends while another
//! still covers the mirror counts against the budget; a fault returns
//! `Busy` within its budget plus one invalidation's length, whatever the
//! invalidation pattern.
//!
//! Each storm runs on its own thread while the fault runs on another, under
//! the watchdog: a fault that never returns fails the test with a message.

mod common;

use common::watchdog::{bounded, BOUND};
use common::{device, kernel, range, user, DevMirror, MIB, PAGE, RW};
use core::pin::pin;
use hmm_core::{AddressSpace, Error, Event, Mirror, MirrorConfig, MirrorStats};
use hmm_testkit::{ModelSpace, RegionKind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const BUF: u64 = 0x4000_0000;
const LEN: u64 = 16 * PAGE;

/// Invalidations of `BUF` that overlap one another forever: a new one always
/// starts before the previous one ends, so the sequence stays odd. Every
/// ended invalidation bumps `ended`.
fn overlapping_storm(space: &ModelSpace, stop: &AtomicBool, ended: &AtomicU64) {
    let reg = space.notifiers();
    let mut open = reg.invalidate_range_start(range(BUF, LEN), Event::Clear, true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let next = reg.invalidate_range_start(range(BUF, PAGE), Event::Clear, true).unwrap();
        reg.invalidate_range_end(open);
        ended.fetch_add(1, Ordering::Relaxed);
        open = next;
        std::thread::yield_now();
    }
    reg.invalidate_range_end(open);
}

/// Runs a fault on a thread while `overlapping_storm` runs on another, and
/// returns the fault's result, the mirror's stats and the invalidations that
/// ended. The whole run is under the watchdog: a fault that waits forever
/// fails the test with a message.
fn fault_during_storm(config: MirrorConfig, write: bool) -> (Result<(), Error>, MirrorStats, u64) {
    bounded("a fault during an invalidation storm", BOUND, move || {
        let (alloc, space) = kernel(16 * MIB);
        space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
        let m: DevMirror<'_> = Mirror::new(&space, &*alloc, device(&space), user(), config).unwrap();
        let m = pin!(m);
        m.as_ref().register().unwrap();
        let stop = AtomicBool::new(false);
        let ended = AtomicU64::new(0);
        let out = std::thread::scope(|s| {
            s.spawn(|| overlapping_storm(&space, &stop, &ended));
            // Let the storm start before the fault.
            while ended.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            let r = m.fault(range(BUF, LEN), write);
            stop.store(true, Ordering::Relaxed);
            r
        });
        (out, m.stats(), ended.load(Ordering::Relaxed))
    })
}

#[test]
fn a_fault_returns_busy_under_a_storm_that_never_ends() {
    let config = MirrorConfig { max_retries: 8, ..MirrorConfig::default() };
    let (r, stats, _) = fault_during_storm(config, true);
    assert_eq!(r, Err(Error::Busy));
    // Eight retries allowed: the ninth collision (an invalidation that ended
    // while another still covered the mirror) gives up.
    assert_eq!(stats.retries, 9, "collisions counted while waiting: {stats:?}");
    assert_eq!(stats.pages_mapped, 0);
}

#[test]
fn a_zero_budget_gives_up_at_the_first_collision() {
    let config = MirrorConfig { max_retries: 0, ..MirrorConfig::default() };
    let (r, stats, _) = fault_during_storm(config, false);
    assert_eq!(r, Err(Error::Busy));
    assert_eq!(stats.retries, 1);
}

#[test]
fn a_time_budget_bounds_the_wait_under_a_storm() {
    // A clock that ticks once per read. The fault reads it once when it
    // starts, once before its first attempt (tick 1) and once per collision
    // (collision k reads tick k + 1): over `max_ticks` = 20 at collision 20.
    static TICKS: AtomicU64 = AtomicU64::new(0);
    fn clock() -> u64 {
        TICKS.fetch_add(1, Ordering::Relaxed)
    }
    let config = MirrorConfig { max_retries: u32::MAX, clock: Some(clock), max_ticks: 20, owner: None };
    let (r, stats, _) = fault_during_storm(config, false);
    assert_eq!(r, Err(Error::Busy));
    assert_eq!(stats.retries, 20, "{stats:?}");
}

#[test]
fn once_the_storm_ends_the_same_mirror_faults() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
    let config = MirrorConfig { max_retries: 4, ..MirrorConfig::default() };
    let m: DevMirror<'_> = Mirror::new(&space, &*alloc, device(&space), user(), config).unwrap();
    let m = pin!(m);
    m.as_ref().register().unwrap();
    let reg = space.notifiers();
    // Two overlapping invalidations, ended one by one on this thread: a
    // snapshot in between would wait; after both, the fault goes through.
    let a = reg.invalidate_range_start(range(BUF, LEN), Event::Clear, true).unwrap();
    let b = reg.invalidate_range_start(range(BUF, PAGE), Event::Clear, true).unwrap();
    reg.invalidate_range_end(a);
    assert_eq!(reg.seq() % 2, 1, "still invalidating");
    reg.invalidate_range_end(b);
    m.fault(range(BUF, LEN), true).unwrap();
    assert_eq!(m.stats().retries, 0);
    common::assert_mirror_coherent(&m, &space, range(BUF, LEN));
}
