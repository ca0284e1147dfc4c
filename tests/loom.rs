//! Loom model checking of the HMM coherence protocol.
//!
//! Quick run (CI), about 20 s on two cores (`m6_walker_vs_prune_and_refault`
//! is most of it):
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 cargo test --release --test loom`
//! Long run: the same with `LOOM_MAX_PREEMPTIONS=3`, about 90 s. Add `-- --nocapture` to
//! see the number of explored executions and the time of each model, and
//! set `LOOM_PROGRESS=1` to see a long model's progress.
//! `m2_two_zaps_and_fault` runs at preemption bound 1 whatever
//! `LOOM_MAX_PREEMPTIONS` says (see [`M2_MAX_PREEMPTIONS`]).
//! The hmm-core issues these models found are fixed; every model runs.
//!
//! Models: (1) a device fault racing munmap / a COW-style remap / munmap of a
//! hole / a MADV_DONTNEED-style zap; (2) a fault racing two overlapping
//! zaps; (3) notifier insert and remove during an invalidation, and a mirror
//! registering while a zap runs; (4) `Mirror::unregister`, drop and
//! `NotifierRegistry::release` racing a fault or an unmap; (5) misuse of
//! registration: two `Mirror::register` at once, `register` racing
//! `unregister`; (6) a lock-free device walker (`Mirror::translate` in a
//! loop, a device's TLB-miss path) racing a fault that builds the mirror's
//! directories, an unmap that prunes them, a zap that prunes them followed
//! by a fault that builds them again from the freed frames, and
//! `unregister`; plus the `WalkGate` grace period on its own, and the same
//! without the grace period, which must be reported; (0) checks of the
//! entry model itself.
//!
//! Under `--cfg loom` the registry, the intervals, the mirror's update lock
//! and `SpinWait` are loom-modelled (see `src/sync/shim.rs`). The kernel here
//! is a minimal one built for loom: a heap arena as physical memory with real
//! x86_64 4-level tables, one region, a `loom::sync::RwLock` as the mmap lock,
//! a `loom::sync::Mutex` as the page-table lock and as the frame allocator.
//!
//! Page-table entries are loom-modelled too (`hmm_core::sync::loom_pte`), and
//! the kernel model is no stronger than hardware: the kernel's tables are
//! `Entries::Atomic`, each entry a loom atomic that hmm-core's walker and the
//! kernel access through the same shadow. The kernel writes a PTE with a
//! plain (`Relaxed`) store under its page-table lock and reads its own PTEs
//! with plain loads; the only ordering an entry change gets is the lock's
//! release and the kernel's own synchronisation around it (the mmap lock, the
//! notifier calls). So a walk can read an entry the kernel has already
//! changed and whose frame it has freed, unless hmm-core's protocol orders
//! the walk after the change: a fault that maps pages while an overlapping
//! invalidation runs (the check of `NotifierRegistry`'s running ranges
//! under the update lock removed) is caught by `m1_fault_vs_zap`,
//! `m2_two_zaps_and_fault` and `m3_register_during_zap` ("mirror maps freed
//! frame"); a model that read every entry as sequentially consistent behind
//! an acquire RMW let such weakenings pass. The
//! mirror table's frames (from the kernel's frame allocator) are
//! `Entries::Atomic` as well: hmm-core writes them under the mirror's update
//! lock, but device walkers (`Mirror::translate`) read them with no lock at
//! all, inside a `WalkGate`. Freed frames are poisoned and fresh ones zeroed
//! through `loom_pte::fill`, so entries read after that see the new bytes,
//! and an access racing the poisoning is a loom causality violation: a
//! walker still reading a directory the mirror unlinked and freed without
//! waiting for it (`WalkGate::synchronize`) is reported.
//!
//! Observers (which frames the kernel freed, what the device maps, flags set
//! after a call returned) are loom atomics used with `Relaxed` only: loom
//! sees them, so its partial-order reduction explores the orders the checks
//! depend on (a plain atomic would be invisible to it), yet they add no
//! happens-before edge that could hide a missing synchronisation in the code
//! under test. A `Relaxed` load may return any value the memory model allows,
//! so "the device still maps the frame the kernel frees" fires exactly when
//! the device's unmapping does not happen-before the free.
//!
//! The invariant checked everywhere is Linux HMM's: at every instant the CPU
//! and the device map the same frame for an address, or one of them maps
//! nothing, so a frame the kernel frees is never mapped by the device.
#![cfg(loom)]

use core::pin::Pin;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView};
use hmm_core::notifier::FixedStore;
use hmm_core::sync::loom_pte::{self, AtomicEntry, Entries};
use hmm_core::sync::{RawLock, SpinLock, SpinWait, Waiter, WalkGate};
use hmm_core::{
    AddressSpace, DeviceOps, Error, Event, FrameAllocator, Interval, InvalidateRange, Mirror, MirrorConfig, Notifier,
    NotifierRegistry, PhysMem, Region, RegionFlags, Result, VaRange,
};
use loom::sync::{Mutex, RwLock, RwLockReadGuard};
use loom::thread;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Physical address of the arena.
const BASE: u64 = 0x10_0000;
/// Frames in the arena (one bit each in the allocator's bitmap).
const FRAMES: usize = 24;
const PAGE: u64 = 4096;
/// Start of the single region.
const VA: u64 = 0x40_0000;
/// Most pages a model uses.
const MAX_PAGES: usize = 3;
/// Default bound on scheduling decisions per execution (`LOOM_MAX_BRANCHES`).
const MAX_BRANCHES: usize = 100_000;
/// Byte written over a frame when it is freed.
const POISON: u8 = 0xa5;

type Registry<W = SpinWait> = NotifierRegistry<FixedStore<4>, W>;
type DevMirror<W = SpinWait, L = SpinLock> = Mirror<'static, Kernel<W>, Device<W>, Frames, X86_64Level4, L>;

/// A waiter that blocks on a loom condition variable (what a kernel with a
/// scheduler would plug in), so a lost wake-up is a loom deadlock.
struct BlockingWait {
    lock: Mutex<()>,
    wake: loom::sync::Condvar,
}

impl Default for BlockingWait {
    fn default() -> Self {
        Self { lock: Mutex::new(()), wake: loom::sync::Condvar::new() }
    }
}

impl Waiter for BlockingWait {
    fn wait_until(&self, done: &dyn Fn() -> bool) {
        let mut guard = self.lock.lock().unwrap();
        while !done() {
            guard = self.wake.wait(guard).unwrap();
        }
    }

    fn wake_all(&self) {
        let _guard = self.lock.lock().unwrap();
        self.wake.notify_all();
    }
}

/// An update lock that blocks on a loom condition variable instead of spinning.
struct BlockingLock {
    held: Mutex<bool>,
    released: loom::sync::Condvar,
}

impl Default for BlockingLock {
    fn default() -> Self {
        Self { held: Mutex::new(false), released: loom::sync::Condvar::new() }
    }
}

// SAFETY: `held` is only changed under the loom mutex, which orders every
// acquisition after the previous release (acquire/release semantics).
unsafe impl RawLock for BlockingLock {
    fn lock(&self) {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
        *held = true;
    }

    fn try_lock(&self) -> bool {
        let mut held = self.held.lock().unwrap();
        !std::mem::replace(&mut *held, true)
    }

    unsafe fn unlock(&self) {
        *self.held.lock().unwrap() = false;
        self.released.notify_one();
    }
}

fn va(page: usize) -> u64 {
    VA + page as u64 * PAGE
}

fn pages(first: usize, count: usize) -> VaRange {
    VaRange::new::<X86_64Level4>(va(first), count as u64 * PAGE).expect("valid range")
}

fn frame_index(frame: u64) -> usize {
    assert!(
        frame >= BASE && frame < BASE + (FRAMES as u64) * PAGE && frame.is_multiple_of(PAGE),
        "foreign frame {frame:#x}"
    );
    ((frame - BASE) / PAGE) as usize
}

// ---------------------------------------------------------------------------
// Model lifecycle
// ---------------------------------------------------------------------------

/// Runs `f` under loom, counting the explored executions, and prints the count
/// and the wall time (and, with `LOOM_PROGRESS` set, the count every 2,000).
fn model(name: &'static str, f: impl Fn() + Sync + Send + 'static) {
    model_bounded(name, None, f);
}

/// [`model`] with a preemption bound of at most `cap`.
fn model_bounded(name: &'static str, cap: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let mut builder = loom::model::Builder::new();
    if let Some(cap) = cap {
        builder.preemption_bound = Some(builder.preemption_bound.map_or(cap, |b| b.min(cap)));
    }
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        // Spin-waits (read_begin, SpinLock) make long executions; loom's
        // default of 1,000 branches is too few for the three-thread models.
        builder.max_branches = MAX_BRANCHES;
    }
    let bound = builder.preemption_bound.map_or_else(|| "unbounded".into(), |b| b.to_string());
    let t0 = Instant::now();
    builder.check(move || {
        let n = counter.fetch_add(1, SeqCst);
        if n.is_multiple_of(2000) && std::env::var_os("LOOM_PROGRESS").is_some() {
            eprintln!("  {n} executions, {:.1?}", t0.elapsed());
        }
        f();
    });
    eprintln!("loom model {name}: {} executions in {:.2?} (preemption bound {bound})", runs.load(SeqCst), t0.elapsed());
}

/// Moves `value` to the heap for the rest of the execution, so loom threads
/// (which need `'static`) can borrow it. Give it back with [`reclaim`].
fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

