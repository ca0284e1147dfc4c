//! Golden tests of the x86_64 page-table encoding (4- and 5-level): literal
//! raw values for every view, the rejections, malformed entries, the round
//! trip (property tests) and the paging geometry.

mod encoding_kit;

use encoding_kit::contract;
use encoding_kit::*;
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5, MAX_OWNER};
use hmm_core::arch::{check_geometry, LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry, MAX_LEVELS};
use hmm_core::Error;
use proptest::prelude::*;

type L4 = X86_64Level4;
type L5 = X86_64Level5;

/// Checks `encode(view, level) == raw` and `decode(raw, level) == view` for
/// both paging modes.
#[track_caller]
fn golden(view: PteView, level: usize, raw: u64) {
    assert_eq!(L4::encode(&view, level), Ok(raw), "L4 encode {view:?} at level {level}");
    assert_eq!(L4::decode(raw, level), view, "L4 decode {raw:#x} at level {level}");
    assert_eq!(L5::encode(&view, level), Ok(raw), "L5 encode {view:?} at level {level}");
    assert_eq!(L5::decode(raw, level), view, "L5 decode {raw:#x} at level {level}");
}

// ---------------------------------------------------------------- absent

#[test]
fn absent_is_zero_at_every_level() {
    for level in 0..4 {
        assert_eq!(L4::encode(&PteView::Absent, level), Ok(0));
        assert_eq!(L4::decode(0, level), PteView::Absent);
    }
    for level in 0..5 {
        assert_eq!(L5::encode(&PteView::Absent, level), Ok(0));
        assert_eq!(L5::decode(0, level), PteView::Absent);
    }
}

// ---------------------------------------------------------------- tables

#[test]
fn table_golden() {
    // Full permissions: P | W | U, NX clear.
    golden(table(0x0000_0000_0000_5000, R | X | U | LeafFlags::WRITE), 1, 0x0000_0000_0000_5007);
    golden(table(0x0000_0000_0000_5000, R | X | U | LeafFlags::WRITE), 3, 0x0000_0000_0000_5007);
    // Accessed directory.
    golden(table(0x0000_0001_2345_6000, RW | X | U | A), 2, 0x0000_0001_2345_6027);
    // Read-only directory: no W.
    golden(table(0x0000_0000_0000_8000, R | X | U), 2, 0x0000_0000_0000_8005);
    // Supervisor-only directory: no U.
    golden(table(0x0000_0000_0000_9000, RW | X), 1, 0x0000_0000_0000_9003);
    // No-execute directory: NX.
    golden(table(0x0000_0000_0000_a000, RW | U), 3, 0x8000_0000_0000_a007);
    // Everything restricted: P | NX.
    golden(table(0x000f_ffff_ffff_f000, R), 1, 0x800f_ffff_ffff_f001);
    // The 5-level root holds tables too.
    assert_eq!(L5::encode(&table(0x3000, RW | U | X), 4), Ok(0x3007));
    assert_eq!(L5::decode(0x3007, 4), table(0x3000, RW | U | X));
}

#[test]
fn table_decode_ignores_status_and_cache_bits() {
    // D (0x40), G (0x100), PWT/PCD (0x18) and available bits 9..=11 on a
    // directory do not show up in its flags.
    assert_eq!(L4::decode(0x0000_0000_0000_5f5f, 2), table(0x5000, RW | U | X));
    // A directory's frame takes bits 12..=51 only; 52..=62 are ignored.
    assert_eq!(L4::decode(0x7ff0_0000_0000_6003, 1), table(0x6000, RW | X));
}

#[test]
fn table_rejections() {
    // No table at level 0 (a level-0 entry is always a leaf).
    rejects::<L4>(table(0x5000, RW | U | X), 0);
    rejects::<L5>(table(0x5000, RW | U | X), 0);
    // DIRTY and GLOBAL mean nothing on a directory.
    rejects::<L4>(table(0x5000, RW | D), 1);
    rejects::<L4>(table(0x5000, RW | G), 2);
    // Unreadable directory cannot be expressed.
    rejects::<L4>(table(0x5000, LeafFlags::WRITE | U), 1);
    // Frame misaligned or past 52 bits.
    rejects::<L4>(table(0x5008, RW), 1);
    rejects::<L4>(table(0x0010_0000_0000_0000, RW), 1);
    // Past the root.
    rejects::<L4>(table(0x5000, RW), 4);
    rejects::<L5>(table(0x5000, RW), 5);
}

