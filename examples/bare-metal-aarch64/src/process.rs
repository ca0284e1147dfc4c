//! A process address space on live VMSAv8-64 tables: regions (VMAs), a
//! fault handler shared by CPU and device faults, and the changes that must
//! notify devices. This is the kernel side hmm-core plugs into
//! ([`hmm_core::AddressSpace`]).
//!
//! The root links the kernel's identity table ([`paging::KERNEL_SLOTS`]);
//! user regions live in other root slots, as user (AP\[1\] = 1),
//! non-global, never-executable pages. [`Process::enter`] loads the root
//! into `TTBR0_EL1`, and from then on every CPU access to a user address
//! (the kernel's, at EL1 with PAN clear) is translated by the MMU through
//! these entries; a data abort comes to [`cpu_page_fault`].
//!
//! # Invalidation discipline
//! Every change that removes, replaces or downgrades a user translation runs
//! `invalidate_range_start` -> change the entry (atomic) -> `dsb ishst;
//! tlbi vae1is; dsb ish; isb` -> poison and free the old frame ->
//! `invalidate_range_end`. Replacing a valid entry's frame (COW) is
//! break-before-make, as Arm requires: clear, invalidate the TLB, then
//! store the new entry. Adding a translation where the entry was invalid
//! is not bracketed (nobody can hold a stale copy of it) and needs only
//! `dsb ishst; isb`: Arm TLBs never cache an entry that faulted.
//!
//! # Copy-on-write
//! [`Process::write_protect`] makes pages read-only in a writable region, as
//! `fork` does to share them: the next write fault (CPU or device) copies
//! the page into a new frame and maps that one writable.
//!
//! # PROT_NONE hinting
//! [`Process::prot_none`] turns present pages of a readable region into
//! PROT_NONE entries (hmm-core's `ProtNone` view: the leaf with the valid
//! bit clear), as Linux's NUMA balancing does: the next access, CPU or
//! device, faults, and the handler restores the leaf it kept.
//!
//! # Locks
//! `vm` (reader-writer, over the regions): read side for faults and
//! `AddressSpace::read_lock`, write side for region changes. `pt` (mutex):
//! every entry change, like Linux's page-table lock; never held across
//! `invalidate_range_start`. Table frames are never freed: the demo's one
//! process lives as long as the kernel.

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use hmm_core::arch::aarch64::Aarch64Va48;
use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_core::notifier::FixedStore;
use hmm_core::sync::SpinWait;
use hmm_core::{AddressSpace, Error, Event, NotifierRegistry, OffsetPhysMem, Region, RegionFlags, Result, VaRange};
use spin::{Mutex, RwLock, RwLockReadGuard};

use crate::memory::{self, Frames};
use crate::{paging, sysreg};

/// Page size.
pub const PAGE: u64 = 4096;
/// First user address: root slot 1 (512 GiB), the one after the kernel's.
pub const USER_START: u64 = 1 << 39;
/// End of the 48-bit TTBR0 half.
pub const USER_END: u64 = 1 << 48;
/// Most regions per process.
const MAX_REGIONS: usize = 4;

/// A 4 KiB-aligned range, validated for the 48-bit format.
pub fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<Aarch64Va48>(start, len).expect("page-aligned 48-bit range")
}

/// Every page address of `range`.
pub fn pages(range: VaRange) -> impl Iterator<Item = u64> {
    (range.start()..=range.last()).step_by(PAGE as usize)
}

/// The regions, behind the mmap lock.
#[derive(Debug, Default)]
pub struct Vm {
    regions: [Option<Region>; MAX_REGIONS],
}

impl Vm {
    fn find(&self, va: u64) -> Option<Region> {
        self.regions.iter().flatten().find(|r| r.range.contains_addr(va)).copied()
    }
}

