//! Snapshot metadata: what a snapshot holds and how it relates to the others.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::name::Name;

/// Version of the metadata layout; bumped on incompatible changes.
pub const METADATA_VERSION: u32 = 1;

/// The domain's state when the snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// No hypervisor process.
    ShutOff,
}

impl std::fmt::Display for DomainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShutOff => "shut off",
        })
    }
}

/// The moment the memory image represents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// The end of the operation: paused saves and pre-copy (the final pause).
    End,
    /// The start of the operation: write-protect background snapshots.
    Start,
}

/// Memory and device state saved with a snapshot, as files in the snapshot's folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// The memory image's file name.
    pub image: String,
    /// The device-state file's name.
    pub device_state: String,
    /// When the memory was consistent.
    pub consistency: Consistency,
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// The memory image's absolute path when the caller chose where it goes; absent: `image`
    /// in the snapshot's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_path: Option<PathBuf>,
}

/// How one disk was snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DiskSnapshot {
    /// A named snapshot inside the image.
    Internal {
        /// The snapshot's name in the image.
        name: String,
    },
    /// A new overlay on top of the image, which became the snapshot (read-only from then on).
    External {
        /// The overlay the domain writes to after the snapshot.
        overlay: PathBuf,
        /// The overlay's format (qcow2 by default).
        format: String,
    },
    /// Left out of the snapshot: a revert leaves the disk as it is.
    Excluded,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The disk's target id in the domain configuration (e.g. `vda`).
    pub target: String,
    /// The image the snapshot covers: for an external snapshot, the image under the overlay.
    pub image: PathBuf,
    /// How it was snapshotted.
    pub snapshot: DiskSnapshot,
}

/// Everything known about one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Layout version ([`METADATA_VERSION`]).
    pub version: u32,
    /// The snapshot's name.
    pub name: Name,
    /// The domain it belongs to.
    pub domain: Name,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The snapshot this one was taken after (the domain's current snapshot then).
    #[serde(default)]
    pub parent: Option<Name>,
    /// The domain's state when it was taken.
    pub state: DomainState,
    /// The domain's configuration then, as the driver describes it.
    pub config: serde_json::Value,
    /// Memory and device state; `None` for disk-only snapshots.
    #[serde(default)]
    pub memory: Option<MemoryState>,
    /// One record per disk.
    pub disks: Vec<DiskRecord>,
    /// The guest's filesystems were frozen through its agent while it was taken: the disks
    /// hold clean filesystems, and a guest restored from its memory starts frozen (a revert
    /// thaws it). Absent in records of older versions and when not quiesced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiesced: bool,
    /// Why the snapshot cannot be reverted to, as the last rescan found (`None`: nothing is
    /// known to be missing). A revert of a broken snapshot is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<Broken>,
    /// The backing chain under each disk's image (disk target → the images below it, nearest
    /// first), as a rescan first found it complete: what later rescans compare against.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub chains: BTreeMap<String, Vec<PathBuf>>,
}

/// A snapshot whose disk part is gone or changed, found by a rescan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broken {
    /// When a rescan first found it broken, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
    /// What is missing or changed, one line per problem, each naming the disk and the file.
    pub reasons: Vec<String>,
}
