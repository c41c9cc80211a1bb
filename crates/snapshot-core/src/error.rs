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

    /// The snapshot is marked broken (a rescan found part of it gone or changed): it cannot be
    /// reverted to. Nothing was changed.
    #[error(
        "snapshot {snapshot} of domain {domain} is broken: {}; `domsnap snapshot rescan {domain}` \
         unmarks it once its parts are back",
        .reasons.join("; ")
    )]
    Broken {
        /// The domain.
        domain: Name,
        /// The snapshot.
        snapshot: Name,
        /// What is missing or changed, as the rescan found.
        reasons: Vec<String>,
    },

    /// The request cannot be carried out as asked (nothing was changed).
    #[error("{0}")]
    InvalidRequest(String),

    /// The request is well formed but asks for something domsnap cannot do (yet), e.g. an
    /// overlay format other than qcow2 (nothing was changed).
    #[error("{0}")]
    Unsupported(String),

    /// Another process holds the domain's lock.
    #[error("domain {domain} is busy: another domsnap command{holder} holds its lock")]
    Locked {
        /// The domain.
        domain: Name,
        /// " (pid N)" when the holder's pid is known, else empty.
        holder: String,
    },
}

/// The class of an error: what a caller (a script, a C toolstack) may do about it. The CLI's
/// JSON errors and exit codes and the C API's codes are these classes; the serialised names
/// (snake case) are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// A domain, snapshot, file or disk named in the request does not exist.
    NotFound,
    /// A snapshot of that name exists already.
    AlreadyExists,
    /// Another command holds the domain (its lock, or a start or stop in progress); try again.
    Busy,
    /// The request is invalid as given or in the domain's current state: a bad name, an unknown
    /// disk, an overlay path that exists, a start of a running domain. Nothing was changed.
    InvalidArgument,
    /// The request asks for something domsnap cannot do (yet). Nothing was changed.
    Unsupported,
    /// A snapshot operation failed at a step and everything it had done was undone.
    FailedRolledBack,
    /// A snapshot operation failed and its undo failed too: the error lists what is left, and
    /// the intent record stays for `recover`.
    FailedIncompleteRollback,
    /// Any other failure outside a snapshot operation's steps: an I/O error in the state
    /// directory, the hypervisor failing a domain call (a start, a stop), corrupt metadata.
    Failed,
    /// A bug: a panic caught at the API boundary, or an impossible state.
    Internal,
}

impl ErrorClass {
    /// Every class, in the order of their C codes (1, 2, ...).
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::NotFound,
        ErrorClass::AlreadyExists,
        ErrorClass::Busy,
        ErrorClass::InvalidArgument,
        ErrorClass::Unsupported,
        ErrorClass::FailedRolledBack,
        ErrorClass::FailedIncompleteRollback,
        ErrorClass::Failed,
        ErrorClass::Internal,
    ];

    /// The serialised name, e.g. `not_found`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::NotFound => "not_found",
            ErrorClass::AlreadyExists => "already_exists",
            ErrorClass::Busy => "busy",
            ErrorClass::InvalidArgument => "invalid_argument",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::FailedRolledBack => "failed_rolled_back",
            ErrorClass::FailedIncompleteRollback => "failed_incomplete_rollback",
            ErrorClass::Failed => "failed",
            ErrorClass::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The step of a snapshot operation that failed, and what its undo could not undo.
#[derive(Debug, Clone, Copy)]
pub struct FailedStep<'e> {
    /// The operation.
    pub operation: Operation,
    /// The step that failed.
    pub step: Step,
    /// Undo steps that failed in turn (empty: everything was undone).
    pub rollback: &'e [String],
}

impl Error {
    /// This error's class; a driver's errors ([`Error::Driver`]) are [`ErrorClass::Failed`]
    /// (see [`Error::class_with`]).
    pub fn class(&self) -> ErrorClass {
        self.class_with(|_| None)
    }

    /// This error's class, asking `driver` to classify a driver's error ([`Error::Driver`]'s
    /// source: the driver knows its own errors, e.g. a domain that is not defined); `None`
    /// from it means [`ErrorClass::Failed`].
    pub fn class_with(&self, driver: impl Fn(&DriverError) -> Option<ErrorClass>) -> ErrorClass {
        match self {
            Error::InvalidName(_) | Error::InvalidRequest(_) | Error::Broken { .. } => {
                ErrorClass::InvalidArgument
            }
            Error::Unsupported(_) => ErrorClass::Unsupported,
            Error::SnapshotNotFound { .. } => ErrorClass::NotFound,
            Error::SnapshotExists { .. } => ErrorClass::AlreadyExists,
            Error::Locked { .. } => ErrorClass::Busy,
            Error::Failed { rollback, .. } if rollback.is_empty() => ErrorClass::FailedRolledBack,
            Error::Failed { .. } => ErrorClass::FailedIncompleteRollback,
            Error::Driver { source, .. } => driver(source).unwrap_or(ErrorClass::Failed),
            Error::Io { .. } | Error::CorruptMetadata { .. } => ErrorClass::Failed,
        }
    }

