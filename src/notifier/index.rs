//! Overlap lookup over an AVL tree of entries, ordered by (start, notifier
//! pointer), each node caching the largest `last` of its subtree and of its
//! left subtree.
//!
//! A query walks the entries in order, skipping every subtree that ends
//! before the query starts, and stops at the first entry that starts after
//! it ends: O(log n) when nothing overlaps, O(log n) per overlap at worst.
//! A node's own summary of its left subtree decides whether to go left, so
//! the walk reads no node off its path to find that a subtree is out of
//! reach. Insert and remove walk one root-to-leaf path and rebalance on the
//! way back, stopping as soon as a subtree keeps its height and `max_last`:
//! O(log n), with no allocation beyond appending a slot to the store when no
//! freed slot is left. Each link to a child carries the height of the
//! subtree there, and `max_last` follows from what joined or left the
//! subtree, so the way back reads no node off the path except in a rotation
//! or when a subtree's largest `last` left it. (In a large tree an insert or
//! a query waits on memory reads, not on comparisons.)
//!
//! Nodes live in the store's slots and link by index; an entry keeps its
//! slot until it is removed, freed slots form a list (through the left link)
//! and are reused first. Every walk keeps its path in a fixed array, so none
//! recurses.
//!
//! An entry is 56 bytes, not 64: with a power-of-two size, a tree built in
//! address order (slots in key order) has the nodes near its top at slots
//! `(2i + 1) 2^j - 1`, all in one cache set, where they evict one another
//! (measured in a cache simulator: three times the misses per lookup of the
//! sorted array this tree replaced).

use super::store::{Entry, EntryStore};
use super::Notifier;
use core::ptr::NonNull;

/// Bits of a link that name the child's slot; the others hold the height
/// of the subtree there.
const SLOT_BITS: u32 = 26;

/// No node (and one past the last usable slot).
const NIL: u32 = (1 << SLOT_BITS) - 1;

/// Longest root-to-leaf path: an AVL tree of `n < 2^26` nodes is less than
/// `1.4405 log2(n + 2)` high, i.e. at most 37.
const MAX_HEIGHT: usize = 40;

/// Height in the left link of a free slot (no subtree is that high).
const FREE: u8 = (u32::MAX >> SLOT_BITS) as u8;

/// Orders entries: by start, then by notifier (data address and vtable),
/// which tells apart any two notifiers registered at once (an interval is
/// registered only once; two notifiers at one address are of two types), so
/// equal starts are fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    start: u64,
    notifier: NonNull<dyn Notifier>,
}

impl Key {
    pub(super) fn new(start: u64, notifier: NonNull<dyn Notifier>) -> Self {
        Self { start, notifier }
    }
}

impl Entry {
    pub(super) fn key(&self) -> Key {
        Key::new(self.start, self.notifier)
    }

    /// A leaf for `notifier` over `[start, last]`.
    pub(super) fn leaf(notifier: NonNull<dyn Notifier>, start: u64, last: u64) -> Self {
        Self { start, max_last: last, left_max: 0, links: [NIL; 2], last, notifier }
    }

    /// The left or right child's slot (`NIL`: none).
    fn child(&self, right: bool) -> u32 {
        self.links[right as usize] & NIL
    }

    fn set_child(&mut self, right: bool, child: u32) {
        let link = &mut self.links[right as usize];
        *link = *link & !NIL | child;
    }

    /// Heights of the left and right subtrees (0: empty).
    fn heights(&self) -> [u8; 2] {
        self.links.map(|link| (link >> SLOT_BITS) as u8)
    }

    fn set_height(&mut self, right: bool, height: u8) {
        let link = &mut self.links[right as usize];
        *link = *link & NIL | u32::from(height) << SLOT_BITS;
    }

    /// Height of the subtree rooted here (a leaf is 1).
    fn height(&self) -> u8 {
        let [left, right] = self.heights();
        1 + left.max(right)
    }

    /// Whether this slot is free.
    fn is_free(&self) -> bool {
        self.heights()[0] == FREE
    }
}

/// Largest `last` in the subtree at `at` (0 when empty).
fn max_of(e: &[Entry], at: u32) -> u64 {
    if at == NIL {
        0
    } else {
        e[at as usize].max_last
    }
}

/// What happened below the nodes of a path: tells whether a node's
/// `max_last` can follow without reading its children.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// An entry ending at this address joined the subtree.
    Joined(u64),
    /// An entry ending at this address left the subtree.
    Left(u64),
}

/// How to rebalance a path after an insert or a remove.
#[derive(Clone, Copy, Debug)]
struct Fix {
    /// Height of the new subtree below the deepest node of the path.
    child_height: u8,
    /// Nodes deeper than this saw `below`, the others `above`; the walk may
    /// stop early only at this depth or above (a remove put another node
    /// in place of the removed one at this depth).
    floor: usize,
    below: Change,
    above: Change,
}

