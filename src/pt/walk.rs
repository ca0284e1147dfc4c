//! The generic range walker.
//!
//! One walk visits every table entry that overlaps `[start, last]` exactly
//! once, top-down, descending only into tables. A hole or a large leaf at an
//! upper level is one visit covering its whole (clipped) span, so a 1 GiB
//! leaf costs one step, not 262,144.
//!
//! The entries of a page-sized leaf table are handed over as one
//! [`PageRun`] per table ([`Visitor::visit_pages`]): a visitor that only
//! needs raw entries (a snapshot) runs its own tight loop over them, with no
//! [`Span`] or call per page. The default visits them one by one.

use crate::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::phys::{AtomicEntry, PhysMem};
use crate::range::VaRange;
use crate::Result;
use core::marker::PhantomData;
use core::ops::ControlFlow;
use core::sync::atomic::Ordering;

/// The part of one table entry a walk visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Span {
    /// The visited addresses: the entry's span clipped to the walked range.
    pub range: VaRange,
    /// Level of the entry (0 = page-sized leaves).
    pub level: usize,
    /// log2 of the entry's full span.
    pub shift: u32,
}

impl Span {
    /// First address the whole entry maps (before clipping).
    #[inline]
    pub const fn entry_base(&self) -> u64 {
        self.range.start() & !((1u64 << self.shift) - 1)
    }
}

/// The visited entries of one page-sized (level 0) table: consecutive raw
/// entries, each read with one atomic load when asked for.
#[derive(Clone, Copy)]
pub struct PageRun<'t> {
    first: *const u64,
    len: usize,
    _table: PhantomData<&'t AtomicEntry>,
}

impl PageRun<'_> {
    /// Number of entries (at least 1).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a run holds at least one entry.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw entries in address order, each loaded once (Acquire).
    #[inline]
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len).map(move |i| {
            // SAFETY: `first .. first + len` lies inside one live table (the
            // walker's construction, under the walk's safety contract), and
            // table entries are only accessed atomically.
            unsafe { AtomicEntry::from_ptr(self.first.add(i) as *mut u64) }.load(Ordering::Acquire)
        })
    }
}

/// Receives each visited entry. `entry` is never [`PteView::Table`]: the walker
/// descends into tables. Leaf and PROT_NONE flags are already restricted by
/// the directories above (a read-only directory makes the leaf read-only).
pub trait Visitor {
    /// Value that stops the walk early.
    type Break;
    /// Called once per visited entry, in address order.
    fn visit(&mut self, span: Span, entry: PteView) -> ControlFlow<Self::Break>;

    /// Called instead of [`visit`](Self::visit) for the page-sized entries of
    /// one level-0 table, the first mapping `va`. Raw entries are in format
    /// `F`; `allowed` is what the directories above permit (see
    /// [`restrict`]). The default decodes each entry and visits it.
    #[inline]
    fn visit_pages<F: PteFormat>(&mut self, va: u64, run: PageRun<'_>, allowed: LeafFlags) -> ControlFlow<Self::Break> {
        let shift = <F::Geometry as PagingGeometry>::PAGE_SHIFT;
        let mut start = va;
        for raw in run.iter() {
            let range = VaRange::from_inclusive(start, start + ((1 << shift) - 1));
            self.visit(Span { range, level: 0, shift }, restrict_view(F::decode(raw, 0), allowed))?;
            start = start.wrapping_add(1 << shift);
        }
        ControlFlow::Continue(())
    }
}

impl<B, T: FnMut(Span, PteView) -> ControlFlow<B>> Visitor for T {
    type Break = B;
    #[inline]
    fn visit(&mut self, span: Span, entry: PteView) -> ControlFlow<B> {
        self(span, entry)
    }
}

/// Walks `range` of the table rooted at `root`.
///
/// Fails only if `range` is invalid for `F`'s geometry; a visitor's break
/// value comes back as `ControlFlow::Break`.
///
/// # Safety
/// `root` must be a live root table of format `F` reachable through `phys`,
/// and every table it links to must stay allocated for the duration of the
/// walk (entries may change concurrently; each is read once, atomically).
pub unsafe fn walk<F: PteFormat, P: PhysMem + ?Sized, V: Visitor>(
    phys: &P,
    root: u64,
    range: VaRange,
    visitor: &mut V,
) -> Result<ControlFlow<V::Break>> {
    range.check::<F::Geometry>()?;
    let top = <F::Geometry as PagingGeometry>::LEVELS - 1;
    // SAFETY: forwarded from the caller's guarantee on `root`.
    Ok(unsafe { walk_table::<F, P, V>(phys, root, top, range.start(), range.last(), LeafFlags::all(), visitor) })
}