// ---------------------------------------------------------------- leaves

#[test]
fn leaf_4k_golden() {
    // Every flag, executable: P W U A D G.
    golden(leaf(0x1234_5000, R | LeafFlags::WRITE | U | A | D | G | X), 0, 0x0000_0000_1234_5167);
    // Every flag, no-execute.
    golden(leaf(0x1234_5000, RW | U | A | D | G), 0, 0x8000_0000_1234_5167);
    // Read-only supervisor, NX: only P and NX.
    golden(leaf(0x1234_5000, R), 0, 0x8000_0000_1234_5001);
    // One flag at a time.
    golden(leaf(0x1000, R | X), 0, 0x1001);
    golden(leaf(0x1000, RW | X), 0, 0x1003);
    golden(leaf(0x1000, R | U | X), 0, 0x1005);
    golden(leaf(0x1000, R | A | X), 0, 0x1021);
    golden(leaf(0x1000, R | D | X), 0, 0x1041);
    golden(leaf(0x1000, R | G | X), 0, 0x1101);
    // Highest frame.
    golden(leaf(0x000f_ffff_ffff_f000, RW | U), 0, 0x800f_ffff_ffff_f007);
    // Frame 0 is a valid leaf (not Absent): P is set.
    golden(leaf(0, R | X), 0, 0x1);
}

#[test]
fn leaf_2m_golden() {
    golden(leaf(0x4020_0000, RW | U | X), 1, 0x0000_0000_4020_0087);
    golden(leaf(0x4020_0000, RW | U | A | D | G), 1, 0x8000_0000_4020_01e7);
    golden(leaf(0x000f_ffff_ffe0_0000, R), 1, 0x800f_ffff_ffe0_0081);
}

#[test]
fn leaf_1g_golden() {
    golden(leaf(0xc000_0000, RW | U | X), 2, 0x0000_0000_c000_0087);
    golden(leaf(0x0000_0040_c000_0000, R | U | A | D | G), 2, 0x8000_0040_c000_01e5);
    golden(leaf(0x000f_ffff_c000_0000, RW | X), 2, 0x000f_ffff_c000_0083);
}

#[test]
fn leaf_decode_ignores_cache_bits_and_pat() {
    // PWT|PCD (0x18) on a 4 KiB leaf; bit 7 at level 0 is PAT, not huge.
    assert_eq!(L4::decode(0x0000_0000_1234_5099, 0), leaf(0x1234_5000, R | X));
    // Bit 12 on a 2 MiB / 1 GiB leaf is PAT, not part of the frame.
    assert_eq!(L4::decode(0x0000_0000_4020_1083, 1), leaf(0x4020_0000, RW | X));
    assert_eq!(L5::decode(0x0000_0000_c000_1083, 2), leaf(0xc000_0000, RW | X));
    // Available bits 9..=11 on a present leaf are the kernel's.
    assert_eq!(L4::decode(0x0000_0000_0000_7e03, 0), leaf(0x7000, RW | X));
}

#[test]
fn leaf_rejections() {
    // Misaligned huge frames.
    rejects::<L4>(leaf(0x4010_0000, RW), 1);
    rejects::<L4>(leaf(0x4000_1000, RW), 1);
    rejects::<L4>(leaf(0x4020_0000, RW), 2);
    rejects::<L5>(leaf(0x8000_0000 + 0x20_0000, RW), 2);
    // Misaligned 4 KiB frame.
    rejects::<L4>(leaf(0x1234_5008, RW), 0);
    rejects::<L4>(leaf(0x1234_5800, RW), 0);
    // Frames at or above 2^52.
    rejects::<L4>(leaf(0x0010_0000_0000_0000, RW), 0);
    rejects::<L4>(leaf(0x0010_0000_0000_0000, RW), 1);
    rejects::<L5>(leaf(0x8000_0000_0000_0000, RW), 2);
    rejects::<L4>(leaf(0xffff_ffff_ffff_f000, RW), 0);
    // Leaves at levels 3 and 4 (512 GiB / 256 TiB) do not exist.
    rejects::<L4>(leaf(0, RW), 3);
    rejects::<L5>(leaf(0, RW), 3);
    rejects::<L5>(leaf(0, RW), 4);
    // Past the root.
    rejects::<L4>(leaf(0, RW), 4);
    // x86_64 has no present but unreadable page.
    rejects::<L4>(leaf(0x1000, LeafFlags::WRITE | U), 0);
    rejects::<L4>(leaf(0x1000, LeafFlags::empty()), 0);
    rejects::<L5>(leaf(0x20_0000, X), 1);
    // Malformed entries are never produced on purpose.
    rejects::<L4>(PteView::Invalid(0x83), 3);
    rejects::<L4>(PteView::Invalid(0x1), 0);
}

