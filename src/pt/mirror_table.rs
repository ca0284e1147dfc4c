//! The device-side mirror table: a radix tree in the device's own page-table
//! format ([`DeviceFormat`]), the very table a device's MMU walks.
//!
//! Split in two: [`MirrorTable`] is what walkers share (the root and a
//! [`WalkGate`]); [`TableWriter`] is the one writer (the mirror keeps it
//! under its update lock).
//!
//! # Protocol: walkers never take a lock
//! A hardware walker, or [`MirrorTable::translate`], may run at any moment.
//! So the writer keeps every path a walker can take whole:
//! - A directory is zeroed before it is linked (a Release store), so a walker
//!   that follows the link finds empty entries, never garbage.
//! - Every entry is one atomic 8-byte store: a walker sees it old or new.
//! - A huge leaf is written only into an empty slot or over a leaf of the
//!   same level; a slot that holds a directory is descended instead.
//! - Clearing stores 0 into leaves; a directory left without live entries
//!   is unlinked in the same pass and put on a [`Reclaim`] list.
//! - The caller then has the device drop its cached translations and cached
//!   directory entries for the range (`DeviceOps::invalidate` + `flush`).
//! - Only then [`TableWriter::reclaim`] frees the unlinked frames, after a
//!   grace period for software walkers ([`WalkGate::synchronize`]).
//!
//! The same rule holds on error paths: a directory created by a
//! [`map`](TableWriter::map) that failed with `NoMemory` stays linked (empty)
//! until a [`clear`](TableWriter::clear) of its range unlinks it and the
//! device flushed.
//!
//! # Live counts
//! Each directory entry's table has a count of its live entries, so an
//! emptied directory is found without scanning it. Where the format has 10
//! spare directory bits ([`DeviceFormat::COUNT_SHIFT`]) the count lives
//! there; otherwise every table above level 0 (the root included) gets a
//! companion frame whose word `i` holds the count of child `i` (bits 0..=9)
//! and the child's own companion (bits 12..), outside anything the hardware
//! reads.

use crate::arch::{check_geometry, DeviceFormat, LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::frame::FrameAllocator;
use crate::phys::{entry, AtomicEntry, PhysMem};
use crate::range::VaRange;
use crate::sync::shim::AtomicU64;
use crate::sync::WalkGate;
use crate::{Error, Result};
use core::marker::PhantomData;
use core::sync::atomic::Ordering;

/// One device-side translation, as a walker finds it for one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MirrorEntry {
    frame: u64,
    write: bool,
    dirty: bool,
    order: u32,
}

impl MirrorEntry {
    /// Physical address of the 4 KiB frame backing the looked-up page.
    pub const fn frame(self) -> u64 {
        self.frame
    }
    /// Whether the device may write.
    pub const fn is_write(self) -> bool {
        self.write
    }
    /// Whether the entry says the device wrote (a format with a dirty bit).
    pub const fn is_dirty(self) -> bool {
        self.dirty
    }
    /// log2 of the leaf's size in 4 KiB pages: 0, 9 (2 MiB), 18 (1 GiB).
    pub const fn order(self) -> u32 {
        self.order
    }
}

/// Counters of one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TableStats {
    /// Frames the table holds: root, directories and companions.
    pub frames: usize,
    /// Live leaf entries.
    pub leaves: u64,
    /// Live leaves above level 0 (huge entries), included in `leaves`.
    pub huge_leaves: u64,
}

/// What a [`TableWriter::clear`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cleared {
    /// Leaf entries removed.
    pub entries: u64,
    /// 4 KiB pages those entries mapped.
    pub pages: u64,
    /// Smallest range holding every removed leaf: wider than the cleared
    /// range when a huge leaf only partly inside it went whole.
    pub extent: Option<VaRange>,
}

