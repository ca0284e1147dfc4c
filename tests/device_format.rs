//! The device formats: golden encodings of the software format
//! (`SoftFormat`, src/arch/soft.rs, whose module doc has the table), its
//! round trip over levels and flags (property tests, 4-level x86_64 and a
//! 6-level geometry), what it refuses, and the `DeviceFormat` contract items
//! (directories encode with the count bits clear and decode ignoring them;
//! leaves encode with READ | USER plus any of WRITE / ACCESSED / DIRTY at
//! every allowed level) for `SoftFormat` and x86_64.

mod common;

use common::geometries::{L4Pages, Six48, Six57};
use hmm_core::arch::soft::SoftFormat;
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{DeviceFormat, LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use hmm_core::Error;
use proptest::prelude::*;

type S4 = SoftFormat<X86_64Level4>;
type S6 = SoftFormat<Six57>;
type SP = SoftFormat<L4Pages>;
type S64 = SoftFormat<Six48>;

const R: LeafFlags = LeafFlags::READ;
const U: LeafFlags = LeafFlags::USER;
const W: LeafFlags = LeafFlags::WRITE;
const A: LeafFlags = LeafFlags::ACCESSED;
const D: LeafFlags = LeafFlags::DIRTY;
const X: LeafFlags = LeafFlags::EXEC;
const RU: LeafFlags = R.union(U);
/// What the software format's directories grant.
const DIR: LeafFlags = R.union(W).union(U);
/// Bits 12..=51.
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const COUNT_BITS: u64 = 0x3ff << 52;

fn leaf(frame: u64, flags: LeafFlags) -> PteView {
    PteView::Leaf { frame, flags }
}
fn table(frame: u64) -> PteView {
    PteView::Table { frame, flags: DIR }
}

/// `encode(view, level) == raw` and `decode(raw, level) == view` in the
/// 4-level and the 6-level software format.
#[track_caller]
fn golden(view: PteView, level: usize, raw: u64) {
    assert_eq!(S4::encode(&view, level), Ok(raw), "S4 encode {view:?} at level {level}");
    assert_eq!(S4::decode(raw, level), view, "S4 decode {raw:#x} at level {level}");
    assert_eq!(S6::encode(&view, level), Ok(raw), "S6 encode {view:?} at level {level}");
    assert_eq!(S6::decode(raw, level), view, "S6 decode {raw:#x} at level {level}");
}

#[track_caller]
fn rejects<F: PteFormat>(view: PteView, level: usize) {
    assert_eq!(F::encode(&view, level), Err(Error::Unencodable), "{view:?} at level {level} must be unencodable");
}

// ------------------------------------------------------------------ golden

#[test]
fn absent_is_zero() {
    for level in 0..4 {
        golden(PteView::Absent, level, 0);
    }
    for level in 4..6 {
        assert_eq!(S6::encode(&PteView::Absent, level), Ok(0));
        assert_eq!(S6::decode(0, level), PteView::Absent);
    }
}

#[test]
fn directory_golden() {
    // VALID | frame, nothing else.
    for level in 1..4 {
        golden(table(0x5000), level, 0x5001);
        golden(table(0x0000_0001_2345_6000), level, 0x0000_0001_2345_6001);
    }
    golden(table(ADDR), 3, 0x000f_ffff_ffff_f001);
    // The 6-level format has directories at levels 4 and 5 too.
    for level in 4..6 {
        assert_eq!(S6::encode(&table(0x7000), level), Ok(0x7001));
        assert_eq!(S6::decode(0x7001, level), table(0x7000));
    }
}

#[test]
fn leaf_golden() {
    // Level 0: VALID, WRITE 1, DIRTY 2, ACCESSED 4; no LEAF bit.
    golden(leaf(0x1234_5000, RU), 0, 0x1234_5001);
    golden(leaf(0x1234_5000, RU | W), 0, 0x1234_5003);
    golden(leaf(0x1234_5000, RU | D), 0, 0x1234_5005);
    golden(leaf(0x1234_5000, RU | A), 0, 0x1234_5011);
    golden(leaf(0x1234_5000, RU | W | D | A), 0, 0x1234_5017);
    golden(leaf(ADDR, RU), 0, 0x000f_ffff_ffff_f001);
    // Level 1 (2 MiB): LEAF bit 3.
    golden(leaf(0x4020_0000, RU), 1, 0x4020_0009);
    golden(leaf(0x4020_0000, RU | W), 1, 0x4020_000b);
    golden(leaf(0x4020_0000, RU | W | A | D), 1, 0x4020_001f);
    golden(leaf(0x000f_ffff_ffe0_0000, RU | A), 1, 0x000f_ffff_ffe0_0019);
    // Level 2 (1 GiB).
    golden(leaf(0x4000_0000, RU), 2, 0x4000_0009);
    golden(leaf(0x000f_ffff_c000_0000, RU | W | D), 2, 0x000f_ffff_c000_000f);
}

#[test]
fn directory_count_bits_are_ignored_on_decode() {
    for level in 1..4 {
        for count in [1u64, 2, 37, 511, 512, 1023] {
            let raw = (count << 52) | 0x0000_0001_2345_6000 | 1;
            assert_eq!(S4::decode(raw, level), table(0x0000_0001_2345_6000), "count {count} at level {level}");
            assert_eq!(S6::decode(raw, level), table(0x0000_0001_2345_6000));
        }
    }
    assert_eq!(S6::decode(COUNT_BITS | 0x9001, 5), table(0x9000));
}

#[test]
fn malformed_entries_decode_as_invalid() {
    // Not VALID but nonzero.
    for raw in [0x5000u64, 0x2, 0x8, COUNT_BITS] {
        for level in 0..4 {
            assert_eq!(S4::decode(raw, level), PteView::Invalid(raw), "{raw:#x} at level {level}");
        }
    }
    // A huge leaf at the root (x86_64 geometry: leaves at levels 0-2).
    assert_eq!(S4::decode(0x0000_0080_0000_0009, 3), PteView::Invalid(0x0000_0080_0000_0009));
    // Huge leaves where the geometry allows only 4 KiB ones.
    assert_eq!(SP::decode(0x4020_0009, 1), PteView::Invalid(0x4020_0009));
    assert_eq!(SP::decode(0x4000_0009, 2), PteView::Invalid(0x4000_0009));
    // Past the root.
    assert_eq!(S4::decode(0x5001, 4), PteView::Invalid(0x5001));
    assert_eq!(S6::decode(0x5001, 6), PteView::Invalid(0x5001));
    // ... but still a directory in the 6-level format at level 4.
    assert_eq!(S6::decode(0x5001, 4), table(0x5000));
}

#[test]
fn a_huge_leaf_decodes_to_its_aligned_frame() {
    assert_eq!(S4::decode(0x4020_1009, 1), leaf(0x4020_0000, RU));
    assert_eq!(S4::decode(0x4012_3009, 2), leaf(0x4000_0000, RU));
    // The 16 MiB leaves of the 64-entry geometry (level 2).
    assert_eq!(S64::decode(0x4123_4009, 2), leaf(0x4100_0000, RU));
    assert_eq!(S64::decode(0x4123_4009, 1), leaf(0x4120_0000, RU), "256 KiB at level 1");
}

// ---------------------------------------------------------------- refusals

#[test]
fn refuses_what_the_format_cannot_express() {
    fn all<F: PteFormat>() {
        // Leaf flags: no EXEC, no GLOBAL, READ and USER required, no unknown bits.
        rejects::<F>(leaf(0x1000, RU | X), 0);
        rejects::<F>(leaf(0x1000, RU | W | X), 0);
        rejects::<F>(leaf(0x1000, RU | LeafFlags::GLOBAL), 0);
        rejects::<F>(leaf(0x1000, R), 0);
        rejects::<F>(leaf(0x1000, U | W), 0);
        rejects::<F>(leaf(0x1000, LeafFlags::empty()), 0);
        rejects::<F>(leaf(0x1000, LeafFlags::from_bits_retain(0x8000) | RU), 0);
        // Frames: 4 KiB aligned, below 2^52.
        rejects::<F>(leaf(0x1800, RU), 0);
        rejects::<F>(leaf(0x1008, RU), 0);
        rejects::<F>(leaf(1 << 52, RU), 0);
        rejects::<F>(leaf(!0xfff, RU), 0);
        rejects::<F>(table(0x5800), 1);
        rejects::<F>(table(1 << 52), 1);
        // Directories: above level 0, exactly the directory flags.
        rejects::<F>(table(0x5000), 0);
        rejects::<F>(PteView::Table { frame: 0x5000, flags: RU }, 1);
        rejects::<F>(PteView::Table { frame: 0x5000, flags: DIR | X }, 1);
        rejects::<F>(PteView::Table { frame: 0x5000, flags: DIR | A }, 2);
        // Nothing but Absent, Table and Leaf.
        for level in 0..3 {
            rejects::<F>(PteView::ProtNone { frame: 0x1000 << (9 * level), flags: RU }, level);
            rejects::<F>(PteView::ProtNone { frame: 0x1000 << (9 * level), flags: RU | W }, level);
            for s in [
                SpecialEntry::Swap { offset: 1 },
                SpecialEntry::Migration { frame: 0x1000, write: true },
                SpecialEntry::DevicePrivate { frame: 0x1000, owner: 1, write: false },
                SpecialEntry::DeviceExclusive { frame: 0x1000, owner: 1, write: true },
                SpecialEntry::Other(0x200),
            ] {
                rejects::<F>(PteView::Special(s), level);
            }
            rejects::<F>(PteView::Invalid(0x5), level);
            rejects::<F>(PteView::Invalid(0), level);
        }
    }
    all::<S4>();
    all::<S6>();
    all::<SP>();
    all::<S64>();
    // Huge frames aligned to their level's span.
    rejects::<S4>(leaf(0x4020_1000, RU), 1);
    rejects::<S4>(leaf(0x4020_0000, RU), 2);
    rejects::<S64>(leaf(0x4020_0000, RU), 2);
    rejects::<S64>(leaf(0x4002_0000, RU), 1);
    // Leaves at levels the geometry does not allow.
    rejects::<S4>(leaf(0x0000_0080_0000_0000, RU), 3);
    rejects::<S6>(leaf(0x0000_0080_0000_0000, RU), 3);
    rejects::<S6>(leaf(0, RU), 5);
    rejects::<SP>(leaf(0x4020_0000, RU), 1);
    rejects::<SP>(leaf(0x4000_0000, RU), 2);
    // Past the root.
    rejects::<S4>(table(0x5000), 4);
    rejects::<S4>(leaf(0x1000, RU), 4);
    rejects::<S6>(table(0x5000), 6);
}

// --------------------------------------------------- DeviceFormat contract

#[test]
fn device_format_constants() {
    assert_eq!(<S4 as PteFormat>::DIRECTORY, DIR);
    assert_eq!(<S6 as PteFormat>::DIRECTORY, DIR);
    assert_eq!(<S4 as DeviceFormat>::COUNT_SHIFT, Some(52));
    assert_eq!(<X86_64Level4 as PteFormat>::DIRECTORY, DIR | X);
    assert_eq!(<X86_64Level4 as DeviceFormat>::COUNT_SHIFT, Some(52));
    assert_eq!(<X86_64Level5 as DeviceFormat>::COUNT_SHIFT, Some(52));
    // x86_64 directories the mirror writes: P | W | U, NX clear.
    for level in 1..4 {
        assert_eq!(X86_64Level4::encode(&PteView::Table { frame: 0x5000, flags: DIR | X }, level), Ok(0x5007));
    }
    // x86_64 device leaves: P | U, NX (never executable), W / A / D as asked,
    // PS above level 0.
    let nx = 1u64 << 63;
    assert_eq!(X86_64Level4::encode(&leaf(0x1234_5000, RU), 0), Ok(nx | 0x1234_5005));
    assert_eq!(X86_64Level4::encode(&leaf(0x1234_5000, RU | W), 0), Ok(nx | 0x1234_5007));
    assert_eq!(X86_64Level4::encode(&leaf(0x4020_0000, RU | W | A | D), 1), Ok(nx | 0x4020_00e7));
    assert_eq!(X86_64Level4::encode(&leaf(0x4000_0000, RU), 2), Ok(nx | 0x4000_0085));
}

/// Items 1-3 of the `DeviceFormat` contract at one level, for one frame.
fn check_device_contract<F: DeviceFormat>(frame: u64, level: usize, count: u64) -> Result<(), TestCaseError> {
    type G<F> = <F as PteFormat>::Geometry;
    prop_assert!(level < G::<F>::LEVELS);
    let frame = frame & ADDR;
    if level >= 1 {
        let view = PteView::Table { frame, flags: F::DIRECTORY };
        let raw = F::encode(&view, level);
        prop_assert!(raw.is_ok(), "directory {:?} at level {} refused", view, level);
        let raw = raw.unwrap();
        prop_assert_eq!(F::decode(raw, level), view);
        if let Some(shift) = F::COUNT_SHIFT {
            let bits = 0x3ffu64 << shift;
            prop_assert_eq!(raw & bits, 0, "count bits set in {:#x}", raw);
            prop_assert_eq!(F::decode(raw | ((count & 0x3ff) << shift), level), view, "count {} not ignored", count);
        }
    }
    if G::<F>::leaf_allowed(level) {
        let span = 1u64 << G::<F>::level_shift(level);
        let frame = frame & !(span - 1);
        for extra in 0..8u16 {
            let mut flags = RU;
            flags.set(W, extra & 1 != 0);
            flags.set(A, extra & 2 != 0);
            flags.set(D, extra & 4 != 0);
            let view = leaf(frame, flags);
            let raw = F::encode(&view, level);
            prop_assert!(raw.is_ok(), "leaf {:?} at level {} refused", view, level);
            prop_assert_eq!(F::decode(raw.unwrap(), level), view);
        }
    }
    Ok(())
}

#[test]
fn device_contract_at_the_edges() {
    fn edges<F: DeviceFormat>() {
        for level in 0..<F::Geometry as PagingGeometry>::LEVELS {
            for frame in [0u64, 0x1000, 0x4000_0000, ADDR] {
                check_device_contract::<F>(frame, level, 1023).unwrap();
            }
        }
    }
    edges::<S4>();
    edges::<S6>();
    edges::<SP>();
    edges::<S64>();
    edges::<X86_64Level4>();
    edges::<X86_64Level5>();
}

// ----------------------------------------------------------- property tests

/// A level of geometry `G` and a view the software format must encode there:
/// a directory (above level 0) or a leaf at an allowed level, with an
/// aligned frame below 2^52 and READ | USER plus any of WRITE, ACCESSED, DIRTY.
fn encodable<G: PagingGeometry + 'static>() -> impl Strategy<Value = (usize, PteView)> {
    (0..G::LEVELS, any::<u64>(), any::<bool>(), 0u16..8).prop_filter_map(
        "no view of that kind at that level",
        |(level, frame, want_table, extra)| {
            if want_table && level > 0 {
                return Some((level, table(frame & ADDR)));
            }
            if !G::leaf_allowed(level) {
                return None;
            }
            let span = 1u64 << G::level_shift(level);
            let mut flags = RU;
            flags.set(W, extra & 1 != 0);
            flags.set(A, extra & 2 != 0);
            flags.set(D, extra & 4 != 0);
            Some((level, leaf(frame & ADDR & !(span - 1), flags)))
        },
    )
}

