//! Reads what the PVH loader handed us: the `hvm_start_info` structure (Xen
//! public header `arch-x86/hvm/start_info.h`) with the kernel command line and
//! the e820-style memory map.
//!
//! Everything is copied into a [`BootInfo`] value right away, because the
//! loader left these structures in low memory that the kernel later reuses
//! (the AP trampoline page at 0x8000, for instance).

use core::ptr::read_unaligned;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// e820 type for usable RAM.
const E820_RAM: u32 = 1;
/// RAM assumed when the loader passes no memory map. Matches `-m 256M` used
/// by `xtask`'s runner.
pub const FALLBACK_RAM_BYTES: u64 = 256 * 1024 * 1024;

const MAX_REGIONS: usize = 32;
const MAX_CMDLINE: usize = 256;

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    // version >= 1:
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// What the kernel was asked to do (`mode=` on the command line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Print a readable trace of the demo scenario.
    Demo,
    /// Run the named self-tests and report `N passed, M failed`.
    Test,
    /// Time `range_fault` against a store stream and print the figures in
    /// the report protocol of `cargo xtask bench`.
    Bench,
}

/// A deliberate crash requested with `crash=` (to check that failures are
/// loud: see `crash.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// `crash=pf`: read an unmapped address.
    PageFault,
    /// `crash=gp`: read a non-canonical address.
    GeneralProtection,
    /// `crash=ud`: execute `ud2`.
    InvalidOpcode,
    /// `crash=df`: page fault with an unusable stack.
    DoubleFault,
    /// `crash=panic`: Rust panic.
    Panic,
    /// `crash=ap-pf`: page fault on application processor 1.
    ApPageFault,
}

/// A range of usable RAM, `[start, end)` in physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub start: u64,
    pub end: u64,
}

/// Where the memory map came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemmapSource {
    StartInfo,
    Fallback,
}

/// Boot parameters, copied out of loader memory.
pub struct BootInfo {
    pub start_info_paddr: u64,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [RamRegion; MAX_REGIONS],
    region_count: usize,
    pub memmap_source: MemmapSource,
    /// `mode=` (default: demo).
    pub mode: Mode,
    /// `cpus=` if given.
    pub cpus: Option<usize>,
    /// `crash=` if given.
    pub crash: Option<Crash>,
}

impl BootInfo {
    /// Parses `hvm_start_info` at `paddr`.
    ///
    /// Must run while the boot identity map is active and before anything
    /// overwrites low memory.
    pub fn parse(paddr: u64) -> Self {
        let mut info = BootInfo {
            start_info_paddr: paddr,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            regions: [RamRegion { start: 0, end: 0 }; MAX_REGIONS],
            region_count: 0,
            memmap_source: MemmapSource::Fallback,
            mode: Mode::Demo,
            cpus: None,
            crash: None,
        };
        // Everything below 4 GiB is identity mapped by the boot stub.
        let readable = |p: u64, len: u64| p != 0 && p.checked_add(len).is_some_and(|e| e <= 1 << 32);

        if readable(paddr, size_of::<HvmStartInfo>() as u64) {
            // SAFETY: identity-mapped, in-range address given to us by the
            // loader; read_unaligned copes with any alignment.
            let si = unsafe { read_unaligned(paddr as *const HvmStartInfo) };
            assert_eq!(si.magic, XEN_HVM_START_MAGIC, "bad hvm_start_info magic at {paddr:#x}");
            if readable(si.cmdline_paddr, MAX_CMDLINE as u64) {
                for i in 0..MAX_CMDLINE - 1 {
                    // SAFETY: within the identity-mapped range checked above.
                    let byte = unsafe { *((si.cmdline_paddr + i as u64) as *const u8) };
                    if byte == 0 {
                        break;
                    }
                    info.cmdline[i] = byte;
                    info.cmdline_len = i + 1;
                }
            }
            let entry_size = size_of::<HvmMemmapEntry>() as u64;
            let count = u64::from(si.memmap_entries);
            if si.version >= 1 && count > 0 && readable(si.memmap_paddr, count * entry_size) {
                info.memmap_source = MemmapSource::StartInfo;
                for i in 0..count {
                    // SAFETY: inside the identity-mapped table checked above.
                    let e = unsafe { read_unaligned((si.memmap_paddr + i * entry_size) as *const HvmMemmapEntry) };
                    if e.kind == E820_RAM && e.size > 0 {
                        info.push_region(e.addr, e.addr.saturating_add(e.size));
                    }
                }
            }
        }
        if info.region_count == 0 {
            info.memmap_source = MemmapSource::Fallback;
            info.push_region(0, FALLBACK_RAM_BYTES);
        }
        info.parse_cmdline();
        info
    }

    fn push_region(&mut self, start: u64, end: u64) {
        if self.region_count < MAX_REGIONS {
            self.regions[self.region_count] = RamRegion { start, end };
            self.region_count += 1;
        }
    }

    fn parse_cmdline(&mut self) {
        let cmdline = self.cmdline();
        let mut mode = None;
        let mut cpus = None;
        let mut crash = None;
        for word in cmdline.split_ascii_whitespace() {
            if let Some(value) = word.strip_prefix("mode=") {
                mode = Some(match value {
                    "demo" => Mode::Demo,
                    "test" => Mode::Test,
                    "bench" => Mode::Bench,
                    other => panic!("unknown mode={other:?} (expected demo, test or bench)"),
                });
            } else if let Some(value) = word.strip_prefix("cpus=") {
                cpus = Some(value.parse().unwrap_or_else(|_| panic!("bad cpus={value:?}")));
            } else if let Some(value) = word.strip_prefix("crash=") {
                crash = Some(match value {
                    "pf" => Crash::PageFault,
                    "gp" => Crash::GeneralProtection,
                    "ud" => Crash::InvalidOpcode,
                    "df" => Crash::DoubleFault,
                    "panic" => Crash::Panic,
                    "ap-pf" => Crash::ApPageFault,
                    other => panic!("unknown crash={other:?}"),
                });
            }
        }
        self.mode = mode.unwrap_or(Mode::Demo);
        self.cpus = cpus;
        self.crash = crash;
    }

    /// The kernel command line (`-append` in QEMU).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("<non-utf8>")
    }

    /// Usable RAM regions, as reported by the loader.
    pub fn ram_regions(&self) -> &[RamRegion] {
        &self.regions[..self.region_count]
    }

    /// End of the highest usable RAM region.
    pub fn ram_top(&self) -> u64 {
        self.ram_regions().iter().map(|r| r.end).max().unwrap_or(0)
    }

    /// Whether `[start, end)` lies entirely inside one usable RAM region.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        self.ram_regions().iter().any(|r| r.start <= start && end <= r.end)
    }
}
