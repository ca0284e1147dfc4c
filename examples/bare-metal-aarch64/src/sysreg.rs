//! The EL1 system registers and instructions the kernel needs: the MMU
//! setup (MAIR, TCR, TTBR0/1, SCTLR), TLB maintenance, PAN, the vector base,
//! the exception syndrome, address translation (`AT`) and the counter.

use core::arch::asm;

/// `MAIR_EL1`: Attr0 = Normal, inner and outer write-back read/write
/// allocate (0xff); Attr1 = Device-nGnRE (0x04). See `paging::NORMAL` /
/// `paging::DEVICE`, the AttrIndx values the kernel ORs into its entries.
const MAIR: u64 = 0xff | 0x04 << 8;
/// `TCR_EL1` without IPS: T0SZ = 16 (48-bit TTBR0 half, 4 levels), TG0 =
/// 4 KiB, table walks inner-shareable write-back (IRGN0 = ORGN0 = 1, SH0 =
/// 3); EPD1: no TTBR1 walks (the kernel runs from the identity map in the
/// low half), T1SZ = 16 and TG1 = 4 KiB only to keep the fields legal;
/// 8-bit ASIDs, no top-byte ignore, no hardware AF/dirty management.
const TCR: u64 = 16 | 1 << 8 | 1 << 10 | 3 << 12 | 16 << 16 | 1 << 23 | 2 << 30;
const TCR_IPS_SHIFT: u32 = 32;
/// `SCTLR_EL1` bits: M (MMU), A (alignment check), C (data cache), I
/// (instruction cache), WXN, SPAN (1: taking an exception leaves PAN alone).
const SCTLR_M: u64 = 1 << 0;
const SCTLR_A: u64 = 1 << 1;
const SCTLR_C: u64 = 1 << 2;
const SCTLR_I: u64 = 1 << 12;
const SCTLR_WXN: u64 = 1 << 19;
const SCTLR_SPAN: u64 = 1 << 23;

/// The exception level the CPU runs at.
pub fn current_el() -> u64 {
    let v: u64;
    // SAFETY: reading CurrentEL has no side effect.
    unsafe { asm!("mrs {0}, CurrentEL", out(reg) v, options(nomem, nostack)) };
    v >> 2 & 3
}

/// Turns on the MMU (and the caches) with `root` in `TTBR0_EL1`, ASID 0,
/// and no `TTBR1_EL1` table.
///
/// # Safety
/// `root` must be a complete 48-bit table that identity maps the running
/// code, its stack and every address the kernel touches afterwards, with
/// the memory types of [`MAIR`].
pub unsafe fn enable_mmu(root: u64) {
    let pa_range: u64;
    // SAFETY: reading an ID register has no side effect.
    unsafe { asm!("mrs {0}, ID_AA64MMFR0_EL1", out(reg) pa_range, options(nomem, nostack)) };
    // IPS: what the CPU implements, at most 48 bits (0b101).
    let tcr = TCR | (pa_range & 0xf).min(0b101) << TCR_IPS_SHIFT;
    let mut sctlr: u64;
    // SAFETY: reading SCTLR_EL1 has no side effect.
    unsafe { asm!("mrs {0}, SCTLR_EL1", out(reg) sctlr, options(nomem, nostack)) };
    sctlr = (sctlr | SCTLR_M | SCTLR_C | SCTLR_I | SCTLR_SPAN) & !(SCTLR_A | SCTLR_WXN);
    // SAFETY: the caller guarantees the table maps everything in use with
    // its memory type unchanged (the MMU-off accesses were Device, the
    // caches were off: nothing stale can be cached); the TLB is flushed
    // before translation starts and `isb` orders each step.
    unsafe {
        asm!(
            "msr MAIR_EL1, {mair}",
            "msr TCR_EL1, {tcr}",
            "msr TTBR0_EL1, {root}",
            "msr TTBR1_EL1, xzr",
            "isb",
            "dsb ish",
            "tlbi vmalle1",
            "dsb ish",
            "isb",
            "msr SCTLR_EL1, {sctlr}",
            "isb",
            mair = in(reg) MAIR, tcr = in(reg) tcr, root = in(reg) root, sctlr = in(reg) sctlr,
            options(nostack),
        )
    };
}

/// Switches `TTBR0_EL1` to `root` (ASID 0) and drops every EL1 translation
/// of the old table (its non-global entries share ASID 0).
///
/// # Safety
/// As [`enable_mmu`]: `root` must map everything in use as before.
pub unsafe fn set_ttbr0(root: u64) {
    // SAFETY: by the caller the new table maps what runs; `tlbi vmalle1`
    // after the switch drops the old table's entries, `isb` makes both take
    // effect before the next instruction.
    unsafe {
        asm!("dsb ishst", "msr TTBR0_EL1, {0}", "isb", "tlbi vmalle1", "dsb ish", "isb",
            in(reg) root, options(nostack))
    };
}

/// The current `TTBR0_EL1`, `TCR_EL1` and `SCTLR_EL1`.
pub fn mmu_registers() -> (u64, u64, u64) {
    let (ttbr0, tcr, sctlr): (u64, u64, u64);
    // SAFETY: reading system registers has no side effect.
    unsafe {
        asm!("mrs {0}, TTBR0_EL1", "mrs {1}, TCR_EL1", "mrs {2}, SCTLR_EL1",
            out(reg) ttbr0, out(reg) tcr, out(reg) sctlr, options(nomem, nostack))
    };
    (ttbr0, tcr, sctlr)
}

