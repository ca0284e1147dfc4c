//! State shared by a process and every process forked from it: the
//! allocator, the zero page, and the map counts of anonymous memory.
//!
//! Why map counts: copy-on-write needs to know whether a private page is
//! mapped by anyone else. Anonymous memory comes in *folios* (a 4 KiB frame,
//! or a 2 MiB / 1 GiB chunk); a folio may be mapped whole by huge leaves, or
//! — after a 2 MiB leaf was split — page by page by 4 KiB leaves. A page is
//! exclusive (writable without a copy) only if exactly one leaf in all
//! address spaces covers it. A folio goes back to the allocator when no leaf
//! maps any part of it. Frames of files, driver objects and the zero page
//! are not counted here: their owners free them.

use crate::alloc::CountingAllocator;
use crate::phys::{SimPhys, PAGE};
use hmm_core::{Error, FrameAllocator, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

#[derive(Debug)]
struct Folio {
    order: u32,
    /// Leaves that map the whole folio at its own order.
    whole: u32,
    /// 4 KiB leaves mapping single pages of a huge folio (after a split).
    parts: HashMap<u64, u32>,
    parts_total: u32,
}

/// The allocator, the zero page and the anonymous-memory map counts.
pub(crate) struct Machine {
    pub(crate) alloc: Arc<CountingAllocator>,
    pub(crate) zero: u64,
    // Folio base address -> counts.
    book: Mutex<BTreeMap<u64, Folio>>,
}

impl Machine {
    /// Allocates the zero page.
    pub(crate) fn new(alloc: &Arc<CountingAllocator>) -> Result<Arc<Self>> {
        let zero = alloc.alloc_frame().ok_or(Error::NoMemory)?;
        alloc.phys().zero(zero, PAGE);
        Ok(Arc::new(Self { alloc: alloc.clone(), zero, book: Mutex::new(BTreeMap::new()) }))
    }

    pub(crate) fn phys(&self) -> &SimPhys {
        self.alloc.phys()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Folio>> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new, unregistered folio of `order` (contents poisoned: the caller
    /// zeroes or copies into it).
    pub(crate) fn alloc_folio(&self, order: u32) -> Result<u64> {
        let pa = if order == 0 { self.alloc.alloc_frame() } else { self.alloc.alloc_huge(order) };
        pa.ok_or(Error::NoMemory)
    }

    /// Frees a folio from [`alloc_folio`](Self::alloc_folio) that was never
    /// mapped.
    pub(crate) fn discard(&self, pa: u64, order: u32) {
        // SAFETY: the folio came from this allocator and was never mapped,
        // so nothing else refers to it.
        unsafe { self.alloc.free_huge(pa, order) };
    }

    /// Registers a freshly mapped folio: one leaf maps it whole.
    pub(crate) fn map_new(&self, pa: u64, order: u32) {
        let old = self.lock().insert(pa, Folio { order, whole: 1, parts: HashMap::new(), parts_total: 0 });
        assert!(old.is_none(), "folio {pa:#x} registered twice");
    }

    fn folio_of(book: &mut BTreeMap<u64, Folio>, pa: u64) -> (u64, &mut Folio) {
        let (&base, folio) = book.range_mut(..=pa).next_back().expect("frame is not anonymous memory");
        assert!(pa - base < PAGE << folio.order, "frame {pa:#x} is not anonymous memory");
        (base, folio)
    }

    /// One more leaf of `order` maps `pa`.
    pub(crate) fn get(&self, pa: u64, order: u32) {
        let mut book = self.lock();
        let (base, folio) = Self::folio_of(&mut book, pa);
        if order == folio.order {
            assert_eq!(base, pa, "misaligned leaf of a folio");
            folio.whole += 1;
        } else {
            assert_eq!(order, 0, "leaf order {order} inside a folio of order {}", folio.order);
            *folio.parts.entry(pa).or_insert(0) += 1;
            folio.parts_total += 1;
        }
    }

    /// A leaf of `order` mapping `pa` is gone (its entry already cleared and
    /// flushed); frees the folio when nothing maps it any more.
    pub(crate) fn put(&self, pa: u64, order: u32) {
        let free = {
            let mut book = self.lock();
            let (base, folio) = Self::folio_of(&mut book, pa);
            if order == folio.order {
                folio.whole = folio.whole.checked_sub(1).expect("folio map count underflow");
            } else {
                let n = folio.parts.get_mut(&pa).expect("page map count underflow");
                *n -= 1;
                if *n == 0 {
                    folio.parts.remove(&pa);
                }
                folio.parts_total -= 1;
            }
            if folio.whole == 0 && folio.parts_total == 0 {
                let order = folio.order;
                book.remove(&base);
                Some((base, order))
            } else {
                None
            }
        };
        if let Some((base, order)) = free {
            // SAFETY: no leaf in any address space maps any page of the
            // folio (its counts reached zero after the last entry was cleared
            // and flushed), so nothing uses it any more.
            unsafe { self.alloc.free_huge(base, order) };
        }
    }

    /// Whether the leaf of `order` at `pa` is the only mapping of every page
    /// it covers.
    pub(crate) fn exclusive(&self, pa: u64, order: u32) -> bool {
        let mut book = self.lock();
        let (_, folio) = Self::folio_of(&mut book, pa);
        if order == folio.order {
            folio.whole == 1 && folio.parts_total == 0
        } else {
            folio.whole == 0 && folio.parts.get(&pa) == Some(&1)
        }
    }

    /// A huge leaf mapping the whole folio at `pa` became `1 << order` small
    /// leaves of its pages.
    pub(crate) fn split(&self, pa: u64, order: u32) {
        let mut book = self.lock();
        let (base, folio) = Self::folio_of(&mut book, pa);
        assert!(
            base == pa && folio.order == order && folio.whole > 0,
            "split of a leaf that does not map a whole folio"
        );
        folio.whole -= 1;
        for i in 0..1u64 << order {
            *folio.parts.entry(pa + i * PAGE).or_insert(0) += 1;
        }
        folio.parts_total += 1 << order;
    }

    /// Whether `pa` lies in a registered anonymous folio.
    pub(crate) fn is_anon(&self, pa: u64) -> bool {
        let book = self.lock();
        book.range(..=pa).next_back().is_some_and(|(&base, f)| pa - base < PAGE << f.order)
    }

    /// Number of anonymous folios alive in this process family.
    pub(crate) fn folios(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: the last address space sharing this machine is gone, so
        // no table maps the zero page any more.
        unsafe { self.alloc.free_frame(self.zero) };
    }
}
