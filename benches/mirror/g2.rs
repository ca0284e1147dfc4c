//! G2 (mirror side): a fault of 64 MiB of populated 2 MiB CPU leaves (and
//! of one 1 GiB leaf) against a fault of the same bytes in populated 4 KiB
//! pages, per byte; a single 2 MiB leaf against 512 pages (`FIGURE`: there
//! the fixed cost of a fault call dominates); and the per-page cost of
//! faults of 1, 512 and 16,384 populated 4 KiB pages (the `pages` plot).
//!
//! Every fault maps pages the mirror does not have: before each one its
//! range is invalidated through the registry (untimed; the CPU keeps its
//! pages). Warm: the mirror's directories stay. A pinned page next to each
//! range keeps those above it, and the 4 KiB ranges keep the last page of
//! each 2 MiB block mapped (the fault maps it again), so their leaf tables
//! stay too. Cold (`FIGURE` only): the whole mirror is cleared before each
//! fault, which then allocates every directory again.

use crate::kit::*;
use hmm_core::VaRange;
use hmm_testkit::{ModelSpace, RegionKind};
use std::time::Duration;

/// Where everything lies (virtual addresses).
const LEAF_1G: u64 = GIB;
const LEAF_2M: u64 = 2 * GIB;
const SMALL: u64 = 3 * GIB;
/// 64 MiB of THP (32 leaves), a pinned page after it.
const THP_64M: u64 = 4 * GIB;
/// Small pages: page 0 faulted alone (page 1 pinned), block 1 as 512
/// pages, blocks 2.. as 16,384 pages.
const SMALL_LEN: u64 = 2 * HUGE + 16384 * PAGE;

/// The mirror and the ranges it faults.
struct Setup<'a, 's> {
    space: &'s ModelSpace,
    m: &'a M<'s>,
    leaf_1g: VaRange,
    leaf_2m: VaRange,
    thp_64m: VaRange,
    one: VaRange,
    p512: VaRange,
    p16k: VaRange,
}

/// How a fault's range is cleared before it.
#[derive(Clone, Copy)]
enum Clear {
    /// The range only; 4 KiB ranges keep the last page of every 2 MiB block.
    Warm,
    /// The whole mirror.
    Cold,
}

impl Setup<'_, '_> {
    /// Maps every range and pin into the mirror: the warm state.
    fn warm_up(&self) {
        for r in [range(SMALL, SMALL_LEN), range(LEAF_2M, HUGE + PAGE), range(THP_64M, 64 * MIB + PAGE), self.leaf_1g] {
            self.m.fault(r, false).unwrap();
        }
    }

    /// Untimed: makes `r` unmapped in the mirror again.
    fn clear(&self, r: VaRange, how: Clear) {
        match how {
            Clear::Cold => invalidate(self.space, self.m.range()),
            Clear::Warm
                if r.last() - r.start() < HUGE || r == self.leaf_2m || r == self.leaf_1g || r == self.thp_64m =>
            {
                invalidate(self.space, r)
            }
            Clear::Warm => {
                for block in (r.start()..r.last()).step_by(HUGE as usize) {
                    invalidate(self.space, range(block, HUGE - PAGE));
                }
            }
        }
    }

    /// `n` faults of `r`, each after clearing it; the time of the faults.
    fn faults(&self, r: VaRange, how: Clear, n: u64) -> Duration {
        (0..n)
            .map(|_| {
                self.clear(r, how);
                timed(|| self.m.fault(r, false).unwrap())
            })
            .sum()
    }
}

