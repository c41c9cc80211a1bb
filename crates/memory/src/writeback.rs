//! Starting an image's writeback while its pages are still being written, so that the fsync which
//! seals it has little left to do.
//!
//! A live save writes the guest's pages over seconds, and the page cache keeps them: left alone,
//! the kernel starts writing them only after `dirty_writeback_centisecs` (or when the dirty limit
//! is reached), so all of it (150 MiB for a 1 GiB guest that holds data) waited for the final
//! fsync, after the guest was resumed but before the snapshot exists. Every [`WRITEBACK_EVERY`]
//! bytes written, the writer asks the kernel to start writing what is dirty
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`) and goes on without waiting. The final fsync stays:
//! it is what makes the image durable; the hint only moves the disk's work earlier.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Page data written between two writeback hints. Small enough that the last stretch before the
/// seal is short; large enough that the kernel gets runs of pages to write (each hint costs a
/// walk over the file's dirty pages and, on ext4, the blocks' allocation).
pub(crate) const WRITEBACK_EVERY: u64 = 8 << 20;

/// Counts the bytes written to one file and starts the file's writeback each time another
/// `every` bytes were written. Shared by the threads writing the file.
#[derive(Debug)]
pub(crate) struct Writeback {
    /// Bytes between hints; 0: never (an image that is not fsynced needs no early writeback).
    every: u64,
    written: AtomicU64,
    hints: AtomicU64,
}

impl Writeback {
    /// A hint every `every` bytes written; 0 for none.
    pub(crate) fn every(every: u64) -> Self {
        Writeback {
            every,
            written: AtomicU64::new(0),
            hints: AtomicU64::new(0),
        }
    }

    /// Records that `len` more bytes were written to `file`; starts its writeback if that crossed
    /// a multiple of the interval (so that of several threads, one gives the hint).
    pub(crate) fn wrote(&self, file: &File, len: u64) -> io::Result<()> {
        if self.every == 0 {
            return Ok(());
        }
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        if before / self.every == (before + len) / self.every {
            return Ok(());
        }
        self.hints.fetch_add(1, Ordering::Relaxed);
        start_writeback(file)
    }

    /// Hints given so far.
    #[cfg(test)]
    pub(crate) fn hints(&self) -> u64 {
        self.hints.load(Ordering::Relaxed)
    }
}

/// Asks the kernel to start writing every dirty page of `file` to the disk, and returns without
/// waiting for it. The whole file, not the range just written: pages are written in place at any
/// offset (a live save's later passes rewrite pages anywhere), and pages already under writeback
/// are skipped. Without a wait flag the call does not consume a writeback error: the file's fsync
/// still reports it.
fn start_writeback(file: &File) -> io::Result<()> {
    // SAFETY: sync_file_range on a file descriptor we own (borrowed for the call), with integer
    // arguments only; no memory is shared with the kernel.
    let done = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    match done {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{ImageLayout, RegionInfo};
    use crate::guest::{PAGE, PAGE_SIZE};
    use crate::image::{Durability, ImageWriter};
    use crate::import::PageImport;
    use crate::num::to_usize;
    use crate::reference;

    #[test]
    fn one_hint_per_interval_crossed() {
        let file = tempfile::tempfile().unwrap();
        let writeback = Writeback::every(10);
        writeback.wrote(&file, 4).unwrap();
        assert_eq!(writeback.hints(), 0);
        writeback.wrote(&file, 6).unwrap();
        assert_eq!(writeback.hints(), 1);
        // Past 20 and 30 at once: one hint covers the whole file.
        writeback.wrote(&file, 25).unwrap();
        assert_eq!(writeback.hints(), 2);
        let never = Writeback::every(0);
        never.wrote(&file, u64::MAX / 2).unwrap();
        assert_eq!(never.hints(), 0);
    }

    /// The hint only moves the disk's work earlier: an image written with a hint after every page,
    /// pages rewritten and turned to holes in between, holds the same bytes as the reference.
    #[test]
    fn hints_never_change_the_image() {
        const PAGES: u64 = 1024;
        let layout = ImageLayout::new(
            vec![RegionInfo {
                gpa: 0,
                len: PAGES * PAGE,
            }],
            7,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let writer = ImageWriter::with_writeback(&path, layout.clone(), Durability::Sync, PAGE).unwrap();
        let mut import = PageImport::new(Box::new(writer));
        let mut expected = vec![0u8; to_usize(PAGES) * PAGE_SIZE];
        // Three passes in a scrambled order (a live save's later passes rewrite pages anywhere);
        // every seventh page of a pass is zero, which punches a hole where data was.
        let mut state = 0x2545_f491_u64;
        for pass in 0..3u8 {
            for _ in 0..PAGES / 2 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let page = (state >> 33) % PAGES;
                let bytes = &mut expected[to_usize(page) * PAGE_SIZE..][..PAGE_SIZE];
                if (state >> 20) % 7 == 0 {
                    bytes.fill(0);
                    import.zero(page).unwrap();
                } else {
                    bytes.fill(pass + 1);
                    bytes[..8].copy_from_slice(&page.to_le_bytes());
                    import.page(page, (&*bytes).try_into().unwrap()).unwrap();
                }
            }
        }
        import.seal().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            reference::image_bytes(&expected, &layout)
        );
    }
}
