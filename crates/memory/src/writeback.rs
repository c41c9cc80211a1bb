//! Starting an image's writeback while its pages are still being written, so that the fsync which
//! seals it has little left to do.
//!
//! A live save writes the guest's pages over seconds, and the page cache keeps them: left alone,
//! the kernel starts writing them only after `dirty_expire_centisecs` (30 s) or past the dirty
//! limit (10 % of RAM), so all of it (150 MiB for a 1 GiB guest that holds data) waited for the
//! final fsync, after the guest was resumed but before the snapshot exists. Every
//! [`WRITEBACK_EVERY`] bytes written, a thread of the writer's own asks the kernel to start
//! writing what is dirty (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). The final fsync stays: it
//! is what makes the image durable; the hint only moves the disk's work earlier.
//!
//! The hint is given on its own thread because it can wait: it allocates the blocks of the pages
//! (ext4's delayed allocation), which takes the file system's journal, and submits the writes,
//! which waits when the disk's queue is full (0.7 ms per 8 MiB measured on an idle machine,
//! more behind other writers). The writer's thread (for a streamed snapshot, the only reader of
//! the hypervisor's stream, also while the guest is paused) only wakes that thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Page data written between two writeback hints. Small enough that the last stretch before the
/// seal is short; large enough that the kernel gets runs of pages to write (each hint costs a
/// walk over the file's dirty pages).
pub(crate) const WRITEBACK_EVERY: u64 = 8 << 20;

/// Counts the bytes written to one file and has the file's writeback started each time another
/// `every` bytes were written. Shared by the threads writing the file.
#[derive(Debug)]
pub(crate) struct Writeback {
    /// Bytes between hints.
    every: u64,
    written: AtomicU64,
    /// Hints asked for (intervals crossed).
    asked: AtomicU64,
    /// The thread that gives the hints; `None` for none.
    hinter: Option<Hinter>,
}

#[derive(Debug)]
struct Hinter {
    /// Holds at most one hint waiting: a hint asked for while one waits is covered by it (it
    /// starts the writeback of every page written before it runs).
    wake: SyncSender<()>,
    thread: JoinHandle<u64>,
}

impl Writeback {
    /// No hints (an image that is not fsynced needs no early writeback).
    pub(crate) fn none() -> Self {
        Writeback {
            every: u64::MAX,
            written: AtomicU64::new(0),
            asked: AtomicU64::new(0),
            hinter: None,
        }
    }

    /// A hint for `file` every `every` bytes written (`every` > 0). Best effort: if the thread
    /// cannot be started there are no hints, and the seal's fsync does all the writing, as it
    /// would without them.
    pub(crate) fn every(file: &File, every: u64) -> Self {
        assert!(every > 0, "a writeback interval of 0 bytes");
        let hinter = file.try_clone().ok().and_then(|file| {
            let (wake, woken) = mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name("image-writeback".into())
                .spawn(move || give_hints(&file, &woken))
                .ok()
                .map(|thread| Hinter { wake, thread })
        });
        Writeback {
            every,
            written: AtomicU64::new(0),
            asked: AtomicU64::new(0),
            hinter,
        }
    }

    /// Records that `len` more bytes were written; asks for a hint if that crossed a multiple of
    /// the interval (so that of several threads writing, one asks), without waiting for it.
    pub(crate) fn wrote(&self, len: u64) {
        let Some(hinter) = &self.hinter else { return };
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        if before / self.every == (before + len) / self.every {
            return;
        }
        self.asked.fetch_add(1, Ordering::Relaxed);
        // Full: a hint waits already and covers these pages. Disconnected: cannot happen while
        // `self` lives, and a missing hint only leaves more to the fsync.
        let _ = hinter.wake.try_send(());
    }

    /// Ends the hint thread, after the hint it gives now if any; returns the hints it gave.
    pub(crate) fn finish(&mut self) -> u64 {
        let Some(Hinter { wake, thread }) = self.hinter.take() else {
            return 0;
        };
        drop(wake);
        // A panic of the thread lost hints, nothing else.
        thread.join().unwrap_or(0)
    }

    /// Hints asked for so far.
    #[cfg(test)]
    pub(crate) fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The hint thread: one hint per wake-up, until the writer finishes.
fn give_hints(file: &File, woken: &Receiver<()>) -> u64 {
    let mut given = 0;
    while woken.recv().is_ok() {
        // A failure here is the disk's or the file system's (I/O error, no space for the blocks),
        // and the fsync that seals the file meets and reports it: the hint has nothing to add.
        let _ = start_writeback(file);
        given += 1;
    }
    given
}

/// Asks the kernel to start writing every dirty page of `file` to the disk, and returns without
/// waiting for the writes. The whole file, not the range just written: pages are written in
/// place at any offset (a live save's later passes rewrite pages anywhere), and pages already
/// under writeback are skipped. Without a wait flag the call does not consume a writeback error
/// (the kernel's per-file error sequence): the file's fsync still reports it.
fn start_writeback(file: &File) -> io::Result<()> {
    // SAFETY: sync_file_range on a file descriptor this thread owns (a duplicate of the writer's),
    // with integer arguments only; no memory is shared with the kernel.
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
        let mut writeback = Writeback::every(&file, 10);
        writeback.wrote(4);
        assert_eq!(writeback.asked(), 0);
        writeback.wrote(6);
        assert_eq!(writeback.asked(), 1);
        // Past 20 and 30 at once: one hint covers the whole file.
        writeback.wrote(25);
        assert_eq!(writeback.asked(), 2);
        // Hints asked for while one waits are covered by it.
        assert!((1..=2).contains(&writeback.finish()));
        let never = Writeback::none();
        never.wrote(u64::MAX / 2);
        assert_eq!(never.asked(), 0);
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
        let writer =
            ImageWriter::with_writeback(&path, layout.clone(), Durability::Sync, Some(PAGE)).unwrap();
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
