//! Concurrent model-based test: generated kernel operations (map, unmap,
//! clear, protect, unmap+remap, fork with a copy-on-write write, CPU writes
//! and reads) race generated device operations (mirror faults, dmirror reads
//! and writes, snapshots) over a 16-page window, so they collide often.
//!
//! `tests/model_based.rs` runs every operation to completion before the next
//! one starts, so it cannot tell whether a fault notices an invalidation that
//! lands *inside* it. Here the kernel operations run in the middle of device
//! operations, chosen by a deterministic scheduler:
//!
//! - the mirror runs over the model kernel wrapped in `common::hooked`, with
//!   [`Sched`] as its hooks: every call is delegated, and [`Sched`] calls a
//!   scheduling point at three places: before each device operation
//!   (`Between`), when the fault loop takes the read lock for its walk,
//!   after `read_begin` (`Before`), and when the walk dropped the read lock,
//!   before the fault takes its update lock and checks the sequence
//!   (`After`: the window the retry protocol exists for);
//! - at each scheduling point the next generated step says how many queued
//!   kernel operations run right there (0 to 3). Same input, same
//!   interleaving, and proptest shrinks it like any other input.
//!
//! Checked after every kernel operation run at a scheduling point and after
//! every device operation: the device never used a stale translation; every
//! mirror entry of the window maps what the CPU maps, with no more
//! permission, and the mirror holds exactly the directories its entries need;
//! the registry is idle (even sequence, one notifier). After every device
//! operation also: the model's tables agree with its oracle. Per operation: a
//! successful fault leaves its range mirrored with the CPU's frames; a
//! successful device read (write) agrees with what the CPU reads (wrote) on
//! every page whose content no kernel operation touched meanwhile; a snapshot
//! equals the oracle's view unless the kernel changed something after its
//! walk. At the end everything is dropped and no frame may be left allocated.
//!
//! A second test runs the kernel operations on a real second thread against
//! the device operations (few cases, bounded against hangs), checking the
//! device's stale-access counter throughout and full coherence once both
//! sides are done.
//!
//! Cases: `PROPTEST_CASES` (default 96 deterministic cases; the threaded test
//! runs an eighth of that, at least 16).

mod common;

