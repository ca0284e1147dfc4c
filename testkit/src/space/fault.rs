//! The fault handler (what a CPU page fault or hmm-core's `handle_fault`
//! does) and CPU data accesses built on it.
//!
//! A fault runs under the mmap read lock. Each page is handled in a loop of
//! small steps, each under the page-table lock: populate an empty entry,
//! upgrade a read-only entry in place, split a 2 MiB transparent huge page,
//! or — outside the page-table lock, inside an invalidation — replace a
//! read-only entry by a private copy (copy-on-write). After every step the
//! loop looks again, so races with other faulting threads only cost a retry.

use super::region::{Kind, Vma};
use super::table::{self, leaf_flags, leaf_raw, order_level, order_size};
use super::{ModelReadGuard, ModelSpace, Pt, Vm};
use crate::oracle::{Backing, OracleLeaf, OracleSpecial};
use crate::phys::{HUGE_2M, PAGE};
use hmm_core::arch::PteFormat;
use hmm_core::{AddressSpace, Error, Event, FrameAllocator, RegionFlags, Result, VaRange};

/// What one step of a page fault achieved.
enum Step {
    /// The page is mapped as asked; the leaf ends before this address.
    Done(u64),
    /// Something changed; look again.
    Again,
    /// The read-only leaf at (va, leaf) needs a private copy.
    Cow(u64, OracleLeaf),
    /// The software entry at (va, entry) must be replaced by a page.
    Resolve(u64, OracleSpecial),
}

/// A bound on retries of one page, so a model bug shows as a panic, not a
/// hang.
const MAX_STEPS: usize = 10_000;

impl<F: PteFormat> ModelSpace<F> {
    /// Faults in every page of `range` (`cpu`: a CPU access, which may touch
    /// IO regions and reports a write to a read-only region as `Perm`).
    pub(crate) fn fault_range(&self, vm: &Vm, range: VaRange, write: bool, cpu: bool) -> Result<()> {
        let mut va = range.start();
        loop {
            let next = self.fault_page(vm, va, write, cpu)?;
            if next > range.last() || next == 0 {
                return Ok(());
            }
            va = next;
        }
    }

    /// Faults in the page at `va`; returns the end of the leaf now mapping it.
    fn fault_page(&self, vm: &Vm, va: u64, write: bool, cpu: bool) -> Result<u64> {
        let v = vm.regions.at(va).ok_or(Error::Fault)?;
        if !v.flags.contains(RegionFlags::READ) {
            return Err(Error::Fault);
        }
        if write && !v.flags.contains(RegionFlags::WRITE) {
            return Err(if cpu { Error::Perm } else { Error::Fault });
        }
        if matches!(v.kind, Kind::Io(..)) && !cpu {
            return Err(Error::Fault);
        }
        for _ in 0..MAX_STEPS {
            let step = {
                let mut pt = self.pt_lock();
                self.fault_step(&mut pt, v, va, write)?
            };
            match step {
                Step::Done(end) => return Ok(end),
                Step::Again => {}
                Step::Cow(at, leaf) => self.cow(v, va, at, leaf)?,
                Step::Resolve(at, sp) => self.resolve(v, at, sp)?,
            }
        }
        panic!("model: fault at {va:#x} did not settle");
    }

    fn fault_step(&self, pt: &mut Pt, v: &Vma, va: u64, write: bool) -> Result<Step> {
        if let Some((at, sp)) = pt.oracle.special_at(va) {
            return Ok(Step::Resolve(at, sp));
        }
        let Some((at, leaf)) = pt.oracle.leaf_at(va) else {
            self.populate(pt, v, va, write)?;
            return Ok(Step::Again);
        };
        let end = at.wrapping_add(order_size(leaf.order));
        if leaf.prot_none {
            return Err(Error::Fault);
        }
        if !write || leaf.write {
            return Ok(Step::Done(end));
        }
        // A write to a read-only leaf of a writable region.
        let exec = v.flags.contains(RegionFlags::EXEC);
        match leaf.backing {
            Backing::Anon if self.machine.exclusive(leaf.frame, leaf.order) => {
                self.upgrade(pt, at, leaf, exec);
                Ok(Step::Done(end))
            }
            Backing::Object | Backing::Io if !v.is_private() => {
                self.upgrade(pt, at, leaf, exec);
                Ok(Step::Done(end))
            }
            Backing::Anon if leaf.order == 9 && matches!(v.kind, Kind::Thp) => {
                // Shared transparent huge page: split, then copy 4 KiB.
                let t = self.machine.alloc.alloc_frame().ok_or(Error::NoMemory)?;
                self.split(pt, at, t);
                Ok(Step::Again)
            }
            _ => Ok(Step::Cow(at, leaf)),
        }
    }

