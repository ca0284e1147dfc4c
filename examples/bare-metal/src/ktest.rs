//! `mode=test`: named self-tests, reported as `test NAME ... ok|FAILED`, then
//! `N passed, M failed`. Every test must also give back every frame it took
//! (the harness compares the allocator's free count before and after).
//!
//! A failing check returns an error with file/line and a message; a panic,
//! CPU exception or hang ends the run with the failure exit code (or the
//! runner's timeout), which the host runner reports too.
//!
//! The `device_*` tests run the device on CPU 1 against a process that the
//! boot CPU runs (its table in CR3) and changes, through hmm-core.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_core::pt::Pfn;
use hmm_core::{AddressSpace, Error, Event, Interval, InvalidateRange, MirrorConfig, Notifier, RegionFlags, VaRange};

use crate::Machine;
use crate::device::{self, DevMirror, Device, dev_pattern, pattern};
use crate::memory::frames::{self, FreeError, POISON};
use crate::memory::{FRAMES, PAGE_SIZE, PhysFrame, phys};
use crate::process::{self, HUGE_SIZE, MapError, Process, STATS, pages, range, shared};
use crate::sync::SpinLock;
use crate::{apic, cpu, idt, race, smp, tlb};

/// Where a check failed. The message itself goes to [`MESSAGE`] (there is no
/// heap, and a large `Err` type would bloat every test's return value).
struct Failure {
    file: &'static str,
    line: u32,
}

impl Failure {
    fn new(file: &'static str, line: u32, args: fmt::Arguments<'_>) -> Self {
        let mut message = MESSAGE.lock();
        message.len = 0;
        let _ = message.write_fmt(args);
        Failure { file, line }
    }
}

/// Text of the most recent failure (tests run one at a time on the BSP).
struct Message {
    buf: [u8; 240],
    len: usize,
}

impl Message {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf8>")
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

static MESSAGE: SpinLock<Message> = SpinLock::new(Message { buf: [0; 240], len: 0 });

enum Outcome {
    Passed,
    Ignored(&'static str),
}

type TestResult = Result<Outcome, Failure>;

/// Fails the test unless `cond` holds.
macro_rules! ensure {
    ($cond:expr) => {
        ensure!($cond, "{}", stringify!($cond))
    };
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Failure::new(file!(), line!(), format_args!($($fmt)+)));
        }
    };
}

/// Fails the test unless both sides are equal; prints both.
macro_rules! ensure_eq {
    ($left:expr, $right:expr) => {{
        let (left, right) = (&$left, &$right);
        ensure!(left == right, "{} == {}: left {:?}, right {:?}", stringify!($left), stringify!($right), left, right);
    }};
}

/// Unwraps a `Result`, failing the test with the error otherwise.
macro_rules! ok {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Err(Failure::new(file!(), line!(), format_args!("{}: {:?}", stringify!($e), e))),
        }
    };
}

/// Creates and registers a mirror of `$range` of `$process` named `$m`
/// (a `&DevMirror`), pinned in the calling frame.
macro_rules! mirror {
    ($m:ident, $process:expr, $range:expr) => {
        let $m = core::pin::pin!(ok!(DevMirror::with_format(
            $process,
            &FRAMES,
            Device::new(),
            $range,
            MirrorConfig::default()
        )));
        ok!($m.as_ref().register());
        let $m: &DevMirror<'_> = &$m;
    };
}

/// 2 MiB-aligned user address the tests map at.
const BASE: u64 = process::USER_START + 0x4000_0000;

/// A named test case.
struct Test {
    name: &'static str,
    run: fn(&Machine) -> TestResult,
}

/// Builds the test table; each test is named after its function.
macro_rules! tests {
    ($($f:ident),* $(,)?) => {
        &[$(Test { name: stringify!($f), run: $f }),*]
    };
}

const TESTS: &[Test] = tests![
    breakpoint_exception_returns,
    offset_map_aliases_identity_map,
    frames_distinct_aligned_in_range,
    frames_free_poisons_and_rejects_double_free,
    frames_2mib_chunk_aligned_and_contiguous,
    smp_all_cpus_online,
    process_cpu_demand_zero_and_cow,
    process_invalidation_brackets_every_change,
    process_rejects_bad_regions,
    process_teardown_returns_every_frame,
    device_read_fault,
    device_write_fault,
    device_protection_downgrade_during_writes,
    device_unmap_races_reads,
    device_cow_break_after_fork,
    device_2mib_leaf,
];

