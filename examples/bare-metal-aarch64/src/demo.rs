//! The demo: hmm-core's core loop on live VMSAv8-64 tables, one check per
//! step, each printed as `PASS <name>` or `FAIL <name>: <why>`.
//!
//! The CPU side touches user memory through the MMU (EL1 with PAN clear):
//! its stores and loads are translated through the process's user entries
//! in `TTBR0_EL1`, and its data aborts go through the vector table to the
//! process's fault handler; `AT S1E1R/W` asks the MMU's own walk. The
//! device side goes through its mirror only (see `device`).

use core::fmt;
use core::pin::pin;
use core::ptr;
use core::sync::atomic::Ordering;

use hmm_core::arch::aarch64::Aarch64Va48;
use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_core::pt::Pfn;
use hmm_core::{Error, MirrorConfig, RegionFlags};

use crate::device::{self, DevMirror, Device};
use crate::memory::{self, Frames};
use crate::process::{PAGE, Process, USER_START, range};
use crate::sysreg;
use crate::trap::probe_load;

/// Pages of the user region.
const PAGES: u64 = 16;
/// 64-bit words per page.
const WORDS: u64 = PAGE / 8;

/// Passed and failed checks.
#[derive(Default)]
pub struct Report {
    /// Checks that passed.
    pub passed: u32,
    /// Checks that failed.
    pub failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, why: fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {why}");
        }
    }
}

/// Address of page `i` of the region.
fn page(i: u64) -> u64 {
    USER_START + i * PAGE
}

/// What the CPU stores in word `w` of the page at `va`, generation `g`.
fn pattern(va: u64, g: u64, w: u64) -> u64 {
    0xc0de << 48 | (va >> 12 & 0xffff_ffff) << 16 | g << 12 | w
}

/// What the device stores.
fn dev_pattern(va: u64, w: u64) -> u64 {
    0xd0e5 << 48 | (va >> 12 & 0xffff_ffff) << 16 | w
}

/// CPU stores of generation `g` to every word of the page at `va`.
fn cpu_fill(va: u64, g: u64) {
    for w in 0..WORDS {
        // SAFETY: `va` is in the process's writable region; the store goes
        // through the MMU and a fault is resolved by the trap handler.
        unsafe { ptr::write_volatile((va + w * 8) as *mut u64, pattern(va, g, w)) };
    }
}

/// CPU load of word `w` of the page at `va`.
fn cpu_read(va: u64, w: u64) -> u64 {
    // SAFETY: as in `cpu_fill`, a load.
    unsafe { ptr::read_volatile((va + w * 8) as *const u64) }
}