// ---------------------------------------------------------------- PROT_NONE

#[test]
fn prot_none_golden() {
    // Kind 1 in bits 9..=11 (0x200), P clear, frame and flags as a leaf.
    golden(prot_none(0x7000, RW | U), 0, 0x8000_0000_0000_7206);
    golden(prot_none(0x7000, R | X), 0, 0x0000_0000_0000_7200);
    golden(prot_none(0x1234_5000, RW | U | A | D | G | X), 0, 0x0000_0000_1234_5366);
    // Levels 1 and 2 carry the huge bit (0x80).
    golden(prot_none(0x20_0000, RW | U), 1, 0x8000_0000_0020_0286);
    golden(prot_none(0x4000_0000, RW | U | X), 2, 0x0000_0000_4000_0286);
    golden(prot_none(0x4000_0000, R), 2, 0x8000_0000_4000_0280);
}

#[test]
fn prot_none_rejections() {
    rejects::<L4>(prot_none(0, RW), 3);
    rejects::<L5>(prot_none(0, RW), 4);
    rejects::<L4>(prot_none(0x20_1000, RW), 1);
    rejects::<L4>(prot_none(0x0010_0000_0000_0000, RW), 0);
    rejects::<L4>(prot_none(0x1000, LeafFlags::WRITE), 0);
}

// ---------------------------------------------------------------- specials

#[test]
fn swap_golden() {
    // Kind 2 (0x400), offset in 12..=62.
    golden(special(SpecialEntry::Swap { offset: 0 }), 0, 0x0000_0000_0000_0400);
    golden(special(SpecialEntry::Swap { offset: 0x12345 }), 0, 0x0000_0000_1234_5400);
    golden(special(SpecialEntry::Swap { offset: (1 << 51) - 1 }), 1, 0x7fff_ffff_ffff_f400);
    golden(special(SpecialEntry::Swap { offset: 1 }), 2, 0x0000_0000_0000_1400);
    rejects::<L4>(special(SpecialEntry::Swap { offset: 1 << 51 }), 0);
    rejects::<L4>(special(SpecialEntry::Swap { offset: u64::MAX }), 0);
}

#[test]
fn migration_golden() {
    // Kind 3 (0x600), frame, W.
    golden(special(SpecialEntry::Migration { frame: 0x0abc_d000, write: true }), 0, 0x0000_0000_0abc_d602);
    golden(special(SpecialEntry::Migration { frame: 0x0abc_d000, write: false }), 0, 0x0000_0000_0abc_d600);
    golden(special(SpecialEntry::Migration { frame: 0x4020_0000, write: true }), 1, 0x0000_0000_4020_0602);
    golden(special(SpecialEntry::Migration { frame: 0x000f_ffff_c000_0000, write: false }), 2, 0x000f_ffff_c000_0600);
    rejects::<L4>(special(SpecialEntry::Migration { frame: 0x4020_1000, write: true }), 1);
    rejects::<L4>(special(SpecialEntry::Migration { frame: 0x0010_0000_0000_0000, write: true }), 0);
}

#[test]
fn device_private_golden() {
    // Kind 4 (0x800), frame, owner in 52..=62, W.
    golden(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: 5, write: true }), 0, 0x0050_0000_0000_1802);
    golden(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: 0, write: false }), 0, 0x0000_0000_0000_1800);
    golden(
        special(SpecialEntry::DevicePrivate { frame: 0x000f_ffff_ffff_f000, owner: MAX_OWNER, write: true }),
        0,
        0x7fff_ffff_ffff_f802,
    );
    golden(special(SpecialEntry::DevicePrivate { frame: 0x20_0000, owner: 7, write: false }), 1, 0x0070_0000_0020_0800);
    assert_eq!(MAX_OWNER, 2047);
    rejects::<L4>(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: MAX_OWNER + 1, write: true }), 0);
    rejects::<L5>(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: u16::MAX, write: false }), 0);
    rejects::<L4>(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: 1, write: false }), 1);
    rejects::<L4>(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: 1, write: false }), 3);
}

