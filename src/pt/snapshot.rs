//! Per-page snapshot of a CPU table: the building block of `range_fault`.

use super::walk::{walk, Span};
use super::Pfn;
use crate::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::phys::PhysMem;
use crate::range::VaRange;
use crate::{Error, Result};
use core::ops::ControlFlow;

/// Fills `out` with one [`Pfn`] per page of `range` from the table alone (no
/// knowledge of regions):
/// - a user-accessible leaf: VALID (+WRITE if writable), order of the leaf;
///   every page of a large leaf shares flags and order;
/// - a leaf without USER, PROT_NONE, a malformed entry: ERROR;
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
    range.check::<F::Geometry>()?;
    let page_shift = <F::Geometry as PagingGeometry>::PAGE_SHIFT;
    if out.len() as u64 != range.pages(page_shift) {
        return Err(Error::BadLength);
    }
    let base = range.start();
    let mut fill = |span: Span, entry: PteView| -> ControlFlow<()> {
        let first = ((span.range.start() - base) >> page_shift) as usize;
        let n = span.range.pages(page_shift) as usize;
        let dst = &mut out[first..first + n];
        match entry {
            PteView::Leaf { frame, flags } if flags.contains(LeafFlags::USER) => {
                let order = span.shift - page_shift;
                let write = flags.contains(LeafFlags::WRITE);
                let mut pa = frame + (span.range.start() - span.entry_base());
                for slot in dst {
                    *slot = Pfn::valid(pa, write, order);
                    pa += 1 << page_shift;
                }
            }
            PteView::Leaf { .. } | PteView::ProtNone { .. } | PteView::Invalid(_) => dst.fill(Pfn::ERROR_ENTRY),
            _ => dst.fill(Pfn::NONE),
        }
        ControlFlow::Continue(())
    };
    // SAFETY: forwarded from the caller.
    let _never_breaks = unsafe { walk::<F, P, _>(phys, root, range, &mut fill) }?;
    Ok(())
}
