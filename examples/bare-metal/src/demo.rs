//! `mode=demo`: a readable trace of hmm-core at work, then a summary.
//!
//! CPU 0 runs a process (its table in CR3) and changes its address space;
//! CPU 1 is the device, reaching the process's memory only through its
//! hmm-core mirror. Each `[cpuN]` line is an event: a fault resolved by the
//! kernel, a device fault, an invalidation reaching the device, a device TLB
//! flush. The many-round race runs with the trace off and reports counts.

use core::sync::atomic::{AtomicU64, Ordering};

use hmm_core::pt::{Pfn, TableStats};
use hmm_core::{Error, MirrorConfig, RegionFlags, VaRange};

use crate::device::{self, DevMirror, Device, dev_pattern, pattern};
use crate::memory::frames::{self, POISON};
use crate::memory::{FRAMES, PAGE_SIZE, PhysFrame};
use crate::process::{self, HUGE_SIZE, Process, STATS, Show, pages, range};
use crate::{Machine, race, smp, tlb, trace};

/// Where the demo maps: PML4 slot 1, 1 GiB in (2 MiB aligned).
const BASE: u64 = process::USER_START + 0x4000_0000;
/// Rounds of the unmap/remap race.
const RACE_ROUNDS: usize = 300;

fn span(first: u64, n: u64) -> VaRange {
    range(BASE + first * PAGE_SIZE, n * PAGE_SIZE)
}

fn rw() -> RegionFlags {
    RegionFlags::READ | RegionFlags::WRITE
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Tallies the checks the demo makes.
struct Checks {
    total: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str) {
        self.total += 1;
        if !ok {
            self.failed += 1;
        }
        println!("      check: {what} ... {}", if ok { "ok" } else { "MISMATCH" });
    }
}

/// Runs the device's part on CPU 1 and returns its result.
fn on_device<R: Send>(f: impl Fn() -> R + Sync) -> R {
    smp::call(1, f).unwrap_or_else(|e| panic!("device cpu: {e:?}"))
}

/// Prints the trace and summary; returns whether every check held.
pub fn run(m: &Machine) -> bool {
    println!("=== demo: hmm-core mirrors a process into a device on cpu 1 ===");
    if m.online < 2 {
        println!("the demo needs 2 CPUs (cpu 1 plays the device); run with cpus=2");
        return false;
    }
    let free_at_start = FRAMES.stats().free;
    let mut c = Checks { total: 0, failed: 0 };
    let p = Process::new(&FRAMES).expect("out of frames");
    trace::set(true);
    let figures = scenario(&p, &mut c);
    trace::set(false);
    drop(p);
    let leaked = free_at_start as i64 - FRAMES.stats().free as i64;
    c.check(leaked == 0, "every frame returned to the allocator");
    figures.print(m, leaked);
    println!("  checks:                    {}/{} passed", c.total - c.failed, c.total);
    println!("demo {}", if c.failed == 0 { "OK" } else { "FAILED" });
    c.failed == 0
}

/// The figures of the summary.
struct Figures {
    mirror: hmm_core::MirrorStats,
    fault_errors: u64,
    /// Cycles per device fault in the race: min, median, mean.
    fault_cycles: [u64; 3],
    /// Cycles per invalidated page in the race: min, median, mean.
    page_cycles: [u64; 3],
    huge_cycles: u64,
    /// The mirror table while it held the 2 MiB leaf.
    table: TableStats,
    /// Device counters: accesses, TLB hits, fills, refused fills, update
    /// calls, pages programmed, invalidate calls, flushes, entries dropped.
    device: [u64; 9],
    stale: u64,
    reads_checked: u64,
}