/// Runs all tests; returns whether none failed.
pub fn run(m: &Machine) -> bool {
    println!("running {} tests", TESTS.len());
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for &Test { name, run } in TESTS {
        let free_before = FRAMES.stats().free;
        let result = run(m);
        let leaked = free_before as i64 - FRAMES.stats().free as i64;
        match result {
            Ok(Outcome::Passed) if leaked == 0 => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Ok(Outcome::Passed) => {
                failed += 1;
                println!("test {name} ... FAILED\n    leaked {leaked} frames");
            }
            Ok(Outcome::Ignored(why)) => {
                ignored += 1;
                println!("test {name} ... ignored ({why})");
            }
            Err(f) => {
                failed += 1;
                println!("test {name} ... FAILED\n    {}:{}: {}", f.file, f.line, MESSAGE.lock().as_str());
            }
        }
    }
    println!();
    if ignored > 0 {
        println!("{passed} passed, {failed} failed, {ignored} ignored");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    failed == 0
}

fn breakpoint_exception_returns(_: &Machine) -> TestResult {
    let before = idt::BREAKPOINTS.load(Ordering::Relaxed);
    cpu::breakpoint();
    cpu::breakpoint();
    ensure_eq!(idt::BREAKPOINTS.load(Ordering::Relaxed), before + 2);
    Ok(Outcome::Passed)
}

fn offset_map_aliases_identity_map(_: &Machine) -> TestResult {
    let frame = FRAMES.alloc().ok_or_else(|| Failure::new(file!(), line!(), format_args!("no frame")))?;
    ensure!(frame.start() < 1 << 30, "frame above the 1 GiB checked here");
    let via_offset = frame.as_ptr::<u64>();
    let via_identity = frame.start() as *mut u64;
    // SAFETY: we own the frame; both addresses map it (identity map covers
    // 0..4 GiB, offset map covers all RAM), and the accesses are volatile.
    let (a, b) = unsafe {
        via_offset.write_volatile(0x1234_5678_9abc_def0);
        let a = via_identity.read_volatile();
        via_identity.add(1).write_volatile(0x0fed_cba9_8765_4321);
        (a, via_offset.add(1).read_volatile())
    };
    FRAMES.free(frame);
    ensure_eq!(a, 0x1234_5678_9abc_def0u64);
    ensure_eq!(b, 0x0fed_cba9_8765_4321u64);
    ensure_eq!(phys::phys_to_virt(0x1000) as u64, phys::PHYS_OFFSET + 0x1000);
    Ok(Outcome::Passed)
}

fn frames_distinct_aligned_in_range(_: &Machine) -> TestResult {
    const N: usize = 64;
    let stats = FRAMES.stats();
    let mut got = [PhysFrame::containing(0); N];
    for slot in got.iter_mut() {
        *slot = FRAMES.alloc().ok_or_else(|| Failure::new(file!(), line!(), format_args!("out of frames")))?;
    }
    ensure_eq!(FRAMES.stats().free, stats.free - N);
    let mut result = Ok(Outcome::Passed);
    for (i, f) in got.iter().enumerate() {
        let ok = f.start().is_multiple_of(PAGE_SIZE)
            && f.start() >= stats.base
            && f.start() < stats.end
            && f.start() >= crate::memory::kernel_end()
            && !got[..i].contains(f);
        if !ok && result.is_ok() {
            result = Err(Failure::new(file!(), line!(), format_args!("bad or duplicate frame {f}")));
        }
    }
    for f in got {
        FRAMES.free(f);
    }
    result
}

fn frames_free_poisons_and_rejects_double_free(_: &Machine) -> TestResult {
    let frame = FRAMES.alloc_zeroed().ok_or_else(|| Failure::new(file!(), line!(), format_args!("no frame")))?;
    ensure_eq!(frames::peek(frame), 0u64);
    for w in 0..device::WORDS {
        // SAFETY: our frame, offset mapped.
        unsafe { frame.as_ptr::<u64>().add(w).write_volatile(pattern(BASE, 7, w)) };
    }
    FRAMES.free(frame);
    let words = frame.as_ptr::<u64>();
    for w in 0..device::WORDS {
        // SAFETY: a stale read of a freed frame, exactly what poisoning is
        // for; single-threaded here, so nobody reallocated it meanwhile.
        let v = unsafe { words.add(w).read_volatile() };
        ensure!(v == POISON, "word {w} of freed {frame} is {v:#x}, not poison");
    }
    ensure_eq!(FRAMES.try_free(frame), Err(FreeError::DoubleFree(frame)));
    let foreign = PhysFrame::containing(0x1000);
    ensure_eq!(FRAMES.try_free(foreign), Err(FreeError::NotManaged(foreign)));
    Ok(Outcome::Passed)
}

fn frames_2mib_chunk_aligned_and_contiguous(_: &Machine) -> TestResult {
    let before = FRAMES.stats().free;
    let chunk = FRAMES.alloc_aligned(9).ok_or_else(|| Failure::new(file!(), line!(), format_args!("no chunk")))?;
    let taken = before - FRAMES.stats().free;
    let single = FRAMES.alloc().ok_or_else(|| Failure::new(file!(), line!(), format_args!("no frame")))?;
    let outside = single.start() < chunk.start() || single.start() >= chunk.start() + HUGE_SIZE;
    for i in 0..512 {
        FRAMES.free(PhysFrame::containing(chunk.start() + i * PAGE_SIZE));
    }
    FRAMES.free(single);
    ensure!(chunk.start().is_multiple_of(HUGE_SIZE), "{chunk} is not 2 MiB aligned");
    ensure_eq!(taken, 512);
    ensure!(outside, "{single} handed out from inside the chunk at {chunk}");
    Ok(Outcome::Passed)
}

fn smp_all_cpus_online(m: &Machine) -> TestResult {
    ensure_eq!(m.online, m.cpus);
    if m.cpus < 2 {
        return Ok(Outcome::Ignored("needs cpus>=2"));
    }
    for cpu_index in 1..m.cpus {
        let answer = smp::call(cpu_index, || {
            let marker = 0u8;
            (apic::current_id(), &raw const marker as u64)
        });
        let (apic_id, rsp) = ok!(answer);
        ensure_eq!(apic_id as usize, cpu_index);
        // The AP runs on its own stack, not the BSP's.
        let here = 0u8;
        let bsp_rsp = &raw const here as u64;
        ensure!(rsp.abs_diff(bsp_rsp) > 4096, "AP rsp {rsp:#x} is near the BSP's {bsp_rsp:#x}");
    }
    Ok(Outcome::Passed)
}

/// Fails if the device read stale data (with the first stale value).
fn no_stale(mr: &DevMirror<'_>) -> Result<(), Failure> {
    let n = mr.device().stale_reads();
    ensure!(n == 0, "{n} stale device reads, first value {:#x}", stat(&mr.device().stats.first_stale));
    Ok(())
}

fn rw() -> RegionFlags {
    RegionFlags::READ | RegionFlags::WRITE
}

fn new_process() -> Result<Process, Failure> {
    Process::new(&FRAMES).map_err(|e| Failure::new(file!(), line!(), format_args!("{e:?}")))
}

/// `n` pages at `BASE + first * 4 KiB`.
fn span(first: u64, n: u64) -> VaRange {
    range(BASE + first * PAGE_SIZE, n * PAGE_SIZE)
}

fn stat(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The AP that plays the device, or why the test cannot run.
fn device_cpu(m: &Machine) -> Result<usize, Outcome> {
    if m.online < 2 { Err(Outcome::Ignored("needs cpus>=2")) } else { Ok(1) }
}

/// Spins until `done()` or ~`ms` milliseconds passed; returns `done()`.
fn wait_until(ms: u64, done: impl Fn() -> bool) -> bool {
    let deadline = cpu::Deadline::after_us(ms * 1000);
    while !done() {
        if deadline.expired() {
            return done();
        }
        core::hint::spin_loop();
    }
    true
}

/// Fills the page at `va` with `pattern(va, generation, _)` through the MMU.
fn cpu_fill(cpu: &process::Running<'_>, va: u64, generation: u64) {
    for w in 0..device::WORDS {
        cpu.write(va + 8 * w as u64, pattern(va, generation, w));
    }
}

/// Whether the page at `va` holds `expect(w)` in every word, read through
/// the MMU.
fn cpu_holds(cpu: &process::Running<'_>, va: u64, expect: impl Fn(usize) -> u64) -> bool {
    (0..device::WORDS).all(|w| cpu.read(va + 8 * w as u64) == expect(w))
}

/// CPU-only: page faults on the live table do demand-zero, a write after
/// fork copies the shared frame, and a page no longer shared is made
/// writable in place.
fn process_cpu_demand_zero_and_cow(_: &Machine) -> TestResult {
    let p = new_process()?;
    let region = span(0, 4);
    ok!(p.mmap(region, rw(), false));
    let (faults, zeroed) = (stat(&STATS.cpu_faults), stat(&STATS.demand_zero));
    let cpu = p.enter();
    ensure_eq!(cpu.read(BASE), 0u64);
    for va in pages(region) {
        cpu_fill(&cpu, va, 1);
    }
    ensure_eq!(stat(&STATS.cpu_faults) - faults, 4);
    ensure_eq!(stat(&STATS.demand_zero) - zeroed, 4);
    ensure!(pages(region).all(|va| cpu_holds(&cpu, va, |w| pattern(va, 1, w))));

    let child = ok!(p.fork());
    let shared_frame = p.translate(BASE).map(|t| t.frame);
    ensure_eq!(shared_frame, child.translate(BASE).map(|t| t.frame));
    ensure_eq!(p.translate(BASE).map(|t| t.writable), Some(false));
    let copies = stat(&STATS.cow_copies);
    cpu_fill(&cpu, BASE, 2);
    ensure_eq!(stat(&STATS.cow_copies) - copies, 1);
    ensure!(p.translate(BASE).map(|t| t.frame) != shared_frame, "no copy was made");
    ensure!(cpu_holds(&cpu, BASE, |w| pattern(BASE, 2, w)));
    ensure!((0..device::WORDS).all(|w| child.peek(BASE, w) == Some(pattern(BASE, 1, w))), "child changed");

    drop(child);
    ensure_eq!(shared::count(), 0);
    let (copies, upgrades) = (stat(&STATS.cow_copies), stat(&STATS.upgrades));
    let va = BASE + PAGE_SIZE;
    cpu_fill(&cpu, va, 3);
    ensure_eq!(stat(&STATS.cow_copies), copies);
    ensure_eq!(stat(&STATS.upgrades) - upgrades, 1);
    Ok(Outcome::Passed)
}

/// A notifier that checks, from inside `invalidate_range_start`, that the
/// entry has not changed yet and its frame is not freed yet.
struct Probe<'a> {
    interval: Interval,
    process: &'a Process,
    /// The translation the next callback must still see: (frame, writable).
    expect: SpinLock<Option<(u64, bool)>>,
    calls: AtomicU64,
    violations: AtomicU64,
    last_event: SpinLock<Option<Event>>,
}

impl Notifier for Probe<'_> {
    fn interval(&self) -> &Interval {
        &self.interval
    }

    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: we run inside an invalidation callback of `process`.
        let now = unsafe { self.process.translate_unlocked(inv.range.start()) }.map(|t| (t.frame, t.writable));
        let poisoned = now.is_some_and(|(f, _)| frames::peek(PhysFrame::containing(f)) == POISON);
        if now != *self.expect.lock() || poisoned {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        *self.last_event.lock() = Some(inv.event);
        self.interval.set_seq(inv);
        true
    }
}

