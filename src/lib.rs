//! # hmm-core
//!
//! Heterogeneous Memory Management for hobby and research kernels: keep a
//! device's view of a process address space coherent with the CPU's page
//! tables.
//!
//! Layers, each usable without the ones above it:
//! - [`arch`]: page-table formats (geometry + an architecture-neutral entry
//!   view); the formats shipped and what each encodes are listed there.
//! - [`pt`]: a generic range walker over any format and the per-page snapshot.
//! - [`PhysMem`] and [`FrameAllocator`]: the seams to the kernel's memory.
//!
//! The crate is `#![no_std]`, needs no allocator, and keeps no global state.
//!
//! # Features
//! - `alloc`: `notifier::VecStore`, an interval store that grows on the
//!   global allocator (without it, [`notifier::FixedStore`] holds a fixed
//!   number of intervals).
//! - `defmt`: [`defmt::Format`](https://docs.rs/defmt) for the public value
//!   types (views, flags, ranges, errors, statistics), for logging on
//!   bare-metal targets.
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn, missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod arch;
mod error;
mod frame;
mod phys;
pub mod pt;
mod range;

pub use error::{Error, Result};
pub use frame::{BitmapFrameAllocator, FrameAllocator, FRAME_SIZE};
pub use phys::{OffsetPhysMem, PhysMem};
pub use range::VaRange;
pub mod notifier;
mod space;
pub mod sync;

pub use notifier::{Event, Interval, InvalidateRange, Notifier, NotifierRegistry};
pub use space::{AddressSpace, Region, RegionFlags};
mod fault;
pub use fault::{range_fault, FaultStats, RangeFault};
mod mirror;
pub use mirror::{DeviceOps, Mirror, MirrorConfig, MirrorStats};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
