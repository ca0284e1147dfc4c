//! Page-table formats: geometry constants plus an architecture-neutral view of
//! one entry.
//!
//! A format is split in two so one walker serves CPU tables and device tables
//! alike: [`PagingGeometry`] says how a virtual address is cut into indices, and
//! [`PteFormat`] converts a raw 64-bit entry to and from a [`PteView`].
//!
//! Levels are numbered from the bottom: level 0 holds 4 KiB (page-sized)
//! leaves, level `LEVELS - 1` is the root table. This module and its children
//! are the only place that names an architecture: everything above reaches a
//! format through these two traits.
//!
//! # Formats
//!
//! | format | levels | user addresses | leaves | frames | directories restrict |
//! |---|---|---|---|---|---|
//! | [`x86_64::X86_64Level4`] | 4 | `0 .. 2^47` (sign-extended from bit 47) | 4 KiB, 2 MiB, 1 GiB | `< 2^52` | W, U, NX |
//! | [`x86_64::X86_64Level5`] | 5 | `0 .. 2^56` (sign-extended from bit 56) | 4 KiB, 2 MiB, 1 GiB | `< 2^52` | W, U, NX |
//! | [`aarch64::Aarch64Va48`] | 4 | `0 .. 2^48` (TTBR0; not sign-extended) | 4 KiB, 2 MiB, 1 GiB | `< 2^48` | APTable, UXN/PXNTable |
//! | [`aarch64::Aarch64Va52`] (FEAT_LPA2) | 5 | `0 .. 2^52` (TTBR0) | 4 KiB, 2 MiB, 1 GiB | `< 2^52` | APTable, UXN/PXNTable |
//! | [`riscv64::Sv39`] | 3 | `0 .. 2^38` (sign-extended from bit 38) | every level (to 1 GiB) | `< 2^56` | none |
//! | [`riscv64::Sv48`] | 4 | `0 .. 2^47` | every level (to 512 GiB) | `< 2^56` | none |
//! | [`riscv64::Sv57`] | 5 | `0 .. 2^56` | every level (to 256 TiB) | `< 2^56` | none |
//! | [`soft::SoftFormat<G>`](soft::SoftFormat) | `G`'s | `G`'s | where `G` allows | `< 2^52` | none (device format) |
//!
//! Build a directory entry with [`PteFormat::directory`], never by encoding
//! permission flags: RISC-V directories have none.
//!
//! # Special (non-present) entries
//!
//! A CPU format encodes PROT_NONE and every [`SpecialEntry`] kind at each of
//! its leaf levels (frames aligned to the level's span), in bits its
//! architecture leaves to software; it refuses (`Error::Unencodable`) only
//! values outside the ranges below. A kernel writes these entries; hmm-core
//! only reads them ([`range_fault`](crate::range_fault) and the mirror treat
//! them as "ask the kernel", or as the device's own page for a
//! device-private entry of its owner). A device format need encode none.
//!
//! | format | PROT_NONE | swap offset | migration | device-private / -exclusive owner | kernel's own (`Other`) |
//! |---|---|---|---|---|---|
//! | x86_64 (both) | yes | 51 bits | yes | `0 ..= 2047` ([`x86_64::MAX_OWNER`]) | kinds 0, 6, 7 in bits 9..=11 |
//! | aarch64 (both) | yes | 60 bits | yes | `0 ..= 65535` ([`aarch64::MAX_OWNER`]) | kinds 0, 6, 7 in bits 61..=63 |
//! | riscv64 (all three) | yes | 52 bits | yes | `0 ..= 65535` ([`riscv64::MAX_OWNER`]) | kind 0 (RSW = 0) and class 3 |
//! | [`soft::SoftFormat`] | no | no | no | no | no |
//!
//! Each format's module documents its exact bit layout.
//!
//! # Rewriting a raw entry
//!
//! `decode` keeps what the core needs; [`PteFormat::opaque_bits`] names the
//! rest (memory type, shareability, hints, unused software bits), and
//! decode-then-encode differs from the raw entry only there (contract item
//! 8, checked per format by `tests/format_contract.rs`). Malformed entries
//! ([`PteView::Invalid`]) are never re-encoded.

pub mod aarch64;
pub mod riscv64;
pub mod soft;
pub mod x86_64;

use bitflags::bitflags;

/// The most levels any supported geometry may have (device tables of the
/// 2016 HMM design used up to six).
pub const MAX_LEVELS: usize = 6;