#[test]
fn device_exclusive_golden() {
    // Kind 5 (0xa00).
    golden(special(SpecialEntry::DeviceExclusive { frame: 0x2000, owner: 1, write: false }), 0, 0x0010_0000_0000_2a00);
    golden(
        special(SpecialEntry::DeviceExclusive { frame: 0x2000, owner: 0x555, write: true }),
        0,
        0x5550_0000_0000_2a02,
    );
    golden(
        special(SpecialEntry::DeviceExclusive { frame: 0x4000_0000, owner: 3, write: true }),
        2,
        0x0030_0000_4000_0a02,
    );
    rejects::<L4>(special(SpecialEntry::DeviceExclusive { frame: 0x2000, owner: 2048, write: false }), 0);
    rejects::<L4>(special(SpecialEntry::DeviceExclusive { frame: 0x2000, owner: 1, write: false }), 2);
}

#[test]
fn other_golden() {
    // Kinds 0, 6 and 7 are the kernel's own: the whole raw value round trips.
    golden(special(SpecialEntry::Other(0x0000_0000_dead_0000)), 0, 0x0000_0000_dead_0000);
    golden(special(SpecialEntry::Other(0x1234_0000_0000_0c00)), 0, 0x1234_0000_0000_0c00);
    golden(special(SpecialEntry::Other(0xfff0_0000_0000_0e00)), 1, 0xfff0_0000_0000_0e00);
    golden(special(SpecialEntry::Other(0x8000_0000_0000_0002)), 2, 0x8000_0000_0000_0002);
    // Present bit: that would be a hardware entry.
    rejects::<L4>(special(SpecialEntry::Other(0x0000_0000_dead_0001)), 0);
    // Reserved kinds 1..=5.
    for kind in 1u64..=5 {
        rejects::<L4>(special(SpecialEntry::Other(0x0000_0000_dead_0000 | kind << 9)), 0);
        rejects::<L5>(special(SpecialEntry::Other(kind << 9)), 1);
    }
    // Zero is Absent, not Other.
    rejects::<L4>(special(SpecialEntry::Other(0)), 0);
}

#[test]
fn specials_only_at_leaf_levels() {
    let all = [
        SpecialEntry::Swap { offset: 1 },
        SpecialEntry::Migration { frame: 0, write: false },
        SpecialEntry::DevicePrivate { frame: 0, owner: 1, write: false },
        SpecialEntry::DeviceExclusive { frame: 0, owner: 1, write: false },
        SpecialEntry::Other(0xc00),
    ];
    for s in all {
        rejects::<L4>(special(s), 3);
        rejects::<L5>(special(s), 3);
        rejects::<L5>(special(s), 4);
        rejects::<L4>(special(s), 4);
    }
    // ... and non-present entries found at levels 3/4 are malformed.
    assert_eq!(L4::decode(0x0000_0000_1234_5400, 3), PteView::Invalid(0x0000_0000_1234_5400));
    assert_eq!(L5::decode(0x0000_0000_0000_7206, 4), PteView::Invalid(0x0000_0000_0000_7206));
    assert_eq!(L5::decode(0x0000_0000_0000_0c00, 3), PteView::Invalid(0xc00));
}

// ---------------------------------------------------------------- malformed

#[test]
fn malformed_present_entries() {
    // Huge bit at level 3 (a 512 GiB leaf) in both modes, and at the L5 root.
    assert_eq!(L4::decode(0x0000_0000_0000_0083, 3), PteView::Invalid(0x83));
    assert_eq!(L4::decode(0x8000_0080_0000_00e7, 3), PteView::Invalid(0x8000_0080_0000_00e7));
    assert_eq!(L5::decode(0x0000_0000_0000_0083, 3), PteView::Invalid(0x83));
    assert_eq!(L5::decode(0x0000_0000_0000_0087, 4), PteView::Invalid(0x87));
    // The same bit at level 3 without P is a special -> Invalid too; but
    // without the huge bit it is a table.
    assert_eq!(L4::decode(0x0000_0000_0000_5003, 3), table(0x5000, RW | X));
    // Any non-zero entry past the root level.
    assert_eq!(L4::decode(0x5003, 4), PteView::Invalid(0x5003));
    assert_eq!(L4::decode(0x400, 4), PteView::Invalid(0x400));
    assert_eq!(L5::decode(0x5003, 5), PteView::Invalid(0x5003));
}

