//! Create, delete and revert whole-domain snapshots: the steps, their order, and the undo of
//! every step when a later one fails.
//!
//! Every operation takes the domain's lock, finishes or undoes an operation a crash interrupted
//! ([`Orchestrator::recover`]), writes an [`Intent`] record, runs its steps, and clears the
//! intent. A failing step undoes what the operation did and reports the step
//! ([`Error::Failed`]); the domain is left running if it was running.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use disk::{DiskSnapshots, ExternalSnapshot, MergeMethod};
use memory::{ConvergencePolicy, GuestMemory, RoundStats, SaveSummary};
use serde::Serialize;
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{
    error::{Error, Operation, Result, Step},
    hypervisor::{CaptureSignals, DiskTarget, DriverError, Hypervisor, StreamedSave},
    intent::Intent,
    metadata::{
        Consistency, DiskRecord, DiskSnapshot, DomainState, MemoryState, SnapshotRecord, METADATA_VERSION,
    },
    name::Name,
    store::{SnapshotFiles, SnapshotStore},
    tree::SnapshotTree,
};

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

    /// The mode's name in reports.
    fn name(&self) -> &'static str {
        match self {
            MemoryMode::Paused => "paused",
            MemoryMode::Live(_) => "precopy",
            MemoryMode::Background => "background",
        }
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

/// Options of [`Orchestrator::create`].
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
    /// How memory was saved: `paused`, `precopy`, `background`, or `none` (disks only).
    pub memory_mode: &'static str,
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
    /// Wall time, milliseconds.
    pub total_ms: f64,
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
    /// Time spent loading memory into the new domain, milliseconds.
    pub memory_ms: f64,
}

/// What [`Orchestrator::recover`] found and did.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// The domain.
    pub domain: Name,
    /// The interrupted operation.
    pub operation: Operation,
    /// Its snapshot.
    pub snapshot: Name,
    /// `finished` or `undone`.
    pub outcome: &'static str,
}

