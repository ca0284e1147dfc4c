//! Where the registry keeps its entries: fixed capacity with no heap, or a
//! growable vector with the `alloc` feature.

use super::Notifier;
use core::ptr::NonNull;

/// One registered notifier, as kept sorted by start address.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub(super) start: u64,
    pub(super) last: u64,
    /// Largest `last` in this entry's subtree of the implicit search tree.
    pub(super) max_last: u64,
    pub(super) notifier: NonNull<dyn Notifier>,
}

// SAFETY: `notifier` points to a `Notifier`, which is `Sync`; the registry's
// insert contract keeps it alive while the entry exists.
unsafe impl Send for Entry {}
// SAFETY: an `Entry` is plain data (bounds and a pointer to a `Sync`
// notifier); a shared `&Entry` allows only reading it.
unsafe impl Sync for Entry {}

/// Storage for registry entries, kept sorted by start.
///
/// The registry is `Sync` only when its store is `Sync` too: running
/// invalidations read the entries concurrently, outside the registry lock.
pub trait EntryStore: Default + Send {
    /// Entries, sorted by start.
    fn entries(&self) -> &[Entry];
    /// Entries, mutably (the registry keeps the order).
    fn entries_mut(&mut self) -> &mut [Entry];
    /// Inserts at `index`; `Err` when full.
    fn insert(&mut self, index: usize, entry: Entry) -> Result<(), Entry>;
    /// Removes the entry at `index`.
    fn remove(&mut self, index: usize) -> Entry;
    /// Entries that can still be inserted at all (`None`: unbounded).
    fn room(&self) -> Option<usize>;
    /// Entries that can be inserted without allocating: the invalidation
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
/// inserts never allocates.
#[cfg(feature = "alloc")]
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
