//! `hmm-bare-metal`: a small x86_64 kernel booted by QEMU through PVH that
//! runs hmm-core for real: a process address space with live x86_64 tables
//! (demand-zero and copy-on-write faults, unmap, mprotect, fork, each change
//! bracketed by hmm-core's invalidation hooks and followed by `invlpg` or an
//! NMI TLB shootdown), and a device on the second CPU that reaches the
//! process's memory only through its hmm-core `Mirror`. See README.md.
//!
//! Module map (one job each):
//! * `boot`      — PVH 32-bit entry, early page tables, switch to long mode
//! * `serial`    — COM1 console, `print!`/`println!`
//! * `trace`     — `trace!`: the demo's per-CPU event lines
//! * `qemu_exit` — isa-debug-exit: success 33 / failure 35
//! * `cpu`       — instruction wrappers, TSC delays
//! * `sync`      — spin lock, reader-writer spin lock, init-once statics
//! * `gdt`/`idt` — descriptor tables, exception handlers (#PF, NMI)
//! * `pvh`       — `hvm_start_info`: command line + memory map
//! * `fw_cfg`    — QEMU CPU count
//! * `memory`    — offset map, frame allocator (poison on free)
//! * `apic`/`smp`— local APIC IPIs, AP trampoline, per-AP job mailbox
//! * `tlb`       — CR3 switching, `invlpg`, NMI shootdowns
//! * `process`   — the address space: `hmm_core::AddressSpace`
//! * `device`    — the device on the AP: `hmm_core::DeviceOps`, TLB, checks
//! * `race`      — the unmap/remap race both modes run
//! * `demo`/`ktest` — `mode=demo` and `mode=test`
//! * `bench`     — `mode=bench`: `range_fault` timed against a store stream
//! * `crash`     — `crash=...`: deliberate faults proving failures are loud

#![no_std]
#![no_main]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

#[macro_use]
mod serial;
#[macro_use]
mod trace;

mod apic;
mod bench;
mod boot;
mod cpu;
mod crash;
mod demo;
mod device;
mod fw_cfg;
mod gdt;
mod idt;
mod ktest;
mod memory;
mod process;
mod pvh;
mod qemu_exit;
mod race;
mod smp;
mod sync;
mod tlb;

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU32, Ordering};

use memory::FRAMES;
use qemu_exit::ExitCode;

/// What `demo` and `ktest` get to know about the machine.
pub struct Machine {
    /// CPUs requested (BSP included).
    pub cpus: usize,
    /// CPUs that came online (BSP included).
    pub online: usize,
}

/// Rust entry point, called by `boot.rs` on the boot stack with paging on.
#[unsafe(no_mangle)]
extern "C" fn kernel_main(start_info_paddr: u64) -> ! {
    let t0 = cpu::rdtsc();
    serial::init();
    println!();
    println!("hmm-bare-metal: PVH boot");

    gdt::init();
    gdt::load(0);
    idt::init();
    idt::load();

    let boot = pvh::BootInfo::parse(start_info_paddr);
    println!("  start_info @ {:#x}, cmdline: {:?} -> mode {:?}", boot.start_info_paddr, boot.cmdline(), boot.mode);
    println!(
        "  kernel image: [{:#x}, {:#x}), memory map from {:?}:",
        memory::kernel_start(),
        memory::kernel_end(),
        boot.memmap_source
    );
    for r in boot.ram_regions() {
        println!("    RAM [{:#011x}, {:#011x})  {:>5} KiB", r.start, r.end, (r.end - r.start) / 1024);
    }

    let mapped = memory::paging::init_offset_map(boot.ram_top());
    println!("  offset map: phys [0, {:#x}) at {:#x} (2 MiB pages)", mapped, memory::phys::PHYS_OFFSET);
    tlb::init();
    let nx = cpu::enable_nx();
    process::set_nx(nx);
    FRAMES.init(boot.ram_regions(), memory::kernel_end());
    let stats = FRAMES.stats();
    println!(
        "  frames: {} free ({} MiB) in [{:#x}, {:#x})",
        stats.free,
        (stats.free as u64 * memory::PAGE_SIZE) >> 20,
        stats.base,
        stats.end
    );

    apic::init();
    assert_eq!(apic::current_id(), 0, "boot CPU is expected to have APIC ID 0");
    let fw_cpus = fw_cfg::cpu_count();
    let mut cpus = boot.cpus.or(fw_cpus.map(usize::from)).unwrap_or(1).max(1);
    if cpus > smp::MAX_CPUS {
        println!("  note: {cpus} CPUs requested, this kernel supports {}", smp::MAX_CPUS);
        cpus = smp::MAX_CPUS;
    }
    let tramp = smp::TRAMPOLINE_PADDR;
    if let Err(e) = smp::start_aps(cpus, boot.is_ram(tramp, tramp + memory::PAGE_SIZE)) {
        panic!("AP bring-up failed: {e:?}");
    }
    let online = (0..cpus).filter(|&c| smp::is_online(c)).count();
    println!("  cpus: {online}/{cpus} online (cmdline cpus={:?}, fw_cfg says {:?})", boot.cpus, fw_cpus);
    println!("  no-execute bit for user pages: {}", if nx { "on (EFER.NXE)" } else { "unsupported" });
    println!("  boot took {} TSC ticks", cpu::rdtsc() - t0);
    println!();

    if let Some(kind) = boot.crash {
        crash::now(kind);
    }

    let machine = Machine { cpus, online };
    let passed = match boot.mode {
        pvh::Mode::Demo => demo::run(&machine),
        pvh::Mode::Test => ktest::run(&machine),
        pvh::Mode::Bench => bench::run(&machine),
    };
    qemu_exit::exit(if passed { ExitCode::Success } else { ExitCode::Failure })
}

/// APIC ID of the first CPU that panicked (`u32::MAX`: none yet).
static PANIC_CPU: AtomicU32 = AtomicU32::new(u32::MAX);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let me = apic::current_id();
    if let Err(first) = PANIC_CPU.compare_exchange(u32::MAX, me, Ordering::SeqCst, Ordering::SeqCst) {
        if first == me {
            // Panicked while reporting a panic: give up on printing.
            qemu_exit::exit(ExitCode::Failure);
        }
        // Another CPU is already reporting and will end the run.
        cpu::halt_forever();
    }
    serial::emergency_print(format_args!("\n!!! KERNEL PANIC on cpu {me}: {info}\n"));
    qemu_exit::exit(ExitCode::Failure)
}
