//! Kernel-side mutations: map, unmap, clear (zap), protect, fork, release.
//!
//! Each takes the mmap lock for writing, so it excludes faults, CPU accesses
//! and hmm-core's read-side walks. Anything that can fail (allocating the
//! page table a huge-page split needs, the child's tables in fork) is done
//! before the first entry changes, so a failed call leaves the space as it
//! was (fork excepted: like Linux, a failed fork may leave the parent's
//! private pages write-protected, which only costs a later fault).

use super::region::{Kind, RegionKind, Vma};
use super::table::{self, leaf_flags, leaf_raw, order_level, order_size, special_raw, top};
use super::{ModelSpace, Pt, Vm};
use crate::file::SimFile;
use crate::oracle::{Backing, OracleLeaf, OracleSpecial};
use crate::phys::{HUGE_1G, HUGE_2M, PAGE};
use hmm_core::arch::{PteFormat, SpecialEntry};
use hmm_core::{Error, Event, FrameAllocator, RegionFlags, Result, VaRange};

/// `entry` without write permission (entries that carry none unchanged).
fn read_only(entry: SpecialEntry) -> SpecialEntry {
    match entry {
        SpecialEntry::Migration { frame, .. } => SpecialEntry::Migration { frame, write: false },
        SpecialEntry::DevicePrivate { frame, owner, .. } => SpecialEntry::DevicePrivate { frame, owner, write: false },
        SpecialEntry::DeviceExclusive { frame, owner, .. } => {
            SpecialEntry::DeviceExclusive { frame, owner, write: false }
        }
        other => other,
    }
}

/// Permission bits of a mapping request, normalised the same way for every
/// format (no write- or execute-only pages: either implies read, as on
/// x86_64; the model never writes an execute-only leaf).
fn perms(flags: RegionFlags) -> RegionFlags {
    let mut p = flags & (RegionFlags::READ | RegionFlags::WRITE | RegionFlags::EXEC);
    if p.intersects(RegionFlags::WRITE | RegionFlags::EXEC) {
        p |= RegionFlags::READ;
    }
    p
}

