//! One output word per page, as `hmm_range_fault` fills its array.

/// Per-page result of a snapshot or fault: a frame number plus flags and the
/// order of the CPU leaf that maps it.
///
/// Layout: bit 63 VALID, bit 62 WRITE, bit 61 ERROR, bits 55..=60 map order,
/// bits 0..=51 frame number (physical address >> 12). On input to
/// [`range_fault`](crate::range_fault) the same word carries request flags:
/// [`Pfn::REQ_FAULT`] (= VALID) and [`Pfn::REQ_WRITE`] (= WRITE).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(transparent)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The page is mapped; the frame number is meaningful.
    pub const VALID: u64 = 1 << 63;
    /// The page is mapped writable.
    pub const WRITE: u64 = 1 << 62;
    /// The device must not access the page (no region, IO region, no read
    /// permission, a malformed entry).
    pub const ERROR: u64 = 1 << 61;
    /// Input: the page must come out VALID; fault it in if needed.
    pub const REQ_FAULT: u64 = Self::VALID;
    /// Input: the page must come out WRITE (implies REQ_FAULT).
    pub const REQ_WRITE: u64 = Self::WRITE;
    // Six bits: a leaf five levels up in a 9-bit-index geometry is order 36.
    const ORDER_SHIFT: u32 = 55;
    const ORDER_MASK: u64 = 0x3f << Self::ORDER_SHIFT;
    const FRAME_MASK: u64 = (1 << 52) - 1;
    /// All flag bits (VALID, WRITE, ERROR).
    pub const FLAGS: u64 = Self::VALID | Self::WRITE | Self::ERROR;

    /// A valid entry for the frame at physical address `pa`.
    #[inline]
    pub const fn valid(pa: u64, write: bool, order: u32) -> Self {
        let mut v = Self::VALID | ((pa >> 12) & Self::FRAME_MASK) | ((order as u64) << Self::ORDER_SHIFT);
        if write {
            v |= Self::WRITE;
        }
        Pfn(v)
    }

    /// An entry the device must not access.
    pub const ERROR_ENTRY: Pfn = Pfn(Self::ERROR);
    /// Not present (faultable later).
    pub const NONE: Pfn = Pfn(0);

    /// VALID set.
    #[inline]
    pub const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }
    /// WRITE set.
    #[inline]
    pub const fn is_write(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    /// ERROR set.
    #[inline]
    pub const fn is_error(self) -> bool {
        self.0 & Self::ERROR != 0
    }
    /// Physical address of the frame (meaningful when VALID).
    #[inline]
    pub const fn phys(self) -> u64 {
        (self.0 & Self::FRAME_MASK) << 12
    }
    /// log2 of the CPU leaf size in pages: 0 (4 KiB), 9 (2 MiB), 18 (1 GiB).
    #[inline]
    pub const fn order(self) -> u32 {
        ((self.0 & Self::ORDER_MASK) >> Self::ORDER_SHIFT) as u32
    }
}
