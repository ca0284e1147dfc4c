//! The device-side mirror page table: a multi-level radix tree, geometry
//! chosen by the device, 4 KiB entries of frame + VALID / WRITE / DIRTY plus
//! bits reserved for the driver.
//!
//! Directory entries count their table's non-empty entries in their spare
//! bits, so a directory that empties is freed without scanning it. All
//! mutation happens under the owning mirror's update lock; entries are
//! written atomically so a lockless device-side walker sees whole entries.
//! Directories are freed only by [`MirrorTable::prune`], which the mirror
//! calls after the device flushed its TLB.

use crate::arch::{check_geometry, PagingGeometry};
use crate::frame::FrameAllocator;
use crate::phys::{entry, AtomicEntry, PhysMem};
use crate::range::VaRange;
use crate::{Error, Result};
use core::marker::PhantomData;
use core::sync::atomic::Ordering;

/// One device-side translation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MirrorEntry(u64);

impl MirrorEntry {
    const VALID: u64 = 1 << 0;
    const WRITE: u64 = 1 << 1;
    const DIRTY: u64 = 1 << 2;
    const DRIVER_SHIFT: u32 = 3;
    const DRIVER_MASK: u64 = 0x1ff << Self::DRIVER_SHIFT;
    const FRAME_MASK: u64 = !0xfff;

    /// A valid entry for the 4 KiB-aligned `frame`; `driver` is up to 9 bits
    /// the driver may use as it likes.
    pub const fn new(frame: u64, write: bool, driver: u16) -> Self {
        let mut v =
            Self::VALID | (frame & Self::FRAME_MASK) | (((driver as u64) << Self::DRIVER_SHIFT) & Self::DRIVER_MASK);
        if write {
            v |= Self::WRITE;
        }
        Self(v)
    }
    /// Physical address of the frame.
    pub const fn frame(self) -> u64 {
        self.0 & Self::FRAME_MASK
    }
    /// Whether the device may write.
    pub const fn is_write(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    /// Whether the device wrote (set by [`MirrorTable::mark_dirty`]).
    pub const fn is_dirty(self) -> bool {
        self.0 & Self::DIRTY != 0
    }
    /// The driver's bits.
    pub const fn driver(self) -> u16 {
        ((self.0 & Self::DRIVER_MASK) >> Self::DRIVER_SHIFT) as u16
    }
    const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }
}

/// Directory entry: bit 0 valid, bits 1..=11 live-entry count of the child,
/// bits 12.. the child frame.
const DIR_VALID: u64 = 1;
const COUNT_SHIFT: u32 = 1;
const COUNT_MASK: u64 = 0x7ff << COUNT_SHIFT;

fn count(dir: u64) -> u64 {
    (dir & COUNT_MASK) >> COUNT_SHIFT
}

fn with_count(dir: u64, n: u64) -> u64 {
    (dir & !COUNT_MASK) | (n << COUNT_SHIFT)
}

/// Adjusts the live count kept in `parent` (none for the root).
fn add_count(parent: Option<&AtomicEntry>, delta: i64) {
    if let Some(p) = parent {
        let v = p.load(Ordering::Relaxed);
        p.store(with_count(v, count(v).wrapping_add_signed(delta)), Ordering::Release);
    }
}

/// A device-side radix table over geometry `G`.
#[derive(Debug)]
pub struct MirrorTable<G: PagingGeometry> {
    root: u64,
    dirs: usize,
    _g: PhantomData<fn() -> G>,
}

/// Allocates a zeroed table frame.
fn alloc_table<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(phys: &P, alloc: &A) -> Result<u64> {
    let frame = alloc.alloc_frame().ok_or(Error::NoMemory)?;
    // Entries are only ever touched atomically (a device walker may read a
    // table while it is linked), so zero it the same way, not with a memset.
    for index in 0..512 {
        // SAFETY: the frame was just allocated to us: a live, 4 KiB-aligned
        // frame of `phys`, and `index < 512`.
        unsafe { entry(phys, frame, index) }.store(0, Ordering::Relaxed);
    }
    Ok(frame)
}

