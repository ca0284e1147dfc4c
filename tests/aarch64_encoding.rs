//! Golden tests of the AArch64 (VMSAv8-64, 4 KiB granule) encoding, 48-bit
//! and LPA2 52-bit: raw values written from the Arm ARM descriptor formats
//! (and as Linux arm64 fills them), the rejections, malformed entries, and
//! property tests of both round trips and `user_page`.

mod encoding_kit;

use encoding_kit::contract;
use encoding_kit::*;
use hmm_core::arch::aarch64::{Aarch64Va48, Aarch64Va52, MAX_OWNER, SWAP_OFFSET_BITS};
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use hmm_core::Error;
use proptest::prelude::*;

type A48 = Aarch64Va48;
type A52 = Aarch64Va52;

/// Both formats (the raw value has no address bits at 8..=9 or 48..=51).
#[track_caller]
fn golden(view: PteView, level: usize, raw: u64) {
    golden_in::<A48>(view, level, raw);
    golden_in::<A52>(view, level, raw);
}

/// A raw value as another kernel (Linux) writes it: decodes to `view`, and
/// encoding that view gives `canonical`, which differs from `raw` exactly in
/// `opaque`, bits the format does not model (contract item 8); merging them
/// back restores `raw`.
#[track_caller]
fn foreign<F: PteFormat>(raw: u64, level: usize, view: PteView, canonical: u64, opaque: u64) {
    assert_eq!(F::decode(raw, level), view, "decode {raw:#x} at level {level}");
    assert_eq!(F::encode(&view, level), Ok(canonical), "re-encode {view:?}");
    assert_eq!(F::decode(canonical, level), view);
    let o = F::opaque_bits(raw, level);
    assert_eq!(o & (raw ^ canonical), raw ^ canonical, "{raw:#x} vs {canonical:#x}: opaque {o:#x}");
    assert_eq!(o & opaque, opaque, "{opaque:#x} should be opaque in {raw:#x} (got {o:#x})");
    assert_eq!((canonical & !o) | (raw & o), raw);
    assert_eq!(canonical & F::opaque_bits(canonical, level), 0, "encode set opaque bits");
}

/// Bits that are always opaque in a leaf: AttrIndx, NS, GP, Contiguous,
/// software 56..=58, PBHA, 63.
const LEAF_ATTRS: u64 = 0xff14_0000_0000_003c;
/// ... and SH in the 48-bit format.
const SH: u64 = 0x300;

// ---------------------------------------------------------------- absent

#[test]
fn absent_is_zero_at_every_level() {
    for level in 0..4 {
        golden_in::<A48>(PteView::Absent, level, 0);
    }
    for level in 0..5 {
        golden_in::<A52>(PteView::Absent, level, 0);
    }
}

// ---------------------------------------------------------------- pages

#[test]
fn linux_user_pages() {
    // Linux PAGE_SHARED after a write: valid | page (0x3), AttrIndx 0
    // (MT_NORMAL), AP[1] user (0x40), SH inner (0x300), AF (0x400), nG
    // (0x800), DBM (PTE_WRITE, 51), PXN (53), UXN (54), software dirty (55).
    let dirty = 0x00e8_0000_1234_5f43;
    // Ours: the same without SH and the software dirty bit (DBM says dirty).
    foreign::<A48>(dirty, 0, leaf(0x1234_5000, R | W | U | A | D), 0x0068_0000_1234_5c43, LEAF_ATTRS | SH | 1 << 55);
    // Installed clean: AP[2] read-only (0x80) with DBM: writable-clean,
    // reported read-only and clean; ours drops DBM.
    let clean = 0x0068_0000_1234_5fc3;
    foreign::<A48>(clean, 0, leaf(0x1234_5000, R | U | A), 0x0060_0000_1234_5cc3, LEAF_ATTRS | SH | 1 << 51);
    // PAGE_READONLY_EXEC: AP[2], user, nG, PXN only: user-executable.
    foreign::<A48>(0x0020_0000_0040_0fc3, 0, leaf(0x40_0000, R | U | X | A), 0x0020_0000_0040_0cc3, LEAF_ATTRS | SH);
    // Write-protected dirty page (pte_wrprotect moves DBM into bit 55).
    foreign::<A48>(0x00e0_0000_0040_0fc3, 0, leaf(0x40_0000, R | U | A | D), 0x00e0_0000_0040_0cc3, LEAF_ATTRS | SH);
    // A user leaf's PXN is not modelled: PXN clear still encodes with PXN.
    foreign::<A48>(0x0040_0000_0040_0c43, 0, leaf(0x40_0000, R | W | U | A), 0x0060_0000_0040_0c43, 1 << 53);
}

