//! Loom only: page-table entries that loom can see.
//!
//! hmm-core reaches every page-table entry (the CPU tables it walks, its own
//! mirror table) through `crate::phys::entry`, an atomic over `PhysMem`
//! memory. A `core` atomic is invisible to loom: loom would neither interleave
//! threads around entry accesses nor let a load return anything but the latest
//! store. Under `--cfg loom`, `entry` therefore returns an [`AtomicEntry`]:
//! the same memory word, with the same methods, modelled per frame (the
//! 4 KiB-aligned 4 KiB of host memory holding it) in one of two ways:
//!
//! - [`Entries::Atomic`] (the default): each entry is a loom `AtomicU64`
//!   *shadow*, kept in a per-execution table keyed by the entry's address.
//!   The shadow is the value: every access is a loom atomic operation with the
//!   ordering the caller passed, so loom interleaves threads around it and
//!   chooses which store a load reads, as weakly as the memory model allows.
//!   For tables read without a lock while others change them: a CPU page
//!   table walked by hmm-core while the kernel edits it, and hmm-core's
//!   mirror table, walked by device walkers (`MirrorTable::translate`)
//!   without a lock while faults and invalidations edit it under the update
//!   lock.
//! - [`Entries::LockOrdered`]: the entries are plain memory, and loom checks
//!   that every access of the frame happens after every conflicting one (a
//!   load is a read and a store a write of one loom cell per frame, which
//!   panics with "Causality violation" otherwise). Only for tables that all
//!   users access under one lock, or while a single thread runs (a test
//!   kernel's setup and teardown, where it spares loom the atomics of
//!   512-entry loops inside [`exclusive`]): there atomic accesses could only
//!   return the latest value anyway. Not for a mirror table while device
//!   walkers may run: they take no lock.
//!
//! A test kernel performs its own entry accesses through
//! [`AtomicEntry::from_ptr`], so both sides meet in the same shadows; says how
//! each frame is modelled with [`model_frame`]; rewrites frames behind the
//! entries' back (zeroing, poisoning) only with [`fill`]; and may run its
//! single-threaded setup and teardown under [`exclusive`], which saves loom
//! the bookkeeping of hmm-core's 512-entry loops there.
//!
//! A shadow is created by the first access of its entry in an execution (or
//! the first after [`fill`] / [`model_frame`]), from the memory word, as if
//! the accessing thread had just initialised it: loom then requires every
//! later access to happen after that one. An entry that several threads race
//! on must therefore be accessed first on the thread that spawns them (a test
//! kernel touches its tables at setup). Every store also writes the memory
//! word, so memory holds the latest store in loom's execution order.
//!
//! In both modes each access is also a read of the frame's cell, and [`fill`]
//! and [`model_frame`] are writes of it: an access of a frame that races with
//! its poisoning on free is reported as a causality violation.
//!
//! The tables are per execution: kept in a thread-local of the OS thread that
//! runs the model (loom runs all its threads on it, one at a time), created by
//! the first use in an execution and dropped at its end through a
//! `loom::lazy_static` guard. No loom operation that could switch threads runs
//! while they are borrowed. (An execution that panics ends its model and
//! leaves its tables behind on that thread: run one model per test thread, as
//! libtest does.)

extern crate std;

use core::cell::RefCell;
use core::sync::atomic::Ordering;
use loom::cell::UnsafeCell as LoomUnsafeCell;
use loom::sync::atomic::AtomicU64 as LoomU64;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

const FRAME: usize = 4096;

/// How the entries of a frame are modelled (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// Each entry is a loom atomic.
    Atomic,
    /// Plain memory; loom checks that all accesses are ordered.
    LockOrdered,
}

struct Frame {
    entries: Entries,
    /// Read by every entry access, written by `fill` and `model_frame`.
    life: Rc<LoomUnsafeCell<()>>,
}

