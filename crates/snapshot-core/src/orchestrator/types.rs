//! The orchestrator's public options and reports, and its [`Observer`].

use std::{path::PathBuf, time::Duration};

use memory::{ConvergencePolicy, RoundStats};
use serde::Serialize;

use crate::{
    error::{Operation, Step},
    hypervisor::StreamedSave,
    metadata::{DomainState, SnapshotRecord},
    name::Name,
};

use super::millis;

/// Told about each step as it starts, and about memory progress. Progress bars hang here, and
/// so do the crash tests (which kill the process at a chosen step).
pub trait Observer: Send + Sync {
    /// `step` of `operation` is about to run.
    fn step(&self, _operation: Operation, _step: Step) {}
    /// A memory save round finished.
    fn memory_round(&self, _stats: &RoundStats) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {}

/// How a create saves memory.
#[derive(Debug, Clone, Default)]
pub enum MemoryMode {
    /// Pause the domain, save all memory, resume.
    #[default]
    Paused,
    /// Save memory while the domain runs, with a short pause (see [`LiveOptions`]).
    Live(LiveOptions),
    /// No memory: a disk-only snapshot even of a running domain. The disks are snapshotted in
    /// one atomic step (the hypervisor's disk backend makes them consistent with each other)
    /// and the guest is not paused; a revert leaves the domain shut off.
    DisksOnly,
}

/// How a live create saves memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LiveMethod {
    /// Pre-copy, the shortest pause this hypervisor offers.
    #[default]
    Auto,
    /// Pre-copy: memory is copied in passes while the guest runs, then the guest pauses for
    /// what is left. Through the hypervisor's own stream where it tracks dirty pages (its pause
    /// does not grow with RAM size); else domsnap's own engine on the shared RAM (its pause is
    /// about one read of RAM). Memory is consistent at the end of the create.
    Precopy,
    /// The hypervisor's write-protect snapshot, streamed into the memory image: the guest is
    /// paused only while its state is captured and the disks are snapshotted, then runs (slowed
    /// while pages are still protected) as memory streams. Memory is consistent at the start of
    /// the create. Refused where the hypervisor cannot (e.g. RAM mapped from a snapshot image).
    Background,
}

/// Options of a live create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveOptions {
    /// The method.
    pub method: LiveMethod,
    /// The longest final pause pre-copy aims at (the hypervisor's downtime limit; the memory
    /// crate's `max_pause`).
    pub max_downtime: Duration,
    /// How long pre-copy may run before the create gives up, rolled back, with the guest
    /// running.
    pub converge_within: Duration,
}

/// [`LiveOptions::max_downtime`] by default: QEMU paused 11–16 ms at this limit here (1 GiB
/// guest rewriting 48 MiB/s, unlimited bandwidth).
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(20);
/// [`LiveOptions::converge_within`] by default.
pub const DEFAULT_CONVERGE_WITHIN: Duration = Duration::from_secs(120);

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            method: LiveMethod::Auto,
            max_downtime: DEFAULT_MAX_DOWNTIME,
            converge_within: DEFAULT_CONVERGE_WITHIN,
        }
    }
}

impl LiveOptions {
    /// The hypervisor's pre-copy with these limits.
    pub(crate) fn precopy_stream(&self) -> crate::hypervisor::StreamMode {
        crate::hypervisor::StreamMode::Precopy {
            max_downtime: self.max_downtime,
            converge_within: self.converge_within,
        }
    }

    /// The memory crate's pre-copy with these limits.
    pub(crate) fn engine_policy(&self) -> ConvergencePolicy {
        ConvergencePolicy {
            max_pause: self.max_downtime,
            ..ConvergencePolicy::default()
        }
    }
}

/// How a create saved memory, as its report says (serialised in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SavedMemory {
    /// The domain was paused for the whole save.
    Paused,
    /// Pre-copy rounds while it ran, then a short pause.
    Precopy,
    /// The hypervisor's write-protect snapshot, streamed.
    Background,
    /// Disks only (the domain was shut off).
    None,
}

impl std::fmt::Display for SavedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SavedMemory::Paused => "paused",
            SavedMemory::Precopy => "precopy",
            SavedMemory::Background => "background",
            SavedMemory::None => "none",
        })
    }
}

/// What recovery did with an interrupted operation (serialised in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryOutcome {
    /// The operation was carried to its end.
    Finished,
    /// What the operation had done was undone.
    Undone,
}

impl std::fmt::Display for RecoveryOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecoveryOutcome::Finished => "finished",
            RecoveryOutcome::Undone => "undone",
        })
    }
}

