//! The kernel's 64-bit GDT with one TSS per CPU.
//!
//! Why a TSS at all: the double-fault handler runs on its own known-good stack
//! (IST1). A kernel stack overflow turns into #PF -> #DF; without a separate
//! stack the #DF would fault again and triple-fault the machine silently.
//!
//! Layout (selectors): 0x08 kernel code, 0x10 kernel data, then a 16-byte TSS
//! descriptor per CPU starting at 0x18.

use core::arch::asm;
use core::mem::size_of;

use crate::smp::MAX_CPUS;
use crate::sync::InitCell;

/// Kernel code segment selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data segment selector.
pub const KERNEL_DS: u16 = 0x10;
/// Interrupt stack table slot used by the #DF handler (1-based, as in the IDT).
pub const DOUBLE_FAULT_IST: u8 = 1;

const GDT_ENTRIES: usize = 3 + 2 * MAX_CPUS;
const TSS_SIZE: usize = 104;
const IST_STACK_SIZE: usize = 16 * 1024;

/// A 64-bit TSS as 26 dwords (the hardware layout has 64-bit fields at
/// 4-byte offsets, which a plain Rust struct cannot express without packing).
#[repr(C, align(16))]
struct Tss([u32; TSS_SIZE / 4]);

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

static GDT: InitCell<[u64; GDT_ENTRIES]> = InitCell::new([0; GDT_ENTRIES]);
static TSS: InitCell<[Tss; MAX_CPUS]> = InitCell::new([const { Tss([0; TSS_SIZE / 4]) }; MAX_CPUS]);
static IST_STACKS: InitCell<[IstStack; MAX_CPUS]> = InitCell::new([const { IstStack([0; IST_STACK_SIZE]) }; MAX_CPUS]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn tss_selector(cpu: usize) -> u16 {
    ((3 + 2 * cpu) * 8) as u16
}

/// Fills the GDT and every CPU's TSS. Boot CPU only, before any AP starts.
pub fn init() {
    // SAFETY: runs once on the boot CPU before the APs exist, so nothing else
    // accesses GDT/TSS/IST_STACKS; the pointers come from statics and are valid.
    unsafe {
        let gdt = &mut *GDT.get();
        let tss = &mut *TSS.get();
        gdt[0] = 0;
        gdt[1] = 0x00af_9a00_0000_ffff; // 64-bit code, DPL 0
        gdt[2] = 0x00cf_9200_0000_ffff; // data, DPL 0
        for (cpu, t) in tss.iter_mut().enumerate() {
            let ist_top = (&raw const (*IST_STACKS.get())[cpu]) as u64 + IST_STACK_SIZE as u64;
            let slot = 9 + 2 * (usize::from(DOUBLE_FAULT_IST) - 1); // IST1 at byte 36
            t.0[slot] = ist_top as u32;
            t.0[slot + 1] = (ist_top >> 32) as u32;
            t.0[25] = (TSS_SIZE as u32) << 16; // I/O map base beyond limit: no bitmap

            let base = t as *const Tss as u64;
            let limit = (TSS_SIZE - 1) as u64;
            let low = (limit & 0xffff)
                | ((base & 0xff_ffff) << 16)
                | (0x89 << 40) // present, type 9 = available 64-bit TSS
                | (((limit >> 16) & 0xf) << 48)
                | (((base >> 24) & 0xff) << 56);
            let index = usize::from(tss_selector(cpu)) / 8;
            gdt[index] = low;
            gdt[index + 1] = base >> 32;
        }
    }
}

/// Loads the GDT on the calling CPU, reloads the segment registers and loads
/// this CPU's TSS. `cpu` must be the caller's index (its APIC ID).
pub fn load(cpu: usize) {
    assert!(cpu < MAX_CPUS, "cpu index {cpu} out of range");
    let pointer = DescriptorPointer { limit: (size_of::<[u64; GDT_ENTRIES]>() - 1) as u16, base: GDT.get() as u64 };
    // SAFETY: `init` filled a valid GDT whose code/data selectors match
    // KERNEL_CS/KERNEL_DS; the far return switches CS to the identical 64-bit
    // code segment and continues at the next label. Each CPU loads its own
    // TSS selector exactly once, so `ltr` never sees a busy descriptor.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "mov ss, {ds:x}",
            "ltr {tss:x}",
            ptr = in(reg) &pointer,
            cs = in(reg) u64::from(KERNEL_CS),
            tmp = out(reg) _,
            ds = in(reg) u64::from(KERNEL_DS),
            tss = in(reg) u64::from(tss_selector(cpu)),
        );
    }
}
