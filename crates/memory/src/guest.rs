//! Guest memory: regions of guest-physical address space mapped into this process.
//!
//! Guest RAM is usually written by someone outside Rust's view (the hypervisor in another process, or a
//! vCPU thread), so this module never hands out references into it. Reads and writes go through copies;
//! the scanning code gets short-lived byte slices from [`Region::live`] whose values may change under
//! it, and it only ever uses them as change hints (see that function).

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::{fmt, io};

use crate::error::{Error, Result};
use crate::num::{to_u64, to_usize};

/// Size of a guest page, the unit of tracking, checksums and images.
pub const PAGE_SIZE: usize = 4096;
pub(crate) const PAGE: u64 = to_u64(PAGE_SIZE);

/// One mmap'ed host range, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range, not a Rust value; every access to it goes through raw-pointer
// copies or the documented scanning slices, which are valid from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: shared access only hands out raw pointers and copies.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(len: usize, flags: libc::c_int, fd: libc::c_int, offset: u64) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
        // SAFETY: asks the kernel for a new mapping at an address of its choosing; no existing memory is
        // touched, and the result is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr and len are exactly what mmap returned; the mapping is owned by this value and
        // nothing borrowed from it outlives the GuestMemory that owns it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// What backs a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory of this process (in-process VMMs, tests, benches).
    Anonymous,
    /// A shared mapping of a file, e.g. QEMU's `memory-backend-file,share=on` RAM file.
    File {
        /// Offset of the region in the file.
        offset: u64,
    },
}

/// One contiguous range of guest-physical memory and its host mapping.
pub struct Region {
    gpa: u64,
    len: u64,
    first_page: u64,
    backing: Backing,
    map: Mapping,
    /// The file of a file-backed region (our own descriptor), to tell its holes from its data.
    file: Option<File>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("len", &format_args!("{:#x}", self.len))
            .field("first_page", &self.first_page)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Region {
    /// Guest-physical base address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the region is empty (never true for a built [`GuestMemory`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Index of this region's first page in the memory's page numbering (regions in address order).
    pub fn first_page(&self) -> u64 {
        self.first_page
    }
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }
    /// What backs the region.
    pub fn backing(&self) -> Backing {
        self.backing
    }
    pub(crate) fn page_range(&self) -> Range<u64> {
        self.first_page..self.first_page + self.pages()
    }

    /// Host pointer to page `page` (global index, inside this region).
    pub(crate) fn host(&self, page: u64) -> *mut u8 {
        debug_assert!(self.page_range().contains(&page));
        let off = to_usize((page - self.first_page) * PAGE);
        // SAFETY: page is inside this region, so the offset is inside the mapping.
        unsafe { self.map.ptr.as_ptr().add(off) }
    }

    /// The current bytes of pages `pages` (inside this region), for scanning only.
    ///
    /// The bytes may be changed while the slice lives, by another process or a vCPU thread: callers use
    /// them only to decide whether to copy a page (zero test, change hash), never as saved content, and
    /// hash what they copied. Each byte is read at most once per use, so a concurrent change can only make
    /// a hint stale, which the next round catches.
    pub(crate) fn live(&self, pages: Range<u64>) -> &[u8] {
        let len = to_usize((pages.end - pages.start) * PAGE);
        // SAFETY: the range is inside the mapping (checked by the callers' page ranges, asserted in host),
        // which lives as long as &self. The mapping is readable. See above for why concurrent writers are
        // tolerated: the bytes are treated as a hint, exactly as every VMM that scans live guest RAM does.
        unsafe { std::slice::from_raw_parts(self.host(pages.start), len) }
    }

