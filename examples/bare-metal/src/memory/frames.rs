//! Physical frame allocator: 4 KiB frames of free RAM above the kernel image.
//!
//! * One bitmap bit per frame (1 = in use); the bitmaps live in the first
//!   frames of the managed range and are accessed through the offset map.
//! * `&self` API behind a spin lock, so every CPU can allocate and free.
//! * Poison on free: a freed frame is filled with [`POISON`] so anyone still
//!   reading it through a stale translation sees an obvious pattern rather
//!   than plausible old data. A second bitmap remembers which free frames are
//!   poisoned; when such a frame is handed out again the allocator checks the
//!   poison is intact and panics if somebody wrote to it after the free.
//! * Never-used frames have unspecified contents (poisoning all of RAM at boot
//!   would cost ~0.1 s per 256 MiB under TCG); use [`FrameAllocator::alloc_zeroed`].

use core::ptr;

use super::phys::{self, PAGE_SIZE, PhysFrame};
use crate::pvh::RamRegion;
use crate::sync::SpinLock;

/// Pattern written over every freed frame (as 64-bit words).
pub const POISON: u64 = 0xdead_beef_dead_beef;

const WORDS_PER_FRAME: usize = (PAGE_SIZE / 8) as usize;

/// Why a frame could not be freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The frame is not in the range this allocator manages.
    NotManaged(PhysFrame),
    /// The frame is already free.
    DoubleFree(PhysFrame),
}

struct Inner {
    /// Physical address of managed frame 0.
    base: u64,
    /// Number of managed frames (including the bitmap frames themselves).
    frames: usize,
    /// 1 = in use / not RAM. Lives in the offset map.
    used: *mut u64,
    /// 1 = free and poisoned.
    poisoned: *mut u64,
    words: usize,
    /// Where the next search starts.
    hint: usize,
    free: usize,
    total_free: usize,
}

// SAFETY: the raw pointers point into frames reserved for the bitmaps for the
// kernel's whole lifetime; `Inner` is only ever accessed under the lock.
unsafe impl Send for Inner {}

impl Inner {
    fn load_word(&self, bitmap: *mut u64, i: usize) -> u64 {
        assert!(i < self.words);
        // SAFETY: `i` is in bounds of a bitmap reserved in `init`; `Inner` is
        // only reachable under the allocator lock, so nobody writes it
        // concurrently.
        unsafe { bitmap.add(i).read() }
    }

    fn store_word(&mut self, bitmap: *mut u64, i: usize, value: u64) {
        assert!(i < self.words);
        // SAFETY: as in `load_word`; `&mut self` proves we hold the lock.
        unsafe { bitmap.add(i).write(value) }
    }

    fn test(&self, bitmap: *mut u64, frame: usize) -> bool {
        self.load_word(bitmap, frame / 64) & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, bitmap: *mut u64, frame: usize, on: bool) {
        let old = self.load_word(bitmap, frame / 64);
        let bit = 1 << (frame % 64);
        self.store_word(bitmap, frame / 64, if on { old | bit } else { old & !bit });
    }
}

/// Statistics for reports and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameStats {
    /// Lowest managed physical address.
    pub base: u64,
    /// End of the managed range.
    pub end: u64,
    /// Frames free right now.
    pub free: usize,
    /// Frames that were free right after `init`.
    pub total_free: usize,
}

/// The allocator. Use the global [`FRAMES`].
pub struct FrameAllocator {
    inner: SpinLock<Option<Inner>>,
}

/// The kernel's frame allocator (initialised in `kernel_main`).
pub static FRAMES: FrameAllocator = FrameAllocator { inner: SpinLock::new(None) };

