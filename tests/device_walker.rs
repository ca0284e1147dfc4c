//! A device walking its mirror table while the CPU side changes things, and
//! faults next to back-to-back invalidations.
//!
//! 1. Walker races: device threads walk the mirror table lock-free
//!    ([`Mirror::translate`], the software walker over the device format)
//!    and access memory through the stale-keeping TLB of the dummy device
//!    ([`dmirror::read`] / [`dmirror::write`]: TLB, then translate, then a
//!    fault), while the kernel thread unmaps and remaps, protects R / RW,
//!    forks and writes (copy-on-write breaks), zaps, and finally releases
//!    the address space. Once over 4 KiB pages, once over 2 MiB leaves
//!    (transparent huge pages and hugetlbfs), whose mirror entries are huge.
//!
//!    The authoritative check is the dummy device's stale counter: every
//!    access through a cached translation is checked against the CPU's
//!    tables under the device's TLB lock, which the mirror's `flush` takes
//!    before the kernel may change the entry. The raw `translate` results
//!    are checked too: a translation the CPU does not map counts as stale
//!    only when the registry's sequence was even before the walk and
//!    unchanged after the check (no invalidation started or ran in
//!    between, so the CPU removed nothing); otherwise it is a race and only
//!    counted.
//!
//! 2. Disjoint and overlapping invalidators: a fault collides only with a
//!    running invalidation of the pages it still has to map. With a thread
//!    invalidating other pages of the same mirror back to back (through
//!    the registry and through kernel zaps and protection changes), faults
//!    take no retry and never return `Busy`; with the invalidator on the
//!    fault's own pages, each fault retries at most its budget plus one
//!    time, and a `Busy` fault leaves nothing mapped.
//!
//! Every threaded test runs under the watchdog.

mod common;

