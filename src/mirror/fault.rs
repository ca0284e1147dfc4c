//! The device fault path: per attempt one walk of the CPU tables, mapping
//! straight into the device table under the update lock, and one kernel
//! handler call per contiguous missing run. No page buffer, so nothing
//! bounds the size of a fault.

use super::device::{bump, bump_locked};
use super::{CpuGeometry, Mirror};
use crate::arch::{DeviceFormat, LeafFlags, PagingGeometry, PteFormat, PteView};
use crate::fault::{classify, Class, MAX_FAULTS_WITHOUT_PROGRESS};
use crate::frame::FrameAllocator;
use crate::notifier::{Event, Running};
use crate::pt::{restrict_view, walk, MapError, PageRun, Span, TableWriter, Visitor};
use crate::range::VaRange;
use crate::space::{AddressSpace, Region, RegionFlags};
use crate::sync::RawLock;
use crate::{DeviceOps, Error, Result};
use core::ops::ControlFlow;

/// How an attempt ended.
enum Stop {
    /// Every page is mapped.
    Done,
    /// The pages before `run` are mapped; `run` must be faulted in.
    Missing { run: VaRange, write: bool },
}

/// What one attempt mapped.
#[derive(Default)]
struct Mapped {
    range: Option<VaRange>,
    pages: u64,
    entries: u64,
    huge: u64,
}

