//! Model-based (state-machine) test: random sequences of kernel operations
//! (map of every kind incl. THP and 2 MiB hugetlb, unmap, clear, protect,
//! fork with a copy-on-write write on either side, CPU reads and writes,
//! partial unmap/protect that splits a huge leaf, release) interleaved with
//! device operations (faults, dmirror reads/writes/snapshots, mirror
//! register/unregister) on up to three mirrors over up to three address
//! spaces (fork children are the extra spaces).
//!
//! After every step:
//! - every valid mirror translation is what the CPU maps now, with no more
//!   permission (checked against the live tables, page by page);
//! - the mirror holds exactly the directories its entries need (no empty
//!   directory left behind);
//! - the dummy device never used a stale translation;
//! - `check_tables` passes for every space (tables agree with the oracle);
//! - mirror stats are consistent with what the test did;
//! - the registry has one entry per registered mirror and an even sequence.
//!
//! Step-specific checks: a successful fault leaves every page of its range
//! mirrored exactly as the CPU maps it; a successful device read returns what
//! the CPU reads; a successful device write is visible to the CPU; a snapshot
//! equals what the oracle and the regions say.
//!
//! At the end everything is dropped and no frame may be left allocated.
//!
//! Cases: `HMM_PROPTEST_CASES` (default 170: at least 170 x 63 = 10,710 steps).

mod common;

use common::*;
use hmm_core::pt::Pfn;
use hmm_core::{AddressSpace, Error, Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::dmirror;
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, SimFile, TableView};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const HUGE: u64 = 2 * MIB;
/// Addresses are drawn around these: a 1 GiB boundary (also a 2 MiB one) and
/// a 512 GiB (PML4 entry) boundary.
const ANCHORS: [u64; 2] = [1 << 30, 1 << 39];
/// Simulated RAM per case.
const RAM: u64 = 128 * MIB;
const MAX_SPACES: usize = 3;
const MAX_MIRRORS: usize = 3;
const MIN_OPS: usize = 60;
const MAX_OPS: usize = 100;
const DEFAULT_CASES: u32 = 170;

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

/// An address near an anchor: `anchor + block * 2 MiB + page * 4 KiB`.
#[derive(Clone, Copy, Debug)]
struct Addr {
    anchor: u8,
    block: i8,
    page: u16,
}

impl Addr {
    fn va(self) -> u64 {
        let base = ANCHORS[self.anchor as usize % ANCHORS.len()] as i64;
        (base + self.block as i64 * HUGE as i64) as u64 + self.page as u64 * PAGE
    }
}

#[derive(Clone, Copy, Debug)]
enum Len {
    Pages(u16),
    Huge,
    HugePlus(i8),
    TwoHuge,
    Blocks(u8),
}