// ---------------------------------------------------------------- geometry

#[test]
fn geometry_constants() {
    assert_eq!(<L4 as PagingGeometry>::LEVELS, 4);
    assert_eq!(<L5 as PagingGeometry>::LEVELS, 5);
    assert_eq!(<L4 as PagingGeometry>::VA_BITS, 48);
    assert_eq!(<L5 as PagingGeometry>::VA_BITS, 57);
    assert_eq!(<L4 as PagingGeometry>::PAGE_SHIFT, 12);
    const { assert!(<L4 as PagingGeometry>::SIGN_EXTEND && <L5 as PagingGeometry>::SIGN_EXTEND) };
    for (level, shift) in [12, 21, 30, 39, 48].into_iter().enumerate() {
        assert_eq!(L5::level_shift(level), shift);
        assert_eq!(L5::entries(level), 512);
        if level < 4 {
            assert_eq!(L4::level_shift(level), shift);
            assert_eq!(L4::entries(level), 512);
        }
    }
    for level in 0..5 {
        assert_eq!(L5::leaf_allowed(level), level < 3, "level {level}");
        assert_eq!(L4::leaf_allowed(level), level < 3, "level {level}");
    }
}

#[test]
fn geometry_index() {
    // 2^39 + 2^30 + 2^21 + 2^12: index 1 at every level.
    let va = 0x0000_0080_4020_1000;
    for level in 0..4 {
        assert_eq!(L4::index(va, level), 1);
    }
    // Page offset does not matter.
    assert_eq!(L4::index(va + 0xfff, 0), 1);
    // Top of the lower half: 511 below the root, PML4 slot 255.
    assert_eq!([0, 1, 2, 3].map(|l| L4::index(0x0000_7fff_ffff_f000, l)), [511, 511, 511, 255]);
    // Bottom of the upper half: PML4 slot 256, zero below.
    assert_eq!(L4::index(0xffff_8000_0000_0000, 3), 256);
    for level in 0..3 {
        assert_eq!(L4::index(0xffff_8000_0000_0000, level), 0);
    }
    assert_eq!(L4::index(u64::MAX, 3), 511);
    // 5-level: PML5 slots.
    assert_eq!(L5::index(0x0000_8000_0000_0000, 4), 0);
    assert_eq!(L5::index(0x0000_8000_0000_0000, 3), 256);
    assert_eq!(L5::index(0x0001_0000_0000_0000, 4), 1);
    assert_eq!(L5::index(0xff00_0000_0000_0000, 4), 256);
    assert_eq!(L5::index(0xffff_8000_0000_0000, 4), 511);
    assert_eq!(L5::index(0xffff_8000_0000_0000, 3), 256);
    // Mixed indices.
    let va = (3u64 << 39) | (77 << 30) | (500 << 21) | (42 << 12) | 0x123;
    assert_eq!([0, 1, 2, 3].map(|l| L4::index(va, l)), [42, 500, 77, 3]);
}

#[test]
fn geometry_canonical() {
    let l4 = [
        (0, true),
        (0x0000_7fff_ffff_f000, true),
        (0x0000_7fff_ffff_ffff, true),
        (0x0000_8000_0000_0000, false),
        (0x00ff_ffff_ffff_ffff, false),
        (0x7fff_ffff_ffff_ffff, false),
        (0x8000_0000_0000_0000, false),
        (0xffff_7fff_ffff_ffff, false),
        (0xffff_8000_0000_0000, true),
        (0xffff_ffff_ffff_f000, true),
        (u64::MAX, true),
    ];
    for (va, canon) in l4 {
        assert_eq!(L4::is_canonical(va), canon, "4-level {va:#x}");
    }
    let l5 = [
        (0, true),
        (0x0000_7fff_ffff_f000, true),
        (0x0000_8000_0000_0000, true),
        (0x00ff_ffff_ffff_f000, true),
        (0x0100_0000_0000_0000, false),
        (0x8000_0000_0000_0000, false),
        (0xfeff_ffff_ffff_ffff, false),
        (0xff00_0000_0000_0000, true),
        (0xffff_7fff_ffff_ffff, true),
        (0xffff_8000_0000_0000, true),
        (u64::MAX, true),
    ];
    for (va, canon) in l5 {
        assert_eq!(L5::is_canonical(va), canon, "5-level {va:#x}");
    }
}