#[test]
fn linux_kernel_pages() {
    // PAGE_KERNEL: SH, AF, DBM (writable), PXN, UXN, global: dirty, no exec.
    foreign::<A48>(
        0x0068_0000_4000_0703,
        0,
        leaf(0x4000_0000, R | W | A | D | G),
        0x0068_0000_4000_0403,
        LEAF_ATTRS | SH,
    );
    // PAGE_KERNEL_ROX: AP[2], UXN, PXN clear: kernel-executable.
    foreign::<A48>(0x0040_0000_4000_0783, 0, leaf(0x4000_0000, R | X | A | G), 0x0040_0000_4000_0483, LEAF_ATTRS | SH);
    // Execute-only user page (AP[1] clear, UXN clear): read as a kernel
    // read-only leaf, EL0 execution unreported; ours sets UXN.
    foreign::<A48>(0x0020_0000_4000_0f83, 0, leaf(0x4000_0000, R | A), 0x0060_0000_4000_0c83, 1 << 54);
}

#[test]
fn page_golden() {
    // Our encodings, exact in both formats.
    golden(leaf(0x1234_5000, R | W | U | A | D), 0, 0x0068_0000_1234_5c43);
    golden(leaf(0x1234_5000, R | W | U | X | A), 0, 0x0020_0000_1234_5c43);
    golden(leaf(0x1234_5000, R | U | D), 0, 0x00e0_0000_1234_58c3);
    golden(leaf(0x1234_5000, R | U | G), 0, 0x0060_0000_1234_50c3);
    golden(leaf(0x1000, R | W | X | G), 0, 0x0040_0000_0000_1003);
    golden(leaf(0x1000, R | G), 0, 0x0060_0000_0000_1083);
    golden(leaf(0x1000, R), 0, 0x0060_0000_0000_1883);
    // Frame 0 is a valid leaf, not Absent.
    golden(leaf(0, R | W | U | X), 0, 0x0020_0000_0000_0843);
}

#[test]
fn block_golden() {
    // 2 MiB: bit 1 clear at level 1.
    golden(leaf(0x4020_0000, R | W | U | X | A), 1, 0x0020_0000_4020_0c41);
    golden(leaf(0x4020_0000, R | W | A | D | G), 1, 0x0068_0000_4020_0401);
    // 1 GiB at level 2.
    golden(leaf(0xc000_0000, R | G), 2, 0x0060_0000_c000_0081);
    golden(leaf(0x0000_0040_c000_0000, R | W | U | A | D), 2, 0x0068_0040_c000_0c41);
    // Bits below the span (RES0, nT at 16) are not part of the frame.
    assert_eq!(A48::decode(0x0020_0000_4021_0c41, 1), leaf(0x4020_0000, R | W | U | X | A));
    assert_eq!(A52::decode(0x0060_0000_c010_0081, 2), leaf(0xc000_0000, R | G));
}

#[test]
fn reserved_and_unsupported_descriptors_are_invalid() {
    // Level 0 with bit 1 clear is reserved (a block there does not exist).
    assert_eq!(A48::decode(0x0020_0000_1234_5c41, 0), PteView::Invalid(0x0020_0000_1234_5c41));
    assert_eq!(A52::decode(0x0000_0000_0000_0001, 0), PteView::Invalid(1));
    // The same bits at level 1 are a 2 MiB block.
    assert_eq!(A48::decode(0x0020_0000_4000_0c41, 1), leaf(0x4000_0000, R | W | U | X | A));
    // A block at Arm level 0 (our 3): reserved at 48 bits, a 512 GiB block
    // with LPA2 that this format does not model. The LPA2 root holds none.
    assert_eq!(A48::decode(0x0020_0080_0000_0c41, 3), PteView::Invalid(0x0020_0080_0000_0c41));
    assert_eq!(A52::decode(0x0020_0080_0000_0c41, 3), PteView::Invalid(0x0020_0080_0000_0c41));
    assert_eq!(A52::decode(0x0000_0000_0000_0001, 4), PteView::Invalid(1));
    // RES0 address bits of the 48-bit format: 49:48 (leaves), 50:48 (tables).
    assert_eq!(A48::decode(0x0001_0000_0000_1003, 0), PteView::Invalid(0x0001_0000_0000_1003));
    assert_eq!(A48::decode(0x0002_0000_0020_0001, 1), PteView::Invalid(0x0002_0000_0020_0001));
    assert_eq!(A48::decode(0x0004_0000_0000_5003, 1), PteView::Invalid(0x0004_0000_0000_5003));
    // Bit 50 is GP in a leaf (ignored), RES0 in a table.
    assert_eq!(A48::decode(0x0044_0000_0000_1003, 0), leaf(0x1000, R | W | X | G));
    assert_eq!(A52::decode(0x0004_0000_0000_5003, 1), PteView::Invalid(0x0004_0000_0000_5003));
    // Past the root.
    assert_eq!(A48::decode(0x5003, 4), PteView::Invalid(0x5003));
    assert_eq!(A52::decode(0x5003, 5), PteView::Invalid(0x5003));
    assert_eq!(A48::decode(0x4000_0000_0000_0002, 4), PteView::Invalid(0x4000_0000_0000_0002));
}

