//! An in-memory "file": a fixed number of 4 KiB pages, allocated on first use
//! and shared by every region that maps it.
//!
//! Why: shared mappings (shared anonymous memory, shared file mappings) and
//! driver-owned pages (mixed maps, IO maps) are backed by frames that belong
//! to an object, not to the page tables that map them. Writes through any
//! mapping land in the object's frames, so they are visible to every mapper
//! and to the test through [`SimFile::read`]. The frames go back to the
//! allocator when the last `Arc<SimFile>` (held by regions and by the test)
//! is dropped.

use crate::alloc::CountingAllocator;
use crate::phys::PAGE;
use hmm_core::{Error, FrameAllocator, Result};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A page cache of `pages` 4 KiB pages.
pub struct SimFile {
    alloc: Arc<CountingAllocator>,
    pages: u64,
    // Page index -> frame; frames are zeroed before they are inserted.
    frames: Mutex<BTreeMap<u64, u64>>,
}

impl core::fmt::Debug for SimFile {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimFile").field("pages", &self.pages).field("resident", &self.lock().len()).finish()
    }
}

impl SimFile {
    /// An empty (all zero) file of `pages` pages; no frame is allocated yet.
    pub fn new(alloc: &Arc<CountingAllocator>, pages: u64) -> Arc<Self> {
        Arc::new(Self { alloc: alloc.clone(), pages, frames: Mutex::new(BTreeMap::new()) })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.pages * PAGE
    }

    /// Whether the file has no pages.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Frames currently allocated.
    pub fn resident(&self) -> usize {
        self.lock().len()
    }

    /// The frame of page `index`, allocating (and zeroing) it if needed.
    /// Errors: [`Error::Fault`] past the end of the file (a SIGBUS),
    /// [`Error::NoMemory`].
    pub fn page(&self, index: u64) -> Result<u64> {
        if index >= self.pages {
            return Err(Error::Fault);
        }
        let mut frames = self.lock();
        if let Some(&pa) = frames.get(&index) {
            return Ok(pa);
        }
        let pa = self.alloc.alloc_frame().ok_or(Error::NoMemory)?;
        self.alloc.phys().zero(pa, PAGE);
        frames.insert(index, pa);
        Ok(pa)
    }

    /// The frame of page `index` if allocated.
    pub fn resident_page(&self, index: u64) -> Option<u64> {
        self.lock().get(&index).copied()
    }

    /// Allocates every page (for objects a driver pre-populates).
    pub fn populate(&self) -> Result<()> {
        for i in 0..self.pages {
            self.page(i)?;
        }
        Ok(())
    }

    /// Writes `data` at byte `offset` (allocating pages as needed), as a
    /// `write(2)` to the file would.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.access(offset, data.len(), |pa, at, n| self.alloc.phys().write_bytes(pa, &data[at..at + n]))
    }

    /// Reads into `buf` from byte `offset`; holes read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or(Error::Fault)?;
        if end > self.len() {
            return Err(Error::Fault);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = ((PAGE - at % PAGE) as usize).min(buf.len() - done);
            match self.resident_page(at / PAGE) {
                Some(pa) => self.alloc.phys().read_bytes(pa + at % PAGE, &mut buf[done..done + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn access(&self, offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize)) -> Result<()> {
        let end = offset.checked_add(len as u64).ok_or(Error::Fault)?;
        if end > self.len() {
            return Err(Error::Fault);
        }
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let n = ((PAGE - at % PAGE) as usize).min(len - done);
            let pa = self.page(at / PAGE)?;
            f(pa + at % PAGE, done, n);
            done += n;
        }
        Ok(())
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let frames = core::mem::take(self.frames.get_mut().unwrap_or_else(PoisonError::into_inner));
        for (_, pa) in frames {
            // SAFETY: each frame came from `self.alloc` once; the last
            // reference to the file is going away, and regions (which map
            // the frames) hold references, so no mapping of it remains.
            unsafe { self.alloc.free_frame(pa) };
        }
    }
}
