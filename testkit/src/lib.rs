//! Host-side test kit for hmm-core.
//!
//! A kernel for hmm-core to run against, entirely in a test process:
//! - [`SimPhys`]: simulated physical memory, one lazily zeroed arena at a
//!   nonzero, 1 GiB-aligned physical base, implementing [`hmm_core::PhysMem`].
//! - [`CountingAllocator`]: a [`hmm_core::FrameAllocator`] over it that counts
//!   live frames, panics on double or foreign frees, poisons frames, hands out
//!   naturally aligned 2 MiB / 1 GiB chunks, and fails on request.
//! - [`ModelSpace`]: a process address space with real page tables of any
//!   CPU format (`ModelSpace<F>`, x86_64 4-level by default; sizes and the
//!   user half come from the format's geometry), regions of every kind HMM
//!   distinguishes ([`RegionKind`]), software entries (swap, migration,
//!   device-private: [`ModelSpace::set_special`]), a fault handler, fork with
//!   copy-on-write, and mutations that notify devices exactly as
//!   [`hmm_core::AddressSpace`] requires. Implements that trait.
//! - [`Oracle`]: the model's own record of what it maps, for checking both the
//!   model's tables ([`ModelSpace::check_tables`]) and hmm-core's output
//!   ([`Oracle::expected_pfns`]).
//! - [`SimFile`]: shared objects (files, shared memory, driver pages).
//! - [`TableView`]: lock-free table reads for hooks and device threads.
//! - [`dmirror`]: a dummy device (like Linux's dmirror) with a stale-keeping
//!   device TLB and a per-access check against the CPU's mapping.
//!
//! Everything is `Send + Sync` so a test can race a device thread against the
//! kernel.
//!
//! ```
//! use hmm_core::{AddressSpace, RegionFlags};
//! use hmm_testkit::{range, CountingAllocator, ModelSpace, RegionKind, PAGE};
//!
//! let alloc = CountingAllocator::with_size(64 << 20);
//! let space = ModelSpace::new(&alloc).unwrap();
//! let buf = range(0x1000_0000, 4 * PAGE);
//! space.map(buf.start(), 4 * PAGE, RegionFlags::READ | RegionFlags::WRITE, RegionKind::PrivateAnon).unwrap();
//! space.write_bytes(buf.start(), b"hello").unwrap(); // a CPU write: demand-zero fault
//! let child = space.fork().unwrap(); // private pages become copy-on-write
//! child.write_bytes(buf.start(), b"HELLO").unwrap();
//! let mut back = [0u8; 5];
//! space.read_bytes(buf.start(), &mut back).unwrap();
//! assert_eq!(&back, b"hello");
//! space.check_tables(); // the real tables agree with the oracle
//! assert_eq!(space.snapshot(buf), space.oracle().expected_pfns(buf));
//! assert!(space.zero_frame().is_some());
//! drop((child, space));
//! assert_eq!(alloc.live(), 0); // nothing leaked
//! ```
#![deny(missing_docs, unsafe_op_in_unsafe_fn)]

mod alloc;
pub mod dmirror;
mod file;
mod oracle;
mod phys;
mod space;
mod view;

pub use alloc::{CountingAllocator, ORDER_1G, ORDER_2M, POISON};
pub use file::SimFile;
pub use oracle::{Backing, Oracle, OracleLeaf, OraclePage, OracleSpecial};
pub use phys::{SimPhys, HUGE_1G, HUGE_2M, PAGE};
pub use space::{range, Hook, ModelReadGuard, ModelSpace, RegionKind};
pub use view::TableView;
