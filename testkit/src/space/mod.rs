//! The model kernel: one process address space with real page tables of a
//! CPU format `F` (x86_64 4-level by default) in simulated memory, regions of every kind HMM cares about, a
//! fault handler, the kernel-side mutations that must notify devices, and an
//! [`Oracle`] kept beside the tables.
//!
//! The locking and invalidation rules are documented on [`ModelSpace`].

mod book;
mod fault;
mod ops;
mod region;
mod table;

pub use region::RegionKind;
use table::user_end;

use crate::alloc::CountingAllocator;
use crate::file::SimFile;
use crate::oracle::{Backing, Oracle, OraclePage, OracleSpecial};
use crate::phys::{SimPhys, PAGE};
use crate::view::TableView;
use book::Machine;
use core::marker::PhantomData;
use core::ops::ControlFlow;
use core::sync::atomic::{AtomicU64, Ordering};
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_core::notifier::{Invalidation, VecStore};
use hmm_core::pt::{Pfn, Span};
use hmm_core::sync::SpinWait;
use hmm_core::{AddressSpace, Error, Event, FrameAllocator, NotifierRegistry, Region, Result, VaRange};
use region::{Regions, Vma};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A test hook called right before every `invalidate_range_start` the model
/// makes, with the range and event about to be invalidated.
///
/// It runs with the mmap lock held (for writing during map/unmap/protect/
/// clear/fork/release, for reading during a fault's copy-on-write) and
/// without the page-table lock, *before* any entry of the range changes: it
/// may read the tables through a [`TableView`] and will still see the old
/// entries. It must not lock the space (no `read_lock`, no mutation).
pub type Hook = Box<dyn Fn(VaRange, Event) + Send + Sync>;

/// What the regions lock protects.
#[derive(Debug, Default)]
pub(crate) struct Vm {
    pub(crate) regions: Regions,
    pub(crate) released: bool,
}

/// What the page-table lock protects (besides the table entries
/// themselves): the oracle.
#[derive(Debug, Default)]
pub(crate) struct Pt {
    pub(crate) oracle: Oracle,
}

/// Counters a test may read.
#[derive(Debug, Default)]
struct Stats {
    faults: AtomicU64,
    flushes: AtomicU64,
    invalidations: AtomicU64,
}

/// A model process address space: real page tables of CPU format `F` in a
/// [`SimPhys`], regions, a fault handler, kernel mutations that notify
/// devices, and an [`Oracle`] beside the tables.
///
/// # Formats
/// `F` defaults to x86_64 4-level paging; any format works whose geometry
/// has 4 KiB pages and 2 MiB / 1 GiB entries at levels 1 / 2 that may be
/// leaves, and which encodes what the model writes (permissive directories,
/// user leaves, PROT_NONE and software entries at levels 0..=2).
/// [`new_in`](Self::new_in) checks the geometry, and an entry the format
/// refuses to encode panics with the format's name (a test bug, never a
/// silent skip). Sizes, indices, the root level and the user half
/// ([`USER_END`](Self::USER_END)) all come from `F::Geometry`.
///
/// # Locks
/// - the *mmap lock* (`RwLock` over the regions): read side for faults, CPU
///   accesses and [`AddressSpace::read_lock`]; write side for every region or
///   table-structure change (map, unmap, protect, clear, fork, release).
///   Table frames are freed only with it held for writing, which is what
///   [`AddressSpace`]'s safety contract (2) asks.
/// - the *page-table lock* (`Mutex` over the oracle): every entry change,
///   including those a fault makes under the read side, like Linux's PTL.
/// - the frame book and the allocator have short internal locks below those.
///
/// Order: mmap lock -> page-table lock -> frame book -> allocator. Neither
/// the test hook nor `invalidate_range_start` is ever called with the
/// page-table lock held (callbacks take the driver lock, and a device
/// thread holding the driver lock must never be able to block us).
///
/// # Invalidation discipline
/// Every change that removes, replaces or downgrades a translation is done
/// as: hook -> `invalidate_range_start` -> page-table lock -> change entries
/// and the oracle -> flush -> free frames -> unlock -> `invalidate_range_end`.
/// Adding a translation, or upgrading one in place (same frame, more
/// permission), is not bracketed: a device can only be missing permission,
/// never hold a stale one.
pub struct ModelSpace<F: PteFormat = X86_64Level4> {
    machine: Arc<Machine>,
    // INVARIANT: allocated in `new`, zeroed, and freed only in `drop`, so it
    // is live for the whole lifetime of `self` (AddressSpace contract 1).
    root: u64,
    vm: RwLock<Vm>,
    pt: Mutex<Pt>,
    notifiers: NotifierRegistry<VecStore, SpinWait>,
    hook: RwLock<Option<Arc<Hook>>>,
    stats: Stats,
    _format: PhantomData<fn() -> F>,
}

