//! A device geometry is validated at run time: one whose index bits do not
//! add up to its address width would make distinct addresses share mirror
//! entries (two 9-bit levels under a 48-bit address alias every 1 GiB).

mod common;

use common::{device, kernel, range, MIB, PAGE, RW};
use core::pin::pin;
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
    let m = Mirror::<_, _, _, Aliasing, SpinLock>::with_geometry(
        &space,
        &*alloc,
        device(&space),
        range(0x1000_0000, 0x5000_0000),
        MirrorConfig::default(),
    );
    assert_eq!(m.err(), Some(Error::BadGeometry));
    assert_eq!(MirrorTable::<Aliasing>::new(&**space.sim_phys(), &*alloc).err(), Some(Error::BadGeometry));
    assert_eq!(alloc.live(), before, "a refused geometry allocated frames");
}

#[test]
fn a_consistent_small_geometry_mirrors_without_aliasing() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(0x1000_0000, PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(0x1000_0000, &[7]).unwrap();
    let m = Mirror::<_, _, _, Small, SpinLock>::with_geometry(
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
        Mirror::<_, _, _, Small, SpinLock>::with_geometry(
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
