//! What the per-architecture golden encoding tests share: short names for the
//! leaf flags and the view constructors, and the "golden" and "rejects"
//! checks for one format.
#![allow(dead_code)]

pub mod contract;

use hmm_core::arch::{LeafFlags, PteFormat, PteView, SpecialEntry};
use hmm_core::Error;

pub const R: LeafFlags = LeafFlags::READ;
pub const W: LeafFlags = LeafFlags::WRITE;
pub const RW: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE);
pub const X: LeafFlags = LeafFlags::EXEC;
pub const U: LeafFlags = LeafFlags::USER;
pub const A: LeafFlags = LeafFlags::ACCESSED;
pub const D: LeafFlags = LeafFlags::DIRTY;
pub const G: LeafFlags = LeafFlags::GLOBAL;

pub fn leaf(frame: u64, flags: LeafFlags) -> PteView {
    PteView::Leaf { frame, flags }
}
pub fn table(frame: u64, flags: LeafFlags) -> PteView {
    PteView::Table { frame, flags }
}
pub fn prot_none(frame: u64, flags: LeafFlags) -> PteView {
    PteView::ProtNone { frame, flags }
}
pub fn special(s: SpecialEntry) -> PteView {
    PteView::Special(s)
}

/// `encode(view) == raw` and `decode(raw) == view` in format `F`.
#[track_caller]
pub fn golden_in<F: PteFormat>(view: PteView, level: usize, raw: u64) {
    let name = core::any::type_name::<F>();
    assert_eq!(F::encode(&view, level), Ok(raw), "{name} encode {view:?} at level {level}");
    assert_eq!(F::decode(raw, level), view, "{name} decode {raw:#x} at level {level}");
}

/// `view` does not encode at `level` in format `F`.
#[track_caller]
pub fn rejects<F: PteFormat>(view: PteView, level: usize) {
    let name = core::any::type_name::<F>();
    assert_eq!(
        F::encode(&view, level),
        Err(Error::Unencodable),
        "{name}: {view:?} at level {level} must be unencodable"
    );
}