impl Figures {
    fn print(&self, m: &Machine, leaked: i64) {
        let s = &self.mirror;
        println!();
        println!("=== demo summary ===");
        println!("  cpus online:               {}/{} (cpu0 runs the process, cpu1 is the device)", m.online, m.cpus);
        println!("  pages mirrored:            {}", s.pages_mapped);
        println!(
            "  mirror entries written:    {} ({} huge: the 2 MiB leaf as one entry)",
            s.entries_mapped, s.huge_mapped
        );
        let t = &self.table;
        println!(
            "  mirror table at step 9:    {} entries ({} huge), {} table frames",
            t.leaves, t.huge_leaves, t.frames
        );
        println!(
            "  device faults:             {} ({} failed as expected: unmapped, read-only)",
            s.faults, self.fault_errors
        );
        println!("  invalidations:             {} reaching the device, {} pages", s.invalidations, s.pages_invalidated);
        println!("  retries:                   {} (fault walks redone after a collision)", s.retries);
        println!("  stale reads:               {} of {} checked page reads", self.stale, self.reads_checked);
        let ([f0, f1, f2], [p0, p1, p2]) = (self.fault_cycles, self.page_cycles);
        println!("  cycles per device fault:   median {f1}, min {f0}, mean {f2} (rdtsc around Mirror::fault, race)");
        println!(
            "  cycles per invalidated pg: median {p1}, min {p0}, mean {p2} (rdtsc in invalidate_range_start, race, first half)"
        );
        println!("  2 MiB leaf device fault:   {} cycles, {} per page", self.huge_cycles, self.huge_cycles / 512);
        let [accesses, hits, fills, races, updates, programmed, invalidates, flushes, dropped] = self.device;
        println!(
            "  device accesses:           {accesses}: {hits} TLB hits, {fills} fills, {races} refused (flush raced)"
        );
        println!(
            "  device callbacks:          {updates} update ({programmed} pages), {invalidates} invalidate, \
             {flushes} flush ({dropped} TLB entries dropped)"
        );
        println!(
            "  kernel:                    {} invalidate_range_start calls, {} entries removed or downgraded, \
             {} invlpg, {} NMI shootdowns",
            get(&STATS.invalidations),
            get(&STATS.entries_changed),
            get(&tlb::LOCAL_FLUSHES),
            get(&tlb::SHOOTDOWNS)
        );
        println!(
            "  kernel faults:             {} CPU page faults, {} fault handler calls, {} demand-zero pages, \
             {} 2 MiB leaves, {} COW copies",
            get(&STATS.cpu_faults),
            get(&STATS.handler_calls),
            get(&STATS.demand_zero),
            get(&STATS.huge_leaves),
            get(&STATS.cow_copies)
        );
        println!("  frames leaked:             {leaked}");
    }
}