/// After a table store that removed, replaced or downgraded the translation
/// of `va`: `dsb ishst` (the store reaches the walkers), `tlbi vae1is` (every
/// CPU of the inner-shareable domain drops `va`, ASID 0, all levels), `dsb
/// ish` (the invalidation completed), `isb` (this CPU refetches with it).
pub fn flush_page(va: u64) {
    let operand = va >> 12 & ((1 << 44) - 1);
    // SAFETY: barriers and a TLB invalidation read and write no memory the
    // program sees; no `nomem`, so the table stores before stay before.
    unsafe {
        asm!("dsb ishst", "tlbi vae1is, {0}", "dsb ish", "isb", in(reg) operand, options(nostack, preserves_flags))
    };
}

/// After a table store that only added a translation (the entry was
/// invalid): `dsb ishst` + `isb`. No TLB invalidation: Arm TLBs never hold
/// an entry that faulted.
pub fn publish_new_entry() {
    // SAFETY: barriers only; no `nomem`, so earlier stores stay before.
    unsafe { asm!("dsb ishst", "isb", options(nostack, preserves_flags)) };
}

/// Whether FEAT_PAN is implemented (`ID_AA64MMFR1_EL1.PAN`).
pub fn has_pan() -> bool {
    let v: u64;
    // SAFETY: reading an ID register has no side effect.
    unsafe { asm!("mrs {0}, ID_AA64MMFR1_EL1", out(reg) v, options(nomem, nostack)) };
    v >> 20 & 0xf != 0
}

/// `PSTATE.PAN` (0 without FEAT_PAN).
pub fn pan() -> u64 {
    if !has_pan() {
        return 0;
    }
    let v: u64;
    // SAFETY: reading PAN (S3_0_C4_C2_3) has no side effect; FEAT_PAN exists.
    unsafe { asm!("mrs {0}, S3_0_C4_C2_3", out(reg) v, options(nomem, nostack)) };
    v >> 22 & 1
}

/// Lets EL1 loads and stores reach user (AP\[1\] = 1) pages, the way a
/// kernel copies to and from user memory: clears `PSTATE.PAN` where it
/// exists (with SCTLR_EL1.SPAN = 1 exceptions do not set it again).
pub fn allow_user_access() {
    if has_pan() {
        // SAFETY: clearing PAN only widens which pages EL1 may access; the
        // kernel touches user addresses only on purpose.
        unsafe { asm!("msr S3_0_C4_C2_3, xzr", options(nomem, nostack)) };
    }
}

/// Installs the vector table `vectors` (2 KiB aligned).
pub fn set_vectors(vectors: unsafe extern "C" fn()) {
    // SAFETY: `vectors` is `boot::vectors`, which saves and restores the
    // interrupted context; interrupts stay masked, so only synchronous
    // exceptions arrive there.
    unsafe { asm!("msr VBAR_EL1, {0}", "isb", in(reg) vectors as usize, options(nomem, nostack)) };
}

/// What a trap handler reads: syndrome, fault address, exception PC.
#[derive(Clone, Copy, Debug)]
pub struct Trap {
    /// `ESR_EL1`.
    pub esr: u64,
    /// `FAR_EL1`: the faulting address of a data abort.
    pub far: u64,
    /// `ELR_EL1`: the trapping instruction.
    pub elr: u64,
}

/// Reads the exception registers (inside the trap handler).
pub fn trap() -> Trap {
    let (esr, far, elr): (u64, u64, u64);
    // SAFETY: reading system registers has no side effect.
    unsafe {
        asm!("mrs {0}, ESR_EL1", "mrs {1}, FAR_EL1", "mrs {2}, ELR_EL1",
            out(reg) esr, out(reg) far, out(reg) elr, options(nomem, nostack))
    };
    Trap { esr, far, elr }
}

/// Sets where `eret` returns to.
///
/// # Safety
/// `elr` must be the address of an instruction of the interrupted code
/// where it can go on with its saved registers.
pub unsafe fn set_elr(elr: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("msr ELR_EL1, {0}", in(reg) elr, options(nomem, nostack)) };
}

/// The MMU's own stage-1 EL1 translation of `va` (`AT S1E1R`, or `AT
/// S1E1W` for a write): the physical page, or `None` when the walk faults.
pub fn hw_translate(va: u64, write: bool) -> Option<u64> {
    let par: u64;
    // SAFETY: AT only walks the tables and writes PAR_EL1, which nothing
    // else uses; it raises no exception (a fault is reported in PAR.F).
    unsafe {
        if write {
            asm!("at s1e1w, {va}", "isb", "mrs {par}, PAR_EL1", va = in(reg) va, par = out(reg) par, options(nostack));
        } else {
            asm!("at s1e1r, {va}", "isb", "mrs {par}, PAR_EL1", va = in(reg) va, par = out(reg) par, options(nostack));
        }
    }
    (par & 1 == 0).then_some(par & 0x0000_ffff_ffff_f000)
}

/// The generic timer's count (`CNTPCT_EL0`) and frequency (`CNTFRQ_EL0`).
pub fn counter() -> (u64, u64) {
    let (count, freq): (u64, u64);
    // SAFETY: reading the counter registers has no side effect.
    unsafe {
        asm!("isb", "mrs {0}, CNTPCT_EL0", "mrs {1}, CNTFRQ_EL0", out(reg) count, out(reg) freq, options(nomem, nostack))
    };
    (count, freq)
}

/// Waits for an interrupt (a pause when none can come).
pub fn wait_for_interrupt() {
    // SAFETY: `wfi` only stalls the CPU.
    unsafe { asm!("wfi", options(nomem, nostack)) };
}
