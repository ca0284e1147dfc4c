//! G8: the generic walker serves every CPU format as fast as x86_64.
//!
//! The same mapping is built in each format's tables, each in its own heap
//! arena (`walk/arena.rs`, only `F::directory` and `F::encode` of
//! `PteView::Leaf`): 64 MiB of present user RW 4 KiB pages at [`VA_4K`]
//! (16,384 pages, consecutive fake frames) and 64 MiB of 2 MiB leaves at
//! [`VA_2M`] (32 leaves), addresses every format's user half holds (Sv39's
//! is 256 GiB). `pt::snapshot::<F, _>` over each range is timed in
//! interleaved rounds (`walk/timing.rs`) with the x86_64 4-level run as the
//! baseline of every round; each format's goal is the median of its
//! per-round ratio to that baseline. Before timing, every format's snapshot
//! must produce the x86_64 words exactly (same frames, WRITE, order).
//!
//! `HMM_BENCH_QUICK=1`: fewer rounds, shorter samples. Run
//! `cargo bench --bench formats`.

#[path = "walk/arena.rs"]
mod arena;
#[path = "walk/timing.rs"]
mod timing;

use arena::Arena;
use hmm_core::arch::aarch64::{Aarch64Va48, Aarch64Va52};
use hmm_core::arch::riscv64::{Sv39, Sv48, Sv57};
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{LeafFlags, PteFormat};
use hmm_core::pt::{snapshot, Pfn};
use hmm_core::VaRange;
use std::hint::black_box;
use std::time::{Duration, Instant};
use timing::{Body, Group, Preemption};

/// 4 KiB leaves from here (8 GiB).
const VA_4K: u64 = 8 << 30;
/// 2 MiB leaves from here (16 GiB).
const VA_2M: u64 = 16 << 30;
/// Pages in each range (64 MiB).
const PAGES: u64 = (64 << 20) >> 12;
const FAKE_4K: u64 = 0x10_0000_0000;
const FAKE_2M: u64 = 0x20_0000_0000;
const RW_USER: LeafFlags = LeafFlags::READ.union(LeafFlags::WRITE).union(LeafFlags::USER);

/// One format's tables.
struct Tables {
    /// Type name, for the report.
    format: &'static str,
    /// Goal-name part.
    slug: &'static str,
    arena: Arena,
    root: u64,
    /// `snapshot::<F, _>` over one of the ranges into `out`.
    snap: fn(&Arena, u64, VaRange, &mut [Pfn]),
}

fn snap<F: PteFormat>(arena: &Arena, root: u64, range: VaRange, out: &mut [Pfn]) {
    // SAFETY: `root` is a root table of format `F` built in `arena`, which
    // outlives the walk and is not written after construction.
    unsafe { snapshot::<F, _>(arena, root, range, out) }.unwrap();
}

/// Both mappings in `F`'s tables.
fn build<F: PteFormat>(format: &'static str, slug: &'static str) -> Tables {
    // Root, at most four directories per range, 32 page tables, slack.
    let mut arena = Arena::new(PAGES / 512 + 16);
    let root = arena.alloc();
    arena.map::<F>(root, VA_4K, PAGES, 0, FAKE_4K, RW_USER);
    arena.map::<F>(root, VA_2M, PAGES / 512, 1, FAKE_2M, RW_USER);
    Tables { format, slug, arena, root, snap: snap::<F> }
}

/// The x86_64 4-level baseline first, then the six formats with goals.
fn all_tables() -> Vec<Tables> {
    vec![
        build::<X86_64Level4>("X86_64Level4", "x86_64"),
        build::<X86_64Level5>("X86_64Level5", "x86_64_level5"),
        build::<Aarch64Va48>("Aarch64Va48", "aarch64_va48"),
        build::<Aarch64Va52>("Aarch64Va52", "aarch64_va52"),
        build::<Sv39>("Sv39", "sv39"),
        build::<Sv48>("Sv48", "sv48"),
        build::<Sv57>("Sv57", "sv57"),
    ]
}

