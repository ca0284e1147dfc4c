//! x86_64 paging: 4-level (48-bit) and 5-level (LA57, 57-bit) tables with
//! 4 KiB, 2 MiB and 1 GiB leaves.
//!
//! # Software encodings
//! Present entries follow the hardware. Non-present entries (bit 0 clear)
//! carry a *kind* in the available bits 9..=11, which hardware ignores:
//!
//! | kind | meaning | payload |
//! |---|---|---|
//! | 0, 6, 7 | kernel-defined, not interpreted | whole raw value ([`SpecialEntry::Other`]) |
//! | 1 | PROT_NONE | present layout with P clear: frame 12..=51, W 1, U 2, A 5, D 6, huge 7 (set at levels 1-2, else malformed), G 8, NX 63 |
//! | 2 | swap | offset in bits 12..=62 |
//! | 3 | migration | frame 12..=51, W 1 |
//! | 4 | device-private | device frame 12..=51, owner 52..=62, W 1 |
//! | 5 | device-exclusive | frame 12..=51, owner 52..=62, W 1 |
//!
//! Directory entries are encoded with their permission bits (W, U, NX) so a
//! kernel's restrictive directory limits every leaf below, as on hardware.
//! PAT/PCD/PWT cache bits are ignored on decode and never set on encode.

use super::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry, MAX_LEVELS};
use crate::{Error, Result};
use static_assertions::const_assert;
use x86_64::structures::paging::PageTableFlags as Hw;

/// x86_64 paging; `LA57 = false` is 4-level, `true` is 5-level.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct X86_64<const LA57: bool>;

/// 4-level paging (48-bit virtual addresses).
pub type X86_64Level4 = X86_64<false>;
/// 5-level paging (57-bit virtual addresses).
pub type X86_64Level5 = X86_64<true>;

impl<const LA57: bool> PagingGeometry for X86_64<LA57> {
    const LEVELS: usize = if LA57 { 5 } else { 4 };
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = if LA57 { 57 } else { 48 };
    const SIGN_EXTEND: bool = true;
    const LEAF_LEVELS: u32 = 0b111;
}

const_assert!(super::check_geometry(4, 12, [9; 6], 48, 0b111));
const_assert!(super::check_geometry(5, 12, [9; 6], 57, 0b111));
const_assert!(core::mem::size_of::<u64>() * 512 == 4096);

/// Bits 12..=51: the physical frame.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const KIND_SHIFT: u32 = 9;
const KIND_MASK: u64 = 0b111 << KIND_SHIFT;
const KIND_PROT_NONE: u64 = 1;
const KIND_SWAP: u64 = 2;
const KIND_MIGRATION: u64 = 3;
const KIND_DEVICE_PRIVATE: u64 = 4;
const KIND_DEVICE_EXCLUSIVE: u64 = 5;
const OWNER_SHIFT: u32 = 52;
/// Largest owner id that fits bits 52..=62.
pub const MAX_OWNER: u16 = (1 << 11) - 1;
/// Width of a swap offset (bits 12..=62 of the entry).
pub const SWAP_OFFSET_BITS: u32 = 51;
const SWAP_MASK: u64 = ((1u64 << SWAP_OFFSET_BITS) - 1) << 12;

const P: u64 = Hw::PRESENT.bits();
const W: u64 = Hw::WRITABLE.bits();
const U: u64 = Hw::USER_ACCESSIBLE.bits();
const A: u64 = Hw::ACCESSED.bits();
const D: u64 = Hw::DIRTY.bits();
const HUGE: u64 = Hw::HUGE_PAGE.bits();
const G: u64 = Hw::GLOBAL.bits();
const NX: u64 = Hw::NO_EXECUTE.bits();

#[inline]
fn span_mask(level: usize) -> u64 {
    (1u64 << X86_64Level4::level_shift(level)) - 1
}

/// Hardware permission/status bits -> neutral flags (READ always set).
#[inline]
fn flags_from_raw(raw: u64) -> LeafFlags {
    let mut f = LeafFlags::READ;
    f.set(LeafFlags::WRITE, raw & W != 0);
    f.set(LeafFlags::USER, raw & U != 0);
    f.set(LeafFlags::EXEC, raw & NX == 0);
    f.set(LeafFlags::ACCESSED, raw & A != 0);
    f.set(LeafFlags::DIRTY, raw & D != 0);
    f.set(LeafFlags::GLOBAL, raw & G != 0);
    f
}

