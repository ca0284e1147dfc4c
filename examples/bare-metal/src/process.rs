//! A process address space: x86_64 4-level tables of its own, built from the
//! kernel's frame allocator and edited through the offset map, plus regions
//! (VMAs), a fault handler, and the changes that must notify devices. This is
//! the kernel side hmm-core plugs into ([`hmm_core::AddressSpace`]).
//!
//! The tables are live: a CPU runs the process by loading its PML4 into CR3
//! ([`Process::enter`]). The kernel half (PML4 slots the kernel table uses:
//! the identity map in slot 0 and the offset map in slot 256) is shared with
//! the kernel table, so user addresses start at [`USER_START`]. CPU accesses
//! to user memory go through the MMU; a #PF is resolved by
//! [`cpu_page_fault`] with the same handler a device fault uses.
//!
//! # Locks
//! * the *mmap lock* (`vm`, a reader-writer lock over the regions): read side
//!   for faults (CPU and device) and `AddressSpace::read_lock`; write side for
//!   every region change (mmap, munmap, mprotect, fork). Table frames are only
//!   freed in `Drop` (`&mut self`: no guard can exist), which is the
//!   `AddressSpace` contract (2).
//! * the *page-table lock* (`pt`): every entry change made under the read
//!   side (demand-zero, COW break), like Linux's PTL.
//!
//! Order: mmap lock -> page-table lock -> frame allocator. Neither
//! `invalidate_range_start` nor a TLB shootdown wait is ever entered with the
//! page-table lock held.
//!
//! # Invalidation discipline (contract (3))
//! Every change that removes, replaces or downgrades a user translation runs
//! `invalidate_range_start` -> change the entry (atomic) -> `tlb::flush_page`
//! (`invlpg` here, NMI shootdown elsewhere) -> free or release the old frame
//! -> `invalidate_range_end`. Adding a translation or upgrading one in place
//! (same frame, more permission) is not bracketed: nobody can hold a stale
//! copy of it.
//!
//! # Copy-on-write
//! [`Process::fork`] shares every 4 KiB frame with the child, read-only on
//! both sides. A share count per frame lives in a small global table
//! ([`shared`]); a write fault on a read-only page of a writable region
//! copies the frame if it is still shared and upgrades it in place otherwise.

use core::marker::PhantomData;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::notifier::FixedStore;
use hmm_core::pt::Pfn;
use hmm_core::sync::SpinWait;
use hmm_core::{AddressSpace, Error, Event, NotifierRegistry, OffsetPhysMem, Region, RegionFlags, Result, VaRange};

use crate::memory::frames::FrameAllocator;
use crate::memory::paging::{self, ADDR_MASK, ENTRIES, HUGE, NO_EXECUTE, PRESENT, USER, WRITABLE};
use crate::memory::phys::PHYS_OFFSET;
use crate::memory::{PAGE_SIZE, PhysFrame};
use crate::smp::MAX_CPUS;
use crate::sync::{RwLock, RwReadGuard, SpinLock};
use crate::{apic, cpu, tlb};

/// First user address: PML4 slot 0 belongs to the kernel's identity map.
pub const USER_START: u64 = 1 << 39;
/// First address above user space (exclusive end of the lower half).
pub const USER_END: u64 = 1 << 47;
/// Size of a huge (level-2, PS) leaf.
pub const HUGE_SIZE: u64 = 2 << 20;
/// Most regions per process.
pub const MAX_REGIONS: usize = 8;

/// A page-aligned range, validated for x86_64 4-level paging.
pub fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(start, len).unwrap_or_else(|e| panic!("bad range {start:#x}+{len:#x}: {e}"))
}

/// Why a region change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Outside `[USER_START, USER_END)`, or a huge region not 2 MiB aligned.
    BadRange,
    /// Overlaps an existing region.
    Overlap,
    /// The range does not match existing regions exactly.
    NoRegion,
    /// No region slot left.
    TooManyRegions,
    /// Out of frames (or COW share slots).
    OutOfFrames,
}

/// One region (VMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    /// Range and permissions as hmm-core sees them.
    pub region: Region,
    /// Mapped with 2 MiB leaves on fault.
    pub huge: bool,
}

/// What the mmap lock protects: the regions.
#[derive(Debug, Default)]
pub struct Vm {
    regions: [Option<Vma>; MAX_REGIONS],
}

