//! (b) `range_fault` over the model kernel: request bits, faults through the
//! model's handler, huge leaves, error pages, device-private entries.

use crate::*;
use hmm_core::arch::{LeafFlags, PteView, SpecialEntry};
use hmm_core::pt::Pfn;
use hmm_core::{
    range_fault, AddressSpace, Error, FaultStats, Interval, InvalidateRange, Notifier, RangeFault, RegionFlags, Result,
    VaRange,
};
use hmm_testkit::{ModelSpace, RegionKind};
use std::sync::atomic::Ordering;

/// A notifier that only records sequences (what `range_fault` needs to be
/// registered).
struct Watch {
    interval: Interval,
}

impl Notifier for Watch {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.interval.set_seq(inv);
        true
    }
}

/// One `range_fault` of `r` with a registered interval: `pfns` carries the
/// per-page requests in (under `mask`) and the result out.
pub fn fault_with<F: Cpu>(
    space: &ModelSpace<F>,
    r: VaRange,
    default_flags: u64,
    mask: u64,
    pfns: &mut [Pfn],
    owner: Option<u16>,
) -> Result<FaultStats> {
    let watch = Watch { interval: Interval::new(r) };
    // SAFETY: `watch` is declared before the registration, so it outlives it.
    let _registration = unsafe { space.notifiers().insert(&watch) }.expect("register");
    let guard = space.read_lock();
    let seq = space.notifiers().read_begin(&watch.interval);
    let mut req = RangeFault { range: r, default_flags, pfn_flags_mask: mask, pfns, dev_private_owner: owner };
    range_fault(space, &guard, &watch.interval, seq, &mut req)
}

/// `range_fault` of `r` with the same request for every page.
pub fn fault_all<F: Cpu>(space: &ModelSpace<F>, r: VaRange, flags: u64) -> (Result<FaultStats>, Vec<Pfn>) {
    let mut pfns = vec![Pfn::NONE; r.pages(12) as usize];
    let res = fault_with(space, r, flags, 0, &mut pfns, None);
    (res, pfns)
}

fn calls(n: u32, pages: u64) -> Result<FaultStats> {
    Ok(FaultStats { handler_calls: n, pages_faulted: pages })
}

/// Without a request it is a snapshot: nothing faulted, holes 0, pages
/// outside any region ERROR, mapped pages as the oracle says.
pub fn fault_snapshot_requests_nothing<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE + 2 * PAGE, &[1]).unwrap();
    let r = rng::<F>(BASE, 10 * PAGE);
    let (res, pfns) = fault_all(&space, r, 0);
    assert_eq!(res, calls(0, 0));
    assert_eq!(space.handle_fault_calls(), 0);
    assert_eq!(pfns[2], oracle_pfn(&space, BASE + 2 * PAGE));
    assert_eq!(pfns[..2], [Pfn::NONE; 2]);
    assert_eq!(pfns[8..], [Pfn::ERROR_ENTRY; 2], "no region");
    finish(alloc, space);
}

/// A read fault of untouched private memory maps the zero page read-only,
/// in one handler call.
pub fn fault_read_maps_zero_page<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let (res, pfns) = fault_all(&space, r, Pfn::REQ_FAULT);
    assert_eq!(res, calls(1, 8));
    let zero = space.zero_frame().unwrap();
    assert!(pfns.iter().all(|p| *p == Pfn::valid(zero, false, 0)), "{pfns:x?}");
    assert_eq!(pfns, space.oracle().expected_pfns(r));
    finish(alloc, space);
}

/// A write fault maps distinct, zeroed, writable private pages.
pub fn fault_write_maps_private_pages<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let (res, pfns) = fault_all(&space, r, Pfn::REQ_FAULT | Pfn::REQ_WRITE);
    assert_eq!(res, calls(1, 8));
    assert!(pfns.iter().all(|p| p.is_valid() && p.is_write() && p.order() == 0));
    let mut frames: Vec<u64> = pfns.iter().map(|p| p.phys()).collect();
    frames.dedup();
    assert_eq!(frames.len(), 8, "distinct frames");
    assert!(frames.iter().all(|&f| space.sim_phys().is_zero(f, PAGE)));
    assert_eq!(pfns, space.oracle().expected_pfns(r));
    finish(alloc, space);
}

