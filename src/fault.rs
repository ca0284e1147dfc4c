//! `range_fault`: fill a caller array with one [`Pfn`] per page of a range,
//! faulting in what the caller requires, under the address-space read lock.
//!
//! The caller brackets it with [`NotifierRegistry::read_begin`] and, under its
//! driver lock, [`NotifierRegistry::read_retry`]; see [`crate::Mirror`] for the
//! complete loop.
//!
//! [`NotifierRegistry::read_begin`]: crate::NotifierRegistry::read_begin
//! [`NotifierRegistry::read_retry`]: crate::NotifierRegistry::read_retry

use crate::arch::{PagingGeometry, PteFormat, PteView, SpecialEntry};
use crate::notifier::Interval;
use crate::pt::snapshot::{fill, Word};
use crate::pt::{walk, Pfn, Span};
use crate::range::VaRange;
use crate::space::{AddressSpace, Region, RegionFlags};
use crate::{Error, Result};
use core::ops::ControlFlow;

/// How many times in a row the kernel's fault handler may leave the same page
/// missing before the page is reported as [`Error::Fault`] instead of looping.
pub(crate) const MAX_FAULTS_WITHOUT_PROGRESS: u32 = 8;

/// What to fault and where to put the result.
#[derive(Debug)]
pub struct RangeFault<'a> {
    /// Pages to report.
    pub range: VaRange,
    /// Request flags applied to every page ([`Pfn::REQ_FAULT`], [`Pfn::REQ_WRITE`]).
    pub default_flags: u64,
    /// Which request bits of each input word in `pfns` count
    /// (`request = (pfns[i] & mask) | default_flags`). 0 ignores the input.
    pub pfn_flags_mask: u64,
    /// In: per-page request flags. Out: per-page result.
    pub pfns: &'a mut [Pfn],
    /// Device-private pages of this owner are reported as they are; those of
    /// other owners count as not present.
    pub dev_private_owner: Option<u16>,
}

/// What one `range_fault` call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultStats {
    /// Calls made to the kernel's fault handler (one per contiguous run).
    pub handler_calls: u32,
    /// Pages those calls covered.
    pub pages_faulted: u64,
}

