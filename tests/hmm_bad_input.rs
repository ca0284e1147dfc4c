//! Bad input to the core entry points gets a typed error and changes nothing:
//! no frame leaks, the mirror stays coherent with the CPU.

mod common;

use common::*;
use core::pin::pin;
use hmm_core::arch::soft::SoftFormat;
use hmm_core::arch::x86_64::X86_64Level5;
use hmm_core::arch::{PagingGeometry, MAX_LEVELS};
use hmm_core::pt::Pfn;
use hmm_core::sync::SpinLock;
use hmm_core::{AddressSpace, Error, Mirror, MirrorConfig, VaRange};
use hmm_testkit::dmirror;
use hmm_testkit::RegionKind;
use static_assertions::assert_not_impl_any;

assert_not_impl_any!(DevMirror<'static>: Clone, Copy);

const BUF: u64 = 0x1000_0000;

/// A device whose table translates only 39 bits (3 levels, no sign extension).
struct Device39;
impl PagingGeometry for Device39 {
    const LEVELS: usize = 3;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = 39;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}
static_assertions::const_assert!(hmm_core::arch::check_geometry(3, 12, [9; 6], 39, 0b1));

#[test]
fn device_geometry_bounds_the_mirror() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let too_wide = Mirror::<_, _, _, SoftFormat<Device39>, SpinLock>::with_format(
        &space,
        &*alloc,
        device(&space),
        user(),
        MirrorConfig::default(),
    );
    assert_eq!(too_wide.err(), Some(Error::OutOfRange));
    {
        let m = Mirror::<_, _, _, SoftFormat<Device39>, SpinLock>::with_format(
            &space,
            &*alloc,
            device(&space),
            range(0, 1 << 39),
            MirrorConfig::default(),
        )
        .unwrap();
        let m = pin!(m);
        m.as_ref().register().unwrap();
        m.fault(range(BUF, 8 * PAGE), true).unwrap();
        assert!(m.translate(BUF + 7 * PAGE).unwrap().is_write());
        assert_eq!(m.table_frames(), 3, "one directory per level below the root");
        space.unmap(range(BUF, 8 * PAGE)).unwrap();
        assert_eq!(m.translate(BUF), None);
        assert_eq!(m.table_frames(), 1, "emptied directories are freed");
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn fault_bad_ranges() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.map(BUF + 16 * PAGE, 4 * PAGE, RW, RegionKind::Io).unwrap();
    space.map(BUF + 32 * PAGE, 4 * PAGE, R, RegionKind::PrivateAnon).unwrap();
    {
        let small =
            Mirror::new(&space, &*alloc, device(&space), range(BUF, 64 * PAGE), MirrorConfig::default()).unwrap();
        let m = pin!(small);
        // Not registered yet.
        assert_eq!(m.fault(range(BUF, PAGE), false), Err(Error::Unregistered));
        m.as_ref().register().unwrap();
        assert_eq!(m.as_ref().register(), Err(Error::Busy), "double registration");
        let live = alloc.live();
        let cases: Vec<(VaRange, bool, Error)> = vec![
            // Outside the mirror.
            (range(BUF + 64 * PAGE, PAGE), false, Error::OutOfRange),
            (range(BUF - PAGE, 2 * PAGE), false, Error::OutOfRange),
            // Across the region's end into a hole.
            (range(BUF, 8 * PAGE), false, Error::Fault),
            // A hole.
            (range(BUF + 8 * PAGE, PAGE), false, Error::Fault),
            // IO/PFN region.
            (range(BUF + 16 * PAGE, PAGE), false, Error::Fault),
            // Write to a read-only region.
            (range(BUF + 32 * PAGE, PAGE), true, Error::Perm),
        ];
        for (r, write, want) in cases {
            assert_eq!(m.fault(r, write), Err(want), "{r:x?} write={write}");
        }
        // A range valid only for 5-level paging.
        let wide = VaRange::new::<X86_64Level5>(1 << 50, PAGE).unwrap();
        assert_eq!(m.fault(wide, false), Err(Error::NonCanonical));
        for i in 0..64 {
            assert_eq!(m.translate(BUF + i * PAGE), None, "nothing mirrored");
        }
        assert_eq!(alloc.live(), live, "no frame taken by failed faults");
        let mut out = vec![Pfn::NONE; 3];
        assert_eq!(m.snapshot(range(BUF, 4 * PAGE), &mut out), Err(Error::BadLength));
        assert_eq!(m.stats().pages_mapped, 0);
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn released_space() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        m.fault(range(BUF, 4 * PAGE), false).unwrap();
        space.release();
        assert_eq!(m.translate(BUF), None);
        assert_eq!(m.fault(range(BUF, PAGE), false), Err(Error::Released));
        let late = mirror_unchecked(&space, &alloc);
        assert_eq!(late.err(), Some(Error::Released));
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

fn mirror_unchecked<'s>(
    space: &'s hmm_testkit::ModelSpace,
    alloc: &'s hmm_testkit::CountingAllocator,
) -> hmm_core::Result<DevMirror<'s>> {
    Mirror::new(space, alloc, device(space), user(), MirrorConfig::default())
}

#[test]
fn unregister_twice() {
    let (alloc, space) = kernel(16 * MIB);
    {
        let m = pin!(mirror(&space, &alloc));
        assert_eq!(m.unregister(), Err(Error::Unregistered), "never registered");
        m.as_ref().register().unwrap();
        m.unregister().unwrap();
        assert_eq!(m.unregister(), Err(Error::Unregistered));
        assert_eq!(m.as_ref().register(), Err(Error::Unregistered), "an unregistered mirror stays so");
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn exhausted_allocator_at_every_allocation_of_a_fault() {
    let (alloc, space) = kernel(64 * MIB);
    let len = 200 * PAGE;
    space.map(BUF, len, RW, RegionKind::PrivateAnon).unwrap();
    let mut points = 0;
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        for k in 1.. {
            // Start each round from nothing mapped, so every allocation of
            // the fault (CPU tables, data frames, mirror directories) happens.
            space.unmap(range(BUF, len)).unwrap();
            space.map(BUF, len, RW, RegionKind::PrivateAnon).unwrap();
            let failures = alloc.injected_failures();
            alloc.fail_at(k);
            let r = m.fault(range(BUF, len), true);
            alloc.clear_failures();
            assert_mirror_coherent(&m, &space, range(BUF, len));
            space.check_tables();
            if alloc.injected_failures() == failures {
                r.unwrap();
                break;
            }
            assert_eq!(r, Err(Error::NoMemory), "allocation {k}");
            points += 1;
            // The same fault succeeds once memory is back.
            m.fault(range(BUF, len), true).unwrap();
            assert_eq!(dmirror::read(&m, BUF, len as usize).unwrap(), vec![0u8; len as usize]);
        }
        counters(&m);
    }
    assert!(points > 200, "every data frame, table and mirror directory was a failure point ({points})");
    drop(space);
    assert_eq!(alloc.live(), 0, "no frame leaked on any failure path");
}

#[test]
fn device_update_failure() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, 128 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        let frames = m.table_frames();
        // The first 64 pages map; the fault over 128 then fails in the device.
        m.fault(range(BUF, 64 * PAGE), true).unwrap();
        m.device().fail_update_at(1);
        assert_eq!(m.fault(range(BUF, 128 * PAGE), true), Err(Error::Device(-5)));
        for i in 0..128 {
            assert_eq!(m.translate(BUF + i * PAGE), None, "a failed fault leaves nothing of its range");
        }
        assert_mirror_coherent(&m, &space, range(BUF, 128 * PAGE));
        m.fault(range(BUF, 128 * PAGE), true).unwrap();
        assert!(m.translate(BUF + 127 * PAGE).is_some());
        space.unmap(range(BUF, 128 * PAGE)).unwrap();
        assert_eq!(m.table_frames(), frames, "directories freed once empty");
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn non_blockable_invalidation_refused_while_a_fault_commits() {
    watchdog::bounded("a fault stalled in its device update, and its release", watchdog::BOUND, || {
        let (alloc, space) = kernel(16 * MIB);
        space.map(BUF, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        {
            let m = pin!(mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let seq = space.notifiers().seq();
            let (in_update, stalled) = std::sync::mpsc::channel();
            let (release, go) = std::sync::mpsc::channel::<()>();
            let go = std::sync::Mutex::new(go);
            m.device().on_update(Some(Box::new(move || {
                in_update.send(()).unwrap();
                go.lock().unwrap().recv().unwrap();
            })));
            let m = &*m;
            std::thread::scope(|s| {
                let fault = s.spawn(|| m.fault(range(BUF, 4 * PAGE), false));
                // The fault now holds the update lock inside the device update.
                stalled.recv().unwrap();
                let r = space.notifiers().invalidate_range_start(range(BUF, PAGE), hmm_core::Event::Unmap, false);
                assert_eq!(r.err(), Some(Error::WouldBlock), "a callback that would wait refuses");
                assert_eq!(space.notifiers().seq() % 2, 0, "refused invalidation ended itself");
                // A blockable one waits for the commit and then tears down.
                release.send(()).unwrap();
                fault.join().unwrap().unwrap();
            });
            m.device().on_update(None);
            assert!(space.notifiers().seq() > seq);
            let inv = space.notifiers().invalidate_range_start(range(BUF, PAGE), hmm_core::Event::Unmap, true).unwrap();
            space.notifiers().invalidate_range_end(inv);
            assert_eq!(m.translate(BUF), None);
            assert!(m.translate(BUF + PAGE).is_some());
        }
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}