impl Len {
    fn bytes(self) -> u64 {
        match self {
            Len::Pages(n) => n.max(1) as u64 * PAGE,
            Len::Huge => HUGE,
            Len::HugePlus(d) => (HUGE as i64 + d as i64 * PAGE as i64) as u64,
            Len::TwoHuge => 2 * HUGE,
            Len::Blocks(n) => n as u64 * HUGE,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum MapKind {
    Anon,
    Thp,
    HugeTlb2M,
    SharedAnon,
    SharedFile,
    Mixed,
    Io,
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        sp: u8,
        at: Addr,
        len: Len,
        kind: MapKind,
        perm: Perm,
        fixed: bool,
    },
    Unmap {
        sp: u8,
        at: Addr,
        len: Len,
    },
    Clear {
        sp: u8,
        at: Addr,
        len: Len,
    },
    Protect {
        sp: u8,
        at: Addr,
        len: Len,
        perm: Perm,
    },
    /// Unmap or protect (`protect`) a few pages inside a 2 MiB block: splits
    /// a transparent huge page there.
    SplitHuge {
        sp: u8,
        at: Addr,
        pages: u8,
        protect: bool,
    },
    /// Fork `sp`; then a CPU write in the parent or the child (COW break).
    Fork {
        sp: u8,
        write_in_child: Option<bool>,
        at: Addr,
        seed: u8,
    },
    CpuWrite {
        sp: u8,
        at: Addr,
        len: u16,
        seed: u8,
    },
    CpuRead {
        sp: u8,
        at: Addr,
        len: u16,
    },
    /// Release a space; the last live one only if `last`.
    Release {
        sp: u8,
        last: bool,
    },
    /// Drops whatever mirror is in slot `mi` and registers a new one over
    /// space `sp`: the whole user half, or a 12 MiB window around an anchor.
    Register {
        mi: u8,
        sp: u8,
        window: Option<u8>,
    },
    Unregister {
        mi: u8,
    },
    Fault {
        mi: u8,
        at: Addr,
        len: Len,
        write: bool,
    },
    DevRead {
        mi: u8,
        at: Addr,
        len: u16,
    },
    DevWrite {
        mi: u8,
        at: Addr,
        len: u16,
        seed: u8,
    },
    Snapshot {
        mi: u8,
        at: Addr,
        len: Len,
    },
}

fn addr() -> impl Strategy<Value = Addr> {
    let page = prop_oneof![2 => Just(0u16), 1 => Just(1u16), 1 => Just(511u16), 1 => Just(510u16), 4 => 0..512u16];
    (0..ANCHORS.len() as u8, -2..=2i8, page).prop_map(|(anchor, block, page)| Addr { anchor, block, page })
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        4 => (1..=4u16).prop_map(Len::Pages),
        3 => (1..=40u16).prop_map(Len::Pages),
        2 => Just(Len::Huge),
        2 => (-3..=3i8).prop_map(Len::HugePlus),
        1 => Just(Len::TwoHuge),
    ]
}

fn perm() -> impl Strategy<Value = Perm> {
    prop_oneof![4 => Just(Perm::Rw), 2 => Just(Perm::R), 1 => Just(Perm::None)]
}

fn kind() -> impl Strategy<Value = MapKind> {
    prop_oneof![
        3 => Just(MapKind::Anon),
        3 => Just(MapKind::Thp),
        2 => Just(MapKind::HugeTlb2M),
        1 => Just(MapKind::SharedAnon),
        1 => Just(MapKind::SharedFile),
        1 => Just(MapKind::Mixed),
        1 => Just(MapKind::Io),
    ]
}

fn small_len() -> impl Strategy<Value = u16> {
    prop_oneof![3 => 1..=64u16, 2 => 1..=(3 * PAGE as u16 / 2), 1 => Just(PAGE as u16 * 4)]
}

/// The opening layout of space 0: large regions around the anchors.
fn setup_map() -> impl Strategy<Value = Op> {
    let at = (0..ANCHORS.len() as u8, -2..=1i8, prop_oneof![3 => Just(0u16), 1 => 0..512u16])
        .prop_map(|(anchor, block, page)| Addr { anchor, block, page });
    let perm = prop_oneof![6 => Just(Perm::Rw), 1 => Just(Perm::R)];
    (at, (1..=4u8).prop_map(Len::Blocks), kind(), perm).prop_map(|(at, len, kind, perm)| Op::Map {
        sp: 0,
        at,
        len,
        kind,
        perm,
        fixed: true,
    })
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    (proptest::collection::vec(setup_map(), 3..=6), proptest::collection::vec(op(), MIN_OPS..=MAX_OPS)).prop_map(
        |(mut setup, ops)| {
            setup.extend(ops);
            setup
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let sp = 0..MAX_SPACES as u8;
    let mi = 0..MAX_MIRRORS as u8;
    prop_oneof![
        16 => (sp.clone(), addr(), len(), kind(), perm(), prop::bool::weighted(0.75))
            .prop_map(|(sp, at, len, kind, perm, fixed)| Op::Map { sp, at, len, kind, perm, fixed }),
        6 => (sp.clone(), addr(), len()).prop_map(|(sp, at, len)| Op::Unmap { sp, at, len }),
        4 => (sp.clone(), addr(), len()).prop_map(|(sp, at, len)| Op::Clear { sp, at, len }),
        6 => (sp.clone(), addr(), len(), perm()).prop_map(|(sp, at, len, perm)| Op::Protect { sp, at, len, perm }),
        4 => (sp.clone(), addr(), 1..=8u8, any::<bool>())
            .prop_map(|(sp, at, pages, protect)| Op::SplitHuge { sp, at, pages, protect }),
        4 => (sp.clone(), proptest::option::of(any::<bool>()), addr(), any::<u8>())
            .prop_map(|(sp, write_in_child, at, seed)| Op::Fork { sp, write_in_child, at, seed }),
        10 => (sp.clone(), addr(), small_len(), any::<u8>())
            .prop_map(|(sp, at, len, seed)| Op::CpuWrite { sp, at, len, seed }),
        4 => (sp.clone(), addr(), small_len()).prop_map(|(sp, at, len)| Op::CpuRead { sp, at, len }),
        1 => (sp.clone(), prop::bool::weighted(0.25)).prop_map(|(sp, last)| Op::Release { sp, last }),
        4 => (mi.clone(), sp, proptest::option::of(0..ANCHORS.len() as u8))
            .prop_map(|(mi, sp, window)| Op::Register { mi, sp, window }),
        2 => mi.clone().prop_map(|mi| Op::Unregister { mi }),
        18 => (mi.clone(), addr(), len(), any::<bool>()).prop_map(|(mi, at, len, write)| Op::Fault { mi, at, len, write }),
        10 => (mi.clone(), addr(), small_len()).prop_map(|(mi, at, len)| Op::DevRead { mi, at, len }),
        10 => (mi.clone(), addr(), small_len(), any::<u8>())
            .prop_map(|(mi, at, len, seed)| Op::DevWrite { mi, at, len, seed }),
        6 => (mi, addr(), len()).prop_map(|(mi, at, len)| Op::Snapshot { mi, at, len }),
    ]
}

// ---------------------------------------------------------------------------
// The system under test
// ---------------------------------------------------------------------------

type M<'s> = Pin<Box<DevMirror<'s>>>;

struct Slot<'s> {
    m: M<'s>,
    sp: usize,
    /// 2 MiB blocks a fault or a device access touched since the last check:
    /// scanned page by page for new entries.
    dirty: BTreeSet<u64>,
    /// Pages known to hold an entry (found by a scan); entries appear only
    /// in dirty blocks, so the rest of the mirror is empty.
    known: BTreeSet<u64>,
    /// `faults` the mirror's stats must show.
    faults: u64,
    registered: bool,
}

struct World<'s> {
    alloc: &'s Arc<CountingAllocator>,
    spaces: &'s [OnceCell<ModelSpace>; MAX_SPACES],
    views: Vec<TableView>,
    slots: Vec<Option<Slot<'s>>>,
    /// Spaces the current step may have changed (the others are as they
    /// were at their last check, which passed).
    touched: BTreeSet<usize>,
}

/// Counters over the whole run, printed at the end.
static STEPS: AtomicU64 = AtomicU64::new(0);
static FAULTS_OK: AtomicU64 = AtomicU64::new(0);
static FAULTS_ERR: AtomicU64 = AtomicU64::new(0);
static BUSY: AtomicU64 = AtomicU64::new(0);
static DEV_READ_COMPARED: AtomicU64 = AtomicU64::new(0);
static SNAPSHOTS_COMPARED: AtomicU64 = AtomicU64::new(0);
static ENTRIES_CHECKED: AtomicU64 = AtomicU64::new(0);
static CHILD_FAULTS_OK: AtomicU64 = AtomicU64::new(0);
static HUGE_PAGES_MIRRORED: AtomicU64 = AtomicU64::new(0);
/// Outcome of every operation, by name, for the summary.
static OUTCOMES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn record(what: &str, r: &hmm_core::Result<()>) {
    let key = match r {
        Ok(()) => format!("{what}: ok"),
        Err(e) => format!("{what}: {e:?}"),
    };
    *OUTCOMES.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
}

fn bytes(len: u16, seed: u8) -> Vec<u8> {
    (0..len as usize).map(|i| (i as u8).wrapping_mul(31) ^ seed ^ 0x5a).collect()
}

/// Clips `[va, va + len)` to the user half; `None` if nothing is left.
fn clip(va: u64, len: u64) -> Option<VaRange> {
    let end = (va + len).min(USER_END);
    (end > va).then(|| range(va, end - va))
}

fn blocks_of(r: VaRange) -> impl Iterator<Item = u64> {
    (r.start() & !(HUGE - 1)..=r.last()).step_by(HUGE as usize)
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

fn allowed(r: &hmm_core::Result<()>, ok: &[Error], what: &str) -> Result<(), TestCaseError> {
    record(what, r);
    match r {
        Ok(()) => Ok(()),
        Err(e) if ok.contains(e) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!("{what}: unexpected error {e:?}"))),
    }
}

