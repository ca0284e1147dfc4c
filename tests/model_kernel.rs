//! Tests of the host test kit (`hmm-testkit`): the model kernel behaves like
//! a kernel (zero page, copy-on-write, fork, PROT_NONE, huge pages, IO and
//! mixed maps), notifies before it changes entries, agrees with its oracle,
//! and returns every frame it took.

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PteView};
use hmm_core::pt::Pfn;
use hmm_core::{AddressSpace, Error, Event, RegionFlags, VaRange};
use hmm_testkit::{
    range, Backing, CountingAllocator, ModelSpace, RegionKind, SimFile, SimPhys, TableView, HUGE_1G, HUGE_2M, PAGE,
};
use std::sync::{Arc, Mutex};

#[path = "common/watchdog.rs"]
mod watchdog;

const R: RegionFlags = RegionFlags::READ;
const RW: RegionFlags = RegionFlags::READ.union(RegionFlags::WRITE);
const MIB: u64 = 1 << 20;

fn kit(size: u64) -> (Arc<CountingAllocator>, ModelSpace) {
    let alloc = CountingAllocator::with_size(size);
    let space = ModelSpace::new(&alloc).expect("space");
    (alloc, space)
}

/// Checks the tables one last time, drops the space, and asserts that every
/// frame went back.
fn finish(alloc: &CountingAllocator, space: ModelSpace) {
    space.check_tables();
    drop(space);
    assert_eq!(alloc.live(), 0, "frames leaked");
}

fn fault(s: &ModelSpace, r: VaRange, write: bool) -> hmm_core::Result<()> {
    let g = s.read_lock();
    s.handle_fault(&g, r, write)
}

fn read_vec(s: &ModelSpace, va: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    s.read_bytes(va, &mut buf).expect("read");
    buf
}

/// What the hook saw: range, event, and a snapshot of the range taken inside
/// the hook (empty for huge ranges).
type Seen = Arc<Mutex<Vec<(VaRange, Event, Vec<Pfn>)>>>;

fn record(s: &ModelSpace) -> Seen {
    let seen: Seen = Arc::default();
    let view = s.table_view();
    let log = seen.clone();
    s.set_hook(Some(Box::new(move |r, e| {
        let snap = if r.pages(12) <= 1024 { view.snapshot(r) } else { Vec::new() };
        log.lock().unwrap().push((r, e, snap));
    })));
    seen
}

fn take(seen: &Seen) -> Vec<(VaRange, Event, Vec<Pfn>)> {
    std::mem::take(&mut *seen.lock().unwrap())
}

#[test]
fn kit_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<SimPhys>();
    check::<CountingAllocator>();
    check::<ModelSpace>();
    check::<SimFile>();
    check::<TableView>();
}

