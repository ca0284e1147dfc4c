//! Application-processor (AP) bring-up and a tiny "run this job on CPU n"
//! mailbox.
//!
//! Bring-up, one AP at a time:
//! 1. the real-mode trampoline below is copied to physical [`TRAMPOLINE_PADDR`]
//!    (0x8000; a STARTUP IPI can only start a CPU below 1 MiB, at a 4 KiB
//!    boundary, in 16-bit real mode),
//! 2. its data block gets the kernel CR3, the AP's stack top, the address of
//!    [`ap_entry`] and the CPU index,
//! 3. the BSP sends INIT, waits 10 ms, sends STARTUP (vector 0x08 = page
//!    0x8000), waits 200 us, and sends a second STARTUP if the AP has not
//!    reported in (the Intel MP-spec sequence; delays are TSC based),
//! 4. the AP goes 16 -> 32 -> 64 bit on the trampoline's own GDT, loads the
//!    shared kernel PML4, calls `ap_entry(cpu)`, which loads the real GDT/TSS
//!    and IDT and sets its `ONLINE` flag,
//! 5. the BSP sees the flag and moves on to the next AP.
//!
//! Afterwards each AP sits in [`ap_main`], polling its [`Mailbox`]: [`run_on`]
//! runs a job there and waits for it, [`post`] + [`wait`] let the boot CPU work
//! while the AP runs (the device loop of `device.rs`).

use core::arch::global_asm;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::memory::paging::ADDR_MASK;
use crate::memory::phys;
use crate::sync::{InitCell, SpinLock};
use crate::{apic, cpu, gdt, idt};

/// Most CPUs this kernel supports (static per-CPU arrays).
pub const MAX_CPUS: usize = 8;
/// Physical address the trampoline is copied to.
pub const TRAMPOLINE_PADDR: u64 = 0x8000;
const AP_STACK_SIZE: usize = 64 * 1024;

global_asm!(
    r#"
    .section .text.ap_trampoline, "ax", @progbits
    .code16
    .global ap_tramp_start
ap_tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (ap_tramp_gdt_ptr - ap_tramp_start + {base})
    movl %cr0, %eax
    orl $1, %eax                        /* CR0.PE */
    movl %eax, %cr0
    ljmpl $0x08, $(ap_tramp_32 - ap_tramp_start + {base})

    .code32
ap_tramp_32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $(1 << 5), %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl (ap_tramp_cr3 - ap_tramp_start + {base}), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax                 /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80010000, %eax               /* CR0.PG | CR0.WP */
    movl %eax, %cr0
    ljmp $0x18, $(ap_tramp_64 - ap_tramp_start + {base})

    .code64
ap_tramp_64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq (ap_tramp_stack - ap_tramp_start + {base}), %rsp
    movq (ap_tramp_cpu - ap_tramp_start + {base}), %rdi
    movq (ap_tramp_entry - ap_tramp_start + {base}), %rax
    xorl %ebp, %ebp
    callq *%rax
ap_tramp_dead:
    cli
    hlt
    jmp ap_tramp_dead

    .p2align 3
ap_tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
    .quad 0x00af9a000000ffff            /* 0x18: 64-bit code */
ap_tramp_gdt_ptr:
    .word 4 * 8 - 1
    .long ap_tramp_gdt - ap_tramp_start + {base}

    .p2align 3
    .global ap_tramp_data
ap_tramp_data:                          /* = struct TrampolineData */
ap_tramp_cr3:
    .quad 0
ap_tramp_stack:
    .quad 0
ap_tramp_entry:
    .quad 0
ap_tramp_cpu:
    .quad 0
    .global ap_tramp_end
ap_tramp_end:
"#,
    base = const TRAMPOLINE_PADDR,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_data: u8;
    static ap_tramp_end: u8;
}

/// Layout of the trampoline's data block (must match the assembly).
#[repr(C)]
struct TrampolineData {
    cr3: u64,
    stack_top: u64,
    entry: u64,
    cpu: u64,
}

#[repr(C, align(16))]
struct Stack([u8; AP_STACK_SIZE]);

static AP_STACKS: InitCell<[Stack; MAX_CPUS]> = InitCell::new([const { Stack([0; AP_STACK_SIZE]) }; MAX_CPUS]);