/// munmap, mprotect, fork and a COW break each call `invalidate_range_start`
/// while the old entry is still in place and its frame not yet freed.
fn process_invalidation_brackets_every_change(_: &Machine) -> TestResult {
    let p = new_process()?;
    let probe = Probe {
        interval: Interval::new(span(0, 8)),
        process: &p,
        expect: SpinLock::new(None),
        calls: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        last_event: SpinLock::new(None),
    };
    // SAFETY: `probe` stays in place until `registration.remove()` below,
    // before it drops.
    let registration = ok!(unsafe { p.notifiers().insert(&probe) });
    let result = (|| -> TestResult {
        let a = span(0, 1);
        ok!(p.mmap_populate(a, rw(), &mut |va, words| words
            .iter_mut()
            .enumerate()
            .for_each(|(w, x)| *x = pattern(va, 1, w))));
        let frame = p.translate(BASE).map(|t| t.frame).unwrap_or(0);
        let expect = |f: u64, w: bool| *probe.expect.lock() = Some((f, w));
        let event = || *probe.last_event.lock();

        expect(frame, true);
        ok!(p.mprotect(a, RegionFlags::READ));
        ensure_eq!(event(), Some(Event::ProtectionVma));
        ok!(p.mprotect(a, rw()));

        let cpu = p.enter();
        cpu.write(BASE, pattern(BASE, 1, 0)); // upgrade in place: no callback
        expect(frame, true);
        let child = ok!(p.fork());
        ensure_eq!(event(), Some(Event::ProtectionPage));
        expect(frame, false);
        cpu.write(BASE, pattern(BASE, 2, 0)); // COW break
        ensure_eq!(event(), Some(Event::ProtectionPage));
        drop(cpu);

        let copy = p.translate(BASE).map(|t| t.frame).unwrap_or(0);
        ensure!(copy != frame, "no COW copy");
        expect(copy, true);
        ok!(p.munmap(a));
        ensure_eq!(event(), Some(Event::Unmap));
        ensure_eq!(frames::peek(PhysFrame::containing(copy)), POISON); // freed after the callback
        drop(child);
        ensure_eq!(probe.calls.load(Ordering::Relaxed), 4);
        ensure_eq!(probe.violations.load(Ordering::Relaxed), 0);
        Ok(Outcome::Passed)
    })();
    registration.remove();
    result
}

