//! The unmap/remap race that `demo` and `ktest` both run: the boot CPU
//! unmaps a region (frames freed and poisoned) and maps it again populated
//! with the next generation of data, round after round, while the device on
//! CPU 1 reads it in a loop with [`device::read_racing`].
//!
//! * First half: after each remap the CPU lets the device read the new
//!   generation (two passes), so invalidations hit live device translations.
//! * Second half: the device stalls (until a flush arrives, at most 5 ms)
//!   and the CPU unmaps during the stall. Even rounds stall between the
//!   table walk and the TLB fill, so flushes land in that window and the
//!   fill must notice. Odd rounds stall inside the walk, before it reads the
//!   last-level table, which the unmap empties and the mirror frees after
//!   the flush: the flush must wait for the walk, or the walk reads poison.
//! * Each round one to three spare frames are held across the remap, which
//!   shifts the page-to-frame assignment: a stale translation then finds
//!   another page's data or poison, rarely the right data by coincidence
//!   (freed frames are reused first, so without this a stale entry would
//!   often point at the frame that now holds its own page's new data).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_core::{Error, RegionFlags, VaRange};

use crate::cpu::Deadline;
use crate::device::{self, DevMirror, pattern};
use crate::memory::FRAMES;
use crate::process::{MapError, Process, STATS, pages};
use crate::smp;
use crate::sync::SpinLock;

/// Most pages and rounds a race takes.
pub const MAX_PAGES: usize = 8;
/// Most rounds (one invalidation sample per round).
pub const MAX_ROUNDS: usize = 512;

/// What a race saw.
pub struct Race {
    /// Device reads that returned current data.
    pub good: u64,
    /// Device reads that found the region unmapped (`Fault`).
    pub holes: u64,
    /// Device reads that gave up (`Busy`).
    pub busy: u64,
    /// Any other device error (there should be none).
    pub other: Option<Error>,
    /// CPU-side failure (there should be none).
    pub failed: Option<MapError>,
    /// Cycles in `invalidate_range_start` per mirrored page, per unmap that
    /// invalidated something in the first half (in the second, flushes wait
    /// for a stalled device on purpose).
    pub per_page: [u64; MAX_ROUNDS],
    /// Valid entries of `per_page`.
    pub samples: usize,
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn wait_until(us: u64, done: impl Fn() -> bool) {
    let deadline = Deadline::after_us(us);
    while !done() && !deadline.expired() {
        core::hint::spin_loop();
    }
}

/// Runs `rounds` rounds on `region` (at most [`MAX_PAGES`] pages) of `p`,
/// which must be mapped populated with generation `generation - 1`.
pub fn run(mr: &DevMirror<'_>, p: &Process, region: VaRange, generation: u64, rounds: usize) -> Race {
    assert!(rounds <= MAX_ROUNDS && region.pages(12) as usize <= MAX_PAGES);
    let epochs = [const { AtomicU64::new(0) }; MAX_PAGES];
    epochs.iter().for_each(|e| e.store(2 * (generation - 1), Ordering::Release));
    let stop = AtomicBool::new(false);
    let [passes, good, holes, busy] = [const { AtomicU64::new(0) }; 4];
    let other = SpinLock::new(None);
    let reader = || {
        while !stop.load(Ordering::Acquire) {
            for (va, epoch) in pages(region).zip(&epochs) {
                match device::read_racing(mr, va, epoch) {
                    Ok(true) => _ = good.fetch_add(1, Ordering::Relaxed),
                    Ok(false) => {} // counted as stale by the device
                    Err(Error::Fault) => _ = holes.fetch_add(1, Ordering::Relaxed),
                    Err(Error::Busy) => _ = busy.fetch_add(1, Ordering::Relaxed),
                    Err(e) => *other.lock() = Some(e),
                }
            }
            passes.fetch_add(1, Ordering::Release);
        }
    };
    let mut per_page = [0; MAX_ROUNDS];
    let mut samples = 0;
    let mut stalls = 0;
    let mut cpu_side = || -> Result<(), MapError> {
        for (round, generation) in (generation..).take(rounds).enumerate() {
            let stalling = round >= rounds / 2;
            if stalling {
                // A stall that began after the previous unmap, still running:
                // between walk and fill, or (odd rounds) inside the walk.
                let dev = mr.device();
                let (on, off) = if round % 2 == 0 {
                    (&dev.fill_delay_us, &dev.walk_delay_us)
                } else {
                    (&dev.walk_delay_us, &dev.fill_delay_us)
                };
                off.store(0, Ordering::Relaxed);
                on.store(5_000, Ordering::Relaxed);
                wait_until(50_000, || get(&dev.stats.stalls) > stalls && dev.in_stall.load(Ordering::SeqCst));
            }
            let (cycles, invalidated) = (get(&STATS.invalidate_cycles), mr.stats().pages_invalidated);
            p.munmap(region)?;
            stalls = get(&mr.device().stats.stalls);
            let pages = mr.stats().pages_invalidated - invalidated;
            if !stalling && let Some(per) = (get(&STATS.invalidate_cycles) - cycles).checked_div(pages) {
                per_page[samples] = per;
                samples += 1;
            }
            epochs.iter().for_each(|e| e.store(2 * generation - 1, Ordering::Release));
            epochs.iter().for_each(|e| e.store(2 * generation, Ordering::Release));
            let mut spares = [None; 3];
            spares.iter_mut().take(1 + round % 3).for_each(|s| *s = FRAMES.alloc());
            let mapped = p.mmap_populate(region, RegionFlags::READ | RegionFlags::WRITE, &mut |va, words| {
                words.iter_mut().enumerate().for_each(|(w, x)| *x = pattern(va, generation, w))
            });
            spares.into_iter().flatten().for_each(|f| FRAMES.free(f));
            mapped?;
            if !stalling {
                let start = passes.load(Ordering::Acquire);
                wait_until(50_000, || passes.load(Ordering::Acquire) >= start + 2);
            }
        }
        Ok(())
    };
    let failed = smp::concurrently(1, &reader, || {
        let r = cpu_side();
        stop.store(true, Ordering::Release);
        r
    })
    .unwrap_or_else(|e| panic!("device cpu: {e:?}"))
    .err();
    mr.device().fill_delay_us.store(0, Ordering::Relaxed);
    mr.device().walk_delay_us.store(0, Ordering::Relaxed);
    let other = *other.lock();
    Race { good: get(&good), holes: get(&holes), busy: get(&busy), other, failed, per_page, samples }
}