impl<G: PagingGeometry> MirrorTable<G> {
    /// An empty table (one root frame).
    ///
    /// Errors: [`Error::BadGeometry`] if `G` fails [`check_geometry`] (its
    /// index bits do not add up to `VA_BITS`, so distinct addresses would
    /// share entries) or does not describe 4 KiB pages with tables of at most
    /// 512 entries (every table is one 4 KiB frame and every entry one 4 KiB
    /// page), [`Error::NoMemory`].
    pub fn new<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(phys: &P, alloc: &A) -> Result<Self> {
        Self::check_geometry()?;
        Ok(Self { root: alloc_table(phys, alloc)?, dirs: 1, _g: PhantomData })
    }

    /// Whether a table of geometry `G` can be built: [`Error::BadGeometry`]
    /// as in [`new`](Self::new), without allocating.
    pub fn check_geometry() -> Result<()> {
        let valid = check_geometry(G::LEVELS, G::PAGE_SHIFT, G::INDEX_BITS, G::VA_BITS, G::LEAF_LEVELS);
        // With 4 KiB pages, `check_geometry` already keeps every level within
        // one 4 KiB table (at most 9 index bits).
        if !valid || G::PAGE_SHIFT != 12 {
            return Err(Error::BadGeometry);
        }
        Ok(())
    }

    /// Physical address of the root (for a device that walks it itself).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Table frames in use, root included.
    pub fn table_frames(&self) -> usize {
        self.dirs
    }

    /// The translation of `va`, if valid.
    pub fn lookup<P: PhysMem + ?Sized>(&self, phys: &P, va: u64) -> Option<MirrorEntry> {
        if !G::is_canonical(va) {
            return None;
        }
        let mut table = self.root;
        let mut level = G::LEVELS - 1;
        loop {
            // SAFETY: `table` is a live table of this tree (we own all of
            // them) and the index comes from the geometry.
            let raw = unsafe { entry(phys, table, G::index(va, level)) }.load(Ordering::Acquire);
            if level == 0 {
                let e = MirrorEntry(raw);
                return e.is_valid().then_some(e);
            }
            if raw & DIR_VALID == 0 {
                return None;
            }
            table = raw & !0xfff;
            level -= 1;
        }
    }

