//! Per-page snapshot of a CPU table: the building block of `range_fault`.

use super::walk::{walk, PageRun, Span, Visitor};
use super::Pfn;
use crate::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::phys::PhysMem;
use crate::range::VaRange;
use crate::{Error, Result};
use core::convert::Infallible;
use core::ops::ControlFlow;

/// Fills `out` with one [`Pfn`] per page of `range` from the table alone (no
/// knowledge of regions):
/// - a user-accessible leaf: VALID (+WRITE if writable), order of the leaf;
///   every page of a large leaf shares flags and order;
/// - a leaf without USER or READ, PROT_NONE, a malformed entry: ERROR;
/// - absent and software non-present entries: 0 (not present).
///
/// Errors: the range's validation errors, [`Error::BadLength`] if `out` does
/// not hold exactly one entry per page.
///
/// # Safety
/// As for [`walk`]: `root` is a live root table of format `F`.
pub unsafe fn snapshot<F: PteFormat, P: PhysMem + ?Sized>(
    phys: &P,
    root: u64,
    range: VaRange,
    out: &mut [Pfn],
) -> Result<()> {
    let other = |entry: PteView| match entry {
        PteView::Leaf { .. } | PteView::ProtNone { .. } | PteView::Invalid(_) => Word::Fixed(Pfn::ERROR_ENTRY),
        _ => Word::Fixed(Pfn::NONE),
    };
    // SAFETY: forwarded from the caller.
    unsafe { fill::<F, P, _>(phys, root, range, out, other) }
}

/// What a page's output word is, for an entry that is not a user leaf.
#[derive(Clone, Copy)]
pub(crate) enum Word {
    /// VALID for `frame` (the first frame of the whole entry), WRITE if
    /// `write`, the order of the entry.
    Frame { frame: u64, write: bool },
    /// This word for every page of the entry.
    Fixed(Pfn),
}

/// Walks `range` writing one word per page into `out`: user leaves become
/// VALID (+WRITE) words directly, every other entry becomes `other(entry)`.
/// The snapshot walks (this module's [`snapshot`], and `range_fault` when no
/// page can request a fault) share it.
///
/// # Safety
/// As for [`walk`].
pub(crate) unsafe fn fill<F: PteFormat, P: PhysMem + ?Sized, O: Fn(PteView) -> Word>(
    phys: &P,
    root: u64,
    range: VaRange,
    out: &mut [Pfn],
    other: O,
) -> Result<()> {
    range.check::<F::Geometry>()?;
    let page_shift = <F::Geometry as PagingGeometry>::PAGE_SHIFT;
    if out.len() as u64 != range.pages(page_shift) {
        return Err(Error::BadLength);
    }
    let mut filler = Filler { out, next: 0, page_shift, other };
    // SAFETY: forwarded from the caller.
    let ControlFlow::Continue(()) = unsafe { walk::<F, P, _>(phys, root, range, &mut filler) }?;
    debug_assert_eq!(filler.next, filler.out.len(), "the walk visits every page once");
    Ok(())
}

/// The visitor of [`fill`]: the walk visits every page once, in order, so a
/// cursor into `out` is all the addressing it needs.
struct Filler<'o, O> {
    out: &'o mut [Pfn],
    next: usize,
    page_shift: u32,
    other: O,
}

impl<O> Filler<'_, O> {
    /// The next `n` output words.
    #[inline]
    fn take(&mut self, n: usize) -> &mut [Pfn] {
        let dst = &mut self.out[self.next..self.next + n];
        self.next += n;
        dst
    }
}

/// VALID words for consecutive pages from `first` on: the frame number is
/// the word's low bits, so page `i` is `first + i` (no carry: a leaf's frame
/// is aligned to its span). Blocks of 16 words: the compiler vectorises
/// them where it can, and where it cannot (a kernel target without SIMD)
/// each word is one add and one store, with the loop's own cost spread
/// over 16 pages.
#[inline]
fn fill_frames(dst: &mut [Pfn], first: Pfn) {
    let mut word = first.0;
    let mut blocks = dst.chunks_exact_mut(16);
    for block in &mut blocks {
        for (i, slot) in block.iter_mut().enumerate() {
            *slot = Pfn(word + i as u64);
        }
        word += 16;
    }
    for (i, slot) in blocks.into_remainder().iter_mut().enumerate() {
        *slot = Pfn(word + i as u64);
    }
}

impl<O: Fn(PteView) -> Word> Visitor for Filler<'_, O> {
    type Break = Infallible;

    /// A hole or a large leaf: one word per page of the clipped span.
    #[inline]
    fn visit(&mut self, span: Span, entry: PteView) -> ControlFlow<Infallible> {
        let page_shift = self.page_shift;
        let order = span.shift - page_shift;
        // Offset of the first visited page inside the entry.
        let skip = span.range.start() - span.entry_base();
        let word = word_of(entry, &self.other);
        let dst = self.take(span.range.pages(page_shift) as usize);
        match word {
            Word::Frame { frame, write } => fill_frames(dst, Pfn::valid(frame + skip, write, order)),
            Word::Fixed(w) => dst.fill(w),
        }
        ControlFlow::Continue(())
    }

    /// A table of 4 KiB pages: the directories' verdict (user, writable)
    /// picks one of three loops once per table, so the per-page loop is one
    /// load, one test and one store per present user page.
    #[inline]
    fn visit_pages<F: PteFormat>(&mut self, _va: u64, run: PageRun<'_>, allowed: LeafFlags) -> ControlFlow<Infallible> {
        let n = run.len();
        let (dst, other) = (&mut self.out[self.next..self.next + n], &self.other);
        self.next += n;
        match (allowed.contains(LeafFlags::USER), allowed.contains(LeafFlags::WRITE)) {
            (true, true) => fill_pages::<F, O, true, true>(dst, run, allowed, other),
            (true, false) => fill_pages::<F, O, true, false>(dst, run, allowed, other),
            (false, _) => fill_pages::<F, O, false, false>(dst, run, allowed, other),
        }
        ControlFlow::Continue(())
    }
}

/// What a visited entry becomes: a user page the device may read, or what
/// `other` says.
#[inline]
fn word_of<O: Fn(PteView) -> Word>(entry: PteView, other: &O) -> Word {
    match entry.user_frame() {
        Some((frame, write)) => Word::Frame { frame, write },
        None => other(entry),
    }
}

/// One word per 4 KiB page under directories that allow `USER` and
/// `WRITABLE`: the format's [`user_page`](PteFormat::user_page) answers the
/// common case, the full decode (restricted by the directories) the rest.
#[inline(always)]
fn fill_pages<F: PteFormat, O: Fn(PteView) -> Word, const USER: bool, const WRITABLE: bool>(
    dst: &mut [Pfn],
    run: PageRun<'_>,
    allowed: LeafFlags,
    other: &O,
) {
    for (slot, raw) in dst.iter_mut().zip(run.iter()) {
        *slot = match F::user_page(raw) {
            Some((frame, write)) if USER => Pfn::valid(frame, WRITABLE && write, 0),
            _ => match word_of(super::walk::restrict_view(F::decode(raw, 0), allowed), other) {
                Word::Frame { frame, write } => Pfn::valid(frame, write, 0),
                Word::Fixed(w) => w,
            },
        };
    }
}
