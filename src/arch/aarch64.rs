//! AArch64 (VMSAv8-64) stage-1 tables with the 4 KiB granule: 48-bit
//! (4 levels) and FEAT_LPA2 52-bit (`TCR_ELx.DS = 1`, 5 levels) formats, with
//! 4 KiB pages and 2 MiB / 1 GiB blocks.
//!
//! Our level `l` is Arm level `3 - l`: level 0 holds pages, levels 1 and 2
//! blocks, level 3 (Arm level 0) only tables, and the 52-bit root (Arm level
//! -1, 16 entries) only tables. A 512 GiB block that LPA2 hardware accepts at
//! Arm level 0 decodes as [`PteView::Invalid`] (conservative: never mapped).
//!
//! # Address space
//! The format describes a `TTBR0_EL1` (low-half, user) table: valid addresses
//! are `0 .. 2^VA_BITS`, [`PagingGeometry::SIGN_EXTEND`] is false. A `TTBR1`
//! table translates `2^64 - 2^VA_BITS ..` (top bits all ones) and is not
//! canonical here: unlike x86_64, bit 47 (51) does not pick the half, bit 55
//! (or the top byte with TBI) picks the TTBR, so a sign-extension rule would
//! call `0x0000_8000_0000_0000` valid where TTBR0 faults.
//!
//! # Valid entries
//! Hardware layout. Output address: bits 12..=47 (48-bit); bits 12..=49 plus
//! OA\[51:50\] in bits 8..=9 (LPA2, where shareability comes from `TCR`).
//! Bits 48..=49 (48-bit leaves), 48..=50 (48-bit tables) and 50 (LPA2 tables)
//! are RES0: a valid entry setting them is `Invalid`.
//!
//! Leaves: READ is always set; USER = AP\[1\] (bit 6); WRITE = !AP\[2\] (bit 7);
//! ACCESSED = AF (10); GLOBAL = !nG (11); EXEC = !UXN (54) on user leaves and
//! !PXN (53) on kernel leaves, the other XN bit being ignored (encode sets PXN
//! on user leaves, as Linux does, and UXN on kernel leaves). DIRTY is
//! DBM-style, as Linux: DBM (51) on a writable leaf, or the software dirty
//! bit 55. A writable-clean leaf (AP\[2\] = 1, DBM = 1) is reported read-only:
//! fewer permissions are safe, and a device write faults to the kernel, which
//! marks the page dirty. EL0 execute-only leaves (AP\[1\] = 0, UXN = 0) read
//! as kernel leaves: the EL0 execute permission is not reported. An AF-clear
//! leaf keeps its permissions with ACCESSED clear: without hardware AF
//! management its first access takes an Access flag fault, which the kernel
//! resolves by setting AF. With `SCTLR_EL1.WXN = 1` writable leaves are also
//! execute-never, which EXEC does not reflect. AttrIndx (2..=4), NS (5), SH
//! (8..=9, 48-bit), GP (50), Contiguous (52), software bits 56..=58, PBHA
//! (59..=62) and bit 63 are ignored; encode writes them as 0 (AttrIndx 0:
//! the kernel keeps its memory type through
//! [`opaque_bits`](PteFormat::opaque_bits)).
//!
//! Tables: USER = !APTable\[0\] (61), WRITE = !APTable\[1\] (62), EXEC only
//! if UXNTable (60), PXNTable (59) and APTable\[0\] are all clear: the view has
//! one EXEC for both privileges, and a walk that drops USER must not turn a
//! user leaf's EXEC into a kernel one. Encode sets both XN bits for a
//! directory without EXEC and refuses EXEC without USER. NSTable and the
//! ignored bits are ignored.
//!
//! # Software entries
//! Entries with bit 0 clear are ignored by hardware. Bits 61..=63 hold a kind:
//!
//! | kind | meaning | payload |
//! |---|---|---|
//! | 0, 6, 7 | kernel-defined, not interpreted | whole raw value ([`SpecialEntry::Other`]) |
//! | 1 | PROT_NONE | the leaf's encoding with bit 0 clear (bit 1 set at level 0 only, else malformed) |
//! | 2 | swap | offset in bits 1..=60 ([`SWAP_OFFSET_BITS`]) |
//! | 3 | migration | write 1, frame >> 12 in 18..=57 |
//! | 4 | device-private | write 1, owner 2..=17 (full `u16`), frame >> 12 in 18..=57 |
//! | 5 | device-exclusive | as device-private |
//!
//! Bits 58..=60 of kinds 3-5 (and the owner bits of kind 3) are ignored.
//! Every frame must lie below `2^OA_BITS` (else `Invalid` / unencodable);
//! frame bits below a block's span are ignored.
//!
//! # Rewriting entries
//! `opaque_bits` holds what decode ignores and encode leaves 0. Where encode
//! does write an ignored bit (the other privilege's XN, a non-executable
//! directory's XN bits: 1; DBM on read-only leaves, bit 55 on writable ones:
//! 0), the bit is opaque only where `raw` holds the other value, so
//! `(e & !o) | (raw & o)` keeps what the kernel had without undoing a change
//! it asks for. One exception: DBM on a read-only leaf survives, so a kernel
//! write-protecting a writable-clean page clears DBM itself (as Linux's
//! `pte_wrprotect` does). The merge is meant for rewrites of the same kind of
//! entry: a leaf's opaque bits overlap the software kind field.