use common::*;
use core::pin::pin;
use hmm_core::{AddressSpace, Error, Event, Mirror, MirrorConfig, MirrorStats, VaRange};
use hmm_testkit::dmirror;
use hmm_testkit::{ModelSpace, RegionKind, TableView};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Start of the buffers: a 1 GiB boundary (so also a 2 MiB block start).
const BASE: u64 = 1 << 30;
const HUGE: u64 = 2 * MIB;
/// How long the kernel thread keeps changing things before it releases.
const RUN: Duration = Duration::from_millis(1200);
/// How long the race waits, after the release, for a device access to run
/// into it.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Sets the flag when dropped: a panicking main thread still stops the
/// other threads of its scope, so the panic is reported instead of a hang.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Length of `r` in bytes.
fn bytes(r: VaRange) -> u64 {
    r.pages(12) * PAGE
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// 1. A device walking the mirror table while the CPU changes it
// ---------------------------------------------------------------------------

/// What the device threads saw.
#[derive(Debug, Default)]
struct DeviceReport {
    /// dmirror reads and writes that completed.
    accesses: u64,
    /// dmirror accesses refused: no region, no permission (Fault / Perm).
    refused: u64,
    /// dmirror accesses after the release (Released).
    released: u64,
    /// dmirror accesses that gave up on collisions (Busy).
    busy: u64,
    /// Raw walks of the mirror table.
    translates: u64,
    /// Walks that found an entry, and of those huge ones (order 9).
    hits: u64,
    huge_hits: u64,
    /// Entries found that the CPU did not map at check time while an
    /// invalidation ran or started meanwhile (a race, not an error).
    raced: u64,
    /// Entries found that the CPU did not map although no invalidation ran
    /// or started between the walk and the check: stale (must be 0).
    stale: u64,
}

impl DeviceReport {
    fn add(&mut self, o: &DeviceReport) {
        self.accesses += o.accesses;
        self.refused += o.refused;
        self.released += o.released;
        self.busy += o.busy;
        self.translates += o.translates;
        self.hits += o.hits;
        self.huge_hits += o.huge_hits;
        self.raced += o.raced;
        self.stale += o.stale;
    }
}

/// One raw walk of the mirror at `va`, checked against the CPU.
fn walk_once(m: &DevMirror<'_>, space: &ModelSpace, view: &TableView, va: u64, rep: &mut DeviceReport) {
    let reg = space.notifiers();
    let before = reg.seq();
    fence(Ordering::SeqCst);
    rep.translates += 1;
    let Some(e) = m.translate(va) else { return };
    rep.hits += 1;
    if e.order() == 9 {
        rep.huge_hits += 1;
    }
    if !view.cpu_maps(va, e.frame(), e.is_write()) {
        // The CPU's reads above happen before this sequence read.
        fence(Ordering::SeqCst);
        let after = reg.seq();
        if before & 1 == 0 && after == before {
            rep.stale += 1;
            eprintln!("stale walk: {va:#x} -> {:#x} (write {}) with no invalidation since", e.frame(), e.is_write());
        } else {
            rep.raced += 1;
        }
    }
}

/// A device thread: accesses through the TLB (dmirror) and raw walks of
/// random pages of `buf`, until `stop`.
fn device_thread(
    m: &DevMirror<'_>,
    space: &ModelSpace,
    buf: VaRange,
    stop: &AtomicBool,
    released: &AtomicU64,
    seed: u64,
    walker_only: bool,
) -> DeviceReport {
    let view = space.table_view();
    let mut rng = Rng::new(seed);
    let mut rep = DeviceReport::default();
    let pages = buf.pages(12);
    let data = pattern(64, seed as u8);
    while !stop.load(Ordering::Relaxed) {
        let va = buf.start() + rng.below(pages) * PAGE;
        if walker_only || rng.below(3) == 0 {
            // A burst of walks over neighbouring pages, as a device MMU
            // streaming through a buffer would.
            for i in 0..8 {
                let v = va + i * PAGE;
                if v <= buf.last() {
                    walk_once(m, space, &view, v, &mut rep);
                }
            }
            continue;
        }
        let off = rng.below(PAGE - 64);
        let r = if rng.below(2) == 0 {
            dmirror::read(m, va + off, 64).map(|_| ())
        } else {
            dmirror::write(m, va + off, &data)
        };
        match r {
            Ok(()) => rep.accesses += 1,
            Err(Error::Fault | Error::Perm) => rep.refused += 1,
            Err(Error::Released) => {
                rep.released += 1;
                released.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::Busy) => rep.busy += 1,
            Err(e) => panic!("device access at {:#x}: unexpected {e:?}", va + off),
        }
    }
    rep
}

/// The kernel side of the 4 KiB race: one round of changes to `buf`.
fn kernel_round_small(space: &ModelSpace, buf: VaRange, round: u64, rng: &mut Rng) {
    let pages = buf.pages(12);
    let first = rng.below(pages);
    let count = 1 + rng.below((pages - first).min(16));
    let sub = range(buf.start() + first * PAGE, count * PAGE);
    match round % 6 {
        // Unmap and map again, then the CPU writes it (fresh frames).
        0 => {
            space.unmap(sub).unwrap();
            space.map(sub.start(), bytes(sub), RW, RegionKind::PrivateAnon).unwrap();
            space.write_bytes(sub.start(), &pattern(bytes(sub) as usize, round as u8)).unwrap();
        }
        // Protection down to read-only and back.
        1 => {
            space.protect(sub, R).unwrap();
            std::thread::yield_now();
            space.protect(sub, RW).unwrap();
        }
        // Fork, then the parent writes: copy-on-write breaks.
        2 => {
            let child = space.fork().unwrap();
            space.write_bytes(sub.start(), &pattern(bytes(sub) as usize, !(round as u8))).unwrap();
            std::thread::yield_now();
            drop(child);
        }
        // Zap (MADV_DONTNEED).
        3 => space.clear(sub).unwrap(),
        // PROT_NONE and back.
        4 => {
            space.protect(sub, Perm::None.flags()).unwrap();
            std::thread::yield_now();
            space.protect(sub, RW).unwrap();
        }
        // The CPU writes (demand faults, no invalidation).
        _ => space.write_bytes(sub.start(), &pattern(bytes(sub) as usize, 0x77)).unwrap(),
    }
}

/// The kernel side of the 2 MiB race: one round of changes to one block.
fn kernel_round_huge(space: &ModelSpace, buf: VaRange, kind: &RegionKind, round: u64, rng: &mut Rng) {
    let blocks = bytes(buf) / HUGE;
    let block = range(buf.start() + rng.below(blocks) * HUGE, HUGE);
    let repopulate = |seed: u8| space.write_bytes(block.start(), &pattern(PAGE as usize, seed)).unwrap();
    match round % 5 {
        // Unmap (a THP is split by a 4 KiB unmap first) and map again.
        0 => {
            if matches!(kind, RegionKind::Thp) {
                space.unmap(range(block.start() + rng.below(512) * PAGE, PAGE)).unwrap();
                std::thread::yield_now();
            }
            space.unmap(block).unwrap();
            space.map(block.start(), HUGE, RW, kind.clone()).unwrap();
            repopulate(round as u8);
        }
        1 => {
            space.protect(block, R).unwrap();
            std::thread::yield_now();
            space.protect(block, RW).unwrap();
        }
        // Fork and write: a shared THP is split and one page copied; a
        // hugetlb page is copied whole.
        2 => {
            let child = space.fork().unwrap();
            repopulate(!(round as u8));
            std::thread::yield_now();
            drop(child);
        }
        3 => {
            space.clear(block).unwrap();
            repopulate(0x33);
        }
        _ => repopulate(0x44),
    }
}

/// Runs device threads against `kernel_round` for `RUN`, then releases the
/// address space while they still run; checks and reports.
fn race(name: &str, ram: u64, buf_len: u64, kind: RegionKind, huge: bool) {
    let (alloc, space) = kernel(ram);
    let buf = space.map(BASE, buf_len, RW, kind.clone()).unwrap();
    if huge {
        for b in 0..buf_len / HUGE {
            space.write_bytes(BASE + b * HUGE, &pattern(PAGE as usize, 1)).unwrap();
        }
    } else {
        space.write_bytes(BASE, &pattern(buf_len as usize, 1)).unwrap();
    }
    let rounds;
    let mut rep = DeviceReport::default();
    let stats: MirrorStats;
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        let m = &*m;
        let stop = AtomicBool::new(false);
        let released = AtomicU64::new(0);
        rounds = std::thread::scope(|s| {
            let _stop = StopOnDrop(&stop);
            let devices: Vec<_> = (0..2u64)
                .map(|i| {
                    let (space, stop, released) = (&space, &stop, &released);
                    s.spawn(move || device_thread(m, space, buf, stop, released, 17 + i, i == 1))
                })
                .collect();
            let mut rng = Rng::new(99);
            let t0 = Instant::now();
            let mut rounds = 0u64;
            while t0.elapsed() < RUN {
                if huge {
                    kernel_round_huge(&space, buf, &kind, rounds, &mut rng);
                } else {
                    kernel_round_small(&space, buf, rounds, &mut rng);
                }
                rounds += 1;
                std::thread::yield_now();
            }
            // Address-space teardown while the device keeps going.
            space.release();
            // Until the accessing device has run into the release (bounded:
            // a loaded machine may not schedule it for a while).
            let t1 = Instant::now();
            while released.load(Ordering::Relaxed) == 0 && t1.elapsed() < RELEASE_WAIT {
                std::thread::sleep(Duration::from_millis(1));
            }
            stop.store(true, Ordering::Relaxed);
            for d in devices {
                rep.add(&d.join().unwrap());
            }
            rounds
        });
        let c = counters(m);
        stats = m.stats();
        for i in 0..buf.pages(12) {
            assert_eq!(m.translate(buf.start() + i * PAGE), None, "{name}: release emptied the mirror");
        }
        assert_eq!(m.fault(range(BASE, PAGE), false), Err(Error::Released));
        assert_eq!(m.device().tlb_len(), 0, "{name}: release flushed the device");
        println!(
            "{name}: {rounds} kernel rounds; device: {} accesses ({} refused, {} busy, {} after release), \
             {} device faults, {} pages copied, stale {}; walker: {} translates, {} hits ({} huge), {} raced, \
             stale {}; mirror: {} faults, {} retries, {} handler calls, {} entries mapped ({} huge), \
             {} invalidations, {} pages invalidated",
            rep.accesses,
            rep.refused,
            rep.busy,
            rep.released,
            c.faults,
            c.cpages,
            c.stale,
            rep.translates,
            rep.hits,
            rep.huge_hits,
            rep.raced,
            rep.stale,
            stats.faults,
            stats.retries,
            stats.handler_calls,
            stats.entries_mapped,
            stats.huge_mapped,
            stats.invalidations,
            stats.pages_invalidated,
        );
        assert_eq!(c.stale, 0, "{name}: the device used a stale translation");
    }
    assert_eq!(rep.stale, 0, "{name}: a lock-free walk found a translation the CPU had removed");
    assert!(rounds >= 6, "{name}: the kernel made only {rounds} rounds");
    assert!(rep.accesses > 0 && rep.hits > 0, "{name}: the device never got through: {rep:?}");
    assert!(rep.released > 0, "{name}: no access ran into the release");
    assert!(stats.invalidations > 0, "{name}: no invalidation tore anything down");
    if huge {
        assert!(stats.huge_mapped > 0, "{name}: no huge entry mapped: {stats:?}");
        assert!(rep.huge_hits > 0, "{name}: no walk found a huge entry");
    }
    drop(space);
    assert_eq!(alloc.live(), 0, "{name}: leak");
}

