//! The mirror at hardware granularity (commit 63057fe): a CPU leaf of 2 MiB or
//! 1 GiB becomes one device entry where the device format has a leaf of that
//! size, and is split into the largest leaves that fit otherwise; a partial
//! invalidation drops a huge entry whole; directories (and, in formats
//! without spare directory bits, their companion frames) go back to the
//! allocator; a fault makes one kernel handler call per missing run.
//!
//! Every scenario asserts exact entry, frame and call counts. Run with
//! `--nocapture` to see the per-2 MiB figures.

mod common;

use common::geometries::{L4No1G, L4Pages, Six48, Six57, Three36};
use common::*;
use core::marker::PhantomData;
use core::pin::pin;
use hmm_core::arch::soft::SoftFormat;
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{DeviceFormat, LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::pt::{Cleared, MapError, MirrorEntry, MirrorTable, Reclaim, TableStats, TableWriter};
use hmm_core::sync::SpinLock;
use hmm_core::{DeviceOps, Error, Event, Mirror, MirrorConfig, MirrorStats, VaRange};
use hmm_testkit::dmirror;
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Device geometries and formats used below.

/// Format `F` with its live counts kept in companion frames (one per
/// directory table) instead of spare directory-entry bits.
struct Companion<F>(PhantomData<fn() -> F>);

// SAFETY: every function delegates to `F`, whose `PteFormat` contract holds;
// the geometry is `F`'s, so the levels and alignments it speaks of are the
// same. Nothing is added or changed.
unsafe impl<F: PteFormat> PteFormat for Companion<F> {
    type Geometry = F::Geometry;
    const DIRECTORY: LeafFlags = F::DIRECTORY;

    fn decode(raw: u64, level: usize) -> PteView {
        F::decode(raw, level)
    }

    fn encode(view: &PteView, level: usize) -> hmm_core::Result<u64> {
        F::encode(view, level)
    }

    fn opaque_bits(raw: u64, level: usize) -> u64 {
        F::opaque_bits(raw, level)
    }
}

// SAFETY: items 1 and 2 of the `DeviceFormat` contract are about `encode`
// with `DIRECTORY` and the leaf flags, both exactly `F`'s, for which `F`
// guarantees them; item 3 applies only with `COUNT_SHIFT = Some`, and here it
// is `None` (no directory bit is claimed).
unsafe impl<F: DeviceFormat> DeviceFormat for Companion<F> {
    const COUNT_SHIFT: Option<u32> = None;
}

// ---------------------------------------------------------------------------
// Helpers.

type Soft4 = SoftFormat<X86_64Level4>;
type AnyMirror<'s, F, D = Dev> = Mirror<'s, ModelSpace, D, CountingAllocator, F, SpinLock>;

/// A mirror of `r` in device format `F` (registered by the caller).
fn mirror_in<'s, F: DeviceFormat, D: DeviceOps>(
    space: &'s ModelSpace,
    alloc: &'s CountingAllocator,
    dev: D,
    r: VaRange,
) -> AnyMirror<'s, F, D> {
    Mirror::with_format(space, alloc, dev, r, MirrorConfig::default()).expect("mirror")
}

/// One device leaf found by walking page by page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leaf {
    order: u32,
    frame: u64,
    write: bool,
}

/// The device leaves over `r`, by base address, found by translating every
/// page; panics if the pages of one leaf disagree (frame, order, write).
fn device_leaves(r: VaRange, translate: impl Fn(u64) -> Option<MirrorEntry>) -> BTreeMap<u64, Leaf> {
    let mut out: BTreeMap<u64, Leaf> = BTreeMap::new();
    for i in 0..r.pages(12) {
        let va = r.start() + i * PAGE;
        let Some(e) = translate(va) else { continue };
        let base = va & !((PAGE << e.order()) - 1);
        let leaf = Leaf { order: e.order(), frame: e.frame() - (va - base), write: e.is_write() };
        let old = *out.entry(base).or_insert(leaf);
        assert_eq!(old, leaf, "pages of the leaf at {base:#x} disagree (page {va:#x})");
    }
    out
}

/// Level of a leaf of `order` in geometry `G`.
fn level_of<G: PagingGeometry>(order: u32) -> usize {
    (0..G::LEVELS).find(|&l| G::level_shift(l) == 12 + order).unwrap_or_else(|| panic!("no level of order {order}"))
}

/// Frames a table of geometry `G` holding exactly `leaves` must have: the
/// root and every table on a path to a leaf, plus one companion per table
/// above level 0 when the counts live in companions.
fn expected_frames<G: PagingGeometry>(leaves: &BTreeMap<u64, Leaf>, companions: bool) -> usize {
    let top = G::LEVELS - 1;
    let mut tables = BTreeSet::from([(top, 0u64)]);
    for (&va, leaf) in leaves {
        for l in level_of::<G>(leaf.order)..top {
            tables.insert((l, va >> G::level_shift(l + 1)));
        }
    }
    let with_companion = if companions { tables.iter().filter(|(l, _)| *l >= 1).count() } else { 0 };
    tables.len() + with_companion
}

/// Asserts the device table's counters agree with the leaves found by
/// walking it, and its frames with what those leaves need.
fn assert_table_exact<G: PagingGeometry>(stats: TableStats, leaves: &BTreeMap<u64, Leaf>, companions: bool) {
    let huge = leaves.values().filter(|l| l.order > 0).count() as u64;
    assert_eq!(stats.leaves, leaves.len() as u64, "live leaves");
    assert_eq!(stats.huge_leaves, huge, "huge leaves");
    assert_eq!(stats.frames, expected_frames::<G>(leaves, companions), "table frames for {} leaves", leaves.len());
}

/// Every page of `r` is mirrored to the frame the CPU maps, with the CPU's
/// write permission.
fn assert_same_as_cpu(space: &ModelSpace, r: VaRange, translate: impl Fn(u64) -> Option<MirrorEntry>) {
    let cpu = space.table_view().snapshot(r);
    for (i, p) in cpu.iter().enumerate() {
        let va = r.start() + i as u64 * PAGE;
        assert!(p.is_valid(), "CPU does not map {va:#x}");
        let e = translate(va).unwrap_or_else(|| panic!("device does not map {va:#x}"));
        assert_eq!(e.frame(), p.phys(), "frame at {va:#x}");
        assert_eq!(e.is_write(), p.is_write(), "write permission at {va:#x}");
    }
}

/// The order of every device entry over `r`, as a histogram (order -> pages).
fn orders(r: VaRange, translate: impl Fn(u64) -> Option<MirrorEntry>) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for i in 0..r.pages(12) {
        if let Some(e) = translate(r.start() + i * PAGE) {
            *out.entry(e.order()).or_insert(0) += 1;
        }
    }
    out
}

fn delta(after: MirrorStats, before: MirrorStats) -> MirrorStats {
    MirrorStats {
        faults: after.faults - before.faults,
        retries: after.retries - before.retries,
        handler_calls: after.handler_calls - before.handler_calls,
        pages_mapped: after.pages_mapped - before.pages_mapped,
        entries_mapped: after.entries_mapped - before.entries_mapped,
        huge_mapped: after.huge_mapped - before.huge_mapped,
        invalidations: after.invalidations - before.invalidations,
        pages_invalidated: after.pages_invalidated - before.pages_invalidated,
    }
}

