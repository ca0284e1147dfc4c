//! Walker cost per page against in-process and Linux baselines, all measured
//! in this run, interleaved (see `walk/timing.rs`).
//!
//! hmm-core side, over fake x86_64 4-level tables in a heap arena
//! (`walk/tables.rs`; leaves point to fake frames):
//! - `range_fault`: read lock + `read_begin` + `range_fault` in snapshot mode
//!   (no REQ_FAULT, mask 0) over 4 KiB leaves; `range_fault_2m`/`_1g` over
//!   2 MiB / 1 GiB leaves (still one `Pfn` per 4 KiB page);
//! - `snapshot`: the raw `pt::snapshot` (no lock, registry or regions);
//! - `walk_count`: `pt::walk` with a visitor that only counts visits
//!   (`_2m`, `_1g`: over large leaves).
//!
//! Baselines (`walk/baselines.rs`, `walk/linux.rs`), same page count:
//! - `naive_translate`: the `x86_64` crate's `OffsetPageTable::translate`
//!   per page over the same tables;
//! - `hand_walk`: four nested loops over the same tables, plain loads, one
//!   word per page, branch-free leaf conversion (it vectorizes);
//!   `hand_walk_2m` over 2 MiB leaves;
//! - `store_floor`: one (volatile) 8-byte store per page;
//! - `memcpy`: a copy of as many 8-byte words;
//! - `pagemap_pread`: `pread` of `/proc/self/pagemap` (512 KiB chunks) over
//!   as many real populated 4 KiB pages of this process; `pagemap_scan`: the
//!   `PAGEMAP_SCAN` ioctl over them (run-length output, no PFNs);
//!   `_thp`: the same over a populated `MADV_HUGEPAGE` mapping.
//!
//! Prints the report protocol: `RATIO`/`DETAIL` per goal, `PLOT pages
//! <series> <pages> <ns/page>` per method and size, `FIGURE` for the small
//! sizes and the checks (pagemap bits, THP granted). `HMM_BENCH_QUICK=1`:
//! fewer rounds, shorter samples. Run `cargo bench --bench walk`.

#[path = "walk/arena.rs"]
mod arena;
#[path = "walk/baselines.rs"]
mod baselines;
#[path = "walk/linux.rs"]
mod linux;
#[path = "walk/tables.rs"]
mod tables;
#[path = "walk/timing.rs"]
mod timing;

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::PteView;
use hmm_core::pt::{snapshot, walk, Pfn, Span};
use hmm_core::{range_fault, AddressSpace, Interval, RangeFault, VaRange};
use linux::{PageRegion, Pagemap, Populated, PAGE_IS_HUGE};
use std::hint::black_box;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};
use tables::{BenchSpace, Note, PAGES_4K, VA_1G, VA_2M, VA_4K};
use timing::{Body, Group, Preemption};

const MIB: u64 = 1 << 20;
const PAGES_64M: u64 = (64 * MIB) >> 12;
const PAGES_1G: u64 = PAGES_4K;
const PAGES_4G: u64 = 4 * PAGES_1G;
const SIZES: [u64; 4] = [1, 512, PAGES_64M, PAGES_1G];

/// Rounds and sample length.
struct Plan {
    rounds: usize,
    rounds_1g: usize,
    target: Duration,
}

/// What every method closure needs.
struct Ctx<'a> {
    space: &'a BenchSpace,
    note: &'a Note,
    pagemap: &'a Pagemap,
    real: &'a Populated,
    thp: &'a Populated,
    scan_ok: bool,
}

fn range(va: u64, pages: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(va, pages << 12).unwrap()
}

/// One snapshot-mode fault as a driver issues it: read lock, `read_begin`,
/// `range_fault`.
fn snapshot_fault(space: &BenchSpace, note: &Note, range: VaRange, out: &mut [Pfn]) {
    let guard = space.read_lock();
    let seq = space.notifiers().read_begin(&note.interval);
    let mut req = RangeFault { range, default_flags: 0, pfn_flags_mask: 0, pfns: out, dev_private_owner: None };
    let stats = range_fault(space, &guard, &note.interval, seq, &mut req).unwrap();
    debug_assert_eq!(stats.handler_calls, 0);
}

