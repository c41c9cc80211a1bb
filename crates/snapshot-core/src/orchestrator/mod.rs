//! Create, delete and revert whole-domain snapshots: the steps, their order, and the undo of
//! every step when a later one fails.
//!
//! Every operation takes the domain's lock, finishes or undoes an operation a crash interrupted
//! ([`Orchestrator::recover`]), writes an [`crate::Intent`] record, runs its steps, and clears
//! the intent. A failing step undoes what the operation did and reports the step
//! ([`Error::Failed`]); the domain is left running if it was running.
//!
//! One file per operation: `create` (a [`create::CreateJob`] carries a create's state, and its
//! undo is the rollback), `background` (the background-save handshake of a create), `delete`,
//! `tidy` (folding away overlays no snapshot needs, after a delete or a revert), `revert`,
//! `recover`, `verify`, `rescan` (reconciling the records with the disks), `current`;
//! `disk_plan` decides and takes each disk's snapshot, `memory_saver`
//! runs a memory save on its own thread, and `types` holds the public options and reports.

mod activity;
mod create;
mod current;
mod delete;
mod disk_plan;
mod domain;
mod memory_saver;
mod quiesce;
mod recover;
mod rescan;
mod revert;
mod streamed;
mod tidy;
mod types;
mod verify;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use activity::{Abandoned, Activity};
pub use types::{
    CreateOptions, CreateReport, DeleteReport, DiskChain, DiskKind, DiskRequest, Health, LiveMethod,
    LiveOptions, MemoryLoad, MemoryMode, MemoryRead, Observer, Quiet, Recovery, RecoveryOutcome,
    RescanReport, RevertOptions, RevertReport, RoundReport, SavedMemory, SnapshotChange, ThawOutcome,
    VerifyReport, DEFAULT_CONVERGE_WITHIN, DEFAULT_MAX_DOWNTIME,
};

use crate::{
    error::{DriverError, Error, Operation, Result, Step},
    hypervisor::{DiskTarget, Hypervisor},
    metadata::DomainState,
    name::Name,
    state_dir::DomainLock,
    store::SnapshotStore,
};

/// The snapshot orchestrator over a hypervisor and a store.
pub struct Orchestrator {
    hypervisor: Arc<dyn Hypervisor>,
    store: Arc<dyn SnapshotStore>,
    observer: Arc<dyn Observer>,
    lock_wait: Duration,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("lock_wait", &self.lock_wait)
            .finish_non_exhaustive()
    }
}

/// A failed step: which, and why.
type StepError = (Step, DriverError);

/// The result of a step.
type StepResult<T> = std::result::Result<T, StepError>;

/// Tags an error with the step it failed in.
fn at<E: Into<DriverError>>(step: Step) -> impl FnOnce(E) -> StepError {
    move |e| (step, e.into())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Removes a file; a missing file is fine.
fn remove_file(path: &Path) -> std::io::Result<()> {
    // Nothing there is nothing to remove, also where unlink would say more (a read-only folder
    // answers EROFS for a name that does not exist).
    if let Err(e) = std::fs::symlink_metadata(path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(());
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Orchestrator {
    /// An orchestrator that reports to `observer`.
    pub fn new(
        hypervisor: Arc<dyn Hypervisor>,
        store: Arc<dyn SnapshotStore>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Self {
            hypervisor,
            store,
            observer,
            lock_wait: Duration::from_secs(10),
        }
    }

    /// How long a command waits for another one holding the domain's lock (default 10 s).
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    fn failed(
        &self,
        operation: Operation,
        domain: &Name,
        snapshot: &Name,
        (step, source): StepError,
        rollback: Vec<String>,
        domain_left: Option<String>,
    ) -> Error {
        Error::Failed {
            operation,
            domain: domain.clone(),
            snapshot: snapshot.clone(),
            step,
            source,
            rollback,
            domain_left,
        }
    }

    /// Takes the domain's lock and finishes or undoes an interrupted operation. Every operation
    /// starts here; other commands on the domain (start, stop, pause) hold this lock too, so
    /// they cannot interleave with a snapshot operation.
    pub async fn begin(&self, domain: &Name) -> Result<(DomainLock, Option<Recovery>)> {
        let lock = self.store.lock(domain, self.lock_wait).await?;
        let recovered = self.recover_locked(domain).await?;
        Ok((lock, recovered))
    }

    /// The domain's state, configuration and disks.
    async fn inspect(&self, domain: &Name) -> StepResult<(DomainState, serde_json::Value, Vec<DiskTarget>)> {
        let state = self.hypervisor.state(domain).await.map_err(at(Step::Inspect))?;
        let config = self.hypervisor.config(domain).await.map_err(at(Step::Inspect))?;
        let disks = self.hypervisor.disks(domain).await.map_err(at(Step::Inspect))?;
        Ok((state, config, disks))
    }

    /// Records the domain's disks when it is shut off (a running domain's driver follows the
    /// hypervisor's own view of its disks).
    async fn define_disks(
        &self,
        domain: &Name,
        disks: &[DiskTarget],
    ) -> std::result::Result<(), DriverError> {
        if self.hypervisor.state(domain).await? == DomainState::ShutOff {
            let config = self.hypervisor.config(domain).await?;
            self.hypervisor.define(domain, &config, disks).await?;
        }
        Ok(())
    }

    /// Adds `overlays` to the list of images domsnap made for the domain.
    fn add_overlays(&self, domain: &Name, overlays: &[PathBuf]) -> Result<()> {
        if overlays.is_empty() {
            return Ok(());
        }
        let mut owned = self.store.overlays(domain)?;
        for overlay in overlays {
            if !owned.contains(overlay) {
                owned.push(overlay.clone());
            }
        }
        self.store.set_overlays(domain, &owned)
    }

    fn remove_overlays_from_list(&self, domain: &Name, overlays: &[PathBuf]) -> Result<()> {
        if overlays.is_empty() {
            return Ok(());
        }
        let mut owned = self.store.overlays(domain)?;
        owned.retain(|o| !overlays.contains(o));
        self.store.set_overlays(domain, &owned)
    }
}
