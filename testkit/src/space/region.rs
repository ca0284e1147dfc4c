//! Regions (VMAs): what each range of the address space is and may do.
//!
//! Kept sorted by start in a `BTreeMap`, behind the mmap lock. Mutations
//! first *carve* the map so that the affected range starts and ends on region
//! boundaries, then edit whole regions.

use crate::file::SimFile;
use crate::phys::PAGE;
use hmm_core::arch::PagingGeometry;
use hmm_core::{Region, RegionFlags, VaRange};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What backs a region, as the test asks [`ModelSpace::map`](crate::ModelSpace::map)
/// for it.
#[derive(Clone, Debug)]
pub enum RegionKind {
    /// Private anonymous memory: demand-zero, the zero page on read faults,
    /// copy-on-write after fork; 4 KiB leaves.
    PrivateAnon,
    /// Private anonymous memory eligible for transparent huge pages: a fault
    /// maps a 2 MiB leaf when the aligned 2 MiB block lies inside the region
    /// and nothing is mapped there yet (and a 2 MiB chunk is available),
    /// otherwise it behaves as [`PrivateAnon`](Self::PrivateAnon).
    Thp,
    /// hugetlbfs with 2 MiB pages (private): always 2 MiB leaves; start,
    /// length and any later unmap/protect must be 2 MiB aligned.
    HugeTlb2M,
    /// hugetlbfs with 1 GiB pages (private): always 1 GiB leaves.
    HugeTlb1G,
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`): a fresh
    /// [`SimFile`] shared with forked children; writes are never copied.
    SharedAnon,
    /// A shared mapping of `file` starting at byte `offset` (page aligned).
    SharedFile {
        /// The file.
        file: Arc<SimFile>,
        /// Byte offset of the region's first page in the file.
        offset: u64,
    },
    /// A driver's mixed map: the driver inserts its own pages, read-only, at
    /// map time; a CPU write to a writable region copies the page into
    /// private anonymous memory.
    MixedMap,
    /// An IO / PFN map: raw frames inserted at map time; the region carries
    /// [`RegionFlags::IO`] and a device must never be given them.
    Io,
}

/// A region's backing, with its object where it has one.
#[derive(Clone, Debug)]
pub(crate) enum Kind {
    Anon,
    Thp,
    /// Order of the huge pages (9 or 18).
    HugeTlb(u32),
    /// Object and page offset of the region start in it.
    Shared(Arc<SimFile>, u64),
    Mixed(Arc<SimFile>, u64),
    Io(Arc<SimFile>, u64),
}

/// One region.
#[derive(Clone, Debug)]
pub(crate) struct Vma {
    pub(crate) start: u64,
    pub(crate) last: u64,
    pub(crate) flags: RegionFlags,
    pub(crate) kind: Kind,
}

impl Vma {
    /// The region's range, in geometry `G` (the space's, which `map`
    /// validated it for).
    pub(crate) fn range<G: PagingGeometry>(&self) -> VaRange {
        VaRange::new::<G>(self.start, self.last - self.start + 1).expect("regions lie in the user half")
    }

    pub(crate) fn region<G: PagingGeometry>(&self) -> Region {
        Region { range: self.range::<G>(), flags: self.flags }
    }

    /// The backing object and page index for `va`, for object-backed kinds.
    pub(crate) fn object_page(&self, va: u64) -> Option<(&Arc<SimFile>, u64)> {
        let idx = (va - self.start) / PAGE;
        match &self.kind {
            Kind::Shared(o, off) | Kind::Mixed(o, off) | Kind::Io(o, off) => Some((o, off + idx)),
            _ => None,
        }
    }

    /// Size of the leaves a hugetlb region always uses.
    pub(crate) fn huge_size(&self) -> Option<u64> {
        match self.kind {
            Kind::HugeTlb(order) => Some(PAGE << order),
            _ => None,
        }
    }

    /// Whether the region's pages are copied on write (private mapping).
    pub(crate) fn is_private(&self) -> bool {
        matches!(self.kind, Kind::Anon | Kind::Thp | Kind::HugeTlb(_) | Kind::Mixed(..))
    }

    fn split_off(&mut self, at: u64) -> Vma {
        debug_assert!(self.start < at && at <= self.last);
        let pages = (at - self.start) / PAGE;
        let mut kind = self.kind.clone();
        match &mut kind {
            Kind::Shared(_, off) | Kind::Mixed(_, off) | Kind::Io(_, off) => *off += pages,
            _ => {}
        }
        let right = Vma { start: at, last: self.last, flags: self.flags, kind };
        self.last = at - 1;
        right
    }
}

/// All regions of one address space.
#[derive(Clone, Debug, Default)]
pub(crate) struct Regions {
    map: BTreeMap<u64, Vma>,
}

impl Regions {
    pub(crate) fn at(&self, va: u64) -> Option<&Vma> {
        let (_, v) = self.map.range(..=va).next_back()?;
        (va <= v.last).then_some(v)
    }

    pub(crate) fn overlapping(&self, r: VaRange) -> impl Iterator<Item = &Vma> {
        let first = self.at(r.start()).map_or(r.start(), |v| v.start);
        self.map.range(first..=r.last()).map(|(_, v)| v).filter(move |v| v.last >= r.start())
    }

    pub(crate) fn any_overlap(&self, r: VaRange) -> bool {
        self.overlapping(r).next().is_some()
    }

    /// Whether every address of `r` is inside some region.
    pub(crate) fn covers(&self, r: VaRange) -> bool {
        let mut next = r.start();
        for v in self.overlapping(r) {
            if v.start > next {
                return false;
            }
            if v.last >= r.last() {
                return true;
            }
            next = v.last + 1;
        }
        false
    }

    pub(crate) fn insert(&mut self, v: Vma) {
        self.map.insert(v.start, v);
    }

    fn split_at(&mut self, at: u64) {
        let Some((&start, _)) = self.map.range(..at).next_back() else { return };
        let v = self.map.get_mut(&start).expect("present");
        if v.last >= at {
            let right = v.split_off(at);
            self.map.insert(at, right);
        }
    }

    /// Splits regions so none straddles either end of `r`.
    pub(crate) fn carve(&mut self, r: VaRange) {
        self.split_at(r.start());
        if let Some(end) = r.end() {
            self.split_at(end);
        }
    }

    /// Removes the regions inside `r` (call [`carve`](Self::carve) first).
    pub(crate) fn remove_in(&mut self, r: VaRange) -> Vec<Vma> {
        let keys: Vec<u64> = self.map.range(r.start()..=r.last()).map(|(&k, _)| k).collect();
        keys.into_iter().filter_map(|k| self.map.remove(&k)).collect()
    }

    /// Sets the permission bits of the regions inside `r` (call
    /// [`carve`](Self::carve) first); kind bits (IO, SHARED) stay.
    pub(crate) fn set_perms_in(&mut self, r: VaRange, perms: RegionFlags) {
        let kind_bits = RegionFlags::IO | RegionFlags::SHARED;
        for (_, v) in self.map.range_mut(r.start()..=r.last()) {
            v.flags = (v.flags & kind_bits) | perms;
        }
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }

    pub(crate) fn take_all(&mut self) -> Vec<Vma> {
        core::mem::take(&mut self.map).into_values().collect()
    }
}