/// Why a [`TableWriter::map`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MapError {
    /// A frame allocation failed, or the range is invalid for the format.
    Failed(Error),
    /// A huge leaf over this range stands where smaller leaves must go
    /// (the CPU now maps it in smaller pieces): clear it, flush, map again.
    HugeInTheWay(VaRange),
}

/// Directory frames unlinked by a [`clear`](TableWriter::clear), freed by
/// [`reclaim`](TableWriter::reclaim) once the device flushed.
#[derive(Debug, Default)]
pub struct Reclaim {
    frames: heapless::Vec<u64, 64>,
    full: bool,
}

impl Reclaim {
    /// An empty list (it lives on the stack: no allocation in callbacks).
    pub const fn new() -> Self {
        Self { frames: heapless::Vec::new(), full: false }
    }
    /// Whether frames wait to be freed.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
    /// Whether an empty directory stayed linked for lack of room: after
    /// reclaiming, clear the range again to unlink the rest.
    pub fn overflowed(&self) -> bool {
        self.full
    }
}

/// What walkers share: the root and the gate they walk in.
#[derive(Debug)]
pub struct MirrorTable<F: DeviceFormat> {
    // 0 once destroyed.
    root: AtomicU64,
    gate: WalkGate,
    _f: PhantomData<fn() -> F>,
}

/// A table at some level and its companion frame (0 without one).
#[derive(Clone, Copy, Debug)]
struct Node {
    table: u64,
    meta: u64,
}

/// Where the live count of one table is kept: a word of its parent table
/// (at `shift`) or of the parent's companion (at 0).
#[derive(Clone, Copy, Debug)]
struct CountAt {
    table: u64,
    index: usize,
    shift: u32,
}

const COUNT_MASK: u64 = 0x3ff;
const ADDR_MASK: u64 = !0xfff;

/// The level-0 table the last [`TableWriter::map`] wrote into.
#[derive(Clone, Copy, Debug)]
struct LeafCache {
    base: u64,
    last: u64,
    table: u64,
    count: Option<CountAt>,
}

/// The table's one writer.
#[derive(Debug)]
pub struct TableWriter<F: DeviceFormat> {
    root: Node,
    stats: TableStats,
    cache: Option<LeafCache>,
    _f: PhantomData<fn() -> F>,
}

type Geo<F> = <F as PteFormat>::Geometry;

/// Allocates a zeroed table frame.
fn alloc_table<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(phys: &P, alloc: &A) -> Result<u64> {
    let frame = alloc.alloc_frame().ok_or(Error::NoMemory)?;
    // Entries are only ever touched atomically (a walker may read a table
    // while it is linked), so zero it the same way, not with a memset.
    let entries = phys.ptr(frame) as *mut u64;
    for index in 0..512 {
        // SAFETY: the frame was just allocated to us: a live, 4 KiB-aligned
        // frame of `phys`, valid as a whole (`PhysMem` contract), and
        // `index < 512`.
        unsafe { AtomicEntry::from_ptr(entries.add(index)) }.store(0, Ordering::Relaxed);
    }
    Ok(frame)
}

fn count_get<P: PhysMem + ?Sized>(phys: &P, at: CountAt) -> u64 {
    // SAFETY: `at` names a word of a live table or companion of this tree.
    (unsafe { entry(phys, at.table, at.index) }.load(Ordering::Relaxed) >> at.shift) & COUNT_MASK
}

fn count_add<P: PhysMem + ?Sized>(phys: &P, at: Option<CountAt>, delta: i64) {
    if let Some(at) = at {
        // SAFETY: as in `count_get`.
        let word = unsafe { entry(phys, at.table, at.index) };
        let v = word.load(Ordering::Relaxed);
        let n = ((v >> at.shift) & COUNT_MASK).wrapping_add_signed(delta) & COUNT_MASK;
        word.store((v & !(COUNT_MASK << at.shift)) | (n << at.shift), Ordering::Release);
    }
}