#[test]
fn lpa2_address_bits() {
    // OA[51:50] in bits 9:8: the Linux dirty page above, read with LPA2, maps
    // frame 0x000c_0000_1234_5000; encode keeps bits 9:8.
    let raw = 0x00e8_0000_1234_5f43;
    foreign::<A52>(raw, 0, leaf(0x000c_0000_1234_5000, R | W | U | A | D), 0x0068_0000_1234_5f43, LEAF_ATTRS | 1 << 55);
    // The 48-bit format reads bits 9:8 as SH: same permissions, low frame.
    assert_eq!(A48::decode(raw, 0), leaf(0x1234_5000, R | W | U | A | D));
    // Top of each OA range, pages and blocks.
    golden_in::<A52>(leaf(0x000f_ffff_ffff_f000, R | W | U), 0, 0x0063_ffff_ffff_fb43);
    golden_in::<A52>(leaf(0x000f_ffff_ffe0_0000, R | U | X), 1, 0x0023_ffff_ffe0_0bc1);
    golden_in::<A52>(leaf(0x000f_ffff_c000_0000, R | W | X | G), 2, 0x0043_ffff_c000_0301);
    golden_in::<A48>(leaf(0x0000_ffff_ffff_f000, R | W | U), 0, 0x0060_ffff_ffff_f843);
    golden_in::<A48>(leaf(0x0000_ffff_c000_0000, R | W | X | G), 2, 0x0040_ffff_c000_0001);
    // Tables take the same address layout.
    golden_in::<A52>(table(0x000f_ffff_ffff_f000, R | W | U | X), 4, 0x0003_ffff_ffff_f303);
    golden_in::<A52>(table(0x0004_0000_0000_5000, R | W | U | X), 1, 0x0000_0000_0000_5103);
    golden_in::<A48>(table(0x0000_ffff_ffff_f000, R | W | U | X), 3, 0x0000_ffff_ffff_f003);
    // One past the top.
    rejects::<A48>(leaf(0x0001_0000_0000_0000, R), 0);
    rejects::<A48>(table(0x0001_0000_0000_0000, R | W | U | X), 1);
    rejects::<A52>(leaf(0x0010_0000_0000_0000, R), 0);
    rejects::<A52>(leaf(0x0010_0000_0000_0000, R), 2);
}

#[test]
fn leaf_rejections() {
    // Misaligned frames.
    rejects::<A48>(leaf(0x1234_5800, R), 0);
    rejects::<A48>(leaf(0x4010_0000, R), 1);
    rejects::<A52>(leaf(0x4020_0000, R), 2);
    // No leaf at our level 3 (Arm level 0) or the LPA2 root; past the root.
    rejects::<A48>(leaf(0, R), 3);
    rejects::<A52>(leaf(0, R), 3);
    rejects::<A52>(leaf(0, R), 4);
    rejects::<A48>(leaf(0, R), 4);
    // Valid descriptors are readable; unknown flag bits do not round trip.
    rejects::<A48>(leaf(0x1000, W | U), 0);
    rejects::<A48>(leaf(0x1000, LeafFlags::from_bits_retain(0x8000) | R), 0);
    rejects::<A48>(PteView::Invalid(0x1), 0);
}

// ---------------------------------------------------------------- tables

#[test]
fn table_golden() {
    // A plain directory: valid | table, nothing restricted.
    golden(table(0x5000, R | W | U | X), 1, 0x0000_0000_0000_5003);
    golden(table(0x5000, R | W | U | X), 3, 0x0000_0000_0000_5003);
    golden_in::<A52>(table(0x5000, R | W | U | X), 4, 0x5003);
    // APTable[1] (62): read-only below.
    golden(table(0x8000, R | U | X), 2, 0x4000_0000_0000_8003);
    // No EXEC: UXNTable (60) and PXNTable (59).
    golden(table(0x8000, R | W | U), 2, 0x1800_0000_0000_8003);
    // APTable[0] (61): no EL0 below, hence no EXEC either.
    golden(table(0x9000, R | W), 1, 0x3800_0000_0000_9003);
    golden(table(0x9000, R), 3, 0x7800_0000_0000_9003);
}

