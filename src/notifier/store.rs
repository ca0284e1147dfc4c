//! Where the registry keeps its entries: fixed capacity with no heap, or a
//! growable vector with the `alloc` feature.

use super::Notifier;
use core::ptr::NonNull;

/// One slot of the registry's interval tree: a registered notifier with its
/// tree links, or a free slot waiting for reuse.
///
/// 56 bytes on 64-bit targets (not a power of two, see the index), in this
/// order: what a walk reads comes first.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Entry {
    pub(super) start: u64,
    /// Largest `last` in this entry's subtree.
    pub(super) max_last: u64,
    /// Largest `last` in its left subtree (0 when empty).
    pub(super) left_max: u64,
    /// Left and right child: the slot in the low bits, the height of the
    /// subtree there in the high ones (a free slot links the next free one
    /// on the left).
    pub(super) links: [u32; 2],
    pub(super) last: u64,
    pub(super) notifier: NonNull<dyn Notifier>,
}

// Not a power of two (see the index).
#[cfg(target_pointer_width = "64")]
static_assertions::const_assert_eq!(core::mem::size_of::<Entry>(), 56);

// SAFETY: `notifier` points to a `Notifier`, which is `Sync`; the registry's
// insert contract keeps it alive while the entry is in the tree.
unsafe impl Send for Entry {}
// SAFETY: an `Entry` is plain data (bounds, links and a pointer to a `Sync`
// notifier); a shared `&Entry` allows only reading it.
unsafe impl Sync for Entry {}

/// Storage for the registry's entries: a slab of tree nodes.
///
/// The registry links its entries into a balanced tree by slot index and
/// recycles freed slots itself, so a store is only a vector: the registry
/// appends (`insert` at `index == len`) and drops the last slot (`remove`
/// of `len - 1`), never anything in between, and never reorders slots.
/// (Since the interval tree replaced the sorted array, `entries` are in
/// slot order, not sorted, and include free slots.)
///
/// The registry is `Sync` only when its store is `Sync` too: running
/// invalidations read the entries concurrently, outside the registry lock.
pub trait EntryStore: Default + Send {
    /// Every slot, in slot order.
    fn entries(&self) -> &[Entry];
    /// Every slot, mutably (the registry keeps the links consistent).
    fn entries_mut(&mut self) -> &mut [Entry];
    /// Inserts at `index` (the registry only appends); `Err` when full.
    fn insert(&mut self, index: usize, entry: Entry) -> Result<(), Entry>;
    /// Removes the slot at `index` (the registry only removes the last).
    fn remove(&mut self, index: usize) -> Entry;
    /// Slots that can still be appended at all (`None`: unbounded).
    fn room(&self) -> Option<usize>;
    /// Slots that can be appended without allocating: the invalidation
    /// path applies postponed inserts and must not allocate.
    fn spare(&self) -> usize;
    /// Makes [`spare`](Self::spare) at least [`MAX_PENDING`](super::MAX_PENDING)
    /// where the store can grow; called with no invalidation running.
    fn reserve_spare(&mut self) {}
}

/// Fixed capacity of `N` notifiers, no heap.
#[derive(Debug, Default)]
pub struct FixedStore<const N: usize> {
    entries: heapless::Vec<Entry, N>,
}

impl<const N: usize> EntryStore for FixedStore<N> {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entries_mut(&mut self) -> &mut [Entry] {
        &mut self.entries
    }
    fn insert(&mut self, index: usize, entry: Entry) -> Result<(), Entry> {
        self.entries.insert(index, entry)
    }
    fn remove(&mut self, index: usize) -> Entry {
        self.entries.remove(index)
    }
    fn room(&self) -> Option<usize> {
        Some(N - self.entries.len())
    }
    fn spare(&self) -> usize {
        N - self.entries.len()
    }
}

/// Unbounded storage on the global allocator. It keeps room for
/// [`MAX_PENDING`](super::MAX_PENDING) more entries, so applying postponed
/// inserts never allocates. Available with the `alloc` feature.
#[cfg(feature = "alloc")]
#[cfg_attr(docsrs, doc(cfg(feature = "alloc")))]
#[derive(Debug)]
pub struct VecStore {
    entries: alloc::vec::Vec<Entry>,
}

#[cfg(feature = "alloc")]
impl Default for VecStore {
    fn default() -> Self {
        Self { entries: alloc::vec::Vec::with_capacity(super::MAX_PENDING) }
    }
}

#[cfg(feature = "alloc")]
impl EntryStore for VecStore {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }
    fn entries_mut(&mut self) -> &mut [Entry] {
        &mut self.entries
    }
    fn insert(&mut self, index: usize, entry: Entry) -> Result<(), Entry> {
        self.entries.insert(index, entry);
        Ok(())
    }
    fn reserve_spare(&mut self) {
        self.entries.reserve(super::MAX_PENDING);
    }
    fn remove(&mut self, index: usize) -> Entry {
        self.entries.remove(index)
    }
    fn room(&self) -> Option<usize> {
        None
    }
    fn spare(&self) -> usize {
        self.entries.capacity() - self.entries.len()
    }
}