impl Vm {
    fn find(&self, va: u64) -> Option<Vma> {
        self.regions.iter().flatten().find(|v| v.region.range.contains_addr(va)).copied()
    }

    fn insert(&mut self, vma: Vma) -> core::result::Result<(), MapError> {
        if self.regions.iter().flatten().any(|v| v.region.range.overlaps(&vma.region.range)) {
            return Err(MapError::Overlap);
        }
        let slot = self.regions.iter_mut().find(|s| s.is_none()).ok_or(MapError::TooManyRegions)?;
        *slot = Some(vma);
        Ok(())
    }

    /// The region exactly covering `range`.
    fn exact(&mut self, range: VaRange) -> Option<&mut Option<Vma>> {
        self.regions.iter_mut().find(|s| s.is_some_and(|v| v.region.range == range))
    }
}

/// Kernel counters (all processes), for tests and the demo summary.
#[derive(Debug, Default)]
pub struct Stats {
    /// CPU page faults resolved by [`cpu_page_fault`].
    pub cpu_faults: AtomicU64,
    /// Calls of `handle_fault` (from CPU and device faults).
    pub handler_calls: AtomicU64,
    /// 4 KiB frames allocated zeroed by faults.
    pub demand_zero: AtomicU64,
    /// 2 MiB leaves allocated zeroed by faults.
    pub huge_leaves: AtomicU64,
    /// COW breaks that copied a frame.
    pub cow_copies: AtomicU64,
    /// Read-only pages made writable in place (no longer shared).
    pub upgrades: AtomicU64,
    /// `invalidate_range_start` calls made by the kernel.
    pub invalidations: AtomicU64,
    /// TSC cycles spent inside `invalidate_range_start` while some notifier
    /// was registered (the device callbacks, mirror clear, device TLB flush).
    pub invalidate_cycles: AtomicU64,
    /// Entries removed or downgraded under an invalidation.
    pub entries_changed: AtomicU64,
}

/// The kernel's counters.
pub static STATS: Stats = Stats {
    cpu_faults: AtomicU64::new(0),
    handler_calls: AtomicU64::new(0),
    demand_zero: AtomicU64::new(0),
    huge_leaves: AtomicU64::new(0),
    cow_copies: AtomicU64::new(0),
    upgrades: AtomicU64::new(0),
    invalidations: AtomicU64::new(0),
    invalidate_cycles: AtomicU64::new(0),
    entries_changed: AtomicU64::new(0),
};

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The no-execute bit for user leaves: set once at boot if EFER.NXE is on.
static NX: AtomicU64 = AtomicU64::new(0);

/// Records whether NX is usable (boot CPU, before any process exists).
pub fn set_nx(enabled: bool) {
    NX.store(if enabled { NO_EXECUTE } else { 0 }, Ordering::Relaxed);
}

/// Directory entries: present, writable, user (leaves decide access).
const DIR: u64 = PRESENT | WRITABLE | USER;

fn leaf(frame: u64, writable: bool) -> u64 {
    frame | PRESENT | USER | NX.load(Ordering::Relaxed) | if writable { WRITABLE } else { 0 }
}

/// A user address space. See the module docs.
pub struct Process {
    // INVARIANT: allocated in `new`, freed only in `drop`; the kernel slots
    // are copies of the kernel table's entries.
    root: PhysFrame,
    phys: OffsetPhysMem,
    frames: &'static FrameAllocator,
    vm: RwLock<Vm>,
    pt: SpinLock<()>,
    notifiers: NotifierRegistry<FixedStore<8>, SpinWait>,
}

/// A translation of the CPU table, as hmm-core's snapshot reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the 4 KiB frame.
    pub frame: u64,
    /// Writable.
    pub writable: bool,
    /// log2 of the leaf size in pages (0 or 9).
    pub order: u32,
}

/// Which table level a slot lookup wants (kernel numbering: 2 = PD, 1 = PT).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Pd = 2,
    Pt = 1,
}