fn flags_to_raw(f: LeafFlags) -> Result<u64> {
    // x86_64 cannot express a present but unreadable page: use ProtNone.
    // Unknown bits would be dropped by decode, breaking the round trip.
    if !f.contains(LeafFlags::READ) || !LeafFlags::all().contains(f) {
        return Err(Error::Unencodable);
    }
    let mut raw = 0;
    for (flag, bit) in [
        (LeafFlags::WRITE, W),
        (LeafFlags::USER, U),
        (LeafFlags::ACCESSED, A),
        (LeafFlags::DIRTY, D),
        (LeafFlags::GLOBAL, G),
    ] {
        if f.contains(flag) {
            raw |= bit;
        }
    }
    if !f.contains(LeafFlags::EXEC) {
        raw |= NX;
    }
    Ok(raw)
}

fn frame_checked(frame: u64, level: usize) -> Result<u64> {
    if frame & !ADDR_MASK != 0 || frame & span_mask(level) != 0 {
        return Err(Error::Unencodable);
    }
    Ok(frame)
}

#[inline]
fn leaf_level(level: usize) -> bool {
    level < 3
}

/// Huge bit for a leaf at `level` (levels 1 and 2 only).
fn huge_bit(level: usize) -> u64 {
    if level > 0 {
        HUGE
    } else {
        0
    }
}

#[inline(always)]
fn decode_present(raw: u64, level: usize, levels: usize) -> PteView {
    if level >= levels {
        return PteView::Invalid(raw);
    }
    let is_leaf = level == 0 || raw & HUGE != 0;
    if !is_leaf {
        // Directory: A/D/G are ignored by hardware for permission purposes.
        let flags = flags_from_raw(raw)
            & (LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER | LeafFlags::EXEC | LeafFlags::ACCESSED);
        return PteView::Table { frame: raw & ADDR_MASK, flags };
    }
    if !leaf_level(level) {
        return PteView::Invalid(raw);
    }
    PteView::Leaf { frame: raw & ADDR_MASK & !span_mask(level), flags: flags_from_raw(raw) }
}

#[inline]
fn decode_special(raw: u64, level: usize) -> PteView {
    if !leaf_level(level) {
        return PteView::Invalid(raw);
    }
    // Frames of huge special entries name the whole span, as encode requires.
    let frame = raw & ADDR_MASK & !span_mask(level);
    let write = raw & W != 0;
    let owner = ((raw >> OWNER_SHIFT) & MAX_OWNER as u64) as u16;
    match (raw & KIND_MASK) >> KIND_SHIFT {
        // A huge PROT_NONE entry keeps its huge bit, as encode writes it.
        KIND_PROT_NONE if level > 0 && raw & HUGE == 0 => PteView::Invalid(raw),
        KIND_PROT_NONE => PteView::ProtNone { frame, flags: flags_from_raw(raw) },
        KIND_SWAP => PteView::Special(SpecialEntry::Swap { offset: (raw & SWAP_MASK) >> 12 }),
        KIND_MIGRATION => PteView::Special(SpecialEntry::Migration { frame, write }),
        KIND_DEVICE_PRIVATE => PteView::Special(SpecialEntry::DevicePrivate { frame, owner, write }),
        KIND_DEVICE_EXCLUSIVE => PteView::Special(SpecialEntry::DeviceExclusive { frame, owner, write }),
        _ => PteView::Special(SpecialEntry::Other(raw)),
    }
}

fn kind(k: u64) -> u64 {
    k << KIND_SHIFT
}

fn encode_owner(owner: u16) -> Result<u64> {
    if owner > MAX_OWNER {
        return Err(Error::Unencodable);
    }
    Ok((owner as u64) << OWNER_SHIFT)
}

fn encode_special(s: &SpecialEntry, level: usize) -> Result<u64> {
    let w = |write: bool| if write { W } else { 0 };
    Ok(match *s {
        SpecialEntry::Swap { offset } => {
            if offset >> SWAP_OFFSET_BITS != 0 {
                return Err(Error::Unencodable);
            }
            kind(KIND_SWAP) | (offset << 12)
        }
        SpecialEntry::Migration { frame, write } => kind(KIND_MIGRATION) | frame_checked(frame, level)? | w(write),
        SpecialEntry::DevicePrivate { frame, owner, write } => {
            // Device frames live in the device's own space: alignment to the
            // level is still required so a huge entry names one frame.
            kind(KIND_DEVICE_PRIVATE) | frame_checked(frame, level)? | encode_owner(owner)? | w(write)
        }
        SpecialEntry::DeviceExclusive { frame, owner, write } => {
            kind(KIND_DEVICE_EXCLUSIVE) | frame_checked(frame, level)? | encode_owner(owner)? | w(write)
        }
        SpecialEntry::Other(raw) => {
            let k = (raw & KIND_MASK) >> KIND_SHIFT;
            if raw == 0 || raw & P != 0 || (KIND_PROT_NONE..=KIND_DEVICE_EXCLUSIVE).contains(&k) {
                return Err(Error::Unencodable);
            }
            raw
        }
    })
}

