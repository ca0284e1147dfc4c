//! Simulated physical memory: one lazily zeroed arena at a nonzero physical
//! base, shared by every thread of a test.
//!
//! Why an arena of `AtomicU64`: hmm-core reaches page tables through
//! [`PhysMem::ptr`] and touches them only with `AtomicU64` operations, while a
//! test's "device" thread may read data frames the "kernel" thread is writing.
//! Keeping every word of simulated RAM an `AtomicU64` makes all of that free of
//! data races by construction: the helpers here only ever use atomic loads and
//! stores, so the worst a buggy test (or a buggy hmm-core) can observe is a
//! stale or torn *value*, never undefined behaviour.
//!
//! Why lazily zeroed: the arena is allocated as a zeroed `Vec<u64>`, which the
//! global allocator serves from fresh zero pages of the host OS (`calloc` ->
//! `mmap`), so a 2 GiB arena costs nothing until it is touched. The helpers
//! keep it that way where they can: [`SimPhys::zero`] and [`SimPhys::copy`]
//! skip words that are already zero, so zeroing or copying an untouched 1 GiB
//! frame reads the host's shared zero page instead of committing memory.

use core::sync::atomic::{AtomicU64, Ordering};
use hmm_core::PhysMem;

/// Size of a base frame.
pub const PAGE: u64 = 4096;
/// Size of a 2 MiB (order 9) frame.
pub const HUGE_2M: u64 = 2 << 20;
/// Size of a 1 GiB (order 18) frame.
pub const HUGE_1G: u64 = 1 << 30;

// An arena of `u64` is reinterpreted as `AtomicU64`; the two must agree on
// size and alignment (true on every 64-bit host this kit targets).
const _: () = assert!(core::mem::size_of::<u64>() == core::mem::size_of::<AtomicU64>());
const _: () = assert!(core::mem::align_of::<u64>() == core::mem::align_of::<AtomicU64>());

/// Simulated RAM covering the physical addresses `base .. base + size`.
///
/// Physical address 0 is never inside (the base is nonzero), so a zero frame
/// number always means "no frame". With the default base of 1 GiB, every
/// naturally aligned 2 MiB and 1 GiB chunk of physical addresses is also
/// aligned within the arena, so huge frames can be handed out.
pub struct SimPhys {
    base: u64,
    // INVARIANT: never reallocated or shrunk while `self` lives, so pointers
    // returned by `ptr` stay valid for the lifetime of `self`.
    mem: Box<[AtomicU64]>,
}

impl core::fmt::Debug for SimPhys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimPhys").field("base", &format_args!("{:#x}", self.base)).field("size", &self.size()).finish()
    }
}

impl SimPhys {
    /// Default physical base: 1 GiB, so 1 GiB chunks can be aligned.
    pub const DEFAULT_BASE: u64 = HUGE_1G;

    /// An arena of `size` bytes (rounded up to 4 KiB) at [`Self::DEFAULT_BASE`].
    pub fn new(size: u64) -> Self {
        Self::with_base(Self::DEFAULT_BASE, size)
    }

    /// An arena of `size` bytes (rounded up to 4 KiB) at physical `base`.
    ///
    /// Panics if `base` is 0 or not 4 KiB aligned, or if the arena would run
    /// past the 52-bit physical address space of x86_64.
    pub fn with_base(base: u64, size: u64) -> Self {
        assert!(base != 0 && base.is_multiple_of(PAGE), "base must be nonzero and 4 KiB aligned");
        let size = size.div_ceil(PAGE).max(1) * PAGE;
        assert!(base.checked_add(size).is_some_and(|end| end <= 1 << 52), "arena beyond 52-bit physical space");
        let words = usize::try_from(size / 8).expect("arena too large for this host");
        // `vec![0; n]` goes through `alloc_zeroed`, which the host serves with
        // untouched zero pages: nothing is committed until written.
        let zeroed: Box<[u64]> = vec![0u64; words].into_boxed_slice();
        let raw = Box::into_raw(zeroed) as *mut [AtomicU64];
        // SAFETY: `AtomicU64` has the size, alignment (checked above) and bit validity of `u64`, so this is
        // a valid `[AtomicU64]` of the same length and layout, which `Box` frees correctly.
        let mem = unsafe { Box::from_raw(raw) };
        Self { base, mem }
    }