#[test]
fn read_fault_maps_zero_page_then_write_breaks_cow() {
    let (alloc, s) = kit(64 * MIB);
    let base = 0x4000_0000;
    let r = s.map(base, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    fault(&s, range(base, PAGE), false).unwrap();
    let zero = s.zero_frame().unwrap();
    let p = s.translate(base).unwrap();
    assert_eq!((p.frame, p.leaf.write, p.leaf.zero, p.leaf.backing), (zero, false, true, Backing::Zero));
    let snap = s.snapshot(r);
    assert_eq!(snap[0], Pfn::valid(zero, false, 0));
    assert_eq!(snap[1..], [Pfn::NONE; 3]);
    assert_eq!(snap, s.oracle().expected_pfns(r));
    s.check_tables();

    let seen = record(&s);
    fault(&s, range(base, PAGE), true).unwrap();
    let events = take(&seen);
    assert_eq!(events.len(), 1);
    let (er, ev, before) = &events[0];
    assert_eq!((*er, *ev), (range(base, PAGE), Event::ProtectionPage));
    // Inside the hook the old (zero page) entry was still there.
    assert_eq!(before[0], Pfn::valid(zero, false, 0));
    let p = s.translate(base).unwrap();
    assert!(p.leaf.write && p.frame != zero && p.leaf.backing == Backing::Anon);
    assert_eq!(read_vec(&s, base, 16), [0u8; 16]);
    assert!(s.sim_phys().is_zero(zero, PAGE));

    // A CPU write to an untouched page: demand-zero, no invalidation.
    s.write_bytes(base + PAGE + 100, b"hello").unwrap();
    assert_eq!(read_vec(&s, base + PAGE + 100, 5), b"hello");
    assert!(take(&seen).is_empty());
    assert_eq!(s.snapshot(r), s.oracle().expected_pfns(r));
    finish(&alloc, s);
}

#[test]
fn fork_private_is_copy_on_write_and_shared_stays_shared() {
    let (alloc, parent) = kit(64 * MIB);
    let pv = 0x1000_0000;
    let sv = 0x2000_0000;
    let pr = parent.map(pv, 2 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    parent.map(sv, 2 * PAGE, RW, RegionKind::SharedAnon).unwrap();
    parent.write_bytes(pv, b"parent").unwrap();
    parent.write_bytes(sv, b"before").unwrap();
    let pframe = parent.translate(pv).unwrap().frame;

    let seen = record(&parent);
    let child = parent.fork().unwrap();
    let events = take(&seen);
    assert_eq!(events.len(), 1, "one ProtectionPage for the private region: {events:?}");
    assert_eq!((events[0].0, events[0].1), (pr, Event::ProtectionPage));
    assert!(events[0].2[0].is_write(), "the hook runs before the write-protect");
    // Both map the same frame read-only now.
    for s in [&parent, &child] {
        let p = s.translate(pv).unwrap();
        assert_eq!((p.frame, p.leaf.write), (pframe, false));
        s.check_tables();
    }

    child.write_bytes(pv, b"child!").unwrap();
    assert_eq!(read_vec(&parent, pv, 6), b"parent");
    assert_eq!(read_vec(&child, pv, 6), b"child!");
    let cframe = child.translate(pv).unwrap().frame;
    assert_ne!(cframe, pframe);
    // The parent is now the only mapper: its write reuses the frame.
    parent.write_bytes(pv, b"PARENT").unwrap();
    assert_eq!(parent.translate(pv).unwrap().frame, pframe);
    assert_eq!(read_vec(&child, pv, 6), b"child!");
    // Untouched private page: the child sees zeros (zero page).
    assert_eq!(child.translate(pv + PAGE), None);
    assert_eq!(read_vec(&child, pv + PAGE, 4), [0u8; 4]);

    // Shared memory: writes go both ways, same frame.
    child.write_bytes(sv, b"child").unwrap();
    assert_eq!(read_vec(&parent, sv, 6), b"childe");
    parent.write_bytes(sv + 1, b"X").unwrap();
    assert_eq!(read_vec(&child, sv, 2), b"cX");
    assert_eq!(parent.translate(sv).unwrap().frame, child.translate(sv).unwrap().frame);

    child.check_tables();
    drop(child);
    finish(&alloc, parent);
}

#[test]
fn protect_to_none_and_back_keeps_frames_and_data() {
    let (alloc, s) = kit(64 * MIB);
    let base = 0x3000_0000;
    let r = s.map(base, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for i in 0..4u64 {
        s.write_bytes(base + i * PAGE, &i.to_le_bytes()).unwrap();
    }
    let frames: Vec<u64> = (0..4).map(|i| s.translate(base + i * PAGE).unwrap().frame).collect();

    let seen = record(&s);
    s.protect(r, RegionFlags::empty()).unwrap();
    let events = take(&seen);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0, events[0].1), (r, Event::ProtectionVma));
    assert!(events[0].2.iter().all(|p| p.is_valid() && p.is_write()), "hook saw the old entries");
    let view = s.table_view();
    match view.entry_at(base) {
        (PteView::ProtNone { frame, .. }, 0) => assert_eq!(frame, frames[0]),
        other => panic!("expected PROT_NONE, got {other:?}"),
    }
    assert_eq!(s.snapshot(r), vec![Pfn::ERROR_ENTRY; 4]);
    assert_eq!(s.snapshot(r), s.oracle().expected_pfns(r));
    let mut buf = [0u8; 8];
    assert_eq!(s.read_bytes(base, &mut buf), Err(Error::Fault));
    {
        let g = s.read_lock();
        assert_eq!(s.region(&g, base).unwrap().flags, RegionFlags::empty());
        assert_eq!(s.handle_fault(&g, range(base, PAGE), false), Err(Error::Fault));
    }
    s.check_tables();

    s.protect(r, RW).unwrap();
    for i in 0..4u64 {
        let p = s.translate(base + i * PAGE).unwrap();
        assert_eq!((p.frame, p.leaf.write, p.leaf.prot_none), (frames[i as usize], true, false));
        assert_eq!(read_vec(&s, base + i * PAGE, 8), i.to_le_bytes());
    }
    // Read-only: CPU write refused, device write fault refused.
    s.protect(range(base, PAGE), R).unwrap();
    assert_eq!(s.write_bytes(base, b"x"), Err(Error::Perm));
    assert_eq!(fault(&s, range(base, PAGE), true), Err(Error::Fault));
    assert!(!s.translate(base).unwrap().leaf.write);
    assert!(s.translate(base + PAGE).unwrap().leaf.write, "protect changed only its range");
    assert_eq!(s.regions().len(), 2, "protect split the region");
    finish(&alloc, s);
}

#[test]
fn partial_unmap_splits_a_thp_leaf_and_keeps_the_rest() {
    let (alloc, s) = kit(64 * MIB);
    let base = 0x4000_0000;
    s.map(base, 2 * HUGE_2M, RW, RegionKind::Thp).unwrap();
    s.write_bytes(base + 5, b"x").unwrap();
    let p = s.translate(base).unwrap();
    assert_eq!(p.leaf.order, 9);
    assert_eq!(p.frame % HUGE_2M, 0);
    assert_eq!(s.table_view().entry_at(base).1, 1, "a PMD leaf");
    let folio = p.frame;
    for i in 0..512u64 {
        s.write_bytes(base + i * PAGE + 8, &i.to_le_bytes()).unwrap();
    }
    let block = range(base, HUGE_2M);
    assert!(s.snapshot(block).iter().all(|p| p.order() == 9 && p.is_write()));
    let live = alloc.live();

    let seen = record(&s);
    let hole = range(base + 7 * PAGE, PAGE);
    s.unmap(hole).unwrap();
    let events = take(&seen);
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0, events[0].1), (hole, Event::Unmap));
    assert_eq!(events[0].2, vec![Pfn::valid(folio + 7 * PAGE, true, 9)], "hook saw the huge leaf");

    assert_eq!(s.translate(base + 7 * PAGE), None);
    for i in (0..512u64).filter(|&i| i != 7) {
        let p = s.translate(base + i * PAGE).unwrap();
        assert_eq!((p.frame, p.leaf.order, p.leaf.write), (folio + i * PAGE, 0, true));
        assert_eq!(read_vec(&s, base + i * PAGE + 8, 8), i.to_le_bytes());
    }
    let snap = s.snapshot(block);
    assert_eq!(snap[7], Pfn::NONE);
    assert!(snap.iter().enumerate().all(|(i, p)| i == 7 || p.order() == 0));
    assert_eq!(snap, s.oracle().expected_pfns(block));
    assert_eq!(alloc.live(), live + 1, "only the split table is new; the folio stays");
    assert_eq!(s.regions().len(), 2);
    s.check_tables();

    // Unmapping the rest of the block frees the 2 MiB chunk.
    s.unmap(block).unwrap();
    assert_eq!(alloc.live_huge(), 0);
    assert_eq!(s.anon_folios(), 0);

    // A split leaf is refused a split without memory; nothing changes.
    s.write_bytes(base + HUGE_2M, b"y").unwrap();
    assert_eq!(s.translate(base + HUGE_2M).unwrap().leaf.order, 9);
    let before = s.oracle();
    alloc.fail_at(1);
    assert_eq!(s.unmap(range(base + HUGE_2M, PAGE)), Err(Error::NoMemory));
    assert_eq!(s.oracle(), before);

    // Remapping the first block (after the kept empty table is pruned) gets
    // a huge leaf again.
    s.map(base, HUGE_2M, RW, RegionKind::Thp).unwrap();
    s.write_bytes(base, b"z").unwrap();
    assert_eq!(s.translate(base).unwrap().leaf.order, 9);
    finish(&alloc, s);
}

