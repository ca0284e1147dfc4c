//! Sequences of kernel and device operations (four input bytes each) over the model kernel
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
/// Small spans and accesses land in the first pages of the window, so that
/// operations overlap often.
const HOT_PAGES: u64 = 64;
/// Longest device or CPU access, in bytes.
const MAX_ACCESS: u64 = 3 * PAGE;

type Dev = DummyDevice<SimPhys>;
type DevMirror<'s> = Mirror<'s, ModelSpace, Dev, CountingAllocator>;

#[derive(Debug, Clone, Copy)]
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

/// Pages of the window: `page % HOT_PAGES`, `1 + pages % 16` long, or one
/// whole 2 MiB-aligned half of the window when `huge`.
#[derive(Debug, Clone, Copy)]
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
            let page = self.page as u64 % HOT_PAGES;
            let pages = 1 + self.pages as u64 % 16;
            (WIN + page * PAGE, pages * PAGE)
        }
    }

    fn range(self) -> VaRange {
        let (start, len) = self.bounds();
        VaRange::new::<X86_64Level4>(start, len).expect("window ranges are valid")
    }
}

/// Either a window span or raw values (usually invalid, sometimes 5-level).
#[derive(Debug, Clone, Copy)]
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

#[derive(Debug, Clone, Copy)]
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

#[derive(Debug, Clone, Copy)]
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

/// The input: four bytes per operation (`[code, a, b, c]`, see [`decode`]).
///
/// A compact encoding rather than `#[derive(Arbitrary)]` on [`Op`]: derived
/// enums take 4 bytes for the variant and many more for the fields, so the
/// handful of operations that together expose a coherence bug (map a page,
/// fault it into a mirror, unmap or protect it) were seldom generated in a
/// row. Here every operation is 4 bytes, the common ones own several codes,
/// and spans land in the hot pages; raw (mostly invalid) values still come
/// from a table of interesting ones.
#[derive(Debug)]
struct Input {
    ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        // `Unstructured` pads an exhausted input with zeros: stop at its end.
        while u.len() >= 4 {
            ops.push(decode(<[u8; 4]>::arbitrary(u)?));
        }
        Ok(Input { ops })
    }
}

/// Addresses and lengths for raw ranges: edges, holes and non-canonical ones.
const RAW: [u64; 16] = [
    0,
    PAGE,
    WIN,
    WIN + PAGE + 1,
    WIN + 8 * PAGE,
    1 << 47,
    (1 << 47) - PAGE,
    0xffff_8000_0000_0000,
    0xffff_ffff_ffff_f000,
    0x0000_8000_0000_0000 | PAGE,
    u64::MAX,
    1 << 56,
    2 << 20,
    1 << 30,
    3,
    64 * PAGE,
];

fn span(a: u8, b: u8, huge: bool) -> Span {
    Span { page: a as u16, pages: b as u16, huge }
}

fn any_range(code: u8, a: u8, b: u8) -> AnyRange {
    // One range in eight is raw, the rest hot spans (one in sixteen huge).
    if code & 7 == 7 {
        AnyRange::Raw { start: RAW[(a & 15) as usize], len: RAW[(b & 15) as usize], five_level: a & 16 != 0 }
    } else {
        AnyRange::Span(span(a, b, code & 15 == 14))
    }
}

/// Turns four input bytes into one operation. Codes are taken modulo 64;
/// frequent operations own several codes.
fn decode([code, a, b, c]: [u8; 4]) -> Op {
    let kind = |k: u8| match k % 12 {
        0..=3 => Kind::PrivateAnon,
        4 => Kind::Thp,
        5 => Kind::HugeTlb2M,
        6 => Kind::SharedAnon,
        7 => Kind::SharedFile { offset_pages: k / 12 },
        8 => Kind::MixedMap,
        9 => Kind::Io,
        10 => Kind::HugeTlb1G,
        _ => Kind::PrivateAnon,
    };
    // READ | WRITE three times in four, else any permission bits.
    let perm = |x: u8| if x & 3 != 0 { 0b011 } else { x >> 2 };
    let ev = |x: u8| match x % 8 {
        0 => Ev::Unmap,
        1 => Ev::Clear,
        2 => Ev::ProtectionVma,
        3 => Ev::ProtectionPage,
        4 => Ev::SoftDirty,
        5 => Ev::Migrate((x >> 3) as u16),
        6 => Ev::Exclusive((x >> 3) as u16),
        _ => Ev::Clear,
    };
    let mirror = c & 0x80 != 0;
    match code % 64 {
        0..=7 => Op::Map { span: span(a, b, c & 0x40 != 0 && c & 0x20 != 0), flags: perm(c), kind: kind(c >> 2) },
        8..=11 => Op::Unmap(any_range(c, a, b)),
        12..=14 => Op::Protect { range: any_range(c, a, b), flags: perm(c >> 3) },
        15..=17 => Op::Clear(any_range(c, a, b)),
        18 | 19 => Op::Fork,
        20 => Op::DropChild,
        21..=24 => {
            Op::CpuWrite { page: a as u16, offset: b as u16 * 17, len: c as u16 * 13, byte: a ^ c, child: c & 1 != 0 }
        }
        25 | 26 => Op::CpuRead { page: a as u16, offset: b as u16 * 17, len: c as u16 * 13, child: c & 1 != 0 },
        27..=34 => Op::DeviceFault { mirror, range: any_range(c, a, b), write: c & 1 != 0 },
        35..=39 => Op::DeviceRead { mirror, page: a as u16, offset: b as u16 * 17, len: c as u16 * 13 },
        40..=42 => Op::DeviceWrite { mirror, page: a as u16, offset: b as u16 * 17, len: c as u16 * 13, byte: a ^ b },
        43 | 44 => Op::Snapshot { mirror, range: any_range(c, a, b), extra: (c & 3) as i8 - 1 },
        45 | 46 => Op::Register {
            mirror,
            whole_space: c & 1 != 0,
            sub: span(a, b, c & 2 != 0),
            owner: (c & 4 != 0).then_some(c >> 3),
            max_retries: a,
        },
        47 => Op::Unregister { mirror },
        48 => Op::DropMirror { mirror },
        49..=52 => Op::Invalidate { range: any_range(c, a, b), event: ev(c >> 1), blockable: c & 1 != 0 },
        53 => Op::FailAt(a),
        54 => Op::FailAfter(a),
        55 => Op::FailHuge(a & 1 != 0),
        56 => Op::ClearFailures,
        57 => Op::DeviceFailUpdate { mirror, k: a },
        58 | 59 => Op::MapRaw {
            start: RAW[(a & 15) as usize],
            len: RAW[(b & 15) as usize],
            flags: perm(c),
            kind: kind(c >> 2),
        },
        // Tearing the space down ends most of the run: keep it rare.
        60 if a == 0xff && b == 0xff => Op::Release,
        _ => Op::DeviceRead { mirror, page: a as u16, offset: 0, len: c as u16 },
    }
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

/// `(va, len)` of an access in the hot pages of the window (it may run a
/// little past them).
fn access(page: u16, offset: u16, len: u16) -> (u64, usize) {
    let va = WIN + (page as u64 % HOT_PAGES) * PAGE + offset as u64 % PAGE;
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
    // Start with one registered mirror of the window (operations may drop it).
    let window = VaRange::new::<X86_64Level4>(WIN, WIN_PAGES * PAGE).unwrap();
    if let Ok(m) = Mirror::new(&space, &*alloc, device(&space), window, MirrorConfig::default()) {
        let m = Box::pin(m);
        m.as_ref().register().expect("first registration");
        mirrors[0] = Some(m);
    }
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