    /// Marks which pages of `pages` (inside this region) may hold data: on return `map[i]` (one byte
    /// per page) is 1 for
    /// page `pages.start + i` unless that page is a hole of the region's file, hence zero.
    ///
    /// Holes must not be read: reading one through a shared mapping makes the kernel allocate it, so a
    /// scan would fill a sparse RAM file (a guest's is mostly holes) and spend its time allocating.
    /// mincore() says cheaply which pages are in the page cache; a page that is not may still be data
    /// (on swap or disk), so each such run is confirmed with SEEK_DATA. Anonymous memory, and any
    /// failure, gives all ones: reading is always correct.
    pub(crate) fn data_map(&self, pages: Range<u64>, map: &mut [u8]) {
        let n = to_usize(pages.end - pages.start);
        assert_eq!(map.len(), n, "one map byte per page");
        map.fill(1);
        let (Some(file), Backing::File { offset }) = (&self.file, self.backing) else {
            return;
        };
        // SAFETY: the address range is inside our live mapping (page aligned), and `map` holds exactly
        // one byte per page of it, which is what mincore writes.
        let r = unsafe { libc::mincore(self.host(pages.start).cast(), n * PAGE_SIZE, map.as_mut_ptr()) };
        if r != 0 {
            map.fill(1);
            return;
        }
        let file_offset = |page: u64| offset + (page - self.first_page) * PAGE;
        let mut i = 0;
        while i < n {
            if map[i] & 1 == 1 {
                map[i] = 1;
                i += 1;
                continue;
            }
            let start = i;
            while i < n && map[i] & 1 == 0 {
                i += 1;
            }
            let Ok(from) = libc::off_t::try_from(file_offset(pages.start + to_u64(start))) else {
                // Beyond any file offset lseek takes: count the pages as data.
                map[start..i].fill(1);
                continue;
            };
            // SAFETY: lseek on a descriptor we own, integer arguments only. It moves the shared file
            // offset, which nothing here uses.
            let data = unsafe { libc::lseek(file.as_raw_fd(), from, libc::SEEK_DATA) };
            let hole = if data >= 0 {
                u64::try_from(data).is_ok_and(|data| data >= file_offset(pages.start + to_u64(i)))
            } else {
                // ENXIO: no data up to the end of the file.
                io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
            };
            map[start..i].fill(u8::from(!hole));
        }
    }
}

/// Guest memory: regions sorted by guest-physical address, with pages numbered 0.. across them.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
    total_pages: u64,
}

/// One region of a RAM file: where it sits in guest-physical space and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRegion {
    /// Guest-physical base address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the file.
    pub file_offset: u64,
}

/// Builds a [`GuestMemory`] region by region.
#[derive(Debug, Default)]
pub struct GuestMemoryBuilder {
    regions: Vec<Region>,
}

fn check_region(gpa: u64, len: u64) -> Result<usize> {
    let bad = |reason| Err(Error::InvalidRegion { gpa, len, reason });
    if len == 0 {
        return bad("length is zero");
    }
    if gpa % PAGE != 0 || len % PAGE != 0 {
        return bad("base and length must be multiples of the 4096-byte page size");
    }
    if gpa.checked_add(len).is_none() {
        return bad("region wraps around the address space");
    }
    usize::try_from(len).or(bad("region larger than the host address space"))
}

impl GuestMemoryBuilder {
    /// Adds a region of fresh anonymous memory (all zero).
    pub fn anonymous(mut self, gpa: u64, len: u64) -> Result<Self> {
        let size = check_region(gpa, len)?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        let map = Mapping::map(size, flags, -1, 0).map_err(|source| Error::Map { gpa, len, source })?;
        self.regions.push(Region {
            gpa,
            len,
            first_page: 0,
            backing: Backing::Anonymous,
            map,
            file: None,
        });
        Ok(self)
    }

