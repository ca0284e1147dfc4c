//! Golden tests of the RISC-V Sv39/Sv48/Sv57 page-table encoding: raw values
//! written by hand from the privileged spec's PTE layout (V 0, R 1, W 2, X 3,
//! U 4, G 5, A 6, D 7, RSW 8..=9, PPN 10..=53, reserved 54..=60, PBMT
//! 61..=62, N 63) and the module's software-entry table, then property tests
//! of the round trips, `user_page` and the geometry.

mod encoding_kit;

use encoding_kit::contract;
use encoding_kit::*;
use hmm_core::arch::riscv64::{Sv39, Sv48, Sv57, MAX_OWNER, PHYS_ADDR_BITS, SWAP_OFFSET_BITS};
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use hmm_core::Error;
use proptest::prelude::*;

/// What a RISC-V directory grants: everything (it has no permission bits).
const DIRECTORY: LeafFlags = R.union(W).union(X).union(U);

fn table(frame: u64) -> PteView {
    PteView::Table { frame, flags: DIRECTORY }
}

fn levels<F: PteFormat>() -> usize {
    <F::Geometry as PagingGeometry>::LEVELS
}

/// `encode(view, level) == raw` and `decode(raw, level) == view` in every
/// mode that has `level`; returns how many modes did.
#[track_caller]
fn golden(view: PteView, level: usize, raw: u64) -> usize {
    #[track_caller]
    fn one<F: PteFormat>(view: PteView, level: usize, raw: u64) -> usize {
        if level >= levels::<F>() {
            return 0;
        }
        let n = levels::<F>();
        assert_eq!(F::encode(&view, level), Ok(raw), "Sv{} encode {view:?} at level {level}", 12 + 9 * n);
        assert_eq!(F::decode(raw, level), view, "Sv{} decode {raw:#x} at level {level}", 12 + 9 * n);
        1
    }
    one::<Sv39>(view, level, raw) + one::<Sv48>(view, level, raw) + one::<Sv57>(view, level, raw)
}

/// `decode(raw, level) == view` in every mode that has `level`, and `view`
/// encodes to `canonical` (a value differing from `raw` only in bits decode
/// ignores).
#[track_caller]
fn decodes_to(raw: u64, level: usize, view: PteView, canonical: u64) {
    assert_ne!(raw, canonical, "use golden() for exact round trips");
    assert!(golden(view, level, canonical) > 0);
    for (n, got, opaque) in [
        (3, Sv39::decode(raw, level), Sv39::opaque_bits(raw, level)),
        (4, Sv48::decode(raw, level), Sv48::opaque_bits(raw, level)),
        (5, Sv57::decode(raw, level), Sv57::opaque_bits(raw, level)),
    ] {
        if level < n {
            assert_eq!(got, view, "Sv{} decode {raw:#x} at level {level}", 12 + 9 * n);
            // The difference is opaque (contract item 8).
            assert_eq!(
                (raw ^ canonical) & !opaque,
                0,
                "Sv{}: {raw:#x} vs {canonical:#x}, opaque {opaque:#x}",
                12 + 9 * n
            );
        }
    }
}

/// `raw` is malformed at `level` in every mode (levels past a mode's root too).
#[track_caller]
fn invalid(raw: u64, level: usize) {
    assert_eq!(Sv39::decode(raw, level), PteView::Invalid(raw), "Sv39 {raw:#x} at level {level}");
    assert_eq!(Sv48::decode(raw, level), PteView::Invalid(raw), "Sv48 {raw:#x} at level {level}");
    assert_eq!(Sv57::decode(raw, level), PteView::Invalid(raw), "Sv57 {raw:#x} at level {level}");
}

#[track_caller]
fn rejects_all(view: PteView, level: usize) {
    rejects::<Sv39>(view, level);
    rejects::<Sv48>(view, level);
    rejects::<Sv57>(view, level);
}

// ---------------------------------------------------------------- hardware

#[test]
fn absent_is_zero_at_every_level() {
    for level in 0..5 {
        let modes = golden(PteView::Absent, level, 0);
        assert_eq!(modes, [3, 3, 3, 2, 1][level]);
    }
}