/// Drops a value from [`leak`].
///
/// # Safety
/// Every thread using `value` has been joined and `value` is not used again.
/// (If an execution panics, the value stays leaked rather than freed early.)
unsafe fn reclaim<T>(value: &'static T) {
    // SAFETY: `value` came from `Box::leak` and, by the caller, is unused.
    drop(unsafe { Box::from_raw(value as *const T as *mut T) });
}

// ---------------------------------------------------------------------------
// The kernel in miniature
// ---------------------------------------------------------------------------

/// Physical memory: a heap arena of `FRAMES` frames, 4 KiB-aligned (each
/// frame is one frame for `loom_pte`).
struct Ram {
    base: *mut u64,
    words: usize,
}

// SAFETY: the arena is plain memory; table entries are accessed atomically by
// hmm-core and by the kernel below, data frames only by their owner.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(FRAMES * PAGE as usize, PAGE as usize).unwrap()
    }

    fn new() -> Self {
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(Self::layout()) }.cast::<u64>();
        assert!(!base.is_null(), "out of memory");
        Self { base, words: FRAMES * 512 }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.base.cast::<u8>(), Self::layout()) };
    }
}

// SAFETY: every frame hmm-core is given comes from `Frames`, i.e. lies inside
// the arena, which is 4 KiB-aligned, never moves and outlives every user.
unsafe impl PhysMem for Ram {
    fn ptr(&self, pa: u64) -> *mut u8 {
        let offset = (pa - BASE) as usize;
        assert!(offset < self.words * 8, "physical address {pa:#x} outside the arena");
        self.base.cast::<u8>().wrapping_add(offset)
    }
}

/// The frame allocator: a bitmap under a loom mutex. Freed frames are poisoned.
///
/// Frames it hands out to hmm-core, which builds its mirror table from them,
/// are modelled as `Entries::Atomic` (see `hmm_core::sync::loom_pte`) while
/// threads run: device walkers (`Mirror::translate`) read the table without
/// any lock while faults and invalidations change it under the update lock,
/// exactly like the kernel's own tables (`Kernel::table_frame`). Plain,
/// lock-ordered memory would be wrong there: loom would report the walkers'
/// reads instead of letting them read any store the memory model allows.
/// Poisoning on free (`loom_pte::fill`) is a write of the frame's loom cell,
/// so a walker reading a directory freed without a grace period in between
/// is a loom causality violation.
///
/// Only while a model is single-threaded (its setup up to
/// [`start_threads`], its teardown from [`end_threads`]) are they
/// `Entries::LockOrdered`: nothing can race then, and inside
/// `loom_pte::exclusive` that spares loom the thousands of atomics of
/// hmm-core's 512-entry loops (zeroing a table, freeing one), which made
/// every execution several times slower.
struct Frames {
    ram: *const Ram,
    used: Mutex<Bitmaps>,
    /// Whether the model is single-threaded (see above). Changed only while
    /// no other loom thread exists, so a plain atomic is enough.
    single: std::sync::atomic::AtomicBool,
}

/// The allocator's bitmaps, one bit per frame index.
#[derive(Default)]
struct Bitmaps {
    /// Frames in use.
    used: u64,
    /// Of those, frames hmm-core allocated (its mirror table).
    mirror: u64,
}

// SAFETY: `ram` points into the `Kernel` that owns this allocator.
unsafe impl Send for Frames {}
// SAFETY: as above; the bitmaps are behind a mutex.
unsafe impl Sync for Frames {}

impl Frames {
    fn new(ram: &Ram) -> Self {
        Self { ram, used: Mutex::new(Bitmaps::default()), single: std::sync::atomic::AtomicBool::new(true) }
    }

    fn ptr(&self, frame: u64) -> *mut u8 {
        // SAFETY: `ram` outlives the allocator.
        unsafe { (*self.ram).ptr(frame) }
    }

    /// A free frame, not poisoned, zeroed nor modelled.
    fn take(&self, mirror: bool) -> Option<u64> {
        let mut used = self.used.lock().unwrap();
        let i = (!used.used).trailing_zeros() as usize;
        if i >= FRAMES {
            return None;
        }
        used.used |= 1 << i;
        used.mirror |= u64::from(mirror) << i;
        Some(BASE + i as u64 * PAGE)
    }

    /// Sets whether the model is single-threaded, and models hmm-core's
    /// frames accordingly (a write of each frame's cell).
    fn set_single(&self, single: bool) {
        self.single.store(single, Relaxed);
        let entries = if single { Entries::LockOrdered } else { Entries::Atomic };
        let mirror = self.used.lock().unwrap().mirror;
        for i in (0..FRAMES).filter(|i| mirror & (1 << i) != 0) {
            loom_pte::model_frame(self.ptr(BASE + i as u64 * PAGE), entries);
        }
    }
}

impl FrameAllocator for Frames {
    fn alloc_frame(&self) -> Option<u64> {
        let frame = self.take(true)?;
        let entries = if self.single.load(Relaxed) { Entries::LockOrdered } else { Entries::Atomic };
        loom_pte::model_frame(self.ptr(frame), entries);
        Some(frame)
    }

    unsafe fn free_frame(&self, frame: u64) {
        let i = frame_index(frame);
        let mut used = self.used.lock().unwrap();
        assert!(used.used & (1 << i) != 0, "double free of {frame:#x}");
        // Poison it while it is still ours: a mirror table still linking a
        // freed directory would read garbage "valid" entries and fail the
        // coherence checks. Through the hook, so entries read afterwards are
        // the poison, not a stale shadow, and so that loom reports a walker
        // reading it without a grace period in between.
        // SAFETY: the frame is in the arena and nobody may use it any more.
        unsafe { loom_pte::fill(self.ptr(frame), POISON) };
        used.used &= !(1 << i);
        used.mirror &= !(1 << i);
    }
}

/// What the test observes (never used for synchronisation, see the top).
#[derive(Default)]
struct Observed {
    /// Data frames the kernel has freed, one bit per frame index.
    freed: loom::sync::atomic::AtomicU64,
    /// What the device maps for each page (0: nothing).
    device: [loom::sync::atomic::AtomicU64; MAX_PAGES],
    /// Set once `Mirror::unregister` has returned.
    unregistered: loom::sync::atomic::AtomicBool,
    /// Every frame the CPU has mapped at each page so far, one bit per frame
    /// index (set before the PTE is written).
    had: [loom::sync::atomic::AtomicU64; MAX_PAGES],
}

