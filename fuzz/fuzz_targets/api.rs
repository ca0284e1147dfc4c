//! Arbitrary sequences of kernel and device operations over the model kernel
//! (hmm-testkit) and up to two `Mirror`s of it, with arbitrary (often
//! invalid) ranges, flags, lengths and write bits, and injected allocation
//! failures.
//!
//! Errors are fine. After every operation:
//! - every valid mirror translation is mapped by the CPU with at least that
//!   permission (the coherence invariant; a stale frame fails it);
//! - the dummy device never used a translation the CPU no longer had;
//! - the model's real tables agree with its oracle.
//!
//! At the end, with everything dropped, no frame is leaked. A panic or abort
//! inside hmm-core is a bug (one in hmm-testkit is a bug of the model).
#![no_main]

use arbitrary::Arbitrary;
use core::pin::Pin;
use hmm_core::arch::x86_64::{X86_64Level4, X86_64Level5};
use hmm_core::pt::Pfn;
use hmm_core::{AddressSpace, Event, Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::dmirror::{self, DummyDevice};
use hmm_testkit::{CountingAllocator, ModelSpace, RegionKind, SimFile, SimPhys};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

const PAGE: u64 = 4096;
/// The window every structured operation lands in: 4 MiB, 2 MiB aligned, so
/// transparent and hugetlb 2 MiB pages fit.
const WIN: u64 = 0x4000_0000;
const WIN_PAGES: u64 = 1024;
/// Simulated RAM: 2.5 MiB, so one 2 MiB chunk at most (the allocator hands
/// out small frames from the top down): huge allocations also fail and fall
/// back, and running out of memory is common.
const RAM: u64 = (2 << 20) + (512 << 10);
/// Longest device or CPU access, in bytes.
const MAX_ACCESS: u64 = 3 * PAGE;

type Dev = DummyDevice<SimPhys>;
type DevMirror<'s> = Mirror<'s, ModelSpace, Dev, CountingAllocator>;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    PrivateAnon,
    Thp,
    HugeTlb2M,
    HugeTlb1G,
    SharedAnon,
    SharedFile { offset_pages: u8 },
    MixedMap,
    Io,
}

/// Pages of the window: `page % WIN_PAGES`, `1 + pages % 64` long, or the
/// whole 2 MiB-aligned half when `huge`.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Span {
    page: u16,
    pages: u16,
    huge: bool,
}

impl Span {
    fn bounds(self) -> (u64, u64) {
        if self.huge {
            let half = (self.page as u64 % 2) * 512;
            (WIN + half * PAGE, 512 * PAGE)
        } else {
            let page = self.page as u64 % WIN_PAGES;
            let pages = (1 + self.pages as u64 % 64).min(WIN_PAGES - page);
            (WIN + page * PAGE, pages * PAGE)
        }
    }

    fn range(self) -> VaRange {
        let (start, len) = self.bounds();
        VaRange::new::<X86_64Level4>(start, len).expect("window ranges are valid")
    }
}

/// Either a window span or raw values (usually invalid, sometimes 5-level).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum AnyRange {
    Span(Span),
    Raw { start: u64, len: u64, five_level: bool },
}

