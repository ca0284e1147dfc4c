//! A frame allocator for tests: counts what is live, catches double and
//! foreign frees, poisons what it hands out and takes back, and fails on
//! request.
//!
//! Why each feature:
//! - `live()` lets every test end with "nothing leaked" (`live() == 0`).
//! - A double or foreign free panics at the offending call instead of
//!   corrupting a later test.
//! - Frames are filled with [`POISON`] when freed *and* when handed out (their
//!   contents are unspecified by [`FrameAllocator`]), so a stale reader or a
//!   caller that forgets to zero a table sees garbage, not plausible zeros.
//!   The poison decodes, at every directory level of the x86_64, aarch64 and
//!   riscv64 formats, as a huge leaf or a malformed entry, never as a pointer
//!   to a next-level table, so a walk of a poisoned table cannot wander off
//!   (low bits 0b1110_1101: x86_64 present + huge; aarch64 descriptor type
//!   0b01, a block or invalid, not 0b11; RISC-V W without R, reserved).
//! - `fail_at` / `fail_after` / `fail_huge` inject exhaustion at exact points,
//!   for "allocator ran dry in the middle of a fault" tests.
//!
//! Small frames are taken from the top of the arena downwards and huge chunks
//! from the bottom upwards, so a few 4 KiB frames never fragment the space a
//! test reserved for a 1 GiB chunk.

use crate::phys::{SimPhys, HUGE_2M, PAGE};
use hmm_core::FrameAllocator;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Pattern written into frames the allocator hands out or takes back.
pub const POISON: u64 = 0xDEAD_BEEF_DEAD_BEED;

/// Order of a 2 MiB chunk (in 4 KiB frames).
pub const ORDER_2M: u32 = 9;
/// Order of a 1 GiB chunk (in 4 KiB frames).
pub const ORDER_1G: u32 = 18;

/// Counting, poisoning, fault-injecting allocator over a [`SimPhys`].
///
/// Thread safe; share it with `Arc`.
pub struct CountingAllocator {
    phys: Arc<SimPhys>,
    state: Mutex<State>,
}

impl core::fmt::Debug for CountingAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = self.lock();
        f.debug_struct("CountingAllocator")
            .field("phys", &self.phys)
            .field("live_frames", &s.live_frames)
            .field("live_huge", &s.live_huge)
            .finish()
    }
}

struct State {
    /// First frame index usable (frames below it are outside the arena).
    frames: usize,
    /// One bit per frame, set when allocated.
    used: Vec<u64>,
    /// Live allocations: start address -> order.
    live: HashMap<u64, u32>,
    live_frames: usize,
    live_huge: usize,
    live_bytes: u64,
    /// Word index where the top-down search for small frames starts.
    small_hint: usize,
    /// `Some(k)`: the k-th next allocation fails (1 = the very next).
    fail_at: Option<u64>,
    /// `Some(n)`: n more allocations succeed, then all fail.
    fail_after: Option<u64>,
    /// Every huge allocation fails.
    fail_huge: bool,
    allocs: u64,
    frees: u64,
    injected: u64,
}