#[test]
fn leaf_4k_golden() {
    // User RW page, accessed and dirty: V R W U A D = 0xd7; PPN 0x80201 << 10.
    golden(leaf(0x8020_1000, R | W | U | A | D), 0, 0x2008_04d7);
    // ... and executable: 0xdf.
    golden(leaf(0x8020_1000, R | W | X | U | A | D), 0, 0x2008_04df);
    // Read-only user page: V R U.
    golden(leaf(0x1000, R | U), 0, 0x413);
    // Execute-only user page: V X U, no READ.
    golden(leaf(0x2000, X | U), 0, 0x819);
    // Kernel global RWX page: V R W X G A D.
    golden(leaf(0x8000_0000, R | W | X | G | A | D), 0, 0x2000_00ef);
    // Frame 0 is a valid leaf (not Absent), and the highest frame.
    golden(leaf(0, R), 0, 0x3);
    golden(leaf((1 << 56) - 0x1000, R | W), 0, 0x003f_ffff_ffff_fc07);
}

#[test]
fn superpage_golden() {
    // Megapage: PPN 0x80200 (2 MiB aligned), user RW A D.
    assert_eq!(golden(leaf(0x8020_0000, R | W | U | A | D), 1, 0x2008_00d7), 3);
    // Gigapage: PPN 0x40000, kernel RWX A D.
    assert_eq!(golden(leaf(0x4000_0000, R | W | X | A | D), 2, 0x1000_00cf), 3);
    // Terapage (Sv48, Sv57 level 3): frame 2^39, PPN 2^27.
    assert_eq!(golden(leaf(1 << 39, R | U), 3, 0x20_0000_0013), 2);
    // Sv57's 256 TiB leaf: frame 2^48 (PPN 2^36) and the highest one.
    assert_eq!(golden(leaf(1 << 48, R), 4, 0x4000_0000_0003), 1);
    assert_eq!(golden(leaf(0xff << 48, R | W), 4, 0x003f_c000_0000_0007), 1);
}

#[test]
fn directory_golden() {
    // V only, PPN 0x80203: the same at every level above 0.
    assert_eq!((Sv39::DIRECTORY, Sv48::DIRECTORY, Sv57::DIRECTORY), (DIRECTORY, DIRECTORY, DIRECTORY));
    for level in 1..5 {
        golden(table(0x8020_3000), level, 0x2008_0c01);
        if level < 3 {
            assert_eq!(Sv39::directory(0x8020_3000, level), Ok(0x2008_0c01));
        }
        assert_eq!(Sv57::directory(0x8020_3000, level), Ok(0x2008_0c01));
    }
    assert_eq!(Sv48::directory(0x8020_3000, 0), Err(Error::Unencodable));
    assert_eq!(Sv48::directory(0x8020_3000, 4), Err(Error::Unencodable));
    // G (all mappings below global) and RSW are not part of the view.
    decodes_to(0x2008_0c21, 1, table(0x8020_3000), 0x2008_0c01);
    decodes_to(0x2008_0f01, 2, table(0x8020_3000), 0x2008_0c01);
}

#[test]
fn leaf_opaque_bits() {
    // PBMT = NC (bit 61) or IO (bit 62): a memory type, not in the view.
    decodes_to(0x2000_0000_2008_04d7, 0, leaf(0x8020_1000, R | W | U | A | D), 0x2008_04d7);
    decodes_to(0x4000_0000_2008_04d7, 0, leaf(0x8020_1000, R | W | U | A | D), 0x2008_04d7);
    decodes_to(0x4000_0000_1000_00cf, 2, leaf(0x4000_0000, R | W | X | A | D), 0x1000_00cf);
    // RSW belongs to the kernel.
    decodes_to(0x2008_07d7, 0, leaf(0x8020_1000, R | W | U | A | D), 0x2008_04d7);
}