/// Counters of one process.
#[derive(Debug, Default)]
pub struct Stats {
    /// CPU page faults resolved.
    pub cpu_faults: AtomicU64,
    /// Frames mapped zeroed by faults.
    pub demand_zero: AtomicU64,
    /// Write faults that copied a write-protected page.
    pub cow_copies: AtomicU64,
    /// Faults that restored a PROT_NONE (hint) entry.
    pub hint_faults: AtomicU64,
    /// `invalidate_range_start` calls.
    pub invalidations: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A user page: readable, user, accessed (and writable, dirty), not
/// executable, not global; normal memory.
fn user_leaf(frame: u64, write: bool) -> u64 {
    let mut flags = LeafFlags::READ | LeafFlags::USER | LeafFlags::ACCESSED;
    if write {
        flags |= LeafFlags::WRITE | LeafFlags::DIRTY;
    }
    paging::leaf(frame, 0, flags, paging::NORMAL)
}

/// `raw` re-encoded from `view`, keeping the bits the view does not carry
/// (memory type, software bits): the format's `opaque_bits` merge, for
/// rewrites of the same kind of entry.
fn rewrite(raw: u64, view: &PteView) -> Option<u64> {
    let opaque = Aarch64Va48::opaque_bits(raw, 0);
    Some(Aarch64Va48::encode(view, 0).ok()? & !opaque | raw & opaque)
}

/// A user address space. See the module docs.
pub struct Process {
    root: u64,
    frames: &'static Frames,
    phys: OffsetPhysMem,
    vm: RwLock<Vm>,
    pt: Mutex<()>,
    notifiers: NotifierRegistry<FixedStore<4>, SpinWait>,
    /// Counters.
    pub stats: Stats,
}

impl Process {
    /// An empty process whose root shares the kernel slots of `kernel_root`.
    pub fn new(kernel_root: u64, frames: &'static Frames) -> Result<Self> {
        let root = memory::alloc_zeroed(frames).ok_or(Error::NoMemory)?;
        for i in paging::KERNEL_SLOTS {
            // SAFETY: both are live roots (the kernel's is never freed), i < 512.
            unsafe {
                paging::entry(root, i).store(paging::entry(kernel_root, i).load(Ordering::Relaxed), Ordering::Relaxed)
            };
        }
        Ok(Self {
            root,
            frames,
            phys: memory::phys(),
            vm: RwLock::new(Vm::default()),
            pt: Mutex::new(()),
            notifiers: NotifierRegistry::new(),
            stats: Stats::default(),
        })
    }

    /// Runs this (never dropped) process on the CPU: its root goes into
    /// `TTBR0_EL1`, and data aborts on user addresses come to its fault
    /// handler.
    pub fn enter(&'static self) {
        RUNNING.store(ptr::from_ref(self).cast_mut(), Ordering::SeqCst);
        // SAFETY: the root links the kernel's identity table, which maps
        // the code, stack, frames and MMIO the kernel uses.
        unsafe { sysreg::set_ttbr0(self.root) };
    }

    /// Adds an anonymous region; pages appear on first touch (demand-zero).
    pub fn mmap(&self, range: VaRange, flags: RegionFlags) -> Result<()> {
        if range.start() < USER_START || range.last() >= USER_END {
            return Err(Error::OutOfRange);
        }
        let mut vm = self.vm.write();
        if vm.regions.iter().flatten().any(|r| r.range.overlaps(&range)) {
            return Err(Error::Busy);
        }
        let slot = vm.regions.iter_mut().find(|s| s.is_none()).ok_or(Error::Capacity)?;
        *slot = Some(Region { range, flags });
        Ok(())
    }

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
        self.change(range, Event::ProtectionPage, |raw| match Aarch64Va48::decode(raw, 0) {
            PteView::Leaf { frame, flags } if flags.contains(LeafFlags::WRITE) => {
                rewrite(raw, &PteView::Leaf { frame, flags: flags - LeafFlags::WRITE - LeafFlags::DIRTY })
            }
            _ => None,
        })
    }

