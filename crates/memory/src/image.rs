//! The at-rest image file: writer (a [`PageSink`]), reader, verify and restore.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::direct::DirectWrites;
use crate::error::{Error, Result};
use crate::format::{Footer, ImageLayout, RegionInfo, FOOTER_LEN, FORMAT_VERSION, IMAGE_MAGIC};
use crate::guest::{GuestMemory, PAGE, PAGE_SIZE};
use crate::num::{to_u64, to_usize};
use crate::par;
use crate::table::{block_hash, is_zero, page_hash, PageState, PageTable, CHUNK_PAGES};
use crate::writeback::{Writeback, WRITEBACK_EVERY};

/// Pages read or written with one system call at most (1 MiB).
const IO_BATCH_PAGES: u64 = 256;

/// Where saved pages go: an image file ([`ImageWriter`]) or a stream ([`crate::StreamWriter`]).
///
/// Called from several threads at once, each with different pages; calls for one page never overlap.
pub trait PageSink: Send + Sync {
    /// The layout the sink was created for.
    fn layout(&self) -> &ImageLayout;
    /// Stores `data` (whole pages) as pages `first_page..`; `checksums` holds each page's checksum.
    fn write_pages(&self, first_page: u64, data: &[u8], checksums: &[u64]) -> Result<()>;
    /// Records that pages `first_page..first_page + count`, stored earlier, are now zero.
    fn zero_pages(&self, first_page: u64, count: u64) -> Result<()>;
    /// Completes the image with the final page table; nothing looks complete before this returns.
    fn seal(self: Box<Self>, table: &PageTable) -> Result<()>;
}

/// Whether sealing an image waits for it to reach stable storage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// fsync the image before the rename and the directory after it (the default).
    #[default]
    Sync,
    /// Skip the fsyncs: for tmpfs, tests and benchmarks. A crash may then leave a damaged image under
    /// the final name (its checksums still reveal that).
    NoSync,
}

/// Writes an image file: to a private, hidden temporary in the destination's directory (a
/// [`durable::TempFile`], mode 0600: the image holds the guest's secrets), renamed to the
/// destination only by [`ImageWriter::seal`]. Dropped unsealed, it removes the temporary file.
///
/// Page data lives at fixed offsets, so pages written again in later rounds overwrite in place and the
/// file never grows past the guest's size plus its metadata (9 bytes per page).
///
/// Runs of at least 64 KiB of page data, in page-aligned memory, are written around the page cache
/// (`O_DIRECT`) where the file system allows it: an image is written once and read rarely, and
/// filling the page cache with it costs memory the domains need (the `direct` module says more).
/// Shorter runs go through the page cache; with [`Durability::Sync`] their writeback to the disk
/// is started every few MiB written, so that the fsync of [`ImageWriter::seal`] has little left to
/// write.
#[derive(Debug)]
pub struct ImageWriter {
    temp: durable::TempFile,
    layout: ImageLayout,
    durability: Durability,
    writeback: Writeback,
    direct: DirectWrites,
}

impl ImageWriter {
    /// Starts an image for `layout` that will appear at `dest` when sealed.
    pub fn create(dest: &Path, layout: ImageLayout, durability: Durability) -> Result<Self> {
        let every = match durability {
            Durability::Sync => Some(WRITEBACK_EVERY),
            Durability::NoSync => None,
        };
        Self::with_writeback(dest, layout, durability, every)
    }

