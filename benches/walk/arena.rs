//! A heap arena of zeroed 4 KiB frames standing in for physical memory, and
//! a builder of page tables in it for any [`PteFormat`] (shared by the walk
//! and formats benches).
//!
//! Physical address = [`BASE`] + offset in the arena. Leaves point to fake
//! frames outside the arena: nothing reads data frames.

use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::PhysMem;
use std::alloc::{alloc_zeroed, dealloc, Layout};

/// Physical address of the arena's first frame.
pub const BASE: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// Page-aligned, zeroed frames on the heap, reached through a raw pointer
/// only (so `hmm_core`, the `x86_64` crate and the hand walk may all read
/// them without one holding a Rust reference the others would alias).
pub struct Arena {
    base: *mut u64,
    layout: Layout,
    frames: u64,
    next: u64,
}

// SAFETY: `base` is a live, 4 KiB-aligned allocation of `frames` frames that
// is neither moved nor freed before the arena drops; every table handed to
// hmm-core is one of its frames, and distinct frames do not overlap.
unsafe impl PhysMem for Arena {
    #[inline]
    fn ptr(&self, pa: u64) -> *mut u8 {
        self.base.cast::<u8>().wrapping_add((pa - BASE) as usize)
    }
}

impl Arena {
    /// An arena of `frames` zeroed frames, none allocated yet.
    pub fn new(frames: u64) -> Self {
        let layout = Layout::from_size_align((frames * PAGE) as usize, PAGE as usize).unwrap();
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) }.cast::<u64>();
        assert!(!base.is_null(), "arena allocation failed");
        Self { base, layout, frames, next: 0 }
    }

    /// The physical address of the next unused (zeroed) frame.
    pub fn alloc(&mut self) -> u64 {
        assert!(self.next < self.frames, "arena too small");
        self.next += 1;
        BASE + (self.next - 1) * PAGE
    }

    fn slot(&mut self, table: u64, idx: usize) -> &mut u64 {
        assert!(table >= BASE && table < BASE + self.next * PAGE && idx < 512);
        // SAFETY: `table` is an allocated frame of the arena (checked) and
        // `idx < 512` keeps the entry inside it; `&mut self` excludes others.
        unsafe { &mut *self.ptr(table).cast::<u64>().add(idx) }
    }

    /// Maps `count` leaves of `level` from `va` to consecutive fake frames
    /// from `frame`, with `flags`, in the `F` tables under `root`. Missing
    /// tables are allocated and linked with `F::directory`; leaves are
    /// `F::encode(&PteView::Leaf { .. }, level)`.
    pub fn map<F: PteFormat>(&mut self, root: u64, va: u64, count: u64, level: usize, frame: u64, flags: LeafFlags) {
        let size = 1u64 << F::Geometry::level_shift(level);
        for i in 0..count {
            let v = va + i * size;
            let mut table = root;
            for l in (level + 1..F::Geometry::LEVELS).rev() {
                let idx = F::Geometry::index(v, l);
                table = match F::decode(*self.slot(table, idx), l) {
                    PteView::Table { frame, .. } => frame,
                    PteView::Absent => {
                        let t = self.alloc();
                        *self.slot(table, idx) = F::directory(t, l).unwrap();
                        t
                    }
                    other => panic!("{other:?} where a table belongs (level {l}, va {v:#x})"),
                };
            }
            let leaf = PteView::Leaf { frame: frame + i * size, flags };
            *self.slot(table, F::Geometry::index(v, level)) = F::encode(&leaf, level).unwrap();
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.base.cast(), self.layout) };
    }
}