impl FrameAllocator {
    /// Takes over all RAM in `regions` that lies in `[managed_start,
    /// phys::mapped_top())`. `managed_start` is rounded up to a frame.
    /// Requires the offset map. Panics if called twice.
    pub fn init(&self, regions: &[RamRegion], managed_start: u64) {
        let mut guard = self.inner.lock();
        assert!(guard.is_none(), "frame allocator initialised twice");
        let base = managed_start.next_multiple_of(PAGE_SIZE);
        let top = regions.iter().map(|r| r.end).max().unwrap_or(0).min(phys::mapped_top()) & !(PAGE_SIZE - 1);
        assert!(top > base, "no RAM above the kernel ({base:#x})");
        let frames = ((top - base) / PAGE_SIZE) as usize;
        let words = frames.div_ceil(64);
        let bitmap_frames = (words * 8).div_ceil(PAGE_SIZE as usize);
        let meta_end = base + 2 * bitmap_frames as u64 * PAGE_SIZE;
        assert!(
            regions.iter().any(|r| r.start <= base && meta_end <= r.end),
            "allocator metadata [{base:#x}, {meta_end:#x}) is not RAM"
        );
        let used = phys::phys_to_virt(base).cast::<u64>();
        let poisoned = phys::phys_to_virt(base + bitmap_frames as u64 * PAGE_SIZE).cast::<u64>();
        // SAFETY: both bitmaps lie in RAM just checked to be usable, above the
        // kernel image and below mapped_top, and are owned by us from now on.
        unsafe {
            ptr::write_bytes(used, 0xff, words);
            ptr::write_bytes(poisoned, 0, words);
        }
        let mut inner = Inner { base, frames, used, poisoned, words, hint: 0, free: 0, total_free: 0 };
        let first_free = (meta_end - base) / PAGE_SIZE;
        for r in regions {
            let start = r.start.max(base).next_multiple_of(PAGE_SIZE);
            let end = r.end.min(top) & !(PAGE_SIZE - 1);
            let mut p = start;
            while p < end {
                let i = ((p - base) / PAGE_SIZE) as usize;
                if i as u64 >= first_free && inner.test(used, i) {
                    inner.set(used, i, false);
                    inner.free += 1;
                }
                p += PAGE_SIZE;
            }
        }
        inner.total_free = inner.free;
        *guard = Some(inner);
    }

    /// Allocates one frame. Contents are unspecified (poison if it was freed
    /// before). Returns `None` when RAM is exhausted.
    pub fn alloc(&self) -> Option<PhysFrame> {
        let mut guard = self.inner.lock();
        let inner = guard.as_mut().expect("frame allocator not initialised");
        if inner.free == 0 {
            return None;
        }
        for step in 0..inner.words {
            let wi = (inner.hint / 64 + step) % inner.words;
            let word = inner.load_word(inner.used, wi);
            if word == u64::MAX {
                continue;
            }
            let i = wi * 64 + word.trailing_ones() as usize;
            if i >= inner.frames {
                continue;
            }
            inner.set(inner.used, i, true);
            inner.free -= 1;
            inner.hint = i + 1;
            let frame = PhysFrame::containing(inner.base + i as u64 * PAGE_SIZE);
            if inner.test(inner.poisoned, i) {
                inner.set(inner.poisoned, i, false);
                check_poison(frame);
            }
            return Some(frame);
        }
        None
    }

    /// Allocates `1 << order` physically contiguous frames whose first frame
    /// is aligned to their total size (order 9: a 2 MiB chunk for a huge
    /// leaf). Contents are unspecified. Free them one frame at a time.
    pub fn alloc_aligned(&self, order: u32) -> Option<PhysFrame> {
        let count = 1usize << order;
        let align = PAGE_SIZE << order;
        let mut guard = self.inner.lock();
        let inner = guard.as_mut().expect("frame allocator not initialised");
        if inner.free < count {
            return None;
        }
        let mut p = inner.base.next_multiple_of(align);
        while p + align <= inner.base + inner.frames as u64 * PAGE_SIZE {
            let first = ((p - inner.base) / PAGE_SIZE) as usize;
            if let Some(used) = (first..first + count).rev().find(|&i| inner.test(inner.used, i)) {
                // Skip past the used frame, to the next aligned start.
                p = (inner.base + (used as u64 + 1) * PAGE_SIZE).next_multiple_of(align);
                continue;
            }
            for i in first..first + count {
                inner.set(inner.used, i, true);
                if inner.test(inner.poisoned, i) {
                    inner.set(inner.poisoned, i, false);
                    check_poison(PhysFrame::containing(inner.base + i as u64 * PAGE_SIZE));
                }
            }
            inner.free -= count;
            return Some(PhysFrame::containing(p));
        }
        None
    }