use super::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry, MAX_LEVELS};
use crate::{Error, Result};
use static_assertions::const_assert;

/// VMSAv8-64 stage 1, 4 KiB granule; `LPA2 = false` is 48-bit, `true` is
/// FEAT_LPA2 52-bit.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Aarch64<const LPA2: bool>;

/// 4 levels, 48-bit virtual and physical addresses.
pub type Aarch64Va48 = Aarch64<false>;
/// FEAT_LPA2 (`TCR_ELx.DS = 1`): 5 levels, 52-bit virtual and physical addresses.
pub type Aarch64Va52 = Aarch64<true>;

/// Largest owner id of a device-private or device-exclusive entry.
pub const MAX_OWNER: u16 = u16::MAX;
/// Width of a swap offset (bits 1..=60 of the entry).
pub const SWAP_OFFSET_BITS: u32 = 60;

impl<const LPA2: bool> PagingGeometry for Aarch64<LPA2> {
    const LEVELS: usize = if LPA2 { 5 } else { 4 };
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9, 9, 9, 9, 4, 0];
    const VA_BITS: u32 = if LPA2 { 52 } else { 48 };
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b111;
}

const_assert!(super::check_geometry(4, 12, [9, 9, 9, 9, 4, 0], 48, 0b111));
const_assert!(super::check_geometry(5, 12, [9, 9, 9, 9, 4, 0], 52, 0b111));

const VALID: u64 = 1 << 0;
/// Table (levels >= 1) or page (level 0).
const TYPE: u64 = 1 << 1;
const AP_USER: u64 = 1 << 6;
const AP_RO: u64 = 1 << 7;
const AF: u64 = 1 << 10;
const NG: u64 = 1 << 11;
const DBM: u64 = 1 << 51;
const PXN: u64 = 1 << 53;
const UXN: u64 = 1 << 54;
const SW_DIRTY: u64 = 1 << 55;
/// AttrIndx, NS, GP, Contiguous, software 56..=58, PBHA, bit 63.
const LEAF_IGNORED: u64 = (0b1111 << 2) | (1 << 50) | (1 << 52) | (0xff << 56);
const PXN_TABLE: u64 = 1 << 59;
const UXN_TABLE: u64 = 1 << 60;
const AP_TABLE_NO_EL0: u64 = 1 << 61;
const AP_TABLE_RO: u64 = 1 << 62;
/// Bits 2..=11, 51..=58 and NSTable (63); 8..=9 are address bits with LPA2.
const TABLE_IGNORED: u64 = (0x3ff << 2) | (0xff << 51) | (1 << 63);

