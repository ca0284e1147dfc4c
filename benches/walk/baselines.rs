//! In-process baselines over the same arena tables: a per-page top-down
//! translation (the `x86_64` crate's `OffsetPageTable`), a hand-written range
//! walk, an 8-byte store per page, and a memcpy of as many words.

use crate::arena::{Arena, BASE};
use hmm_core::pt::Pfn;
use hmm_core::PhysMem;
use std::hint::black_box;
use x86_64::structures::paging::mapper::{MappedFrame, TranslateResult};
use x86_64::structures::paging::{OffsetPageTable, PageTable, PageTableFlags, Translate};
use x86_64::VirtAddr;

const P: u64 = 1;
const W: u64 = 1 << 1;
const U: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// One `OffsetPageTable::translate` per page of `[va, va + 4K * out.len())`.
///
/// The mapper is built per call: it holds `&mut` to the root table, which
/// must not outlive this call while hmm-core reads the same frame.
pub fn naive_translate(arena: &Arena, root: u64, va: u64, out: &mut [Pfn]) {
    let offset = VirtAddr::new((arena.ptr(BASE) as u64).wrapping_sub(BASE));
    // SAFETY: `root` is the arena's root table, 4 KiB-aligned (the arena is),
    // and no other reference to it exists while this call runs (the bench is
    // single-threaded and hmm-core reaches it through raw pointers only).
    let l4 = unsafe { &mut *arena.ptr(root).cast::<PageTable>() };
    // SAFETY: every table frame is at `offset + pa` (the arena's mapping).
    let mapper = unsafe { OffsetPageTable::new(l4, offset) };
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = translate_one(&mapper, black_box(va + ((i as u64) << 12)));
    }
}

#[inline]
fn translate_one(mapper: &OffsetPageTable<'_>, va: u64) -> Pfn {
    match mapper.translate(VirtAddr::new(va)) {
        TranslateResult::Mapped { frame, offset, flags } => {
            let (base, order) = match frame {
                MappedFrame::Size4KiB(f) => (f.start_address().as_u64(), 0),
                MappedFrame::Size2MiB(f) => (f.start_address().as_u64(), 9),
                MappedFrame::Size1GiB(f) => (f.start_address().as_u64(), 18),
            };
            if flags.contains(PageTableFlags::USER_ACCESSIBLE) {
                Pfn::valid(base + offset, flags.contains(PageTableFlags::WRITABLE), order)
            } else {
                Pfn::ERROR_ENTRY
            }
        }
        _ => Pfn::NONE,
    }
}

/// The `Pfn` word of page `pa` mapped by leaf `pte` of `order`.
#[inline(always)]
fn leaf_word(pte: u64, pa: u64, order: u64) -> u64 {
    // Branch-free so the per-page loop vectorizes.
    let user = ((pte & (P | U) == P | U) as u64).wrapping_neg();
    let present = (pte & P).wrapping_neg();
    let valid = Pfn::VALID | ((pte & W) << 61) | (order << 55) | (pa >> 12);
    (valid & user) | (Pfn::ERROR & present & !user)
}

/// Reads entry `idx` of the table at `pa`.
#[inline(always)]
fn load(arena: &Arena, pa: u64, idx: usize) -> u64 {
    // SAFETY: `pa` is a table frame of the arena (the walk only follows
    // present directory entries the bench wrote) and `idx < 512`; nothing
    // writes the tables while the bench runs.
    unsafe { arena.ptr(pa).cast::<u64>().add(idx).read() }
}

/// The 512 entries of the table at `pa`.
#[inline(always)]
fn table(arena: &Arena, pa: u64) -> &[u64; 512] {
    // SAFETY: as in `load`; the frame is 4 KiB, aligned, and unchanged while
    // the returned borrow of the arena lives.
    unsafe { &*arena.ptr(pa).cast::<[u64; 512]>() }
}

#[inline(always)]
fn idx(va: u64, shift: u32) -> usize {
    ((va >> shift) & 511) as usize
}

/// Fills `out` with the words of a large leaf's pages from `va`.
#[inline(always)]
fn fill_leaf(out: &mut [u64], pte: u64, shift: u32, va: u64) {
    let base = pte & ADDR & !((1u64 << shift) - 1);
    let mut pa = base + (va & ((1u64 << shift) - 1));
    for w in out {
        *w = leaf_word(pte, pa, (shift - 12) as u64);
        pa += 4096;
    }
}

/// What a careful human writes: four nested loops over the levels, plain
/// loads, one word per page (same format as `Pfn`), large leaves filled in
/// place. Directory permissions are not applied (the bench's are all RW).
pub fn hand_walk(arena: &Arena, root: u64, start: u64, out: &mut [u64]) {
    let last = start + ((out.len() as u64) << 12) - 1;
    let mut o = 0;
    let mut va = start;
    let end_of = |va: u64, shift: u32| (va | ((1u64 << shift) - 1)).min(last);
    let pages = |a: u64, b: u64| ((b - a) >> 12) as usize + 1;
    while va <= last {
        let (e4, end4) = (load(arena, root, idx(va, 39)), end_of(va, 39));
        if e4 & P == 0 {
            let n = pages(va, end4);
            out[o..o + n].fill(0);
            (o, va) = (o + n, end4 + 1);
            continue;
        }
        while va <= end4 {
            let (e3, end3) = (load(arena, e4 & ADDR, idx(va, 30)), end_of(va, 30));
            let n3 = pages(va, end3);
            if e3 & P == 0 || e3 & PS != 0 {
                fill_leaf(&mut out[o..o + n3], e3, 30, va);
                (o, va) = (o + n3, end3 + 1);
                continue;
            }
            while va <= end3 {
                let (e2, end2) = (load(arena, e3 & ADDR, idx(va, 21)), end_of(va, 21));
                let n2 = pages(va, end2);
                if e2 & P == 0 || e2 & PS != 0 {
                    fill_leaf(&mut out[o..o + n2], e2, 21, va);
                } else {
                    let pt = &table(arena, e2 & ADDR)[idx(va, 12)..idx(va, 12) + n2];
                    for (w, &pte) in out[o..o + n2].iter_mut().zip(pt) {
                        *w = leaf_word(pte, pte & ADDR, 0);
                    }
                }
                (o, va) = (o + n2, end2 + 1);
            }
        }
    }
}

/// One 8-byte store per page (volatile, so neither merged nor vectorized),
/// of a word that depends on the page index.
pub fn store_floor(out: &mut [u64]) {
    let base = black_box(Pfn::VALID | Pfn::WRITE);
    for (i, w) in out.iter_mut().enumerate() {
        // SAFETY: `w` is a valid, aligned, exclusive reference.
        unsafe { core::ptr::write_volatile(w, base | i as u64) };
    }
}

/// A memcpy of `src` into `out` (same length).
pub fn memcpy(out: &mut [u64], src: &[u64]) {
    out.copy_from_slice(black_box(src));
}