/// How one disk is snapshotted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskKind {
    /// A named snapshot inside the image (the default, named like the snapshot).
    Internal {
        /// The internal snapshot's name in this image; `None`: the snapshot's name.
        name: Option<String>,
    },
    /// No snapshot of this disk: the record says it was left out, and a revert leaves the disk
    /// as it is then.
    Excluded,
    /// A new overlay; the current image becomes the snapshot.
    External {
        /// Where the overlay goes (absolute); default: beside the image, `STEM.SNAPSHOT.qcow2`.
        path: Option<PathBuf>,
        /// The overlay's format; only `qcow2` (the default) is supported.
        format: Option<String>,
    },
}

/// The snapshot kind chosen for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRequest {
    /// The disk's target id.
    pub target: String,
    /// Its snapshot kind.
    pub kind: DiskKind,
}

/// Options of [`Orchestrator::create`](crate::Orchestrator::create).
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// How memory is saved (ignored for a shut-off domain: disks only).
    pub memory: MemoryMode,
    /// Per-disk choices; disks not named get an internal snapshot.
    pub disks: Vec<DiskRequest>,
    /// Free text stored with the snapshot.
    pub description: Option<String>,
    /// Where the memory image goes (absolute; its folder must exist, the file must not, and it
    /// must not be inside a snapshot's folder); `None`: the snapshot's folder. The device state
    /// stays in the snapshot's folder.
    pub memory_path: Option<PathBuf>,
    /// Freeze the guest's filesystems through its guest agent around the disk snapshots (and the
    /// memory save), so the disks hold clean filesystems even without the memory. Needs a
    /// running domain with an agent; the thaw follows on every path, failures included.
    pub quiesce: bool,
}

/// Statistics of one memory round, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// Round number (0: the full copy).
    pub round: u32,
    /// Whether the domain was paused during it.
    pub final_round: bool,
    /// Pages found dirty.
    pub pages_dirty: u64,
    /// Pages written to the image.
    pub pages_written: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Duration in milliseconds.
    pub duration_ms: f64,
    /// Bytes dirtied per second before the round.
    pub dirty_rate: f64,
}

impl From<&RoundStats> for RoundReport {
    fn from(stats: &RoundStats) -> Self {
        RoundReport {
            round: stats.round,
            final_round: stats.final_round,
            pages_dirty: stats.pages_dirty,
            pages_written: stats.pages_written,
            bytes_written: stats.bytes_written,
            duration_ms: millis(stats.duration),
            dirty_rate: stats.dirty_rate,
        }
    }
}

/// What a create did.
#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    /// The new snapshot.
    pub record: SnapshotRecord,
    /// Wall time of the whole create, milliseconds.
    pub total_ms: f64,
    /// How long the guest's vCPUs were paused by the create, milliseconds (0 if it was not
    /// running).
    pub guest_pause_ms: f64,
    /// How memory was saved.
    pub memory_mode: SavedMemory,
    /// Bytes of guest memory written to the image (over all rounds).
    pub memory_bytes: u64,
    /// Memory rounds of a paused or pre-copy save.
    pub memory_rounds: Vec<RoundReport>,
    /// Guest pages, and how many were stored (the rest were zero).
    pub memory_pages: Option<(u64, u64)>,
    /// Where memory was read: `direct` (the shared RAM, by domsnap) or `stream` (the
    /// hypervisor's migration stream).
    pub memory_read: Option<MemoryRead>,
    /// What the hypervisor's stream held, for a streamed save.
    pub streamed: Option<StreamedSave>,
}

/// Where a create read memory (serialised in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryRead {
    /// domsnap read the RAM the hypervisor shares.
    Direct,
    /// The hypervisor's own stream (its dirty tracking), parsed into the image.
    Stream,
}

/// What a delete did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeleteReport {
    /// The snapshots deleted, in order.
    pub deleted: Vec<Name>,
    /// Overlay images merged into their parents or removed because no snapshot needs them.
    pub removed_images: Vec<PathBuf>,
    /// Deleted snapshots whose memory image the domain's running process still maps (it was
    /// reverted to them lazily): the image's data stays on disk until the domain stops.
    pub memory_in_use: Vec<Name>,
    /// Wall time, milliseconds.
    pub total_ms: f64,
}

/// Options of [`Orchestrator::revert`](crate::Orchestrator::revert).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RevertOptions {
    /// Leave the domain paused afterwards.
    pub paused: bool,
    /// Copy the memory image into fresh RAM shared with domsnap, checking every page's checksum
    /// as it is copied, instead of letting the hypervisor map the image copy-on-write (the
    /// default, which reads only what the guest touches, and whose RAM domsnap cannot read).
    pub eager: bool,
}

