//! (a) `hmm_core::pt::walk` and `pt::snapshot` over the model's tables.

use crate::*;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteView, SpecialEntry};
use hmm_core::pt::Pfn;
use hmm_core::{Error, RegionFlags};
use hmm_testkit::{ModelSpace, OracleSpecial, RegionKind, SimFile};
use std::sync::atomic::Ordering;

/// 4 KiB pages: written pages are level-0 leaves with the oracle's frames,
/// a read-only touch maps the zero page read-only, untouched pages are
/// holes; the snapshot says the same.
pub fn walker_4k_pages<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 16 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for i in (0..16).step_by(3) {
        space.write_bytes(BASE + i * PAGE, &[i as u8 + 1]).unwrap();
    }
    let mut b = [0u8; 1];
    space.read_bytes(BASE + PAGE, &mut b).unwrap();
    let seen = entries(&space, r);
    assert_tiles(r, &seen);
    assert_eq!(seen.len(), 16, "one level-0 entry per page");
    let zero = space.zero_frame().unwrap();
    for (i, (span, view)) in seen.iter().enumerate() {
        let va = BASE + i as u64 * PAGE;
        assert_eq!((span.level, span.shift), (0, 12));
        match space.translate(va) {
            Some(p) => {
                assert_eq!(*view, PteView::Leaf { frame: p.frame, flags: restrict_to_model(view, p.leaf.write) });
                assert_eq!(p.frame == zero, i == 1, "only page 1 maps the zero page");
            }
            None => assert_eq!(*view, PteView::Absent, "page {i} was never touched"),
        }
    }
    assert_snapshot_is_oracle(&space, r);
    let pfns = space.snapshot(r);
    assert!(pfns[0].is_valid() && pfns[0].is_write() && !pfns[1].is_write() && pfns[2] == Pfn::NONE);
    finish(alloc, space);
}

/// The flags of a model leaf as decoded: READ | USER, WRITE as asked, plus
/// whatever status bits (ACCESSED, DIRTY, EXEC...) the format reports.
fn restrict_to_model(view: &PteView, write: bool) -> LeafFlags {
    let PteView::Leaf { flags, .. } = view else { panic!("not a leaf: {view:?}") };
    assert!(flags.contains(user_flags(write)), "leaf flags {flags:?}");
    assert_eq!(flags.contains(LeafFlags::WRITE), write, "leaf flags {flags:?}");
    *flags
}

/// A transparent huge page is one level-1 entry spanning 2 MiB; the
/// snapshot gives each page its frame with order 9.
pub fn walker_2m_leaf<F: Cpu>() {
    let (alloc, space) = kernel::<F>(32 * MIB);
    let r = space.map(BASE, 4 * MIB, RW, RegionKind::Thp).unwrap();
    space.write_bytes(BASE + 2 * MIB + 5 * PAGE, b"thp").unwrap();
    let seen = entries(&space, r);
    assert_tiles(r, &seen);
    assert_eq!(seen.len(), 2, "a hole and a 2 MiB leaf: {seen:x?}");
    assert_eq!(seen[0].1, PteView::Absent);
    assert_eq!((seen[1].0.level, seen[1].0.shift), (1, 21));
    let leaf = space.oracle().leaf_at(BASE + 2 * MIB).unwrap().1;
    assert_eq!(leaf.order, 9);
    assert!(matches!(seen[1].1, PteView::Leaf { frame, .. } if frame == leaf.frame));
    let pfns = space.snapshot(r);
    assert_eq!(pfns[512 + 7], Pfn::valid(leaf.frame + 7 * PAGE, true, 9));
    assert_eq!(space.table_view().entry_at(BASE + 3 * MIB).1, 1);
    assert_snapshot_is_oracle(&space, r);
    finish(alloc, space);
}

/// A 1 GiB hugetlb page is one level-2 entry; a walk of a few pages in its
/// middle is one clipped span, and the snapshot counts from the leaf frame.
pub fn walker_1g_leaf<F: Cpu>() {
    let (alloc, space) = kernel::<F>(3 * GIB);
    space.map(BASE, GIB, RW, RegionKind::HugeTlb1G).unwrap();
    space.write_bytes(BASE + 300 * MIB, b"1g").unwrap();
    let leaf = space.oracle().leaf_at(BASE).unwrap().1;
    assert_eq!(leaf.order, 18);
    let mid = rng::<F>(BASE + 300 * MIB - 2 * PAGE, 4 * PAGE);
    let seen = entries(&space, mid);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].0.range, seen[0].0.level, seen[0].0.shift), (mid, 2, 30));
    assert_eq!(seen[0].0.entry_base(), BASE);
    assert_eq!(space.snapshot(mid)[2], Pfn::valid(leaf.frame + 300 * MIB, true, 18));
    assert_snapshot_is_oracle(&space, mid);
    finish(alloc, space);
}