#[test]
fn thp_falls_back_to_small_pages_without_huge_chunks() {
    let (alloc, s) = kit(64 * MIB);
    let base = 0x4000_0000;
    s.map(base, HUGE_2M + PAGE, RW, RegionKind::Thp).unwrap();
    alloc.fail_huge(true);
    s.write_bytes(base, b"a").unwrap();
    assert_eq!(s.translate(base).unwrap().leaf.order, 0);
    alloc.fail_huge(false);
    // The tail block does not fit the region: small pages.
    s.write_bytes(base + HUGE_2M, b"b").unwrap();
    assert_eq!(s.translate(base + HUGE_2M).unwrap().leaf.order, 0);
    // A read fault in a THP region maps a real (zeroed) huge page.
    let (alloc2, s2) = kit(64 * MIB);
    s2.map(base, HUGE_2M, RW, RegionKind::Thp).unwrap();
    fault(&s2, range(base + PAGE, PAGE), false).unwrap();
    let p = s2.translate(base).unwrap();
    assert_eq!((p.leaf.order, p.leaf.backing), (9, Backing::Anon));
    assert!(s2.sim_phys().is_zero(p.frame, HUGE_2M));
    finish(&alloc2, s2);
    finish(&alloc, s);
}

#[test]
fn fork_of_thp_splits_and_copies_one_page() {
    let (alloc, parent) = kit(64 * MIB);
    let base = 0x4000_0000;
    parent.map(base, HUGE_2M, RW, RegionKind::Thp).unwrap();
    parent.write_bytes(base + 3 * PAGE, b"parent").unwrap();
    let folio = parent.translate(base).unwrap().frame;
    let child = parent.fork().unwrap();
    child.write_bytes(base + 3 * PAGE, b"child").unwrap();
    let c3 = child.translate(base + 3 * PAGE).unwrap();
    assert_eq!(c3.leaf.order, 0);
    assert_ne!(c3.frame, folio + 3 * PAGE);
    let c0 = child.translate(base).unwrap();
    assert_eq!((c0.frame, c0.leaf.order, c0.leaf.write), (folio, 0, false));
    let p0 = parent.translate(base).unwrap();
    assert_eq!((p0.frame, p0.leaf.order, p0.leaf.write), (folio, 9, false));
    assert_eq!(read_vec(&parent, base + 3 * PAGE, 6), b"parent");
    assert_eq!(read_vec(&child, base + 3 * PAGE, 6), b"childt");
    parent.check_tables();
    child.check_tables();
    drop(parent);
    child.write_bytes(base, b"now mine").unwrap();
    assert_eq!(child.translate(base).unwrap().frame, folio, "exclusive after the parent left");
    finish(&alloc, child);
}

