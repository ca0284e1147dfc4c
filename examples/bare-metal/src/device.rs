//! The simulated device: it runs on an application processor and reaches a
//! process's memory only through its hmm-core [`Mirror`]: a small TLB, then
//! its own page walker over the mirror's table, then a device fault
//! (`Mirror::fault`) that hmm-core resolves against the CPU tables. Data is
//! read and written through the offset map at the physical address the
//! translation gives.
//!
//! # The walker
//! The mirror table is in x86_64 4-level format ([`X86_64Level4`]), so the
//! device walks it as an IOMMU walks first-level tables: from
//! [`Mirror::root`], one atomic load per level, PS leaves at 2 MiB and
//! 1 GiB, W required at every level. It takes no lock; it walks inside the
//! device's own [`WalkGate`], and `flush` waits for the walks in flight
//! there, because directories unlinked before a flush are freed as soon as
//! it returns.
//!
//! # The TLB and flushes
//! [`Device`] implements [`DeviceOps`]. `update` only counts and traces
//! (the mirror table is the device's page table); `invalidate` only counts;
//! `flush` drops TLB entries overlapping the range, bumps the flush
//! generation, then waits for in-flight walks. Every data access runs with
//! the TLB lock held, and so does the drop in `flush`: when `flush` returns,
//! no access through a dropped entry is in flight (as a real device drains
//! outstanding transactions before acknowledging a TLB invalidation). The
//! TLB lock is a fair ticket lock, so a flush waits for at most the access
//! in flight. A TLB fill checks that the flush generation it read before
//! its walk is unchanged, so a translation read just before an invalidation
//! can never be cached after it. A TLB entry covers a whole leaf: one entry
//! for a 2 MiB page.
//!
//! # Checking data
//! The CPU side fills pages with [`pattern`]`(va, generation, word)`; the
//! device writes [`dev_pattern`]. Every word read is decoded: poison, zero,
//! another page's data or a generation the CPU had already replaced counts as
//! a stale read.

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::sync::WalkGate;
use hmm_core::{DeviceOps, Error, Event, Mirror, VaRange};

use crate::cpu;
use crate::memory::PAGE_SIZE;
use crate::memory::frames::{FrameAllocator, POISON};
use crate::memory::paging::{self, ADDR_MASK, HUGE, PRESENT, WRITABLE};
use crate::memory::phys::phys_to_virt;
use crate::process::{Process, Show};
use crate::sync::TicketLock;

/// The mirror type the kernel uses: this device, the kernel allocator, and a
/// table in x86_64 4-level format, which the device walks itself. Build it
/// with `DevMirror::with_format`.
pub type DevMirror<'a> = Mirror<'a, Process, Device, FrameAllocator, X86_64Level4>;

/// 64-bit words per page.
pub const WORDS: usize = (PAGE_SIZE / 8) as usize;
/// Entries of the device TLB.
const TLB_SLOTS: usize = 8;
/// Attempts (TLB miss, walk, fault) an access makes before giving up.
const MAX_ATTEMPTS: u32 = 16;
/// How long a walk stalled by `walk_delay_us` goes on waiting once the
/// flush arrived.
const LINGER_US: u64 = 200;

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
    /// TLB fills from a walk of the mirror table.
    pub tlb_fills: AtomicU64,
    /// Fills dropped because a flush ran during the walk.
    pub fill_races: AtomicU64,
    /// Fills and walks stalled by `fill_delay_us` / `walk_delay_us`.
    pub stalls: AtomicU64,
    /// Device faults raised to hmm-core (`Mirror::fault`).
    pub faults: AtomicU64,
    /// Device faults that succeeded.
    pub faults_ok: AtomicU64,
    /// TSC cycles spent in the faults that succeeded.
    pub fault_cycles: AtomicU64,
    /// Device faults that failed (Fault, Perm, Busy, ...).
    pub fault_errors: AtomicU64,
    /// `update` callbacks.
    pub updates: AtomicU64,
    /// 4 KiB pages of the ranges `update` was told about.
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

/// One leaf translation: what the walker finds and a TLB entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address the leaf maps.
    pub va: u64,
    /// Physical address `va` maps to.
    pub pa: u64,
    /// log2 of the leaf's size in 4 KiB pages: 0, 9 (2 MiB) or 18 (1 GiB).
    pub order: u32,
    /// Writes allowed (W set at every level of the walk).
    pub write: bool,
}

impl Leaf {
    fn last(self) -> u64 {
        self.va + (PAGE_SIZE << self.order) - 1
    }

    fn covers(self, va: u64) -> bool {
        self.va <= va && va <= self.last()
    }

    fn overlaps(self, range: VaRange) -> bool {
        self.va <= range.last() && range.start() <= self.last()
    }

    /// The 4 KiB frame backing `va`, which the leaf covers.
    pub fn frame(self, va: u64) -> u64 {
        self.pa + ((va - self.va) & !(PAGE_SIZE - 1))
    }
}

struct Tlb {
    slots: [Option<Leaf>; TLB_SLOTS],
    next: usize,
}

/// How many recent device-fault timings [`Device::recent_fault_cycles`] keeps.
pub const SAMPLES: usize = 512;

/// The device: a TLB, a page walker and counters. Owned by its [`Mirror`].
pub struct Device {
    tlb: TicketLock<Tlb>,
    /// Walks of the mirror table in flight; `flush` waits for them.
    walks: WalkGate,
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
    /// Test knob, 0 normally: stall a walk before it reads the last-level
    /// table, until a flush arrives (then `LINGER_US` more) or this many
    /// microseconds pass. A flush that did not wait for the walk would let
    /// the mirror free that table meanwhile, and the walk read its poison.
    pub walk_delay_us: AtomicU64,
    /// True while a fill or walk is stalled.
    pub in_stall: AtomicBool,
}