    /// Allocates one zero-filled frame.
    pub fn alloc_zeroed(&self) -> Option<PhysFrame> {
        let frame = self.alloc()?;
        // SAFETY: we own the freshly allocated frame; the offset map covers it.
        unsafe { ptr::write_bytes(frame.as_ptr::<u8>(), 0, PAGE_SIZE as usize) };
        Some(frame)
    }

    /// Returns `frame` to the allocator, poisoning it first.
    ///
    /// The caller must be done with it: every translation that pointed to it
    /// has been removed and flushed (see `process.rs`).
    pub fn try_free(&self, frame: PhysFrame) -> Result<(), FreeError> {
        let mut guard = self.inner.lock();
        let inner = guard.as_mut().expect("frame allocator not initialised");
        let p = frame.start();
        if p < inner.base || p >= inner.base + inner.frames as u64 * PAGE_SIZE {
            return Err(FreeError::NotManaged(frame));
        }
        let i = ((p - inner.base) / PAGE_SIZE) as usize;
        if !inner.test(inner.used, i) {
            return Err(FreeError::DoubleFree(frame));
        }
        let words = frame.as_ptr::<u64>();
        for w in 0..WORDS_PER_FRAME {
            // SAFETY: the frame is in the managed range (offset mapped) and the
            // caller gave up ownership; volatile so the poison is really
            // written even though nobody reads it "in Rust's view".
            unsafe { ptr::write_volatile(words.add(w), POISON) };
        }
        inner.set(inner.used, i, false);
        inner.set(inner.poisoned, i, true);
        inner.free += 1;
        Ok(())
    }

    /// [`Self::try_free`] that panics on misuse (double free, foreign frame).
    pub fn free(&self, frame: PhysFrame) {
        if let Err(e) = self.try_free(frame) {
            panic!("bad frame free: {e:?}");
        }
    }

    /// Current statistics.
    pub fn stats(&self) -> FrameStats {
        let guard = self.inner.lock();
        let inner = guard.as_ref().expect("frame allocator not initialised");
        FrameStats {
            base: inner.base,
            end: inner.base + inner.frames as u64 * PAGE_SIZE,
            free: inner.free,
            total_free: inner.total_free,
        }
    }
}

/// Panics if a freed frame was written after it was freed.
fn check_poison(frame: PhysFrame) {
    let words = frame.as_ptr::<u64>();
    for w in 0..WORDS_PER_FRAME {
        // SAFETY: the frame is offset mapped and we hold the allocator lock;
        // nobody may legitimately write a free frame.
        let value = unsafe { ptr::read_volatile(words.add(w)) };
        assert!(value == POISON, "use after free: {frame} was written after being freed (word {w}: {value:#x})");
    }
}

/// Reads the first word of `frame` (tests/demo use it to show the poison).
pub fn peek(frame: PhysFrame) -> u64 {
    // SAFETY: any managed frame is offset mapped; a volatile read of a word
    // has no side effects.
    unsafe { ptr::read_volatile(frame.as_ptr::<u64>()) }
}

/// hmm-core takes frames for its mirror tables from the kernel allocator.
impl hmm_core::FrameAllocator for FrameAllocator {
    fn alloc_frame(&self) -> Option<u64> {
        self.alloc().map(PhysFrame::start)
    }

    unsafe fn free_frame(&self, frame: u64) {
        self.free(PhysFrame::containing(frame));
    }
}
