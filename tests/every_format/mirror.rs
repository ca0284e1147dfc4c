//! (c) A `Mirror` (software device format over the CPU's geometry) on the
//! model space, with the dummy device checking every access against the
//! CPU's tables.

use crate::*;
use core::pin::pin;
use hmm_core::arch::SpecialEntry;
use hmm_core::{AddressSpace, Error, Event, Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::dmirror::{self, DummyDevice};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, SimPhys};

pub type Dev = DummyDevice<SimPhys>;
pub type DevMirror<'s, F> = Mirror<'s, ModelSpace<F>, Dev, CountingAllocator>;

/// A dummy device whose every access is checked against `space`'s tables.
pub fn device<F: Cpu>(space: &ModelSpace<F>) -> Dev {
    let view = space.table_view();
    let dev = DummyDevice::new(
        space.sim_phys().clone(),
        Some(Box::new(move |va, frame, write| view.cpu_maps(va, frame, write))),
        space.zero_frame(),
    );
    dev.reserve_events(256);
    dev
}

/// A mirror of the whole user half (register it after pinning).
pub fn mirror<'s, F: Cpu>(
    space: &'s ModelSpace<F>,
    alloc: &'s CountingAllocator,
    owner: Option<u16>,
) -> DevMirror<'s, F> {
    let config = MirrorConfig { owner, ..MirrorConfig::default() };
    Mirror::new(space, alloc, device(space), ModelSpace::<F>::user_range(), config).expect("mirror")
}

/// No stale device access, and every mirrored page of `r` maps what the CPU
/// maps (per the oracle) with no more permission.
fn assert_coherent<F: Cpu>(m: &DevMirror<'_, F>, space: &ModelSpace<F>, r: VaRange) {
    assert_eq!(m.device().counters().stale, 0, "device used a stale translation");
    for i in 0..r.pages(12) {
        let va = r.start() + i * PAGE;
        if let Some(e) = m.translate(va) {
            let p = space.translate(va).unwrap_or_else(|| panic!("mirror maps {va:#x}, the CPU does not"));
            assert_eq!(e.frame(), p.frame, "frame at {va:#x}");
            assert!(!e.is_write() || p.leaf.write, "mirror writable at {va:#x}, CPU not");
        }
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// A device read faults the pages in through the mirror and returns what
/// the CPU wrote; the mirror maps the oracle's frames.
pub fn mirror_fault_and_read<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 16 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let d = data(16 * PAGE as usize, 0x3c);
    space.write_bytes(BASE, &d).unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, BASE, d.len()).unwrap(), d);
        assert_eq!(m.device().counters().faults, 1);
        assert_eq!(m.stats().pages_mapped, 16);
        for i in 0..16 {
            assert_eq!(m.translate(BASE + i * PAGE).unwrap().frame(), space.translate(BASE + i * PAGE).unwrap().frame);
        }
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// A device write faults pages in writable; the CPU reads the data back.
pub fn mirror_device_write_reaches_cpu<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE + 4 * PAGE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let d = data(8 * PAGE as usize - 100, 0x77);
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        dmirror::write(&m, r.start() + 50, &d).unwrap();
        assert!(m.translate(r.start()).unwrap().is_write());
        assert_coherent(&m, &space, r);
    }
    let mut back = vec![0u8; d.len()];
    space.read_bytes(r.start() + 50, &mut back).unwrap();
    assert_eq!(back, d);
    finish(alloc, space);
}