fn m_range_fault<'a>(cx: &Ctx<'a>, va: u64, pages: u64) -> Body<'a> {
    let (space, note, r) = (cx.space, cx.note, range(va, pages));
    let mut out = vec![Pfn::NONE; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            snapshot_fault(space, note, black_box(r), &mut out);
        }
    })
}

fn m_snapshot<'a>(cx: &Ctx<'a>, va: u64, pages: u64) -> Body<'a> {
    let (space, r) = (cx.space, range(va, pages));
    let mut out = vec![Pfn::NONE; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            // SAFETY: the space's root is live and its arena outlives the walk.
            unsafe { snapshot::<X86_64Level4, _>(space.phys(), space.root(), black_box(r), &mut out) }.unwrap();
        }
    })
}

fn m_walk_count<'a>(cx: &Ctx<'a>, va: u64, pages: u64) -> Body<'a> {
    let (space, r) = (cx.space, range(va, pages));
    Box::new(move |iters| {
        for _ in 0..iters {
            let mut visits = 0u64;
            let mut count = |_: Span, _: PteView| {
                visits += 1;
                ControlFlow::<()>::Continue(())
            };
            // SAFETY: the space's root is live and its arena outlives the walk.
            let _ = unsafe { walk::<X86_64Level4, _, _>(space.phys(), space.root(), black_box(r), &mut count) };
            black_box(visits);
        }
    })
}

fn m_naive<'a>(cx: &Ctx<'a>, pages: u64) -> Body<'a> {
    let space = cx.space;
    let mut out = vec![Pfn::NONE; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            baselines::naive_translate(space.arena(), space.root(), black_box(VA_4K), &mut out);
        }
    })
}

fn m_hand_walk<'a>(cx: &Ctx<'a>, va: u64, pages: u64) -> Body<'a> {
    let space = cx.space;
    let mut out = vec![0u64; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            baselines::hand_walk(space.arena(), space.root(), black_box(va), &mut out);
        }
    })
}

fn m_store(pages: u64) -> Body<'static> {
    let mut out = vec![0u64; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            baselines::store_floor(black_box(&mut out));
        }
    })
}

fn m_memcpy(pages: u64) -> Body<'static> {
    let src: Vec<u64> = (0..pages).collect();
    let mut out = vec![0u64; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            baselines::memcpy(black_box(&mut out), &src);
        }
    })
}

fn m_pread<'a>(cx: &Ctx<'a>, mapping: &'a Populated, pages: u64) -> Body<'a> {
    let pagemap = cx.pagemap;
    let mut out = vec![0u64; pages as usize];
    Box::new(move |iters| {
        for _ in 0..iters {
            pagemap.read(black_box(mapping.start), &mut out);
        }
    })
}

fn m_scan<'a>(cx: &Ctx<'a>, mapping: &'a Populated, pages: u64) -> Body<'a> {
    let pagemap = cx.pagemap;
    let mut vec = vec![PageRegion::default(); 64];
    Box::new(move |iters| {
        for _ in 0..iters {
            pagemap.scan(black_box(mapping.start), (pages << 12) as usize, &mut vec).unwrap();
        }
    })
}

/// Every method measured at `pages`.
fn group<'a>(cx: &Ctx<'a>, pages: u64) -> Group<'a> {
    let mut g = Group::default();
    g.add("range_fault", pages, m_range_fault(cx, VA_4K, pages));
    g.add("snapshot", pages, m_snapshot(cx, VA_4K, pages));
    g.add("walk_count", pages, m_walk_count(cx, VA_4K, pages));
    g.add("naive_translate", pages, m_naive(cx, pages));
    g.add("hand_walk", pages, m_hand_walk(cx, VA_4K, pages));
    g.add("store_floor", pages, m_store(pages));
    g.add("memcpy", pages, m_memcpy(pages));
    g.add("pagemap_pread", pages, m_pread(cx, cx.real, pages));
    if cx.scan_ok {
        g.add("pagemap_scan", pages, m_scan(cx, cx.real, pages));
    }
    if pages >= 512 {
        g.add("range_fault_2m", pages, m_range_fault(cx, VA_2M, pages));
        g.add("walk_count_2m", pages, m_walk_count(cx, VA_2M, pages));
        g.add("hand_walk_2m", pages, m_hand_walk(cx, VA_2M, pages));
    }
    if pages == PAGES_64M {
        // 4 GiB of 1 GiB leaves, compared per byte with 64 MiB of 4 KiB pages.
        g.add("walk_count_1g", PAGES_4G, m_walk_count(cx, VA_1G, PAGES_4G));
        g.add("pagemap_pread_thp", pages, m_pread(cx, cx.thp, pages));
        if cx.scan_ok {
            g.add("pagemap_scan_thp", pages, m_scan(cx, cx.thp, pages));
        }
    }
    if pages == PAGES_1G {
        g.add("range_fault_1g", pages, m_range_fault(cx, VA_1G, pages));
        g.add("walk_count_1g", pages, m_walk_count(cx, VA_1G, pages));
    }
    g
}

