//! Building an image from pages pushed one at a time, in any order, by a producer this crate does not
//! drive (for example a thread parsing a hypervisor's own save stream as it arrives).

use std::fmt;

use crate::error::{Error, Result};
use crate::format::ImageLayout;
use crate::guest::{PAGE, PAGE_SIZE};
use crate::image::PageSink;
use crate::num::{to_u64, to_usize};
use crate::page_buf::PageBuf;
use crate::table::{is_zero, page_hash, DirtySet, PageState, PageTable};

/// Most pages staged before they are written (1 MiB): consecutive pages go to the sink in one call.
const STAGE_PAGES: usize = 256;

/// What an import received and what its image holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Calls of [`PageImport::page`] and [`PageImport::zero`].
    pub pages_received: u64,
    /// Of those, calls for a page received before (the later one replaced it).
    pub duplicates: u64,
    /// Pages never received: zero in the image.
    pub pages_missing: u64,
    /// Pages stored in the image (not zero).
    pub present_pages: u64,
    /// Zero pages in the image, received as zero or never received.
    pub zero_pages: u64,
    /// Page data bytes written to the sink, rewrites included.
    pub bytes_written: u64,
}

/// A run of consecutive pages waiting to be written, with their checksums. The pages are the first
/// `sums.len()` of `data` (page-aligned, so that the sink may write them direct).
struct Run {
    first: u64,
    data: PageBuf,
    sums: Vec<u64>,
}

impl Run {
    fn len(&self) -> u64 {
        to_u64(self.sums.len())
    }

    /// Index of `page` in the run, if staged.
    fn slot(&self, page: u64) -> Option<usize> {
        (page >= self.first && page - self.first < self.len()).then(|| to_usize(page - self.first))
    }
}

/// Builds an image from pages that arrive in any order: each page is stored (or recorded as zero) as it
/// arrives, a page sent again replaces the earlier copy, a page never sent is zero. The producer calls
/// [`PageImport::page`] and [`PageImport::zero`] as records come in, then [`PageImport::seal`].
///
/// Consecutive pages are staged (up to 1 MiB) and written to the sink in one call; the page table is
/// kept in memory (9 bytes per guest page) plus one bit per page for what was received.
///
/// After an error the import must be abandoned: dropping it drops the sink, and an unsealed
/// [`crate::ImageWriter`] then removes its temporary file.
pub struct PageImport<'a> {
    sink: Box<dyn PageSink + 'a>,
    table: PageTable,
    received: DirtySet,
    run: Run,
    pages_received: u64,
    duplicates: u64,
    bytes_written: u64,
}

impl fmt::Debug for PageImport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageImport")
            .field("layout", self.sink.layout())
            .field("pages_received", &self.pages_received)
            .finish_non_exhaustive()
    }
}

impl<'a> PageImport<'a> {
    /// Starts an import into `sink`, for the sink's layout; every page starts as zero.
    pub fn new(sink: Box<dyn PageSink + 'a>) -> Self {
        let layout = sink.layout();
        let table = PageTable::new(layout.total_pages(), layout.seed());
        let received = DirtySet::empty(layout.total_pages());
        PageImport {
            sink,
            table,
            received,
            run: Run {
                first: 0,
                data: PageBuf::zeroed(STAGE_PAGES),
                sums: Vec::with_capacity(STAGE_PAGES),
            },
            pages_received: 0,
            duplicates: 0,
            bytes_written: 0,
        }
    }

    /// The layout of the image being built.
    pub fn layout(&self) -> &ImageLayout {
        self.sink.layout()
    }