/// How a virtual address is split into table indices.
///
/// Implementations are plain constants; [`check_geometry`] validates them and
/// formats pin it with `static_assertions::const_assert!`.
pub trait PagingGeometry {
    /// Number of table levels, 1 to [`MAX_LEVELS`].
    const LEVELS: usize;
    /// log2 of the smallest page size (12 for 4 KiB).
    const PAGE_SHIFT: u32;
    /// Index bits of each level, bottom first; entries past `LEVELS` are unused.
    /// The root level may use fewer bits than its table could hold.
    const INDEX_BITS: [u32; MAX_LEVELS];
    /// Width of a virtual address: `PAGE_SHIFT + sum(INDEX_BITS[..LEVELS])`.
    const VA_BITS: u32;
    /// Whether addresses are sign-extended from bit `VA_BITS - 1` (x86_64,
    /// RISC-V Sv*); if false, valid addresses are `0 .. 2^VA_BITS`.
    const SIGN_EXTEND: bool;
    /// Bit `l` set: level `l` may hold a leaf.
    const LEAF_LEVELS: u32;

    /// log2 of the span one entry at `level` maps.
    #[inline]
    fn level_shift(level: usize) -> u32 {
        let mut shift = Self::PAGE_SHIFT;
        let mut l = 0;
        while l < level {
            shift += Self::INDEX_BITS[l];
            l += 1;
        }
        shift
    }

    /// Index of `va` in its table at `level`.
    #[inline]
    fn index(va: u64, level: usize) -> usize {
        ((va >> Self::level_shift(level)) & ((1u64 << Self::INDEX_BITS[level]) - 1)) as usize
    }

    /// Number of entries in a table at `level`.
    #[inline]
    fn entries(level: usize) -> usize {
        1usize << Self::INDEX_BITS[level]
    }

    /// Whether `level` may hold a leaf.
    #[inline]
    fn leaf_allowed(level: usize) -> bool {
        Self::LEAF_LEVELS & (1 << level) != 0
    }

    /// Whether `va` is canonical in this geometry.
    #[inline]
    fn is_canonical(va: u64) -> bool {
        if Self::SIGN_EXTEND {
            let shift = 64 - Self::VA_BITS;
            (((va << shift) as i64) >> shift) as u64 == va
        } else {
            Self::VA_BITS >= 64 || va >> Self::VA_BITS == 0
        }
    }
}

/// Validates a geometry at compile time: level count, bit budget, table sizes
/// that fit a page of 8-byte entries, and a leaf level at the bottom.
pub const fn check_geometry(
    levels: usize,
    page_shift: u32,
    index_bits: [u32; MAX_LEVELS],
    va_bits: u32,
    leaf_levels: u32,
) -> bool {
    if levels == 0 || levels > MAX_LEVELS || page_shift < 12 || va_bits > 64 {
        return false;
    }
    let mut sum = page_shift;
    let mut l = 0;
    while l < levels {
        // A table must fit one page of 8-byte entries.
        if index_bits[l] == 0 || index_bits[l] > page_shift - 3 {
            return false;
        }
        sum += index_bits[l];
        l += 1;
    }
    sum == va_bits && leaf_levels & 1 == 1 && leaf_levels >> levels == 0
}

bitflags! {
    /// Permissions and status of a leaf, independent of the architecture.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct LeafFlags: u16 {
        /// Readable (on x86_64 every present entry is readable).
        const READ = 1 << 0;
        /// Writable.
        const WRITE = 1 << 1;
        /// Executable.
        const EXEC = 1 << 2;
        /// Accessible from user mode; devices mirror user mappings only.
        const USER = 1 << 3;
        /// Hardware set: the page was accessed.
        const ACCESSED = 1 << 4;
        /// Hardware set: the page was written.
        const DIRTY = 1 << 5;
        /// Global translation (kept for round trips; devices ignore it).
        const GLOBAL = 1 << 6;
    }
}

#[cfg(feature = "defmt")]
#[cfg_attr(docsrs, doc(cfg(feature = "defmt")))]
impl defmt::Format for LeafFlags {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "LeafFlags({=u16:#x})", self.bits());
    }
}

/// A software non-present entry: the CPU faults on it, the kernel and
/// hmm-core read what it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SpecialEntry {
    /// The page was swapped out; `offset` is the kernel's swap slot.
    Swap {
        /// Kernel-defined swap location.
        offset: u64,
    },
    /// The page is being migrated; accesses wait for the migration.
    Migration {
        /// Frame being migrated from.
        frame: u64,
        /// Whether the mapping was writable before migration.
        write: bool,
    },
    /// The page lives in device-private memory the CPU cannot reach.
    DevicePrivate {
        /// Device frame (in the device's physical space).
        frame: u64,
        /// Small id of the owning device.
        owner: u16,
        /// Whether the mapping is writable.
        write: bool,
    },
    /// A device holds exclusive (atomic) access to this system frame.
    DeviceExclusive {
        /// The system frame.
        frame: u64,
        /// Small id of the device holding exclusive access.
        owner: u16,
        /// Whether the mapping is writable.
        write: bool,
    },
    /// A non-present entry this crate does not interpret (the kernel's own
    /// encoding). Treated as "not present, the kernel's fault handler knows".
    Other(u64),
}