/// An empty user half is a handful of absent spans (whole entries at upper
/// levels), not one visit per page; a hole inside a populated table is one
/// span per missing entry.
pub fn walker_holes_are_few_upper_level_spans<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let user = ModelSpace::<F>::user_range();
    let seen = entries(&space, user);
    assert_tiles(user, &seen);
    assert!(seen.iter().all(|(s, v)| *v == PteView::Absent && s.level == G::<F>::LEVELS - 1));
    assert_eq!(seen.len() as u64, ModelSpace::<F>::USER_END >> G::<F>::level_shift(G::<F>::LEVELS - 1));
    // One page mapped: the rest of its 2 MiB table is 511 level-0 holes,
    // and every level above adds at most its table's other entries.
    space.map(BASE, 4 * MIB, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE + MIB, &[1]).unwrap();
    let seen = entries(&space, rng::<F>(BASE, 4 * MIB));
    assert_eq!(seen.len(), 512 + 1, "512 level-0 entries and one empty 2 MiB entry");
    assert_eq!(seen.iter().filter(|(_, v)| *v != PteView::Absent).count(), 1);
    assert_eq!(seen[512].0.level, 1);
    let pfns = space.snapshot(rng::<F>(BASE, 4 * MIB));
    assert_eq!(pfns.iter().filter(|p| p.is_valid()).count(), 1);
    finish(alloc, space);
}

/// PROT_NONE keeps each leaf's frame (4 KiB and 2 MiB) as a `ProtNone`
/// entry, which the snapshot reports as ERROR; restoring access brings
/// back leaves of the same frames.
pub fn walker_prot_none<F: Cpu>() {
    let (alloc, space) = kernel::<F>(32 * MIB);
    let small = space.map(BASE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    let huge = space.map(BASE + 2 * MIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    space.write_bytes(BASE, &[7; 4 * PAGE as usize]).unwrap();
    space.write_bytes(huge.start(), &[9]).unwrap();
    let before = space.oracle();
    space.protect(small, RegionFlags::empty()).unwrap();
    space.protect(huge, RegionFlags::empty()).unwrap();
    for (r, level) in [(small, 0), (huge, 1)] {
        for (span, view) in entries(&space, r) {
            assert_eq!(span.level, level);
            let want = before.leaf_at(span.entry_base()).unwrap().1.frame;
            assert!(matches!(view, PteView::ProtNone { frame, .. } if frame == want), "{view:?}");
        }
        assert!(space.snapshot(r).iter().all(|p| *p == Pfn::ERROR_ENTRY));
        assert_snapshot_is_oracle(&space, r);
    }
    space.protect(small, RW).unwrap();
    assert!(matches!(entries(&space, small)[0].1, PteView::Leaf { .. }));
    let mut back = [0u8; 4];
    space.read_bytes(BASE + 3 * PAGE, &mut back).unwrap();
    assert_eq!(back, [7; 4], "data survived PROT_NONE");
    assert_eq!(space.oracle().leaf_at(BASE).unwrap().1.frame, before.leaf_at(BASE).unwrap().1.frame);
    finish(alloc, space);
}

/// The software entries a kernel writes (swap, migration, device-private,
/// device-exclusive), encoded by the format, come back from the walk
/// exactly; the snapshot reports them as not present.
pub fn walker_special_entries<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, &[1]).unwrap();
    let planted = [
        SpecialEntry::Swap { offset: 0x1234 },
        SpecialEntry::Migration { frame: 0x8_0000_0000, write: true },
        SpecialEntry::Migration { frame: 0x8_0000_1000, write: false },
        SpecialEntry::DevicePrivate { frame: 0x7_0000_0000, owner: 1, write: true },
        SpecialEntry::DevicePrivate { frame: 0x7_0000_1000, owner: 2, write: false },
        SpecialEntry::DeviceExclusive { frame: 0x9_0000_0000, owner: 1, write: true },
    ];
    for (i, e) in planted.iter().enumerate() {
        space.set_special(BASE + (i as u64 + 1) * PAGE, *e).unwrap();
    }
    assert_eq!(space.set_special(BASE, planted[0]), Err(Error::Busy), "page 0 is mapped");
    let seen = entries(&space, r);
    assert!(matches!(seen[0].1, PteView::Leaf { .. }));
    for (i, e) in planted.iter().enumerate() {
        assert_eq!(seen[i + 1].1, PteView::Special(*e), "entry {}", i + 1);
    }
    assert_eq!(seen[7].1, PteView::Absent);
    let pfns = space.snapshot(r);
    assert!(pfns[1..7].iter().all(|p| *p == Pfn::NONE), "{pfns:x?}");
    assert_snapshot_is_oracle(&space, r);
    space.unmap(r).unwrap();
    assert!(space.oracle().specials().is_empty(), "unmap removes software entries");
    finish(alloc, space);
}

