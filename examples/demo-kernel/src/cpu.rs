//! What a process needs from the CPU it runs on, and nothing else: the
//! page-table format, where the kernel and the user live in the root, the
//! memory type of user pages, loading a root, and the TLB maintenance
//! around entry changes. Each kernel implements it on a unit type.

use hmm_core::arch::PteFormat;

/// One architecture's MMU, as the shared process code drives it.
///
/// # Safety
/// 1. Every root the kernel runs on maps RAM at VA = PA (the identity map
///    [`crate::memory`] reads frames through) in [`Self::KERNEL_SLOTS`], and
///    no user address (`USER_START..USER_END`) falls in those slots.
/// 2. After [`flush_tlb_page`](Self::flush_tlb_page)`(va)` returns, no TLB
///    of this CPU holds a translation of `va` from before the table stores
///    that preceded the call.
/// 3. After [`publish_new_entry`](Self::publish_new_entry)`(va)` returns,
///    the MMU's next walk for `va` sees the table stores before the call.
pub unsafe trait Cpu: Sync + 'static {
    /// The CPU's page-table format: every entry the kernel writes is its
    /// `encode`/`directory` output, every entry it reads goes through its
    /// `decode`.
    type Format: PteFormat;
    /// Root slots of the kernel's identity map; every process root copies
    /// them.
    const KERNEL_SLOTS: &'static [usize];
    /// First user address (a root slot of its own).
    const USER_START: u64;
    /// First address past the user half.
    const USER_END: u64;
    /// Memory-type bits ORed into every user leaf: bits the format leaves
    /// opaque (Arm's AttrIndx and SH; 0 where the format has none to set).
    const USER_MEMORY_TYPE: u64;
    /// Every memory-type bit of a leaf, kept when an entry changes kind
    /// (leaf to `ProtNone` and back).
    const MEMORY_TYPE_MASK: u64;

    /// Runs the tables under `root` from now on and drops every cached
    /// translation of the previous ones.
    ///
    /// # Safety
    /// `root` must map everything in use as before (the kernel slots).
    unsafe fn set_root(root: u64);

    /// After a table store that removed, replaced or downgraded the
    /// translation of `va`: drop it from the TLB (`sfence.vma`, `tlbi`).
    fn flush_tlb_page(va: u64);

    /// After a table store that added a translation where the entry was
    /// invalid: make the MMU see it (what the architecture requires: RISC-V
    /// may cache the invalid entry, Arm never does).
    fn publish_new_entry(va: u64);

    /// A fault found the entry of `va` already allowing the access: drop
    /// whatever stale translation raised it, where the architecture may
    /// keep one. The default does nothing.
    fn spurious_fault(va: u64) {
        let _ = va;
    }

    /// A CPU load of the word at `va` through the MMU that may fault: the
    /// value, or `Err(address)` when a fault nothing could resolve hit it
    /// (the kernel's trap handler skips the load).
    fn probe_load(va: u64) -> Result<u64, u64>;
}