#[test]
fn foreign_tables() {
    // Linux kernel tables: UXNTable only. EXEC is dropped (one EXEC flag for
    // both privileges); ours adds PXNTable.
    foreign::<A48>(0x1000_0000_0000_5003, 2, table(0x5000, R | W | U), 0x1800_0000_0000_5003, 1 << 59);
    // APTable[1] and UXNTable.
    foreign::<A48>(0x5000_0000_0000_5003, 1, table(0x5000, R | U), 0x5800_0000_0000_5003, 1 << 59);
    // APTable[0] alone removes USER and EXEC.
    foreign::<A48>(0x2000_0000_0000_5003, 1, table(0x5000, R | W), 0x3800_0000_0000_5003, 3 << 59);
    // Ignored bits 2..=11 and 51..=58, NSTable (63).
    foreign::<A48>(0x87f8_0000_0000_5fff, 1, table(0x5000, R | W | U | X), 0x5003, 0x87f8_0000_0000_0ffc);
}

#[test]
fn table_rejections() {
    rejects::<A48>(table(0x5000, R | W | U | X), 0);
    rejects::<A48>(table(0x5000, R | W | U | X), 4);
    rejects::<A52>(table(0x5000, R | W | U | X), 5);
    // EXEC without USER cannot be read back (APTable[0] removes EXEC).
    rejects::<A48>(table(0x5000, R | W | X), 1);
    // Status flags mean nothing on a directory; READ is required.
    rejects::<A48>(table(0x5000, R | W | U | A), 1);
    rejects::<A48>(table(0x5000, R | D), 1);
    rejects::<A48>(table(0x5000, R | G), 1);
    rejects::<A48>(table(0x5000, W | U), 1);
    rejects::<A48>(table(0x5800, R), 1);
}

// ---------------------------------------------------------------- software

#[test]
fn prot_none_golden() {
    // The leaf's encoding with bit 0 clear and kind 1 in bits 61..=63.
    golden(prot_none(0x7000, R | W | U), 0, 0x2060_0000_0000_7842);
    golden(prot_none(0x7000, R | U | X | A | D), 0, 0x20a0_0000_0000_7cc2);
    golden(prot_none(0x20_0000, R | W | D | G), 1, 0x2068_0000_0020_0000);
    golden(prot_none(0x4000_0000, R | U | X), 2, 0x2020_0000_4000_08c0);
    golden_in::<A52>(prot_none(0x000c_0000_4000_0000, R), 2, 0x2060_0000_4000_0b80);
    // Bit 1 must be as encode writes it (page at level 0, block above).
    assert_eq!(A48::decode(0x2060_0000_0000_7840, 0), PteView::Invalid(0x2060_0000_0000_7840));
    assert_eq!(A52::decode(0x2020_0000_4000_08c2, 2), PteView::Invalid(0x2020_0000_4000_08c2));
    rejects::<A48>(prot_none(0, R), 3);
    rejects::<A48>(prot_none(0x20_1000, R), 1);
    rejects::<A48>(prot_none(0x0001_0000_0000_0000, R), 0);
    rejects::<A48>(prot_none(0x1000, W), 0);
}

#[test]
fn swap_golden() {
    assert_eq!(SWAP_OFFSET_BITS, 60);
    golden(special(SpecialEntry::Swap { offset: 0 }), 0, 0x4000_0000_0000_0000);
    golden(special(SpecialEntry::Swap { offset: 0x12345 }), 1, 0x4000_0000_0002_468a);
    golden(special(SpecialEntry::Swap { offset: (1 << 60) - 1 }), 2, 0x5fff_ffff_ffff_fffe);
    rejects::<A48>(special(SpecialEntry::Swap { offset: 1 << 60 }), 0);
    rejects::<A52>(special(SpecialEntry::Swap { offset: u64::MAX }), 0);
}