/// The model's mmap read lock, as handed to hmm-core.
pub struct ModelReadGuard<'a, F: PteFormat = X86_64Level4> {
    space: &'a ModelSpace<F>,
    vm: RwLockReadGuard<'a, Vm>,
}

impl<F: PteFormat> core::fmt::Debug for ModelReadGuard<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ModelReadGuard").field("root", &format_args!("{:#x}", self.space.root)).finish()
    }
}

impl<F: PteFormat> core::fmt::Debug for ModelSpace<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ModelSpace").field("root", &format_args!("{:#x}", self.root)).finish_non_exhaustive()
    }
}

impl ModelSpace {
    /// An empty x86_64 4-level address space: allocates the root table (and
    /// the zero page, shared with every process forked from this one). For
    /// another format, [`ModelSpace::<F>::new_in`](Self::new_in).
    pub fn new(alloc: &Arc<CountingAllocator>) -> Result<Self> {
        Self::new_in(alloc)
    }
}

impl<F: PteFormat> ModelSpace<F> {
    /// One past the last user address of `F`: `2^(VA_BITS - 1)` if
    /// addresses are sign-extended, `2^VA_BITS` otherwise.
    pub const USER_END: u64 = user_end::<F>();

    /// An empty address space with tables of format `F`: allocates the root
    /// table (and the zero page, shared with every process forked from this
    /// one). Panics if the model cannot run on `F` (see the type's docs).
    pub fn new_in(alloc: &Arc<CountingAllocator>) -> Result<Self> {
        table::check_format::<F>();
        let machine = Machine::new(alloc)?;
        Self::with_machine(machine)
    }

    /// A page-aligned range of `F`'s address space; panics if invalid (for
    /// tests, where an invalid literal is a bug of the test).
    pub fn range(start: u64, len: u64) -> VaRange {
        VaRange::new::<F::Geometry>(start, len).unwrap_or_else(|e| panic!("bad range {start:#x}+{len:#x}: {e}"))
    }

    /// The whole user half, `0 .. USER_END`.
    pub fn user_range() -> VaRange {
        Self::range(0, Self::USER_END)
    }

    fn with_machine(machine: Arc<Machine>) -> Result<Self> {
        let root = machine.alloc.alloc_frame().ok_or(Error::NoMemory)?;
        machine.phys().zero(root, PAGE);
        Ok(Self {
            machine,
            root,
            vm: RwLock::new(Vm::default()),
            pt: Mutex::new(Pt::default()),
            notifiers: NotifierRegistry::new(),
            hook: RwLock::new(None),
            stats: Stats::default(),
            _format: PhantomData,
        })
    }

    /// The allocator behind this space.
    pub fn allocator(&self) -> &Arc<CountingAllocator> {
        &self.machine.alloc
    }

    /// The simulated memory (also `AddressSpace::phys`, but as an `Arc`).
    pub fn sim_phys(&self) -> &Arc<SimPhys> {
        self.machine.alloc.phys()
    }

    /// Installs (or removes, with `None`) the invalidation hook.
    pub fn set_hook(&self, hook: Option<Hook>) {
        *self.hook.write().unwrap_or_else(PoisonError::into_inner) = hook.map(Arc::new);
    }

    /// A lock-free reader of this space's tables (for hooks and device
    /// threads).
    pub fn table_view(&self) -> TableView<F> {
        TableView::new(self.sim_phys().clone(), self.root)
    }

    /// Calls to [`AddressSpace::handle_fault`] so far.
    pub fn handle_fault_calls(&self) -> u64 {
        self.stats.faults.load(Ordering::Relaxed)
    }

    /// TLB flushes the model performed (one per entry-removing step).
    pub fn flushes(&self) -> u64 {
        self.stats.flushes.load(Ordering::Relaxed)
    }

    /// `invalidate_range_start` calls the model made.
    pub fn invalidations(&self) -> u64 {
        self.stats.invalidations.load(Ordering::Relaxed)
    }

    /// Anonymous folios alive in this space's process family (this space,
    /// its parent and children).
    pub fn anon_folios(&self) -> usize {
        self.machine.folios()
    }

    /// Whether [`release`](Self::release) ran.
    pub fn is_released(&self) -> bool {
        self.vm_read().released
    }

    fn vm_read(&self) -> RwLockReadGuard<'_, Vm> {
        self.vm.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn vm_write(&self) -> RwLockWriteGuard<'_, Vm> {
        self.vm.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn pt_lock(&self) -> MutexGuard<'_, Pt> {
        self.pt.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn phys_ref(&self) -> &SimPhys {
        self.machine.phys()
    }