/// Visits `[start, last]` (which lies within one entry of the parent) in the
/// table at `table`, `level`.
///
/// # Safety
/// `table` is a live table of format `F` at `level`.
unsafe fn walk_table<F: PteFormat, P: PhysMem + ?Sized, V: Visitor>(
    phys: &P,
    table: u64,
    level: usize,
    start: u64,
    last: u64,
    allowed: LeafFlags,
    visitor: &mut V,
) -> ControlFlow<V::Break> {
    let shift = <F::Geometry as PagingGeometry>::level_shift(level);
    let index_mask = (1u64 << <F::Geometry as PagingGeometry>::INDEX_BITS[level]) - 1;
    let first = ((start >> shift) & index_mask) as usize;
    if level == 0 {
        // SAFETY: forwarded from the caller.
        return unsafe { walk_pages::<F, P, V>(phys, table, first, start, last, allowed, visitor) };
    }
    let span_mask = (1u64 << shift) - 1;
    // Valid for the whole frame: `table` is live (caller), `PhysMem`'s contract.
    let entries = phys.ptr(table) as *mut u64;
    let mut va = start;
    let mut idx = first;
    loop {
        let entry_last = (va | span_mask).min(last);
        // SAFETY: `idx` stays below the table's entry count: it starts from
        // the index mask and the range does not leave the parent entry's
        // span; entries are only accessed atomically.
        let raw = unsafe { AtomicEntry::from_ptr(entries.add(idx)) }.load(Ordering::Acquire);
        let span = || Span { range: VaRange::from_inclusive(va, entry_last), level, shift };
        match F::decode(raw, level) {
            PteView::Table { frame, flags } => {
                // SAFETY: the format's contract makes `frame` a next-level
                // table the hardware follows, kept live by the caller.
                unsafe { walk_table::<F, P, V>(phys, frame, level - 1, va, entry_last, allowed & flags, visitor)? };
            }
            PteView::Leaf { frame, flags } => {
                visitor.visit(span(), PteView::Leaf { frame, flags: restrict(flags, allowed) })?
            }
            PteView::ProtNone { frame, flags } => {
                visitor.visit(span(), PteView::ProtNone { frame, flags: restrict(flags, allowed) })?
            }
            other => visitor.visit(span(), other)?,
        }
        if entry_last == last {
            return ControlFlow::Continue(());
        }
        va = entry_last + 1;
        idx += 1;
    }
}

/// The level-0 part of [`walk_table`]: `[start, last]` lies in this one
/// table, so its entries are consecutive and go to the visitor as one run.
/// Kept out of line so the upper levels' loop stays small.
///
/// # Safety
/// `table` is a live table of format `F` at level 0, `first` the index of
/// `start`.
#[inline(never)]
unsafe fn walk_pages<F: PteFormat, P: PhysMem + ?Sized, V: Visitor>(
    phys: &P,
    table: u64,
    first: usize,
    start: u64,
    last: u64,
    allowed: LeafFlags,
    visitor: &mut V,
) -> ControlFlow<V::Break> {
    let len = ((last - start) >> <F::Geometry as PagingGeometry>::PAGE_SHIFT) as usize + 1;
    // SAFETY: `table` is a live table frame (caller), valid for the whole
    // frame by `PhysMem`'s contract; `first + len` entries stay inside it
    // because the range does not leave the parent entry's span.
    let first = unsafe { (phys.ptr(table) as *const u64).add(first) };
    visitor.visit_pages::<F>(start, PageRun { first, len, _table: PhantomData }, allowed)
}

/// A visited entry as the walk reports it: leaf and PROT_NONE flags
/// restricted by the directories above.
#[inline]
pub(crate) fn restrict_view(view: PteView, allowed: LeafFlags) -> PteView {
    match view {
        PteView::Leaf { frame, flags } => PteView::Leaf { frame, flags: restrict(flags, allowed) },
        PteView::ProtNone { frame, flags } => PteView::ProtNone { frame, flags: restrict(flags, allowed) },
        other => other,
    }
}

/// Applies directory restrictions to a leaf: permissions a directory lacks
/// are lacking below it; status bits pass through.
#[inline]
pub fn restrict(leaf: LeafFlags, allowed: LeafFlags) -> LeafFlags {
    let perms = LeafFlags::WRITE | LeafFlags::USER | LeafFlags::EXEC;
    leaf & (allowed | !perms)
}