/// Checks, untimed, that every in-process method reports the same words for
/// each kind of leaf.
fn verify(cx: &Ctx<'_>) {
    let pages = PAGES_1G as usize;
    for va in [VA_4K, VA_2M, VA_1G] {
        let r = range(va, PAGES_1G);
        let mut fault = vec![Pfn::NONE; pages];
        snapshot_fault(cx.space, cx.note, r, &mut fault);
        let mut snap = vec![Pfn::NONE; pages];
        // SAFETY: the space's root is live and its arena outlives the walk.
        unsafe { snapshot::<X86_64Level4, _>(cx.space.phys(), cx.space.root(), r, &mut snap) }.unwrap();
        let mut hand = vec![0u64; pages];
        baselines::hand_walk(cx.space.arena(), cx.space.root(), va, &mut hand);
        assert!(fault.iter().all(|p| p.is_valid() && p.is_write()), "range_fault output not valid at {va:#x}");
        assert!(fault == snap, "snapshot differs from range_fault at {va:#x}");
        assert!(fault.iter().zip(&hand).all(|(p, &h)| p.0 == h), "hand walk differs at {va:#x}");
    }
    let mut naive = vec![Pfn::NONE; pages];
    baselines::naive_translate(cx.space.arena(), cx.space.root(), VA_4K, &mut naive);
    let mut fault = vec![Pfn::NONE; pages];
    snapshot_fault(cx.space, cx.note, range(VA_4K, PAGES_1G), &mut fault);
    assert!(naive == fault, "OffsetPageTable translate differs from range_fault");
}

/// Checks, untimed, what pagemap and PAGEMAP_SCAN report for the real
/// mappings, and whether THP was granted. Returns whether the ioctl works.
fn check_linux(pagemap: &Pagemap, real: &Populated, thp: &Populated) -> bool {
    for (name, m) in [("4k", real), ("thp", thp)] {
        let mut e = vec![0u64; m.len >> 12];
        pagemap.read(m.start, &mut e);
        let c = linux::check(&e);
        println!(
            "FIGURE pagemap check ({name}, {} pages): {} present, {} with a non-zero PFN, {} of {} 2 MiB blocks \
             with consecutive 2 MiB-aligned PFNs",
            e.len(),
            c.present,
            c.nonzero_pfn,
            c.contiguous_2m,
            e.len() / 512
        );
    }
    let kib = thp.anon_huge_kib().map_or("unknown".into(), |k| k.to_string());
    println!("FIGURE THP: AnonHugePages {kib} kB of {} kB in the MADV_HUGEPAGE mapping", thp.len >> 10);
    let mut vec = vec![PageRegion::default(); 64];
    for (name, m) in [("4k", real), ("thp", thp)] {
        match pagemap.scan(m.start, m.len, &mut vec) {
            Ok(n) => {
                let pages = |huge: bool| -> u64 {
                    vec[..n]
                        .iter()
                        .filter(|r| (r.categories & PAGE_IS_HUGE != 0) == huge)
                        .map(|r| (r.end - r.start) >> 12)
                        .sum()
                };
                println!(
                    "FIGURE PAGEMAP_SCAN ({name}): {n} region(s), {} huge + {} small present pages of {}",
                    pages(true),
                    pages(false),
                    m.len >> 12
                );
            }
            Err(e) => {
                println!("FIGURE PAGEMAP_SCAN unavailable ({e}): pagemap_scan series skipped");
                return false;
            }
        }
    }
    true
}

fn fmt(v: f64) -> String {
    match v {
        v if v >= 100.0 => format!("{v:.1}"),
        v if v >= 0.01 => format!("{v:.3}"),
        v => format!("{v:.6}"),
    }
}