/// Linux's `hmm_range_fault` over a kernel [`AddressSpace`].
///
/// Output per page: VALID with frame and map order (all pages of a large
/// leaf share flags and order), WRITE if writable, ERROR if the device must
/// not access it (no region, IO region, no read permission, malformed entry),
/// 0 if not present. With no [`Pfn::REQ_FAULT`] in any request it is a pure
/// snapshot. Missing pages that must be valid (or writable) are faulted in
/// with one handler call per contiguous run.
///
/// Errors: validation errors of the range, [`Error::OutOfRange`] if the range
/// is not inside `interval`, [`Error::BadLength`], [`Error::Unregistered`]
/// if `interval` is not registered (never [`Error::Busy`]: nothing could
/// ever invalidate it), [`Error::Released`],
/// [`Error::Busy`] (an invalidation hit `interval` since `seq`, seen before
/// anything was faulted; after a fault the walk completes and only the
/// caller's mandatory `read_retry` under its driver lock decides),
/// [`Error::Fault`] (a required page has no region, an IO region, no read
/// permission, or the handler failed), [`Error::Perm`] (write required on a
/// region without write), [`Error::NoMemory`] (from the handler). On error the
/// content of `pfns` is unspecified.
pub fn range_fault<'g, S: AddressSpace>(
    space: &'g S,
    guard: &S::ReadGuard<'g>,
    interval: &Interval,
    seq: u64,
    req: &mut RangeFault<'_>,
) -> Result<FaultStats> {
    type G<S> = <<S as AddressSpace>::Format as PteFormat>::Geometry;
    let page_shift = G::<S>::PAGE_SHIFT;
    let range = req.range;
    range.check::<G<S>>()?;
    if !interval.range().contains(&range) {
        return Err(Error::OutOfRange);
    }
    if req.pfns.len() as u64 != range.pages(page_shift) {
        return Err(Error::BadLength);
    }
    // No invalidation reaches an unregistered interval: whatever the walk
    // found could go stale unnoticed.
    if !interval.is_registered() {
        return Err(Error::Unregistered);
    }
    let page = 1u64 << page_shift;
    let mut stats = FaultStats::default();
    let mut va = range.start();
    let mut stuck_at = None;
    let mut stuck_count = 0;
    loop {
        if space.notifiers().is_released() {
            return Err(Error::Released);
        }
        // Once this call faulted something, the kernel's own invalidations
        // (a COW break, say) have moved the sequence: finish the walk so one
        // attempt faults every missing run, and leave the verdict to the
        // caller's `read_retry`.
        if stats.handler_calls == 0 && space.notifiers().check_retry(interval, seq) {
            return Err(Error::Busy);
        }
        let index = |va: u64| ((va - range.start()) >> page_shift) as usize;
        // A region that does not contain `va` (a confused kernel) is a hole.
        let Some(region) = space.region(guard, va).filter(|r| r.range.contains_addr(va)) else {
            // A hole: one page at a time until a region starts.
            let slot = &mut req.pfns[index(va)];
            if request(slot.0, req.default_flags, req.pfn_flags_mask) & Pfn::REQ_FAULT != 0 {
                return Err(Error::Fault);
            }
            *slot = Pfn::ERROR_ENTRY;
            match next_page(va, range.last(), page) {
                Some(next) => va = next,
                None => return Ok(stats),
            }
            continue;
        };
        let part = VaRange::from_inclusive(va, region.range.last().min(range.last()));
        let first = index(part.start());
        let pfns = &mut req.pfns[first..first + part.pages(page_shift) as usize];
        match fill_region::<S>(space, region, part, pfns, req.default_flags, req.pfn_flags_mask, req.dev_private_owner)?
        {
            None => {}
            Some((missing, write)) => {
                if stuck_at == Some(missing.start()) {
                    stuck_count += 1;
                    if stuck_count >= MAX_FAULTS_WITHOUT_PROGRESS {
                        return Err(Error::Fault);
                    }
                } else {
                    stuck_at = Some(missing.start());
                    stuck_count = 0;
                }
                space.handle_fault(guard, missing, write)?;
                stats.handler_calls += 1;
                stats.pages_faulted += missing.pages(page_shift);
                va = missing.start();
                continue;
            }
        }
        match next_page(part.last() - (page - 1), range.last(), page) {
            Some(next) => va = next,
            None => return Ok(stats),
        }
    }
}

/// The request for one page: `(input & mask) | default`, write implying fault.
fn request(input: u64, default_flags: u64, mask: u64) -> u64 {
    let r = (input & mask) | default_flags;
    // A write request implies a fault request.
    if r & Pfn::REQ_WRITE != 0 {
        r | Pfn::REQ_FAULT
    } else {
        r
    }
}

fn next_page(va: u64, last: u64, page: u64) -> Option<u64> {
    (va + (page - 1) < last).then(|| va + page)
}

