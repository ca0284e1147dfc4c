//! The Linux HMM selftests (tools/testing/selftests/mm/hmm-tests.c), ported to
//! the model kernel and the dummy device. Every scenario ends by checking the
//! device's stale-access counter (zero) and, where frames are involved, that
//! nothing leaked.

mod common;

use common::*;
use core::pin::pin;
use hmm_core::{Error, RegionFlags};
use hmm_testkit::dmirror::{self, prot};
use hmm_testkit::{RegionKind, SimFile};

const NPAGES: u64 = 1024;

#[test]
fn open_close() {
    let (alloc, space) = kernel(16 * MIB);
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        assert_eq!(hmm_core::AddressSpace::notifiers(&space).len(), 1);
        m.unregister().unwrap();
        assert_eq!(hmm_core::AddressSpace::notifiers(&space).len(), 0);
        assert_eq!(m.table_frames(), 0, "unregister frees the mirror table");
        assert_eq!(m.fault(range(0x1000_0000, PAGE), false), Err(Error::Unregistered));
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_read() {
    let (alloc, space) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let buf = space.map(0x1000_0000, size, RW, RegionKind::PrivateAnon).unwrap();
    // Page 0 stays empty, page 1 maps the zero page, pages 2.. hold data.
    let data = pattern(size as usize, 0x5a);
    space.write_bytes(buf.start() + 2 * PAGE, &data[2 * PAGE as usize..]).unwrap();
    space.protect(buf, R).unwrap();
    let mut one = [0u8; 1];
    space.read_bytes(buf.start() + PAGE, &mut one).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        let got = dmirror::read(&m, buf.start(), size as usize).unwrap();
        let c = counters(&m);
        assert_eq!(c.faults, 1);
        assert_eq!(c.cpages, NPAGES);
        assert!(got[..2 * PAGE as usize].iter().all(|&b| b == 0));
        assert_eq!(&got[2 * PAGE as usize..], &data[2 * PAGE as usize..]);
        assert_mirror_coherent(&m, &space, buf);
        assert!(!m.translate(buf.start() + 2 * PAGE).unwrap().is_write(), "read-only region mirrored read-only");
    }
    space.check_tables();
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_read_prot() {
    let (alloc, space) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let buf = space.map(0x1000_0000, size, RW, RegionKind::PrivateAnon).unwrap();
    let data = pattern(size as usize, 0x11);
    space.write_bytes(buf.start(), &data).unwrap();
    space.protect(buf, RegionFlags::empty()).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, buf.start(), size as usize), Err(Error::Fault));
        assert_eq!(m.translate(buf.start()), None, "mirror untouched");
        assert_eq!(m.stats().pages_mapped, 0);
        counters(&m);
    }
    space.protect(buf, R).unwrap();
    let mut back = vec![0u8; size as usize];
    space.read_bytes(buf.start(), &mut back).unwrap();
    assert_eq!(back, data, "CPU data intact");
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_write() {
    let (alloc, space) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let buf = space.map(0x1000_0000, size, RW, RegionKind::PrivateAnon).unwrap();
    let data = pattern(size as usize, 0x22);
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        dmirror::write(&m, buf.start(), &data).unwrap();
        let c = counters(&m);
        assert_eq!(c.faults, 1);
        assert_eq!(c.cpages, NPAGES);
        assert_mirror_coherent(&m, &space, buf);
    }
    let mut back = vec![0u8; size as usize];
    space.read_bytes(buf.start(), &mut back).unwrap();
    assert_eq!(back, data);
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_write_prot() {
    let (alloc, space) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let buf = space.map(0x1000_0000, size, R, RegionKind::PrivateAnon).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        // Reading one page maps the zero page, read-only.
        let got = dmirror::read(&m, buf.start(), PAGE as usize).unwrap();
        assert!(got.iter().all(|&b| b == 0));
        assert_eq!(counters(&m).faults, 1);
        let snap = dmirror::snapshot(&m, range(buf.start(), PAGE)).unwrap();
        assert_eq!(snap, vec![prot::ZERO | prot::READ]);
        // Writing is refused; the CPU still reads zeros.
        let data = pattern(size as usize, 0x33);
        assert_eq!(dmirror::write(&m, buf.start(), &data), Err(Error::Perm));
        let mut back = vec![0xffu8; size as usize];
        space.read_bytes(buf.start(), &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        // Once writable, the write succeeds and replaces the zero page.
        space.protect(buf, RW).unwrap();
        dmirror::write(&m, buf.start(), &data).unwrap();
        let zero = hmm_core::AddressSpace::zero_frame(&space).unwrap();
        assert_ne!(m.translate(buf.start()).unwrap().frame(), zero);
        space.read_bytes(buf.start(), &mut back).unwrap();
        assert_eq!(back, data);
        counters(&m);
        assert_mirror_coherent(&m, &space, buf);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// Parent writes, forks; the child's device writes through its own mirror.
fn write_child(kind: RegionKind, shared: bool) {
    let (alloc, parent) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let buf = parent.map(0x1000_0000, size, RW, kind).unwrap();
    let before = pattern(size as usize, 0x44);
    parent.write_bytes(buf.start(), &before).unwrap();
    let child = parent.fork().unwrap();
    let after = pattern(size as usize, 0x99);
    {
        let m = pin!(mirror(&child, &alloc));
        m.as_ref().register().unwrap();
        dmirror::write(&m, buf.start(), &after).unwrap();
        assert_eq!(counters(&m).faults, 1);
        assert_mirror_coherent(&m, &child, buf);
    }
    let mut seen = vec![0u8; size as usize];
    child.read_bytes(buf.start(), &mut seen).unwrap();
    assert_eq!(seen, after, "child sees its device's writes");
    parent.read_bytes(buf.start(), &mut seen).unwrap();
    assert_eq!(seen, if shared { after } else { before }, "parent sees the device writes only if shared");
    child.check_tables();
    parent.check_tables();
    drop((child, parent));
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_write_child() {
    write_child(RegionKind::PrivateAnon, false);
}

#[test]
fn anon_write_child_shared() {
    write_child(RegionKind::SharedAnon, true);
}

/// A huge leaf is mirrored; snapshot reports `size_flag` on every page, with
/// WRITE, then READ after a protection downgrade.
fn write_huge(kind: RegionKind, leaf: u64, size_flag: u8, ram: u64) {
    let (alloc, space) = kernel(ram);
    let buf = space.map(leaf, leaf, RW, kind).unwrap();
    let data = pattern(64 * PAGE as usize, 0x55);
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        dmirror::write(&m, buf.start(), &data).unwrap();
        assert_eq!(counters(&m).faults, 1);
        let snap = dmirror::snapshot(&m, buf).unwrap();
        assert!(snap.iter().all(|&b| b == prot::WRITE | size_flag), "every page of the leaf shares flags and order");
        space.protect(buf, R).unwrap();
        assert_eq!(m.translate(buf.start()), None, "protection downgrade invalidated the mirror");
        let snap = dmirror::snapshot(&m, buf).unwrap();
        assert!(snap.iter().all(|&b| b == prot::READ | size_flag));
        assert_eq!(dmirror::read(&m, buf.start(), data.len()).unwrap(), data);
        counters(&m);
        assert_mirror_coherent(&m, &space, range(buf.start(), 64 * PAGE));
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_write_huge() {
    write_huge(RegionKind::Thp, 2 * MIB, prot::PMD, 64 * MIB);
}

#[test]
fn anon_write_hugetlbfs_2m() {
    write_huge(RegionKind::HugeTlb2M, 2 * MIB, prot::PMD, 64 * MIB);
}

#[test]
fn anon_write_hugetlbfs_1g() {
    write_huge(RegionKind::HugeTlb1G, 1 << 30, prot::PUD, 3 << 30);
}

#[test]
fn file_read() {
    let (alloc, space) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let file = SimFile::new(&alloc, NPAGES);
    let data = pattern(size as usize, 0x66);
    file.write(0, &data).unwrap();
    let buf = space.map(0x1000_0000, size, R, RegionKind::SharedFile { file: file.clone(), offset: 0 }).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, buf.start(), size as usize).unwrap(), data);
        let c = counters(&m);
        assert_eq!((c.faults, c.cpages), (1, NPAGES));
    }
    drop((space, file));
    assert_eq!(alloc.live(), 0);
}

#[test]
fn file_write() {
    let (alloc, space) = kernel(64 * MIB);
    let size = NPAGES * PAGE;
    let file = SimFile::new(&alloc, NPAGES);
    let buf = space.map(0x1000_0000, size, RW, RegionKind::SharedFile { file: file.clone(), offset: 0 }).unwrap();
    let data = pattern(size as usize, 0x77);
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        dmirror::write(&m, buf.start(), &data).unwrap();
        assert_eq!(counters(&m).faults, 1);
    }
    let mut back = vec![0u8; size as usize];
    file.read(0, &mut back).unwrap();
    assert_eq!(back, data, "device writes reach the file's pages");
    drop((space, file));
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_read_multiple() {
    let (alloc, space) = kernel(64 * MIB);
    let size = 64 * PAGE;
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        for round in 0..10u8 {
            let buf = space.map(0x1000_0000, size, RW, RegionKind::PrivateAnon).unwrap();
            let data = pattern(size as usize, round);
            space.write_bytes(buf.start(), &data).unwrap();
            m.device().reset_counters();
            assert_eq!(dmirror::read(&m, buf.start(), size as usize).unwrap(), data, "round {round}");
            assert_eq!(counters(&m).faults, 1, "round {round}");
            space.unmap(buf).unwrap();
            assert_eq!(m.translate(buf.start()), None);
        }
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn anon_teardown() {
    watchdog::bounded("device reads racing an unmap", watchdog::BOUND, || {
        let (alloc, space) = kernel(64 * MIB);
        let size = 32 * PAGE;
        let (mut ok, mut failed) = (0, 0);
        {
            let m = pin!(mirror(&space, &alloc));
            m.as_ref().register().unwrap();
            let m = &*m;
            for round in 0..1000u32 {
                let buf = space.map(0x1000_0000, size, RW, RegionKind::PrivateAnon).unwrap();
                let data = pattern(size as usize, round as u8);
                space.write_bytes(buf.start(), &data).unwrap();
                let got = std::thread::scope(|s| {
                    let reader = s.spawn(|| dmirror::read(m, buf.start(), size as usize));
                    space.unmap(range(buf.start() + size / 2, size / 2)).unwrap();
                    reader.join().unwrap()
                });
                match got {
                    Ok(bytes) => {
                        assert_eq!(bytes, data, "round {round}: a successful read returns complete, correct data");
                        ok += 1;
                    }
                    Err(_) => failed += 1,
                }
                space.unmap(range(buf.start(), size / 2)).unwrap();
                assert_eq!(m.translate(buf.start()), None);
            }
            counters(m);
        }
        assert_eq!(ok + failed, 1000);
        drop(space);
        assert_eq!(alloc.live(), 0);
    });
}

#[test]
fn mixedmap() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(0x1000_0000, 16 * PAGE, R, RegionKind::MixedMap).unwrap();
    let mut cpu = vec![0u8; 16 * PAGE as usize];
    space.read_bytes(buf.start(), &mut cpu).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        assert_eq!(dmirror::read(&m, buf.start(), cpu.len()).unwrap(), cpu);
        assert!(!m.translate(buf.start()).unwrap().is_write(), "mixed map mirrored read-only");
        let snap = dmirror::snapshot(&m, buf).unwrap();
        assert!(snap.iter().all(|&b| b == prot::READ));
        counters(&m);
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn compound() {
    let (alloc, space) = kernel(64 * MIB);
    let buf = space.map(2 * MIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    space.write_bytes(buf.start(), &pattern(PAGE as usize, 1)).unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        let snap = dmirror::snapshot(&m, buf).unwrap();
        assert!(snap.iter().all(|&b| b == prot::WRITE | prot::PMD));
        // Unmapping the first page splits the leaf: the rest stays, in 4 KiB pages.
        space.unmap(range(buf.start(), PAGE)).unwrap();
        let snap = dmirror::snapshot(&m, buf).unwrap();
        assert_eq!(snap[0], prot::ERROR, "unmapped page is a hole");
        assert!(snap[1..].iter().all(|&b| b == prot::WRITE));
        assert_eq!(counters(&m).faults, 0, "snapshots take no faults");
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}

#[test]
fn snapshot() {
    let (alloc, space) = kernel(64 * MIB);
    let base = 0x1000_0000;
    // page 0: PROT_NONE, page 1: hole, page 2: zero page read-only,
    // page 3: data read-only, page 4: data read-write.
    space.map(base, PAGE, RegionFlags::empty(), RegionKind::PrivateAnon).unwrap();
    space.map(base + 2 * PAGE, PAGE, R, RegionKind::PrivateAnon).unwrap();
    let p3 = space.map(base + 3 * PAGE, PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.map(base + 4 * PAGE, PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let mut b = [0u8; 1];
    space.read_bytes(base + 2 * PAGE, &mut b).unwrap();
    space.write_bytes(base + 3 * PAGE, b"x").unwrap();
    space.protect(p3, R).unwrap();
    space.write_bytes(base + 4 * PAGE, b"y").unwrap();
    {
        let m = pin!(mirror(&space, &alloc));
        m.as_ref().register().unwrap();
        let snap = dmirror::snapshot(&m, range(base, 5 * PAGE)).unwrap();
        assert_eq!(snap, vec![prot::ERROR, prot::ERROR, prot::ZERO | prot::READ, prot::READ, prot::WRITE]);
        assert_eq!(counters(&m).faults, 0);
        assert_eq!(m.translate(base + 4 * PAGE), None, "snapshot does not populate the mirror");
    }
    drop(space);
    assert_eq!(alloc.live(), 0);
}