fn process_rejects_bad_regions(_: &Machine) -> TestResult {
    let p = new_process()?;
    ensure_eq!(p.mmap(range(0x4000_0000, PAGE_SIZE), rw(), false), Err(MapError::BadRange)); // kernel slot
    ensure_eq!(p.mmap(span(1, 512), rw(), true), Err(MapError::BadRange)); // unaligned huge
    ok!(p.mmap(span(0, 4), rw(), false));
    ensure_eq!(p.mmap(span(3, 4), rw(), false), Err(MapError::Overlap));
    ensure_eq!(p.munmap(span(0, 2)), Err(MapError::NoRegion));
    ensure_eq!(p.mprotect(span(0, 4), RegionFlags::empty()), Err(MapError::BadRange));
    ok!(p.munmap(span(0, 4)));
    ensure_eq!(p.munmap(span(0, 4)), Err(MapError::NoRegion));
    Ok(Outcome::Passed)
}

fn process_teardown_returns_every_frame(_: &Machine) -> TestResult {
    // The harness checks that every frame comes back; this makes sure there
    // is plenty to give back: several PML4 slots, a 2 MiB leaf, a forked
    // child sharing frames, a page table left behind by munmap.
    let p = new_process()?;
    let far = range(process::USER_END - 4 * PAGE_SIZE, 4 * PAGE_SIZE);
    ok!(p.mmap(span(0, 4), rw(), false));
    ok!(p.mmap(far, rw(), false));
    ok!(p.mmap(range(BASE + HUGE_SIZE, HUGE_SIZE), rw(), true));
    let cpu = p.enter();
    for va in pages(span(0, 4)).chain(pages(far)) {
        cpu.write(va, va);
    }
    cpu.write(BASE + HUGE_SIZE + 8, 1);
    drop(cpu);
    let child = ok!(p.fork());
    ensure_eq!(shared::count(), 8);
    ok!(p.munmap(far));
    ensure_eq!(child.peek(far.start(), 0), Some(far.start()));
    drop(p);
    drop(child);
    ensure_eq!(shared::count(), 0);
    Ok(Outcome::Passed)
}