/// Fills `pfns` for `part` (inside `region`). Returns the first contiguous
/// run of pages that must be faulted (and whether any of them needs write),
/// leaving the input words of that run and everything after it untouched.
fn fill_region<S: AddressSpace>(
    space: &S,
    region: Region,
    part: VaRange,
    pfns: &mut [Pfn],
    default_flags: u64,
    mask: u64,
    owner: Option<u16>,
) -> Result<Option<(VaRange, bool)>> {
    let page_shift = <<S::Format as PteFormat>::Geometry as PagingGeometry>::PAGE_SHIFT;
    let req_of = |input: u64| request(input, default_flags, mask);
    let inaccessible = region.flags.contains(RegionFlags::IO) || !region.flags.contains(RegionFlags::READ);
    if inaccessible {
        if pfns.iter().any(|p| req_of(p.0) & Pfn::REQ_FAULT != 0) {
            return Err(Error::Fault);
        }
        pfns.fill(Pfn::ERROR_ENTRY);
        return Ok(None);
    }
    if !region.flags.contains(RegionFlags::WRITE) && pfns.iter().any(|p| req_of(p.0) & Pfn::REQ_WRITE != 0) {
        return Err(Error::Perm);
    }
    if (default_flags | mask) & (Pfn::REQ_FAULT | Pfn::REQ_WRITE) == 0 {
        // No page can request anything (Linux short-circuits its need-fault
        // check the same way): nothing will be faulted, so the request words
        // need not be read and the table is copied out by the snapshot fill.
        // Same output as the general loop below (tests/walker.rs compares).
        let other = |entry: PteView| match classify(entry, owner) {
            Class::Valid { frame, write } => Word::Frame { frame, write },
            Class::Error => Word::Fixed(Pfn::ERROR_ENTRY),
            Class::Missing => Word::Fixed(Pfn::NONE),
        };
        // SAFETY: the read guard keeps every table of the live root
        // allocated (`AddressSpace` contract, item 2).
        unsafe { fill::<S::Format, S::Phys, _>(space.phys(), space.root(), part, pfns, other) }?;
        return Ok(None);
    }
    let base = part.start();
    let mut run: Option<(u64, u64, bool)> = None;
    let mut visit = |span: Span, entry: PteView| -> ControlFlow<()> {
        let order = span.shift - page_shift;
        let out = classify(entry, owner);
        let mut va = span.range.start();
        loop {
            let i = ((va - base) >> page_shift) as usize;
            let want = req_of(pfns[i].0);
            let (pfn, _) = match out {
                Class::Valid { frame, write } => (Pfn::valid(frame + (va - span.entry_base()), write, order), write),
                Class::Error => (Pfn::ERROR_ENTRY, false),
                Class::Missing => (Pfn::NONE, false),
            };
            let satisfied = match out {
                Class::Valid { write, .. } => want & Pfn::REQ_WRITE == 0 || write,
                Class::Error => want & Pfn::REQ_FAULT == 0,
                Class::Missing => want & Pfn::REQ_FAULT == 0,
            };
            if satisfied {
                if run.is_some() {
                    return ControlFlow::Break(());
                }
                pfns[i] = pfn;
            } else if matches!(out, Class::Error) {
                // Cannot be faulted in: report as the reference does.
                run = None;
                return ControlFlow::Break(());
            } else {
                let write = want & Pfn::REQ_WRITE != 0;
                run = Some(match run {
                    None => (va, va + ((1 << page_shift) - 1), write),
                    Some((s, _, w)) => (s, va + ((1 << page_shift) - 1), w || write),
                });
            }
            if va + ((1 << page_shift) - 1) >= span.range.last() {
                return ControlFlow::Continue(());
            }
            va += 1 << page_shift;
        }
    };
    // SAFETY: the read guard keeps every table of the live root allocated
    // (`AddressSpace` contract, item 2).
    let flow = unsafe { walk::<S::Format, S::Phys, _>(space.phys(), space.root(), part, &mut visit) }?;
    match (flow, run) {
        (_, Some((s, l, w))) => Ok(Some((VaRange::from_inclusive(s, l), w))),
        (ControlFlow::Break(()), None) => Err(Error::Fault),
        (ControlFlow::Continue(()), None) => Ok(None),
    }
}

/// What a device may do with one CPU entry.
pub(crate) enum Class {
    Valid { frame: u64, write: bool },
    Error,
    Missing,
}

/// Classifies a CPU entry for a device of `owner`.
pub(crate) fn classify(entry: PteView, owner: Option<u16>) -> Class {
    if let Some((frame, write)) = entry.user_frame() {
        return Class::Valid { frame, write };
    }
    match entry {
        // A kernel-only or unreadable (execute-only) leaf inside a user
        // region, or a malformed entry.
        PteView::Leaf { .. } | PteView::Invalid(_) => Class::Error,
        PteView::Special(SpecialEntry::DevicePrivate { frame, owner: o, write }) if Some(o) == owner => {
            Class::Valid { frame, write }
        }
        // PROT_NONE in a readable region (NUMA hinting), swap, migration,
        // another device's memory, device-exclusive: the fault handler
        // resolves them.
        PteView::ProtNone { .. } | PteView::Special(_) | PteView::Absent | PteView::Table { .. } => Class::Missing,
    }
}