#[test]
fn check_geometry_examples() {
    let nine = [9; MAX_LEVELS];
    // x86_64 4-/5-level, Sv39, a one-level table, 16 KiB and 64 KiB pages.
    assert!(check_geometry(4, 12, nine, 48, 0b111));
    assert!(check_geometry(5, 12, nine, 57, 0b111));
    assert!(check_geometry(3, 12, [9, 9, 9, 0, 0, 0], 39, 0b111));
    assert!(check_geometry(1, 12, [9, 0, 0, 0, 0, 0], 21, 0b1));
    assert!(check_geometry(4, 14, [11, 11, 11, 1, 0, 0], 48, 0b111));
    assert!(check_geometry(3, 16, [13, 13, 6, 0, 0, 0], 48, 0b011));
    // Root level with fewer bits than a full table.
    assert!(check_geometry(6, 12, [9, 9, 9, 9, 9, 7], 64, 0b1));
    // Level count.
    assert!(!check_geometry(0, 12, nine, 12, 0b1));
    assert!(!check_geometry(7, 12, nine, 75, 0b1));
    // Page shift below 4 KiB.
    assert!(!check_geometry(4, 11, [8; MAX_LEVELS], 43, 0b1));
    // Too wide.
    assert!(!check_geometry(6, 12, nine, 66, 0b1));
    // Bit budget does not add up.
    assert!(!check_geometry(4, 12, nine, 47, 0b111));
    assert!(!check_geometry(4, 12, nine, 49, 0b111));
    // A table larger than a page of 8-byte entries.
    assert!(!check_geometry(4, 12, [10, 9, 9, 8, 0, 0], 48, 0b111));
    // A level without index bits.
    assert!(!check_geometry(4, 12, [9, 9, 0, 18, 0, 0], 48, 0b111));
    // No leaf at the bottom.
    assert!(!check_geometry(4, 12, nine, 48, 0b110));
    // Leaf bit above the root.
    assert!(!check_geometry(4, 12, nine, 48, 0b10001));
}

// ---------------------------------------------------------------- properties

fn any_flags() -> impl Strategy<Value = LeafFlags> {
    (0u16..128).prop_map(|b| LeafFlags::from_bits_truncate(b) | LeafFlags::READ)
}

fn table_flags() -> impl Strategy<Value = LeafFlags> {
    any_flags().prop_map(|f| f - LeafFlags::DIRTY - LeafFlags::GLOBAL)
}

/// A physical address below 2^52 aligned to `1 << shift`.
fn frame(shift: u32) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(((1u64 << 52) - 1) & !((1u64 << shift) - 1)),
        (0u64..1 << (52 - shift)).prop_map(move |f| f << shift),
    ]
}