impl Device {
    /// A device with an empty TLB.
    pub fn new() -> Self {
        Self {
            tlb: TicketLock::new(Tlb { slots: [None; TLB_SLOTS], next: 0 }),
            walks: WalkGate::new(),
            flush_gen: AtomicU64::new(0),
            stats: Counters::default(),
            samples: [const { AtomicU64::new(0) }; SAMPLES],
            fill_delay_us: AtomicU64::new(0),
            walk_delay_us: AtomicU64::new(0),
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
    fn update(&self, range: VaRange) -> core::result::Result<(), i32> {
        bump(&self.stats.updates, 1);
        bump(&self.stats.pages_programmed, range.pages(12));
        trace!("device: mirror table programmed {} ({} pages)", Show(range), range.pages(12));
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
            if slot.is_some_and(|e| e.overlaps(range)) {
                *slot = None;
                dropped += 1;
            }
        }
        self.flush_gen.fetch_add(1, Ordering::Release);
        drop(tlb);
        // Walks that may have read a directory unlinked before this flush
        // end before it returns (the mirror frees such directories then).
        // Flushes run under the mirror's update lock: never two at once.
        self.walks.synchronize();
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

/// The device's walk of the mirror table for `va`, as an IOMMU walks an
/// x86_64 4-level table: from [`Mirror::root`], no lock, inside the device's
/// walk gate (so no directory it reads is freed under it).
///
/// The root stays allocated while the mirror is registered; this kernel
/// never unregisters a mirror while its device runs (dropping one needs it
/// exclusively).
pub fn walk(m: &DevMirror<'_>, va: u64) -> Option<Leaf> {
    let dev = m.device();
    let _inside = dev.walks.enter();
    // The test knob: a stall ends at the first flush since the walk began.
    let (delay, generation) = (dev.walk_delay_us.load(Ordering::Relaxed), dev.flush_gen.load(Ordering::Acquire));
    let mut table = m.root();
    if table == 0 {
        return None;
    }
    let mut write = true;
    for level in (1..=4u32).rev() {
        if level == 1 && delay > 0 {
            stall(dev, delay, generation, LINGER_US);
        }
        // SAFETY: `table` is the live root or a directory the walk found
        // linked below it, a frame of the kernel allocator (offset mapped);
        // a directory unlinked since is freed only after a flush, which
        // waits for this walk to leave the gate.
        let raw = paging::load(unsafe { paging::entry(table, paging::index(va, level)) });
        assert_ne!(raw, POISON, "device walk read a freed table");
        if raw & PRESENT == 0 {
            return None;
        }
        write &= raw & WRITABLE != 0;
        if level == 1 || (raw & HUGE != 0 && level < 4) {
            let order = 9 * (level - 1);
            let mask = (PAGE_SIZE << order) - 1;
            return Some(Leaf { va: va & !mask, pa: raw & ADDR_MASK & !mask, order, write });
        }
        // Bits 52.. of a directory entry hold hmm-core's live count, which
        // ADDR_MASK leaves out, as the hardware does.
        table = raw & ADDR_MASK;
    }
    None
}

/// The test knobs' stall: spins until a flush newer than `generation`
/// arrives (then `linger_us` more) or `us` microseconds pass.
fn stall(dev: &Device, us: u64, generation: u64, linger_us: u64) {
    bump(&dev.stats.stalls, 1);
    dev.in_stall.store(true, Ordering::SeqCst);
    let deadline = cpu::Deadline::after_us(us);
    while dev.flush_gen.load(Ordering::Acquire) == generation && !deadline.expired() {
        core::hint::spin_loop();
    }
    let linger = cpu::Deadline::after_us(linger_us);
    while !linger.expired() {
        core::hint::spin_loop();
    }
    dev.in_stall.store(false, Ordering::SeqCst);
}

/// Runs `f` on the 512 words of the page at `va`, as the device: TLB, else
/// a walk of the mirror table, else device fault. `f` runs with the TLB
/// lock held, so the translation it uses cannot be flushed (and its frame
/// freed) meanwhile.
pub fn access<R>(m: &DevMirror<'_>, va: u64, write: bool, f: impl FnOnce(*mut u64) -> R) -> Result<R, Error> {
    let dev = m.device();
    bump(&dev.stats.accesses, 1);
    for _ in 0..MAX_ATTEMPTS {
        {
            let tlb = dev.tlb.lock();
            if let Some(e) = tlb.slots.iter().flatten().find(|e| e.covers(va) && (e.write || !write)) {
                bump(&dev.stats.tlb_hits, 1);
                return Ok(f(phys_to_virt(e.frame(va)).cast()));
            }
        }
        let generation = dev.flush_gen.load(Ordering::Acquire);
        match walk(m, va) {
            Some(e) if e.write || !write => {
                let delay = dev.fill_delay_us.load(Ordering::Relaxed);
                if delay > 0 {
                    stall(dev, delay, generation, 0);
                }
                let mut tlb = dev.tlb.lock();
                if dev.flush_gen.load(Ordering::Acquire) != generation {
                    bump(&dev.stats.fill_races, 1);
                    continue;
                }
                let i = tlb.next;
                tlb.next = (i + 1) % TLB_SLOTS;
                tlb.slots[i] = Some(e);
                bump(&dev.stats.tlb_fills, 1);
                return Ok(f(phys_to_virt(e.frame(va)).cast()));
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
