//! One table of bad inputs to every public entry point, each row with the
//! exact error it must return. Every row runs under `catch_unwind` (a panic
//! is a failed row) and checks that nothing changed: live frames, the
//! entries of two populated mirrors, the model kernel's oracle and the
//! registry. A few rows with valid input sit beside the bad ones as
//! controls. All failures are collected and reported together.
//!
//! Bugs found here that the table cannot hold without going red are kept as
//! separate `#[ignore]`d tests at the end of the file.

mod common;

use common::*;
use core::pin::pin;
use hmm_core::arch::soft::SoftFormat;
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::arch::{LeafFlags, PagingGeometry, PteFormat, PteView, SpecialEntry, MAX_LEVELS};
use hmm_core::notifier::FixedStore;
use hmm_core::pt::{MapError, MirrorEntry, MirrorTable, Pfn, Reclaim, Span};
use hmm_core::sync::SpinLock;
use hmm_core::{
    range_fault, AddressSpace, BitmapFrameAllocator, Error, Event, Interval, InvalidateRange, Mirror, MirrorConfig,
    Notifier, NotifierRegistry, RangeFault, RegionFlags, VaRange,
};
use hmm_testkit::{ModelSpace, Oracle, RegionKind, SimPhys};
use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

type L4 = X86_64Level4;
type L5 = X86_64Level5;

/// A device table translating 39 bits, no sign extension.
struct Device39;
impl PagingGeometry for Device39 {
    const LEVELS: usize = 3;
    const PAGE_SHIFT: u32 = 12;
    const INDEX_BITS: [u32; MAX_LEVELS] = [9; MAX_LEVELS];
    const VA_BITS: u32 = 39;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}

/// A device with 16 KiB pages (a valid geometry by `check_geometry`).
struct Device16K;
impl PagingGeometry for Device16K {
    const LEVELS: usize = 3;
    const PAGE_SHIFT: u32 = 14;
    const INDEX_BITS: [u32; MAX_LEVELS] = [11; MAX_LEVELS];
    const VA_BITS: u32 = 47;
    const SIGN_EXTEND: bool = false;
    const LEAF_LEVELS: u32 = 0b1;
}
static_assertions::const_assert!(hmm_core::arch::check_geometry(3, 12, [9; 6], 39, 0b1));
static_assertions::const_assert!(hmm_core::arch::check_geometry(3, 14, [11; 6], 47, 0b1));

const BUF: u64 = 0x1000_0000;
/// Read-only, IO, PROT_NONE regions after the RW buffer; a hole between each.
const RO: u64 = BUF + 16 * PAGE;
const IO: u64 = BUF + 32 * PAGE;
const NONE: u64 = BUF + 48 * PAGE;
/// What the fingerprint looks at.
const WATCH: u64 = 64 * PAGE;
const TOP_PAGE: u64 = 0xffff_ffff_ffff_f000;
const NON_CANONICAL: u64 = 1 << 47;

/// A range valid for 4-level paging.
fn r4(start: u64, len: u64) -> VaRange {
    VaRange::new::<L4>(start, len).expect("valid 4-level range")
}

/// A range valid only for 5-level paging.
fn r5(start: u64, len: u64) -> VaRange {
    VaRange::new::<L5>(start, len).expect("valid 5-level range")
}

fn unit<T>(r: hmm_core::Result<T>) -> hmm_core::Result<()> {
    r.map(|_| ())
}

/// A notifier that refuses every non-blockable invalidation.
struct Refusing {
    interval: Interval,
    calls: AtomicUsize,
}

impl Refusing {
    fn new(r: VaRange) -> Self {
        Self { interval: Interval::new(r), calls: AtomicUsize::new(0) }
    }
}

impl Notifier for Refusing {
    fn interval(&self) -> &Interval {
        &self.interval
    }
    fn invalidate(&self, inv: &InvalidateRange) -> bool {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !inv.blockable {
            return false;
        }
        self.interval.set_seq(inv);
        true
    }
}

/// Everything a row may disturb.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    live: usize,
    whole: Vec<Option<MirrorEntry>>,
    window: Vec<Option<MirrorEntry>>,
    oracle: Oracle,
    notifiers: usize,
    frames: (usize, usize),
}

struct Table {
    rows: usize,
    controls: usize,
    failures: Vec<String>,
}

impl Table {
    /// Runs one row: `f` must return `want` without a panic and change
    /// nothing `fp` sees.
    fn row(
        &mut self,
        name: &str,
        want: hmm_core::Result<()>,
        fp: &dyn Fn() -> Fingerprint,
        f: &mut dyn FnMut() -> hmm_core::Result<()>,
    ) {
        self.rows += 1;
        if want.is_ok() {
            self.controls += 1;
        }
        let before = fp();
        let got = catch_unwind(AssertUnwindSafe(f));
        let after = fp();
        match got {
            Err(_) => self.failures.push(format!("{name}: panicked (want {want:?})")),
            Ok(got) if got != want => self.failures.push(format!("{name}: got {got:?}, want {want:?}")),
            Ok(_) => {}
        }
        if before != after {
            self.failures.push(format!("{name}: state changed\n  before {before:?}\n  after  {after:?}"));
        }
    }
}

