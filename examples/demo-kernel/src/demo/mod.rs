//! The demo: hmm-core's core loop on the CPU's live tables, one check per
//! step (see [`crate::report`]). The CPU side touches user memory through
//! the MMU, so its stores and loads are translated through the process's
//! entries and its page faults go through the kernel's trap vector to the
//! process's fault handler. The device side goes through its mirror only
//! (see [`crate::device`]).
//!
//! The checks every architecture makes are here; [`ArchChecks`] adds the
//! ones only one can make (its MMU registers, an address-translation
//! instruction, PROT_NONE hints), at fixed points of the run.

mod access;
mod cow;
mod steps;

use core::pin::pin;

use hmm_core::{MirrorConfig, RegionFlags};

pub use access::{PAGES, WORDS, cpu_fill, cpu_read, dev_pattern, device_sees, pattern, user_page};

use crate::Cpu;
use crate::device::{DevMirror, Device};
use crate::memory::Frames;
use crate::process::{PAGE, Process, range};
use crate::report::Report;

/// The checks of one architecture, around the shared ones.
pub trait ArchChecks: Cpu + Sized {
    /// The first check: the MMU runs the process's root.
    fn mmu_live(r: &mut Report, process: &Process<Self>);

    /// After `cpu-readback`: pages 0..8 of the region are mapped writable,
    /// the rest not.
    fn after_cpu_steps(_r: &mut Report, _process: &Process<Self>) {}

    /// Part of `write-protect`: whether the MMU's own walk finds the page at
    /// `va` read-only on `frame`. True where the architecture has no
    /// instruction to ask it.
    fn mmu_read_only(_va: u64, _frame: u64) -> bool {
        true
    }

    /// After the copy-on-write checks, before the teardown: pages 0..12
    /// mapped (0..4 copied or read-only), the device registered.
    fn before_teardown(_r: &mut Report, _process: &Process<Self>, _mirror: &DevMirror<'_, Self>) {}
}

/// Runs every step.
pub fn run<C: ArchChecks>(process: &'static Process<C>, frames: &'static Frames) -> Report {
    let mut r = Report::default();
    C::mmu_live(&mut r, process);
    let far = C::USER_START + (1 << 30);
    r.check("cpu-no-region-faults", C::probe_load(far) == Err(far), format_args!("{:?}", C::probe_load(far)));

    let live0 = frames.live();
    let region = range::<C>(C::USER_START, PAGES * PAGE);
    let rw = RegionFlags::READ | RegionFlags::WRITE;
    if let Err(e) = process.mmap(region, rw) {
        r.check("mmap", false, format_args!("{e}"));
        return r;
    }
    steps::cpu(&mut r, process);
    C::after_cpu_steps(&mut r, process);
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
    steps::device(&mut r, process, &mirror);
    cow::steps(&mut r, process, &mirror);
    C::before_teardown(&mut r, process, &mirror);
    steps::teardown(&mut r, process, frames, &mirror, live0);
    r
}
