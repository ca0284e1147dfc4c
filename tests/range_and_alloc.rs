//! `VaRange` validation and set operations, and the lock-free
//! `BitmapFrameAllocator` (sequential, property and multi-threaded tests).

use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{PagingGeometry, MAX_LEVELS};
use hmm_core::{BitmapFrameAllocator, Error, FrameAllocator, VaRange, FRAME_SIZE};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[path = "common/watchdog.rs"]
mod watchdog;

type L4 = X86_64Level4;
type L5 = X86_64Level5;

const PAGE: u64 = 4096;

/// A device-style geometry: 39-bit, not sign-extended (0 .. 2^39 valid).
struct Dev39;
impl PagingGeometry for Dev39 {
    const LEVELS: usize = 3;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9, 9, 9, 0, 0, 0];
    const VA_BITS: u32 = 39;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b111;
}

/// 64 KiB pages, 48-bit, not sign-extended.
struct Big64K;
impl PagingGeometry for Big64K {
    const LEVELS: usize = 3;
    const PAGE_SHIFT: u32 = 16;
    const INDEX_BITS: [u32; MAX_LEVELS] = [13, 13, 6, 0, 0, 0];
    const VA_BITS: u32 = 48;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}

fn r4(start: u64, len: u64) -> VaRange {
    VaRange::new::<L4>(start, len).unwrap_or_else(|e| panic!("{start:#x}+{len:#x}: {e}"))
}

// ------------------------------------------------------------------ VaRange::new

#[test]
fn new_accepts_valid_ranges() {
    let r = r4(0x1000, 0x3000);
    assert_eq!((r.start(), r.last(), r.end()), (0x1000, 0x3fff, Some(0x4000)));
    // The whole lower half, and the top page of it.
    let r = r4(0, 1 << 47);
    assert_eq!((r.start(), r.last()), (0, 0x0000_7fff_ffff_ffff));
    assert_eq!(r4(0x0000_7fff_ffff_f000, PAGE).last(), 0x0000_7fff_ffff_ffff);
    // Upper half, not touching the top.
    let r = r4(0xffff_8000_0000_0000, 0x2000);
    assert_eq!((r.start(), r.last()), (0xffff_8000_0000_0000, 0xffff_8000_0000_1fff));
    // 5-level: the 4-level hole is canonical.
    let r = VaRange::new::<L5>(0x0000_8000_0000_0000, 1 << 40).unwrap();
    assert_eq!(r.last(), 0x0000_80ff_ffff_ffff);
    assert_eq!(VaRange::new::<L5>(0, 1 << 56).unwrap().last(), 0x00ff_ffff_ffff_ffff);
    // Non-sign-extended geometries.
    assert_eq!(VaRange::new::<Dev39>(0, 1 << 39).unwrap().last(), (1 << 39) - 1);
    assert_eq!(VaRange::new::<Big64K>(0x1_0000, 0x2_0000).unwrap().last(), 0x2_ffff);
}

#[test]
fn new_errors_one_at_a_time() {
    assert_eq!(VaRange::new::<L4>(0x1000, 0), Err(Error::Empty));
    assert_eq!(VaRange::new::<L4>(0x1001, PAGE), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0x1000, PAGE + 1), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0x1000, 0x800), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0xffff_ffff_ffff_f000, 2 * PAGE), Err(Error::Wrapping));
    assert_eq!(VaRange::new::<L4>(0xffff_8000_0000_0000, 0x8000_0000_0000_0000), Err(Error::Wrapping));
    assert_eq!(VaRange::new::<L4>(0x0000_8000_0000_0000, PAGE), Err(Error::NonCanonical));
    assert_eq!(VaRange::new::<L4>(0xffff_7fff_ffff_f000, PAGE), Err(Error::NonCanonical));
    assert_eq!(VaRange::new::<L5>(0x0100_0000_0000_0000, PAGE), Err(Error::NonCanonical));
    // Starts canonical, ends past the lower half.
    assert_eq!(VaRange::new::<L4>(0x0000_7fff_ffff_f000, 2 * PAGE), Err(Error::OutOfRange));
    assert_eq!(VaRange::new::<L5>(0x00ff_ffff_ffff_f000, 2 * PAGE), Err(Error::OutOfRange));
    // Both ends canonical but in different halves (spans the hole).
    assert_eq!(VaRange::new::<L4>(0, 0xffff_8000_0000_1000), Err(Error::OutOfRange));
    assert_eq!(VaRange::new::<L5>(0x1000, 0xff00_0000_0000_0000), Err(Error::OutOfRange));
    // Without sign extension a start past VA_BITS is out of range.
    assert_eq!(VaRange::new::<Dev39>(1 << 39, PAGE), Err(Error::OutOfRange));
    assert_eq!(VaRange::new::<Dev39>((1 << 39) - PAGE, 2 * PAGE), Err(Error::OutOfRange));
    assert_eq!(VaRange::new::<Dev39>(0xffff_ffff_ffff_0000, PAGE), Err(Error::OutOfRange));
    // Alignment follows the geometry's page size.
    assert_eq!(VaRange::new::<Big64K>(0x1000, 0x1_0000), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<Big64K>(0x1_0000, 0x1000), Err(Error::Unaligned));
}

