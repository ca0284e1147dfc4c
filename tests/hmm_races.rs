//! A device fault racing kernel changes: deterministic injections at each
//! step of the fault loop, real threads, teardown paths, and the retry budget.
//! The invariant checked everywhere: the mirror never holds (and the device
//! never uses) a translation the CPU no longer has.

mod common;

use common::hooked::{Hooked, Hooks};
use common::*;
use core::pin::pin;
use hmm_core::{AddressSpace, Error, Event, Mirror, MirrorConfig, VaRange};
use hmm_testkit::dmirror::{self, DummyDevice};
use hmm_testkit::{ModelSpace, RegionKind, SimPhys};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

/// Where in the fault loop the kernel change lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Before an attempt takes the read lock: the change is over before the
    /// walk starts.
    Before,
    /// Inside the walk, under the read and update locks (the change runs on
    /// another thread: it needs the write lock, and its invalidation the
    /// update lock).
    During,
    /// After an attempt mapped and dropped its locks.
    After,
}

type Action = Box<dyn FnOnce(&ModelSpace) + Send>;

/// A change injected at one step of the next fault of the model kernel.
struct Injecting {
    step: Step,
    action: Mutex<Option<Action>>,
    /// Before every attempt, start an invalidation of the first page and end
    /// it 200 us later on another thread: every attempt finds one running.
    storm: AtomicBool,
    storms: AtomicU32,
}

fn injecting(inner: &ModelSpace, step: Step, action: Option<Action>) -> Hooked<'_, Injecting> {
    Hooked::new(
        inner,
        Injecting { step, action: Mutex::new(action), storm: AtomicBool::new(false), storms: AtomicU32::new(0) },
    )
}

impl Injecting {
    fn fire(&self, inner: &ModelSpace, at: Step) {
        if at == self.step {
            if let Some(action) = self.action.lock().unwrap().take() {
                action(inner);
            }
        }
    }
}

// The injected actions go through the model kernel's own mutations, which
// invalidate first.
impl Hooks for Injecting {
    fn before_read_lock(&self, inner: &ModelSpace) {
        if self.storm.load(Ordering::Relaxed) {
            self.storms.fetch_add(1, Ordering::Relaxed);
            let inv = inner.notifiers().invalidate_range_start(range(BUF, PAGE), Event::Clear, true).unwrap();
            let inner: &'static ModelSpace = unsafe_extend(inner);
            ENDERS.lock().unwrap().push(std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_micros(200));
                inner.notifiers().invalidate_range_end(inv);
            }));
        }
        self.fire(inner, Step::Before);
    }
    fn after_read_unlock(&self, inner: &ModelSpace) {
        self.fire(inner, Step::After);
    }
    fn region(&self, _inner: &ModelSpace, _va: u64) {
        if self.step == Step::During {
            if let Some(action) = self.action.lock().unwrap().take() {
                let inner = _inner;
                // Run the change for real on another thread: it blocks on the
                // write lock until this walk lets go, landing between the walk
                // and the commit (or later).
                let inner: &'static ModelSpace = unsafe_extend(inner);
                let t = std::thread::spawn(move || action(inner));
                *PENDING.lock().unwrap() = Some(t);
            }
        }
    }
}

static PENDING: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);
/// Threads ending the storm's invalidations.
static ENDERS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());
static SERIAL: Mutex<()> = Mutex::new(());

/// The spawned change is always joined before the space goes away (see
/// `join_pending`), so handing it a `'static` reference is sound in practice.
fn unsafe_extend(s: &ModelSpace) -> &'static ModelSpace {
    // SAFETY: every test joins the thread (join_pending) before the space
    // is dropped.
    unsafe { &*(s as *const ModelSpace) }
}

fn join_pending() {
    if let Some(t) = PENDING.lock().unwrap().take() {
        t.join().unwrap();
    }
    for t in std::mem::take(&mut *ENDERS.lock().unwrap()) {
        t.join().unwrap();
    }
}

type InjMirror<'s> = Mirror<'s, Hooked<'s, Injecting>, DummyDevice<SimPhys>, hmm_testkit::CountingAllocator>;

fn assert_coherent(m: &InjMirror<'_>, space: &ModelSpace, r: VaRange) {
    let view = space.table_view();
    for i in 0..r.pages(12) {
        let va = r.start() + i * PAGE;
        if let Some(e) = m.translate(va) {
            assert!(view.cpu_maps(va, e.frame(), e.is_write()), "stale mirror entry at {va:#x}");
        }
    }
}

const BUF: u64 = 0x1000_0000;
const LEN: u64 = 16 * PAGE;