impl<F: PteFormat> ModelSpace<F> {
    /// Creates a region of `kind` over `[start, start + len)` with the
    /// permissions in `flags` (READ / WRITE / EXEC; write or exec imply
    /// read; IO and SHARED are set from `kind`, not taken from `flags`).
    /// Mixed and IO maps are populated at once; everything else on fault.
    ///
    /// Errors: the range's validation errors (for `F`'s geometry),
    /// [`Error::OutOfRange`] past the user half ([`Self::USER_END`]), [`Error::Unaligned`] for a hugetlb range not aligned
    /// to its page size or a file offset not page aligned, [`Error::Busy`] if
    /// the range overlaps a region, [`Error::NoMemory`], [`Error::Released`].
    pub fn map(&self, start: u64, len: u64, flags: RegionFlags, kind: RegionKind) -> Result<VaRange> {
        let r = VaRange::new::<F::Geometry>(start, len)?;
        if r.last() >= Self::USER_END {
            return Err(Error::OutOfRange);
        }
        let pages = len / PAGE;
        let alloc = &self.machine.alloc;
        let huge_aligned = |size: u64| start.is_multiple_of(size) && len.is_multiple_of(size);
        let (kind, kind_bits) = match kind {
            RegionKind::PrivateAnon => (Kind::Anon, RegionFlags::empty()),
            RegionKind::Thp => (Kind::Thp, RegionFlags::empty()),
            RegionKind::HugeTlb2M if huge_aligned(HUGE_2M) => (Kind::HugeTlb(9), RegionFlags::empty()),
            RegionKind::HugeTlb1G if huge_aligned(HUGE_1G) => (Kind::HugeTlb(18), RegionFlags::empty()),
            RegionKind::HugeTlb2M | RegionKind::HugeTlb1G => return Err(Error::Unaligned),
            RegionKind::SharedAnon => (Kind::Shared(SimFile::new(alloc, pages), 0), RegionFlags::SHARED),
            RegionKind::SharedFile { file, offset } => {
                if offset % PAGE != 0 {
                    return Err(Error::Unaligned);
                }
                if offset / PAGE + pages > file.pages() {
                    return Err(Error::OutOfRange);
                }
                (Kind::Shared(file, offset / PAGE), RegionFlags::SHARED)
            }
            RegionKind::MixedMap => {
                let obj = SimFile::new(alloc, pages);
                obj.populate()?;
                (Kind::Mixed(obj, 0), RegionFlags::empty())
            }
            RegionKind::Io => {
                let obj = SimFile::new(alloc, pages);
                obj.populate()?;
                (Kind::Io(obj, 0), RegionFlags::IO)
            }
        };
        let mut vm = self.vm_write();
        if vm.released {
            return Err(Error::Released);
        }
        if vm.regions.any_overlap(r) {
            return Err(Error::Busy);
        }
        let vma = Vma { start: r.start(), last: r.last(), flags: perms(flags) | kind_bits, kind };
        let prepopulate = matches!(vma.kind, Kind::Mixed(..) | Kind::Io(..));
        {
            let _pt = self.pt_lock();
            // Tables left empty by earlier unmaps would keep huge leaves out.
            table::prune::<F>(alloc, self.root, top::<F>(), r.start(), r.last());
        }
        vm.regions.insert(vma.clone());
        if prepopulate {
            let mut failed = None;
            {
                let mut pt = self.pt_lock();
                for va in (r.start()..=r.last()).step_by(PAGE as usize) {
                    if let Err(e) = self.populate(&mut pt, &vma, va, false) {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                self.unmap_locked(&mut vm, r)?;
                return Err(e);
            }
        }
        Ok(r)
    }

    /// Unmaps `r` (any part of it may be unmapped already): an `Unmap`
    /// invalidation of `r`, then entries cleared, frames freed, regions cut.
    /// A 2 MiB transparent huge page straddling an end is split first (its
    /// other pages keep their frames and data).
    ///
    /// Errors: [`Error::Unaligned`] if an end falls inside a hugetlb page,
    /// [`Error::NoMemory`] if a split could not get a table (nothing changed).
    pub fn unmap(&self, r: VaRange) -> Result<()> {
        let mut vm = self.vm_write();
        self.unmap_locked(&mut vm, r)
    }

    fn unmap_locked(&self, vm: &mut Vm, r: VaRange) -> Result<()> {
        if !vm.regions.any_overlap(r) {
            return Ok(());
        }
        Self::check_huge_edges(vm, r)?;
        self.zap(vm, r, Event::Unmap)?;
        vm.regions.carve(r);
        // Objects (files, driver pages) of removed regions go here, after
        // their entries are gone.
        drop(vm.regions.remove_in(r));
        Ok(())
    }

    /// Zaps the pages of `r` but keeps the regions (MADV_DONTNEED): a
    /// `Clear` invalidation; private memory reads back as zeros afterwards,
    /// shared memory keeps its data in its object. Errors as for
    /// [`unmap`](Self::unmap).
    pub fn clear(&self, r: VaRange) -> Result<()> {
        let vm = self.vm_write();
        if !vm.regions.any_overlap(r) {
            return Ok(());
        }
        Self::check_huge_edges(&vm, r)?;
        self.zap(&vm, r, Event::Clear)
    }

    /// Changes the permissions of `r` to `flags` (READ / WRITE / EXEC; no
    /// READ means PROT_NONE: entries become `PteView::ProtNone`, keeping
    /// their frames). A `ProtectionVma` invalidation of `r` brackets it.
    /// Private pages become writable only where no copy-on-write is pending.
    ///
    /// Errors: [`Error::Fault`] if part of `r` is not mapped (nothing
    /// changes), [`Error::Unaligned`], [`Error::NoMemory`] as for unmap.
    pub fn protect(&self, r: VaRange, flags: RegionFlags) -> Result<()> {
        let mut vm = self.vm_write();
        if vm.released {
            return Err(Error::Released);
        }
        if !vm.regions.covers(r) {
            return Err(Error::Fault);
        }
        Self::check_huge_edges(&vm, r)?;
        let perms = perms(flags);
        let splits = self.prealloc_splits(&vm, r)?;
        vm.regions.carve(r);
        vm.regions.set_perms_in(r, perms);
        let inv = self.start_invalidation(r, Event::ProtectionVma);
        {
            let mut pt = self.pt_lock();
            for (at, t) in splits {
                self.split(&mut pt, at, t);
            }
            let prot_none = !perms.contains(RegionFlags::READ);
            let exec = perms.contains(RegionFlags::EXEC);
            for (at, leaf) in pt.oracle.leaves_in(r) {
                let v = vm.regions.at(at).expect("leaf inside a region");
                let write = !prot_none && self.leaf_writable(v, &leaf);
                let level = order_level::<F>(leaf.order);
                let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, level);
                s.store(self.phys_ref(), leaf_raw::<F>(leaf.frame, level, leaf_flags(write, exec), prot_none));
                let o = pt.oracle.get_mut(at).expect("leaf in the oracle");
                o.write = write;
                o.prot_none = prot_none;
            }
            if !perms.contains(RegionFlags::WRITE) {
                // Software entries stay, but lose write (as Linux's
                // mprotect does to writable migration / device entries).
                for (at, sp) in pt.oracle.specials_in(r) {
                    self.store_special(&mut pt, at, OracleSpecial { entry: read_only(sp.entry), ..sp });
                }
            }
            self.flush_tlb();
        }
        self.end_invalidation(inv);
        Ok(())
    }

    /// Whether `leaf` may be writable in region `v` (given the region allows
    /// writes): exclusive private memory, shared objects, IO frames.
    fn leaf_writable(&self, v: &Vma, leaf: &OracleLeaf) -> bool {
        v.flags.contains(RegionFlags::WRITE)
            && match leaf.backing {
                Backing::Anon => self.machine.exclusive(leaf.frame, leaf.order),
                Backing::Zero => false,
                Backing::Object => !v.is_private(),
                Backing::Io => true,
            }
    }

    /// A child process: same regions (shared objects shared, private memory
    /// copy-on-write: both sides' entries made read-only, map counts raised,
    /// under a `ProtectionPage` invalidation of each private region that has
    /// pages), same simulated memory and allocator. Shared regions are not
    /// copied entry by entry; the child faults them in from the object.
    ///
    /// Errors: [`Error::NoMemory`] (the half-built child is torn down),
    /// [`Error::Released`].
    pub fn fork(&self) -> Result<ModelSpace<F>> {
        let vm = self.vm_write();
        if vm.released {
            return Err(Error::Released);
        }
        let child = ModelSpace::with_machine(self.machine.clone())?;
        child.vm_write().regions = vm.regions.clone();
        for v in vm.regions.all() {
            if matches!(v.kind, Kind::Shared(..)) {
                continue;
            }
            let r = v.range::<F::Geometry>();
            let has_pages = {
                let pt = self.pt_lock();
                !pt.oracle.leaves_in(r).is_empty() || !pt.oracle.specials_in(r).is_empty()
            };
            if !has_pages {
                continue;
            }
            let inv = v.is_private().then(|| self.start_invalidation(r, Event::ProtectionPage));
            let res = {
                let mut pt = self.pt_lock();
                let mut cpt = child.pt_lock();
                self.copy_leaves(&mut pt, &child, &mut cpt, v)
            };
            if let Some(inv) = inv {
                self.end_invalidation(inv);
            }
            res?;
        }
        Ok(child)
    }

    fn copy_leaves(&self, pt: &mut Pt, child: &ModelSpace<F>, cpt: &mut Pt, v: &Vma) -> Result<()> {
        let exec = v.flags.contains(RegionFlags::EXEC);
        let mut wrote = false;
        for (at, leaf) in pt.oracle.leaves_in(v.range::<F::Geometry>()) {
            let mut copy = leaf;
            if leaf.backing == Backing::Anon {
                if leaf.write {
                    let level = order_level::<F>(leaf.order);
                    let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, level);
                    s.store(self.phys_ref(), leaf_raw::<F>(leaf.frame, level, leaf_flags(false, exec), leaf.prot_none));
                    pt.oracle.get_mut(at).expect("leaf in the oracle").write = false;
                    wrote = true;
                }
                copy.write = false;
            }
            child.install_leaf(cpt, at, leaf.order, exec, || Ok(copy))?;
            if leaf.backing == Backing::Anon {
                self.machine.get(leaf.frame, leaf.order);
            }
        }
        // Software entries are copied, read-only on both sides (like
        // Linux's copy_nonpresent_pte for a copy-on-write mapping).
        for (at, sp) in pt.oracle.specials_in(v.range::<F::Geometry>()) {
            let ro = OracleSpecial { entry: read_only(sp.entry), ..sp };
            if ro != sp {
                self.store_special(pt, at, ro);
                wrote = true;
            }
            child.install_special(cpt, at, ro)?;
        }
        if wrote {
            self.flush_tlb();
        }
        Ok(())
    }

