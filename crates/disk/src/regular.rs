//! Opening image files: regular files only.
//!
//! An image name (a disk path, or a backing name recorded inside an image, which a guest that
//! wrote a qcow2 header into a raw disk may control) can name a FIFO, a device or a directory.
//! Opening a FIFO for reading blocks until a writer appears, which would hang domsnap with the
//! domain's lock held; opening a device can have side effects (a tape rewinds, a terminal
//! becomes the controlling one). So the path is `stat`ed first and anything but a regular file
//! is refused without being opened; the open itself uses `O_NONBLOCK | O_NOCTTY` (no effect on
//! a regular file, and it cannot block if the name was swapped for a FIFO meanwhile), and the
//! opened file must be the regular file that was `stat`ed. Symbolic links are followed, as
//! QEMU follows them (images are often reached through links).

use std::{
    fs::{File, Metadata, OpenOptions},
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::Path,
};

use crate::error::{io_err, Error, Result};

fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn refuse(path: &Path, meta: &Metadata) -> Error {
    Error::InvalidArgument {
        what: "image",
        value: path.display().to_string(),
        reason: format!("is {}; images must be regular files", kind(meta)),
    }
}

/// Opens `path`, which must be a regular file, for reading (and writing if `write`), without
/// ever blocking on a FIFO or opening a device.
pub(crate) fn open(path: &Path, write: bool) -> Result<File> {
    let before = std::fs::metadata(path).map_err(io_err("cannot open image", path))?;
    if !before.file_type().is_file() {
        return Err(refuse(path, &before));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err("cannot open image", path))?;
    let opened = file.metadata().map_err(io_err("cannot stat", path))?;
    if !opened.file_type().is_file() {
        return Err(refuse(path, &opened));
    }
    if (opened.dev(), opened.ino()) != (before.dev(), before.ino()) {
        return Err(Error::InvalidArgument {
            what: "image",
            value: path.display().to_string(),
            reason: "was replaced while being opened".into(),
        });
    }
    Ok(file)
}

/// The length of `path`, which must be a regular file (not opened).
pub(crate) fn len(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(io_err("cannot stat", path))?;
    if !meta.file_type().is_file() {
        return Err(refuse(path, &meta));
    }
    Ok(meta.len())
}