impl<'s, S, D, A, F, L> Mirror<'s, S, D, A, F, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
    L: RawLock,
{
    /// Handles a device page fault on `range`: makes every page present (and
    /// writable if `write`) in the CPU tables, maps it in the table, and tells
    /// the device — retrying only while invalidations of these pages collide,
    /// within the budget.
    ///
    /// Each attempt walks the CPU tables once from where the last one
    /// stopped, mapping as it goes, and stops at the first missing run,
    /// which the kernel's handler gets in one call; the next attempt resumes
    /// at that run. So every page was mapped at some point during the call;
    /// an invalidation since (even one the handler itself caused) may have
    /// cleared it again, and the device faults again, as it would after any
    /// later invalidation.
    ///
    /// A CPU leaf of 2 MiB or 1 GiB that lies whole in the mirror becomes one
    /// entry where the format has a leaf of that size (the whole leaf is
    /// mapped even if the fault asked for part of it); otherwise it is split
    /// into the largest leaves that fit.
    ///
    /// Errors: range validation errors, [`Error::OutOfRange`] outside the
    /// mirror, [`Error::Unregistered`], [`Error::Released`], [`Error::Busy`]
    /// (budget spent on collisions with invalidations of these pages, or on
    /// handler calls beyond one per page),
    /// [`Error::Fault`], [`Error::Perm`], [`Error::NoMemory`],
    /// [`Error::Device`]. On error nothing of this fault stays mapped: what
    /// it mapped is cleared again (the device invalidated and flushed), so
    /// pages of `range` mapped by earlier faults may be gone too.
    pub fn fault(&self, range: VaRange, write: bool) -> Result<()> {
        self.check_fault_range(range)?;
        bump(&self.counters.faults, 1);
        // Everything this fault mapped so far: all or nothing.
        let mut done = None;
        let result = self.attempts(range, write, &mut done);
        if let (Err(_), Some(d)) = (result, done) {
            if let Some(w) = self.writer.lock().as_mut() {
                self.clear_range(w, d, Event::Clear);
            }
        }
        result
    }

    /// The attempts of one fault, each resuming where the last stopped;
    /// `done` grows by what each maps.
    fn attempts(&self, range: VaRange, write: bool, done: &mut Option<VaRange>) -> Result<()> {
        let notifiers = self.space.notifiers();
        let started = self.config.clock.map(|c| c());
        let mut retries = 0u32;
        let mut va = range.start();
        let mut stuck = (None, 0u32);
        let mut calls = 0u64;
        loop {
            if self.over_budget(started, retries) {
                return Err(Error::Busy);
            }
            let rest = VaRange::from_inclusive(va, range.last());
            let guard = self.space.read_lock();
            let stop = {
                let mut writer = self.writer.lock();
                if notifiers.is_released() {
                    return Err(Error::Released);
                }
                let Some(w) = writer.as_mut() else {
                    return Err(Error::Unregistered);
                };
                let running = notifiers.running(&self.interval);
                if running.overlaps(&rest) {
                    None
                } else {
                    Some(self.attempt(w, &guard, rest, write, &running, done)?)
                }
            };
            match stop {
                None => {
                    drop(guard);
                    // A collision: wait (without locks) for it to end.
                    retries += 1;
                    bump(&self.counters.retries, 1);
                    if self.over_budget(started, retries) {
                        return Err(Error::Busy);
                    }
                    let quiet = notifiers.wait_quiet(&self.interval, rest, &mut || {
                        retries += 1;
                        bump(&self.counters.retries, 1);
                        self.over_budget(started, retries)
                    });
                    if !quiet {
                        return Err(Error::Busy);
                    }
                }
                Some(Stop::Done) => return Ok(()),
                Some(Stop::Missing { run, write }) => {
                    if stuck.0 == Some(run.start()) {
                        stuck.1 += 1;
                        if stuck.1 >= MAX_FAULTS_WITHOUT_PROGRESS {
                            return Err(Error::Fault);
                        }
                    } else {
                        stuck = (Some(run.start()), 0);
                    }
                    self.space.handle_fault(&guard, run, write)?;
                    bump(&self.counters.handler_calls, 1);
                    // One handler call per page is progress; a kernel that
                    // keeps evicting what it faulted in pays from the budget.
                    calls += 1;
                    if calls > range.pages(CpuGeometry::<S>::PAGE_SHIFT) {
                        retries += 1;
                        bump(&self.counters.retries, 1);
                    }
                    va = run.start();
                }
            }
        }
    }

    /// One attempt, under the read and update locks with no running
    /// invalidation overlapping `rest`: walks the CPU tables over `rest`,
    /// mapping every usable page up to the first missing run.
    fn attempt(
        &self,
        w: &mut TableWriter<F>,
        guard: &S::ReadGuard<'s>,
        rest: VaRange,
        write: bool,
        running: &Running,
        done: &mut Option<VaRange>,
    ) -> Result<Stop> {
        let mut mapped = Mapped::default();
        let mut va = rest.start();
        let outcome = loop {
            let Some(region) = self.space.region(guard, va).filter(|r| r.range.contains_addr(va)) else {
                break Err(Error::Fault);
            };
            if region.flags.contains(RegionFlags::IO) || !region.flags.contains(RegionFlags::READ) {
                break Err(Error::Fault);
            }
            if write && !region.flags.contains(RegionFlags::WRITE) {
                break Err(Error::Perm);
            }
            let part = VaRange::from_inclusive(va, region.range.last().min(rest.last()));
            match self.walk_part(w, part, region, write, running, &mut mapped) {
                Err(e) => break Err(e),
                Ok(Some(stop)) => break Ok(stop),
                Ok(None) if part.last() == rest.last() => break Ok(Stop::Done),
                Ok(None) => va = part.last() + 1,
            }
        };
        if let Some(range) = mapped.range {
            *done = Some(done.map_or(range, |d| d.hull(&range)));
        }
        let stop = match (outcome?, mapped.range) {
            (stop, Some(range)) => {
                F::publish_table_writes();
                self.device.update(range).map(|()| stop).map_err(Error::Device)?
            }
            (stop, None) => stop,
        };
        bump_locked(&self.counters.pages_mapped, mapped.pages);
        bump_locked(&self.counters.entries_mapped, mapped.entries);
        bump_locked(&self.counters.huge_mapped, mapped.huge);
        Ok(stop)
    }

    /// Walks `part` (inside `region`): maps usable pages until a missing run
    /// ends; returns it (`None`: all of `part` is mapped).
    fn walk_part(
        &self,
        w: &mut TableWriter<F>,
        part: VaRange,
        region: Region,
        write: bool,
        running: &Running,
        mapped: &mut Mapped,
    ) -> Result<Option<Stop>> {
        let mut visitor = MapVisitor { mirror: self, w, region, write, running, mapped, run: None, failed: None };
        // SAFETY: the read guard keeps every table of the live root
        // allocated (`AddressSpace` contract, item 2).
        let _stopped =
            unsafe { walk::<S::Format, S::Phys, _>(self.space.phys(), self.space.root(), part, &mut visitor) }?;
        if let Some(e) = visitor.failed {
            return Err(e);
        }
        Ok(visitor.run.map(|run| Stop::Missing { run, write }))
    }

    /// Maps one CPU leaf's `span`: the whole leaf when it lies in the mirror
    /// and the region and no running invalidation touches it, else the
    /// visited part. Returns what was mapped, entries and huge entries.
    #[inline]
    fn map_span(
        &self,
        w: &mut TableWriter<F>,
        span: Span,
        frame: u64,
        writable: bool,
        region: Region,
        running: &Running,
    ) -> Result<(VaRange, u64, u64)> {
        let base = span.entry_base();
        let whole = VaRange::from_inclusive(base, base + ((1u64 << span.shift) - 1));
        let widen = span.shift > CpuGeometry::<S>::PAGE_SHIFT
            && whole != span.range
            && self.interval.range().contains(&whole)
            && region.range.contains(&whole)
            && !running.overlaps(&whole);
        let (target, pa) = if widen { (whole, frame) } else { (span.range, frame + (span.range.start() - base)) };
        loop {
            // `target` lies in the mirror, which `F` translates (checked at
            // construction), and CPU frames are 4 KiB-aligned.
            match w.map_checked(self.space.phys(), self.alloc, target, pa, writable) {
                Ok((entries, huge)) => return Ok((target, entries, huge)),
                // The CPU maps these pages in smaller pieces now: the old
                // huge entry goes (device flushed), then map again.
                Err(MapError::HugeInTheWay(huge)) => {
                    self.clear_range(w, huge, Event::Clear);
                }
                Err(MapError::Failed(e)) => return Err(self.map_failed(w, target, e)),
            }
        }
    }

    /// After mapping `target` failed with `e`: returns the directories the
    /// failed descent left empty, by the same rule as everywhere (unlink,
    /// flush, free); gives back `e`.
    fn map_failed(&self, w: &mut TableWriter<F>, target: VaRange, e: Error) -> Error {
        self.clear_range(w, target, Event::Clear);
        e
    }
}