#[test]
fn every_entry_point_rejects_bad_input_with_the_exact_error() {
    let (alloc, space) = kernel(64 * MIB);
    space.map(BUF, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    space.write_bytes(BUF, &pattern(8 * PAGE as usize, 3)).unwrap();
    space.map(RO, 4 * PAGE, R, RegionKind::PrivateAnon).unwrap();
    space.map(IO, 4 * PAGE, RW, RegionKind::Io).unwrap();
    space.map(NONE, 4 * PAGE, RegionFlags::empty(), RegionKind::PrivateAnon).unwrap();
    // A released space, with a mirror registered before the release.
    let dead = ModelSpace::new(&alloc).unwrap();
    dead.map(BUF, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    // A table root for 5-level walks: an empty (zeroed) frame.
    let l5_root = hmm_core::FrameAllocator::alloc_frame(&*alloc).unwrap();
    alloc.phys().zero(l5_root, PAGE);
    let mut t = Table { rows: 0, controls: 0, failures: Vec::new() };
    {
        let whole = pin!(mirror(&space, &alloc));
        whole.as_ref().register().unwrap();
        whole.fault(r4(BUF, 8 * PAGE), true).unwrap();
        whole.fault(r4(RO, 4 * PAGE), false).unwrap();
        let window =
            pin!(Mirror::new(&space, &*alloc, device(&space), r4(BUF, WATCH), MirrorConfig::default()).unwrap());
        window.as_ref().register().unwrap();
        window.fault(r4(BUF, 4 * PAGE), false).unwrap();
        let never = pin!(mirror(&space, &alloc));
        let gone = pin!(mirror(&space, &alloc));
        gone.as_ref().register().unwrap();
        gone.unregister().unwrap();
        let on_dead = pin!(mirror(&dead, &alloc));
        on_dead.as_ref().register().unwrap();
        on_dead.fault(r4(BUF, 8 * PAGE), true).unwrap();
        let pending = pin!(mirror(&dead, &alloc));
        dead.release();

        let entries = |m: &DevMirror<'_>| (0..WATCH / PAGE).map(|i| m.translate(BUF + i * PAGE)).collect::<Vec<_>>();
        let fp = || Fingerprint {
            live: alloc.live(),
            whole: entries(&whole),
            window: entries(&window),
            oracle: space.oracle(),
            notifiers: space.notifiers().len(),
            frames: (whole.table_frames(), window.table_frames()),
        };
        let phys: &SimPhys = space.phys();
        let root = space.root();

        // ---- VaRange::new / from_bounds / check ---------------------------
        type NewRow = (&'static str, u64, u64, hmm_core::Result<()>);
        let new_rows: &[NewRow] = &[
            ("empty", BUF, 0, Err(Error::Empty)),
            ("empty at 0", 0, 0, Err(Error::Empty)),
            ("empty and unaligned: Empty first", BUF + 1, 0, Err(Error::Empty)),
            ("unaligned start", BUF + 1, PAGE, Err(Error::Unaligned)),
            ("unaligned start by 0x800", BUF + 0x800, PAGE, Err(Error::Unaligned)),
            ("unaligned length", BUF, PAGE + 1, Err(Error::Unaligned)),
            ("length 1", BUF, 1, Err(Error::Unaligned)),
            ("unaligned and wrapping: Unaligned first", u64::MAX, PAGE, Err(Error::Unaligned)),
            ("wrapping by one page", TOP_PAGE, 2 * PAGE, Err(Error::Wrapping)),
            ("wrapping length", 2 * PAGE, TOP_PAGE, Err(Error::Wrapping)),
            ("wrapping and non-canonical: Wrapping first", NON_CANONICAL, TOP_PAGE, Err(Error::Wrapping)),
            ("non-canonical start", NON_CANONICAL, PAGE, Err(Error::NonCanonical)),
            ("non-canonical start below the upper half", 0xffff_7fff_ffff_f000, 2 * PAGE, Err(Error::NonCanonical)),
            ("runs past the lower half", NON_CANONICAL - PAGE, 2 * PAGE, Err(Error::OutOfRange)),
            ("the whole 48-bit span", 0, 1 << 48, Err(Error::OutOfRange)),
            ("lower to upper half, ending at 2^64", PAGE, TOP_PAGE, Err(Error::OutOfRange)),
            ("control: top page", TOP_PAGE, PAGE, Ok(())),
            ("control: last lower page", NON_CANONICAL - PAGE, PAGE, Ok(())),
            ("control: the whole lower half", 0, NON_CANONICAL, Ok(())),
        ];
        for &(name, start, len, want) in new_rows {
            t.row(&format!("VaRange::new::<L4>: {name}"), want, &fp, &mut || unit(VaRange::new::<L4>(start, len)));
        }
        let l5_rows: &[NewRow] = &[
            ("control: 4-level non-canonical is fine", NON_CANONICAL, PAGE, Ok(())),
            ("non-canonical start", 1 << 56, PAGE, Err(Error::NonCanonical)),
            ("runs past the lower half", (1 << 56) - PAGE, 2 * PAGE, Err(Error::OutOfRange)),
            ("control: an address non-canonical for 4 levels", 0xffff_0000_0000_0000 - PAGE, PAGE, Ok(())),
        ];
        for &(name, start, len, want) in l5_rows {
            t.row(&format!("VaRange::new::<L5>: {name}"), want, &fp, &mut || unit(VaRange::new::<L5>(start, len)));
        }
        let dev_rows: &[NewRow] = &[
            ("past 39 bits: OutOfRange, not NonCanonical", 1 << 39, PAGE, Err(Error::OutOfRange)),
            ("runs past 39 bits", (1 << 39) - PAGE, 2 * PAGE, Err(Error::OutOfRange)),
            ("sign-extended address", TOP_PAGE, PAGE, Err(Error::OutOfRange)),
            ("control: last page", (1 << 39) - PAGE, PAGE, Ok(())),
        ];
        for &(name, start, len, want) in dev_rows {
            t.row(&format!("VaRange::new::<Device39>: {name}"), want, &fp, &mut || {
                unit(VaRange::new::<Device39>(start, len))
            });
        }
        let k16_rows: &[NewRow] = &[
            ("4 KiB-aligned start", 0x1000, 0x4000, Err(Error::Unaligned)),
            ("4 KiB length", 0x4000, 0x1000, Err(Error::Unaligned)),
            ("control", 0x4000, 0x4000, Ok(())),
        ];
        for &(name, start, len, want) in k16_rows {
            t.row(&format!("VaRange::new::<Device16K>: {name}"), want, &fp, &mut || {
                unit(VaRange::new::<Device16K>(start, len))
            });
        }
        let bounds_rows: &[NewRow] = &[
            ("end before start", 2 * PAGE, PAGE, Err(Error::Wrapping)),
            ("end equal to start", PAGE, PAGE, Err(Error::Empty)),
            ("end unaligned", PAGE, PAGE + 0x800, Err(Error::Unaligned)),
            ("the top page cannot be written as [start, end)", TOP_PAGE, 0, Err(Error::Wrapping)),
            ("non-canonical", NON_CANONICAL, NON_CANONICAL + PAGE, Err(Error::NonCanonical)),
            ("crossing the hole", NON_CANONICAL - PAGE, NON_CANONICAL + PAGE, Err(Error::OutOfRange)),
            ("control", BUF, BUF + PAGE, Ok(())),
        ];
        for &(name, start, end, want) in bounds_rows {
            t.row(&format!("VaRange::from_bounds::<L4>: {name}"), want, &fp, &mut || {
                unit(VaRange::from_bounds::<L4>(start, end))
            });
        }
        let check_rows: &[(&str, VaRange, hmm_core::Result<()>)] = &[
            ("5-level range", r5(NON_CANONICAL, PAGE), Err(Error::NonCanonical)),
            (
                "5-level range running out of the 4-level half",
                r5(NON_CANONICAL - PAGE, 2 * PAGE),
                Err(Error::OutOfRange),
            ),
            ("VaRange::all()", VaRange::all(), Err(Error::OutOfRange)),
        ];
        for &(name, r, want) in check_rows {
            t.row(&format!("VaRange::check::<L4>: {name}"), want, &fp, &mut || r.check::<L4>());
        }
        t.row("VaRange::check::<Device16K>: 4 KiB range", Err(Error::Unaligned), &fp, &mut || {
            r4(PAGE, PAGE).check::<Device16K>()
        });
        t.row("VaRange::check::<L5>: VaRange::all()", Err(Error::OutOfRange), &fp, &mut || {
            VaRange::all().check::<L5>()
        });

        // ---- pt::walk / pt::snapshot --------------------------------------
        let bad_for_l4: &[(&str, VaRange, Error)] = &[
            ("5-level range", r5(NON_CANONICAL, PAGE), Error::NonCanonical),
            ("5-level range across the 4-level hole", r5(NON_CANONICAL - PAGE, 2 * PAGE), Error::OutOfRange),
            ("VaRange::all()", VaRange::all(), Error::OutOfRange),
        ];
        for &(name, r, want) in bad_for_l4 {
            let visited = AtomicBool::new(false);
            t.row(&format!("pt::walk::<L4>: {name}"), Err(want), &fp, &mut || {
                let mut v = |_: Span, _: PteView| -> ControlFlow<()> {
                    visited.store(true, Ordering::Relaxed);
                    ControlFlow::Continue(())
                };
                // SAFETY: the model's root is live for the lifetime of `space`.
                unit(unsafe { hmm_core::pt::walk::<L4, SimPhys, _>(phys, root, r, &mut v) })
            });
            assert!(!visited.load(Ordering::Relaxed), "walk visited an entry of a rejected range");
            let pages = r.pages(12).min(4) as usize;
            let mut out = vec![Pfn(0xdead); pages];
            t.row(&format!("pt::snapshot::<L4>: {name} (and a short slice: range first)"), Err(want), &fp, &mut || {
                // SAFETY: as above.
                unsafe { hmm_core::pt::snapshot::<L4, SimPhys>(phys, root, r, &mut out) }
            });
            assert!(out.iter().all(|p| p.0 == 0xdead), "snapshot wrote into the slice of a rejected range");
        }
        t.row("pt::walk::<L5>: VaRange::all()", Err(Error::OutOfRange), &fp, &mut || {
            let mut v = |_: Span, _: PteView| -> ControlFlow<()> { ControlFlow::Continue(()) };
            // SAFETY: `l5_root` is a zeroed frame: an empty 5-level root.
            unit(unsafe { hmm_core::pt::walk::<L5, SimPhys, _>(phys, l5_root, VaRange::all(), &mut v) })
        });
        for (name, len) in [("empty slice", 0), ("one short", 3), ("one long", 5), ("far too long", 4096)] {
            let mut out = vec![Pfn(0xdead); len];
            t.row(&format!("pt::snapshot::<L4>: 4 pages into {name}"), Err(Error::BadLength), &fp, &mut || {
                // SAFETY: as above.
                unsafe { hmm_core::pt::snapshot::<L4, SimPhys>(phys, root, r4(BUF, 4 * PAGE), &mut out) }
            });
            assert!(out.iter().all(|p| p.0 == 0xdead));
        }
        let mut out = vec![Pfn::NONE; 4];
        t.row("pt::snapshot::<L4>: control", Ok(()), &fp, &mut || {
            // SAFETY: as above.
            unsafe { hmm_core::pt::snapshot::<L4, SimPhys>(phys, root, r4(BUF, 4 * PAGE), &mut out) }
        });

        // ---- range_fault ---------------------------------------------------
        let watcher = Refusing::new(r4(BUF, WATCH));
        let interval = &watcher.interval;
        let mut req = RangeFault {
            range: r4(BUF, PAGE),
            default_flags: 0,
            pfn_flags_mask: 0,
            pfns: &mut [Pfn::NONE],
            dev_private_owner: None,
        };
        t.row("range_fault: unregistered interval", Err(Error::Unregistered), &fp, &mut || {
            unit(range_fault(&space, &space.read_lock(), interval, space.notifiers().read_begin(interval), &mut req))
        });
        // SAFETY: `watcher` outlives `watching`, which is dropped (removed)
        // before the end of this block.
        let watching = unsafe { space.notifiers().insert(&watcher) }.unwrap();
        // What a fault would have read.
        let seq = space.notifiers().read_begin(interval);
        type RfRow = (&'static str, VaRange, usize, u64, u64, u64, hmm_core::Result<()>);
        let fault = Pfn::REQ_FAULT;
        let write = Pfn::REQ_WRITE;
        let rf_rows: &[RfRow] = &[
            // (name, range, slice length, default flags, mask, seq offset, want)
            ("5-level range", r5(NON_CANONICAL, PAGE), 1, fault, 0, 0, Err(Error::NonCanonical)),
            ("VaRange::all()", VaRange::all(), 1, 0, 0, 0, Err(Error::OutOfRange)),
            ("outside the interval", r4(BUF + WATCH, PAGE), 1, 0, 0, 0, Err(Error::OutOfRange)),
            ("straddling the interval's start", r4(BUF - PAGE, 2 * PAGE), 2, 0, 0, 0, Err(Error::OutOfRange)),
            ("outside and short: OutOfRange first", r4(BUF + WATCH, 2 * PAGE), 1, 0, 0, 0, Err(Error::OutOfRange)),
            ("short slice", r4(BUF, 4 * PAGE), 3, 0, 0, 0, Err(Error::BadLength)),
            ("long slice", r4(BUF, 4 * PAGE), 5, 0, 0, 0, Err(Error::BadLength)),
            ("empty slice", r4(BUF, PAGE), 0, 0, 0, 0, Err(Error::BadLength)),
            ("short slice and a stale seq: BadLength first", r4(BUF, 4 * PAGE), 3, 0, 0, 1, Err(Error::BadLength)),
            ("stale sequence", r4(BUF, 4 * PAGE), 4, 0, 0, 1, Err(Error::Busy)),
            ("fault in a hole", r4(BUF + 8 * PAGE, PAGE), 1, fault, 0, 0, Err(Error::Fault)),
            ("fault across the end of a region", r4(BUF + 6 * PAGE, 4 * PAGE), 4, fault, 0, 0, Err(Error::Fault)),
            ("fault in an IO region", r4(IO, PAGE), 1, fault, 0, 0, Err(Error::Fault)),
            ("fault in a PROT_NONE region", r4(NONE, PAGE), 1, fault, 0, 0, Err(Error::Fault)),
            ("write to a read-only region", r4(RO, PAGE), 1, write, 0, 0, Err(Error::Perm)),
            ("write, per-page request only", r4(RO, 4 * PAGE), 4, 0, u64::MAX, 0, Err(Error::Perm)),
            ("control: snapshot across holes, IO, PROT_NONE", r4(BUF, WATCH), 64, 0, 0, 0, Ok(())),
            ("control: read the populated buffer", r4(BUF, 8 * PAGE), 8, fault, 0, 0, Ok(())),
            ("control: write the populated buffer", r4(BUF, 8 * PAGE), 8, write, 0, 0, Ok(())),
        ];
        for &(name, r, len, default_flags, mask, stale, want) in rf_rows {
            let mut pfns = vec![Pfn::NONE; len];
            if mask != 0 {
                // Per-page requests: a write request on the last page only.
                if let Some(last) = pfns.last_mut() {
                    *last = Pfn(Pfn::REQ_WRITE);
                }
            }
            t.row(&format!("range_fault: {name}"), want, &fp, &mut || {
                let guard = space.read_lock();
                let mut req = RangeFault {
                    range: r,
                    default_flags,
                    pfn_flags_mask: mask,
                    pfns: &mut pfns,
                    dev_private_owner: None,
                };
                unit(range_fault(&space, &guard, interval, seq.wrapping_add(stale), &mut req))
            });
        }
        watching.remove();
        let dead_interval = Interval::new(r4(BUF, WATCH));
        t.row("range_fault: released space", Err(Error::Unregistered), &fp, &mut || {
            let guard = dead.read_lock();
            let mut pfns = vec![Pfn::NONE; 1];
            let mut req = RangeFault {
                range: r4(BUF, PAGE),
                default_flags: 0,
                pfn_flags_mask: 0,
                pfns: &mut pfns,
                dev_private_owner: None,
            };
            unit(range_fault(&dead, &guard, &dead_interval, 0, &mut req))
        });

        // ---- Mirror::new / with_geometry -----------------------------------
        type NewMirror = (&'static str, VaRange, bool, bool, hmm_core::Result<()>);
        let mirror_rows: &[NewMirror] = &[
            // (name, range, on the released space, allocator exhausted, want)
            ("5-level range", r5(NON_CANONICAL, PAGE), false, false, Err(Error::NonCanonical)),
            ("VaRange::all()", VaRange::all(), false, false, Err(Error::OutOfRange)),
            ("released space", user(), true, false, Err(Error::Released)),
            ("released space, bad range: range first", VaRange::all(), true, false, Err(Error::OutOfRange)),
            ("exhausted allocator", user(), false, true, Err(Error::NoMemory)),
            ("released and exhausted: Released first", user(), true, true, Err(Error::Released)),
            ("control", r4(BUF, WATCH), false, false, Ok(())),
        ];
        for &(name, r, on_dead, exhausted, want) in mirror_rows {
            let s = if on_dead { &dead } else { &space };
            t.row(&format!("Mirror::new: {name}"), want, &fp, &mut || {
                if exhausted {
                    alloc.fail_after(0);
                }
                let m = Mirror::new(s, &*alloc, device(s), r, MirrorConfig::default());
                alloc.clear_failures();
                unit(m)
            });
        }
        let geometry_rows: &[(&str, VaRange, hmm_core::Result<()>)] = &[
            ("the user half does not fit 39 bits", user(), Err(Error::OutOfRange)),
            ("just past 39 bits", r4(1 << 39, PAGE), Err(Error::OutOfRange)),
            ("upper half", r4(TOP_PAGE, PAGE), Err(Error::OutOfRange)),
            ("control: the 39-bit span", r4(0, 1 << 39), Ok(())),
        ];
        for &(name, r, want) in geometry_rows {
            t.row(&format!("Mirror::with_geometry::<Device39>: {name}"), want, &fp, &mut || {
                unit(Mirror::<_, _, _, SoftFormat<Device39>, SpinLock>::with_format(
                    &space,
                    &*alloc,
                    device(&space),
                    r,
                    MirrorConfig::default(),
                ))
            });
        }
        // The table cannot hold 16 KiB pages at all: refused before the range.
        t.row("Mirror::with_geometry::<Device16K>: any range", Err(Error::BadGeometry), &fp, &mut || {
            unit(Mirror::<_, _, _, SoftFormat<Device16K>, SpinLock>::with_format(
                &space,
                &*alloc,
                device(&space),
                r4(PAGE, PAGE),
                MirrorConfig::default(),
            ))
        });

        // ---- Mirror::fault / Mirror::snapshot ------------------------------
        type FaultRow<'a, 's> = (&'static str, &'a DevMirror<'s>, VaRange, bool, hmm_core::Result<()>);
        let fault_rows: Vec<FaultRow<'_, '_>> = vec![
            ("5-level range", &*whole, r5(NON_CANONICAL, PAGE), false, Err(Error::NonCanonical)),
            ("VaRange::all()", &*whole, VaRange::all(), false, Err(Error::OutOfRange)),
            ("outside the window", &*window, r4(BUF + WATCH, PAGE), false, Err(Error::OutOfRange)),
            ("straddling the window's end", &*window, r4(BUF + WATCH - PAGE, 2 * PAGE), true, Err(Error::OutOfRange)),
            ("never registered", &*never, r4(BUF, PAGE), false, Err(Error::Unregistered)),
            ("unregistered", &*gone, r4(BUF, PAGE), true, Err(Error::Unregistered)),
            ("unregistered, bad range: range first", &*gone, r5(NON_CANONICAL, PAGE), false, Err(Error::NonCanonical)),
            ("released space", &*on_dead, r4(BUF, PAGE), false, Err(Error::Released)),
            ("hole", &*whole, r4(BUF + 8 * PAGE, PAGE), false, Err(Error::Fault)),
            ("IO region", &*whole, r4(IO, PAGE), false, Err(Error::Fault)),
            ("PROT_NONE region", &*whole, r4(NONE, PAGE), false, Err(Error::Fault)),
            ("write to a read-only region", &*whole, r4(RO, PAGE), true, Err(Error::Perm)),
            ("control: re-fault of mirrored pages", &*whole, r4(BUF, 8 * PAGE), true, Ok(())),
        ];
        for (name, m, r, write, want) in fault_rows {
            t.row(&format!("Mirror::fault: {name}"), want, &fp, &mut || m.fault(r, write));
        }
        type SnapRow<'a, 's> = (&'static str, &'a DevMirror<'s>, VaRange, usize, hmm_core::Result<()>);
        let snap_rows: Vec<SnapRow<'_, '_>> = vec![
            ("short slice", &*whole, r4(BUF, 4 * PAGE), 3, Err(Error::BadLength)),
            ("long slice", &*whole, r4(BUF, 4 * PAGE), 5, Err(Error::BadLength)),
            ("5-level range", &*whole, r5(NON_CANONICAL, PAGE), 1, Err(Error::NonCanonical)),
            ("VaRange::all()", &*whole, VaRange::all(), 1, Err(Error::OutOfRange)),
            ("outside the window", &*window, r4(BUF + WATCH, PAGE), 1, Err(Error::OutOfRange)),
            (
                "outside the window and short: OutOfRange first",
                &*window,
                r4(BUF + WATCH, 2 * PAGE),
                1,
                Err(Error::OutOfRange),
            ),
            ("never registered", &*never, r4(BUF, PAGE), 1, Err(Error::Unregistered)),
            ("unregistered", &*gone, r4(BUF, PAGE), 1, Err(Error::Unregistered)),
            ("released space", &*on_dead, r4(BUF, PAGE), 1, Err(Error::Released)),
            ("control: holes, IO and PROT_NONE are no error", &*whole, r4(BUF, WATCH), 64, Ok(())),
        ];
        for (name, m, r, len, want) in snap_rows {
            let mut out = vec![Pfn::NONE; len];
            t.row(&format!("Mirror::snapshot: {name}"), want, &fp, &mut || m.snapshot(r, &mut out));
        }

        // ---- register / unregister -----------------------------------------
        t.row("Mirror::register: already registered", Err(Error::Busy), &fp, &mut || whole.as_ref().register());
        t.row("Mirror::register: after unregister", Err(Error::Unregistered), &fp, &mut || gone.as_ref().register());
        t.row("Mirror::unregister: never registered", Err(Error::Unregistered), &fp, &mut || never.unregister());
        t.row("Mirror::unregister: twice", Err(Error::Unregistered), &fp, &mut || gone.unregister());
        t.row("Mirror::register: built before the release, registered after", Err(Error::Released), &fp, &mut || {
            pending.as_ref().register()
        });

        // ---- NotifierRegistry ----------------------------------------------
        let a = Refusing::new(r4(BUF, 4 * PAGE));
        let b = Refusing::new(r4(BUF + 2 * PAGE, 4 * PAGE));
        let c = Refusing::new(r4(BUF, PAGE));
        let reg = NotifierRegistry::<FixedStore<2>>::new();
        // SAFETY: `a` and `b` are declared before `reg` and its registrations,
        // so they outlive both.
        let (mut ra, mut rb) = unsafe { (Some(reg.insert(&a).unwrap()), Some(reg.insert(&b).unwrap())) };
        let reg_fp = || (reg.len(), reg.seq(), a.interval.is_registered(), b.interval.is_registered());
        let before = reg_fp();
        // SAFETY: as above (both fail: nothing is kept).
        t.row("NotifierRegistry::insert: twice", Err(Error::Busy), &fp, &mut || unit(unsafe { reg.insert(&a) }));
        t.row("NotifierRegistry::insert: full fixed store", Err(Error::Capacity), &fp, &mut || {
            unit(unsafe { reg.insert(&c) })
        });
        assert_eq!(reg_fp(), before, "failed registry calls changed the registry");
        let calls = a.calls.load(Ordering::Relaxed) + b.calls.load(Ordering::Relaxed);
        t.row("NotifierRegistry::invalidate_range_start: refused", Err(Error::WouldBlock), &fp, &mut || {
            unit(reg.invalidate_range_start(r4(BUF + 3 * PAGE, PAGE), Event::Unmap, false))
        });
        assert!(a.calls.load(Ordering::Relaxed) + b.calls.load(Ordering::Relaxed) > calls, "callbacks were asked");
        assert_eq!(reg.seq() % 2, 0, "a refused invalidation is ended");
        let end = AtomicU64::new(0);
        t.row("NotifierRegistry::invalidate_range_start: control, everything, blockable", Ok(()), &fp, &mut || {
            let inv = reg.invalidate_range_start(VaRange::all(), Event::Release, true)?;
            end.store(inv.seq(), Ordering::Relaxed);
            reg.invalidate_range_end(inv);
            Ok(())
        });
        assert_eq!(end.load(Ordering::Relaxed) % 2, 1, "callbacks saw an odd sequence");
        t.row("Registration::remove: control", Ok(()), &fp, &mut || {
            ra.take().expect("registered").remove();
            Ok(())
        });
        assert!(!a.interval.is_registered());
        reg.release();
        // SAFETY: `c` outlives `reg`; the insert fails, so nothing is kept.
        t.row("NotifierRegistry::insert: released", Err(Error::Released), &fp, &mut || unit(unsafe { reg.insert(&c) }));
        t.row("Registration::remove: control after release", Ok(()), &fp, &mut || {
            rb.take().expect("registered").remove();
            Ok(())
        });
        assert!(reg.is_empty());

        // ---- MirrorTable::new / TableWriter::map --------------------------
        t.row("MirrorTable::new: exhausted allocator", Err(Error::NoMemory), &fp, &mut || {
            alloc.fail_after(0);
            let r = MirrorTable::<L4>::new(phys, &*alloc);
            alloc.clear_failures();
            r.map(|(t, w)| w.destroy(&t, phys, &*alloc))
        });
        let bits: [AtomicU64; 1] = Default::default();
        let empty = BitmapFrameAllocator::new(0x4000_0000, 0, &bits).unwrap();
        t.row("MirrorTable::new: allocator with no frame", Err(Error::NoMemory), &fp, &mut || {
            MirrorTable::<L4>::new(phys, &empty).map(|(t, w)| w.destroy(&t, phys, &empty))
        });
        for k in 1..=3 {
            t.row(
                &format!("TableWriter::map: allocator fails at directory {k}"),
                Err(Error::NoMemory),
                &fp,
                &mut || {
                    let (table, mut w) = MirrorTable::<L4>::new(phys, &*alloc)?;
                    alloc.fail_at(k);
                    let page = r4(0x7f00_0000_0000, PAGE);
                    let r = w.map(phys, &*alloc, page, 0x4000_0000, true);
                    alloc.clear_failures();
                    // The directories the failed descent linked go only after
                    // a clear and a (here: no) device flush.
                    let mut reclaim = Reclaim::new();
                    assert_eq!(w.clear(phys, page, &mut reclaim).entries, 0);
                    w.reclaim(&table, &*alloc, &mut reclaim);
                    let frames = w.stats().frames;
                    w.destroy(&table, phys, &*alloc);
                    assert_eq!(frames, 1, "no directory left after the failed map is cleared");
                    match r {
                        Err(MapError::Failed(e)) => Err(e),
                        other => panic!("{other:?}"),
                    }
                },
            );
        }

        // ---- BitmapFrameAllocator::new -------------------------------------
        let words: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
        type BitmapRow = (&'static str, u64, usize, usize, hmm_core::Result<()>);
        let bitmap_rows: &[BitmapRow] = &[
            // (name, base, frames, words of bits, want)
            ("unaligned base", 0x1000_0800, 1, 1, Err(Error::Unaligned)),
            ("base off by one", 0x1000_0001, 0, 0, Err(Error::Unaligned)),
            ("bits one short", 0x1000_0000, 65, 1, Err(Error::BadLength)),
            ("no bits for one frame", 0x1000_0000, 1, 0, Err(Error::BadLength)),
            ("unaligned and short: Unaligned first", 0x800, 1000, 0, Err(Error::Unaligned)),
            ("wrapping end", TOP_PAGE, 1, 1, Err(Error::Wrapping)),
            ("wrapping end, two frames", TOP_PAGE - PAGE, 2, 1, Err(Error::Wrapping)),
            ("short and wrapping: BadLength first", TOP_PAGE, 200, 1, Err(Error::BadLength)),
            ("control: no frames", 0, 0, 0, Ok(())),
            ("control: 128 frames", 0x1000_0000, 128, 2, Ok(())),
        ];
        for &(name, base, frames, n, want) in bitmap_rows {
            t.row(&format!("BitmapFrameAllocator::new: {name}"), want, &fp, &mut || {
                unit(BitmapFrameAllocator::new(base, frames, &words[..n]))
            });
        }

        // ---- X86_64Level4::encode ------------------------------------------
        let rw = LeafFlags::READ | LeafFlags::WRITE | LeafFlags::USER;
        let encode_rows: &[(&str, PteView, usize)] = &[
            ("4 KiB leaf, unaligned frame", PteView::Leaf { frame: 0x1000_0800, flags: rw }, 0),
            ("2 MiB leaf, 4 KiB-aligned frame", PteView::Leaf { frame: 0x1000_1000, flags: rw }, 1),
            ("1 GiB leaf, 2 MiB-aligned frame", PteView::Leaf { frame: 0x4020_0000, flags: rw }, 2),
            ("leaf at the root level", PteView::Leaf { frame: 0, flags: rw }, 3),
            ("leaf past the levels", PteView::Leaf { frame: 0, flags: rw }, 4),
            ("absent past the levels", PteView::Absent, 4),
            ("frame beyond 52 bits", PteView::Leaf { frame: 1 << 52, flags: rw }, 0),
            ("unreadable leaf", PteView::Leaf { frame: 0x1000, flags: LeafFlags::WRITE }, 0),
            ("table at level 0", PteView::Table { frame: 0x1000, flags: rw }, 0),
            ("table with DIRTY", PteView::Table { frame: 0x1000, flags: rw | LeafFlags::DIRTY }, 1),
            ("table, unaligned frame", PteView::Table { frame: 0x1008, flags: rw }, 1),
            ("PROT_NONE at the root level", PteView::ProtNone { frame: 0x1000, flags: rw }, 3),
            (
                "device-private owner too large",
                PteView::Special(SpecialEntry::DevicePrivate { frame: 0x1000, owner: u16::MAX, write: true }),
                0,
            ),
            ("swap offset too large", PteView::Special(SpecialEntry::Swap { offset: 1 << 51 }), 0),
            ("Other with the present bit", PteView::Special(SpecialEntry::Other(0x1001)), 0),
            ("Other that is zero", PteView::Special(SpecialEntry::Other(0)), 0),
            ("Invalid", PteView::Invalid(0x1000), 0),
        ];
        for (name, view, level) in encode_rows {
            t.row(&format!("X86_64Level4::encode: {name} (level {level})"), Err(Error::Unencodable), &fp, &mut || {
                unit(L4::encode(view, *level))
            });
        }
        t.row("X86_64Level4::encode: control, 2 MiB leaf", Ok(()), &fp, &mut || {
            unit(L4::encode(&PteView::Leaf { frame: 0x4020_0000, flags: rw }, 1))
        });

        // The mirrors were not disturbed by anything above.
        counters(&whole);
        counters(&window);
        assert_mirror_coherent(&whole, &space, r4(BUF, WATCH));
    }
    // SAFETY: the frame came from `alloc` above and nothing uses it now.
    unsafe { hmm_core::FrameAllocator::free_frame(&*alloc, l5_root) };
    drop(dead);
    drop(space);
    println!("bad-input matrix: {} rows ({} of them valid-input controls)", t.rows, t.controls);
    assert!(t.failures.is_empty(), "{} of {} rows failed:\n{}", t.failures.len(), t.rows, t.failures.join("\n"));
    assert_eq!(alloc.live(), 0);
}

/// A device geometry with 16 KiB pages passes `check_geometry` and
/// `Mirror::with_geometry`, but the mirror table allocates 4 KiB table
/// frames and indexes them with 11-bit indices, and commits one entry per
/// 16 KiB device page for four 4 KiB CPU pages: pages 1-3 of every device
/// page are mirrored to the frame of page 0 (the device reads and writes the
/// wrong memory), and indices past 511 run off the table frame (a debug
/// assertion; memory corruption in release builds). Either refusing the
/// geometry or mirroring correctly is a fix.
#[test]
fn device_geometry_with_16k_pages() {
    let (alloc, space) = kernel(16 * MIB);
    space.map(BUF, 8 * PAGE, RW, RegionKind::PrivateAnon).unwrap();
    for i in 0..8 {
        space.write_bytes(BUF + i * PAGE, &[i as u8 + 1]).unwrap();
    }
    let m = Mirror::<_, _, _, SoftFormat<Device16K>, SpinLock>::with_format(
        &space,
        &*alloc,
        device(&space),
        r4(BUF, 64 * PAGE),
        MirrorConfig::default(),
    );
    let (mut wrong, mut torn_down) = (Vec::new(), true);
    if let Ok(m) = m {
        let m = pin!(m);
        m.as_ref().register().unwrap();
        m.fault(r4(BUF, 8 * PAGE), true).unwrap();
        let view = space.table_view();
        wrong = (0..8)
            .map(|i| BUF + i * PAGE)
            .filter(|&va| m.translate(va).map(|e| e.frame()) != view.translate(va).map(|t| t.0))
            .collect();
        // Tear down here, where a panic can be caught (a second panic while
        // unwinding would abort the whole test binary).
        torn_down = catch_unwind(AssertUnwindSafe(|| m.unregister())).is_ok();
    }
    assert!(
        wrong.is_empty() && torn_down,
        "mirrored to the wrong frame: {wrong:x?}; unregister without a panic: {torn_down}"
    );
    // The table alone, at an index a 4 KiB table frame does not have.
    let table = MirrorTable::<SoftFormat<Device16K>>::new(space.phys(), &*alloc);
    if let Ok((_table, mut w)) = table {
        let far = r4(1 << 45, 0x4000);
        let r = catch_unwind(AssertUnwindSafe(|| {
            w.map(space.phys(), &*alloc, far, 0x4000_0000, true).unwrap();
        }));
        assert!(r.is_ok(), "a table of a valid geometry indexes past its frame");
    }
}

/// An address its geometry cannot translate must not be folded onto another
/// one (index bits above `VA_BITS` dropped), so that `translate(0)` finds
/// what was mapped for `1 << 39`: `map` refuses it.
#[test]
fn mirror_table_refuses_addresses_beyond_its_geometry() {
    let (alloc, space) = kernel(16 * MIB);
    let (table, mut w) = MirrorTable::<SoftFormat<Device39>>::new(space.phys(), &*alloc).unwrap();
    let beyond = r4(1 << 39, PAGE);
    let r = w.map(space.phys(), &*alloc, beyond, 0x4000_5000, true);
    let alias = table.translate(space.phys(), 0);
    w.destroy(&table, space.phys(), &*alloc);
    assert_eq!(
        (r, alias),
        (Err(MapError::Failed(Error::OutOfRange)), None),
        "(map beyond 39 bits, translate(0) afterwards)"
    );
    drop(space);
    assert_eq!(alloc.live(), 0);
}

/// `read_begin` on an interval that is not registered waits for an
/// invalidation that cannot concern it when the registry's sequence happens
/// to equal the interval's initial one (0 on a fresh registry): a hang on
/// misuse instead of an answer. The test rescues the waiter after 500 ms.
#[test]
fn read_begin_on_an_unregistered_interval_returns() {
    watchdog::bounded("read_begin on an unregistered interval (and its rescue)", watchdog::BOUND, || {
        let reg = NotifierRegistry::<FixedStore<1>>::new();
        let lonely = Interval::new(r4(BUF, PAGE));
        let (tx, rx) = std::sync::mpsc::channel();
        let returned = std::thread::scope(|s| {
            s.spawn(|| tx.send(reg.read_begin(&lonely)).unwrap());
            let r = rx.recv_timeout(std::time::Duration::from_millis(500));
            if r.is_err() {
                // Rescue: any overlapping invalidation moves the sequence.
                let n = Refusing::new(r4(BUF, PAGE));
                // SAFETY: `n` is removed before it goes out of scope.
                let rn = unsafe { reg.insert(&n) }.unwrap();
                let inv = reg.invalidate_range_start(r4(BUF, PAGE), Event::Clear, true).unwrap();
                reg.invalidate_range_end(inv);
                rn.remove();
            }
            r.is_ok()
        });
        assert!(returned, "read_begin did not return within 500 ms");
    });
}
