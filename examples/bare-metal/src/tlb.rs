//! CPU TLB maintenance for process page tables.
//!
//! A CPU "runs" a process by loading the process's PML4 into CR3
//! ([`switch_to`]); the kernel half of every process table is the kernel's
//! own, so kernel code keeps running unchanged. After changing an entry of a
//! process table, the changer calls [`flush_page`]: it executes `invlpg` if
//! this CPU has that table loaded, and shoots the page down on every other
//! CPU that has it loaded, waiting until they are done. Only then may the old
//! frame be freed.
//!
//! Shootdowns use NMIs, because interrupts stay disabled (IF=0) on every CPU:
//! the requester bumps the target's request counter, sends an NMI, and spins
//! until the target's done counter catches up. The target's NMI handler
//! ([`nmi`]) reloads CR3 (a full flush of non-global entries) and publishes
//! the request count it saw. It takes no lock, so it cannot deadlock with the
//! code it interrupted. Every NMI is treated as a shootdown: a spare one
//! (two requests folded into one flush) only costs a flush.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::smp::MAX_CPUS;
use crate::{apic, cpu};

/// Root (PML4 physical address) of the process table each CPU has loaded;
/// 0 while it runs on the kernel table.
static ACTIVE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static REQUESTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The kernel's PML4 (set once at boot, before any AP starts).
static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);

/// Counters for the demo summary.
pub static LOCAL_FLUSHES: AtomicU64 = AtomicU64::new(0);
/// NMI shootdowns sent.
pub static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);

/// Records the kernel's CR3. Boot CPU, once.
pub fn init() {
    KERNEL_ROOT.store(cpu::read_cr3() & crate::memory::paging::ADDR_MASK, Ordering::Relaxed);
}

/// Physical address of the kernel's PML4.
pub fn kernel_root() -> u64 {
    KERNEL_ROOT.load(Ordering::Relaxed)
}

/// Some CPU that has the table rooted at `root` loaded, if any.
pub fn loaded_anywhere(root: u64) -> Option<usize> {
    ACTIVE.iter().position(|a| a.load(Ordering::SeqCst) == root)
}

fn me() -> usize {
    apic::current_id() as usize
}

/// Loads `root` (a process PML4 whose kernel half equals the kernel's), or
/// the kernel table for `root == 0`, on this CPU.
///
/// # Safety
/// `root` must be 0 or a live process table that maps the kernel exactly as
/// the kernel table does, and must stay live until this CPU switches away.
pub unsafe fn switch_to(root: u64) {
    let me = me();
    // Published before the switch: a changer that sees the old value changed
    // its entry before we load CR3, so our fresh walk sees the new entry.
    if root != 0 {
        ACTIVE[me].store(root, Ordering::SeqCst);
    }
    let target = if root == 0 { KERNEL_ROOT.load(Ordering::Relaxed) } else { root };
    // SAFETY: forwarded to the caller; the kernel table maps the kernel.
    unsafe { cpu::write_cr3(target) };
    if root == 0 {
        ACTIVE[me].store(0, Ordering::SeqCst);
    }
}

/// After an entry for `va` in the table rooted at `root` changed: drops the
/// translation from every CPU's TLB. Returns when no CPU can use the old
/// entry any more.
pub fn flush_page(root: u64, va: u64) {
    let me = me();
    // Order the entry change before reading who has the table loaded.
    core::sync::atomic::fence(Ordering::SeqCst);
    for (cpu_index, active) in ACTIVE.iter().enumerate() {
        if active.load(Ordering::SeqCst) != root {
            continue;
        }
        if cpu_index == me {
            cpu::invlpg(va);
            LOCAL_FLUSHES.fetch_add(1, Ordering::Relaxed);
        } else {
            shootdown(cpu_index);
        }
    }
}

fn shootdown(target: usize) {
    let ticket = REQUESTED[target].fetch_add(1, Ordering::SeqCst) + 1;
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = apic::send_nmi(target as u32) {
        panic!("TLB shootdown NMI to cpu {target} failed: {e}");
    }
    let deadline = cpu::Deadline::after_us(1_000_000);
    while DONE[target].load(Ordering::SeqCst) < ticket {
        assert!(!deadline.expired(), "cpu {target} did not answer the TLB shootdown NMI");
        core::hint::spin_loop();
    }
}

/// NMI handler body: flushes this CPU's TLB and acknowledges every request
/// made so far.
pub fn nmi() {
    let me = me();
    let seen = REQUESTED[me].load(Ordering::SeqCst);
    cpu::flush_tlb_all();
    DONE[me].fetch_max(seen, Ordering::SeqCst);
}
