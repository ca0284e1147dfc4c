//! Fault injection at every point of one realistic scenario:
//!
//! 1. create and register a mirror;
//! 2. device write fault over 96 pages crossing a 2 MiB boundary of a THP
//!    region (two 2 MiB leaves, two batches);
//! 3. device read fault at the start of a third 2 MiB block;
//! 4. fork;
//! 5. CPU write in the parent (splits the shared THP, copy-on-write);
//! 6. device write re-fault of the range (copy-on-write of every page still
//!    shared with the child, splitting the second leaf);
//! 7. snapshot of the range, compared with the oracle;
//! 8. partial unmap inside the third block (splits its leaf);
//! 9. CPU write in the child;
//! 10. device read of the range, compared with the CPU.
//!
//! The scenario is run once per injection point, for three kinds of
//! injection: the frame allocator failing its k-th allocation, the device's
//! `update` failing its k-th call, and the kernel's fault handler failing its
//! k-th call (with `Fault` and with `NoMemory`). Every run must fail with the
//! injected error (never a panic, never another error), keep the mirror
//! coherent with the CPU and the CPU tables consistent after every step,
//! recover (the failed step succeeds when retried), and free every frame once
//! everything is dropped.

mod common;

use common::hooked::{Hooked, Hooks};
use common::*;
use hmm_core::pt::Pfn;
use hmm_core::{Error, Mirror, MirrorConfig, Result, VaRange};
use hmm_testkit::dmirror;
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, TableView};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const HUGE: u64 = 2 * MIB;
/// THP region: three 2 MiB blocks.
const REGION: u64 = 4 * MIB;
const REGION_LEN: u64 = 3 * HUGE;
/// 96 pages across the boundary at 6 MiB.
const SPAN_START: u64 = 6 * MIB - 48 * PAGE;
const SPAN_PAGES: u64 = 96;
/// The third block.
const BLOCK3: u64 = 8 * MIB;
const STEPS: usize = 10;

fn span() -> VaRange {
    range(SPAN_START, SPAN_PAGES * PAGE)
}

/// The model kernel's fault handler failing at the `fail_at`-th call.
struct Faulty {
    calls: AtomicU64,
    /// 0: never.
    fail_at: AtomicU64,
    error: Error,
}

fn faulty(inner: &ModelSpace, fail_at: u64, error: Error) -> Hooked<'_, Faulty> {
    Hooked::new(inner, Faulty { calls: AtomicU64::new(0), fail_at: AtomicU64::new(fail_at), error })
}

impl Hooks for Faulty {
    fn handle_fault(&self, _r: VaRange, _write: bool) -> Result<()> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.fail_at.load(Ordering::Relaxed) {
            return Err(self.error);
        }
        Ok(())
    }
}

type FMirror<'s> = Mirror<'s, Hooked<'s, Faulty>, Dev, CountingAllocator>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inject {
    None,
    Alloc(u64),
    Update(u64),
    Handler(u64, Error),
}

struct Run<'s> {
    space: &'s ModelSpace,
    fs: &'s Hooked<'s, Faulty>,
    alloc: &'s Arc<CountingAllocator>,
    inject: Inject,
    m: Option<Pin<Box<FMirror<'s>>>>,
    child: Option<ModelSpace>,
    view: TableView,
}

impl<'s> Run<'s> {
    fn mirror(&self) -> &FMirror<'s> {
        self.m.as_deref().expect("mirror created in step 0")
    }

    fn step(&mut self, i: usize) -> Result<()> {
        match i {
            0 => {
                let m =
                    Box::pin(Mirror::new(self.fs, &**self.alloc, device(self.space), user(), MirrorConfig::default())?);
                m.as_ref().register()?;
                if let Inject::Update(k) = self.inject {
                    m.device().fail_update_at(k);
                }
                self.m = Some(m);
                Ok(())
            }
            1 => self.mirror().fault(span(), true),
            2 => self.mirror().fault(range(BLOCK3, 16 * PAGE), false),
            3 => {
                self.child = Some(self.space.fork()?);
                Ok(())
            }
            4 => self.space.write_bytes(SPAN_START, &pattern(PAGE as usize, 4)),
            5 => self.mirror().fault(span(), true),
            6 => {
                let mut out = vec![Pfn::NONE; SPAN_PAGES as usize];
                self.mirror().snapshot(span(), &mut out)?;
                assert_eq!(out, self.space.oracle().expected_pfns(span()), "snapshot differs from the oracle");
                Ok(())
            }
            7 => self.space.unmap(range(BLOCK3 + 4 * PAGE, 8 * PAGE)),
            8 => self.child.as_ref().expect("child").write_bytes(BLOCK3, &pattern(3 * PAGE as usize, 8)),
            9 => {
                let len = (SPAN_PAGES * PAGE) as usize;
                let dev = dmirror::read(self.mirror(), SPAN_START, len)?;
                let mut cpu = vec![0u8; len];
                self.space.read_bytes(SPAN_START, &mut cpu)?;
                assert_eq!(dev, cpu, "device and CPU read different data");
                let mut head = vec![0u8; PAGE as usize];
                self.space.read_bytes(SPAN_START, &mut head)?;
                assert_eq!(head, pattern(PAGE as usize, 4), "the parent's CPU write survived");
                Ok(())
            }
            _ => unreachable!(),
        }
    }

    /// Mirror coherent with the CPU over the whole region; tables agree
    /// with the oracle; the device never used a stale translation.
    fn check(&self) {
        if let Some(m) = &self.m {
            let r = range(REGION, REGION_LEN);
            let cpu = self.view.snapshot(r);
            let mut blocks = std::collections::BTreeSet::new();
            let mut any = false;
            for (i, p) in cpu.iter().enumerate() {
                let va = r.start() + i as u64 * PAGE;
                if let Some(e) = m.translate(va) {
                    any = true;
                    if e.order() == 0 {
                        blocks.insert(va / HUGE);
                    }
                    assert!(
                        p.is_valid() && p.phys() == e.frame() && (p.is_write() || !e.is_write()),
                        "{:?}: mirror {va:#x} -> {:#x} (w={}) but the CPU has {p:x?}",
                        self.inject,
                        e.frame(),
                        e.is_write()
                    );
                }
            }
            assert_eq!(m.device().counters().stale, 0, "{:?}: stale device access", self.inject);
            // Exactly the directories the entries need: the root, one per
            // level above the leaves (all entries share them here), one
            // leaf table per 2 MiB block with 4 KiB entries (a 2 MiB one
            // needs none). No empty one is left.
            let want = if any { 3 + blocks.len() } else { 1 };
            assert_eq!(m.table_frames(), want, "{:?}: mirror directories", self.inject);
        }
        self.space.check_tables();
        if let Some(c) = &self.child {
            c.check_tables();
        }
    }
}