    /// Adds a shared mapping of `len` bytes of `file` at `file_offset` (the file must be open for reading
    /// and writing, and long enough: a mapping past the end of a file faults on access).
    pub fn file(mut self, gpa: u64, len: u64, file: &File, file_offset: u64) -> Result<Self> {
        let size = check_region(gpa, len)?;
        if file_offset % PAGE != 0 {
            return Err(Error::InvalidRegion {
                gpa,
                len,
                reason: "file offset is not page aligned",
            });
        }
        let file_len = file
            .metadata()
            .map_err(|source| Error::Map { gpa, len, source })?
            .len();
        if file_offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(Error::InvalidRegion {
                gpa,
                len,
                reason: "region extends past the end of the file",
            });
        }
        let map = Mapping::map(size, libc::MAP_SHARED, file.as_raw_fd(), file_offset)
            .map_err(|source| Error::Map { gpa, len, source })?;
        let file = file
            .try_clone()
            .map_err(|source| Error::Map { gpa, len, source })?;
        self.regions.push(Region {
            gpa,
            len,
            first_page: 0,
            backing: Backing::File { offset: file_offset },
            map,
            file: Some(file),
        });
        Ok(self)
    }

    /// Sorts the regions by address, numbers their pages and checks that none overlap.
    pub fn build(mut self) -> Result<GuestMemory> {
        if self.regions.is_empty() {
            return Err(Error::InvalidRegion {
                gpa: 0,
                len: 0,
                reason: "guest memory has no regions",
            });
        }
        self.regions.sort_by_key(|r| r.gpa);
        let mut next_page = 0;
        for i in 0..self.regions.len() {
            if i > 0 && self.regions[i - 1].gpa + self.regions[i - 1].len > self.regions[i].gpa {
                return Err(Error::OverlappingRegions {
                    gpa: self.regions[i].gpa,
                });
            }
            self.regions[i].first_page = next_page;
            next_page += self.regions[i].pages();
        }
        Ok(GuestMemory {
            regions: self.regions,
            total_pages: next_page,
        })
    }
}

impl GuestMemory {
    /// Starts building a guest memory.
    pub fn builder() -> GuestMemoryBuilder {
        GuestMemoryBuilder::default()
    }

    /// One region of fresh anonymous memory at guest address 0.
    pub fn anonymous(len: u64) -> Result<Self> {
        Self::builder().anonymous(0, len)?.build()
    }

    /// Maps regions of a RAM file shared with the hypervisor (e.g. QEMU's
    /// `memory-backend-file,mem-path=/dev/shm/NAME,share=on`). The file must exist and be long enough.
    pub fn from_ram_file(path: &Path, regions: &[FileRegion]) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open RAM file", path, e))?;
        regions
            .iter()
            .try_fold(Self::builder(), |b, r| b.file(r.gpa, r.len, &file, r.file_offset))?
            .build()
    }

    /// The regions, in guest-physical address order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total number of pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// Total size in bytes.
    pub fn size(&self) -> u64 {
        self.total_pages * PAGE
    }

    /// The region holding page `page` (global index < total_pages).
    pub(crate) fn region_of_page(&self, page: u64) -> &Region {
        let i = self.regions.partition_point(|r| r.first_page + r.pages() <= page);
        &self.regions[i]
    }

    /// Splits a page range into its parts in each region.
    pub(crate) fn segments(&self, pages: Range<u64>) -> impl Iterator<Item = (&Region, Range<u64>)> {
        self.regions.iter().filter_map(move |r| {
            let range = r.page_range();
            let start = range.start.max(pages.start);
            let end = range.end.min(pages.end);
            (start < end).then_some((r, start..end))
        })
    }

    /// Guest-physical address of page `page`.
    pub fn gpa_of_page(&self, page: u64) -> u64 {
        let r = self.region_of_page(page);
        r.gpa + (page - r.first_page) * PAGE
    }

    fn locate(&self, gpa: u64, len: usize) -> Result<*mut u8> {
        let len64 = to_u64(len);
        let region = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len64).is_some_and(|end| end <= r.gpa + r.len))
            .ok_or(Error::OutOfBounds { gpa, len: len64 })?;
        // SAFETY: [gpa, gpa+len) lies inside the region, so the offset stays inside its mapping.
        Ok(unsafe { region.map.ptr.as_ptr().add(to_usize(gpa - region.gpa)) })
    }

    /// Copies guest memory at `gpa` into `buf` (the range must lie inside one region).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let src = self.locate(gpa, buf.len())?;
        // SAFETY: src..src+len is inside a live mapping (locate); buf is a distinct Rust buffer, so the
        // ranges cannot overlap. Concurrent guest writes can only make the copy torn, never unsound for buf.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` (the range must lie inside one region).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let dst = self.locate(gpa, data.len())?;
        // SAFETY: dst..dst+len is inside a live writable mapping (locate); data is a distinct Rust
        // buffer. No Rust reference covers guest memory for longer than a scan, see the module docs.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }
}