impl<F: DeviceFormat> MirrorTable<F> {
    /// An empty table (one root frame, plus its companion if the format
    /// keeps counts outside its entries) and its writer.
    ///
    /// Errors: [`Error::BadGeometry`] (see [`check_geometry`](Self::check_geometry)),
    /// [`Error::NoMemory`].
    pub fn new<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(phys: &P, alloc: &A) -> Result<(Self, TableWriter<F>)> {
        Self::check_geometry()?;
        let table = alloc_table(phys, alloc)?;
        let meta = if Self::companions() && Geo::<F>::LEVELS > 1 {
            match alloc_table(phys, alloc) {
                Ok(m) => m,
                Err(e) => {
                    // SAFETY: just allocated, never linked anywhere.
                    unsafe { alloc.free_frame(table) };
                    return Err(e);
                }
            }
        } else {
            0
        };
        let frames = 1 + (meta != 0) as usize;
        let writer = TableWriter {
            root: Node { table, meta },
            stats: TableStats { frames, ..TableStats::default() },
            cache: None,
            _f: PhantomData,
        };
        Ok((Self { root: AtomicU64::new(table), gate: WalkGate::new(), _f: PhantomData }, writer))
    }

    /// Whether a table of format `F` can be built: [`Error::BadGeometry`] if
    /// its geometry fails [`check_geometry`] (index bits not adding up to
    /// `VA_BITS` would alias addresses) or its pages are not 4 KiB (every
    /// table is one 4 KiB frame).
    pub fn check_geometry() -> Result<()> {
        type G<F> = Geo<F>;
        let valid = check_geometry(
            G::<F>::LEVELS,
            G::<F>::PAGE_SHIFT,
            G::<F>::INDEX_BITS,
            G::<F>::VA_BITS,
            G::<F>::LEAF_LEVELS,
        );
        if !valid || G::<F>::PAGE_SHIFT != 12 {
            return Err(Error::BadGeometry);
        }
        Ok(())
    }

    fn companions() -> bool {
        F::COUNT_SHIFT.is_none()
    }

    /// Physical address of the root, what a driver hands its hardware (0
    /// once the table is destroyed).
    pub fn root(&self) -> u64 {
        self.root.load(Ordering::Acquire)
    }

    /// The translation of `va`, walking without any lock, as the device's
    /// MMU would. Safe at any time: directories are freed only after a
    /// grace period for walkers in here.
    pub fn translate<P: PhysMem + ?Sized>(&self, phys: &P, va: u64) -> Option<MirrorEntry> {
        type G<F> = Geo<F>;
        if !G::<F>::is_canonical(va) {
            return None;
        }
        let _inside = self.gate.enter();
        let mut table = self.root.load(Ordering::Acquire);
        if table == 0 {
            return None;
        }
        let mut level = G::<F>::LEVELS - 1;
        loop {
            // SAFETY: `table` was reachable from the live root while we are
            // inside the gate: it is freed only after a `synchronize` that
            // waits for us. The index comes from the geometry.
            let raw = unsafe { entry(phys, table, G::<F>::index(va, level)) }.load(Ordering::Acquire);
            match F::decode(raw, level) {
                PteView::Table { frame, .. } if level > 0 => {
                    table = frame;
                    level -= 1;
                }
                PteView::Leaf { frame, flags } => {
                    let shift = G::<F>::level_shift(level);
                    return Some(MirrorEntry {
                        frame: frame + (va & ((1u64 << shift) - 1) & ADDR_MASK),
                        write: flags.contains(LeafFlags::WRITE),
                        dirty: flags.contains(LeafFlags::DIRTY),
                        order: shift - 12,
                    });
                }
                _ => return None,
            }
        }
    }
}

