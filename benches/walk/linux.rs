//! Linux baselines over real populated pages of this process:
//! `pread(/proc/self/pagemap)` and the `PAGEMAP_SCAN` ioctl (Linux 6.7+).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
/// pagemap entries per `pread` (512 KiB of output per call).
const CHUNK: usize = 1 << 16;
/// pagemap entry bits.
pub const PM_PRESENT: u64 = 1 << 63;
const PM_PFN: u64 = (1 << 55) - 1;

/// `PAGE_IS_*` categories of `PAGEMAP_SCAN` (include/uapi/linux/fs.h).
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// THP or hugetlb backed.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// `struct page_region` of include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PageRegion {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `PAGE_IS_*` bits of the run (masked by `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg` of include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

/// An anonymous mapping whose every page is populated (written once).
pub struct Populated {
    addr: *mut u8,
    map_len: usize,
    /// First byte of the populated range (2 MiB-aligned for a huge mapping).
    pub start: usize,
    /// Bytes populated.
    pub len: usize,
}

impl Populated {
    /// `len` bytes of anonymous memory, THP asked for (`MADV_HUGEPAGE`, 2 MiB
    /// aligned) or refused (`MADV_NOHUGEPAGE`), then populated.
    pub fn new(len: usize, huge: bool) -> io::Result<Self> {
        let map_len = len + if huge { HUGE } else { 0 };
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let addr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = if huge { (addr as usize).next_multiple_of(HUGE) } else { addr as usize };
        let this = Self { addr: addr.cast(), map_len, start, len };
        let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        this.madvise(advice)?;
        if this.madvise(libc::MADV_POPULATE_WRITE).is_err() {
            this.touch();
        }
        Ok(this)
    }

    fn madvise(&self, advice: libc::c_int) -> io::Result<()> {
        // SAFETY: the range lies inside our own mapping.
        match unsafe { libc::madvise(self.start as *mut libc::c_void, self.len, advice) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// Writes one byte per page (fallback for kernels without MADV_POPULATE_WRITE).
    fn touch(&self) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: inside our own read-write mapping.
            unsafe { core::ptr::write_volatile((self.start + off) as *mut u8, 1) };
        }
    }

    /// `AnonHugePages` of the populated range's VMA in /proc/self/smaps, in KiB.
    pub fn anon_huge_kib(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        // madvise split the VMA at `start`: its block starts there.
        let header = format!("{:x}-", self.start);
        let block = smaps.split('\n').skip_while(|l| !l.starts_with(&header)).skip(1);
        block
            .take_while(|l| l.split_whitespace().next().is_some_and(|t| t.ends_with(':')))
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Populated {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created, once.
        unsafe { libc::munmap(self.addr.cast(), self.map_len) };
    }
}

/// An open `/proc/self/pagemap`.
pub struct Pagemap(File);

impl Pagemap {
    /// Opens this process's pagemap.
    pub fn open() -> io::Result<Self> {
        File::open("/proc/self/pagemap").map(Self)
    }

    /// Reads the entries of the `out.len()` pages from `va`, in chunks of
    /// [`CHUNK`] entries.
    pub fn read(&self, va: usize, out: &mut [u64]) {
        let mut pos = (va / PAGE * 8) as libc::off_t;
        for chunk in out.chunks_mut(CHUNK) {
            let bytes = chunk.len() * 8;
            // SAFETY: `chunk` is valid for writes of `bytes` bytes.
            let n = unsafe { libc::pread(self.0.as_raw_fd(), chunk.as_mut_ptr().cast(), bytes, pos) };
            assert_eq!(n, bytes as isize, "short pagemap read");
            pos += bytes as libc::off_t;
        }
    }

    /// `PAGEMAP_SCAN` of `[va, va + len)` for present pages, reporting
    /// PRESENT and HUGE runs into `vec`. Returns the regions filled.
    pub fn scan(&self, va: usize, len: usize, vec: &mut [PageRegion]) -> io::Result<usize> {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            start: va as u64,
            end: (va + len) as u64,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            category_mask: PAGE_IS_PRESENT,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_HUGE,
            ..PmScanArg::default()
        };
        // SAFETY: `arg` is a valid `pm_scan_arg` whose `vec` points to
        // `vec_len` writable `page_region`s that outlive the call.
        let n = unsafe { libc::ioctl(self.0.as_raw_fd(), PAGEMAP_SCAN as libc::Ioctl, &mut arg) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if arg.walk_end != arg.end {
            return Err(io::Error::other("PAGEMAP_SCAN stopped early"));
        }
        Ok(n as usize)
    }
}

/// What a pagemap read returned, checked once (untimed).
#[derive(Debug)]
pub struct PagemapCheck {
    /// Entries with the present bit.
    pub present: usize,
    /// Entries with a non-zero PFN (zero without CAP_SYS_ADMIN).
    pub nonzero_pfn: usize,
    /// 2 MiB blocks whose 512 PFNs are consecutive from a 2 MiB-aligned frame.
    pub contiguous_2m: usize,
}

/// Checks the entries of a pagemap read.
pub fn check(entries: &[u64]) -> PagemapCheck {
    PagemapCheck {
        present: entries.iter().filter(|&&e| e & PM_PRESENT != 0).count(),
        nonzero_pfn: entries.iter().filter(|&&e| e & PM_PFN != 0).count(),
        contiguous_2m: entries.chunks_exact(512).filter(|c| is_huge_run(c)).count(),
    }
}

/// Whether 512 entries map consecutive frames from a 2 MiB-aligned one (as a
/// THP does).
fn is_huge_run(block: &[u64]) -> bool {
    let first = block[0] & PM_PFN;
    first != 0 && first.is_multiple_of(512) && block.iter().zip(first..).all(|(&e, pfn)| e & PM_PFN == pfn)
}
