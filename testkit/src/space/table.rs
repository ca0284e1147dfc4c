//! Raw x86_64 4-level table edits in simulated memory.
//!
//! Every entry is produced by `X86_64Level4::encode` (so the model and
//! hmm-core agree on the format by construction) and written with a Release
//! store into the `AtomicU64` that hmm-core's walker loads with Acquire. New
//! tables are zeroed and fully built before the single store that links them,
//! so a concurrent walker sees either nothing or a complete table.
//!
//! Callers hold the model's page-table lock (and, to free tables, the mmap
//! lock for writing).

use crate::alloc::CountingAllocator;
use crate::phys::{SimPhys, PAGE};
use core::sync::atomic::{AtomicU64, Ordering};
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_core::{Error, FrameAllocator, Result};

/// Level of the root table.
pub(crate) const TOP: usize = 3;
/// One past the last user address (the lower half of a 48-bit space).
pub(crate) const USER_END: u64 = 1 << 47;

/// Directory permissions: permissive, leaves decide.
const DIR_FLAGS: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER).union(LeafFlags::EXEC);

/// log2 of the span of an entry at `level`.
pub(crate) fn shift(level: usize) -> u32 {
    12 + 9 * level as u32
}

/// Bytes spanned by a leaf of `order` (in 4 KiB pages).
pub(crate) fn order_size(order: u32) -> u64 {
    PAGE << order
}

/// Level holding leaves of `order`.
pub(crate) fn order_level(order: u32) -> usize {
    (order / 9) as usize
}

fn index(va: u64, level: usize) -> usize {
    ((va >> shift(level)) & 511) as usize
}

fn slot(phys: &SimPhys, table: u64, idx: usize) -> &AtomicU64 {
    phys.word(table + idx as u64 * 8)
}

/// The raw directory entry pointing at `table`.
pub(crate) fn dir_raw(table: u64) -> u64 {
    X86_64Level4::encode(&PteView::Table { frame: table, flags: DIR_FLAGS }, 1).expect("directory entry encodes")
}

/// Leaf permissions for a user mapping.
pub(crate) fn leaf_flags(write: bool, exec: bool) -> LeafFlags {
    let mut f = LeafFlags::READ | LeafFlags::USER;
    f.set(LeafFlags::WRITE, write);
    f.set(LeafFlags::EXEC, exec);
    f
}

/// The raw leaf (or PROT_NONE) entry for `frame` at `level`.
pub(crate) fn leaf_raw(frame: u64, level: usize, flags: LeafFlags, prot_none: bool) -> u64 {
    let view = if prot_none { PteView::ProtNone { frame, flags } } else { PteView::Leaf { frame, flags } };
    X86_64Level4::encode(&view, level).expect("model leaf encodes")
}

/// Where a descent stopped: the entry at (`table`, `idx`) of `level`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) level: usize,
    pub(crate) table: u64,
    pub(crate) idx: usize,
    pub(crate) raw: u64,
}

impl Slot {
    pub(crate) fn store(&self, phys: &SimPhys, raw: u64) {
        slot(phys, self.table, self.idx).store(raw, Ordering::Release);
    }
}

/// Descends towards `va` until `target` level or a non-table entry.
pub(crate) fn find(phys: &SimPhys, root: u64, va: u64, target: usize) -> Slot {
    let mut table = root;
    let mut level = TOP;
    loop {
        let idx = index(va, level);
        let raw = slot(phys, table, idx).load(Ordering::Acquire);
        let here = Slot { level, table, idx, raw };
        if level == target {
            return here;
        }
        match X86_64Level4::decode(raw, level) {
            PteView::Table { frame, .. } => {
                table = frame;
                level -= 1;
            }
            _ => return here,
        }
    }
}

/// The entry at `target` level for `va`, which must exist (the caller knows
/// a leaf is there).
pub(crate) fn leaf_slot(phys: &SimPhys, root: u64, va: u64, target: usize) -> Slot {
    let s = find(phys, root, va, target);
    assert_eq!(s.level, target, "model: no table down to level {target} for {va:#x}");
    s
}

/// Tables needed to reach a level, allocated and zeroed but not linked yet.
pub(crate) struct Prepared {
    pub(crate) slot: Slot,
    tables: Vec<u64>,
}

/// Allocates whatever tables are missing between the root and `target` for
/// `va`, without linking them (so a failure leaves nothing behind).
/// The returned slot is where the descent stopped; if it is above `target`
/// and not empty, something (a huge leaf) is in the way and no table was
/// allocated.
pub(crate) fn prepare(alloc: &CountingAllocator, root: u64, va: u64, target: usize) -> Result<Prepared> {
    let phys = alloc.phys();
    let slot = find(phys, root, va, target);
    let mut tables = Vec::new();
    if slot.level > target && slot.raw == 0 {
        for _ in target..slot.level {
            match alloc.alloc_frame() {
                Some(t) => {
                    phys.zero(t, PAGE);
                    tables.push(t);
                }
                None => {
                    free_unlinked(alloc, &tables);
                    return Err(Error::NoMemory);
                }
            }
        }
    }
    Ok(Prepared { slot, tables })
}