/// One problem [`Orchestrator::verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The snapshot.
    pub snapshot: Name,
    /// Problems found; empty means intact.
    pub problems: Vec<String>,
    /// Pages in the memory image, and how many are stored.
    pub memory_pages: Option<(u64, u64)>,
}

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
    pub async fn begin(&self, domain: &Name) -> Result<(crate::store::DomainLock, Option<Recovery>)> {
        let lock = self.store.lock(domain, self.lock_wait)?;
        let recovered = self.recover_locked(domain).await?;
        Ok((lock, recovered))
    }

    /// The domain's state, configuration and disks.
    async fn inspect(
        &self,
        domain: &Name,
    ) -> std::result::Result<(DomainState, serde_json::Value, Vec<DiskTarget>), StepError> {
        let state = self.hypervisor.state(domain).await.map_err(at(Step::Inspect))?;
        let config = self.hypervisor.config(domain).await.map_err(at(Step::Inspect))?;
        let disks = self.hypervisor.disks(domain).await.map_err(at(Step::Inspect))?;
        Ok((state, config, disks))
    }

    // ---------------------------------------------------------------- create

    /// Creates snapshot `snapshot` of `domain`: memory, device state and disks of a running or
    /// paused domain; disks only of a shut-off one.
    pub async fn create(
        &self,
        domain: &Name,
        snapshot: &Name,
        options: CreateOptions,
    ) -> Result<CreateReport> {
        let started = Instant::now();
        let _lock = self.begin(domain).await?;
        let fail = |e: StepError| self.failed(Operation::Create, domain, snapshot, e, Vec::new(), None);
        self.observer.step(Operation::Create, Step::Inspect);
        let (state, config, targets) = self.inspect(domain).await.map_err(fail)?;
        if self.store.get(domain, snapshot).is_ok() {
            return Err(Error::SnapshotExists {
                domain: domain.clone(),
                snapshot: snapshot.clone(),
            });
        }
        let disks = plan_disks(snapshot, &targets, &options.disks)?;
        let parent = self.store.current(domain)?;

        self.observer.step(Operation::Create, Step::Intent);
        let intent = Intent::Create {
            snapshot: snapshot.clone(),
            was: state,
            disks: disks.clone(),
        };
        self.store.set_intent(domain, &intent)?;
        let new_overlays: Vec<PathBuf> = disks.iter().filter_map(external_overlay).cloned().collect();
        let prepared = self
            .add_overlays(domain, &new_overlays)
            .and_then(|()| self.store.prepare(domain, snapshot));
        let files = match prepared {
            Ok(files) => files,
            Err(e) => {
                // Nothing was made yet: forget the plan.
                let _ = self.remove_overlays_from_list(domain, &new_overlays);
                let _ = self.store.clear_intent(domain);
                return Err(e);
            }
        };

        let mut run = CreateRun {
            paused_by_us: None,
            disks_done: false,
            memory: None,
        };
        let outcome = self
            .create_steps(domain, snapshot, state, &options, &disks, &files, &mut run)
            .await;
        match outcome {
            Ok(saved) => {
                let record = SnapshotRecord {
                    version: METADATA_VERSION,
                    name: snapshot.clone(),
                    domain: domain.clone(),
                    description: options.description.clone(),
                    created_unix_ms: now_unix_ms(),
                    parent,
                    state,
                    config,
                    memory: saved.memory,
                    disks,
                };
                self.observer.step(Operation::Create, Step::Commit);
                if let Err(e) = self.store.commit(&record) {
                    let rollback = self.undo_create(domain, snapshot, state, &record.disks).await;
                    return Err(self.failed(
                        Operation::Create,
                        domain,
                        snapshot,
                        (Step::Commit, e.into()),
                        rollback,
                        None,
                    ));
                }
                // The snapshot exists from here on; what follows only tidies up.
                self.observer.step(Operation::Create, Step::UpdateTree);
                self.store.set_current(domain, Some(snapshot.clone()))?;
                self.store.clear_intent(domain)?;
                let rounds: Vec<RoundReport> = saved
                    .summary
                    .iter()
                    .flat_map(|s| &s.rounds)
                    .map(RoundReport::from)
                    .collect();
                let (memory_bytes, memory_pages) = match (&saved.summary, &saved.streamed) {
                    (Some(summary), _) => (
                        rounds.iter().map(|r| r.bytes_written).sum(),
                        Some((summary.total_pages, summary.present_pages)),
                    ),
                    (None, Some(streamed)) => (
                        streamed.pages * memory::PAGE_SIZE as u64,
                        Some((streamed.ram_bytes / memory::PAGE_SIZE as u64, streamed.pages)),
                    ),
                    (None, None) => (0, None),
                };
                Ok(CreateReport {
                    memory_mode: if record.memory.is_some() {
                        options.memory.name()
                    } else {
                        "none"
                    },
                    memory_bytes,
                    memory_rounds: rounds,
                    memory_pages,
                    streamed: saved.streamed,
                    record,
                    total_ms: millis(started.elapsed()),
                    guest_pause_ms: millis(saved.guest_pause),
                })
            }
            Err(error) => {
                if let Some(saver) = run.memory.take() {
                    saver.abandon().await;
                }
                let mut rollback = Vec::new();
                if run.disks_done {
                    rollback.extend(self.undo_disks(domain, &disks).await);
                }
                if let Some(since) = run.paused_by_us {
                    if let Err(e) = self.hypervisor.resume(domain).await {
                        rollback.push(format!("cannot resume the domain: {e}"));
                    }
                    tracing::debug!(
                        paused_ms = millis(since.elapsed()),
                        "resumed after a failed create"
                    );
                }
                rollback.extend(self.forget_create(domain, snapshot, &disks));
                Err(self.failed(Operation::Create, domain, snapshot, error, rollback, None))
            }
        }
    }

    /// The steps of a create up to the resume; `run` tracks what needs undoing.
    #[allow(clippy::too_many_arguments)]
    async fn create_steps(
        &self,
        domain: &Name,
        snapshot: &Name,
        state: DomainState,
        options: &CreateOptions,
        disks: &[DiskRecord],
        files: &SnapshotFiles,
        run: &mut CreateRun,
    ) -> std::result::Result<Saved, StepError> {
        let observe = |step| self.observer.step(Operation::Create, step);
        if state != DomainState::ShutOff && matches!(options.memory, MemoryMode::Background) {
            return self
                .background_steps(domain, snapshot, state, disks, files, run)
                .await;
        }
        let mut memory_state = None;
        if state != DomainState::ShutOff {
            let mem = self
                .hypervisor
                .guest_memory(domain)
                .await
                .map_err(at(Step::SaveMemory))?;
            let ram_bytes = mem.size();
            let live = match (&options.memory, state) {
                (MemoryMode::Live(policy), DomainState::Running) => Some(*policy),
                _ => None,
            };
            if live.is_some() {
                observe(Step::Precopy);
            }
            let saver = run.memory.insert(MemorySaver::start(
                mem,
                files.memory_image.clone(),
                live,
                self.observer.clone(),
            ));
            saver.precopied().await.map_err(at(Step::Precopy))?;
            self.pause_if_running(domain, state, &mut run.paused_by_us)
                .await?;
            // The final memory round and the device state are independent: overlap them.
            observe(Step::SaveMemory);
            observe(Step::SaveDeviceState);
            let (copied, devices) = tokio::join!(
                saver.copy_while_paused(),
                self.hypervisor.save_device_state(domain, &files.device_state)
            );
            copied.map_err(at(Step::SaveMemory))?;
            devices.map_err(at(Step::SaveDeviceState))?;
            memory_state = Some(MemoryState {
                image: file_name(&files.memory_image),
                device_state: file_name(&files.device_state),
                consistency: Consistency::End,
                ram_bytes,
            });
        }

        self.snapshot_disks_step(domain, snapshot, disks, &mut run.disks_done)
            .await?;
        if state == DomainState::ShutOff {
            self.define_disks(domain, &active_after_create(disks))
                .await
                .map_err(at(Step::SnapshotDisks))?;
        }

        let mut guest_pause = Duration::ZERO;
        if let Some(since) = run.paused_by_us {
            observe(Step::Resume);
            self.hypervisor.resume(domain).await.map_err(at(Step::Resume))?;
            run.paused_by_us = None;
            guest_pause = since.elapsed();
        }
        let mut summary = None;
        if let Some(saver) = run.memory.take() {
            observe(Step::SealMemory);
            summary = Some(saver.seal().await.map_err(at(Step::SealMemory))?);
        }
        Ok(Saved {
            memory: memory_state,
            summary,
            streamed: None,
            guest_pause,
        })
    }

    /// The steps of a background create: the driver prepares its snapshot while the guest runs;
    /// then pause, snapshot the disks, let the hypervisor capture the state, resume as soon as it
    /// has, and wait while memory streams into the image. Memory, devices and disks are all as
    /// of the pause.
    async fn background_steps(
        &self,
        domain: &Name,
        snapshot: &Name,
        state: DomainState,
        disks: &[DiskRecord],
        files: &SnapshotFiles,
        run: &mut CreateRun,
    ) -> std::result::Result<Saved, StepError> {
        let observe = |step| self.observer.step(Operation::Create, step);
        let (prepared, on_prepared) = oneshot::channel();
        let (capture, on_capture) = oneshot::channel();
        let (captured, on_captured) = oneshot::channel();
        let signals = CaptureSignals {
            prepared,
            capture: on_capture,
            captured,
        };
        observe(Step::SaveMemory);
        let save = self
            .hypervisor
            .background_save(domain, &files.memory_image, &files.device_state, signals);
        tokio::pin!(save);
        // A save that ends before it is prepared failed.
        tokio::select! {
            biased;
            Ok(()) = on_prepared => {}
            result = &mut save => {
                let failure = result.err().unwrap_or_else(|| "the background save ended before it started".into());
                return Err((Step::SaveMemory, failure));
            }
        }

        let paused_and_disks = async {
            self.pause_if_running(domain, state, &mut run.paused_by_us)
                .await?;
            self.snapshot_disks_step(domain, snapshot, disks, &mut run.disks_done)
                .await
        };
        if let Err(error) = paused_and_disks.await {
            // Dropping `capture` makes the driver give up; let it clean up before the rollback.
            drop(capture);
            let _ = save.await;
            return Err(error);
        }

        tracing::debug!(%domain, "disks snapshotted; capturing");
        let _ = capture.send(());
        // Until the state is captured the guest stays paused. A save that ends first either
        // failed (the rollback resumes the guest) or is complete, capture included.
        let ended_early = tokio::select! {
            biased;
            // A dropped sender (no capture) disables this branch.
            Ok(()) = on_captured => None,
            result = &mut save => Some(result),
        };
        let mut guest_pause = Duration::ZERO;
        if ended_early.as_ref().is_none_or(Result::is_ok) {
            if let Some(since) = run.paused_by_us {
                observe(Step::Resume);
                self.hypervisor.resume(domain).await.map_err(at(Step::Resume))?;
                run.paused_by_us = None;
                guest_pause = since.elapsed();
            }
        }
        let streamed = match ended_early {
            Some(result) => result,
            None => save.await,
        }
        .map_err(at(Step::SaveMemory))?;
        Ok(Saved {
            memory: Some(MemoryState {
                image: file_name(&files.memory_image),
                device_state: file_name(&files.device_state),
                consistency: Consistency::Start,
                ram_bytes: streamed.ram_bytes,
            }),
            summary: None,
            streamed: Some(streamed),
            guest_pause,
        })
    }

    /// Pauses a running domain for a create; `paused_by_us` remembers it must be resumed.
    async fn pause_if_running(
        &self,
        domain: &Name,
        state: DomainState,
        paused_by_us: &mut Option<Instant>,
    ) -> std::result::Result<(), StepError> {
        if state == DomainState::Running {
            self.observer.step(Operation::Create, Step::Pause);
            self.hypervisor.pause(domain).await.map_err(at(Step::Pause))?;
            *paused_by_us = Some(Instant::now());
        }
        Ok(())
    }

    /// The disk step of a create; `disks_done` remembers it ran (perhaps partly), for the undo.
    async fn snapshot_disks_step(
        &self,
        domain: &Name,
        snapshot: &Name,
        disks: &[DiskRecord],
        disks_done: &mut bool,
    ) -> std::result::Result<(), StepError> {
        self.observer.step(Operation::Create, Step::SnapshotDisks);
        let backend = self
            .hypervisor
            .disk_backend(domain)
            .await
            .map_err(at(Step::SnapshotDisks))?;
        *disks_done = true;
        self.snapshot_disks(&*backend, snapshot, disks)
            .await
            .map_err(at(Step::SnapshotDisks))
    }

    /// Internal snapshots of all disks that take one (one atomic call), then the external ones
    /// (another); if the second fails the first is undone.
    async fn snapshot_disks(
        &self,
        backend: &dyn DiskSnapshots,
        snapshot: &Name,
        disks: &[DiskRecord],
    ) -> std::result::Result<(), DriverError> {
        let internal: Vec<PathBuf> = disks
            .iter()
            .filter(|d| matches!(d.snapshot, DiskSnapshot::Internal { .. }))
            .map(|d| d.image.clone())
            .collect();
        let external: Vec<ExternalSnapshot> = disks
            .iter()
            .filter_map(|d| {
                external_overlay(d).map(|overlay| ExternalSnapshot {
                    disk: d.image.clone(),
                    overlay: overlay.clone(),
                    backing_path: disk::BackingPath::Absolute,
                })
            })
            .collect();
        if !internal.is_empty() {
            backend.create_internal(&internal, snapshot.as_str()).await?;
        }
        if !external.is_empty() {
            if let Err(e) = backend.create_external(&external).await {
                if !internal.is_empty() {
                    let _ = backend.delete_internal(&internal, snapshot.as_str()).await;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Undoes the disk snapshots a create may have made: internal snapshots that exist are
    /// deleted; an overlay the domain writes to is committed back into its image; overlay files
    /// are removed. Returns what could not be undone.
    async fn undo_disks(&self, domain: &Name, disks: &[DiskRecord]) -> Vec<String> {
        let mut problems = Vec::new();
        let backend = match self.hypervisor.disk_backend(domain).await {
            Ok(backend) => backend,
            Err(e) => return vec![format!("cannot reach the disks: {e}")],
        };
        let active = match self.hypervisor.disks(domain).await {
            Ok(active) => active,
            Err(e) => return vec![format!("cannot read the domain's disks: {e}")],
        };
        let mut active_after = active.clone();
        for disk in disks {
            match &disk.snapshot {
                DiskSnapshot::Internal { name } => {
                    if let Err(e) = delete_internal_if_present(&*backend, &disk.image, name).await {
                        problems.push(format!(
                            "cannot delete internal snapshot {name} of {}: {e}",
                            disk.image.display()
                        ));
                    }
                }
                DiskSnapshot::External { overlay, .. } => {
                    let in_use = active
                        .iter()
                        .any(|t| t.target == disk.target && &t.image == overlay);
                    if in_use {
                        match backend
                            .delete_external(overlay, overlay, MergeMethod::CommitIntoParent)
                            .await
                        {
                            Ok(parent) => {
                                for target in active_after.iter_mut().filter(|t| t.target == disk.target) {
                                    target.image = parent.clone();
                                }
                            }
                            Err(e) => {
                                problems.push(format!(
                                    "cannot merge overlay {} back into {}: {e}",
                                    overlay.display(),
                                    disk.image.display()
                                ));
                                continue;
                            }
                        }
                    }
                    if let Err(e) = remove_file(overlay) {
                        problems.push(format!("cannot remove overlay {}: {e}", overlay.display()));
                    }
                }
            }
        }
        if active_after != active {
            if let Err(e) = self.define_disks(domain, &active_after).await {
                problems.push(format!("cannot record the domain's disks: {e}"));
            }
        }
        problems
    }

    /// Removes a create's folder, overlay list entries and intent. Returns what failed.
    fn forget_create(&self, domain: &Name, snapshot: &Name, disks: &[DiskRecord]) -> Vec<String> {
        let mut problems = Vec::new();
        let overlays: Vec<PathBuf> = disks.iter().filter_map(external_overlay).cloned().collect();
        for result in [
            self.store.remove(domain, snapshot),
            self.remove_overlays_from_list(domain, &overlays),
            self.store.clear_intent(domain),
        ] {
            if let Err(e) = result {
                problems.push(e.to_string());
            }
        }
        problems
    }

    /// The full undo of a create whose disks step may have run.
    async fn undo_create(
        &self,
        domain: &Name,
        snapshot: &Name,
        was: DomainState,
        disks: &[DiskRecord],
    ) -> Vec<String> {
        let mut problems = self.undo_disks(domain, disks).await;
        if was == DomainState::Running {
            match self.hypervisor.state(domain).await {
                Ok(DomainState::Paused) => {
                    if let Err(e) = self.hypervisor.resume(domain).await {
                        problems.push(format!("cannot resume the domain: {e}"));
                    }
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("cannot read the domain's state: {e}")),
            }
        }
        problems.extend(self.forget_create(domain, snapshot, disks));
        problems
    }

    // ---------------------------------------------------------------- delete

    /// Deletes a snapshot (with `children`, its whole subtree, deepest first). Children that are
    /// kept are re-parented to the snapshot's parent; if it was current, its parent becomes
    /// current.
    pub async fn delete(&self, domain: &Name, snapshot: &Name, children: bool) -> Result<DeleteReport> {
        let started = Instant::now();
        let _lock = self.begin(domain).await?;
        let records = self.store.list(domain)?;
        let record = self.store.get(domain, snapshot)?;
        let mut victims: Vec<SnapshotRecord> = Vec::new();
        if children {
            let tree = SnapshotTree::new(&records);
            victims.extend(tree.descendants(snapshot).into_iter().rev().cloned());
        }
        victims.push(record);
        let mut report = DeleteReport::default();
        for victim in victims {
            self.store.set_intent(
                domain,
                &Intent::Delete {
                    record: victim.clone(),
                },
            )?;
            let removed = self
                .delete_steps(&victim)
                .await
                .map_err(|e| self.failed(Operation::Delete, domain, &victim.name, e, Vec::new(), None))?;
            self.store.clear_intent(domain)?;
            report.removed_images.extend(removed);
            report.deleted.push(victim.name);
        }
        report.total_ms = millis(started.elapsed());
        Ok(report)
    }

    /// The steps of one delete. Each is idempotent, so recovery runs them again. Returns the
    /// overlay images removed.
    async fn delete_steps(&self, record: &SnapshotRecord) -> std::result::Result<Vec<PathBuf>, StepError> {
        let domain = &record.domain;
        self.observer.step(Operation::Delete, Step::DeleteDisks);
        self.delete_disks(record).await.map_err(at(Step::DeleteDisks))?;

        self.observer.step(Operation::Delete, Step::RemoveFiles);
        self.store
            .remove(domain, &record.name)
            .map_err(at(Step::RemoveFiles))?;

        self.observer.step(Operation::Delete, Step::UpdateTree);
        let update = || -> Result<()> {
            for mut child in self.store.list(domain)? {
                if child.parent.as_ref() == Some(&record.name) {
                    child.parent = record.parent.clone();
                    self.store.commit(&child)?;
                }
            }
            if self.store.current(domain)?.as_ref() == Some(&record.name) {
                self.store.set_current(domain, record.parent.clone())?;
            }
            Ok(())
        };
        update().map_err(at(Step::UpdateTree))?;

        self.observer.step(Operation::Delete, Step::TidyDisks);
        self.tidy_disks(domain).await.map_err(at(Step::TidyDisks))
    }

    /// Deletes a snapshot's internal disk snapshots (where still present). Its external ones
    /// need no step of their own: once the record is gone, [`Orchestrator::tidy_disks`] folds
    /// away the overlays no snapshot reads any more.
    async fn delete_disks(&self, record: &SnapshotRecord) -> std::result::Result<(), DriverError> {
        let backend = self.hypervisor.disk_backend(&record.domain).await?;
        for disk in &record.disks {
            if let DiskSnapshot::Internal { name } = &disk.snapshot {
                delete_internal_if_present(&*backend, &disk.image, name).await?;
            }
        }
        Ok(())
    }

    /// Folds away and removes the overlays domsnap made that no snapshot needs any more, after
    /// a delete or a revert. Two passes:
    /// - fold: while a disk's active image is a domsnap overlay no snapshot reads, and its
    ///   parent is neither a snapshot's image nor read by another image, the overlay is
    ///   committed into its parent (which becomes active) and removed;
    /// - sweep: domsnap overlays outside every backing chain of the active images and the
    ///   snapshots' images (a revert's replaced overlay, for one) are removed.
    ///
    /// Returns the images removed.
    async fn tidy_disks(&self, domain: &Name) -> std::result::Result<Vec<PathBuf>, DriverError> {
        let records = self.store.list(domain)?;
        let snapshot_images: HashSet<PathBuf> = records
            .iter()
            .flat_map(|r| r.disks.iter().map(|d| d.image.clone()))
            .collect();
        let mut owned = self.store.overlays(domain)?;
        let mut active = self.hypervisor.disks(domain).await?;
        let before = active.clone();
        let backend = self.hypervisor.disk_backend(domain).await?;
        let mut removed = Vec::new();

        for index in 0..active.len() {
            loop {
                let image = active[index].image.clone();
                if !owned.contains(&image) || snapshot_images.contains(&image) {
                    break;
                }
                let Some(parent) = disk::offline::backing_file(&image)? else {
                    break;
                };
                let mut readers = owned
                    .iter()
                    .chain(&snapshot_images)
                    .chain(active.iter().map(|t| &t.image));
                let shared = readers.try_fold(false, |shared, other| {
                    let reads = other != &image
                        && other.exists()
                        && disk::offline::backing_file(other)?.as_ref() == Some(&parent);
                    Ok::<_, disk::Error>(shared || reads)
                })?;
                if snapshot_images.contains(&parent) || shared {
                    break;
                }
                active[index].image = backend
                    .delete_external(&image, &image, MergeMethod::CommitIntoParent)
                    .await?;
                remove_file(&image)?;
                owned.retain(|o| o != &image);
                self.store.set_overlays(domain, &owned)?;
                removed.push(image);
            }
        }
        if active != before {
            self.define_disks(domain, &active).await?;
        }

        let mut needed = HashSet::new();
        let mut stack: Vec<PathBuf> = active
            .iter()
            .map(|t| t.image.clone())
            .chain(snapshot_images)
            .collect();
        while let Some(image) = stack.pop() {
            if image.exists() && needed.insert(image.clone()) {
                stack.extend(disk::offline::backing_file(&image)?);
            }
        }
        let (keep, unused): (Vec<PathBuf>, Vec<PathBuf>) =
            owned.into_iter().partition(|o| needed.contains(o));
        for image in &unused {
            remove_file(image)?;
        }
        self.store.set_overlays(domain, &keep)?;
        removed.extend(unused);
        Ok(removed)
    }

    // ---------------------------------------------------------------- revert

    /// Reverts the domain to a snapshot: stops it, reverts the disks, restores the configuration
    /// and, if the snapshot has memory, starts the domain from it (running, or paused with
    /// `paused`). A disk-only snapshot leaves the domain shut off.
    ///
    /// The snapshot is checked (memory image checksums, files present) before the domain is
    /// touched; a failure after the domain was stopped leaves it shut off with its previous
    /// configuration and disks where those could be kept (external disks).
    pub async fn revert(&self, domain: &Name, snapshot: &Name, paused: bool) -> Result<RevertReport> {
        let started = Instant::now();
        let _lock = self.begin(domain).await?;
        let record = self.store.get(domain, snapshot)?;
        let files = self.store.files(domain, snapshot);
        let fail = |e: StepError| self.failed(Operation::Revert, domain, snapshot, e, Vec::new(), None);

        self.observer.step(Operation::Revert, Step::Check);
        self.check_revertible(&record, &files)
            .await
            .map_err(at(Step::Check))
            .map_err(fail)?;
        let (state, old_config, old_disks) = self.inspect(domain).await.map_err(fail)?;
        let stamp = now_unix_ms();
        let new_overlays: Vec<PathBuf> = record
            .disks
            .iter()
            .filter_map(|d| external_overlay(d).map(|overlay| revert_overlay_path(overlay, stamp)))
            .collect();

        self.observer.step(Operation::Revert, Step::Intent);
        self.add_overlays(domain, &new_overlays)?;
        let intent = Intent::Revert {
            snapshot: snapshot.clone(),
            paused,
            new_overlays: new_overlays.clone(),
        };
        self.store.set_intent(domain, &intent)?;
        match self.revert_steps(&record, &files, paused, &new_overlays).await {
            Ok((state, memory_ms)) => {
                self.store.clear_intent(domain)?;
                Ok(RevertReport {
                    snapshot: snapshot.clone(),
                    state,
                    total_ms: millis(started.elapsed()),
                    memory_ms,
                })
            }
            Err(error) => {
                let stopped = error.0 != Step::Stop;
                let mut rollback = Vec::new();
                if stopped {
                    if let Err(e) = self.hypervisor.destroy(domain).await {
                        rollback.push(format!("cannot stop the half-started domain: {e}"));
                    }
                }
                for overlay in &new_overlays {
                    if let Err(e) = remove_file(overlay) {
                        rollback.push(format!("cannot remove overlay {}: {e}", overlay.display()));
                    }
                }
                if let Err(e) = self.hypervisor.define(domain, &old_config, &old_disks).await {
                    rollback.push(format!("cannot restore the domain configuration: {e}"));
                }
                for result in [
                    self.remove_overlays_from_list(domain, &new_overlays),
                    self.store.clear_intent(domain),
                ] {
                    if let Err(e) = result {
                        rollback.push(e.to_string());
                    }
                }
                let left = (stopped && state != DomainState::ShutOff)
                    .then(|| "the domain is shut off: its previous run was ended by the revert".to_owned());
                Err(self.failed(Operation::Revert, domain, snapshot, error, rollback, left))
            }
        }
    }

    /// Checks what a revert needs before it stops the domain.
    async fn check_revertible(
        &self,
        record: &SnapshotRecord,
        files: &SnapshotFiles,
    ) -> std::result::Result<(), DriverError> {
        if record.memory.is_some() {
            let image = files.memory_image.clone();
            tokio::task::spawn_blocking(move || memory::verify(&image)).await??;
            let devices = std::fs::metadata(&files.device_state)
                .map_err(|e| format!("device state {}: {e}", files.device_state.display()))?;
            if devices.len() == 0 {
                return Err(format!("device state {} is empty", files.device_state.display()).into());
            }
        }
        for disk in &record.disks {
            if !disk.image.exists() {
                return Err(format!("disk {} image {} is missing", disk.target, disk.image.display()).into());
            }
        }
        Ok(())
    }

    /// The steps of a revert from stopping the domain on. They redo cleanly, so recovery runs
    /// them again after a crash. Returns the domain's state afterwards and the memory load time.
    async fn revert_steps(
        &self,
        record: &SnapshotRecord,
        files: &SnapshotFiles,
        paused: bool,
        new_overlays: &[PathBuf],
    ) -> std::result::Result<(DomainState, f64), StepError> {
        let domain = &record.domain;
        let observe = |step| self.observer.step(Operation::Revert, step);
        observe(Step::Stop);
        self.hypervisor.destroy(domain).await.map_err(at(Step::Stop))?;

        observe(Step::RevertDisks);
        let backend = self
            .hypervisor
            .disk_backend(domain)
            .await
            .map_err(at(Step::RevertDisks))?;
        let mut new_disks = Vec::new();
        let mut internal = Vec::new();
        let mut overlays = new_overlays.iter();
        for disk in &record.disks {
            let image = match &disk.snapshot {
                DiskSnapshot::Internal { .. } => {
                    internal.push(disk.image.clone());
                    disk.image.clone()
                }
                DiskSnapshot::External { .. } => {
                    let overlay = overlays
                        .next()
                        .ok_or_else(|| (Step::RevertDisks, "revert overlay list is short".into()))?;
                    // A crash may have left it from an earlier attempt.
                    remove_file(overlay).map_err(at(Step::RevertDisks))?;
                    backend
                        .revert_external(&ExternalSnapshot {
                            disk: disk.image.clone(),
                            overlay: overlay.clone(),
                            backing_path: disk::BackingPath::Absolute,
                        })
                        .await
                        .map_err(at(Step::RevertDisks))?;
                    overlay.clone()
                }
            };
            new_disks.push(DiskTarget {
                target: disk.target.clone(),
                image,
            });
        }
        if !internal.is_empty() {
            backend
                .apply_internal(&internal, record.name.as_str())
                .await
                .map_err(at(Step::RevertDisks))?;
        }

        observe(Step::Define);
        self.hypervisor
            .define(domain, &record.config, &new_disks)
            .await
            .map_err(at(Step::Define))?;

        let mut state = DomainState::ShutOff;
        let mut memory_ms = 0.0;
        if record.memory.is_some() {
            observe(Step::StartIncoming);
            self.hypervisor
                .start_incoming(domain)
                .await
                .map_err(at(Step::StartIncoming))?;
            observe(Step::RestoreMemory);
            let restore_started = Instant::now();
            let mem = self
                .hypervisor
                .guest_memory(domain)
                .await
                .map_err(at(Step::RestoreMemory))?;
            let image = files.memory_image.clone();
            tokio::task::spawn_blocking(move || {
                // The new domain's RAM file was just created: all zero.
                let options = memory::RestoreOptions {
                    zero_pages: memory::ZeroPages::AssumeZeroed,
                };
                memory::restore(&image, &mem, &options)
            })
            .await
            .map_err(at(Step::RestoreMemory))?
            .map_err(at(Step::RestoreMemory))?;
            memory_ms = millis(restore_started.elapsed());
            observe(Step::LoadDeviceState);
            self.hypervisor
                .load_device_state(domain, &files.device_state)
                .await
                .map_err(at(Step::LoadDeviceState))?;
            state = DomainState::Paused;
            if !paused {
                observe(Step::Resume);
                self.hypervisor.resume(domain).await.map_err(at(Step::Resume))?;
                state = DomainState::Running;
            }
        }

        observe(Step::UpdateTree);
        self.store
            .set_current(domain, Some(record.name.clone()))
            .map_err(at(Step::UpdateTree))?;
        // The overlays the domain wrote to before are not needed any more (unless a snapshot
        // reads them).
        observe(Step::TidyDisks);
        self.tidy_disks(domain).await.map_err(at(Step::TidyDisks))?;
        Ok((state, memory_ms))
    }

    // ---------------------------------------------------------------- recover, verify

    /// Finishes or undoes an operation on `domain` that a crash interrupted. Every other
    /// operation runs this first; it is also a command of its own.
    pub async fn recover(&self, domain: &Name) -> Result<Option<Recovery>> {
        let (_lock, recovered) = self.begin(domain).await?;
        Ok(recovered)
    }

    /// [`Orchestrator::recover`] for every domain in the store.
    pub async fn recover_all(&self) -> Result<Vec<Recovery>> {
        let mut recovered = Vec::new();
        for domain in self.store.domains()? {
            recovered.extend(self.recover(&domain).await?);
        }
        Ok(recovered)
    }

    async fn recover_locked(&self, domain: &Name) -> Result<Option<Recovery>> {
        let Some(intent) = self.store.intent(domain)? else {
            return Ok(None);
        };
        let snapshot = intent.snapshot().clone();
        let fail =
            |e: StepError, rollback| self.failed(Operation::Recover, domain, &snapshot, e, rollback, None);
        let (operation, outcome) = match intent {
            Intent::Create { snapshot, was, disks } => {
                if self.store.get(domain, &snapshot).is_ok() {
                    // Committed: only the tidy-up and a resume were missing.
                    self.resume_if_paused(domain, was)
                        .await
                        .map_err(|e| fail(e, Vec::new()))?;
                    self.store.set_current(domain, Some(snapshot.clone()))?;
                    self.store.clear_intent(domain)?;
                    (Operation::Create, "finished")
                } else {
                    let rollback = self.undo_create(domain, &snapshot, was, &disks).await;
                    if !rollback.is_empty() {
                        return Err(fail(
                            (
                                Step::SnapshotDisks,
                                "the interrupted create could not be undone".into(),
                            ),
                            rollback,
                        ));
                    }
                    (Operation::Create, "undone")
                }
            }
            Intent::Delete { record } => {
                self.delete_steps(&record)
                    .await
                    .map_err(|e| fail(e, Vec::new()))?;
                self.store.clear_intent(domain)?;
                (Operation::Delete, "finished")
            }
            Intent::Revert {
                snapshot,
                paused,
                new_overlays,
            } => {
                let record = self.store.get(domain, &snapshot)?;
                let files = self.store.files(domain, &snapshot);
                self.revert_steps(&record, &files, paused, &new_overlays)
                    .await
                    .map_err(|e| fail(e, Vec::new()))?;
                self.store.clear_intent(domain)?;
                (Operation::Revert, "finished")
            }
        };
        tracing::info!(%domain, %snapshot, %operation, outcome, "recovered an interrupted operation");
        Ok(Some(Recovery {
            domain: domain.clone(),
            operation,
            snapshot,
            outcome,
        }))
    }

    async fn resume_if_paused(&self, domain: &Name, was: DomainState) -> std::result::Result<(), StepError> {
        if was == DomainState::Running
            && self.hypervisor.state(domain).await.map_err(at(Step::Resume))? == DomainState::Paused
        {
            self.hypervisor.resume(domain).await.map_err(at(Step::Resume))?;
        }
        Ok(())
    }

    /// Checks that a snapshot's files and disk snapshots exist and are intact: the memory
    /// image's checksums, the device state, each internal snapshot in its image, each external
    /// snapshot's image and its backing chain.
    pub async fn verify(&self, domain: &Name, snapshot: &Name) -> Result<VerifyReport> {
        let _lock = self.begin(domain).await?;
        let record = self.store.get(domain, snapshot)?;
        let files = self.store.files(domain, snapshot);
        let mut problems = Vec::new();
        let mut memory_pages = None;
        if record.memory.is_some() {
            let image = files.memory_image.clone();
            match tokio::task::spawn_blocking(move || memory::verify(&image)).await {
                Ok(Ok(info)) => memory_pages = Some((info.total_pages, info.present_pages)),
                Ok(Err(e)) => problems.push(format!("memory image: {e}")),
                Err(e) => problems.push(format!("memory image check: {e}")),
            }
            match std::fs::metadata(&files.device_state) {
                Ok(meta) if meta.len() > 0 => {}
                Ok(_) => problems.push(format!("device state {} is empty", files.device_state.display())),
                Err(e) => problems.push(format!("device state {}: {e}", files.device_state.display())),
            }
        }
        match self.hypervisor.disk_backend(domain).await {
            Err(e) => problems.push(format!("cannot reach the disks: {e}")),
            Ok(backend) => {
                for disk in &record.disks {
                    let checked = match &disk.snapshot {
                        DiskSnapshot::Internal { name } => match backend.list_internal(&disk.image).await {
                            Ok(list) if list.iter().any(|s| &s.name == name) => Ok(()),
                            Ok(_) => Err(format!("has no internal snapshot {name}")),
                            Err(e) => Err(e.to_string()),
                        },
                        DiskSnapshot::External { .. } => backend
                            .backing_chain(&disk.image)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string()),
                    };
                    if let Err(problem) = checked {
                        problems.push(format!(
                            "disk {} ({}): {problem}",
                            disk.target,
                            disk.image.display()
                        ));
                    }
                }
            }
        }
        Ok(VerifyReport {
            snapshot: snapshot.clone(),
            problems,
            memory_pages,
        })
    }

    // ---------------------------------------------------------------- helpers

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

    fn add_overlays(&self, domain: &Name, overlays: &[PathBuf]) -> Result<()> {
        if overlays.is_empty() {
            return Ok(());
        }
        let mut owned = self.store.overlays(domain)?;
        owned.extend(
            overlays
                .iter()
                .filter(|o| !owned.contains(o))
                .cloned()
                .collect::<Vec<_>>(),
        );
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

/// What the memory steps of a create produced.
struct Saved {
    memory: Option<MemoryState>,
    summary: Option<SaveSummary>,
    streamed: Option<StreamedSave>,
    guest_pause: Duration,
}

/// What a create has done so far, for its undo.
struct CreateRun {
    /// When the create paused the domain (it must resume it).
    paused_by_us: Option<Instant>,
    /// The disks step ran (perhaps partly).
    disks_done: bool,
    /// The memory save in progress.
    memory: Option<MemorySaver>,
}

/// Deletes the internal snapshot `name` of `image` if the image still holds it: undo and recovery
/// may run after a crash that happened either side of the delete.
async fn delete_internal_if_present(
    backend: &dyn DiskSnapshots,
    image: &Path,
    name: &str,
) -> std::result::Result<(), disk::Error> {
    if backend.list_internal(image).await?.iter().any(|s| s.name == name) {
        backend.delete_internal(&[image.to_owned()], name).await?;
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn external_overlay(disk: &DiskRecord) -> Option<&PathBuf> {
    match &disk.snapshot {
        DiskSnapshot::External { overlay, .. } => Some(overlay),
        DiskSnapshot::Internal { .. } => None,
    }
}

/// The disks a domain writes to after a create: external overlays replace their images.
fn active_after_create(disks: &[DiskRecord]) -> Vec<DiskTarget> {
    disks
        .iter()
        .map(|d| DiskTarget {
            target: d.target.clone(),
            image: external_overlay(d).unwrap_or(&d.image).clone(),
        })
        .collect()
}

/// A revert's fresh overlay: beside the snapshot's overlay, stamped with the revert's time.
fn revert_overlay_path(overlay: &Path, stamp: u64) -> PathBuf {
    let stem = overlay
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    overlay.with_file_name(format!("{stem}.revert-{stamp}.qcow2"))
}

/// Decides each disk's snapshot from the requests (disks not named: internal).
fn plan_disks(snapshot: &Name, targets: &[DiskTarget], requests: &[DiskRequest]) -> Result<Vec<DiskRecord>> {
    for (index, request) in requests.iter().enumerate() {
        if !targets.iter().any(|t| t.target == request.target) {
            let known: Vec<&str> = targets.iter().map(|t| t.target.as_str()).collect();
            return Err(Error::InvalidRequest(format!(
                "the domain has no disk {:?} (its disks: {})",
                request.target,
                known.join(", ")
            )));
        }
        if requests[..index].iter().any(|r| r.target == request.target) {
            return Err(Error::InvalidRequest(format!(
                "disk {} is named twice",
                request.target
            )));
        }
    }
    let mut planned: Vec<DiskRecord> = Vec::new();
    for target in targets {
        let kind = requests
            .iter()
            .find(|r| r.target == target.target)
            .map_or(&DiskKind::Internal, |r| &r.kind);
        let snapshot_kind = match kind {
            DiskKind::Internal => DiskSnapshot::Internal {
                name: snapshot.as_str().to_owned(),
            },
            DiskKind::External { path, format } => {
                let format = format.clone().unwrap_or_else(|| "qcow2".to_owned());
                if format != "qcow2" {
                    return Err(Error::InvalidRequest(format!(
                        "disk {}: overlay format {format:?} is not supported (qcow2 only)",
                        target.target
                    )));
                }
                let overlay = match path {
                    Some(path) => path.clone(),
                    None => {
                        let stem = target
                            .image
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        target.image.with_file_name(format!("{stem}.{snapshot}.qcow2"))
                    }
                };
                if !overlay.is_absolute() {
                    return Err(Error::InvalidRequest(format!(
                        "disk {}: overlay path {} is not absolute",
                        target.target,
                        overlay.display()
                    )));
                }
                if overlay.exists() || planned.iter().any(|d| external_overlay(d) == Some(&overlay)) {
                    return Err(Error::InvalidRequest(format!(
                        "disk {}: overlay {} exists already",
                        target.target,
                        overlay.display()
                    )));
                }
                DiskSnapshot::External { overlay, format }
            }
        };
        planned.push(DiskRecord {
            target: target.target.clone(),
            image: target.image.clone(),
            snapshot: snapshot_kind,
        });
    }
    Ok(planned)
}

/// A memory save on its own thread (copying and hashing pages is CPU-bound), driven in stages:
/// pre-copy while the domain runs, the final copy once it is paused, the seal after it resumed.
struct MemorySaver {
    precopied: Option<oneshot::Receiver<()>>,
    paused: Option<std::sync::mpsc::Sender<()>>,
    copied: Option<oneshot::Receiver<()>>,
    seal: Option<std::sync::mpsc::Sender<()>>,
    thread: JoinHandle<memory::Result<Option<SaveSummary>>>,
}

impl MemorySaver {
    /// Starts the save: with `live`, pre-copy rounds begin at once.
    fn start(
        mem: GuestMemory,
        image: PathBuf,
        live: Option<ConvergencePolicy>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let (precopied_tx, precopied) = oneshot::channel();
        let (paused, paused_rx) = std::sync::mpsc::channel();
        let (copied_tx, copied) = oneshot::channel();
        let (seal, seal_rx) = std::sync::mpsc::channel::<()>();
        let thread = tokio::task::spawn_blocking(move || {
            let layout = memory::ImageLayout::of(&mem);
            let sink = Box::new(memory::ImageWriter::create(
                &image,
                layout,
                memory::Durability::Sync,
            )?);
            let finished = match live {
                Some(policy) => {
                    let options = memory::SaveOptions {
                        policy,
                        progress: Some(Box::new(move |stats: &RoundStats| observer.memory_round(stats))),
                    };
                    let source = Box::new(memory::ContentCompare::new());
                    let mut save = memory::LiveSave::begin(&mem, source, sink, options)?;
                    save.precopy()?;
                    let _ = precopied_tx.send(());
                    if paused_rx.recv().is_err() {
                        return Ok(None);
                    }
                    save.finish()?
                }
                None => {
                    let _ = precopied_tx.send(());
                    if paused_rx.recv().is_err() {
                        return Ok(None);
                    }
                    memory::copy_paused(&mem, sink)?
                }
            };
            let _ = copied_tx.send(());
            if seal_rx.recv().is_err() {
                return Ok(None);
            }
            finished.seal().map(Some)
        });
        MemorySaver {
            precopied: Some(precopied),
            paused: Some(paused),
            copied: Some(copied),
            seal: Some(seal),
            thread,
        }
    }

    /// Waits for a stage; if the thread ended instead, its error.
    async fn stage(&mut self, signal: Option<oneshot::Receiver<()>>) -> std::result::Result<(), DriverError> {
        let signal = signal.ok_or("memory save stage reached twice")?;
        if signal.await.is_ok() {
            return Ok(());
        }
        match (&mut self.thread).await {
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(_)) => Err("the memory save stopped early".into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until pre-copy has converged (at once for a paused save).
    async fn precopied(&mut self) -> std::result::Result<(), DriverError> {
        let signal = self.precopied.take();
        self.stage(signal).await
    }

    /// Runs the copy that needs the domain paused and waits for it.
    async fn copy_while_paused(&mut self) -> std::result::Result<(), DriverError> {
        if let Some(paused) = self.paused.take() {
            let _ = paused.send(());
        }
        let signal = self.copied.take();
        self.stage(signal).await
    }

    /// Seals the image (fsync, rename) and returns the statistics.
    async fn seal(mut self) -> std::result::Result<SaveSummary, DriverError> {
        if let Some(seal) = self.seal.take() {
            let _ = seal.send(());
        }
        match self.thread.await? {
            Ok(Some(summary)) => Ok(summary),
            Ok(None) => Err("the memory save was abandoned".into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Abandons the save (its temporary image is removed) and waits for the thread.
    async fn abandon(mut self) {
        self.paused.take();
        self.seal.take();
        let _ = self.thread.await;
    }
}
