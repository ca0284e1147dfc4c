//! `mode=demo`: a readable walk through the scenario hmm-core will automate.
//!
//! The BSP plays "the process's kernel": it builds an address space, maps
//! pages and writes data. AP 1 plays "the device": it only gets the page-table
//! root and reaches the data by walking that table. Every table change is
//! announced through the hook *before* it happens.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::Machine;
use crate::device::{self, ScanReport};
use crate::memory::frames::{self, POISON};
use crate::memory::{FRAMES, PAGE_SIZE};
use crate::process::{AddressSpace, ChangeKind, InvalidateHook, VaRange};
use crate::smp;

/// Where the demo maps its user pages.
const USER_BASE: u64 = 0x0000_0000_4000_0000;
/// How many pages it maps.
const NPAGES: u64 = 8;

/// Hook that narrates every change (phase 2: replaced by hmm-core's mirror).
struct TraceHook {
    events: AtomicU64,
}

impl InvalidateHook for TraceHook {
    fn invalidate_start(&self, range: VaRange, kind: ChangeKind) {
        self.events.fetch_add(1, Ordering::Relaxed);
        println!("      hook: invalidate_start {range} {kind:?}");
    }
}

static TRACE: TraceHook = TraceHook { events: AtomicU64::new(0) };

/// Runs the device scan on AP 1, or on the BSP when there is no AP.
fn device_scan(m: &Machine, space: &AddressSpace) -> ScanReport {
    let args = [space.root().start(), USER_BASE, NPAGES, 0];
    let words = if m.online >= 2 {
        smp::run_on(1, device::scan_job, args).unwrap_or_else(|e| panic!("device scan failed: {e:?}"))
    } else {
        println!("      (single CPU: the device runs on the BSP)");
        device::scan_job(0, args)
    };
    ScanReport::from_words(words)
}

/// Prints the demo trace; returns whether every check held.
pub fn run(m: &Machine) -> bool {
    let mut checks = 0u32;
    let mut failed = 0u32;
    let mut check = |ok: bool, what: &str| {
        checks += 1;
        if !ok {
            failed += 1;
        }
        println!("      check: {what} ... {}", if ok { "ok" } else { "MISMATCH" });
    };
    let free_at_start = FRAMES.stats().free;
    println!("=== demo: a device mirrors a process address space ===");

    let space = AddressSpace::with_hook(&FRAMES, &TRACE).expect("out of frames");
    println!("[1] new process address space, PML4 at {}", space.root());

    println!("[2] BSP maps {NPAGES} user pages at {USER_BASE:#x} (RW, user, NX) and fills them");
    let mut frames_used = [None; NPAGES as usize];
    for page in 0..NPAGES {
        let frame = FRAMES.alloc().expect("out of frames");
        device::fill_page(frame, page);
        space.map(USER_BASE + page * PAGE_SIZE, frame, true).expect("map failed");
        frames_used[page as usize] = Some(frame);
    }

    let all = (1u64 << NPAGES) - 1;
    let report = device_scan(m, &space);
    println!(
        "[3] device (cpu {}) walked the table: present {:#010b}, writable {:#010b}, checksum {:#018x}",
        report.apic_id, report.present, report.writable, report.checksum
    );
    check(report.present == all && report.writable == all, "all pages present and writable");
    check(report.checksum == device::expected_checksum(NPAGES, all), "checksum matches BSP's data");

    println!("[4] BSP write-protects page 1 and unmaps page 3");
    space.protect(USER_BASE + PAGE_SIZE, false).expect("protect failed");
    let frame3 = space.unmap(USER_BASE + 3 * PAGE_SIZE).expect("page 3 was mapped");
    check(Some(frame3) == frames_used[3], "unmap returned the frame that was mapped");
    println!("      page 3's {frame3} first word before free: {:#018x}", frames::peek(frame3));
    FRAMES.free(frame3);
    let poisoned = frames::peek(frame3);
    println!("      ... after free (poisoned):           {poisoned:#018x}");
    check(poisoned == POISON, "freed frame is poisoned");

    let report = device_scan(m, &space);
    let expect_present = all & !(1 << 3);
    println!(
        "[5] device (cpu {}) walked again:  present {:#010b}, writable {:#010b}, checksum {:#018x}",
        report.apic_id, report.present, report.writable, report.checksum
    );
    check(report.present == expect_present, "device no longer sees page 3");
    check(report.writable == expect_present & !(1 << 1), "device sees page 1 read-only");
    check(
        report.checksum == device::expected_checksum(NPAGES, expect_present),
        "checksum over remaining pages matches",
    );

    let generation = space.generation();
    println!("[6] dropping the address space (hook reports Release per page)");
    drop(space);
    let leaked = free_at_start as i64 - FRAMES.stats().free as i64;
    check(leaked == 0, "every frame returned to the allocator");

    println!();
    println!("=== demo summary ===");
    println!("  cpus online:         {}/{}", m.online, m.cpus);
    println!("  pages mapped:        {NPAGES}");
    println!("  table changes:       {generation} before teardown");
    println!("  hook events:         {}", TRACE.events.load(Ordering::Relaxed));
    println!("  frames leaked:       {leaked}");
    println!("  checks:              {}/{} passed", checks - failed, checks);
    println!("demo {}", if failed == 0 { "OK" } else { "FAILED" });
    failed == 0
}