fn range(va: u64) -> VaRange {
    VaRange::from_bounds::<X86_64Level4>(va, va + (PAGES << 12)).unwrap()
}

/// Checks, untimed, that every format's snapshot of both ranges is the
/// x86_64 one word for word, and that word is what the mapping says.
fn verify(tables: &[Tables]) {
    for (va, fake, order) in [(VA_4K, FAKE_4K, 0), (VA_2M, FAKE_2M, 9)] {
        let expected: Vec<Pfn> = (0..PAGES).map(|i| Pfn::valid(fake + (i << 12), true, order)).collect();
        for t in tables {
            let mut out = vec![Pfn::NONE; PAGES as usize];
            (t.snap)(&t.arena, t.root, range(va), &mut out);
            assert!(out == expected, "{} snapshot at {va:#x} differs from the mapping (and from x86_64)", t.format);
        }
    }
}

/// Series names, `<slug>_4k` / `<slug>_2m` (leaked: a handful, once).
fn series(t: &Tables, size: &str) -> &'static str {
    Box::leak(format!("{}_{size}", t.slug).into_boxed_str())
}

fn m_snapshot(t: &Tables, va: u64) -> Body<'_> {
    let r = range(va);
    let mut out = vec![Pfn::NONE; PAGES as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            (t.snap)(&t.arena, t.root, black_box(r), &mut out);
        }
    })
}

fn fmt(v: f64) -> String {
    match v {
        v if v >= 100.0 => format!("{v:.1}"),
        v if v >= 0.01 => format!("{v:.3}"),
        v => format!("{v:.6}"),
    }
}

/// Times every format at one page size; prints its goals.
fn measure(tables: &[Tables], size: &str, va: u64, rounds: usize, target: Duration) -> Preemption {
    let mut g = Group::default();
    for t in tables {
        g.add(series(t, size), PAGES, m_snapshot(t, va));
    }
    g.run(rounds, target);
    let base = series(&tables[0], size);
    let leaves = if size == "4k" { "4 KiB pages" } else { "2 MiB leaves" };
    let ns = |s: &str| fmt(g.ns_per_page(s).unwrap_or(f64::NAN));
    for t in &tables[1..] {
        let s = series(t, size);
        let name = format!("g8_snapshot_{size}_{}_vs_x86_64", t.slug);
        println!("RATIO {name} {} (goal <= 1.25)", fmt(g.ratio(s, base).unwrap_or(f64::NAN)));
        println!(
            "DETAIL {name} | {} snapshot over 64 MiB of {leaves} {} ns/page | {} snapshot {} ns/page",
            t.format,
            ns(s),
            tables[0].format,
            ns(base)
        );
    }
    let all: Vec<String> = g.methods().iter().map(|m| format!("{} {}", m.series, fmt(m.median()))).collect();
    println!("FIGURE snapshot ns/page over 64 MiB of {leaves}, per format: {}", all.join(", "));
    g.preemption
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench`:
        // measuring belongs to `cargo bench` (and `cargo xtask bench`).
        println!("not run as a benchmark (use cargo bench or cargo xtask bench)");
        return;
    }
    let start = Instant::now();
    let quick = std::env::var("HMM_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let (rounds, target) = match quick {
        true => (21, Duration::from_millis(1)),
        false => (61, Duration::from_millis(2)),
    };
    let tables = all_tables();
    verify(&tables);
    let mut noise = Preemption::default();
    for (size, va) in [("4k", VA_4K), ("2m", VA_2M)] {
        let p = measure(&tables, size, va, rounds, target);
        noise.samples += p.samples;
        noise.retaken += p.retaken;
        noise.kept_preempted += p.kept_preempted;
    }
    println!(
        "FIGURE formats bench samples: {}, retaken because another process took the CPU: {}, kept preempted after \
         {} tries: {}",
        noise.samples,
        noise.retaken,
        timing::TRIES,
        noise.kept_preempted
    );
    eprintln!("formats bench: {:.1} s{}", start.elapsed().as_secs_f64(), if quick { " (quick)" } else { "" });
}