impl<F: DeviceFormat> TableWriter<F> {
    /// Counters of the table.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    fn count_at(node: Node, index: usize) -> CountAt {
        match F::COUNT_SHIFT {
            Some(shift) => CountAt { table: node.table, index, shift },
            None => CountAt { table: node.meta, index, shift: 0 },
        }
    }

    /// The child node linked at `index` of `node` (a directory at `level`).
    fn child<P: PhysMem + ?Sized>(phys: &P, node: Node, index: usize, level: usize, frame: u64) -> Node {
        let meta = if F::COUNT_SHIFT.is_none() && level >= 2 {
            // SAFETY: a live companion of this tree, index below 512.
            unsafe { entry(phys, node.meta, index) }.load(Ordering::Relaxed) & ADDR_MASK
        } else {
            0
        };
        Node { table: frame, meta }
    }

    /// Maps the physically contiguous run `range` -> `pa..` (readable, and
    /// writable if `write`), each piece with the largest leaf the format
    /// allows there, one descent per leaf table. Leaves already present are
    /// overwritten.
    ///
    /// Returns the leaf entries written and how many of them are huge.
    ///
    /// Errors: [`MapError::Failed`] with [`Error::NoMemory`] (pages before
    /// the failing one are mapped) or a range error;
    /// [`MapError::HugeInTheWay`].
    pub fn map<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        range: VaRange,
        pa: u64,
        write: bool,
    ) -> core::result::Result<(u64, u64), MapError> {
        range.check::<Geo<F>>().map_err(MapError::Failed)?;
        if pa & 0xfff != 0 {
            return Err(MapError::Failed(Error::Unaligned));
        }
        self.map_checked(phys, alloc, range, pa, write)
    }

    /// [`map`](Self::map) of a range already checked for the geometry, with
    /// `pa` 4 KiB-aligned.
    #[inline]
    pub(crate) fn map_checked<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        range: VaRange,
        pa: u64,
        write: bool,
    ) -> core::result::Result<(u64, u64), MapError> {
        let mut flags = LeafFlags::READ | LeafFlags::USER;
        flags.set(LeafFlags::WRITE, write);
        let (mut va, last) = (range.start(), range.last());
        let mut pa = pa;
        let (mut entries, mut huge) = (0, 0);
        loop {
            let level = self.map_one(phys, alloc, va, last, pa, flags)?;
            entries += 1;
            huge += (level > 0) as u64;
            let span = 1u64 << Geo::<F>::level_shift(level);
            if last - va < span {
                return Ok((entries, huge));
            }
            va += span;
            pa += span;
        }
    }

    /// Maps the one page at `va` (4 KiB-aligned, in the geometry) to `pa`:
    /// the per-page path of a fault, one store when the page's leaf table is
    /// the cached one. Errors as [`map`](Self::map).
    #[inline]
    pub(crate) fn map_page<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        va: u64,
        pa: u64,
        write: bool,
    ) -> core::result::Result<(), MapError> {
        match self.cache {
            Some(c) if c.base <= va && va <= c.last => {
                let raw = F::page_leaf(pa, write);
                // SAFETY: a live table of this tree, index from the geometry.
                let slot = unsafe { entry(phys, c.table, Geo::<F>::index(va, 0)) };
                let was_live = slot.load(Ordering::Relaxed) != 0;
                slot.store(raw, Ordering::Release);
                if !was_live {
                    count_add(phys, c.count, 1);
                    self.stats.leaves += 1;
                }
                Ok(())
            }
            _ => {
                let mut flags = LeafFlags::READ | LeafFlags::USER;
                flags.set(LeafFlags::WRITE, write);
                self.map_one(phys, alloc, va, va + 0xfff, pa, flags).map(drop)
            }
        }
    }

    /// Writes one leaf for `va` (as large as fits `[va, last]` and `pa`'s
    /// alignment); returns its level.
    #[inline]
    fn map_one<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        va: u64,
        last: u64,
        pa: u64,
        flags: LeafFlags,
    ) -> core::result::Result<usize, MapError> {
        type G<F> = Geo<F>;
        if let Some(c) = self.cache.filter(|c| c.base <= va && va <= c.last) {
            self.write_leaf(phys, c.table, G::<F>::index(va, 0), 0, c.count, pa, flags)?;
            return Ok(0);
        }
        let mut node = self.root;
        let mut count = None;
        let mut level = G::<F>::LEVELS - 1;
        loop {
            let index = G::<F>::index(va, level);
            // SAFETY: `node.table` is a live table of this tree, the index
            // comes from the geometry.
            let slot = unsafe { entry(phys, node.table, index) };
            let raw = slot.load(Ordering::Relaxed);
            let mask = (1u64 << G::<F>::level_shift(level)) - 1;
            let fits =
                level == 0 || (G::<F>::leaf_allowed(level) && va & mask == 0 && pa & mask == 0 && last - va >= mask);
            match F::decode(raw, level) {
                PteView::Absent | PteView::Leaf { .. } if fits => {
                    self.write_leaf(phys, node.table, index, level, count, pa, flags)?;
                    if level == 0 {
                        let up =
                            mask | if G::<F>::LEVELS > 1 { (1u64 << G::<F>::level_shift(1)) - 1 } else { u64::MAX };
                        self.cache = Some(LeafCache { base: va & !up, last: va | up, table: node.table, count });
                    }
                    return Ok(level);
                }
                PteView::Table { frame, .. } if level > 0 => {
                    count = Some(Self::count_at(node, index));
                    node = Self::child(phys, node, index, level, frame);
                }
                PteView::Absent if level > 0 => {
                    let child = self.new_directory(phys, alloc, node, index, level, count)?;
                    count = Some(Self::count_at(node, index));
                    node = child;
                }
                _ => {
                    let base = va & !mask;
                    return Err(MapError::HugeInTheWay(VaRange::from_inclusive(base, base | mask)));
                }
            }
            level -= 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn write_leaf<P: PhysMem + ?Sized>(
        &mut self,
        phys: &P,
        table: u64,
        index: usize,
        level: usize,
        count: Option<CountAt>,
        pa: u64,
        flags: LeafFlags,
    ) -> core::result::Result<(), MapError> {
        let raw = F::encode(&PteView::Leaf { frame: pa, flags }, level).map_err(MapError::Failed)?;
        // SAFETY: a live table of this tree, index from the geometry.
        let slot = unsafe { entry(phys, table, index) };
        let was_live = slot.load(Ordering::Relaxed) != 0;
        slot.store(raw, Ordering::Release);
        if !was_live {
            count_add(phys, count, 1);
            self.stats.leaves += 1;
            self.stats.huge_leaves += (level > 0) as u64;
        }
        Ok(())
    }

    /// Allocates, zeroes and links the table below slot `index` of `node`
    /// (a directory at `level`).
    fn new_directory<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(
        &mut self,
        phys: &P,
        alloc: &A,
        node: Node,
        index: usize,
        level: usize,
        count: Option<CountAt>,
    ) -> core::result::Result<Node, MapError> {
        let table = alloc_table(phys, alloc).map_err(MapError::Failed)?;
        let meta = if F::COUNT_SHIFT.is_none() && level >= 2 {
            match alloc_table(phys, alloc) {
                Ok(m) => m,
                Err(e) => {
                    // SAFETY: just allocated, never linked.
                    unsafe { alloc.free_frame(table) };
                    return Err(MapError::Failed(e));
                }
            }
        } else {
            0
        };
        let raw = F::directory(table, level).expect("DeviceFormat contract: directories encode");
        if F::COUNT_SHIFT.is_none() {
            // SAFETY: a live companion of this tree, index below 512.
            unsafe { entry(phys, node.meta, index) }.store(meta, Ordering::Relaxed);
        }
        // SAFETY: a live table of this tree. Release: a walker that follows
        // the link sees the zeroed table.
        unsafe { entry(phys, node.table, index) }.store(raw, Ordering::Release);
        count_add(phys, count, 1);
        self.stats.frames += 1 + (meta != 0) as usize;
        Ok(Node { table, meta })
    }

    /// Clears every leaf overlapping `range` (a huge leaf goes whole: see
    /// [`Cleared::extent`]) and unlinks the directories left empty, onto
    /// `reclaim` while it has room. The caller must have the device
    /// invalidate and flush the extent before [`reclaim`](Self::reclaim).
    /// A range the format cannot translate clears nothing.
    pub fn clear<P: PhysMem + ?Sized>(&mut self, phys: &P, range: VaRange, reclaim: &mut Reclaim) -> Cleared {
        self.cache = None;
        let mut out = Cleared::default();
        if range.check::<Geo<F>>().is_ok() {
            let top = Geo::<F>::LEVELS - 1;
            self.clear_in(phys, self.root, top, range.start(), range.last(), None, &mut out, reclaim);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn clear_in<P: PhysMem + ?Sized>(
        &mut self,
        phys: &P,
        node: Node,
        level: usize,
        start: u64,
        last: u64,
        count: Option<CountAt>,
        out: &mut Cleared,
        reclaim: &mut Reclaim,
    ) {
        type G<F> = Geo<F>;
        if level == 0 {
            return self.clear_pages(phys, node, start, last, count, out);
        }
        let mask = (1u64 << G::<F>::level_shift(level)) - 1;
        let mut va = start;
        loop {
            let entry_last = (va | mask).min(last);
            let index = G::<F>::index(va, level);
            // SAFETY: a live table of this tree, index from the geometry.
            let slot = unsafe { entry(phys, node.table, index) };
            let raw = slot.load(Ordering::Relaxed);
            match F::decode(raw, level) {
                PteView::Absent => {}
                PteView::Table { frame, .. } if level > 0 => {
                    let child = Self::child(phys, node, index, level, frame);
                    let child_count = Self::count_at(node, index);
                    self.clear_in(phys, child, level - 1, va, entry_last, Some(child_count), out, reclaim);
                    if count_get(phys, child_count) == 0 && reclaim.push(child) {
                        // Release: walkers that see the unlink see nothing below.
                        slot.store(0, Ordering::Release);
                        if F::COUNT_SHIFT.is_none() {
                            // SAFETY: a live companion of this tree.
                            unsafe { entry(phys, node.meta, index) }.store(0, Ordering::Relaxed);
                        }
                        count_add(phys, count, -1);
                    }
                }
                _ => {
                    // A leaf (the writer stores nothing else): it goes whole.
                    slot.store(0, Ordering::Release);
                    count_add(phys, count, -1);
                    self.stats.leaves -= 1;
                    self.stats.huge_leaves -= (level > 0) as u64;
                    let whole = VaRange::from_inclusive(va & !mask, va | mask);
                    out.entries += 1;
                    out.pages += (mask >> 12) + 1;
                    out.extent = Some(out.extent.map_or(whole, |e| e.hull(&whole)));
                }
            }
            if entry_last == last {
                return;
            }
            va = entry_last + 1;
        }
    }

    /// [`clear_in`](Self::clear_in) of a leaf table: every non-zero entry
    /// is a page leaf (the writer stores nothing else there), so one store
    /// each, and the counts and the extent once for the table.
    fn clear_pages<P: PhysMem + ?Sized>(
        &mut self,
        phys: &P,
        node: Node,
        start: u64,
        last: u64,
        count: Option<CountAt>,
        out: &mut Cleared,
    ) {
        let shift = Geo::<F>::PAGE_SHIFT;
        let first = Geo::<F>::index(start, 0);
        let len = ((last - start) >> shift) as usize + 1;
        // Valid for the whole frame: a live table of this tree (`PhysMem`).
        let entries = phys.ptr(node.table) as *mut u64;
        let (mut cleared, mut lo, mut hi) = (0u64, usize::MAX, 0);
        for i in first..first + len {
            // SAFETY: `first + len` stays inside the table: `[start, last]`
            // lies within one entry of the parent; atomic access only.
            let slot = unsafe { AtomicEntry::from_ptr(entries.add(i)) };
            if slot.load(Ordering::Relaxed) != 0 {
                // Release: as for every unlink (walkers see 0 or the leaf).
                slot.store(0, Ordering::Release);
                cleared += 1;
                lo = lo.min(i);
                hi = i;
            }
        }
        if cleared == 0 {
            return;
        }
        count_add(phys, count, -(cleared as i64));
        self.stats.leaves -= cleared;
        out.entries += cleared;
        out.pages += cleared;
        let base = start - ((first as u64) << shift);
        // `+ (page - 1)`, never `(hi + 1) << shift`: the table may end at 2^64.
        let whole =
            VaRange::from_inclusive(base + ((lo as u64) << shift), base + ((hi as u64) << shift) + ((1 << shift) - 1));
        out.extent = Some(out.extent.map_or(whole, |e| e.hull(&whole)));
    }

    /// Frees the frames on `reclaim` once every software walker that might
    /// still see them has left. Call only after the device flushed the
    /// range they were unlinked from.
    ///
    /// # Panics
    /// If `table` is not this writer's table.
    pub fn reclaim<A: FrameAllocator + ?Sized>(&mut self, table: &MirrorTable<F>, alloc: &A, reclaim: &mut Reclaim) {
        assert_eq!(table.root.load(Ordering::Relaxed), self.root.table, "TableWriter::reclaim: not its table");
        reclaim.full = false;
        if reclaim.frames.is_empty() {
            return;
        }
        table.gate.synchronize();
        for frame in reclaim.frames.drain(..) {
            // SAFETY: unlinked by `clear`, flushed from the device (caller),
            // and no software walker is left that saw it: nobody uses it.
            unsafe { alloc.free_frame(frame) };
            self.stats.frames -= 1;
        }
    }

    /// Frees every frame after making the root unreachable and waiting for
    /// software walkers. The device must no longer use the table.
    ///
    /// # Panics
    /// If `table` is not this writer's table.
    pub fn destroy<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(self, table: &MirrorTable<F>, phys: &P, alloc: &A) {
        assert_eq!(table.root.load(Ordering::Relaxed), self.root.table, "TableWriter::destroy: not its table");
        table.root.store(0, Ordering::Release);
        table.gate.synchronize();
        Self::free_all(phys, alloc, self.root, Geo::<F>::LEVELS - 1);
    }

    fn free_all<P: PhysMem + ?Sized, A: FrameAllocator + ?Sized>(phys: &P, alloc: &A, node: Node, level: usize) {
        if level > 0 {
            for index in 0..Geo::<F>::entries(level) {
                // SAFETY: a live table of this tree, index below its size.
                let raw = unsafe { entry(phys, node.table, index) }.load(Ordering::Relaxed);
                if let PteView::Table { frame, .. } = F::decode(raw, level) {
                    Self::free_all(phys, alloc, Self::child(phys, node, index, level, frame), level - 1);
                }
            }
        }
        for frame in [node.table, node.meta] {
            if frame != 0 {
                // SAFETY: every frame of the tree came from `alloc`; the root
                // is unreachable and no walker is left (caller + gate).
                unsafe { alloc.free_frame(frame) };
            }
        }
    }
}

impl Reclaim {
    /// Takes `node`'s frames if they fit; otherwise notes the overflow.
    fn push(&mut self, node: Node) -> bool {
        let need = 1 + (node.meta != 0) as usize;
        if self.frames.capacity() - self.frames.len() < need {
            self.full = true;
            return false;
        }
        for frame in [node.table, node.meta] {
            if frame != 0 {
                let _fits = self.frames.push(frame);
            }
        }
        true
    }
}