#[test]
fn malformed_hardware_entries() {
    // Misaligned megapage (PPN 0x80201 at level 1) and gigapage.
    invalid(0x2008_04d7, 1);
    invalid(0x1008_00cf, 2);
    // W without R: reserved, with or without X.
    invalid(0x405, 0);
    invalid(0x40d, 0);
    invalid(0x2008_00d5, 1);
    // A pointer at level 0.
    invalid(0x2008_0c01, 0);
    // A directory with U, A, D (reserved in non-leaf entries) or PBMT set.
    for bad in [0x10, 0x40, 0x80, 1 << 61, 1 << 62] {
        invalid(0x2008_0c01 | bad, 1);
    }
    // N = 1: a 64 KiB NAPOT run (PPN ends in 1000): its frame depends on the VA.
    invalid(0x8000_0000_0000_20d7, 0);
    invalid(0x8000_0000_2008_0c01, 1);
    // PBMT = 3 (reserved) in a leaf.
    invalid(0x6000_0000_2008_04d7, 0);
    // Each reserved bit 54..=60, on a leaf and on a directory.
    for bit in 54..=60 {
        invalid(1 << bit | 0x2008_04d7, 0);
        invalid(1 << bit | 0x2008_0c01, 1);
    }
    // Past the root.
    assert_eq!(Sv39::decode(0x20_0000_0013, 3), PteView::Invalid(0x20_0000_0013));
    assert_eq!(Sv48::decode(0x4000_0000_0003, 4), PteView::Invalid(0x4000_0000_0003));
    assert_eq!(Sv57::decode(0x2008_0c01, 5), PteView::Invalid(0x2008_0c01));
}

#[test]
fn hardware_rejections() {
    // Directories: not at level 0, only exactly DIRECTORY, 4 KiB frames below 2^56.
    rejects_all(table(0x5000), 0);
    for flags in [R | W | U, DIRECTORY | A, DIRECTORY | G, DIRECTORY | D, R | W | X, LeafFlags::empty()] {
        rejects_all(PteView::Table { frame: 0x5000, flags }, 1);
    }
    rejects_all(table(0x5800), 1);
    rejects_all(table(1 << 56), 2);
    rejects::<Sv39>(table(0x5000), 3);
    rejects::<Sv57>(table(0x5000), 5);
    // Leaves: no W without R, no pointer-looking (R = X = 0) leaf, no unknown bits.
    for flags in [W, W | X, W | U, U, LeafFlags::empty(), LeafFlags::from_bits_retain(0x8000) | R] {
        rejects_all(leaf(0x1000, flags), 0);
        rejects_all(PteView::ProtNone { frame: 0x1000, flags }, 0);
    }
    // Misaligned or too wide frames.
    rejects_all(leaf(0x8020_1000, R), 1);
    rejects_all(leaf(0x8020_0000, R), 2);
    rejects_all(leaf(0x1234_5008, R), 0);
    rejects_all(leaf(1 << 56, R), 0);
    rejects::<Sv57>(leaf(1 << 56, R), 4);
    rejects::<Sv57>(leaf(1 << 47, R), 4);
    // Past the root.
    rejects::<Sv39>(leaf(0, R), 3);
    rejects::<Sv48>(leaf(0, R), 4);
    // Malformed entries are never produced.
    rejects_all(PteView::Invalid(0x405), 0);
    rejects_all(PteView::Invalid(0x2008_0c01), 1);
}

// ---------------------------------------------------------------- software

#[test]
fn prot_none_golden() {
    // Kind 1 in RSW (0x100), V clear, flags and PPN where a leaf has them.
    golden(PteView::ProtNone { frame: 0x8020_1000, flags: R | W | U | A | D }, 0, 0x2008_05d6);
    golden(PteView::ProtNone { frame: 0x2000, flags: X | U }, 0, 0x918);
    golden(PteView::ProtNone { frame: 0x8020_0000, flags: R | U }, 1, 0x2008_0112);
    assert_eq!(golden(PteView::ProtNone { frame: 1 << 39, flags: R | W | X | G }, 3, 0x20_0000_012e), 2);
    // Bits 54..=61 are unused; PPN bits below a huge span are masked.
    decodes_to(
        0x3fc0_0000_2008_05d6,
        0,
        PteView::ProtNone { frame: 0x8020_1000, flags: R | W | U | A | D },
        0x2008_05d6,
    );
    decodes_to(0x2008_0512, 1, PteView::ProtNone { frame: 0x8020_0000, flags: R | U }, 0x2008_0112);
    // PROT_NONE flags that no leaf can take back are malformed.
    invalid(0x100, 0);
    invalid(0x2008_0514, 0);
}