#[test]
fn device_walker_races_unmap_protect_cow_and_release_4k() {
    watchdog::bounded("a device walking the mirror while the kernel changes 4 KiB pages", watchdog::BOUND, || {
        race("4k", 64 * MIB, 64 * PAGE, RegionKind::PrivateAnon, false);
    });
}

#[test]
fn device_walker_races_unmap_protect_cow_and_release_thp() {
    watchdog::bounded(
        "a device walking huge mirror entries of THPs while the kernel changes them",
        watchdog::BOUND,
        || {
            race("thp", 128 * MIB, 2 * HUGE, RegionKind::Thp, true);
        },
    );
}

#[test]
fn device_walker_races_unmap_protect_cow_and_release_hugetlb() {
    watchdog::bounded("a device walking huge mirror entries of hugetlb pages", watchdog::BOUND, || {
        race("hugetlb", 128 * MIB, 2 * HUGE, RegionKind::HugeTlb2M, true);
    });
}

// ---------------------------------------------------------------------------
// 2. Faults next to a back-to-back invalidator
// ---------------------------------------------------------------------------

/// Block 1 (the faulting thread's) and block 2 (the invalidator's).
fn blocks() -> (VaRange, VaRange) {
    (range(BASE, HUGE), range(BASE + HUGE, HUGE))
}