use common::hooked::{Hooked, Hooks};
use common::*;
use core::pin::pin;
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::pt::Pfn;
use hmm_core::{AddressSpace, Error, Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::dmirror;
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, SimFile, TableView};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use std::collections::{BTreeSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Start of the window: a 1 GiB boundary (so also a 2 MiB block start).
const BASE: u64 = 1 << 30;
const HUGE: u64 = 2 * MIB;
/// Pages in the window every operation works on.
const WINDOW: u64 = 16;
/// Simulated RAM per case.
const RAM: u64 = 64 * MIB;
const DEFAULT_CASES: u32 = 96;
/// Longest the threaded test waits for one case before calling it a hang.
const HANG: Duration = Duration::from_secs(120);
/// Fork children kept alive at once (older ones are dropped).
const MAX_CHILDREN: usize = 2;

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// Whole pages of the window: `count` pages from page `first`, clipped.
#[derive(Clone, Copy, Debug)]
struct Pages {
    first: u8,
    count: u8,
}

impl Pages {
    fn range(self) -> VaRange {
        let first = self.first as u64 % WINDOW;
        let count = (self.count as u64).clamp(1, WINDOW - first);
        range(BASE + first * PAGE, count * PAGE)
    }
}

/// A byte span of the window: `len` bytes at `off` into page `page`, clipped
/// to the window.
#[derive(Clone, Copy, Debug)]
struct Bytes {
    page: u8,
    off: u16,
    len: u16,
}

impl Bytes {
    fn va(self) -> u64 {
        BASE + (self.page as u64 % WINDOW) * PAGE + (self.off as u64 % PAGE)
    }

    fn len(self) -> usize {
        (self.len.max(1) as u64).min(BASE + WINDOW * PAGE - self.va()) as usize
    }

    fn pages(self) -> VaRange {
        let first = self.va() & !(PAGE - 1);
        range(first, (self.va() + self.len() as u64).next_multiple_of(PAGE) - first)
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Anon,
    /// Transparent huge pages: maps the whole 2 MiB block of the window.
    Thp,
    /// hugetlbfs 2 MiB: maps the whole block.
    HugeTlb,
    SharedAnon,
    SharedFile,
}

/// What the kernel (the CPU side) does.
#[derive(Clone, Debug)]
enum KOp {
    /// A fixed map: whatever was there is unmapped first.
    Map {
        at: Pages,
        kind: Kind,
        perm: Perm,
    },
    Unmap {
        at: Pages,
    },
    /// Zap (MADV_DONTNEED): entries go, the region stays.
    Clear {
        at: Pages,
    },
    Protect {
        at: Pages,
        perm: Perm,
    },
    /// Unmap, map fresh anonymous memory, write it: the old frames are freed
    /// and the addresses come back with new ones.
    Remap {
        at: Pages,
        seed: u8,
    },
    /// Fork, then a CPU write in the parent (a COW break under the mirror)
    /// or in the child; the child is kept alive or dropped at once.
    Cow {
        at: Bytes,
        in_child: bool,
        keep: bool,
        seed: u8,
    },
    Write {
        at: Bytes,
        seed: u8,
    },
    Read {
        at: Bytes,
    },
}

/// What the device does.
#[derive(Clone, Debug)]
enum DOp {
    Fault { at: Pages, write: bool },
    Read { at: Bytes },
    Write { at: Bytes, seed: u8 },
    Snapshot { at: Pages },
}

impl DOp {
    fn pages(&self) -> VaRange {
        match *self {
            DOp::Fault { at, .. } | DOp::Snapshot { at } => at.range(),
            DOp::Read { at } | DOp::Write { at, .. } => at.pages(),
        }
    }
}

/// The window as it is before the race starts.
#[derive(Clone, Copy, Debug)]
struct Layout {
    kind: Kind,
    perm: Perm,
    prefill: Option<u8>,
}

#[derive(Clone, Debug)]
struct Case {
    layout: Layout,
    kernel: Vec<KOp>,
    device: Vec<DOp>,
    /// Kernel operations to run at each successive scheduling point.
    steps: Vec<u8>,
}

fn pages() -> impl Strategy<Value = Pages> {
    let count = prop_oneof![3 => 1..=2u8, 3 => 1..=8u8, 1 => Just(WINDOW as u8)];
    (0..WINDOW as u8, count).prop_map(|(first, count)| Pages { first, count })
}

fn bytes_at() -> impl Strategy<Value = Bytes> {
    let off = prop_oneof![2 => Just(0u16), 2 => 0..PAGE as u16, 1 => Just(PAGE as u16 - 8)];
    let len = prop_oneof![2 => 1..=64u16, 1 => 1..=2 * PAGE as u16];
    (0..WINDOW as u8, off, len).prop_map(|(page, off, len)| Bytes { page, off, len })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => Just(Kind::Anon),
        1 => Just(Kind::Thp),
        1 => Just(Kind::HugeTlb),
        1 => Just(Kind::SharedAnon),
        1 => Just(Kind::SharedFile),
    ]
}

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![5 => Just(Perm::Rw), 2 => Just(Perm::R), 1 => Just(Perm::None)]
}

fn kop() -> impl Strategy<Value = KOp> {
    prop_oneof![
        3 => (pages(), kind(), perm()).prop_map(|(at, kind, perm)| KOp::Map { at, kind, perm }),
        3 => pages().prop_map(|at| KOp::Unmap { at }),
        2 => pages().prop_map(|at| KOp::Clear { at }),
        3 => (pages(), perm()).prop_map(|(at, perm)| KOp::Protect { at, perm }),
        3 => (pages(), any::<u8>()).prop_map(|(at, seed)| KOp::Remap { at, seed }),
        3 => (bytes_at(), any::<bool>(), any::<bool>(), any::<u8>())
            .prop_map(|(at, in_child, keep, seed)| KOp::Cow { at, in_child, keep, seed }),
        3 => (bytes_at(), any::<u8>()).prop_map(|(at, seed)| KOp::Write { at, seed }),
        1 => bytes_at().prop_map(|at| KOp::Read { at }),
    ]
}

fn dop() -> impl Strategy<Value = DOp> {
    prop_oneof![
        4 => (pages(), any::<bool>()).prop_map(|(at, write)| DOp::Fault { at, write }),
        3 => bytes_at().prop_map(|at| DOp::Read { at }),
        3 => (bytes_at(), any::<u8>()).prop_map(|(at, seed)| DOp::Write { at, seed }),
        1 => pages().prop_map(|at| DOp::Snapshot { at }),
    ]
}

fn step() -> impl Strategy<Value = u8> {
    prop_oneof![5 => Just(0u8), 4 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8)]
}