impl AnyRange {
    fn range(self) -> Option<VaRange> {
        match self {
            AnyRange::Span(s) => Some(s.range()),
            AnyRange::Raw { start, len, five_level: false } => VaRange::new::<X86_64Level4>(start, len).ok(),
            AnyRange::Raw { start, len, five_level: true } => VaRange::new::<X86_64Level5>(start, len).ok(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ev {
    Unmap,
    Clear,
    ProtectionVma,
    ProtectionPage,
    SoftDirty,
    Migrate(u16),
    Exclusive(u16),
}

impl Ev {
    fn event(self) -> Event {
        match self {
            Ev::Unmap => Event::Unmap,
            Ev::Clear => Event::Clear,
            Ev::ProtectionVma => Event::ProtectionVma,
            Ev::ProtectionPage => Event::ProtectionPage,
            Ev::SoftDirty => Event::SoftDirty,
            Ev::Migrate(o) => Event::Migrate { owner: o % 4 },
            Ev::Exclusive(o) => Event::Exclusive { owner: o % 4 },
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Map { span: Span, flags: u8, kind: Kind },
    MapRaw { start: u64, len: u64, flags: u8, kind: Kind },
    Unmap(AnyRange),
    Protect { range: AnyRange, flags: u8 },
    Clear(AnyRange),
    Fork,
    DropChild,
    CpuWrite { page: u16, offset: u16, len: u16, byte: u8, child: bool },
    CpuRead { page: u16, offset: u16, len: u16, child: bool },
    DeviceFault { mirror: bool, range: AnyRange, write: bool },
    DeviceRead { mirror: bool, page: u16, offset: u16, len: u16 },
    DeviceWrite { mirror: bool, page: u16, offset: u16, len: u16, byte: u8 },
    Snapshot { mirror: bool, range: AnyRange, extra: i8 },
    Register { mirror: bool, whole_space: bool, sub: Span, owner: Option<u8>, max_retries: u8 },
    Unregister { mirror: bool },
    DropMirror { mirror: bool },
    Invalidate { range: AnyRange, event: Ev, blockable: bool },
    FailAt(u8),
    FailAfter(u8),
    FailHuge(bool),
    ClearFailures,
    DeviceFailUpdate { mirror: bool, k: u8 },
    Release,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

fn flags(bits: u8) -> RegionFlags {
    RegionFlags::from_bits_truncate(bits as u32) & (RegionFlags::READ | RegionFlags::WRITE | RegionFlags::EXEC)
}

fn region_kind(kind: Kind, file: &Arc<SimFile>) -> RegionKind {
    match kind {
        Kind::PrivateAnon => RegionKind::PrivateAnon,
        Kind::Thp => RegionKind::Thp,
        Kind::HugeTlb2M => RegionKind::HugeTlb2M,
        Kind::HugeTlb1G => RegionKind::HugeTlb1G,
        Kind::SharedAnon => RegionKind::SharedAnon,
        Kind::SharedFile { offset_pages } => {
            RegionKind::SharedFile { file: file.clone(), offset: (offset_pages as u64 % 40) * PAGE }
        }
        Kind::MixedMap => RegionKind::MixedMap,
        Kind::Io => RegionKind::Io,
    }
}

/// `(va, len)` of an access inside the window (the last one may run a little
/// past it, into unmapped space).
fn access(page: u16, offset: u16, len: u16) -> (u64, usize) {
    let va = WIN + (page as u64 % WIN_PAGES) * PAGE + offset as u64 % PAGE;
    (va, (len as u64 % MAX_ACCESS) as usize + 1)
}

fn device(space: &ModelSpace) -> Dev {
    let view = space.table_view();
    DummyDevice::new(
        space.sim_phys().clone(),
        Some(Box::new(move |va, frame, write| view.cpu_maps(va, frame, write))),
        space.zero_frame(),
    )
}

/// Every valid mirror entry in the window is mapped by the CPU, to the same
/// frame, writable if the entry is.
fn assert_coherent(m: &DevMirror<'_>, space: &ModelSpace) {
    let window = VaRange::new::<X86_64Level4>(WIN, WIN_PAGES * PAGE).unwrap();
    let Some(r) = m.range().intersect(&window) else { return };
    let cpu = space.table_view().snapshot(r);
    for (i, p) in cpu.iter().enumerate() {
        let va = r.start() + i as u64 * PAGE;
        if let Some(e) = m.translate(va) {
            assert!(
                p.is_valid() && p.phys() == e.frame() && (p.is_write() || !e.is_write()),
                "mirror entry {va:#x} -> {:#x} (write {}) but the CPU has {p:?}",
                e.frame(),
                e.is_write()
            );
        }
    }
    assert_eq!(m.device().counters().stale, 0, "device used a stale translation");
}

fuzz_target!(|input: Input| {
    let alloc = CountingAllocator::with_size(RAM);
    let space = ModelSpace::new(&alloc).expect("space");
    let file = SimFile::new(&alloc, 64);
    let mut child: Option<ModelSpace> = None;
    let mut mirrors: [Option<Pin<Box<DevMirror<'_>>>>; 2] = [None, None];
    for op in input.ops.iter().take(64) {
        match *op {
            Op::Map { span, flags: f, kind } => {
                let (start, len) = span.bounds();
                let _ = space.map(start, len, flags(f), region_kind(kind, &file));
            }
            Op::MapRaw { start, len, flags: f, kind } => {
                let _ = space.map(start, len, flags(f), region_kind(kind, &file));
            }
            Op::Unmap(r) => {
                if let Some(r) = r.range() {
                    let _ = space.unmap(r);
                }
            }
            Op::Protect { range, flags: f } => {
                if let Some(r) = range.range() {
                    let _ = space.protect(r, flags(f));
                }
            }
            Op::Clear(r) => {
                if let Some(r) = r.range() {
                    let _ = space.clear(r);
                }
            }
            Op::Fork => {
                if let Ok(c) = space.fork() {
                    child = Some(c);
                }
            }
            Op::DropChild => child = None,
            Op::CpuWrite { page, offset, len, byte, child: in_child } => {
                let (va, len) = access(page, offset, len);
                let s = if in_child { child.as_ref().unwrap_or(&space) } else { &space };
                let _ = s.write_bytes(va, &vec![byte; len]);
            }
            Op::CpuRead { page, offset, len, child: in_child } => {
                let (va, len) = access(page, offset, len);
                let s = if in_child { child.as_ref().unwrap_or(&space) } else { &space };
                let _ = s.read_bytes(va, &mut vec![0; len]);
            }
            Op::DeviceFault { mirror, range, write } => {
                if let (Some(m), Some(r)) = (&mirrors[mirror as usize], range.range()) {
                    let _ = m.fault(r, write);
                }
            }
            Op::DeviceRead { mirror, page, offset, len } => {
                if let Some(m) = &mirrors[mirror as usize] {
                    let (va, len) = access(page, offset, len);
                    if let Ok(data) = dmirror::read(m, va, len) {
                        // The device reads what the CPU reads.
                        let mut cpu = vec![0; len];
                        if space.read_bytes(va, &mut cpu).is_ok() {
                            assert_eq!(data, cpu, "device and CPU disagree at {va:#x}");
                        }
                    }
                }
            }
            Op::DeviceWrite { mirror, page, offset, len, byte } => {
                if let Some(m) = &mirrors[mirror as usize] {
                    let (va, len) = access(page, offset, len);
                    let _ = dmirror::write(m, va, &vec![byte; len]);
                }
            }
            Op::Snapshot { mirror, range, extra } => {
                if let (Some(m), Some(r)) = (&mirrors[mirror as usize], range.range()) {
                    // The right length (bounded), or a wrong one.
                    let pages = r.pages(12).min(2 * WIN_PAGES) as i64;
                    let len = (pages + (extra % 3) as i64).max(0) as usize;
                    let mut out = vec![Pfn::NONE; len];
                    let _ = m.snapshot(r, &mut out);
                }
            }
            Op::Register { mirror, whole_space, sub, owner, max_retries } => {
                let slot = &mut mirrors[mirror as usize];
                if slot.is_none() {
                    let range =
                        if whole_space { VaRange::new::<X86_64Level4>(0, 1 << 47).unwrap() } else { sub.range() };
                    let config = MirrorConfig {
                        max_retries: max_retries as u32,
                        owner: owner.map(|o| o as u16 % 4),
                        ..MirrorConfig::default()
                    };
                    if let Ok(m) = Mirror::new(&space, &*alloc, device(&space), range, config) {
                        *slot = Some(Box::pin(m));
                    }
                }
                if let Some(m) = slot {
                    let _ = m.as_ref().register();
                }
            }
            Op::Unregister { mirror } => {
                if let Some(m) = &mirrors[mirror as usize] {
                    let _ = m.unregister();
                    assert_eq!(m.table_frames(), 0, "unregister frees the mirror table");
                }
            }
            Op::DropMirror { mirror } => mirrors[mirror as usize] = None,
            Op::Invalidate { range, event, blockable } => {
                if let Some(r) = range.range() {
                    if let Ok(inv) = space.notifiers().invalidate_range_start(r, event.event(), blockable) {
                        space.notifiers().invalidate_range_end(inv);
                    }
                }
            }
            Op::FailAt(k) => alloc.fail_at(k as u64),
            Op::FailAfter(n) => alloc.fail_after(n as u64),
            Op::FailHuge(on) => alloc.fail_huge(on),
            Op::ClearFailures => alloc.clear_failures(),
            Op::DeviceFailUpdate { mirror, k } => {
                if let Some(m) = &mirrors[mirror as usize] {
                    m.device().fail_update_at(k as u64 % 4);
                }
            }
            Op::Release => space.release(),
        }
        for m in mirrors.iter().flatten() {
            assert_coherent(m, &space);
        }
        space.check_tables();
        if let Some(c) = &child {
            c.check_tables();
        }
    }
    alloc.clear_failures();
    drop(mirrors);
    drop(child);
    drop(space);
    drop(file);
    assert_eq!(alloc.live(), 0, "frames leaked");
});