// SAFETY: decode follows the hardware for present entries (tables only above
// level 0 and without the huge bit, leaves only at levels 0-2 with the frame
// masked to the level's span, READ always set since x86_64 has no unreadable
// present entry, permissions read from the same bits the MMU reads);
// non-present entries are never Table or Leaf; 0 decodes to Absent; encode
// produces exactly the bits decode reads back (tests/x86_64_encoding.rs checks
// the round trip for every variant and level), and both are pure.
// `user_page` accepts exactly the present, user level-0 entries, which
// decode reads as USER leaves (proptest in tests/x86_64_encoding.rs).
unsafe impl<const LA57: bool> PteFormat for X86_64<LA57> {
    type Geometry = Self;
    const DIRECTORY: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::EXEC);

    #[inline(always)]
    fn decode(raw: u64, level: usize) -> PteView {
        if raw == 0 {
            PteView::Absent
        } else if raw & P != 0 {
            decode_present(raw, level, Self::LEVELS)
        } else if level >= Self::LEVELS {
            PteView::Invalid(raw)
        } else {
            decode_special(raw, level)
        }
    }

    /// Present and user: a 4 KiB leaf (bit 7 at level 0 is PAT, not huge).
    #[inline]
    fn user_page(raw: u64) -> Option<(u64, bool)> {
        (raw & (P | U) == P | U).then_some((raw & ADDR_MASK, raw & W != 0))
    }

    fn opaque_bits(raw: u64, level: usize) -> u64 {
        if raw == 0 || level >= Self::LEVELS {
            return 0;
        }
        let frame = ADDR_MASK & !span_mask(level);
        let read = if raw & P != 0 {
            if level > 0 && raw & HUGE == 0 {
                P | HUGE | W | U | NX | A | ADDR_MASK
            } else if leaf_level(level) {
                P | huge_bit(level) | W | U | A | D | G | NX | frame
            } else {
                return 0;
            }
        } else if !leaf_level(level) {
            return 0;
        } else {
            match (raw & KIND_MASK) >> KIND_SHIFT {
                KIND_PROT_NONE => KIND_MASK | huge_bit(level) | W | U | A | D | G | NX | frame,
                KIND_SWAP => KIND_MASK | SWAP_MASK,
                KIND_MIGRATION => KIND_MASK | frame | W,
                KIND_DEVICE_PRIVATE | KIND_DEVICE_EXCLUSIVE => {
                    KIND_MASK | frame | W | ((MAX_OWNER as u64) << OWNER_SHIFT)
                }
                _ => return 0,
            }
        };
        !read & !P
    }

    /// Stores are seen in order by every x86_64 agent (TSO, coherent DMA
    /// and IOMMU walks): only the compiler must not sink them.
    #[inline]
    fn publish_table_writes() {
        #[cfg(target_arch = "x86_64")]
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        #[cfg(not(target_arch = "x86_64"))]
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }

    fn encode(view: &PteView, level: usize) -> Result<u64> {
        if level >= Self::LEVELS {
            return Err(Error::Unencodable);
        }
        match view {
            PteView::Absent => Ok(0),
            PteView::Table { frame, flags } => {
                if level == 0 || flags.intersects(LeafFlags::DIRTY | LeafFlags::GLOBAL) {
                    return Err(Error::Unencodable);
                }
                Ok(P | frame_checked(*frame, 0)? | flags_to_raw(*flags)?)
            }
            PteView::Leaf { frame, flags } => {
                if !leaf_level(level) {
                    return Err(Error::Unencodable);
                }
                Ok(P | huge_bit(level) | frame_checked(*frame, level)? | flags_to_raw(*flags)?)
            }
            PteView::ProtNone { frame, flags } => {
                if !leaf_level(level) {
                    return Err(Error::Unencodable);
                }
                Ok(kind(KIND_PROT_NONE) | huge_bit(level) | frame_checked(*frame, level)? | flags_to_raw(*flags)?)
            }
            PteView::Special(s) => {
                if !leaf_level(level) {
                    return Err(Error::Unencodable);
                }
                encode_special(s, level)
            }
            // Malformed entries are never produced on purpose.
            PteView::Invalid(_) => Err(Error::Unencodable),
        }
    }
}

// SAFETY: directories encode with P | frame | W | U (NX clear) for
// `DIRECTORY`; bits 52..=61 of a directory entry are ignored by the MMU
// (and by an IOMMU using first-level x86_64 tables) and masked off by
// `decode_present`; leaves with READ | USER plus WRITE / ACCESSED / DIRTY
// encode at levels 0-2 for aligned frames below 2^52.
unsafe impl<const LA57: bool> super::DeviceFormat for X86_64<LA57> {
    const COUNT_SHIFT: Option<u32> = Some(52);

    /// Present, user, no-execute (devices never execute), W if writable.
    #[inline]
    fn page_leaf(frame: u64, write: bool) -> u64 {
        P | U | NX | frame | if write { W } else { 0 }
    }
}