const KIND_SHIFT: u32 = 61;
const KIND_PROT_NONE: u64 = 1;
const KIND_SWAP: u64 = 2;
const KIND_MIGRATION: u64 = 3;
const KIND_DEVICE_PRIVATE: u64 = 4;
const KIND_DEVICE_EXCLUSIVE: u64 = 5;
const SOFT_WRITE: u64 = 1 << 1;
const OWNER_SHIFT: u32 = 2;
const OWNER_BITS: u64 = (MAX_OWNER as u64) << OWNER_SHIFT;
/// `frame >> 12` sits at bit 18: the frame is the field shifted right by 6.
const SOFT_FRAME: u64 = ((1 << 40) - 1) << 18;
const SOFT_SPARE: u64 = 0b111 << 58;
const KIND_MASK: u64 = 0b111 << KIND_SHIFT;

#[inline]
fn span_mask(level: usize) -> u64 {
    (1u64 << Aarch64Va48::level_shift(level)) - 1
}

#[inline]
fn kind(k: u64) -> u64 {
    k << KIND_SHIFT
}

/// Leaf permission/status bits -> neutral flags (READ always set).
#[inline]
fn flags_from_raw(raw: u64) -> LeafFlags {
    let user = raw & AP_USER != 0;
    let write = raw & AP_RO == 0;
    let mut f = LeafFlags::READ;
    f.set(LeafFlags::USER, user);
    f.set(LeafFlags::WRITE, write);
    f.set(LeafFlags::EXEC, raw & if user { UXN } else { PXN } == 0);
    f.set(LeafFlags::ACCESSED, raw & AF != 0);
    f.set(LeafFlags::GLOBAL, raw & NG == 0);
    f.set(LeafFlags::DIRTY, (write && raw & DBM != 0) || raw & SW_DIRTY != 0);
    f
}

fn flags_to_raw(f: LeafFlags) -> Result<u64> {
    // No valid descriptor is unreadable; unknown bits would not round trip.
    if !f.contains(LeafFlags::READ) || !LeafFlags::all().contains(f) {
        return Err(Error::Unencodable);
    }
    let exec = f.contains(LeafFlags::EXEC);
    let mut raw = if f.contains(LeafFlags::USER) {
        AP_USER | PXN | if exec { 0 } else { UXN }
    } else {
        UXN | if exec { 0 } else { PXN }
    };
    raw |= match (f.contains(LeafFlags::WRITE), f.contains(LeafFlags::DIRTY)) {
        (true, true) => DBM,
        (true, false) => 0,
        (false, true) => AP_RO | SW_DIRTY,
        (false, false) => AP_RO,
    };
    if f.contains(LeafFlags::ACCESSED) {
        raw |= AF;
    }
    if !f.contains(LeafFlags::GLOBAL) {
        raw |= NG;
    }
    Ok(raw)
}

/// The flag-field bits of a leaf (or PROT_NONE) `raw` that decode ignores
/// and `flags_to_raw` writes with the other value (see "Rewriting entries").
#[inline]
fn flag_opaque(raw: u64) -> u64 {
    let other_xn = if raw & AP_USER != 0 { PXN } else { UXN };
    let mut o = !raw & other_xn;
    if raw & AP_RO != 0 {
        o |= raw & DBM;
    } else if raw & SW_DIRTY != 0 {
        o |= SW_DIRTY | (!raw & DBM);
    }
    o
}

/// Table descriptor bits -> the most a leaf below may allow.
#[inline]
fn table_flags(raw: u64) -> LeafFlags {
    let mut f = LeafFlags::READ;
    f.set(LeafFlags::WRITE, raw & AP_TABLE_RO == 0);
    f.set(LeafFlags::USER, raw & AP_TABLE_NO_EL0 == 0);
    f.set(LeafFlags::EXEC, raw & (UXN_TABLE | PXN_TABLE | AP_TABLE_NO_EL0) == 0);
    f
}