    /// The failed step of a snapshot operation ([`Error::Failed`]), if this is one.
    pub fn failed_step(&self) -> Option<FailedStep<'_>> {
        match self {
            Error::Failed {
                operation,
                step,
                rollback,
                ..
            } => Some(FailedStep {
                operation: *operation,
                step: *step,
                rollback,
            }),
            _ => None,
        }
    }
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
    /// Freezing the guest's filesystems through its agent (a quiesced create).
    Freeze,
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
    /// Thawing the guest's filesystems (after a quiesced create, or a revert to one).
    Thaw,
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
    /// Starting the domain's new process beside the running one, to receive the snapshot's
    /// state (a revert whose hypervisor can run both at once).
    StartStandby,
    /// Stopping the domain's process.
    Stop,
    /// Reverting the disks.
    RevertDisks,
    /// Restoring the domain's configuration.
    Define,
    /// Starting the domain to receive state.
    StartIncoming,
    /// Making the new process started beside the old one the domain's process.
    PromoteStandby,
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
            Step::Freeze => "freezing the guest's filesystems",
            Step::Precopy => "copying memory while the domain runs",
            Step::Pause => "pausing the domain",
            Step::SaveMemory => "saving memory",
            Step::SaveDeviceState => "saving device state",
            Step::SnapshotDisks => "snapshotting the disks",
            Step::Capture => "capturing the domain's state",
            Step::Resume => "resuming the domain",
            Step::Thaw => "thawing the guest's filesystems",
            Step::SealMemory => "sealing the memory image",
            Step::Commit => "writing the snapshot record",
            Step::DeleteDisks => "deleting the disk snapshots",
            Step::RemoveFiles => "removing the snapshot's files",
            Step::UpdateTree => "updating the snapshot tree",
            Step::Check => "checking the snapshot",
            Step::StartStandby => "starting the domain's new process beside the running one",
            Step::Stop => "stopping the domain",
            Step::RevertDisks => "reverting the disks",
            Step::Define => "restoring the domain configuration",
            Step::StartIncoming => "starting the domain to receive its state",
            Step::PromoteStandby => "switching the domain to its new process",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::new(text).unwrap()
    }

    fn failed(rollback: Vec<String>) -> Error {
        Error::Failed {
            operation: Operation::Create,
            domain: name("d"),
            snapshot: name("s"),
            step: Step::SnapshotDisks,
            source: "no".into(),
            rollback,
            domain_left: None,
        }
    }

    #[test]
    fn errors_have_classes_and_failed_steps() {
        assert_eq!(
            Name::new("../x").map_err(Error::from).unwrap_err().class(),
            ErrorClass::InvalidArgument
        );
        let missing = Error::SnapshotNotFound {
            domain: name("d"),
            snapshot: name("s"),
        };
        assert_eq!(missing.class(), ErrorClass::NotFound);
        assert!(missing.failed_step().is_none());
        assert_eq!(failed(Vec::new()).class(), ErrorClass::FailedRolledBack);
        let incomplete = failed(vec!["cannot resume".into()]);
        assert_eq!(incomplete.class(), ErrorClass::FailedIncompleteRollback);
        let step = incomplete.failed_step().unwrap();
        assert_eq!(
            (step.operation, step.step, step.rollback.len()),
            (Operation::Create, Step::SnapshotDisks, 1)
        );
        let driver = Error::Driver {
            domain: name("d"),
            action: "undefine",
            source: "gone".into(),
        };
        assert_eq!(driver.class(), ErrorClass::Failed);
        assert_eq!(
            driver.class_with(|_| Some(ErrorClass::NotFound)),
            ErrorClass::NotFound
        );
    }

    #[test]
    fn classes_serialise_to_their_stable_names() {
        for class in ErrorClass::ALL {
            assert_eq!(serde_json::to_value(class).unwrap(), class.as_str());
        }
        assert_eq!(
            ErrorClass::FailedIncompleteRollback.to_string(),
            "failed_incomplete_rollback"
        );
    }
}