/// Encode then decode is the identity, and the raw value has the layout of
/// the module doc's table.
fn check_round_trip<G: PagingGeometry>(level: usize, view: PteView) -> Result<(), TestCaseError> {
    let raw = SoftFormat::<G>::encode(&view, level);
    prop_assert!(raw.is_ok(), "{:?} at level {} refused", view, level);
    let raw = raw.unwrap();
    prop_assert_eq!(SoftFormat::<G>::decode(raw, level), view);
    prop_assert_eq!(raw & 1, 1, "VALID");
    prop_assert_eq!(raw >> 52, 0, "bits 52.. clear in {:#x}", raw);
    prop_assert_eq!(raw & 0xfe0, 0, "bits 5..=11 clear in {:#x}", raw);
    match view {
        PteView::Table { frame, .. } => prop_assert_eq!(raw, frame | 1),
        PteView::Leaf { frame, flags } => {
            prop_assert_eq!(raw & ADDR, frame);
            prop_assert_eq!(raw & 2 != 0, flags.contains(W));
            prop_assert_eq!(raw & 4 != 0, flags.contains(D));
            prop_assert_eq!(raw & 8 != 0, level > 0, "LEAF bit exactly for huge leaves");
            prop_assert_eq!(raw & 16 != 0, flags.contains(A));
        }
        other => prop_assert!(false, "unexpected view {:?}", other),
    }
    Ok(())
}

