//! The crate's error type.

use std::{io, path::PathBuf};

use crate::name::Name;

/// What can go wrong in snapshot orchestration and its store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A domain or snapshot name breaks the naming rules.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// A file-system operation in the state directory failed.
    #[error("{operation} {path}")]
    Io {
        /// What was being done, e.g. "cannot write".
        operation: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// A metadata file exists but cannot be decoded.
    #[error("corrupt snapshot metadata in {path}")]
    CorruptMetadata {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },

    /// The snapshot does not exist.
    #[error("domain {domain} has no snapshot {snapshot}")]
    SnapshotNotFound {
        /// The domain.
        domain: Name,
        /// The snapshot.
        snapshot: Name,
    },

    /// A snapshot with this name exists already (or its folder does, from an unfinished create).
    #[error("domain {domain} already has a snapshot {snapshot}")]
    SnapshotExists {
        /// The domain.
        domain: Name,
        /// The snapshot.
        snapshot: Name,
    },

    /// Another process holds the domain's lock.
    #[error("domain {domain} is busy: another domsnap command{holder} holds its lock")]
    Locked {
        /// The domain.
        domain: Name,
        /// " (pid N)" when the holder's pid is known, else empty.
        holder: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::Io`] for `path`.
pub(crate) fn io_error(operation: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io {
        operation,
        path,
        source,
    }
}