impl Prepared {
    /// Whether the entry for the target level is reachable and empty once
    /// linked.
    pub(crate) fn is_clear(&self, target: usize) -> bool {
        self.slot.raw == 0 && (self.slot.level == target || !self.tables.is_empty())
    }

    /// Frees the unlinked tables.
    pub(crate) fn abort(self, alloc: &CountingAllocator) {
        free_unlinked(alloc, &self.tables);
    }

    /// Links the prepared tables (bottom-up, the top link last) and returns
    /// the now reachable, empty entry at `target` for `va`.
    pub(crate) fn link(self, phys: &SimPhys, va: u64, target: usize) -> Slot {
        if self.tables.is_empty() {
            assert_eq!(self.slot.level, target);
            return self.slot;
        }
        // tables[i] sits at level slot.level - 1 - i.
        for i in (1..self.tables.len()).rev() {
            let level = self.slot.level - i;
            slot(phys, self.tables[i - 1], index(va, level)).store(dir_raw(self.tables[i]), Ordering::Release);
        }
        self.slot.store(phys, dir_raw(self.tables[0]));
        let bottom = *self.tables.last().expect("nonempty");
        Slot { level: target, table: bottom, idx: index(va, target), raw: 0 }
    }
}

fn free_unlinked(alloc: &CountingAllocator, tables: &[u64]) {
    for &t in tables {
        // SAFETY: `t` came from `alloc` in `prepare` and was never linked
        // into a table, so nothing can reach it.
        unsafe { alloc.free_frame(t) };
    }
}

/// Whether every entry of `table` is zero.
pub(crate) fn is_empty(phys: &SimPhys, table: u64) -> bool {
    (0..512).all(|i| slot(phys, table, i).load(Ordering::Acquire) == 0)
}

/// Builds a level-0 table holding the pages of the level-1 leaf `raw` (same
/// flags, PROT_NONE state and frames) in the zeroed table frame `table`.
pub(crate) fn fill_split(phys: &SimPhys, table: u64, raw: u64) {
    let (frame, flags, prot_none) = match X86_64Level4::decode(raw, 1) {
        PteView::Leaf { frame, flags } => (frame, flags, false),
        PteView::ProtNone { frame, flags } => (frame, flags, true),
        other => panic!("split of a non-leaf entry {other:?}"),
    };
    for i in 0..512u64 {
        let sub = leaf_raw(frame + i * PAGE, 0, flags, prot_none);
        slot(phys, table, i as usize).store(sub, Ordering::Relaxed);
    }
}

/// Frees every table below `table` (at `level`) whose span lies inside
/// `[lo, hi]` and holds no entry, and clears the entries that linked them.
///
/// Requires the mmap lock for writing (no walker may be inside a freed
/// table) and the page-table lock.
pub(crate) fn prune(alloc: &CountingAllocator, table: u64, level: usize, lo: u64, hi: u64) {
    if level == 0 {
        return;
    }
    let phys = alloc.phys();
    let span = 1u64 << shift(level);
    let mut va = lo;
    loop {
        let entry_base = va & !(span - 1);
        let entry_last = entry_base + (span - 1);
        let s = slot(phys, table, index(va, level));
        if let PteView::Table { frame, .. } = X86_64Level4::decode(s.load(Ordering::Acquire), level) {
            prune(alloc, frame, level - 1, va, entry_last.min(hi));
            if entry_base >= lo && entry_last <= hi && is_empty(phys, frame) {
                s.store(0, Ordering::Release);
                // SAFETY: the table is unlinked and empty, and the caller
                // holds the mmap lock for writing, so no walker is inside it.
                unsafe { alloc.free_frame(frame) };
            }
        }
        if entry_last >= hi {
            return;
        }
        va = entry_last + 1;
    }
}

/// Frees every table below `table` (at `level`) and clears the links. All
/// leaves must already be gone. Same locking as [`prune`].
pub(crate) fn free_all_below(alloc: &CountingAllocator, table: u64, level: usize) {
    let phys = alloc.phys();
    for i in 0..512 {
        let s = slot(phys, table, i);
        let raw = s.load(Ordering::Acquire);
        match X86_64Level4::decode(raw, level) {
            PteView::Absent => {}
            PteView::Table { frame, .. } => {
                free_all_below(alloc, frame, level - 1);
                s.store(0, Ordering::Release);
                // SAFETY: unlinked above; the caller holds the mmap lock for
                // writing, so no walker is inside it.
                unsafe { alloc.free_frame(frame) };
            }
            other => panic!("model: leaf {other:?} left in a table at teardown"),
        }
    }
}
