//! The orchestrator's public options and reports, and its [`Observer`].

use std::path::PathBuf;

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
    /// Copy memory while the domain runs (pre-copy rounds), then pause for the last dirty pages.
    /// The pause is about one read of guest RAM; memory is consistent at the end of the create.
    Live(ConvergencePolicy),
    /// The hypervisor's own write-protect snapshot, streamed into the memory image: the guest is
    /// paused only while its state is captured and the disks are snapshotted, whatever its RAM
    /// size, then runs (slowed while pages are still protected) as memory streams. Memory is
    /// consistent at the start of the create.
    Background,
}

/// Guest RAM from which [`MemoryMode::shortest_live_pause`] picks the background mode. Pre-copy
/// pauses for one read of RAM (about 50–60 ms per GiB here, so about 25–30 ms at 512 MiB) plus
/// the device state; the background snapshot for QEMU's capture (about 20 ms) whatever the size.
pub const BACKGROUND_FROM_RAM_BYTES: u64 = 512 << 20;

impl MemoryMode {
    /// The live mode with the shorter guest pause for a domain with `ram_bytes` of RAM.
    pub fn shortest_live_pause(ram_bytes: u64) -> Self {
        if ram_bytes >= BACKGROUND_FROM_RAM_BYTES {
            MemoryMode::Background
        } else {
            MemoryMode::Live(ConvergencePolicy::default())
        }
    }

    /// How a create in this mode reports its memory.
    pub(crate) fn saved_as(&self) -> SavedMemory {
        match self {
            MemoryMode::Paused => SavedMemory::Paused,
            MemoryMode::Live(_) => SavedMemory::Precopy,
            MemoryMode::Background => SavedMemory::Background,
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
    /// A named snapshot inside the image (the default).
    Internal,
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
    /// What the hypervisor's stream held, for a background save.
    pub streamed: Option<StreamedSave>,
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
