//! The `PteFormat` contract as property checks, shared by
//! `tests/format_contract.rs` (every format, generic inputs) and the
//! per-architecture encoding tests (their own, sharper inputs).

use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::Error;
use proptest::prelude::*;

/// Item 4, and what `encode` leaves out: an encoding decodes to its view and
/// carries no opaque bit. Views that do not encode pass.
pub fn encodes_back<F: PteFormat>(view: PteView, level: usize) -> Result<(), TestCaseError> {
    if let Ok(raw) = F::encode(&view, level) {
        prop_assert_eq!(F::decode(raw, level), view, "{:#x} at level {}", raw, level);
        prop_assert_eq!(raw & F::opaque_bits(raw, level), 0, "encode set opaque bits of {:#x}", raw);
        prop_assert_eq!(raw == 0, view == PteView::Absent);
    }
    Ok(())
}

/// Items 1-3 and 8 for an arbitrary raw word: Absent only for 0, tables
/// above level 0, leaves aligned where leaves are allowed; decode then
/// encode gives the raw word back up to its opaque bits, and malformed
/// entries are refused.
pub fn decodes_consistently<F: PteFormat>(raw: u64, level: usize) -> Result<(), TestCaseError> {
    type G<F> = <F as PteFormat>::Geometry;
    let view = F::decode(raw, level);
    prop_assert_eq!(raw == 0, view == PteView::Absent, "Absent iff zero: {:#x}", raw);
    match view {
        PteView::Table { .. } => {
            prop_assert!(level > 0 && level < G::<F>::LEVELS, "Table at {} from {:#x}", level, raw)
        }
        PteView::Leaf { frame, .. } => {
            prop_assert!(G::<F>::leaf_allowed(level), "Leaf at {} from {:#x}", level, raw);
            prop_assert_eq!(frame & ((1 << G::<F>::level_shift(level)) - 1), 0, "unaligned leaf from {:#x}", raw);
        }
        PteView::Invalid(r) => {
            prop_assert_eq!(r, raw);
            prop_assert_eq!(F::encode(&view, level), Err(Error::Unencodable), "{:?} re-encoded", view);
            return Ok(());
        }
        _ => {}
    }
    if level >= G::<F>::LEVELS {
        return Ok(());
    }
    let again = F::encode(&view, level);
    prop_assert!(again.is_ok(), "decode({:#x}, {}) = {:?} does not encode", raw, level, view);
    let again = again.unwrap();
    let opaque = F::opaque_bits(raw, level);
    prop_assert_eq!((again ^ raw) & !opaque, 0, "{:#x} -> {:?} -> {:#x} (opaque {:#x})", raw, view, again, opaque);
    prop_assert_eq!(F::decode(again, level), view, "{:#x} -> {:?} -> {:#x}", raw, view, again);
    Ok(())
}

/// Item 6, first half: the walk's shortcut never says more than the full
/// decode (`None` always means "decode it").
pub fn user_page_sound<F: PteFormat>(raw: u64) -> Result<(), TestCaseError> {
    if let Some(got) = F::user_page(raw) {
        prop_assert_eq!(Some(got), F::decode(raw, 0).user_frame(), "raw {:#x}", raw);
    }
    Ok(())
}

/// Item 6, second half: every ordinary user page (READ | USER plus any of
/// WRITE, EXEC, ACCESSED, DIRTY, GLOBAL, frame below 2^48) that the format
/// encodes takes the shortcut.
pub fn user_page_takes_ordinary<F: PteFormat>(frame: u64, extra: LeafFlags) -> Result<(), TestCaseError> {
    let frame = frame & ((1 << 48) - 1) & !0xfff;
    let ordinary = LeafFlags::WRITE | LeafFlags::EXEC | LeafFlags::ACCESSED | LeafFlags::DIRTY | LeafFlags::GLOBAL;
    let flags = LeafFlags::READ | LeafFlags::USER | (extra & ordinary);
    // A device format need not encode EXEC or GLOBAL; what encodes counts.
    let Ok(raw) = F::encode(&PteView::Leaf { frame, flags }, 0) else { return Ok(()) };
    prop_assert_eq!(F::user_page(raw), Some((frame, flags.contains(LeafFlags::WRITE))), "raw {:#x}", raw);
    Ok(())
}

/// Item 7: the portable directory entry links any 4 KiB frame below 2^48
/// at every level that has tables, and nowhere else.
pub fn directory_links<F: PteFormat>(frame: u64) -> Result<(), TestCaseError> {
    let frame = frame & ((1 << 48) - 1) & !0xfff;
    let levels = <F::Geometry as PagingGeometry>::LEVELS;
    for level in 1..levels {
        let raw = F::directory(frame, level);
        prop_assert!(raw.is_ok(), "directory({:#x}, {}) refused", frame, level);
        prop_assert_eq!(F::decode(raw.unwrap(), level), PteView::Table { frame, flags: F::DIRECTORY });
    }
    prop_assert!(F::directory(frame, 0).is_err() && F::directory(frame, levels).is_err());
    Ok(())
}