/// What a fault that mapped `pages` pages as `entries` entries (`huge` of
/// them huge) with `calls` handler calls reports.
fn mapped(calls: u64, pages: u64, entries: u64, huge: u64) -> MirrorStats {
    MirrorStats {
        faults: 1,
        handler_calls: calls,
        pages_mapped: pages,
        entries_mapped: entries,
        huge_mapped: huge,
        ..MirrorStats::default()
    }
}

/// A device that logs every callback.
#[derive(Default)]
struct LogDevice {
    log: Mutex<Vec<Call>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Update(VaRange),
    Invalidate(VaRange, Event),
    Flush(VaRange),
}

impl LogDevice {
    fn new() -> Self {
        Self { log: Mutex::new(Vec::with_capacity(1024)) }
    }
    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl DeviceOps for LogDevice {
    fn update(&self, range: VaRange) -> Result<(), i32> {
        self.log.lock().unwrap().push(Call::Update(range));
        Ok(())
    }
    fn invalidate(&self, range: VaRange, event: Event) {
        self.log.lock().unwrap().push(Call::Invalidate(range, event));
    }
    fn flush(&self, range: VaRange) {
        self.log.lock().unwrap().push(Call::Flush(range));
    }
}

// ---------------------------------------------------------------------------
// a. A 2 MiB CPU leaf is one device entry.

#[test]
fn a_2m_cpu_leaf_is_one_device_entry() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 2 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        assert_eq!(m.table_stats(), TableStats { frames: 1, leaves: 0, huge_leaves: 0 }, "an empty table is its root");
        m.fault(buf, true).unwrap();
        assert_eq!(space.table_view().entry_at(buf.start()).1, 1, "the CPU maps a 2 MiB leaf");
        assert_eq!(m.stats(), mapped(1, 512, 1, 1));
        for i in 0..512 {
            let va = buf.start() + i * PAGE;
            let e = m.translate(va).unwrap_or_else(|| panic!("{va:#x} not mirrored"));
            assert_eq!(e.order(), 9, "page {i} is part of a 2 MiB entry");
            assert!(e.is_write());
        }
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        // Root (level 3), the level-2 directory and the level-1 table that
        // holds the 2 MiB leaf: no level-0 table.
        let stats = m.table_stats();
        assert_eq!(stats, TableStats { frames: 3, leaves: 1, huge_leaves: 1 });
        assert_eq!(m.translate(buf.start() - PAGE), None);
        assert_eq!(m.translate(buf.last() + 1), None);
        println!(
            "2 MiB CPU leaf -> {} device entry ({} B of entries); table of an isolated 2 MiB leaf: {} frames = {} B \
             (root + 2 directories, no leaf table)",
            stats.leaves,
            stats.leaves * 8,
            stats.frames,
            stats.frames * 4096
        );
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// The marginal cost: contiguous 2 MiB leaves share their directories, so
/// each costs one 8-byte entry of the level-1 table and no frame.
#[test]
fn contiguous_2m_leaves_share_their_directories() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 32 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        m.fault(buf, false).unwrap();
        assert_eq!(m.stats(), mapped(1, 16 * 512, 16, 16));
        let stats = m.table_stats();
        assert_eq!(stats, TableStats { frames: 3, leaves: 16, huge_leaves: 16 });
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(9, 16 * 512)]));
        println!(
            "16 contiguous 2 MiB CPU leaves -> {} entries, {} frames = {} B in all: 1 entry (8 B) and {} B of table \
             per 2 MiB (old design: 512 entries, 4,120 B)",
            stats.leaves,
            stats.frames,
            stats.frames * 4096,
            stats.frames * 4096 / 16
        );
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

// ---------------------------------------------------------------------------
// b. A 1 GiB CPU leaf is one device entry.

#[test]
fn a_1g_cpu_leaf_is_one_device_entry() {
    let (alloc, space) = kernel(3 << 30);
    let buf = space.map(GIB, GIB, RW, RegionKind::HugeTlb1G).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        // Ask for two pages in the middle: the whole leaf comes.
        m.fault(range(GIB + 300 * MIB, 2 * PAGE), true).unwrap();
        assert_eq!(space.table_view().entry_at(buf.start()).1, 2, "the CPU maps a 1 GiB leaf");
        assert_eq!(m.stats(), mapped(1, 1 << 18, 1, 1));
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(18, 1 << 18)]));
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        // Root and the level-2 table that holds the 1 GiB leaf.
        let stats = m.table_stats();
        assert_eq!(stats, TableStats { frames: 2, leaves: 1, huge_leaves: 1 });
        println!(
            "1 GiB CPU leaf -> {} device entry; table: {} frames = {} B",
            stats.leaves,
            stats.frames,
            stats.frames * 4096
        );
        // Unmapping it drops the one entry and both directories below the root.
        space.unmap(buf).unwrap();
        assert_eq!(m.stats().pages_invalidated, 1 << 18);
        assert_eq!(m.stats().invalidations, 1);
        assert_eq!(m.table_stats(), TableStats { frames: 1, leaves: 0, huge_leaves: 0 });
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// Without 1 GiB device leaves, a 1 GiB CPU leaf becomes 512 2 MiB entries.
#[test]
fn a_1g_cpu_leaf_becomes_512_2m_entries_without_1g_device_leaves() {
    let (alloc, space) = kernel(3 << 30);
    let buf = space.map(GIB, GIB, RW, RegionKind::HugeTlb1G).unwrap();
    {
        let m = pin!(mirror_in::<SoftFormat<L4No1G>, _>(&space, &alloc, device(&space), user()));
        m.as_ref().register().unwrap();
        m.fault(buf, true).unwrap();
        assert_eq!(m.stats(), mapped(1, 1 << 18, 512, 512));
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(9, 1 << 18)]));
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        let leaves = device_leaves(buf, |va| m.translate(va));
        assert_eq!(leaves.len(), 512);
        assert_table_exact::<L4No1G>(m.table_stats(), &leaves, false);
        assert_eq!(m.table_stats().frames, 3);
        space.unmap(buf).unwrap();
        assert_eq!(m.stats().pages_invalidated, 1 << 18);
        assert_eq!(m.table_stats(), TableStats { frames: 1, leaves: 0, huge_leaves: 0 });
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

// ---------------------------------------------------------------------------
// c. A fault on part of a huge leaf.

