//! The crate's error type.

use std::{io, path::PathBuf};

use crate::name::{InvalidName, Name};

/// The error a driver reports; the orchestrator wraps it with the step that failed.
pub type DriverError = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong in snapshot orchestration and its store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A domain or snapshot name breaks the naming rules.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),

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

    /// A step of an operation failed. What the operation had done was undone, except what
    /// `rollback` lists.
    #[error("{operation} of snapshot {snapshot} of domain {domain} failed while {step}{}", rollback_note(.rollback, .domain_left))]
    Failed {
        /// The operation.
        operation: Operation,
        /// The domain.
        domain: Name,
        /// The snapshot.
        snapshot: Name,
        /// The step that failed.
        step: Step,
        /// Why.
        #[source]
        source: DriverError,
        /// Undo steps that failed in turn (empty: everything was undone).
        rollback: Vec<String>,
        /// The domain's state afterwards when it differs from before (a failed revert may
        /// leave it shut off once its old process is gone).
        domain_left: Option<String>,
    },

    /// The driver refused or failed a domain-level call (nothing else was changed).
    #[error("cannot {action} domain {domain}")]
    Driver {
        /// The domain.
        domain: Name,
        /// What was asked, e.g. "undefine".
        action: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },

    /// The request cannot be carried out as asked (nothing was changed).
    #[error("{0}")]
    InvalidRequest(String),

    /// Another process holds the domain's lock.
    #[error("domain {domain} is busy: another domsnap command{holder} holds its lock")]
    Locked {
        /// The domain.
        domain: Name,
        /// " (pid N)" when the holder's pid is known, else empty.
        holder: String,
    },
}

/// The operations of the orchestrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// Snapshot create.
    Create,
    /// Snapshot delete.
    Delete,
    /// Revert to a snapshot.
    Revert,
    /// Recovery of an interrupted operation.
    Recover,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Revert => "revert",
            Operation::Recover => "recovery",
        })
    }
}

/// The steps of the operations, named in errors and reported to [`crate::Observer`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Reading the domain's state, configuration and disks.
    Inspect,
    /// Writing the intent record.
    Intent,
    /// Pre-copy rounds while the domain runs.
    Precopy,
    /// Pausing the domain.
    Pause,
    /// Saving memory (paused save or the final pre-copy round).
    SaveMemory,
    /// Saving device state.
    SaveDeviceState,
    /// Snapshotting the disks.
    SnapshotDisks,
    /// Letting the hypervisor capture the state of a streamed save (the guest is paused).
    Capture,
    /// Resuming the domain.
    Resume,
    /// Sealing the memory image (fsync, rename).
    SealMemory,
    /// Writing the snapshot's record.
    Commit,
    /// Deleting the disk snapshots.
    DeleteDisks,
    /// Removing memory and device-state files and the record.
    RemoveFiles,
    /// Updating the snapshot tree (children, current).
    UpdateTree,
    /// Checking the snapshot before a revert touches the domain.
    Check,
    /// Stopping the domain's process.
    Stop,
    /// Reverting the disks.
    RevertDisks,
    /// Restoring the domain's configuration.
    Define,
    /// Starting the domain to receive state.
    StartIncoming,
    /// Loading memory.
    RestoreMemory,
    /// Loading device state.
    LoadDeviceState,
    /// Folding away and removing the overlays no snapshot needs any more.
    TidyDisks,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Inspect => "inspecting the domain",
            Step::Intent => "writing the intent record",
            Step::Precopy => "copying memory while the domain runs",
            Step::Pause => "pausing the domain",
            Step::SaveMemory => "saving memory",
            Step::SaveDeviceState => "saving device state",
            Step::SnapshotDisks => "snapshotting the disks",
            Step::Capture => "capturing the domain's state",
            Step::Resume => "resuming the domain",
            Step::SealMemory => "sealing the memory image",
            Step::Commit => "writing the snapshot record",
            Step::DeleteDisks => "deleting the disk snapshots",
            Step::RemoveFiles => "removing the snapshot's files",
            Step::UpdateTree => "updating the snapshot tree",
            Step::Check => "checking the snapshot",
            Step::Stop => "stopping the domain",
            Step::RevertDisks => "reverting the disks",
            Step::Define => "restoring the domain configuration",
            Step::StartIncoming => "starting the domain to receive its state",
            Step::RestoreMemory => "restoring memory",
            Step::LoadDeviceState => "loading device state",
            Step::TidyDisks => "folding away overlays no snapshot needs",
        })
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn rollback_note(rollback: &[String], domain_left: &Option<String>) -> String {
    let mut note = String::new();
    if !rollback.is_empty() {
        note.push_str(&format!("; rollback incomplete: {}", rollback.join("; ")));
    }
    if let Some(left) = domain_left {
        note.push_str(&format!("; {left}"));
    }
    note
}

impl From<durable::Error> for Error {
    fn from(e: durable::Error) -> Self {
        Error::Io {
            operation: e.operation,
            path: e.path,
            source: e.source,
        }
    }
}

/// Builds an [`Error::Io`] for `path`.
pub(crate) fn io_error(operation: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io {
        operation,
        path,
        source,
    }
}