#[test]
fn new_errors_in_documented_order() {
    // Empty before Unaligned / Wrapping / NonCanonical.
    assert_eq!(VaRange::new::<L4>(0x1001, 0), Err(Error::Empty));
    assert_eq!(VaRange::new::<L4>(0x8000_0000_0000_0000, 0), Err(Error::Empty));
    // Unaligned before Wrapping and NonCanonical.
    assert_eq!(VaRange::new::<L4>(0xffff_ffff_ffff_f001, 0x2000), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0xffff_ffff_ffff_f000, 0x2001), Err(Error::Unaligned));
    assert_eq!(VaRange::new::<L4>(0x0000_8000_0000_0001, PAGE), Err(Error::Unaligned));
    // Wrapping before NonCanonical (start non-canonical in 4-level).
    assert_eq!(VaRange::new::<L4>(0xffff_0000_0000_0000, 0x0001_0000_0000_1000), Err(Error::Wrapping));
    // NonCanonical before OutOfRange.
    assert_eq!(VaRange::new::<L4>(0x0000_8000_0000_0000, 0x7fff_0000_0000_0000), Err(Error::NonCanonical));
    assert_eq!(VaRange::new::<L4>(0x0000_8000_0000_0000, 1 << 47), Err(Error::NonCanonical));
}

#[test]
fn from_bounds() {
    assert_eq!(VaRange::from_bounds::<L4>(0x1000, 0x3000), Ok(r4(0x1000, 0x2000)));
    assert_eq!(VaRange::from_bounds::<L4>(0x3000, 0x3000), Err(Error::Empty));
    assert_eq!(VaRange::from_bounds::<L4>(0x3000, 0x2000), Err(Error::Wrapping));
    assert_eq!(VaRange::from_bounds::<L4>(0x3000, 0x1fff), Err(Error::Wrapping));
    assert_eq!(VaRange::from_bounds::<L4>(0x1000, 0x2800), Err(Error::Unaligned));
    assert_eq!(VaRange::from_bounds::<L4>(0x0000_8000_0000_0000, 0x0000_8000_0000_1000), Err(Error::NonCanonical));
    assert_eq!(VaRange::from_bounds::<L4>(0x0000_7fff_ffff_f000, 0x0000_8000_0000_1000), Err(Error::OutOfRange));
    assert_eq!(
        VaRange::from_bounds::<L4>(0xffff_8000_0000_0000, 0xffff_8000_0020_0000).map(|r| r.last()),
        Ok(0xffff_8000_001f_ffff)
    );
}

#[test]
fn check_against_another_geometry() {
    let r = VaRange::new::<L5>(0x0000_8000_0000_0000, PAGE).unwrap();
    assert_eq!(r.check::<L5>(), Ok(()));
    assert_eq!(r.check::<L4>(), Err(Error::NonCanonical));
    let r = VaRange::new::<L5>(0x0000_7fff_ffff_f000, 2 * PAGE).unwrap();
    assert_eq!(r.check::<L4>(), Err(Error::OutOfRange));
    let r = VaRange::new::<L5>(0xff00_0000_0000_0000, PAGE).unwrap();
    assert_eq!(r.check::<L4>(), Err(Error::NonCanonical));
    // Non-sign-extended geometry: a non-canonical start is OutOfRange.
    assert_eq!(r.check::<Dev39>(), Err(Error::OutOfRange));
    assert_eq!(r4(0x1000, PAGE).check::<Dev39>(), Ok(()));
    assert_eq!(r4(0x80_0000_0000, PAGE).check::<Dev39>(), Err(Error::OutOfRange));
    // A 4 KiB range under a 64 KiB geometry.
    assert_eq!(r4(0x1000, PAGE).check::<Big64K>(), Err(Error::Unaligned));
    assert_eq!(r4(0x1_0000, PAGE).check::<Big64K>(), Err(Error::Unaligned));
    assert_eq!(r4(0x1_0000, 0x1_0000).check::<Big64K>(), Ok(()));
}

