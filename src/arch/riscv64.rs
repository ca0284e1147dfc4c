//! RISC-V paging: Sv39, Sv48 and Sv57 (3, 4 and 5 levels of 512 entries,
//! 4 KiB pages). Every level may hold a leaf: 2 MiB megapages, 1 GiB
//! gigapages, 512 GiB terapages (Sv48, Sv57) and 256 TiB petapages (Sv57).
//!
//! # Hardware entries (V = 1)
//! V 0, R 1, W 2, X 3, U 4, G 5, A 6, D 7, RSW 8..=9 (the supervisor's, ignored
//! by the MMU), PPN 10..=53 (frame = PPN << 12: physical addresses below
//! 2^56), reserved 54..=60, PBMT 61..=62 (Svpbmt), N 63 (Svnapot).
//!
//! R = W = X = 0 points to the next table. Directories carry no permission
//! bits, so every directory decodes with `READ | WRITE | EXEC | USER`
//! ([`PteFormat::DIRECTORY`]: the leaves decide), and only exactly that
//! encodes. G on a directory (every mapping below is global) is a TLB hint
//! the view does not carry; it and RSW are the opaque bits of a directory.
//!
//! Decoded as [`PteView::Invalid`] (the MMU faults, or the entry cannot be
//! described without the virtual address):
//! - reserved bits 54..=60 set; PBMT = 3 (reserved) in a leaf;
//! - a pointer at level 0; a pointer with A, D, U or PBMT set (reserved in
//!   non-leaf entries, which software must clear; some harts fault on them);
//! - W without R (reserved); a superpage whose PPN is not aligned to its
//!   span (misaligned superpage);
//! - N = 1: a Svnapot 64 KiB run translates to a frame that depends on the
//!   virtual address, which `decode` is not given. Reporting it inaccessible
//!   is always safe; a kernel using Svnapot sees those pages as unmapped.
//!
//! An execute-only leaf (X without R) decodes with EXEC and without READ: not
//! a page a device may read. PBMT 0..=2 is a memory type: `decode` ignores it
//! (an opaque bit, assuming the hart implements Svpbmt as a kernel setting it
//! must), `encode` never sets it.
//!
//! # Software entries (V = 0)
//! The MMU ignores every other bit of an invalid entry. Bits 62..=63 and RSW
//! select the kind, so device entries keep a full 44-bit frame number next to
//! a 16-bit owner:
//!
//! | 63..=62 | 9..=8 | kind | payload |
//! |---|---|---|---|
//! | 0 | 0 | kernel-defined, not interpreted | whole raw value ([`SpecialEntry::Other`]) |
//! | 0 | 1 | PROT_NONE | R W X U G A D in 1..=7, frame 10..=53, as a leaf |
//! | 0 | 2 | swap | offset in 10..=61 ([`SWAP_OFFSET_BITS`] = 52 bits) |
//! | 0 | 3 | migration | frame 10..=53, W in bit 2 |
//! | 1 | any | device-private | W 1, owner 2..=17, frame number (frame >> 12) in 18..=61 |
//! | 2 | any | device-exclusive | W 1, owner 2..=17, frame number in 18..=61 |
//! | 3 | any | kernel-defined, not interpreted | whole raw value ([`SpecialEntry::Other`]) |
//!
//! Owners use the whole `u16` range ([`MAX_OWNER`]); every frame is below
//! 2^56 ([`PHYS_ADDR_BITS`]). Software entries encode at every level with
//! frames aligned to the level's span; `decode` masks the bits below it.
//! Those bits and the ones a kind leaves unused (54..=61 of PROT_NONE and
//! migration, 1..=7 of swap, 1 and 3..=7 of migration) are its opaque bits.

use super::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry, MAX_LEVELS};
use crate::{Error, Result};
use static_assertions::const_assert;

/// RISC-V paging with `LEVELS` levels (3 to 5); use [`Sv39`], [`Sv48`],
/// [`Sv57`].
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Riscv64<const LEVELS: usize>;

/// Sv39: 3 levels, 39-bit virtual addresses.
pub type Sv39 = Riscv64<3>;
/// Sv48: 4 levels, 48-bit virtual addresses.
pub type Sv48 = Riscv64<4>;
/// Sv57: 5 levels, 57-bit virtual addresses.
pub type Sv57 = Riscv64<5>;

impl<const N: usize> PagingGeometry for Riscv64<N> {
    const LEVELS: usize = {
        assert!(3 <= N && N <= 5, "RISC-V paging has 3 (Sv39) to 5 (Sv57) levels");
        N
    };
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = 12 + 9 * N as u32;
    const SIGN_EXTEND: bool = true;
    const LEAF_LEVELS: u32 = (1 << N) - 1;
}

