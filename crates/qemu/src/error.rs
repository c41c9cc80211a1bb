//! The driver's error type.

use std::{io, path::PathBuf};

use snapshot_core::{ErrorClass, Name};

use crate::migration_stream::StreamError;

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

    /// No domain of this name is defined in the state directory.
    #[error("domain {domain} is not defined")]
    UnknownDomain {
        /// The domain.
        domain: Name,
    },

    /// The domain needs to be shut off for this.
    #[error("cannot {action} domain {domain} while its QEMU runs (pid {pid}); stop it first")]
    Running {
        /// The domain.
        domain: Name,
        /// What was refused, e.g. "start".
        action: &'static str,
        /// QEMU's pid.
        pid: u32,
    },

    /// A quiesce was asked of a domain whose configuration has no guest agent channel.
    #[error(
        "domain {domain} has no guest agent channel: set guest_agent = true in its configuration \
         (and run qemu-guest-agent in the guest)"
    )]
    NoGuestAgent {
        /// The domain.
        domain: Name,
    },

    /// The guest agent could not do what was asked.
    #[error("cannot {action} domain {domain} through its guest agent")]
    GuestAgent {
        /// The domain.
        domain: Name,
        /// What failed, e.g. "freeze the filesystems of".
        action: &'static str,
        /// The agent's error.
        #[source]
        source: qmp::Error,
    },

    /// A host port forward could not be added to the QEMU that took over from the old one (a
    /// revert's standby): another process may have bound the port meanwhile.
    #[error("domain {domain}: cannot forward host port ({rule}) to the new QEMU: {reason}")]
    HostForward {
        /// The domain.
        domain: Name,
        /// The `hostfwd` rule.
        rule: String,
        /// What QEMU said.
        reason: String,
    },

    /// A revert's standby QEMU was asked for (to promote it, to reach its RAM), but there is none.
    #[error("domain {domain} has no standby QEMU (none was started, or it has exited)")]
    NoStandby {
        /// The domain.
        domain: Name,
    },

    /// The domain has no QEMU process.
    #[error("domain {domain} is shut off")]
    NotRunning {
        /// The domain.
        domain: Name,
    },

    /// The domain's QEMU is in the wrong run state for this.
    #[error("domain {domain} is {state}: {hint}")]
    WrongState {
        /// The domain.
        domain: Name,
        /// QEMU's run state, e.g. `paused`.
        state: String,
        /// What to do about it.
        hint: &'static str,
    },

    /// Another process has been starting or stopping the domain for too long.
    #[error("domain {domain} is busy: another process has been starting or stopping it for {seconds} s")]
    Busy {
        /// The domain.
        domain: Name,
        /// How long this process waited.
        seconds: u64,
    },

    /// A file in the state directory (or the RAM file) cannot be read, written or removed.
    #[error("{operation} {path}")]
    Io {
        /// What was being done, e.g. "cannot create".
        operation: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The domain definition cannot be written.
    #[error("cannot save the definition of domain {domain}")]
    SaveDefinition {
        /// The domain.
        domain: Name,
        /// The store's error (it names the file); boxed, as it is large.
        #[source]
        source: Box<snapshot_core::Error>,
    },

    /// A Unix socket path is longer than `sun_path` allows.
    #[error(
        "socket path {path} is {len} bytes, longer than the {max} bytes a Unix socket path may have; \
         use a shorter state directory"
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// The QEMU binary cannot be run.
    #[error(
        "cannot run {binary}: install QEMU 10 (`cargo xtask setup`) or set DOMSNAP_QEMU to a \
         qemu-system-x86_64 of version 10"
    )]
    QemuNotFound {
        /// The binary tried.
        binary: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The QEMU binary is not QEMU 10.
    #[error("{binary} must be QEMU 10.x, but it says {found:?}; set DOMSNAP_QEMU to a QEMU 10 binary")]
    QemuVersion {
        /// The binary.
        binary: PathBuf,
        /// The first line of its `--version` output.
        found: String,
    },

    /// QEMU exited or failed while starting the domain.
    #[error("QEMU failed to start domain {domain} ({reason}){}", stderr_tail(stderr))]
    StartFailed {
        /// The domain.
        domain: Name,
        /// What happened, e.g. its exit status.
        reason: String,
        /// The end of QEMU's stderr (`run/qemu.log`).
        stderr: String,
    },

    /// The domain's QMP socket cannot be connected to.
    #[error(
        "cannot talk to the QEMU of domain {domain} on {socket} (QEMU serves one QMP client at a \
         time: another domsnap process may be connected)"
    )]
    QmpConnect {
        /// The domain.
        domain: Name,
        /// The socket.
        socket: PathBuf,
        /// The connection error.
        #[source]
        source: qmp::Error,
    },

    /// A QMP command on the domain's QEMU failed.
    #[error("domain {domain}: QMP failed while {operation}")]
    DomainQmp {
        /// The domain.
        domain: Name,
        /// What was being done.
        operation: &'static str,
        /// QEMU's answer or the connection error.
        #[source]
        source: qmp::Error,
    },

    /// A memory image cannot be mapped as a domain's RAM (damaged metadata, another size, a
    /// layout QEMU does not share).
    #[error("cannot map memory image {image} as the RAM of domain {domain}: {reason}")]
    MappedImage {
        /// The domain.
        domain: Name,
        /// The snapshot's memory image.
        image: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The domain's RAM is mapped from a snapshot's memory image, privately to QEMU.
    #[error(
        "the RAM of domain {domain} is mapped from snapshot memory image {image} (copy-on-write, \
         since a lazy revert) and cannot be shared with domsnap; a revert with --eager gives the \
         domain shared RAM"
    )]
    RamNotShared {
        /// The domain.
        domain: Name,
        /// The image (or its link, if the image's path was not recorded).
        image: PathBuf,
    },

    /// The guest ignored the ACPI power button.
    #[error("domain {domain}: the guest did not power off within {seconds} s; use --force")]
    PowerOffTimeout {
        /// The domain.
        domain: Name,
        /// How long the driver waited.
        seconds: u64,
    },

    /// QEMU survived SIGKILL (or signalling it failed).
    #[error("cannot end QEMU (pid {pid}) of domain {domain}: {reason}")]
    Kill {
        /// The domain.
        domain: Name,
        /// QEMU's pid.
        pid: u32,
        /// What went wrong.
        reason: String,
    },

    /// Saving or loading the device state failed.
    #[error(
        "domain {domain}: cannot {operation} device state {path}: {reason}{}",
        stderr_tail(stderr)
    )]
    DeviceState {
        /// The domain.
        domain: Name,
        /// "save" or "load".
        operation: &'static str,
        /// The device-state file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
        /// The end of QEMU's stderr, when it may tell more.
        stderr: String,
    },

    /// The guest RAM file cannot be mapped.
    #[error("cannot map the guest RAM of domain {domain}")]
    Memory {
        /// The domain.
        domain: Name,
        /// The mapping error.
        #[source]
        source: memory::Error,
    },

    /// The QEMU migration stream cannot be parsed: refused, cut short, unreadable, or its pages or
    /// device state cannot be stored (the parser's own error, with its message).
    #[error(transparent)]
    MigrationStream(#[from] StreamError),

    /// The stream did not carry every page of guest RAM.
    #[error("QEMU's migration stream did not carry {missing} pages of guest RAM")]
    StreamIncomplete {
        /// Pages never sent.
        missing: u64,
    },

    /// The socket QEMU streams into cannot be set up.
    #[error("cannot set up the socket for QEMU's migration stream")]
    StreamSocket {
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The caller of a background snapshot gave up before it started.
    #[error("the memory snapshot was abandoned before QEMU captured the state")]
    CaptureAbandoned,

    /// Pre-copy did not reach its switch-over in time; it was cancelled, the guest runs on.
    #[error(
        "QEMU's pre-copy did not converge within {} s ({passes} passes; {remaining_mib} MiB still to \
         send, the guest dirties {dirty_pages_per_second} pages/s): allow a longer pause \
         (--max-downtime), more time (--converge-within), or use --live-mode background",
        after.as_secs_f64()
    )]
    NotConverged {
        /// The time allowed.
        after: std::time::Duration,
        /// What was left to send, MiB.
        remaining_mib: u64,
        /// QEMU's measured dirty rate.
        dirty_pages_per_second: u64,
        /// Passes over RAM so far.
        passes: u64,
    },

    /// Another migration runs on the QEMU.
    #[error("QEMU is busy with another migration (status {status}); it runs one at a time")]
    MigrationBusy {
        /// QEMU's migration status.
        status: String,
    },

    /// QEMU's migration settings would change the stream into one the parser does not read.
    #[error("QEMU's migration settings do not allow a memory snapshot: {reason}")]
    MigrationSettings {
        /// Which settings.
        reason: String,
    },

    /// QEMU's migration into the memory snapshot failed.
    #[error("QEMU's migration into the memory snapshot failed: {reason}")]
    MigrationFailed {
        /// QEMU's `error-desc`, or what went wrong.
        reason: String,
    },

    /// QEMU reports a disk on an image outside the chain domsnap expects for it.
    #[error(
        "domain {domain}: QEMU reports disk {disk} on {}, which is neither its defined image {} nor \
         an image backed by it; the definition keeps {}",
        image.display(),
        defined.display(),
        defined.display()
    )]
    UnexpectedImage {
        /// The domain.
        domain: Name,
        /// The disk id.
        disk: String,
        /// The image QEMU reports.
        image: PathBuf,
        /// The image in the definition.
        defined: PathBuf,
    },

    /// A snapshot was taken on a machine (type, QEMU version, accelerator) this host cannot
    /// restore; the domain was not touched.
    #[error("domain {domain} cannot be restored to this snapshot here: {reason}")]
    NotRestorable {
        /// The domain.
        domain: Name,
        /// What differs.
        reason: String,
    },

    /// QEMU refuses to migrate (and so to snapshot with memory) the domain.
    #[error(
        "domain {domain} cannot be snapshotted with its memory: QEMU cannot save its state ({}); \
         take a disk-only snapshot (--disk-only) or remove what blocks it",
        reasons.join("; ")
    )]
    MigrationBlocked {
        /// The domain.
        domain: Name,
        /// QEMU's reasons (`query-migrate`'s `blocked-reasons`).
        reasons: Vec<String>,
    },

    /// The domain's RAM cannot be made in huge pages (`hugepages` in its configuration).
    #[error("domain {domain}: cannot give it RAM in huge pages from {}", mount.display())]
    HugePages {
        /// The domain.
        domain: Name,
        /// The hugetlbfs mount.
        mount: PathBuf,
        /// Why.
        #[source]
        source: crate::hugepages::HugePageError,
    },

    /// The firmware a domain needs is missing, or its NVRAM image cannot be made.
    #[error("domain {domain}: {reason}")]
    Firmware {
        /// The domain.
        domain: Name,
        /// What is wrong.
        reason: String,
    },

    /// The memory image cannot be written.
    #[error("cannot write the memory image {path}")]
    MemoryImage {
        /// The image's destination.
        path: PathBuf,
        /// The memory crate's error.
        #[source]
        source: memory::Error,
    },
}