/// The top page of a sign-extended space: `last = u64::MAX`, `end() = None`.
#[test]
fn range_ending_at_the_top() {
    let r = VaRange::new::<L4>(0xffff_ffff_ffe0_0000, 0x20_0000).expect("top 2 MiB");
    assert_eq!((r.last(), r.end(), r.pages(12)), (u64::MAX, None, 512));
    let r = VaRange::new::<L4>(0xffff_8000_0000_0000, 1 << 47).expect("whole upper half");
    assert_eq!(r.last(), u64::MAX);
    assert_eq!(r.pages(12), 1 << 35);
    assert_eq!(VaRange::new::<L5>(u64::MAX - PAGE + 1, PAGE).map(|r| r.last()), Ok(u64::MAX));
    assert_eq!(VaRange::from_bounds::<L4>(0xffff_ffff_ffff_f000, 0), Err(Error::Wrapping));
}

// ------------------------------------------------------------------ queries

#[test]
fn pages() {
    assert_eq!(r4(0x1000, PAGE).pages(12), 1);
    assert_eq!(r4(0x1000, 0x7000).pages(12), 7);
    assert_eq!(r4(0x20_0000, 0x40_0000).pages(21), 2);
    assert_eq!(r4(0, 1 << 47).pages(12), 1 << 35);
    assert_eq!(r4(0, 1 << 47).pages(30), 1 << 17);
}

#[test]
fn overlaps_contains_intersect() {
    let a = r4(0x1000, 0x4000); // [0x1000, 0x4fff]
    let b = r4(0x4000, 0x2000); // [0x4000, 0x5fff]
    let c = r4(0x5000, 0x1000); // [0x5000, 0x5fff]
    let d = r4(0x2000, 0x1000); // [0x2000, 0x2fff]
    assert!(a.overlaps(&b) && b.overlaps(&a));
    assert!(!a.overlaps(&c) && !c.overlaps(&a));
    assert!(b.overlaps(&c));
    assert!(a.overlaps(&a));
    assert!(a.contains(&d) && !d.contains(&a));
    assert!(a.contains(&a));
    assert!(!a.contains(&b) && !b.contains(&a));
    assert!(b.contains(&c));
    assert!(a.contains_addr(0x1000) && a.contains_addr(0x4fff) && !a.contains_addr(0x5000) && !a.contains_addr(0xfff));
    assert_eq!(a.intersect(&b), Some(r4(0x4000, 0x1000)));
    assert_eq!(b.intersect(&a), Some(r4(0x4000, 0x1000)));
    assert_eq!(a.intersect(&c), None);
    assert_eq!(a.intersect(&d), Some(d));
    assert_eq!(a.intersect(&a), Some(a));
    // Across the halves.
    let hi = r4(0xffff_8000_0000_0000, 0x1000);
    let lo = r4(0x0000_7fff_ffff_f000, 0x1000);
    assert!(!hi.overlaps(&lo) && !lo.overlaps(&hi));
    assert_eq!(hi.intersect(&lo), None);
}

fn range_strategy() -> impl Strategy<Value = VaRange> {
    (0u64..64, 1u64..16).prop_map(|(p, n)| r4(p * PAGE, n * PAGE))
}

proptest! {
    #[test]
    fn set_operations_match_brute_force(a in range_strategy(), b in range_strategy(), va in 0u64..80 * PAGE) {
        let pages = |r: &VaRange| (r.start() / PAGE..=r.last() / PAGE).collect::<BTreeSet<u64>>();
        let (pa, pb) = (pages(&a), pages(&b));
        let common: BTreeSet<u64> = pa.intersection(&pb).copied().collect();
        prop_assert_eq!(a.overlaps(&b), !common.is_empty());
        prop_assert_eq!(a.contains(&b), pb.is_subset(&pa));
        prop_assert_eq!(a.contains_addr(va), pa.contains(&(va / PAGE)));
        match a.intersect(&b) {
            None => prop_assert!(common.is_empty()),
            Some(i) => prop_assert_eq!(pages(&i), common),
        }
        prop_assert_eq!(a.pages(12), pa.len() as u64);
    }
}