/// Whether the software format over `G` can encode `view` at `level`.
fn soft_encodable<G: PagingGeometry>(view: &PteView, level: usize) -> bool {
    if level >= G::LEVELS {
        return false;
    }
    match *view {
        PteView::Absent => true,
        PteView::Table { frame, flags } => level > 0 && flags == DIR && frame & !ADDR == 0,
        PteView::Leaf { frame, flags } => {
            let span = 1u64 << G::level_shift(level);
            G::leaf_allowed(level)
                && frame & !ADDR == 0
                && frame & (span - 1) == 0
                && flags.contains(RU)
                && (RU | W | A | D).contains(flags)
        }
        _ => false,
    }
}

fn any_view() -> impl Strategy<Value = PteView> {
    // Frames mostly aligned (so that the flag checks decide), sometimes not.
    let frame = prop_oneof![
        3 => any::<u64>().prop_map(|f| f & ADDR & !0x1f_ffff),
        2 => any::<u64>().prop_map(|f| f & ADDR),
        1 => any::<u64>(),
    ];
    let flags = prop_oneof![
        3 => (0u16..8).prop_map(|e| {
            let mut f = RU;
            f.set(W, e & 1 != 0);
            f.set(A, e & 2 != 0);
            f.set(D, e & 4 != 0);
            f
        }),
        2 => any::<u16>().prop_map(|b| LeafFlags::from_bits_truncate(b & 0x7f)),
        1 => any::<u16>().prop_map(LeafFlags::from_bits_retain),
        1 => Just(DIR),
    ];
    prop_oneof![
        1 => Just(PteView::Absent),
        3 => (frame.clone(), flags.clone()).prop_map(|(frame, flags)| PteView::Table { frame, flags }),
        4 => (frame.clone(), flags.clone()).prop_map(|(frame, flags)| PteView::Leaf { frame, flags }),
        1 => (frame.clone(), flags).prop_map(|(frame, flags)| PteView::ProtNone { frame, flags }),
        1 => frame.clone().prop_map(|frame| PteView::Special(SpecialEntry::Migration { frame, write: true })),
        1 => any::<u64>().prop_map(|offset| PteView::Special(SpecialEntry::Swap { offset })),
        1 => any::<u64>().prop_map(PteView::Invalid),
    ]
}