const fn geometry_ok<G: PagingGeometry>(va_bits: u32) -> bool {
    G::VA_BITS == va_bits && super::check_geometry(G::LEVELS, G::PAGE_SHIFT, G::INDEX_BITS, G::VA_BITS, G::LEAF_LEVELS)
}
const_assert!(geometry_ok::<Sv39>(39) && <Sv39 as PagingGeometry>::LEAF_LEVELS == 0b111);
const_assert!(geometry_ok::<Sv48>(48) && <Sv48 as PagingGeometry>::LEAF_LEVELS == 0b1111);
const_assert!(geometry_ok::<Sv57>(57) && <Sv57 as PagingGeometry>::LEAF_LEVELS == 0b1_1111);

/// Largest owner id of a device entry: the whole `u16` range.
pub const MAX_OWNER: u16 = u16::MAX;
/// Width of a swap offset.
pub const SWAP_OFFSET_BITS: u32 = 52;
/// Width of a physical address (44-bit frame number, 4 KiB pages); every
/// frame an entry holds is below `1 << PHYS_ADDR_BITS`.
pub const PHYS_ADDR_BITS: u32 = 56;
/// Flags of every directory: RISC-V directories grant everything.
const DIRECTORY: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::EXEC).union(LeafFlags::USER);

const V: u64 = 1 << 0;
const R: u64 = 1 << 1;
const W: u64 = 1 << 2;
const X: u64 = 1 << 3;
const U: u64 = 1 << 4;
const G: u64 = 1 << 5;
const A: u64 = 1 << 6;
const D: u64 = 1 << 7;
const RSW: u64 = 0b11 << 8;
const PPN_SHIFT: u32 = 10;
const PFN_MASK: u64 = (1 << (PHYS_ADDR_BITS - 12)) - 1;
const RESERVED: u64 = 0x7f << 54;
const PBMT: u64 = 0b11 << 61;
const NAPOT: u64 = 1 << 63;

const FLAG_BITS: [(LeafFlags, u64); 7] = [
    (LeafFlags::READ, R),
    (LeafFlags::WRITE, W),
    (LeafFlags::EXEC, X),
    (LeafFlags::USER, U),
    (LeafFlags::GLOBAL, G),
    (LeafFlags::ACCESSED, A),
    (LeafFlags::DIRTY, D),
];

// Software entries: class in 62..=63, kind (class 0) in RSW.
const CLASS_SHIFT: u32 = 62;
const CLASS_DEVICE_PRIVATE: u64 = 1;
const CLASS_DEVICE_EXCLUSIVE: u64 = 2;
const KIND_PROT_NONE: u64 = 1;
const KIND_SWAP: u64 = 2;
const KIND_MIGRATION: u64 = 3;
const DEV_W: u64 = 1 << 1;
const OWNER_SHIFT: u32 = 2;
const DEV_PFN_SHIFT: u32 = 18;
/// Bits 54..=61, unused by PROT_NONE and migration entries.
const SOFT_UNUSED: u64 = 0xff << 54;
/// Bits 1..=7: unused by swap entries.
const LOW_FLAGS: u64 = 0xfe;

/// Bytes mapped by an entry at `level`, minus one.
#[inline]
fn span_mask(level: usize) -> u64 {
    (1u64 << (12 + 9 * level as u32)) - 1
}

/// Frame of the PPN field (bits 10..=53).
#[inline]
fn pte_frame(raw: u64) -> u64 {
    ((raw >> PPN_SHIFT) & PFN_MASK) << 12
}

/// PPN field for `frame`, which must fit and be aligned to `level`'s span.
fn ppn(frame: u64, level: usize) -> Result<u64> {
    if frame >> PHYS_ADDR_BITS != 0 || frame & span_mask(level) != 0 {
        return Err(Error::Unencodable);
    }
    Ok(frame >> 12 << PPN_SHIFT)
}

#[inline]
fn class(raw: u64) -> u64 {
    raw >> CLASS_SHIFT
}

#[inline]
fn kind(raw: u64) -> u64 {
    (raw & RSW) >> 8
}

/// Whether R/W/X of a leaf are a defined combination: not a pointer, no W
/// without R.
#[inline]
fn leaf_rwx(raw: u64) -> bool {
    raw & (R | X) != 0 && raw & (R | W) != W
}

fn flags_from_raw(raw: u64) -> LeafFlags {
    FLAG_BITS.iter().filter(|(_, bit)| raw & bit != 0).fold(LeafFlags::empty(), |f, (flag, _)| f | *flag)
}

