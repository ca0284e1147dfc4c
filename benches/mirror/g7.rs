//! G7 (exact counts, not times): what the mirror's table costs in memory,
//! and that it gives every frame back.
//!
//! Bytes = `Mirror::table_stats().frames` x 4096: root, directories and
//! leaf tables, everything the mirror allocated.

use crate::kit::*;
use hmm_core::pt::TableStats;
use hmm_testkit::RegionKind;

const AT_4K: u64 = 16 * GIB;
const AT_2M: u64 = 32 * GIB;
/// 2 MiB leaves mirrored for the per-leaf figure: the root and the 512 GiB
/// directory above are one-off costs, so a mirror of a few GiB shows what a
/// leaf costs (8 + 16/k B at k GiB); 4 GiB of THP commits 4 GiB of host RAM
/// for a moment.
const HUGE_GIB: u64 = 4;

pub fn run() {
    let (alloc, space) = kernel(HUGE_GIB * GIB + 128 * MIB);
    let empty = mirror(&space, &alloc, range(0, 1 << 47)).table_frames();
    let live0 = alloc.live();
    let m = mirror(&space, &alloc, range(0, 1 << 47));
    // 4 KiB pages: read faults of private memory map the shared zero frame,
    // so 1 GiB costs no data frames (the table's size does not depend on
    // which frames it maps).
    let small = space.map(AT_4K, GIB, RW, RegionKind::PrivateAnon).unwrap();
    m.fault(small, false).unwrap();
    let t = m.table_stats();
    let pages = GIB / PAGE;
    assert_eq!((t.leaves, t.huge_leaves), (pages, 0), "1 GiB of 4 KiB pages, one entry each");
    ratio(
        "g7_bytes_per_4k_page",
        bytes(t) as f64 / pages as f64,
        "<= 8",
        &format!("1 GiB mirrored in 4 KiB pages: {} for {pages} pages", shape(t)),
        "one 8-byte entry per page: 8 B/page",
    );
    // 2 MiB leaves: HUGE_GIB GiB of THP, populated by the fault.
    space.unmap(small).unwrap();
    let leaves = HUGE_GIB * 512;
    let huge = space.map(AT_2M, HUGE_GIB * GIB, RW, RegionKind::Thp).unwrap();
    m.fault(huge, false).unwrap();
    let t = m.table_stats();
    assert_eq!((t.leaves, t.huge_leaves), (leaves, leaves), "THP, one entry per 2 MiB leaf");
    ratio(
        "g7_bytes_per_2m_leaf",
        bytes(t) as f64 / leaves as f64,
        "<= 16",
        &format!("{HUGE_GIB} GiB of 2 MiB CPU leaves mirrored one entry each: {} for {leaves} leaves", shape(t)),
        "one 8-byte entry per leaf: 8 B/leaf",
    );
    figure(format!(
        "g7 table bytes for k GiB mirrored: a 4 KiB directory per GiB plus the root and one 512 GiB directory above, \
         so per 2 MiB leaf 8 + 16/k B (24 at k = 1, 16 at 2, {} at {HUGE_GIB}) and per 4 KiB page \
         8 + (1 + 2/k) / 64 B (at least 8.0156: the 8-byte entry itself plus the directories)",
        num(bytes(t) as f64 / leaves as f64)
    ));
    space.unmap(huge).unwrap();
    let left = m.table_frames();
    let before_drop = alloc.live();
    drop(m);
    let returned = before_drop - alloc.live();
    // The CPU keeps its emptied page tables after an unmap; a map over them
    // prunes them, so the space is as it was before the mirror came.
    space.unmap(space.map(0, 512 * GIB, RW, RegionKind::PrivateAnon).unwrap()).unwrap();
    let back = alloc.live() as i64 - live0 as i64;
    let extra = left.saturating_sub(empty) as u64 + returned.abs_diff(left) as u64 + back.unsigned_abs();
    ratio(
        "g7_frames_left_after_unmap",
        extra as f64,
        "== 0",
        &format!(
            "after unmapping everything the mirror holds {left} table frame(s) (an empty mirror {empty}); dropping it \
             returned {returned}; allocator count after the drop {back:+} against before the mirror"
        ),
        "nothing beyond the root; the count back to its start",
    );
}

fn bytes(t: TableStats) -> u64 {
    t.frames as u64 * PAGE
}

/// The table's frames and entries, in words.
fn shape(t: TableStats) -> String {
    format!("{} table frames = {} B, {} entries ({} huge)", t.frames, bytes(t), t.leaves, t.huge_leaves)
}