    /// First physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.mem.len() as u64 * 8
    }

    /// One past the last physical address.
    pub fn end(&self) -> u64 {
        self.base + self.size()
    }

    /// Whether `[pa, pa + len)` lies inside the arena.
    #[inline]
    pub fn contains(&self, pa: u64, len: u64) -> bool {
        pa >= self.base && pa.checked_add(len).is_some_and(|end| end <= self.end())
    }

    fn index(&self, pa: u64) -> usize {
        assert!(pa.is_multiple_of(8), "unaligned word access at {pa:#x}");
        assert!(self.contains(pa, 8), "physical address {pa:#x} outside the simulated RAM");
        ((pa - self.base) / 8) as usize
    }

    /// The 8-byte word at `pa` (8-byte aligned, inside the arena), for
    /// page-table style access with explicit orderings.
    pub fn word(&self, pa: u64) -> &AtomicU64 {
        &self.mem[self.index(pa)]
    }

    /// Reads the word at `pa` (Acquire, pairing with [`write_u64`](Self::write_u64)).
    pub fn read_u64(&self, pa: u64) -> u64 {
        self.word(pa).load(Ordering::Acquire)
    }

    /// Writes the word at `pa` (Release).
    pub fn write_u64(&self, pa: u64, value: u64) {
        self.word(pa).store(value, Ordering::Release)
    }

    /// Copies `buf.len()` bytes starting at `pa` into `buf` (any alignment).
    pub fn read_bytes(&self, pa: u64, buf: &mut [u8]) {
        assert!(self.contains(pa, buf.len() as u64), "read of {:#x}+{} outside the simulated RAM", pa, buf.len());
        let mut done = 0usize;
        while done < buf.len() {
            let at = pa + done as u64;
            let word_pa = at & !7;
            let skip = (at - word_pa) as usize;
            let n = (8 - skip).min(buf.len() - done);
            let bytes = self.word(word_pa).load(Ordering::Acquire).to_le_bytes();
            buf[done..done + n].copy_from_slice(&bytes[skip..skip + n]);
            done += n;
        }
    }

    /// Writes `data` starting at `pa` (any alignment). Partial words are
    /// merged with a compare-exchange so concurrent writers of neighbouring
    /// bytes do not lose each other's updates.
    pub fn write_bytes(&self, pa: u64, data: &[u8]) {
        assert!(self.contains(pa, data.len() as u64), "write of {:#x}+{} outside the simulated RAM", pa, data.len());
        let mut done = 0usize;
        while done < data.len() {
            let at = pa + done as u64;
            let word_pa = at & !7;
            let skip = (at - word_pa) as usize;
            let n = (8 - skip).min(data.len() - done);
            let word = self.word(word_pa);
            if n == 8 {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&data[done..done + 8]);
                word.store(u64::from_le_bytes(bytes), Ordering::Release);
            } else {
                let mut cur = word.load(Ordering::Relaxed);
                loop {
                    let mut bytes = cur.to_le_bytes();
                    bytes[skip..skip + n].copy_from_slice(&data[done..done + n]);
                    match word.compare_exchange_weak(
                        cur,
                        u64::from_le_bytes(bytes),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break,
                        Err(now) => cur = now,
                    }
                }
            }
            done += n;
        }
    }

    fn check_span(&self, pa: u64, len: u64) {
        assert!(pa.is_multiple_of(8) && len.is_multiple_of(8), "span {pa:#x}+{len:#x} not word aligned");
        assert!(self.contains(pa, len), "span {pa:#x}+{len:#x} outside the simulated RAM");
    }

    /// Fills `[pa, pa + len)` (word aligned) with `pattern` in every word.
    pub fn fill(&self, pa: u64, len: u64, pattern: u64) {
        if pattern == 0 {
            return self.zero(pa, len);
        }
        self.check_span(pa, len);
        let first = self.index(pa);
        for w in &self.mem[first..first + (len / 8) as usize] {
            w.store(pattern, Ordering::Relaxed);
        }
    }

    /// Fills the 4 KiB frame at `pa` with `pattern`.
    pub fn fill_frame(&self, pa: u64, pattern: u64) {
        assert!(pa.is_multiple_of(PAGE), "frame {pa:#x} not 4 KiB aligned");
        self.fill(pa, PAGE, pattern)
    }

    /// Zeroes `[pa, pa + len)` (word aligned), storing only where a word is
    /// nonzero so untouched host memory stays uncommitted.
    pub fn zero(&self, pa: u64, len: u64) {
        self.check_span(pa, len);
        let first = self.index(pa);
        for w in &self.mem[first..first + (len / 8) as usize] {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Whether every byte of `[pa, pa + len)` (word aligned) is zero.
    pub fn is_zero(&self, pa: u64, len: u64) -> bool {
        self.check_span(pa, len);
        let first = self.index(pa);
        self.mem[first..first + (len / 8) as usize].iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    /// Copies `len` bytes (word aligned) from `src` to `dst`; the spans must
    /// not overlap. Zero source words are written only where the destination
    /// is nonzero, so copying untouched memory commits nothing.
    pub fn copy(&self, dst: u64, src: u64, len: u64) {
        self.check_span(dst, len);
        self.check_span(src, len);
        assert!(dst + len <= src || src + len <= dst, "overlapping copy");
        let (d, s, n) = (self.index(dst), self.index(src), (len / 8) as usize);
        for i in 0..n {
            let v = self.mem[s + i].load(Ordering::Relaxed);
            let to = &self.mem[d + i];
            if v != 0 || to.load(Ordering::Relaxed) != 0 {
                to.store(v, Ordering::Relaxed);
            }
        }
    }

    /// Copies the 4 KiB frame `src` to `dst`.
    pub fn copy_frame(&self, dst: u64, src: u64) {
        assert!(dst.is_multiple_of(PAGE) && src.is_multiple_of(PAGE), "frames not 4 KiB aligned");
        self.copy(dst, src, PAGE)
    }
}

// The contract of `PhysMem`, point by point:
// (1) `ptr` returns a non-null pointer into the arena, computed from `pa - base`, so it is 8-byte aligned exactly
//     when `pa` is (the arena and `base` are 8-byte aligned) and valid for the whole 4 KiB frame holding `pa` (the
//     arena is a whole number of frames and `ptr` panics for any address outside it); the arena is never moved or
//     freed while `self` lives.
// (2) The arena is `[AtomicU64]`, which is `Sync`; writes through the pointer are writes to `UnsafeCell`-backed
//     memory, and this kit itself only uses atomics on it.
// (3) Distinct frames are distinct arena offsets.
// SAFETY: (1)-(3) just above hold for every address `ptr` accepts.
unsafe impl PhysMem for SimPhys {
    #[inline]
    fn ptr(&self, pa: u64) -> *mut u8 {
        assert!(self.contains(pa, 1), "physical address {pa:#x} outside the simulated RAM");
        let offset = (pa - self.base) as usize;
        // `wrapping_add` keeps this safe code; the offset is in bounds (checked
        // above), so the pointer stays inside the allocation.
        (self.mem.as_ptr() as *mut u8).wrapping_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_at_any_alignment() {
        let p = SimPhys::with_base(0x10_0000, 2 * PAGE);
        let data: Vec<u8> = (0..100u8).collect();
        p.write_bytes(0x10_0003, &data);
        let mut back = vec![0u8; 100];
        p.read_bytes(0x10_0003, &mut back);
        assert_eq!(back, data);
        assert_eq!(p.read_u64(0x10_0000) & 0xff_ffff, 0);
    }

    #[test]
    fn zero_copy_fill() {
        let p = SimPhys::new(4 * PAGE);
        let b = p.base();
        p.fill_frame(b, 0xabcd);
        assert!(!p.is_zero(b, PAGE));
        p.copy_frame(b + PAGE, b);
        assert_eq!(p.read_u64(b + PAGE + 8), 0xabcd);
        p.zero(b, PAGE);
        assert!(p.is_zero(b, PAGE));
        p.copy_frame(b + PAGE, b);
        assert!(p.is_zero(b + PAGE, PAGE));
    }

    #[test]
    fn ptr_is_in_arena() {
        let p = SimPhys::new(PAGE);
        let b = p.base();
        p.write_u64(b + 16, 7);
        // SAFETY: the pointer is 8-byte aligned and inside the arena (PhysMem
        // contract of SimPhys); the access is atomic.
        let v = unsafe { AtomicU64::from_ptr(p.ptr(b + 16) as *mut u64) }.load(Ordering::Relaxed);
        assert_eq!(v, 7);
    }

    #[test]
    #[should_panic(expected = "outside the simulated RAM")]
    fn out_of_arena_panics() {
        let p = SimPhys::new(PAGE);
        let _ = p.ptr(p.end());
    }
}