/// Read faults: the device mirrors pages the CPU wrote, reads them through
/// its mirror, hits its TLB the second time, and gets typed errors for a
/// hole and outside the mirror.
fn device_read_fault(m: &Machine) -> TestResult {
    let dev = match device_cpu(m) {
        Ok(c) => c,
        Err(o) => return Ok(o),
    };
    let p = new_process()?;
    let region = span(0, 8);
    ok!(p.mmap(region, rw(), false));
    let cpu = p.enter();
    for va in pages(region) {
        cpu_fill(&cpu, va, 1);
    }
    mirror!(mr, &p, span(0, 16));
    let read_all = || {
        let mut out = [Ok(None); 8];
        for (slot, va) in out.iter_mut().zip(pages(region)) {
            *slot = device::read_generation(mr, va);
        }
        out
    };
    let first = ok!(smp::call(dev, read_all));
    ensure!(first.iter().all(|r| *r == Ok(Some(1))), "device read {first:?}");
    let s = mr.stats();
    ensure_eq!((s.faults, s.pages_mapped), (8, 8));
    for va in pages(region) {
        let (cpu_side, dev_side) = (p.translate(va).map(|t| t.frame), mr.translate(va).map(|e| e.frame()));
        ensure!(cpu_side.is_some() && cpu_side == dev_side, "{va:#x}: cpu {cpu_side:?}, mirror {dev_side:?}");
        ensure_eq!(device::walk(mr, va).map(|l| (l.frame(va), l.order)), cpu_side.map(|f| (f, 0)));
    }
    let hits = stat(&mr.device().stats.tlb_hits);
    let second = ok!(smp::call(dev, read_all));
    ensure!(second.iter().all(|r| *r == Ok(Some(1))), "device read {second:?}");
    ensure_eq!(mr.stats().faults, 8);
    ensure_eq!(stat(&mr.device().stats.tlb_hits) - hits, 8);
    let hole = ok!(smp::call(dev, || device::fault(mr, span(10, 1), false)));
    ensure_eq!(hole, Err(Error::Fault));
    let outside = ok!(smp::call(dev, || device::fault(mr, span(16, 1), false)));
    ensure_eq!(outside, Err(Error::OutOfRange));
    no_stale(mr)?;
    Ok(Outcome::Passed)
}