/// `encode` succeeds exactly for the encodable views (then round-trips) and
/// refuses the rest with `Unencodable`.
fn check_spec<G: PagingGeometry>(view: &PteView, level: usize) -> Result<(), TestCaseError> {
    let got = SoftFormat::<G>::encode(view, level);
    if soft_encodable::<G>(view, level) {
        prop_assert!(got.is_ok(), "{:?} at level {} refused", view, level);
        prop_assert_eq!(SoftFormat::<G>::decode(got.unwrap(), level), *view);
    } else {
        prop_assert_eq!(got, Err(Error::Unencodable), "{:?} at level {} accepted", view, level);
    }
    Ok(())
}

/// The `PteFormat` contract for one raw entry: what decode may return, and
/// that decode -> encode -> decode is stable; directories ignore the count
/// bits.
fn check_decode<G: PagingGeometry>(raw: u64, level: usize) -> Result<(), TestCaseError> {
    let v = SoftFormat::<G>::decode(raw, level);
    prop_assert_eq!(v == PteView::Absent, raw == 0);
    match v {
        PteView::Table { frame, flags } => {
            prop_assert!(level > 0 && level < G::LEVELS);
            prop_assert_eq!(flags, DIR);
            prop_assert_eq!(frame, raw & ADDR);
            prop_assert_eq!(SoftFormat::<G>::decode(raw ^ (raw & COUNT_BITS), level), v, "count bits matter");
        }
        PteView::Leaf { frame, flags } => {
            prop_assert!(G::leaf_allowed(level) && level < G::LEVELS);
            prop_assert_eq!(frame & ((1u64 << G::level_shift(level)) - 1), 0);
            prop_assert!(flags.contains(RU) && (RU | W | A | D).contains(flags));
            prop_assert_eq!(flags.contains(W), raw & 2 != 0);
        }
        PteView::Invalid(r) => prop_assert_eq!(r, raw),
        PteView::Absent => {}
        other => prop_assert!(false, "the software format decoded {:#x} to {:?}", raw, other),
    }
    if let Ok(again) = SoftFormat::<G>::encode(&v, level) {
        prop_assert_eq!(SoftFormat::<G>::decode(again, level), v);
    } else {
        // Only malformed entries, and nothing past the root, fail to encode.
        let past_root = v == PteView::Absent && level >= G::LEVELS;
        prop_assert!(matches!(v, PteView::Invalid(_)) || past_root, "decoded view {:?} does not encode", v);
    }
    Ok(())
}

