//! The changes that remove, downgrade or hide live user translations, each
//! under an invalidation (see the module docs of [`super`]).

use core::sync::atomic::Ordering;

use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_core::{Error, Event, Result, VaRange};

use super::{Process, bump, pages};
use crate::memory;
use crate::{Cpu, paging};

/// `raw` re-encoded from `view`, keeping the bits the view does not carry
/// (memory type, software bits): the format's `opaque_bits` merge, for
/// rewrites of the same kind of entry.
fn rewrite<F: PteFormat>(raw: u64, view: &PteView) -> Option<u64> {
    let opaque = F::opaque_bits(raw, 0);
    Some(F::encode(view, 0).ok()? & !opaque | raw & opaque)
}

impl<C: Cpu> Process<C> {
    /// Removes the region covering exactly `range`: invalidates, clears the
    /// entries, flushes the TLB, frees the frames. Returns the pages freed.
    pub fn munmap(&self, range: VaRange) -> Result<u64> {
        let mut vm = self.vm.write();
        let slot = vm.regions.iter_mut().find(|s| s.is_some_and(|r| r.range == range)).ok_or(Error::Fault)?;
        *slot = None;
        self.change(range, Event::Unmap, |raw| (raw != 0).then_some(0))
    }

    /// Makes the present pages of `range` read-only (copy-on-write).
    /// Returns the entries changed.
    pub fn write_protect(&self, range: VaRange) -> Result<u64> {
        let _vm = self.vm.write();
        self.change(range, Event::ProtectionPage, |raw| match C::Format::decode(raw, 0) {
            PteView::Leaf { frame, flags } if flags.contains(LeafFlags::WRITE) => {
                rewrite::<C::Format>(raw, &PteView::Leaf { frame, flags: flags - LeafFlags::WRITE - LeafFlags::DIRTY })
            }
            _ => None,
        })
    }

    /// Turns the present pages of `range` into PROT_NONE entries that keep
    /// frame and flags (NUMA hinting); the next access faults and restores
    /// them. Returns the entries changed.
    pub fn prot_none(&self, range: VaRange) -> Result<u64> {
        let _vm = self.vm.write();
        self.change(range, Event::ProtectionVma, |raw| match C::Format::decode(raw, 0) {
            // Leaf to ProtNone changes the kind: only the memory type
            // carries over (a leaf's opaque bits may overlap the kind field).
            PteView::Leaf { frame, flags } => {
                Some(C::Format::encode(&PteView::ProtNone { frame, flags }, 0).ok()? | raw & C::MEMORY_TYPE_MASK)
            }
            _ => None,
        })
    }

    /// Rewrites the entries of `range` for which `new(raw)` says so, under
    /// an invalidation; frees the frames of entries cleared to 0.
    fn change(&self, range: VaRange, event: Event, new: impl Fn(u64) -> Option<u64>) -> Result<u64> {
        let inv = self.notifiers.invalidate_range_start(range, event, true)?;
        bump(&self.stats.invalidations);
        let mut changed = 0;
        for va in pages(range) {
            // SAFETY: our live root; tables are never freed.
            let Ok(slot) = (unsafe { paging::slot::<C::Format>(self.root, va, None) }) else { continue };
            let _pt = self.pt.lock();
            let raw = slot.load(Ordering::Acquire);
            let Some(value) = new(raw) else { continue };
            slot.store(value, Ordering::Release);
            C::flush_tlb_page(va);
            if value == 0
                && let PteView::Leaf { frame, .. } = C::Format::decode(raw, 0)
            {
                // SAFETY: the entry held our only reference; the
                // invalidation started and the TLB entry is gone.
                unsafe { memory::free(self.frames, frame) };
            }
            changed += 1;
        }
        self.notifiers.invalidate_range_end(inv);
        Ok(changed)
    }
}
