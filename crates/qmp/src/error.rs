//! The crate's one error type.

use std::{io, sync::Arc, time::Duration};

/// Everything that can go wrong talking QMP.
///
/// Connection-level failures ([`Error::Disconnected`]) are shared by every call that was pending
/// when the connection died, so they carry their reason as a cheaply cloneable string.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the QMP socket failed.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// The socket path.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// Connecting to a guest agent's socket failed.
    #[error("cannot connect to the guest agent's socket {path}")]
    AgentConnect {
        /// The socket path.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// The server's first message was not a valid QMP greeting, or capability negotiation failed.
    #[error("QMP handshake failed: {reason}")]
    Handshake {
        /// What was wrong.
        reason: String,
    },

    /// The server sent something that is not valid QMP.
    #[error("QMP protocol violation: {reason}")]
    Protocol {
        /// What was wrong, with a short excerpt of the offending message.
        reason: String,
    },

    /// A message was longer than the configured bound; the connection is closed to stay safe.
    #[error("QMP message exceeds the {limit}-byte limit")]
    MessageTooLong {
        /// The bound in bytes ([`crate::ClientOptions::max_message_len`]).
        limit: usize,
    },

    /// The connection is gone; every pending and future call fails with this.
    #[error("QMP connection closed: {reason}")]
    Disconnected {
        /// Why the connection ended (peer closed, I/O error, protocol violation, ...).
        reason: Arc<str>,
    },

    /// Writing a command to the socket failed.
    #[error("sending QMP command `{command}` failed")]
    Send {
        /// The command name.
        command: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// QEMU answered the command with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// QEMU's error class, usually `GenericError`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The command got no answer in time. A late answer is discarded.
    #[error("QMP command `{command}` timed out after {after:?}")]
    Timeout {
        /// The command name.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },

    /// The command's arguments could not be serialised.
    #[error("cannot encode arguments of QMP command `{command}`")]
    EncodeArguments {
        /// The command name.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// The command's reply did not have the expected shape.
    #[error("unexpected reply to QMP command `{command}`")]
    DecodeReply {
        /// The command name.
        command: String,
        /// The serde error, naming the field.
        #[source]
        source: serde_json::Error,
    },

    /// File descriptors can only be passed over a Unix socket transport.
    #[error("QMP command `{command}` passes file descriptors, but the transport is not a Unix socket")]
    FdPassingUnsupported {
        /// The command name.
        command: String,
    },

    /// `exec-oob` was requested but out-of-band execution was not negotiated.
    #[error("QMP command `{command}` asked for out-of-band execution, which was not negotiated")]
    OobNotEnabled {
        /// The command name.
        command: String,
    },

    /// The guest agent did not answer a request in time.
    #[error(
        "the guest agent did not answer `{command}` within {after:?} (is qemu-ga running in the guest, \
         and is the guest running?)"
    )]
    AgentTimeout {
        /// The agent command.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },

    /// No matching event arrived in time.
    #[error("no matching QMP event within {after:?}")]
    EventTimeout {
        /// The timeout that expired.
        after: Duration,
    },

    /// An event subscriber fell so far behind that events were dropped.
    #[error("QMP event subscriber lagged and missed {missed} events")]
    EventsLagged {
        /// How many events were lost.
        missed: u64,
    },

    /// A background job ended with an error.
    #[error("QMP job `{job_id}` failed: {error}")]
    JobFailed {
        /// The job id.
        job_id: String,
        /// The job's error message as reported by QEMU.
        error: String,
    },

    /// A background job disappeared or stopped in a state the helper cannot continue from.
    #[error("QMP job `{job_id}`: {reason}")]
    JobLost {
        /// The job id.
        job_id: String,
        /// What happened.
        reason: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The QMP error class when QEMU rejected a command, e.g. `GenericError` or `DeviceNotFound`.
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// Whether the connection is unusable after this error.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            Error::Disconnected { .. } | Error::Protocol { .. } | Error::MessageTooLong { .. }
        )
    }
}