static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// A job for another CPU: gets the CPU index and 4 arguments, returns 4 words.
pub type Job = fn(cpu: usize, args: [u64; 4]) -> [u64; 4];

/// Per-AP request/response slot.
struct Mailbox {
    pending: AtomicBool,
    request: SpinLock<Option<(Job, [u64; 4])>>,
    response: SpinLock<Option<[u64; 4]>>,
}

static MAILBOXES: [Mailbox; MAX_CPUS] = [const {
    Mailbox { pending: AtomicBool::new(false), request: SpinLock::new(None), response: SpinLock::new(None) }
}; MAX_CPUS];

/// Why an SMP operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// CPU index out of range or not online.
    NoSuchCpu(usize),
    /// The AP never set its ONLINE flag.
    StartTimeout(usize),
    /// The APIC refused to send an IPI.
    Ipi(&'static str),
    /// The trampoline page is not usable RAM.
    TrampolineNotRam,
    /// The AP did not answer a job in time.
    JobTimeout(usize),
}

/// Whether CPU `cpu` has completed `ap_entry` (the BSP counts as online).
pub fn is_online(cpu: usize) -> bool {
    cpu == 0 || ONLINE.get(cpu).is_some_and(|f| f.load(Ordering::Acquire))
}

/// Starts APs 1..`cpus` (APIC IDs equal CPU indices under QEMU). Boot CPU
/// only, after `gdt::init`, `idt::init`, `apic::init` and the offset map.
/// `trampoline_is_ram` tells whether the trampoline page is usable RAM.
pub fn start_aps(cpus: usize, trampoline_is_ram: bool) -> Result<(), SmpError> {
    if cpus <= 1 {
        return Ok(());
    }
    if !trampoline_is_ram {
        return Err(SmpError::TrampolineNotRam);
    }
    let start = &raw const ap_tramp_start as u64;
    let len = (&raw const ap_tramp_end as u64 - start) as usize;
    let data_offset = &raw const ap_tramp_data as u64 - start;
    let dest = phys::phys_to_virt(TRAMPOLINE_PADDR);
    assert!(len <= 4096, "trampoline larger than one page");
    // SAFETY: the trampoline page is usable RAM below the kernel, not handed
    // out by the frame allocator and not yet in use; the source is our own
    // code bytes.
    unsafe { ptr::copy_nonoverlapping(start as *const u8, dest, len) };

    let cr3 = cpu::read_cr3() & ADDR_MASK;
    assert!(cr3 < 1 << 32, "the trampoline loads CR3 in 32-bit mode");
    for cpu_index in 1..cpus.min(MAX_CPUS) {
        // SAFETY: the BSP is the only writer of AP_STACKS addresses; each AP
        // only ever uses its own stack.
        let stack_top = unsafe { (&raw const (*AP_STACKS.get())[cpu_index]) as u64 } + AP_STACK_SIZE as u64;
        let data = TrampolineData { cr3, stack_top, entry: ap_entry as *const () as u64, cpu: cpu_index as u64 };
        // SAFETY: `dest + data_offset` is the 8-aligned data block inside the
        // copied trampoline; no AP is running the trampoline now (APs are
        // started one at a time and each has left it before ONLINE is set).
        unsafe { ptr::write_volatile(dest.add(data_offset as usize).cast::<TrampolineData>(), data) };
        start_one(cpu_index)?;
    }
    Ok(())
}