/// Write faults: the device writes untouched pages (demand-zero on its
/// behalf, on CPU 1), the CPU reads what it wrote; a write to a read-only
/// region is refused with `Perm`.
fn device_write_fault(m: &Machine) -> TestResult {
    let dev = match device_cpu(m) {
        Ok(c) => c,
        Err(o) => return Ok(o),
    };
    let p = new_process()?;
    let (region, ro) = (span(0, 8), span(8, 8));
    ok!(p.mmap(region, rw(), false));
    ok!(p.mmap(ro, RegionFlags::READ, false));
    mirror!(mr, &p, span(0, 16));
    let zeroed = stat(&STATS.demand_zero);
    let wrote = ok!(smp::call(dev, || pages(region)
        .zip(1..)
        .map(|(va, seq)| device::write_page(mr, va, seq))
        .all(|r| r.is_ok())));
    ensure!(wrote, "device writes failed");
    ensure_eq!(stat(&STATS.demand_zero) - zeroed, 8);
    ensure_eq!(mr.stats().faults, 8);
    ensure!(pages(region).all(|va| mr.translate(va).is_some_and(|e| e.is_write())), "mirror not writable");
    let faults = stat(&STATS.cpu_faults);
    let cpu = p.enter();
    for (va, seq) in pages(region).zip(1..) {
        ensure!(cpu_holds(&cpu, va, |w| dev_pattern(va, seq, w)), "CPU does not see the device's write at {va:#x}");
    }
    ensure_eq!(stat(&STATS.cpu_faults), faults); // present already: no CPU fault
    let denied = ok!(smp::call(dev, || device::write_page(mr, ro.start(), 1)));
    ensure_eq!(denied, Err(Error::Perm));
    let read = ok!(smp::call(dev, || device::fault(mr, ro, false)));
    ensure_eq!(read, Ok(()));
    ensure_eq!(cpu.read(ro.start()), 0u64);
    no_stale(mr)?;
    Ok(Outcome::Passed)
}

/// The device writes in a loop while the CPU makes the region read-only:
/// after `mprotect` returns, no device write lands (the content the CPU sees
/// stays as it was), and the device gets `Perm`.
fn device_protection_downgrade_during_writes(m: &Machine) -> TestResult {
    let dev = match device_cpu(m) {
        Ok(c) => c,
        Err(o) => return Ok(o),
    };
    let p = new_process()?;
    let region = span(0, 4);
    ok!(p.mmap(region, rw(), false));
    mirror!(mr, &p, region);
    let stop = AtomicBool::new(false);
    let (perm, other) = (AtomicU64::new(0), AtomicU64::new(0));
    let writer = || {
        let mut seq = 1;
        while !stop.load(Ordering::Acquire) {
            for va in pages(region) {
                match device::write_page(mr, va, seq) {
                    Ok(()) => {}
                    Err(Error::Perm) => _ = perm.fetch_add(1, Ordering::Relaxed),
                    Err(_) => _ = other.fetch_add(1, Ordering::Relaxed),
                }
            }
            seq += 1;
        }
    };
    let cpu = p.enter();
    let digest = |cpu: &process::Running<'_>| {
        // Per page: the device write it holds, if every word is from one.
        let mut seqs = [None; 4];
        for (s, va) in seqs.iter_mut().zip(pages(region)) {
            let seq = (cpu.read(va) >> 16) & 0xffff;
            *s = cpu_holds(cpu, va, |w| dev_pattern(va, seq, w)).then_some(seq);
        }
        seqs
    };
    let (started, writes_at_protect, before, perm_seen) = ok!(smp::concurrently(dev, &writer, || {
        let started = wait_until(5000, || mr.device().writes() >= 16);
        let protected = p.mprotect(region, RegionFlags::READ);
        let writes = mr.device().writes();
        let before = digest(&cpu);
        let perm0 = perm.load(Ordering::Relaxed);
        let perm_seen = wait_until(5000, || perm.load(Ordering::Relaxed) >= perm0 + 32);
        stop.store(true, Ordering::Release);
        (started && protected.is_ok(), writes, before, perm_seen)
    }));
    ensure!(started, "the device never wrote, or mprotect failed");
    ensure!(perm_seen, "the device was not refused ({} Perm errors)", perm.load(Ordering::Relaxed));
    ensure_eq!(mr.device().writes(), writes_at_protect);
    ensure!(before.iter().all(Option::is_some), "a page holds a torn device write: {before:?}");
    ensure_eq!(digest(&cpu), before);
    ensure_eq!(other.load(Ordering::Relaxed), 0);
    ok!(p.mprotect(region, rw()));
    ensure_eq!(ok!(smp::call(dev, || device::write_page(mr, BASE, 999))), Ok(()));
    ensure!(cpu_holds(&cpu, BASE, |w| dev_pattern(BASE, 999, w)));
    Ok(Outcome::Passed)
}