/// The kernel's view of one process: one region, tables built down to the
/// leaf table of the region at setup time (so they are never freed).
struct Kernel<W: Waiter = SpinWait> {
    ram: Box<Ram>,
    frames: Frames,
    root: u64,
    /// The level-0 table holding the region's leaves.
    leaf_table: u64,
    region: Region,
    /// The mmap lock.
    mmap: RwLock<()>,
    /// The page-table lock: taken around every leaf change.
    ptl: Mutex<()>,
    notifiers: Registry<W>,
    seen: Observed,
}

impl<W: Waiter> Kernel<W> {
    /// A process with a `count`-page RW region; `mapped` pages (bit i: page i)
    /// get a frame at once.
    fn new(count: usize, mapped: u32) -> Self {
        let ram = Box::new(Ram::new());
        let frames = Frames::new(&ram);
        let mut k = Self {
            ram,
            frames,
            root: 0,
            leaf_table: 0,
            region: Region { range: pages(0, count), flags: RegionFlags::READ | RegionFlags::WRITE },
            mmap: RwLock::new(()),
            ptl: Mutex::new(()),
            notifiers: Registry::new(),
            seen: Observed::default(),
        };
        k.root = k.table_frame();
        let mut table = k.root;
        for level in (1..X86_64Level4::LEVELS).rev() {
            let frame = k.table_frame();
            let dir = PteView::Table { frame, flags: LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER };
            k.slot(table, X86_64Level4::index(VA, level)).store(X86_64Level4::encode(&dir, level).unwrap(), Relaxed);
            table = frame;
        }
        k.leaf_table = table;
        // A loom shadow is created by the first access of its entry, and every
        // later access must happen after it: touch every leaf of the region
        // here, before any thread is spawned (the directories are written above).
        for page in 0..count {
            k.pte(va(page)).load(Relaxed);
        }
        for page in (0..count).filter(|p| mapped & (1 << p) != 0) {
            k.map_new(va(page)).expect("frame");
        }
        k
    }

    /// A zeroed frame for one of the kernel's tables, which hmm-core walks
    /// without a lock while the kernel changes them: `Entries::Atomic`.
    fn table_frame(&self) -> u64 {
        let frame = self.zeroed_frame().expect("table frame");
        loom_pte::model_frame(self.ram.ptr(frame), Entries::Atomic);
        frame
    }

    fn zeroed_frame(&self) -> Option<u64> {
        let frame = self.frames.take(false)?;
        // SAFETY: a fresh frame of the arena, ours to write (through the hook:
        // it may have been a mirror table before).
        unsafe { loom_pte::fill(self.ram.ptr(frame), 0) };
        Some(frame)
    }

    /// An entry of one of the kernel's tables, seen by loom through the same
    /// shadow as hmm-core's accesses (`hmm_core::sync::loom_pte`).
    fn slot(&self, table: u64, index: usize) -> &AtomicEntry {
        // SAFETY: `table` is a table frame of the arena and `index < 512`;
        // entries are only accessed atomically.
        unsafe { AtomicEntry::from_ptr(self.ram.ptr(table).cast::<u64>().add(index)) }
    }

    fn pte(&self, va: u64) -> &AtomicEntry {
        assert!(self.region.range.contains_addr(va));
        self.slot(self.leaf_table, X86_64Level4::index(va, 0))
    }

    /// The frame the CPU maps at `va`: a plain load, like the kernel's own
    /// reads of its entries (exact under the PTE lock or after a join).
    fn cpu_frame(&self, va: u64) -> Option<u64> {
        match X86_64Level4::decode(self.pte(va).load(Relaxed), 0) {
            PteView::Leaf { frame, .. } => Some(frame),
            _ => None,
        }
    }

    /// Writes the leaf of `va` (PTE lock held, or single-threaded): a plain
    /// store, as a kernel's `set_pte` is; the PTE lock's release is the only
    /// ordering it gets.
    fn set_pte(&self, va: u64, raw: u64) {
        self.pte(va).store(raw, Relaxed);
    }

    fn leaf(frame: u64) -> u64 {
        let flags = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER;
        X86_64Level4::encode(&PteView::Leaf { frame, flags }, 0).unwrap()
    }

    /// Demand-zero: maps a fresh frame at `va` (PTE lock held or single-threaded).
    fn map_new(&self, va: u64) -> Result<u64> {
        let frame = self.zeroed_frame().ok_or(Error::NoMemory)?;
        self.seen.had[((va - VA) / PAGE) as usize].fetch_or(1 << frame_index(frame), Relaxed);
        self.set_pte(va, Self::leaf(frame));
        Ok(frame)
    }

    fn is_freed(&self, frame: u64) -> bool {
        self.seen.freed.load(Relaxed) & (1 << frame_index(frame)) != 0
    }

    /// Frees a data frame the CPU no longer maps. Checks the invariant at the
    /// moment it matters most: the device must not map it.
    fn free_data(&self, frame: u64) {
        for (page, dev) in self.seen.device.iter().enumerate() {
            assert_ne!(
                dev.load(Relaxed),
                frame,
                "kernel frees frame {frame:#x} while the device maps it at page {page}"
            );
        }
        let old = self.seen.freed.fetch_or(1 << frame_index(frame), Relaxed);
        assert!(old & (1 << frame_index(frame)) == 0, "data frame {frame:#x} freed twice");
        // SAFETY: the frame is in the arena; neither the CPU nor the device maps it.
        unsafe { loom_pte::fill(self.ram.ptr(frame), POISON) };
    }

    /// Changes the leaves of `count` pages from `first`: unmaps them, or with
    /// `remap` gives every mapped page a new frame. Bracketed by the
    /// notifier calls; `exclusive` takes the mmap lock for writing (munmap,
    /// COW break), otherwise for reading (MADV_DONTNEED-style zap, which may
    /// run concurrently with other zaps and with faults).
    fn change(&self, first: usize, count: usize, event: Event, exclusive: bool, remap: bool) {
        let _w = exclusive.then(|| self.mmap.write().unwrap());
        let _r = (!exclusive).then(|| self.mmap.read().unwrap());
        let inv = self.notifiers.invalidate_range_start(pages(first, count), event, true).expect("blockable");
        let mut old = [None; MAX_PAGES];
        {
            let _ptl = self.ptl.lock().unwrap();
            for (page, slot) in old.iter_mut().enumerate().skip(first).take(count) {
                *slot = self.cpu_frame(va(page));
                if remap && slot.is_some() {
                    self.map_new(va(page)).expect("frame");
                } else {
                    self.set_pte(va(page), 0);
                }
            }
        }
        // AddressSpace contract, item 3: the old frames may be freed as soon as
        // invalidate_range_start has returned. Freeing them here, before
        // invalidate_range_end, is the strictest legal kernel.
        old.iter().flatten().for_each(|&f| self.free_data(f));
        self.notifiers.invalidate_range_end(inv);
    }

    /// munmap of one page (mmap lock held for writing).
    fn unmap(&self, page: usize) {
        self.change(page, 1, Event::Unmap, true, false);
    }

    /// Replaces the frame of one page, as a COW break does (mmap lock for writing).
    fn remap(&self, page: usize) {
        self.change(page, 1, Event::ProtectionPage, true, true);
    }

    /// Zaps pages under the mmap read lock (MADV_DONTNEED).
    fn zap(&self, first: usize, count: usize) {
        self.change(first, count, Event::Clear, false, false);
    }
}