impl Process {
    /// An empty process: a PML4 whose kernel slots equal the kernel table's.
    pub fn new(frames: &'static FrameAllocator) -> core::result::Result<Self, MapError> {
        let root = frames.alloc_zeroed().ok_or(MapError::OutOfFrames)?;
        let kernel = tlb::kernel_root();
        for i in 0..ENTRIES {
            // SAFETY: `kernel` is the kernel PML4 (never freed) and `root` our
            // fresh table; both are offset mapped and `i < 512`.
            let (k, p) = unsafe { (paging::entry(kernel, i), paging::entry(root.start(), i)) };
            p.store(paging::load(k), Ordering::Relaxed);
        }
        assert!(kernel_slot(USER_START) == 0 && kernel_slot(USER_END - 1) == 0, "kernel uses a user PML4 slot");
        Ok(Self {
            root,
            // SAFETY: `paging::init_offset_map` maps all RAM (every frame the
            // allocator hands out) at PHYS_OFFSET in the kernel table, whose
            // slot every process table shares, on every CPU, for good.
            phys: unsafe { OffsetPhysMem::new(PHYS_OFFSET) },
            frames,
            vm: RwLock::new(Vm::default()),
            pt: SpinLock::new(()),
            notifiers: NotifierRegistry::new(),
        })
    }

    /// The PML4 frame.
    pub fn root_frame(&self) -> PhysFrame {
        self.root
    }

    /// Adds an anonymous region; pages appear on first touch (demand-zero).
    /// `huge`: faults map whole 2 MiB leaves (range must be 2 MiB aligned).
    pub fn mmap(&self, range: VaRange, flags: RegionFlags, huge: bool) -> core::result::Result<(), MapError> {
        check_user(range, huge)?;
        let mut vm = self.vm.write();
        vm.insert(Vma { region: Region { range, flags }, huge })?;
        if huge {
            // Page tables left behind by earlier 4 KiB regions are empty now
            // (the range overlaps no region): unlink and free them so the
            // directory entries can hold 2 MiB leaves. No read guard exists.
            for base in (range.start()..=range.last()).step_by(HUGE_SIZE as usize) {
                let Ok(slot) = self.slot(base, Level::Pd, false) else { continue };
                let value = paging::load(slot);
                if value & PRESENT != 0 && value & HUGE == 0 {
                    slot.store(0, Ordering::Release);
                    tlb::flush_page(self.root.start(), base); // also drops paging-structure caches
                    self.frames.free(PhysFrame::containing(value & ADDR_MASK));
                }
            }
        }
        trace!("mmap {} {:?}{}", Show(range), flags, if huge { " (2 MiB leaves)" } else { "" });
        Ok(())
    }

    /// Adds a region whose pages are allocated and filled by `fill(va, words)`
    /// before they become visible (`MAP_POPULATE` of a file, say): nobody
    /// ever sees them half written.
    pub fn mmap_populate(
        &self,
        range: VaRange,
        flags: RegionFlags,
        fill: &mut dyn FnMut(u64, &mut [u64; 512]),
    ) -> core::result::Result<(), MapError> {
        check_user(range, false)?;
        let mut vm = self.vm.write();
        vm.insert(Vma { region: Region { range, flags }, huge: false })?;
        let writable = flags.contains(RegionFlags::WRITE);
        for va in pages(range) {
            let filled = self.frames.alloc().and_then(|frame| {
                // SAFETY: a frame we own, offset mapped, 4 KiB = 512 u64s.
                fill(va, unsafe { &mut *frame.as_ptr::<[u64; 512]>() });
                let Ok(slot) = self.slot(va, Level::Pt, true) else {
                    self.frames.free(frame);
                    return None;
                };
                // Absent -> present: adds a translation, no invalidation.
                slot.store(leaf(frame.start(), writable), Ordering::Release);
                Some(())
            });
            if filled.is_none() {
                drop(vm);
                let _ = self.munmap(range);
                return Err(MapError::OutOfFrames);
            }
        }
        trace!("mmap {} {:?}, populated ({} pages)", Show(range), flags, range.pages(12));
        Ok(())
    }

    /// Removes the region covering exactly `range` and frees its pages,
    /// after invalidating them.
    pub fn munmap(&self, range: VaRange) -> core::result::Result<(), MapError> {
        let mut vm = self.vm.write();
        let slot = vm.exact(range).ok_or(MapError::NoRegion)?;
        let vma = slot.take().ok_or(MapError::NoRegion)?;
        let inv = self.invalidate_start(range, Event::Unmap);
        let mut n = 0;
        self.for_each_leaf(range, vma.huge, &mut |va, slot| {
            let old = slot.swap(0, Ordering::AcqRel);
            tlb::flush_page(self.root.start(), va);
            self.release(old, vma.huge);
            n += 1;
        });
        self.notifiers.invalidate_range_end(inv);
        bump(&STATS.entries_changed, n);
        trace!("munmap {}: {n} entries cleared, invlpg'd, frames freed (poisoned)", Show(range));
        Ok(())
    }

