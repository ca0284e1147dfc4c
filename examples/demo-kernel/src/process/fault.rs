//! The fault handler CPU and device faults share: demand-zero, PROT_NONE
//! hint restores and copy-on-write (see the module docs of [`super`]).

use core::sync::atomic::Ordering;

use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_core::{AddressSpace, Error, Event, Region, RegionFlags, Result};

use super::{PAGE, Process, bump, range, user_leaf};
use crate::memory;
use crate::{Cpu, paging};

impl<C: Cpu> Process<C> {
    /// Resolves a CPU page fault at `va` through the fault handler, under
    /// the mmap read lock. False if it cannot (process not entered, not a
    /// user address, no region, write to a read-only region).
    pub fn cpu_page_fault(&self, va: u64, write: bool) -> bool {
        if !self.running.load(Ordering::SeqCst) || !(C::USER_START..C::USER_END).contains(&va) {
            return false;
        }
        let guard = self.vm.read();
        let resolved = self.handle_fault(&guard, range::<C>(va & !(PAGE - 1), PAGE), write).is_ok();
        if resolved {
            bump(&self.stats.cpu_faults);
        }
        resolved
    }

    /// Resolves one page of `region` (see `handle_fault`).
    pub(super) fn fault_page(&self, region: &Region, va: u64, write: bool) -> Result<()> {
        let writable = region.flags.contains(RegionFlags::WRITE);
        // SAFETY: our live root; tables are never freed.
        let slot = unsafe { paging::slot::<C::Format>(self.root, va, Some(self.frames)) }?;
        let pt = self.pt.lock();
        let mut raw = slot.load(Ordering::Acquire);
        let mut restored = false;
        match C::Format::decode(raw, 0) {
            PteView::Absent => {
                let frame = memory::alloc_zeroed(self.frames).ok_or(Error::NoMemory)?;
                slot.store(user_leaf::<C>(frame, writable), Ordering::Release);
                C::publish_new_entry(va);
                bump(&self.stats.demand_zero);
                return Ok(());
            }
            PteView::ProtNone { frame, flags } => {
                // A hint fault: the leaf comes back as it was (the entry
                // was invalid, so no TLB holds it).
                let leaf = C::Format::encode(&PteView::Leaf { frame, flags }, 0)? | raw & C::MEMORY_TYPE_MASK;
                slot.store(leaf, Ordering::Release);
                C::publish_new_entry(va);
                bump(&self.stats.hint_faults);
                (raw, restored) = (leaf, true);
            }
            _ => {}
        }
        let old = match C::Format::decode(raw, 0) {
            PteView::Leaf { flags, .. } if !write || flags.contains(LeafFlags::WRITE) => {
                if !restored {
                    C::spurious_fault(va);
                }
                return Ok(());
            }
            PteView::Leaf { frame, .. } => frame,
            _ => return Err(Error::Fault),
        };
        // Copy-on-write: a new frame with the old contents replaces the old.
        // SAFETY: `old` stays allocated while the page-table lock is held:
        // it is freed only by whoever replaces this entry, under that lock.
        let new = unsafe { memory::alloc_copy(self.frames, old) }.ok_or(Error::NoMemory)?;
        drop(pt);
        let inv = self.notifiers.invalidate_range_start(range::<C>(va, PAGE), Event::ProtectionPage, true)?;
        bump(&self.stats.invalidations);
        let swapped = {
            let _pt = self.pt.lock();
            // Break-before-make: the frame of a valid entry changes, so the
            // entry goes invalid and out of every TLB before the new one.
            let broken = slot.compare_exchange(raw, 0, Ordering::AcqRel, Ordering::Acquire).is_ok();
            if broken {
                C::flush_tlb_page(va);
                slot.store(user_leaf::<C>(new, true), Ordering::Release);
                C::publish_new_entry(va);
            }
            broken
        };
        // SAFETY: the loser of a race frees its copy; the winner frees the
        // old frame, whose translation is invalidated and flushed.
        unsafe { memory::free(self.frames, if swapped { old } else { new }) };
        self.notifiers.invalidate_range_end(inv);
        if swapped {
            bump(&self.stats.cow_copies);
        }
        Ok(())
    }
}