/// One goal: the RATIO line and its DETAIL.
struct Goal {
    name: &'static str,
    op: &'static str,
    target: &'static str,
    value: f64,
    ours: String,
    base: String,
}

fn print_goal(g: &Goal) {
    println!("RATIO {} {} (goal {} {})", g.name, fmt(g.value), g.op, g.target);
    println!("DETAIL {} | {} | {}", g.name, g.ours, g.base);
}

fn ns(g: &Group<'_>, series: &str) -> f64 {
    g.ns_per_page(series).unwrap_or(f64::NAN)
}

fn ratio(g: &Group<'_>, a: &str, b: &str) -> f64 {
    g.ratio(a, b).unwrap_or(f64::NAN)
}

/// The three G1 goals at one size.
fn g1_goals(g: &Group<'_>, suffix: &'static str) -> Vec<Goal> {
    let rf = format!("range_fault (snapshot) {} ns/page", fmt(ns(g, "range_fault")));
    let goal = |name, target, base: &str, text: &str| Goal {
        name,
        op: "<=",
        target,
        value: ratio(g, "range_fault", base),
        ours: rf.clone(),
        base: format!("{text} {} ns/page", fmt(ns(g, base))),
    };
    let names: [&'static str; 3] = match suffix {
        "64mib" => ["g1_snapshot_vs_naive_64mib", "g1_snapshot_vs_store_64mib", "g1_snapshot_vs_pagemap_64mib"],
        _ => ["g1_snapshot_vs_naive_1gib", "g1_snapshot_vs_store_1gib", "g1_snapshot_vs_pagemap_1gib"],
    };
    vec![
        goal(names[0], "0.5", "naive_translate", "naive OffsetPageTable translate"),
        goal(names[1], "2.5", "store_floor", "8-byte store per page"),
        goal(names[2], "0.15", "pagemap_pread", "Linux pread /proc/self/pagemap"),
    ]
}

/// The G2 goals: large leaves against 4 KiB pages and the store floor.
fn g2_goals(g64: &Group<'_>, g1g: &Group<'_>) -> Vec<Goal> {
    let per_mib = |g: &Group<'_>, s: &str| fmt(ns(g, s) * 256.0);
    let walk4k = format!("walk over 4 KiB pages {} ns/MiB (64 MiB)", per_mib(g64, "walk_count"));
    let store = |g: &Group<'_>| format!("8-byte store per page {} ns/page", fmt(ns(g, "store_floor")));
    vec![
        Goal {
            name: "g2_walk_2m_vs_4k_per_byte",
            op: ">=",
            target: "100",
            value: ratio(g64, "walk_count", "walk_count_2m"),
            ours: format!("walk over 2 MiB leaves {} ns/MiB (64 MiB)", per_mib(g64, "walk_count_2m")),
            base: walk4k.clone(),
        },
        Goal {
            name: "g2_walk_1g_vs_4k_per_byte",
            op: ">=",
            target: "100",
            value: ratio(g64, "walk_count", "walk_count_1g"),
            ours: format!("walk over 1 GiB leaves {} ns/MiB (4 GiB)", per_mib(g64, "walk_count_1g")),
            base: walk4k,
        },
        Goal {
            name: "g2_range_fault_2m_vs_store",
            op: "<=",
            target: "1.5",
            value: ratio(g64, "range_fault_2m", "store_floor"),
            ours: format!("range_fault over 2 MiB leaves {} ns/page (64 MiB)", fmt(ns(g64, "range_fault_2m"))),
            base: store(g64),
        },
        Goal {
            name: "g2_range_fault_1g_vs_store",
            op: "<=",
            target: "1.5",
            value: ratio(g1g, "range_fault_1g", "store_floor"),
            ours: format!("range_fault over a 1 GiB leaf {} ns/page", fmt(ns(g1g, "range_fault_1g"))),
            base: store(g1g),
        },
    ]
}