// ------------------------------------------------------------------ BitmapFrameAllocator

const BASE: u64 = 0x10_0000_0000;

fn bitmap(words: usize) -> Vec<AtomicU64> {
    (0..words).map(|_| AtomicU64::new(0)).collect()
}

#[test]
fn allocator_constructor_errors() {
    let bits = bitmap(2);
    assert_eq!(BitmapFrameAllocator::new(0x1001, 64, &bits).err(), Some(Error::Unaligned));
    assert_eq!(BitmapFrameAllocator::new(0x800, 1, &bits).err(), Some(Error::Unaligned));
    assert_eq!(BitmapFrameAllocator::new(BASE, 129, &bits).err(), Some(Error::BadLength));
    assert_eq!(BitmapFrameAllocator::new(BASE, 1, &[]).err(), Some(Error::BadLength));
    assert_eq!(BitmapFrameAllocator::new(0xffff_ffff_ffff_0000, 17, &bits).err(), Some(Error::Wrapping));
    assert_eq!(BitmapFrameAllocator::new(0xffff_ffff_fffc_0000, 128, &bits).err(), Some(Error::Wrapping));
    // Order: alignment is checked first, then the bitmap, then wrapping.
    assert_eq!(BitmapFrameAllocator::new(0xffff_ffff_ffff_0001, 200, &bits).err(), Some(Error::Unaligned));
    assert_eq!(BitmapFrameAllocator::new(0xffff_ffff_ffff_0000, 200, &bits).err(), Some(Error::BadLength));
    // Exactly enough bits, and more than enough.
    let a = BitmapFrameAllocator::new(BASE, 128, &bits).unwrap();
    assert_eq!((a.capacity(), a.live()), (128, 0));
    assert!(BitmapFrameAllocator::new(BASE, 3, &bits).is_ok());
    assert!(BitmapFrameAllocator::new(0, 0, &[]).is_ok());
}

#[test]
fn empty_allocator_has_nothing() {
    let a = BitmapFrameAllocator::new(BASE, 0, &[]).unwrap();
    assert_eq!(a.alloc_frame(), None);
    let bits = bitmap(1);
    let a = BitmapFrameAllocator::new(BASE, 0, &bits).unwrap();
    assert_eq!(a.alloc_frame(), None);
    assert_eq!(a.live(), 0);
}

#[track_caller]
fn drain(a: &BitmapFrameAllocator<'_>, base: u64, frames: usize) -> BTreeSet<u64> {
    let mut got = BTreeSet::new();
    while let Some(f) = a.alloc_frame() {
        assert_eq!(f % FRAME_SIZE, 0, "unaligned frame {f:#x}");
        assert!(f >= base && f < base + frames as u64 * FRAME_SIZE, "frame {f:#x} outside the region");
        assert!(got.insert(f), "frame {f:#x} handed out twice");
        assert!(got.len() <= frames, "more frames than the region holds");
    }
    got
}

#[test]
fn allocates_every_frame_once_then_none() {
    for frames in [1usize, 63, 64, 65, 100, 128, 200] {
        let bits = bitmap(frames.div_ceil(64) + 1); // a spare word must not be used
        let a = BitmapFrameAllocator::new(BASE, frames, &bits).unwrap();
        let got = drain(&a, BASE, frames);
        assert_eq!(got.len(), frames, "{frames} frames");
        assert_eq!(got, (0..frames as u64).map(|i| BASE + i * FRAME_SIZE).collect(), "{frames} frames");
        assert_eq!(a.live(), frames);
        assert_eq!(a.alloc_frame(), None);
        assert_eq!(a.alloc_frame(), None);
        assert_eq!(a.live(), frames);
    }
}