/// An architecture-neutral view of one page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PteView {
    /// Nothing mapped (raw value 0).
    Absent,
    /// Points to the next-level table at physical address `frame`.
    Table {
        /// Physical address of the next table.
        frame: u64,
        /// The most a leaf below may allow: a permission missing here (WRITE,
        /// USER, EXEC) is missing for every translation through this entry.
        flags: LeafFlags,
    },
    /// Maps `frame` (aligned to the span of the entry's level).
    Leaf {
        /// Physical address of the mapped frame.
        frame: u64,
        /// Permissions and status bits.
        flags: LeafFlags,
    },
    /// PROT_NONE: a mapping the kernel keeps (frame and former flags) but that
    /// user mode and devices must not access.
    ProtNone {
        /// Physical address of the frame.
        frame: u64,
        /// The flags the mapping would have once access is restored.
        flags: LeafFlags,
    },
    /// A software non-present entry.
    Special(SpecialEntry),
    /// A present entry this format declares malformed (e.g. a huge bit at a
    /// level that cannot hold leaves). Treated as inaccessible.
    Invalid(u64),
}

impl PteView {
    /// `Some((frame, writable))` for a leaf a device may use: one with
    /// [`LeafFlags::READ`] and [`LeafFlags::USER`] (an execute-only or
    /// kernel-only leaf is not). The one definition every walk applies.
    #[inline]
    pub fn user_frame(&self) -> Option<(u64, bool)> {
        match *self {
            PteView::Leaf { frame, flags } if flags.contains(LeafFlags::READ | LeafFlags::USER) => {
                Some((frame, flags.contains(LeafFlags::WRITE)))
            }
            _ => None,
        }
    }
}

/// Converts raw entries of one page-table format to and from [`PteView`].
///
/// # Safety
/// The walker trusts a format to describe real hardware tables, so an
/// implementation must guarantee:
/// 1. `decode(0, l)` is [`PteView::Absent`] and `encode(&PteView::Absent, l)` is
///    `Ok(0)` for every level `l` below `Geometry::LEVELS`.
/// 2. `decode` returns [`PteView::Table`] only at levels above 0, and only for
///    entries the hardware follows to a next-level table at exactly that frame.
/// 3. `decode` returns [`PteView::Leaf`] only at levels where
///    `G::leaf_allowed(level)` holds, with a frame aligned to the level's span,
///    and only for entries the hardware translates to that frame with at most
///    the permissions reported. (Reporting fewer permissions, or `Invalid`,
///    is always allowed.)
/// 4. Encode-then-decode: for every view `v` and level `l`, if
///    `encode(&v, l)` is `Ok(raw)` then `decode(raw, l) == v`.
/// 5. All methods but [`publish_table_writes`](Self::publish_table_writes)
///    are pure (no side effects, same output for same input).
/// 6. [`user_page`](Self::user_page), if overridden, returns `Some` only as
///    its documentation says, and at least for every entry that
///    `encode(&Leaf { frame, flags }, 0)` produces for a `frame` below 2^48
///    and `flags` = `READ | USER` plus any of `WRITE`, `EXEC`, `ACCESSED`,
///    `DIRTY`, `GLOBAL`.
/// 7. [`directory`](Self::directory)`(frame, l)` is `Ok` for every level
///    `1 <= l < LEVELS` and every 4 KiB-aligned `frame` below 2^48, and
///    decodes to `Table { frame, flags: DIRECTORY }`.
/// 8. Decode-then-encode: for every `raw` and level `l < LEVELS` whose
///    `decode(raw, l)` is not [`PteView::Invalid`], `encode(&decode(raw, l), l)`
///    is `Ok(e)` with `(e ^ raw) & !opaque_bits(raw, l) == 0`: the two differ
///    only in the bits the view does not carry. `encode(&PteView::Invalid(_), l)`
///    is always an error: a malformed entry is rejected, never re-encoded.
/// 9. [`publish_table_writes`](Self::publish_table_writes) does what its
///    documentation says on the architecture the format describes.
pub unsafe trait PteFormat {
    /// The geometry this format's tables follow.
    type Geometry: PagingGeometry;

    /// The flags `decode` reports for the plain directory entry
    /// [`directory`](Self::directory) builds: every permission the format's
    /// directories can grant, so leaves decide. A format whose directories
    /// carry no permission bits (RISC-V) reports `READ | WRITE | EXEC | USER`.
    const DIRECTORY: LeafFlags;

    /// Reads a raw entry found at `level`.
    fn decode(raw: u64, level: usize) -> PteView;