#[test]
fn migration_and_device_golden() {
    assert_eq!(MAX_OWNER, u16::MAX);
    // Kind 3, write in bit 1, frame >> 12 at bit 18.
    golden(special(SpecialEntry::Migration { frame: 0x0abc_d000, write: true }), 0, 0x6000_0002_af34_0002);
    golden(special(SpecialEntry::Migration { frame: 0x20_0000, write: false }), 1, 0x6000_0000_0800_0000);
    // Kind 4, owner in bits 2..=17.
    golden(
        special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: MAX_OWNER, write: false }),
        0,
        0x8000_0000_0007_fffc,
    );
    // Kind 5; the top LPA2 frame.
    golden(
        special(SpecialEntry::DeviceExclusive { frame: 0x4000_0000, owner: 3, write: true }),
        2,
        0xa000_0010_0000_000e,
    );
    golden_in::<A52>(
        special(SpecialEntry::DeviceExclusive { frame: 0x000f_ffff_ffff_f000, owner: 1, write: true }),
        0,
        0xa3ff_ffff_fffc_0006,
    );
    // That frame is out of the 48-bit range: unencodable, and Invalid when read.
    rejects::<A48>(special(SpecialEntry::DeviceExclusive { frame: 0x000f_ffff_ffff_f000, owner: 1, write: true }), 0);
    assert_eq!(A48::decode(0xa3ff_ffff_fffc_0006, 0), PteView::Invalid(0xa3ff_ffff_fffc_0006));
    // Misaligned for the level.
    rejects::<A48>(special(SpecialEntry::Migration { frame: 0x1000, write: true }), 1);
    rejects::<A48>(special(SpecialEntry::DevicePrivate { frame: 0x20_0000, owner: 0, write: true }), 2);
}

#[test]
fn other_golden() {
    // Kinds 0, 6, 7: Linux's own non-valid entries pass through, e.g. its
    // PROT_NONE (nG as PTE_PRESENT_INVALID) and a swap entry.
    golden(special(SpecialEntry::Other(0x0060_0000_1234_5f42)), 0, 0x0060_0000_1234_5f42);
    golden(special(SpecialEntry::Other(0x0000_0000_0123_4508)), 1, 0x0000_0000_0123_4508);
    golden(special(SpecialEntry::Other(0xc000_0000_0000_0002)), 2, 0xc000_0000_0000_0002);
    golden(special(SpecialEntry::Other(0xe000_0000_0000_0000)), 0, 0xe000_0000_0000_0000);
    rejects::<A48>(special(SpecialEntry::Other(0x0000_0000_0000_1003)), 0);
    rejects::<A48>(special(SpecialEntry::Other(0)), 0);
    for kind in 1u64..=5 {
        rejects::<A48>(special(SpecialEntry::Other(kind << 61 | 0x1000)), 0);
    }
}

#[test]
fn software_entries_only_at_leaf_levels() {
    for s in [
        SpecialEntry::Swap { offset: 1 },
        SpecialEntry::Migration { frame: 0, write: false },
        SpecialEntry::DevicePrivate { frame: 0, owner: 1, write: false },
        SpecialEntry::DeviceExclusive { frame: 0, owner: 1, write: false },
        SpecialEntry::Other(0x1000),
    ] {
        rejects::<A48>(special(s), 3);
        rejects::<A52>(special(s), 3);
        rejects::<A52>(special(s), 4);
    }
    assert_eq!(A48::decode(0x4000_0000_0002_468a, 3), PteView::Invalid(0x4000_0000_0002_468a));
    assert_eq!(A52::decode(0x2060_0000_0000_7842, 4), PteView::Invalid(0x2060_0000_0000_7842));
}

// ---------------------------------------------------------------- opaque bits

#[test]
fn directory_grants_everything() {
    assert_eq!(A48::DIRECTORY, R | W | U | X);
    assert_eq!(A52::DIRECTORY, R | W | U | X);
    assert_eq!(A48::directory(0x0000_ffff_ffff_f000, 3), Ok(0x0000_ffff_ffff_f003));
    assert_eq!(A52::directory(0x000f_ffff_ffff_f000, 4), Ok(0x0003_ffff_ffff_f303));
    assert_eq!(A48::directory(0x5800, 1), Err(Error::Unencodable));
}

#[test]
fn opaque_bits_of_software_entries() {
    // Swap and Other carry every bit.
    assert_eq!(A48::opaque_bits(0x4000_0000_0002_468a, 0), 0);
    assert_eq!(A48::opaque_bits(0x0060_0000_1234_5f42, 0), 0);
    // Migration: spare bits 58..=60, the owner field, frame bits below a
    // block's span (a 2 MiB frame keeps 9 low frame bits at 18..=26).
    let migration = 0x6000_0002_af34_0002;
    assert_eq!(A48::opaque_bits(migration, 0), 0x1c00_0000_0003_fffc);
    assert_eq!(A48::opaque_bits(migration, 1), 0x1c00_0000_07ff_fffc);
    let noisy = migration | 0x1000_0000_0000_1234 | 1 << 20;
    assert_eq!(A48::decode(noisy, 1), special(SpecialEntry::Migration { frame: 0x0aa0_0000, write: true }));
    // Device entries keep their owner.
    assert_eq!(A52::opaque_bits(0x8000_0000_0007_fffc, 0), 0x1c00_0000_0000_0000);
    // PROT_NONE: as a leaf, minus the kind field.
    assert_eq!(A48::opaque_bits(0x2060_0000_0000_7842, 0), 0x1f14_0000_0000_033c);
    // Absent, Invalid and levels past the root: nothing.
    assert_eq!(A48::opaque_bits(0, 0), 0);
    assert_eq!(A48::opaque_bits(0x0020_0000_1234_5c41, 0), 0);
    assert_eq!(A48::opaque_bits(0x5003, 4), 0);
}

