//! A process address space: a private set of x86_64 4-level page tables
//! describing user pages (the lower canonical half), built with frames from
//! the frame allocator and edited through the offset map.
//!
//! The table is never loaded into CR3. It exists so that a "device" can
//! mirror it: the device side walks it in software ([`walk`]) and the
//! [`InvalidateHook`] tells the mirror about every change before it happens.
//! That is the contract hmm-core builds on, so it is kept strict:
//!
//! 1. every change of a leaf entry goes through `AddressSpace::change_pte`,
//! 2. which calls `hook.invalidate_start(range, kind)` BEFORE the entry
//!    changes (the mirror drops its copy of the translation),
//! 3. then swaps the entry,
//! 4. then flushes (`invlpg` if this table were the live CR3; a real kernel
//!    would also shoot down other CPUs' TLBs here),
//! 5. then calls `hook.invalidate_end(range, kind)`,
//! 6. and only after that is the old frame handed back (`unmap`) or freed
//!    (`unmap_and_free`, `Drop`) — so no mirror can still reach a frame that
//!    the allocator is about to poison and reuse.
//!
//! Installing an intermediate table (PDPT/PD/PT) does not go through the hook:
//! it turns a non-present entry into a pointer to an empty table, which
//! changes no translation.
//!
//! Mutators take `&self` and serialise on an internal lock; readers
//! ([`AddressSpace::translate`], [`walk`]) are lock-free atomic loads, so a
//! device on another CPU may walk while the owner edits.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;
use crate::memory::frames::FrameAllocator;
use crate::memory::paging::{self, ADDR_MASK, ENTRIES, HUGE, NO_EXECUTE, PRESENT, USER, WRITABLE};
use crate::memory::{PAGE_SIZE, PhysFrame};
use crate::sync::SpinLock;

/// First address above user space (exclusive end of the lower half).
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// A half-open virtual address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaRange {
    pub start: u64,
    pub end: u64,
}

impl VaRange {
    /// The 4 KiB page containing `va`.
    pub const fn page(va: u64) -> Self {
        let start = va & !(PAGE_SIZE - 1);
        Self { start, end: start + PAGE_SIZE }
    }
}

impl core::fmt::Display for VaRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

/// What is about to happen to a range (passed to [`InvalidateHook`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Non-present -> present. Nothing can be cached yet; mirrors may ignore.
    Map,
    /// Present -> non-present; the frame is returned or freed afterwards.
    Unmap,
    /// Permission change of a present entry (`writable` is the new state).
    Protect { writable: bool },
    /// The whole address space is being torn down (`Drop`).
    Release,
}

/// Observer of page-table changes (the slot hmm-core's mirror plugs into).
///
/// Called with the address space's mutation lock held, on the CPU doing the
/// change. Implementations must not call back into the same `AddressSpace`'s
/// mutators (that would deadlock); reading through [`walk`] is fine.
pub trait InvalidateHook: Sync {
    /// Before the entries for `range` change. After this returns the mirror
    /// must no longer use any translation it cached for `range`.
    fn invalidate_start(&self, range: VaRange, kind: ChangeKind);

    /// After the change is visible and flushed. Default: nothing.
    fn invalidate_end(&self, _range: VaRange, _kind: ChangeKind) {}
}

/// The default hook: does nothing.
pub struct NoopHook;

impl InvalidateHook for NoopHook {
    fn invalidate_start(&self, _range: VaRange, _kind: ChangeKind) {}
}

/// Result of a successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical frame holding the page (for huge pages: the 4 KiB frame that
    /// contains `paddr`).
    pub frame: PhysFrame,
    /// Physical address corresponding to the translated virtual address.
    pub paddr: u64,
    pub writable: bool,
    pub user: bool,
    pub executable: bool,
}

/// Why a mutation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Address not 4 KiB aligned.
    Unaligned(u64),
    /// Address outside user space `[0, USER_END)`.
    NotUser(u64),
    /// `map` on an address that is already mapped.
    AlreadyMapped(u64),
    /// `protect` on an address that is not mapped.
    NotMapped(u64),
    /// No frame left for an intermediate page table.
    OutOfFrames,
}

struct Inner {
    hook: &'static dyn InvalidateHook,
}

/// A user address space (see the module docs).
pub struct AddressSpace {
    root: PhysFrame,
    frames: &'static FrameAllocator,
    inner: SpinLock<Inner>,
    generation: AtomicU64,
}

static NOOP: NoopHook = NoopHook;