fn start_one(cpu_index: usize) -> Result<(), SmpError> {
    let apic_id = cpu_index as u32;
    let vector = (TRAMPOLINE_PADDR >> 12) as u8;
    apic::send_init(apic_id).map_err(SmpError::Ipi)?;
    cpu::delay_us(10_000);
    for _ in 0..2 {
        apic::send_startup(apic_id, vector).map_err(SmpError::Ipi)?;
        let deadline = cpu::Deadline::after_us(200);
        while !deadline.expired() {
            if is_online(cpu_index) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
    }
    // Under TCG the AP may need a while to get scheduled; wait up to ~1 s.
    let deadline = cpu::Deadline::after_us(1_000_000);
    while !deadline.expired() {
        if is_online(cpu_index) {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(SmpError::StartTimeout(cpu_index))
}

/// First Rust code on an AP (called from the trampoline on its own stack).
extern "C" fn ap_entry(cpu_index: u64) -> ! {
    let cpu_index = cpu_index as usize;
    gdt::load(cpu_index);
    idt::load();
    let apic_id = apic::current_id() as usize;
    assert_eq!(apic_id, cpu_index, "AP started with the wrong index");
    ONLINE[cpu_index].store(true, Ordering::Release);
    ap_main(cpu_index)
}

/// AP main loop: run jobs posted to this CPU's mailbox, forever.
fn ap_main(cpu_index: usize) -> ! {
    let mailbox = &MAILBOXES[cpu_index];
    loop {
        if !mailbox.pending.load(Ordering::Acquire) {
            core::hint::spin_loop();
            continue;
        }
        let request = mailbox.request.lock().take();
        if let Some((job, args)) = request {
            let result = job(cpu_index, args);
            *mailbox.response.lock() = Some(result);
        }
        mailbox.pending.store(false, Ordering::Release);
    }
}

/// Runs `on_ap` on AP `cpu` while `here` runs on this CPU, and returns
/// `here`'s result once both have finished. Panics if the AP does not finish
/// within ~30 s after `here` (it would still be borrowing this stack frame).
pub fn concurrently<T>(cpu_index: usize, on_ap: &(dyn Fn() + Sync), here: impl FnOnce() -> T) -> Result<T, SmpError> {
    let f: &(dyn Fn() + Sync) = on_ap;
    post(cpu_index, closure_job, [&raw const f as u64, 0, 0, 0])?;
    let result = here();
    if let Err(e) = wait(cpu_index, 30_000_000) {
        panic!("cpu {cpu_index} did not finish its part: {e:?}");
    }
    Ok(result)
}

/// Runs `f` on AP `cpu` and returns its result.
pub fn call<R: Send>(cpu_index: usize, f: impl Fn() -> R + Sync) -> Result<R, SmpError> {
    let out = SpinLock::new(None);
    concurrently(cpu_index, &|| *out.lock() = Some(f()), || ())?;
    Ok(out.lock().take().expect("the AP ran the closure"))
}

fn closure_job(_cpu: usize, args: [u64; 4]) -> [u64; 4] {
    // SAFETY: `concurrently` passed the address of a `&(dyn Fn() + Sync)` on
    // its stack and does not return before this job has finished.
    let f = unsafe { *(args[0] as *const &(dyn Fn() + Sync)) };
    f();
    [0; 4]
}

/// Runs `job(cpu, args)` on AP `cpu` and waits (up to ~10 s) for the answer.
pub fn run_on(cpu_index: usize, job: Job, args: [u64; 4]) -> Result<[u64; 4], SmpError> {
    post(cpu_index, job, args)?;
    wait(cpu_index, 10_000_000)
}

/// Starts `job(cpu, args)` on AP `cpu` without waiting; collect the answer
/// with [`wait`]. The AP must be idle (no job posted and not yet waited for).
pub fn post(cpu_index: usize, job: Job, args: [u64; 4]) -> Result<(), SmpError> {
    if cpu_index == 0 || cpu_index >= MAX_CPUS || !is_online(cpu_index) {
        return Err(SmpError::NoSuchCpu(cpu_index));
    }
    let mailbox = &MAILBOXES[cpu_index];
    assert!(!mailbox.pending.load(Ordering::Acquire), "cpu {cpu_index} is still busy with a job");
    *mailbox.response.lock() = None;
    *mailbox.request.lock() = Some((job, args));
    mailbox.pending.store(true, Ordering::Release);
    Ok(())
}

/// Waits up to `timeout_us` for the job posted to AP `cpu` to finish and
/// returns its answer.
pub fn wait(cpu_index: usize, timeout_us: u64) -> Result<[u64; 4], SmpError> {
    let mailbox = MAILBOXES.get(cpu_index).ok_or(SmpError::NoSuchCpu(cpu_index))?;
    let deadline = cpu::Deadline::after_us(timeout_us);
    while mailbox.pending.load(Ordering::Acquire) {
        if deadline.expired() {
            return Err(SmpError::JobTimeout(cpu_index));
        }
        core::hint::spin_loop();
    }
    mailbox.response.lock().take().ok_or(SmpError::JobTimeout(cpu_index))
}