fn case() -> impl Strategy<Value = Case> {
    let perm = prop_oneof![6 => Just(Perm::Rw), 1 => Just(Perm::R)];
    let layout = (kind(), perm, proptest::option::weighted(0.75, any::<u8>()))
        .prop_map(|(kind, perm, prefill)| Layout { kind, perm, prefill });
    (
        layout,
        proptest::collection::vec(kop(), 4..=32),
        proptest::collection::vec(dop(), 4..=24),
        proptest::collection::vec(step(), 8..=64),
    )
        .prop_map(|(layout, kernel, device, steps)| Case { layout, kernel, device, steps })
}

// ---------------------------------------------------------------------------
// The kernel side
// ---------------------------------------------------------------------------

/// Outcome counters over the whole run, printed at the end.
static DEVICE_OPS: AtomicU64 = AtomicU64::new(0);
/// Kernel operations run at `Between`, `Before`, `After` scheduling points.
static RAN_AT: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
/// Kernel operations run at `After` that changed a page of the device
/// operation in progress: the fault's walk saw the old entry.
static COLLISIONS: AtomicU64 = AtomicU64::new(0);
static RETRIES: AtomicU64 = AtomicU64::new(0);
static FAULTS_OK: AtomicU64 = AtomicU64::new(0);
static DEV_ERRORS: AtomicU64 = AtomicU64::new(0);
static PAGES_COMPARED: AtomicU64 = AtomicU64::new(0);
static PAGES_SKIPPED: AtomicU64 = AtomicU64::new(0);
static THREADED_ROUNDS: AtomicU64 = AtomicU64::new(0);

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29) ^ (i >> 12) as u8 ^ seed ^ 0xa5).collect()
}

fn window_pages(r: VaRange) -> impl Iterator<Item = u64> {
    let first = (r.start() - BASE) / PAGE;
    first..(first + r.pages(12)).min(WINDOW)
}

/// A fixed map of `r`: whatever is there is unmapped first.
fn map(space: &ModelSpace, r: VaRange, kind: Kind, perm: Perm) -> hmm_core::Result<()> {
    space.unmap(r)?;
    let pages = r.pages(12);
    let kind = match kind {
        Kind::Anon => RegionKind::PrivateAnon,
        Kind::Thp => RegionKind::Thp,
        Kind::HugeTlb => RegionKind::HugeTlb2M,
        Kind::SharedAnon => RegionKind::SharedAnon,
        Kind::SharedFile => {
            let file = SimFile::new(space.allocator(), pages);
            file.write(0, b"file")?;
            RegionKind::SharedFile { file, offset: 0 }
        }
    };
    space.map(r.start(), pages * PAGE, perm.flags(), kind).map(|_| ())
}