#[test]
fn hugetlb_2m_fork_copies_the_whole_page() {
    let (alloc, parent) = kit(64 * MIB);
    let base = 0x8000_0000;
    parent.map(base, HUGE_2M, RW, RegionKind::HugeTlb2M).unwrap();
    parent.write_bytes(base + HUGE_2M - 4, b"tail").unwrap();
    let child = parent.fork().unwrap();
    child.write_bytes(base, b"head").unwrap();
    let c = child.translate(base).unwrap();
    let p = parent.translate(base).unwrap();
    assert_eq!((c.leaf.order, p.leaf.order), (9, 9));
    assert_ne!(c.frame, p.frame);
    assert_eq!(read_vec(&child, base + HUGE_2M - 4, 4), b"tail", "copied");
    assert_eq!(read_vec(&parent, base, 4), [0u8; 4]);
    assert_eq!(parent.unmap(range(base, PAGE)), Err(Error::Unaligned));
    assert_eq!(parent.protect(range(base + PAGE, PAGE), R), Err(Error::Unaligned));
    assert_eq!(parent.map(base + HUGE_2M + PAGE, HUGE_2M, RW, RegionKind::HugeTlb2M), Err(Error::Unaligned));
    drop(child);
    finish(&alloc, parent);
}

#[test]
fn hugetlb_1g_maps_one_pud_leaf() {
    let (alloc, s) = kit(HUGE_1G + 32 * MIB);
    let base = 0x40_0000_0000;
    let r = s.map(base, HUGE_1G, RW, RegionKind::HugeTlb1G).unwrap();
    s.write_bytes(base + HUGE_1G - 8, b"lastword").unwrap();
    let p = s.translate(base).unwrap();
    assert_eq!(p.leaf.order, 18);
    assert_eq!(p.frame % HUGE_1G, 0);
    assert_eq!(alloc.live_huge(), 1);
    let entries = s.table_view().entries(r);
    assert_eq!(entries.len(), 1, "one visit for the whole gigabyte");
    assert_eq!(entries[0].0.level, 2);
    assert!(matches!(entries[0].1, PteView::Leaf { flags, .. } if flags.contains(LeafFlags::WRITE | LeafFlags::USER)));
    let snap = s.snapshot(r);
    assert_eq!(snap.len(), 1 << 18);
    assert_eq!(snap[0], Pfn::valid(p.frame, true, 18));
    assert_eq!(snap[(1 << 18) - 1], Pfn::valid(p.frame + HUGE_1G - PAGE, true, 18));
    assert_eq!(snap, s.oracle().expected_pfns(r));
    assert_eq!(read_vec(&s, base + HUGE_1G - 8, 8), b"lastword");
    assert_eq!(s.unmap(range(base, HUGE_2M)), Err(Error::Unaligned));
    finish(&alloc, s);
}

