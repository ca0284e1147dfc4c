//! x86_64 4-level paging: entry bits shared by the kernel tables and the
//! process address spaces, and construction of the kernel's offset map.
//!
//! Kernel page tables (one PML4, shared by all CPUs, built by `boot.rs`):
//!
//! | virtual range                          | maps                       | pages |
//! |----------------------------------------|----------------------------|-------|
//! | `0 .. 4 GiB`                           | identity (3..4 GiB uncached) | 2 MiB |
//! | `PHYS_OFFSET .. PHYS_OFFSET + RAM top` | all RAM (offset map)       | 2 MiB |

use core::sync::atomic::{AtomicU64, Ordering};

use super::phys::{self, PHYS_OFFSET};
use crate::cpu;
use crate::sync::InitCell;

/// Entry is present.
pub const PRESENT: u64 = 1 << 0;
/// Writes allowed.
pub const WRITABLE: u64 = 1 << 1;
/// User-mode (CPL 3) access allowed.
pub const USER: u64 = 1 << 2;
/// In a PDPT/PD entry: maps a 1 GiB / 2 MiB page instead of a table.
pub const HUGE: u64 = 1 << 7;
/// No instruction fetch (needs EFER.NXE to be honoured by a CPU walk).
pub const NO_EXECUTE: u64 = 1 << 63;
/// Physical address bits of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Entries per table at every level.
pub const ENTRIES: usize = 512;

/// One page-table page. Entries are atomics because tables are read by other
/// CPUs (a "device" walking a process table) while their owner edits them.
pub type PageTable = [AtomicU64; ENTRIES];

/// Table index of `va` at `level` (4 = PML4 .. 1 = PT).
pub const fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// The offset map can cover at most this much physical memory (one static
/// page directory per GiB keeps the code free of allocation at this stage).
pub const OFFSET_MAP_MAX: u64 = 16 << 30;

#[repr(C, align(4096))]
struct TablePage([u64; ENTRIES]);

static OFFSET_PDPT: InitCell<TablePage> = InitCell::new(TablePage([0; ENTRIES]));
static OFFSET_PDS: InitCell<[TablePage; (OFFSET_MAP_MAX >> 30) as usize]> =
    InitCell::new([const { TablePage([0; ENTRIES]) }; (OFFSET_MAP_MAX >> 30) as usize]);

/// Maps physical `[0, ram_top)` (rounded up to 1 GiB, capped at
/// [`OFFSET_MAP_MAX`]) at [`PHYS_OFFSET`] with 2 MiB pages in the active
/// (kernel) PML4. Boot CPU, once, before any AP starts. Returns the mapped top.
pub fn init_offset_map(ram_top: u64) -> u64 {
    let gib = ram_top.div_ceil(1 << 30).clamp(1, OFFSET_MAP_MAX >> 30);
    let pml4 = (cpu::read_cr3() & ADDR_MASK) as *mut u64;
    // SAFETY: single-threaded boot. The statics are identity mapped, so their
    // addresses are physical addresses; the PML4 in CR3 is the boot stub's
    // identity-mapped `boot_pml4`, and slot 256 is unused until now.
    unsafe {
        let pdpt = &mut *OFFSET_PDPT.get();
        let pds = &mut *OFFSET_PDS.get();
        for (g, pd) in pds.iter_mut().enumerate().take(gib as usize) {
            for (i, entry) in pd.0.iter_mut().enumerate() {
                let paddr = ((g as u64) << 30) | ((i as u64) << 21);
                *entry = paddr | PRESENT | WRITABLE | HUGE;
            }
            pdpt.0[g] = (&raw const *pd) as u64 | PRESENT | WRITABLE;
        }
        *pml4.add(index(PHYS_OFFSET, 4)) = (&raw const *pdpt) as u64 | PRESENT | WRITABLE;
    }
    cpu::flush_tlb_all();
    let top = gib << 30;
    phys::set_mapped_top(top);
    top
}

/// Reads entry `i` of the table in frame `table_paddr` (through the offset
/// map).
///
/// # Safety
/// `table_paddr` must be a page-table page below `phys::mapped_top()` that
/// stays allocated for the duration of the call.
pub unsafe fn entry<'a>(table_paddr: u64, i: usize) -> &'a AtomicU64 {
    // SAFETY: forwarded to the caller; `i < 512` keeps us inside the page.
    unsafe { &(*(phys::phys_to_virt(table_paddr) as *const PageTable))[i] }
}

/// Loads an entry with the ordering used by every page-table reader.
pub fn load(e: &AtomicU64) -> u64 {
    e.load(Ordering::Acquire)
}