#[derive(Default)]
struct Tables {
    /// Shadow of each entry of an `Atomic` frame accessed so far, by address.
    shadows: BTreeMap<usize, Rc<LoomU64>>,
    /// Every frame used so far, by address.
    frames: BTreeMap<usize, Frame>,
    /// Inside [`exclusive`]: the `LockOrdered` frames accessed so far.
    exclusive: Option<BTreeSet<usize>>,
}

impl Tables {
    fn frame(&mut self, frame: usize) -> &mut Frame {
        self.frames
            .entry(frame)
            .or_insert_with(|| Frame { entries: Entries::Atomic, life: Rc::new(LoomUnsafeCell::new(())) })
    }

    fn forget(&mut self, frame: usize) {
        let dead: std::vec::Vec<usize> = self.shadows.range(frame..frame + FRAME).map(|(&a, _)| a).collect();
        for addr in dead {
            self.shadows.remove(&addr);
        }
    }
}

std::thread_local! {
    /// The current execution's tables (`None` between executions).
    static TABLES: RefCell<Option<Tables>> = const { RefCell::new(None) };
}

/// Creates the tables when an execution first uses them; dropped by loom at
/// the end of the execution, and drops them.
struct Guard;

impl Guard {
    fn new() -> Self {
        TABLES.with(|t| *t.borrow_mut() = Some(Tables::default()));
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = TABLES.try_with(|t| t.borrow_mut().take());
    }
}

loom::lazy_static! {
    static ref GUARD: Guard = Guard::new();
}

/// Runs `f` on the current execution's tables. `f` must not switch threads.
fn with_tables<R>(f: impl FnOnce(&mut Tables) -> R) -> R {
    if TABLES.with(|t| t.borrow().is_none()) {
        let _: &Guard = &GUARD;
    }
    TABLES.with(|t| f(t.borrow_mut().as_mut().expect("loom_pte: tables outside a loom execution")))
}

/// One 64-bit page-table entry in memory, as loom sees it.
#[repr(transparent)]
#[derive(Debug)]
pub struct AtomicEntry(core::sync::atomic::AtomicU64);

impl AtomicEntry {
    /// The entry at `ptr`.
    ///
    /// # Safety
    /// As [`core::sync::atomic::AtomicU64::from_ptr`]: `ptr` is 8-byte
    /// aligned, valid for reads and writes for `'a`, and only accessed
    /// through atomics (or this type) meanwhile.
    #[inline]
    pub unsafe fn from_ptr<'a>(ptr: *mut u64) -> &'a Self {
        // SAFETY: the caller's guarantee; `AtomicEntry` is a transparent
        // `AtomicU64`, which has the layout of `u64`.
        unsafe { &*ptr.cast::<Self>() }
    }

    /// Records the access on the frame's cell (`write`: a store) and returns
    /// the shadow, or `None` for a `LockOrdered` frame (plain memory). The
    /// tables are no longer borrowed on return, before the caller's loom
    /// operation (which may switch threads).
    fn shadow(&self, write: bool) -> Option<Rc<LoomU64>> {
        let addr = self as *const Self as usize;
        let memory = &self.0;
        let (life, shadow) = with_tables(|t| {
            let frame = addr & !(FRAME - 1);
            let f = t.frame(frame);
            let life = Rc::clone(&f.life);
            if f.entries == Entries::LockOrdered {
                if let Some(touched) = t.exclusive.as_mut() {
                    touched.insert(frame);
                    return (None, None);
                }
                return (Some(life), None);
            }
            let shadow = t.shadows.entry(addr).or_insert_with(|| Rc::new(LoomU64::new(memory.load(Ordering::Relaxed))));
            (Some(life), Some(Rc::clone(shadow)))
        });
        match life {
            Some(life) if write && shadow.is_none() => life.with_mut(|_| ()),
            Some(life) => life.with(|_| ()),
            None => {}
        }
        shadow
    }

