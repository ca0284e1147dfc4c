//! Validated virtual-address ranges.
//!
//! A range is kept as `start ..= last` (inclusive) so that a range ending at
//! the very top of a sign-extended address space (`last = u64::MAX`) needs no
//! special case.

use crate::arch::PagingGeometry;
use crate::{Error, Result};

/// A non-empty, page-aligned range of canonical virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VaRange {
    start: u64,
    last: u64,
}

impl VaRange {
    /// Validates `[start, start + len)` for geometry `G`.
    ///
    /// Errors, in the order checked: [`Error::Empty`], [`Error::Unaligned`],
    /// [`Error::Wrapping`], [`Error::NonCanonical`] (start not canonical),
    /// [`Error::OutOfRange`] (the range runs past the end of its half or of
    /// the `VA_BITS` space).
    pub fn new<G: PagingGeometry>(start: u64, len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::Empty);
        }
        let page_mask = (1u64 << G::PAGE_SHIFT) - 1;
        if start & page_mask != 0 || len & page_mask != 0 {
            return Err(Error::Unaligned);
        }
        let last = start.checked_add(len - 1).ok_or(Error::Wrapping)?;
        let r = Self { start, last };
        r.check::<G>()?;
        Ok(r)
    }

    /// Validates `[start, end)`; `end <= start` is [`Error::Empty`] when
    /// equal and [`Error::Wrapping`] otherwise.
    pub fn from_bounds<G: PagingGeometry>(start: u64, end: u64) -> Result<Self> {
        if end < start {
            return Err(Error::Wrapping);
        }
        Self::new::<G>(start, end - start)
    }

    /// Re-checks canonicality and extent against `G` (a range validated for
    /// one geometry may be handed to a walk of another).
    pub fn check<G: PagingGeometry>(&self) -> Result<()> {
        let page_mask = (1u64 << G::PAGE_SHIFT) - 1;
        if self.start & page_mask != 0 || self.last & page_mask != page_mask {
            return Err(Error::Unaligned);
        }
        if !G::is_canonical(self.start) {
            return Err(if G::SIGN_EXTEND { Error::NonCanonical } else { Error::OutOfRange });
        }
        // Both ends canonical and in the same half: a sign-extended space has
        // its halves differ in the top bit.
        if !G::is_canonical(self.last) || (G::SIGN_EXTEND && (self.start ^ self.last) >> 63 != 0) {
            return Err(Error::OutOfRange);
        }
        Ok(())
    }

    /// First address.
    #[inline]
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Last address (inclusive).
    #[inline]
    pub const fn last(&self) -> u64 {
        self.last
    }

    /// One past the last address, or `None` at the top of the 64-bit space.
    #[inline]
    pub const fn end(&self) -> Option<u64> {
        self.last.checked_add(1)
    }

    /// Number of `1 << page_shift` pages.
    #[inline]
    pub const fn pages(&self, page_shift: u32) -> u64 {
        ((self.last - self.start) >> page_shift) + 1
    }

    /// Whether the two ranges share an address.
    #[inline]
    pub const fn overlaps(&self, other: &VaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }

    /// Whether `other` lies inside `self`.
    #[inline]
    pub const fn contains(&self, other: &VaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }

    /// Whether `va` lies inside.
    #[inline]
    pub const fn contains_addr(&self, va: u64) -> bool {
        self.start <= va && va <= self.last
    }

    /// The common part, if any.
    #[inline]
    pub fn intersect(&self, other: &VaRange) -> Option<VaRange> {
        let start = self.start.max(other.start);
        let last = self.last.min(other.last);
        (start <= last).then_some(VaRange { start, last })
    }

    /// The smallest range holding both.
    #[inline]
    pub fn hull(&self, other: &VaRange) -> VaRange {
        VaRange { start: self.start.min(other.start), last: self.last.max(other.last) }
    }

    /// The whole 64-bit space (`0 ..= u64::MAX`): what a teardown invalidates.
    /// Valid for no paging mode; use it only for invalidations.
    pub const fn all() -> Self {
        Self { start: 0, last: u64::MAX }
    }

    /// Builds a range from bounds the caller has already validated (a
    /// sub-range of a checked range, cut at page boundaries).
    #[inline]
    pub(crate) const fn from_inclusive(start: u64, last: u64) -> Self {
        Self { start, last }
    }
}