/// A software entry of a 2 MiB hugetlb page is one level-1 entry.
pub fn walker_huge_special_entry<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    let e = SpecialEntry::Migration { frame: 0x8_0020_0000, write: true };
    assert_eq!(space.set_special(BASE + PAGE, e), Err(Error::Unaligned));
    space.set_special(BASE + 2 * MIB, e).unwrap();
    assert_eq!(space.oracle().specials()[&(BASE + 2 * MIB)], OracleSpecial { entry: e, order: 9 });
    let seen = entries(&space, r);
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[1].0.level, seen[1].1), (1, PteView::Special(e)));
    assert_snapshot_is_oracle(&space, r);
    // A CPU access brings a fresh 2 MiB page back in its place.
    space.write_bytes(BASE + 3 * MIB, &[3]).unwrap();
    let leaf = space.oracle().leaf_at(BASE + 2 * MIB).unwrap().1;
    assert_eq!((leaf.order, leaf.write), (9, true));
    assert!(space.oracle().specials().is_empty());
    assert_snapshot_is_oracle(&space, r);
    finish(alloc, space);
}

/// A directory that withholds WRITE (then USER) limits every leaf below it,
/// in the walk and in the snapshot. Formats whose directories carry no
/// permissions (RISC-V) refuse to encode such a directory: nothing to test.
pub fn walker_restrictive_directory<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(BASE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, &[1; 4 * PAGE as usize]).unwrap();
    let word = entry_word(&space, BASE, 1);
    let old = word.load(Ordering::Acquire);
    let PteView::Table { frame, flags } = F::decode(old, 1) else { panic!("level 1 is a directory") };
    let Ok(no_write) = F::encode(&PteView::Table { frame, flags: flags - LeafFlags::WRITE }, 1) else {
        // No permission bits in directories: then every directory must
        // grant everything, and leaves decide alone.
        let all = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::EXEC | LeafFlags::USER;
        assert_eq!((flags, F::DIRECTORY), (all, all), "a directory that cannot be restricted restricts");
        assert_snapshot_is_oracle(&space, r);
        return finish(alloc, space);
    };
    word.store(no_write, Ordering::Release);
    for (_, view) in entries(&space, r) {
        let PteView::Leaf { flags, .. } = view else { panic!("{view:?}") };
        assert!(!flags.contains(LeafFlags::WRITE) && flags.contains(LeafFlags::USER), "{flags:?}");
    }
    let want: Vec<Pfn> = (0..4).map(|i| Pfn::valid(oracle_pfn(&space, BASE + i * PAGE).phys(), false, 0)).collect();
    assert_eq!(space.snapshot(r), want, "read-only through the directory");
    if let Ok(no_user) = F::encode(&PteView::Table { frame, flags: flags - LeafFlags::USER }, 1) {
        word.store(no_user, Ordering::Release);
        assert!(space.snapshot(r).iter().all(|p| *p == Pfn::ERROR_ENTRY), "kernel-only through the directory");
    }
    word.store(old, Ordering::Release);
    assert_snapshot_is_oracle(&space, r);
    finish(alloc, space);
}

/// The last page of the user half maps and walks like any other; one page
/// further is outside it.
pub fn walker_top_of_user_half<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let end = ModelSpace::<F>::USER_END;
    assert_eq!(space.map(end - PAGE, 2 * PAGE, RW, RegionKind::PrivateAnon), Err(Error::OutOfRange));
    let r = space.map(end - 4 * PAGE, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(end - PAGE, b"top").unwrap();
    let seen = entries(&space, r);
    assert_tiles(r, &seen);
    assert!(matches!(seen[3].1, PteView::Leaf { frame, .. } if frame == space.translate(end - PAGE).unwrap().frame));
    assert_eq!(seen[3].0.range.last(), end - 1);
    let mut back = [0u8; 3];
    space.read_bytes(end - PAGE, &mut back).unwrap();
    assert_eq!(&back, b"top");
    assert_snapshot_is_oracle(&space, r);
    finish(alloc, space);
}

/// Page 0 of the user half.
pub fn walker_bottom_of_user_half<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let r = space.map(0, 4 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(0, b"zero").unwrap();
    space.write_bytes(3 * PAGE, b"three").unwrap();
    let seen = entries(&space, r);
    assert_eq!(seen[0].0.range.start(), 0);
    assert!(matches!(seen[0].1, PteView::Leaf { .. }) && seen[1].1 == PteView::Absent);
    assert_eq!(space.snapshot(r)[0], oracle_pfn(&space, 0));
    assert_snapshot_is_oracle(&space, r);
    finish(alloc, space);
}