/// Clears `r` from the mirror only (the CPU keeps its pages): an
/// invalidation through the registry.
fn invalidate(space: &ModelSpace, r: VaRange) {
    let reg = space.notifiers();
    let inv = reg.invalidate_range_start(r, Event::Clear, true).unwrap();
    reg.invalidate_range_end(inv);
}

/// Pages of `r` the mirror translates, each checked against the CPU.
fn mirrored(m: &DevMirror<'_>, space: &ModelSpace, r: VaRange) -> u64 {
    let view = space.table_view();
    let mut n = 0;
    for i in 0..r.pages(12) {
        let va = r.start() + i * PAGE;
        if let Some(e) = m.translate(va) {
            assert!(view.cpu_maps(va, e.frame(), e.is_write()), "mirror entry at {va:#x} not mapped by the CPU");
            n += 1;
        }
    }
    n
}

/// Thread B: invalidates pages of `target` back to back until `stop`:
/// mostly through the registry (1 to 16 pages), every 8th time a fault of
/// its own pages (so later invalidations tear real entries down) when
/// `fault_own`, every 32nd time a kernel zap or a protection change of
/// the pages. Returns the invalidations it started.
fn invalidator(m: &DevMirror<'_>, space: &ModelSpace, target: VaRange, stop: &AtomicBool, fault_own: bool) -> u64 {
    let mut rng = Rng::new(5);
    let pages = target.pages(12);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let first = rng.below(pages);
        let sub = range(target.start() + first * PAGE, (1 + rng.below((pages - first).min(16))) * PAGE);
        match n % 32 {
            31 => space.clear(sub).unwrap(),
            15 => {
                space.protect(sub, R).unwrap();
                space.protect(sub, RW).unwrap();
            }
            k if k % 8 == 7 && fault_own => {
                m.fault(sub, false).unwrap();
            }
            _ => invalidate(space, sub),
        }
        n += 1;
    }
    n
}

