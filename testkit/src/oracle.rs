//! The reference model: what the model kernel *means* to map, kept as a plain
//! map beside the real page tables.
//!
//! Why: hmm-core reads the real CPU tables; a test needs an independent
//! statement of what those tables should say to judge it. The model kernel
//! updates this map in the same step as every table write (under the same
//! lock), and [`ModelSpace::check_tables`](crate::ModelSpace::check_tables)
//! walks the tables and compares. Tests then compare hmm-core's output
//! (snapshots, device mirrors) against [`Oracle::expected_pfns`], which is
//! computed from this map alone, without touching a table.

use hmm_core::arch::SpecialEntry;
use hmm_core::pt::Pfn;
use hmm_core::VaRange;
use std::collections::BTreeMap;

/// One leaf as the model kernel intends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OracleLeaf {
    /// Physical address of the leaf's first byte (aligned to its size).
    pub frame: u64,
    /// log2 of the leaf size in 4 KiB pages: 0, 9 (2 MiB) or 18 (1 GiB).
    pub order: u32,
    /// Writable by user mode (and so by a device).
    pub write: bool,
    /// PROT_NONE: the frame stays but nobody may access it.
    pub prot_none: bool,
    /// The frame is the kernel's shared zero page.
    pub zero: bool,
    /// What owns the frame.
    pub backing: Backing,
}

/// Who owns a mapped frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Anonymous memory owned by page tables (refcounted; copy-on-write).
    Anon,
    /// The shared zero page.
    Zero,
    /// A frame of a [`SimFile`](crate::SimFile) (shared memory, file, driver
    /// pages of a mixed map).
    Object,
    /// A raw frame of an IO / PFN map (devices must never get it).
    Io,
}

/// One page as the oracle sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OraclePage {
    /// Physical address of this 4 KiB page.
    pub frame: u64,
    /// The leaf that maps it.
    pub leaf: OracleLeaf,
    /// Virtual address of that leaf.
    pub leaf_va: u64,
}

/// A software (non-present) entry the model keeps, planted by
/// [`ModelSpace::set_special`](crate::ModelSpace::set_special).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OracleSpecial {
    /// What the entry says.
    pub entry: SpecialEntry,
    /// log2 of the entry's span in 4 KiB pages: 0, 9 or 18.
    pub order: u32,
}

/// The reference map: leaf virtual address -> leaf, and entry virtual
/// address -> software entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Oracle {
    leaves: BTreeMap<u64, OracleLeaf>,
    specials: BTreeMap<u64, OracleSpecial>,
}

impl Oracle {
    /// Every leaf, by virtual address.
    pub fn leaves(&self) -> &BTreeMap<u64, OracleLeaf> {
        &self.leaves
    }

    /// Every software entry, by virtual address (not counted by
    /// [`len`](Self::len); snapshots report them as not present).
    pub fn specials(&self) -> &BTreeMap<u64, OracleSpecial> {
        &self.specials
    }

    /// The software entry covering `va`, with the entry's address.
    pub fn special_at(&self, va: u64) -> Option<(u64, OracleSpecial)> {
        let (&at, &s) = self.specials.range(..=va).next_back()?;
        (va - at < 4096u64 << s.order).then_some((at, s))
    }

    /// Every software entry overlapping `range`, in address order.
    pub fn specials_in(&self, range: VaRange) -> Vec<(u64, OracleSpecial)> {
        let first = self.special_at(range.start()).map_or(range.start(), |(at, _)| at);
        self.specials.range(first..=range.last()).map(|(&at, &s)| (at, s)).collect()
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// The leaf covering `va`, with the leaf's address.
    pub fn leaf_at(&self, va: u64) -> Option<(u64, OracleLeaf)> {
        let (&at, &leaf) = self.leaves.range(..=va).next_back()?;
        let size = 4096u64 << leaf.order;
        (va - at < size).then_some((at, leaf))
    }

    /// The page containing `va`.
    pub fn page(&self, va: u64) -> Option<OraclePage> {
        let (leaf_va, leaf) = self.leaf_at(va)?;
        Some(OraclePage { frame: leaf.frame + ((va & !0xfff) - leaf_va), leaf, leaf_va })
    }

    /// What a table-only snapshot of `range` must say, page by page: VALID
    /// (+WRITE) with the leaf order for a mapped page, ERROR for PROT_NONE,
    /// 0 for nothing. (The model maps every leaf user-accessible.)
    pub fn expected_pfns(&self, range: VaRange) -> Vec<Pfn> {
        let pages = range.pages(12) as usize;
        let mut out = vec![Pfn::NONE; pages];
        let lo = range.start();
        let hi = range.last();
        // Leaves starting before `lo` may still cover it.
        let first = self.leaf_at(lo).map_or(lo, |(at, _)| at);
        for (&at, leaf) in self.leaves.range(first..=hi) {
            let size = 4096u64 << leaf.order;
            let from = at.max(lo);
            let to = (at + size - 1).min(hi);
            for va in (from..=to).step_by(4096) {
                let i = ((va - lo) >> 12) as usize;
                out[i] = if leaf.prot_none {
                    Pfn::ERROR_ENTRY
                } else {
                    Pfn::valid(leaf.frame + (va - at), leaf.write, leaf.order)
                };
            }
        }
        out
    }

    /// Every leaf overlapping `range`, in address order.
    pub fn leaves_in(&self, range: VaRange) -> Vec<(u64, OracleLeaf)> {
        let first = self.leaf_at(range.start()).map_or(range.start(), |(at, _)| at);
        self.leaves.range(first..=range.last()).map(|(&at, &leaf)| (at, leaf)).collect()
    }

    pub(crate) fn insert(&mut self, va: u64, leaf: OracleLeaf) {
        debug_assert!(self.leaf_at(va).is_none(), "oracle: {va:#x} already mapped");
        debug_assert!(self.special_at(va).is_none(), "oracle: {va:#x} holds a software entry");
        self.leaves.insert(va, leaf);
    }

    pub(crate) fn insert_special(&mut self, va: u64, special: OracleSpecial) {
        debug_assert!(self.leaf_at(va).is_none(), "oracle: {va:#x} already mapped");
        debug_assert!(self.special_at(va).is_none(), "oracle: {va:#x} holds a software entry");
        self.specials.insert(va, special);
    }

    pub(crate) fn remove_special(&mut self, va: u64) -> Option<OracleSpecial> {
        self.specials.remove(&va)
    }

    pub(crate) fn special_mut(&mut self, va: u64) -> Option<&mut OracleSpecial> {
        self.specials.get_mut(&va)
    }

    pub(crate) fn remove(&mut self, va: u64) -> Option<OracleLeaf> {
        self.leaves.remove(&va)
    }

    pub(crate) fn get_mut(&mut self, va: u64) -> Option<&mut OracleLeaf> {
        self.leaves.get_mut(&va)
    }

    pub(crate) fn clear(&mut self) {
        self.leaves.clear();
        self.specials.clear();
    }
}
