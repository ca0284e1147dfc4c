//! The simulated device: it runs on an application processor and reaches a
//! process's memory only through its hmm-core [`Mirror`]: a small TLB, then
//! the mirror's device-side table (`Mirror::translate`), then a device fault
//! (`Mirror::fault`) that hmm-core resolves against the CPU tables. Data is
//! read and written through the offset map at the physical address the
//! translation gives.
//!
//! # The TLB and flushes
//! [`Device`] implements [`DeviceOps`]. `update` only counts (the mirror
//! table is the device's page table); `invalidate` only counts; `flush`
//! drops TLB entries of the range and bumps the flush generation. Every data
//! access runs with the TLB lock held, and so does `flush`: when `flush`
//! returns, no access through a dropped entry is in flight (as a real device
//! drains outstanding transactions before acknowledging a TLB
//! invalidation). The TLB lock is a fair ticket lock, so a flush waits for
//! at most the access in flight. A TLB fill checks that the flush
//! generation it read before its table walk is unchanged, so a translation
//! read just before an invalidation can never be cached after it.
//!
//! # Checking data
//! The CPU side fills pages with [`pattern`]`(va, generation, word)`; the
//! device writes [`dev_pattern`]. Every word read is decoded: poison, zero,
//! another page's data or a generation the CPU had already replaced counts as
//! a stale read.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::pt::Pfn;
use hmm_core::{DeviceOps, Error, Event, Mirror, VaRange};

use crate::cpu;
use crate::memory::PAGE_SIZE;
use crate::memory::frames::FrameAllocator;
use crate::memory::phys::phys_to_virt;
use crate::process::{Process, Show};
use crate::sync::TicketLock;

/// The mirror type the kernel uses: this device, the kernel allocator.
pub type DevMirror<'a> = Mirror<'a, Process, Device, FrameAllocator>;

/// 64-bit words per page.
pub const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Entries of the device TLB.
const TLB_SLOTS: usize = 8;
/// Attempts (TLB miss, walk, fault) an access makes before giving up.
const MAX_ATTEMPTS: u32 = 16;

const CPU_TAG: u64 = 0xa5;
const DEV_TAG: u64 = 0x5a;

fn tagged(tag: u64, va: u64, generation: u64, word: usize) -> u64 {
    (tag << 56) | (((va >> 12) & 0xff_ffff) << 32) | ((generation & 0xffff) << 16) | word as u64
}

/// What the CPU side stores in word `word` of the page at `va`, generation
/// `generation`. Never zero and never the allocator's poison.
pub fn pattern(va: u64, generation: u64, word: usize) -> u64 {
    tagged(CPU_TAG, va, generation, word)
}

/// What the device stores in word `word` of the page at `va`, write `seq`.
pub fn dev_pattern(va: u64, seq: u64, word: usize) -> u64 {
    tagged(DEV_TAG, va, seq, word)
}

/// The generation of a page whose 512 words all hold `tag`-patterns of page
/// `va` with one generation; otherwise `Err(first bad word's value)`.
fn scan(words: *const u64, va: u64, tag: u64) -> Result<u64, u64> {
    let mut generation = None;
    for w in 0..WORDS {
        // SAFETY: `words` points to a mapped 4 KiB frame (the caller holds
        // the translation and the TLB lock); volatile: the CPU may write it.
        let v = unsafe { ptr::read_volatile(words.add(w)) };
        let g = (v >> 16) & 0xffff;
        if v != tagged(tag, va, g, w) || generation.is_some_and(|x| x != g) {
            return Err(v);
        }
        generation = Some(g);
    }
    Ok(generation.unwrap_or(0))
}