/// The registered entries: a balanced search tree over an [`EntryStore`].
#[derive(Debug)]
pub(super) struct IntervalTree<S> {
    store: S,
    root: u32,
    /// First free slot; each links the next through its left link.
    free: u32,
    free_len: usize,
    len: usize,
}

impl<S: EntryStore> Default for IntervalTree<S> {
    fn default() -> Self {
        Self { store: S::default(), root: NIL, free: NIL, free_len: 0, len: 0 }
    }
}

/// A walk over the entries overlapping a range, in start order: the
/// ancestors whose entry and right subtree are still to visit, then the next
/// subtree, as slot indices. So the registry can find the first overlap
/// under its lock and call the rest after it, without walking twice (the
/// tree must not change in between).
#[derive(Debug)]
pub(super) struct Overlaps {
    stack: [u32; MAX_HEIGHT],
    depth: usize,
    at: u32,
    start: u64,
    last: u64,
}

/// A root-to-leaf walk, for rebalancing on the way back up.
struct Path {
    nodes: [u32; MAX_HEIGHT],
    /// Bit `d`: the walk went right from `nodes[d]`.
    right: u64,
    len: usize,
}

impl Path {
    fn new() -> Self {
        Self { nodes: [NIL; MAX_HEIGHT], right: 0, len: 0 }
    }
    fn push(&mut self, node: u32, right: bool) {
        self.nodes[self.len] = node;
        self.right |= (right as u64) << self.len;
        self.len += 1;
    }
    /// Whether the walk went right from depth `d`.
    fn went_right(&self, d: usize) -> bool {
        self.right >> d & 1 == 1
    }
    /// Makes `child` the child the walk took from depth `d`, or the root
    /// when `d` is `None`.
    fn relink(&self, e: &mut [Entry], root: &mut u32, d: Option<usize>, child: u32) {
        match d {
            None => *root = child,
            Some(d) => e[self.nodes[d] as usize].set_child(self.went_right(d), child),
        }
    }
}

impl<S: EntryStore> IntervalTree<S> {
    /// Registered entries.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Entries that can still be inserted at all: what the store takes,
    /// and fewer than `NIL` slots in all (what a link can name).
    pub(super) fn room(&self) -> usize {
        let appendable = (NIL as usize).saturating_sub(self.store.entries().len());
        self.store.room().map_or(appendable, |r| r.min(appendable)).saturating_add(self.free_len)
    }

    /// Entries that can be inserted without allocating.
    pub(super) fn spare(&self) -> usize {
        let appendable = (NIL as usize).saturating_sub(self.store.entries().len());
        self.store.spare().min(appendable).saturating_add(self.free_len)
    }

    /// Makes [`spare`](Self::spare) at least `MAX_PENDING` where the store
    /// can grow.
    pub(super) fn reserve_spare(&mut self) {
        if self.spare() < super::MAX_PENDING {
            self.store.reserve_spare();
        }
    }

    /// Whether an entry has `key`.
    pub(super) fn contains(&self, key: Key) -> bool {
        let e = self.store.entries();
        let mut at = self.root;
        while at != NIL {
            match key.cmp(&e[at as usize].key()) {
                core::cmp::Ordering::Equal => return true,
                order => at = e[at as usize].child(order.is_gt()),
            }
        }
        false
    }

    /// Inserts `entry` (made by [`Entry::leaf`]); `Err` when full.
    pub(super) fn insert(&mut self, entry: Entry) -> Result<(), Entry> {
        let key = entry.key();
        let e = self.store.entries();
        let mut path = Path::new();
        let mut at = self.root;
        while at != NIL {
            let right = key > e[at as usize].key();
            path.push(at, right);
            at = e[at as usize].child(right);
        }
        let slot = self.take_slot(entry)?;
        let e = self.store.entries_mut();
        path.relink(e, &mut self.root, path.len.checked_sub(1), slot);
        let joined = Change::Joined(entry.last);
        let fix = Fix { child_height: 1, floor: path.len, below: joined, above: joined };
        rebalance_path(e, &mut self.root, &path, fix);
        self.len += 1;
        Ok(())
    }