/// A fault loop over block 1 with an invalidator of block 2 (same mirror):
/// no retry, no Busy, and block 1 stays whole between faults.
#[test]
fn disjoint_invalidator_costs_no_retry() {
    watchdog::bounded("faults against a back-to-back invalidator of other pages", watchdog::BOUND, || {
        let (alloc, space) = kernel(64 * MIB);
        let (b1, b2) = blocks();
        let buf = space.map(BASE, 2 * HUGE, RW, RegionKind::PrivateAnon).unwrap();
        space.write_bytes(buf.start(), &pattern(bytes(buf) as usize, 3)).unwrap();
        const ROUNDS: u64 = 300;
        {
            let m = pin!(mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let m = &*m;
            let stop = AtomicBool::new(false);
            let (mut busy, mut ok) = (0u64, 0u64);
            let reg_invs = std::thread::scope(|s| {
                let _stop = StopOnDrop(&stop);
                let b = s.spawn(|| invalidator(m, &space, b2, &stop, true));
                let t0 = Instant::now();
                for round in 0..ROUNDS {
                    // Half the rounds zap the CPU pages too, so the fault
                    // calls the kernel's handler (COW of the zero page on a
                    // write after a read).
                    if round % 4 == 3 {
                        space.clear(b1).unwrap();
                    } else {
                        invalidate(&space, b1);
                    }
                    assert_eq!(m.translate(b1.start()), None, "block 1 cleared before the fault");
                    match m.fault(b1, round % 2 == 0) {
                        Ok(()) => ok += 1,
                        Err(Error::Busy) => busy += 1,
                        Err(e) => panic!("round {round}: unexpected {e:?}"),
                    }
                    // Invalidations of block 2 never touch block 1.
                    assert_eq!(mirrored(m, &space, b1), 512, "round {round}: block 1 mapped whole");
                    if round % 16 == 0 {
                        let va = b1.start() + (round % 512) * PAGE;
                        dmirror::read(m, va, 64).unwrap();
                    }
                }
                let elapsed = t0.elapsed();
                stop.store(true, Ordering::Relaxed);
                let invs = b.join().unwrap();
                println!("disjoint: {ROUNDS} faults of 512 pages in {elapsed:?} next to {invs} invalidator operations");
                invs
            });
            let st = m.stats();
            let c = counters(m);
            println!(
                "disjoint invalidator: {ok} ok, {busy} busy, {} retries; {} faults in all (B's own included), \
                 {} handler calls, {} invalidations tearing down {} pages; B ran {reg_invs} operations; \
                 device stale {}",
                st.retries, st.faults, st.handler_calls, st.invalidations, st.pages_invalidated, c.stale
            );
            assert_eq!(busy, 0, "a fault returned Busy although only other pages were invalidated");
            assert_eq!(st.retries, 0, "invalidations of other pages cost retries: {st:?}");
            assert!(reg_invs > ROUNDS, "the invalidator barely ran ({reg_invs} operations)");
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

/// The same with the invalidator on another mirror's range: no retry.
#[test]
fn invalidator_of_another_mirror_costs_no_retry() {
    watchdog::bounded("faults against a back-to-back invalidator of another mirror", watchdog::BOUND, || {
        let (alloc, space) = kernel(64 * MIB);
        let (b1, b2) = blocks();
        let buf = space.map(BASE, 2 * HUGE, RW, RegionKind::PrivateAnon).unwrap();
        space.write_bytes(buf.start(), &pattern(bytes(buf) as usize, 3)).unwrap();
        {
            let m1 = pin!(Mirror::new(&space, &*alloc, device(&space), b1, MirrorConfig::default()).unwrap());
            let m2 = pin!(Mirror::new(&space, &*alloc, device(&space), b2, MirrorConfig::default()).unwrap());
            m1.as_ref().register().unwrap();
            m2.as_ref().register().unwrap();
            let (m1, m2) = (&*m1, &*m2);
            let stop = AtomicBool::new(false);
            let invs = std::thread::scope(|s| {
                let _stop = StopOnDrop(&stop);
                let b = s.spawn(|| invalidator(m2, &space, b2, &stop, true));
                for round in 0..200u64 {
                    invalidate(&space, b1);
                    m1.fault(b1, round % 2 == 0).unwrap();
                    assert_eq!(mirrored(m1, &space, b1), 512);
                }
                stop.store(true, Ordering::Relaxed);
                b.join().unwrap()
            });
            let (s1, s2) = (m1.stats(), m2.stats());
            println!("another mirror's invalidator: {invs} operations; faulting mirror {s1:?}; other mirror {s2:?}");
            assert_eq!(s1.retries, 0);
            assert_eq!(s2.retries, 0, "the invalidator's own faults collide with nothing either");
            counters(m1);
            counters(m2);
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

/// The invalidator on the fault's own pages: each fault ends Ok or Busy
/// within its budget (at most budget + 1 collisions), a Busy fault leaves
/// nothing of block 1 mapped, no stale access; once the invalidator stops,
/// a fault takes no retry.
#[test]
fn overlapping_invalidator_bounded_by_the_budget() {
    watchdog::bounded("faults against a back-to-back invalidator of their own pages", watchdog::BOUND, || {
        let (alloc, space) = kernel(64 * MIB);
        let (b1, _) = blocks();
        let buf = space.map(BASE, 2 * HUGE, RW, RegionKind::PrivateAnon).unwrap();
        space.write_bytes(buf.start(), &pattern(bytes(buf) as usize, 3)).unwrap();
        let mut report = Vec::new();
        for budget in [4u32, 64] {
            let config = MirrorConfig { max_retries: budget, ..MirrorConfig::default() };
            let m = pin!(Mirror::new(&space, &*alloc, device(&space), user(), config).unwrap());
            m.as_ref().register().unwrap();
            let m = &*m;
            let stop = AtomicBool::new(false);
            let (mut ok, mut busy, mut refused, mut worst, mut retried) = (0u64, 0u64, 0u64, 0u64, 0u64);
            let mut walks = DeviceReport::default();
            let invs = std::thread::scope(|s| {
                let _stop = StopOnDrop(&stop);
                let b = s.spawn(|| invalidator(m, &space, b1, &stop, false));
                let view = space.table_view();
                for round in 0..200u64 {
                    invalidate(&space, b1);
                    let before = m.stats().retries;
                    let r = m.fault(b1, round % 2 == 0);
                    let took = m.stats().retries - before;
                    worst = worst.max(took);
                    retried += (took > 0) as u64;
                    assert!(took <= budget as u64 + 1, "budget {budget}: {took} retries in one fault ({r:?})");
                    match r {
                        Ok(()) => {
                            ok += 1;
                            // What is mapped maps what the CPU maps (the
                            // invalidator keeps clearing it meanwhile); the
                            // device reads through it without a stale access.
                            for i in (0..512).step_by(37) {
                                walk_once(m, &space, &view, b1.start() + i * PAGE, &mut walks);
                            }
                            let _ = dmirror::read(m, b1.start() + (round % 512) * PAGE, 64);
                        }
                        Err(e @ (Error::Busy | Error::Perm)) => {
                            if e == Error::Busy {
                                busy += 1;
                                assert_eq!(
                                    took,
                                    budget as u64 + 1,
                                    "budget {budget}: Busy before the budget was spent"
                                );
                            } else {
                                // A write fault inside the invalidator's
                                // read-only window.
                                refused += 1;
                            }
                            // Only this fault maps block 1 (the invalidator
                            // never faults): all or nothing.
                            let left = (0..512).filter(|i| m.translate(b1.start() + i * PAGE).is_some()).count();
                            assert_eq!(left, 0, "budget {budget}: a failed fault ({e:?}) left pages mapped");
                        }
                        Err(e) => panic!("budget {budget}, round {round}: unexpected {e:?}"),
                    }
                }
                stop.store(true, Ordering::Relaxed);
                b.join().unwrap()
            });
            assert_eq!(walks.stale, 0, "budget {budget}: a walk found a translation the CPU had removed");
            let before = m.stats().retries;
            invalidate(&space, b1);
            m.fault(b1, true).unwrap();
            assert_eq!(m.stats().retries, before, "budget {budget}: no invalidator, no retry");
            assert_eq!(mirrored(m, &space, b1), 512);
            counters(m);
            report.push((budget, ok, busy, refused, worst, retried, invs, m.stats().retries));
        }
        for (budget, ok, busy, refused, worst, retried, invs, total) in report {
            println!(
                "overlapping invalidator, max_retries {budget}: {ok} ok, {busy} busy, {refused} Perm (write in a \
                 read-only window), {retried} of 200 faults retried, worst {worst} retries in one fault, {total} \
                 retries in all, {invs} invalidator operations"
            );
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}