#[test]
fn opaque_bits_of_blocks() {
    // Frame bits below the span are opaque: 12..=20 for 2 MiB, 12..=29 for 1 GiB.
    let block = 0x0020_0000_4020_0c41;
    assert_eq!(A48::opaque_bits(block, 1) & 0xffff_f000, 0x001f_f000);
    assert_eq!(A48::opaque_bits(0x0060_0000_c000_0081, 2) & 0xffff_f000, 0x3fff_f000);
    assert_eq!(A48::opaque_bits(0x0060_0000_0000_1883, 0) & 0xffff_f000, 0);
}

/// The kernel's rewrite, `(encode(view) & !o) | (raw & o)`, keeps Linux's
/// memory type and shareability and does not undo the change it makes.
#[test]
fn rewrite_keeps_attributes_and_the_change() {
    fn rewrite<F: PteFormat>(raw: u64, level: usize, f: impl Fn(LeafFlags) -> LeafFlags) -> u64 {
        let o = F::opaque_bits(raw, level);
        let PteView::Leaf { frame, flags } = F::decode(raw, level) else { panic!("{raw:#x} is not a leaf") };
        (F::encode(&leaf(frame, f(flags)), level).unwrap() & !o) | (raw & o)
    }
    // A Linux dirty user page with AttrIndx 1 (0x4): clean it, then make it
    // old, then write-protect it.
    let dirty = 0x00e8_0000_1234_5f47;
    let cleaned = rewrite::<A48>(dirty, 0, |f| f - D);
    // SW dirty stays (it is the kernel's), so the page still reads dirty:
    // a rewrite never loses dirtiness.
    assert_eq!(A48::decode(cleaned, 0), leaf(0x1234_5000, R | W | U | A | D));
    // Our own dirty page cleans: DBM is not opaque on a writable page.
    let ours = 0x0068_0000_1234_5f47;
    let cleaned = rewrite::<A48>(ours, 0, |f| f - D);
    assert_eq!(cleaned, 0x0060_0000_1234_5f47);
    assert_eq!(A48::decode(cleaned, 0), leaf(0x1234_5000, R | W | U | A));
    let old = rewrite::<A48>(cleaned, 0, |f| f - A);
    assert_eq!(old, 0x0060_0000_1234_5b47);
    let ro = rewrite::<A48>(old, 0, |f| f - W);
    assert_eq!(A48::decode(ro, 0), leaf(0x1234_5000, R | U));
    assert_eq!(ro & 0x3ff, 0x3c7, "AttrIndx and SH kept, AP[2] set");
    // Read-only and clean, made writable and dirty: a clear DBM on a
    // read-only leaf is not opaque, so the DBM that encode writes lands.
    let wd = rewrite::<A48>(ro, 0, |f| f | W | D);
    assert_eq!(A48::decode(wd, 0), leaf(0x1234_5000, R | W | U | D));
    // Making a directory executable after the fact clears both XN bits.
    let dir = 0x1000_0000_0000_5003; // Linux kernel table: UXNTable only
    let o = A48::opaque_bits(dir, 1);
    let e = A48::encode(&table(0x5000, R | W | U | X), 1).unwrap();
    assert_eq!(A48::decode((e & !o) | (dir & o), 1), table(0x5000, R | W | U | X));
}

#[test]
fn publish_table_writes_returns() {
    // On the host this is the fallback fence; the aarch64 `dsb st` is built
    // by `cargo build --lib --target aarch64-unknown-none`.
    A48::publish_table_writes();
    A52::publish_table_writes();
}

// ---------------------------------------------------------------- geometry

#[test]
fn geometry() {
    assert_eq!((<A48 as PagingGeometry>::LEVELS, <A48 as PagingGeometry>::VA_BITS), (4, 48));
    assert_eq!((<A52 as PagingGeometry>::LEVELS, <A52 as PagingGeometry>::VA_BITS), (5, 52));
    assert_eq!((A48::OA_BITS, A52::OA_BITS), (48, 52));
    // The LPA2 root (Arm level -1) has 16 entries indexed by VA[51:48].
    assert_eq!(A52::entries(4), 16);
    assert_eq!(A52::index(0x000f_0000_0000_0000, 4), 15);
    assert_eq!(A52::index(0x0000_8000_0000_0000, 3), 256);
    assert_eq!(A48::index(0x0000_8000_0000_0000, 3), 256);
    assert_eq!([0, 1, 2].map(A48::level_shift), [12, 21, 30]);
    assert!((0..3).all(A52::leaf_allowed) && !A52::leaf_allowed(3) && !A52::leaf_allowed(4));
}