/// Device counters (shared: the BSP reads them while the AP works).
#[derive(Debug, Default)]
pub struct Counters {
    /// Page accesses started.
    pub accesses: AtomicU64,
    /// Accesses served by a TLB hit.
    pub tlb_hits: AtomicU64,
    /// TLB fills from the mirror table.
    pub tlb_fills: AtomicU64,
    /// Fills dropped because a flush ran during the walk.
    pub fill_races: AtomicU64,
    /// Fills stalled by `fill_delay_us`.
    pub stalled_fills: AtomicU64,
    /// Device faults raised to hmm-core (`Mirror::fault`).
    pub faults: AtomicU64,
    /// Device faults that succeeded.
    pub faults_ok: AtomicU64,
    /// TSC cycles spent in the faults that succeeded.
    pub fault_cycles: AtomicU64,
    /// Device faults that failed (Fault, Perm, Busy, ...).
    pub fault_errors: AtomicU64,
    /// `update` callbacks / pages they programmed.
    pub updates: AtomicU64,
    /// Pages programmed by `update`.
    pub pages_programmed: AtomicU64,
    /// `invalidate` callbacks.
    pub invalidates: AtomicU64,
    /// `flush` callbacks.
    pub flushes: AtomicU64,
    /// TLB entries dropped by flushes.
    pub tlb_dropped: AtomicU64,
    /// Page reads whose data was checked.
    pub reads_checked: AtomicU64,
    /// Page reads that found poison, foreign or outdated data.
    pub stale_reads: AtomicU64,
    /// Successful page writes.
    pub writes: AtomicU64,
    /// The first stale value seen (0: none; a stale 0 is recorded as 1).
    pub first_stale: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[derive(Clone, Copy)]
struct TlbEntry {
    page: u64,
    frame: u64,
    write: bool,
}

struct Tlb {
    slots: [Option<TlbEntry>; TLB_SLOTS],
    next: usize,
}

/// How many recent device-fault timings [`Device::recent_fault_cycles`] keeps.
pub const SAMPLES: usize = 512;

/// The device: a TLB plus counters. Owned by its [`Mirror`].
pub struct Device {
    tlb: TicketLock<Tlb>,
    /// Bumped (under the TLB lock) by every flush.
    flush_gen: AtomicU64,
    /// Counters.
    pub stats: Counters,
    /// TSC cycles of the last [`SAMPLES`] successful device faults (a ring).
    samples: [AtomicU64; SAMPLES],
    /// Test knob, 0 normally: stall between a table walk and the TLB fill
    /// until a flush arrives or this many microseconds pass, so a racing
    /// flush lands in the window the fill must catch.
    pub fill_delay_us: AtomicU64,
    /// True while a fill is stalled.
    pub in_stall: AtomicBool,
}

impl Device {
    /// A device with an empty TLB.
    pub fn new() -> Self {
        Self {
            tlb: TicketLock::new(Tlb { slots: [None; TLB_SLOTS], next: 0 }),
            flush_gen: AtomicU64::new(0),
            stats: Counters::default(),
            samples: [const { AtomicU64::new(0) }; SAMPLES],
            fill_delay_us: AtomicU64::new(0),
            in_stall: AtomicBool::new(false),
        }
    }

    /// Copies the timings of the last `out.len()` (at most [`SAMPLES`])
    /// successful device faults into `out`; returns how many it copied.
    pub fn recent_fault_cycles(&self, out: &mut [u64]) -> usize {
        let end = get(&self.stats.faults_ok) as usize;
        let n = end.min(SAMPLES).min(out.len());
        for (i, slot) in out[..n].iter_mut().enumerate() {
            *slot = get(&self.samples[(end - n + i) % SAMPLES]);
        }
        n
    }

    /// Page reads that returned stale data.
    pub fn stale_reads(&self) -> u64 {
        get(&self.stats.stale_reads)
    }

    /// Successful page writes so far.
    pub fn writes(&self) -> u64 {
        get(&self.stats.writes)
    }
}

impl DeviceOps for Device {
    fn update(&self, range: VaRange, pfns: &[Pfn]) -> core::result::Result<(), i32> {
        bump(&self.stats.updates, 1);
        bump(&self.stats.pages_programmed, pfns.len() as u64);
        let order = pfns.first().map_or(0, |p| p.order());
        trace!("device: mirror table programmed {} ({} pages, CPU leaf order {order})", Show(range), pfns.len());
        Ok(())
    }

    fn invalidate(&self, range: VaRange, event: Event) {
        bump(&self.stats.invalidates, 1);
        trace!("device: invalidate {} ({event:?})", Show(range));
    }

