//! What the orchestrator needs from a hypervisor: the seam between `snapshot-core` and a domain
//! driver (for QEMU: `crates/qemu`). Nothing here knows QEMU.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use disk::DiskSnapshots;
use memory::GuestMemory;
use serde::{Deserialize, Serialize};

pub use crate::error::DriverError;
use crate::{metadata::DomainState, name::Name};

/// A driver call's result.
pub type DriverResult<T> = std::result::Result<T, DriverError>;

/// One disk of a domain and the image the domain writes to (the top of its backing chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskTarget {
    /// The disk's id in the domain configuration, e.g. `vda`.
    pub target: String,
    /// Its active image.
    pub image: PathBuf,
    /// The active image's format. Overlays domsnap makes are qcow2.
    #[serde(default)]
    pub format: ImageFormat,
}

/// A disk image's format, as far as snapshots care.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// qcow2: internal snapshots and overlays.
    #[default]
    Qcow2,
    /// A raw image: it can only be the base of a qcow2 overlay (external snapshots); an
    /// internal snapshot of it is refused.
    Raw,
}

/// What a streamed save ([`Hypervisor::streamed_save`]) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamedSave {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// Bytes of the stream the hypervisor wrote.
    pub stream_bytes: u64,
    /// Guest pages received with data (a page sent again in a later pre-copy pass counts again).
    pub pages: u64,
    /// Guest pages received as zero.
    pub zero_pages: u64,
    /// Guest pages the memory image stores (the others are zero).
    pub stored_pages: u64,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// How long the hypervisor itself stopped the guest, if it says.
    pub hypervisor_downtime_ms: Option<f64>,
    /// Pre-copy passes over guest RAM (1 for a paused or background save).
    pub passes: u64,
}

/// How a streamed save runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// The caller pauses the domain before the capture and resumes it once the stream is
    /// complete.
    Paused,
    /// The hypervisor copies memory while the guest runs, in passes, until what is left fits
    /// `max_downtime`; then it stops the guest itself and says so (`prepared`), the caller
    /// snapshots the disks and sends `capture`, the hypervisor sends the rest and resumes the
    /// guest itself (it stopped it, so it knows the earliest moment it can), then fires
    /// `captured`: the guest runs again. Memory is as of that stop. Fails, leaving the guest
    /// running, when that point is not reached within `converge_within`; a failure after the
    /// stop and before `captured` may leave the guest stopped (the caller resumes it).
    Precopy {
        /// The longest final stop the hypervisor aims at.
        max_downtime: std::time::Duration,
        /// How long the passes may take before the save gives up.
        converge_within: std::time::Duration,
    },
    /// The hypervisor's write-protect snapshot: the caller pauses the domain, snapshots the
    /// disks and sends `capture`; `captured` fires once the state is fixed (the caller resumes),
    /// and memory streams while the guest runs. Memory is as of the capture.
    Background,
}

impl StreamMode {
    /// Whether the hypervisor stops the guest itself (the caller must not pause it), and resumes
    /// it once captured.
    pub fn hypervisor_pauses(&self) -> bool {
        matches!(self, StreamMode::Precopy { .. })
    }
}

/// How the toolstack can reach a domain's memory ([`Hypervisor::memory_access`]).
#[derive(Debug)]
pub struct MemoryAccess {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// The guest's RAM mapped here, if the hypervisor shares it: the fastest paused save is a
    /// direct copy of it, and the memory crate's own pre-copy engine works on it.
    pub shared: Option<GuestMemory>,
    /// Whether [`Hypervisor::streamed_save`] can run in [`StreamMode::Paused`] and
    /// [`StreamMode::Precopy`] (the hypervisor tracks dirty pages itself).
    pub streams: bool,
    /// Why [`StreamMode::Background`] is impossible, if it is.
    pub no_background: Option<String>,
}

