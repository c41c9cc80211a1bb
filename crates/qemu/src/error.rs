//! The driver's error type.

use std::{io, path::PathBuf};

/// What can go wrong driving a QEMU domain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file cannot be read.
    #[error("cannot read domain configuration {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The configuration is malformed or has values out of range.
    #[error("invalid domain configuration{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    InvalidConfig {
        /// The file, when it came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },

    /// QEMU refused or failed a QMP command.
    #[error("QMP failed while {operation}")]
    Qmp {
        /// What was being done.
        operation: &'static str,
        /// QEMU's answer or the connection error.
        #[source]
        source: qmp::Error,
    },

    /// QEMU's memory map does not describe the RAM file the way the driver needs.
    #[error("cannot read the guest RAM layout: {reason}")]
    RamLayout {
        /// What is wrong.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