    fn flush(&self, range: VaRange) {
        let mut tlb = self.tlb.lock();
        let mut dropped = 0;
        for slot in tlb.slots.iter_mut() {
            if slot.is_some_and(|e| range.contains_addr(e.page << 12)) {
                *slot = None;
                dropped += 1;
            }
        }
        self.flush_gen.fetch_add(1, Ordering::Release);
        drop(tlb);
        bump(&self.stats.flushes, 1);
        bump(&self.stats.tlb_dropped, dropped);
        trace!("device: TLB flush {}: {dropped} entries dropped", Show(range));
    }
}

/// A device fault on `range`, timed: hmm-core faults the pages in on the CPU
/// side and mirrors them.
pub fn fault(m: &DevMirror<'_>, range: VaRange, write: bool) -> Result<(), Error> {
    let dev = m.device();
    let retries = m.stats().retries;
    let t0 = cpu::rdtsc();
    let r = m.fault(range, write);
    let cycles = cpu::rdtsc() - t0;
    bump(&dev.stats.faults, 1);
    if r.is_ok() {
        let n = dev.stats.faults_ok.fetch_add(1, Ordering::Relaxed);
        dev.samples[n as usize % SAMPLES].store(cycles, Ordering::Relaxed);
        bump(&dev.stats.fault_cycles, cycles);
    } else {
        bump(&dev.stats.fault_errors, 1);
    }
    let retried = m.stats().retries - retries;
    let kind = if write { "write" } else { "read" };
    trace!("device: {kind} fault {} -> {r:?} ({cycles} cycles, {retried} retries)", Show(range));
    r
}

/// Runs `f` on the 512 words of the page at `va`, as the device: TLB, else
/// mirror table, else device fault. `f` runs with the TLB lock held, so the
/// translation it uses cannot be flushed (and its frame freed) meanwhile.
pub fn access<R>(m: &DevMirror<'_>, va: u64, write: bool, f: impl FnOnce(*mut u64) -> R) -> Result<R, Error> {
    let dev = m.device();
    let page = va >> 12;
    bump(&dev.stats.accesses, 1);
    for _ in 0..MAX_ATTEMPTS {
        {
            let tlb = dev.tlb.lock();
            if let Some(e) = tlb.slots.iter().flatten().find(|e| e.page == page && (e.write || !write)) {
                bump(&dev.stats.tlb_hits, 1);
                return Ok(f(phys_to_virt(e.frame).cast()));
            }
        }
        let generation = dev.flush_gen.load(Ordering::Acquire);
        match m.translate(va) {
            Some(e) if e.is_write() || !write => {
                let stall = dev.fill_delay_us.load(Ordering::Relaxed);
                if stall > 0 {
                    bump(&dev.stats.stalled_fills, 1);
                    dev.in_stall.store(true, Ordering::SeqCst);
                    let deadline = cpu::Deadline::after_us(stall);
                    while dev.flush_gen.load(Ordering::Acquire) == generation && !deadline.expired() {
                        core::hint::spin_loop();
                    }
                    dev.in_stall.store(false, Ordering::SeqCst);
                }
                let mut tlb = dev.tlb.lock();
                if dev.flush_gen.load(Ordering::Acquire) != generation {
                    bump(&dev.stats.fill_races, 1);
                    continue;
                }
                let i = tlb.next;
                tlb.next = (i + 1) % TLB_SLOTS;
                tlb.slots[i] = Some(TlbEntry { page, frame: e.frame(), write: e.is_write() });
                bump(&dev.stats.tlb_fills, 1);
                return Ok(f(phys_to_virt(e.frame()).cast()));
            }
            _ => fault(m, page_range(va), write)?,
        }
    }
    Err(Error::Busy)
}

/// The 4 KiB page containing `va`.
pub fn page_range(va: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(va & !(PAGE_SIZE - 1), PAGE_SIZE).expect("user page")
}

/// Reads the page at `va` and returns the CPU generation it holds; counts
/// (and returns as `Ok(None)`) data that is not a whole CPU pattern of this
/// page.
pub fn read_generation(m: &DevMirror<'_>, va: u64) -> Result<Option<u64>, Error> {
    let r = access(m, va, false, |p| scan(p, va, CPU_TAG))?;
    Ok(check(m.device(), r, |_| true))
}

/// Reads the page at `va` while the CPU may replace it: `epoch` is the page's
/// state as the CPU publishes it (`2 * generation` while generation
/// `generation` is mapped, odd once that mapping is gone). Data older than
/// the state before the read, or newer than the state after it, is stale.
/// Returns whether the read was good.
pub fn read_racing(m: &DevMirror<'_>, va: u64, epoch: &AtomicU64) -> Result<bool, Error> {
    let before = epoch.load(Ordering::Acquire);
    let r = access(m, va, false, |p| scan(p, va, CPU_TAG))?;
    let after = epoch.load(Ordering::Acquire);
    Ok(check(m.device(), r, |g| 2 * g >= before && 2 * g <= after).is_some())
}

fn check(dev: &Device, r: Result<u64, u64>, fresh: impl FnOnce(u64) -> bool) -> Option<u64> {
    bump(&dev.stats.reads_checked, 1);
    match r {
        Ok(g) if fresh(g) => Some(g),
        bad => {
            bump(&dev.stats.stale_reads, 1);
            let value = match bad {
                Ok(g) => tagged(CPU_TAG, 0, g, 0),
                Err(v) => v,
            };
            let _ = dev.stats.first_stale.compare_exchange(0, value.max(1), Ordering::Relaxed, Ordering::Relaxed);
            None
        }
    }
}

/// Writes [`dev_pattern`]`(va, seq, _)` over the whole page at `va`.
pub fn write_page(m: &DevMirror<'_>, va: u64, seq: u64) -> Result<(), Error> {
    access(m, va, true, |p| {
        for w in 0..WORDS {
            // SAFETY: a writable translation of a mapped frame, held stable
            // by the TLB lock for the duration of `f`.
            unsafe { ptr::write_volatile(p.add(w), dev_pattern(va, seq, w)) };
        }
        // Counted under the TLB lock: once a flush returned, no write that
        // it did not see can still be counted.
        bump(&m.device().stats.writes, 1);
    })
}

/// Reads the page at `va` and returns the device write `seq` it holds (all
/// words from one write), or counts a stale read.
pub fn read_dev_seq(m: &DevMirror<'_>, va: u64) -> Result<Option<u64>, Error> {
    let r = access(m, va, false, |p| scan(p, va, DEV_TAG))?;
    Ok(check(m.device(), r, |_| true))
}