    /// Page `page` (numbered as in the layout) holds `data`. A zero page is recorded as zero and not
    /// stored.
    pub fn page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<()> {
        self.receive(page)?;
        if is_zero(data) {
            return self.make_zero(page);
        }
        let sum = page_hash(self.table.seed(), data);
        if let Some(i) = self.run.slot(page) {
            self.run.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(data);
            self.run.sums[i] = sum;
        } else {
            let extends = page == self.run.first + self.run.len() && self.run.sums.len() < STAGE_PAGES;
            if !extends {
                self.flush()?;
                self.run.first = page;
            }
            let slot = self.run.sums.len();
            self.run.data[slot * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(data);
            self.run.sums.push(sum);
        }
        self.table.set(page, Some(sum));
        Ok(())
    }

    /// Page `page` is zero; a copy stored earlier is removed.
    pub fn zero(&mut self, page: u64) -> Result<()> {
        self.receive(page)?;
        self.make_zero(page)
    }

    /// What was received so far, and what the image would hold if sealed now.
    pub fn stats(&self) -> ImportStats {
        let total = self.table.pages();
        let present = self.table.present_pages();
        ImportStats {
            pages_received: self.pages_received,
            duplicates: self.duplicates,
            pages_missing: total - self.received.count(),
            present_pages: present,
            zero_pages: total - present,
            bytes_written: self.bytes_written,
        }
    }

    /// Writes the staged pages, then the page table, and completes the image (for an
    /// [`crate::ImageWriter`]: fsync per its durability and rename into place). Pages never received
    /// are zero.
    pub fn seal(mut self) -> Result<ImportStats> {
        self.flush()?;
        let stats = self.stats();
        self.sink.seal(&self.table)?;
        Ok(stats)
    }

    fn receive(&mut self, page: u64) -> Result<()> {
        let pages = self.table.pages();
        if page >= pages {
            return Err(Error::PageOutOfRange { page, pages });
        }
        self.pages_received += 1;
        if self.received.contains(page) {
            self.duplicates += 1;
        } else {
            self.received.insert(page);
        }
        Ok(())
    }

    fn make_zero(&mut self, page: u64) -> Result<()> {
        if self.table.state(page) == PageState::Present {
            // The page is staged, or written earlier, or both: write the stage first so the hole is
            // punched after it (a page that becomes zero is rare: only a page sent again).
            self.flush()?;
            self.sink.zero_pages(page, 1)?;
            self.table.set(page, None);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.run.sums.is_empty() {
            return Ok(());
        }
        let staged = self.run.sums.len() * PAGE_SIZE;
        self.sink
            .write_pages(self.run.first, &self.run.data[..staged], &self.run.sums)?;
        self.bytes_written += self.run.len() * PAGE;
        self.run.sums.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::RegionInfo;
    use crate::image::{Durability, ImageWriter};
    use crate::reference;

    fn layout(pages: u64) -> ImageLayout {
        ImageLayout::new(
            vec![RegionInfo {
                gpa: 0,
                len: pages * PAGE,
            }],
            5,
        )
        .unwrap()
    }

    fn page_of(byte: u8) -> [u8; PAGE_SIZE] {
        [byte; PAGE_SIZE]
    }

    #[test]
    fn staged_page_overwritten_and_zeroed_in_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let layout = layout(8);
        let sink = ImageWriter::create(&path, layout.clone(), Durability::NoSync).unwrap();
        let mut import = PageImport::new(Box::new(sink));
        import.page(1, &page_of(1)).unwrap();
        import.page(2, &page_of(2)).unwrap();
        import.page(1, &page_of(3)).unwrap(); // replaces the staged copy
        import.page(3, &page_of(4)).unwrap();
        import.zero(2).unwrap(); // staged, then zero: flushed, then punched
        import.page(7, &page_of(0)).unwrap(); // zero data: recorded as zero
        let stats = import.seal().unwrap();
        assert_eq!(
            stats,
            ImportStats {
                pages_received: 6,
                duplicates: 2,
                pages_missing: 4,
                present_pages: 2,
                zero_pages: 6,
                bytes_written: 3 * PAGE,
            }
        );
        let mut expected = vec![0u8; 8 * PAGE_SIZE];
        expected[PAGE_SIZE..2 * PAGE_SIZE].fill(3);
        expected[3 * PAGE_SIZE..4 * PAGE_SIZE].fill(4);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            reference::image_bytes(&expected, &layout)
        );
    }

    #[test]
    fn out_of_range_page_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sink = ImageWriter::create(&dir.path().join("img"), layout(4), Durability::NoSync).unwrap();
        let mut import = PageImport::new(Box::new(sink));
        let error = import.page(4, &page_of(1)).unwrap_err();
        assert!(
            matches!(error, Error::PageOutOfRange { page: 4, pages: 4 }),
            "{error}"
        );
        assert_eq!(error.to_string(), "page 4 is outside the image's 4 pages");
        assert!(import.zero(u64::MAX).is_err());
        assert_eq!(import.stats().pages_received, 0);
    }
}