    fn check_guard(&self, guard: &ModelReadGuard<'_, F>) {
        assert!(core::ptr::eq(guard.space, self), "read guard of another address space");
    }

    /// Hook, then `invalidate_range_start` (blockable: cannot be refused).
    fn start_invalidation(&self, range: VaRange, event: Event) -> Invalidation {
        let hook = self.hook.read().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(hook) = hook {
            hook(range, event);
        }
        self.stats.invalidations.fetch_add(1, Ordering::Relaxed);
        self.notifiers.invalidate_range_start(range, event, true).expect("a blockable invalidation cannot be refused")
    }

    fn end_invalidation(&self, inv: Invalidation) {
        self.notifiers.invalidate_range_end(inv);
    }

    /// The step between clearing entries and freeing their frames. The host
    /// has no TLB for simulated tables; the count documents the order.
    fn flush_tlb(&self) {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// The regions, in address order.
    pub fn regions(&self) -> Vec<Region> {
        self.vm_read().regions.all().map(Vma::region::<F::Geometry>).collect()
    }

    /// A copy of the oracle.
    pub fn oracle(&self) -> Oracle {
        let _vm = self.vm_read();
        self.pt_lock().oracle.clone()
    }

    /// A copy of the oracle, for a caller already holding the read lock
    /// (taking it again could deadlock behind a waiting writer).
    pub fn oracle_under(&self, guard: &ModelReadGuard<'_, F>) -> Oracle {
        self.check_guard(guard);
        self.pt_lock().oracle.clone()
    }

    /// What the oracle says about the page containing `va`.
    pub fn translate(&self, va: u64) -> Option<OraclePage> {
        let _vm = self.vm_read();
        self.pt_lock().oracle.page(va)
    }

    /// The object (file, shared memory, driver pages) backing `va` and the
    /// page index in it, for object-backed regions.
    pub fn object_at(&self, va: u64) -> Option<(Arc<SimFile>, u64)> {
        let vm = self.vm_read();
        let v = vm.regions.at(va)?;
        v.object_page(va).map(|(o, i)| (o.clone(), i))
    }

    /// `hmm_core::pt::snapshot` of `range` under the read lock.
    pub fn snapshot(&self, range: VaRange) -> Vec<Pfn> {
        let _guard = self.read_lock();
        let mut out = vec![Pfn::NONE; range.pages(12) as usize];
        // SAFETY: `root` is live for the lifetime of `self` (INVARIANT on
        // `root`), and the read lock keeps every table reachable from it
        // allocated for the duration of the call.
        unsafe { hmm_core::pt::snapshot::<F, SimPhys>(self.phys_ref(), self.root, range, &mut out) }
            .expect("snapshot of a valid range");
        out
    }

    /// Walks the real tables with `hmm_core::pt::walk` and panics unless
    /// they agree with the oracle: every leaf at the same address, level,
    /// frame, write permission and PROT_NONE state, user-accessible, every
    /// software entry where the oracle has it, nothing where the oracle has
    /// nothing. Also checks each leaf's owner: anonymous
    /// frames are counted folios, zero-page leaves map the zero page, object
    /// leaves map the region's object page.
    pub fn check_tables(&self) {
        let vm = self.vm_read();
        let pt = self.pt_lock();
        let oracle = &pt.oracle;
        let user = Self::user_range();
        let mut seen = 0usize;
        let mut specials = 0usize;
        let mut visit = |span: Span, entry: PteView| -> ControlFlow<()> {
            let (frame, flags, prot_none) = match entry {
                PteView::Absent => return ControlFlow::Continue(()),
                PteView::Special(s) => {
                    let at = span.entry_base();
                    let want = OracleSpecial { entry: s, order: span.shift - 12 };
                    assert_eq!(oracle.specials().get(&at), Some(&want), "software entry at {at:#x}");
                    specials += 1;
                    return ControlFlow::Continue(());
                }
                PteView::Leaf { frame, flags } => (frame, flags, false),
                PteView::ProtNone { frame, flags } => (frame, flags, true),
                other => panic!("tables: unexpected entry {other:?} at {:#x}", span.range.start()),
            };
            let at = span.entry_base();
            let order = span.shift - 12;
            let leaf = oracle.leaves().get(&at).unwrap_or_else(|| {
                panic!("tables map {at:#x} (frame {frame:#x}, order {order}) but the oracle has nothing there")
            });
            assert_eq!((leaf.frame, leaf.order), (frame, order), "tables and oracle disagree on the leaf at {at:#x}");
            assert_eq!(leaf.prot_none, prot_none, "PROT_NONE state differs at {at:#x}");
            assert_eq!(leaf.write, flags.contains(LeafFlags::WRITE), "write permission differs at {at:#x}");
            assert!(flags.contains(LeafFlags::USER), "leaf at {at:#x} is not user-accessible");
            seen += 1;
            ControlFlow::Continue(())
        };
        // SAFETY: `root` is live (INVARIANT on `root`) and the read lock
        // keeps every table reachable from it allocated during the walk.
        let _ = unsafe { hmm_core::pt::walk::<F, SimPhys, _>(self.phys_ref(), self.root, user, &mut visit) }
            .expect("walk of the user half");
        assert_eq!(seen, oracle.len(), "the oracle has leaves the tables do not map");
        assert_eq!(specials, oracle.specials().len(), "the oracle has software entries the tables lack");
        for &at in oracle.specials().keys() {
            assert!(
                vm.regions.at(at).is_some_and(Vma::is_private),
                "software entry at {at:#x} outside a private region"
            );
        }
        for (&at, leaf) in oracle.leaves() {
            let v = vm.regions.at(at).unwrap_or_else(|| panic!("leaf at {at:#x} outside every region"));
            match leaf.backing {
                Backing::Anon => assert!(self.machine.is_anon(leaf.frame), "anon leaf {at:#x} not in a folio"),
                Backing::Zero => assert_eq!(leaf.frame, self.machine.zero, "zero leaf {at:#x}"),
                Backing::Object | Backing::Io => {
                    let (obj, idx) = v.object_page(at).expect("object leaf in an object region");
                    assert_eq!(obj.resident_page(idx), Some(leaf.frame), "object leaf {at:#x} maps a foreign frame");
                }
            }
            assert_eq!(leaf.zero, leaf.backing == Backing::Zero);
        }
    }
}

/// A page-aligned range of the x86_64 4-level user space; panics if invalid
/// (for tests, where an invalid literal is a bug of the test). For another
/// format, [`ModelSpace::<F>::range`](ModelSpace::range).
pub fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(start, len).unwrap_or_else(|e| panic!("bad range {start:#x}+{len:#x}: {e}"))
}