impl State {
    fn bit(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_range(&mut self, first: usize, n: usize, value: bool) {
        for i in first..first + n {
            if value {
                self.used[i / 64] |= 1 << (i % 64);
            } else {
                self.used[i / 64] &= !(1 << (i % 64));
            }
        }
    }

    fn range_free(&self, first: usize, n: usize) -> bool {
        let mut i = first;
        while i < first + n {
            if i.is_multiple_of(64) && first + n - i >= 64 {
                if self.used[i / 64] != 0 {
                    return false;
                }
                i += 64;
            } else {
                if self.bit(i) {
                    return false;
                }
                i += 1;
            }
        }
        true
    }

    /// Consumes one allocation attempt from the injection counters; true if
    /// this attempt must fail.
    fn inject(&mut self, huge: bool) -> bool {
        let mut fail = huge && self.fail_huge;
        if let Some(k) = self.fail_at {
            if k <= 1 {
                self.fail_at = None;
                fail = true;
            } else {
                self.fail_at = Some(k - 1);
            }
        }
        if let Some(n) = self.fail_after {
            if n == 0 {
                fail = true;
            } else {
                self.fail_after = Some(n - 1);
            }
        }
        if fail {
            self.injected += 1;
        }
        fail
    }
}

/// What a free call found wrong, reported after the lock is released so a
/// panic does not poison the allocator's mutex for the rest of the test.
enum FreeError {
    Foreign(u64),
    NotLive(u64),
    WrongOrder { pa: u64, live: u32, freed: u32 },
}

impl CountingAllocator {
    /// An allocator over the whole of `phys`.
    pub fn new(phys: Arc<SimPhys>) -> Self {
        let frames = (phys.size() / PAGE) as usize;
        let words = frames.div_ceil(64);
        let mut used = vec![0u64; words];
        // Bits past the last frame are permanently "used".
        if !frames.is_multiple_of(64) {
            used[words - 1] = !0u64 << (frames % 64);
        }
        let state = State {
            frames,
            used,
            live: HashMap::new(),
            live_frames: 0,
            live_huge: 0,
            live_bytes: 0,
            small_hint: words.saturating_sub(1),
            fail_at: None,
            fail_after: None,
            fail_huge: false,
            allocs: 0,
            frees: 0,
            injected: 0,
        };
        Self { phys, state: Mutex::new(state) }
    }

    /// A fresh [`SimPhys`] of `size` bytes (at the default 1 GiB base) with an
    /// allocator over it.
    pub fn with_size(size: u64) -> Arc<Self> {
        Arc::new(Self::new(Arc::new(SimPhys::new(size))))
    }