#[test]
fn swap_golden() {
    // Kind 2 in RSW (0x200), offset in 10..=61.
    assert_eq!(SWAP_OFFSET_BITS, 52);
    golden(special(SpecialEntry::Swap { offset: 0 }), 0, 0x200);
    golden(special(SpecialEntry::Swap { offset: 0x12345 }), 0, 0x48d_1600);
    golden(special(SpecialEntry::Swap { offset: (1 << 52) - 1 }), 2, 0x3fff_ffff_ffff_fe00);
    // Bits 1..=7 are unused.
    decodes_to(0x48d_16fe, 0, special(SpecialEntry::Swap { offset: 0x12345 }), 0x48d_1600);
    rejects_all(special(SpecialEntry::Swap { offset: 1 << 52 }), 0);
    rejects_all(special(SpecialEntry::Swap { offset: u64::MAX }), 1);
}

#[test]
fn migration_golden() {
    // Kind 3 in RSW (0x300), PPN, W in bit 2.
    golden(special(SpecialEntry::Migration { frame: 0x8020_1000, write: true }), 0, 0x2008_0704);
    golden(special(SpecialEntry::Migration { frame: 0x8020_1000, write: false }), 0, 0x2008_0700);
    golden(special(SpecialEntry::Migration { frame: 0x4000_0000, write: false }), 2, 0x1000_0300);
    decodes_to(0x2008_0702, 0, special(SpecialEntry::Migration { frame: 0x8020_1000, write: false }), 0x2008_0700);
    rejects_all(special(SpecialEntry::Migration { frame: 0x8020_1000, write: true }), 1);
    rejects_all(special(SpecialEntry::Migration { frame: 1 << 56, write: true }), 0);
}

#[test]
fn device_entries_golden() {
    // Class 1 (bit 62) device-private, class 2 (bit 63) device-exclusive:
    // W bit 1, owner 2..=17, frame number 18..=61.
    assert_eq!(MAX_OWNER, u16::MAX);
    assert_eq!(PHYS_ADDR_BITS, 56);
    golden(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: 5, write: true }), 0, 0x4000_0000_0004_0016);
    golden(
        special(SpecialEntry::DevicePrivate { frame: (1 << 56) - 0x1000, owner: MAX_OWNER, write: true }),
        0,
        0x7fff_ffff_ffff_fffe,
    );
    golden(special(SpecialEntry::DeviceExclusive { frame: 0x2000, owner: 1, write: false }), 0, 0x8000_0000_0008_0004);
    golden(
        special(SpecialEntry::DeviceExclusive { frame: 0x20_0000, owner: 0x8000, write: true }),
        1,
        0x8000_0000_0802_0002,
    );
    // Frame-number bits below a huge span are masked.
    decodes_to(
        0x8000_0000_0806_0002,
        1,
        special(SpecialEntry::DeviceExclusive { frame: 0x20_0000, owner: 0x8000, write: true }),
        0x8000_0000_0802_0002,
    );
    rejects_all(special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: 1, write: false }), 1);
    rejects_all(special(SpecialEntry::DeviceExclusive { frame: 1 << 56, owner: 1, write: false }), 0);
}

#[test]
fn other_golden() {
    // Class 0 with RSW 0, or class 3: the kernel's own, whole value.
    golden(special(SpecialEntry::Other(0xdead_0000)), 0, 0xdead_0000);
    golden(special(SpecialEntry::Other(0x3fff_ffff_ffff_fcfe)), 1, 0x3fff_ffff_ffff_fcfe);
    golden(special(SpecialEntry::Other(0xc000_0000_0000_0300)), 2, 0xc000_0000_0000_0300);
    // Valid bit, zero, and the other kinds' encodings are not Other.
    for raw in [0xdead_0001, 0, 0x100, 0x200, 0x2008_0300, 1 << 62, 1 << 63] {
        rejects_all(special(SpecialEntry::Other(raw)), 0);
    }
}