    /// Changes the permissions of the region covering exactly `range`. A
    /// write downgrade clears the writable bit of every present page under
    /// an invalidation; an upgrade lets the next write fault do it.
    pub fn mprotect(&self, range: VaRange, flags: RegionFlags) -> core::result::Result<(), MapError> {
        if !flags.contains(RegionFlags::READ) {
            return Err(MapError::BadRange); // no PROT_NONE here
        }
        let mut vm = self.vm.write();
        let vma = vm.exact(range).and_then(|s| s.as_mut()).ok_or(MapError::NoRegion)?;
        let (old, huge) = (vma.region.flags, vma.huge);
        vma.region.flags = flags;
        if !old.contains(RegionFlags::WRITE) || flags.contains(RegionFlags::WRITE) {
            trace!("mprotect {} {:?} -> {:?} (upgrade: no invalidation)", Show(range), old, flags);
            return Ok(());
        }
        let inv = self.invalidate_start(range, Event::ProtectionVma);
        let mut n = 0;
        self.for_each_leaf(range, huge, &mut |va, slot| {
            if slot.fetch_and(!WRITABLE, Ordering::AcqRel) & WRITABLE != 0 {
                tlb::flush_page(self.root.start(), va);
                n += 1;
            }
        });
        self.notifiers.invalidate_range_end(inv);
        bump(&STATS.entries_changed, n);
        trace!("mprotect {} {:?} -> {:?}: {n} entries made read-only, invlpg'd", Show(range), old, flags);
        Ok(())
    }

    /// A child process with the same regions, sharing every present 4 KiB
    /// page copy-on-write (read-only on both sides). Huge regions are not
    /// inherited (as with `MADV_DONTFORK`).
    pub fn fork(&self) -> core::result::Result<Process, MapError> {
        let vm = self.vm.write();
        let child = Process::new(self.frames)?;
        let mut result = Ok(());
        for vma in vm.regions.iter().flatten().filter(|v| !v.huge) {
            child.vm.write().insert(*vma)?;
            let range = vma.region.range;
            let inv = self.invalidate_start(range, Event::ProtectionPage);
            let mut n = 0;
            self.for_each_leaf(range, false, &mut |va, slot| {
                if result.is_err() {
                    return;
                }
                let frame = paging::load(slot) & ADDR_MASK;
                let Ok(child_slot) = child.slot(va, Level::Pt, true) else {
                    result = Err(MapError::OutOfFrames);
                    return;
                };
                if shared::get(frame).is_err() {
                    result = Err(MapError::OutOfFrames);
                    return;
                }
                if slot.fetch_and(!WRITABLE, Ordering::AcqRel) & WRITABLE != 0 {
                    tlb::flush_page(self.root.start(), va);
                }
                child_slot.store(leaf(frame, false), Ordering::Release);
                n += 1;
            });
            self.notifiers.invalidate_range_end(inv);
            bump(&STATS.entries_changed, n);
            trace!("fork: {} shared copy-on-write, {n} entries made read-only in both", Show(range));
            result?;
        }
        Ok(child)
    }

    /// The CPU table's translation of `va` (hmm-core's snapshot walker,
    /// under the mmap read lock).
    pub fn translate(&self, va: u64) -> Option<Translation> {
        let _guard = self.vm.read();
        // SAFETY: the read lock keeps every table allocated.
        unsafe { self.translate_unlocked(va) }
    }

    /// [`translate`](Self::translate) without the lock.
    ///
    /// # Safety
    /// No table of this process may be freed during the call: the caller
    /// holds the mmap lock, or runs inside an invalidation callback of this
    /// process (every change that invalidates holds the lock and frees no
    /// table).
    pub unsafe fn translate_unlocked(&self, va: u64) -> Option<Translation> {
        let mut out = [Pfn::NONE];
        // SAFETY: `root` is our live PML4; the caller keeps its tables.
        unsafe {
            hmm_core::pt::snapshot::<X86_64Level4, _>(&self.phys, self.root.start(), range(va & !0xfff, 4096), &mut out)
        }
        .ok()?;
        let p = out[0];
        p.is_valid().then(|| Translation { frame: p.phys(), writable: p.is_write(), order: p.order() })
    }