    /// Loads the entry.
    #[inline]
    pub fn load(&self, order: Ordering) -> u64 {
        match self.shadow(false) {
            Some(s) => s.load(order),
            None => self.0.load(Ordering::Relaxed),
        }
    }

    /// Stores `value` into the entry.
    #[inline]
    pub fn store(&self, value: u64, order: Ordering) {
        if let Some(s) = self.shadow(true) {
            s.store(value, order);
        }
        // No loom operation since the store took effect: this is the latest
        // store in execution order.
        self.0.store(value, Ordering::Relaxed);
    }

    /// Compare-and-exchange of the entry.
    #[inline]
    pub fn compare_exchange(&self, current: u64, new: u64, success: Ordering, failure: Ordering) -> Result<u64, u64> {
        let r = match self.shadow(true) {
            Some(s) => s.compare_exchange(current, new, success, failure),
            None => self.0.compare_exchange(current, new, Ordering::Relaxed, Ordering::Relaxed),
        };
        if r.is_ok() {
            self.0.store(new, Ordering::Relaxed);
        }
        r
    }
}

/// The cell of the frame at `frame`, with its shadows forgotten and, if
/// `entries` is given, its model changed.
fn reset_frame(frame: *const u8, entries: Option<Entries>) -> Rc<LoomUnsafeCell<()>> {
    let addr = frame as usize;
    assert_eq!(addr % FRAME, 0, "loom_pte: frame {frame:p} not 4 KiB-aligned");
    with_tables(|t| {
        t.forget(addr);
        let f = t.frame(addr);
        if let Some(entries) = entries {
            f.entries = entries;
        }
        Rc::clone(&f.life)
    })
}

/// Writes `byte` over the 4 KiB frame at `frame` as a plain memset (a write of
/// the frame's cell, no atomic operation) and forgets the shadows of its
/// entries, so the next access of each reads the new bytes. For a test kernel
/// zeroing a fresh frame or poisoning a freed one.
///
/// # Safety
/// `frame` is 4 KiB-aligned and valid for writes of 4 KiB, and the caller owns
/// the frame: an access not ordered with this call is a bug (loom reports
/// those of entries).
pub unsafe fn fill(frame: *mut u8, byte: u8) {
    reset_frame(frame, None).with_mut(|_| ());
    // SAFETY: the caller's guarantee.
    unsafe { core::ptr::write_bytes(frame, byte, FRAME) };
}

/// Chooses how the entries of the 4 KiB frame at `frame` are modelled from now
/// on (a write of the frame's cell: the caller must own the frame). Memory
/// keeps the latest values; shadows are created afresh from it.
pub fn model_frame(frame: *const u8, entries: Entries) {
    reset_frame(frame, Some(entries)).with_mut(|_| ());
}

/// Runs `f`, the setup or teardown of a model, which the caller guarantees
/// runs while no other loom thread exists (before the first spawn, after the
/// last join). Accesses of `LockOrdered` entries in it are not checked one by
/// one (nothing can race with them); each frame they touched gets one write of
/// its cell at the end, so later accesses are still checked against them.
/// `Atomic` entries are modelled as always. Nested calls are part of the
/// outermost one.
pub fn exclusive<R>(f: impl FnOnce() -> R) -> R {
    let outer = with_tables(|t| t.exclusive.replace(BTreeSet::new()));
    if let Some(touched) = outer {
        // Nested: the outermost call ends it.
        with_tables(|t| t.exclusive = Some(touched));
        return f();
    }
    let r = f();
    let touched: std::vec::Vec<Rc<LoomUnsafeCell<()>>> = with_tables(|t| {
        let touched = t.exclusive.take().expect("loom_pte::exclusive: ended twice");
        touched.into_iter().map(|frame| Rc::clone(&t.frame(frame).life)).collect()
    });
    for life in touched {
        life.with_mut(|_| ());
    }
    r
}