#[test]
fn geometry_canonical() {
    // TTBR0 only: 0 .. 2^VA_BITS, no sign extension.
    for (va, c48, c52) in [
        (0, true, true),
        (0x0000_7fff_ffff_f000, true, true),
        (0x0000_8000_0000_0000, true, true),
        (0x0000_ffff_ffff_ffff, true, true),
        (0x0001_0000_0000_0000, false, true),
        (0x000f_ffff_ffff_ffff, false, true),
        (0x0010_0000_0000_0000, false, false),
        (0xffff_0000_0000_0000, false, false),
        (0xffff_8000_0000_0000, false, false),
        (0xfff0_0000_0000_0000, false, false),
        (u64::MAX, false, false),
    ] {
        assert_eq!(A48::is_canonical(va), c48, "Va48 {va:#x}");
        assert_eq!(A52::is_canonical(va), c52, "Va52 {va:#x}");
    }
}

// ---------------------------------------------------------------- properties

fn any_flags() -> impl Strategy<Value = LeafFlags> {
    (0u16..128).prop_map(|b| LeafFlags::from_bits_truncate(b) | R)
}

/// Directory flags `decode` can produce: EXEC only with USER.
fn table_flags() -> impl Strategy<Value = LeafFlags> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(w, u, x)| {
        let mut f = R;
        f.set(W, w);
        f.set(U, u);
        f.set(X, u && x);
        f
    })
}

/// A physical address below `2^oa` aligned to `1 << shift`.
fn frame(shift: u32, oa: u32) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(((1u64 << oa) - 1) & !((1u64 << shift) - 1)),
        (0u64..1 << (oa - shift)).prop_map(move |f| f << shift),
    ]
}

/// Every encodable view at `level` of a format with `levels` levels and
/// `oa`-bit frames.
fn valid_view(level: usize, levels: usize, oa: u32) -> BoxedStrategy<PteView> {
    assert!(level < levels);
    let shift = 12 + 9 * level as u32;
    let mut options: Vec<BoxedStrategy<PteView>> = vec![Just(PteView::Absent).boxed()];
    if level > 0 {
        options.push((frame(12, oa), table_flags()).prop_map(|(frame, flags)| table(frame, flags)).boxed());
    }
    if level < 3 {
        let owner = prop_oneof![Just(0u16), Just(MAX_OWNER), any::<u16>()];
        options.push((frame(shift, oa), any_flags()).prop_map(|(f, fl)| leaf(f, fl)).boxed());
        options.push((frame(shift, oa), any_flags()).prop_map(|(f, fl)| prot_none(f, fl)).boxed());
        options.push(
            prop_oneof![Just(0u64), Just((1 << SWAP_OFFSET_BITS) - 1), 0u64..1 << SWAP_OFFSET_BITS]
                .prop_map(|offset| special(SpecialEntry::Swap { offset }))
                .boxed(),
        );
        options.push(
            (frame(shift, oa), any::<bool>())
                .prop_map(|(frame, write)| special(SpecialEntry::Migration { frame, write }))
                .boxed(),
        );
        options.push(
            (frame(shift, oa), owner.clone(), any::<bool>())
                .prop_map(|(frame, owner, write)| special(SpecialEntry::DevicePrivate { frame, owner, write }))
                .boxed(),
        );
        options.push(
            (frame(shift, oa), owner, any::<bool>())
                .prop_map(|(frame, owner, write)| special(SpecialEntry::DeviceExclusive { frame, owner, write }))
                .boxed(),
        );
        options.push(
            (any::<u64>(), prop_oneof![Just(0u64), Just(6), Just(7)])
                .prop_map(|(raw, kind)| (raw & !1 & !(7 << 61)) | kind << 61)
                .prop_filter("zero is Absent", |raw| *raw != 0)
                .prop_map(|raw| special(SpecialEntry::Other(raw)))
                .boxed(),
        );
    }
    proptest::strategy::Union::new(options).boxed()
}

fn level_and_view(levels: usize, oa: u32) -> impl Strategy<Value = (usize, PteView)> {
    (0..levels).prop_flat_map(move |level| (Just(level), valid_view(level, levels, oa)))
}