/// Rounds of the CPU unmapping the region (frames freed and poisoned) and
/// mapping it again with a new generation of data while the device reads it
/// in a loop (see `race.rs`). Every successful device read must return the
/// current data, and flushes must have raced TLB fills.
fn device_unmap_races_reads(m: &Machine) -> TestResult {
    const ROUNDS: usize = 256;
    if let Err(o) = device_cpu(m) {
        return Ok(o);
    }
    let p = new_process()?;
    let region = span(0, 4);
    ok!(p.mmap_populate(region, rw(), &mut |va, words| words
        .iter_mut()
        .enumerate()
        .for_each(|(w, x)| *x = pattern(va, 0, w))));
    mirror!(mr, &p, region);
    let r = race::run(mr, &p, region, 1, ROUNDS);
    let d = &mr.device().stats;
    crate::println!(
        "    {ROUNDS} rounds: {} good reads, {} holes (Fault), {} Busy, {} mirror invalidations, {} fill races",
        r.good,
        r.holes,
        r.busy,
        mr.stats().invalidations,
        stat(&d.fill_races)
    );
    ensure!(r.failed.is_none(), "CPU side failed: {:?}", r.failed);
    no_stale(mr)?;
    ensure_eq!(r.other, None);
    ensure!(r.good >= ROUNDS as u64, "too few good reads to call it a race");
    ensure!(mr.stats().invalidations >= ROUNDS as u64 / 2, "the device was rarely invalidated");
    ensure!(stat(&d.fill_races) > 0, "no flush ever raced a TLB fill");
    Ok(Outcome::Passed)
}

/// After fork both sides share frames read-only. A CPU write breaks COW and
/// the device, invalidated, then reads the new frame; a device write breaks
/// COW on CPU 1 and shoots down the boot CPU's TLB entry, so the CPU reads
/// the device's data. The child keeps the old data throughout.
fn device_cow_break_after_fork(m: &Machine) -> TestResult {
    let dev = match device_cpu(m) {
        Ok(c) => c,
        Err(o) => return Ok(o),
    };
    let p = new_process()?;
    let region = span(0, 4);
    ok!(p.mmap(region, rw(), false));
    let cpu = p.enter();
    for va in pages(region) {
        cpu_fill(&cpu, va, 1);
    }
    mirror!(mr, &p, region);
    let read_all = || {
        let mut out = [Ok(None); 4];
        for (slot, va) in out.iter_mut().zip(pages(region)) {
            *slot = device::read_generation(mr, va);
        }
        out
    };
    ensure_eq!(ok!(smp::call(dev, read_all)), [Ok(Some(1)); 4]);
    let child = ok!(p.fork());
    ensure!(pages(region).all(|va| mr.translate(va).is_none()), "fork did not invalidate the mirror");
    ensure_eq!(ok!(smp::call(dev, read_all)), [Ok(Some(1)); 4]);
    for va in pages(region) {
        let (shared_frame, mirrored) = (child.translate(va).map(|t| t.frame), mr.translate(va));
        ensure!(mirrored.is_some_and(|e| !e.is_write() && Some(e.frame()) == shared_frame), "{va:#x}: {mirrored:?}");
    }

    // The CPU writes page 0: #PF, COW copy, the mirror is invalidated.
    let (va0, va1) = (BASE, BASE + PAGE_SIZE);
    let invalidations = mr.stats().invalidations;
    cpu_fill(&cpu, va0, 2);
    ensure_eq!(mr.stats().invalidations - invalidations, 1);
    ensure!(p.translate(va0).map(|t| t.frame) != child.translate(va0).map(|t| t.frame), "no copy");
    ensure_eq!(ok!(smp::call(dev, || device::read_generation(mr, va0))), Ok(Some(2)));
    ensure_eq!(mr.translate(va0).map(|e| e.frame()), p.translate(va0).map(|t| t.frame));

    // The device writes page 1 while the CPU's TLB caches the shared frame.
    ensure_eq!(cpu.read(va1), pattern(va1, 1, 0));
    let shootdowns = stat(&tlb::SHOOTDOWNS);
    ensure_eq!(ok!(smp::call(dev, || device::write_page(mr, va1, 7))), Ok(()));
    ensure!(stat(&tlb::SHOOTDOWNS) > shootdowns, "no TLB shootdown of the boot CPU");
    ensure!(cpu_holds(&cpu, va1, |w| dev_pattern(va1, 7, w)), "CPU reads a stale translation");
    for (va, generation) in [(va0, 1), (va1, 1)] {
        ensure!((0..device::WORDS).all(|w| child.peek(va, w) == Some(pattern(va, generation, w))), "child changed");
    }
    no_stale(mr)?;
    drop(child);
    ensure_eq!(shared::count(), 0);
    Ok(Outcome::Passed)
}