#[test]
fn software_entries_at_every_level() {
    let all = [
        special(SpecialEntry::Swap { offset: 7 }),
        special(SpecialEntry::Migration { frame: 0, write: true }),
        special(SpecialEntry::DevicePrivate { frame: 0, owner: 9, write: false }),
        special(SpecialEntry::DeviceExclusive { frame: 0, owner: 9, write: true }),
        special(SpecialEntry::Other(0xc00)),
        PteView::ProtNone { frame: 0, flags: R | U },
    ];
    for view in all {
        assert_eq!((0..5).map(|level| golden_any(view, level)).sum::<usize>(), 3 + 3 + 3 + 2 + 1, "{view:?}");
        rejects::<Sv39>(view, 3);
        rejects::<Sv48>(view, 4);
        rejects::<Sv57>(view, 5);
    }
    fn golden_any(view: PteView, level: usize) -> usize {
        [Sv39::encode(&view, level), Sv48::encode(&view, level), Sv57::encode(&view, level)]
            .into_iter()
            .filter_map(|raw| raw.ok())
            .map(|raw| assert_eq!(Sv57::decode(raw, level), view))
            .count()
    }
}

// ---------------------------------------------------------------- geometry

#[test]
fn geometry_constants() {
    fn check<F: PagingGeometry>(levels: usize, va_bits: u32) {
        assert_eq!((F::LEVELS, F::VA_BITS, F::PAGE_SHIFT, F::SIGN_EXTEND), (levels, va_bits, 12, true));
        for level in 0..levels {
            assert!(F::leaf_allowed(level), "level {level}");
            assert_eq!(F::level_shift(level), 12 + 9 * level as u32);
            assert_eq!(F::entries(level), 512);
        }
        assert_eq!(F::LEAF_LEVELS, (1 << levels) - 1);
    }
    check::<Sv39>(3, 39);
    check::<Sv48>(4, 48);
    check::<Sv57>(5, 57);
    // Index of each level: 9 bits from bit 12 + 9 * level.
    let va = (3u64 << 48) | (4 << 39) | (77 << 30) | (500 << 21) | (42 << 12) | 0x123;
    assert_eq!([0, 1, 2, 3, 4].map(|l| Sv57::index(va, l)), [42, 500, 77, 4, 3]);
}

#[test]
fn geometry_canonical() {
    for (va, sv39, sv48, sv57) in [
        (0u64, true, true, true),
        (0x0000_003f_ffff_ffff, true, true, true),
        (0x0000_0040_0000_0000, false, true, true),
        (0xffff_ffc0_0000_0000, true, true, true),
        (0xffff_ffbf_ffff_ffff, false, true, true),
        (0x0000_7fff_ffff_ffff, false, true, true),
        (0x0000_8000_0000_0000, false, false, true),
        (0xffff_8000_0000_0000, false, true, true),
        (0xffff_7fff_ffff_ffff, false, false, true),
        (0x00ff_ffff_ffff_ffff, false, false, true),
        (0x0100_0000_0000_0000, false, false, false),
        (0xff00_0000_0000_0000, false, false, true),
        (0xfeff_ffff_ffff_ffff, false, false, false),
        (0x8000_0000_0000_0000, false, false, false),
        (u64::MAX, true, true, true),
    ] {
        assert_eq!(Sv39::is_canonical(va), sv39, "Sv39 {va:#x}");
        assert_eq!(Sv48::is_canonical(va), sv48, "Sv48 {va:#x}");
        assert_eq!(Sv57::is_canonical(va), sv57, "Sv57 {va:#x}");
    }
}

// ---------------------------------------------------------------- properties

/// Flags a leaf can hold: R or X, no W without R.
fn leaf_flags() -> impl Strategy<Value = LeafFlags> {
    (0u16..128)
        .prop_map(LeafFlags::from_bits_truncate)
        .prop_filter("leaf R/W/X", |f| f.intersects(R | X) && (f.contains(R) || !f.contains(W)))
}

/// A physical address below 2^56 aligned to `1 << shift`.
fn frame(shift: u32) -> impl Strategy<Value = u64> {
    let top = 56 - shift;
    prop_oneof![Just(0u64), Just(((1u64 << top) - 1) << shift), (0u64..1 << top).prop_map(move |f| f << shift)]
}