/// Raw words likely to reach every decode path: random, or with the type
/// and permission bits, the kind field and the RES0 bits drawn from small sets.
fn interesting_raw() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (any::<u64>(), 0u64..4, 0u64..8, 0u64..16).prop_map(|(r, ty, kind, hi)| {
            // Clear RES0 bits 48..=50 most of the time, keep them sometimes.
            let r = if hi & 8 == 0 { r & !(0b111 << 48) } else { r };
            (r & !3 & !(7 << 61)) | ty | kind << 61
        }),
    ]
}

fn check_round_trip<F: PteFormat>(level: usize, view: PteView) -> Result<(), TestCaseError> {
    let raw = F::encode(&view, level);
    prop_assert!(raw.is_ok(), "{:?} at level {} rejected: {:?}", view, level, raw);
    let raw = raw.unwrap();
    contract::encodes_back::<F>(view, level)?;
    // Valid bit exactly for tables and leaves.
    prop_assert_eq!(raw & 1 != 0, matches!(view, PteView::Table { .. } | PteView::Leaf { .. }));
    Ok(())
}

/// Contract items 2, 3 and 8 for an arbitrary raw word, plus the
/// descriptor type bits: tables and pages have bit 1 set, blocks clear.
fn check_decode<F: PteFormat>(raw: u64, level: usize) -> Result<(), TestCaseError> {
    contract::decodes_consistently::<F>(raw, level)?;
    match F::decode(raw, level) {
        PteView::Table { .. } => prop_assert_eq!(raw & 3, 3),
        PteView::Leaf { .. } => {
            prop_assert_eq!(raw & 1, 1);
            prop_assert_eq!(raw & 2 != 0, level == 0, "page bit at level 0 only: {:#x}", raw);
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip_va48((level, view) in level_and_view(4, 48)) {
        check_round_trip::<A48>(level, view)?;
        // Views without LPA2-only frames encode identically with LPA2.
        prop_assert_eq!(A52::encode(&view, level), A48::encode(&view, level));
    }

    #[test]
    fn round_trip_va52((level, view) in level_and_view(5, 52)) {
        check_round_trip::<A52>(level, view)?;
    }

    #[test]
    fn decode_then_encode_keeps_all_but_opaque_bits(raw in interesting_raw(), level in 0usize..6) {
        check_decode::<A48>(raw, level)?;
        check_decode::<A52>(raw, level)?;
    }

    /// Contract item 6: the one-mask `user_page` agrees with `decode`,
    /// except that LPA2 leaves frames at or above 2^50 (OA\[51:50\] in bits
    /// 8..=9) to `decode`.
    #[test]
    fn user_page_agrees_with_decode(raw in any::<u64>(), bit in 0u32..64) {
        fn check<F: PteFormat>(raw: u64) -> Result<(), TestCaseError> {
            let want = F::decode(raw, 0).user_frame();
            let high_oa = core::any::type_name::<F>() == core::any::type_name::<A52>() && raw & 0x300 != 0;
            let want = if high_oa { None } else { want };
            prop_assert_eq!(F::user_page(raw), want, "raw {:#x}", raw);
            Ok(())
        }
        // Force valid | page | AP[1] (and clear RES0) so user pages are common.
        let user = (raw | 0x43) & !(0b11 << 48);
        for raw in [raw, raw | 0x43, user, user ^ (1 << bit), user & !2] {
            check::<A48>(raw)?;
            check::<A52>(raw)?;
        }
    }

    /// Contract item 7: `directory()` links any 4 KiB frame below the OA
    /// limit at every table level, as a plain `Table { frame, DIRECTORY }`.
    #[test]
    fn directory_decodes_as_plain_table(f48 in frame(12, 48), f52 in frame(12, 52)) {
        for level in 1..4 {
            let raw = A48::directory(f48, level).unwrap();
            prop_assert_eq!(raw, f48 | 3);
            prop_assert_eq!(A48::decode(raw, level), table(f48, A48::DIRECTORY));
        }
        for level in 1..5 {
            let raw = A52::directory(f52, level).unwrap();
            prop_assert_eq!(A52::decode(raw, level), table(f52, A52::DIRECTORY));
            prop_assert_eq!(A52::opaque_bits(raw, level), 0x07f8_0000_0000_0cfc | 1 << 63);
        }
        prop_assert!(A48::directory(f48, 0).is_err() && A48::directory(f48, 4).is_err());
    }

    #[test]
    fn canonical_is_below_va_bits(va in any::<u64>(), shift in 0u32..64) {
        for va in [va, va >> shift] {
            prop_assert_eq!(A48::is_canonical(va), va < 1 << 48);
            prop_assert_eq!(A52::is_canonical(va), va < 1 << 52);
        }
    }
}