    /// Reads word `word` of the page at `va` through the offset map (the
    /// kernel looking into another process, like ptrace), without faulting.
    pub fn peek(&self, va: u64, word: usize) -> Option<u64> {
        let t = self.translate(va)?;
        // SAFETY: the frame is mapped by our table, so it is allocated RAM
        // (offset mapped); a racing unmap could free it, which the callers
        // (single-threaded checks) exclude.
        Some(unsafe { ptr::read_volatile(PhysFrame::containing(t.frame).as_ptr::<u64>().add(word)) })
    }

    /// Runs the process on this CPU: loads its table into CR3 until the guard
    /// drops. User addresses are then reachable with [`Running::read`] /
    /// [`Running::write`], page faults resolved by [`cpu_page_fault`].
    pub fn enter(&self) -> Running<'_> {
        let me = apic::current_id() as usize;
        let was = RUNNING[me].swap(self as *const Self as *mut Self, Ordering::SeqCst);
        assert!(was.is_null(), "cpu {me} already runs a process");
        // SAFETY: our PML4 maps the kernel exactly as the kernel table does
        // (the kernel slots are copies), and it stays live while the guard
        // borrows `self`.
        unsafe { tlb::switch_to(self.root.start()) };
        Running { _process: PhantomData }
    }

    /// `invalidate_range_start`, counted and timed.
    fn invalidate_start(&self, range: VaRange, event: Event) -> hmm_core::notifier::Invalidation {
        bump(&STATS.invalidations, 1);
        let watched = !self.notifiers.is_empty();
        let t0 = cpu::rdtsc();
        let inv = self
            .notifiers
            .invalidate_range_start(range, event, true)
            .unwrap_or_else(|e| panic!("blockable invalidation refused: {e}"));
        if watched {
            bump(&STATS.invalidate_cycles, cpu::rdtsc() - t0);
        }
        inv
    }

    /// Calls `f(va, entry)` for every present leaf in `range` (4 KiB leaves,
    /// or 2 MiB leaves if `huge`). Caller holds the mmap lock for writing.
    fn for_each_leaf(&self, range: VaRange, huge: bool, f: &mut dyn FnMut(u64, &AtomicU64)) {
        let (step, level) = if huge { (HUGE_SIZE, Level::Pd) } else { (PAGE_SIZE, Level::Pt) };
        let mut va = range.start();
        while va <= range.last() {
            if let Ok(slot) = self.slot(va, level, false)
                && paging::load(slot) & PRESENT != 0
            {
                f(va, slot);
            }
            va += step;
        }
    }

    /// Gives back the frame(s) of a leaf that was just removed and flushed.
    fn release(&self, entry: u64, huge: bool) {
        let frame = entry & ADDR_MASK;
        if huge {
            for i in 0..512 {
                self.frames.free(PhysFrame::containing(frame + i * PAGE_SIZE));
            }
        } else {
            shared::put(self.frames, frame);
        }
    }

    /// The entry for `va` at `level`, creating missing directories if
    /// `create`. `Err(NoMemory)`: no frame for a directory; `Err(Fault)`: a
    /// directory is missing (without `create`) or a huge leaf is in the way.
    /// Caller holds the mmap lock (either side), which keeps tables live.
    fn slot(&self, va: u64, level: Level, create: bool) -> Result<&AtomicU64> {
        let mut table = self.root.start();
        for l in (level as u32 + 1..=4).rev() {
            // SAFETY: `table` is one of our table frames (root or linked from
            // it); tables are freed only with the mmap lock held for writing
            // (`mmap` of a huge region, `drop`), and the caller holds it;
            // `index` is below 512.
            let e = unsafe { paging::entry(table, paging::index(va, l)) };
            let mut value = paging::load(e);
            if value & PRESENT == 0 {
                if !create {
                    return Err(Error::Fault);
                }
                let frame = self.frames.alloc_zeroed().ok_or(Error::NoMemory)?;
                // A new empty directory changes no translation. Two creators
                // race only under the read side; the loser frees its frame.
                value = frame.start() | DIR;
                if let Err(now) = e.compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire) {
                    self.frames.free(frame);
                    value = now;
                }
            }
            if value & HUGE != 0 {
                return Err(Error::Fault);
            }
            table = value & ADDR_MASK;
        }
        // SAFETY: as above, `table` is now our table at `level`.
        Ok(unsafe { paging::entry(table, paging::index(va, level as u32)) })
    }

    /// Resolves one 4 KiB page of `vma` (see `handle_fault`).
    fn fault_page(&self, vma: &Vma, va: u64, write: bool) -> Result<()> {
        let writable = vma.region.flags.contains(RegionFlags::WRITE);
        loop {
            let pt = self.pt.lock();
            let slot = self.slot(va, Level::Pt, true)?;
            let raw = paging::load(slot);
            if raw & PRESENT == 0 {
                let frame = self.frames.alloc_zeroed().ok_or(Error::NoMemory)?;
                slot.store(leaf(frame.start(), writable), Ordering::Release);
                bump(&STATS.demand_zero, 1);
                drop(pt);
                trace!("demand-zero {va:#x} -> {frame}{}", if writable { " (rw)" } else { " (ro)" });
                return Ok(());
            }
            if !write || raw & WRITABLE != 0 {
                return Ok(()); // someone else resolved it
            }
            let old = raw & ADDR_MASK;
            if !shared::is_shared(old) {
                // Ours alone: upgrade in place (more permission, same frame).
                slot.fetch_or(WRITABLE, Ordering::AcqRel);
                bump(&STATS.upgrades, 1);
                return Ok(());
            }
            drop(pt);
            let new = self.frames.alloc().ok_or(Error::NoMemory)?;
            // SAFETY: `old` stays allocated: our own entry keeps a share, and
            // only munmap/drop (excluded by the read side we hold) drop it.
            // `new` is ours. Both are offset mapped, 4 KiB, distinct.
            unsafe { ptr::copy_nonoverlapping(PhysFrame::containing(old).as_ptr::<u8>(), new.as_ptr::<u8>(), 4096) };
            let inv = self.invalidate_start(range(va, PAGE_SIZE), Event::ProtectionPage);
            let swapped = {
                let _pt = self.pt.lock();
                slot.compare_exchange(raw, leaf(new.start(), true), Ordering::AcqRel, Ordering::Acquire).is_ok()
            };
            if !swapped {
                // Resolved or changed meanwhile (or the MMU set A/D): retry.
                self.notifiers.invalidate_range_end(inv);
                self.frames.free(new);
                continue;
            }
            tlb::flush_page(self.root.start(), va);
            shared::put(self.frames, old);
            self.notifiers.invalidate_range_end(inv);
            bump(&STATS.cow_copies, 1);
            bump(&STATS.entries_changed, 1);
            trace!("COW break at {va:#x}: frame@{old:#x} -> {new}, old entry invalidated and invlpg'd");
            return Ok(());
        }
    }

    /// Resolves the 2 MiB leaf containing `va` in a huge region.
    fn fault_huge(&self, vma: &Vma, va: u64, write: bool) -> Result<()> {
        let writable = vma.region.flags.contains(RegionFlags::WRITE);
        let base = va & !(HUGE_SIZE - 1);
        let _pt = self.pt.lock();
        let slot = self.slot(base, Level::Pd, true)?;
        let raw = paging::load(slot);
        if raw & PRESENT == 0 {
            let chunk = self.frames.alloc_aligned(9).ok_or(Error::NoMemory)?;
            // SAFETY: 512 contiguous frames we own, offset mapped.
            unsafe { ptr::write_bytes(chunk.as_ptr::<u8>(), 0, HUGE_SIZE as usize) };
            slot.store(leaf(chunk.start(), writable) | HUGE, Ordering::Release);
            bump(&STATS.huge_leaves, 1);
            trace!("demand-zero 2 MiB leaf at {base:#x} -> {chunk}..+2M");
        } else if write && raw & WRITABLE == 0 {
            slot.fetch_or(WRITABLE, Ordering::AcqRel); // huge pages are never shared
            bump(&STATS.upgrades, 1);
        }
        Ok(())
    }
}