/// A write fault on read-only (zero-page) pages breaks copy-on-write: new
/// frames, writable, and the CPU sees the same.
pub fn fault_write_on_read_only_pages_copies<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let (_, before) = fault_all(&space, r, Pfn::REQ_FAULT);
    let invalidations = space.invalidations();
    let (res, after) = fault_all(&space, r, Pfn::REQ_WRITE);
    assert_eq!(res, calls(1, 4));
    assert!(space.invalidations() > invalidations, "copy-on-write invalidates the read-only pages");
    for (b, a) in before.iter().zip(&after) {
        assert!(!b.is_write() && a.is_write() && a.phys() != b.phys());
    }
    assert_eq!(after, space.oracle().expected_pfns(r));
    finish(alloc, space);
}

/// Per-page request bits under the mask: only requested pages are faulted
/// (write where asked), the others are reported as they are.
pub fn fault_per_page_request_bits<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 6 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let mut pfns = vec![Pfn(0), Pfn(Pfn::REQ_FAULT), Pfn(0), Pfn(Pfn::REQ_WRITE), Pfn(0xdead), Pfn(0)];
    let res = fault_with(&space, r, 0, Pfn::REQ_FAULT | Pfn::REQ_WRITE, &mut pfns, None);
    assert_eq!(res, calls(2, 2), "two separate runs of one page");
    assert_eq!(pfns[1], Pfn::valid(space.zero_frame().unwrap(), false, 0));
    assert!(pfns[3].is_write());
    for i in [0, 2, 4, 5] {
        assert_eq!(pfns[i], Pfn::NONE, "page {i} was not requested");
    }
    assert_eq!(pfns, space.oracle().expected_pfns(r));
    finish(alloc, space);
}

/// A write request on a read-only region is `Perm`, without faulting.
pub fn fault_write_on_read_only_region_is_perm<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * PAGE, R, RegionKind::PrivateAnon).unwrap();
    assert_eq!(fault_all(&space, r, Pfn::REQ_WRITE).0, Err(Error::Perm));
    assert_eq!(space.handle_fault_calls(), 0);
    let (res, pfns) = fault_all(&space, r, Pfn::REQ_FAULT);
    assert_eq!(res, calls(1, 4));
    assert!(pfns.iter().all(|p| p.is_valid() && !p.is_write()));
    finish(alloc, space);
}

/// Faulting part of a THP region maps a 2 MiB leaf and reports order 9 for
/// every page of it; a 2 MiB hugetlb page likewise.
pub fn fault_huge_leaves<F: Cpu>() {
    let (alloc, space) = kernel::<F>(32 * MIB);
    let thp = space.map(BASE, 2 * MIB, RW, RegionKind::Thp).unwrap();
    let tlb = space.map(BASE + 2 * MIB, 2 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    for r in [thp, tlb] {
        let part = rng::<F>(r.start() + 100 * PAGE, 4 * PAGE);
        let (res, pfns) = fault_all(&space, part, Pfn::REQ_WRITE);
        assert_eq!(res, calls(1, 4));
        let leaf = space.oracle().leaf_at(r.start()).unwrap().1;
        assert_eq!(leaf.order, 9);
        assert_eq!(pfns[0], Pfn::valid(leaf.frame + 100 * PAGE, true, 9));
        assert_eq!(fault_all(&space, r, 0).1, space.oracle().expected_pfns(r), "the whole leaf is mapped");
    }
    assert_eq!(space.table_view().entry_at(BASE).1, 1);
    finish(alloc, space);
}

/// Pages a device must never get: an IO region, a PROT_NONE region, no
/// region. Reported as ERROR; requiring them is `Fault`.
pub fn fault_error_pages<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let io = space.map(BASE, 4 * PAGE, RW, RegionKind::Io).unwrap();
    let none = space.map(BASE + 8 * PAGE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(none.start(), &[1]).unwrap();
    space.protect(none, RegionFlags::empty()).unwrap();
    let hole = rng::<F>(BASE + 4 * PAGE, 4 * PAGE);
    for r in [io, none, hole] {
        let (res, pfns) = fault_all(&space, r, 0);
        assert_eq!(res, calls(0, 0));
        assert!(pfns.iter().all(|p| *p == Pfn::ERROR_ENTRY), "{r:x?}: {pfns:x?}");
        assert_eq!(fault_all(&space, r, Pfn::REQ_FAULT).0, Err(Error::Fault), "{r:x?}");
    }
    assert!(space.translate(io.start()).is_some(), "IO pages stay mapped for the CPU");
    finish(alloc, space);
}

/// A leaf without USER (a kernel page inside a user region) is ERROR, and
/// cannot be faulted into something a device may use.
pub fn fault_kernel_only_leaf_is_error<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 2 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, &[1; 2 * PAGE as usize]).unwrap();
    let word = entry_word(&space, BASE, 0);
    let old = word.load(Ordering::Acquire);
    let frame = space.translate(BASE).unwrap().frame;
    let kernel = F::encode(&PteView::Leaf { frame, flags: LeafFlags::READ | LeafFlags::WRITE }, 0)
        .unwrap_or_else(|e| panic!("{} cannot encode a kernel-only leaf: {e}", core::any::type_name::<F>()));
    word.store(kernel, Ordering::Release);
    let (res, pfns) = fault_all(&space, r, 0);
    assert_eq!(res, calls(0, 0));
    assert_eq!(pfns, [Pfn::ERROR_ENTRY, oracle_pfn(&space, BASE + PAGE)]);
    assert_eq!(fault_all(&space, r, Pfn::REQ_FAULT).0, Err(Error::Fault));
    word.store(old, Ordering::Release);
    assert_eq!(fault_all(&space, r, Pfn::REQ_FAULT).1, space.oracle().expected_pfns(r));
    finish(alloc, space);
}

