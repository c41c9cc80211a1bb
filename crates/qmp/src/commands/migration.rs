//! Migration commands: the state save/restore path (`migrate`, `migrate-incoming`,
//! `xen-save-devices-state`) and its settings.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::command;
use crate::types::{qapi_enum, Empty, MigrationStatus};

/// `migrate`: send the VM state to `uri` (`file:PATH`, `fd:NAME`, `unix:PATH`, ...).
/// Returns at once; watch [`QueryMigrate`] or `MIGRATION` events for the outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// Destination.
    pub uri: String,
}
command!(Migrate => "migrate", Empty);

/// `migrate-incoming`: load state from `uri` into a QEMU started with `-incoming defer`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    /// Source.
    pub uri: String,
}
command!(MigrateIncoming => "migrate-incoming", Empty);

/// `migrate-continue`: let a migration paused in `state` (with the `pause-before-switchover`
/// capability: [`MigrationStatus::PreSwitchover`]) go on.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateContinue {
    /// The state the migration waits in.
    pub state: MigrationStatus,
}
command!(MigrateContinue => "migrate-continue", Empty);

/// `migrate_cancel`: cancel the outgoing migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateCancel;
command!(MigrateCancel => "migrate_cancel", Empty);

qapi_enum! {
    /// A migration capability (`MigrationCapability`).
    pub enum MigrationCapability {
        /// XBZRLE page compression.
        Xbzrle = "xbzrle",
        /// Throttle the guest to converge.
        AutoConverge = "auto-converge",
        /// Emit `MIGRATION` events.
        Events = "events",
        /// Post-copy.
        PostcopyRam = "postcopy-ram",
        /// Multiple channels.
        Multifd = "multifd",
        /// Migrate dirty bitmaps.
        DirtyBitmaps = "dirty-bitmaps",
        /// Do not send memory shared with the destination.
        XIgnoreShared = "x-ignore-shared",
        /// Snapshot consistent at the start, using write protection (the guest keeps running).
        BackgroundSnapshot = "background-snapshot",
        /// Fixed-offset RAM in a file.
        MappedRam = "mapped-ram",
        /// Pause before switch-over.
        PauseBeforeSwitchover = "pause-before-switchover",
        /// Return path.
        ReturnPath = "return-path",
        /// Incoming: leave the disks inactive after the load, until `cont` (or
        /// `blockdev-set-active`) activates them.
        LateBlockActivate = "late-block-activate",
    }
}

/// One capability setting.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    /// The settings.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}
command!(MigrateSetCapabilities => "migrate-set-capabilities", Empty);

/// `migrate-set-parameters`: the common parameters as fields, any other in `other`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Bandwidth limit, bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Allowed downtime, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Number of multifd channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u32>,
    /// Any other parameter, by its QAPI name.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}
command!(MigrateSetParameters => "migrate-set-parameters", Empty);

/// `query-migrate`: the state of the current or last migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryMigrate;
command!(QueryMigrate => "query-migrate", MigrationInfo);

/// `query-migrate`'s reply.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Absent before the first migration.
    #[serde(default)]
    pub status: Option<MigrationStatus>,
    /// RAM transfer statistics.
    #[serde(default)]
    pub ram: Option<MigrationRamStats>,
    /// Milliseconds since the migration started.
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Milliseconds the guest was stopped (after completion).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Milliseconds of setup.
    #[serde(default)]
    pub setup_time: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error_desc: Option<String>,
}

/// RAM statistics of a migration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRamStats {
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes left.
    pub remaining: u64,
    /// Total RAM bytes.
    pub total: u64,
    /// Zero pages.
    pub duplicate: u64,
    /// Normal pages sent.
    pub normal: u64,
    /// Bytes of normal pages.
    pub normal_bytes: u64,
    /// Dirty pages per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Throughput, megabits per second.
    #[serde(default)]
    pub mbps: f64,
    /// Dirty-bitmap sync count (rounds).
    #[serde(default)]
    pub dirty_sync_count: u64,
}

/// `xen-save-devices-state`: write the CPU and device state, without RAM, to a file.
#[derive(Debug, Clone, Serialize)]
pub struct XenSaveDevicesState {
    /// Destination file.
    pub filename: String,
    /// Whether the guest keeps running (must be `false` outside Xen live migration).
    pub live: bool,
}
command!(XenSaveDevicesState => "xen-save-devices-state", Empty);
