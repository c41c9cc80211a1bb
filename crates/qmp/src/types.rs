//! Shared QAPI types and the open enum pattern.
//!
//! QAPI enums grow with every QEMU release. A closed Rust enum would make a newer QEMU's reply
//! undecodable, so every enum here has an `Other(String)` variant that keeps the unknown value.

use serde::{Deserialize, Serialize};

/// Declares an open QAPI string enum: known values as variants, anything else as `Other`.
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )*
            /// A value this version of the crate does not know (from a newer QEMU).
            Other(String),
        }

        impl $name {
            /// The value as it appears on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $wire, )*
                    Self::Other(value) => value,
                }
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                match value {
                    $( $wire => Self::$variant, )*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::from(value.as_ref()))
            }
        }
    };
}
pub(crate) use qapi_enum;

/// The server's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// The QEMU version.
    pub version: VersionInfo,
    /// Capabilities the server offers, e.g. `oob`.
    pub capabilities: Vec<String>,
}

/// `query-version`'s reply, also found in the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The numeric version.
    pub qemu: VersionTriple,
    /// The distribution's package string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
}

/// A QEMU version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version (field order matters for `Ord`).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl std::fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The reply of commands that return nothing (`{}`). Extra fields are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

qapi_enum! {
    /// A VM's run state (`RunState`).
    pub enum RunState {
        /// QEMU is running in debug mode.
        Debug = "debug",
        /// Waiting for an incoming migration.
        InMigrate = "inmigrate",
        /// An internal error stopped the VM.
        InternalError = "internal-error",
        /// An I/O error stopped the VM.
        IoError = "io-error",
        /// Paused by `stop`.
        Paused = "paused",
        /// After an outgoing migration completed.
        PostMigrate = "postmigrate",
        /// Not started yet (`-S`).
        Prelaunch = "prelaunch",
        /// Finishing an outgoing migration.
        FinishMigrate = "finish-migrate",
        /// Loading a snapshot.
        RestoreVm = "restore-vm",
        /// Running.
        Running = "running",
        /// Saving a snapshot.
        SaveVm = "save-vm",
        /// Shut down (with `-no-shutdown`).
        Shutdown = "shutdown",
        /// Suspended (ACPI S3).
        Suspended = "suspended",
        /// Stopped by the watchdog.
        Watchdog = "watchdog",
        /// The guest panicked.
        GuestPanicked = "guest-panicked",
        /// COLO mode.
        Colo = "colo",
    }
}

qapi_enum! {
    /// The status of a background job (`JobStatus`).
    pub enum JobStatus {
        /// Not yet defined.
        Undefined = "undefined",
        /// Created, not started.
        Created = "created",
        /// Running.
        Running = "running",
        /// Paused.
        Paused = "paused",
        /// Ready for `job-complete`.
        Ready = "ready",
        /// Paused while ready.
        Standby = "standby",
        /// Waiting for other jobs of its transaction.
        Waiting = "waiting",
        /// Waiting for `job-finalize`.
        Pending = "pending",
        /// Being aborted.
        Aborting = "aborting",
        /// Finished; waiting for `job-dismiss`.
        Concluded = "concluded",
        /// Gone.
        Null = "null",
    }
}

qapi_enum! {
    /// The kind of a background job (`JobType`).
    pub enum JobType {
        /// `block-commit`.
        Commit = "commit",
        /// `block-stream`.
        Stream = "stream",
        /// Mirror.
        Mirror = "mirror",
        /// Backup.
        Backup = "backup",
        /// `blockdev-create`.
        Create = "create",
        /// Image amendment.
        Amend = "amend",
        /// `snapshot-load`.
        SnapshotLoad = "snapshot-load",
        /// `snapshot-save`.
        SnapshotSave = "snapshot-save",
        /// `snapshot-delete`.
        SnapshotDelete = "snapshot-delete",
    }
}

qapi_enum! {
    /// The state of a migration (`MigrationStatus`).
    pub enum MigrationStatus {
        /// No migration has run.
        None = "none",
        /// Setting up.
        Setup = "setup",
        /// Being cancelled.
        Cancelling = "cancelling",
        /// Cancelled.
        Cancelled = "cancelled",
        /// In progress.
        Active = "active",
        /// Post-copy: devices.
        PostcopyDevice = "postcopy-device",
        /// Post-copy in progress.
        PostcopyActive = "postcopy-active",
        /// Post-copy paused.
        PostcopyPaused = "postcopy-paused",
        /// Post-copy recovery setup.
        PostcopyRecoverSetup = "postcopy-recover-setup",
        /// Post-copy recovering.
        PostcopyRecover = "postcopy-recover",
        /// Finished successfully.
        Completed = "completed",
        /// Failed.
        Failed = "failed",
        /// COLO.
        Colo = "colo",
        /// Paused before switch-over.
        PreSwitchover = "pre-switchover",
        /// Migrating device state.
        Device = "device",
        /// Waiting for unplug.
        WaitUnplug = "wait-unplug",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_enums_keep_unknown_values() {
        let known: RunState = serde_json::from_str("\"running\"").unwrap();
        assert_eq!(known, RunState::Running);
        let unknown: RunState = serde_json::from_str("\"hibernating-in-2030\"").unwrap();
        assert_eq!(unknown, RunState::Other("hibernating-in-2030".into()));
        assert_eq!(
            serde_json::to_string(&unknown).unwrap(),
            "\"hibernating-in-2030\""
        );
        assert_eq!(
            serde_json::to_string(&JobStatus::Concluded).unwrap(),
            "\"concluded\""
        );
        assert!(serde_json::from_str::<RunState>("3").is_err());
    }

    #[test]
    fn versions_order_numerically() {
        let v = |major, minor, micro| VersionTriple { major, minor, micro };
        assert!(v(10, 0, 2) > v(9, 2, 10));
        assert_eq!(v(10, 0, 2).to_string(), "10.0.2");
    }
}