    /// Tears the space down: the hook and `notifiers().release()` (every
    /// notifier gets a `Release` invalidation), then every entry cleared,
    /// every frame and table below the root freed, every region (and so
    /// every object only it referenced) dropped. The root table stays until
    /// the space is dropped (hmm-core may hold `root()`). Idempotent.
    pub fn release(&self) {
        let mut vm = self.vm_write();
        if vm.released {
            return;
        }
        vm.released = true;
        let hook = self.hook.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(hook) = hook {
            hook(Self::user_range(), Event::Release);
        }
        self.notifiers.release();
        {
            let mut pt = self.pt_lock();
            let leaves: Vec<(u64, OracleLeaf)> = pt.oracle.leaves().iter().map(|(&a, &l)| (a, l)).collect();
            for &(at, leaf) in &leaves {
                let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, order_level::<F>(leaf.order));
                s.store(self.phys_ref(), 0);
            }
            let specials: Vec<(u64, OracleSpecial)> = pt.oracle.specials().iter().map(|(&a, &s)| (a, s)).collect();
            for (at, sp) in specials {
                let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, order_level::<F>(sp.order));
                s.store(self.phys_ref(), 0);
            }
            pt.oracle.clear();
            self.flush_tlb();
            for (_, leaf) in leaves {
                if leaf.backing == Backing::Anon {
                    self.machine.put(leaf.frame, leaf.order);
                }
            }
            table::free_all_below::<F>(&self.machine.alloc, self.root, top::<F>());
        }
        drop(vm.regions.take_all());
    }

    /// `Err(Unaligned)` if an end of `r` falls inside a hugetlb page.
    fn check_huge_edges(vm: &Vm, r: VaRange) -> Result<()> {
        for v in vm.regions.overlapping(r) {
            if let Some(h) = v.huge_size() {
                let start_inside = r.start() > v.start && !r.start().is_multiple_of(h);
                let end_inside = r.end().is_some_and(|e| e <= v.last && e % h != 0);
                if start_inside || end_inside {
                    return Err(Error::Unaligned);
                }
            }
        }
        Ok(())
    }

    /// Allocates one table per 2 MiB transparent huge page that straddles an
    /// end of `r` (to split it), or fails with nothing allocated.
    fn prealloc_splits(&self, vm: &Vm, r: VaRange) -> Result<Vec<(u64, u64)>> {
        let mut need = Vec::new();
        {
            let pt = self.pt_lock();
            for va in [r.start(), r.last()] {
                if let Some((at, leaf)) = pt.oracle.leaf_at(va) {
                    let inside = at >= r.start() && at + (order_size(leaf.order) - 1) <= r.last();
                    if leaf.order > 0 && !inside && !need.contains(&at) {
                        let thp = vm.regions.at(at).is_some_and(|v| matches!(v.kind, Kind::Thp));
                        // hugetlb edges were refused by check_huge_edges.
                        assert!(thp && leaf.order == 9, "model: cannot split the leaf at {at:#x}");
                        need.push(at);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(need.len());
        for at in need {
            match self.machine.alloc.alloc_frame() {
                Some(t) => out.push((at, t)),
                None => {
                    for (_, t) in out {
                        // SAFETY: allocated just above, never linked.
                        unsafe { self.machine.alloc.free_frame(t) };
                    }
                    return Err(Error::NoMemory);
                }
            }
        }
        Ok(out)
    }

    /// Clears every entry of `r` under an invalidation of `event`, splitting
    /// straddling transparent huge pages first; frees private frames after
    /// the flush.
    fn zap(&self, vm: &Vm, r: VaRange, event: Event) -> Result<()> {
        let splits = self.prealloc_splits(vm, r)?;
        let inv = self.start_invalidation(r, event);
        {
            let mut pt = self.pt_lock();
            for (at, t) in splits {
                self.split(&mut pt, at, t);
            }
            let leaves = pt.oracle.leaves_in(r);
            for &(at, leaf) in &leaves {
                assert!(at >= r.start() && at + (order_size(leaf.order) - 1) <= r.last(), "zap of a partial leaf");
                let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, order_level::<F>(leaf.order));
                s.store(self.phys_ref(), 0);
                pt.oracle.remove(at);
            }
            for (at, sp) in pt.oracle.specials_in(r) {
                assert!(at >= r.start() && at + (order_size(sp.order) - 1) <= r.last(), "zap of a partial entry");
                let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, order_level::<F>(sp.order));
                s.store(self.phys_ref(), 0);
                pt.oracle.remove_special(at);
            }
            self.flush_tlb();
            for (_, leaf) in leaves {
                if leaf.backing == Backing::Anon {
                    self.machine.put(leaf.frame, leaf.order);
                }
            }
        }
        self.end_invalidation(inv);
        Ok(())
    }
}

impl<F: PteFormat> ModelSpace<F> {
    /// Plants the software entry `entry` (swap, migration, device-private,
    /// device-exclusive, or a kernel-defined one) at `va`, encoded by `F`,
    /// where nothing is mapped yet: as if the page had been swapped out, or
    /// migrated to a device, before anything looked at it. It is a 4 KiB
    /// entry, or in a hugetlb region an entry of the region's page size
    /// (`va` aligned to it). Adding a non-present entry removes no
    /// translation, so nothing is invalidated.
    ///
    /// The model keeps it in the oracle ([`Oracle::specials`](crate::Oracle::specials)):
    /// unmap and clear remove it, protect without WRITE and fork make it
    /// read-only, and a fault on it (CPU access or `handle_fault`) replaces
    /// it, under a `Clear` invalidation of its span, with a fresh zeroed
    /// private page (the model keeps no swap or device memory contents).
    ///
    /// Panics if `F` cannot encode `entry` (a test bug). Errors:
    /// [`Error::Fault`] outside a private region (anonymous, THP, hugetlb,
    /// mixed map), [`Error::Unaligned`] for a hugetlb `va` not aligned to
    /// its page, [`Error::Busy`] if something is mapped there,
    /// [`Error::NoMemory`], [`Error::Released`].
    pub fn set_special(&self, va: u64, entry: SpecialEntry) -> Result<()> {
        let vm = self.vm_write();
        if vm.released {
            return Err(Error::Released);
        }
        let v = vm.regions.at(va).filter(|v| v.is_private()).ok_or(Error::Fault)?;
        let order = match v.kind {
            Kind::HugeTlb(order) => order,
            _ => 0,
        };
        if !va.is_multiple_of(order_size(order)) {
            return Err(Error::Unaligned);
        }
        let mut pt = self.pt_lock();
        if pt.oracle.leaf_at(va).is_some() || pt.oracle.special_at(va).is_some() {
            return Err(Error::Busy);
        }
        self.install_special(&mut pt, va, OracleSpecial { entry, order })
    }

    /// Installs the software entry `sp` at the empty `at` (allocating
    /// tables) and records it.
    pub(crate) fn install_special(&self, pt: &mut Pt, at: u64, sp: OracleSpecial) -> Result<()> {
        let level = order_level::<F>(sp.order);
        let raw = special_raw::<F>(sp.entry, level);
        let alloc = &*self.machine.alloc;
        let prep = table::prepare::<F>(alloc, self.root, at, level)?;
        if !prep.is_clear(level) {
            prep.abort(alloc);
            return Err(Error::Busy);
        }
        let s = prep.link::<F>(self.phys_ref(), at, level);
        s.store(self.phys_ref(), raw);
        pt.oracle.insert_special(at, sp);
        Ok(())
    }

    /// Rewrites the recorded software entry at `at` as `sp`.
    fn store_special(&self, pt: &mut Pt, at: u64, sp: OracleSpecial) {
        let level = order_level::<F>(sp.order);
        let s = table::leaf_slot::<F>(self.phys_ref(), self.root, at, level);
        s.store(self.phys_ref(), special_raw::<F>(sp.entry, level));
        *pt.oracle.special_mut(at).expect("software entry in the oracle") = sp;
    }
}
