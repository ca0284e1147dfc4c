//! Shared set-up for the HMM scenario tests: a model kernel, a dummy device
//! whose every access is checked against the CPU tables, and a mirror.
#![allow(dead_code)]

pub mod geometries;
pub mod hooked;
pub mod watchdog;

use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::{Mirror, MirrorConfig, RegionFlags, VaRange};
use hmm_testkit::dmirror::{DeviceCounters, DummyDevice};
use hmm_testkit::{CountingAllocator, ModelSpace, SimPhys};
use std::sync::Arc;

pub const R: RegionFlags = RegionFlags::READ;
pub const RW: RegionFlags = RegionFlags::READ.union(RegionFlags::WRITE);
pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
/// The user half of a 4-level address space.
pub const USER_END: u64 = 1 << 47;

pub type Dev = DummyDevice<SimPhys>;
pub type DevMirror<'s, S = ModelSpace> = Mirror<'s, S, Dev, CountingAllocator>;

/// A region permission for generated operations.
#[derive(Clone, Copy, Debug)]
pub enum Perm {
    Rw,
    R,
    None,
}

impl Perm {
    pub fn flags(self) -> RegionFlags {
        match self {
            Perm::Rw => RW,
            Perm::R => R,
            Perm::None => RegionFlags::empty(),
        }
    }
}

/// A 4-level range that must be valid.
pub fn range(start: u64, len: u64) -> VaRange {
    VaRange::new::<X86_64Level4>(start, len).expect("valid range")
}

/// The whole user half.
pub fn user() -> VaRange {
    range(0, USER_END)
}

/// A model kernel over `size` bytes of simulated RAM.
pub fn kernel(size: u64) -> (Arc<CountingAllocator>, ModelSpace) {
    let alloc = CountingAllocator::with_size(size);
    let space = ModelSpace::new(&alloc).expect("space");
    (alloc, space)
}

/// A dummy device for `space` whose every access is checked against the
/// CPU's live tables (a translation the CPU no longer has counts as stale).
pub fn device(space: &ModelSpace) -> Dev {
    let view = space.table_view();
    let dev = DummyDevice::new(
        space.sim_phys().clone(),
        Some(Box::new(move |va, frame, write| view.cpu_maps(va, frame, write))),
        hmm_core::AddressSpace::zero_frame(space),
    );
    dev.reserve_events(4096);
    dev
}

/// A mirror of the whole user half (not yet registered).
pub fn mirror<'s>(space: &'s ModelSpace, alloc: &'s CountingAllocator) -> DevMirror<'s> {
    Mirror::new(space, alloc, device(space), user(), MirrorConfig::default()).expect("mirror")
}

/// Device counters, asserting the invariant every scenario must keep: the
/// device never reached a frame the CPU no longer mapped.
pub fn counters<S: hmm_core::AddressSpace + Sync>(m: &DevMirror<'_, S>) -> DeviceCounters {
    let c = m.device().counters();
    assert_eq!(c.stale, 0, "device used a stale translation");
    c
}

/// Every mirror entry in `r` maps exactly what the CPU maps, with no more
/// permission (a stale frame in the mirror fails this).
pub fn assert_mirror_coherent(m: &DevMirror<'_>, space: &ModelSpace, r: VaRange) {
    let view = space.table_view();
    let mut va = r.start();
    loop {
        if let Some(e) = m.translate(va) {
            assert!(
                view.cpu_maps(va, e.frame(), e.is_write()),
                "mirror entry {va:#x} -> {:#x} not mapped by the CPU",
                e.frame()
            );
        }
        if va + (PAGE - 1) >= r.last() {
            break;
        }
        va += PAGE;
    }
}

/// A byte pattern for page `i` of a buffer, distinct per `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 7) as u8 ^ seed ^ (i >> 12) as u8).collect()
}