/// How a revert loaded the snapshot's memory (serialised in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryLoad {
    /// The hypervisor maps the memory image copy-on-write: nothing was copied.
    Mapped,
    /// The image was copied into fresh RAM (eager, or the image could not be mapped).
    Copied,
    /// The snapshot has no memory: the domain is shut off.
    None,
}

impl std::fmt::Display for MemoryLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryLoad::Mapped => "mapped",
            MemoryLoad::Copied => "copied",
            MemoryLoad::None => "none",
        })
    }
}

/// What a revert did.
#[derive(Debug, Clone, Serialize)]
pub struct RevertReport {
    /// The snapshot reverted to.
    pub snapshot: Name,
    /// The domain's state afterwards.
    pub state: DomainState,
    /// Wall time, milliseconds.
    pub total_ms: f64,
    /// How memory was loaded.
    pub memory_load: MemoryLoad,
    /// Why the image was copied although mapping it was asked for (`None` otherwise).
    pub memory_fallback: Option<String>,
    /// Time spent copying memory into the new domain, milliseconds (0 when mapped).
    pub memory_ms: f64,
    /// The snapshot was quiesced, so the restored guest's filesystems were frozen: whether the
    /// revert thawed them (`None` for snapshots that were not quiesced, or have no memory).
    pub thaw: Option<ThawOutcome>,
    /// The domain's new process was started beside the running one and took over from it
    /// (so a failure before the switch would have left the domain running as it was).
    pub standby: bool,
    /// Why the new process was started only after the old one ended, although the domain was
    /// running (`None` when `standby`, or when there was no process to keep or no memory).
    pub standby_unavailable: Option<String>,
    /// How long the domain had no guest: from the start of ending its previous process to the
    /// restored guest resumed (or loaded, when it stays paused), milliseconds. `None` when the
    /// revert leaves the domain shut off.
    pub downtime_ms: Option<f64>,
}

/// What a revert to a quiesced snapshot did about the restored guest's frozen filesystems
/// (serialised as `{"outcome": "thawed", "filesystems": 2}` and so on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ThawOutcome {
    /// The guest agent thawed them.
    Thawed {
        /// How many filesystems were thawed.
        filesystems: u64,
    },
    /// The domain stays paused: its filesystems stay frozen until it is resumed and thawed
    /// (`domsnap domain thaw`).
    Pending,
    /// The thaw failed; the domain runs with frozen filesystems until a thaw succeeds.
    Failed {
        /// Why.
        error: String,
    },
}

/// What [`Orchestrator::recover`](crate::Orchestrator::recover) found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// The domain.
    pub domain: Name,
    /// The interrupted operation.
    pub operation: Operation,
    /// Its snapshot.
    pub snapshot: Name,
    /// What recovery did.
    pub outcome: RecoveryOutcome,
}

/// One problem [`Orchestrator::verify`](crate::Orchestrator::verify) found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The snapshot.
    pub snapshot: Name,
    /// Problems found; empty means intact.
    pub problems: Vec<String>,
    /// Pages in the memory image, and how many are stored.
    pub memory_pages: Option<(u64, u64)>,
}

/// How a rescan changed a snapshot's mark (serialised in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Marked broken now (newly, or for other reasons than before).
    Broken,
    /// Its parts are back: no longer marked broken.
    Repaired,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Broken => "broken",
            Health::Repaired => "repaired",
        })
    }
}

/// A snapshot whose mark a rescan changed.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotChange {
    /// The snapshot.
    pub snapshot: Name,
    /// Broken or repaired.
    pub health: Health,
    /// What is missing or changed (empty when repaired).
    pub reasons: Vec<String>,
}

/// One disk of the domain as a rescan found it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskChain {
    /// The disk's target id.
    pub target: String,
    /// Its active image and the images below it, nearest first (as far as they could be read).
    pub chain: Vec<PathBuf>,
    /// What stops the chain from being read to its base (a missing backing file), if anything.
    pub problem: Option<String>,
    /// What changed in it outside domsnap since the last rescan (a backing file changed, an
    /// image domsnap did not make); recorded, so the next rescan does not report it again.
    pub changed: Vec<String>,
}

/// What [`Orchestrator::rescan`](crate::Orchestrator::rescan) found and changed.
#[derive(Debug, Clone, Serialize)]
pub struct RescanReport {
    /// The domain.
    pub domain: Name,
    /// Snapshots whose mark changed (newly broken, or repaired).
    pub changed: Vec<SnapshotChange>,
    /// Every snapshot scanned that is broken now.
    pub broken: Vec<Name>,
    /// The domain's disks and their chains.
    pub disks: Vec<DiskChain>,
    /// Whether this was the domain's first rescan (its chains were recorded, nothing compared).
    pub first: bool,
    /// Wall time, milliseconds.
    pub total_ms: f64,
}
