//! Hypervisor-agnostic orchestration of whole-domain snapshots: create, delete, revert.
//!
//! This crate knows no QEMU. A domain driver implements [`Hypervisor`] (state, pause/resume, guest
//! memory, device state, disks, start to receive state); the [`Orchestrator`] runs
//! [`Orchestrator::create`] (paused, pre-copy or background memory; internal or external disk
//! snapshots), [`Orchestrator::delete`], [`Orchestrator::revert`] and [`Orchestrator::verify`] over
//! it, rolls back every step of a failed operation and, through intent records,
//! [`Orchestrator::recover`]s operations a crash interrupted. [`Orchestrator::rescan`]
//! reconciles the records with the disks after changes made outside domsnap (marking snapshots
//! whose disk part is gone broken, and unmarking them once it is back). Snapshot metadata
//! ([`SnapshotRecord`]), the tree of a domain's snapshots ([`SnapshotTree`]) and the store that keeps
//! them under a state directory ([`SnapshotStore`], [`FsStore`]: atomic writes, a per-domain lock)
//! live here too, and so does [`StateDir`], the one owner of the state directory's layout and of
//! the per-domain lock that the store and the domain driver share. Enable the `mock` feature for
//! `MockHypervisor` and `MockSnapshotStore`. See `docs/architecture.md` for the data flow.
//!
//! ```no_run
//! use std::sync::Arc;
//! use snapshot_core::{
//!     CreateOptions, FsStore, Hypervisor, LiveOptions, MemoryMode, Name, Orchestrator, Quiet,
//!     RevertOptions,
//! };
//!
//! # async fn demo(driver: Arc<dyn Hypervisor>) -> snapshot_core::Result<()> {
//! // `driver` is e.g. `qemu::QemuDriver::new("/var/lib/domsnap")`.
//! let orchestrator = Orchestrator::new(driver, Arc::new(FsStore::new("/var/lib/domsnap")), Arc::new(Quiet));
//! let (domain, snapshot) = (Name::new("demo")?, Name::new("before-upgrade")?);
//! // Live: pre-copy through the hypervisor's stream (QEMU's dirty log), a pause of a few ms.
//! let options = CreateOptions { memory: MemoryMode::Live(LiveOptions::default()), ..CreateOptions::default() };
//! let report = orchestrator.create(&domain, &snapshot, options).await?;
//! println!("guest paused {:.1} ms", report.guest_pause_ms);
//! orchestrator.revert(&domain, &snapshot, RevertOptions::default()).await?;
//! orchestrator.delete(&domain, &snapshot, false).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The store on its own:
//!
//! ```
//! use std::time::Duration;
//! use snapshot_core::{FsStore, Name, SnapshotStore};
//!
//! # fn main() -> snapshot_core::Result<()> {
//! let state = tempfile::tempdir().unwrap();
//! let store = FsStore::new(state.path());
//! let domain = Name::new("demo")?;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let _lock = store.lock(&domain, Duration::from_secs(5)).await?;
//! # Ok::<(), snapshot_core::Error>(()) })?;
//! assert!(store.list(&domain)?.is_empty());
//! assert!(Name::new("../escape").is_err());
//! # Ok(())
//! # }
//! ```

mod error;
mod hypervisor;
mod intent;
mod metadata;
mod name;
mod orchestrator;
mod state_dir;
mod store;
mod tree;

pub use error::{Error, ErrorClass, FailedStep, Operation, Result, Step};
#[cfg(any(test, feature = "mock"))]
pub use hypervisor::MockHypervisor;
pub use hypervisor::{
    CaptureSignals, DiskTarget, DriverError, DriverResult, Hypervisor, ImageFormat, IncomingRam,
    IncomingStart, MemoryAccess, Standby, StreamMode, StreamedSave,
};
pub use intent::Intent;
pub use metadata::{
    Broken, Consistency, DiskRecord, DiskSnapshot, DomainState, MemoryState, SnapshotRecord, METADATA_VERSION,
};
pub use name::{InvalidName, Name, MAX_NAME_LEN};
pub use orchestrator::{
    Abandoned, Activity, CreateOptions, CreateReport, DeleteReport, DiskChain, DiskKind, DiskRequest, Health,
    LiveMethod, LiveOptions, MemoryLoad, MemoryMode, MemoryRead, Observer, Orchestrator, Quiet, Recovery,
    RecoveryOutcome, RescanReport, RevertOptions, RevertReport, RoundReport, SavedMemory, SnapshotChange,
    ThawOutcome, VerifyReport, DEFAULT_CONVERGE_WITHIN, DEFAULT_MAX_DOWNTIME,
};
pub use state_dir::{DomainDir, DomainLock, StateDir};
#[cfg(any(test, feature = "mock"))]
pub use store::MockSnapshotStore;
pub use store::{FsStore, ImageLinks, SnapshotFiles, SnapshotStore};
pub use tree::{filter_records, ListFilter, SnapshotTree, TreeNode};