/// Runs one kernel operation on `space` (fork children go to `children`).
/// Returns the window pages whose content it may have changed or whose
/// content the CPU may no longer read (mappings and write permission may
/// change elsewhere too: a fork write-protects every private page, a fault on
/// a THP region maps the whole block), and a short outcome for the trace.
fn kernel_op(space: &ModelSpace, children: &mut VecDeque<ModelSpace>, op: &KOp) -> Result<(Vec<u64>, String), String> {
    let block = range(BASE, HUGE);
    let whole = range(BASE, WINDOW * PAGE);
    let (res, touched): (_, Option<VaRange>) = match *op {
        KOp::Map { at, kind, perm } => {
            let r = if matches!(kind, Kind::Thp | Kind::HugeTlb) { block } else { at.range() };
            (map(space, r, kind, perm), Some(r))
        }
        KOp::Unmap { at } => (space.unmap(at.range()), Some(at.range())),
        KOp::Clear { at } => (space.clear(at.range()), Some(at.range())),
        KOp::Protect { at, perm } => (space.protect(at.range(), perm.flags()), Some(at.range())),
        KOp::Remap { at, seed } => {
            let r = at.range();
            let res = map(space, r, Kind::Anon, Perm::Rw)
                .and_then(|()| space.write_bytes(r.start(), &data((r.pages(12) * PAGE) as usize, seed)));
            (res, Some(r))
        }
        KOp::Cow { at, in_child, keep, seed } => {
            let res = space.fork().and_then(|child| {
                let target = if in_child { &child } else { space };
                let w = target.write_bytes(at.va(), &data(at.len(), seed));
                if keep {
                    children.push_back(child);
                    if children.len() > MAX_CHILDREN {
                        children.pop_front();
                    }
                }
                w
            });
            (res, Some(at.pages()))
        }
        KOp::Write { at, seed } => (space.write_bytes(at.va(), &data(at.len(), seed)), Some(at.pages())),
        KOp::Read { at } => {
            let mut buf = vec![0u8; at.len()];
            (space.read_bytes(at.va(), &mut buf), None)
        }
    };
    let touched: Vec<u64> = touched.and_then(|r| r.intersect(&whole)).map_or(Vec::new(), |r| window_pages(r).collect());
    match res {
        Ok(()) => Ok((touched, "ok".into())),
        Err(e @ (Error::Unaligned | Error::NoMemory | Error::Fault | Error::Perm | Error::Busy)) => {
            Ok((touched, format!("{e:?}")))
        }
        Err(e) => Err(format!("kernel op {op:?}: unexpected error {e:?}")),
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// The space's own invariants: the registry is idle with exactly the one
/// mirror registered; with `tables`, the tables agree with the oracle.
fn check_space(space: &ModelSpace, tables: bool) -> Result<(), String> {
    if tables {
        std::panic::catch_unwind(AssertUnwindSafe(|| space.check_tables()))
            .map_err(|p| format!("model tables: {}", panic_message(p)))?;
    }
    let reg = space.notifiers();
    if reg.seq() & 1 != 0 {
        return Err(format!("odd registry sequence {} while idle", reg.seq()));
    }
    if reg.len() != 1 {
        return Err(format!("{} notifiers registered, want 1", reg.len()));
    }
    Ok(())
}

type AnyMirror<'s, S> = Mirror<'s, S, Dev, CountingAllocator>;

/// The device never used a stale translation; every mirror entry of the
/// window is what the CPU maps, with no more permission; the mirror holds
/// exactly the directories its entries need.
fn check_mirror<S: AddressSpace + Sync>(m: &AnyMirror<'_, S>, view: &TableView) -> Result<(), String> {
    let stale = m.device().counters().stale;
    if stale != 0 {
        return Err(format!("device used a stale translation ({stale} times)"));
    }
    let cpu = view.snapshot(range(BASE, WINDOW * PAGE));
    let mut entries = 0;
    let mut small = false;
    for (i, p) in cpu.iter().enumerate() {
        let va = BASE + i as u64 * PAGE;
        let Some(e) = m.translate(va) else { continue };
        entries += 1;
        small |= e.order() == 0;
        if !(p.is_valid() && p.phys() == e.frame() && (p.is_write() || !e.is_write())) {
            return Err(format!(
                "mirror entry {va:#x} -> {:#x} (w={}) but the CPU has {p:x?}: a stale or over-permissive translation",
                e.frame(),
                e.is_write()
            ));
        }
    }
    // Root, plus one directory per level above the leaves (all entries lie
    // in one 2 MiB block), plus a leaf table unless the block is mirrored as
    // one 2 MiB entry.
    let want = if entries > 0 { 3 + small as usize } else { 1 };
    let frames = m.table_frames();
    if frames != want {
        return Err(format!("mirror holds {frames} table frames, its {entries} entries need {want}"));
    }
    Ok(())
}

/// What `Mirror::snapshot` must report: the oracle's leaves, ERROR where the
/// device may not go (no region, IO, no read permission).
fn expected_snapshot(space: &ModelSpace, r: VaRange) -> Vec<Pfn> {
    let regions = space.regions();
    let mut want = space.oracle().expected_pfns(r);
    for (i, w) in want.iter_mut().enumerate() {
        let va = r.start() + i as u64 * PAGE;
        let region = regions.iter().find(|g| g.range.contains_addr(va));
        if region.is_none_or(|g| g.flags.contains(RegionFlags::IO) || !g.flags.contains(R)) {
            *w = Pfn::ERROR_ENTRY;
        }
    }
    want
}

// ---------------------------------------------------------------------------
// The device side
// ---------------------------------------------------------------------------

/// What kernel operations did since the current device operation began.
#[derive(Clone, Debug, Default)]
struct During {
    /// Operations run at `After` scheduling points (after a walk): the walk
    /// a result comes from may be older than the state they left.
    after_walk: usize,
    /// Operations run at any scheduling point.
    ran: usize,
    /// Window pages whose content they may have changed (see `kernel_op`).
    content: BTreeSet<u64>,
}

/// Runs one device operation and checks its result. `during` (deterministic
/// runs only) says what the kernel did since the device operation began:
/// data is compared with the CPU on the pages whose content it did not
/// touch; mappings (fault, snapshot) are compared exactly when nothing ran
/// after a walk. Without it (a real concurrent kernel) only errors are
/// checked here.
fn device_op<S: AddressSpace<Format = X86_64Level4> + Sync>(
    m: &AnyMirror<'_, S>,
    space: &ModelSpace,
    view: &TableView,
    op: &DOp,
    during: Option<&dyn Fn() -> During>,
) -> Result<(), String> {
    // The run's counters are the deterministic test's.
    let count = |c: &AtomicU64| {
        if during.is_some() {
            c.fetch_add(1, Ordering::Relaxed);
        }
    };
    count(&DEVICE_OPS);
    let allowed = |r: &hmm_core::Result<()>| match r {
        Ok(()) => Ok(()),
        Err(Error::Fault | Error::Perm | Error::Busy | Error::NoMemory) => {
            count(&DEV_ERRORS);
            Ok(())
        }
        Err(e) => Err(format!("unexpected error {e:?}")),
    };
    // Compares what the device saw with what the CPU reads now, page by page,
    // skipping the pages the kernel changed meanwhile.
    let compare = |va: u64, seen: &[u8], changed: &BTreeSet<u64>| -> Result<(), String> {
        let mut at = va;
        while at < va + seen.len() as u64 {
            let next = ((at & !(PAGE - 1)) + PAGE).min(va + seen.len() as u64);
            let part = &seen[(at - va) as usize..(next - va) as usize];
            if changed.contains(&((at - BASE) / PAGE)) {
                PAGES_SKIPPED.fetch_add(1, Ordering::Relaxed);
            } else {
                let mut cpu = vec![0u8; part.len()];
                space.read_bytes(at, &mut cpu).map_err(|e| format!("the CPU cannot read {at:#x}: {e:?}"))?;
                if cpu != part {
                    return Err(format!("device and CPU disagree at {at:#x}+{}", part.len()));
                }
                PAGES_COMPARED.fetch_add(1, Ordering::Relaxed);
            }
            at = next;
        }
        Ok(())
    };
    match *op {
        DOp::Fault { at, write } => {
            let r = at.range();
            let res = m.fault(r, write);
            allowed(&res)?;
            let (Ok(()), Some(during)) = (res, during) else { return Ok(()) };
            FAULTS_OK.fetch_add(1, Ordering::Relaxed);
            // Every page was mapped, under the update lock, by some attempt.
            // With no kernel change during the fault, all of them still are,
            // with the CPU's frames and permission. A change after an
            // attempt (even one before the next attempt, which resumes where
            // the last stopped) may have cleared pages: those that remain
            // must still be the CPU's, with at most its permission (a write
            // permission added in place needs no invalidation).
            let untouched = during().ran == 0;
            for (i, p) in view.snapshot(r).iter().enumerate() {
                let va = r.start() + i as u64 * PAGE;
                let Some(e) = m.translate(va) else {
                    if untouched {
                        return Err(format!("fault Ok but {va:#x} not mirrored"));
                    }
                    PAGES_SKIPPED.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let write_ok = if untouched { e.is_write() == p.is_write() } else { !e.is_write() || p.is_write() };
                if !(p.is_valid() && e.frame() == p.phys() && write_ok && (!write || e.is_write())) {
                    return Err(format!(
                        "fault Ok: mirror {va:#x} -> {:#x} (w={}) but the CPU has {p:x?}",
                        e.frame(),
                        e.is_write()
                    ));
                }
            }
        }
        DOp::Read { at } => match dmirror::read(m, at.va(), at.len()) {
            Ok(seen) => {
                if let Some(during) = during {
                    compare(at.va(), &seen, &during().content)?;
                }
            }
            Err(e) => allowed(&Err(e))?,
        },
        DOp::Write { at, seed } => {
            let bytes = data(at.len(), seed);
            let res = dmirror::write(m, at.va(), &bytes);
            allowed(&res)?;
            if let (Ok(()), Some(during)) = (res, during) {
                compare(at.va(), &bytes, &during().content)?;
            }
        }
        DOp::Snapshot { at } => {
            let r = at.range();
            let mut out = vec![Pfn(0x1234); r.pages(12) as usize];
            let res = m.snapshot(r, &mut out);
            allowed(&res)?;
            // The snapshot is the CPU's view at its last walk.
            if let (Ok(()), Some(during)) = (res, during) {
                if during().after_walk > 0 {
                    PAGES_SKIPPED.fetch_add(out.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                let want = expected_snapshot(space, r);
                for (va, (got, want)) in (r.start()..).step_by(PAGE as usize).zip(out.iter().zip(&want)) {
                    if got != want {
                        return Err(format!("snapshot {va:#x}: got {got:x?}, want {want:x?}"));
                    }
                }
                PAGES_COMPARED.fetch_add(out.len() as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The deterministic scheduler
// ---------------------------------------------------------------------------

/// A scheduling point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// Before a device operation starts.
    Between = 0,
    /// A fault (or snapshot) is about to walk: after `read_begin`, before
    /// the read lock.
    Before = 1,
    /// The walk is done and dropped the read lock; the fault has not yet
    /// taken its update lock to check the sequence and commit.
    After = 2,
}

#[derive(Default)]
struct State {
    queue: VecDeque<KOp>,
    steps: VecDeque<u8>,
    children: VecDeque<ModelSpace>,
    /// What the kernel did since the current device operation began.
    during: During,
    /// Window pages of the current device operation.
    op_pages: BTreeSet<u64>,
    failure: Option<String>,
    trace: Vec<String>,
}

/// The hooks of the model kernel as the mirror sees it: the scheduling
/// points run queued kernel operations (see the module doc).
struct Sched<'a> {
    inner: &'a ModelSpace,
    view: TableView,
    state: Mutex<State>,
    /// The mirror to check at scheduling points (type-erased
    /// `*const SMirror`); set by [`Sched::attach`] while the mirror lives.
    mirror: AtomicPtr<()>,
}

type SMirror<'s, 'a> = AnyMirror<'s, Hooked<'a, Sched<'a>>>;

/// Detaches the mirror from its scheduler when dropped (before the mirror).
struct Attached<'x, 'a>(&'x Sched<'a>);

impl Drop for Attached<'_, '_> {
    fn drop(&mut self) {
        self.0.mirror.store(std::ptr::null_mut(), Ordering::Release);
    }
}

impl<'a> Sched<'a> {
    fn new(inner: &'a ModelSpace, case: &Case) -> Self {
        let state = State {
            queue: case.kernel.iter().cloned().collect(),
            steps: case.steps.iter().copied().collect(),
            ..State::default()
        };
        Self { inner, view: inner.table_view(), state: Mutex::new(state), mirror: AtomicPtr::new(std::ptr::null_mut()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets scheduling points check `m`, until the returned guard drops.
    fn attach<'x>(&'x self, m: &SMirror<'_, 'a>) -> Attached<'x, 'a> {
        self.mirror.store(m as *const SMirror<'_, 'a> as *mut (), Ordering::Release);
        Attached(self)
    }

    /// The invariants of every scheduling point (`tables`: the model's own
    /// self-check too, the costly part, done once per device operation).
    fn check(&self, tables: bool) -> Result<(), String> {
        check_space(self.inner, tables)?;
        let p = self.mirror.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: `attach` stored a pointer to a pinned mirror, and the
            // `Attached` guard clears it before that mirror is dropped; the
            // mirror is only used through `&self` (it is `Sync`), here from
            // the thread already inside one of its calls, at a point where
            // that call holds none of the mirror's locks.
            let m = unsafe { &*(p as *const SMirror<'_, 'a>) };
            check_mirror(m, &self.view)?;
        }
        Ok(())
    }

    /// A scheduling point: runs as many queued kernel operations as the next
    /// step says, checking after each.
    fn fire(&self, at: At) {
        if std::thread::panicking() {
            return;
        }
        let mut st = self.state();
        let st = &mut *st;
        if st.failure.is_some() {
            return;
        }
        let n = st.steps.pop_front().unwrap_or(0);
        for _ in 0..n {
            let Some(op) = st.queue.pop_front() else { return };
            RAN_AT[at as usize].fetch_add(1, Ordering::Relaxed);
            match kernel_op(self.inner, &mut st.children, &op) {
                Ok((touched, outcome)) => {
                    st.trace.push(format!("    {at:?}: {op:?} -> {outcome}"));
                    if at == At::After && touched.iter().any(|p| st.op_pages.contains(p)) {
                        COLLISIONS.fetch_add(1, Ordering::Relaxed);
                    }
                    st.during.content.extend(touched);
                    st.during.ran += 1;
                    if at == At::After {
                        st.during.after_walk += 1;
                    }
                }
                Err(e) => {
                    st.failure = Some(e);
                    return;
                }
            }
            if let Err(e) = self.check(false) {
                st.failure = Some(format!("after kernel op {op:?} at {at:?}: {e}"));
                return;
            }
        }
    }

    fn begin(&self, i: usize, op: &DOp) {
        let mut st = self.state();
        st.trace.push(format!("device op {i}: {op:?}"));
        st.during = During::default();
        st.op_pages = window_pages(op.pages()).collect();
    }

    fn during(&self) -> During {
        self.state().during.clone()
    }

    /// Runs the kernel operations left once the device is done.
    fn drain(&self) -> Result<(), String> {
        loop {
            let mut st = self.state();
            let st = &mut *st;
            let Some(op) = st.queue.pop_front() else { return Ok(()) };
            let (_, outcome) = kernel_op(self.inner, &mut st.children, &op)?;
            st.trace.push(format!("  drain: {op:?} -> {outcome}"));
            self.check(true).map_err(|e| format!("after kernel op {op:?} (drain): {e}"))?;
        }
    }

    /// The failure recorded at a scheduling point, if any, with the tail of
    /// the interleaving that led there.
    fn failure(&self, e: Option<String>) -> Option<String> {
        let st = self.state();
        // A failure at a scheduling point comes first: what the device
        // operation reported afterwards may be a consequence.
        let e = st.failure.clone().or(e)?;
        let tail = st.trace.len().saturating_sub(16);
        Some(format!("{e}\n  interleaving (last steps):\n{}", st.trace[tail..].join("\n")))
    }
}

// The scheduling points run kernel operations only while no read guard of
// the space is held (before the model's read lock is taken, after it was
// dropped).
impl Hooks for Sched<'_> {
    fn before_read_lock(&self, _inner: &ModelSpace) {
        self.fire(At::Before);
    }
    fn after_read_unlock(&self, _inner: &ModelSpace) {
        self.fire(At::After);
    }
}

fn set_up(space: &ModelSpace, layout: Layout) -> Result<(), String> {
    let r = match layout.kind {
        Kind::Thp | Kind::HugeTlb => range(BASE, HUGE),
        _ => range(BASE, WINDOW * PAGE),
    };
    map(space, r, layout.kind, layout.perm).map_err(|e| format!("set-up map: {e:?}"))?;
    if let Some(seed) = layout.prefill {
        if let Err(e) = space.write_bytes(BASE, &data((WINDOW * PAGE) as usize, seed)) {
            if !matches!(e, Error::Perm | Error::Fault) {
                return Err(format!("set-up write: {e:?}"));
            }
        }
    }
    Ok(())
}

fn run_case(case: &Case) -> Result<(), String> {
    let alloc = CountingAllocator::with_size(RAM);
    {
        let space = ModelSpace::new(&alloc).map_err(|e| format!("space: {e:?}"))?;
        set_up(&space, case.layout)?;
        let hooked = Hooked::new(&space, Sched::new(&space, case));
        let sched = &hooked.hooks;
        {
            let m: SMirror<'_, '_> = Mirror::new(&hooked, &*alloc, device(&space), user(), MirrorConfig::default())
                .map_err(|e| format!("Mirror::new: {e:?}"))?;
            let m = pin!(m);
            m.as_ref().register().map_err(|e| format!("register: {e:?}"))?;
            let _attached = sched.attach(&m);
            sched.check(true)?;
            let during = || sched.during();
            for (i, op) in case.device.iter().enumerate() {
                sched.fire(At::Between);
                if let Some(e) = sched.failure(None) {
                    return Err(e);
                }
                sched.begin(i, op);
                let res = device_op(&m, &space, &sched.view, op, Some(&during))
                    .and_then(|()| sched.check(true))
                    .map_err(|e| format!("device op {i} {op:?}: {e}"));
                if let Some(e) = sched.failure(res.err()) {
                    return Err(e);
                }
            }
            if let Some(e) = sched.failure(sched.drain().err()) {
                return Err(e);
            }
            RETRIES.fetch_add(m.stats().retries, Ordering::Relaxed);
        }
        // Fork children, then the space, after the mirror.
        drop(hooked);
    }
    match alloc.live() {
        0 => Ok(()),
        n => Err(format!("{n} allocations leaked")),
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES)
}

#[test]
fn kernel_changes_inside_device_faults_never_leave_a_stale_translation() {
    let cases = cases();
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/model_concurrent.txt"
        )))),
        max_shrink_iters: 1024,
        ..Config::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| run_case(&case).map_err(TestCaseError::fail));
    let ran = |at: At| RAN_AT[at as usize].load(Ordering::Relaxed);
    println!(
        "model-concurrent: {cases} cases in {:.1?}; {} device ops; kernel ops run between device ops {}, \
         before a walk {}, between a walk and its commit {} ({} of them on the pages being faulted); \
         mirror retries {}; faults ok {}; device errors {}; pages compared with the CPU {} (skipped {})",
        started.elapsed(),
        DEVICE_OPS.load(Ordering::Relaxed),
        ran(At::Between),
        ran(At::Before),
        ran(At::After),
        COLLISIONS.load(Ordering::Relaxed),
        RETRIES.load(Ordering::Relaxed),
        FAULTS_OK.load(Ordering::Relaxed),
        DEV_ERRORS.load(Ordering::Relaxed),
        PAGES_COMPARED.load(Ordering::Relaxed),
        PAGES_SKIPPED.load(Ordering::Relaxed),
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    if cases >= 16 {
        assert!(COLLISIONS.load(Ordering::Relaxed) > 0, "no kernel change ever landed between a walk and its commit");
    }
}

// ---------------------------------------------------------------------------
// Real threads
// ---------------------------------------------------------------------------

/// Runs `body` on a scoped thread; exits the process with a message if it
/// does not finish within `HANG` (a stuck thread cannot be stopped).
fn bounded<T: Send>(what: &str, body: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(body);
        let deadline = Instant::now() + HANG;
        while !h.is_finished() {
            if Instant::now() > deadline {
                eprintln!("model_concurrent: {what} did not finish within {HANG:?} (a hang)");
                std::process::exit(101);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn run_threaded(case: &Case) -> Result<(), String> {
    let alloc = CountingAllocator::with_size(RAM);
    {
        let space = ModelSpace::new(&alloc).map_err(|e| format!("space: {e:?}"))?;
        set_up(&space, case.layout)?;
        let view = space.table_view();
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().map_err(|e| format!("register: {e:?}"))?;
        let m: &DevMirror<'_> = &m;
        bounded("device operations racing a kernel thread", || {
            let start = Barrier::new(2);
            std::thread::scope(|s| {
                let kernel = s.spawn(|| {
                    let mut children = VecDeque::new();
                    start.wait();
                    for op in &case.kernel {
                        kernel_op(&space, &mut children, op)?;
                        std::thread::yield_now();
                    }
                    Ok::<(), String>(())
                });
                start.wait();
                // The device goes round its operations until the kernel is
                // done (a few rounds at most).
                let mut device = Ok(());
                for _ in 0..8 {
                    THREADED_ROUNDS.fetch_add(1, Ordering::Relaxed);
                    for (i, op) in case.device.iter().enumerate() {
                        device =
                            device_op(m, &space, &view, op, None).map_err(|e| format!("device op {i} {op:?}: {e}"));
                        let stale = m.device().counters().stale;
                        if device.is_ok() && stale != 0 {
                            device = Err(format!("device op {i} {op:?}: used a stale translation ({stale} times)"));
                        }
                        if device.is_err() {
                            break;
                        }
                    }
                    if device.is_err() || kernel.is_finished() {
                        break;
                    }
                }
                let kernel = kernel.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                device.and(kernel)
            })
        })?;
        // Both sides done: everything must agree now.
        check_space(&space, true)?;
        check_mirror(m, &view)?;
        // The device reads every page as the CPU does (through its TLB where
        // it still caches a translation: a stale one would be counted).
        for page in 0..WINDOW {
            let va = BASE + page * PAGE;
            match dmirror::read(m, va, PAGE as usize) {
                Ok(seen) => {
                    let mut cpu = vec![0u8; PAGE as usize];
                    space.read_bytes(va, &mut cpu).map_err(|e| format!("the CPU cannot read {va:#x}: {e:?}"))?;
                    if cpu != seen {
                        return Err(format!("final read: device and CPU disagree at {va:#x}"));
                    }
                }
                Err(Error::Fault | Error::Perm) => {}
                Err(e) => return Err(format!("final read of {va:#x}: unexpected error {e:?}")),
            }
        }
        check_mirror(m, &view)?;
    }
    match alloc.live() {
        0 => Ok(()),
        n => Err(format!("{n} allocations leaked")),
    }
}

#[test]
fn kernel_thread_racing_device_operations() {
    let cases = (cases() / 8).max(16);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 64, ..Config::default() };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |case| run_threaded(&case).map_err(TestCaseError::fail));
    println!(
        "model-concurrent (threads): {cases} cases, {} device rounds in {:.1?}",
        THREADED_ROUNDS.load(Ordering::Relaxed),
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