/// The leaf lies whole in the mirror: a one-page fault maps all of it, as
/// one entry, and the device is told about the whole 2 MiB.
#[test]
fn a_one_page_fault_maps_the_whole_2m_leaf() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 4 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    let first = range(GIB, 2 * MIB);
    {
        let m = pin!(mirror_in::<Soft4, _>(&space, &alloc, LogDevice::new(), user()));
        m.as_ref().register().unwrap();
        let page = range(GIB + 77 * PAGE, PAGE);
        m.fault(page, false).unwrap();
        assert_eq!(m.stats(), mapped(1, 512, 1, 1), "one handler call for the missing page, then one entry");
        assert_eq!(space.handle_fault_calls(), 1);
        assert_eq!(m.device().take(), vec![Call::Update(first)], "update covers the whole leaf");
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(9, 512)]), "the second leaf is not mapped");
        assert_same_as_cpu(&space, first, |va| m.translate(va));
        assert_eq!(m.table_stats(), TableStats { frames: 3, leaves: 1, huge_leaves: 1 });
        // The second leaf is already populated by the CPU: a fault on its
        // last page maps it whole without calling the kernel.
        space.write_bytes(buf.last() - 7, &[1; 8]).unwrap();
        let before = m.stats();
        m.fault(range(buf.last() + 1 - PAGE, PAGE), true).unwrap();
        assert_eq!(delta(m.stats(), before), mapped(0, 512, 1, 1));
        assert_eq!(m.device().take(), vec![Call::Update(range(GIB + 2 * MIB, 2 * MIB))]);
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        assert_eq!(m.table_stats(), TableStats { frames: 3, leaves: 2, huge_leaves: 2 });
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// The mirror covers only part of two 2 MiB leaves: the pages inside it are
/// mapped with 4 KiB entries, nothing outside it.
#[test]
fn a_mirror_covering_part_of_a_2m_leaf_maps_4k_entries_inside_only() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 4 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    // Populate both leaves from the CPU.
    space.write_bytes(buf.start(), &[1]).unwrap();
    space.write_bytes(buf.start() + 2 * MIB, &[2]).unwrap();
    let inside = range(GIB + MIB, 2 * MIB);
    {
        let m = pin!(mirror_in::<Soft4, _>(&space, &alloc, LogDevice::new(), inside));
        m.as_ref().register().unwrap();
        // One page: one 4 KiB entry, the leaf is not widened.
        m.fault(range(GIB + MIB + 5 * PAGE, PAGE), true).unwrap();
        assert_eq!(m.stats(), mapped(0, 1, 1, 0));
        assert_eq!(m.device().take(), vec![Call::Update(range(GIB + MIB + 5 * PAGE, PAGE))]);
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(0, 1)]));
        // The whole mirror: 256 pages of each leaf, 4 KiB entries.
        let before = m.stats();
        m.fault(inside, true).unwrap();
        assert_eq!(delta(m.stats(), before), mapped(0, 512, 512, 0));
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(0, 512)]), "nothing outside the mirror");
        assert_same_as_cpu(&space, inside, |va| m.translate(va));
        assert_eq!(m.device().take(), vec![Call::Update(inside)]);
        for va in [buf.start(), GIB + MIB - PAGE, GIB + 3 * MIB, buf.last() + 1 - PAGE] {
            assert_eq!(m.translate(va), None, "{va:#x} is outside the mirror");
        }
        let leaves = device_leaves(buf, |va| m.translate(va));
        assert_table_exact::<X86_64Level4>(m.table_stats(), &leaves, false);
        // Root, level 2, level 1, and one level-0 table per 2 MiB.
        assert_eq!(m.table_stats(), TableStats { frames: 5, leaves: 512, huge_leaves: 0 });
        // The CPU drops the first leaf (hugetlb: whole leaves only): the
        // mirror drops exactly its 256 pages and one leaf table.
        space.unmap(range(GIB, 2 * MIB)).unwrap();
        assert_eq!(m.stats().pages_invalidated, 256);
        assert_eq!(m.table_stats(), TableStats { frames: 4, leaves: 256, huge_leaves: 0 });
        let log = m.device().take();
        assert_eq!(
            log,
            vec![Call::Invalidate(range(GIB + MIB, MIB), Event::Unmap), Call::Flush(range(GIB + MIB, MIB))]
        );
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

// ---------------------------------------------------------------------------
// d. Partial unmap of a mirrored huge leaf.

#[test]
fn unmapping_one_page_of_a_mirrored_2m_leaf_drops_the_whole_entry() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    let data = pattern(2 * MIB as usize, 0x3c);
    space.write_bytes(buf.start(), &data).unwrap();
    assert_eq!(space.table_view().entry_at(buf.start()).1, 1, "the CPU maps a transparent huge page");
    let hole = buf.start() + 256 * PAGE;
    let (live_before_drop, frames_at_drop) = {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, buf.start(), data.len()).unwrap(), data);
        assert_eq!(m.stats(), mapped(0, 512, 1, 1));
        assert_eq!(m.table_stats(), TableStats { frames: 3, leaves: 1, huge_leaves: 1 });
        assert_eq!(m.device().tlb_len(), 512, "the device cached every page");
        let c0 = counters(&m);
        let events0 = m.device().events().len();

        space.unmap(range(hole, PAGE)).unwrap();
        // The whole entry went: one invalidation of 512 pages, the device
        // told to invalidate and flush the whole 2 MiB (once).
        let s = m.stats();
        assert_eq!((s.invalidations, s.pages_invalidated), (1, 512));
        let events = m.device().events();
        assert_eq!(&events[events0..], &[(buf, Event::Unmap)]);
        let c1 = counters(&m);
        assert_eq!(c1.flushes, c0.flushes + 1);
        assert_eq!(m.device().tlb_len(), 0, "the flush covered the whole leaf");
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::new(), "no page of the old entry is left");
        // Both directories below the root were emptied, unlinked and freed.
        assert_eq!(m.table_stats(), TableStats { frames: 1, leaves: 0, huge_leaves: 0 });
        assert_eq!(space.table_view().entry_at(buf.start()).1, 0, "the CPU split its leaf");

        // The rest refaults, now as 4 KiB entries, with no kernel call.
        let low = range(buf.start(), 256 * PAGE);
        let high = range(hole + PAGE, 255 * PAGE);
        let before = m.stats();
        m.fault(low, false).unwrap();
        m.fault(high, true).unwrap();
        let d = delta(m.stats(), before);
        assert_eq!((d.faults, d.handler_calls, d.pages_mapped, d.entries_mapped, d.huge_mapped), (2, 0, 511, 511, 0));
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(0, 511)]));
        assert_eq!(m.translate(hole), None);
        assert_same_as_cpu(&space, low, |va| m.translate(va));
        assert_same_as_cpu(&space, high, |va| m.translate(va));
        assert_eq!(m.table_stats(), TableStats { frames: 4, leaves: 511, huge_leaves: 0 });
        // The device reads the right data through the new entries.
        let hole_off = (hole - buf.start()) as usize;
        assert_eq!(dmirror::read(&m, buf.start(), hole_off).unwrap(), &data[..hole_off]);
        assert_eq!(
            dmirror::read(&m, hole + PAGE, data.len() - hole_off - PAGE as usize).unwrap(),
            &data[hole_off + 4096..]
        );
        // The hole itself is a fault, and the failed fault maps nothing.
        assert_eq!(m.fault(range(hole, PAGE), false), Err(Error::Fault));
        assert_eq!(m.table_stats().leaves, 511);
        let c = counters(&m);
        assert_eq!(c.stale, 0);
        (alloc.live(), m.table_frames())
    };
    assert_eq!(frames_at_drop, 4);
    assert_eq!(alloc.live(), live_before_drop - frames_at_drop, "dropping the mirror returned exactly its frames");
    space.check_tables();
    drop(space);
    assert_eq!(alloc.live(), 0);
}

// ---------------------------------------------------------------------------
// e. A device format without huge leaves.