/// PLOT points of a group, and FIGURE ratios for the sizes without goals.
fn report_group(g: &Group<'_>, pages: u64) {
    for m in g.methods() {
        println!("PLOT pages {} {} {}", m.series, m.pages, fmt(m.median()));
    }
    let per_call = ns(g, "range_fault") * pages as f64;
    let mut parts = vec![format!("range_fault {} ns/call", fmt(per_call))];
    for base in ["naive_translate", "hand_walk", "store_floor", "memcpy", "pagemap_pread", "pagemap_scan"] {
        if let Some(r) = g.ratio("range_fault", base) {
            parts.push(format!("{} x {base}", fmt(r)));
        }
    }
    println!("FIGURE {pages} page(s), 4 KiB leaves: {}", parts.join(", "));
    if pages >= 512 {
        println!(
            "FIGURE {pages} pages, 2 MiB leaves: range_fault_2m {} x hand_walk_2m, {} x store_floor",
            fmt(ratio(g, "range_fault_2m", "hand_walk_2m")),
            fmt(ratio(g, "range_fault_2m", "store_floor"))
        );
    }
    if pages == PAGES_64M {
        println!(
            "FIGURE 64 MiB of THP: range_fault_2m (fake tables) {} x pagemap_pread_thp (real THP)",
            fmt(ratio(g, "range_fault_2m", "pagemap_pread_thp"))
        );
    }
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
    let plan = match quick {
        true => Plan { rounds: 11, rounds_1g: 5, target: Duration::from_millis(1) },
        false => Plan { rounds: 41, rounds_1g: 21, target: Duration::from_millis(2) },
    };
    let space = BenchSpace::new();
    let note = Note { interval: Interval::new(BenchSpace::whole()) };
    // SAFETY: `note` is declared before the registration, so it outlives it
    // and never moves while registered.
    let _registration = unsafe { space.notifiers().insert(&note) }.unwrap();
    let pagemap = Pagemap::open().expect("open /proc/self/pagemap");
    let real = Populated::new((PAGES_1G << 12) as usize, false).expect("populate 1 GiB");
    let thp = Populated::new((PAGES_64M << 12) as usize, true).expect("populate 64 MiB THP");
    let scan_ok = check_linux(&pagemap, &real, &thp);
    let cx = Ctx { space: &space, note: &note, pagemap: &pagemap, real: &real, thp: &thp, scan_ok };
    verify(&cx);
    let mut goals = Vec::new();
    let mut g64 = None;
    let mut noise = Preemption::default();
    for pages in SIZES {
        let mut g = group(&cx, pages);
        g.run(if pages == PAGES_1G { plan.rounds_1g } else { plan.rounds }, plan.target);
        report_group(&g, pages);
        noise.samples += g.preemption.samples;
        noise.retaken += g.preemption.retaken;
        noise.kept_preempted += g.preemption.kept_preempted;
        match pages {
            PAGES_64M => {
                goals.extend(g1_goals(&g, "64mib"));
                g64 = Some(g);
            }
            PAGES_1G => {
                goals.extend(g1_goals(&g, "1gib"));
                goals.extend(g2_goals(g64.as_ref().unwrap(), &g));
            }
            _ => {}
        }
    }
    goals.iter().for_each(print_goal);
    if !quick {
        criterion_view(&cx);
    }
    println!(
        "FIGURE walk bench samples: {}, retaken because another process took the CPU: {}, kept preempted after {} \
         tries: {}",
        noise.samples,
        noise.retaken,
        timing::TRIES,
        noise.kept_preempted
    );
    eprintln!("walk bench: {:.1} s{}", start.elapsed().as_secs_f64(), if quick { " (quick)" } else { "" });
}

/// Criterion's statistics (confidence intervals, outliers) for the main
/// methods at 64 MiB, full mode only. Criterion runs them one after another,
/// so the RATIO lines come from the interleaved rounds above, not from here.
fn criterion_view(cx: &Ctx<'_>) {
    let mut c = criterion::Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    let mut g = c.benchmark_group("walk_64mib");
    g.throughput(criterion::Throughput::Elements(PAGES_64M));
    let methods: [(&str, Body<'_>); 4] = [
        ("range_fault", m_range_fault(cx, VA_4K, PAGES_64M)),
        ("range_fault_2m", m_range_fault(cx, VA_2M, PAGES_64M)),
        ("naive_translate", m_naive(cx, PAGES_64M)),
        ("store_floor", m_store(PAGES_64M)),
    ];
    for (name, mut body) in methods {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                body(iters);
                t.elapsed()
            })
        });
    }
    g.finish();
}