    /// Removes the entry with `key` and returns it.
    pub(super) fn remove(&mut self, key: Key) -> Option<Entry> {
        let e = self.store.entries_mut();
        let mut path = Path::new();
        let mut at = self.root;
        while at != NIL {
            let order = key.cmp(&e[at as usize].key());
            if order.is_eq() {
                break;
            }
            path.push(at, order.is_gt());
            at = e[at as usize].child(order.is_gt());
        }
        if at == NIL {
            return None;
        }
        let (slot, removed) = (at, e[at as usize]);
        let left = Change::Left(removed.last);
        let fix = if removed.child(false) != NIL && removed.child(true) != NIL {
            // Two children: the successor (leftmost on the right) leaves its
            // place and takes this one, links and summaries included.
            let floor = path.len;
            path.push(slot, true);
            let mut succ = removed.child(true);
            while e[succ as usize].child(false) != NIL {
                path.push(succ, false);
                succ = e[succ as usize].child(false);
            }
            let s = e[succ as usize];
            path.relink(e, &mut self.root, Some(path.len - 1), s.child(true));
            let node = e[slot as usize];
            let moved = &mut e[succ as usize];
            (moved.links, moved.left_max, moved.max_last) = (node.links, node.left_max, node.max_last);
            path.relink(e, &mut self.root, floor.checked_sub(1), succ);
            path.nodes[floor] = succ;
            Fix { child_height: s.heights()[1], floor, below: Change::Left(s.last), above: left }
        } else {
            let child = removed.child(removed.child(false) == NIL);
            path.relink(e, &mut self.root, path.len.checked_sub(1), child);
            Fix { child_height: removed.height() - 1, floor: path.len, below: left, above: left }
        };
        rebalance_path(e, &mut self.root, &path, fix);
        self.free_slot(slot);
        self.len -= 1;
        Some(removed)
    }

    /// A walk over the entries overlapping `[start, last]`; see
    /// [`next_overlap`](Self::next_overlap).
    pub(super) fn overlaps(&self, start: u64, last: u64) -> Overlaps {
        Overlaps { stack: [NIL; MAX_HEIGHT], depth: 0, at: self.root, start, last }
    }

    /// The next entry of `walk`, in start order; `None` once there is none.
    pub(super) fn next_overlap(&self, walk: &mut Overlaps) -> Option<&Entry> {
        let e = self.store.entries();
        loop {
            // Into the next subtree if it reaches `start`, then down its left
            // spine as far as each node's left summary says it does.
            let mut at = core::mem::replace(&mut walk.at, NIL);
            if at != NIL && e[at as usize].max_last >= walk.start {
                loop {
                    walk.stack[walk.depth] = at;
                    walk.depth += 1;
                    let node = &e[at as usize];
                    at = node.child(false);
                    if at == NIL || node.left_max < walk.start {
                        break;
                    }
                }
            }
            walk.depth = walk.depth.checked_sub(1)?;
            let node = &e[walk.stack[walk.depth] as usize];
            if node.start > walk.last {
                // Every later entry starts later still (so the walk stays
                // done: each call pops one more of them).
                return None;
            }
            walk.at = node.child(true);
            if node.last >= walk.start {
                return Some(node);
            }
        }
    }

    /// Puts `entry` in a free slot, or appends one.
    fn take_slot(&mut self, entry: Entry) -> Result<u32, Entry> {
        if self.free != NIL {
            let slot = self.free;
            let node = &mut self.store.entries_mut()[slot as usize];
            self.free = node.child(false);
            *node = entry;
            self.free_len -= 1;
            return Ok(slot);
        }
        let at = self.store.entries().len();
        if at >= NIL as usize {
            // The links have no room for more slots.
            return Err(entry);
        }
        self.store.insert(at, entry)?;
        Ok(at as u32)
    }

    /// Gives `slot` back: the store's last slot is dropped, another joins the
    /// free list.
    fn free_slot(&mut self, slot: u32) {
        if slot as usize + 1 == self.store.entries().len() {
            self.store.remove(slot as usize);
            return;
        }
        let node = &mut self.store.entries_mut()[slot as usize];
        node.links = [self.free, NIL];
        node.set_height(false, FREE);
        self.free = slot;
        self.free_len += 1;
    }

    /// Checks order, balance, heights, the `last` summaries and slot
    /// bookkeeping.
    pub(super) fn check(&self) -> Result<(), &'static str> {
        let e = self.store.entries();
        let mut count = 0;
        check_subtree(e, self.root, None, None, 0, &mut count)?;
        if count != self.len {
            return Err("len differs from the nodes reachable from the root");
        }
        let (mut at, mut free) = (self.free, 0);
        while at != NIL {
            let node = e.get(at as usize).ok_or("free slot out of bounds")?;
            if !node.is_free() || free >= e.len() {
                return Err("free list reaches a live node or loops");
            }
            free += 1;
            at = node.child(false);
        }
        if free != self.free_len || count + free != e.len() {
            return Err("slots are neither in the tree nor free exactly once");
        }
        Ok(())
    }
}

