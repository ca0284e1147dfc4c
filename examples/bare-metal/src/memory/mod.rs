//! Physical memory: frames, the kernel's offset map, and the frame allocator.
//!
//! * [`phys`]   — `PhysFrame` and `phys_to_virt` (the "offset map" contract).
//! * [`paging`] — x86_64 page-table entry bits and building the offset map in
//!   the kernel's own page tables.
//! * [`frames`] — the 4 KiB frame allocator with poison-on-free.

pub mod frames;
pub mod paging;
pub mod phys;

pub use frames::FRAMES;
pub use phys::{PAGE_SIZE, PhysFrame};

/// First byte after the kernel image (linker symbol, identity mapped so the
/// address is physical).
pub fn kernel_end() -> u64 {
    unsafe extern "C" {
        static __kernel_end: u8;
    }
    &raw const __kernel_end as u64
}

/// First byte of the kernel image.
pub fn kernel_start() -> u64 {
    unsafe extern "C" {
        static __kernel_start: u8;
    }
    &raw const __kernel_start as u64
}