    /// [`ImageWriter::create`], with the page data's writeback started every `every` bytes
    /// written (`None`: never), whatever the durability.
    pub(crate) fn with_writeback(
        dest: &Path,
        layout: ImageLayout,
        durability: Durability,
        every: Option<u64>,
    ) -> Result<Self> {
        let temp = durable::TempFile::create(dest)?;
        let writeback = match every {
            Some(every) => Writeback::every(temp.file(), every),
            None => Writeback::none(),
        };
        let direct = DirectWrites::open(temp.file());
        let writer = ImageWriter {
            temp,
            layout,
            durability,
            writeback,
            direct,
        };
        let header = writer.layout.encode_header(IMAGE_MAGIC);
        writer
            .file()
            .write_all_at(&header, 0)
            .map_err(|e| writer.err("write header to", e))?;
        // The data area starts as one hole: zero pages never take space.
        writer
            .file()
            .set_len(writer.layout.table_offset())
            .map_err(|e| writer.err("size", e))?;
        Ok(writer)
    }

    fn file(&self) -> &File {
        self.temp.file()
    }

    fn err(&self, op: &'static str, e: io::Error) -> Error {
        Error::io(op, self.temp.path(), e)
    }

    /// Writes the page table and footer, fsyncs (per [`Durability`]) and renames into place.
    pub fn seal(mut self, table: &PageTable) -> Result<()> {
        assert_eq!(
            table.pages(),
            self.layout.total_pages(),
            "page table of another layout"
        );
        let mut at = self.layout.table_offset();
        let table_checksum = table.write_encoded(FORMAT_VERSION, |piece| {
            self.write_sparse(piece, at)
                .map_err(|e| self.err("write page table to", e))?;
            at += to_u64(piece.len());
            Ok::<_, Error>(())
        })?;
        let footer = Footer {
            table_checksum,
            header_checksum: self.layout.header_checksum(IMAGE_MAGIC),
        };
        self.file()
            .write_all_at(&footer.encode(&self.layout), at)
            .map_err(|e| self.err("write footer to", e))?;
        let sync = match self.durability {
            Durability::Sync => durable::Sync::Yes,
            Durability::NoSync => durable::Sync::No,
        };
        // The hint thread holds its own descriptor of the temporary: it ends before the rename.
        self.writeback.finish();
        self.temp.persist(sync)?;
        Ok(())
    }

    /// Writes `bytes` at `offset` (past the file's end so far), leaving out every file block
    /// (4 KiB, aligned) they would fill with zeros: those stay holes, which read as zeros. The page
    /// table of a mostly empty guest is mostly zeros (format v2).
    fn write_sparse(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            let at = offset + to_u64(done);
            let block_end = to_usize((at / PAGE + 1) * PAGE - at);
            let piece = &bytes[done..(done + block_end).min(bytes.len())];
            if !is_zero(piece) {
                self.file().write_all_at(piece, at)?;
            }
            done += piece.len();
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let size = libc::off_t::try_from(len).map_err(io::Error::other)?;
        // SAFETY: fallocate on a file descriptor we own, with integer arguments only; no memory is shared.
        if unsafe { libc::fallocate(self.file().as_raw_fd(), flags, off, size) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
        // Filesystems without hole punching: write the zeros instead.
        let zeros = vec![0u8; to_usize(len.min(IO_BATCH_PAGES * PAGE))];
        let mut done = 0;
        while done < len {
            let n = to_usize((len - done).min(to_u64(zeros.len())));
            self.file().write_all_at(&zeros[..n], offset + done)?;
            done += to_u64(n);
        }
        Ok(())
    }
}

impl PageSink for ImageWriter {
    fn layout(&self) -> &ImageLayout {
        &self.layout
    }
    fn write_pages(&self, first_page: u64, data: &[u8], _checksums: &[u64]) -> Result<()> {
        let offset = self.layout.page_offset(first_page);
        let write_error = |e| self.err("write page data to", e);
        if self.direct.write(data, offset).map_err(write_error)? {
            return Ok(());
        }
        self.file().write_all_at(data, offset).map_err(write_error)?;
        self.writeback.wrote(to_u64(data.len()));
        Ok(())
    }
    fn zero_pages(&self, first_page: u64, count: u64) -> Result<()> {
        self.punch_hole(self.layout.page_offset(first_page), count * PAGE)
            .map_err(|e| self.err("punch a hole in", e))
    }
    fn seal(self: Box<Self>, table: &PageTable) -> Result<()> {
        ImageWriter::seal(*self, table)
    }
}

/// Positioned reads from an image: a file, or bytes in memory (fuzzing, tests).
pub trait ReadAt: Sync {
    /// Total length.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails if the data ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(to_u64(self.len()))
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// What an image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The regions, in address order.
    pub regions: Vec<RegionInfo>,
    /// Total number of pages.
    pub total_pages: u64,
    /// Pages stored (not zero).
    pub present_pages: u64,
}

/// How restore treats pages the image says are zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ZeroPages {
    /// Read the target page and clear it only if it is not already zero (the default).
    #[default]
    ClearIfNonZero,
    /// The caller guarantees the target is all zero (a freshly created RAM file): skip zero pages.
    AssumeZeroed,
}