#[test]
fn freed_frames_are_reused() {
    let bits = bitmap(2);
    let a = BitmapFrameAllocator::new(BASE, 100, &bits).unwrap();
    let all = drain(&a, BASE, 100);
    let freed: Vec<u64> = all.iter().copied().filter(|f| (f - BASE) / FRAME_SIZE % 7 == 3).collect();
    for &f in &freed {
        // SAFETY: `f` came from this allocator and is freed once.
        unsafe { a.free_frame(f) };
    }
    assert_eq!(a.live(), 100 - freed.len());
    let again = drain(&a, BASE, 100);
    assert_eq!(again, freed.iter().copied().collect());
    assert_eq!(a.live(), 100);
    // Free everything; all frames come back.
    for &f in &all {
        // SAFETY: every frame is allocated exactly once at this point.
        unsafe { a.free_frame(f) };
    }
    assert_eq!(a.live(), 0);
    assert_eq!(drain(&a, BASE, 100), all);
    // Through the `&A` forwarding impl.
    let r: &dyn FrameAllocator = &&a;
    assert_eq!(r.alloc_frame(), None);
    // SAFETY: `BASE` is allocated (drained above) and freed once.
    unsafe { r.free_frame(BASE) };
    assert_eq!((r.alloc_frame(), a.live()), (Some(BASE), 100));
}

#[derive(Clone, Debug)]
enum Op {
    Alloc,
    Free(usize),
}

proptest! {
    #[test]
    fn allocator_matches_a_set(
        frames in 0usize..150,
        ops in prop::collection::vec(prop_oneof![3 => Just(Op::Alloc), 2 => any::<usize>().prop_map(Op::Free)], 0..400),
    ) {
        let bits = bitmap(frames.div_ceil(64));
        let a = BitmapFrameAllocator::new(BASE, frames, &bits).unwrap();
        let mut held: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc => match a.alloc_frame() {
                    Some(f) => {
                        prop_assert!(held.len() < frames, "allocated past capacity");
                        prop_assert_eq!(f % FRAME_SIZE, 0);
                        prop_assert!(f >= BASE && f < BASE + frames as u64 * FRAME_SIZE);
                        prop_assert!(!held.contains(&f), "frame {:#x} handed out twice", f);
                        held.push(f);
                    }
                    None => prop_assert_eq!(held.len(), frames, "None while frames were free"),
                },
                Op::Free(i) if !held.is_empty() => {
                    let f = held.swap_remove(i % held.len());
                    // SAFETY: `f` is held, came from `a`, and is freed once.
                    unsafe { a.free_frame(f) };
                }
                Op::Free(_) => {}
            }
            prop_assert_eq!(a.live(), held.len());
        }
    }
}

#[test]
fn concurrent_alloc_free_never_hands_out_a_frame_twice() {
    watchdog::bounded("concurrent frame alloc/free threads", watchdog::BOUND, || {
        const FRAMES: usize = 150;
        const THREADS: usize = 4;
        const ROUNDS: usize = 2000;
        let bits = bitmap(FRAMES.div_ceil(64));
        let a = BitmapFrameAllocator::new(BASE, FRAMES, &bits).unwrap();
        let owned: Vec<AtomicBool> = (0..FRAMES).map(|_| AtomicBool::new(false)).collect();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (a, owned) = (&a, &owned);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for round in 0..ROUNDS {
                        // Grab a varying number of frames (together the threads
                        // want more than there are), then give most back.
                        let want = 1 + (round * 7 + t * 13) % 60;
                        for _ in 0..want {
                            match a.alloc_frame() {
                                Some(f) => {
                                    assert_eq!(f % FRAME_SIZE, 0);
                                    let i = ((f - BASE) / FRAME_SIZE) as usize;
                                    assert!(i < FRAMES, "frame {f:#x} outside the region");
                                    assert!(!owned[i].swap(true, Ordering::AcqRel), "frame {f:#x} handed out twice");
                                    mine.push(f);
                                }
                                None => break,
                            }
                        }
                        let keep = round % 3;
                        while mine.len() > keep {
                            let f = mine.pop().unwrap();
                            let i = ((f - BASE) / FRAME_SIZE) as usize;
                            assert!(owned[i].swap(false, Ordering::AcqRel));
                            // SAFETY: this thread owns `f` (it came from `a`) and
                            // frees it once, after dropping its claim on it.
                            unsafe { a.free_frame(f) };
                        }
                    }
                    for f in mine {
                        owned[((f - BASE) / FRAME_SIZE) as usize].store(false, Ordering::Release);
                        // SAFETY: as above.
                        unsafe { a.free_frame(f) };
                    }
                });
            }
        });
        assert_eq!(a.live(), 0);
        assert!(owned.iter().all(|o| !o.load(Ordering::Relaxed)));
        // Every frame is free again, exactly once.
        assert_eq!(drain(&a, BASE, FRAMES).len(), FRAMES);
    });
}
