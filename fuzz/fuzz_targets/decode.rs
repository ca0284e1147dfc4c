//! Page-table entry decoding and encoding, and range validation, on arbitrary
//! input: nothing may panic, and the `PteFormat` contract must hold.
//!
//! For every raw entry and level (including levels past the paging mode), in
//! every CPU format (x86_64 4/5-level, aarch64 48/52-bit, RISC-V
//! Sv39/Sv48/Sv57): `decode` obeys the contract (Absent only for 0, Table
//! only above level 0, Leaf only at leaf levels with an aligned frame), a
//! decoded view that is not Invalid encodes again to the raw value up to its
//! opaque bits, and `user_page` never says more than `decode`. Arbitrary
//! views that encode must decode to themselves. The same holds for the software
//! device format (`SoftFormat`) over the x86_64 4-level geometry and over a
//! 6-level one, and every `DeviceFormat` decodes a directory entry the same
//! with or without the mirror's live count in its count bits. `VaRange`
//! constructors never panic and what they accept is valid for their geometry.
#![no_main]

use arbitrary::Arbitrary;
use hmm_core::arch::aarch64::{Aarch64Va48, Aarch64Va52};
use hmm_core::arch::riscv64::{Sv39, Sv48, Sv57};
use hmm_core::arch::soft::SoftFormat;
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{DeviceFormat, LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry, MAX_LEVELS};
use hmm_core::pt::Pfn;
use hmm_core::{Error, VaRange};
use libfuzzer_sys::fuzz_target;

/// A device geometry unlike the CPU's: six levels over 57 bits, not
/// sign-extended, with a 2-entry root.
struct Six57;
impl PagingGeometry for Six57 {
    const LEVELS: usize = 6;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9, 9, 9, 9, 8, 1];
    const VA_BITS: u32 = 57;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b111;
}

type Soft4 = SoftFormat<X86_64Level4>;
type Soft6 = SoftFormat<Six57>;

#[derive(Arbitrary, Debug)]
enum ViewSeed {
    Absent,
    Table { frame: u64, flags: u16 },
    Leaf { frame: u64, flags: u16 },
    ProtNone { frame: u64, flags: u16 },
    Swap { offset: u64 },
    Migration { frame: u64, write: bool },
    DevicePrivate { frame: u64, owner: u16, write: bool },
    DeviceExclusive { frame: u64, owner: u16, write: bool },
    Other { raw: u64 },
    Invalid { raw: u64 },
}