/// Validates a new region's range.
fn check_user(range: VaRange, huge: bool) -> core::result::Result<(), MapError> {
    let aligned = !huge || (range.start().is_multiple_of(HUGE_SIZE) && (range.last() + 1).is_multiple_of(HUGE_SIZE));
    if range.start() < USER_START || range.last() >= USER_END || !aligned {
        return Err(MapError::BadRange);
    }
    Ok(())
}

/// Every 4 KiB page address of `range`.
pub fn pages(range: VaRange) -> impl Iterator<Item = u64> {
    (range.start()..=range.last()).step_by(PAGE_SIZE as usize)
}

/// Nonzero if the kernel table uses the PML4 slot of `va`.
fn kernel_slot(va: u64) -> u64 {
    // SAFETY: the kernel PML4 is live forever; the index is below 512.
    paging::load(unsafe { paging::entry(tlb::kernel_root(), paging::index(va, 4)) })
}

// SAFETY: (1) `root` is our live x86_64 4-level PML4 for our whole lifetime,
// reached through the offset map that covers all RAM; (2) table frames are
// freed only in `drop` (`&mut self`, so no read guard exists); (3) every
// removal, replacement or downgrade (munmap, mprotect, fork, COW break) is
// bracketed by `invalidate_range_start`/`end` on `notifiers`, and old frames
// are freed after the start returned and the TLB flush; teardown calls
// `release`; (4) entries are written with atomic stores, swaps and RMWs.
unsafe impl AddressSpace for Process {
    type Format = X86_64Level4;
    type Phys = OffsetPhysMem;
    type Store = FixedStore<8>;
    type Wait = SpinWait;
    type ReadGuard<'a> = RwReadGuard<'a, Vm>;