/// Options for [`restore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Treatment of zero pages.
    pub zero_pages: ZeroPages,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Stored pages copied into memory (after their checksums were checked).
    pub pages_restored: u64,
    /// Target pages that were not zero and were cleared.
    pub pages_cleared: u64,
    /// Wall time.
    pub duration: Duration,
}

/// An opened image whose header, footer and page table have been checked.
#[derive(Debug)]
pub struct ImageReader<S> {
    src: S,
    layout: ImageLayout,
    table: PageTable,
}

impl ImageReader<File> {
    /// Opens and checks the metadata of the image at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("open image", path, e))?;
        Self::from_source(file).map_err(|e| match e {
            Error::Io { op, source, .. } => Error::io(op, path, source),
            other => other,
        })
    }
}

fn read_at<S: ReadAt>(src: &S, buf: &mut [u8], offset: u64, what: &'static str) -> Result<()> {
    src.read_exact_at(buf, offset)
        .map_err(|e| Error::io(what, Path::new("image"), e))
}

/// Reads and checks an image's header, length and footer; returns its layout and footer.
fn read_frame<S: ReadAt>(src: &S) -> Result<(ImageLayout, Footer, u32)> {
    let kind = "image";
    let size = src.size().map_err(|e| Error::io("stat", Path::new("image"), e))?;
    if size < 16 {
        return Err(Error::corrupt(
            kind,
            format!("{size} bytes is too short for a header"),
        ));
    }
    let mut prefix = [0u8; 16];
    read_at(src, &mut prefix, 0, "read header of")?;
    let header_len = ImageLayout::header_len_from_prefix(&prefix, IMAGE_MAGIC, kind)?;
    if size < to_u64(header_len) {
        return Err(Error::corrupt(
            kind,
            format!("{size} bytes is too short for its {header_len}-byte header"),
        ));
    }
    let mut header = vec![0u8; header_len];
    read_at(src, &mut header, 0, "read header of")?;
    let (layout, header_sum) = ImageLayout::decode_header(&header, IMAGE_MAGIC, kind)?;
    if size != layout.file_len() {
        return Err(Error::Truncated {
            expected: layout.file_len(),
            found: size,
        });
    }
    let mut footer = [0u8; FOOTER_LEN];
    read_at(src, &mut footer, size - to_u64(FOOTER_LEN), "read footer of")?;
    let footer = Footer::decode(&footer, &layout, header_sum)?;
    Ok((layout, footer, ImageLayout::version_of(&header)))
}

impl<S: ReadAt> ImageReader<S> {
    /// Checks the metadata of an image read from `src`: header, length, footer, page table.
    pub fn from_source(src: S) -> Result<Self> {
        let kind = "image";
        let (layout, footer, version) = read_frame(&src)?;
        let table_len = layout.table_len();
        let mut table = Vec::new();
        table
            .try_reserve_exact(to_usize(table_len))
            .map_err(|_| Error::TooLarge {
                what: "image page table",
                value: table_len,
                limit: to_u64(isize::MAX.unsigned_abs()),
            })?;
        table.resize(to_usize(table_len), 0);
        read_at(&src, &mut table, layout.table_offset(), "read page table of")?;
        if block_hash(&table) != footer.table_checksum {
            return Err(Error::corrupt(kind, "page table checksum mismatch"));
        }
        let table = PageTable::decode(&table, layout.total_pages(), layout.seed(), version, kind)?;
        Ok(ImageReader { src, layout, table })
    }

