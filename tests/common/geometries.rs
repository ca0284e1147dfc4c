//! Device geometries shared by the mirror-table and device-format tests.

use hmm_core::arch::{check_geometry, PagingGeometry, MAX_LEVELS};

/// Declares a 4 KiB-page geometry (levels, index bits bottom first, VA
/// width, sign extension, leaf levels), checked at compile time.
macro_rules! geometry {
    ($(#[$doc:meta])* $name:ident, $levels:expr, $bits:expr, $va:expr, $sign:expr, $leaves:expr) => {
        $(#[$doc])*
        pub struct $name;
        impl PagingGeometry for $name {
            const LEVELS: usize = $levels;
            const PAGE_SHIFT: u32 = 12;
            const INDEX_BITS: [u32; MAX_LEVELS] = $bits;
            const VA_BITS: u32 = $va;
            const SIGN_EXTEND: bool = $sign;
            const LEAF_LEVELS: u32 = $leaves;
        }
        const _: () = assert!(check_geometry($levels, 12, $bits, $va, $leaves));
    };
}

geometry!(
    /// x86_64 4-level geometry whose only leaves are 4 KiB.
    L4Pages, 4, [9; MAX_LEVELS], 48, true, 0b1
);
geometry!(
    /// x86_64 4-level geometry with 4 KiB and 2 MiB leaves but no 1 GiB leaves.
    L4No1G, 4, [9; MAX_LEVELS], 48, true, 0b11
);
geometry!(
    /// Six levels over 57-bit addresses, not sign-extended: a 2-entry root,
    /// a 256-entry level 4, and x86_64-sized levels 0-3 (leaves of 4 KiB,
    /// 2 MiB and 1 GiB, as on the CPU).
    Six57, 6, [9, 9, 9, 9, 8, 1], 57, false, 0b111
);
geometry!(
    /// Six levels of 64-entry tables over 48-bit addresses: leaves of 4 KiB,
    /// 256 KiB and 16 MiB, none of the CPU's huge sizes.
    Six48, 6, [6; MAX_LEVELS], 48, false, 0b111
);
geometry!(
    /// Three levels of different widths (9, 8, 7 bits) over 36-bit
    /// addresses: leaves of 4 KiB and 2 MiB; level 2 (512 MiB entries) holds
    /// none.
    Three36, 3, [9, 8, 7, 0, 0, 0], 36, false, 0b011
);
