//! The generic range walker.
//!
//! One walk visits every table entry that overlaps `[start, last]` exactly
//! once, top-down, descending only into tables. A hole or a large leaf at an
//! upper level is one visit covering its whole (clipped) span, so a 1 GiB
//! leaf costs one step, not 262,144.

use crate::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::phys::{entry, PhysMem};
use crate::range::VaRange;
use crate::Result;
use core::ops::ControlFlow;
use core::sync::atomic::Ordering;

/// The part of one table entry a walk visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Receives each visited entry. `entry` is never [`PteView::Table`]: the walker
/// descends into tables. Leaf and PROT_NONE flags are already restricted by
/// the directories above (a read-only directory makes the leaf read-only).
pub trait Visitor {
    /// Value that stops the walk early.
    type Break;
    /// Called once per visited entry, in address order.
    fn visit(&mut self, span: Span, entry: PteView) -> ControlFlow<Self::Break>;
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
    let span_mask = (1u64 << shift) - 1;
    let mut va = start;
    loop {
        let entry_last = (va | span_mask).min(last);
        let idx = <F::Geometry as PagingGeometry>::index(va, level);
        // SAFETY: `table` is live (caller) and `idx` comes from the geometry's
        // index mask, so it is inside the table.
        let raw = unsafe { entry(phys, table, idx) }.load(Ordering::Acquire);
        let span = Span { range: VaRange::from_inclusive(va, entry_last), level, shift };
        match F::decode(raw, level) {
            PteView::Table { frame, flags } if level > 0 => {
                // SAFETY: the format's contract makes `frame` a next-level
                // table the hardware follows, kept live by the caller.
                unsafe { walk_table::<F, P, V>(phys, frame, level - 1, va, entry_last, allowed & flags, visitor)? };
            }
            PteView::Leaf { frame, flags } => {
                visitor.visit(span, PteView::Leaf { frame, flags: restrict(flags, allowed) })?
            }
            PteView::ProtNone { frame, flags } => {
                visitor.visit(span, PteView::ProtNone { frame, flags: restrict(flags, allowed) })?
            }
            other => visitor.visit(span, other)?,
        }
        if entry_last == last {
            return ControlFlow::Continue(());
        }
        va = entry_last + 1;
    }
}

/// Applies directory restrictions to a leaf: permissions a directory lacks
/// are lacking below it; status bits pass through.
#[inline]
fn restrict(leaf: LeafFlags, allowed: LeafFlags) -> LeafFlags {
    let perms = LeafFlags::WRITE | LeafFlags::USER | LeafFlags::EXEC;
    leaf & (allowed | !perms)
}