/// A named kernel change to inject.
type NamedAction = (&'static str, fn() -> Action);

fn actions() -> Vec<NamedAction> {
    vec![
        ("unmap", || Box::new(|s: &ModelSpace| s.unmap(range(BUF + 4 * PAGE, 8 * PAGE)).unwrap())),
        ("protect", || Box::new(|s: &ModelSpace| s.protect(range(BUF, LEN), R).unwrap())),
        ("clear", || Box::new(|s: &ModelSpace| s.clear(range(BUF, LEN)).unwrap())),
        ("remap", || {
            Box::new(|s: &ModelSpace| {
                s.unmap(range(BUF, LEN)).unwrap();
                s.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
                s.write_bytes(BUF, &pattern(LEN as usize, 0xee)).unwrap();
            })
        }),
        ("cow", || {
            Box::new(|s: &ModelSpace| {
                let child = s.fork().unwrap();
                s.write_bytes(BUF, &pattern(LEN as usize, 0xcc)).unwrap();
                drop(child);
            })
        }),
    ]
}

#[test]
fn fault_racing_invalidation_never_installs_a_stale_frame() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog::bounded("a fault racing an injected kernel change", watchdog::BOUND, || {
        for step in [Step::Before, Step::During, Step::After] {
            for (name, make) in actions() {
                for write in [false, true] {
                    let (alloc, space) = kernel(64 * MIB);
                    space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
                    space.write_bytes(BUF, &pattern(LEN as usize, 1)).unwrap();
                    {
                        let inj = injecting(&space, step, Some(make()));
                        let m: InjMirror<'_> =
                            Mirror::new(&inj, &*alloc, device(&space), user(), MirrorConfig::default()).unwrap();
                        let m = pin!(m);
                        m.as_ref().register().unwrap();
                        let r = m.fault(range(BUF, LEN), write);
                        join_pending();
                        assert!(
                            matches!(r, Ok(()) | Err(Error::Fault | Error::Perm)),
                            "{step:?}/{name}/write={write}: unexpected {r:?}"
                        );
                        assert_coherent(&m, &space, range(BUF, LEN));
                        // The device only ever reads what the CPU maps now.
                        let cpu = {
                            let mut b = vec![0u8; PAGE as usize];
                            space.read_bytes(BUF, &mut b).map(|_| b)
                        };
                        if let Ok(cpu) = cpu {
                            if let Ok(dev) = dmirror::read(&m, BUF, PAGE as usize) {
                                assert_eq!(dev, cpu, "{step:?}/{name}: device and CPU disagree");
                            }
                        }
                        assert_eq!(m.device().counters().stale, 0, "{step:?}/{name}/write={write}");
                        if step == Step::Before {
                            assert_eq!(
                                m.stats().retries,
                                0,
                                "{step:?}/{name}: a change over before the walk is no collision"
                            );
                        }
                    }
                    drop(space);
                    assert_eq!(alloc.live(), 0, "{step:?}/{name}: leak");
                }
            }
        }
    });
}

#[test]
fn retry_budget_returns_busy_then_succeeds_when_invalidations_stop() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
    {
        let inj = injecting(&space, Step::Before, None);
        let config = MirrorConfig { max_retries: 8, ..MirrorConfig::default() };
        let m: InjMirror<'_> = Mirror::new(&inj, &*alloc, device(&space), user(), config).unwrap();
        let m = pin!(m);
        m.as_ref().register().unwrap();
        inj.hooks.storm.store(true, Ordering::Relaxed);
        assert_eq!(m.fault(range(BUF, LEN), true), Err(Error::Busy));
        join_pending();
        // Every attempt finds the storm's invalidation running: eight
        // collisions are in budget, the ninth gives up.
        assert_eq!(m.stats().retries, 9, "budget of 8 retries, the 9th collision gives up");
        assert_eq!(m.translate(BUF), None, "nothing installed");
        inj.hooks.storm.store(false, Ordering::Relaxed);
        m.fault(range(BUF, LEN), true).unwrap();
        assert!(m.translate(BUF).is_some());
        assert_coherent(&m, &space, range(BUF, LEN));
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn retry_budget_by_clock() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    static TICKS: AtomicU32 = AtomicU32::new(0);
    fn clock() -> u64 {
        TICKS.fetch_add(1, Ordering::Relaxed) as u64
    }
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
    {
        let inj = injecting(&space, Step::Before, None);
        let config = MirrorConfig { max_retries: u32::MAX, clock: Some(clock), max_ticks: 5, owner: None };
        let m: InjMirror<'_> = Mirror::new(&inj, &*alloc, device(&space), user(), config).unwrap();
        let m = pin!(m);
        m.as_ref().register().unwrap();
        inj.hooks.storm.store(true, Ordering::Relaxed);
        assert_eq!(m.fault(range(BUF, LEN), false), Err(Error::Busy));
        join_pending();
        // One clock read at the start, then two per collision (the check
        // before each attempt and the one before waiting): the third
        // collision reads tick 6, past max_ticks = 5.
        assert_eq!(m.stats().retries, 3);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn worst_retry_count_under_a_threaded_invalidator() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog::bounded("faults against a back-to-back invalidator thread", watchdog::BOUND, || {
        let (alloc, space) = kernel(16 * MIB);
        space.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        let stop = AtomicBool::new(false);
        let mut worst = 0;
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let inv = space.notifiers().invalidate_range_start(range(BUF, LEN), Event::Clear, true).unwrap();
                    space.notifiers().invalidate_range_end(inv);
                }
            });
            for _ in 0..200 {
                let before = m.stats().retries;
                match m.fault(range(BUF, LEN), true) {
                    Ok(()) | Err(Error::Busy) => {}
                    Err(e) => panic!("unexpected {e:?}"),
                }
                worst = worst.max(m.stats().retries - before);
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(
            worst <= 65 + 16,
            "a fault gives up after its budget (64 retries, plus one free retry per page of progress), saw {worst}"
        );
        println!("worst retries per fault under a back-to-back invalidator: {worst}");
        // Once the invalidator stopped, a fault succeeds.
        m.fault(range(BUF, LEN), true).unwrap();
        assert_mirror_coherent(&m, &space, range(BUF, LEN));
    });
}

