//! Misuse of the registration API across threads, and the `Send`/`Sync`
//! bounds that keep the rest of it out of safe code.
//!
//! Compile-time refusals are doctests marked `compile_fail` next to the
//! types (`LockGuard` of a `Cell` shared or sent, a registry over a store
//! that is not `Sync`, removing a notifier through the registry); here the
//! positive side is pinned with `static_assertions`, and the races run on
//! real threads under a watchdog, so a hang fails with a message.

mod common;

use common::watchdog::{bounded, BOUND};
use common::{device, kernel, range, user, DevMirror, MIB, PAGE, RW};
use core::cell::Cell;
use core::pin::pin;
use hmm_core::notifier::{FixedStore, Registration, VecStore};
use hmm_core::sync::{LockCell, LockGuard, SpinLock};
use hmm_core::{AddressSpace, Error, Event, Mirror, MirrorConfig, NotifierRegistry};
use hmm_testkit::{ModelSpace, RegionKind};
use static_assertions::{assert_impl_all, assert_not_impl_any};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;

// A mirror is shared between the device's threads and the kernel's.
assert_impl_all!(DevMirror<'static>: Send, Sync);
assert_impl_all!(NotifierRegistry<FixedStore<4>>: Send, Sync);
assert_impl_all!(NotifierRegistry<VecStore>: Send, Sync);
assert_impl_all!(Registration<'static, FixedStore<4>>: Send, Sync);
// A registration points into its registry: it may cross threads only when
// the registry may be shared, i.e. over a `Sync` store.
assert_not_impl_any!(Registration<'static, CellStore>: Send, Sync);
assert_not_impl_any!(NotifierRegistry<CellStore>: Sync);

/// A store with unsynchronised interior mutability (`Send`, not `Sync`).
#[derive(Default)]
struct CellStore {
    inner: FixedStore<4>,
    reads: Cell<u64>,
}

impl hmm_core::notifier::EntryStore for CellStore {
    fn entries(&self) -> &[hmm_core::notifier::Entry] {
        self.reads.set(self.reads.get() + 1);
        self.inner.entries()
    }
    fn entries_mut(&mut self) -> &mut [hmm_core::notifier::Entry] {
        self.inner.entries_mut()
    }
    fn insert(&mut self, i: usize, e: hmm_core::notifier::Entry) -> Result<(), hmm_core::notifier::Entry> {
        self.inner.insert(i, e)
    }
    fn remove(&mut self, i: usize) -> hmm_core::notifier::Entry {
        self.inner.remove(i)
    }
    fn room(&self) -> Option<usize> {
        self.inner.room()
    }
    fn spare(&self) -> usize {
        self.inner.spare()
    }
}
// A lock cell shares its data by exclusive turns: `Send` data suffices...
assert_impl_all!(LockCell<SpinLock, Cell<u64>>: Sync);
// ...but a guard hands out `&T` to whoever holds `&guard`, and is released
// by the thread that took it.
assert_not_impl_any!(LockGuard<'static, SpinLock, Cell<u64>>: Sync, Send);
assert_impl_all!(LockGuard<'static, SpinLock, u64>: Sync);
assert_not_impl_any!(LockGuard<'static, SpinLock, u64>: Send);

const BUF: u64 = 0x4000_0000;
const LEN: u64 = 8 * PAGE;
const ROUNDS: usize = 300;

fn registered(space: &ModelSpace) -> usize {
    space.notifiers().len()
}

#[test]
fn two_threads_registering_one_mirror_exactly_one_wins() {
    bounded("double registration", BOUND, || {
        let (alloc, space) = kernel(16 * MIB);
        space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
        for round in 0..ROUNDS {
            let m: DevMirror<'_> =
                Mirror::new(&space, &*alloc, device(&space), user(), MirrorConfig::default()).unwrap();
            let m = pin!(m);
            let start = Barrier::new(2);
            let (a, b) = std::thread::scope(|s| {
                let one = s.spawn(|| {
                    start.wait();
                    m.as_ref().register()
                });
                start.wait();
                let two = m.as_ref().register();
                (one.join().unwrap(), two)
            });
            let oks = [a, b].iter().filter(|r| r.is_ok()).count();
            assert_eq!(oks, 1, "round {round}: {a:?} / {b:?}");
            assert!(a == Err(Error::Busy) || b == Err(Error::Busy), "round {round}: {a:?} / {b:?}");
            assert_eq!(registered(&space), 1, "round {round}: registry entries");
            m.fault(range(BUF, LEN), true).unwrap();
            // Dropping the mirror takes its one registration out.
        }
        assert_eq!(registered(&space), 0, "a dropped mirror left an entry behind");
        drop(space);
        assert_eq!(alloc.live(), 0, "frames leaked");
    });
}

#[test]
fn register_racing_unregister_and_invalidations_stays_consistent() {
    bounded("register against unregister", BOUND, || {
        let (alloc, space) = kernel(16 * MIB);
        space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
        let stop = AtomicBool::new(false);
        let invalidations = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let inv = space.notifiers().invalidate_range_start(range(BUF, LEN), Event::Clear, true).unwrap();
                    space.notifiers().invalidate_range_end(inv);
                    invalidations.fetch_add(1, Ordering::Relaxed);
                }
            });
            for round in 0..ROUNDS {
                let m: DevMirror<'_> =
                    Mirror::new(&space, &*alloc, device(&space), user(), MirrorConfig::default()).unwrap();
                let m = pin!(m);
                m.as_ref().register().unwrap();
                let _ = m.fault(range(BUF, LEN), false);
                let start = Barrier::new(2);
                let (again, gone) = std::thread::scope(|t| {
                    let r = t.spawn(|| {
                        start.wait();
                        m.as_ref().register()
                    });
                    start.wait();
                    let u = m.unregister();
                    (r.join().unwrap(), u)
                });
                // Registered once already: the racing register is refused
                // (Busy before the unregister, Unregistered after it).
                assert!(matches!(again, Err(Error::Busy | Error::Unregistered)), "round {round}: {again:?}");
                assert_eq!(gone, Ok(()), "round {round}");
                assert!(!m.interval_registered(), "round {round}: still marked registered");
                assert_eq!(registered(&space), 0, "round {round}: registry entries after unregister");
                assert_eq!(m.translate(BUF), None, "round {round}: a translation outlived unregister");
                assert_eq!(m.fault(range(BUF, LEN), false), Err(Error::Unregistered));
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(invalidations.load(Ordering::Relaxed) > 0);
        drop(space);
        assert_eq!(alloc.live(), 0, "frames leaked");
    });
}

/// `Interval::is_registered` through the mirror, for the assertions above.
trait IntervalRegistered {
    fn interval_registered(&self) -> bool;
}

impl IntervalRegistered for DevMirror<'_> {
    fn interval_registered(&self) -> bool {
        hmm_core::Notifier::interval(self).is_registered()
    }
}