// SAFETY: 1. `root` is the live root in the arena for the kernel's lifetime.
// 2. Table frames are built at setup and never freed. 3. Every leaf change
// (`change`) is bracketed by invalidate_range_start/end, and frames are freed
// only after start returned. 4. Entries are written with atomic stores.
unsafe impl<W: Waiter> AddressSpace for Kernel<W> {
    type Format = X86_64Level4;
    type Phys = Ram;
    type Store = FixedStore<4>;
    type Wait = W;
    type ReadGuard<'a>
        = RwLockReadGuard<'a, ()>
    where
        Self: 'a;

    fn phys(&self) -> &Ram {
        &self.ram
    }
    fn root(&self) -> u64 {
        self.root
    }
    fn notifiers(&self) -> &Registry<W> {
        &self.notifiers
    }
    fn read_lock(&self) -> Self::ReadGuard<'_> {
        self.mmap.read().unwrap()
    }
    fn region<'g>(&'g self, _: &Self::ReadGuard<'g>, va: u64) -> Option<Region> {
        self.region.range.contains_addr(va).then_some(self.region)
    }
    fn handle_fault<'g>(&'g self, _: &Self::ReadGuard<'g>, range: VaRange, _write: bool) -> Result<()> {
        let _ptl = self.ptl.lock().unwrap();
        let mut va = range.start();
        while va <= range.last() {
            if self.cpu_frame(va).is_none() {
                self.map_new(va)?;
            }
            va += PAGE;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------

/// A device whose translations are recorded in `Kernel::seen.device`, and
/// which checks every translation it is given against the CPU tables. Its
/// MMU reads them from the mirror's table (from `Mirror::root`).
struct Device<W: Waiter + 'static = SpinWait> {
    k: &'static Kernel<W>,
    /// The mirror driving it, set once both live at their final address
    /// (before any thread is spawned).
    mirror: OnceLock<&'static dyn TableRoot>,
}

/// `Mirror::root`, without naming the mirror's type (which names the
/// device's).
trait TableRoot: Sync {
    fn root(&self) -> u64;
}

impl<W: Waiter + 'static, L: RawLock + 'static> TableRoot for DevMirror<W, L> {
    fn root(&self) -> u64 {
        Mirror::root(self)
    }
}

impl<W: Waiter> Device<W> {
    /// The frame the mirror's table maps at `va`, walked from `root` as the
    /// device's MMU walks it. Called under the update lock (in `update`),
    /// where nothing is freed, so without the walk gate: the `m6` models
    /// race `Mirror::translate` against the writers instead.
    fn hw_walk(&self, root: u64, va: u64) -> Option<u64> {
        let mut table = root;
        for level in (0..X86_64Level4::LEVELS).rev() {
            match X86_64Level4::decode(self.k.slot(table, X86_64Level4::index(va, level)).load(Acquire), level) {
                PteView::Table { frame, .. } if level > 0 => table = frame,
                PteView::Leaf { frame, .. } => return Some(frame),
                _ => return None,
            }
        }
        None
    }

    fn pages_of(&self, range: VaRange) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_PAGES).filter(move |&p| range.contains_addr(va(p)))
    }
}

impl<W: Waiter> DeviceOps for Device<W> {
    fn update(&self, range: VaRange) -> core::result::Result<(), i32> {
        assert!(!self.k.seen.unregistered.load(Relaxed), "device programmed after Mirror::unregister returned");
        let mirror = self.mirror.get().expect("device without its mirror");
        for page in self.pages_of(range) {
            let va = va(page);
            // The device's MMU reads its new translations from the table.
            let Some(frame) = self.hw_walk(mirror.root(), va) else {
                panic!("update of {va:#x}, which the mirror does not map");
            };
            // The update lock is held and no running invalidation overlaps
            // the faulted pages: the CPU still maps this very frame.
            assert!(!self.k.is_freed(frame), "device given freed frame {frame:#x} at {va:#x}");
            assert_eq!(self.k.cpu_frame(va), Some(frame), "device given a frame the CPU does not map at {va:#x}");
            self.k.seen.device[page].store(frame, Relaxed);
        }
        Ok(())
    }

    fn invalidate(&self, range: VaRange, _: Event) {
        for p in self.pages_of(range) {
            self.k.seen.device[p].store(0, Relaxed);
        }
    }

    fn flush(&self, _: VaRange) {}
}

/// A kernel plus a registered mirror of its whole region; pages in
/// `mirrored` are faulted into the mirror at setup. Call it before spawning.
fn world<W: Waiter + 'static, L: RawLock + 'static>(
    count: usize,
    mapped: u32,
    mirrored: u32,
) -> (&'static Kernel<W>, &'static DevMirror<W, L>) {
    // Single-threaded: spares loom the mirror table's 512-entry loops.
    let (k, m) = loom_pte::exclusive(|| {
        let (k, m) = build::<W, L>(count, mapped);
        // SAFETY: `m` lives in a box that is never moved; it is dropped in place.
        unsafe { Pin::new_unchecked(m) }.register().expect("register");
        for page in (0..count).filter(|p| mirrored & (1 << p) != 0) {
            m.fault(pages(page, 1), true).expect("setup fault");
        }
        (k, m)
    });
    start_threads(k, m);
    (k, m)
}

/// A kernel and a mirror of its whole region, not registered. Call it
/// before spawning.
fn unregistered_world<W: Waiter + 'static, L: RawLock + 'static>(
    count: usize,
    mapped: u32,
) -> (&'static Kernel<W>, &'static DevMirror<W, L>) {
    let (k, m) = loom_pte::exclusive(|| build::<W, L>(count, mapped));
    start_threads(k, m);
    (k, m)
}

fn build<W: Waiter + 'static, L: RawLock + 'static>(
    count: usize,
    mapped: u32,
) -> (&'static Kernel<W>, &'static DevMirror<W, L>) {
    let k = leak(Kernel::<W>::new(count, mapped));
    let config = MirrorConfig::default();
    let device = Device { k, mirror: OnceLock::new() };
    let m: &'static DevMirror<W, L> =
        leak(Mirror::with_format(k, &k.frames, device, k.region.range, config).expect("mirror"));
    assert!(m.device().mirror.set(m).is_ok());
    (k, m)
}

/// Ends a model's single-threaded setup; call it before the first spawn.
/// The mirror table's frames become `Entries::Atomic` (see [`Frames`]), and
/// every entry on the path to a page of the region is accessed here, on the
/// spawning thread, so that its loom shadow exists before threads race on it
/// (directories allocated later are zeroed by their writer before any
/// walker can reach them).
fn start_threads<W: Waiter + 'static, L: RawLock + 'static>(k: &Kernel<W>, m: &DevMirror<W, L>) {
    k.frames.set_single(false);
    let Some(root) = Some(m.root()).filter(|&r| r != 0) else {
        return;
    };
    for page in 0..k.region.range.pages(12) as usize {
        let mut table = root;
        for level in (0..X86_64Level4::LEVELS).rev() {
            let raw = k.slot(table, X86_64Level4::index(va(page), level)).load(Relaxed);
            match X86_64Level4::decode(raw, level) {
                PteView::Table { frame, .. } if level > 0 => table = frame,
                _ => break,
            }
        }
    }
}

/// Starts a model's single-threaded teardown; call it after the last join.
/// The mirror table's frames are lock-ordered again (see [`Frames`]).
fn end_threads<W: Waiter + 'static>(k: &Kernel<W>) {
    k.frames.set_single(true);
}

/// Drops the mirror (unregistering it), then the kernel.
///
/// # Safety
/// As [`reclaim`].
unsafe fn teardown<W: Waiter + 'static, L: RawLock + 'static>(k: &'static Kernel<W>, m: &'static DevMirror<W, L>) {
    end_threads(k);
    // SAFETY: forwarded; every thread has been joined (single-threaded).
    loom_pte::exclusive(|| unsafe {
        reclaim(m);
        reclaim(k);
    })
}