/// Recomputes `at`'s `max_last` from its entry, its left summary and its
/// right child.
fn recompute_max(e: &mut [Entry], at: u32) {
    let node = &e[at as usize];
    let max_last = node.last.max(node.left_max).max(max_of(e, node.child(true)));
    e[at as usize].max_last = max_last;
}

/// Rotates the subtree at `at` towards `right` (its child on the other side
/// becomes the subtree's root); returns the new root.
fn rotate(e: &mut [Entry], at: u32, right: bool) -> u32 {
    let top = e[at as usize].child(!right);
    let inner = e[top as usize].child(right);
    let inner_height = e[top as usize].heights()[right as usize];
    let subtree_max = e[at as usize].max_last;
    e[at as usize].set_child(!right, inner);
    e[at as usize].set_height(!right, inner_height);
    if right {
        e[at as usize].left_max = max_of(e, inner);
    }
    recompute_max(e, at);
    let (height, at_max) = (e[at as usize].height(), e[at as usize].max_last);
    let top_node = &mut e[top as usize];
    top_node.set_child(right, at);
    top_node.set_height(right, height);
    if !right {
        top_node.left_max = at_max;
    }
    // Same entries, so the same largest `last`.
    top_node.max_last = subtree_max;
    top
}

/// Restores the balance of `at` (subtree heights differ by at most one);
/// returns the subtree's new root.
fn balance(e: &mut [Entry], at: u32) -> u32 {
    let [hl, hr] = e[at as usize].heights();
    if hl.abs_diff(hr) <= 1 {
        return at;
    }
    // Rotate towards the lower side, first turning the heavy child's inner
    // grandchild outwards when that one is the higher.
    let low_right = hl > hr;
    let heavy = e[at as usize].child(!low_right);
    let h = e[heavy as usize].heights();
    if h[low_right as usize] > h[!low_right as usize] {
        let turned = rotate(e, heavy, !low_right);
        // (Same entries below, so the same left summary; the height there
        // is `rotate`'s to set, from `turned`.)
        e[at as usize].set_child(!low_right, turned);
    }
    rotate(e, at, low_right)
}

/// Updates and rebalances the nodes of `path`, deepest first, relinking
/// each new subtree root into its parent (or the root). Stops once a
/// subtree ends with the height and `max_last` it had, as its ancestors
/// then stay as they are (not below `fix.floor`).
fn rebalance_path(e: &mut [Entry], root: &mut u32, path: &Path, fix: Fix) {
    let mut child_height = fix.child_height;
    for d in (0..path.len).rev() {
        let at = path.nodes[d];
        let right = path.went_right(d);
        let before = (e[at as usize].height(), e[at as usize].max_last);
        e[at as usize].set_height(right, child_height);
        if !right {
            e[at as usize].left_max = max_of(e, e[at as usize].child(false));
        }
        match if d > fix.floor { fix.below } else { fix.above } {
            Change::Joined(last) => e[at as usize].max_last = before.1.max(last),
            // The largest `last` may have left: ask the children.
            Change::Left(last) if last >= before.1 => recompute_max(e, at),
            Change::Left(_) => {}
        }
        let top = balance(e, at);
        if top != at {
            path.relink(e, root, d.checked_sub(1), top);
        }
        let after = (e[top as usize].height(), e[top as usize].max_last);
        if d <= fix.floor && after == before {
            return;
        }
        child_height = after.0;
    }
}

/// Checks the subtree at `at` (keys strictly between `lo` and `hi`); returns
/// its height and `max_last`, counting its nodes into `count`.
fn check_subtree(
    e: &[Entry],
    at: u32,
    lo: Option<Key>,
    hi: Option<Key>,
    depth: usize,
    count: &mut usize,
) -> Result<(u8, u64), &'static str> {
    if at == NIL {
        return Ok((0, 0));
    }
    if depth >= MAX_HEIGHT || *count >= e.len() {
        return Err("the tree is too deep or has a cycle");
    }
    let node = e.get(at as usize).ok_or("child slot out of bounds")?;
    *count += 1;
    let key = node.key();
    if node.is_free() || lo.is_some_and(|lo| key <= lo) || hi.is_some_and(|hi| key >= hi) {
        return Err("a free slot in the tree, or keys out of order");
    }
    let (hl, ml) = check_subtree(e, node.child(false), lo, Some(key), depth + 1, count)?;
    let (hr, mr) = check_subtree(e, node.child(true), Some(key), hi, depth + 1, count)?;
    if hl.abs_diff(hr) > 1 || node.heights() != [hl, hr] {
        return Err("unbalanced, or stale subtree heights");
    }
    if node.start > node.last || node.left_max != ml || node.max_last != node.last.max(ml).max(mr) {
        return Err("a stale max_last or left_max");
    }
    Ok((node.height(), node.max_last))
}