impl ViewSeed {
    fn view(&self) -> PteView {
        let f = |bits: u16| LeafFlags::from_bits_truncate(bits);
        match *self {
            ViewSeed::Absent => PteView::Absent,
            ViewSeed::Table { frame, flags } => PteView::Table { frame, flags: f(flags) },
            ViewSeed::Leaf { frame, flags } => PteView::Leaf { frame, flags: f(flags) },
            ViewSeed::ProtNone { frame, flags } => PteView::ProtNone { frame, flags: f(flags) },
            ViewSeed::Swap { offset } => PteView::Special(SpecialEntry::Swap { offset }),
            ViewSeed::Migration { frame, write } => PteView::Special(SpecialEntry::Migration { frame, write }),
            ViewSeed::DevicePrivate { frame, owner, write } => {
                PteView::Special(SpecialEntry::DevicePrivate { frame, owner, write })
            }
            ViewSeed::DeviceExclusive { frame, owner, write } => {
                PteView::Special(SpecialEntry::DeviceExclusive { frame, owner, write })
            }
            ViewSeed::Other { raw } => PteView::Special(SpecialEntry::Other(raw)),
            ViewSeed::Invalid { raw } => PteView::Invalid(raw),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    raws: Vec<(u64, u8)>,
    views: Vec<(ViewSeed, u8)>,
    ranges: Vec<(u64, u64)>,
}

/// The `PteFormat` contract for one raw entry at one level.
fn check_raw<F: PteFormat>(raw: u64, level: usize) {
    let g_levels = <F::Geometry as PagingGeometry>::LEVELS;
    let v = F::decode(raw, level);
    assert_eq!(v, F::decode(raw, level), "decode is pure");
    match v {
        PteView::Absent => assert_eq!(raw, 0, "only 0 is Absent"),
        PteView::Table { frame, .. } => {
            assert!(level > 0 && level < g_levels, "Table at level {level}: {raw:#x}");
            assert_eq!(frame & 0xfff, 0, "table frame aligned");
        }
        PteView::Leaf { frame, flags } => {
            assert!(<F::Geometry as PagingGeometry>::leaf_allowed(level), "Leaf at level {level}: {raw:#x}");
            let span = 1u64 << <F::Geometry as PagingGeometry>::level_shift(level);
            assert_eq!(frame % span, 0, "leaf frame aligned to its level: {raw:#x} at {level}");
            let _ = flags;
        }
        _ => {}
    }
    if raw == 0 {
        assert_eq!(v, PteView::Absent);
    }
    if let Ok(again) = F::encode(&v, level) {
        assert_eq!(F::decode(again, level), v, "round trip of {raw:#x} at {level} via {again:#x}");
    }
    // Contract item 8: decode-then-encode keeps every bit but the opaque ones.
    if level < g_levels && !matches!(v, PteView::Invalid(_)) {
        let again = F::encode(&v, level).unwrap_or_else(|e| panic!("{raw:#x} -> {v:?} does not encode: {e:?}"));
        let opaque = F::opaque_bits(raw, level);
        assert_eq!((again ^ raw) & !opaque, 0, "{raw:#x} -> {v:?} -> {again:#x} (opaque {opaque:#x})");
    }
    if level == 0 {
        // `None` always means "decode it" (contract item 6); `Some` must be right.
        if let Some(got) = F::user_page(raw) {
            assert_eq!(Some(got), v.user_frame(), "user_page({raw:#x})");
        }
    }
}

/// Every CPU format the crate ships.
macro_rules! for_each_cpu_format {
    ($check:ident($($arg:expr),*)) => {
        $check::<X86_64Level4>($($arg),*);
        $check::<X86_64Level5>($($arg),*);
        $check::<Aarch64Va48>($($arg),*);
        $check::<Aarch64Va52>($($arg),*);
        $check::<Sv39>($($arg),*);
        $check::<Sv48>($($arg),*);
        $check::<Sv57>($($arg),*);
    };
}

/// Contract item 4 for an arbitrary view.
fn check_view<F: PteFormat>(view: &PteView, level: usize) {
    if let Ok(raw) = F::encode(view, level) {
        assert_eq!(F::decode(raw, level), *view, "encode({view:?}, {level}) = {raw:#x} does not decode back");
    }
    if *view == PteView::Absent && level < <F::Geometry as PagingGeometry>::LEVELS {
        assert_eq!(F::encode(view, level), Ok(0));
    }
}

/// `DeviceFormat` contract item 3: the mirror's live count in a directory
/// entry's count bits changes nothing a walker decodes.
fn check_count_bits<F: DeviceFormat>(raw: u64, level: usize) {
    let Some(shift) = F::COUNT_SHIFT else { return };
    let v = F::decode(raw, level);
    if let PteView::Table { .. } = v {
        let bits = 0x3ffu64 << shift;
        assert_eq!(F::decode(raw & !bits, level), v, "count bits of {raw:#x} change the directory at {level}");
        assert_eq!(F::decode(raw | bits, level), v, "count bits of {raw:#x} change the directory at {level}");
    }
    if let Ok(dir) = F::encode(&PteView::Table { frame: raw & 0x000f_ffff_ffff_f000, flags: F::DIRECTORY }, level) {
        assert_eq!(dir & (0x3ffu64 << shift), 0, "a directory encodes with count bits set: {dir:#x}");
    }
}

fn check_range<G: PagingGeometry>(start: u64, len: u64) {
    match VaRange::new::<G>(start, len) {
        Ok(r) => {
            assert_eq!(r.start(), start);
            assert_eq!(r.last(), start + (len - 1));
            assert_eq!(r.check::<G>(), Ok(()));
            assert_eq!(r.pages(G::PAGE_SHIFT), ((len - 1) >> G::PAGE_SHIFT) + 1);
            assert!(G::is_canonical(r.start()) && G::is_canonical(r.last()));
            assert!(r.contains(&r) && r.overlaps(&r) && r.intersect(&r) == Some(r));
            assert_eq!(VaRange::from_bounds::<G>(start, start.wrapping_add(len)).ok(), r.end().map(|_| r));
        }
        Err(e) => {
            // The documented order of checks.
            let mask = (1u64 << G::PAGE_SHIFT) - 1;
            let first = if len == 0 {
                Some(Error::Empty)
            } else if (start | len) & mask != 0 {
                Some(Error::Unaligned)
            } else if start.checked_add(len - 1).is_none() {
                Some(Error::Wrapping)
            } else {
                None
            };
            match first {
                Some(want) => assert_eq!(e, want, "VaRange::new({start:#x}, {len:#x})"),
                None => assert!(matches!(e, Error::NonCanonical | Error::OutOfRange), "{e:?}"),
            }
        }
    }
    let _ = VaRange::from_bounds::<G>(start, len);
}

fuzz_target!(|input: Input| {
    for &(raw, level) in input.raws.iter().take(64) {
        let level = (level % 8) as usize;
        for_each_cpu_format!(check_raw(raw, level));
        check_raw::<Soft4>(raw, level);
        check_raw::<Soft6>(raw, level);
        check_count_bits::<X86_64Level4>(raw, level);
        check_count_bits::<Soft4>(raw, level);
        check_count_bits::<Soft6>(raw, level);
        let _ = Pfn(raw).phys() + Pfn(raw).order() as u64;
    }
    for (seed, level) in input.views.iter().take(64) {
        let level = (*level % 8) as usize;
        let view = seed.view();
        for_each_cpu_format!(check_view(&view, level));
        check_view::<Soft4>(&view, level);
        check_view::<Soft6>(&view, level);
    }
    for &(start, len) in input.ranges.iter().take(64) {
        check_range::<X86_64Level4>(start, len);
        check_range::<X86_64Level5>(start, len);
        check_range::<Aarch64Va48>(start, len);
        check_range::<Sv39>(start, len);
        if let (Ok(a), Ok(b)) = (VaRange::new::<X86_64Level5>(start, len), VaRange::new::<X86_64Level4>(len, start)) {
            let _ =
                (a.intersect(&b), a.overlaps(&b), a.contains(&b), b.check::<X86_64Level5>(), a.check::<X86_64Level4>());
        }
    }
});
