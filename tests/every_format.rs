//! One test suite for every CPU page-table format: the walker, `range_fault`
//! and the mirror, run against the model kernel (`ModelSpace<F>`) with
//! tables of format `F`.
//!
//! Each test is a generic function (`walker_*`, `fault_*`, `mirror_*` in
//! the modules below) and [`every_format!`] instantiates the whole list for
//! one format. Addresses come from the geometry (or lie below 256 GiB,
//! inside every format's user half); expectations come from the model's
//! oracle, never from a format's bit layout.

mod every_format {
    pub mod fault;
    pub mod mirror;
    pub mod walker;
}

use core::sync::atomic::AtomicU64;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::pt::{Pfn, Span};
use hmm_core::{AddressSpace, RegionFlags, VaRange};
use hmm_testkit::{CountingAllocator, ModelSpace};
use std::sync::Arc;

pub use every_format::fault::*;
pub use every_format::mirror::*;
pub use every_format::walker::*;

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// 8 GiB: 1 GiB aligned, inside every format's user half (Sv39's is the
/// smallest, 256 GiB).
pub const BASE: u64 = 8 * GIB;
pub const R: RegionFlags = RegionFlags::READ;
pub const RW: RegionFlags = RegionFlags::READ.union(RegionFlags::WRITE);

/// A CPU format the suite runs on.
pub trait Cpu: PteFormat + 'static {}
impl<T: PteFormat + 'static> Cpu for T {}

/// The geometry of `F`.
pub type G<F> = <F as PteFormat>::Geometry;

/// A model kernel with tables of format `F` over `size` bytes of simulated
/// RAM (lazily committed: 3 GiB costs nothing until used).
pub fn kernel<F: Cpu>(size: u64) -> (Arc<CountingAllocator>, ModelSpace<F>) {
    let alloc = CountingAllocator::with_size(size);
    let space = ModelSpace::<F>::new_in(&alloc).expect("space");
    (alloc, space)
}

/// A range of `F`'s address space.
pub fn rng<F: Cpu>(start: u64, len: u64) -> VaRange {
    ModelSpace::<F>::range(start, len)
}

/// Every entry `hmm_core::pt::walk` visits over `r`.
pub fn entries<F: Cpu>(space: &ModelSpace<F>, r: VaRange) -> Vec<(Span, PteView)> {
    space.table_view().entries(r)
}

/// The snapshot of `r` equals what the oracle says, page by page, and the
/// model's tables agree with the oracle.
pub fn assert_snapshot_is_oracle<F: Cpu>(space: &ModelSpace<F>, r: VaRange) {
    assert_eq!(space.snapshot(r), space.oracle().expected_pfns(r), "snapshot of {r:x?}");
    space.check_tables();
}

/// Checks the tables one last time, drops the space and asserts that no
/// frame (table, page, folio, zero page) is left.
pub fn finish<F: Cpu>(alloc: Arc<CountingAllocator>, space: ModelSpace<F>) {
    space.check_tables();
    drop(space);
    assert_eq!(alloc.live(), 0, "frames leaked");
}

/// Asserts the walk of `r` visits spans that tile `r` exactly, in order.
pub fn assert_tiles(r: VaRange, visited: &[(Span, PteView)]) {
    let mut next = r.start();
    for (span, _) in visited {
        assert_eq!(span.range.start(), next, "spans of {r:x?} must be contiguous");
        next = span.range.last().wrapping_add(1);
    }
    assert_eq!(next, r.last().wrapping_add(1), "spans of {r:x?} must end at its end");
}

/// Physical address of the entry at `level` on the path to `va` (every
/// table above it must exist), for tests that poke entries the model never
/// writes (restrictive directories, kernel-only leaves).
pub fn entry_addr<F: Cpu>(space: &ModelSpace<F>, va: u64, level: usize) -> u64 {
    let phys = space.sim_phys();
    let mut table = space.root();
    let mut l = G::<F>::LEVELS - 1;
    loop {
        let pa = table + G::<F>::index(va, l) as u64 * 8;
        if l == level {
            return pa;
        }
        match F::decode(phys.read_u64(pa), l) {
            PteView::Table { frame, .. } => table = frame,
            other => panic!("no table below level {l} for {va:#x}: {other:?}"),
        }
        l -= 1;
    }
}

/// The raw table word at [`entry_addr`].
pub fn entry_word<F: Cpu>(space: &ModelSpace<F>, va: u64, level: usize) -> &AtomicU64 {
    space.sim_phys().word(entry_addr(space, va, level))
}

/// Leaf flags the model gives a user page.
pub fn user_flags(write: bool) -> LeafFlags {
    let mut f = LeafFlags::READ | LeafFlags::USER;
    f.set(LeafFlags::WRITE, write);
    f
}

/// `Pfn::valid` for the 4 KiB page at `va` as the oracle maps it.
pub fn oracle_pfn<F: Cpu>(space: &ModelSpace<F>, va: u64) -> Pfn {
    let p = space.translate(va).unwrap_or_else(|| panic!("oracle maps nothing at {va:#x}"));
    Pfn::valid(p.frame, p.leaf.write, p.leaf.order)
}

/// Instantiates every generic test of the suite for one CPU format:
/// `every_format!(module_name, FormatType);`.
macro_rules! every_format {
    ($module:ident, $format:ty) => {
        mod $module {
            generic_tests!(
                $format;
                // (a) the walker and the snapshot
                walker_4k_pages,
                walker_2m_leaf,
                walker_1g_leaf,
                walker_holes_are_few_upper_level_spans,
                walker_prot_none,
                walker_special_entries,
                walker_huge_special_entry,
                walker_restrictive_directory,
                walker_top_of_user_half,
                walker_bottom_of_user_half,
                walker_crosses_table_boundaries,
                walker_mixed_kinds_match_oracle,
                walker_unmap_prunes_tables,
                // (b) range_fault
                fault_snapshot_requests_nothing,
                fault_read_maps_zero_page,
                fault_write_maps_private_pages,
                fault_write_on_read_only_pages_copies,
                fault_per_page_request_bits,
                fault_write_on_read_only_region_is_perm,
                fault_huge_leaves,
                fault_error_pages,
                fault_kernel_only_leaf_is_error,
                fault_device_private_owner,
                fault_swap_and_migration_entries_fault_back,
                // (c) the mirror
                mirror_fault_and_read,
                mirror_device_write_reaches_cpu,
                mirror_unmap_tears_down,
                mirror_protect_tears_down,
                mirror_clear_zaps,
                mirror_2m_leaf_is_one_entry,
                mirror_fork_write_protects,
                mirror_device_private_pages,
                mirror_top_of_user_half,
                mirror_release_empties_table,
            );
        }
    };
}

/// One `#[test]` per name, calling the generic function for `$format`.
macro_rules! generic_tests {
    ($format:ty; $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                super::$test::<$format>();
            }
        )*
    };
}

every_format!(x86_64_level4, hmm_core::arch::x86_64::X86_64Level4);
every_format!(x86_64_level5, hmm_core::arch::x86_64::X86_64Level5);
every_format!(riscv64_sv39, hmm_core::arch::riscv64::Sv39);
every_format!(riscv64_sv48, hmm_core::arch::riscv64::Sv48);
every_format!(riscv64_sv57, hmm_core::arch::riscv64::Sv57);
every_format!(aarch64_va48, hmm_core::arch::aarch64::Aarch64Va48);
every_format!(aarch64_va52, hmm_core::arch::aarch64::Aarch64Va52);