/// The invariant after all threads joined: for every page the mirror maps
/// nothing or exactly what the CPU maps, the frame is not freed, and the
/// device agrees with the mirror.
fn assert_coherent<W: Waiter + 'static, L: RawLock + 'static>(k: &Kernel<W>, m: &DevMirror<W, L>, count: usize) {
    for page in 0..count {
        let cpu = k.cpu_frame(va(page));
        let mirror = m.translate(va(page)).map(|e| e.frame());
        if let Some(f) = mirror {
            assert!(!k.is_freed(f), "mirror maps freed frame {f:#x} at page {page}");
            assert_eq!(Some(f), cpu, "mirror maps {f:#x} at page {page}, the CPU maps {cpu:x?}");
        }
        assert_eq!(k.seen.device[page].load(Relaxed), mirror.unwrap_or(0), "device and mirror disagree at page {page}");
    }
}

// ---------------------------------------------------------------------------
// Model 1: a device fault racing an invalidation of the same page
// ---------------------------------------------------------------------------

/// Page 0 is the one fought over; page 1 stays mirrored throughout (so the
/// mirror's directories are never pruned, which keeps the model small).
fn fault_vs_kernel<W: Waiter + 'static>(name: &'static str, mapped: u32, mirrored: u32, kernel_op: fn(&Kernel<W>)) {
    model(name, move || {
        let (k, m) = world::<W, SpinLock>(2, mapped, mirrored);
        let device = thread::spawn(move || m.fault(pages(0, 1), true));
        let cpu = thread::spawn(move || kernel_op(k));
        let r = device.join().unwrap();
        cpu.join().unwrap();
        assert_eq!(r, Ok(()));
        assert_coherent(k, m, 2);
        assert_eq!(k.notifiers.seq() % 2, 0, "sequence left odd");
        // SAFETY: both threads joined.
        unsafe { teardown(k, m) };
    });
}

#[test]
fn m1_fault_vs_unmap() {
    fault_vs_kernel::<SpinWait>("m1_fault_vs_unmap", 0b11, 0b10, |k| k.unmap(0));
}

/// As above with a waiter that really blocks: a missing `wake_all` in the
/// registry would show as a deadlock (SpinWait cannot show it).
#[test]
fn m1_fault_vs_unmap_blocking_waiter() {
    fault_vs_kernel::<BlockingWait>("m1_fault_vs_unmap_blocking_waiter", 0b11, 0b10, |k| k.unmap(0));
}

#[test]
fn m1_fault_vs_remap_of_mirrored_page() {
    fault_vs_kernel::<SpinWait>("m1_fault_vs_remap_of_mirrored_page", 0b11, 0b11, |k| k.remap(0));
}

#[test]
fn m1_fault_on_hole_vs_unmap() {
    fault_vs_kernel::<SpinWait>("m1_fault_on_hole_vs_unmap", 0b10, 0b10, |k| k.unmap(0));
}

/// A zap holds the mmap lock only for reading, so unlike munmap it changes
/// the page while the fault walks the CPU tables: the fault must not map a
/// page an invalidation that already ran the mirror's callback is changing.
#[test]
fn m1_fault_vs_zap() {
    fault_vs_kernel::<SpinWait>("m1_fault_vs_zap", 0b11, 0b10, |k| k.zap(0, 1));
}

// ---------------------------------------------------------------------------
// Model 2: two concurrent, overlapping invalidations plus a fault
// ---------------------------------------------------------------------------

/// The preemption bound of `m2_two_zaps_and_fault`. Since faults check the
/// registry's running invalidations under its spin lock (taken by all three
/// threads), bound 2 does not finish in minutes (over 540,000 executions
/// after 4 minutes on two cores; with the second zap on page 1 instead,
/// 1.1 million after 12), bound 1 takes a few hundred. The two-thread
/// models cover fault-vs-zap at the full bound (`m1_fault_vs_zap`).
const M2_MAX_PREEMPTIONS: usize = 1;

#[test]
fn m2_two_zaps_and_fault() {
    model_bounded("m2_two_zaps_and_fault", Some(M2_MAX_PREEMPTIONS), || {
        // Page 0 is faulted; the zaps of pages 0-1 and of page 0 both overlap
        // it, so the fault must not map it while either runs (when one ends
        // while the other still runs, it waits again); page 2 stays mirrored.
        // Both zaps hold the mmap lock for reading, like the fault's walk.
        // The waiter and the update lock block instead of spinning: with
        // three threads, spinning makes the state space explode; the
        // spinning versions are covered by the two-thread models.
        let (k, m) = world::<BlockingWait, BlockingLock>(3, 0b111, 0b100);
        let device = thread::spawn(move || m.fault(pages(0, 1), true));
        let zap_a = thread::spawn(move || k.zap(0, 2));
        let zap_b = thread::spawn(move || k.zap(0, 1));
        let r = device.join().unwrap();
        zap_a.join().unwrap();
        zap_b.join().unwrap();
        assert_eq!(r, Ok(()));
        assert_eq!(k.notifiers.seq() % 2, 0, "sequence left odd");
        assert_coherent(k, m, 3);
        // SAFETY: all threads joined.
        unsafe { teardown(k, m) };
    });
}

// ---------------------------------------------------------------------------
// Model 3: notifier insert and remove during an invalidation
// ---------------------------------------------------------------------------

/// A notifier that counts its calls and checks it is not called once removed.
struct Probe {
    interval: Interval,
    /// Calls so far.
    calls: loom::sync::atomic::AtomicUsize,
    in_callback: loom::sync::atomic::AtomicBool,
    removed: loom::sync::atomic::AtomicBool,
}

impl Probe {
    fn new() -> Self {
        Self {
            interval: Interval::new(pages(0, 2)),
            calls: loom::sync::atomic::AtomicUsize::new(0),
            in_callback: loom::sync::atomic::AtomicBool::new(false),
            removed: loom::sync::atomic::AtomicBool::new(false),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Relaxed)
    }
}

impl Notifier for Probe {
    fn interval(&self) -> &Interval {
        &self.interval
    }

    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        assert!(!self.removed.load(Relaxed), "callback of a notifier whose remove() returned");
        assert_eq!(inv.seq() % 2, 1, "callback with an even sequence");
        self.in_callback.store(true, Relaxed);
        self.calls.fetch_add(1, Relaxed);
        self.interval.set_seq(inv);
        self.in_callback.store(false, Relaxed);
        true
    }
}

/// One invalidation of the probes' range, as a kernel would bracket it.
fn invalidate(reg: &Registry) {
    let inv = reg.invalidate_range_start(pages(0, 1), Event::Clear, true).expect("blockable");
    reg.invalidate_range_end(inv);
}

#[test]
fn m3_insert_during_invalidation() {
    model("m3_insert_during_invalidation", || {
        let reg: &'static Registry = leak(Registry::new());
        let (old, new): (&'static Probe, &'static Probe) = (leak(Probe::new()), leak(Probe::new()));
        // SAFETY: the probes outlive their registrations (removed below).
        let old_reg = unsafe { reg.insert(old) }.unwrap();
        let kernel = thread::spawn(move || invalidate(reg));
        let driver = thread::spawn(move || {
            let before = reg.seq();
            // SAFETY: as above.
            let new_reg = unsafe { reg.insert(new) }.unwrap();
            (before, reg.seq(), new_reg)
        });
        kernel.join().unwrap();
        let (before, after, new_reg) = driver.join().unwrap();
        assert_eq!(old.calls(), 1);
        if before == after && before % 2 == 1 {
            // The insert ran entirely inside the (only) invalidation.
            assert_eq!(new.calls(), 0, "a notifier inserted during an invalidation was called by it");
        } else if after == 0 {
            // The insert finished before the invalidation started.
            assert_eq!(new.calls(), 1, "a notifier inserted before an invalidation was not called");
        } else {
            assert!(new.calls() <= 1);
        }
        assert_eq!(reg.seq(), 2, "sequence must be even, after exactly one counted invalidation");
        assert_eq!(reg.len(), 2, "the deferred insert was applied");
        // Now registered: a read section begins at once and sees no retry.
        let seq = reg.read_begin(&new.interval);
        assert!(!reg.read_retry(&new.interval, seq));
        old_reg.remove();
        new_reg.remove();
        assert!(reg.is_empty());
        // SAFETY: all threads joined; nothing is registered any more.
        unsafe {
            reclaim(old);
            reclaim(new);
            reclaim(reg);
        }
    });
}