/// Every valid view at `level` (all levels hold leaves and software entries).
fn valid_view(level: usize) -> BoxedStrategy<PteView> {
    let shift = 12 + 9 * level as u32;
    let owner = prop_oneof![Just(0u16), Just(MAX_OWNER), any::<u16>()];
    let mut options = vec![
        Just(PteView::Absent).boxed(),
        (frame(shift), leaf_flags()).prop_map(|(frame, flags)| leaf(frame, flags)).boxed(),
        (frame(shift), leaf_flags()).prop_map(|(frame, flags)| PteView::ProtNone { frame, flags }).boxed(),
        prop_oneof![Just(0u64), Just((1 << 52) - 1), 0u64..1 << 52]
            .prop_map(|offset| special(SpecialEntry::Swap { offset }))
            .boxed(),
        (frame(shift), any::<bool>())
            .prop_map(|(frame, write)| special(SpecialEntry::Migration { frame, write }))
            .boxed(),
        (frame(shift), owner.clone(), any::<bool>())
            .prop_map(|(frame, owner, write)| special(SpecialEntry::DevicePrivate { frame, owner, write }))
            .boxed(),
        (frame(shift), owner, any::<bool>())
            .prop_map(|(frame, owner, write)| special(SpecialEntry::DeviceExclusive { frame, owner, write }))
            .boxed(),
        // Other: class 3, or class 0 with RSW 0; V clear; not zero.
        (any::<u64>(), any::<bool>())
            .prop_map(|(raw, top)| if top { raw | 3 << 62 } else { raw & !(3 << 62) & !0x300 } & !1)
            .prop_filter("zero is Absent", |raw| *raw != 0)
            .prop_map(|raw| special(SpecialEntry::Other(raw)))
            .boxed(),
    ];
    if level > 0 {
        options.push(frame(12).prop_map(table).boxed());
    }
    proptest::strategy::Union::new(options).boxed()
}

fn level_and_view(levels: usize) -> impl Strategy<Value = (usize, PteView)> {
    (0..levels).prop_flat_map(|level| (Just(level), valid_view(level)))
}

fn round_trip<F: PteFormat>(level: usize, view: PteView) -> Result<(), TestCaseError> {
    let raw = F::encode(&view, level);
    prop_assert!(raw.is_ok(), "{:?} at level {} rejected: {:?}", view, level, raw);
    let raw = raw.unwrap();
    contract::encodes_back::<F>(view, level)?;
    // V exactly for tables and leaves.
    prop_assert_eq!(raw & 1 != 0, matches!(view, PteView::Table { .. } | PteView::Leaf { .. }));
    Ok(())
}

/// Raw values likely to reach every decode path: random words, and words with
/// bits 0..=9 random, the top ten bits (N, PBMT, reserved; the software
/// class) from a small set and the frame number aligned at random.
fn interesting_raw() -> impl Strategy<Value = u64> {
    // Bits 54..=63: none, PBMT NC/IO/3, N, one reserved bit, any.
    let top = prop_oneof![Just(0u64), Just(1 << 7), Just(2 << 7), Just(3 << 7), Just(1 << 9), Just(1), 0u64..1 << 10];
    // Clear the frame number's low 0, 9, 18, 27 or 36 bits (aligned superpages).
    let align = prop_oneof![Just(0u32), Just(9), Just(18), Just(27), Just(36)];
    prop_oneof![
        any::<u64>(),
        (top, any::<u64>(), align, 0u64..0x400).prop_map(|(top, pfn, align, low)| {
            top << 54 | (pfn & ((1 << 44) - 1) & !((1 << align) - 1)) << 10 | low
        }),
    ]
}