/// A 2 MiB leaf: one device fault mirrors all 512 pages, the snapshot
/// reports order 9, and munmap invalidates all 512 at once. A second huge
/// region is faulted in by the device itself.
fn device_2mib_leaf(m: &Machine) -> TestResult {
    let dev = match device_cpu(m) {
        Ok(c) => c,
        Err(o) => return Ok(o),
    };
    let p = new_process()?;
    let (region, second) = (range(BASE, HUGE_SIZE), range(BASE + HUGE_SIZE, HUGE_SIZE));
    ok!(p.mmap(region, rw(), true));
    ok!(p.mmap(second, rw(), true));
    let leaves = stat(&STATS.huge_leaves);
    let cpu = p.enter();
    for va in pages(region) {
        cpu_fill(&cpu, va, 1);
    }
    ensure_eq!(stat(&STATS.huge_leaves) - leaves, 1);
    let chunk = p.translate(BASE).map(|t| t.frame).unwrap_or(1);
    ensure!(chunk.is_multiple_of(HUGE_SIZE), "leaf frame {chunk:#x} not 2 MiB aligned");
    mirror!(mr, &p, range(BASE, 2 * HUGE_SIZE));

    let handler_calls = stat(&STATS.handler_calls);
    ensure_eq!(ok!(smp::call(dev, || device::fault(mr, region, false))), Ok(()));
    let s = mr.stats();
    ensure_eq!((s.faults, s.pages_mapped, s.entries_mapped, s.huge_mapped), (1, 512, 1, 1));
    ensure_eq!((mr.table_stats().leaves, mr.table_stats().huge_leaves), (1, 1));
    ensure_eq!(stat(&STATS.handler_calls), handler_calls); // present already
    let mut snap = [Pfn::NONE; 512];
    ok!(mr.snapshot(region, &mut snap));
    for (i, (pfn, va)) in snap.iter().zip(pages(region)).enumerate() {
        let expect = chunk + i as u64 * PAGE_SIZE;
        ensure!(pfn.is_valid() && pfn.order() == 9 && pfn.phys() == expect, "page {i}: {pfn:?}");
        ensure_eq!(mr.translate(va).map(|e| (e.frame(), e.order())), Some((expect, 9)));
        let leaf = device::walk(mr, va);
        ensure_eq!(leaf.map(|l| (l.frame(va), l.order, l.va)), Some((expect, 9, BASE)));
    }
    let reads = ok!(smp::call(dev, || [0, 255, 511].map(|i| device::read_generation(mr, BASE + i * PAGE_SIZE))));
    ensure_eq!(reads, [Ok(Some(1)); 3]);
    ensure_eq!(mr.stats().faults, 1);

    // The device faults the second region in itself (on CPU 1), writing.
    ensure_eq!(ok!(smp::call(dev, || device::fault(mr, second, true))), Ok(()));
    ensure_eq!(stat(&STATS.huge_leaves) - leaves, 2);
    let mut snap = [Pfn::NONE; 512];
    ok!(mr.snapshot(second, &mut snap));
    ensure!(snap.iter().all(|p| p.is_valid() && p.is_write() && p.order() == 9), "second region: {:?}", snap[0]);

    let invalidated = mr.stats().pages_invalidated;
    ok!(p.munmap(region));
    ensure_eq!(mr.stats().pages_invalidated - invalidated, 512);
    ensure!(pages(region).all(|va| mr.translate(va).is_none()), "mirror still maps the unmapped leaf");
    ensure!(device::walk(mr, BASE).is_none(), "the device walk still finds the unmapped leaf");
    ensure_eq!(mr.table_stats().huge_leaves, 1); // the second region's
    ensure_eq!(ok!(smp::call(dev, || device::read_generation(mr, BASE))), Err(Error::Fault));
    no_stale(mr)?;
    Ok(Outcome::Passed)
}