#[test]
fn m3_remove_during_invalidation() {
    model("m3_remove_during_invalidation", || {
        let reg: &'static Registry = leak(Registry::new());
        let (stays, goes): (&'static Probe, &'static Probe) = (leak(Probe::new()), leak(Probe::new()));
        // SAFETY: the probes outlive their registrations (removed below).
        let (stays_reg, goes_reg) = unsafe { (reg.insert(stays).unwrap(), reg.insert(goes).unwrap()) };
        let kernel = thread::spawn(move || invalidate(reg));
        let driver = thread::spawn(move || {
            goes_reg.remove();
            assert!(!goes.in_callback.load(Relaxed), "remove() returned while the callback runs");
            goes.removed.store(true, Relaxed);
        });
        kernel.join().unwrap();
        driver.join().unwrap();
        // One more invalidation after the removal: must not reach `goes`.
        invalidate(reg);
        assert_eq!(stays.calls(), 2);
        assert!(goes.calls() <= 1);
        assert!(!goes.interval.is_registered());
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.seq() % 2, 0, "sequence left odd");
        stays_reg.remove();
        assert!(reg.is_empty());
        // SAFETY: all threads joined; nothing is registered any more.
        unsafe {
            reclaim(stays);
            reclaim(goes);
            reclaim(reg);
        }
    });
}

/// A mirror registering (and faulting) while a zap that started before the
/// registration, and overlapped no interval then, is running. The zap must
/// still count (as in Linux, where every invalidation is counted): the insert
/// is deferred, and while it is the new mirror's fault counts every running
/// invalidation as overlapping and waits for the zap to end, else the mirror
/// could map the frame the zap is about to free.
#[test]
fn m3_register_during_zap() {
    model("m3_register_during_zap", || {
        let (k, m) = unregistered_world::<SpinWait, SpinLock>(2, 0b11);
        let cpu = thread::spawn(move || k.zap(0, 1));
        let device = thread::spawn(move || {
            // SAFETY: `m` lives in a box that is never moved; dropped in place.
            unsafe { Pin::new_unchecked(m) }.register().expect("register");
            m.fault(pages(0, 1), true)
        });
        cpu.join().unwrap();
        assert_eq!(device.join().unwrap(), Ok(()));
        assert_coherent(k, m, 2);
        // SAFETY: both threads joined.
        unsafe { teardown(k, m) };
    });
}

// ---------------------------------------------------------------------------
// Model 4: unregister / release racing a fault
// ---------------------------------------------------------------------------

#[test]
fn m4_unregister_vs_fault() {
    model("m4_unregister_vs_fault", || {
        let (k, m) = world::<SpinWait, SpinLock>(2, 0b11, 0b10);
        let device = thread::spawn(move || m.fault(pages(0, 1), true));
        let driver = thread::spawn(move || {
            m.unregister().unwrap();
            k.seen.unregistered.store(true, Relaxed);
        });
        let r = device.join().unwrap();
        driver.join().unwrap();
        assert!(matches!(r, Ok(()) | Err(Error::Unregistered)), "fault returned {r:?}");
        for page in 0..2 {
            assert_eq!(m.translate(va(page)), None);
            assert_eq!(k.seen.device[page].load(Relaxed), 0, "device still maps page {page}");
        }
        assert_eq!(m.table_frames(), 0);
        assert_eq!(m.fault(pages(0, 1), false), Err(Error::Unregistered));
        assert!(k.notifiers.is_empty());
        // SAFETY: both threads joined.
        unsafe { teardown(k, m) };
    });
}

#[test]
fn m4_release_vs_fault() {
    model("m4_release_vs_fault", || {
        let (k, m) = world::<SpinWait, SpinLock>(2, 0b11, 0b10);
        let device = thread::spawn(move || m.fault(pages(0, 1), true));
        let kernel = thread::spawn(move || k.notifiers.release());
        let r = device.join().unwrap();
        kernel.join().unwrap();
        assert!(matches!(r, Ok(()) | Err(Error::Released)), "fault returned {r:?}");
        for page in 0..2 {
            assert_eq!(m.translate(va(page)), None, "mirror entry left after release at page {page}");
            assert_eq!(k.seen.device[page].load(Relaxed), 0, "device still maps page {page}");
        }
        assert_eq!(k.notifiers.seq() % 2, 0, "sequence left odd");
        assert_eq!(m.fault(pages(0, 1), false), Err(Error::Released));
        // SAFETY: both threads joined.
        unsafe { teardown(k, m) };
    });
}

/// Unregister racing a munmap of a mirrored page: `unregister` must empty
/// the mirror and the device before it leaves the registry, or the unmap,
/// no longer notified, frees a frame the device still maps.
#[test]
fn m4_unregister_vs_unmap() {
    model("m4_unregister_vs_unmap", || {
        let (k, m) = world::<SpinWait, SpinLock>(2, 0b11, 0b11);
        let driver = thread::spawn(move || {
            m.unregister().unwrap();
            k.seen.unregistered.store(true, Relaxed);
        });
        let cpu = thread::spawn(move || k.unmap(0));
        driver.join().unwrap();
        cpu.join().unwrap();
        assert_eq!(m.translate(va(0)), None);
        assert!(k.seen.device.iter().all(|d| d.load(Relaxed) == 0), "device still maps a page");
        // SAFETY: both threads joined.
        unsafe { teardown(k, m) };
    });
}

/// Dropping a mirror racing a munmap of a mirrored page: the same window as
/// above, in `Drop`, which leaves the registry before emptying the mirror.
#[test]
fn m4_drop_vs_unmap() {
    model("m4_drop_vs_unmap", || {
        let (k, m) = world::<SpinWait, SpinLock>(2, 0b11, 0b11);
        // SAFETY: `m` is used by no other thread; joined before `k` goes.
        let driver = thread::spawn(move || unsafe { reclaim(m) });
        let cpu = thread::spawn(move || k.unmap(0));
        driver.join().unwrap();
        cpu.join().unwrap();
        assert!(k.seen.device.iter().all(|d| d.load(Relaxed) == 0), "device still maps a page");
        // SAFETY: both threads joined.
        loom_pte::exclusive(|| unsafe { reclaim(k) });
    });
}

// ---------------------------------------------------------------------------
// Model 5: registration misuse
// ---------------------------------------------------------------------------

/// Drops the mirror and checks it left the registry and the device empty,
/// then drops the kernel.
///
/// # Safety
/// As [`reclaim`].
unsafe fn drop_and_check<W: Waiter + 'static, L: RawLock + 'static>(
    k: &'static Kernel<W>,
    m: &'static DevMirror<W, L>,
) {
    end_threads(k);
    // SAFETY: forwarded; every thread has been joined (single-threaded).
    loom_pte::exclusive(|| unsafe { reclaim(m) });
    assert!(k.notifiers.is_empty(), "the dropped mirror is still registered");
    assert!(k.seen.device.iter().all(|d| d.load(Relaxed) == 0), "device maps a page of a dropped mirror");
    // SAFETY: as above.
    loom_pte::exclusive(|| unsafe { reclaim(k) });
}

