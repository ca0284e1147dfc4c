//! A device geometry is validated at run time: one whose index bits do not
//! add up to its address width would make distinct addresses share mirror
//! entries (two 9-bit levels under a 48-bit address alias every 1 GiB).

mod common;

use common::{device, kernel, range, MIB, PAGE, RW};
use core::pin::pin;
use hmm_core::arch::soft::SoftFormat;
use hmm_core::arch::{check_geometry, PagingGeometry, MAX_LEVELS};
use hmm_core::pt::MirrorTable;
use hmm_core::sync::SpinLock;
use hmm_core::{Error, Mirror, MirrorConfig};
use hmm_testkit::RegionKind;

/// Claims 48-bit addresses with only two 9-bit levels (30 bits translated).
struct Aliasing;
impl PagingGeometry for Aliasing {
    const LEVELS: usize = 2;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = 48;
    const SIGN_EXTEND: bool = true;
    const LEAF_LEVELS: u32 = 0b1;
}

/// Its honest counterpart: two levels, 30-bit addresses.
struct Small;
impl PagingGeometry for Small {
    const LEVELS: usize = 2;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = 30;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}

#[test]
fn an_aliasing_device_geometry_is_refused() {
    assert!(!check_geometry(2, 12, [9; MAX_LEVELS], 48, 0b1));
    let (alloc, space) = kernel(16 * MIB);
    let before = alloc.live();
    let m = Mirror::<_, _, _, SoftFormat<Aliasing>, SpinLock>::with_format(
        &space,
        &*alloc,
        device(&space),
        range(0x1000_0000, 0x5000_0000),
        MirrorConfig::default(),
    );
    assert_eq!(m.err(), Some(Error::BadGeometry));
    assert_eq!(MirrorTable::<SoftFormat<Aliasing>>::new(&**space.sim_phys(), &*alloc).err(), Some(Error::BadGeometry));
    assert_eq!(alloc.live(), before, "a refused geometry allocated frames");
}

#[test]
fn a_consistent_small_geometry_mirrors_without_aliasing() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(0x1000_0000, PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(0x1000_0000, &[7]).unwrap();
    let m = Mirror::<_, _, _, SoftFormat<Small>, SpinLock>::with_format(
        &space,
        &*alloc,
        device(&space),
        range(0, 1 << 30),
        MirrorConfig::default(),
    )
    .unwrap();
    let m = pin!(m);
    m.as_ref().register().unwrap();
    m.fault(range(0x1000_0000, PAGE), false).unwrap();
    assert!(m.translate(0x1000_0000).is_some());
    // The address 1 GiB above is outside what this geometry translates: no
    // alias of the mirrored page.
    assert_eq!(m.translate(0x5000_0000), None);
    assert_eq!(
        Mirror::<_, _, _, SoftFormat<Small>, SpinLock>::with_format(
            &space,
            &*alloc,
            device(&space),
            range(0x4000_0000, PAGE),
            MirrorConfig::default()
        )
        .err(),
        Some(Error::OutOfRange)
    );
}

/// A consistent geometry with 8 KiB pages: `check_geometry` accepts it, but
/// the mirror table (one 4 KiB frame per table, one entry per 4 KiB page)
/// cannot hold it.
struct Page8K;
impl PagingGeometry for Page8K {
    const LEVELS: usize = 3;
    const PAGE_SHIFT: u32 = 13;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = 40;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}

/// Four levels of 256-entry tables over 44-bit addresses: smaller tables
/// than a page holds, which the mirror table supports.
struct Narrow;
impl PagingGeometry for Narrow {
    const LEVELS: usize = 4;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [8; MAX_LEVELS];
    const VA_BITS: u32 = 44;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}

#[test]
fn a_consistent_geometry_the_table_cannot_hold_is_refused() {
    assert!(check_geometry(3, 13, [9; MAX_LEVELS], 40, 0b1));
    assert_eq!(MirrorTable::<SoftFormat<Page8K>>::check_geometry(), Err(Error::BadGeometry));
    assert_eq!(MirrorTable::<SoftFormat<Aliasing>>::check_geometry(), Err(Error::BadGeometry));
    assert_eq!(MirrorTable::<SoftFormat<Small>>::check_geometry(), Ok(()));
}

#[test]
fn tables_smaller_than_a_page_mirror_correctly() {
    assert_eq!(MirrorTable::<SoftFormat<Narrow>>::check_geometry(), Ok(()));
    let (alloc, space) = kernel(16 * MIB);
    let buf = 0x0abc_d000_0000;
    space.map(buf, 2 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let m = Mirror::<_, _, _, SoftFormat<Narrow>, SpinLock>::with_format(
        &space,
        &*alloc,
        device(&space),
        range(0, 1 << 44),
        MirrorConfig::default(),
    )
    .unwrap();
    let m = pin!(m);
    m.as_ref().register().unwrap();
    m.fault(range(buf, 2 * PAGE), true).unwrap();
    let view = space.table_view();
    for va in [buf, buf + PAGE] {
        let e = m.translate(va).expect("mirrored");
        assert_eq!(Some(e.frame()), view.translate(va).map(|t| t.0));
    }
    // Root plus one table per lower level.
    assert_eq!(m.table_frames(), 4);
}

/// What a device walker does: start at `root()` and follow directory entries
/// (bit 0 valid, frame in bits 12 and up: here the x86_64 format, as an
/// IOMMU walks it) down to the leaf. The root is the table the mirror table
/// allocated, and the walk finds what `translate` finds.
#[test]
fn a_walk_from_the_root_finds_the_entries() {
    use hmm_core::arch::x86_64::X86_64Level4 as L4;
    use hmm_core::PhysMem;
    let (alloc, space) = kernel(16 * MIB);
    let phys = &**space.sim_phys();
    let before = alloc.live();
    let (t, mut w) = MirrorTable::<L4>::new(phys, &*alloc).unwrap();
    let root = t.root();
    assert!(root != 0 && root.is_multiple_of(PAGE) && alloc.live() == before + 1, "root {root:#x}");
    let va = 0x7f12_3456_7000u64;
    let frame = phys.base() + 42 * PAGE;
    w.map(phys, &*alloc, range(va, PAGE), frame, true).unwrap();
    let mut table = root;
    for level in (0..4).rev() {
        let index = (va >> (12 + 9 * level)) & 511;
        // SAFETY: `table` is a live table of `t` in simulated RAM; the entry is read atomically.
        let raw = unsafe { core::sync::atomic::AtomicU64::from_ptr(phys.ptr(table + index * 8).cast::<u64>()) }
            .load(core::sync::atomic::Ordering::Acquire);
        assert_eq!(raw & 1, 1, "level {level} entry not valid");
        table = raw & 0x000f_ffff_ffff_f000;
    }
    assert_eq!(table, frame);
    assert_eq!(t.translate(phys, va).map(|e| e.frame()), Some(frame));
    w.destroy(&t, phys, &*alloc);
    assert_eq!(t.root(), 0, "destroyed");
    assert_eq!(alloc.live(), before);
}