impl<const LPA2: bool> Aarch64<LPA2> {
    /// Width of an output (physical) address: 48, or 52 with LPA2.
    pub const OA_BITS: u32 = if LPA2 { 52 } else { 48 };
    const LEAF_RES0: u64 = if LPA2 { 0 } else { 0b11 << 48 };
    const TABLE_RES0: u64 = if LPA2 { 1 << 50 } else { 0b111 << 48 };
    /// SH is ignored in 48-bit leaves; with LPA2 bits 8..=9 are address bits.
    const LEAF_IGNORED: u64 = if LPA2 { LEAF_IGNORED } else { LEAF_IGNORED | 0b11 << 8 };
    const TABLE_IGNORED: u64 = if LPA2 { TABLE_IGNORED & !0x300 } else { TABLE_IGNORED };

    #[inline]
    fn addr_from_raw(raw: u64) -> u64 {
        if LPA2 {
            (raw & 0x0003_ffff_ffff_f000) | (raw & 0x300) << 42
        } else {
            raw & 0x0000_ffff_ffff_f000
        }
    }

    /// Descriptor bits for `frame`, which must be aligned to `level`'s span
    /// and below `2^OA_BITS`.
    fn addr_to_raw(frame: u64, level: usize) -> Result<u64> {
        if frame >> Self::OA_BITS != 0 || frame & span_mask(level) != 0 {
            return Err(Error::Unencodable);
        }
        Ok(if LPA2 { (frame & 0x0003_ffff_ffff_f000) | (frame >> 42 & 0x300) } else { frame })
    }

    fn decode_valid(raw: u64, level: usize) -> PteView {
        let table_bit = raw & TYPE != 0;
        if level > 0 && table_bit {
            if raw & Self::TABLE_RES0 != 0 {
                return PteView::Invalid(raw);
            }
            return PteView::Table { frame: Self::addr_from_raw(raw), flags: table_flags(raw) };
        }
        // Level 0 without the page bit is reserved; blocks exist at 1-2 only.
        if (level == 0) != table_bit || level > 2 || raw & Self::LEAF_RES0 != 0 {
            return PteView::Invalid(raw);
        }
        PteView::Leaf { frame: Self::addr_from_raw(raw) & !span_mask(level), flags: flags_from_raw(raw) }
    }

    fn decode_soft(raw: u64, level: usize) -> PteView {
        if level > 2 {
            return PteView::Invalid(raw);
        }
        let k = raw >> KIND_SHIFT;
        if k == KIND_PROT_NONE {
            // Bit 1 as encode writes it: page at level 0, block above.
            if raw & Self::LEAF_RES0 != 0 || (raw & TYPE != 0) != (level == 0) {
                return PteView::Invalid(raw);
            }
            let frame = Self::addr_from_raw(raw) & !span_mask(level);
            return PteView::ProtNone { frame, flags: flags_from_raw(raw) };
        }
        let frame = (raw & SOFT_FRAME) >> 6;
        let write = raw & SOFT_WRITE != 0;
        let owner = (raw >> OWNER_SHIFT) as u16;
        if (KIND_MIGRATION..=KIND_DEVICE_EXCLUSIVE).contains(&k) && frame >> Self::OA_BITS != 0 {
            return PteView::Invalid(raw);
        }
        let frame = frame & !span_mask(level);
        PteView::Special(match k {
            KIND_SWAP => SpecialEntry::Swap { offset: (raw >> 1) & ((1 << SWAP_OFFSET_BITS) - 1) },
            KIND_MIGRATION => SpecialEntry::Migration { frame, write },
            KIND_DEVICE_PRIVATE => SpecialEntry::DevicePrivate { frame, owner, write },
            KIND_DEVICE_EXCLUSIVE => SpecialEntry::DeviceExclusive { frame, owner, write },
            _ => SpecialEntry::Other(raw),
        })
    }