/// Unmapping part of a mirrored range tears exactly that part down (an
/// Unmap event reaches the device); the rest stays mirrored.
pub fn mirror_unmap_tears_down<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        m.fault(r, true).unwrap();
        let gone = rng::<F>(BASE + 2 * PAGE, 4 * PAGE);
        space.unmap(gone).unwrap();
        for i in 0..8 {
            let mapped = m.translate(BASE + i * PAGE).is_some();
            assert_eq!(mapped, !(2..6).contains(&i), "page {i}");
        }
        assert!(m.device().events().contains(&(gone, Event::Unmap)));
        assert_eq!(m.stats().pages_invalidated, 4);
        assert_eq!(dmirror::read(&m, gone.start(), 1), Err(Error::Fault), "no region any more");
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// mprotect to read-only drops the mirror's write access (the device must
/// fault again, and a write is refused); to PROT_NONE drops everything.
pub fn mirror_protect_tears_down<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, b"keep").unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        m.fault(r, true).unwrap();
        space.protect(r, R).unwrap();
        assert!(m.translate(BASE).is_none_or(|e| !e.is_write()), "write access revoked");
        assert!(m.device().events().contains(&(r, Event::ProtectionVma)));
        assert_eq!(dmirror::read(&m, BASE, 4).unwrap(), b"keep");
        assert_eq!(dmirror::write(&m, BASE, b"nope"), Err(Error::Perm));
        space.protect(r, RegionFlags::empty()).unwrap();
        assert_eq!(m.translate(BASE), None);
        assert_eq!(dmirror::read(&m, BASE, 4), Err(Error::Fault));
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// MADV_DONTNEED: the mirror drops the pages, and the device then reads the
/// zeros the CPU would.
pub fn mirror_clear_zaps<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, &[0xaa; 4 * PAGE as usize]).unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, BASE, 4).unwrap(), [0xaa; 4]);
        space.clear(r).unwrap();
        assert_eq!(m.translate(BASE), None);
        assert_eq!(dmirror::read(&m, BASE, 4).unwrap(), [0; 4]);
        assert_eq!(m.translate(BASE).unwrap().frame(), space.zero_frame().unwrap());
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// A 2 MiB CPU leaf is mirrored as one 2 MiB entry, and a partial unmap
/// (which splits the CPU leaf) drops it whole.
pub fn mirror_2m_leaf_is_one_entry<F: Cpu>() {
    let (alloc, space) = kernel::<F>(32 * MIB);
    let r = space.map(BASE, 2 * MIB, RW, RegionKind::Thp).unwrap();
    space.write_bytes(BASE, &[1]).unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        m.fault(rng::<F>(BASE + MIB, PAGE), false).unwrap();
        let s = m.stats();
        assert_eq!((s.entries_mapped, s.huge_mapped, s.pages_mapped), (1, 1, 512));
        let e = m.translate(BASE + MIB + 3 * PAGE).unwrap();
        let leaf = space.oracle().leaf_at(BASE).unwrap().1;
        assert_eq!((e.order(), e.frame()), (9, leaf.frame + MIB + 3 * PAGE));
        assert_eq!(m.table_stats().huge_leaves, 1);
        space.unmap(rng::<F>(BASE, PAGE)).unwrap();
        assert_eq!(m.translate(BASE + MIB), None, "the huge entry goes whole");
        assert_eq!(space.oracle().leaf_at(BASE + MIB).unwrap().1.order, 0, "the CPU split its leaf");
        m.fault(rng::<F>(BASE + MIB, PAGE), false).unwrap();
        assert_eq!(m.translate(BASE + MIB).unwrap().order(), 0);
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// fork write-protects private pages in the parent: the mirror loses write
/// access, keeps reading the same data, and after the parent's CPU write
/// (copy-on-write) the device sees the parent's new page, the child keeps
/// the old data.
pub fn mirror_fork_write_protects<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 2 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, b"before").unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        m.fault(r, true).unwrap();
        let old = m.translate(BASE).unwrap().frame();
        let child = space.fork().unwrap();
        assert!(m.translate(BASE).is_none_or(|e| !e.is_write()), "fork write-protects the mirror");
        assert!(m.device().events().iter().any(|(_, e)| *e == Event::ProtectionPage));
        assert_eq!(dmirror::read(&m, BASE, 6).unwrap(), b"before");
        space.write_bytes(BASE, b"parent").unwrap();
        assert_eq!(dmirror::read(&m, BASE, 6).unwrap(), b"parent");
        assert_ne!(m.translate(BASE).unwrap().frame(), old, "the parent's page was copied");
        let mut back = [0u8; 6];
        child.read_bytes(BASE, &mut back).unwrap();
        assert_eq!(&back, b"before");
        dmirror::write(&m, BASE + PAGE, b"dev").unwrap();
        child.read_bytes(BASE + PAGE, &mut back[..3]).unwrap();
        assert_eq!(&back[..3], [0; 3], "the child does not see the device's write");
        child.check_tables();
        drop(child);
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// With an owner set, the mirror maps its own device-private pages as they
/// are (device frames), and another owner's page is migrated back to a CPU
/// page; a CPU access to the owner's page migrates it too, and the mirror
/// drops its entry.
pub fn mirror_device_private_pages<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 2 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let dev_frame = 0x7_0000_0000u64;
    space.set_special(BASE, SpecialEntry::DevicePrivate { frame: dev_frame, owner: 1, write: true }).unwrap();
    space
        .set_special(BASE + PAGE, SpecialEntry::DevicePrivate { frame: dev_frame + PAGE, owner: 2, write: true })
        .unwrap();
    {
        let m = pin!(mirror(&space, &alloc, Some(1)));
        m.as_ref().register().unwrap();
        m.fault(r, false).unwrap();
        assert_eq!(m.stats().handler_calls, 1, "only the other owner's page is faulted");
        let own = m.translate(BASE).unwrap();
        assert_eq!((own.frame(), own.is_write()), (dev_frame, true));
        assert_eq!(m.translate(BASE + PAGE).unwrap().frame(), space.translate(BASE + PAGE).unwrap().frame);
        let mut b = [0u8; 1];
        space.read_bytes(BASE, &mut b).unwrap();
        assert_eq!(b, [0], "the model migrates back a zeroed page");
        assert_eq!(m.translate(BASE), None, "migration back invalidates the device's entry");
        assert!(space.oracle().specials().is_empty());
        assert_coherent(&m, &space, r);
    }
    finish(alloc, space);
}

/// The last page of the user half is mirrored like any other.
pub fn mirror_top_of_user_half<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let end = ModelSpace::<F>::USER_END;
    let r = space.map(end - 2 * MIB, 2 * MIB, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(end - 3, b"end").unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, end - 3, 3).unwrap(), b"end");
        dmirror::write(&m, end - 2 * MIB, b"low").unwrap();
        assert_coherent(&m, &space, r);
        space.unmap(r).unwrap();
        assert_eq!(m.translate(end - PAGE), None);
    }
    finish(alloc, space);
}

/// Releasing the space (exit) with a mirror registered tears the mirror's
/// table down; nothing leaks once both are gone.
pub fn mirror_release_empties_table<F: Cpu>() {
    let (alloc, space) = kernel::<F>(32 * MIB);
    space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.map(BASE + 2 * MIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    {
        let m = pin!(mirror(&space, &alloc, None));
        m.as_ref().register().unwrap();
        dmirror::write(&m, BASE, &[1; 8 * PAGE as usize]).unwrap();
        dmirror::write(&m, BASE + 2 * MIB, &[2; 64]).unwrap();
        assert_eq!(m.table_stats().leaves, 9);
        space.release();
        assert_eq!(m.table_stats().leaves, 0);
        assert!(m.device().events().iter().any(|(_, e)| *e == Event::Release));
        assert_eq!(dmirror::read(&m, BASE, 1), Err(Error::Released));
    }
    assert_eq!(space.oracle().len(), 0);
    finish(alloc, space);
}