fn flags_to_raw(f: LeafFlags) -> Result<u64> {
    let rwx_ok = f.intersects(LeafFlags::READ | LeafFlags::EXEC)
        && (f.contains(LeafFlags::READ) || !f.contains(LeafFlags::WRITE));
    // Unknown bits would be dropped by decode, breaking the round trip.
    if !rwx_ok || !LeafFlags::all().contains(f) {
        return Err(Error::Unencodable);
    }
    Ok(FLAG_BITS.iter().filter(|(flag, _)| f.contains(*flag)).fold(0, |raw, (_, bit)| raw | bit))
}

#[inline(always)]
fn decode_present(raw: u64, level: usize) -> PteView {
    if raw & (RESERVED | NAPOT) != 0 {
        return PteView::Invalid(raw);
    }
    if raw & (R | W | X) == 0 {
        if level == 0 || raw & (A | D | U | PBMT) != 0 {
            return PteView::Invalid(raw);
        }
        return PteView::Table { frame: pte_frame(raw), flags: DIRECTORY };
    }
    let frame = pte_frame(raw);
    if !leaf_rwx(raw) || raw & PBMT == PBMT || frame & span_mask(level) != 0 {
        return PteView::Invalid(raw);
    }
    PteView::Leaf { frame, flags: flags_from_raw(raw) }
}

fn decode_special(raw: u64, level: usize) -> PteView {
    // Frames of huge software entries name the whole span, as encode requires.
    let span = span_mask(level);
    let dev_frame = ((raw >> DEV_PFN_SHIFT) & PFN_MASK) << 12 & !span;
    let (owner, dev_write) = ((raw >> OWNER_SHIFT) as u16, raw & DEV_W != 0);
    let frame = pte_frame(raw) & !span;
    PteView::Special(match (class(raw), kind(raw)) {
        (CLASS_DEVICE_PRIVATE, _) => SpecialEntry::DevicePrivate { frame: dev_frame, owner, write: dev_write },
        (CLASS_DEVICE_EXCLUSIVE, _) => SpecialEntry::DeviceExclusive { frame: dev_frame, owner, write: dev_write },
        // PROT_NONE must hold flags a leaf can take back.
        (0, KIND_PROT_NONE) if leaf_rwx(raw) => return PteView::ProtNone { frame, flags: flags_from_raw(raw) },
        (0, KIND_PROT_NONE) => return PteView::Invalid(raw),
        (0, KIND_SWAP) => SpecialEntry::Swap { offset: (raw >> PPN_SHIFT) & ((1 << SWAP_OFFSET_BITS) - 1) },
        (0, KIND_MIGRATION) => SpecialEntry::Migration { frame, write: raw & W != 0 },
        _ => SpecialEntry::Other(raw),
    })
}

/// Whether a non-zero invalid entry is the kernel's own ([`SpecialEntry::Other`]).
#[inline]
fn is_other(raw: u64) -> bool {
    class(raw) == 3 || (class(raw) == 0 && kind(raw) == 0)
}

fn encode_special(s: &SpecialEntry, level: usize) -> Result<u64> {
    let w = |write: bool, bit: u64| if write { bit } else { 0 };
    let device = |class: u64, frame: u64, owner: u16, write: bool| -> Result<u64> {
        let pfn = ppn(frame, level)? >> PPN_SHIFT;
        Ok(class << CLASS_SHIFT | pfn << DEV_PFN_SHIFT | (owner as u64) << OWNER_SHIFT | w(write, DEV_W))
    };
    match *s {
        SpecialEntry::Swap { offset } if offset >> SWAP_OFFSET_BITS == 0 => Ok(KIND_SWAP << 8 | offset << PPN_SHIFT),
        SpecialEntry::Migration { frame, write } => Ok(KIND_MIGRATION << 8 | ppn(frame, level)? | w(write, W)),
        SpecialEntry::DevicePrivate { frame, owner, write } => device(CLASS_DEVICE_PRIVATE, frame, owner, write),
        SpecialEntry::DeviceExclusive { frame, owner, write } => device(CLASS_DEVICE_EXCLUSIVE, frame, owner, write),
        SpecialEntry::Other(raw) if raw != 0 && raw & V == 0 && is_other(raw) => Ok(raw),
        _ => Err(Error::Unencodable),
    }
}

