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
}

/// What a streamed save ([`Hypervisor::background_save`]) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamedSave {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// Bytes of the stream the hypervisor wrote.
    pub stream_bytes: u64,
    /// Guest pages received with data.
    pub pages: u64,
    /// Guest pages received as zero.
    pub zero_pages: u64,
    /// Bytes of device state.
    pub device_state_bytes: u64,
    /// How long the hypervisor itself stopped the guest, if it says.
    pub hypervisor_downtime_ms: Option<f64>,
}

/// The handshake of a background save between the orchestrator and the driver: the driver
/// prepares (checks, files) while the guest runs, the orchestrator then pauses the domain and
/// snapshots its disks, and the driver captures the state at once, so that the pause holds only
/// the disks and the capture.
#[derive(Debug)]
pub struct CaptureSignals {
    /// Sent by the driver when it is ready to capture at once.
    pub prepared: tokio::sync::oneshot::Sender<()>,
    /// Received by the driver: capture now. Dropped unsent: give up, leaving nothing behind.
    pub capture: tokio::sync::oneshot::Receiver<()>,
    /// Sent by the driver once the state is captured: the domain may resume.
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
    /// The sealed memory image at this path (format v1, whose data area is guest RAM in page
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
    /// Pauses the vCPUs of a running domain.
    async fn pause(&self, domain: &Name) -> DriverResult<()>;
    /// Resumes the vCPUs of a paused domain.
    async fn resume(&self, domain: &Name) -> DriverResult<()>;
    /// Maps the guest RAM of a domain that has a process (running, paused, or started with
    /// [`Hypervisor::start_incoming`]). The hypervisor writes the same memory: dirty pages are
    /// found by content comparison. Fails for a domain whose RAM is mapped from a memory image
    /// ([`IncomingRam::Image`]): that RAM is private to the hypervisor's process.
    async fn guest_memory(&self, domain: &Name) -> DriverResult<GuestMemory>;
    /// Saves the device (and vCPU) state of a paused domain to `path`, written and fsynced.
    async fn save_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()>;
    /// Saves memory and device state with the hypervisor's own write-protect snapshot, into the
    /// memory image `image` and the device-state file `device_state` (both complete and synced
    /// when this returns), following the handshake of `signals`: the state is the domain's at the
    /// moment the caller sends `capture` (the caller pauses the domain before, so that its disks
    /// can be snapshotted at the same instant, and may resume it once `captured` fires; memory
    /// then streams while the guest runs).
    async fn background_save(
        &self,
        domain: &Name,
        image: &Path,
        device_state: &Path,
        signals: CaptureSignals,
    ) -> DriverResult<StreamedSave>;
    /// The disk-snapshot backend fit for the domain's state: live while it has a process,
    /// offline when shut off.
    async fn disk_backend(&self, domain: &Name) -> DriverResult<Arc<dyn DiskSnapshots>>;
    /// Ends the domain's process at once, without a guest shutdown (revert discards its state).
    /// Succeeds if the domain is already shut off.
    async fn destroy(&self, domain: &Name) -> DriverResult<()>;
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
}