/// Two threads insert the same notifier into a registry at once (the bug the
/// Mirror's own registration lock now also hides: the registry marked the
/// interval registered after dropping its lock, so both inserts succeeded
/// and the interval sat in the store twice). Exactly one insert succeeds.
#[test]
fn m5_double_insert() {
    model("m5_double_insert", || {
        let reg: &'static Registry = leak(Registry::new());
        let probe: &'static Probe = leak(Probe::new());
        // SAFETY (both): the probe outlives its registration (removed below).
        let a = thread::spawn(move || unsafe { reg.insert(probe) }.map(core::mem::ManuallyDrop::new));
        let b = thread::spawn(move || unsafe { reg.insert(probe) }.map(core::mem::ManuallyDrop::new));
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(reg.len(), 1, "{} registry entries after a double insert", reg.len());
        let won = match (ra, rb) {
            (Ok(r), Err(Error::Busy)) | (Err(Error::Busy), Ok(r)) => r,
            (ra, rb) => panic!("two inserts returned {:?} and {:?}", ra.map(|_| ()), rb.map(|_| ())),
        };
        core::mem::ManuallyDrop::into_inner(won).remove();
        assert!(reg.is_empty() && !probe.interval.is_registered());
        // SAFETY: all threads joined; nothing is registered any more.
        unsafe {
            reclaim(probe);
            reclaim(reg);
        }
    });
}

/// Two threads register the same pinned mirror at once: exactly one gets
/// `Ok`, the other `Busy`, and the registry holds the mirror once.
#[test]
fn m5_double_register() {
    model("m5_double_register", || {
        let (k, m) = unregistered_world::<SpinWait, SpinLock>(2, 0b11);
        // SAFETY (both): `m` lives in a box that is never moved; dropped in place.
        let a = thread::spawn(move || unsafe { Pin::new_unchecked(m) }.register());
        let b = thread::spawn(move || unsafe { Pin::new_unchecked(m) }.register());
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        assert!(
            matches!((ra, rb), (Ok(()), Err(Error::Busy)) | (Err(Error::Busy), Ok(()))),
            "two registers returned {ra:?} and {rb:?}"
        );
        assert_eq!(k.notifiers.len(), 1, "registry entries after a double register");
        assert!(m.interval().is_registered());
        // It works as a registered mirror, and its one entry goes with it.
        m.fault(pages(0, 1), true).expect("fault after register");
        assert_coherent(k, m, 2);
        // SAFETY: both threads joined.
        unsafe { drop_and_check(k, m) };
    });
}

/// `register` (then a fault) racing `unregister`: whichever order they take,
/// the registry holds the mirror exactly when its interval says registered,
/// and an unregistered mirror maps nothing, in its table or on the device.
#[test]
fn m5_register_vs_unregister() {
    model("m5_register_vs_unregister", || {
        let (k, m) = unregistered_world::<SpinWait, SpinLock>(2, 0b11);
        let device = thread::spawn(move || {
            // SAFETY: `m` lives in a box that is never moved; dropped in place.
            let r = unsafe { Pin::new_unchecked(m) }.register();
            (r, r.is_ok().then(|| m.fault(pages(0, 1), true)))
        });
        let driver = thread::spawn(move || {
            let u = m.unregister();
            if u.is_ok() {
                k.seen.unregistered.store(true, Relaxed);
            }
            u
        });
        let (r, fault) = device.join().unwrap();
        let u = driver.join().unwrap();
        let registered = m.interval().is_registered();
        assert_eq!(k.notifiers.len(), usize::from(registered), "registry entries vs is_registered()");
        match (r, u) {
            // Unregister first (nothing to do), then a normal registration.
            (Ok(()), Err(Error::Unregistered)) => {
                assert!(registered);
                assert_eq!(fault, Some(Ok(())));
                assert_coherent(k, m, 2);
            }
            // Register first; the fault ran before or after the unregister.
            (Ok(()), Ok(())) => {
                assert!(!registered);
                assert!(matches!(fault, Some(Ok(()) | Err(Error::Unregistered))), "fault returned {fault:?}");
                for page in 0..2 {
                    assert_eq!(m.translate(va(page)), None, "unregistered mirror maps page {page}");
                }
                assert!(k.seen.device.iter().all(|d| d.load(Relaxed) == 0), "device maps a page after unregister");
                assert_eq!(m.table_frames(), 0);
                // SAFETY: `m` is pinned in its box.
                assert_eq!(unsafe { Pin::new_unchecked(m) }.register(), Err(Error::Unregistered));
                assert!(k.notifiers.is_empty());
            }
            other => panic!("register / unregister returned {other:?}"),
        }
        // SAFETY: both threads joined.
        unsafe { drop_and_check(k, m) };
    });
}

// ---------------------------------------------------------------------------
// Model 6: lock-free device walkers
// ---------------------------------------------------------------------------

/// A device's TLB-miss path: `rounds` lock-free translations of `page`,
/// returned. Any translation found must be a frame the CPU maps or mapped
/// there (`Observed::had`: the kernel records a frame before it writes the
/// PTE, and the mirror's entry is written after it read the PTE, so a
/// walker that found the entry sees the record), read-write, 4 KiB.
///
/// What it must never do is read a freed table frame: the allocator poisons
/// frames on free through `loom_pte::fill`, a write of the frame's loom cell,
/// so a walk of a directory freed without a grace period in between is a
/// loom causality violation (and a poisoned entry would decode to garbage).
fn device_walks<W: Waiter + 'static, L: RawLock + 'static>(
    k: &Kernel<W>,
    m: &DevMirror<W, L>,
    page: usize,
    rounds: usize,
) -> Vec<Option<u64>> {
    (0..rounds)
        .map(|_| {
            let e = m.translate(va(page))?;
            let had = k.seen.had[page].load(Relaxed);
            assert!(
                had & (1 << frame_index(e.frame())) != 0,
                "walker translated page {page} to {:#x}, which the CPU never mapped there",
                e.frame()
            );
            assert!(e.is_write() && e.order() == 0, "walker found {e:?} at page {page}");
            Some(e.frame())
        })
        .collect()
}

/// Asserts that a walker's translations went through `phases` in order
/// (each phase may be skipped or repeated, none may come back).
fn assert_phases(seen: &[Option<u64>], phases: &[Option<u64>]) {
    let mut at = 0;
    for s in seen {
        let Some(i) = phases[at..].iter().position(|p| p == s) else {
            panic!("walker saw {seen:x?}, not in the order {phases:x?}");
        };
        at += i;
    }
}

/// A walker racing the fault that builds the table: the mirror starts empty
/// (a root only), so the fault allocates, zeroes and links three
/// directories while the walker may be walking into them. It finds nothing
/// or the page, and once it found the page it keeps finding it.
#[test]
fn m6_walker_vs_fault() {
    model("m6_walker_vs_fault", || {
        let (k, m) = world::<SpinWait, SpinLock>(1, 0b1, 0b0);
        assert_eq!(m.table_frames(), 1);
        let frame = k.cpu_frame(va(0)).expect("page 0 is mapped");
        let walker = thread::spawn(move || device_walks(k, m, 0, 3));
        assert_eq!(m.fault(pages(0, 1), true), Ok(()));
        assert_phases(&walker.join().unwrap(), &[None, Some(frame)]);
        assert_eq!(m.translate(va(0)).map(|e| e.frame()), Some(frame));
        assert_eq!(m.table_frames(), 4);
        assert_coherent(k, m, 1);
        // SAFETY: the walker joined.
        unsafe { teardown(k, m) };
    });
}

/// A walker racing an unmap that prunes the table: page 0 is the only page
/// mirrored, so clearing it empties its leaf table and, with it, every
/// directory below the root. All three are unlinked, the device flushes,
/// and they are freed (poisoned) after the walk gate's grace period: the
/// walker, which may have loaded any of them, must have left by then.
#[test]
fn m6_walker_vs_pruning_unmap() {
    model("m6_walker_vs_pruning_unmap", || {
        let (k, m) = world::<SpinWait, SpinLock>(1, 0b1, 0b1);
        assert_eq!(m.table_frames(), 4);
        let frame = k.cpu_frame(va(0)).expect("page 0 is mapped");
        let walker = thread::spawn(move || device_walks(k, m, 0, 3));
        k.unmap(0);
        assert_phases(&walker.join().unwrap(), &[Some(frame), None]);
        assert_eq!(m.translate(va(0)), None);
        assert_eq!(m.table_frames(), 1, "emptied directories were not freed");
        assert_coherent(k, m, 1);
        // SAFETY: the walker joined.
        unsafe { teardown(k, m) };
    });
}