impl Error {
    /// The error's class (shared with the CLI and the C API, see [`snapshot_core::ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::ReadConfig { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorClass::NotFound
            }
            Error::UnknownDomain { .. } => ErrorClass::NotFound,
            Error::InvalidConfig { .. }
            | Error::SocketPathTooLong { .. }
            | Error::Running { .. }
            | Error::NotRunning { .. }
            | Error::WrongState { .. }
            | Error::UnexpectedImage { .. }
            | Error::NotRestorable { .. }
            | Error::HugePages {
                source: crate::hugepages::HugePageError::Mount(_),
                ..
            } => ErrorClass::InvalidArgument,
            Error::NoGuestAgent { .. } => ErrorClass::Unsupported,
            Error::Busy { .. } | Error::MigrationBusy { .. } => ErrorClass::Busy,
            Error::MigrationSettings { .. } | Error::MigrationBlocked { .. } => ErrorClass::Unsupported,
            Error::SaveDefinition { source, .. } => source.class(),
            _ => ErrorClass::Failed,
        }
    }
}

/// The class of an error a snapshot operation or a domain call reports: the orchestrator's
/// classes, with this driver's own errors (a domain call's source) classified by
/// [`Error::class`]. Errors of neither crate are [`ErrorClass::Failed`].
pub fn error_class(error: &(dyn std::error::Error + 'static)) -> ErrorClass {
    if let Some(error) = error.downcast_ref::<Error>() {
        return error.class();
    }
    match error.downcast_ref::<snapshot_core::Error>() {
        Some(error) => error.class_with(|source| source.downcast_ref::<Error>().map(Error::class)),
        None => ErrorClass::Failed,
    }
}

/// A durable write's failure is an [`Error::Io`]: the same operation, file and OS error.
impl From<durable::Error> for Error {
    fn from(error: durable::Error) -> Self {
        let durable::Error {
            operation,
            path,
            source,
        } = error;
        Error::Io {
            operation,
            path,
            source,
        }
    }
}

/// Formats the end of QEMU's stderr for an error message (nothing when it is empty).
fn stderr_tail(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("; QEMU said:\n{}", stderr.trim_end())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_have_classes_through_the_orchestrator_too() {
        let domain = Name::new("d").unwrap();
        let unknown = Error::UnknownDomain {
            domain: domain.clone(),
        };
        assert_eq!(error_class(&unknown), ErrorClass::NotFound);
        let wrapped = snapshot_core::Error::Driver {
            domain,
            action: "undefine",
            source: Box::new(unknown),
        };
        assert_eq!(wrapped.class(), ErrorClass::Failed);
        assert_eq!(error_class(&wrapped), ErrorClass::NotFound);
        assert_eq!(error_class(&std::fmt::Error), ErrorClass::Failed);
        let missing = Error::ReadConfig {
            path: "/none.toml".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(missing.class(), ErrorClass::NotFound);
    }
}