#[test]
fn a_format_without_huge_leaves_splits_a_2m_leaf_into_512_entries() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 2 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    {
        let m = pin!(mirror_in::<SoftFormat<L4Pages>, _>(&space, &alloc, device(&space), user()));
        m.as_ref().register().unwrap();
        m.fault(range(GIB + MIB, PAGE), true).unwrap();
        assert_eq!(m.stats(), mapped(1, 512, 512, 0), "the whole leaf, in 4 KiB entries");
        assert_eq!(orders(buf, |va| m.translate(va)), BTreeMap::from([(0, 512)]));
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        let stats = m.table_stats();
        // Root, level 2, level 1 and one full level-0 table.
        assert_eq!(stats, TableStats { frames: 4, leaves: 512, huge_leaves: 0 });
        assert_table_exact::<L4Pages>(stats, &device_leaves(buf, |va| m.translate(va)), false);
        println!(
            "2 MiB CPU leaf, device format without huge leaves -> {} entries, {} frames = {} B ({} B of them the \
             leaf table)",
            stats.leaves,
            stats.frames,
            stats.frames * 4096,
            4096
        );
        space.unmap(buf).unwrap();
        assert_eq!((m.stats().invalidations, m.stats().pages_invalidated), (1, 512));
        assert_eq!(m.table_stats(), TableStats { frames: 1, leaves: 0, huge_leaves: 0 });
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

// ---------------------------------------------------------------------------
// f. Device geometries unlike the CPU's.

/// Maps 4 KiB pages (writable and read-only), a transparent huge page and
/// two hugetlb pages, mirrors them in `SoftFormat<G>`, and checks every
/// translation against the CPU, the entry sizes (`order_2m`: the order of
/// the entries a 2 MiB CPU leaf becomes), and the table's frames; then
/// unmaps everything and checks the table shrinks back to its root.
fn mirror_in_foreign_geometry<G: PagingGeometry>(mirror_range: VaRange, order_2m: u32) {
    let (alloc, space) = kernel(64 * MIB);
    let base = GIB;
    let small = space.map(base, 16 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let ro = space.map(base + 32 * PAGE, 3 * PAGE, R, RegionKind::PrivateAnon).unwrap();
    let thp = space.map(base + 2 * MIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    let tlb = space.map(base + 4 * MIB, 4 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    space.write_bytes(small.start() + 3 * PAGE, b"x").unwrap();
    space.write_bytes(thp.start(), b"y").unwrap();
    assert_eq!(space.table_view().entry_at(thp.start()).1, 1);
    let all = range(base, 8 * MIB);
    let (live_before_drop, frames_at_drop) = {
        let m = pin!(mirror_in::<SoftFormat<G>, _>(&space, &alloc, device(&space), mirror_range));
        m.as_ref().register().unwrap();
        for r in [small, thp, tlb] {
            m.fault(r, true).unwrap();
        }
        m.fault(ro, false).unwrap();
        for r in [small, ro, thp, tlb] {
            assert_same_as_cpu(&space, r, |va| m.translate(va));
        }
        let per_2m = 1u64 << (9 - order_2m);
        let want = BTreeMap::from([(0, 19), (order_2m, 3 * 512)]);
        assert_eq!(orders(all, |va| m.translate(va)), want);
        let s = m.stats();
        assert_eq!((s.pages_mapped, s.entries_mapped), (19 + 3 * 512, 19 + 3 * per_2m));
        let leaves = device_leaves(all, |va| m.translate(va));
        assert_eq!(leaves.len() as u64, 19 + 3 * per_2m);
        assert_table_exact::<G>(m.table_stats(), &leaves, false);
        assert_eq!(m.device().counters().stale, 0);
        // Unmap one page of the transparent huge page: the device entry
        // holding it goes whole (all 2 MiB when the device has 2 MiB
        // leaves); the other entries of the leaf stay, still right (the
        // CPU split keeps their frames).
        space.unmap(range(thp.start() + PAGE, PAGE)).unwrap();
        let gone = PAGE << order_2m;
        assert_eq!(m.stats().pages_invalidated, gone / PAGE);
        let kept = 512 - gone / PAGE;
        let mut want = BTreeMap::new();
        if kept > 0 {
            want.insert(order_2m, kept);
            assert_same_as_cpu(&space, range(thp.start() + gone, kept * PAGE), |va| m.translate(va));
        }
        assert_eq!(orders(thp, |va| m.translate(va)), want);
        let leaves = device_leaves(all, |va| m.translate(va));
        assert_table_exact::<G>(m.table_stats(), &leaves, false);
        m.fault(range(thp.start() + 2 * PAGE, 10 * PAGE), false).unwrap();
        want.insert(0, 10);
        assert_eq!(orders(thp, |va| m.translate(va)), want, "the CPU split the leaf: 4 KiB entries");
        assert_same_as_cpu(&space, range(thp.start() + 2 * PAGE, 10 * PAGE), |va| m.translate(va));
        space.unmap(all).unwrap();
        assert_eq!(orders(all, |va| m.translate(va)), BTreeMap::new());
        assert_eq!(m.table_stats(), TableStats { frames: 1, leaves: 0, huge_leaves: 0 }, "back to the root");
        assert_eq!(m.device().counters().stale, 0);
        (alloc.live(), m.table_frames())
    };
    assert_eq!(alloc.live(), live_before_drop - frames_at_drop);
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn six_levels_over_57_bits_mirror_like_the_cpu() {
    mirror_in_foreign_geometry::<Six57>(user(), 9);
}

#[test]
fn six_levels_of_64_entries_split_2m_into_256k_entries() {
    mirror_in_foreign_geometry::<Six48>(user(), 6);
}

#[test]
fn three_levels_of_mixed_widths_mirror_like_the_cpu() {
    mirror_in_foreign_geometry::<Three36>(range(0, 1 << 36), 9);
}

#[test]
fn a_mirror_range_the_device_geometry_cannot_translate_is_refused() {
    let (alloc, space) = kernel(16 * MIB);
    let before = alloc.live();
    let m = Mirror::<_, _, _, SoftFormat<Three36>, SpinLock>::with_format(
        &space,
        &*alloc,
        device(&space),
        user(),
        MirrorConfig::default(),
    );
    assert_eq!(m.err(), Some(Error::OutOfRange));
    assert_eq!(alloc.live(), before);
}

// ---------------------------------------------------------------------------
// g. Live counts in companion frames.

type CompanionL4 = Companion<X86_64Level4>;

fn stats_of<F: DeviceFormat>(w: &TableWriter<F>) -> TableStats {
    w.stats()
}

/// Clears `r`, has the (absent) device flush, frees what was unlinked, and
/// repeats while `Reclaim` overflowed; returns the totals and the passes.
fn clear_all<F: DeviceFormat>(
    w: &mut TableWriter<F>,
    t: &MirrorTable<F>,
    alloc: &CountingAllocator,
    r: VaRange,
) -> (Cleared, usize) {
    let phys = &**alloc.phys();
    let mut reclaim = Reclaim::new();
    let mut total = Cleared::default();
    let mut passes = 0;
    loop {
        passes += 1;
        let c = w.clear(phys, r, &mut reclaim);
        total.entries += c.entries;
        total.pages += c.pages;
        total.extent = match (total.extent, c.extent) {
            (Some(a), Some(b)) => Some(a.hull(&b)),
            (a, b) => a.or(b),
        };
        let more = reclaim.overflowed();
        w.reclaim(t, alloc, &mut reclaim);
        assert!(reclaim.is_empty());
        if !more {
            return (total, passes);
        }
    }
}

#[test]
fn companion_frames_follow_their_directories() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    let phys = &**alloc.phys();
    let base = alloc.live();
    let (t, mut w) = MirrorTable::<CompanionL4>::new(phys, &*alloc).unwrap();
    // Root and its companion.
    assert_eq!(stats_of(&w).frames, 2);
    assert_eq!(alloc.live(), base + 2);
    let pa = 1 << 32;
    // One 4 KiB page: tables at levels 2, 1, 0, companions at 2 and 1.
    let page = range(GIB - 2 * MIB + 5 * PAGE, PAGE);
    assert_eq!(w.map(phys, &*alloc, page, pa, true), Ok((1, 0)));
    assert_eq!(stats_of(&w), TableStats { frames: 2 + 5, leaves: 1, huge_leaves: 0 });
    assert_eq!(alloc.live(), base + 7);
    // A 2 MiB leaf beside it, in the same level-1 table: no new frame.
    let huge = range(GIB - 4 * MIB, 2 * MIB);
    assert_eq!(w.map(phys, &*alloc, huge, pa, false), Ok((1, 1)));
    assert_eq!(stats_of(&w), TableStats { frames: 7, leaves: 2, huge_leaves: 1 });
    assert_eq!(
        t.translate(phys, huge.start() + 3 * PAGE).map(|e| (e.frame(), e.order(), e.is_write())),
        Some((pa + 3 * PAGE, 9, false))
    );
    // A 2 MiB leaf across the 1 GiB line: a new level-1 table (with its
    // companion) under the same level-2 table.
    let other = range(GIB, 2 * MIB);
    assert_eq!(w.map(phys, &*alloc, other, pa + 2 * MIB, true), Ok((1, 1)));
    assert_eq!(stats_of(&w), TableStats { frames: 9, leaves: 3, huge_leaves: 2 });
    assert_eq!(alloc.live(), base + 9);
    // Clearing the page frees the level-0 table only (the level-1 table
    // still holds the 2 MiB leaf).
    let (c, passes) = clear_all(&mut w, &t, &alloc, page);
    assert_eq!((c.entries, c.pages, c.extent, passes), (1, 1, Some(page), 1));
    assert_eq!(stats_of(&w), TableStats { frames: 8, leaves: 2, huge_leaves: 2 });
    assert_eq!(alloc.live(), base + 8);
    // One page of the first 2 MiB leaf: the leaf goes whole, and its
    // level-1 table and companion with it.
    let (c, _) = clear_all(&mut w, &t, &alloc, range(huge.start() + 9 * PAGE, PAGE));
    assert_eq!((c.entries, c.pages, c.extent), (1, 512, Some(huge)));
    assert_eq!(stats_of(&w), TableStats { frames: 6, leaves: 1, huge_leaves: 1 });
    assert_eq!(alloc.live(), base + 6);
    assert_eq!(t.translate(phys, huge.start()), None);
    assert_eq!(t.translate(phys, other.start()).map(|e| e.order()), Some(9));
    // Refill the freed level-1 slot with 4 KiB pages, then clear everything.
    assert_eq!(w.map(phys, &*alloc, range(huge.start(), 3 * PAGE), pa, true), Ok((3, 0)));
    assert_eq!(stats_of(&w), TableStats { frames: 9, leaves: 4, huge_leaves: 1 });
    let (c, _) = clear_all(&mut w, &t, &alloc, range(0, 1 << 47));
    assert_eq!((c.entries, c.pages), (4, 3 + 512));
    assert_eq!(stats_of(&w), TableStats { frames: 2, leaves: 0, huge_leaves: 0 });
    assert_eq!(alloc.live(), base + 2);
    w.destroy(&t, phys, &*alloc);
    assert_eq!(alloc.live(), base);
}

/// Destroying a populated table frees every companion too.
#[test]
fn destroying_a_companion_table_frees_everything() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    let phys = &**alloc.phys();
    let base = alloc.live();
    let (t, mut w) = MirrorTable::<Companion<SoftFormat<Six48>>>::new(phys, &*alloc).unwrap();
    for i in 0..5u64 {
        w.map(phys, &*alloc, range(i * GIB + 7 * PAGE, 70 * PAGE), 1 << 32, i % 2 == 0).unwrap();
    }
    let frames = stats_of(&w).frames;
    let mut leaves = BTreeMap::new();
    for i in 0..5u64 {
        leaves.extend(device_leaves(range(i * GIB, 80 * PAGE), |va| t.translate(phys, va)));
    }
    assert_eq!(leaves.len(), 5 * 70);
    assert_table_exact::<Six48>(stats_of(&w), &leaves, true);
    assert_eq!(alloc.live(), base + frames);
    w.destroy(&t, phys, &*alloc);
    assert_eq!(alloc.live(), base);
}

/// 40 pages 1 GiB apart need 40 level-1 tables (with companions) and 40
/// level-0 tables: more than one `Reclaim` holds, so the clear takes passes.
#[test]
fn companion_directories_beyond_one_reclaim_take_several_passes() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    let phys = &**alloc.phys();
    let base = alloc.live();
    let (t, mut w) = MirrorTable::<CompanionL4>::new(phys, &*alloc).unwrap();
    for i in 1..=40u64 {
        assert_eq!(w.map(phys, &*alloc, range(i * GIB, PAGE), i << 32, true), Ok((1, 0)));
    }
    // Root + companion, level 2 + companion, 40 x (level 1 + companion + level 0).
    assert_eq!(stats_of(&w), TableStats { frames: 4 + 120, leaves: 40, huge_leaves: 0 });
    assert_eq!(alloc.live(), base + 124);
    let (c, passes) = clear_all(&mut w, &t, &alloc, range(0, 64 * GIB));
    assert_eq!((c.entries, c.pages), (40, 40));
    assert!(passes >= 2, "122 frames cannot go in one pass of 64 ({passes} passes)");
    assert_eq!(stats_of(&w), TableStats { frames: 2, leaves: 0, huge_leaves: 0 });
    assert_eq!(alloc.live(), base + 2);
    w.destroy(&t, phys, &*alloc);
    assert_eq!(alloc.live(), base);
}

/// A mirror in a companion format: faults, partial invalidation of a huge
/// entry, an unmap that needs several reclaim passes, and drop, with frames
/// exact at every step.
#[test]
fn a_mirror_in_a_companion_format_returns_every_frame() {
    type F = Companion<Soft4>;
    let (alloc, space) = kernel(64 * MIB);
    let small = space.map(GIB - 2 * MIB, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let thp = space.map(GIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    space.write_bytes(thp.start(), b"t").unwrap();
    let far: Vec<VaRange> =
        (2..=41u64).map(|i| space.map(i * GIB, PAGE, RW, RegionKind::PrivateAnon).unwrap()).collect();
    let (live_before_drop, frames_at_drop) = {
        let m = pin!(mirror_in::<F, _>(&space, &alloc, LogDevice::new(), user()));
        m.as_ref().register().unwrap();
        assert_eq!(m.table_stats().frames, 2, "root and its companion");
        m.fault(small, true).unwrap();
        m.fault(range(thp.start() + 9 * PAGE, PAGE), true).unwrap();
        assert_eq!(orders(thp, |va| m.translate(va)), BTreeMap::from([(9, 512)]));
        let window = range(GIB - 2 * MIB, 4 * MIB);
        let leaves = device_leaves(window, |va| m.translate(va));
        assert_eq!(leaves.len(), 9);
        assert_table_exact::<X86_64Level4>(m.table_stats(), &leaves, true);
        // Root+c, L2+c, two L1+c (either side of 1 GiB), one L0.
        assert_eq!(m.table_stats().frames, 9);
        m.device().take();
        // A page of the THP: its entry goes whole, and its level-1 table
        // (with companion) with it.
        space.unmap(range(thp.start() + 100 * PAGE, PAGE)).unwrap();
        assert_eq!(m.stats().pages_invalidated, 512);
        assert_eq!(m.device().take(), vec![Call::Invalidate(thp, Event::Unmap), Call::Flush(thp)]);
        assert_eq!(m.table_stats(), TableStats { frames: 7, leaves: 8, huge_leaves: 0 });
        // The far pages: 40 more level-1 tables with companions.
        for r in &far {
            m.fault(*r, true).unwrap();
        }
        assert_eq!(m.table_stats(), TableStats { frames: 7 + 120, leaves: 48, huge_leaves: 0 });
        for r in &far {
            assert_same_as_cpu(&space, *r, |va| m.translate(va));
        }
        m.device().take();
        let before = m.stats();
        space.unmap(range(2 * GIB, 40 * GIB)).unwrap();
        let d = delta(m.stats(), before);
        assert_eq!((d.invalidations, d.pages_invalidated), (1, 40));
        let log = m.device().take();
        let flushes = log.iter().filter(|c| matches!(c, Call::Flush(_))).count();
        assert!(flushes >= 2, "several reclaim passes, each flushed first: {log:?}");
        assert_eq!(m.table_stats(), TableStats { frames: 7, leaves: 8, huge_leaves: 0 });
        space.unmap(small).unwrap();
        assert_eq!(m.table_stats(), TableStats { frames: 2, leaves: 0, huge_leaves: 0 });
        m.fault(range(thp.start(), 4 * PAGE), false).unwrap();
        assert_eq!(m.table_stats(), TableStats { frames: 7, leaves: 4, huge_leaves: 0 });
        (alloc.live(), m.table_frames())
    };
    assert_eq!(frames_at_drop, 7);
    assert_eq!(alloc.live(), live_before_drop - frames_at_drop);
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// Random maps and clears through a `TableWriter`, against a page model:
/// every translation, the leaf counters, the frames (exactly what the live
/// leaves need, companions included) and the allocator agree after every
/// step, and everything comes back at the end.
#[derive(Clone, Debug)]
enum TOp {
    Map { page: u64, pages: u64, skew: bool, write: bool },
    Clear { page: u64, pages: u64 },
}

/// A 4 MiB window straddling a 1 GiB boundary.
const WIN: u64 = GIB - 2 * MIB;
const WIN_PAGES: u64 = 1024;
const PA: u64 = 1 << 32;

fn top() -> impl Strategy<Value = TOp> {
    prop_oneof![
        3 => (0..WIN_PAGES, 1..=WIN_PAGES, any::<bool>(), any::<bool>())
            .prop_map(|(page, pages, skew, write)| TOp::Map { page, pages, skew, write }),
        2 => (0..4u64, 1..=2u64, any::<bool>()).prop_map(|(h, n, write)| TOp::Map {
            page: h * 256,
            pages: n * 512,
            skew: false,
            write
        }),
        3 => (0..WIN_PAGES, 1..=96u64).prop_map(|(page, pages)| TOp::Clear { page, pages }),
    ]
}

fn run_ops<F: DeviceFormat>(ops: &[TOp]) {
    type G<F> = <F as PteFormat>::Geometry;
    let companions = F::COUNT_SHIFT.is_none();
    let alloc = CountingAllocator::with_size(8 * MIB);
    let phys = &**alloc.phys();
    let base = alloc.live();
    let (t, mut w) = MirrorTable::<F>::new(phys, &*alloc).unwrap();
    let empty_frames = stats_of(&w).frames;
    assert_eq!(empty_frames, 1 + companions as usize);
    let win = range(WIN, WIN_PAGES * PAGE);
    // page -> (frame, write)
    let mut model: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    let forget = |model: &mut BTreeMap<u64, (u64, bool)>, c: &Cleared| -> u64 {
        let Some(e) = c.extent else { return 0 };
        let gone: Vec<u64> = model.range(e.start()..=e.last()).map(|(&va, _)| va).collect();
        for va in &gone {
            model.remove(va);
        }
        gone.len() as u64
    };
    for op in ops {
        match *op {
            TOp::Map { page, pages, skew, write } => {
                let pages = pages.min(WIN_PAGES - page);
                let r = range(WIN + page * PAGE, pages * PAGE);
                let pa = PA + (page + skew as u64) * PAGE;
                loop {
                    match w.map(phys, &*alloc, r, pa, write) {
                        Ok((entries, huge)) => {
                            assert!(entries >= 1 && huge <= entries);
                            break;
                        }
                        Err(MapError::HugeInTheWay(h)) => {
                            let e = t.translate(phys, h.start()).expect("the huge leaf in the way is mapped");
                            assert_eq!(PAGE << e.order(), h.last() - h.start() + 1, "{h:?} is one leaf");
                            assert!(e.order() > 0);
                            let (c, _) = clear_all(&mut w, &t, &alloc, h);
                            assert_eq!(c.extent, Some(h));
                            assert_eq!(forget(&mut model, &c), c.pages);
                        }
                        Err(e) => panic!("map {r:?}: {e:?}"),
                    }
                }
                for i in 0..pages {
                    model.insert(r.start() + i * PAGE, (pa + i * PAGE, write));
                }
            }
            TOp::Clear { page, pages } => {
                let pages = pages.min(WIN_PAGES - page);
                let r = range(WIN + page * PAGE, pages * PAGE);
                let (c, _) = clear_all(&mut w, &t, &alloc, r);
                assert_eq!(forget(&mut model, &c), c.pages, "cleared pages of {r:?}");
                if let Some(e) = c.extent {
                    assert!(e.overlaps(&r));
                }
                for i in 0..pages {
                    assert_eq!(t.translate(phys, r.start() + i * PAGE), None, "a page of {r:?} survived its clear");
                }
            }
        }
        for i in 0..WIN_PAGES {
            let va = WIN + i * PAGE;
            let got = t.translate(phys, va).map(|e| (e.frame(), e.is_write()));
            assert_eq!(got, model.get(&va).copied(), "page {va:#x} after {op:?}");
        }
        let leaves = device_leaves(win, |va| t.translate(phys, va));
        assert_table_exact::<G<F>>(stats_of(&w), &leaves, companions);
        assert_eq!(alloc.live(), base + stats_of(&w).frames);
    }
    let (_, _) = clear_all(&mut w, &t, &alloc, win);
    assert_eq!(stats_of(&w), TableStats { frames: empty_frames, leaves: 0, huge_leaves: 0 });
    w.destroy(&t, phys, &*alloc);
    assert_eq!(alloc.live(), base);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn random_maps_and_clears_keep_frames_exact(ops in prop::collection::vec(top(), 1..12)) {
        run_ops::<Soft4>(&ops);
        run_ops::<X86_64Level4>(&ops);
        run_ops::<CompanionL4>(&ops);
        run_ops::<Companion<Soft4>>(&ops);
        run_ops::<Companion<SoftFormat<Six48>>>(&ops);
        run_ops::<Companion<SoftFormat<Three36>>>(&ops);
        run_ops::<SoftFormat<Six57>>(&ops);
    }
}

// ---------------------------------------------------------------------------
// h. One handler call per missing run.

#[test]
fn a_64m_missing_run_is_one_handler_call() {
    let (alloc, space) = kernel(72 * MIB);
    let buf = space.map(0x1000_0000, 64 * MIB, RW, RegionKind::PrivateAnon).unwrap();
    assert_eq!(buf.pages(12), 16_384);
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        m.fault(buf, true).unwrap();
        assert_eq!(m.stats(), mapped(1, 16_384, 16_384, 0));
        assert_eq!(space.handle_fault_calls(), 1, "the kernel got the whole run in one call");
        assert_eq!(m.device().counters().updates, 1);
        let stats = m.table_stats();
        // Root, level 2, level 1, 32 level-0 tables.
        assert_eq!(stats, TableStats { frames: 35, leaves: 16_384, huge_leaves: 0 });
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        println!(
            "a 64 MiB missing run ({} pages) faulted in one call: {} kernel handler call(s) (old design: 256), {} \
             entries, {} table frames",
            buf.pages(12),
            m.stats().handler_calls,
            stats.leaves,
            stats.frames
        );
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn one_handler_call_per_missing_run() {
    let (alloc, space) = kernel(72 * MIB);
    let buf = space.map(0x1000_0000, 64 * MIB, RW, RegionKind::PrivateAnon).unwrap();
    // Pages 0, 1024, 2048, ... present: 16 missing runs of 1023 pages.
    for i in 0..16 {
        space.write_bytes(buf.start() + i * 1024 * PAGE, &[i as u8]).unwrap();
    }
    let calls0 = space.handle_fault_calls();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        m.fault(buf, true).unwrap();
        assert_eq!(m.stats(), mapped(16, 16_384, 16_384, 0));
        assert_eq!(space.handle_fault_calls() - calls0, 16);
        assert_same_as_cpu(&space, buf, |va| m.translate(va));
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// A missing run is cut at region boundaries: the kernel's handler is
/// asked about one region at a time (as a per-VMA handler wants), so two
/// adjacent missing regions cost two calls.
#[test]
fn a_missing_run_is_one_call_per_region() {
    let (alloc, space) = kernel(16 * MIB);
    let a = space.map(0x1000_0000, 64 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let b = space.map(0x1000_0000 + 64 * PAGE, 64 * PAGE, RW, RegionKind::SharedAnon).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        m.fault(a.hull(&b), true).unwrap();
        assert_eq!(m.stats(), mapped(2, 128, 128, 0));
        assert_eq!(space.handle_fault_calls(), 2);
        assert_same_as_cpu(&space, a.hull(&b), |va| m.translate(va));
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// Sanity for the helpers: a leaf's level follows its order.
#[test]
fn level_of_follows_the_geometry() {
    assert_eq!(level_of::<X86_64Level4>(9), 1);
    assert_eq!(level_of::<Six48>(6), 1);
    assert_eq!(level_of::<Six48>(12), 2);
    assert_eq!(level_of::<Six57>(18), 2);
    assert_eq!(level_of::<Three36>(9), 1);
}

// ---------------------------------------------------------------------------
// A huge device entry in the way: a kernel that splits a 2 MiB leaf into
// 4 KiB leaves of the same frames without notifying (no translation
// changes, so the `AddressSpace` contract does not ask for an invalidation).

/// A hand-made kernel: real x86_64 4-level tables in the test kit's memory,
/// one region, entries written by the test. Tables are freed only on drop.
struct SilentSplit {
    alloc: std::sync::Arc<CountingAllocator>,
    root: u64,
    tables: Mutex<Vec<u64>>,
    region: hmm_core::Region,
    notifiers: hmm_core::NotifierRegistry<hmm_core::notifier::FixedStore<4>, hmm_core::sync::SpinWait>,
    faults: std::sync::atomic::AtomicU64,
}

/// x86_64 flags of a user read-write leaf and of a directory.
const CPU_LEAF: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::ACCESSED);
const CPU_DIR: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::EXEC);

impl SilentSplit {
    fn new(alloc: &std::sync::Arc<CountingAllocator>, region: VaRange) -> Self {
        use hmm_core::FrameAllocator;
        let root = alloc.alloc_frame().expect("root");
        alloc.phys().zero(root, PAGE);
        Self {
            alloc: alloc.clone(),
            root,
            tables: Mutex::new(Vec::new()),
            region: hmm_core::Region { range: region, flags: RW },
            notifiers: hmm_core::NotifierRegistry::new(),
            faults: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A new zeroed table frame.
    fn table(&self) -> u64 {
        use hmm_core::FrameAllocator;
        let t = self.alloc.alloc_frame().expect("table");
        self.alloc.phys().zero(t, PAGE);
        self.tables.lock().unwrap().push(t);
        t
    }

    /// Physical address of the entry for `va` at `level`, creating the
    /// directories above it.
    fn slot(&self, va: u64, level: usize) -> u64 {
        let phys = self.alloc.phys();
        let mut table = self.root;
        for l in (level + 1..4).rev() {
            let at = table + X86_64Level4::index(va, l) as u64 * 8;
            table = match X86_64Level4::decode(phys.read_u64(at), l) {
                PteView::Table { frame, .. } => frame,
                PteView::Absent => {
                    let t = self.table();
                    self.store(at, PteView::Table { frame: t, flags: CPU_DIR }, l);
                    t
                }
                other => panic!("unexpected {other:?} at level {l}"),
            };
        }
        table + X86_64Level4::index(va, level) as u64 * 8
    }

    fn store(&self, at: u64, view: PteView, level: usize) {
        let raw = X86_64Level4::encode(&view, level).expect("encodable");
        self.alloc.phys().word(at).store(raw, std::sync::atomic::Ordering::Release);
    }

    /// Maps `va` -> `frame` with a leaf at `level`.
    fn leaf(&self, va: u64, level: usize, frame: u64) {
        self.store(self.slot(va, level), PteView::Leaf { frame, flags: CPU_LEAF }, level);
    }

    /// Replaces the 2 MiB leaf at `va` by a table of 512 4 KiB leaves of
    /// the same frames (built before it is linked).
    fn split(&self, va: u64) {
        let at = self.slot(va, 1);
        let PteView::Leaf { frame, flags } = X86_64Level4::decode(self.alloc.phys().read_u64(at), 1) else {
            panic!("no 2 MiB leaf at {va:#x}")
        };
        let t = self.table();
        for i in 0..512 {
            self.store(t + i * 8, PteView::Leaf { frame: frame + i * PAGE, flags }, 0);
        }
        self.store(at, PteView::Table { frame: t, flags: CPU_DIR }, 1);
    }
}

impl Drop for SilentSplit {
    fn drop(&mut self) {
        use hmm_core::FrameAllocator;
        for t in self.tables.lock().unwrap().drain(..).chain([self.root]) {
            // SAFETY: allocated by `table` / `new`; the space and every
            // mirror of it are gone, so nothing walks them any more.
            unsafe { self.alloc.free_frame(t) };
        }
    }
}

// SAFETY: 1. `root` is allocated in `new` and freed only in `Drop`. 2. No
// table is freed before `Drop`. 3. The test only adds translations or
// replaces a leaf by a table of leaves with the same frames and flags (no
// translation removed, replaced or downgraded), and frees no data frame
// while the space lives. 4. Every entry is written with an atomic store.
unsafe impl hmm_core::AddressSpace for SilentSplit {
    type Format = X86_64Level4;
    type Phys = hmm_testkit::SimPhys;
    type Store = hmm_core::notifier::FixedStore<4>;
    type Wait = hmm_core::sync::SpinWait;
    type ReadGuard<'a> = ();

    fn phys(&self) -> &hmm_testkit::SimPhys {
        self.alloc.phys()
    }
    fn root(&self) -> u64 {
        self.root
    }
    fn notifiers(&self) -> &hmm_core::NotifierRegistry<Self::Store, Self::Wait> {
        &self.notifiers
    }
    fn read_lock(&self) {}
    fn region(&self, _: &(), va: u64) -> Option<hmm_core::Region> {
        self.region.range.contains_addr(va).then_some(self.region)
    }
    fn handle_fault(&self, _: &(), _: VaRange, _: bool) -> hmm_core::Result<()> {
        self.faults.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(Error::Fault)
    }
    fn zero_frame(&self) -> Option<u64> {
        None
    }
}

#[test]
fn a_huge_entry_in_the_way_of_smaller_cpu_leaves_goes_first() {
    let alloc = CountingAllocator::with_size(16 * MIB);
    let chunk = alloc.alloc_huge(9).expect("a 2 MiB chunk");
    let leaf = range(GIB, 2 * MIB);
    let space = SilentSplit::new(&alloc, leaf);
    space.leaf(GIB, 1, chunk);
    {
        let m = Mirror::<_, _, _, Soft4, SpinLock>::with_format(
            &space,
            &*alloc,
            LogDevice::new(),
            leaf,
            MirrorConfig::default(),
        )
        .unwrap();
        let m = pin!(m);
        m.as_ref().register().unwrap();
        m.fault(range(GIB + 5 * PAGE, PAGE), false).unwrap();
        assert_eq!(m.device().take(), vec![Call::Update(leaf)]);
        assert_eq!(m.table_stats(), TableStats { frames: 3, leaves: 1, huge_leaves: 1 });
        assert_eq!(m.translate(GIB + 7 * PAGE).map(|e| (e.frame(), e.order())), Some((chunk + 7 * PAGE, 9)));

        space.split(GIB);
        // The huge entry still translates right: the frames did not change.
        assert_eq!(m.translate(GIB + 7 * PAGE).map(|e| e.frame()), Some(chunk + 7 * PAGE));
        let before = m.stats();
        let page = range(GIB + 7 * PAGE, PAGE);
        m.fault(page, true).unwrap();
        // The huge entry went whole (device invalidated and flushed over
        // the 2 MiB, as a `Clear`), then the page was mapped as 4 KiB.
        assert_eq!(
            m.device().take(),
            vec![Call::Invalidate(leaf, Event::Clear), Call::Flush(leaf), Call::Update(page)]
        );
        assert_eq!(delta(m.stats(), before), mapped(0, 1, 1, 0));
        assert_eq!(m.stats().invalidations, 0, "not an invalidation callback");
        assert_eq!(m.translate(GIB + 7 * PAGE).map(|e| (e.frame(), e.order())), Some((chunk + 7 * PAGE, 0)));
        assert_eq!(orders(leaf, |va| m.translate(va)), BTreeMap::from([(0, 1)]), "the rest refaults");
        assert_eq!(m.table_stats(), TableStats { frames: 4, leaves: 1, huge_leaves: 0 });
        // The whole leaf again: 512 4 KiB entries.
        m.fault(leaf, false).unwrap();
        assert_eq!(orders(leaf, |va| m.translate(va)), BTreeMap::from([(0, 512)]));
        assert_eq!(m.table_stats(), TableStats { frames: 4, leaves: 512, huge_leaves: 0 });
        assert_eq!(space.faults.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
    drop(space);
    // SAFETY: the space and its mirror are gone.
    unsafe { alloc.free_huge(chunk, 9) };
    assert_eq!(alloc.live(), 0);
}

// ---------------------------------------------------------------------------
// The table-write barrier comes before every device callback.

std::thread_local! {
    static BARRIERS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Format `F` counting its `publish_table_writes` calls on this thread.
struct Fenced<F>(PhantomData<fn() -> F>);

// SAFETY: every item delegates to `F`; the barrier is `F`'s plus a count.
unsafe impl<F: PteFormat> PteFormat for Fenced<F> {
    type Geometry = F::Geometry;
    const DIRECTORY: LeafFlags = F::DIRECTORY;

    fn decode(raw: u64, level: usize) -> PteView {
        F::decode(raw, level)
    }
    fn encode(view: &PteView, level: usize) -> hmm_core::Result<u64> {
        F::encode(view, level)
    }
    fn opaque_bits(raw: u64, level: usize) -> u64 {
        F::opaque_bits(raw, level)
    }
    fn publish_table_writes() {
        BARRIERS.with(|b| b.set(b.get() + 1));
        F::publish_table_writes();
    }
}

// SAFETY: as `F`'s (same encodings, same count bits).
unsafe impl<F: DeviceFormat> DeviceFormat for Fenced<F> {
    const COUNT_SHIFT: Option<u32> = F::COUNT_SHIFT;
}

/// Records the barrier count each `update` and `invalidate` saw.
#[derive(Default)]
struct BarrierDevice {
    seen: Mutex<Vec<(&'static str, u64)>>,
}

impl DeviceOps for BarrierDevice {
    fn update(&self, _: VaRange) -> Result<(), i32> {
        self.seen.lock().unwrap().push(("update", BARRIERS.with(|b| b.get())));
        Ok(())
    }
    fn invalidate(&self, _: VaRange, _: Event) {
        self.seen.lock().unwrap().push(("invalidate", BARRIERS.with(|b| b.get())));
    }
    fn flush(&self, _: VaRange) {}
}

/// A device is told about table changes (a fault's `update`, an
/// invalidation's `invalidate`) only after the format's barrier made the
/// stores visible: at least one barrier between any two such callbacks.
#[test]
fn the_table_write_barrier_precedes_every_update_and_invalidate() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(GIB, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    {
        let m = pin!(mirror_in::<Fenced<Soft4>, _>(&space, &alloc, BarrierDevice::default(), user()));
        m.as_ref().register().unwrap();
        m.fault(range(buf.start(), 4 * PAGE), true).unwrap();
        m.fault(range(buf.start() + 4 * PAGE, 4 * PAGE), false).unwrap();
        space.unmap(range(buf.start() + PAGE, PAGE)).unwrap();
        space.protect(range(buf.start() + 4 * PAGE, 4 * PAGE), R).unwrap();
        let seen = m.device().seen.lock().unwrap().clone();
        let kinds: Vec<_> = seen.iter().map(|s| s.0).collect();
        assert_eq!(kinds, ["update", "update", "invalidate", "invalidate"]);
        let mut last = 0;
        for (kind, count) in seen {
            assert!(count > last, "{kind} without a barrier since the previous callback (count {count})");
            last = count;
        }
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}