    fn phys(&self) -> &OffsetPhysMem {
        &self.phys
    }

    fn root(&self) -> u64 {
        self.root.start()
    }

    fn notifiers(&self) -> &NotifierRegistry<FixedStore<8>, SpinWait> {
        &self.notifiers
    }

    fn read_lock(&self) -> RwReadGuard<'_, Vm> {
        self.vm.read()
    }

    fn region<'g>(&'g self, guard: &RwReadGuard<'g, Vm>, va: u64) -> Option<Region> {
        guard.find(va).map(|v| v.region)
    }

    fn handle_fault<'g>(&'g self, guard: &RwReadGuard<'g, Vm>, range: VaRange, write: bool) -> Result<()> {
        bump(&STATS.handler_calls, 1);
        let vma = guard.find(range.start()).ok_or(Error::Fault)?;
        if !vma.region.range.contains(&range) {
            return Err(Error::Fault);
        }
        if write && !vma.region.flags.contains(RegionFlags::WRITE) {
            return Err(Error::Perm);
        }
        let mut va = range.start();
        loop {
            if vma.huge {
                self.fault_huge(&vma, va, write)?;
                va = (va | (HUGE_SIZE - 1)).min(range.last()) - (PAGE_SIZE - 1);
            } else {
                self.fault_page(&vma, va, write)?;
            }
            if va + (PAGE_SIZE - 1) >= range.last() {
                return Ok(());
            }
            va += PAGE_SIZE;
        }
    }
}

impl Drop for Process {
    /// Tells every notifier the space is going away, then frees all user
    /// frames and tables. The process must not be loaded on any CPU.
    fn drop(&mut self) {
        assert!(tlb::loaded_anywhere(self.root.start()).is_none(), "dropping a process that a CPU still runs");
        self.notifiers.release();
        for i in 0..ENTRIES {
            // SAFETY: our root, live until the end of this function.
            let e = unsafe { paging::entry(self.root.start(), i) };
            let value = paging::load(e);
            if value & PRESENT != 0 && kernel_slot((i as u64) << 39) == 0 {
                self.free_table(value & ADDR_MASK, 3);
            }
        }
        self.frames.free(self.root);
    }
}

impl Process {
    /// Frees everything below the level-`level` table `table`, then the table.
    fn free_table(&self, table: u64, level: u32) {
        for i in 0..ENTRIES {
            // SAFETY: one of our tables; nobody else walks them any more
            // (`drop`: no guard, not loaded, notifiers released).
            let value = paging::load(unsafe { paging::entry(table, i) });
            if value & PRESENT == 0 {
                continue;
            }
            if level == 1 || value & HUGE != 0 {
                self.release(value, value & HUGE != 0);
            } else {
                self.free_table(value & ADDR_MASK, level - 1);
            }
        }
        self.frames.free(PhysFrame::containing(table));
    }
}

/// The process each CPU runs (null: none), for the page-fault handler.
static RUNNING: [AtomicPtr<Process>; MAX_CPUS] = [const { AtomicPtr::new(ptr::null_mut()) }; MAX_CPUS];
/// Set while a CPU is inside [`cpu_page_fault`] (a fault in there is fatal).
static IN_FAULT: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// A process running on this CPU (its table in CR3); see [`Process::enter`].
pub struct Running<'a> {
    _process: PhantomData<&'a Process>,
}