/// What one run saw.
#[derive(Debug, Default)]
struct Outcome {
    /// The injected failure happened.
    fired: bool,
    /// Errors returned (each the injected one).
    errors: usize,
}

fn run(inject: Inject) -> Outcome {
    let alloc = CountingAllocator::with_size(64 * MIB);
    let space = ModelSpace::new(&alloc).expect("space");
    space.map(REGION, REGION_LEN, RW, RegionKind::Thp).expect("map");
    let (handler_at, handler_err) = match inject {
        Inject::Handler(k, e) => (k, e),
        _ => (0, Error::Fault),
    };
    let fs = faulty(&space, handler_at, handler_err);
    let mut out = Outcome::default();
    {
        let mut run =
            Run { space: &space, fs: &fs, alloc: &alloc, inject, m: None, child: None, view: space.table_view() };
        let injected_before = alloc.injected_failures();
        if let Inject::Alloc(k) = inject {
            alloc.fail_at(k);
        }
        for i in 0..STEPS {
            let mut tries = 0;
            loop {
                let r = run.step(i);
                run.check();
                match r {
                    Ok(()) => break,
                    Err(e) => {
                        let want = match inject {
                            Inject::None => panic!("step {i} failed without injection: {e:?}"),
                            Inject::Alloc(_) => Error::NoMemory,
                            Inject::Update(_) => Error::Device(-5),
                            Inject::Handler(_, e) => e,
                        };
                        assert_eq!(e, want, "{inject:?}: step {i} returned the wrong error");
                        out.errors += 1;
                        tries += 1;
                        assert!(tries < 2, "{inject:?}: step {i} fails again once the injection is spent");
                    }
                }
            }
        }
        out.fired = match inject {
            Inject::None => false,
            Inject::Alloc(_) => alloc.injected_failures() > injected_before,
            Inject::Update(k) => run.mirror().device().counters().updates >= k,
            Inject::Handler(k, _) => fs.hooks.calls.load(Ordering::Relaxed) >= k,
        };
        alloc.clear_failures();
        if let Some(m) = &run.m {
            let s = m.stats();
            assert!(s.pages_invalidated <= s.pages_mapped, "{inject:?}: {s:?}");
        }
    }
    drop(space);
    assert_eq!(alloc.live(), 0, "{inject:?}: leaked allocations");
    out
}

/// Runs `make(k)` for k = 1, 2, ... until the injection no longer fires;
/// returns (points where it fired, runs where it surfaced as an error).
fn sweep(name: &str, make: impl Fn(u64) -> Inject) -> (u64, u64) {
    let (mut points, mut surfaced) = (0, 0);
    for k in 1.. {
        let o = run(make(k));
        if !o.fired {
            assert_eq!(o.errors, 0);
            break;
        }
        points += 1;
        surfaced += (o.errors > 0) as u64;
    }
    println!("{name}: {points} injection points, {surfaced} surfaced as an error");
    (points, surfaced)
}

#[test]
fn scenario_without_injection_succeeds() {
    let o = run(Inject::None);
    assert_eq!(o.errors, 0);
}

#[test]
fn frame_allocator_failing_at_every_allocation() {
    let (points, surfaced) = sweep("allocator", Inject::Alloc);
    // A failed 2 MiB chunk for a THP fault falls back to 4 KiB pages: that
    // injection is absorbed, every other one is an error.
    assert!(points >= 100, "every table, data frame and mirror directory is a point ({points})");
    assert!(points - surfaced <= 8, "only THP chunk allocations may be absorbed ({} were)", points - surfaced);
}

#[test]
fn device_update_failing_at_every_call() {
    let (points, surfaced) = sweep("device update", Inject::Update);
    // One update per attempt that mapped something (no more 64-page
    // batches): the scenario's device faults make four.
    assert!(points >= 4, "{points}");
    assert_eq!(points, surfaced, "every failed update surfaces as Device(-5)");
}

#[test]
fn kernel_fault_handler_failing_at_every_call() {
    for e in [Error::Fault, Error::NoMemory] {
        let (points, surfaced) = sweep(&format!("fault handler ({e:?})"), |k| Inject::Handler(k, e));
        assert!(points >= 3, "{points}");
        assert_eq!(points, surfaced, "every failed handler call surfaces as {e:?}");
    }
}
