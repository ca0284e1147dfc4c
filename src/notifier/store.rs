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

/// An insert or remove postponed until no invalidation is running.
#[derive(Clone, Copy, Debug)]
pub struct Deferred {
    pub(super) insert: bool,
    pub(super) entry: Entry,
}

/// Storage for registry entries and postponed operations.
pub trait EntryStore: Default + Send {
    /// Entries, sorted by start.
    fn entries(&self) -> &[Entry];
    /// Entries, mutably (the registry keeps the order).
    fn entries_mut(&mut self) -> &mut [Entry];
    /// Inserts at `index`; `Err` when full.
    fn insert(&mut self, index: usize, entry: Entry) -> Result<(), Entry>;
    /// Removes the entry at `index`.
    fn remove(&mut self, index: usize) -> Entry;
    /// Postponed operations, in order.
    fn deferred(&self) -> &[Deferred];
    /// Appends a postponed operation; `Err` when full.
    fn defer(&mut self, op: Deferred) -> Result<(), Deferred>;
    /// Removes the postponed operation at `index`.
    fn undefer(&mut self, index: usize) -> Deferred;
    /// Room for this many more entries, counting pending inserts (`None`: unbounded).
    fn room(&self) -> Option<usize>;
}

/// Fixed capacity of `N` notifiers, no heap.
#[derive(Debug, Default)]
pub struct FixedStore<const N: usize> {
    entries: heapless::Vec<Entry, N>,
    deferred: heapless::Vec<Deferred, N>,
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
    fn deferred(&self) -> &[Deferred] {
        &self.deferred
    }
    fn defer(&mut self, op: Deferred) -> Result<(), Deferred> {
        self.deferred.push(op)
    }
    fn undefer(&mut self, index: usize) -> Deferred {
        self.deferred.remove(index)
    }
    fn room(&self) -> Option<usize> {
        let pending = self.deferred.iter().filter(|d| d.insert).count();
        Some(N.saturating_sub(self.entries.len() + pending))
    }
}

/// Unbounded storage on the global allocator.
#[cfg(feature = "alloc")]
#[derive(Debug, Default)]
pub struct VecStore {
    entries: alloc::vec::Vec<Entry>,
    deferred: alloc::vec::Vec<Deferred>,
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
    fn remove(&mut self, index: usize) -> Entry {
        self.entries.remove(index)
    }
    fn deferred(&self) -> &[Deferred] {
        &self.deferred
    }
    fn defer(&mut self, op: Deferred) -> Result<(), Deferred> {
        self.deferred.push(op);
        Ok(())
    }
    fn undefer(&mut self, index: usize) -> Deferred {
        self.deferred.remove(index)
    }
    fn room(&self) -> Option<usize> {
        None
    }
}
