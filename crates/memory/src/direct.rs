//! Writing long runs of page data around the page cache (`O_DIRECT`).
//!
//! An image is written once and read rarely (a revert, a verify). Through the page cache, each page
//! written first takes a page of the host's memory, and the image then stays cached, holding memory
//! the domains need (why libvirt's save has `--bypass-cache` and QEMU's `mapped-ram` a `direct-io`
//! parameter). On these machines taking fresh memory is also what a save waits for: 256 MiB written
//! into a new file took 0.70–0.84 s through the page cache and 0.15–0.18 s direct, fdatasync
//! included (1 MiB writes, `dd`).
//!
//! Direct I/O has a price per call: the write waits for the disk (a 4 KiB write 70 µs, a 64 KiB one
//! 107 µs, a 1 MiB one 0.6 ms, measured), where a page copied into memory already cached costs a
//! microsecond or two. So only runs of at least [`DIRECT_MIN_BYTES`] go direct; shorter ones (a live
//! save's scattered rewrites) stay buffered, and the writeback hints and the seal's fsync cover them. The seal's fsync also makes the direct
//! writes durable (it flushes the disk's cache and commits the blocks' allocation).
//!
//! Direct I/O wants the memory, the offset and the length aligned to the device's logical block;
//! this uses the page size, which the usual block sizes divide. Producers stage their pages in a
//! [`crate::page_buf::PageBuf`]; anything else goes through the page cache. A file system without
//! direct I/O (tmpfs on older kernels, some network and FUSE file systems) refuses at open or with
//! `EINVAL` at the first write: then every write goes through the page cache, as before.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::guest::{PAGE, PAGE_SIZE};

/// The shortest write that goes direct (16 pages): the break-even against copying into fresh
/// memory, measured above (107 µs direct against about 190 µs buffered for 64 KiB).
pub(crate) const DIRECT_MIN_BYTES: usize = 64 << 10;

/// A second descriptor of a file being written, opened for direct I/O, if the file system has it.
#[derive(Debug)]
pub(crate) struct DirectWrites {
    file: Option<File>,
    /// Cleared for good at the first `EINVAL` (the file system takes the flag at open and refuses
    /// the writes).
    usable: AtomicBool,
}

impl DirectWrites {
    /// No direct writes.
    pub(crate) fn none() -> Self {
        DirectWrites {
            file: None,
            usable: AtomicBool::new(false),
        }
    }

    /// Opens `file` again for direct writes (through `/proc/self/fd`: the same inode, whatever
    /// its name now). Best effort: [`DirectWrites::none`] if the file system or `/proc` refuses.
    pub(crate) fn open(file: &File) -> Self {
        let reopened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()));
        match reopened {
            Ok(file) => DirectWrites {
                file: Some(file),
                usable: AtomicBool::new(true),
            },
            Err(_) => Self::none(),
        }
    }

    /// Writes `data` at `offset` around the page cache and returns `true`; or returns `false`,
    /// having written nothing that counts, when the caller must write it through the page cache:
    /// too short, not aligned, or no direct I/O here.
    pub(crate) fn write(&self, data: &[u8], offset: u64) -> io::Result<bool> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let aligned =
            data.as_ptr().align_offset(PAGE_SIZE) == 0 && data.len() % PAGE_SIZE == 0 && offset % PAGE == 0;
        if data.len() < DIRECT_MIN_BYTES || !aligned || !self.usable.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match file.write_all_at(data, offset) {
            Ok(()) => Ok(true),
            // A part may be written before the refusal: the caller writes all of it again.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.usable.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the last write went or the next one may go direct.
    #[cfg(test)]
    pub(crate) fn is_usable(&self) -> bool {
        self.file.is_some() && self.usable.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_buf::PageBuf;
    use std::os::unix::fs::FileExt;

    #[test]
    fn long_aligned_runs_go_direct_the_rest_is_left_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("img"))
            .unwrap();
        let direct = DirectWrites::open(&file);
        if !direct.is_usable() {
            eprintln!("no direct I/O on this file system: nothing to test");
            return;
        }
        let mut buf = PageBuf::zeroed(DIRECT_MIN_BYTES / PAGE_SIZE + 1);
        for (b, byte) in buf.iter_mut().zip((1..=251u8).cycle()) {
            *b = byte;
        }
        let long = &buf[..DIRECT_MIN_BYTES];
        assert!(direct.write(long, PAGE).unwrap());
        let mut back = vec![0u8; long.len()];
        file.read_exact_at(&mut back, PAGE).unwrap();
        assert_eq!(back, long);
        // Too short, offset or memory not page-aligned: the caller's to write.
        assert!(!direct.write(&buf[..DIRECT_MIN_BYTES - PAGE_SIZE], 0).unwrap());
        assert!(!direct.write(long, 512).unwrap());
        assert!(!direct.write(&buf[1..=DIRECT_MIN_BYTES], 0).unwrap());
        assert!(!DirectWrites::none().write(long, 0).unwrap());
    }
}
