//! A process address space on the CPU's live tables: regions (VMAs), a
//! fault handler shared by CPU and device faults, and the changes that must
//! notify devices. This is the kernel side hmm-core plugs into
//! ([`hmm_core::AddressSpace`]), written once over the CPU's format and its
//! [`Cpu`] operations.
//!
//! The root copies the kernel's identity slots ([`Cpu::KERNEL_SLOTS`]);
//! user regions live from [`Cpu::USER_START`], in other root slots, as
//! user, non-global, never-executable pages. [`Process::enter`] loads the
//! root, and from then on every CPU access to a user address (the
//! kernel's, allowed to reach user pages) is translated by the MMU through
//! these entries; a page fault comes to [`Process::cpu_page_fault`].
//!
//! # Invalidation discipline (`change`)
//! Every change that removes, replaces or downgrades a user translation runs
//! `invalidate_range_start` -> change the entry (atomic) ->
//! [`Cpu::flush_tlb_page`] -> poison and free the old frame ->
//! `invalidate_range_end`. Replacing a valid entry's frame (COW) is
//! break-before-make, as Arm requires and RISC-V allows: clear, flush, then
//! store the new entry. Adding a translation where the entry was invalid
//! is not bracketed (nobody can hold a stale copy of it) and is followed by
//! [`Cpu::publish_new_entry`].
//!
//! # Copy-on-write
//! [`Process::write_protect`] makes pages read-only in a writable region, as
//! `fork` does to share them: the next write fault (CPU or device) copies
//! the page into a new frame and maps that one writable.
//!
//! # PROT_NONE hinting
//! [`Process::prot_none`] turns present pages into PROT_NONE entries
//! (hmm-core's `ProtNone` view), as Linux's NUMA balancing does: the next
//! access, CPU or device, faults, and the handler restores the leaf it kept.
//!
//! # Locks
//! `vm` (reader-writer, over the regions): read side for faults and
//! `AddressSpace::read_lock`, write side for region changes. `pt` (mutex):
//! every entry change, like Linux's page-table lock; never held across
//! `invalidate_range_start`. Table frames are never freed: the demo's one
//! process lives as long as the kernel.

mod change;
mod fault;

use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::notifier::FixedStore;
use hmm_core::sync::SpinWait;
use hmm_core::{AddressSpace, Error, NotifierRegistry, OffsetPhysMem, Region, RegionFlags, Result, VaRange};
use spin::{Mutex, RwLock, RwLockReadGuard};

use crate::Cpu;
use crate::memory::{self, Frames};
use crate::paging;

/// Page size.
pub const PAGE: u64 = 4096;
/// Most regions per process.
const MAX_REGIONS: usize = 4;

/// A 4 KiB-aligned range, validated for the format of `C`.
pub fn range<C: Cpu>(start: u64, len: u64) -> VaRange {
    VaRange::new::<<C::Format as PteFormat>::Geometry>(start, len).expect("page-aligned range of the CPU's format")
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
/// executable, not global; the CPU's memory type for user pages.
fn user_leaf<C: Cpu>(frame: u64, write: bool) -> u64 {
    let mut flags = LeafFlags::READ | LeafFlags::USER | LeafFlags::ACCESSED;
    if write {
        flags |= LeafFlags::WRITE | LeafFlags::DIRTY;
    }
    paging::leaf::<C::Format>(frame, 0, flags, C::USER_MEMORY_TYPE)
}

/// A user address space on CPU `C`. See the module docs.
pub struct Process<C: Cpu> {
    root: u64,
    frames: &'static Frames,
    phys: OffsetPhysMem,
    vm: RwLock<Vm>,
    pt: Mutex<()>,
    notifiers: NotifierRegistry<FixedStore<4>, SpinWait>,
    /// Set by [`Process::enter`]: the CPU runs this process's root.
    running: AtomicBool,
    /// Counters.
    pub stats: Stats,
    cpu: PhantomData<C>,
}

impl<C: Cpu> Process<C> {
    /// An empty process whose root shares the kernel slots of `kernel_root`.
    pub fn new(kernel_root: u64, frames: &'static Frames) -> Result<Self> {
        let root = memory::alloc_zeroed(frames).ok_or(Error::NoMemory)?;
        for &i in C::KERNEL_SLOTS {
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
            running: AtomicBool::new(false),
            stats: Stats::default(),
            cpu: PhantomData,
        })
    }

    /// Runs this (never dropped) process on the CPU: its root goes into the
    /// MMU, and page faults on user addresses come to its fault handler.
    pub fn enter(&'static self) {
        self.running.store(true, Ordering::SeqCst);
        // SAFETY: the root holds the kernel's identity slots, which map the
        // code, stack, frames and MMIO the kernel uses.
        unsafe { C::set_root(self.root) };
    }

    /// Adds an anonymous region; pages appear on first touch (demand-zero).
    pub fn mmap(&self, range: VaRange, flags: RegionFlags) -> Result<()> {
        if range.start() < C::USER_START || range.last() >= C::USER_END {
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

    /// The CPU translation of `va`: frame and writability, read from the
    /// live table with hmm-core's decoding.
    pub fn translate(&self, va: u64) -> Option<(u64, bool)> {
        C::Format::decode(self.raw(va)?, 0).user_frame()
    }

    /// The raw level-0 entry of `va`, if its tables exist.
    pub fn raw(&self, va: u64) -> Option<u64> {
        // SAFETY: our live root.
        let slot = unsafe { paging::slot::<C::Format>(self.root, va, None) }.ok()?;
        Some(slot.load(Ordering::Acquire))
    }

    /// Table frames under the user slots of the root (root excluded).
    pub fn table_frames(&self) -> usize {
        let top = paging::root_level::<C::Format>();
        let mut n = 0;
        for i in (0..<C::Format as PteFormat>::Geometry::entries(top)).filter(|i| !C::KERNEL_SLOTS.contains(i)) {
            // SAFETY: our live root and the tables linked below it, never
            // freed.
            let raw = unsafe { paging::entry(self.root, i) }.load(Ordering::Acquire);
            if let PteView::Table { frame, .. } = C::Format::decode(raw, top) {
                // SAFETY: as above.
                n += 1 + unsafe { paging::tables_below::<C::Format>(frame, top - 1) };
            }
        }
        n
    }
}

// SAFETY: (1) `root` is our live root in `C::Format`, identity mapped
// (`phys`); (2) table frames are never freed (a process lives for the whole
// run); (3) munmap, write_protect, prot_none and the COW replacement run
// `invalidate_range_start` before the entry changes and
// `invalidate_range_end` after, freeing old frames in between, after the
// start returned and `Cpu::flush_tlb_page`; (4) entries change by atomic
// stores and compare-exchanges only.
unsafe impl<C: Cpu> AddressSpace for Process<C> {
    type Format = C::Format;
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
