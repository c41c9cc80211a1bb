//! Detecting and taking QEMU's image locks.
//!
//! QEMU (`block/file-posix.c`) takes shared open-file-description (OFD) locks on single bytes of
//! an image it opens: byte 100 + n for each permission n it holds and byte 200 + n for each
//! permission it refuses to share. It finds conflicts by asking whether an exclusive lock on
//! such a byte could be taken. We take an exclusive OFD lock on bytes 100..300 while editing an
//! image: it fails if any QEMU or qemu-img has the image open, and any QEMU that starts while
//! we edit sees our lock and refuses to open the image.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    time::{Duration, Instant},
};

use nix::fcntl::{fcntl, FcntlArg};

/// First byte QEMU locks.
const LOCK_START: i64 = 100;
/// Bytes QEMU may lock (permission bytes from 100, shared-permission bytes from 200).
const LOCK_LEN: i64 = 200;

/// `flock`'s `l_type` and `l_whence` are `short`s; libc names their values as `int`s.
#[allow(
    clippy::cast_possible_truncation,
    reason = "F_WRLCK, F_UNLCK and SEEK_SET are small constants (0 to 2)"
)]
const fn short(value: libc::c_int) -> libc::c_short {
    value as libc::c_short
}

fn lock_request(kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: short(libc::SEEK_SET),
        l_start: LOCK_START,
        l_len: LOCK_LEN,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// How long a conflicting lock may take to go away before it counts as held.
///
/// A lock of ours can outlive the descriptor we closed: a child forked by another thread of this
/// process shares the open file description until it execs (and close-on-exec drops it). Such a
/// lock vanishes within milliseconds; QEMU's are held for as long as it runs.
const TRANSIENT_HOLD: Duration = Duration::from_millis(250);

/// Asks `free` until it says the bytes are free or [`TRANSIENT_HOLD`] has passed.
fn free_within_transient_hold(mut free: impl FnMut() -> io::Result<bool>) -> io::Result<bool> {
    let deadline = Instant::now() + TRANSIENT_HOLD;
    loop {
        if free()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Takes an exclusive OFD lock on QEMU's lock bytes; released when `file` (its open file
/// description) is closed. `Ok(false)` means another process holds a lock there.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    let request = lock_request(short(libc::F_WRLCK));
    free_within_transient_hold(|| match fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&request)) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Ok(false),
        Err(errno) => Err(errno.into()),
    })
}

/// QEMU's lock byte for the `write` permission (`BLK_PERM_WRITE`, bit 1): locked by every
/// process that has the image open for writing.
const WRITE_PERMISSION_BYTE: i64 = LOCK_START + 1;

/// Whether another process has the image open for writing (holds QEMU's `write` permission
/// byte). A QEMU that holds the image only as a read-only backing file does not: its contents
/// do not move.
pub fn is_written_by_other(file: &File) -> io::Result<bool> {
    let free = free_within_transient_hold(|| {
        let mut probe = lock_request(short(libc::F_WRLCK));
        probe.l_start = WRITE_PERMISSION_BYTE;
        probe.l_len = 1;
        fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut probe))?;
        Ok(probe.l_type == short(libc::F_UNLCK))
    })?;
    Ok(!free)
}

/// Whether another process holds any lock on QEMU's lock bytes (for read-only checks, where
/// the file may be open read-only and so cannot take a write lock itself).
pub fn is_locked_by_other(file: &File) -> io::Result<bool> {
    let free = free_within_transient_hold(|| {
        let mut probe = lock_request(short(libc::F_WRLCK));
        fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut probe))?;
        Ok(probe.l_type == short(libc::F_UNLCK))
    })?;
    Ok(!free)
}