/// The visitor of one attempt's walk: maps each usable CPU entry into the
/// device table until a missing run has begun and ended.
struct MapVisitor<
    'a,
    'm,
    's,
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
    L: RawLock,
> {
    mirror: &'m Mirror<'s, S, D, A, F, L>,
    w: &'a mut TableWriter<F>,
    region: Region,
    write: bool,
    running: &'a Running,
    mapped: &'a mut Mapped,
    /// The missing run found so far.
    run: Option<VaRange>,
    failed: Option<Error>,
}

impl<S, D, A, F, L> Visitor for MapVisitor<'_, '_, '_, S, D, A, F, L>
where
    S: AddressSpace + Sync,
    D: DeviceOps,
    A: FrameAllocator + Sync,
    F: DeviceFormat,
    L: RawLock,
{
    type Break = ();

    fn visit(&mut self, span: Span, view: PteView) -> ControlFlow<()> {
        match classify(view, self.mirror.config.owner) {
            Class::Valid { frame, write: writable } if writable || !self.write => {
                if self.run.is_some() {
                    return ControlFlow::Break(());
                }
                match self.mirror.map_span(self.w, span, frame, writable, self.region, self.running) {
                    Ok((target, entries, huge)) => {
                        self.mapped.add(target, target.pages(CpuGeometry::<S>::PAGE_SHIFT), entries, huge);
                        ControlFlow::Continue(())
                    }
                    Err(e) => {
                        self.failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            }
            Class::Error => {
                self.failed = Some(Error::Fault);
                ControlFlow::Break(())
            }
            // Not present, or read-only for a write: the handler's job.
            _ => {
                self.run = Some(self.run.map_or(span.range, |r| r.hull(&span.range)));
                ControlFlow::Continue(())
            }
        }
    }

    /// The per-page hot path: a present user page the fault may use goes
    /// straight into the device's leaf table ([`TableWriter::map_page`]);
    /// anything else takes [`visit`](Self::visit), as every entry would by
    /// default. (Every mirror test over 4 KiB pages runs this path, checked
    /// against the model kernel's oracle; entries of other kinds run
    /// `visit`.)
    #[inline]
    fn visit_pages<C: PteFormat>(&mut self, va: u64, run: PageRun<'_>, allowed: LeafFlags) -> ControlFlow<()> {
        let shift = CpuGeometry::<S>::PAGE_SHIFT;
        let user = allowed.contains(LeafFlags::USER);
        let dir_writable = allowed.contains(LeafFlags::WRITE);
        let (phys, alloc) = (self.mirror.space.phys(), self.mirror.alloc);
        let mut page = va;
        let mut fast = (0u64, page);
        for raw in run.iter() {
            let usable = match C::user_page(raw) {
                Some((frame, writable)) if user && self.run.is_none() => {
                    let writable = writable && dir_writable;
                    (writable || !self.write).then_some((frame, writable))
                }
                _ => None,
            };
            let done = match usable.map(|(frame, writable)| self.w.map_page(phys, alloc, page, frame, writable)) {
                Some(Ok(())) => true,
                Some(Err(MapError::Failed(e))) => {
                    self.mapped.add_pages(fast.1, fast.0, shift);
                    let target = VaRange::from_inclusive(page, page + ((1 << shift) - 1));
                    self.failed = Some(self.mirror.map_failed(self.w, target, e));
                    return ControlFlow::Break(());
                }
                // A huge entry in the way, or not usable: the general path.
                Some(Err(MapError::HugeInTheWay(_))) | None => false,
            };
            if done {
                fast.0 += 1;
            } else {
                self.mapped.add_pages(fast.1, fast.0, shift);
                // Wraps only past the top page, where no page follows.
                fast = (0, page.wrapping_add(1 << shift));
                let range = VaRange::from_inclusive(page, page + ((1 << shift) - 1));
                // Decoded again from the same raw value: no second load.
                self.visit(Span { range, level: 0, shift }, restrict_view(C::decode(raw, 0), allowed))?;
            }
            page = page.wrapping_add(1 << shift);
        }
        self.mapped.add_pages(fast.1, fast.0, shift);
        ControlFlow::Continue(())
    }
}

impl Mapped {
    /// Records `target` (`pages` pages), mapped with `entries` entries of
    /// which `huge` huge.
    #[inline]
    fn add(&mut self, target: VaRange, pages: u64, entries: u64, huge: u64) {
        self.range = Some(self.range.map_or(target, |m| m.hull(&target)));
        self.pages += pages;
        self.entries += entries;
        self.huge += huge;
    }

    /// Records `n` 4 KiB-sized pages mapped one entry each from `first` on.
    #[inline]
    fn add_pages(&mut self, first: u64, n: u64, shift: u32) {
        if n > 0 {
            self.add(VaRange::from_inclusive(first, first + ((n << shift) - 1)), n, n, 0);
        }
    }
}
