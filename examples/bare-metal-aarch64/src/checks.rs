//! The aarch64-only checks: `mmu-live` (the MMU registers), `at-s1e1w` and
//! the `AT` part of `write-protect` (the MMU's own walk), `prot-none-hint`.

use core::sync::atomic::Ordering;

use hmm_core::AddressSpace;
use hmm_core::arch::aarch64::Aarch64Va48;
use hmm_core::arch::{LeafFlags, PteFormat, PteView};
use hmm_demo_kernel::demo::{PAGES, cpu_read, pattern, user_page};
use hmm_demo_kernel::device::{self, DevMirror};
use hmm_demo_kernel::process::{PAGE, range};
use hmm_demo_kernel::{ArchChecks, Process, Report};

use crate::cpu::Aarch64Cpu;
use crate::sysreg;

impl ArchChecks for Aarch64Cpu {
    fn mmu_live(r: &mut Report, process: &Process<Self>) {
        let root = process.root();
        let (ttbr0, tcr, sctlr) = sysreg::mmu_registers();
        r.check(
            "mmu-live",
            ttbr0 == root && tcr & 0x3f == 16 && sctlr & 1 == 1 && sysreg::pan() == 0,
            format_args!("TTBR0 {ttbr0:#x}, root {root:#x}, TCR {tcr:#x}, SCTLR {sctlr:#x}, PAN {}", sysreg::pan()),
        );
    }

    /// The MMU's own walk (AT S1E1W) agrees with hmm-core's decoding of
    /// every entry of the region: mapped writable pages, unmapped faults.
    fn after_cpu_steps(r: &mut Report, process: &Process<Self>) {
        let page = user_page::<Self>;
        let disagree =
            (0..PAGES).find(|&i| sysreg::hw_translate(page(i), true) != process.translate(page(i)).map(|t| t.0));
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

    fn mmu_read_only(va: u64, frame: u64) -> bool {
        sysreg::hw_translate(va, false) == Some(frame) && sysreg::hw_translate(va, true).is_none()
    }

    /// PROT_NONE hinting: pages 4 and 5 become `ProtNone` entries under an
    /// invalidation; the CPU's and the device's next accesses fault, and the
    /// handler restores the same frames with the same data.
    fn before_teardown(r: &mut Report, process: &Process<Self>, mirror: &DevMirror<'_, Self>) {
        let page = user_page::<Self>;
        let frames: [u64; 2] = [4, 5].map(|i| process.translate(page(i)).map_or(0, |t| t.0));
        (4..6).for_each(|i| _ = cpu_read(page(i), 0)); // into the TLB
        let stats0 =
            (process.stats.cpu_faults.load(Ordering::Relaxed), process.stats.hint_faults.load(Ordering::Relaxed));
        let inv0 = mirror.device().invalidates.load(Ordering::Relaxed);
        let changed = process.prot_none(range::<Self>(page(4), 2 * PAGE));
        let kept = [4, 5].map(|i| match process.raw(page(i)).map(|raw| Aarch64Va48::decode(raw, 0)) {
            Some(PteView::ProtNone { frame, flags }) => Some((frame, flags.contains(LeafFlags::WRITE))),
            _ => None,
        });
        let hidden =
            (4..6).all(|i| mirror.translate(page(i)).is_none() && sysreg::hw_translate(page(i), false).is_none());
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
}