    /// The memory this allocator hands out.
    pub fn phys(&self) -> &Arc<SimPhys> {
        &self.phys
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while the lock was held leaves the state usable
        // (every update is completed before any panic), so ignore poisoning.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Outstanding allocations of any size (4 KiB frames and huge chunks
    /// each count one). Zero means nothing leaked.
    pub fn live(&self) -> usize {
        let s = self.lock();
        s.live_frames + s.live_huge
    }

    /// Outstanding 4 KiB frames from [`FrameAllocator::alloc_frame`].
    pub fn live_frames(&self) -> usize {
        self.lock().live_frames
    }

    /// Outstanding huge chunks from [`alloc_huge`](Self::alloc_huge).
    pub fn live_huge(&self) -> usize {
        self.lock().live_huge
    }

    /// Outstanding bytes, all sizes.
    pub fn live_bytes(&self) -> u64 {
        self.lock().live_bytes
    }

    /// Whether `pa` is the start of a live allocation, and of which order.
    pub fn live_order(&self, pa: u64) -> Option<u32> {
        self.lock().live.get(&pa).copied()
    }

    /// Allocation attempts so far (successful or not).
    pub fn allocs(&self) -> u64 {
        self.lock().allocs
    }

    /// Frees so far.
    pub fn frees(&self) -> u64 {
        self.lock().frees
    }

    /// Allocations failed on purpose so far.
    pub fn injected_failures(&self) -> u64 {
        self.lock().injected
    }

    /// The `k`-th next allocation attempt (1 = the very next), of any size,
    /// fails once. `k == 0` cancels.
    pub fn fail_at(&self, k: u64) {
        self.lock().fail_at = (k > 0).then_some(k);
    }

    /// The next `n` allocation attempts succeed (if memory allows), every
    /// later one fails until [`clear_failures`](Self::clear_failures).
    pub fn fail_after(&self, n: u64) {
        self.lock().fail_after = Some(n);
    }

    /// Makes every huge allocation fail (or not), e.g. to test a fallback
    /// from 2 MiB to 4 KiB pages.
    pub fn fail_huge(&self, on: bool) {
        self.lock().fail_huge = on;
    }

    /// Cancels every injected failure.
    pub fn clear_failures(&self) {
        let mut s = self.lock();
        s.fail_at = None;
        s.fail_after = None;
        s.fail_huge = false;
    }

    fn pa_of(&self, index: usize) -> u64 {
        self.phys.base() + index as u64 * PAGE
    }

    /// Poisons a freshly allocated or freed chunk. Chunks above 2 MiB are
    /// poisoned only in their first and last 2 MiB: writing a whole 1 GiB
    /// would commit a gigabyte of host memory per call.
    fn poison(&self, pa: u64, order: u32) {
        let len = PAGE << order;
        if len <= HUGE_2M {
            self.phys.fill(pa, len, POISON);
        } else {
            self.phys.fill(pa, HUGE_2M, POISON);
            self.phys.fill(pa + len - HUGE_2M, HUGE_2M, POISON);
        }
    }

    /// A naturally aligned chunk of `4 KiB << order` bytes (order 9: 2 MiB,
    /// order 18: 1 GiB; any order up to 18 works), aligned in *physical*
    /// address, or `None`. Counted by [`live`](Self::live); contents are
    /// poisoned (see the module docs).
    pub fn alloc_huge(&self, order: u32) -> Option<u64> {
        assert!(order <= ORDER_1G, "order {order} too large");
        if order == 0 {
            return self.alloc_frame();
        }
        let pa = {
            let mut s = self.lock();
            s.allocs += 1;
            if s.inject(true) {
                return None;
            }
            let n = 1usize << order;
            let align = PAGE << order;
            let base = self.phys.base();
            let first_pa = base.div_ceil(align) * align;
            let mut found = None;
            let mut pa = first_pa;
            while pa + align <= self.phys.end() {
                let first = ((pa - base) / PAGE) as usize;
                if s.range_free(first, n) {
                    found = Some((pa, first));
                    break;
                }
                pa += align;
            }
            let (pa, first) = found?;
            s.set_range(first, n, true);
            s.live.insert(pa, order);
            s.live_huge += 1;
            s.live_bytes += align;
            pa
        };
        self.poison(pa, order);
        Some(pa)
    }

    /// Returns a chunk from [`alloc_huge`](Self::alloc_huge).
    ///
    /// Panics on a double free, a foreign address, or an order that differs
    /// from the allocation's.
    ///
    /// # Safety
    /// Nothing may use the chunk afterwards (the allocator poisons it and may
    /// hand it out again).
    pub unsafe fn free_huge(&self, pa: u64, order: u32) {
        if order == 0 {
            // SAFETY: forwarded with the caller's guarantee.
            return unsafe { self.free_frame(pa) };
        }
        self.free_checked(pa, order);
    }

    fn free_checked(&self, pa: u64, order: u32) {
        let result = {
            let mut s = self.lock();
            match s.live.get(&pa).copied() {
                _ if !self.phys.contains(pa, PAGE) || !pa.is_multiple_of(PAGE) => Err(FreeError::Foreign(pa)),
                None => Err(FreeError::NotLive(pa)),
                Some(live) if live != order => Err(FreeError::WrongOrder { pa, live, freed: order }),
                Some(_) => {
                    s.live.remove(&pa);
                    let first = ((pa - self.phys.base()) / PAGE) as usize;
                    let n = 1usize << order;
                    debug_assert!(first + n <= s.frames);
                    s.set_range(first, n, false);
                    if order == 0 {
                        s.live_frames -= 1;
                        s.small_hint = s.small_hint.max(first / 64);
                    } else {
                        s.live_huge -= 1;
                    }
                    s.live_bytes -= PAGE << order;
                    s.frees += 1;
                    Ok(())
                }
            }
        };
        match result {
            Ok(()) => self.poison(pa, order),
            Err(FreeError::Foreign(pa)) => panic!("free of foreign frame {pa:#x} (not from this allocator)"),
            Err(FreeError::NotLive(pa)) => panic!("double free (or free of a never allocated frame) {pa:#x}"),
            Err(FreeError::WrongOrder { pa, live, freed }) => {
                panic!("frame {pa:#x} allocated with order {live} but freed with order {freed}")
            }
        }
    }
}

impl FrameAllocator for CountingAllocator {
    fn alloc_frame(&self) -> Option<u64> {
        let pa = {
            let mut s = self.lock();
            s.allocs += 1;
            if s.inject(false) {
                return None;
            }
            let words = s.used.len();
            let start = s.small_hint.min(words.saturating_sub(1));
            // Top-down from the hint, wrapping once.
            let mut found = None;
            for step in 0..words {
                let w = (start + words - step) % words;
                let word = s.used[w];
                if word != u64::MAX {
                    let bit = 63 - (!word).leading_zeros() as usize;
                    found = Some((w, w * 64 + bit));
                    break;
                }
            }
            let (w, index) = found?;
            s.used[w] |= 1 << (index % 64);
            s.small_hint = w;
            let pa = self.pa_of(index);
            s.live.insert(pa, 0);
            s.live_frames += 1;
            s.live_bytes += PAGE;
            pa
        };
        self.poison(pa, 0);
        Some(pa)
    }