#[test]
fn unregister_during_faults() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog::bounded("unregister during faults on another thread", watchdog::BOUND, || {
        let (alloc, space) = kernel(64 * MIB);
        space.map(BUF, 256 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        {
            let m = pin!(mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let m = &*m;
            let saw_unregistered = std::thread::scope(|s| {
                let dev = s.spawn(|| loop {
                    for i in 0..256 {
                        match m.fault(range(BUF + i * PAGE, PAGE), i % 2 == 0) {
                            Ok(()) => {}
                            Err(Error::Unregistered) => return true,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                });
                std::thread::sleep(std::time::Duration::from_millis(5));
                m.unregister().unwrap();
                dev.join().unwrap()
            });
            assert!(saw_unregistered);
            assert_eq!(space.notifiers().len(), 0);
            assert_eq!(m.translate(BUF), None);
            assert_eq!(m.table_frames(), 0);
            assert_eq!(m.fault(range(BUF, PAGE), false), Err(Error::Unregistered));
            assert_eq!(m.unregister(), Err(Error::Unregistered));
            assert_eq!(m.device().tlb_len(), 0, "device flushed");
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

#[test]
fn release_during_faults() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    watchdog::bounded("release during device reads on another thread", watchdog::BOUND, || {
        let (alloc, space) = kernel(64 * MIB);
        space.map(BUF, 256 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        {
            let m = pin!(mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let m = &*m;
            std::thread::scope(|s| {
                let dev = s.spawn(|| loop {
                    for i in 0..256 {
                        match dmirror::read(m, BUF + i * PAGE, PAGE as usize) {
                            Ok(_) => {}
                            Err(Error::Released | Error::Fault) => return,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                });
                std::thread::sleep(std::time::Duration::from_millis(5));
                space.release();
                dev.join().unwrap();
            });
            for i in 0..256 {
                assert_eq!(m.translate(BUF + i * PAGE), None, "release cleared the mirror");
            }
            assert_eq!(m.fault(range(BUF, PAGE), false), Err(Error::Released));
            assert_eq!(m.device().counters().stale, 0);
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

#[test]
fn mirrors_and_address_spaces_are_independent() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (alloc, a) = kernel(64 * MIB);
    let b = hmm_testkit::ModelSpace::new(&alloc).unwrap();
    for s in [&a, &b] {
        s.map(BUF, LEN, RW, RegionKind::PrivateAnon).unwrap();
    }
    {
        let a1 = pin!(mirror(&a, &alloc));
        let a2 = pin!(mirror(&a, &alloc));
        let b1 = pin!(mirror(&b, &alloc));
        for m in [a1.as_ref(), a2.as_ref(), b1.as_ref()] {
            m.register().unwrap();
        }
        a1.fault(range(BUF, LEN), true).unwrap();
        assert_eq!(a2.translate(BUF), None, "a fault fills only its own mirror");
        b1.fault(range(BUF, LEN), true).unwrap();
        a2.fault(range(BUF, PAGE), false).unwrap();
        a.unmap(range(BUF, LEN)).unwrap();
        assert_eq!(a1.translate(BUF), None);
        assert_eq!(a2.translate(BUF), None);
        assert!(b1.translate(BUF).is_some(), "another address space is untouched");
        assert_eq!(a1.stats().pages_invalidated, 16);
        assert_eq!(a2.stats().pages_invalidated, 1);
        assert_eq!(b1.stats().invalidations, 0);
    }
    drop((a, b));
    assert_eq!(alloc.live(), 0);
}