/// Ranges across a 2 MiB boundary (two level-0 tables) and across the
/// boundary between two root entries (every table below the root differs)
/// walk in order with the right frames.
pub fn walker_crosses_table_boundaries<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let root_span = 1u64 << G::<F>::level_shift(G::<F>::LEVELS - 1);
    assert!(root_span < ModelSpace::<F>::USER_END, "the user half has more than one root entry");
    for edge in [BASE + 2 * MIB, root_span] {
        let r = space.map(edge - 4 * PAGE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
        for i in 0..8 {
            space.write_bytes(r.start() + i * PAGE, &[i as u8]).unwrap();
        }
        let seen = entries(&space, r);
        assert_tiles(r, &seen);
        assert_eq!(seen.len(), 8);
        for (i, (span, view)) in seen.iter().enumerate() {
            let va = r.start() + i as u64 * PAGE;
            assert_eq!((span.range.start(), span.level), (va, 0));
            assert!(matches!(view, PteView::Leaf { frame, .. } if *frame == space.translate(va).unwrap().frame));
        }
        let table = |va: u64| entry_addr(&space, va, 0) & !(PAGE - 1);
        assert_ne!(table(edge - PAGE), table(edge), "the two halves live in different level-0 tables");
        assert_snapshot_is_oracle(&space, r);
    }
    // Both halves of the root-entry crossing differ at every level below the root.
    for level in 0..G::<F>::LEVELS - 1 {
        let table = |va: u64| entry_addr(&space, va, level) & !(PAGE - 1);
        assert_ne!(table(root_span - PAGE), table(root_span), "level {level}");
    }
    finish(alloc, space);
}

/// Every region kind at once, with holes between them: the snapshot of the
/// whole span is what the oracle says.
pub fn walker_mixed_kinds_match_oracle<F: Cpu>() {
    let (alloc, space) = kernel::<F>(64 * MIB);
    let file = SimFile::new(space.allocator(), 8);
    file.write(0, b"file").unwrap();
    space.map(BASE, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.map(BASE + 16 * PAGE, 8 * PAGE, RW, RegionKind::SharedFile { file: file.clone(), offset: 0 }).unwrap();
    space.map(BASE + 32 * PAGE, 4 * PAGE, R, RegionKind::MixedMap).unwrap();
    space.map(BASE + 40 * PAGE, 4 * PAGE, RW, RegionKind::Io).unwrap();
    space.map(BASE + 2 * MIB, 2 * MIB, RW, RegionKind::Thp).unwrap();
    space.map(BASE + 4 * MIB, 4 * MIB, RW, RegionKind::HugeTlb2M).unwrap();
    for va in [BASE, BASE + 3 * PAGE, BASE + 17 * PAGE, BASE + 2 * MIB + PAGE, BASE + 6 * MIB] {
        space.write_bytes(va, &[0x5a]).unwrap();
    }
    let mut b = [0u8; 4];
    space.read_bytes(BASE + 5 * PAGE, &mut b).unwrap();
    space.read_bytes(BASE + 16 * PAGE, &mut b).unwrap();
    assert_eq!(&b, b"file");
    space.protect(rng::<F>(BASE + 3 * PAGE, PAGE), RegionFlags::empty()).unwrap();
    let all = rng::<F>(BASE, 8 * MIB);
    assert_snapshot_is_oracle(&space, all);
    let leaves = space.oracle().leaves().len();
    assert_eq!(entries(&space, all).iter().filter(|(_, v)| matches!(v, PteView::Leaf { .. })).count(), leaves - 1);
    drop(file);
    finish(alloc, space);
}

/// Unmapping frees the tables the range emptied once a later map over them
/// prunes them: every table whose span lies inside the new region.
pub fn walker_unmap_prunes_tables<F: Cpu>() {
    let (alloc, space) = kernel::<F>(16 * MIB);
    let empty = alloc.live();
    let r = space.map(BASE, 4 * MIB, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BASE, &[1]).unwrap();
    space.write_bytes(BASE + 3 * MIB, &[1]).unwrap();
    assert_eq!(alloc.live(), empty + 2 + (G::<F>::LEVELS - 1) + 1, "2 pages, a path of tables, a second level-0 table");
    space.unmap(r).unwrap();
    assert_eq!(alloc.live(), empty + (G::<F>::LEVELS - 1) + 1, "unmap frees the pages, keeps the tables");
    space.map(BASE, GIB, RW, RegionKind::PrivateAnon).unwrap();
    // Left: the tables of levels 2 ..= LEVELS - 2, whose spans exceed 1 GiB.
    assert_eq!(alloc.live(), empty + (G::<F>::LEVELS - 3), "map pruned the emptied 2 MiB and 1 GiB tables");
    assert!(entries(&space, r).iter().all(|(_, v)| *v == PteView::Absent));
    finish(alloc, space);
}