// The contract of `AddressSpace`, point by point:
// 1. `root` is allocated in `new`, zeroed, and freed only in `Drop`, so it is
//    a live root of format `F` reachable through `phys()` for the lifetime of
//    `self`.
// 2. Table frames are freed only by `prune` (from `map`), `free_all_below`
//    (from `release`) and `Prepared::abort` (frames never linked); the first
//    two run with the mmap lock held for writing, which cannot coexist with
//    a `ModelReadGuard`. Splits only add tables; faults never free one.
// 3. unmap / clear / protect / fork / release and the copy-on-write break of
//    a fault call `invalidate_range_start` (through `start_invalidation`)
//    before changing any entry of the range and `invalidate_range_end`
//    after; frames are freed only after the entry is cleared, i.e. after
//    `invalidate_range_start` returned. Entries are only added or upgraded
//    in place (same frame, more permission) without it; splits keep every
//    translation.
// 4. Every entry write is a Release store to the entry's `AtomicU64`
//    (`table::Slot::store` and friends).
// SAFETY: 1-4 just above.
unsafe impl<F: PteFormat> AddressSpace for ModelSpace<F> {
    type Format = F;
    type Phys = SimPhys;
    type Store = VecStore;
    type Wait = SpinWait;
    type ReadGuard<'a>
        = ModelReadGuard<'a, F>
    where
        Self: 'a;

    fn phys(&self) -> &SimPhys {
        self.phys_ref()
    }

    fn root(&self) -> u64 {
        self.root
    }

    fn notifiers(&self) -> &NotifierRegistry<VecStore, SpinWait> {
        &self.notifiers
    }

    fn read_lock(&self) -> ModelReadGuard<'_, F> {
        ModelReadGuard { space: self, vm: self.vm_read() }
    }

    fn region(&self, guard: &ModelReadGuard<'_, F>, va: u64) -> Option<Region> {
        self.check_guard(guard);
        guard.vm.regions.at(va).map(Vma::region::<F::Geometry>)
    }

    fn handle_fault(&self, guard: &ModelReadGuard<'_, F>, range: VaRange, write: bool) -> Result<()> {
        self.check_guard(guard);
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        self.fault_range(&guard.vm, range, write, false)
    }

    fn zero_frame(&self) -> Option<u64> {
        Some(self.machine.zero)
    }
}

impl<F: PteFormat> Drop for ModelSpace<F> {
    fn drop(&mut self) {
        if !self.is_released() {
            self.release();
        }
        // SAFETY: `root` came from the allocator in `new`; `self` is going
        // away and `release` emptied the table, so nothing uses it.
        unsafe { self.machine.alloc.free_frame(self.root) };
    }
}