    /// Makes the read-only leaf at `at` writable in place (no invalidation:
    /// nobody can hold more permission than the entry gave).
    fn upgrade(&self, pt: &mut Pt, at: u64, leaf: OracleLeaf, exec: bool) {
        let level = order_level::<F>(leaf.order);
        let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, level);
        s.store(self.phys_ref(), leaf_raw::<F>(leaf.frame, level, leaf_flags(true, exec), false));
        pt.oracle.get_mut(at).expect("leaf in the oracle").write = true;
    }

    /// Replaces the 2 MiB leaf at `at` by a table of 512 4 KiB leaves of the
    /// same frames and flags, built in the fresh frame `t`. Translations do
    /// not change, so nothing is invalidated.
    pub(crate) fn split(&self, pt: &mut Pt, at: u64, t: u64) {
        let phys = self.phys_ref();
        let leaf = pt.oracle.remove(at).expect("split of an unknown leaf");
        assert_eq!(leaf.order, 9, "only 2 MiB leaves are split");
        let s = table::leaf_slot::<F>(phys, self.root, at, 1);
        phys.zero(t, PAGE);
        table::fill_split::<F>(phys, t, s.raw);
        s.store(phys, table::dir_raw::<F>(t, 1));
        for i in 0..512u64 {
            let sub = OracleLeaf { frame: leaf.frame + i * PAGE, order: 0, ..leaf };
            pt.oracle.insert(at + i * PAGE, sub);
        }
        if leaf.backing == Backing::Anon {
            self.machine.split(leaf.frame, 9);
        }
    }

    /// Copy-on-write of the read-only leaf `leaf` at `at` (covering `va`):
    /// a new private folio of the same order, bracketed by a
    /// `ProtectionPage` invalidation of the leaf.
    fn cow(&self, v: &Vma, va: u64, at: u64, leaf: OracleLeaf) -> Result<()> {
        let size = order_size(leaf.order);
        let new = self.machine.alloc_folio(leaf.order)?;
        let inv = self.start_invalidation(Self::range(at, size), Event::ProtectionPage);
        {
            let mut pt = self.pt_lock();
            if pt.oracle.leaf_at(va) == Some((at, leaf)) {
                let phys = self.phys_ref();
                if leaf.backing == Backing::Zero {
                    phys.zero(new, size);
                } else {
                    phys.copy(new, leaf.frame, size);
                }
                let level = order_level::<F>(leaf.order);
                let s = table::leaf_slot::<F>(phys, self.root, at, level);
                let exec = v.flags.contains(RegionFlags::EXEC);
                s.store(phys, leaf_raw::<F>(new, level, leaf_flags(true, exec), false));
                pt.oracle.remove(at);
                pt.oracle.insert(
                    at,
                    OracleLeaf {
                        frame: new,
                        order: leaf.order,
                        write: true,
                        prot_none: false,
                        zero: false,
                        backing: Backing::Anon,
                    },
                );
                self.flush_tlb();
                self.machine.map_new(new, leaf.order);
                if leaf.backing == Backing::Anon {
                    self.machine.put(leaf.frame, leaf.order);
                }
            } else {
                // Someone else resolved it meanwhile.
                self.machine.discard(new, leaf.order);
            }
        }
        self.end_invalidation(inv);
        Ok(())
    }

    /// Replaces the software entry `sp` at `at` by a fresh zeroed private
    /// folio of the same size (swap-in, end of a migration, migration back
    /// from a device: the model keeps no contents), bracketed by a `Clear`
    /// invalidation of its span, since a device of the entry's owner may
    /// mirror a device-private entry.
    fn resolve(&self, v: &Vma, at: u64, sp: OracleSpecial) -> Result<()> {
        let size = order_size(sp.order);
        let new = self.machine.alloc_folio(sp.order)?;
        let inv = self.start_invalidation(Self::range(at, size), Event::Clear);
        {
            let mut pt = self.pt_lock();
            if pt.oracle.special_at(at) == Some((at, sp)) {
                let phys = self.phys_ref();
                phys.zero(new, size);
                let level = order_level::<F>(sp.order);
                let write = v.flags.contains(RegionFlags::WRITE);
                let exec = v.flags.contains(RegionFlags::EXEC);
                let s = table::leaf_slot::<F>(phys, self.root, at, level);
                s.store(phys, leaf_raw::<F>(new, level, leaf_flags(write, exec), false));
                pt.oracle.remove_special(at);
                pt.oracle.insert(
                    at,
                    OracleLeaf {
                        frame: new,
                        order: sp.order,
                        write,
                        prot_none: false,
                        zero: false,
                        backing: Backing::Anon,
                    },
                );
                self.flush_tlb();
                self.machine.map_new(new, sp.order);
            } else {
                self.machine.discard(new, sp.order);
            }
        }
        self.end_invalidation(inv);
        Ok(())
    }

    /// Maps the empty page at `va` according to the region's kind.
    pub(super) fn populate(&self, pt: &mut Pt, v: &Vma, va: u64, write: bool) -> Result<()> {
        let can_write = v.flags.contains(RegionFlags::WRITE);
        let exec = v.flags.contains(RegionFlags::EXEC);
        let page = va & !(PAGE - 1);
        let anon = |frame, order, write| OracleLeaf {
            frame,
            order,
            write,
            prot_none: false,
            zero: false,
            backing: Backing::Anon,
        };
        match &v.kind {
            Kind::HugeTlb(order) => {
                let at = va & !(order_size(*order) - 1);
                self.install(pt, at, *order, exec, || {
                    let f = self.machine.alloc_folio(*order)?;
                    self.phys_ref().zero(f, order_size(*order));
                    Ok(anon(f, *order, can_write))
                })?;
                Ok(())
            }
            Kind::Thp if self.thp_block_free(v, va) => {
                let at = va & !(HUGE_2M - 1);
                match self.machine.alloc_folio(9) {
                    Ok(f) => {
                        let r = self.install(pt, at, 9, exec, || {
                            self.phys_ref().zero(f, HUGE_2M);
                            Ok(anon(f, 9, can_write))
                        });
                        if r.is_err() {
                            self.machine.discard(f, 9);
                        }
                        r
                    }
                    // No 2 MiB chunk: fall back to a 4 KiB page, as Linux does.
                    Err(_) => self.populate_small_anon(pt, page, write, can_write, exec),
                }
            }
            Kind::Anon | Kind::Thp => self.populate_small_anon(pt, page, write, can_write, exec),
            Kind::Shared(..) | Kind::Mixed(..) | Kind::Io(..) => {
                let (obj, idx) = v.object_page(page).expect("object region");
                let (write, backing) = match v.kind {
                    Kind::Shared(..) => (can_write, Backing::Object),
                    Kind::Mixed(..) => (false, Backing::Object),
                    _ => (can_write, Backing::Io),
                };
                self.install(pt, page, 0, exec, || {
                    let frame = obj.page(idx)?;
                    Ok(OracleLeaf { frame, order: 0, write, prot_none: false, zero: false, backing })
                })
            }
        }
    }

    fn populate_small_anon(&self, pt: &mut Pt, page: u64, write: bool, can_write: bool, exec: bool) -> Result<()> {
        let zero = self.machine.zero;
        let r = self.install(pt, page, 0, exec, || {
            if write {
                let f = self.machine.alloc_folio(0)?;
                self.phys_ref().zero(f, PAGE);
                Ok(OracleLeaf {
                    frame: f,
                    order: 0,
                    write: can_write,
                    prot_none: false,
                    zero: false,
                    backing: Backing::Anon,
                })
            } else {
                Ok(OracleLeaf {
                    frame: zero,
                    order: 0,
                    write: false,
                    prot_none: false,
                    zero: true,
                    backing: Backing::Zero,
                })
            }
        });
        r
    }

    /// Whether the aligned 2 MiB block around `va` lies inside the region
    /// and has nothing mapped (not even an empty page table).
    fn thp_block_free(&self, v: &Vma, va: u64) -> bool {
        let block = va & !(HUGE_2M - 1);
        if block < v.start || block + (HUGE_2M - 1) > v.last {
            return false;
        }
        let s = table::find::<F>(self.phys_ref(), self.root, block, 1);
        s.raw == 0
    }

    /// Installs a new leaf of `order` at `at`: allocates missing tables,
    /// then asks `make` for the leaf (frame allocation), then links and
    /// stores. On any failure nothing is linked and everything allocated
    /// here is freed. Registers new anonymous folios in the frame book.
    pub(crate) fn install(
        &self,
        pt: &mut Pt,
        at: u64,
        order: u32,
        exec: bool,
        make: impl FnOnce() -> Result<OracleLeaf>,
    ) -> Result<()> {
        let leaf = self.install_leaf(pt, at, order, exec, make)?;
        if leaf.backing == Backing::Anon {
            self.machine.map_new(leaf.frame, leaf.order);
        }
        Ok(())
    }

    /// [`install`](Self::install) without registering the frame.
    pub(crate) fn install_leaf(
        &self,
        pt: &mut Pt,
        at: u64,
        order: u32,
        exec: bool,
        make: impl FnOnce() -> Result<OracleLeaf>,
    ) -> Result<OracleLeaf> {
        let level = order_level::<F>(order);
        let alloc = &*self.machine.alloc;
        let prep = table::prepare::<F>(alloc, self.root, at, level)?;
        if !prep.is_clear(level) {
            prep.abort(alloc);
            // A huge leaf or a kept table where this leaf should go.
            return Err(Error::Fault);
        }
        let leaf = match make() {
            Ok(leaf) => leaf,
            Err(e) => {
                prep.abort(alloc);
                return Err(e);
            }
        };
        debug_assert_eq!(leaf.order, order);
        let phys = self.phys_ref();
        let s = prep.link::<F>(phys, at, level);
        s.store(phys, leaf_raw::<F>(leaf.frame, level, leaf_flags(leaf.write, exec), leaf.prot_none));
        pt.oracle.insert(at, leaf);
        Ok(leaf)
    }

    /// Writes `data` at `va` as user-mode code would: faults pages in
    /// (breaking copy-on-write) and stores through the translation.
    /// Errors: [`Error::Fault`] (no region, no read permission, PROT_NONE),
    /// [`Error::Perm`] (read-only region), [`Error::NoMemory`].
    pub fn write_bytes(&self, va: u64, data: &[u8]) -> Result<()> {
        let guard = self.read_lock();
        self.access(&guard, va, data.len(), true, |pa, at, n| self.phys_ref().write_bytes(pa, &data[at..at + n]))
    }

    /// Reads into `buf` from `va` as user-mode code would (faulting pages
    /// in: the zero page for untouched private memory).
    pub fn read_bytes(&self, va: u64, buf: &mut [u8]) -> Result<()> {
        let guard = self.read_lock();
        let phys = self.phys_ref();
        self.access(&guard, va, buf.len(), false, |pa, at, n| phys.read_bytes(pa, &mut buf[at..at + n]))
    }

    fn access(
        &self,
        guard: &ModelReadGuard<'_, F>,
        va: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(u64, usize, usize),
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let at = va.checked_add(done as u64).ok_or(Error::Fault)?;
            let n = ((PAGE - at % PAGE) as usize).min(len - done);
            let page = Self::range(at & !(PAGE - 1), PAGE);
            let mut ok = false;
            for _ in 0..MAX_STEPS {
                self.fault_range(&guard.vm, page, write, true)?;
                // Copy under the page-table lock, so no copy-on-write can
                // swap the frame in the middle.
                let pt = self.pt_lock();
                if let Some(p) = pt.oracle.page(at) {
                    if !p.leaf.prot_none && (!write || p.leaf.write) {
                        copy(p.frame + at % PAGE, done, n);
                        ok = true;
                        break;
                    }
                }
            }
            assert!(ok, "model: access at {at:#x} did not settle");
            done += n;
        }
        Ok(())
    }
}
