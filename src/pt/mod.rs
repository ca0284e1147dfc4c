//! Generic page-table machinery: a range walker over any
//! ([`PteFormat`](crate::arch::PteFormat), [`PhysMem`](crate::PhysMem)) pair, the per-page
//! snapshot built on it, and the device-side mirror table.

mod pfn;
pub(crate) mod snapshot;
mod walk;

pub use pfn::Pfn;
pub use snapshot::snapshot;
pub(crate) use walk::restrict_view;
pub use walk::{restrict, walk, PageRun, Span, Visitor};
mod mirror_table;
pub use mirror_table::{Cleared, MapError, MirrorEntry, MirrorTable, Reclaim, TableStats, TableWriter};
