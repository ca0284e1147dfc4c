//! Lock-free reading of a model space's tables, for hooks and device threads.
//!
//! Why a separate handle: a hook runs inside a mutation that holds the mmap
//! lock for writing, so it cannot lock the space to look at it; and a hook
//! that captured the space itself would keep it alive forever. A
//! `TableView` holds only the simulated memory and the root's address.

use crate::phys::SimPhys;
use core::marker::PhantomData;
use core::ops::ControlFlow;
use hmm_core::arch::x86_64::X86_64Level4;
use hmm_core::arch::{PteFormat, PteView};
use hmm_core::pt::{Pfn, Span};
use hmm_core::VaRange;
use std::sync::Arc;

/// Reads the tables (in CPU format `F`) rooted at one root in one
/// [`SimPhys`].
///
/// Reads are atomic and need no lock. While the space lives and no table is
/// being freed (tables are freed only by `map`'s pruning and by `release`),
/// results are exact; otherwise they may describe freed (poisoned) tables,
/// which is wrong but never unsound (see the `SAFETY` notes).
pub struct TableView<F = X86_64Level4> {
    phys: Arc<SimPhys>,
    root: u64,
    _format: PhantomData<fn() -> F>,
}

impl<F> Clone for TableView<F> {
    fn clone(&self) -> Self {
        Self { phys: self.phys.clone(), root: self.root, _format: PhantomData }
    }
}

impl<F> core::fmt::Debug for TableView<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TableView").field("phys", &self.phys).field("root", &self.root).finish()
    }
}

impl<F: PteFormat> TableView<F> {
    pub(crate) fn new(phys: Arc<SimPhys>, root: u64) -> Self {
        Self { phys, root, _format: PhantomData }
    }

    fn page(va: u64) -> VaRange {
        VaRange::new::<F::Geometry>(va & !0xfff, 4096).unwrap_or_else(|e| panic!("bad page {va:#x}: {e}"))
    }

    /// Physical address of the root table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// `hmm_core::pt::snapshot` of `range`.
    pub fn snapshot(&self, range: VaRange) -> Vec<Pfn> {
        let mut out = vec![Pfn::NONE; range.pages(12) as usize];
        // Even a stale root is harmless here: every pointer `SimPhys` hands out lies in its arena, which the
        // `Arc` keeps alive, `ptr` panics for any other address, and the walker reads entries atomically; a walk
        // through a freed table reads poison (decoded as leaves or malformed entries), never invalid memory.
        // SAFETY: the memory is valid as argued above; while the space lives, `root` is its live root.
        unsafe { hmm_core::pt::snapshot::<F, SimPhys>(&self.phys, self.root, range, &mut out) }
            .expect("snapshot of a valid range");
        out
    }

    /// Every visited entry of `range` (holes, leaves, PROT_NONE) with its
    /// span, as `hmm_core::pt::walk` reports them.
    pub fn entries(&self, range: VaRange) -> Vec<(Span, PteView)> {
        let mut out = Vec::new();
        let mut visit = |span: Span, entry: PteView| -> ControlFlow<()> {
            out.push((span, entry));
            ControlFlow::Continue(())
        };
        // SAFETY: as in `snapshot`.
        let _ = unsafe { hmm_core::pt::walk::<F, SimPhys, _>(&self.phys, self.root, range, &mut visit) }
            .expect("walk of a valid range");
        out
    }

    /// The frame of the 4 KiB page at `va` and whether it is writable, if a
    /// user-accessible leaf maps it: what a user-mode access would use now.
    pub fn translate(&self, va: u64) -> Option<(u64, bool)> {
        let p = self.snapshot(Self::page(va))[0];
        p.is_valid().then(|| (p.phys(), p.is_write()))
    }

    /// Whether the CPU maps the page at `va` to the page `frame` right now,
    /// writable if `write` is asked: the check a dummy device makes on each
    /// access through its TLB (a `false` means the device used a stale
    /// translation). Lock-free, so it may run under a driver lock.
    pub fn cpu_maps(&self, va: u64, frame: u64, write: bool) -> bool {
        self.translate(va).is_some_and(|(f, w)| f == frame & !0xfff && (w || !write))
    }

    /// The entry mapping the page at `va` and its level (0 = 4 KiB).
    pub fn entry_at(&self, va: u64) -> (PteView, usize) {
        let (span, view) = self.entries(Self::page(va))[0];
        (view, span.level)
    }
}