    /// The image's layout.
    pub fn layout(&self) -> &ImageLayout {
        &self.layout
    }

    /// The image's page table.
    pub fn table(&self) -> &PageTable {
        &self.table
    }

    /// Summary of the image.
    pub fn info(&self) -> ImageInfo {
        ImageInfo {
            regions: self.layout.regions().to_vec(),
            total_pages: self.layout.total_pages(),
            present_pages: self.table.present_pages(),
        }
    }

    fn page_error(&self, page: u64, what: &'static str) -> Error {
        Error::PageCorrupt {
            kind: "image",
            page,
            gpa: self.layout.gpa_of_page(page),
            what,
        }
    }

    /// Calls `f(first_page, count)` for each run of `state` pages in `range`, at most
    /// [`IO_BATCH_PAGES`] long.
    fn runs(
        &self,
        range: std::ops::Range<u64>,
        state: PageState,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut page = range.start;
        while page < range.end {
            if self.table.state(page) != state {
                page += 1;
                continue;
            }
            let first = page;
            while page < range.end && page - first < IO_BATCH_PAGES && self.table.state(page) == state {
                page += 1;
            }
            f(first, page - first)?;
        }
        Ok(())
    }

    /// Reads every page and checks it: stored pages against their checksums, zero pages for zeros.
    pub fn verify(&self) -> Result<ImageInfo> {
        let chunks = (0..self.layout.total_pages()).step_by(CHUNK_PAGES);
        let init = || vec![0u8; to_usize(IO_BATCH_PAGES * PAGE)];
        par::for_each(chunks, init, |buf, start| {
            let range = start..(start + to_u64(CHUNK_PAGES)).min(self.layout.total_pages());
            for state in [PageState::Present, PageState::Zero] {
                self.runs(range.clone(), state, |first, count| {
                    let bytes = &mut buf[..to_usize(count * PAGE)];
                    read_at(
                        &self.src,
                        bytes,
                        self.layout.page_offset(first),
                        "read page data of",
                    )?;
                    for (i, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                        let p = first + to_u64(i);
                        let ok = match state {
                            PageState::Present => {
                                page_hash(self.layout.seed(), page) == self.table.checksum(p)
                            }
                            PageState::Zero => is_zero(page),
                        };
                        if !ok {
                            return Err(self.page_error(
                                p,
                                match state {
                                    PageState::Present => "does not match its checksum",
                                    PageState::Zero => "is marked zero but holds data",
                                },
                            ));
                        }
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })?;
        Ok(self.info())
    }

    /// Writes the image into `mem`, checking each stored page's checksum as it is read.
    ///
    /// The target must not be running. Its regions must match the image's exactly; that and all
    /// metadata are checked before any byte of `mem` is written. A damaged page is reported as an error
    /// naming it; the target is then partly written and must not be used.
    pub fn restore(&self, mem: &GuestMemory, options: &RestoreOptions) -> Result<RestoreStats> {
        let started = Instant::now();
        self.layout.check_matches(mem)?;
        let restored = AtomicU64::new(0);
        let cleared = AtomicU64::new(0);
        let chunks = (0..self.layout.total_pages()).step_by(CHUNK_PAGES);
        par::for_each(
            chunks,
            || vec![0u8; to_usize(IO_BATCH_PAGES)],
            |data_map, start| {
                let range = start..(start + to_u64(CHUNK_PAGES)).min(self.layout.total_pages());
                for (region, pages) in mem.segments(range) {
                    self.runs(pages.clone(), PageState::Present, |first, count| {
                        // SAFETY: the pages are inside `region`'s writable mapping, which outlives this call;
                        // chunks are disjoint between workers and the target is not running (documented
                        // precondition), so nothing else accesses these bytes while the slice lives.
                        let target = unsafe {
                            std::slice::from_raw_parts_mut(region.host(first), to_usize(count * PAGE))
                        };
                        read_at(
                            &self.src,
                            target,
                            self.layout.page_offset(first),
                            "read page data of",
                        )?;
                        for (i, page) in target.chunks_exact(PAGE_SIZE).enumerate() {
                            let p = first + to_u64(i);
                            if page_hash(self.layout.seed(), page) != self.table.checksum(p) {
                                return Err(self.page_error(p, "does not match its checksum"));
                            }
                        }
                        restored.fetch_add(count, Ordering::Relaxed);
                        Ok(())
                    })?;
                    if options.zero_pages == ZeroPages::ClearIfNonZero {
                        self.runs(pages, PageState::Zero, |first, count| {
                            // Holes of a RAM file are zero already; reading them would allocate them.
                            let data_map = &mut data_map[..to_usize(count)];
                            region.data_map(first..first + count, data_map);
                            // SAFETY: as above: disjoint pages of a target that is not running.
                            let target = unsafe {
                                std::slice::from_raw_parts_mut(region.host(first), to_usize(count * PAGE))
                            };
                            let with_data = target.chunks_exact_mut(PAGE_SIZE).zip(data_map.iter());
                            for (page, _) in with_data.filter(|(_, &data)| data == 1) {
                                if !is_zero(page) {
                                    page.fill(0);
                                    cleared.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(())
                        })?;
                    }
                }
                Ok(())
            },
        )?;
        Ok(RestoreStats {
            pages_restored: restored.into_inner(),
            pages_cleared: cleared.into_inner(),
            duration: started.elapsed(),
        })
    }
}

/// Checks the metadata of the image at `path` without reading its pages or building its page
/// table: the header, the file length, the footer, and the page table against the footer's
/// checksum, read in pieces of 64 KiB (a 4 GiB guest's table is 9 MiB: reading it in one
/// buffer and decoding it into a [`PageTable`] means touching 18 MiB of fresh memory). The
/// table's entries are not decoded. This vouches for the data area's place and length, which
/// is what a hypervisor that maps the image's pages directly needs; [`verify`] checks the pages.
/// Returns the image's layout.
pub fn check_metadata(path: &Path) -> Result<ImageLayout> {
    let with_path = |e: Error| match e {
        Error::Io { op, source, .. } => Error::io(op, path, source),
        other => other,
    };
    let file = File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let (layout, footer, _) = read_frame(&file).map_err(with_path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut piece = vec![0u8; 1 << 16];
    let (mut at, end) = (layout.table_offset(), layout.table_offset() + layout.table_len());
    while at < end {
        let len = to_usize((end - at).min(to_u64(piece.len())));
        read_at(&file, &mut piece[..len], at, "read page table of").map_err(with_path)?;
        hasher.update(&piece[..len]);
        at += to_u64(len);
    }
    if hasher.digest() != footer.table_checksum {
        return Err(Error::corrupt("image", "page table checksum mismatch"));
    }
    Ok(layout)
}

/// Checks every byte of the image at `path` without restoring it.
pub fn verify(path: &Path) -> Result<ImageInfo> {
    let reader = ImageReader::open(path)?;
    reader.verify().map_err(|e| match e {
        Error::Io { op, source, .. } => Error::io(op, path, source),
        other => other,
    })
}

/// Restores the image at `path` into `mem` (see [`ImageReader::restore`]).
pub fn restore(path: &Path, mem: &GuestMemory, options: &RestoreOptions) -> Result<RestoreStats> {
    ImageReader::open(path)?.restore(mem, options)
}
