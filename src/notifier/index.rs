//! Overlap lookup in O(log n + k) over entries sorted by start.
//!
//! The sorted array is read as an implicit balanced search tree: the node of
//! `[lo, hi)` is its middle element, its subtrees are the two halves. Each node
//! caches the largest `last` of its subtree, so a query skips every subtree
//! that ends before the query starts and every right part that starts after
//! it ends. No pointers, no extra memory, rebuilt in O(n) after a change
//! (changes are rare; lookups happen on every invalidation).

use super::store::Entry;

/// Recomputes every node's `max_last`.
pub(super) fn rebuild(entries: &mut [Entry]) {
    fn build(e: &mut [Entry], lo: usize, hi: usize) -> u64 {
        if lo >= hi {
            return 0;
        }
        let mid = lo + (hi - lo) / 2;
        let left = build(e, lo, mid);
        let right = build(e, mid + 1, hi);
        let max = e[mid].last.max(left).max(right);
        e[mid].max_last = max;
        max
    }
    build(entries, 0, entries.len());
}

/// Calls `f` on every entry overlapping `[start, last]`, in start order;
/// stops early if `f` returns false. Returns false if stopped.
pub(super) fn for_each_overlap(entries: &[Entry], start: u64, last: u64, f: &mut dyn FnMut(&Entry) -> bool) -> bool {
    fn visit(e: &[Entry], lo: usize, hi: usize, start: u64, last: u64, f: &mut dyn FnMut(&Entry) -> bool) -> bool {
        if lo >= hi {
            return true;
        }
        let mid = lo + (hi - lo) / 2;
        if e[mid].max_last < start {
            return true;
        }
        if !visit(e, lo, mid, start, last, f) {
            return false;
        }
        if e[mid].start > last {
            return true;
        }
        if e[mid].last >= start && !f(&e[mid]) {
            return false;
        }
        visit(e, mid + 1, hi, start, last, f)
    }
    visit(entries, 0, entries.len(), start, last, f)
}

/// Index at which an entry starting at `start` keeps the order (after equal starts).
pub(super) fn insertion_point(entries: &[Entry], start: u64) -> usize {
    entries.partition_point(|e| e.start <= start)
}
