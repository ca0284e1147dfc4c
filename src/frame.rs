//! Physical frame allocation, behind a `&self` trait so one allocator serves
//! many callers (mirror tables, the kernel, a counting test fake).

use crate::{Error, Result};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Size of the frames the allocator hands out.
pub const FRAME_SIZE: u64 = 4096;

/// Hands out and takes back 4 KiB physical frames.
///
/// Frames come back with unspecified contents; hmm-core zeroes table frames
/// itself through [`PhysMem`](crate::PhysMem).
pub trait FrameAllocator {
    /// A free, 4 KiB-aligned frame, or `None` when exhausted.
    fn alloc_frame(&self) -> Option<u64>;

    /// Returns `frame` to the allocator.
    ///
    /// # Safety
    /// `frame` must have come from `alloc_frame` of this allocator, must not
    /// have been freed since, and nothing may use it afterwards.
    unsafe fn free_frame(&self, frame: u64);
}

impl<A: FrameAllocator + ?Sized> FrameAllocator for &A {
    fn alloc_frame(&self) -> Option<u64> {
        (**self).alloc_frame()
    }
    unsafe fn free_frame(&self, frame: u64) {
        // SAFETY: forwarded with the caller's guarantee.
        unsafe { (**self).free_frame(frame) }
    }
}

/// A lock-free bitmap allocator over a caller-given physical region, with no
/// heap: the caller supplies one bit per frame as a slice of `AtomicU64`.
#[derive(Debug)]
pub struct BitmapFrameAllocator<'a> {
    base: u64,
    frames: usize,
    bits: &'a [AtomicU64],
    live: AtomicUsize,
    hint: AtomicUsize,
}

impl<'a> BitmapFrameAllocator<'a> {
    /// Manages `frames` frames starting at the 4 KiB-aligned `base`; `bits`
    /// must hold at least `frames` bits, all zero (free).
    pub fn new(base: u64, frames: usize, bits: &'a [AtomicU64]) -> Result<Self> {
        if !base.is_multiple_of(FRAME_SIZE) {
            return Err(Error::Unaligned);
        }
        if bits.len() * 64 < frames {
            return Err(Error::BadLength);
        }
        if base.checked_add(frames as u64 * FRAME_SIZE).is_none() {
            return Err(Error::Wrapping);
        }
        Ok(Self { base, frames, bits, live: AtomicUsize::new(0), hint: AtomicUsize::new(0) })
    }

    /// Number of frames currently allocated.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Number of frames managed.
    pub fn capacity(&self) -> usize {
        self.frames
    }

    fn words(&self) -> usize {
        self.frames.div_ceil(64)
    }
}

impl FrameAllocator for BitmapFrameAllocator<'_> {
    fn alloc_frame(&self) -> Option<u64> {
        let words = self.words();
        let start = self.hint.load(Ordering::Relaxed) % words.max(1);
        for i in 0..words {
            let w = (start + i) % words;
            let word = &self.bits[w];
            let mut cur = word.load(Ordering::Relaxed);
            loop {
                let valid = (self.frames - w * 64).min(64);
                let free = !cur & if valid == 64 { u64::MAX } else { (1u64 << valid) - 1 };
                if free == 0 {
                    break;
                }
                let bit = free.trailing_zeros() as u64;
                match word.compare_exchange_weak(cur, cur | (1 << bit), Ordering::Acquire, Ordering::Relaxed) {
                    Ok(_) => {
                        self.hint.store(w, Ordering::Relaxed);
                        self.live.fetch_add(1, Ordering::Relaxed);
                        return Some(self.base + (w as u64 * 64 + bit) * FRAME_SIZE);
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    unsafe fn free_frame(&self, frame: u64) {
        let idx = (frame.wrapping_sub(self.base) / FRAME_SIZE) as usize;
        debug_assert!(frame >= self.base && idx < self.frames, "foreign frame {frame:#x}");
        let old = self.bits[idx / 64].fetch_and(!(1 << (idx % 64)), Ordering::Release);
        debug_assert!(old & (1 << (idx % 64)) != 0, "double free of {frame:#x}");
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}