    fn encode_special(s: &SpecialEntry, level: usize) -> Result<u64> {
        let soft = |k: u64, frame: u64, owner: u16, write: bool| -> Result<u64> {
            // Checks alignment and the OA width; the result is then re-packed.
            Self::addr_to_raw(frame, level)?;
            Ok(kind(k) | frame << 6 | (owner as u64) << OWNER_SHIFT | if write { SOFT_WRITE } else { 0 })
        };
        match *s {
            SpecialEntry::Swap { offset } if offset >> SWAP_OFFSET_BITS == 0 => Ok(kind(KIND_SWAP) | offset << 1),
            SpecialEntry::Migration { frame, write } => soft(KIND_MIGRATION, frame, 0, write),
            SpecialEntry::DevicePrivate { frame, owner, write } => soft(KIND_DEVICE_PRIVATE, frame, owner, write),
            SpecialEntry::DeviceExclusive { frame, owner, write } => soft(KIND_DEVICE_EXCLUSIVE, frame, owner, write),
            SpecialEntry::Other(raw)
                if raw != 0
                    && raw & VALID == 0
                    && !(KIND_PROT_NONE..=KIND_DEVICE_EXCLUSIVE).contains(&(raw >> KIND_SHIFT)) =>
            {
                Ok(raw)
            }
            _ => Err(Error::Unencodable),
        }
    }

    /// A leaf (`VALID` set) or PROT_NONE (`VALID` clear) encoding.
    fn encode_leaf(frame: u64, flags: LeafFlags, level: usize) -> Result<u64> {
        if level > 2 {
            return Err(Error::Unencodable);
        }
        let page = if level == 0 { TYPE } else { 0 };
        Ok(VALID | page | Self::addr_to_raw(frame, level)? | flags_to_raw(flags)?)
    }
}

