//! `mode=test`: named self-tests, reported as `test NAME ... ok|FAILED`, then
//! `N passed, M failed`. Every test must also give back every frame it took
//! (the harness compares the allocator's free count before and after).
//!
//! A failing check returns an error with file/line and a message; a panic or
//! CPU exception ends the run with the failure exit code, which the host
//! runner reports too.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::Machine;
use crate::device::{self, ScanReport};
use crate::memory::frames::{self, FreeError, POISON};
use crate::memory::{FRAMES, PAGE_SIZE, PhysFrame, phys};
use crate::process::{self, AddressSpace, ChangeKind, InvalidateHook, MapError, USER_END, VaRange};
use crate::sync::SpinLock;
use crate::{cpu, idt, smp};

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

const USER_BASE: u64 = 0x0000_0000_4000_0000;

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
    process_map_translate,
    process_protect_and_unmap,
    process_rejects_bad_requests,
    process_hook_runs_before_change_and_before_free,
    process_drop_returns_every_frame,
    smp_all_cpus_online,
    smp_device_walks_process_table,
    smp_device_sees_unmap_and_protect,
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
    device::fill_page(frame, 7);
    FRAMES.free(frame);
    let words = frame.as_ptr::<u64>();
    for w in 0..device::WORDS_PER_PAGE {
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

fn new_space() -> Result<AddressSpace, Failure> {
    AddressSpace::new(&FRAMES).map_err(|e| Failure::new(file!(), line!(), format_args!("{e:?}")))
}

fn alloc() -> Result<PhysFrame, Failure> {
    FRAMES.alloc().ok_or_else(|| Failure::new(file!(), line!(), format_args!("out of frames")))
}

fn process_map_translate(_: &Machine) -> TestResult {
    let space = new_space()?;
    let (a, b) = (alloc()?, alloc()?);
    let va_a = USER_BASE;
    let va_b = USER_END - PAGE_SIZE; // last user page: exercises index 255 at every level
    ensure_eq!(space.map(va_a, a, true), Ok(()));
    ensure_eq!(space.map(va_b, b, false), Ok(()));
    let t = space.translate(va_a + 0x123);
    ensure!(t.is_some(), "va_a not mapped");
    let t = t.unwrap_or_else(|| unreachable!());
    ensure_eq!(t.frame, a);
    ensure_eq!(t.paddr, a.start() + 0x123);
    ensure!(t.writable && t.user && !t.executable, "flags wrong: {t:?}");
    let t = space.translate(va_b).map(|t| (t.frame, t.writable));
    ensure_eq!(t, Some((b, false)));
    ensure_eq!(space.translate(va_a + PAGE_SIZE), None);
    ensure_eq!(space.translate(0), None);
    ensure_eq!(space.generation(), 2);
    Ok(Outcome::Passed) // `space` drop frees a, b and the tables
}

fn process_protect_and_unmap(_: &Machine) -> TestResult {
    let space = new_space()?;
    let frame = alloc()?;
    ensure_eq!(space.map(USER_BASE, frame, true), Ok(()));
    ensure_eq!(space.protect(USER_BASE, false), Ok(()));
    ensure_eq!(space.translate(USER_BASE).map(|t| t.writable), Some(false));
    ensure_eq!(space.protect(USER_BASE, true), Ok(()));
    ensure_eq!(space.translate(USER_BASE).map(|t| t.writable), Some(true));
    ensure_eq!(space.unmap(USER_BASE), Some(frame));
    ensure_eq!(space.translate(USER_BASE), None);
    ensure_eq!(space.unmap(USER_BASE), None);
    ensure!(!space.unmap_and_free(USER_BASE));
    FRAMES.free(frame);
    Ok(Outcome::Passed)
}

fn process_rejects_bad_requests(_: &Machine) -> TestResult {
    let space = new_space()?;
    let frame = alloc()?;
    ensure_eq!(space.map(USER_BASE + 8, frame, true), Err(MapError::Unaligned(USER_BASE + 8)));
    ensure_eq!(space.map(USER_END, frame, true), Err(MapError::NotUser(USER_END)));
    let kernel = phys::PHYS_OFFSET;
    ensure_eq!(space.map(kernel, frame, true), Err(MapError::NotUser(kernel)));
    ensure_eq!(space.protect(USER_BASE, false), Err(MapError::NotMapped(USER_BASE)));
    ensure_eq!(space.map(USER_BASE, frame, true), Ok(()));
    ensure_eq!(space.map(USER_BASE, frame, true), Err(MapError::AlreadyMapped(USER_BASE)));
    ensure_eq!(space.generation(), 1);
    Ok(Outcome::Passed)
}

/// Hook that checks, from inside the callback, that the entry has not changed
/// yet (start) / has changed (end), and that the frame is not yet freed.
struct OrderHook {
    root: AtomicU64,
    frame: AtomicU64,
    starts: AtomicU64,
    ends: AtomicU64,
    violations: AtomicU64,
}

impl OrderHook {
    fn look(&self, va: u64) -> Option<process::Translation> {
        let root = PhysFrame::from_start(self.root.load(Ordering::Relaxed))?;
        // SAFETY: the test keeps the address space alive while it mutates it,
        // and the hook only runs inside those mutations.
        unsafe { process::walk(root, va) }
    }

    fn expect(&self, ok: bool) {
        if !ok {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl InvalidateHook for OrderHook {
    fn invalidate_start(&self, range: VaRange, kind: ChangeKind) {
        self.starts.fetch_add(1, Ordering::Relaxed);
        let now = self.look(range.start);
        match kind {
            ChangeKind::Map => self.expect(now.is_none()),
            ChangeKind::Protect { writable } => self.expect(now.is_some_and(|t| t.writable != writable)),
            ChangeKind::Unmap | ChangeKind::Release => {
                self.expect(now.is_some_and(|t| frames::peek(t.frame) != POISON));
                self.frame.store(now.map_or(0, |t| t.frame.start()), Ordering::Relaxed);
            }
        }
    }

    fn invalidate_end(&self, range: VaRange, kind: ChangeKind) {
        self.ends.fetch_add(1, Ordering::Relaxed);
        let now = self.look(range.start);
        match kind {
            ChangeKind::Map => self.expect(now.is_some()),
            ChangeKind::Protect { writable } => self.expect(now.is_some_and(|t| t.writable == writable)),
            ChangeKind::Unmap | ChangeKind::Release => {
                self.expect(now.is_none());
                // Still not freed: freeing happens after the hook returns.
                let frame = PhysFrame::containing(self.frame.load(Ordering::Relaxed));
                self.expect(frames::peek(frame) != POISON);
            }
        }
    }
}

static ORDER_HOOK: OrderHook = OrderHook {
    root: AtomicU64::new(0),
    frame: AtomicU64::new(0),
    starts: AtomicU64::new(0),
    ends: AtomicU64::new(0),
    violations: AtomicU64::new(0),
};

fn process_hook_runs_before_change_and_before_free(_: &Machine) -> TestResult {
    let space = new_space()?;
    ORDER_HOOK.root.store(space.root().start(), Ordering::Relaxed);
    space.set_hook(&ORDER_HOOK);
    let (a, b) = (alloc()?, alloc()?);
    device::fill_page(a, 1);
    device::fill_page(b, 2);
    ensure_eq!(space.map(USER_BASE, a, true), Ok(()));
    ensure_eq!(space.map(USER_BASE + PAGE_SIZE, b, true), Ok(()));
    ensure_eq!(space.protect(USER_BASE, false), Ok(()));
    ensure!(space.unmap_and_free(USER_BASE));
    ensure_eq!(frames::peek(a), POISON); // freed only after the hook
    drop(space); // Release for page b
    ensure_eq!(ORDER_HOOK.starts.load(Ordering::Relaxed), 5);
    ensure_eq!(ORDER_HOOK.ends.load(Ordering::Relaxed), 5);
    ensure_eq!(ORDER_HOOK.violations.load(Ordering::Relaxed), 0);
    Ok(Outcome::Passed)
}

fn process_drop_returns_every_frame(_: &Machine) -> TestResult {
    let before = FRAMES.stats().free;
    let space = new_space()?;
    // Spread pages so several PDPT/PD/PT tables get created.
    let vas = [0x1000, 0x20_0000, 0x4000_0000, 0x80_0000_0000, USER_END - PAGE_SIZE];
    for va in vas {
        ensure_eq!(space.map(va, alloc()?, true), Ok(()));
    }
    let in_use = before - FRAMES.stats().free;
    // 5 data frames + PML4 + 3 PDPTs (PML4 slots 0, 1, 255) + 4 PDs + 5 PTs
    // (0x1000 and 0x20_0000 share a PD but not a PT).
    ensure_eq!(in_use, 5 + 1 + 3 + 4 + 5);
    drop(space);
    ensure_eq!(FRAMES.stats().free, before);
    Ok(Outcome::Passed)
}

fn smp_all_cpus_online(m: &Machine) -> TestResult {
    ensure_eq!(m.online, m.cpus);
    if m.cpus < 2 {
        return Ok(Outcome::Ignored("needs cpus>=2"));
    }
    for cpu_index in 1..m.cpus {
        let answer = smp::run_on(cpu_index, device::whoami_job, [0; 4]);
        ensure!(answer.is_ok(), "cpu {cpu_index}: {answer:?}");
        let [apic_id, rsp, _, _] = answer.unwrap_or_default();
        ensure_eq!(apic_id, cpu_index as u64);
        // The AP runs on its own stack, not the BSP's.
        let here = 0u8;
        let bsp_rsp = &raw const here as u64;
        ensure!(rsp.abs_diff(bsp_rsp) > 4096, "AP rsp {rsp:#x} is near the BSP's {bsp_rsp:#x}");
    }
    Ok(Outcome::Passed)
}

const NPAGES: u64 = 16;

/// Maps NPAGES patterned pages at USER_BASE.
fn patterned_space() -> Result<AddressSpace, Failure> {
    let space = new_space()?;
    for page in 0..NPAGES {
        let frame = alloc()?;
        device::fill_page(frame, page);
        ensure_eq!(space.map(USER_BASE + page * PAGE_SIZE, frame, true), Ok(()));
    }
    Ok(space)
}

fn scan(cpu_index: usize, space: &AddressSpace) -> Result<ScanReport, Failure> {
    smp::run_on(cpu_index, device::scan_job, [space.root().start(), USER_BASE, NPAGES, 0])
        .map(ScanReport::from_words)
        .map_err(|e| Failure::new(file!(), line!(), format_args!("scan on cpu {cpu_index}: {e:?}")))
}

fn smp_device_walks_process_table(m: &Machine) -> TestResult {
    if m.cpus < 2 {
        return Ok(Outcome::Ignored("needs cpus>=2"));
    }
    let space = patterned_space()?;
    let all = (1 << NPAGES) - 1;
    for cpu_index in 1..m.cpus {
        let r = scan(cpu_index, &space)?;
        ensure_eq!(r.apic_id, cpu_index as u64);
        ensure_eq!(r.present, all);
        ensure_eq!(r.writable, all);
        ensure_eq!(r.checksum, device::expected_checksum(NPAGES, all));
    }
    Ok(Outcome::Passed)
}

fn smp_device_sees_unmap_and_protect(m: &Machine) -> TestResult {
    if m.cpus < 2 {
        return Ok(Outcome::Ignored("needs cpus>=2"));
    }
    let space = patterned_space()?;
    ensure!(space.unmap_and_free(USER_BASE + 5 * PAGE_SIZE));
    ensure!(space.unmap_and_free(USER_BASE + 9 * PAGE_SIZE));
    ensure_eq!(space.protect(USER_BASE, false), Ok(()));
    let present = ((1 << NPAGES) - 1) & !(1 << 5) & !(1 << 9);
    let r = scan(1, &space)?;
    ensure_eq!(r.present, present);
    ensure_eq!(r.writable, present & !1);
    ensure_eq!(r.checksum, device::expected_checksum(NPAGES, present));
    Ok(Outcome::Passed)
}