/// The handshake of a streamed save between the orchestrator and the driver: the driver
/// prepares (checks, files; for pre-copy also the passes, ending with the guest stopped) while
/// the guest runs, the orchestrator then pauses the domain (unless the hypervisor did) and
/// snapshots its disks, and the driver captures the state at once, so that the pause holds only
/// the disks and the capture.
#[derive(Debug)]
pub struct CaptureSignals {
    /// Sent by the driver when it is ready to capture at once (for [`StreamMode::Precopy`]: the
    /// hypervisor has stopped the guest).
    pub prepared: tokio::sync::oneshot::Sender<()>,
    /// Received by the driver: capture now. Dropped unsent: give up, leaving nothing behind.
    pub capture: tokio::sync::oneshot::Receiver<()>,
    /// Sent by the driver once the state is captured: the domain may resume (for
    /// [`StreamMode::Precopy`]: the hypervisor has resumed it).
    pub captured: tokio::sync::oneshot::Sender<()>,
}

impl CaptureSignals {
    /// Signals for a caller that lets the driver capture as soon as it is ready and only waits
    /// for `captured`.
    pub fn at_once(captured: tokio::sync::oneshot::Sender<()>) -> Self {
        let (prepared, _) = tokio::sync::oneshot::channel();
        let (go, capture) = tokio::sync::oneshot::channel();
        let _ = go.send(());
        CaptureSignals {
            prepared,
            capture,
            captured,
        }
    }
}

/// Where a domain started by [`Hypervisor::start_incoming`] gets its RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncomingRam<'a> {
    /// Fresh, zeroed RAM shared with the toolstack: the caller writes the memory image into it
    /// through [`Hypervisor::guest_memory`].
    Fresh,
    /// The sealed memory image at this path (format v1 or v2, whose data area is guest RAM in page
    /// order), mapped copy-on-write: the guest starts on the image's pages, its writes stay
    /// private to its process and the image is never written. The driver checks the image's
    /// metadata (not every page) and its size against the domain's RAM before it starts
    /// anything. It keeps the image's data for as long as the domain's process lives, with a
    /// hard link of its own, so the snapshot may be deleted meanwhile (the image's link count
    /// then tells that its data is still in use). The domain's RAM cannot be shared with the
    /// toolstack afterwards: [`Hypervisor::guest_memory`] fails on it.
    Image(&'a Path),
}

/// The RAM a domain started by [`Hypervisor::start_incoming`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingStart {
    /// The memory image is mapped: the RAM holds the saved memory already.
    Mapped,
    /// Fresh, zeroed RAM: the caller writes the memory image into it.
    Fresh {
        /// Why an image that was asked for could not be mapped (e.g. it lies on another
        /// filesystem than the driver's files); `None` if fresh RAM was asked for.
        fallback: Option<String>,
    },
}

/// What [`Hypervisor::start_standby`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standby {
    /// The standby process runs beside the domain's, paused, waiting for its state; its RAM is
    /// as said.
    Started(IncomingStart),
    /// The hypervisor cannot run a second process for this domain now (the reason says why,
    /// e.g. a network card or firmware two processes cannot share): a revert ends the running
    /// process before it starts the new one.
    Unavailable {
        /// Why, for the report.
        reason: String,
    },
}