/// Every valid view at `level` of a format with `levels` levels.
fn valid_view(level: usize, levels: usize) -> BoxedStrategy<PteView> {
    assert!(level < levels);
    let shift = 12 + 9 * level as u32;
    let mut options: Vec<BoxedStrategy<PteView>> = vec![Just(PteView::Absent).boxed()];
    if level > 0 {
        options.push((frame(12), table_flags()).prop_map(|(frame, flags)| PteView::Table { frame, flags }).boxed());
    }
    if level < 3 {
        let owner = prop_oneof![Just(0u16), Just(MAX_OWNER), 0..=MAX_OWNER];
        options.push((frame(shift), any_flags()).prop_map(|(frame, flags)| PteView::Leaf { frame, flags }).boxed());
        options.push((frame(shift), any_flags()).prop_map(|(frame, flags)| PteView::ProtNone { frame, flags }).boxed());
        options.push(
            prop_oneof![Just(0u64), Just((1 << 51) - 1), 0u64..1 << 51]
                .prop_map(|offset| special(SpecialEntry::Swap { offset }))
                .boxed(),
        );
        options.push(
            (frame(shift), any::<bool>())
                .prop_map(|(frame, write)| special(SpecialEntry::Migration { frame, write }))
                .boxed(),
        );
        options.push(
            (frame(shift), owner.clone(), any::<bool>())
                .prop_map(|(frame, owner, write)| special(SpecialEntry::DevicePrivate { frame, owner, write }))
                .boxed(),
        );
        options.push(
            (frame(shift), owner, any::<bool>())
                .prop_map(|(frame, owner, write)| special(SpecialEntry::DeviceExclusive { frame, owner, write }))
                .boxed(),
        );
        options.push(
            (any::<u64>(), prop_oneof![Just(0u64), Just(6), Just(7)])
                .prop_map(|(raw, kind)| raw & !1 & !(7 << 9) | kind << 9)
                .prop_filter("zero is Absent", |raw| *raw != 0)
                .prop_map(|raw| special(SpecialEntry::Other(raw)))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

fn level_and_view(levels: usize) -> impl Strategy<Value = (usize, PteView)> {
    (0..levels).prop_flat_map(move |level| (Just(level), valid_view(level, levels)))
}

/// Raw values likely to hit every decode path: random words with the low
/// control bits drawn from a small set.
fn interesting_raw() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (any::<u64>(), 0u64..0x1000).prop_map(|(hi, lo)| (hi & !0xfff) | lo),
        (
            any::<u64>(),
            prop_oneof![Just(0u64), Just(1), Just(0x81), Just(0x83), Just(0x200), Just(0x280), Just(0x400)],
            0u64..8
        )
            .prop_map(|(hi, bits, kind)| (hi & !0xfff & 0x800f_ffff_ffff_ffff) | bits | kind << 9),
    ]
}

/// Contract items 1-3 and 8 (shared check), and the permission bits the
/// MMU reads (P, W, U, NX) survive a re-encode.
fn check_stability<F: PteFormat>(raw: u64, level: usize) -> Result<(), TestCaseError> {
    contract::decodes_consistently::<F>(raw, level)?;
    let view = F::decode(raw, level);
    if let (PteView::Leaf { .. } | PteView::Table { .. }, Ok(raw2)) = (view, F::encode(&view, level)) {
        let perm = 0x8000_0000_0000_0007;
        prop_assert_eq!(raw2 & perm, raw & perm, "permission bits changed: {:#x} -> {:#x}", raw, raw2);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip_level4((level, view) in level_and_view(4)) {
        let raw = L4::encode(&view, level);
        prop_assert!(raw.is_ok(), "{:?} at level {} rejected: {:?}", view, level, raw);
        let raw = raw.unwrap();
        prop_assert_eq!(L4::decode(raw, level), view);
        prop_assert_eq!(raw == 0, view == PteView::Absent);
        // Present bit exactly for tables and leaves.
        prop_assert_eq!(raw & 1 != 0, matches!(view, PteView::Table { .. } | PteView::Leaf { .. }));
    }

    #[test]
    fn round_trip_level5((level, view) in level_and_view(5)) {
        let raw = L5::encode(&view, level);
        prop_assert!(raw.is_ok(), "{:?} at level {} rejected: {:?}", view, level, raw);
        let raw = raw.unwrap();
        prop_assert_eq!(L5::decode(raw, level), view);
        // Both modes agree wherever the level exists in both.
        if level < 4 {
            prop_assert_eq!(L4::encode(&view, level), Ok(raw));
        }
    }

    #[test]
    fn decode_encode_decode_is_stable(raw in interesting_raw(), level in 0usize..5) {
        check_stability::<L5>(raw, level)?;
        if level < 4 {
            check_stability::<L4>(raw, level)?;
            prop_assert_eq!(L4::decode(raw, level), L5::decode(raw, level));
        }
    }

    #[test]
    fn nonzero_past_root_is_invalid(raw in 1u64.., extra in 0usize..3) {
        prop_assert_eq!(L4::decode(raw, 4 + extra), PteView::Invalid(raw));
        prop_assert_eq!(L5::decode(raw, 5 + extra), PteView::Invalid(raw));
    }

    #[test]
    fn index_and_shift_agree(va in any::<u64>(), level in 0usize..5) {
        let shift = 12 + 9 * level as u32;
        prop_assert_eq!(L5::index(va, level) as u64, (va >> shift) & 511);
        if level < 4 {
            prop_assert_eq!(L4::index(va, level) as u64, (va >> shift) & 511);
        }
        // Canonical iff bits 47..=63 (56..=63) are all equal.
        let top4 = va >> 47;
        prop_assert_eq!(L4::is_canonical(va), top4 == 0 || top4 == (1 << 17) - 1);
        let top5 = va >> 56;
        prop_assert_eq!(L5::is_canonical(va), top5 == 0 || top5 == 0xff);
    }
}

/// Contract 4 says encode -> decode is the identity for *every* view. A
/// `LeafFlags` value carrying bits outside the seven named flags (possible
/// through `from_bits_retain`) is accepted by encode but the extra bits are
/// lost on decode.
#[test]
fn unknown_flag_bits_are_not_silently_dropped() {
    let flags = LeafFlags::from_bits_retain(0x8000) | RW | U;
    let view = leaf(0x1000, flags);
    match L4::encode(&view, 0) {
        Err(e) => assert_eq!(e, Error::Unencodable),
        Ok(raw) => assert_eq!(L4::decode(raw, 0), view, "encode accepted {view:?} as {raw:#x}"),
    }
}

proptest::proptest! {
    /// `user_page`, the snapshot loop's shortcut, agrees with `decode` at
    /// level 0 on any raw value (PteFormat contract, item 6), for both
    /// paging modes and for SoftFormat's default.
    #[test]
    fn user_page_agrees_with_decode(raw in proptest::num::u64::ANY, bits in 0u64..64) {
        fn check<F: PteFormat>(raw: u64) -> Result<(), proptest::test_runner::TestCaseError> {
            proptest::prop_assert_eq!(F::user_page(raw), F::decode(raw, 0).user_frame(), "raw {:#x}", raw);
            Ok(())
        }
        // Random words are rarely present user leaves: also try them with
        // P and U forced on and one more bit flipped.
        for raw in [raw, raw | 0b101, (raw | 0b101) ^ (1 << bits), raw & !1] {
            check::<hmm_core::arch::x86_64::X86_64Level4>(raw)?;
            check::<hmm_core::arch::x86_64::X86_64Level5>(raw)?;
            check::<hmm_core::arch::soft::SoftFormat<hmm_core::arch::x86_64::X86_64Level4>>(raw)?;
        }
    }
}

// ---------------------------------------------------------------- opaque bits

/// Cache bits (PWT 3, PCD 4, PAT 7 at level 0) and the available bits
/// 9..=11 and 52..=58 of a present page are not in the view: they are its
/// opaque bits, and re-encoding the view drops exactly them.
#[test]
fn cache_and_available_bits_of_a_page_are_opaque() {
    let raw = 0x8000_0000_1234_5067 | 0x98 | 0xe00 | 0x07f0_0000_0000_0000;
    let view = leaf(0x1234_5000, RW | U | A | D);
    assert_eq!(L4::decode(raw, 0), view);
    assert_eq!(L4::opaque_bits(raw, 0) & raw, 0x98 | 0xe00 | 0x07f0_0000_0000_0000);
    assert_eq!(L4::encode(&view, 0), Ok(0x8000_0000_1234_5067));
    // On a 2 MiB leaf, bit 7 is the huge bit (not opaque) and PAT moves to
    // bit 12, below the leaf's span: opaque with the other sub-span bits.
    let huge = 0x8000_0000_4020_10e7;
    assert_eq!(L4::decode(huge, 1), leaf(0x4020_0000, RW | U | A | D));
    assert_eq!(L4::opaque_bits(huge, 1) & huge, 0x1000);
}

/// A PROT_NONE entry above level 0 carries the huge bit, as `encode` writes
/// it; without it the entry is malformed (so that decode-then-encode never
/// adds a bit the raw value lacked).
#[test]
fn huge_prot_none_needs_its_huge_bit() {
    golden(prot_none(0x20_0000, RW | U), 1, 0x8000_0000_0020_0286);
    assert_eq!(L4::decode(0x8000_0000_0020_0206, 1), PteView::Invalid(0x8000_0000_0020_0206));
    // At level 0, bit 7 (PAT) is ignored.
    assert_eq!(L4::decode(0x8000_0000_0000_1286, 0), prot_none(0x1000, RW | U));
}