    /// Produces the raw entry for `view` at `level`, or
    /// [`crate::Error::Unencodable`]. Bits the view does not describe (memory
    /// type, shareability, hints, unused software bits) are left 0.
    fn encode(view: &PteView, level: usize) -> crate::Result<u64>;

    /// The bits of `raw` (found at `level`) that `decode` does not carry into
    /// its view: memory type and cache attributes, shareability, hints,
    /// software bits outside the format's special-entry layout, frame bits
    /// below a huge leaf's span. A kernel that rewrites an entry from a view
    /// keeps them with `(encode(&view, l)? & !o) | (raw & o)`, where
    /// `o = opaque_bits(raw, l)` (contract item 8), when the new view is of
    /// the same kind as the old (a leaf's opaque bits may overlap the bits a
    /// software entry uses for its kind).
    fn opaque_bits(raw: u64, level: usize) -> u64;

    /// The raw entry at `level` pointing at the next-level table at `frame`,
    /// granting every permission (leaves decide): the one portable way to
    /// link a table, whatever bits the format's directories have.
    #[inline]
    fn directory(frame: u64, level: usize) -> crate::Result<u64> {
        Self::encode(&PteView::Table { frame, flags: Self::DIRECTORY }, level)
    }

    /// The common case of a walk's inner loop, without building a
    /// [`PteView`]: if `Some`, exactly `decode(raw, 0)`'s
    /// [`user_frame`](PteView::user_frame). `None` means "decode it": a
    /// format may answer `None` for rare user pages (a frame whose address
    /// bits need reassembling, an unusual memory type) to keep its test one
    /// mask, but must answer `Some` for the ordinary ones (contract item 6).
    /// A format overrides it with a direct test of its bits; the default
    /// decodes.
    #[inline]
    fn user_page(raw: u64) -> Option<(u64, bool)> {
        Self::decode(raw, 0).user_frame()
    }

    /// The barrier hmm-core issues after writing or clearing entries of a
    /// table in this format and before telling another agent about it (the
    /// device's `update`, `invalidate` and `flush` callbacks): once it
    /// returns, every store this CPU made to table memory before the call is
    /// visible to any agent that walks the tables (another CPU's MMU, a
    /// device, an IOMMU) and is told afterwards, by a store, an MMIO write or
    /// an interrupt. TLB maintenance stays the kernel's (CPU tables) or the
    /// device's (`DeviceOps::flush`). The default is a sequentially
    /// consistent fence; each architecture's formats use its own barrier.
    #[inline]
    fn publish_table_writes() {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    }
}

/// A page-table format a device's MMU walks: the format the
/// [`MirrorTable`](crate::pt::MirrorTable) of a [`Mirror`](crate::Mirror) is
/// written in, so that the table hmm-core maintains is the one the hardware
/// reads. [`soft::SoftFormat`] is a software device's format;
/// [`x86_64::X86_64`] serves an IOMMU that walks x86_64-format tables.
///
/// # Safety
/// On top of [`PteFormat`]'s contract:
/// 1. [`directory`](PteFormat::directory)`(frame, l)` succeeds for every
///    level `l >= 1` and every 4 KiB-aligned `frame` below 2^52.
/// 2. `encode(&PteView::Leaf { frame, flags }, l)` succeeds for every level
///    where `leaf_allowed(l)`, every `frame` below 2^52 aligned to the
///    level's span, and `flags` = `READ | USER` plus any of `WRITE`,
///    `ACCESSED`, `DIRTY`.
/// 3. With `COUNT_SHIFT = Some(s)`: bits `s .. s + 10` of every encoded
///    directory entry are 0, and both `decode` and the device's walker
///    ignore them in directory entries (the mirror keeps a count there).
pub unsafe trait DeviceFormat: PteFormat {
    /// First of 10 directory-entry bits the hardware ignores, where the
    /// mirror keeps the number of live entries of the table below (so an
    /// emptied directory is freed without scanning it). `None`: the format
    /// has no such bits, and the counts live in a companion frame per table
    /// above level 0, outside the hardware's entries (one more frame per
    /// directory table: about 1/512 more memory for 4 KiB mappings).
    const COUNT_SHIFT: Option<u32>;

    /// The page-sized leaf a fault writes for each 4 KiB page: must equal
    /// `encode(&PteView::Leaf { frame, flags: READ | USER (| WRITE) }, 0)`
    /// for every 4 KiB-aligned `frame` below 2^52 (contract item 2 makes it
    /// encodable). A format overrides it with plain bit operations; the
    /// default encodes.
    #[inline]
    fn page_leaf(frame: u64, write: bool) -> u64 {
        let mut flags = LeafFlags::READ | LeafFlags::USER;
        flags.set(LeafFlags::WRITE, write);
        Self::encode(&PteView::Leaf { frame, flags }, 0).expect("DeviceFormat contract: page leaves encode")
    }
}