/// A hypervisor managing named domains.
///
/// Every call names the domain; the driver keeps the processes and connections. Calls that need
/// a running domain (pause, memory, device state) fail on a shut-off one.
///
/// The orchestrator calls these with the domain's lock held ([`crate::StateDir::lock`]): a
/// driver must not take that lock again inside them.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// The domain's state now.
    async fn state(&self, domain: &Name) -> DriverResult<DomainState>;
    /// The domain's configuration (opaque here; recorded in snapshots and given back to
    /// [`Hypervisor::define`] at revert).
    async fn config(&self, domain: &Name) -> DriverResult<serde_json::Value>;
    /// The domain's disks and their active images, in configuration order.
    async fn disks(&self, domain: &Name) -> DriverResult<Vec<DiskTarget>>;
    /// Does, while the running domain's guest still runs, work that [`Hypervisor::pause`] or
    /// [`Hypervisor::destroy`] would otherwise do inside the guest's pause (QEMU: write back the
    /// guest's disk writes left in the host's page cache, which its stop flushes), or that a
    /// running domain's disk snapshots would do while its disk I/O waits (QEMU flushes the
    /// disks in the snapshot transaction). The orchestrator calls it right before a short pause
    /// it measures, and before a running domain's disk-only snapshot. Best effort: it reports
    /// nothing, and the pause must work without it.
    async fn prepare_pause(&self, _domain: &Name) {}
    /// Pauses the vCPUs of a running domain.
    async fn pause(&self, domain: &Name) -> DriverResult<()>;
    /// Resumes the vCPUs of a paused domain.
    async fn resume(&self, domain: &Name) -> DriverResult<()>;
    /// Maps the guest RAM of a domain that has a process (running, paused, or started with
    /// [`Hypervisor::start_incoming`]). The hypervisor writes the same memory: dirty pages are
    /// found by content comparison. Fails for RAM the hypervisor does not share, e.g. a domain
    /// whose RAM is mapped from a memory image ([`IncomingRam::Image`]): that RAM is private to
    /// the hypervisor's process.
    async fn guest_memory(&self, domain: &Name) -> DriverResult<GuestMemory>;
    /// How the memory of a domain that has a process can be saved.
    async fn memory_access(&self, domain: &Name) -> DriverResult<MemoryAccess>;
    /// Saves the device (and vCPU) state of a paused domain to `path`, written and fsynced.
    async fn save_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()>;
    /// Freezes the running guest's filesystems through its guest agent (flushing them first) and
    /// returns how many it froze. Fails clearly when the domain has no agent or it does not
    /// answer; a freeze that timed out may still complete in the guest, so callers thaw after
    /// any freeze attempt.
    async fn freeze_filesystems(&self, domain: &Name) -> DriverResult<u64>;
    /// Whether the domain has a guest agent channel (so a quiesce can be asked of it).
    async fn has_guest_agent(&self, domain: &Name) -> DriverResult<bool>;
    /// Thaws the guest's filesystems; returns how many it thawed (0 when none were frozen, which
    /// is not an error).
    async fn thaw_filesystems(&self, domain: &Name) -> DriverResult<u64>;
    /// Saves memory and device state through the hypervisor's own stream, into the memory image
    /// `image` and the device-state file `device_state` (both complete and synced when this
    /// returns), following the handshake of `signals` as `mode` describes. On failure neither
    /// file exists and the guest runs as before (a caller that paused it resumes it).
    async fn streamed_save(
        &self,
        domain: &Name,
        image: &Path,
        device_state: &Path,
        mode: StreamMode,
        signals: CaptureSignals,
    ) -> DriverResult<StreamedSave>;
    /// The disk-snapshot backend fit for the domain's state: live while it has a process,
    /// offline when shut off.
    async fn disk_backend(&self, domain: &Name) -> DriverResult<Arc<dyn DiskSnapshots>>;
    /// Ends the domain's process at once, without a guest shutdown (revert discards its state).
    /// Succeeds if the domain is already shut off. A standby ([`Hypervisor::start_standby`])
    /// is left as it is.
    async fn destroy(&self, domain: &Name) -> DriverResult<()>;
    /// Starts a second process for a running domain, beside its current one (which keeps
    /// running): paused, waiting for its state, with configuration `config` and disks `disks`
    /// (the domain's after a revert) and RAM as `ram` asks (as [`Hypervisor::start_incoming`]).
    /// Its disks are opened inactive: it neither locks nor writes them until it is promoted, so
    /// the caller may load its device state ([`Hypervisor::load_standby_device_state`]), end the
    /// current process and apply internal snapshots to the images in between; it reads them
    /// again when it becomes active. [`Hypervisor::promote_standby`]
    /// makes it the domain's process, [`Hypervisor::discard_standby`] ends it. `Unavailable`
    /// when the domain cannot have two processes at once; an error when the start failed, which
    /// leaves the running process as it was. The default: unavailable.
    async fn start_standby<'a>(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
        ram: IncomingRam<'a>,
    ) -> DriverResult<Standby> {
        let _ = (domain, config, disks, ram);
        Ok(Standby::Unavailable {
            reason: "the hypervisor does not start standby processes".into(),
        })
    }
    /// Loads the device state saved at `path` into the domain's standby process, its memory in
    /// place (mapped, or copied into its fresh RAM), while the domain's current process still
    /// runs: a state that does not load fails the revert before anything is stopped. The
    /// standby's disks stay inactive until [`Hypervisor::promote_standby`].
    async fn load_standby_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        let _ = path;
        Err(format!("domain {domain} has no standby process").into())
    }
    /// Makes the standby the domain's process, once the previous one has ended
    /// ([`Hypervisor::destroy`]) and the domain is defined with the standby's configuration and
    /// disks: it activates the standby's disks (reading them as they are now). The domain is
    /// then paused with its state loaded; [`Hypervisor::resume`] runs it.
    async fn promote_standby(&self, domain: &Name) -> DriverResult<()> {
        Err(format!("domain {domain} has no standby process").into())
    }
    /// Maps the fresh RAM of the domain's standby ([`Standby::Started`] with
    /// [`IncomingStart::Fresh`]), as [`Hypervisor::guest_memory`] does for the domain's process:
    /// the caller writes the memory image into it while the old process still runs.
    async fn standby_guest_memory(&self, domain: &Name) -> DriverResult<GuestMemory> {
        Err(format!("domain {domain} has no standby process").into())
    }
    /// Ends the domain's standby process, if it has one, and removes its files. Succeeds when
    /// there is none.
    async fn discard_standby(&self, domain: &Name) -> DriverResult<()> {
        let _ = domain;
        Ok(())
    }
    /// Replaces the domain's stored configuration with `config` (as returned by
    /// [`Hypervisor::config`]) whose disks use the images `disks`. Takes effect at the next start.
    async fn define(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
    ) -> DriverResult<()>;
    /// Starts a shut-off domain from its configuration, paused, waiting for its state to be
    /// loaded, with RAM as `ram` asks. It says what the RAM got: an image that cannot be mapped
    /// falls back to fresh RAM ([`IncomingStart::Fresh`] with the reason), which the caller then
    /// writes through [`Hypervisor::guest_memory`]; an image that does not fit the domain (its
    /// size is not the domain's RAM size) is an error, raised before anything is started.
    /// [`Hypervisor::load_device_state`] completes the start.
    async fn start_incoming<'a>(&self, domain: &Name, ram: IncomingRam<'a>) -> DriverResult<IncomingStart>;
    /// Forgets a shut-off domain: its definition and the driver's files. (The orchestrator's
    /// [`crate::Orchestrator::undefine`] checks first that no snapshot needs it.)
    async fn undefine(&self, domain: &Name) -> DriverResult<()>;
    /// Loads device state saved by [`Hypervisor::save_device_state`] into a domain started with
    /// [`Hypervisor::start_incoming`]; the domain is paused afterwards.
    async fn load_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()>;
    /// Checks, before a revert touches the domain, that the hypervisor can restore a snapshot
    /// taken with configuration `config` (as [`Hypervisor::config`] returned it then), with its
    /// memory and device state when `with_memory`: e.g. that it still provides the machine the
    /// snapshot was taken on. The default accepts everything.
    async fn check_restorable(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        with_memory: bool,
    ) -> DriverResult<()> {
        let _ = (domain, config, with_memory);
        Ok(())
    }
}
