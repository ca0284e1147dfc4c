//! The software device format: what a device model (or a device whose MMU
//! hmm-core's authors define) walks, over any geometry `G`.
//!
//! | bits | directory entry | leaf entry |
//! |---|---|---|
//! | 0 | VALID | VALID |
//! | 1 | 0 | WRITE |
//! | 2 | 0 | DIRTY (the device wrote) |
//! | 3 | 0 | LEAF (at levels above 0: a huge leaf) |
//! | 4 | 0 | ACCESSED |
//! | 12..=51 | next table | frame, aligned to the level's span |
//! | 52..=61 | live entries below (kept by the mirror, ignored by walkers) | 0 |
//!
//! Every leaf is readable and user-accessible (a device mirrors user pages
//! only); PROT_NONE and software entries are not encodable.

use super::{DeviceFormat, LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::{Error, Result};
use core::marker::PhantomData;

/// The software device format over geometry `G`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoftFormat<G>(PhantomData<fn() -> G>);

const VALID: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const DIRTY: u64 = 1 << 2;
const LEAF: u64 = 1 << 3;
const ACCESSED: u64 = 1 << 4;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const COUNT_SHIFT: u32 = 52;
/// What a leaf always grants.
const LEAF_BASE: LeafFlags = LeafFlags::READ.union(LeafFlags::USER);
/// What a leaf may add.
const LEAF_EXTRA: LeafFlags = LeafFlags::WRITE.union(LeafFlags::ACCESSED).union(LeafFlags::DIRTY);
const DIRECTORY: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER);

fn span_mask<G: PagingGeometry>(level: usize) -> u64 {
    (1u64 << G::level_shift(level)) - 1
}

// SAFETY: `decode` returns Table only above level 0 (LEAF clear), Leaf only
// at levels `G` allows, with the frame masked to the level's span; 0 decodes
// to Absent and encodes from it; `encode` produces exactly the bits `decode`
// reads back and refuses everything else (tests/device_format.rs checks the
// round trip); both are pure.
unsafe impl<G: PagingGeometry> PteFormat for SoftFormat<G> {
    type Geometry = G;
    const DIRECTORY: LeafFlags = DIRECTORY;

    fn opaque_bits(raw: u64, level: usize) -> u64 {
        let read = match Self::decode(raw, level) {
            PteView::Table { .. } => VALID | LEAF | ADDR_MASK,
            PteView::Leaf { .. } => {
                let leaf = if level > 0 { LEAF } else { 0 };
                VALID | WRITE | DIRTY | ACCESSED | leaf | (ADDR_MASK & !span_mask::<G>(level))
            }
            _ => return 0,
        };
        !read
    }

    #[inline]
    fn decode(raw: u64, level: usize) -> PteView {
        if raw == 0 {
            return PteView::Absent;
        }
        if raw & VALID == 0 || level >= G::LEVELS {
            return PteView::Invalid(raw);
        }
        if level > 0 && raw & LEAF == 0 {
            return PteView::Table { frame: raw & ADDR_MASK, flags: DIRECTORY };
        }
        if !G::leaf_allowed(level) {
            return PteView::Invalid(raw);
        }
        let mut flags = LEAF_BASE;
        flags.set(LeafFlags::WRITE, raw & WRITE != 0);
        flags.set(LeafFlags::DIRTY, raw & DIRTY != 0);
        flags.set(LeafFlags::ACCESSED, raw & ACCESSED != 0);
        PteView::Leaf { frame: raw & ADDR_MASK & !span_mask::<G>(level), flags }
    }

    #[inline]
    fn encode(view: &PteView, level: usize) -> Result<u64> {
        if level >= G::LEVELS {
            return Err(Error::Unencodable);
        }
        let frame_ok = |frame: u64, mask: u64| frame & !ADDR_MASK == 0 && frame & mask == 0;
        match *view {
            PteView::Absent => Ok(0),
            PteView::Table { frame, flags } if level > 0 && flags == DIRECTORY && frame_ok(frame, 0xfff) => {
                Ok(VALID | frame)
            }
            PteView::Leaf { frame, flags }
                if G::leaf_allowed(level)
                    && frame_ok(frame, span_mask::<G>(level))
                    && flags.contains(LEAF_BASE)
                    && (LEAF_BASE | LEAF_EXTRA).contains(flags) =>
            {
                let mut raw = VALID | frame | if level > 0 { LEAF } else { 0 };
                for (flag, bit) in
                    [(LeafFlags::WRITE, WRITE), (LeafFlags::DIRTY, DIRTY), (LeafFlags::ACCESSED, ACCESSED)]
                {
                    if flags.contains(flag) {
                        raw |= bit;
                    }
                }
                Ok(raw)
            }
            _ => Err(Error::Unencodable),
        }
    }
}

// SAFETY: directories encode to VALID | frame (bits 52..=61 clear), which
// `decode` reads back ignoring bits 52..=61; leaves of every allowed level
// and the required flags encode (see `encode`).
unsafe impl<G: PagingGeometry> DeviceFormat for SoftFormat<G> {
    const COUNT_SHIFT: Option<u32> = Some(COUNT_SHIFT);

    #[inline]
    fn page_leaf(frame: u64, write: bool) -> u64 {
        VALID | frame | if write { WRITE } else { 0 }
    }
}