fn interesting_raw() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => any::<u64>(),
        2 => any::<u64>().prop_map(|r| r & (ADDR | 0x1f) | 1),
        1 => any::<u64>().prop_map(|r| r & (ADDR | COUNT_BITS) | 1),
        1 => (0u64..32).prop_map(|r| r | 0x4020_0000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn round_trip_4_level((level, view) in encodable::<X86_64Level4>()) {
        check_round_trip::<X86_64Level4>(level, view)?;
    }

    #[test]
    fn round_trip_6_level((level, view) in encodable::<Six57>()) {
        check_round_trip::<Six57>(level, view)?;
    }

    #[test]
    fn round_trip_narrow_6_level((level, view) in encodable::<Six48>()) {
        check_round_trip::<Six48>(level, view)?;
    }

    #[test]
    fn round_trip_4k_only((level, view) in encodable::<L4Pages>()) {
        check_round_trip::<L4Pages>(level, view)?;
    }

    #[test]
    fn encode_accepts_exactly_the_encodable_views(view in any_view(), level in 0usize..8) {
        check_spec::<X86_64Level4>(&view, level)?;
        check_spec::<Six57>(&view, level)?;
        check_spec::<Six48>(&view, level)?;
        check_spec::<L4Pages>(&view, level)?;
    }

    #[test]
    fn decode_obeys_the_contract(raw in interesting_raw(), level in 0usize..8) {
        check_decode::<X86_64Level4>(raw, level)?;
        check_decode::<Six57>(raw, level)?;
        check_decode::<Six48>(raw, level)?;
        check_decode::<L4Pages>(raw, level)?;
    }

    #[test]
    fn device_contract_holds(frame in any::<u64>(), level in 0usize..6, count in 1u64..1024) {
        if level < 4 {
            check_device_contract::<S4>(frame, level, count)?;
            check_device_contract::<SP>(frame, level, count)?;
            check_device_contract::<X86_64Level4>(frame, level, count)?;
        }
        if level < 5 {
            check_device_contract::<X86_64Level5>(frame, level, count)?;
        }
        check_device_contract::<S6>(frame, level, count)?;
        check_device_contract::<S64>(frame, level, count)?;
    }
}

proptest! {
    /// `page_leaf`, the fault path's shortcut, equals encoding the page
    /// leaf (DeviceFormat contract, item 4) for every shipped format.
    #[test]
    fn page_leaf_agrees_with_encode(frame in 0u64..(1 << 40), write in any::<bool>()) {
        fn check<F: DeviceFormat>(frame: u64, write: bool) -> Result<(), TestCaseError> {
            let mut flags = LeafFlags::READ | LeafFlags::USER;
            flags.set(LeafFlags::WRITE, write);
            let want = F::encode(&PteView::Leaf { frame, flags }, 0).unwrap();
            prop_assert_eq!(F::page_leaf(frame, write), want, "frame {:#x} write {}", frame, write);
            Ok(())
        }
        let frame = frame << 12;
        check::<X86_64Level4>(frame, write)?;
        check::<X86_64Level5>(frame, write)?;
        check::<SoftFormat<X86_64Level4>>(frame, write)?;
        check::<SoftFormat<L4Pages>>(frame, write)?;
        check::<SoftFormat<Six48>>(frame, write)?;
        check::<SoftFormat<Six57>>(frame, write)?;
    }
}
