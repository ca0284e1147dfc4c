//! Walker cost per 4 KiB page, against two baselines measured in the same run:
//! a naive per-page top-down translation and a plain 8-byte store stream.
//!
//! Run `cargo bench --bench walk`; compare the `snapshot` line with `naive` and
//! `store_stream` (ratios, not absolute times, are what carry over).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::pt::{snapshot, Pfn};
use hmm_core::{PhysMem, VaRange};
use std::hint::black_box;

const BASE: u64 = 1 << 30;

/// Frames in a heap arena, physical address = BASE + offset.
struct Arena {
    mem: Vec<u64>,
    next: usize,
}

// SAFETY: the arena is never reallocated after creation and every table the
// bench uses lies inside it; the bench is single-threaded.
unsafe impl PhysMem for Arena {
    fn ptr(&self, pa: u64) -> *mut u8 {
        (self.mem.as_ptr() as *mut u8).wrapping_add((pa - BASE) as usize)
    }
}

impl Arena {
    fn new(frames: usize) -> Self {
        Self { mem: vec![0; frames * 512], next: 0 }
    }
    fn alloc(&mut self) -> u64 {
        self.next += 1;
        BASE + (self.next as u64 - 1) * 4096
    }
    fn slot(&mut self, table: u64, idx: usize) -> &mut u64 {
        &mut self.mem[((table - BASE) / 8) as usize + idx]
    }
    /// Maps 4 KiB pages `va..va + pages*4K` to fresh frames.
    fn map(&mut self, root: u64, va: u64, pages: u64) {
        let rw = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER;
        for p in 0..pages {
            let v = va + p * 4096;
            let mut table = root;
            for level in (1..4).rev() {
                let idx = X86_64Level4::index(v, level);
                let raw = *self.slot(table, idx);
                table = if raw == 0 {
                    let t = self.alloc();
                    *self.slot(table, idx) =
                        X86_64Level4::encode(&PteView::Table { frame: t, flags: rw }, level).unwrap();
                    t
                } else {
                    raw & 0x000f_ffff_ffff_f000
                };
            }
            let frame = self.alloc();
            let leaf = X86_64Level4::encode(&PteView::Leaf { frame, flags: rw }, 0).unwrap();
            *self.slot(table, X86_64Level4::index(v, 0)) = leaf;
        }
    }
    /// Per-page top-down translation: the baseline a walker must beat.
    fn naive(&self, root: u64, va: u64) -> Pfn {
        let mut table = root;
        for level in (0..4).rev() {
            let raw = self.mem[((table - BASE) / 8) as usize + X86_64Level4::index(va, level)];
            match X86_64Level4::decode(raw, level) {
                PteView::Table { frame, .. } => table = frame,
                PteView::Leaf { frame, flags } => return Pfn::valid(frame, flags.contains(LeafFlags::WRITE), 0),
                _ => return Pfn::NONE,
            }
        }
        Pfn::NONE
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_page");
    for pages in [512u64, 8192] {
        let mut arena = Arena::new(pages as usize + 64);
        let root = arena.alloc();
        let va = 0x7f00_0000_0000;
        arena.map(root, va, pages);
        let range = VaRange::new::<X86_64Level4>(va, pages * 4096).unwrap();
        let mut out = vec![Pfn::NONE; pages as usize];
        group.throughput(Throughput::Elements(pages));
        group.bench_with_input(BenchmarkId::new("snapshot", pages), &pages, |b, _| {
            // SAFETY: `root` is a live table of the arena, which outlives the walk.
            b.iter(|| unsafe { snapshot::<X86_64Level4, _>(&arena, root, range, black_box(&mut out)) }.unwrap())
        });
        group.bench_with_input(BenchmarkId::new("naive", pages), &pages, |b, _| {
            b.iter(|| {
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = arena.naive(root, black_box(va + i as u64 * 4096));
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("store_stream", pages), &pages, |b, _| {
            b.iter(|| {
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = Pfn(black_box(i as u64));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
