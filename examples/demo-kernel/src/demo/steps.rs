//! The CPU's demand faults, the device's faults, reads, snapshot and
//! writes, and the teardown.

use core::sync::atomic::Ordering;

use hmm_core::Error;
use hmm_core::pt::Pfn;

use super::{PAGES, WORDS, cpu_fill, cpu_read, dev_pattern, device_sees, pattern, user_page};
use crate::Cpu;
use crate::device::{self, DevMirror};
use crate::memory::Frames;
use crate::process::{PAGE, Process, range};
use crate::report::Report;

/// The CPU fills pages 0..8 of the region through demand faults.
pub fn cpu<C: Cpu>(r: &mut Report, process: &Process<C>) {
    let page = user_page::<C>;
    let faults0 = process.stats.cpu_faults.load(Ordering::Relaxed);
    (0..8).for_each(|i| cpu_fill(page(i), 1));
    let faults = process.stats.cpu_faults.load(Ordering::Relaxed) - faults0;
    let mapped = (0..PAGES).filter(|&i| process.translate(page(i)).is_some()).count();
    r.check("cpu-demand-fault", faults == 8 && mapped == 8, format_args!("{faults} faults, {mapped} pages mapped"));
    let readback = (0..8).all(|i| (0..WORDS).all(|w| cpu_read(page(i), w) == pattern(page(i), 1, w)));
    r.check("cpu-readback", readback, format_args!("pattern mismatch"));
}

/// The device maps, reads and writes through the mirror.
pub fn device<C: Cpu>(r: &mut Report, process: &Process<C>, mirror: &DevMirror<'_, C>) {
    let page = user_page::<C>;
    let faulted = mirror.fault(range::<C>(C::USER_START, 8 * PAGE), false);
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
    let snap = mirror.snapshot(range::<C>(C::USER_START, PAGES * PAGE), &mut pfns);
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

/// Unmap, then unregister: nothing of the device's view or its table stays.
pub fn teardown<C: Cpu>(
    r: &mut Report,
    process: &Process<C>,
    frames: &Frames,
    mirror: &DevMirror<'_, C>,
    live0: usize,
) {
    let page = user_page::<C>;
    let region = mirror.range();
    let unmapped = process.munmap(region);
    let gone = (0..PAGES).all(|i| mirror.translate(page(i)).is_none() && process.translate(page(i)).is_none());
    let refault = mirror.fault(range::<C>(C::USER_START, PAGE), false);
    let cpu = C::probe_load(page(0));
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