// SAFETY: (1) 0 is Absent at every level and Absent encodes to 0. (2) Table
// only for V = 1, R = W = X = 0 above level 0 with no reserved, A, D, U,
// PBMT or N bit set: the entries the MMU follows, to the PPN's frame.
// (3) Leaf only for V = 1 with a defined R/W/X combination, no reserved bits,
// PBMT != 3, N = 0 and a PPN aligned to the level's span (every level may
// hold a leaf); flags are the R, W, X, U bits the MMU checks (A = 0 or D = 0
// can only fault more). Every other V = 1 entry is Invalid; V = 0 entries are
// never Table or Leaf. (4) encode refuses what decode would not read back
// (unknown or undefined flag combinations, unaligned or too-wide frames,
// directory flags other than DIRECTORY, offsets that do not fit, Other
// values in another kind's encoding) and otherwise writes exactly the bits
// decode reads. (5) All methods but publish_table_writes are pure. (6)
// `user_page` answers Some only under conditions where decode at level 0
// yields a READ | USER leaf (V, R, U, no reserved bit, N clear, PBMT 0 or
// 1), which every encoded user page meets (encode never sets PBMT). (7) directory(frame, l) is V | PPN, Ok for every
// l >= 1 and 4 KiB frame below 2^56. (8) decode reads every bit outside
// opaque_bits (RSW and PBMT of a leaf, RSW and G of a directory, the unused
// and below-span bits of software entries) and encode writes them back as
// read. (9) publish_table_writes: see its comment. tests/riscv64_encoding.rs
// checks 4, 6, 7 and 8 for every view kind, level and mode.
unsafe impl<const N: usize> PteFormat for Riscv64<N> {
    type Geometry = Self;
    const DIRECTORY: LeafFlags = DIRECTORY;

    #[inline(always)]
    fn decode(raw: u64, level: usize) -> PteView {
        if raw == 0 {
            PteView::Absent
        } else if level >= Self::LEVELS {
            PteView::Invalid(raw)
        } else if raw & V != 0 {
            decode_present(raw, level)
        } else {
            decode_special(raw, level)
        }
    }

    fn encode(view: &PteView, level: usize) -> Result<u64> {
        if level >= Self::LEVELS {
            return Err(Error::Unencodable);
        }
        match *view {
            PteView::Absent => Ok(0),
            PteView::Table { frame, flags } if level > 0 && flags == DIRECTORY => Ok(V | ppn(frame, 0)?),
            PteView::Leaf { frame, flags } => Ok(V | flags_to_raw(flags)? | ppn(frame, level)?),
            PteView::ProtNone { frame, flags } => Ok(KIND_PROT_NONE << 8 | flags_to_raw(flags)? | ppn(frame, level)?),
            PteView::Special(ref s) => encode_special(s, level),
            PteView::Table { .. } | PteView::Invalid(_) => Err(Error::Unencodable),
        }
    }

    fn opaque_bits(raw: u64, level: usize) -> u64 {
        if level >= Self::LEVELS {
            return 0;
        }
        // Frame-number bits below the span of a huge software entry.
        let below_span = span_mask(level) >> 12;
        if raw & V != 0 {
            return RSW | if raw & (R | W | X) == 0 { G } else { PBMT };
        }
        match (class(raw), kind(raw)) {
            (CLASS_DEVICE_PRIVATE | CLASS_DEVICE_EXCLUSIVE, _) => below_span << DEV_PFN_SHIFT,
            (0, KIND_PROT_NONE) => SOFT_UNUSED | below_span << PPN_SHIFT,
            (0, KIND_SWAP) => LOW_FLAGS,
            (0, KIND_MIGRATION) => SOFT_UNUSED | (LOW_FLAGS & !W) | below_span << PPN_SHIFT,
            _ => 0,
        }
    }

    /// `fence ow, ow` (Linux's `wmb()`): this hart's earlier stores to table
    /// memory, normal memory (W) or a device's own memory behind MMIO (O),
    /// are ordered before its later stores and MMIO writes, which is how
    /// another agent is told: a flag in memory, an IOMMU command-queue
    /// doorbell, an IPI through the CLINT or IMSIC (also when an SBI call
    /// writes it, later in program order). Loads need no ordering here.
    /// Another hart's MMU still needs an `sfence.vma` there (the kernel's
    /// shootdown); a non-coherent walker needs cache maintenance (Zicbom),
    /// which is the kernel's DMA sync, not a fence.
    #[inline]
    fn publish_table_writes() {
        #[cfg(target_arch = "riscv64")]
        // SAFETY: `fence` only orders this hart's memory accesses: it reads
        // and writes no memory and no register. Without `nomem` the compiler
        // also keeps earlier stores before it.
        unsafe {
            core::arch::asm!("fence ow, ow", options(nostack, preserves_flags))
        };
        #[cfg(not(target_arch = "riscv64"))]
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }

    /// Valid, readable, user, no reserved bit, N clear (R set: not a
    /// pointer, and W cannot be without R; level 0 has no alignment), and
    /// PBMT 0 or 1 (bit 62 clear, so never the reserved 3): one mask test.
    /// IO pages (PBMT 2) are left to `decode`.
    #[inline]
    fn user_page(raw: u64) -> Option<(u64, bool)> {
        let mask = V | R | U | RESERVED | NAPOT | (1 << 62);
        (raw & mask == V | R | U).then_some((pte_frame(raw), raw & W != 0))
    }
}