    /// Makes sure every directory covering `range` exists. On
    /// [`Error::NoMemory`], the directories it created are freed again and
    /// the table is as before.
    pub fn reserve<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        range: VaRange,
    ) -> Result<()> {
        range.check::<G>()?;
        let r = self.reserve_in(phys, alloc, self.root, G::LEVELS - 1, range.start(), range.last(), None);
        if r.is_err() {
            self.prune(phys, alloc, range);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn reserve_in<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        table: u64,
        level: usize,
        start: u64,
        last: u64,
        parent: Option<&AtomicEntry>,
    ) -> Result<()> {
        if level == 0 {
            return Ok(());
        }
        let mask = (1u64 << G::level_shift(level)) - 1;
        let mut va = start;
        loop {
            let entry_last = (va | mask).min(last);
            // SAFETY: live table of this tree, index from the geometry.
            let slot = unsafe { entry(phys, table, G::index(va, level)) };
            let mut raw = slot.load(Ordering::Relaxed);
            if raw & DIR_VALID == 0 {
                let frame = alloc_table(phys, alloc)?;
                self.dirs += 1;
                raw = frame | DIR_VALID;
                slot.store(raw, Ordering::Release);
                add_count(parent, 1);
            }
            self.reserve_in(phys, alloc, raw & !0xfff, level - 1, va, entry_last, Some(slot))?;
            if entry_last == last {
                return Ok(());
            }
            va = entry_last + 1;
        }
    }

    /// Writes the entry `f(va)` (or clears it for `None`) for every page of
    /// `range`. Directories must exist ([`reserve`](Self::reserve)); pages
    /// without one are skipped, and so is a range `G` cannot translate.
    pub fn set<P: PhysMem + ?Sized>(
        &mut self,
        phys: &P,
        range: VaRange,
        f: &mut dyn FnMut(u64) -> Option<MirrorEntry>,
    ) {
        if range.check::<G>().is_err() {
            return;
        }
        Self::update_in(phys, self.root, G::LEVELS - 1, range.start(), range.last(), None, f);
    }

    /// Clears every entry of `range`; returns how many were valid. Empty
    /// directories stay until [`prune`](Self::prune).
    pub fn clear<P: PhysMem + ?Sized>(&mut self, phys: &P, range: VaRange) -> u64 {
        if range.check::<G>().is_err() {
            return 0;
        }
        Self::update_in(phys, self.root, G::LEVELS - 1, range.start(), range.last(), None, &mut |_| None)
    }

    /// Sets DIRTY on the entry of `va` if valid; returns whether it was.
    pub fn mark_dirty<P: PhysMem + ?Sized>(&mut self, phys: &P, va: u64) -> bool {
        let Some(e) = self.lookup(phys, va) else { return false };
        let r = VaRange::from_inclusive(va & !0xfff, (va & !0xfff) + 0xfff);
        self.set(phys, r, &mut |_| Some(MirrorEntry(e.0 | MirrorEntry::DIRTY)));
        true
    }

    /// Returns the number of entries that were valid before.
    fn update_in<P: PhysMem + ?Sized>(
        phys: &P,
        table: u64,
        level: usize,
        start: u64,
        last: u64,
        parent: Option<&AtomicEntry>,
        f: &mut dyn FnMut(u64) -> Option<MirrorEntry>,
    ) -> u64 {
        let mask = (1u64 << G::level_shift(level)) - 1;
        let mut was_valid = 0;
        let mut va = start;
        loop {
            let entry_last = (va | mask).min(last);
            // SAFETY: live table of this tree, index from the geometry.
            let slot = unsafe { entry(phys, table, G::index(va, level)) };
            let raw = slot.load(Ordering::Relaxed);
            if level == 0 {
                let old = MirrorEntry(raw).is_valid();
                let new = f(va).unwrap_or_default();
                slot.store(new.0, Ordering::Release);
                was_valid += old as u64;
                add_count(parent, new.is_valid() as i64 - old as i64);
            } else if raw & DIR_VALID != 0 {
                was_valid += Self::update_in(phys, raw & !0xfff, level - 1, va, entry_last, Some(slot), f);
            }
            if entry_last == last {
                return was_valid;
            }
            va = entry_last + 1;
        }
    }

    /// Frees every directory under `range` that holds no entry. Call only
    /// after the device can no longer walk them (its TLB was flushed).
    pub fn prune<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(&mut self, phys: &P, alloc: &A, range: VaRange) {
        if range.check::<G>().is_err() {
            return;
        }
        let freed = Self::prune_in(phys, alloc, self.root, G::LEVELS - 1, range.start(), range.last(), None);
        self.dirs -= freed;
    }

    fn prune_in<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        phys: &P,
        alloc: &A,
        table: u64,
        level: usize,
        start: u64,
        last: u64,
        parent: Option<&AtomicEntry>,
    ) -> usize {
        if level == 0 {
            return 0;
        }
        let mask = (1u64 << G::level_shift(level)) - 1;
        let mut freed = 0;
        let mut va = start;
        loop {
            let entry_last = (va | mask).min(last);
            // SAFETY: live table of this tree, index from the geometry.
            let slot = unsafe { entry(phys, table, G::index(va, level)) };
            let raw = slot.load(Ordering::Relaxed);
            if raw & DIR_VALID != 0 {
                freed += Self::prune_in(phys, alloc, raw & !0xfff, level - 1, va, entry_last, Some(slot));
                let raw = slot.load(Ordering::Relaxed);
                if count(raw) == 0 {
                    slot.store(0, Ordering::Release);
                    add_count(parent, -1);
                    // SAFETY: the directory came from `alloc`, holds no live
                    // entry, and is now unlinked; the caller guarantees the
                    // device no longer walks it.
                    unsafe { alloc.free_frame(raw & !0xfff) };
                    freed += 1;
                }
            }
            if entry_last == last {
                return freed;
            }
            va = entry_last + 1;
        }
    }

    /// Frees every table frame. The device must no longer use the table.
    pub fn destroy<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(self, phys: &P, alloc: &A) {
        Self::free_all(phys, alloc, self.root, G::LEVELS - 1);
    }

    fn free_all<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(phys: &P, alloc: &A, table: u64, level: usize) {
        if level > 0 {
            for i in 0..G::entries(level) {
                // SAFETY: live table of this tree, `i` below its size.
                let raw = unsafe { entry(phys, table, i) }.load(Ordering::Relaxed);
                if raw & DIR_VALID != 0 {
                    Self::free_all(phys, alloc, raw & !0xfff, level - 1);
                }
            }
        }
        // SAFETY: every table frame of the tree came from `alloc`, and the
        // caller guarantees nobody walks the tree any more.
        unsafe { alloc.free_frame(table) };
    }
}
