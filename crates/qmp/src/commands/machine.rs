//! Machine-wide commands: version, run state, stop/cont, quit, reset, memory backends.

use serde::{Deserialize, Serialize};

use super::command;
use crate::types::{Empty, RunState, VersionInfo};

/// `query-version`: the QEMU version.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryVersion;
command!(QueryVersion => "query-version", VersionInfo);

/// `query-status`: whether the VM runs, and its run state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryStatus;
command!(QueryStatus => "query-status", StatusInfo);

/// `query-status`'s reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// `stop`: pause the vCPUs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stop;
command!(Stop => "stop", Empty);

/// `cont`: resume the vCPUs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cont;
command!(Cont => "cont", Empty);

/// `quit`: terminate QEMU. The reply arrives, then the connection closes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Quit;
command!(Quit => "quit", Empty);

/// `system_reset`: reset the machine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SystemReset;
command!(SystemReset => "system_reset", Empty);

/// `query-memdev`: the memory backends (where the guest RAM lives).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryMemdev;
command!(QueryMemdev => "query-memdev", Vec<Memdev>);

/// One memory backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Memdev {
    /// The backend's id (`-object memory-backend-*,id=`).
    #[serde(default)]
    pub id: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Whether the memory is shared with other processes (`share=on`).
    pub share: bool,
    /// Whether the memory was preallocated.
    pub prealloc: bool,
    /// Whether KSM merging is enabled.
    pub merge: bool,
    /// Whether the memory is included in core dumps.
    pub dump: bool,
    /// NUMA host-node binding policy.
    pub policy: String,
}