impl Running<'_> {
    fn user_ptr(va: u64) -> *mut u64 {
        assert!((USER_START..USER_END).contains(&va) && va.is_multiple_of(8), "bad user address {va:#x}");
        va as *mut u64
    }

    /// A load from user address `va`, through the MMU.
    pub fn read(&self, va: u64) -> u64 {
        // SAFETY: CR3 holds this process's table while `self` lives; a
        // not-present page faults into `cpu_page_fault`, which maps it or
        // reports a fatal fault; the frame behind it is RAM. Volatile: the
        // device may write it concurrently.
        unsafe { ptr::read_volatile(Self::user_ptr(va)) }
    }

    /// A store to user address `va`, through the MMU (faults do demand-zero
    /// and COW breaks; a store to a read-only region is fatal).
    pub fn write(&self, va: u64, value: u64) {
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile(Self::user_ptr(va), value) }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // SAFETY: the kernel table maps the kernel.
        unsafe { tlb::switch_to(0) };
        RUNNING[apic::current_id() as usize].store(ptr::null_mut(), Ordering::SeqCst);
    }
}

/// The #PF handler's entry for faults on user addresses: resolves the fault
/// through the running process's `handle_fault` (under the mmap read lock).
/// Returns false if it cannot (no process, no region, write to a read-only
/// region, nested fault): the exception is then fatal.
pub fn cpu_page_fault(addr: u64, error_code: u64) -> bool {
    const RESERVED_BIT: u64 = 1 << 3;
    let me = apic::current_id() as usize;
    let process = RUNNING[me].load(Ordering::SeqCst);
    if process.is_null() || !(USER_START..USER_END).contains(&addr) || error_code & RESERVED_BIT != 0 {
        return false;
    }
    if IN_FAULT[me].swap(true, Ordering::Relaxed) {
        return false;
    }
    // SAFETY: RUNNING holds a process only while a `Running` guard borrows it
    // on this CPU, and we are on this CPU inside that borrow.
    let process = unsafe { &*process };
    let write = error_code & 2 != 0;
    let resolved = {
        let guard = process.vm.read();
        match guard.find(addr) {
            Some(vma) if !write || vma.region.flags.contains(RegionFlags::WRITE) => {
                process.handle_fault(&guard, range(addr & !0xfff, PAGE_SIZE), write).is_ok()
            }
            _ => false,
        }
    };
    if resolved {
        bump(&STATS.cpu_faults, 1);
    }
    IN_FAULT[me].store(false, Ordering::Relaxed);
    resolved
}

/// Shows a range as `[start, end)`.
pub struct Show(pub VaRange);

impl core::fmt::Display for Show {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.0.start(), self.0.last() + 1)
    }
}

/// Share counts of frames mapped by more than one process (after fork). A
/// frame not listed has one owner.
pub mod shared {
    use crate::memory::PhysFrame;
    use crate::memory::frames::FrameAllocator;
    use crate::sync::SpinLock;

    const SLOTS: usize = 1024;

    struct Table {
        /// (frame, owners >= 2)
        entries: [(u64, u32); SLOTS],
        len: usize,
    }

    static TABLE: SpinLock<Table> = SpinLock::new(Table { entries: [(0, 0); SLOTS], len: 0 });

    /// Adds an owner to `frame`. `Err` when the table is full.
    pub fn get(frame: u64) -> Result<(), ()> {
        let mut t = TABLE.lock();
        let len = t.len;
        if let Some(e) = t.entries[..len].iter_mut().find(|e| e.0 == frame) {
            e.1 += 1;
            return Ok(());
        }
        if len == SLOTS {
            return Err(());
        }
        t.entries[len] = (frame, 2);
        t.len += 1;
        Ok(())
    }

    /// Whether `frame` has more than one owner.
    pub fn is_shared(frame: u64) -> bool {
        let t = TABLE.lock();
        t.entries[..t.len].iter().any(|e| e.0 == frame)
    }

    /// Drops an owner of `frame`; frees (poisons) it when it was the last.
    pub fn put(frames: &FrameAllocator, frame: u64) {
        let mut t = TABLE.lock();
        let len = t.len;
        if let Some(i) = t.entries[..len].iter().position(|e| e.0 == frame) {
            t.entries[i].1 -= 1;
            if t.entries[i].1 == 1 {
                t.entries[i] = t.entries[len - 1];
                t.len -= 1;
            }
            return;
        }
        drop(t);
        frames.free(PhysFrame::containing(frame));
    }

    /// Frames currently shared (for leak checks).
    pub fn count() -> usize {
        TABLE.lock().len
    }
}