/// Steps 1-9 on process `p`; the mirror lives (and dies) in here.
fn scenario(p: &Process, c: &mut Checks) -> Figures {
    let (a, b, huge) = (span(0, 8), span(8, 4), range(BASE + HUGE_SIZE, HUGE_SIZE));
    println!("[1] process: PML4 at {}; cpu0 loads it into CR3 and writes generation 1 into 8 pages", p.root_frame());
    p.mmap(a, rw(), false).expect("mmap");
    let cpu = p.enter();
    for va in pages(a) {
        fill(&cpu, va, 1);
    }
    c.check(get(&STATS.cpu_faults) >= 8, "8 CPU page faults, each resolved by demand-zero");

    let mirror_range = range(BASE, 2 * HUGE_SIZE);
    let mr = core::pin::pin!(
        DevMirror::with_format(p, &FRAMES, Device::new(), mirror_range, MirrorConfig::default()).expect("mirror")
    );
    mr.as_ref().register().expect("register");
    let mr: &DevMirror<'_> = &mr;
    println!("[2] device on cpu1: mirror of {} registered; it reads the 8 pages", Show(mirror_range));
    let reads = on_device(|| pages(a).map(|va| device::read_generation(mr, va)).filter(|r| *r == Ok(Some(1))).count());
    c.check(reads == 8, "device read generation 1 from all 8 pages (8 read faults)");
    let again = on_device(|| pages(a).map(|va| device::read_generation(mr, va)).filter(|r| *r == Ok(Some(1))).count());
    c.check(again == 8 && mr.stats().faults == 8, "second pass: TLB and mirror hits, no new fault");

    println!("[3] device writes 4 untouched pages {} (write faults: demand-zero done for it on cpu1)", Show(b));
    p.mmap(b, rw(), false).expect("mmap");
    let wrote = on_device(|| pages(b).zip(1..).all(|(va, seq)| device::write_page(mr, va, seq).is_ok()));
    c.check(wrote, "device writes succeeded");
    let seen = pages(b).zip(1..).all(|(va, seq)| holds(&cpu, va, |w| dev_pattern(va, seq, w)));
    c.check(seen, "cpu0 reads the device's data through its MMU");

    println!("[4] cpu0 mprotects {} read-only, then the device tries to write it", Show(b));
    p.mprotect(b, RegionFlags::READ).expect("mprotect");
    let denied = on_device(|| device::write_page(mr, b.start(), 99));
    c.check(denied == Err(Error::Perm), "device write refused with Perm");
    c.check(holds(&cpu, b.start(), |w| dev_pattern(b.start(), 1, w)), "page content unchanged");
    let read = on_device(|| device::read_dev_seq(mr, b.start()));
    c.check(read == Ok(Some(1)), "device can still read it (read fault)");

    println!("[5] cpu0 munmaps {}; its frames are freed and poisoned", Show(b));
    let old = mr.translate(b.start()).map(|e| e.frame()).unwrap_or(0);
    p.munmap(b).expect("munmap");
    c.check(frames::peek(PhysFrame::containing(old)) == POISON, "old frame poisoned");
    let gone = on_device(|| device::read_dev_seq(mr, b.start()));
    c.check(gone == Err(Error::Fault), "device read of the hole fails with Fault");

    println!("[6] fork: the child shares {} copy-on-write; then both CPUs write", Show(a));
    let child = p.fork().expect("fork");
    let (va0, va1) = (BASE, BASE + PAGE_SIZE);
    println!("    cpu0 writes page 0 (generation 2):");
    fill(&cpu, va0, 2);
    let g = on_device(|| device::read_generation(mr, va0));
    c.check(g == Ok(Some(2)), "device sees the CPU's new frame after the COW break");
    println!("    device writes page 1 while cpu0's TLB caches the shared frame:");
    let _ = cpu.read(va1);
    let shootdowns = get(&tlb::SHOOTDOWNS);
    let w = on_device(|| device::write_page(mr, va1, 7));
    c.check(w.is_ok() && get(&tlb::SHOOTDOWNS) > shootdowns, "device COW break shot down cpu0's TLB (NMI)");
    c.check(holds(&cpu, va1, |w| dev_pattern(va1, 7, w)), "cpu0 reads the device's data");
    let child_old =
        [va0, va1].iter().all(|&va| (0..device::WORDS).all(|w| child.peek(va, w) == Some(pattern(va, 1, w))));
    c.check(child_old, "the child still sees generation 1");
    drop(child);

    println!("[7] remap: cpu0 unmaps {} and maps it again populated with generation 3", Show(a));
    p.munmap(a).expect("munmap");
    p.mmap_populate(a, rw(), &mut |va, words| words.iter_mut().enumerate().for_each(|(w, x)| *x = pattern(va, 3, w)))
        .expect("mmap");
    let g = on_device(|| pages(a).map(|va| device::read_generation(mr, va)).filter(|r| *r == Ok(Some(3))).count());
    c.check(g == 8, "device reads generation 3 everywhere");

    println!(
        "[8] race: {RACE_ROUNDS} rounds of cpu0 unmapping and remapping {} while cpu1 reads it (trace off)",
        Show(a)
    );
    trace::set(false);
    let d = &mr.device().stats;
    let before = (get(&d.faults_ok), get(&d.fault_cycles));
    let mut r = race::run(mr, p, a, 4, RACE_ROUNDS);
    let (good, holes) = (r.good, r.holes);
    let faults = get(&d.faults_ok) - before.0;
    let fault_mean = (get(&d.fault_cycles) - before.1) / faults.max(1);
    let mut recent = [0u64; device::SAMPLES];
    let n = mr.device().recent_fault_cycles(&mut recent[..faults.min(device::SAMPLES as u64) as usize]);
    let fault_median = median(&mut recent[..n]);
    let per_page = &mut r.per_page[..r.samples];
    let inv_mean = per_page.iter().sum::<u64>() / per_page.len().max(1) as u64;
    let inv_median = median(per_page);
    let inv_min = r.per_page[..r.samples].first().copied().unwrap_or(0);
    let fault_min = recent[..n].first().copied().unwrap_or(0);
    trace::set(true);
    c.check(r.failed.is_none() && r.other.is_none(), "no unexpected error on either side");
    println!(
        "    {good} good device reads, {holes} hit the unmapped window (Fault), {} gave up (Busy), {} TLB fills \
         dropped because a flush raced them",
        r.busy,
        get(&d.fill_races)
    );
    c.check(mr.device().stale_reads() == 0, "no stale read during the race");

    println!("[9] 2 MiB leaf: {} mapped with one PS entry; the device faults all of it at once", Show(huge));
    p.mmap(huge, rw(), true).expect("mmap");
    for va in pages(huge).step_by(64) {
        cpu.write(va, va);
    }
    let before = mr.stats();
    let (huge_faults, mapped, entries, cycles) =
        (before.faults, before.pages_mapped, before.entries_mapped, get(&d.fault_cycles));
    trace::set(false); // time the fault without printing in it
    let r = on_device(|| device::fault(mr, huge, false));
    trace::set(true);
    let huge_cycles = get(&d.fault_cycles) - cycles;
    println!("    one device fault, {huge_cycles} cycles ({} per page)", huge_cycles / 512);
    let s = mr.stats();
    c.check(r.is_ok() && s.faults == huge_faults + 1 && s.pages_mapped == mapped + 512, "one fault mirrored 512 pages");
    let mut snap = [Pfn::NONE; 512];
    let orders = mr.snapshot(huge, &mut snap).is_ok() && snap.iter().all(|p| p.is_valid() && p.order() == 9);
    c.check(orders, "snapshot reports order 9 for every page");
    let table = mr.table_stats();
    println!(
        "    mirror table: {} entries ({} huge), {} table frames; the fault wrote {} entry",
        table.leaves,
        table.huge_leaves,
        table.frames,
        s.entries_mapped - entries
    );
    c.check(s.entries_mapped - entries == 1 && table.huge_leaves == 1, "the 2 MiB leaf is one mirror entry");
    let va = huge.start() + 300 * PAGE_SIZE;
    let leaf = on_device(|| device::walk(mr, va));
    let cpu_frame = p.translate(va).map(|t| t.frame);
    match leaf {
        Some(l) => println!(
            "    device walk from the root (cpu1, no lock): {va:#x} is in a leaf {:#x} -> {:#x} of order {}",
            l.va, l.pa, l.order
        ),
        None => println!("    device walk from the root (cpu1, no lock): {va:#x} not mapped"),
    }
    c.check(
        leaf.is_some_and(|l| l.order == 9 && Some(l.frame(va)) == cpu_frame)
            && mr.translate(va).is_some_and(|e| e.order() == 9 && Some(e.frame()) == cpu_frame),
        "device walk and Mirror::translate find an order-9 leaf at the CPU's frame",
    );
    let invalidated = s.pages_invalidated;
    p.munmap(huge).expect("munmap");
    c.check(mr.stats().pages_invalidated - invalidated == 512, "munmap invalidated all 512 mirrored pages");
    c.check(mr.table_stats().huge_leaves == 0 && device::walk(mr, va).is_none(), "the mirror entry is gone");
    drop(cpu);
    let stale = mr.device().stale_reads();
    c.check(stale == 0, "zero stale reads overall");
    let figures = Figures {
        mirror: mr.stats(),
        fault_errors: get(&d.fault_errors),
        fault_cycles: [fault_min, fault_median, fault_mean],
        page_cycles: [inv_min, inv_median, inv_mean],
        huge_cycles,
        table,
        device: [
            &d.accesses,
            &d.tlb_hits,
            &d.tlb_fills,
            &d.fill_races,
            &d.updates,
            &d.pages_programmed,
            &d.invalidates,
            &d.flushes,
            &d.tlb_dropped,
        ]
        .map(get),
        stale,
        reads_checked: get(&d.reads_checked),
    };
    println!("[10] teardown: the mirror is dropped (the device is told to drop everything), then the process");
    figures
}

fn fill(cpu: &process::Running<'_>, va: u64, generation: u64) {
    for w in 0..device::WORDS {
        cpu.write(va + 8 * w as u64, pattern(va, generation, w));
    }
}

fn holds(cpu: &process::Running<'_>, va: u64, expect: impl Fn(usize) -> u64) -> bool {
    (0..device::WORDS).all(|w| cpu.read(va + 8 * w as u64) == expect(w))
}

/// The median of `v` (reorders it); 0 if empty.
fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}
