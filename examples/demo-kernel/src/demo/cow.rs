//! Write-protect and copy-on-write: the kernel changes live entries under
//! invalidations, and the device's entries go and come back.

use core::ptr;
use core::sync::atomic::Ordering;

use super::{ArchChecks, WORDS, cpu_fill, cpu_read, dev_pattern, device_sees, pattern, user_page};
use crate::device::{self, DevMirror};
use crate::memory;
use crate::process::{PAGE, Process, range};
use crate::report::Report;

/// `write-protect`, `device-refault-readonly`, `cow-cpu-write`,
/// `cow-device-write`.
pub fn steps<C: ArchChecks>(r: &mut Report, process: &Process<C>, mirror: &DevMirror<'_, C>) {
    let page = user_page::<C>;
    let old: [u64; 2] = [0, 1].map(|i| process.translate(page(i)).map_or(0, |t| t.0));
    let inv0 = mirror.device().invalidates.load(Ordering::Relaxed);
    // Loads fill the TLB with the writable entries; without the TLB flush
    // of the write-protect, the store below would not fault.
    (0..4).for_each(|i| _ = cpu_read(page(i), 0));
    let changed = process.write_protect(range::<C>(C::USER_START, 4 * PAGE));
    let gone = (0..4).all(|i| mirror.translate(page(i)).is_none());
    let kept = (4..8).all(|i| mirror.translate(page(i)).is_some());
    let invalidates = mirror.device().invalidates.load(Ordering::Relaxed) - inv0;
    let cpu_ro = process.translate(page(0)) == Some((old[0], false)) && C::mmu_read_only(page(0), old[0]);
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
