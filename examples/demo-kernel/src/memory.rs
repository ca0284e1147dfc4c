//! Physical memory: the frame pool (hmm-core's [`BitmapFrameAllocator`] over
//! 8 MiB of RAM the kernel hands over, right after its image) and the
//! identity map through which the kernel, hmm-core and the device reach
//! every frame.

use core::ops::Range;
use core::sync::atomic::AtomicU64;

use hmm_core::{BitmapFrameAllocator, FRAME_SIZE, FrameAllocator, OffsetPhysMem};
use spin::Once;

/// Frames in the pool (8 MiB).
const POOL_FRAMES: usize = 2048;
/// Bytes of the pool.
pub const POOL_BYTES: u64 = POOL_FRAMES as u64 * FRAME_SIZE;
/// What a freed frame is filled with, so a stale access reads nonsense.
pub const POISON: u64 = 0xdead_beef_dead_beef;

static BITS: [AtomicU64; POOL_FRAMES / 64] = [const { AtomicU64::new(0) }; POOL_FRAMES / 64];
static POOL: Once<BitmapFrameAllocator<'static>> = Once::new();
/// All of RAM, for the debug check of [`words`].
static RAM: Once<Range<u64>> = Once::new();

/// The frame allocator type of the kernel.
pub type Frames = BitmapFrameAllocator<'static>;

/// Sets up the pool at `start`, which must leave room for it in `ram`.
///
/// # Safety
/// All of `ram` is identity mapped (or paging is off) from now on, in
/// every table the kernel runs on; the pool is free RAM nothing else uses.
pub unsafe fn init(ram: Range<u64>, start: u64) -> Result<&'static Frames, &'static str> {
    if start < ram.start || start + POOL_BYTES > ram.end {
        return Err("frame pool does not fit in RAM");
    }
    RAM.call_once(|| ram);
    let pool = BitmapFrameAllocator::new(start, POOL_FRAMES, &BITS).map_err(|_| "bad frame pool")?;
    Ok(POOL.call_once(|| pool))
}

/// The identity map: RAM is mapped at its physical address.
pub fn phys() -> OffsetPhysMem {
    // SAFETY: the caller of `init` guaranteed the identity map of RAM, and
    // hmm-core only reaches frames of the pool and tables in RAM.
    unsafe { OffsetPhysMem::new(0) }
}

/// Pointer to the 512 words of frame `pa`.
pub fn words(pa: u64) -> *mut u64 {
    debug_assert!(pa.is_multiple_of(FRAME_SIZE) && RAM.get().is_none_or(|ram| ram.contains(&pa)));
    pa as *mut u64
}

/// Fills frame `pa` with `value`.
///
/// # Safety
/// The caller owns frame `pa` (allocated, not in use by anyone else).
pub unsafe fn fill(pa: u64, value: u64) {
    for i in 0..512 {
        // SAFETY: an owned RAM frame, identity mapped, 512 words long.
        unsafe { core::ptr::write_volatile(words(pa).add(i), value) };
    }
}

/// A zeroed frame.
pub fn alloc_zeroed(frames: &Frames) -> Option<u64> {
    let pa = frames.alloc_frame()?;
    // SAFETY: just allocated, so ours.
    unsafe { fill(pa, 0) };
    Some(pa)
}

/// Poisons and frees frame `pa`.
///
/// # Safety
/// As [`FrameAllocator::free_frame`]: `pa` came from `frames` and nothing
/// uses it any more.
pub unsafe fn free(frames: &Frames, pa: u64) {
    // SAFETY: the caller hands the frame back, so it is still ours to write;
    // then it returns to the allocator it came from.
    unsafe {
        fill(pa, POISON);
        frames.free_frame(pa);
    }
}

/// A new frame holding a copy of frame `from`.
///
/// # Safety
/// `from` must stay allocated while this runs.
pub unsafe fn alloc_copy(frames: &Frames, from: u64) -> Option<u64> {
    let to = frames.alloc_frame()?;
    // SAFETY: `to` is ours, `from` is live (caller); distinct RAM frames,
    // identity mapped, 512 words each.
    unsafe { core::ptr::copy_nonoverlapping(words(from), words(to), 512) };
    Some(to)
}
