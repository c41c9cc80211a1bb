//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in this crate. Each variant's message names what was being done and
/// with which object, so a caller can print it as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A guest memory region was described wrongly (alignment, size, overflow).
    #[error("invalid guest memory region at {gpa:#x} (length {len:#x}): {reason}")]
    InvalidRegion {
        /// Guest-physical base of the region.
        gpa: u64,
        /// Length of the region in bytes.
        len: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two guest memory regions cover the same guest-physical addresses.
    #[error("guest memory regions overlap at guest address {gpa:#x}")]
    OverlappingRegions {
        /// Base of the second of the overlapping regions.
        gpa: u64,
    },
    /// mmap of a region failed.
    #[error("cannot map guest memory region at {gpa:#x} (length {len:#x})")]
    Map {
        /// Guest-physical base of the region.
        gpa: u64,
        /// Length of the region in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A guest-physical range that is not inside one region.
    #[error("guest range {gpa:#x} (length {len:#x}) is not inside one guest memory region")]
    OutOfBounds {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done ("write page data to", "rename", ...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The data does not start with the expected magic number.
    #[error("not a domsnap memory {kind}: magic is {found:02x?}")]
    BadMagic {
        /// "image" or "stream".
        kind: &'static str,
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The format version is not one this build reads.
    #[error("unsupported memory {kind} format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// "image" or "stream".
        kind: &'static str,
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A metadata block is damaged or inconsistent.
    #[error("corrupt memory {kind}: {what}")]
    Corrupt {
        /// "image" or "stream".
        kind: &'static str,
        /// What is wrong, naming the block.
        what: String,
    },
    /// A stored page does not match its checksum.
    #[error("corrupt memory {kind}: page {page} (guest address {gpa:#x}) {what}")]
    PageCorrupt {
        /// "image" or "stream".
        kind: &'static str,
        /// Page index in the image.
        page: u64,
        /// Guest-physical address of the page.
        gpa: u64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The image file is shorter or longer than its header says.
    #[error("memory image has the wrong length: {expected} bytes expected, {found} found (truncated or not sealed)")]
    Truncated {
        /// Length the header and footer describe.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// The stream ended before its end record.
    #[error("memory stream ended early, after {records} records and no end record")]
    StreamTruncated {
        /// Records read before the end.
        records: u64,
    },
    /// The image describes different regions than the memory it is restored into.
    #[error("memory image regions do not match the target memory: {detail}")]
    RegionMismatch {
        /// Which region differs, and how.
        detail: String,
    },
    /// Something declared by an input is bigger than the configured limit.
    #[error("{what} is {value} bytes, over the limit of {limit}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A dirty-page source failed.
    #[error("dirty-page source `{source_name}`: cannot {op}")]
    DirtyTracking {
        /// Name of the source.
        source_name: &'static str,
        /// What it was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the stream form failed.
    #[error("cannot write memory stream")]
    StreamWrite(#[source] io::Error),
    /// A page number given to an import is outside the image.
    #[error("page {page} is outside the image's {pages} pages")]
    PageOutOfRange {
        /// The page number given.
        page: u64,
        /// Pages in the image.
        pages: u64,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<durable::Error> for Error {
    /// A durable write's failure, worded like the crate's own I/O errors ("cannot fsync ...").
    fn from(e: durable::Error) -> Self {
        Error::Io {
            op: e.operation.strip_prefix("cannot ").unwrap_or(e.operation),
            path: e.path,
            source: e.source,
        }
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(kind: &'static str, what: impl Into<String>) -> Self {
        Error::Corrupt {
            kind,
            what: what.into(),
        }
    }
}