    unsafe fn free_frame(&self, frame: u64) {
        self.free_checked(frame, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::HUGE_1G;

    #[test]
    fn counts_and_poisons() {
        let a = CountingAllocator::with_size(64 * PAGE);
        let f = a.alloc_frame().unwrap();
        assert_eq!(a.live(), 1);
        assert_eq!(a.phys().read_u64(f), POISON);
        a.phys().write_u64(f, 1);
        // SAFETY: `f` came from `a` and is not used afterwards.
        unsafe { a.free_frame(f) };
        assert_eq!(a.live(), 0);
        assert_eq!(a.phys().read_u64(f), POISON);
    }

    #[test]
    fn exhaustion_and_injection() {
        let a = CountingAllocator::with_size(4 * PAGE);
        let frames: Vec<u64> = (0..4).map(|_| a.alloc_frame().unwrap()).collect();
        assert!(a.alloc_frame().is_none());
        for f in frames {
            // SAFETY: each frame came from `a` once.
            unsafe { a.free_frame(f) };
        }
        a.fail_at(2);
        let f1 = a.alloc_frame().unwrap();
        assert!(a.alloc_frame().is_none());
        let f2 = a.alloc_frame().unwrap();
        a.fail_after(1);
        let f3 = a.alloc_frame().unwrap();
        assert!(a.alloc_frame().is_none());
        assert!(a.alloc_frame().is_none());
        a.clear_failures();
        let f4 = a.alloc_frame().unwrap();
        assert_eq!(a.injected_failures(), 3);
        for f in [f1, f2, f3, f4] {
            // SAFETY: each frame came from `a` once.
            unsafe { a.free_frame(f) };
        }
        assert_eq!(a.live(), 0);
    }

    #[test]
    fn huge_chunks_are_physically_aligned() {
        let a = CountingAllocator::with_size(HUGE_1G + 8 * HUGE_2M);
        let small = a.alloc_frame().unwrap();
        let g = a.alloc_huge(ORDER_1G).unwrap();
        assert_eq!(g % HUGE_1G, 0);
        let m = a.alloc_huge(ORDER_2M).unwrap();
        assert_eq!(m % HUGE_2M, 0);
        assert!(m >= g + HUGE_1G);
        assert!(a.alloc_huge(ORDER_1G).is_none());
        assert_eq!(a.live(), 3);
        assert_eq!(a.live_huge(), 2);
        // SAFETY: all three came from `a` once and are not used afterwards.
        unsafe {
            a.free_huge(g, ORDER_1G);
            a.free_huge(m, ORDER_2M);
            a.free_frame(small);
        }
        assert_eq!(a.live(), 0);
        assert_eq!(a.live_bytes(), 0);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let a = CountingAllocator::with_size(4 * PAGE);
        let f = a.alloc_frame().unwrap();
        // SAFETY: deliberately wrong: the second free must panic before any
        // use of the frame.
        unsafe {
            a.free_frame(f);
            a.free_frame(f);
        }
    }

    #[test]
    #[should_panic(expected = "foreign frame")]
    fn foreign_free_panics() {
        let a = CountingAllocator::with_size(4 * PAGE);
        // SAFETY: deliberately wrong: the allocator must refuse the address.
        unsafe { a.free_frame(0x1000) };
    }

    #[test]
    #[should_panic(expected = "freed with order")]
    fn wrong_order_panics() {
        let a = CountingAllocator::with_size(2 * HUGE_2M);
        let m = a.alloc_huge(ORDER_2M).unwrap();
        // SAFETY: deliberately wrong: the allocator must refuse the order.
        unsafe { a.free_frame(m) };
    }
}