/// Contract item 8 (shared check), and for RISC-V: directories carry
/// exactly `DIRECTORY`, the opaque bits are exactly the ignored ones, and
/// the bits the MMU checks survive a re-encode.
fn stability<F: PteFormat>(raw: u64, level: usize) -> Result<(), TestCaseError> {
    contract::decodes_consistently::<F>(raw, level)?;
    let view = F::decode(raw, level);
    match view {
        PteView::Table { flags, .. } => prop_assert_eq!(flags, DIRECTORY),
        PteView::Invalid(_) => return Ok(()),
        _ => {}
    }
    let again = F::encode(&view, level).unwrap();
    let opaque = F::opaque_bits(raw, level);
    prop_assert_eq!(again & F::opaque_bits(again, level), 0, "{:#x} has opaque bits set", again);
    // Opaque bits are exactly the ignored ones: flipping one keeps the view
    // (or, for PBMT, may reach the reserved value 3), flipping any other bit
    // changes it.
    for bit in 0..64 {
        let flipped = F::decode(raw ^ 1 << bit, level);
        if opaque & 1 << bit != 0 {
            prop_assert!(
                flipped == view || (bit >= 61 && matches!(flipped, PteView::Invalid(_))),
                "{:#x}: opaque bit {} changes {:?} to {:?}",
                raw,
                bit,
                view,
                flipped
            );
        } else {
            prop_assert_ne!(flipped, view, "{:#x}: bit {} is ignored but not opaque", raw, bit);
        }
    }
    // The bits the MMU checks survive: V, R, W, X, U.
    if matches!(view, PteView::Leaf { .. } | PteView::Table { .. }) {
        prop_assert_eq!(again & 0x1f, raw & 0x1f, "{:#x} -> {:#x}", raw, again);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip_sv39((level, view) in level_and_view(3)) {
        round_trip::<Sv39>(level, view)?;
    }

    #[test]
    fn round_trip_sv48((level, view) in level_and_view(4)) {
        round_trip::<Sv48>(level, view)?;
        prop_assert_eq!(Sv48::encode(&view, level), Sv57::encode(&view, level));
    }

    #[test]
    fn round_trip_sv57((level, view) in level_and_view(5)) {
        round_trip::<Sv57>(level, view)?;
        if level < 3 {
            prop_assert_eq!(Sv39::encode(&view, level), Sv57::encode(&view, level));
        }
    }

    #[test]
    fn decode_encode_is_stable(raw in interesting_raw(), level in 0usize..5) {
        stability::<Sv57>(raw, level)?;
        if level < 4 {
            stability::<Sv48>(raw, level)?;
            prop_assert_eq!(Sv48::decode(raw, level), Sv57::decode(raw, level));
        }
        if level < 3 {
            stability::<Sv39>(raw, level)?;
            prop_assert_eq!(Sv39::decode(raw, level), Sv57::decode(raw, level));
        }
    }

    #[test]
    fn nonzero_past_root_is_invalid(raw in 1u64.., extra in 0usize..2) {
        prop_assert_eq!(Sv39::decode(raw, 3 + extra), PteView::Invalid(raw));
        prop_assert_eq!(Sv48::decode(raw, 4 + extra), PteView::Invalid(raw));
        prop_assert_eq!(Sv57::decode(raw, 5), PteView::Invalid(raw));
    }

    /// `user_page` agrees with `decode` at level 0 (PteFormat contract,
    /// item 6): a READ | USER leaf, its frame, and WRITE; IO pages (PBMT 2)
    /// are left to `decode`.
    #[test]
    fn user_page_agrees_with_decode(raw in interesting_raw(), bit in 0u32..64) {
        fn check<F: PteFormat>(raw: u64) -> Result<(), TestCaseError> {
            // IO pages (PBMT = 2, bit 62) are left to decode.
            let want = F::decode(raw, 0).user_frame().filter(|_| raw & 1 << 62 == 0);
            prop_assert_eq!(F::user_page(raw), want, "raw {:#x}", raw);
            Ok(())
        }
        // Random words are rarely valid user leaves: force V, R, U on, then
        // flip one more bit.
        for raw in [raw, raw | 0x13, (raw | 0x13) ^ (1 << bit), (raw | 0x13) & !(0x7f << 54 | 1 << 63)] {
            check::<Sv39>(raw)?;
            check::<Sv48>(raw)?;
            check::<Sv57>(raw)?;
        }
    }

    /// Contract item 7: `directory()` links any 4 KiB frame below 2^56 at
    /// every level above 0, as V and the PPN alone.
    #[test]
    fn directory_is_a_plain_table(pfn in 0u64..1 << 44) {
        let frame = pfn << 12;
        for level in 1..5 {
            let want = Ok(pfn << 10 | 1);
            if level < 3 {
                prop_assert_eq!(Sv39::directory(frame, level), want);
            }
            if level < 4 {
                prop_assert_eq!(Sv48::directory(frame, level), want);
            }
            prop_assert_eq!(Sv57::directory(frame, level), want);
            prop_assert_eq!(Sv57::decode(pfn << 10 | 1, level), table(frame));
        }
    }

    /// Canonical iff bits VA_BITS - 1 ..= 63 are all equal.
    #[test]
    fn canonical_is_sign_extension(va in any::<u64>(), top in 0u32..3) {
        let va = match top { 0 => va, 1 => va | 0xff << 56, _ => va & !(0xff << 56) };
        for (ok, va_bits) in [(Sv39::is_canonical(va), 39), (Sv48::is_canonical(va), 48), (Sv57::is_canonical(va), 57)] {
            let high = va >> (va_bits - 1);
            prop_assert_eq!(ok, high == 0 || high == (1u64 << (65 - va_bits)) - 1, "{:#x} Sv{}", va, va_bits);
        }
    }
}

// ---------------------------------------------------------------- through the walker

/// An execute-only user page (X and U without R) is not a page a device may
/// read: a snapshot reports it as an error, while the readable pages next to
/// it are valid, the ordinary one through `user_page`, the IO one through
/// the full decode (and the same for a megapage, the huge-leaf path).
#[test]
fn execute_only_user_page_is_an_error_in_a_snapshot_io_page_is_not() {
    use hmm_core::pt::{snapshot, Pfn};
    use hmm_core::VaRange;
    let phys = hmm_testkit::SimPhys::with_base(0x1000, 8 * 4096);
    let (root, mid, leaves) = (0x1000, 0x2000, 0x3000);
    let va = 0x20_4020_3000u64; // in the lower (user) half of Sv39
    let slot = |table: u64, level: usize| table + Sv39::index(va, level) as u64 * 8;
    phys.write_u64(slot(root, 2), Sv39::directory(mid, 2).unwrap());
    phys.write_u64(slot(mid, 1), Sv39::directory(leaves, 1).unwrap());
    const V: u64 = 1;
    const R: u64 = 1 << 1;
    const X: u64 = 1 << 3;
    const U: u64 = 1 << 4;
    const A: u64 = 1 << 6;
    let exec_only = V | X | U | A | (0x8_0000 << 10);
    let readable = V | R | X | U | A | (0x8_0001 << 10);
    // An IO (PBMT = 2) user page: `user_page` leaves it to the full decode,
    // which must still report it valid.
    let io = V | R | U | A | (2 << 61) | (0x8_0002 << 10);
    phys.write_u64(slot(leaves, 0), exec_only);
    phys.write_u64(slot(leaves, 0) + 8, readable);
    phys.write_u64(slot(leaves, 0) + 16, io);
    assert_eq!(Sv39::user_page(io), None);
    assert_eq!(
        Sv39::decode(exec_only, 0),
        PteView::Leaf { frame: 0x8000_0000, flags: LeafFlags::EXEC | LeafFlags::USER | LeafFlags::ACCESSED }
    );
    let mut out = [Pfn::NONE; 3];
    let range = VaRange::new::<Sv39>(va, 3 * 4096).unwrap();
    // SAFETY: `root` is a live Sv39 root in `phys`, nothing changes it.
    unsafe { snapshot::<Sv39, _>(&phys, root, range, &mut out) }.unwrap();
    assert_eq!(out, [Pfn::ERROR_ENTRY, Pfn::valid(0x8000_1000, false, 0), Pfn::valid(0x8000_2000, false, 0)]);
    // The same for an execute-only megapage, which takes the huge-leaf path.
    let mega = (va & !0x1f_ffff) + 0x20_0000;
    phys.write_u64(mid + Sv39::index(mega, 1) as u64 * 8, V | X | U | A | (0x8_0200 << 10));
    let mut out = [Pfn::NONE; 1];
    // SAFETY: as above.
    unsafe { snapshot::<Sv39, _>(&phys, root, VaRange::new::<Sv39>(mega + 0x5000, 4096).unwrap(), &mut out) }.unwrap();
    assert_eq!(out, [Pfn::ERROR_ENTRY]);
}