impl<'s> World<'s> {
    fn nspaces(&self) -> usize {
        self.spaces.iter().take_while(|s| s.get().is_some()).count()
    }

    /// Space `sp` among the live ones (all of them once every one is released).
    fn space(&mut self, sp: u8) -> (usize, &'s ModelSpace) {
        let n = self.nspaces();
        let live: Vec<usize> = (0..n).filter(|&i| !self.spaces[i].get().expect("space").is_released()).collect();
        let i = if live.is_empty() { sp as usize % n } else { live[sp as usize % live.len()] };
        self.touched.insert(i);
        (i, self.spaces[i].get().expect("space slot"))
    }

    fn register(&mut self, mi: usize, sp: usize, window: Option<u8>) -> Result<(), TestCaseError> {
        // The old mirror goes first (dropping a registered mirror with
        // entries is part of what is tested).
        self.slots[mi] = None;
        let space = self.spaces[sp].get().expect("space");
        let r = match window {
            None => user(),
            Some(a) => range(ANCHORS[a as usize % ANCHORS.len()] - 4 * MIB, 12 * MIB),
        };
        let m = match Mirror::new(space, &**self.alloc, device(space), r, MirrorConfig::default()) {
            Ok(m) => Box::pin(m),
            Err(e) => {
                check!(matches!(e, Error::Released | Error::NoMemory), "Mirror::new: unexpected {e:?}");
                check!(e != Error::Released || space.is_released(), "Mirror::new: Released on a live space");
                return Ok(());
            }
        };
        let reg = m.as_ref().register();
        allowed(&reg, &[Error::Released], "register")?;
        self.slots[mi] =
            Some(Slot { m, sp, dirty: BTreeSet::new(), known: BTreeSet::new(), faults: 0, registered: reg.is_ok() });
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Map { sp, at, len, kind, perm, fixed } => {
                let (_, space) = self.space(sp);
                let (mut va, mut len) = (at.va(), len.bytes());
                match kind {
                    MapKind::HugeTlb2M => {
                        va &= !(HUGE - 1);
                        len = len.div_ceil(HUGE) * HUGE;
                    }
                    // Populated at map time, page by page: keep them small.
                    MapKind::Mixed | MapKind::Io => len = len.min(64 * PAGE),
                    _ => {}
                }
                let Some(r) = clip(va, len) else { return Ok(()) };
                if fixed {
                    let u = space.unmap(r);
                    allowed(&u, &[Error::Unaligned, Error::NoMemory], "map: fixed unmap")?;
                }
                let kind = match kind {
                    MapKind::Anon => RegionKind::PrivateAnon,
                    MapKind::Thp => RegionKind::Thp,
                    MapKind::HugeTlb2M => RegionKind::HugeTlb2M,
                    MapKind::SharedAnon => RegionKind::SharedAnon,
                    MapKind::SharedFile => {
                        let file = SimFile::new(self.alloc, r.pages(12));
                        file.write(0, b"file").map_err(|e| TestCaseError::fail(format!("file: {e:?}")))?;
                        RegionKind::SharedFile { file, offset: 0 }
                    }
                    MapKind::Mixed => RegionKind::MixedMap,
                    MapKind::Io => RegionKind::Io,
                };
                let res = space.map(r.start(), r.pages(12) * PAGE, perm.flags(), kind).map(|_| ());
                allowed(&res, &[Error::Busy, Error::Unaligned, Error::NoMemory, Error::Released], "map")?;
            }
            Op::Unmap { sp, at, len } => {
                let (_, space) = self.space(sp);
                if let Some(r) = clip(at.va(), len.bytes()) {
                    allowed(&space.unmap(r), &[Error::Unaligned, Error::NoMemory], "unmap")?;
                }
            }
            Op::Clear { sp, at, len } => {
                let (_, space) = self.space(sp);
                if let Some(r) = clip(at.va(), len.bytes()) {
                    allowed(&space.clear(r), &[Error::Unaligned, Error::NoMemory], "clear")?;
                }
            }
            Op::Protect { sp, at, len, perm } => {
                let (_, space) = self.space(sp);
                if let Some(r) = clip(at.va(), len.bytes()) {
                    let res = space.protect(r, perm.flags());
                    allowed(&res, &[Error::Fault, Error::Unaligned, Error::NoMemory, Error::Released], "protect")?;
                }
            }
            Op::SplitHuge { sp, at, pages, protect } => {
                let (_, space) = self.space(sp);
                // A few pages strictly inside the block (never its first page).
                let block = at.va() & !(HUGE - 1);
                let first = (at.page as u64 % 500).max(1);
                let r = range(block + first * PAGE, pages as u64 * PAGE);
                let res = if protect { space.protect(r, R) } else { space.unmap(r) };
                allowed(&res, &[Error::Fault, Error::Unaligned, Error::NoMemory, Error::Released], "split")?;
            }
            Op::Fork { sp, write_in_child, at, seed } => {
                let (_, space) = self.space(sp);
                let n = self.nspaces();
                if n == MAX_SPACES {
                    // No room for another space: a CPU write instead.
                    let w = space.write_bytes(at.va(), &bytes(64, seed));
                    return allowed(&w, &[Error::Fault, Error::Perm, Error::NoMemory], "write");
                }
                match space.fork() {
                    Ok(child) => {
                        let view = child.table_view();
                        self.spaces[n].set(child).map_err(|_| TestCaseError::fail("space slot taken"))?;
                        self.views.push(view);
                        self.touched.insert(n);
                        let child = self.spaces[n].get().expect("child");
                        if let Some(in_child) = write_in_child {
                            let target = if in_child { child } else { space };
                            let w = target.write_bytes(at.va(), &bytes(64, seed));
                            allowed(&w, &[Error::Fault, Error::Perm, Error::NoMemory], "write after fork")?;
                        }
                    }
                    Err(e) => check!(matches!(e, Error::NoMemory | Error::Released), "fork: unexpected {e:?}"),
                }
            }
            Op::CpuWrite { sp, at, len, seed } => {
                let (_, space) = self.space(sp);
                let data = bytes(len, seed);
                let w = space.write_bytes(at.va(), &data);
                allowed(&w, &[Error::Fault, Error::Perm, Error::NoMemory], "write")?;
                if w.is_ok() {
                    let mut back = vec![0u8; data.len()];
                    space.read_bytes(at.va(), &mut back).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                    check!(back == data, "CPU write not read back at {:#x}", at.va());
                }
            }
            Op::CpuRead { sp, at, len } => {
                let (_, space) = self.space(sp);
                let mut buf = vec![0u8; len as usize];
                allowed(&space.read_bytes(at.va(), &mut buf), &[Error::Fault, Error::NoMemory], "read")?;
            }
            Op::Release { sp, last } => {
                let live = self.spaces.iter().filter_map(OnceCell::get).filter(|s| !s.is_released()).count();
                if live > 1 || last {
                    let (_, space) = self.space(sp);
                    space.release();
                }
            }
            Op::Register { mi, sp, window } => {
                let (sp, _) = self.space(sp);
                self.register(mi as usize % MAX_MIRRORS, sp, window)?;
            }
            Op::Unregister { mi } => {
                let Some(slot) = self.slots[mi as usize % MAX_MIRRORS].as_mut() else { return Ok(()) };
                let r = slot.m.unregister();
                if slot.registered {
                    check!(r.is_ok(), "unregister of a registered mirror: {r:?}");
                } else {
                    check!(r == Err(Error::Unregistered), "unregister of an unregistered mirror: {r:?}");
                }
                slot.registered = false;
                check!(slot.m.table_frames() == 0, "unregister keeps table frames");
                check!(slot.m.device().tlb_len() == 0, "unregister left device TLB entries");
            }
            Op::Fault { mi, at, len, write } => self.fault(mi, at, len, write)?,
            Op::DevRead { mi, at, len } => self.dev_access(mi, at, len, None)?,
            Op::DevWrite { mi, at, len, seed } => self.dev_access(mi, at, len, Some(seed))?,
            Op::Snapshot { mi, at, len } => self.snapshot(mi, at, len)?,
        }
        Ok(())
    }

    fn fault(&mut self, mi: u8, at: Addr, len: Len, write: bool) -> Result<(), TestCaseError> {
        let Some(slot) = self.slots[mi as usize % MAX_MIRRORS].as_mut() else { return Ok(()) };
        let Some(r) = clip(at.va(), len.bytes()) else { return Ok(()) };
        let space = self.spaces[slot.sp].get().expect("space");
        self.touched.insert(slot.sp);
        slot.dirty.extend(blocks_of(r));
        let res = slot.m.fault(r, write);
        let errs = [
            Error::Fault,
            Error::Perm,
            Error::OutOfRange,
            Error::Unregistered,
            Error::Released,
            Error::NoMemory,
            Error::Busy,
        ];
        allowed(&res, &errs, "fault")?;
        if !matches!(res, Err(Error::OutOfRange | Error::Unregistered)) {
            slot.faults += 1;
        }
        match res {
            Ok(()) => {
                FAULTS_OK.fetch_add(1, Ordering::Relaxed);
                if slot.sp > 0 {
                    CHILD_FAULTS_OK.fetch_add(1, Ordering::Relaxed);
                }
                check!(slot.registered && !space.is_released(), "fault succeeded on a dead mirror");
                // Every page of the range is mirrored exactly as the CPU maps it.
                let cpu = self.views[slot.sp].snapshot(r);
                for (i, p) in cpu.iter().enumerate() {
                    let va = r.start() + i as u64 * PAGE;
                    let e = slot.m.translate(va);
                    check!(p.is_valid(), "fault Ok but the CPU does not map {va:#x}");
                    if p.order() > 0 {
                        HUGE_PAGES_MIRRORED.fetch_add(1, Ordering::Relaxed);
                    }
                    check!(!write || p.is_write(), "write fault Ok but {va:#x} is read-only for the CPU");
                    let e = e.ok_or_else(|| TestCaseError::fail(format!("fault Ok but {va:#x} not mirrored")))?;
                    check!(
                        e.frame() == p.phys() && e.is_write() == p.is_write(),
                        "mirror {va:#x} -> {:#x} w={} but CPU {:#x} w={}",
                        e.frame(),
                        e.is_write(),
                        p.phys(),
                        p.is_write()
                    );
                }
            }
            Err(Error::Busy) => {
                BUSY.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::Released) => check!(space.is_released(), "Released from a live space"),
            Err(Error::Unregistered) => check!(!slot.registered, "Unregistered from a registered mirror"),
            Err(Error::OutOfRange) => check!(!slot.m.range().contains(&r), "OutOfRange for a range inside"),
            Err(_) => {
                FAULTS_ERR.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn dev_access(&mut self, mi: u8, at: Addr, len: u16, write: Option<u8>) -> Result<(), TestCaseError> {
        let Some(slot) = self.slots[mi as usize % MAX_MIRRORS].as_mut() else { return Ok(()) };
        let first = at.va() & !(PAGE - 1);
        let r = range(first, (at.va() + len as u64).next_multiple_of(PAGE) - first);
        let space = self.spaces[slot.sp].get().expect("space");
        self.touched.insert(slot.sp);
        slot.dirty.extend(blocks_of(r));
        let dev_faults = slot.m.device().counters().faults;
        let (res, data) = match write {
            None => match dmirror::read(&slot.m, at.va(), len as usize) {
                Ok(d) => (Ok(()), Some(d)),
                Err(e) => (Err(e), None),
            },
            Some(seed) => {
                let data = bytes(len, seed);
                (dmirror::write(&slot.m, at.va(), &data), Some(data))
            }
        };
        let calls = slot.m.device().counters().faults - dev_faults;
        let errs = [
            Error::Fault,
            Error::Perm,
            Error::OutOfRange,
            Error::Unregistered,
            Error::Released,
            Error::NoMemory,
            Error::Busy,
        ];
        allowed(&res, &errs, if write.is_some() { "device write" } else { "device read" })?;
        slot.faults += calls;
        if matches!(res, Err(Error::OutOfRange | Error::Unregistered)) {
            check!(calls >= 1, "validation error without a fault call");
            slot.faults -= 1;
        }
        if res == Err(Error::Busy) {
            BUSY.fetch_add(1, Ordering::Relaxed);
        }
        if let (Ok(()), Some(data)) = (res, data) {
            // The CPU reads what the device read (or wrote).
            let mut cpu = vec![0u8; len as usize];
            let c = space.read_bytes(at.va(), &mut cpu);
            check!(c.is_ok(), "device accessed {:#x}+{len} but the CPU cannot read it: {c:?}", at.va());
            check!(cpu == data, "device and CPU disagree at {:#x}+{len} (write={})", at.va(), write.is_some());
            DEV_READ_COMPARED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn snapshot(&mut self, mi: u8, at: Addr, len: Len) -> Result<(), TestCaseError> {
        let Some(slot) = self.slots[mi as usize % MAX_MIRRORS].as_ref() else { return Ok(()) };
        let Some(r) = clip(at.va(), len.bytes()) else { return Ok(()) };
        let space = self.spaces[slot.sp].get().expect("space");
        self.touched.insert(slot.sp);
        let mut out = vec![Pfn(0x1234); r.pages(12) as usize];
        let res = slot.m.snapshot(r, &mut out);
        allowed(&res, &[Error::OutOfRange, Error::Unregistered, Error::Released], "snapshot")?;
        match res {
            Ok(()) => {
                check!(slot.registered && !space.is_released(), "snapshot Ok on a dead mirror");
                let want = expected_snapshot(space, r);
                for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                    check!(
                        got == want,
                        "snapshot page {:#x}: got {got:x?}, want {want:x?}",
                        r.start() + i as u64 * PAGE
                    );
                }
                SNAPSHOTS_COMPARED.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::OutOfRange) => check!(!slot.m.range().contains(&r), "snapshot OutOfRange inside"),
            Err(Error::Unregistered) => check!(!slot.registered, "snapshot Unregistered while registered"),
            Err(_) => check!(space.is_released(), "snapshot Released on a live space"),
        }
        Ok(())
    }

    /// The invariants that hold after every step.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let n = self.nspaces();
        let mut registered = vec![0usize; n];
        for slot in self.slots.iter_mut().flatten() {
            let c = slot.m.device().counters();
            check!(c.stale == 0, "device used a stale translation ({} times)", c.stale);
            let space = self.spaces[slot.sp].get().expect("space");
            let view = &self.views[slot.sp];
            if slot.registered {
                registered[slot.sp] += 1;
            }
            // Coherence and exact directory accounting: every dirty block
            // page by page, then every page known to hold an entry.
            let mut pages: BTreeSet<u64> = std::mem::take(&mut slot.known);
            for block in std::mem::take(&mut slot.dirty) {
                for i in 0..HUGE / PAGE {
                    if slot.m.translate(block + i * PAGE).is_some() {
                        pages.insert(block + i * PAGE);
                    }
                }
            }
            let mut dirs: [HashSet<u64>; 3] = Default::default();
            let mut cpu: Option<(u64, Vec<Pfn>)> = None;
            for va in pages {
                let Some(e) = slot.m.translate(va) else { continue };
                let block = va & !(HUGE - 1);
                if cpu.as_ref().is_none_or(|(b, _)| *b != block) {
                    cpu = Some((block, view.snapshot(range(block, HUGE))));
                }
                let p = cpu.as_ref().expect("cpu snapshot").1[((va - block) / PAGE) as usize];
                check!(
                    p.is_valid() && p.phys() == e.frame() && (p.is_write() || !e.is_write()),
                    "mirror entry {va:#x} -> {:#x} (w={}) but the CPU has {p:x?}",
                    e.frame(),
                    e.is_write()
                );
                // A 2 MiB entry needs no leaf table.
                for (l, d) in dirs.iter_mut().enumerate().skip(e.order().min(1) as usize) {
                    d.insert(va >> (21 + 9 * l));
                }
                slot.known.insert(va);
            }
            let entries = slot.known.len() as u64;
            ENTRIES_CHECKED.fetch_add(entries, Ordering::Relaxed);
            let frames = slot.m.table_frames();
            if slot.registered {
                let want = 1 + dirs.iter().map(HashSet::len).sum::<usize>();
                check!(frames == want, "mirror holds {frames} table frames, its {entries} entries need {want}");
            } else {
                check!(frames == 0 && entries == 0, "unregistered mirror holds {frames} frames, {entries} entries");
            }
            if space.is_released() {
                check!(entries == 0, "mirror of a released space holds {entries} entries");
            }
            let s = slot.m.stats();
            check!(s.faults == slot.faults, "stats.faults {} but {} faults passed validation", s.faults, slot.faults);
            check!(s.pages_invalidated <= s.pages_mapped, "stats: {s:?}");
            check!(s.invalidations <= s.pages_invalidated, "stats: {s:?}");
            check!(entries <= s.pages_mapped - s.pages_invalidated, "{entries} entries but stats {s:?}");
        }
        for (i, (cell, view)) in self.spaces.iter().zip(&self.views).enumerate().take(n) {
            let space = cell.get().expect("space");
            if self.touched.remove(&i) {
                space.check_tables();
            }
            let reg = space.notifiers();
            check!(
                reg.len() == registered[i],
                "space {i}: {} notifiers, {} mirrors registered",
                reg.len(),
                registered[i]
            );
            check!(reg.seq() % 2 == 0, "space {i}: odd sequence while idle");
            check!(view.root() == space.root(), "view root");
        }
        Ok(())
    }
}

/// What `Mirror::snapshot` must report: the oracle's leaves, with ERROR
/// wherever the device may not go (no region, an IO region, no read
/// permission).
fn expected_snapshot(space: &ModelSpace, r: VaRange) -> Vec<Pfn> {
    let regions = space.regions();
    let mut want = space.oracle().expected_pfns(r);
    for (i, w) in want.iter_mut().enumerate() {
        let va = r.start() + i as u64 * PAGE;
        let region = regions.iter().find(|g| g.range.contains_addr(va));
        let inaccessible = region.is_none_or(|g| g.flags.contains(RegionFlags::IO) || !g.flags.contains(R));
        if inaccessible {
            *w = Pfn::ERROR_ENTRY;
        }
    }
    want
}

fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
    let alloc = CountingAllocator::with_size(RAM);
    {
        let spaces: [OnceCell<ModelSpace>; MAX_SPACES] = Default::default();
        let first = ModelSpace::new(&alloc).map_err(|e| TestCaseError::fail(format!("space: {e:?}")))?;
        let view = first.table_view();
        let _ = spaces[0].set(first);
        let mut w = World {
            alloc: &alloc,
            spaces: &spaces,
            views: vec![view],
            slots: (0..MAX_MIRRORS).map(|_| None).collect(),
            touched: BTreeSet::from([0]),
        };
        w.register(0, 0, None)?;
        w.check()?;
        for (i, op) in ops.iter().enumerate() {
            STEPS.fetch_add(1, Ordering::Relaxed);
            w.step(op).map_err(|e| TestCaseError::fail(format!("step {i} {op:?}: {e}")))?;
            w.check().map_err(|e| TestCaseError::fail(format!("after step {i} {op:?}: {e}")))?;
        }
        // Mirrors go before the spaces they borrow.
        drop(w);
    }
    check!(alloc.live() == 0, "{} allocations leaked", alloc.live());
    Ok(())
}

#[test]
fn random_kernel_and_device_operations_keep_the_mirrors_coherent() {
    let cases = std::env::var("HMM_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES);
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/model_based.txt"
        )))),
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&ops(), |ops| run_case(&ops));
    let steps = STEPS.load(Ordering::Relaxed);
    println!(
        "model-based: {cases} cases, {steps} steps in {:.1?}; faults ok {} / failed {} / busy {}; \
         device accesses compared with the CPU {}; snapshots compared {}; mirror entries checked {}; \
         faults ok in fork children {}; pages of 2 MiB leaves mirrored {}",
        started.elapsed(),
        FAULTS_OK.load(Ordering::Relaxed),
        FAULTS_ERR.load(Ordering::Relaxed),
        BUSY.load(Ordering::Relaxed),
        DEV_READ_COMPARED.load(Ordering::Relaxed),
        SNAPSHOTS_COMPARED.load(Ordering::Relaxed),
        ENTRIES_CHECKED.load(Ordering::Relaxed),
        CHILD_FAULTS_OK.load(Ordering::Relaxed),
        HUGE_PAGES_MIRRORED.load(Ordering::Relaxed),
    );
    for (k, v) in OUTCOMES.lock().unwrap().iter() {
        println!("  {k}: {v}");
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}