#[test]
fn io_region_is_prepopulated_and_refused_to_devices() {
    let (alloc, s) = kit(64 * MIB);
    let io = 0x5000_0000;
    let r = s.map(io, 4 * PAGE, RW, RegionKind::Io).unwrap();
    let o = s.oracle();
    assert_eq!(o.len(), 4);
    assert!(o.leaves().values().all(|l| l.backing == Backing::Io && l.write));
    {
        let g = s.read_lock();
        let region = s.region(&g, io).unwrap();
        assert!(region.flags.contains(RegionFlags::IO | RegionFlags::READ | RegionFlags::WRITE));
        assert_eq!(region.range, r);
        assert_eq!(s.handle_fault(&g, range(io, PAGE), false), Err(Error::Fault));
    }
    // The table maps it (refusing IO is range_fault's job, by region).
    assert!(s.snapshot(r).iter().all(|p| p.is_valid()));
    // The CPU may use it.
    s.write_bytes(io + 8, b"mmio").unwrap();
    let (obj, idx) = s.object_at(io).unwrap();
    assert_eq!(idx, 0);
    let mut buf = [0u8; 4];
    obj.read(8, &mut buf).unwrap();
    assert_eq!(&buf, b"mmio");
    drop(obj);
    s.check_tables();
    finish(&alloc, s);
}

#[test]
fn mixed_map_is_read_only_driver_pages_with_cow() {
    let (alloc, s) = kit(64 * MIB);
    let va = 0x6000_0000;
    let seen = record(&s);
    s.map(va, 2 * PAGE, RW, RegionKind::MixedMap).unwrap();
    assert!(take(&seen).is_empty(), "inserting pages needs no invalidation");
    let (obj, _) = s.object_at(va).unwrap();
    obj.write(0, b"driver").unwrap();
    let p = s.translate(va).unwrap();
    assert_eq!((p.leaf.write, p.leaf.backing), (false, Backing::Object));
    assert_eq!(Some(p.frame), obj.resident_page(0));
    assert_eq!(read_vec(&s, va, 6), b"driver");
    s.write_bytes(va, b"cpu").unwrap();
    let events = take(&seen);
    assert_eq!((events[0].0, events[0].1), (range(va, PAGE), Event::ProtectionPage));
    let p = s.translate(va).unwrap();
    assert_eq!((p.leaf.write, p.leaf.backing), (true, Backing::Anon));
    assert_eq!(read_vec(&s, va, 6), b"cpuver");
    let mut buf = [0u8; 6];
    obj.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"driver", "the driver's page is untouched");
    drop(obj);
    finish(&alloc, s);
}

