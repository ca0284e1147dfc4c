//! Raw table edits in simulated memory, in the CPU format `F`.
//!
//! Every entry is produced by `F::encode` (so the model and hmm-core agree
//! on the format by construction) and written with a Release store into the
//! `AtomicU64` that hmm-core's walker loads with Acquire. New tables are
//! zeroed and fully built before the single store that links them, so a
//! concurrent walker sees either nothing or a complete table.
//!
//! Every size and index comes from `F::Geometry`: the root is level
//! `LEVELS - 1`, an entry at `level` spans `level_shift(level)` bits, and the
//! user half is `0 .. 2^(VA_BITS - 1)` when addresses are sign-extended,
//! `0 .. 2^VA_BITS` otherwise. The model writes leaves at levels 0, 1 and 2
//! only (4 KiB, 2 MiB, 1 GiB), which [`check_format`] requires.
//!
//! Callers hold the model's page-table lock (and, to free tables, the mmap
//! lock for writing).

use crate::alloc::CountingAllocator;
use crate::phys::{SimPhys, PAGE};
use core::sync::atomic::{AtomicU64, Ordering};
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry};
use hmm_core::{Error, FrameAllocator, Result};

/// The geometry of format `F`.
type G<F> = <F as PteFormat>::Geometry;

fn format_name<F>() -> &'static str {
    core::any::type_name::<F>()
}

/// Panics unless the model can run on `F`: 4 KiB pages, 2 MiB entries at
/// level 1 and 1 GiB entries at level 2, leaves allowed at levels 0..=2, at
/// least 3 levels, and a user half the model can describe.
pub(crate) fn check_format<F: PteFormat>() {
    let name = format_name::<F>();
    assert!(G::<F>::PAGE_SHIFT == 12, "model: {name} does not have 4 KiB pages");
    assert!(G::<F>::LEVELS >= 3, "model: {name} has fewer than 3 levels");
    assert!(
        G::<F>::level_shift(1) == 21 && G::<F>::level_shift(2) == 30,
        "model: {name} does not have 2 MiB entries at level 1 and 1 GiB entries at level 2"
    );
    for level in 0..3 {
        assert!(G::<F>::leaf_allowed(level), "model: {name} cannot hold a leaf at level {level}");
    }
    assert!(G::<F>::VA_BITS < 64, "model: {name} has a 64-bit address space");
}

/// Level of the root table.
pub(crate) fn top<F: PteFormat>() -> usize {
    G::<F>::LEVELS - 1
}

/// One past the last user address: the lower half of a sign-extended space,
/// the whole space otherwise.
pub(crate) const fn user_end<F: PteFormat>() -> u64 {
    if G::<F>::SIGN_EXTEND {
        1 << (G::<F>::VA_BITS - 1)
    } else {
        1 << G::<F>::VA_BITS
    }
}

/// log2 of the span of an entry at `level`.
pub(crate) fn shift<F: PteFormat>(level: usize) -> u32 {
    G::<F>::level_shift(level)
}

/// Bytes spanned by a leaf of `order` (in 4 KiB pages).
pub(crate) fn order_size(order: u32) -> u64 {
    PAGE << order
}

/// Level holding leaves of `order` (0, 9 or 18).
pub(crate) fn order_level<F: PteFormat>(order: u32) -> usize {
    (0..3)
        .find(|&l| shift::<F>(l) == 12 + order)
        .unwrap_or_else(|| panic!("model: no level of {} holds leaves of order {order}", format_name::<F>()))
}

fn index<F: PteFormat>(va: u64, level: usize) -> usize {
    G::<F>::index(va, level)
}

fn slot(phys: &SimPhys, table: u64, idx: usize) -> &AtomicU64 {
    phys.word(table + idx as u64 * 8)
}

/// Encodes `view` at `level`, panicking with a clear message if `F` cannot:
/// the model only asks for entries every supported format must encode, so a
/// refusal is a bug of the format or of the test.
pub(crate) fn encode<F: PteFormat>(view: &PteView, level: usize) -> u64 {
    F::encode(view, level).unwrap_or_else(|e| {
        panic!("model: {} cannot encode {view:x?} at level {level} ({e}): the model needs it", format_name::<F>())
    })
}

/// The raw directory entry at `level` pointing at `table`: the format's
/// portable directory (`F::directory`, granting `F::DIRECTORY`: leaves
/// decide).
pub(crate) fn dir_raw<F: PteFormat>(table: u64, level: usize) -> u64 {
    F::directory(table, level).unwrap_or_else(|e| {
        panic!("model: {} cannot encode a directory to {table:#x} at level {level} ({e})", format_name::<F>())
    })
}

/// Leaf permissions for a user mapping.
pub(crate) fn leaf_flags(write: bool, exec: bool) -> LeafFlags {
    let mut f = LeafFlags::READ | LeafFlags::USER;
    f.set(LeafFlags::WRITE, write);
    f.set(LeafFlags::EXEC, exec);
    f
}

/// The raw leaf (or PROT_NONE) entry for `frame` at `level`.
pub(crate) fn leaf_raw<F: PteFormat>(frame: u64, level: usize, flags: LeafFlags, prot_none: bool) -> u64 {
    let view = if prot_none { PteView::ProtNone { frame, flags } } else { PteView::Leaf { frame, flags } };
    encode::<F>(&view, level)
}