    /// Turns the present pages of `range` into PROT_NONE entries that keep
    /// frame and flags (NUMA hinting); the next access faults and restores
    /// them. Returns the entries changed.
    pub fn prot_none(&self, range: VaRange) -> Result<u64> {
        let _vm = self.vm.write();
        self.change(range, Event::ProtectionVma, |raw| match Aarch64Va48::decode(raw, 0) {
            // Leaf to ProtNone changes the kind: only the memory type
            // carries over (a leaf's opaque bits overlap the kind field).
            PteView::Leaf { frame, flags } => {
                Some(Aarch64Va48::encode(&PteView::ProtNone { frame, flags }, 0).ok()? | raw & paging::MEMORY_TYPE)
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
            let Ok(slot) = (unsafe { paging::slot(self.root, va, None) }) else { continue };
            let _pt = self.pt.lock();
            let raw = slot.load(Ordering::Acquire);
            let Some(value) = new(raw) else { continue };
            slot.store(value, Ordering::Release);
            sysreg::flush_page(va);
            if value == 0
                && let PteView::Leaf { frame, .. } = Aarch64Va48::decode(raw, 0)
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

    /// The CPU translation of `va`: frame and writability, read from the
    /// live table with hmm-core's decoding.
    pub fn translate(&self, va: u64) -> Option<(u64, bool)> {
        readable_user_page(Aarch64Va48::decode(self.raw(va)?, 0))
    }

    /// The raw level-0 entry of `va`, if its tables exist.
    pub fn raw(&self, va: u64) -> Option<u64> {
        // SAFETY: our live root.
        let slot = unsafe { paging::slot(self.root, va, None) }.ok()?;
        Some(slot.load(Ordering::Acquire))
    }

    /// Table frames under the user slots of the root (root excluded).
    pub fn table_frames(&self) -> usize {
        let mut n = 0;
        for i in (0..512).filter(|i| !paging::KERNEL_SLOTS.contains(i)) {
            // SAFETY: our live root and the tables linked below it.
            let raw = unsafe { paging::entry(self.root, i) }.load(Ordering::Acquire);
            if let PteView::Table { frame, .. } = Aarch64Va48::decode(raw, paging::ROOT_LEVEL) {
                n += 1 + Self::tables_below(frame, paging::ROOT_LEVEL - 1);
            }
        }
        n
    }

    /// Table frames linked below the level-`level` table `table`.
    fn tables_below(table: u64, level: usize) -> usize {
        if level == 0 {
            return 0;
        }
        (0..512)
            // SAFETY: a live table of our root; tables are never freed.
            .map(|j| Aarch64Va48::decode(unsafe { paging::entry(table, j) }.load(Ordering::Acquire), level))
            .map(|v| if let PteView::Table { frame, .. } = v { 1 + Self::tables_below(frame, level - 1) } else { 0 })
            .sum()
    }

    /// Resolves one page of `region` (see `handle_fault`).
    fn fault_page(&self, region: &Region, va: u64, write: bool) -> Result<()> {
        let writable = region.flags.contains(RegionFlags::WRITE);
        // SAFETY: our live root; tables are never freed.
        let slot = unsafe { paging::slot(self.root, va, Some(self.frames)) }?;
        let pt = self.pt.lock();
        let mut raw = slot.load(Ordering::Acquire);
        let mut restored = false;
        match Aarch64Va48::decode(raw, 0) {
            PteView::Absent => {
                let frame = memory::alloc_zeroed(self.frames).ok_or(Error::NoMemory)?;
                slot.store(user_leaf(frame, writable), Ordering::Release);
                sysreg::publish_new_entry();
                bump(&self.stats.demand_zero);
                return Ok(());
            }
            PteView::ProtNone { frame, flags } => {
                // A hint fault: the leaf comes back as it was (the entry
                // was invalid, so no TLB holds it).
                let leaf = Aarch64Va48::encode(&PteView::Leaf { frame, flags }, 0)? | raw & paging::MEMORY_TYPE;
                slot.store(leaf, Ordering::Release);
                sysreg::publish_new_entry();
                bump(&self.stats.hint_faults);
                (raw, restored) = (leaf, true);
            }
            _ => {}
        }
        let old = match Aarch64Va48::decode(raw, 0) {
            PteView::Leaf { flags, .. } if !write || flags.contains(LeafFlags::WRITE) => {
                if !restored {
                    // Spurious: a stale TLB entry (Arm may keep the one
                    // that faulted until invalidated); drop it.
                    sysreg::flush_page(va);
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
        let inv = self.notifiers.invalidate_range_start(range(va, PAGE), Event::ProtectionPage, true)?;
        bump(&self.stats.invalidations);
        let swapped = {
            let _pt = self.pt.lock();
            // Break-before-make: the frame of a valid entry changes, so the
            // entry goes invalid and out of every TLB before the new one.
            let broken = slot.compare_exchange(raw, 0, Ordering::AcqRel, Ordering::Acquire).is_ok();
            if broken {
                sysreg::flush_page(va);
                slot.store(user_leaf(new, true), Ordering::Release);
                sysreg::publish_new_entry();
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

// SAFETY: (1) `root` is our live 48-bit root, identity mapped (`phys`);
// (2) table frames are never freed (a process lives for the whole run);
// (3) munmap, write_protect, prot_none and the COW replacement run
// `invalidate_range_start` before the entry changes and
// `invalidate_range_end` after, freeing old frames in between, after the
// start returned and `tlbi vae1is`; (4) entries change by atomic stores and
// compare-exchanges only.
unsafe impl AddressSpace for Process {
    type Format = Aarch64Va48;
    type Phys = OffsetPhysMem;
    type Store = FixedStore<4>;
    type Wait = SpinWait;
    type ReadGuard<'a> = RwLockReadGuard<'a, Vm>;

    fn phys(&self) -> &OffsetPhysMem {
        &self.phys
    }

    fn root(&self) -> u64 {
        self.root
    }

    fn notifiers(&self) -> &NotifierRegistry<FixedStore<4>, SpinWait> {
        &self.notifiers
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Vm> {
        self.vm.read()
    }

    fn region<'g>(&'g self, guard: &RwLockReadGuard<'g, Vm>, va: u64) -> Option<Region> {
        guard.find(va)
    }

    fn handle_fault<'g>(&'g self, guard: &RwLockReadGuard<'g, Vm>, range: VaRange, write: bool) -> Result<()> {
        let region = guard.find(range.start()).filter(|r| r.range.contains(&range)).ok_or(Error::Fault)?;
        if write && !region.flags.contains(RegionFlags::WRITE) {
            return Err(Error::Perm);
        }
        pages(range).try_for_each(|va| self.fault_page(&region, va, write))
    }
}

/// The process the CPU runs (null: none), for the trap handler.
static RUNNING: AtomicPtr<Process> = AtomicPtr::new(ptr::null_mut());

/// Resolves a CPU page fault at `va` through the running process's fault
/// handler, under the mmap read lock. False if it cannot (no process, not a
/// user address, no region, write to a read-only region).
pub fn cpu_page_fault(va: u64, write: bool) -> bool {
    let process = RUNNING.load(Ordering::SeqCst);
    if process.is_null() || !(USER_START..USER_END).contains(&va) {
        return false;
    }
    // SAFETY: RUNNING holds a `&'static Process` (set by `enter`).
    let process = unsafe { &*process };
    let guard = process.vm.read();
    let resolved = process.handle_fault(&guard, range(va & !(PAGE - 1), PAGE), write).is_ok();
    if resolved {
        bump(&process.stats.cpu_faults);
    }
    resolved
}

/// Frame and writability of a user page a device may read (`user_page` is
/// only the walk's shortcut: it may leave rare pages to `decode`).
fn readable_user_page(view: PteView) -> Option<(u64, bool)> {
    match view {
        PteView::Leaf { frame, flags } if flags.contains(LeafFlags::READ | LeafFlags::USER) => {
            Some((frame, flags.contains(LeafFlags::WRITE)))
        }
        _ => None,
    }
}
