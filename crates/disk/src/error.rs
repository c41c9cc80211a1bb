//! The crate's error type.

use std::{io, path::PathBuf};

/// Everything that can go wrong snapshotting a disk.
///
/// Errors about an image name the image; errors about on-disk structures name the structure and
/// its offset, so that a refused or damaged image can be looked at with `qemu-img check`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing an image (or creating an overlay) failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done, e.g. `cannot read the header of`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The image is not a qcow2 image we can read: bad magic, impossible header fields,
    /// truncated or inconsistent metadata. Nothing was written.
    #[error("{path}: invalid qcow2 image: {reason}")]
    Invalid {
        /// The image.
        path: PathBuf,
        /// What is wrong, with field names and offsets.
        reason: String,
    },

    /// The image is valid qcow2 but uses something this backend refuses to touch (unknown
    /// incompatible features, dirty or corrupt bit, external data file, ...). Nothing was written.
    #[error("{path}: unsupported qcow2 image: {reason}")]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// What is unsupported and what to do about it.
        reason: String,
    },

    /// Another process (a running QEMU, `qemu-img`) holds a lock on the image.
    #[error(
        "{path} is in use by another process (QEMU holds byte-range locks on it); stop the domain first"
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },

    /// A snapshot name, overlay path or other argument is not acceptable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// What the argument is, e.g. `snapshot name`.
        what: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },

    /// No internal snapshot with this name exists in the image.
    #[error("{path}: no internal snapshot named {name:?}")]
    SnapshotNotFound {
        /// The image.
        path: PathBuf,
        /// The name looked for.
        name: String,
    },

    /// An internal snapshot with this name already exists in the image.
    #[error("{path}: an internal snapshot named {name:?} already exists")]
    SnapshotExists {
        /// The image.
        path: PathBuf,
        /// The name.
        name: String,
    },

    /// A reference count would exceed the image's refcount width (e.g. `refcount_bits=1`
    /// cannot share clusters between snapshots). Nothing was written.
    #[error("{path}: refcount of cluster at {offset:#x} would exceed {max} (refcount_bits too small for this snapshot)")]
    RefcountOverflow {
        /// The image.
        path: PathBuf,
        /// The host offset of the cluster.
        offset: u64,
        /// The largest count the image can store.
        max: u64,
    },

    /// The operation is not available from this backend (e.g. applying an internal snapshot to
    /// a disk a running QEMU uses).
    #[error("{operation} is not supported by the {backend} backend: {reason}")]
    NotSupported {
        /// The operation.
        operation: &'static str,
        /// The backend, `live` or `offline`.
        backend: &'static str,
        /// Why, and what to do instead.
        reason: String,
    },

    /// A disk is not attached to the running QEMU (no block node has this image open).
    #[error("no block node of the running QEMU has {path} open")]
    NodeNotFound {
        /// The image looked for.
        path: PathBuf,
    },

    /// The image is not part of the disk's backing chain, or has no neighbour to merge with.
    #[error("cannot merge {image} out of the chain of {disk}: {reason}")]
    Chain {
        /// The disk's active image.
        disk: PathBuf,
        /// The image to remove.
        image: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// QEMU refused a command or a block job failed.
    #[cfg(feature = "live")]
    #[error("QMP {operation} failed for {path}")]
    Qmp {
        /// What was being done.
        operation: &'static str,
        /// The disk concerned (the first one for multi-disk transactions).
        path: PathBuf,
        /// QEMU's answer.
        #[source]
        source: qmp::Error,
    },

    /// A blocking task of the offline backend panicked or was cancelled.
    #[error("offline disk task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<durable::Error> for Error {
    fn from(e: durable::Error) -> Self {
        Error::Io {
            action: e.operation,
            path: e.path,
            source: e.source,
        }
    }
}

/// Builds an [`Error::Io`] for `map_err`.
pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_owned(),
        source,
    }
}
