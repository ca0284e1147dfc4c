//! The `PteFormat` contract, checked the same way for every format the crate
//! ships: encode-then-decode and decode-then-encode (with the format's
//! opaque bits), the portable directory entry, `user_page` against `decode`,
//! absent entries and the rejection of malformed ones. Each format's golden
//! encodings from its architecture manual live in its own test file.

mod encoding_kit;

use encoding_kit::contract::*;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use proptest::prelude::*;

/// Raw values worth decoding: uniform noise, sparse words (a few bits set,
/// the shape of real entries) and real encodings with noise in their opaque
/// bits.
fn raw_words<F: PteFormat>() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        proptest::collection::vec(0u32..64, 1..8).prop_map(|bits| bits.iter().fold(0u64, |w, b| w | 1 << b)),
        (views(), 0..F::Geometry::LEVELS, any::<u64>()).prop_filter_map("unencodable", |(v, level, noise)| {
            let raw = F::encode(&v, level).ok()?;
            Some(raw | (noise & F::opaque_bits(raw, level)))
        }),
    ]
}

fn flags() -> impl Strategy<Value = LeafFlags> {
    any::<u16>().prop_map(LeafFlags::from_bits_truncate)
}

/// Frames anywhere in a 52-bit physical space, often aligned to a large
/// span so huge leaves are exercised.
fn frames() -> impl Strategy<Value = u64> {
    (any::<u64>(), 12u32..40).prop_map(|(f, align)| f & ((1 << 52) - 1) & !((1u64 << align) - 1))
}

fn views() -> impl Strategy<Value = PteView> {
    prop_oneof![
        Just(PteView::Absent),
        (frames(), flags()).prop_map(|(frame, flags)| PteView::Table { frame, flags }),
        (frames(), flags()).prop_map(|(frame, flags)| PteView::Leaf { frame, flags }),
        (frames(), flags()).prop_map(|(frame, flags)| PteView::ProtNone { frame, flags }),
        any::<u64>().prop_map(|offset| PteView::Special(SpecialEntry::Swap { offset: offset >> (offset % 64) })),
        (frames(), any::<bool>()).prop_map(|(frame, write)| PteView::Special(SpecialEntry::Migration { frame, write })),
        (frames(), any::<u16>(), any::<bool>())
            .prop_map(|(frame, owner, write)| PteView::Special(SpecialEntry::DevicePrivate { frame, owner, write })),
        (frames(), any::<u16>(), any::<bool>())
            .prop_map(|(frame, owner, write)| PteView::Special(SpecialEntry::DeviceExclusive { frame, owner, write })),
        any::<u64>().prop_map(|raw| PteView::Special(SpecialEntry::Other(raw))),
    ]
}

/// Items 1 and 8's rejection half, exhaustively over the levels.
fn fixed_points<F: PteFormat>() {
    for level in 0..F::Geometry::LEVELS {
        assert_eq!(F::decode(0, level), PteView::Absent, "level {level}");
        assert_eq!(F::encode(&PteView::Absent, level), Ok(0), "level {level}");
        assert!(F::encode(&PteView::Invalid(1), level).is_err(), "level {level}");
    }
    assert!(F::DIRECTORY.contains(LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER));
}

macro_rules! contract {
    ($name:ident, $format:ty) => {
        mod $name {
            use super::*;
            type F = $format;

            #[test]
            fn absent_and_invalid() {
                fixed_points::<F>();
            }

            proptest! {
                #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

                #[test]
                fn encode_then_decode_round_trips(view in views(), level in 0..<F as PteFormat>::Geometry::LEVELS) {
                    encodes_back::<F>(view, level)?;
                }

                #[test]
                fn decode_then_encode_keeps_all_but_opaque_bits(raw in raw_words::<F>(), level in 0..<F as PteFormat>::Geometry::LEVELS) {
                    decodes_consistently::<F>(raw, level)?;
                }

                #[test]
                fn user_page_agrees_with_decode(raw in raw_words::<F>()) {
                    user_page_sound::<F>(raw)?;
                }

                #[test]
                fn user_page_takes_every_ordinary_page(frame in any::<u64>(), extra in flags()) {
                    user_page_takes_ordinary::<F>(frame, extra)?;
                }

                #[test]
                fn directory_decodes_as_plain_table(frame in any::<u64>()) {
                    directory_links::<F>(frame)?;
                }
            }
        }
    };
}

contract!(x86_64_level4, hmm_core::arch::x86_64::X86_64Level4);
contract!(x86_64_level5, hmm_core::arch::x86_64::X86_64Level5);
contract!(soft_level4, hmm_core::arch::soft::SoftFormat<hmm_core::arch::x86_64::X86_64Level4>);
contract!(sv39, hmm_core::arch::riscv64::Sv39);
contract!(sv48, hmm_core::arch::riscv64::Sv48);
contract!(sv57, hmm_core::arch::riscv64::Sv57);
contract!(aarch64_va48, hmm_core::arch::aarch64::Aarch64Va48);
contract!(aarch64_va52, hmm_core::arch::aarch64::Aarch64Va52);