pub fn run(mode: Mode) {
    // 1 GiB leaf first: huge chunks come from the bottom of the arena, and
    // the 2 MiB one must not take the only 1 GiB-aligned gigabyte.
    let (alloc, space) = kernel(GIB + 384 * MIB);
    let leaf_1g = space.map(LEAF_1G, GIB, RW, RegionKind::HugeTlb1G).unwrap();
    space.write_bytes(LEAF_1G, &[1]).unwrap();
    let leaf_2m = populated(&space, LEAF_2M, HUGE, RegionKind::Thp);
    // Keeps the directory above the 2 MiB leaf.
    populated(&space, LEAF_2M + HUGE, PAGE, RegionKind::PrivateAnon);
    populated(&space, SMALL, SMALL_LEN, RegionKind::PrivateAnon);
    let thp_64m = populated(&space, THP_64M, 64 * MIB, RegionKind::Thp);
    populated(&space, THP_64M + 64 * MIB, PAGE, RegionKind::PrivateAnon);
    let m = mirror(&space, &alloc, range(0, 1 << 47));
    let s = Setup {
        space: &space,
        m: &m,
        leaf_1g,
        leaf_2m,
        thp_64m,
        one: range(SMALL, PAGE),
        p512: range(SMALL + HUGE, HUGE),
        p16k: range(SMALL + 2 * HUGE, 16384 * PAGE),
    };
    s.warm_up();
    assert_eq!(m.stats().huge_mapped, 34, "the THP leaves and the 1 GiB page are mirrored as one entry each");
    let rounds = mode.rounds();
    let pair = |a: VaRange, b: VaRange, how: Clear, n: u64| {
        interleaved(rounds, n, &mut |n| s.faults(a, how, n), &mut |n| s.faults(b, how, n))
    };
    let warm_2m = pair(s.leaf_2m, s.p512, Clear::Warm, 50);
    let warm_1g = pair(s.leaf_1g, s.p512, Clear::Warm, 50);
    let warm_64m = pair(s.thp_64m, s.p16k, Clear::Warm, 5);
    report_warm(&warm_64m, &warm_1g);
    figure(format!(
        "g2 warm single 2 MiB leaf vs 512 x 4 KiB pages, per byte: {} ({:.0} ns vs {:.0} ns; a fault call's fixed \
         cost, its locks and the registry check, dominates a one-entry fault)",
        num(warm_2m.ratio),
        warm_2m.a,
        warm_2m.b
    ));
    let single = pair(s.leaf_2m, s.one, Clear::Warm, 200);
    let big = rounds_median(rounds.min(15), 2, &mut |n| s.faults(s.p16k, Clear::Warm, n));
    plot_pages([(1, single.b), (512, warm_2m.b), (16384, big)], warm_2m.a, warm_1g.a);
    figure(format!(
        "g2 warm 2 MiB leaf vs 1 x 4 KiB page, per byte: {} ({:.0} ns vs {:.0} ns)",
        num(single.ratio * 512.0),
        single.a,
        single.b
    ));
    let cold_2m = pair(s.leaf_2m, s.p512, Clear::Cold, 20);
    let cold_1g = pair(s.leaf_1g, s.p512, Clear::Cold, 20);
    figure(format!(
        "g2 cold (whole mirror cleared before each fault): 2 MiB leaf {:.0} ns vs 512 x 4 KiB {:.0} ns = {} per \
         byte; 1 GiB leaf {:.0} ns vs 512 x 4 KiB {:.0} ns = {} per byte",
        cold_2m.a,
        cold_2m.b,
        num(cold_2m.ratio),
        cold_1g.a,
        cold_1g.b,
        num(cold_1g.ratio * 512.0),
    ));
}

fn report_warm(p64: &Paired, p1: &Paired) {
    ratio(
        "g2_mirror_fault_2m_vs_4k_per_byte",
        p64.ratio,
        ">= 100",
        &format!(
            "Mirror::fault of 64 MiB of populated 2 MiB CPU leaves: {:.0} ns ({:.1} ns/MiB), warm",
            p64.a,
            p64.a / 64.0
        ),
        &format!(
            "Mirror::fault of the same 64 MiB in populated 4 KiB pages: {:.0} ns ({:.0} ns/MiB), warm",
            p64.b,
            p64.b / 64.0
        ),
    );
    ratio(
        "g2_mirror_fault_1g_vs_4k_per_byte",
        p1.ratio * 512.0,
        ">= 100",
        &format!("Mirror::fault of a populated 1 GiB CPU leaf: {:.0} ns ({:.3} ns/MiB), warm", p1.a, p1.a / 1024.0),
        &format!("Mirror::fault of 512 populated 4 KiB pages: {:.0} ns ({:.0} ns/MiB), warm", p1.b, p1.b / 2.0),
    );
}

/// `PLOT pages`: warm faults of `(pages, ns)` 4 KiB pages, and of the two
/// huge leaves, in ns per 4 KiB page.
fn plot_pages(small: [(u64, f64); 3], ns_2m: f64, ns_1g: f64) {
    for (pages, ns) in small {
        plot("pages", "mirror_fault", pages, ns / pages as f64);
    }
    plot("pages", "mirror_fault_2m_leaf", 512, ns_2m / 512.0);
    plot("pages", "mirror_fault_1g_leaf", 1 << 18, ns_1g / (1u64 << 18) as f64);
    let [(_, one), (_, p512), (_, big)] = small;
    figure(format!(
        "g2 warm Mirror::fault of populated 4 KiB pages: 1 page {one:.0} ns, 512 pages {p512:.0} ns ({:.2} \
         ns/page), 16,384 pages {big:.0} ns ({:.2} ns/page)",
        p512 / 512.0,
        big / 16384.0
    ));
}