/// A walker racing a zap that prunes the table and a fault that builds it
/// again, from the frames just freed (the allocator hands out the lowest
/// free frame): a walker still holding a directory of the old table must
/// not read it once it is freed, poisoned and zeroed again as a directory
/// (or data frame) of the new one. The walker sees the old frame, nothing,
/// the new frame, in that order.
#[test]
fn m6_walker_vs_prune_and_refault() {
    model("m6_walker_vs_prune_and_refault", || {
        let (k, m) = world::<SpinWait, SpinLock>(1, 0b1, 0b1);
        let old = k.cpu_frame(va(0)).expect("page 0 is mapped");
        let walker = thread::spawn(move || device_walks(k, m, 0, 3));
        k.zap(0, 1);
        assert_eq!(m.fault(pages(0, 1), true), Ok(()));
        let new = k.cpu_frame(va(0)).expect("faulted in again");
        assert_ne!(new, old);
        assert_phases(&walker.join().unwrap(), &[Some(old), None, Some(new)]);
        assert_eq!(m.table_frames(), 4);
        assert_coherent(k, m, 1);
        // SAFETY: the walker joined.
        unsafe { teardown(k, m) };
    });
}

/// A walker racing `unregister`, which empties the table (pruning every
/// directory, one grace period), then unpublishes the root and frees it
/// after a second grace period. Dropping the mirror takes the same path
/// (`take_emptied`, then `TableWriter::destroy`), but cannot race a
/// `translate` in safe Rust, which borrows the mirror.
#[test]
fn m6_walker_vs_unregister() {
    model("m6_walker_vs_unregister", || {
        let (k, m) = world::<SpinWait, SpinLock>(1, 0b1, 0b1);
        let frame = k.cpu_frame(va(0)).expect("page 0 is mapped");
        let walker = thread::spawn(move || device_walks(k, m, 0, 3));
        m.unregister().unwrap();
        k.seen.unregistered.store(true, Relaxed);
        assert_phases(&walker.join().unwrap(), &[Some(frame), None]);
        assert_eq!(m.translate(va(0)), None);
        assert_eq!(m.root(), 0);
        assert_eq!(m.table_frames(), 0);
        assert_eq!(k.seen.device[0].load(Relaxed), 0, "device still maps page 0");
        // SAFETY: the walker joined.
        unsafe { teardown(k, m) };
    });
}

/// Written over an object of the `WalkGate` models when it is freed.
const FREED: u64 = 0xdead;

/// `WalkGate` on its own: a reader enters twice and each time reads the
/// object a writer publishes; the writer replaces object 0 by object 1,
/// then unpublishes object 1, each time freeing the old object (writing
/// `FREED` through a loom cell) after `synchronize` (if `grace`). Two
/// grace periods, so both reader slots are used.
fn walk_gate_model(name: &'static str, grace: bool) {
    model(name, move || {
        let gate: &'static WalkGate = leak(WalkGate::new());
        let objects: &'static [loom::cell::UnsafeCell<u64>; 2] =
            leak([loom::cell::UnsafeCell::new(1), loom::cell::UnsafeCell::new(2)]);
        // The published object: 1 + its index, 0 for none.
        let published: &'static loom::sync::atomic::AtomicUsize = leak(loom::sync::atomic::AtomicUsize::new(1));
        let reader = thread::spawn(move || {
            for _ in 0..2 {
                let _inside = gate.enter();
                let p = published.load(Acquire);
                if p != 0 {
                    // SAFETY: loom checks that no write (the free) races it.
                    let value = objects[p - 1].with(|v| unsafe { *v });
                    assert_ne!(value, FREED, "reader inside the gate reads freed object {}", p - 1);
                    assert_eq!(value, p as u64);
                }
            }
        });
        for (old, new) in [(0, 2), (1, 0)] {
            published.store(new, Release);
            if grace {
                gate.synchronize();
            }
            // SAFETY: loom checks that no read races it.
            objects[old].with_mut(|v| unsafe { *v = FREED });
        }
        reader.join().unwrap();
        // SAFETY: the reader joined.
        unsafe {
            reclaim(published);
            reclaim(objects);
            reclaim(gate);
        }
    });
}

#[test]
fn m6_walk_gate() {
    walk_gate_model("m6_walk_gate", true);
}

/// The same without the grace period: the model must catch the reader of a
/// freed object (so `m6_walk_gate` passing means something).
#[test]
#[should_panic(expected = "Causality violation")]
fn m6_walk_gate_without_grace_period_is_reported() {
    walk_gate_model("m6_walk_gate_without_grace_period_is_reported", false);
}

// ---------------------------------------------------------------------------
// Model 0: the entry model itself
// ---------------------------------------------------------------------------

/// The kernel model is no stronger than hardware: a plain load of a PTE that
/// another CPU cleared with a plain store may return the old entry even after
/// a flag (also plain) says the store happened, and may return the new one.
#[test]
fn m0_pte_load_may_be_stale() {
    let seen = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::clone(&seen);
    model("m0_pte_load_may_be_stale", move || {
        let k = loom_pte::exclusive(|| leak(Kernel::<SpinWait>::new(1, 0b1)));
        let done = leak(loom::sync::atomic::AtomicBool::new(false));
        let cpu = thread::spawn(move || {
            k.set_pte(va(0), 0);
            done.store(true, Relaxed);
        });
        if done.load(Relaxed) {
            let stale = k.cpu_frame(va(0)).is_some();
            outcomes.fetch_or(if stale { 1 } else { 2 }, SeqCst);
        }
        cpu.join().unwrap();
        // SAFETY: the thread joined.
        loom_pte::exclusive(|| unsafe {
            reclaim(done);
            reclaim(k);
        });
    });
    assert_eq!(
        seen.load(SeqCst),
        3,
        "a load after the flag saw {}",
        ["nothing", "only the old PTE", "only the new PTE"][seen.load(SeqCst)]
    );
}

/// Unordered accesses of a lock-ordered frame are reported, not silently
/// given the latest value. (The models use the mode only while they are
/// single-threaded: the mirror table has lock-free walkers. This checks it.)
#[test]
#[should_panic(expected = "Causality violation")]
fn m0_unordered_lock_ordered_access_is_reported() {
    model("m0_unordered_lock_ordered_access_is_reported", || {
        let k = loom_pte::exclusive(|| leak(Kernel::<SpinWait>::new(1, 0)));
        let table = k.frames.alloc_frame().expect("frame");
        loom_pte::model_frame(k.ram.ptr(table), Entries::LockOrdered);
        let other = thread::spawn(move || k.slot(table, 1).store(1, Relaxed));
        k.slot(table, 2).load(Relaxed);
        other.join().unwrap();
    });
}

/// An entry access of an `Atomic` frame (a mirror table's) racing the
/// frame's poisoning on free is reported: what the `m6` models rely on to
/// catch a walker reading a freed directory.
#[test]
#[should_panic(expected = "Causality violation")]
fn m0_entry_access_racing_free_is_reported() {
    model("m0_entry_access_racing_free_is_reported", || {
        let k = loom_pte::exclusive(|| leak(Kernel::<SpinWait>::new(1, 0)));
        k.frames.set_single(false);
        let table = k.frames.alloc_frame().expect("frame");
        k.slot(table, 1).store(0, Relaxed);
        let walker = thread::spawn(move || k.slot(table, 1).load(Acquire));
        // SAFETY: the frame is ours (allocated above); the race is the point.
        unsafe { k.frames.free_frame(table) };
        walker.join().unwrap();
    });
}
