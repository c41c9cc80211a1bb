//! userfaultfd write-protect in asynchronous mode, read back with PAGEMAP_SCAN.
//!
//! The kernel write-protects the guest's pages; in asynchronous mode (`UFFD_FEATURE_WP_ASYNC`) a write
//! to a protected page is resolved by the kernel itself, which only records that the page was written.
//! `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` then returns the written pages and protects them again in
//! one pass over the page tables: no fault ever reaches user space, no page is read.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::guest::{GuestMemory, Region, PAGE};
use crate::num::to_u64;
use crate::table::{DirtySet, PageTable};

use super::DirtySource;

// From <linux/userfaultfd.h> and <linux/fs.h> (stable kernel ABI).
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}
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

/// `_IOC(dir, type, nr, size)` as the kernel's asm-generic ioctl.h builds it.
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((dir << 30) | (to_u64(size) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;
const UFFDIO_API: libc::c_ulong = ioc(READ_WRITE, 0xAA, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(READ_WRITE, 0xAA, 0x00, size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: libc::c_ulong = ioc(READ, 0xAA, 0x01, size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: libc::c_ulong = ioc(READ_WRITE, 0xAA, 0x06, size_of::<UffdioWriteprotect>());
const PAGEMAP_SCAN: libc::c_ulong = ioc(READ_WRITE, b'f', 16, size_of::<PmScanArg>());

/// Written-page ranges fetched per PAGEMAP_SCAN call.
const SCAN_BATCH: usize = 1024;
const NAME: &str = "uffd-write-protect";

fn fail(op: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::DirtyTracking {
        source_name: NAME,
        op,
        source,
    }
}

/// Issues `ioctl(fd, request, arg)`.
///
/// # Safety
/// `request` must be an ioctl whose argument is a `T` (read and/or written by the kernel).
unsafe fn ioctl<T>(fd: &impl AsRawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees that `request` takes a pointer to a T; `arg` is a valid, exclusive T
    // for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a userfaultfd and enables `features` (all of them, or fails).
fn open_uffd(features: u64) -> io::Result<(OwnedFd, u64)> {
    // SAFETY: the userfaultfd syscall takes only flags and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| io::Error::other("userfaultfd returned an out-of-range descriptor"))?;
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a struct uffdio_api.
    unsafe { ioctl(&fd, UFFDIO_API, &mut api) }?;
    Ok((fd, api.features))
}

/// Dirty pages from userfaultfd asynchronous write-protection and `PAGEMAP_SCAN` (Linux ≥ 6.7).
///
/// Sees only writes made through this process's own mappings: use it for in-process VMMs (anonymous
/// memory, or a file this process maps and its vCPU threads write). It cannot see pages that another
/// process (QEMU) writes to a shared RAM file; use [`super::ContentCompare`] there. Costs no memory
/// per page and reads no guest memory: a round's cost is one walk of the page tables.
#[derive(Debug, Default)]
pub struct UffdWriteProtect {
    tracking: Option<Tracking>,
}

#[derive(Debug)]
struct Tracking {
    uffd: OwnedFd,
    pagemap: File,
    primed: bool,
}

impl UffdWriteProtect {
    /// A new source; nothing happens until [`DirtySource::start`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that this kernel offers what the source needs (userfaultfd with asynchronous
    /// write-protect, and PAGEMAP_SCAN); the error says which part is missing.
    pub fn probe() -> Result<()> {
        let (_, offered) = open_uffd(0).map_err(fail("open userfaultfd"))?;
        let needed = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        if offered & needed != needed {
            return Err(Error::DirtyTracking {
                source_name: NAME,
                op: "enable asynchronous write-protect",
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel offers userfaultfd features {offered:#x}"),
                ),
            });
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(fail("open /proc/self/pagemap"))?;
        let mut arg = PmScanArg {
            size: to_u64(size_of::<PmScanArg>()),
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; an empty range with no output vector only
        // checks that the ioctl exists.
        unsafe { ioctl(&pagemap, PAGEMAP_SCAN, &mut arg) }.map_err(fail("use PAGEMAP_SCAN"))?;
        Ok(())
    }
}

fn range(region: &Region) -> UffdioRange {
    UffdioRange {
        start: to_u64(region.host(region.first_page()).addr()),
        len: region.len(),
    }
}

impl Tracking {
    /// Adds the written pages of `region` to `dirty` and write-protects them again.
    fn scan(&self, region: &Region, dirty: &mut DirtySet, out: &mut [PageRegion]) -> Result<()> {
        let UffdioRange { start: base, len } = range(region);
        let mut arg = PmScanArg {
            size: to_u64(size_of::<PmScanArg>()),
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: base,
            end: base + len,
            vec: to_u64(out.as_mut_ptr().expose_provenance()),
            vec_len: to_u64(out.len()),
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        loop {
            // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; its vec/vec_len describe `out`, which is
            // valid and exclusively borrowed for the call; the range is a mapping this process owns and
            // has registered for asynchronous write-protect.
            let filled = unsafe { ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg) }
                .map_err(fail("scan written pages"))?;
            // A successful PAGEMAP_SCAN returns the number of entries it filled (never negative).
            let filled = usize::try_from(filled).unwrap_or_default();
            for r in &out[..filled] {
                let first = region.first_page() + (r.start - base) / PAGE;
                dirty.insert_range(first..first + (r.end - r.start) / PAGE);
            }
            if arg.walk_end >= arg.end {
                return Ok(());
            }
            arg.start = arg.walk_end;
        }
    }

    fn protect_all(&self, mem: &GuestMemory) -> Result<()> {
        for region in mem.regions() {
            let mut wp = UffdioWriteprotect {
                range: range(region),
                mode: UFFDIO_WRITEPROTECT_MODE_WP,
            };
            // SAFETY: UFFDIO_WRITEPROTECT takes a struct uffdio_writeprotect; the range is registered.
            unsafe { ioctl(&self.uffd, UFFDIO_WRITEPROTECT, &mut wp) }
                .map_err(fail("write-protect guest memory"))?;
        }
        Ok(())
    }
}

impl DirtySource for UffdWriteProtect {
    fn name(&self) -> &'static str {
        NAME
    }

    fn start(&mut self, mem: &GuestMemory) -> Result<()> {
        let needed = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let file_backed = mem
            .regions()
            .iter()
            .any(|r| matches!(r.backing(), crate::Backing::File { .. }));
        let features = if file_backed {
            needed | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        } else {
            needed
        };
        let (uffd, _) =
            open_uffd(features).map_err(fail("open userfaultfd with asynchronous write-protect"))?;
        let pagemap = File::open("/proc/self/pagemap").map_err(fail("open /proc/self/pagemap"))?;
        for region in mem.regions() {
            let mut reg = UffdioRegister {
                range: range(region),
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register; the range is a live mapping of ours.
            unsafe { ioctl(&uffd, UFFDIO_REGISTER, &mut reg) }.map_err(fail("register guest memory"))?;
        }
        self.tracking = Some(Tracking {
            uffd,
            pagemap,
            primed: false,
        });
        Ok(())
    }

    fn collect(&mut self, mem: &GuestMemory, _saved: &PageTable) -> Result<DirtySet> {
        let t = self.tracking.as_mut().ok_or_else(|| {
            fail("collect")(io::Error::new(
                io::ErrorKind::NotConnected,
                "tracking was not started",
            ))
        })?;
        if !t.primed {
            // Protect first, then report everything: any write after this is caught.
            t.protect_all(mem)?;
            t.primed = true;
            return Ok(DirtySet::full(mem.total_pages()));
        }
        let mut dirty = DirtySet::empty(mem.total_pages());
        let mut out = vec![PageRegion::default(); SCAN_BATCH];
        for region in mem.regions() {
            t.scan(region, &mut dirty, &mut out)?;
        }
        Ok(dirty)
    }

    fn stop(&mut self, mem: &GuestMemory) -> Result<()> {
        if let Some(t) = self.tracking.take() {
            for region in mem.regions() {
                let mut r = range(region);
                // SAFETY: UFFDIO_UNREGISTER takes a struct uffdio_range; the range was registered.
                unsafe { ioctl(&t.uffd, UFFDIO_UNREGISTER, &mut r) }
                    .map_err(fail("unregister guest memory"))?;
            }
        }
        Ok(())
    }
}