// SAFETY: (1) 0 decodes to Absent and Absent encodes to 0. (2) Table only at
// levels 1.. with bits 1:0 = 0b11 and clear RES0 bits, with the address the
// MMU reads (OA[51:50] from bits 9:8 with LPA2). (3) Leaf only at levels 0-2
// (bits 1:0 = 0b11 at 0, 0b01 at 1-2: Arm's page and block descriptors),
// frame masked to the level's span; the flags read the bits the MMU checks
// for the privilege USER names and may report fewer permissions (writable-
// clean DBM, EL0 execute-only) but never more; directory flags remove what
// APTable/XNTable remove, EXEC whenever any of UXNTable, PXNTable,
// APTable[0] is set. Non-valid entries are never Table or Leaf. (4) encode
// writes exactly the fields decode reads. (5) Pure. (6) user_page accepts
// only valid level-0 page descriptors with AP[1] and clear RES0 bits (and,
// with LPA2, OA[51:50] = 0), which decode reads as READ | USER leaves with
// that frame and WRITE = !AP[2]; every encoded user page below 2^48 is one. (7) directory() is valid | table | frame, accepted at 1..LEVELS
// for 4 KiB frames below 2^48 (or 2^52). (8) encode(decode(raw)) differs
// from raw only in bits opaque_bits names (ignored fields, frame bits below
// a block's span, and the DBM/XN/SW-dirty bits the view cannot tell apart),
// and Invalid never encodes. (9) publish_table_writes issues `dsb st` on
// aarch64. tests/aarch64_encoding.rs checks 1-8 by golden values and proptests.
unsafe impl<const LPA2: bool> PteFormat for Aarch64<LPA2> {
    type Geometry = Self;
    /// No APTable or XNTable restriction.
    const DIRECTORY: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::EXEC);

    #[inline]
    fn decode(raw: u64, level: usize) -> PteView {
        if raw == 0 {
            PteView::Absent
        } else if level >= Self::LEVELS {
            PteView::Invalid(raw)
        } else if raw & VALID != 0 {
            Self::decode_valid(raw, level)
        } else {
            Self::decode_soft(raw, level)
        }
    }

    fn encode(view: &PteView, level: usize) -> Result<u64> {
        if level >= Self::LEVELS {
            return Err(Error::Unencodable);
        }
        match *view {
            PteView::Absent => Ok(0),
            PteView::Table { frame, flags } => {
                let perms = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER | LeafFlags::EXEC;
                let exec_without_user = flags.contains(LeafFlags::EXEC) && !flags.contains(LeafFlags::USER);
                if level == 0 || !perms.contains(flags) || !flags.contains(LeafFlags::READ) || exec_without_user {
                    return Err(Error::Unencodable);
                }
                let mut raw = VALID | TYPE | Self::addr_to_raw(frame, 0)?;
                if !flags.contains(LeafFlags::WRITE) {
                    raw |= AP_TABLE_RO;
                }
                if !flags.contains(LeafFlags::USER) {
                    raw |= AP_TABLE_NO_EL0;
                }
                if !flags.contains(LeafFlags::EXEC) {
                    raw |= UXN_TABLE | PXN_TABLE;
                }
                Ok(raw)
            }
            PteView::Leaf { frame, flags } => Self::encode_leaf(frame, flags, level),
            PteView::ProtNone { frame, flags } => {
                Ok(Self::encode_leaf(frame, flags, level)? & !VALID | kind(KIND_PROT_NONE))
            }
            PteView::Special(ref s) if level <= 2 => Self::encode_special(s, level),
            // Specials above the block levels; malformed entries.
            PteView::Special(_) | PteView::Invalid(_) => Err(Error::Unencodable),
        }
    }

    fn opaque_bits(raw: u64, level: usize) -> u64 {
        let below_span = span_mask(level.min(2)) & !0xfff;
        match Self::decode(raw, level) {
            PteView::Table { .. } => {
                let no_exec = raw & (UXN_TABLE | PXN_TABLE | AP_TABLE_NO_EL0) != 0;
                Self::TABLE_IGNORED | if no_exec { !raw & (UXN_TABLE | PXN_TABLE) } else { 0 }
            }
            PteView::Leaf { .. } => Self::LEAF_IGNORED | flag_opaque(raw) | below_span,
            PteView::ProtNone { .. } => (Self::LEAF_IGNORED & !KIND_MASK) | flag_opaque(raw) | below_span,
            PteView::Special(SpecialEntry::Migration { .. }) => SOFT_SPARE | OWNER_BITS | below_span << 6,
            PteView::Special(SpecialEntry::DevicePrivate { .. } | SpecialEntry::DeviceExclusive { .. }) => {
                SOFT_SPARE | below_span << 6
            }
            _ => 0,
        }
    }

    /// `dsb st`: completes this CPU's earlier stores for the full system, not
    /// only the inner-shareable domain (`ishst`) the other CPUs' walkers sit
    /// in, since an SMMU or device may walk outside it, and a DSB rather than
    /// a DMB because the notice may be an interrupt (a GIC system-register
    /// write), which a DMB does not order. Non-coherent walkers also need
    /// the lines cleaned to the point of coherency, which stays the caller's.
    #[inline]
    fn publish_table_writes() {
        // SAFETY: `dsb st` only waits for this CPU's earlier stores to
        // complete; it touches no register or memory the program sees (no
        // `nomem`, so it is also a compiler barrier for memory).
        #[cfg(target_arch = "aarch64")]
        unsafe {
            core::arch::asm!("dsb st", options(nostack, preserves_flags))
        };
        #[cfg(not(target_arch = "aarch64"))]
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }

    /// Valid, page, AP\[1\]: a user page (RES0 bits clear); writable iff
    /// AP\[2\] is clear. With LPA2, a frame at or above 2^50 (OA\[51:50\] in
    /// bits 8..=9) is left to `decode`, so the common case is one mask and no
    /// bit shuffling.
    #[inline]
    fn user_page(raw: u64) -> Option<(u64, bool)> {
        const USER_PAGE: u64 = VALID | TYPE | AP_USER;
        let high_oa = if LPA2 { 0b11 << 8 } else { 0 };
        (raw & (USER_PAGE | Self::LEAF_RES0 | high_oa) == USER_PAGE)
            .then(|| (Self::addr_from_raw(raw), raw & AP_RO == 0))
    }
}
