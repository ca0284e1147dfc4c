//! The simulated "device": code that runs on an application processor and
//! accesses a process's memory only by walking that process's page table in
//! software — like a device with its own MMU that was handed the page-table
//! root. This is where hmm-core's mirror will sit in phase 2.
//!
//! Also holds the data pattern the demo/tests write, so the BSP can compute
//! the expected checksum independently of what the device reads.

use core::ptr;

use crate::memory::PAGE_SIZE;
use crate::memory::PhysFrame;
use crate::process;

/// 64-bit words per page.
pub const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;

/// Most pages one device scan covers (results use a 64-bit page bitmap).
pub const MAX_SCAN_PAGES: u64 = 64;

/// The value the demo stores in word `word` of user page `page`.
pub fn pattern(page: u64, word: usize) -> u64 {
    (page << 48) ^ (word as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_0000_0000_a5a5
}

/// Folds one word into a running checksum (FNV-1a style over 64-bit words).
pub fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Checksum seed.
pub const CHECKSUM_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// Fills `frame` with [`pattern`] for user page index `page`.
pub fn fill_page(frame: PhysFrame, page: u64) {
    let words = frame.as_ptr::<u64>();
    for w in 0..WORDS_PER_PAGE {
        // SAFETY: the caller owns `frame` (just allocated and mapped by the
        // BSP); it is reachable through the offset map.
        unsafe { ptr::write_volatile(words.add(w), pattern(page, w)) };
    }
}

/// Expected checksum over the pages whose bit is set in `present`.
pub fn expected_checksum(npages: u64, present: u64) -> u64 {
    let mut hash = CHECKSUM_SEED;
    for page in (0..npages).filter(|p| present & (1 << p) != 0) {
        for w in 0..WORDS_PER_PAGE {
            hash = mix(hash, pattern(page, w));
        }
    }
    hash
}

/// Result of [`scan_job`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanReport {
    /// Checksum over all present pages, in page order.
    pub checksum: u64,
    /// Bit `i` set: page `i` was present.
    pub present: u64,
    /// Bit `i` set: page `i` was present and writable.
    pub writable: u64,
    /// APIC ID of the CPU that did the scan.
    pub apic_id: u64,
}

impl ScanReport {
    /// Encodes for the SMP mailbox.
    pub fn to_words(self) -> [u64; 4] {
        [self.checksum, self.present, self.writable, self.apic_id]
    }

    /// Decodes from the SMP mailbox.
    pub fn from_words(w: [u64; 4]) -> Self {
        Self { checksum: w[0], present: w[1], writable: w[2], apic_id: w[3] }
    }
}

/// `smp::Job` run on an AP: `args = [root_paddr, first_va, npages, _]`.
/// Translates each page through the process table and checksums its data.
///
/// The BSP keeps the address space alive and unchanged until the job
/// returns (it waits for the answer).
pub fn scan_job(_cpu: usize, args: [u64; 4]) -> [u64; 4] {
    let [root, first_va, npages, _] = args;
    let root = PhysFrame::from_start(root).expect("scan_job: unaligned root");
    let mut report =
        ScanReport { checksum: CHECKSUM_SEED, present: 0, writable: 0, apic_id: u64::from(crate::apic::current_id()) };
    for page in 0..npages.min(MAX_SCAN_PAGES) {
        let va = first_va + page * PAGE_SIZE;
        // SAFETY: the BSP keeps the address space rooted at `root` alive until
        // this job has answered (it blocks in `smp::run_on`).
        let Some(t) = (unsafe { process::walk(root, va) }) else {
            continue;
        };
        report.present |= 1 << page;
        if t.writable {
            report.writable |= 1 << page;
        }
        let words = t.frame.as_ptr::<u64>();
        for w in 0..WORDS_PER_PAGE {
            // SAFETY: the translation points at a RAM frame (offset mapped)
            // owned by the live address space; the BSP finished writing it
            // before posting the job (release/acquire through the mailbox).
            report.checksum = mix(report.checksum, unsafe { ptr::read_volatile(words.add(w)) });
        }
    }
    report.to_words()
}

/// `smp::Job` that just reports who ran it: `[apic_id, rsp, 0, 0]`.
pub fn whoami_job(_cpu: usize, _args: [u64; 4]) -> [u64; 4] {
    let marker = 0u8;
    [u64::from(crate::apic::current_id()), &raw const marker as u64, 0, 0]
}