fn check_user_page(va: u64) -> Result<(), MapError> {
    if !va.is_multiple_of(PAGE_SIZE) {
        Err(MapError::Unaligned(va))
    } else if va >= USER_END {
        Err(MapError::NotUser(va))
    } else {
        Ok(())
    }
}

impl AddressSpace {
    /// Creates an empty address space (a zeroed PML4) with the no-op hook.
    pub fn new(frames: &'static FrameAllocator) -> Result<Self, MapError> {
        Self::with_hook(frames, &NOOP)
    }

    /// Creates an empty address space that reports changes to `hook`.
    pub fn with_hook(frames: &'static FrameAllocator, hook: &'static dyn InvalidateHook) -> Result<Self, MapError> {
        let root = frames.alloc_zeroed().ok_or(MapError::OutOfFrames)?;
        Ok(Self { root, frames, inner: SpinLock::new(Inner { hook }), generation: AtomicU64::new(0) })
    }

    /// Replaces the hook (e.g. when a mirror attaches).
    pub fn set_hook(&self, hook: &'static dyn InvalidateHook) {
        self.inner.lock().hook = hook;
    }

    /// Physical frame of the PML4: what a device would be given as its page
    /// table base.
    pub fn root(&self) -> PhysFrame {
        self.root
    }

    /// Number of completed leaf changes so far; a mirror can compare it before
    /// and after a walk to detect a concurrent change (seqcount style).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Maps the user page at `va` to `frame` (present, user, no-execute,
    /// writable if asked). The address space owns `frame` until it is
    /// unmapped (or freed on `Drop`).
    pub fn map(&self, va: u64, frame: PhysFrame, writable: bool) -> Result<(), MapError> {
        check_user_page(va)?;
        let inner = self.inner.lock();
        let slot = self.leaf_slot(va, true)?.ok_or(MapError::OutOfFrames)?;
        if paging::load(slot) & PRESENT != 0 {
            return Err(MapError::AlreadyMapped(va));
        }
        let new = frame.start() | PRESENT | USER | NO_EXECUTE | if writable { WRITABLE } else { 0 };
        self.change_pte(&inner, slot, va, new, ChangeKind::Map);
        Ok(())
    }

    /// Unmaps the page at `va` and returns its frame to the caller, who now
    /// owns it. By the time this returns, the hook has run and the entry is
    /// flushed, so freeing the frame is safe. `None` if nothing was mapped.
    pub fn unmap(&self, va: u64) -> Option<PhysFrame> {
        check_user_page(va).ok()?;
        let inner = self.inner.lock();
        let slot = self.leaf_slot(va, false).ok()??;
        if paging::load(slot) & PRESENT == 0 {
            return None;
        }
        let old = self.change_pte(&inner, slot, va, 0, ChangeKind::Unmap);
        Some(PhysFrame::containing(old & ADDR_MASK))
    }

    /// [`Self::unmap`], then frees the frame to the allocator (which poisons
    /// it). Returns whether something was mapped.
    pub fn unmap_and_free(&self, va: u64) -> bool {
        match self.unmap(va) {
            Some(frame) => {
                self.frames.free(frame);
                true
            }
            None => false,
        }
    }

    /// Makes the page at `va` writable or read-only.
    pub fn protect(&self, va: u64, writable: bool) -> Result<(), MapError> {
        check_user_page(va)?;
        let inner = self.inner.lock();
        let slot = self.leaf_slot(va, false)?.ok_or(MapError::NotMapped(va))?;
        let old = paging::load(slot);
        if old & PRESENT == 0 {
            return Err(MapError::NotMapped(va));
        }
        let new = if writable { old | WRITABLE } else { old & !WRITABLE };
        self.change_pte(&inner, slot, va, new, ChangeKind::Protect { writable });
        Ok(())
    }

    /// Software walk of this address space (lock-free).
    pub fn translate(&self, va: u64) -> Option<Translation> {
        // SAFETY: `self.root` and all tables below it stay allocated while
        // `self` is alive (tables are only freed in `Drop`).
        unsafe { walk(self.root, va) }
    }

    /// THE single place where a leaf entry changes (see module docs for the
    /// order). Caller holds the mutation lock (`inner` is borrowed from its guard). Returns
    /// the old entry.
    fn change_pte(&self, inner: &Inner, slot: &AtomicU64, va: u64, new: u64, kind: ChangeKind) -> u64 {
        let range = VaRange::page(va);
        inner.hook.invalidate_start(range, kind);
        let old = slot.swap(new, Ordering::AcqRel);
        self.flush(range);
        self.generation.fetch_add(1, Ordering::Release);
        inner.hook.invalidate_end(range, kind);
        old
    }