/// Whether the device reads `expect(w)` in every word of the page at `va`.
fn device_sees(mirror: &DevMirror<'_>, va: u64, expect: impl Fn(u64) -> u64) -> Result<bool, Error> {
    for w in 0..WORDS {
        if device::read(mirror, va + w * 8)? != expect(w) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs every step.
pub fn run(process: &'static Process, frames: &'static Frames) -> Report {
    let mut r = Report::default();
    let root = hmm_core::AddressSpace::root(process);
    let (ttbr0, tcr, sctlr) = sysreg::mmu_registers();
    r.check(
        "mmu-live",
        ttbr0 == root && tcr & 0x3f == 16 && sctlr & 1 == 1 && sysreg::pan() == 0,
        format_args!("TTBR0 {ttbr0:#x}, root {root:#x}, TCR {tcr:#x}, SCTLR {sctlr:#x}, PAN {}", sysreg::pan()),
    );
    let far = USER_START + (1 << 30);
    r.check("cpu-no-region-faults", probe_load(far) == Err(far), format_args!("{:?}", probe_load(far)));

    let live0 = frames.live();
    let region = range(USER_START, PAGES * PAGE);
    let rw = RegionFlags::READ | RegionFlags::WRITE;
    if let Err(e) = process.mmap(region, rw) {
        r.check("mmap", false, format_args!("{e}"));
        return r;
    }
    cpu_steps(&mut r, process);
    let mirror = match DevMirror::new(process, frames, Device::default(), region, MirrorConfig::default()) {
        Ok(m) => m,
        Err(e) => {
            r.check("mirror-new", false, format_args!("{e}"));
            return r;
        }
    };
    let mirror = pin!(mirror);
    let registered = mirror.as_ref().register();
    r.check("mirror-register", registered.is_ok(), format_args!("{registered:?}"));
    device_steps(&mut r, process, &mirror);
    invalidation_steps(&mut r, process, &mirror);
    prot_none_steps(&mut r, process, &mirror);
    teardown_steps(&mut r, process, frames, &mirror, live0);
    r
}

/// The CPU fills pages 0..8 of the region through demand faults.
fn cpu_steps(r: &mut Report, process: &Process) {
    let faults0 = process.stats.cpu_faults.load(Ordering::Relaxed);
    (0..8).for_each(|i| cpu_fill(page(i), 1));
    let faults = process.stats.cpu_faults.load(Ordering::Relaxed) - faults0;
    let mapped = (0..PAGES).filter(|&i| process.translate(page(i)).is_some()).count();
    r.check("cpu-demand-fault", faults == 8 && mapped == 8, format_args!("{faults} faults, {mapped} pages mapped"));
    let readback = (0..8).all(|i| (0..WORDS).all(|w| cpu_read(page(i), w) == pattern(page(i), 1, w)));
    r.check("cpu-readback", readback, format_args!("pattern mismatch"));
    // The MMU's own walk (AT S1E1W) agrees with hmm-core's decoding of
    // every entry of the region: mapped writable pages, unmapped faults.
    let disagree = (0..PAGES).find(|&i| sysreg::hw_translate(page(i), true) != process.translate(page(i)).map(|t| t.0));
    r.check(
        "at-s1e1w",
        disagree.is_none(),
        format_args!(
            "page {disagree:?}: AT {:x?}, hmm-core {:x?}",
            disagree.map(|i| sysreg::hw_translate(page(i), true)),
            disagree.map(|i| process.translate(page(i)))
        ),
    );
}

/// The device maps, reads and writes through the mirror.
fn device_steps(r: &mut Report, process: &Process, mirror: &DevMirror<'_>) {
    let faulted = mirror.fault(range(USER_START, 8 * PAGE), false);
    let stats = mirror.stats();
    let same = (0..8).all(|i| mirror.translate(page(i)).map(|e| e.frame()) == process.translate(page(i)).map(|t| t.0));
    r.check(
        "device-range-fault",
        faulted.is_ok() && stats.pages_mapped == 8 && stats.handler_calls == 0 && same,
        format_args!("{faulted:?}, {stats:?}, same frames {same}"),
    );
    let seen = (0..8).map(|i| device_sees(mirror, page(i), |w| pattern(page(i), 1, w))).find(|s| s != &Ok(true));
    r.check("device-read", seen.is_none(), format_args!("{seen:?}"));

    let mut pfns = [Pfn::NONE; PAGES as usize];
    let snap = mirror.snapshot(range(USER_START, PAGES * PAGE), &mut pfns);
    let snap_ok = (0..PAGES).all(|i| match process.translate(page(i)) {
        Some((frame, write)) => {
            pfns[i as usize].is_valid() && pfns[i as usize].phys() == frame && pfns[i as usize].is_write() == write
        }
        None => !pfns[i as usize].is_valid(),
    });
    r.check("snapshot", snap.is_ok() && snap_ok, format_args!("{snap:?}, matches {snap_ok}"));

    let faults0 = process.stats.cpu_faults.load(Ordering::Relaxed);
    let wrote = (8..12)
        .try_for_each(|i| (0..WORDS).try_for_each(|w| device::write(mirror, page(i) + w * 8, dev_pattern(page(i), w))));
    let cpu_sees = (8..12).all(|i| (0..WORDS).all(|w| cpu_read(page(i), w) == dev_pattern(page(i), w)));
    let cpu_faults = process.stats.cpu_faults.load(Ordering::Relaxed) - faults0;
    r.check(
        "device-demand-zero",
        wrote.is_ok() && cpu_sees && cpu_faults == 0,
        format_args!("{wrote:?}, CPU sees device data {cpu_sees}, CPU faults {cpu_faults}"),
    );
}

/// Write-protect and copy-on-write: the kernel changes live entries under
/// invalidations, and the device's entries go and come back.
fn invalidation_steps(r: &mut Report, process: &Process, mirror: &DevMirror<'_>) {
    let old: [u64; 2] = [0, 1].map(|i| process.translate(page(i)).map_or(0, |t| t.0));
    let inv0 = mirror.device().invalidates.load(Ordering::Relaxed);
    // Loads fill the TLB with the writable entries; without the `tlbi` of
    // the write-protect, the store below would not fault.
    (0..4).for_each(|i| _ = cpu_read(page(i), 0));
    let changed = process.write_protect(range(USER_START, 4 * PAGE));
    let gone = (0..4).all(|i| mirror.translate(page(i)).is_none());
    let kept = (4..8).all(|i| mirror.translate(page(i)).is_some());
    let invalidates = mirror.device().invalidates.load(Ordering::Relaxed) - inv0;
    let cpu_ro = process.translate(page(0)) == Some((old[0], false))
        && sysreg::hw_translate(page(0), false) == Some(old[0])
        && sysreg::hw_translate(page(0), true).is_none();
    let cow0 = process.stats.cow_copies.load(Ordering::Relaxed);
    // SAFETY: as in `cpu_fill`: a store to the region through the MMU.
    unsafe { ptr::write_volatile(page(3) as *mut u64, pattern(page(3), 1, 0)) };
    let trapped = process.stats.cow_copies.load(Ordering::Relaxed) - cow0 == 1;
    r.check(
        "write-protect",
        changed == Ok(4) && gone && kept && invalidates == 1 && cpu_ro && trapped,
        format_args!(
            "{changed:?} changed, torn down {gone}, others kept {kept}, {invalidates} invalidates, \
             CPU read-only {cpu_ro}, CPU store faulted {trapped}"
        ),
    );
    let value = device::read(mirror, page(0));
    let entry = mirror.translate(page(0));
    r.check(
        "device-refault-readonly",
        value == Ok(pattern(page(0), 1, 0)) && entry.is_some_and(|e| e.frame() == old[0] && !e.is_write()),
        format_args!("{value:?}, {entry:?}"),
    );

    let cow0 = process.stats.cow_copies.load(Ordering::Relaxed);
    cpu_fill(page(0), 2);
    let cows = process.stats.cow_copies.load(Ordering::Relaxed) - cow0;
    let new = process.translate(page(0));
    // SAFETY: `old[0]` was freed (poisoned) by the copy and nothing was
    // allocated since; reading a free frame through the identity map is
    // harmless.
    let poisoned = unsafe { ptr::read_volatile(memory::words(old[0])) } == memory::POISON;
    let torn = mirror.translate(page(0)).is_none();
    let seen = device_sees(mirror, page(0), |w| pattern(page(0), 2, w));
    let dev_frame = mirror.translate(page(0)).map(|e| e.frame());
    r.check(
        "cow-cpu-write",
        cows == 1 && poisoned && torn && seen == Ok(true) && new.is_some_and(|n| n.1 && n.0 != old[0] && Some(n.0) == dev_frame),
        format_args!("{cows} copies, old poisoned {poisoned}, device torn down {torn}, device sees {seen:?}, CPU {new:x?}, device {dev_frame:x?}"),
    );

    let cow0 = process.stats.cow_copies.load(Ordering::Relaxed);
    let wrote = device::write(mirror, page(1), dev_pattern(page(1), 0));
    let cows = process.stats.cow_copies.load(Ordering::Relaxed) - cow0;
    let cpu = process.translate(page(1));
    let dev = mirror.translate(page(1));
    let data = cpu_read(page(1), 0) == dev_pattern(page(1), 0)
        && (1..WORDS).all(|w| cpu_read(page(1), w) == pattern(page(1), 1, w));
    r.check(
        "cow-device-write",
        wrote.is_ok()
            && cows == 1
            && data
            && cpu.is_some_and(|c| c.1 && c.0 != old[1] && dev.is_some_and(|d| d.frame() == c.0 && d.is_write())),
        format_args!("{wrote:?}, {cows} copies, CPU sees copy + device word {data}, CPU {cpu:x?}, device {dev:?}"),
    );
}

/// PROT_NONE hinting: pages 4 and 5 become `ProtNone` entries under an
/// invalidation; the CPU's and the device's next accesses fault, and the
/// handler restores the same frames with the same data.
fn prot_none_steps(r: &mut Report, process: &Process, mirror: &DevMirror<'_>) {
    let frames: [u64; 2] = [4, 5].map(|i| process.translate(page(i)).map_or(0, |t| t.0));
    (4..6).for_each(|i| _ = cpu_read(page(i), 0)); // into the TLB
    let stats0 = (process.stats.cpu_faults.load(Ordering::Relaxed), process.stats.hint_faults.load(Ordering::Relaxed));
    let inv0 = mirror.device().invalidates.load(Ordering::Relaxed);
    let changed = process.prot_none(range(page(4), 2 * PAGE));
    let kept = [4, 5].map(|i| match process.raw(page(i)).map(|raw| Aarch64Va48::decode(raw, 0)) {
        Some(PteView::ProtNone { frame, flags }) => Some((frame, flags.contains(LeafFlags::WRITE))),
        _ => None,
    });
    let hidden = (4..6).all(|i| mirror.translate(page(i)).is_none() && sysreg::hw_translate(page(i), false).is_none());
    let invalidates = mirror.device().invalidates.load(Ordering::Relaxed) - inv0;
    let cpu = cpu_read(page(5), 7);
    let dev = device::read(mirror, page(4) + 8);
    let cpu_faults = process.stats.cpu_faults.load(Ordering::Relaxed) - stats0.0;
    let hints = process.stats.hint_faults.load(Ordering::Relaxed) - stats0.1;
    let back = [4, 5].map(|i| process.translate(page(i)).map(|t| t.0));
    r.check(
        "prot-none-hint",
        changed == Ok(2)
            && kept == [Some((frames[0], true)), Some((frames[1], true))]
            && hidden
            && invalidates == 1
            && cpu == pattern(page(5), 1, 7)
            && dev == Ok(pattern(page(4), 1, 1))
            && (cpu_faults, hints) == (1, 2)
            && back == [Some(frames[0]), Some(frames[1])],
        format_args!(
            "{changed:?} changed, ProtNone {kept:x?}, hidden {hidden}, {invalidates} invalidates, \
             CPU {cpu:#x}, device {dev:x?}, {cpu_faults} CPU faults, {hints} hint faults, frames {back:x?} (were {frames:x?})"
        ),
    );
}

/// Unmap, then unregister: nothing of the device's view or its table stays.
fn teardown_steps(r: &mut Report, process: &Process, frames: &Frames, mirror: &DevMirror<'_>, live0: usize) {
    let region = mirror.range();
    let unmapped = process.munmap(region);
    let gone = (0..PAGES).all(|i| mirror.translate(page(i)).is_none() && process.translate(page(i)).is_none());
    let refault = mirror.fault(range(USER_START, PAGE), false);
    let cpu = probe_load(page(0));
    r.check(
        "munmap",
        unmapped == Ok(12) && gone && refault == Err(Error::Fault) && cpu == Err(page(0)),
        format_args!("{unmapped:?}, all gone {gone}, device refault {refault:?}, CPU load {cpu:x?}"),
    );
    let unregistered = mirror.unregister();
    let leaked = frames.live() as i64 - (live0 + process.table_frames()) as i64;
    r.check(
        "unregister-frees",
        unregistered.is_ok() && mirror.table_frames() == 0 && leaked == 0,
        format_args!("{unregistered:?}, mirror frames {}, frames leaked {leaked}", mirror.table_frames()),
    );
}
