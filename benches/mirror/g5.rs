//! G5: faults next to a thread invalidating back to back.
//!
//! Disjoint: faults of 64 populated pages while the other thread
//! invalidates other pages of the same mirror (or another mirror's range),
//! against the same faults with that thread idle, interleaved; the faulted
//! pages are cleared (untimed) between faults. Overlapping: a fault loop
//! over pages the other thread keeps invalidating, with a watchdog, so a
//! starved fault shows as a count, never as a hung bench.
//!
//! The invalidations go through the registry only (the CPU keeps its
//! pages): the mirror's side of an invalidation, with nothing else of the
//! model kernel's in the way.

use crate::kit::*;
use hmm_core::{AddressSpace, Error, Event, VaRange};
use hmm_testkit::{ModelSpace, RegionKind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// What the invalidator thread does.
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const STOP: u8 = 2;

/// A thread invalidating single pages of `target` (every `stride`-th,
/// wrapping) back to back while `mode` is RUNNING; `count` counts them.
fn invalidator(space: &ModelSpace, target: VaRange, stride: u64, mode: &AtomicU8, count: &AtomicU64) {
    let pages = target.pages(12);
    let mut i = 0;
    loop {
        match mode.load(Ordering::Acquire) {
            STOP => return,
            IDLE => std::thread::sleep(Duration::from_micros(200)),
            _ => {
                invalidate(space, range(target.start() + (i % pages) * PAGE, PAGE));
                count.fetch_add(1, Ordering::Relaxed);
                i += stride;
            }
        }
    }
}

/// Sets the invalidator's mode and, when starting it, waits until it runs.
fn set_mode(mode: &AtomicU8, count: &AtomicU64, to: u8) {
    mode.store(to, Ordering::Release);
    if to == RUNNING {
        let c = count.load(Ordering::Relaxed);
        while count.load(Ordering::Relaxed) < c + 2 {
            std::hint::spin_loop();
        }
    }
}

/// Faults in batches next to a busy or an idle invalidator.
#[derive(Default)]
struct Contention {
    /// Times of the faults, and of the untimed clears between them (ns).
    fault_ns: Vec<u64>,
    clear_ns: Vec<u64>,
    faults: u64,
    retried: u64,
    busy: u64,
    /// CPU time of the faulting thread over the faults (with the clock
    /// reads around them).
    cpu: Duration,
}

/// `n` faults of `r` (cleared between, untimed), counting retried and Busy
/// faults.
fn contended_faults(m: &M<'_>, space: &ModelSpace, r: VaRange, n: u64, stats: &mut Contention) -> Duration {
    let mut t = Duration::ZERO;
    for _ in 0..n {
        stats.clear_ns.push(timed(|| invalidate(space, r)).as_nanos() as u64);
        let before = m.stats().retries;
        let mut res = Ok(());
        let cpu0 = thread_cpu();
        let took = timed(|| res = m.fault(r, false));
        stats.cpu += thread_cpu() - cpu0;
        stats.fault_ns.push(took.as_nanos() as u64);
        t += took;
        stats.faults += 1;
        stats.retried += (m.stats().retries > before) as u64;
        match res {
            Ok(()) => {}
            Err(Error::Busy) => stats.busy += 1,
            Err(e) => panic!("fault next to a disjoint invalidator: {e:?}"),
        }
    }
    t
}

/// What the disjoint cases found, summed for the retry and Busy goals.
#[derive(Default)]
struct Disjoint {
    faults: u64,
    retried: u64,
    busy: u64,
}

pub fn run(mode: Mode) {
    let mut sum = Disjoint::default();
    for other_mirror in [false, true] {
        disjoint(mode, other_mirror, &mut sum);
    }
    ratio(
        "g5_disjoint_retried_pct",
        100.0 * sum.retried as f64 / sum.faults.max(1) as f64,
        "<= 1",
        &format!(
            "{} of {} faults next to a disjoint invalidator retried (MirrorStats::retries)",
            sum.retried, sum.faults
        ),
        "no retry: the invalidated pages are not the faulted ones",
    );
    ratio(
        "g5_disjoint_busy",
        sum.busy as f64,
        "== 0",
        &format!("{} of {} faults next to a disjoint invalidator returned Busy", sum.busy, sum.faults),
        "none: the invalidated pages are not the faulted ones",
    );
    running_ranges(mode);
    overlap(mode);
}

/// The price of tracking running invalidations: a 1-page fault while 4
/// invalidations of other pages of the mirror are running (started, not
/// ended) against the same fault with none.
fn running_ranges(mode: Mode) {
    let (alloc, space) = kernel(64 * MIB);
    let blk = populated(&space, 3 * GIB, HUGE, RegionKind::PrivateAnon);
    let m = mirror(&space, &alloc, blk);
    // The rest of the block keeps the mirror's tables.
    m.fault(blk, false).unwrap();
    let page = range(3 * GIB, PAGE);
    let reg = space.notifiers();
    let faults = |n: u64| -> Duration {
        (0..n)
            .map(|_| {
                invalidate(&space, page);
                timed(|| m.fault(page, false).unwrap())
            })
            .sum()
    };
    let with_running = |n: u64| {
        let running: Vec<_> = (0..4)
            .map(|i| reg.invalidate_range_start(range(3 * GIB + (100 + 50 * i) * PAGE, PAGE), Event::Clear, true))
            .map(Result::unwrap)
            .collect();
        let before = m.stats().retries;
        let t = faults(n);
        assert_eq!(m.stats().retries, before, "running invalidations of other pages cost no retry");
        for inv in running {
            reg.invalidate_range_end(inv);
        }
        t
    };
    let p = interleaved(mode.rounds(), 200, &mut { faults }, &mut { with_running });
    figure(format!(
        "g5 1-page fault with 4 invalidations of other pages running {:.0} ns vs none {:.0} ns: ratio {}",
        p.b,
        p.a,
        num(p.ratio)
    ));
}

/// One disjoint case: the invalidator on other pages of the same mirror,
/// or on another mirror's range.
fn disjoint(mode: Mode, other_mirror: bool, sum: &mut Disjoint) {
    let (alloc, space) = kernel(64 * MIB);
    let blocks = populated(&space, 3 * GIB, 2 * HUGE, RegionKind::PrivateAnon);
    let (a, b) = (range(3 * GIB, 64 * PAGE), range(3 * GIB + HUGE, HUGE));
    // Same mirror: one over both blocks. Other mirror: one over each.
    let (m, _mb) = if other_mirror {
        (mirror(&space, &alloc, range(3 * GIB, HUGE)), Some(mirror(&space, &alloc, b)))
    } else {
        (mirror(&space, &alloc, blocks), None)
    };
    let name = if other_mirror { "other_mirror" } else { "disjoint_same_mirror" };
    let (state, count) = (AtomicU8::new(IDLE), AtomicU64::new(0));
    let (mut quiet, mut busy) = (Contention::default(), Contention::default());
    let (mut during, mut busy_time) = (0u64, Duration::ZERO);
    let p = std::thread::scope(|s| {
        s.spawn(|| invalidator(&space, b, 7, &state, &count));
        // Short batches, many rounds: on a loaded machine a preemption
        // (milliseconds) then spoils few batches, and the median skips them.
        let p = interleaved(
            mode.pick(401, 41),
            50,
            &mut |n| {
                set_mode(&state, &count, IDLE);
                contended_faults(&m, &space, a, n, &mut quiet)
            },
            &mut |n| {
                set_mode(&state, &count, RUNNING);
                let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
                let t = contended_faults(&m, &space, a, n, &mut busy);
                during += count.load(Ordering::Relaxed) - c0;
                busy_time += t0.elapsed();
                set_mode(&state, &count, IDLE);
                t
            },
        );
        state.store(STOP, Ordering::Release);
        p
    });
    let whose = if other_mirror { "another mirror's range" } else { "other pages of the same mirror" };
    // Throughput: the inverse of the time ratio.
    ratio(
        &format!("g5_{name}_throughput"),
        1.0 / p.ratio,
        ">= 0.5",
        &format!("Mirror::fault of 64 populated pages while a thread invalidates {whose}: {:.0} ns/fault", p.b),
        &format!("the same faults with that thread idle: {:.0} ns/fault", p.a),
    );
    figure(format!(
        "g5 {name}: throughput over summed times {} (rare long stalls included); contended: {} faults, {} retried, \
         {} busy; idle: {} retried, {} busy; the other thread's invalidations during contended batches: {during} \
         ({:.0} ns apart)",
        num(1.0 / p.total_ratio),
        busy.faults,
        busy.retried,
        busy.busy,
        quiet.retried,
        quiet.busy,
        busy_time.as_nanos() as f64 / during.max(1) as f64,
    ));
    figure(format!(
        "g5 {name} spread (ns): faults idle {} / contended {}; clears between faults idle {} / contended {}; \
         mean CPU time of the faulting thread per fault idle {:.0} / contended {:.0}",
        spread(&mut quiet.fault_ns),
        spread(&mut busy.fault_ns),
        spread(&mut quiet.clear_ns),
        spread(&mut busy.clear_ns),
        quiet.cpu.as_nanos() as f64 / quiet.faults.max(1) as f64,
        busy.cpu.as_nanos() as f64 / busy.faults.max(1) as f64,
    ));
    sum.faults += busy.faults;
    sum.retried += busy.retried;
    sum.busy += busy.busy;
}

/// A fault that takes this long counts as starved.
const STARVED: Duration = Duration::from_secs(1);

/// What a fault loop under overlapping invalidations saw.
#[derive(Default)]
struct Loop {
    calls: u64,
    ok: u64,
    busy: u64,
    /// Errors other than Busy (none expected).
    failed: u64,
    retries: u64,
    /// Latency of every call (ns).
    ns: Vec<u64>,
    /// CPU time of the faulting thread, and the loop's wall time.
    cpu: (Duration, Duration),
}

impl Loop {
    /// Calls that took `limit` or longer, and their summed time.
    fn slower(&self, limit: Duration) -> (u64, Duration) {
        let slow = self.ns.iter().filter(|&&t| t >= limit.as_nanos() as u64);
        (slow.clone().count() as u64, Duration::from_nanos(slow.sum()))
    }
}

/// Faults `r` until `stop`.
fn fault_loop(m: &M<'_>, r: VaRange, stop: &AtomicBool) -> Loop {
    let mut out = Loop::default();
    let (retries0, cpu0, t0) = (m.stats().retries, thread_cpu(), Instant::now());
    while !stop.load(Ordering::Acquire) {
        let t0 = Instant::now();
        let res = m.fault(r, false);
        out.ns.push(t0.elapsed().as_nanos() as u64);
        out.calls += 1;
        match res {
            Ok(()) => out.ok += 1,
            Err(Error::Busy) => out.busy += 1,
            Err(_) => out.failed += 1,
        }
    }
    out.retries = m.stats().retries - retries0;
    out.cpu = (thread_cpu() - cpu0, t0.elapsed());
    out
}

/// CPU time of the calling thread: tells a spinning wait (on CPU) from a
/// thread the scheduler left waiting (off CPU).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The overlapping case: 1 GiB of THP (512 populated 2 MiB leaves, one
/// mirror entry each). First half of the time: faults of the whole 1 GiB
/// while the other thread invalidates single pages spread over it; second
/// half: faults of one 2 MiB block while it invalidates pages of that block.
fn overlap(mode: Mode) {
    const AT: u64 = 8 * GIB;
    let (alloc, space) = kernel(GIB + 64 * MIB);
    let all = space.map(AT, GIB, RW, RegionKind::Thp).unwrap();
    for block in (AT..AT + GIB).step_by(HUGE as usize) {
        space.write_bytes(block, &[1]).unwrap();
    }
    let m = mirror(&space, &alloc, all);
    m.fault(all, false).unwrap();
    assert_eq!(m.stats().huge_mapped, 512, "1 GiB of THP is 512 mirror entries");
    let half = mode.pick(Duration::from_secs(5), Duration::from_secs(1));
    // A stride that is no multiple of 512 pages: every invalidation hits
    // another 2 MiB block.
    let phases = [("1 GiB", all, all, 4099), ("2 MiB", range(AT, HUGE), range(AT, HUGE), 7)];
    let (mut starved, mut short, mut other) = (0, Vec::new(), Vec::new());
    for (name, faulted, target, stride) in phases {
        let (l, invalidations, inv_cpu, hung) = watched(&space, &m, faulted, target, stride, half);
        starved += hung + l.slower(STARVED).0;
        let (stalls, stalled) = l.slower(Duration::from_millis(1));
        let worst = l.ns.iter().max().copied().unwrap_or(0);
        short.push(format!(
            "over {name}: {} faults, {} Busy, {:.2} retries/fault, worst {:.1} ms",
            l.calls,
            l.busy,
            l.retries as f64 / l.calls.max(1) as f64,
            worst as f64 / 1e6
        ));
        other.push(format!("{invalidations} over {name}"));
        let mut ns = l.ns.clone();
        figure(format!(
            "g5 overlap fault loop over {name} for {:.0} s: {} faults, {} ok, {} busy, {} failed, {:.2} \
             retries/fault, {invalidations} invalidations, latency ns {}, {stalls} calls of 1 ms or more ({:.0} ms \
             in all); on CPU: fault thread {:.0} ms of {:.0} ms, invalidator {:.0} ms{}",
            half.as_secs_f64(),
            l.calls,
            l.ok,
            l.busy,
            l.failed,
            l.retries as f64 / l.calls.max(1) as f64,
            spread(&mut ns),
            stalled.as_secs_f64() * 1e3,
            l.cpu.0.as_secs_f64() * 1e3,
            l.cpu.1.as_secs_f64() * 1e3,
            inv_cpu.as_secs_f64() * 1e3,
            if hung > 0 { ", one call still running 1 s after the end" } else { "" }
        ));
    }
    ratio(
        "g5_overlap_starved",
        starved as f64,
        "== 0",
        &format!(
            "{starved} starved (a call taking 1 s or more, or still running 1 s after the run); fault loops of {:.0} s \
             each {}",
            half.as_secs_f64(),
            short.join("; ")
        ),
        &format!("another thread invalidating single pages of the faulted range back to back: {}", other.join(", ")),
    );
}

/// Runs [`fault_loop`] over `faulted` for `time` while another thread
/// invalidates pages of `target`; returns what the loop saw, the
/// invalidations, and 1 if a call was still running [`STARVED`] after the
/// run (the invalidations still going). If it has not returned 5 s after
/// they stopped, the bench reports that and exits rather than hang.
fn watched(
    space: &ModelSpace,
    m: &M<'_>,
    faulted: VaRange,
    target: VaRange,
    stride: u64,
    time: Duration,
) -> (Loop, u64, Duration, u64) {
    let (state, count, stop) = (AtomicU8::new(IDLE), AtomicU64::new(0), AtomicBool::new(false));
    std::thread::scope(|s| {
        let inv = s.spawn(|| {
            let cpu0 = thread_cpu();
            invalidator(space, target, stride, &state, &count);
            thread_cpu() - cpu0
        });
        set_mode(&state, &count, RUNNING);
        let faults = s.spawn(|| fault_loop(m, faulted, &stop));
        std::thread::sleep(time);
        stop.store(true, Ordering::Release);
        let hung = !wait_for(&faults, STARVED) as u64;
        state.store(STOP, Ordering::Release);
        if !wait_for(&faults, Duration::from_secs(5)) {
            ratio(
                "g5_overlap_starved",
                1.0,
                "== 0",
                "a fault call hung: still running 5 s after the invalidations stopped",
                "starved = a fault call still running after the run",
            );
            std::process::exit(0);
        }
        let inv_cpu = inv.join().unwrap();
        (faults.join().unwrap(), count.load(Ordering::Relaxed), inv_cpu, hung)
    })
}

/// Whether `t` finished within `limit`.
fn wait_for<T>(t: &std::thread::ScopedJoinHandle<'_, T>, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while !t.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.is_finished()
}