/// Device-private entries are VALID (device frame, write bit) only for
/// their owner; for another device or none they are not present, and a
/// fault request brings them back to the CPU (the model maps a fresh page).
pub fn fault_device_private_owner<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let (mine, theirs) = (0x7_0000_0000u64, 0x7_1000_0000u64);
    space.set_special(BASE, SpecialEntry::DevicePrivate { frame: mine, owner: 1, write: true }).unwrap();
    space.set_special(BASE + PAGE, SpecialEntry::DevicePrivate { frame: theirs, owner: 2, write: true }).unwrap();
    space
        .set_special(BASE + 2 * PAGE, SpecialEntry::DevicePrivate { frame: mine + PAGE, owner: 1, write: false })
        .unwrap();
    let snap = |owner| {
        let mut pfns = vec![Pfn::NONE; 4];
        assert_eq!(fault_with(&space, r, 0, 0, &mut pfns, owner), calls(0, 0));
        pfns
    };
    assert_eq!(snap(Some(1)), [Pfn::valid(mine, true, 0), Pfn::NONE, Pfn::valid(mine + PAGE, false, 0), Pfn::NONE]);
    assert_eq!(snap(Some(2)), [Pfn::NONE, Pfn::valid(theirs, true, 0), Pfn::NONE, Pfn::NONE]);
    assert_eq!(snap(None), [Pfn::NONE; 4]);
    // Owner 1 asks for everything: only the other device's page (and the
    // hole) go to the handler.
    let mut pfns = vec![Pfn::NONE; 3];
    let res = fault_with(&space, rng::<F>(BASE, 3 * PAGE), Pfn::REQ_FAULT, 0, &mut pfns, Some(1));
    assert_eq!(res, calls(1, 1));
    assert_eq!(pfns[0], Pfn::valid(mine, true, 0));
    assert_eq!(pfns[1], oracle_pfn(&space, BASE + PAGE), "migrated back to a CPU page");
    assert_eq!(space.oracle().specials().len(), 2);
    space.check_tables();
    finish(alloc, space);
}

/// Swap and migration entries are not present; a fault request replaces
/// them with (zeroed) CPU pages.
pub fn fault_swap_and_migration_entries_fault_back<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 2 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.set_special(BASE, SpecialEntry::Swap { offset: 42 }).unwrap();
    space.set_special(BASE + PAGE, SpecialEntry::Migration { frame: 0x8_0000_0000, write: true }).unwrap();
    assert_eq!(fault_all(&space, r, 0).1, [Pfn::NONE; 2]);
    let (res, pfns) = fault_all(&space, r, Pfn::REQ_WRITE);
    assert_eq!(res, calls(1, 2));
    assert!(pfns.iter().all(|p| p.is_valid() && p.is_write()));
    assert_eq!(pfns, space.oracle().expected_pfns(r));
    assert!(space.oracle().specials().is_empty());
    assert!(pfns.iter().all(|p| space.sim_phys().is_zero(p.phys(), PAGE)));
    finish(alloc, space);
}