    /// TLB maintenance after a leaf change. This table is never the live CR3
    /// in this kernel, so only the check remains; a real kernel would
    /// `invlpg` locally and send shootdown IPIs to other CPUs here.
    fn flush(&self, range: VaRange) {
        if cpu::read_cr3() & ADDR_MASK == self.root.start() {
            let mut va = range.start;
            while va < range.end {
                cpu::invlpg(va);
                va += PAGE_SIZE;
            }
        }
    }

    /// Finds the PT entry for `va`, creating missing intermediate tables if
    /// `create`. `Ok(None)`: a table is missing and `create` is false.
    /// Caller holds the mutation lock.
    fn leaf_slot(&self, va: u64, create: bool) -> Result<Option<&AtomicU64>, MapError> {
        let mut table = self.root.start();
        for level in [4, 3, 2] {
            // SAFETY: `table` is a page-table frame owned by this address
            // space (root or installed below), alive while `self` is.
            let e = unsafe { paging::entry(table, paging::index(va, level)) };
            let mut value = paging::load(e);
            if value & PRESENT == 0 {
                if !create {
                    return Ok(None);
                }
                let new_table = self.frames.alloc_zeroed().ok_or(MapError::OutOfFrames)?;
                // Upper levels are permissive; the leaf decides access rights.
                value = new_table.start() | PRESENT | WRITABLE | USER;
                e.store(value, Ordering::Release);
            }
            assert!(value & HUGE == 0, "huge pages are never created in a process space");
            table = value & ADDR_MASK;
        }
        // SAFETY: as above, `table` is now this space's PT for `va`.
        Ok(Some(unsafe { paging::entry(table, paging::index(va, 1)) }))
    }
}

impl Drop for AddressSpace {
    /// Unmaps and frees every user page (hook kind `Release`), then frees all
    /// page-table frames bottom-up.
    fn drop(&mut self) {
        let inner = self.inner.lock();
        free_table(self, &inner, self.root.start(), 4, 0);
        drop(inner);
        self.frames.free(self.root);
    }
}

/// Tears down the subtree of `table` (a level-`level` table covering VAs from
/// `base`), freeing everything below it but not `table` itself.
fn free_table(space: &AddressSpace, inner: &Inner, table: u64, level: u32, base: u64) {
    for i in 0..ENTRIES {
        // SAFETY: `table` belongs to `space`, which is being dropped; nobody
        // else may walk it any more (the hook is told via `Release`).
        let e = unsafe { paging::entry(table, i) };
        let value = paging::load(e);
        if value & PRESENT == 0 {
            continue;
        }
        let va = base | ((i as u64) << (12 + 9 * (level - 1)));
        if level == 1 {
            let old = space.change_pte(inner, e, va, 0, ChangeKind::Release);
            space.frames.free(PhysFrame::containing(old & ADDR_MASK));
        } else {
            free_table(space, inner, value & ADDR_MASK, level - 1, va);
            e.store(0, Ordering::Release);
            space.frames.free(PhysFrame::containing(value & ADDR_MASK));
        }
    }
}

/// Software page walk of any address space given its root (PML4) frame, the
/// way a device with its own MMU would do it. Handles 1 GiB / 2 MiB leaves
/// too, though this module only creates 4 KiB ones.
///
/// # Safety
/// `root` must be the root of a live [`AddressSpace`] that is not dropped
/// during the call (its tables must stay allocated). Concurrent mutation is
/// fine: every entry is read atomically, and the result is a snapshot that
/// `AddressSpace::generation` / the hook can invalidate.
pub unsafe fn walk(root: PhysFrame, va: u64) -> Option<Translation> {
    if va >= USER_END {
        return None;
    }
    let mut table = root.start();
    let mut writable = true;
    let mut user = true;
    let mut executable = true;
    for level in [4u32, 3, 2, 1] {
        // SAFETY: forwarded to the caller: `table` is a live page-table frame
        // of the address space rooted at `root`.
        let value = paging::load(unsafe { paging::entry(table, paging::index(va, level)) });
        if value & PRESENT == 0 {
            return None;
        }
        writable &= value & WRITABLE != 0;
        user &= value & USER != 0;
        executable &= value & NO_EXECUTE == 0;
        let leaf = level == 1 || (value & HUGE != 0 && level <= 3);
        if leaf {
            let page_mask = (1u64 << (12 + 9 * (level - 1))) - 1;
            let paddr = (value & ADDR_MASK & !page_mask) | (va & page_mask);
            return Some(Translation { frame: PhysFrame::containing(paddr), paddr, writable, user, executable });
        }
        table = value & ADDR_MASK;
    }
    None
}