/// The raw software entry `entry` at `level`.
pub(crate) fn special_raw<F: PteFormat>(entry: SpecialEntry, level: usize) -> u64 {
    encode::<F>(&PteView::Special(entry), level)
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
pub(crate) fn find<F: PteFormat>(phys: &SimPhys, root: u64, va: u64, target: usize) -> Slot {
    let mut table = root;
    let mut level = top::<F>();
    loop {
        let idx = index::<F>(va, level);
        let raw = slot(phys, table, idx).load(Ordering::Acquire);
        let here = Slot { level, table, idx, raw };
        if level == target {
            return here;
        }
        match F::decode(raw, level) {
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
pub(crate) fn leaf_slot<F: PteFormat>(phys: &SimPhys, root: u64, va: u64, target: usize) -> Slot {
    let s = find::<F>(phys, root, va, target);
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
pub(crate) fn prepare<F: PteFormat>(alloc: &CountingAllocator, root: u64, va: u64, target: usize) -> Result<Prepared> {
    let phys = alloc.phys();
    let slot = find::<F>(phys, root, va, target);
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
    pub(crate) fn link<F: PteFormat>(self, phys: &SimPhys, va: u64, target: usize) -> Slot {
        if self.tables.is_empty() {
            assert_eq!(self.slot.level, target);
            return self.slot;
        }
        // tables[i] sits at level slot.level - 1 - i; the entry linking it
        // is at level slot.level - i.
        for i in (1..self.tables.len()).rev() {
            let level = self.slot.level - i;
            slot(phys, self.tables[i - 1], index::<F>(va, level))
                .store(dir_raw::<F>(self.tables[i], level), Ordering::Release);
        }
        self.slot.store(phys, dir_raw::<F>(self.tables[0], self.slot.level));
        let bottom = *self.tables.last().expect("nonempty");
        Slot { level: target, table: bottom, idx: index::<F>(va, target), raw: 0 }
    }
}

fn free_unlinked(alloc: &CountingAllocator, tables: &[u64]) {
    for &t in tables {
        // SAFETY: `t` came from `alloc` in `prepare` and was never linked
        // into a table, so nothing can reach it.
        unsafe { alloc.free_frame(t) };
    }
}

/// Whether every entry of `table` (at `level`) is zero.
pub(crate) fn is_empty<F: PteFormat>(phys: &SimPhys, table: u64, level: usize) -> bool {
    (0..G::<F>::entries(level)).all(|i| slot(phys, table, i).load(Ordering::Acquire) == 0)
}

/// Builds a level-0 table holding the pages of the level-1 leaf `raw` (same
/// flags, PROT_NONE state and frames) in the zeroed table frame `table`.
pub(crate) fn fill_split<F: PteFormat>(phys: &SimPhys, table: u64, raw: u64) {
    let (frame, flags, prot_none) = match F::decode(raw, 1) {
        PteView::Leaf { frame, flags } => (frame, flags, false),
        PteView::ProtNone { frame, flags } => (frame, flags, true),
        other => panic!("split of a non-leaf entry {other:?}"),
    };
    for i in 0..G::<F>::entries(0) {
        let sub = leaf_raw::<F>(frame + i as u64 * PAGE, 0, flags, prot_none);
        slot(phys, table, i).store(sub, Ordering::Relaxed);
    }
}

/// Frees every table below `table` (at `level`) whose span lies inside
/// `[lo, hi]` and holds no entry, and clears the entries that linked them.
///
/// Requires the mmap lock for writing (no walker may be inside a freed
/// table) and the page-table lock.
pub(crate) fn prune<F: PteFormat>(alloc: &CountingAllocator, table: u64, level: usize, lo: u64, hi: u64) {
    if level == 0 {
        return;
    }
    let phys = alloc.phys();
    let span = 1u64 << shift::<F>(level);
    let mut va = lo;
    loop {
        let entry_base = va & !(span - 1);
        let entry_last = entry_base + (span - 1);
        let s = slot(phys, table, index::<F>(va, level));
        if let PteView::Table { frame, .. } = F::decode(s.load(Ordering::Acquire), level) {
            prune::<F>(alloc, frame, level - 1, va, entry_last.min(hi));
            if entry_base >= lo && entry_last <= hi && is_empty::<F>(phys, frame, level - 1) {
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
pub(crate) fn free_all_below<F: PteFormat>(alloc: &CountingAllocator, table: u64, level: usize) {
    let phys = alloc.phys();
    for i in 0..G::<F>::entries(level) {
        let s = slot(phys, table, i);
        let raw = s.load(Ordering::Acquire);
        match F::decode(raw, level) {
            PteView::Absent => {}
            PteView::Table { frame, .. } => {
                free_all_below::<F>(alloc, frame, level - 1);
                s.store(0, Ordering::Release);
                // SAFETY: unlinked above; the caller holds the mmap lock for
                // writing, so no walker is inside it.
                unsafe { alloc.free_frame(frame) };
            }
            other => panic!("model: leaf {other:?} left in a table at teardown"),
        }
    }
}
