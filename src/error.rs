//! One error type for every public operation.
//!
//! Variants name what went wrong, not where, so a caller can react the same way
//! to an unaligned range whether it came from a walk, a fault or a mirror.

use core::fmt;

/// Why an hmm-core operation refused or failed.
///
/// Every failing operation leaves the CPU tables, the mirror tables and the
/// notifier registry as they were before the call (see each operation's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// An address or length is not a multiple of the page size.
    Unaligned,
    /// The range has zero length.
    Empty,
    /// `start + len` overflows the 64-bit address space.
    Wrapping,
    /// An address is not canonical for the paging mode (or the range spans the
    /// non-canonical hole between the lower and upper half).
    NonCanonical,
    /// The range reaches past what the paging mode can translate, or past the
    /// span an object (a notifier, a mirror) covers.
    OutOfRange,
    /// A caller-provided slice does not hold exactly one entry per page.
    BadLength,
    /// A value cannot be encoded in the page-table format (misaligned frame,
    /// a leaf at a level that cannot hold one, an owner id too large).
    Unencodable,
    /// A paging geometry is inconsistent (fails
    /// [`check_geometry`](crate::arch::check_geometry)) or not supported by
    /// the table that was asked to use it.
    BadGeometry,
    /// A frame allocator had no frame to give.
    NoMemory,
    /// A concurrent invalidation kept the operation from completing within its
    /// retry budget; the caller may try again later.
    Busy,
    /// The range (or part of it) cannot be accessed: no region, an IO/PFN
    /// region, no read permission, or the kernel's fault handler failed.
    Fault,
    /// A write was requested on a region without write permission.
    Perm,
    /// A fixed-capacity container is full.
    Capacity,
    /// The notifier or mirror is not (or no longer) registered.
    Unregistered,
    /// The address space has been released (torn down).
    Released,
    /// A non-blockable invalidation was refused by a callback that would have
    /// had to wait.
    WouldBlock,
    /// A device callback failed with its own code.
    Device(i32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            Error::Unaligned => "address or length not page aligned",
            Error::Empty => "empty range",
            Error::Wrapping => "range wraps around the address space",
            Error::NonCanonical => "non-canonical address",
            Error::OutOfRange => "range outside the translatable span",
            Error::BadLength => "slice length does not match the page count",
            Error::Unencodable => "value cannot be encoded in this page-table format",
            Error::BadGeometry => "inconsistent or unsupported paging geometry",
            Error::NoMemory => "frame allocator exhausted",
            Error::Busy => "retry budget exhausted by concurrent invalidations",
            Error::Fault => "range not accessible",
            Error::Perm => "write to a region without write permission",
            Error::Capacity => "fixed capacity exhausted",
            Error::Unregistered => "not registered",
            Error::Released => "address space released",
            Error::WouldBlock => "non-blockable invalidation refused",
            Error::Device(code) => return write!(f, "device callback failed with code {code}"),
        };
        f.write_str(msg)
    }
}

impl core::error::Error for Error {}

/// Shorthand for results of hmm-core operations.
pub type Result<T> = core::result::Result<T, Error>;