#[test]
fn shared_file_is_shared_between_processes() {
    let alloc = CountingAllocator::with_size(64 * MIB);
    let file = SimFile::new(&alloc, 4);
    let a = ModelSpace::new(&alloc).unwrap();
    let b = ModelSpace::new(&alloc).unwrap();
    a.map(0x1000_0000, 4 * PAGE, RW, RegionKind::SharedFile { file: file.clone(), offset: 0 }).unwrap();
    b.map(0x2000_0000, 2 * PAGE, R, RegionKind::SharedFile { file: file.clone(), offset: 2 * PAGE }).unwrap();
    a.write_bytes(0x1000_0000 + 2 * PAGE + 1, b"hello").unwrap();
    assert_eq!(read_vec(&b, 0x2000_0001, 5), b"hello");
    let mut buf = [0u8; 5];
    file.read(2 * PAGE + 1, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(a.translate(0x1000_0000 + 2 * PAGE).unwrap().frame, b.translate(0x2000_0000).unwrap().frame);
    assert!(!b.translate(0x2000_0000).unwrap().leaf.write, "read-only mapping");
    assert_eq!(b.write_bytes(0x2000_0000, b"x"), Err(Error::Perm));
    assert_eq!(
        a.map(0x3000_0000, 8 * PAGE, RW, RegionKind::SharedFile { file: file.clone(), offset: 0 }),
        Err(Error::OutOfRange)
    );
    // Clearing drops the mapping, not the data.
    a.clear(range(0x1000_0000, 4 * PAGE)).unwrap();
    assert_eq!(a.translate(0x1000_0000 + 2 * PAGE), None);
    assert_eq!(read_vec(&a, 0x1000_0000 + 2 * PAGE + 1, 5), b"hello");
    a.check_tables();
    b.check_tables();
    drop(a);
    drop(b);
    assert_eq!(alloc.live(), file.resident());
    drop(file);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn allocation_failure_in_a_fault_returns_no_memory_and_leaks_nothing() {
    let (alloc, s) = kit(64 * MIB);
    // Each region sits in its own 512 GiB slot: a first fault needs three
    // tables and one data frame.
    for k in 1..=5u64 {
        let va = k << 39;
        s.map(va, PAGE, RW, RegionKind::PrivateAnon).unwrap();
        let live = alloc.live();
        let before = s.oracle();
        alloc.fail_at(k);
        let r = fault(&s, range(va, PAGE), true);
        alloc.fail_at(0);
        if k <= 4 {
            assert_eq!(r, Err(Error::NoMemory), "allocation {k} failed");
            assert_eq!(alloc.live(), live, "allocation {k} failed: nothing kept");
            assert_eq!(s.oracle(), before);
        } else {
            r.unwrap();
            assert_eq!(alloc.live(), live + 4);
        }
        s.check_tables();
    }
    // Copy-on-write without memory: nothing changes.
    let va = 1 << 39;
    s.write_bytes(va, b"data").unwrap();
    let child = s.fork().unwrap();
    let live = alloc.live();
    alloc.fail_at(1);
    assert_eq!(child.write_bytes(va, b"new!"), Err(Error::NoMemory));
    assert_eq!(alloc.live(), live);
    assert_eq!(child.translate(va).unwrap().frame, s.translate(va).unwrap().frame);
    assert_eq!(read_vec(&child, va, 4), b"data");
    drop(child);
    // A fork that runs out of memory at any point cleans up after itself.
    for n in 0..6 {
        let live = alloc.live();
        alloc.fail_after(n);
        let r = s.fork();
        alloc.clear_failures();
        match r {
            Ok(c) => drop(c),
            Err(e) => assert_eq!(e, Error::NoMemory),
        }
        assert_eq!(alloc.live(), live, "fork with {n} allocations left");
        s.check_tables();
    }
    finish(&alloc, s);
}

#[test]
fn hook_sees_each_event_before_the_entries_change() {
    let (alloc, s) = kit(64 * MIB);
    let base = 0x7000_0000;
    let all = s.map(base, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for i in 0..8 {
        s.write_bytes(base + i * PAGE, b"page").unwrap();
    }
    let before = s.snapshot(all);
    let seen = record(&s);

    let mid = range(base + 2 * PAGE, 3 * PAGE);
    s.unmap(mid).unwrap();
    let ro = range(base + 5 * PAGE, 2 * PAGE);
    s.protect(ro, R).unwrap();
    let zap = range(base, PAGE);
    s.clear(zap).unwrap();
    let events = take(&seen);
    let kinds: Vec<(VaRange, Event)> = events.iter().map(|(r, e, _)| (*r, *e)).collect();
    assert_eq!(kinds, vec![(mid, Event::Unmap), (ro, Event::ProtectionVma), (zap, Event::Clear)]);
    // Each hook call saw the entries as they were before that call.
    assert_eq!(events[0].2, before[2..5]);
    assert_eq!(events[1].2, before[5..7]);
    assert!(events[1].2.iter().all(|p| p.is_write()));
    assert_eq!(events[2].2, before[0..1]);
    let after = s.snapshot(all);
    assert_eq!(after[0], Pfn::NONE);
    assert_eq!(after[2..5], [Pfn::NONE; 3]);
    assert!(after[5..7].iter().all(|p| p.is_valid() && !p.is_write()));
    assert_eq!(after, s.oracle().expected_pfns(all));
    // Cleared private memory reads back as zeros.
    assert_eq!(read_vec(&s, base, 4), [0u8; 4]);
    assert!(s.invalidations() >= 3 && s.flushes() >= 3);

    s.release();
    let events = take(&seen);
    assert_eq!((events[0].0, events[0].1), (range(0, 1 << 47), Event::Release));
    finish(&alloc, s);
}

#[test]
fn release_returns_every_frame() {
    let (alloc, s) = kit(64 * MIB);
    let file = SimFile::new(&alloc, 2);
    let kinds = [
        (0x1000_0000, 4 * PAGE, RegionKind::PrivateAnon),
        (0x2000_0000, 2 * HUGE_2M, RegionKind::Thp),
        (0x3000_0000, HUGE_2M, RegionKind::HugeTlb2M),
        (0x4000_0000, 2 * PAGE, RegionKind::SharedAnon),
        (0x5000_0000, 2 * PAGE, RegionKind::SharedFile { file: file.clone(), offset: 0 }),
        (0x6000_0000, 2 * PAGE, RegionKind::MixedMap),
        (0x7000_0000, 2 * PAGE, RegionKind::Io),
    ];
    for (va, len, kind) in kinds {
        s.map(va, len, RW, kind).unwrap();
        s.write_bytes(va, b"touch").unwrap();
        let mut b = [0u8; 1];
        s.read_bytes(va + len - 1, &mut b).unwrap();
    }
    s.protect(range(0x1000_0000, PAGE), RegionFlags::empty()).unwrap();
    s.unmap(range(0x2000_0000 + PAGE, PAGE)).unwrap();
    let child = s.fork().unwrap();
    child.write_bytes(0x1000_0000 + PAGE, b"child").unwrap();
    child.write_bytes(0x4000_0000, b"child").unwrap();
    s.check_tables();
    child.check_tables();

    s.release();
    assert!(s.is_released() && s.notifiers().is_released());
    assert!(s.oracle().is_empty() && s.regions().is_empty());
    {
        let g = s.read_lock();
        assert_eq!(s.region(&g, 0x1000_0000), None);
        assert_eq!(s.handle_fault(&g, range(0x1000_0000, PAGE), false), Err(Error::Fault));
    }
    assert_eq!(s.map(0x1000_0000, PAGE, RW, RegionKind::PrivateAnon), Err(Error::Released));
    s.check_tables();
    assert_eq!(read_vec(&child, 0x1000_0000 + PAGE, 5), b"child");
    assert_eq!(read_vec(&child, 0x4000_0000, 5), b"child");
    drop(child);
    drop(s);
    assert_eq!(alloc.live(), file.resident(), "only the file's pages are left");
    drop(file);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn map_rejects_overlap_and_bad_ranges() {
    let (alloc, s) = kit(16 * MIB);
    s.map(0x1000, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    assert_eq!(s.map(0x3000, PAGE, RW, RegionKind::PrivateAnon), Err(Error::Busy));
    assert_eq!(s.map(0x10_0000, 100, RW, RegionKind::PrivateAnon), Err(Error::Unaligned));
    assert_eq!(s.map((1 << 47) - PAGE, 2 * PAGE, RW, RegionKind::PrivateAnon), Err(Error::OutOfRange));
    assert_eq!(s.protect(range(0x1000, 8 * PAGE), R), Err(Error::Fault), "hole in the range");
    assert_eq!(s.write_bytes(0x100_0000, b"x"), Err(Error::Fault), "no region");
    finish(&alloc, s);
}

#[test]
fn device_thread_races_kernel_mutations() {
    watchdog::bounded("a device thread racing kernel mutations", watchdog::BOUND, || {
        let alloc = CountingAllocator::with_size(64 * MIB);
        let s = Arc::new(ModelSpace::new(&alloc).unwrap());
        let base = 0x4000_0000;
        let len = 2 * HUGE_2M;
        let whole = range(base, len);
        s.map(base, len, RW, RegionKind::Thp).unwrap();
        let device = {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut ok = 0;
                for i in 0..300u64 {
                    let g = s.read_lock();
                    let va = base + (i * 7 % 1024) * PAGE;
                    match s.handle_fault(&g, range(va, PAGE), i % 2 == 0) {
                        Ok(()) => ok += 1,
                        Err(Error::Fault) => {} // unmapped or read-only right now
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                    // What hmm-core does: snapshot under the read lock. Region
                    // changes are excluded, but a concurrent CPU access (it
                    // faults under the read lock too) may change a page once in
                    // the window: every page must match the oracle as it was just
                    // before or just after.
                    let before = s.oracle_under(&g).expected_pfns(whole);
                    let mut out = vec![Pfn::NONE; whole.pages(12) as usize];
                    // SAFETY: `root()` is the space's live root and the read
                    // guard keeps every table reachable from it allocated.
                    unsafe { hmm_core::pt::snapshot::<X86_64Level4, SimPhys>(s.phys(), s.root(), whole, &mut out) }
                        .unwrap();
                    let after = s.oracle_under(&g).expected_pfns(whole);
                    for (i, p) in out.iter().enumerate() {
                        assert!(
                            *p == before[i] || *p == after[i],
                            "page {i}: {p:?} is neither {:?} nor {:?}",
                            before[i],
                            after[i]
                        );
                    }
                }
                ok
            })
        };
        for i in 0..60u64 {
            let off = (i * 13 % 1024) * PAGE;
            match i % 4 {
                0 => {
                    let _ = s.unmap(range(base + off, PAGE));
                }
                1 => {
                    let _ = s.protect(range(base + off, PAGE), if i % 8 == 1 { R } else { RW });
                }
                2 => {
                    let _ = s.map(base + off, PAGE, RW, RegionKind::PrivateAnon);
                }
                _ => {
                    let _ = s.write_bytes(base + off, &i.to_le_bytes());
                }
            }
        }
        let ok = device.join().unwrap();
        assert!(ok > 0);
        s.check_tables();
        let s = Arc::try_unwrap(s).unwrap();
        finish(&alloc, s);
    });
}

/// A minimal driver notifier: records events and bumps its sequence under
/// its "driver lock".
struct Recorder {
    interval: hmm_core::Interval,
    seen: Mutex<Vec<(VaRange, Event)>>,
}

impl hmm_core::Notifier for Recorder {
    fn interval(&self) -> &hmm_core::Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &hmm_core::InvalidateRange) -> bool {
        let mut seen = self.seen.lock().unwrap();
        seen.push((inv.range, inv.event));
        self.interval.set_seq(inv);
        true
    }
}

/// The device-side retry loop of the Linux design, over the model.
fn device_fault(s: &ModelSpace, rec: &Recorder, r: VaRange, flags: u64) -> hmm_core::Result<Vec<Pfn>> {
    let mut pfns = vec![Pfn::NONE; r.pages(12) as usize];
    loop {
        let seq = s.notifiers().read_begin(&rec.interval);
        let g = s.read_lock();
        let mut req = hmm_core::RangeFault {
            range: r,
            default_flags: flags,
            pfn_flags_mask: 0,
            pfns: &mut pfns,
            dev_private_owner: None,
        };
        match hmm_core::range_fault(s, &g, &rec.interval, seq, &mut req) {
            Ok(_) => {}
            Err(Error::Busy) => continue,
            Err(e) => return Err(e),
        }
        let _driver_lock = rec.seen.lock().unwrap();
        if !s.notifiers().read_retry(&rec.interval, seq) {
            return Ok(pfns);
        }
    }
}

#[test]
fn hmm_core_range_fault_runs_against_the_model() {
    let (alloc, s) = kit(64 * MIB);
    let base = 0x4000_0000;
    let anon = s.map(base, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let io = s.map(base + 8 * PAGE, 2 * PAGE, RW, RegionKind::Io).unwrap();
    let rec = Recorder { interval: hmm_core::Interval::new(range(base, 10 * PAGE)), seen: Mutex::default() };
    // SAFETY: `rec` stays in place until `registration.remove()` below has returned.
    let registration = unsafe { s.notifiers().insert(&rec) }.unwrap();

    // Read faults: the zero page, read-only, as the oracle says.
    let zero = s.zero_frame().unwrap();
    let pfns = device_fault(&s, &rec, anon, Pfn::REQ_FAULT).unwrap();
    assert!(pfns.iter().all(|p| *p == Pfn::valid(zero, false, 0)));
    assert_eq!(pfns, s.oracle().expected_pfns(anon));
    // Write faults break copy-on-write of the zero page (one ProtectionPage
    // invalidation per page, which the device's own notifier sees).
    let pfns = device_fault(&s, &rec, anon, Pfn::REQ_FAULT | Pfn::REQ_WRITE).unwrap();
    assert!(pfns.iter().all(|p| p.is_valid() && p.is_write() && p.phys() != zero));
    assert_eq!(pfns, s.oracle().expected_pfns(anon));
    assert!(rec.seen.lock().unwrap().iter().all(|(r, e)| *e == Event::ProtectionPage && anon.contains(r)));
    // The IO region is refused; the CPU tables still map it.
    assert_eq!(device_fault(&s, &rec, io, Pfn::REQ_FAULT), Err(Error::Fault));
    // A kernel unmap reaches the notifier with its range.
    rec.seen.lock().unwrap().clear();
    s.unmap(range(base, PAGE)).unwrap();
    assert_eq!(*rec.seen.lock().unwrap(), vec![(range(base, PAGE), Event::Unmap)]);
    let view = s.table_view();
    assert!(view.cpu_maps(base + PAGE, pfns[1].phys(), true));
    assert!(!view.cpu_maps(base, pfns[0].phys(), false));
    registration.remove();
    finish(&alloc, s);
}
