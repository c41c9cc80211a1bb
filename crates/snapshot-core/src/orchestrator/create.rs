//! Create: a snapshot of a domain's memory, device state and disks (disks only when it is shut
//! off). A [`CreateJob`] carries a create's state; each step records what it did, and
//! [`CreateJob::rollback`] undoes exactly that, in reverse.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use memory::{ConvergencePolicy, GuestMemory, SaveSummary};

use super::{
    at,
    disk_plan::{
        active_after_create, check_names_free, delete_internal_if_present, external_snapshots,
        internal_snapshots, new_overlays, plan_disks,
    },
    memory_saver::MemorySaver,
    millis, now_unix_ms, remove_file, CreateOptions, CreateReport, LiveMethod, LiveOptions, MemoryMode,
    MemoryRead, Orchestrator, RoundReport, SavedMemory, StepError, StepResult,
};
use crate::{
    error::{Error, Operation, Result, Step},
    hypervisor::{MemoryAccess, StreamMode, StreamedSave},
    intent::Intent,
    metadata::{
        Consistency, DiskRecord, DiskSnapshot, DomainState, MemoryState, SnapshotRecord, METADATA_VERSION,
    },
    name::Name,
    store::SnapshotFiles,
};

impl Orchestrator {
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
        let mut job = self.prepare_create(domain, snapshot, &options).await?;
        match job.save().await {
            Ok(saved) => job.commit(saved, &options, started).await,
            Err(error) => {
                let rollback = job.rollback().await;
                Err(self.failed(Operation::Create, domain, snapshot, error, rollback, None))
            }
        }
    }

    /// Everything before the first step that changes the domain: inspect, plan the disks, write
    /// the intent, make the snapshot's folder.
    async fn prepare_create(
        &self,
        domain: &Name,
        snapshot: &Name,
        options: &CreateOptions,
    ) -> Result<CreateJob<'_>> {
        self.observer.step(Operation::Create, Step::Inspect);
        let fail = |e: StepError| self.failed(Operation::Create, domain, snapshot, e, Vec::new(), None);
        let (was, config, targets) = self.inspect(domain).await.map_err(fail)?;
        if self.store.get(domain, snapshot).is_ok() {
            return Err(Error::SnapshotExists {
                domain: domain.clone(),
                snapshot: snapshot.clone(),
            });
        }
        if options.quiesce {
            self.check_quiesce(domain, was).await?;
        }
        let disks_only = was == DomainState::ShutOff || matches!(options.memory, MemoryMode::DisksOnly);
        let disks = plan_disks(snapshot, &targets, &options.disks, disks_only)?;
        let memory_path = match &options.memory_path {
            Some(_) if disks_only => {
                return Err(Error::InvalidRequest(format!(
                    "snapshot {snapshot} of domain {domain} has no memory: a memory path makes no sense"
                )))
            }
            Some(path) => Some(self.check_memory_path(domain, snapshot, path)?),
            None => None,
        };
        let backend = self
            .hypervisor
            .disk_backend(domain)
            .await
            .map_err(at(Step::Inspect))
            .map_err(fail)?;
        check_names_free(&*backend, &disks).await?;
        let plan = match disks_only {
            true => MemoryPlan::DisksOnly,
            false => {
                let image_dir = memory_path.as_deref().and_then(Path::parent);
                self.plan_memory(domain, snapshot, was, &options.memory, image_dir)
                    .await?
            }
        };
        let parent = self.store.current(domain)?;

        self.observer.step(Operation::Create, Step::Intent);
        let intent = Intent::Create {
            snapshot: snapshot.clone(),
            was,
            disks: disks.clone(),
            memory_path: memory_path.clone(),
            quiesce: options.quiesce,
        };
        self.store.set_intent(domain, &intent)?;
        let overlays = new_overlays(&disks);
        let prepared = self
            .add_overlays(domain, &overlays)
            .and_then(|()| self.store.prepare(domain, snapshot));
        let files = match prepared {
            Ok(files) => SnapshotFiles {
                memory_image: memory_path.clone().unwrap_or(files.memory_image),
                ..files
            },
            Err(e) => {
                // Nothing was made yet: forget the plan.
                let _ = self.remove_overlays_from_list(domain, &overlays);
                let _ = self.store.clear_intent(domain);
                return Err(e);
            }
        };
        let mut job = CreateJob::new(self, domain, snapshot, was, disks, files);
        job.config = config;
        job.parent = parent;
        job.plan = Some(plan);
        job.memory_path = memory_path;
        job.quiesce = options.quiesce;
        job.disk_backend = Some(backend);
        Ok(job)
    }

    /// How a running or paused domain's memory is saved; its image's folder (the snapshot's, or
    /// `image_dir`) must have room for the guest's RAM.
    async fn plan_memory(
        &self,
        domain: &Name,
        snapshot: &Name,
        was: DomainState,
        memory: &MemoryMode,
        image_dir: Option<&Path>,
    ) -> Result<MemoryPlan> {
        let fail = |e: StepError| self.failed(Operation::Create, domain, snapshot, e, Vec::new(), None);
        let access = self.hypervisor.memory_access(domain).await;
        let access = access.map_err(at(Step::Inspect)).map_err(fail)?;
        let folder = match image_dir {
            Some(dir) => dir.to_owned(),
            None => self.store.files(domain, snapshot).dir,
        };
        check_free_space(domain, &folder, access.ram_bytes)?;
        let live = match memory {
            MemoryMode::Live(live) if was == DomainState::Running => Some(*live),
            _ => None,
        };
        MemoryPlan::choose(domain, live, access)
    }

    /// Checks a memory image path the caller chose and makes it absolute (a relative one is
    /// taken from the working directory): its folder must exist, the file must not, and it must
    /// not be inside a snapshot's folder of any domain (deleting that snapshot would take it).
    fn check_memory_path(&self, domain: &Name, snapshot: &Name, path: &Path) -> Result<PathBuf> {
        let invalid = |why: String| Error::InvalidRequest(format!("memory path {}: {why}", path.display()));
        let path = std::path::absolute(path).map_err(|e| invalid(e.to_string()))?;
        disk::names::validate_image_path(&path, "memory path").map_err(|e| invalid(e.to_string()))?;
        if path.symlink_metadata().is_ok() {
            return Err(invalid("a file of that name exists already".into()));
        }
        let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
            return Err(invalid("it names no file".into()));
        };
        let parent = parent.canonicalize().map_err(|e| invalid(e.to_string()))?;
        // STATE/domains/DOMAIN/snapshots/SNAP: refuse STATE/domains/*/snapshots/...
        let own = self.store.files(domain, snapshot).dir;
        if let Some(domains) = own.ancestors().nth(3) {
            let domains = domains.canonicalize().unwrap_or_else(|_| domains.to_owned());
            if let Ok(inside) = parent.strip_prefix(&domains) {
                if inside
                    .components()
                    .nth(1)
                    .is_some_and(|c| c.as_os_str() == "snapshots")
                {
                    return Err(invalid("it is inside a snapshot's folder".into()));
                }
            }
        }
        Ok(parent.join(file))
    }
}

/// Refuses a create whose memory image may not fit: the free space of the snapshot's folder
/// must hold the guest's RAM (the image's upper bound: zero pages take no space, so most images
/// are far smaller). Checked before the guest is paused.
fn check_free_space(domain: &Name, folder: &Path, ram_bytes: u64) -> Result<()> {
    let free = free_bytes(folder)?;
    if free < ram_bytes {
        return Err(Error::InvalidRequest(format!(
            "not enough free space for the memory image of domain {domain}: {} MiB free under {}, \
             the guest has {} MiB of RAM",
            free >> 20,
            folder.display(),
            ram_bytes >> 20
        )));
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest
/// existing ancestor).
fn free_bytes(path: &Path) -> Result<u64> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let stats = nix::sys::statvfs::statvfs(existing).map_err(|errno| Error::Io {
        operation: "cannot read the free space of",
        path: existing.to_owned(),
        source: errno.into(),
    })?;
    Ok(stats.blocks_available().saturating_mul(stats.fragment_size()))
}

/// How a create saves memory, chosen before anything changes.
pub(super) enum MemoryPlan {
    /// The domain is shut off.
    DisksOnly,
    /// domsnap copies the shared RAM (with pre-copy rounds, or paused).
    Copy {
        mem: GuestMemory,
        precopy: Option<ConvergencePolicy>,
    },
    /// The hypervisor's stream.
    Stream { mode: StreamMode, ram_bytes: u64 },
}

impl MemoryPlan {
    /// The plan for a domain with a process: `live` options if it runs and the user asked for
    /// a live create. A paused save reads shared RAM directly (faster than a stream); pre-copy
    /// uses the hypervisor's stream where it has one (its dirty log is exact, so the pause does
    /// not grow with RAM size), else domsnap's engine on the shared RAM.
    fn choose(domain: &Name, live: Option<LiveOptions>, access: MemoryAccess) -> Result<Self> {
        let MemoryAccess {
            ram_bytes,
            shared,
            streams,
            no_background,
        } = access;
        let stream = |mode| MemoryPlan::Stream { mode, ram_bytes };
        let plan = match (live, shared) {
            (Some(live), _) if live.method == LiveMethod::Background => match no_background {
                None => stream(StreamMode::Background),
                Some(why) => {
                    return Err(Error::InvalidRequest(format!(
                        "a background snapshot of domain {domain} is impossible: {why}; \
                         use pre-copy (--live-mode precopy) instead"
                    )))
                }
            },
            (Some(live), _) if streams => stream(live.precopy_stream()),
            (Some(live), Some(mem)) => MemoryPlan::Copy {
                mem,
                precopy: Some(live.engine_policy()),
            },
            (None, Some(mem)) => MemoryPlan::Copy { mem, precopy: None },
            (None, None) if streams => stream(StreamMode::Paused),
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "the memory of domain {domain} cannot be saved: its hypervisor neither shares \
                     its RAM nor streams it"
                )))
            }
        };
        Ok(plan)
    }
}

/// What the memory steps of a create produced.
pub(super) struct Saved {
    pub(super) mode: SavedMemory,
    pub(super) memory: Option<MemoryState>,
    pub(super) summary: Option<SaveSummary>,
    pub(super) streamed: Option<StreamedSave>,
    pub(super) guest_pause: Duration,
}

/// A create in progress: what it is making, and what it has done so far (which is what its
/// rollback undoes).
pub(super) struct CreateJob<'o> {
    pub(super) orchestrator: &'o Orchestrator,
    pub(super) domain: Name,
    pub(super) snapshot: Name,
    /// The domain's state before the create.
    pub(super) was: DomainState,
    config: serde_json::Value,
    parent: Option<Name>,
    pub(super) disks: Vec<DiskRecord>,
    pub(super) files: SnapshotFiles,
    /// When the create paused the domain (undo: resume it).
    paused_since: Option<Instant>,
    /// The internal snapshots were made (undo: delete them). Only what this create made is
    /// ever undone: a name or overlay that existed before it was refused before the intent.
    made_internal: bool,
    /// The overlays were made (undo: merge the active ones back, remove the files).
    made_overlays: bool,
    /// The memory save in progress (undo: abandon it, which removes its temporary image).
    memory: Option<MemorySaver>,
    /// Rebuilt from an intent after a crash: whether the domain is paused is asked, not known.
    pub(super) after_crash: bool,
    /// How memory is saved, chosen while inspecting (the shared RAM it may hold is mapped once).
    plan: Option<MemoryPlan>,
    /// The memory image's path when the caller chose it (outside the snapshot's folder: the
    /// rollback removes it itself).
    memory_path: Option<PathBuf>,
    /// The guest's filesystems are frozen for the create.
    pub(super) quiesce: bool,
    /// A freeze was asked for and no thaw has succeeded since (undo: thaw; a freeze that failed
    /// may still complete in the guest, so any attempt counts).
    pub(super) froze: bool,
    /// The disk backend found while inspecting, for the disk snapshots (asking the hypervisor
    /// again would cost round trips inside the guest's pause).
    disk_backend: Option<Arc<dyn disk::DiskSnapshots>>,
}

impl<'o> CreateJob<'o> {
    fn new(
        orchestrator: &'o Orchestrator,
        domain: &Name,
        snapshot: &Name,
        was: DomainState,
        disks: Vec<DiskRecord>,
        files: SnapshotFiles,
    ) -> Self {
        CreateJob {
            orchestrator,
            domain: domain.clone(),
            snapshot: snapshot.clone(),
            was,
            config: serde_json::Value::Null,
            parent: None,
            disks,
            files,
            paused_since: None,
            made_internal: false,
            made_overlays: false,
            memory: None,
            after_crash: false,
            plan: None,
            memory_path: None,
            quiesce: false,
            froze: false,
            disk_backend: None,
        }
    }

    /// The create a crash interrupted, as its intent recorded it: any step may have run. The
    /// intent is written only after the checks that no disk held the snapshot's name and no
    /// overlay file existed, so what exists now was made by this create.
    pub(super) fn interrupted(
        orchestrator: &'o Orchestrator,
        domain: &Name,
        snapshot: &Name,
        was: DomainState,
        disks: Vec<DiskRecord>,
        memory_path: Option<PathBuf>,
        quiesce: bool,
    ) -> Self {
        let mut files = orchestrator.store.files(domain, snapshot);
        if let Some(path) = &memory_path {
            files.memory_image = path.clone();
        }
        let mut job = CreateJob::new(orchestrator, domain, snapshot, was, disks, files);
        job.memory_path = memory_path;
        job.quiesce = quiesce;
        job.made_internal = true;
        job.made_overlays = true;
        job.after_crash = true;
        job
    }

    pub(super) fn observe(&self, step: Step) {
        self.orchestrator.observer.step(Operation::Create, step);
    }

    /// Saves memory (as planned) and device state, and snapshots the disks; all of it with the
    /// guest's filesystems frozen when the create is quiesced (they are thawed as soon as the
    /// guest runs again).
    async fn save(&mut self) -> StepResult<Saved> {
        self.freeze().await?;
        let saved = match self.plan.take() {
            None | Some(MemoryPlan::DisksOnly) => self.save_disks_only().await,
            Some(MemoryPlan::Copy { mem, precopy }) => self.save_by_copy(mem, precopy).await,
            Some(MemoryPlan::Stream { mode, ram_bytes }) => self.save_streamed(mode, ram_bytes).await,
        }?;
        self.thaw().await?;
        Ok(saved)
    }

    /// A shut-off domain, or a disk-only create: its disks, recorded in its definition.
    async fn save_disks_only(&mut self) -> StepResult<Saved> {
        let hypervisor = &self.orchestrator.hypervisor;
        let before = hypervisor
            .disks(&self.domain)
            .await
            .map_err(at(Step::SnapshotDisks))?;
        if self.was == DomainState::Running {
            // A running guest's disk I/O waits while the disks are flushed for their snapshots:
            // what its recent writes left in the host's page cache is written back first.
            hypervisor.prepare_pause(&self.domain).await;
        }
        self.snapshot_disks().await?;
        self.thaw().await?;
        self.orchestrator
            .define_disks(&self.domain, &active_after_create(&self.disks, &before))
            .await
            .map_err(at(Step::SnapshotDisks))?;
        Ok(Saved {
            mode: SavedMemory::None,
            memory: None,
            summary: None,
            streamed: None,
            guest_pause: Duration::ZERO,
        })
    }

    /// Memory copied by domsnap: pre-copy rounds with `live`, then the paused copy overlapped
    /// with the device-state save; the disks; resume; seal the image.
    async fn save_by_copy(&mut self, mem: GuestMemory, live: Option<ConvergencePolicy>) -> StepResult<Saved> {
        let hypervisor = &self.orchestrator.hypervisor;
        let mode = match live {
            Some(_) => SavedMemory::Precopy,
            None => SavedMemory::Paused,
        };
        let ram_bytes = mem.size();
        if live.is_some() {
            self.observe(Step::Precopy);
        }
        let observer = self.orchestrator.observer.clone();
        let saver = self.memory.insert(MemorySaver::start(
            mem,
            self.files.memory_image.clone(),
            live,
            observer,
        ));
        saver.precopied().await.map_err(at(Step::Precopy))?;
        self.prepare_disks().await;
        self.pause().await?;
        // The final memory round and the device state are independent: overlap them.
        self.observe(Step::SaveMemory);
        self.observe(Step::SaveDeviceState);
        let saver = self
            .memory
            .as_mut()
            .ok_or((Step::SaveMemory, "no memory save".into()))?;
        let (copied, devices) = tokio::join!(
            saver.copy_while_paused(),
            hypervisor.save_device_state(&self.domain, &self.files.device_state)
        );
        copied.map_err(at(Step::SaveMemory))?;
        devices.map_err(at(Step::SaveDeviceState))?;
        self.snapshot_disks().await?;
        let guest_pause = self.resume().await?;
        let mut summary = None;
        if let Some(saver) = self.memory.take() {
            self.observe(Step::SealMemory);
            summary = Some(saver.seal().await.map_err(at(Step::SealMemory))?);
        }
        Ok(Saved {
            mode,
            memory: Some(self.memory_state(Consistency::End, ram_bytes)),
            summary,
            streamed: None,
            guest_pause,
        })
    }

    pub(super) fn memory_state(&self, consistency: Consistency, ram_bytes: u64) -> MemoryState {
        MemoryState {
            image: file_name(&self.files.memory_image),
            device_state: file_name(&self.files.device_state),
            consistency,
            ram_bytes,
            image_path: self.memory_path.clone(),
        }
    }

    /// Pauses a running domain. Undo: [`CreateJob::resume`].
    pub(super) async fn pause(&mut self) -> StepResult<()> {
        if self.was == DomainState::Running {
            let hypervisor = &self.orchestrator.hypervisor;
            hypervisor.prepare_pause(&self.domain).await;
            self.observe(Step::Pause);
            // The guest stops while the hypervisor answers (QEMU flushes the disks after it
            // stopped the vCPUs): the pause counts from the request.
            let asked = Instant::now();
            hypervisor.pause(&self.domain).await.map_err(at(Step::Pause))?;
            self.paused_since = Some(asked);
        }
        Ok(())
    }

    /// Records that the hypervisor paused a running domain for the create (a pre-copy stream
    /// at its switch-over) at `since`. Undo: [`CreateJob::resume`].
    pub(super) fn paused_by_hypervisor(&mut self, since: Instant) {
        if self.was == DomainState::Running {
            self.observe(Step::Pause);
            self.paused_since = Some(since);
        }
    }

    /// Records that the hypervisor resumed the domain it paused for the create (a pre-copy
    /// stream once captured); returns how long it was paused.
    pub(super) fn resumed_by_hypervisor(&mut self) -> Duration {
        let Some(since) = self.paused_since.take() else {
            return Duration::ZERO;
        };
        self.observe(Step::Resume);
        since.elapsed()
    }

    /// Resumes the domain if the create paused it; returns how long it was paused.
    pub(super) async fn resume(&mut self) -> StepResult<Duration> {
        let Some(since) = self.paused_since else {
            return Ok(Duration::ZERO);
        };
        self.observe(Step::Resume);
        let hypervisor = &self.orchestrator.hypervisor;
        hypervisor.resume(&self.domain).await.map_err(at(Step::Resume))?;
        self.paused_since = None;
        let paused = since.elapsed();
        self.thaw().await?;
        Ok(paused)
    }

    /// Gets the disk backend ready for [`CreateJob::snapshot_disks`], before a pause (best
    /// effort: the snapshots work without it).
    pub(super) async fn prepare_disks(&self) {
        let Some(backend) = &self.disk_backend else {
            return;
        };
        let (internal, external) = (internal_snapshots(&self.disks), external_snapshots(&self.disks));
        if let Err(error) = backend.prepare_snapshots(&internal, &external).await {
            tracing::debug!(%error, "cannot prepare the disk snapshots ahead; they will take longer");
        }
    }

    /// Takes every disk's snapshot, internal and external, in one call (atomic across the
    /// disks of a running domain). Undo: [`CreateJob::undo_disks`]: what exists of it was made
    /// by this create (names and overlays were checked free before the intent).
    pub(super) async fn snapshot_disks(&mut self) -> StepResult<()> {
        self.observe(Step::SnapshotDisks);
        let backend = match &self.disk_backend {
            Some(backend) => backend.clone(),
            None => self
                .orchestrator
                .hypervisor
                .disk_backend(&self.domain)
                .await
                .map_err(at(Step::SnapshotDisks))?,
        };
        let internal = internal_snapshots(&self.disks);
        let external = external_snapshots(&self.disks);
        if internal.is_empty() && external.is_empty() {
            return Ok(());
        }
        self.made_internal = !internal.is_empty();
        self.made_overlays = !external.is_empty();
        backend
            .create_snapshots(&internal, &external)
            .await
            .map_err(at(Step::SnapshotDisks))
    }

    /// Writes the record: the snapshot exists from then on. A failing commit is rolled back.
    async fn commit(
        mut self,
        saved: Saved,
        options: &CreateOptions,
        started: Instant,
    ) -> Result<CreateReport> {
        let orchestrator = self.orchestrator;
        let record = SnapshotRecord {
            version: METADATA_VERSION,
            name: self.snapshot.clone(),
            domain: self.domain.clone(),
            description: options.description.clone(),
            created_unix_ms: now_unix_ms(),
            parent: self.parent.take(),
            state: self.was,
            config: std::mem::take(&mut self.config),
            memory: saved.memory.clone(),
            disks: self.disks.clone(),
            quiesced: self.quiesce,
            broken: None,
            chains: Default::default(),
        };
        self.observe(Step::Commit);
        if let Err(e) = orchestrator.store.commit(&record) {
            let (domain, snapshot) = (self.domain.clone(), self.snapshot.clone());
            let rollback = self.rollback().await;
            let error: StepError = (Step::Commit, e.into());
            return Err(orchestrator.failed(Operation::Create, &domain, &snapshot, error, rollback, None));
        }
        // The snapshot exists from here on; what follows only tidies up.
        self.observe(Step::UpdateTree);
        orchestrator
            .store
            .set_current(&self.domain, Some(self.snapshot.clone()))?;
        orchestrator.store.clear_intent(&self.domain)?;
        Ok(report(record, saved, started))
    }

    /// Undoes what the create did, in reverse: the memory save, the disk snapshots, the pause,
    /// then the snapshot's folder, overlay list entries and intent. Returns what could not be
    /// undone; then the intent stays, so that the next `recover` tries the undo again.
    pub(super) async fn rollback(mut self) -> Vec<String> {
        if let Some(saver) = self.memory.take() {
            saver.abandon().await;
        }
        let mut problems = self.undo_disks().await;
        if let Err(e) = self.resume_after_failure().await {
            problems.push(e);
        }
        if let Err(e) = self.thaw_after_failure().await {
            problems.push(e);
        }
        if !problems.is_empty() {
            problems.push(format!(
                "the intent record stays: `recover {0}` tries the undo again, `recover {0} --abandon` gives it up",
                self.domain
            ));
            return problems;
        }
        self.forget()
    }

    /// Resumes a domain the create left paused.
    async fn resume_after_failure(&mut self) -> std::result::Result<(), String> {
        let hypervisor = &self.orchestrator.hypervisor;
        let paused_by_us = if self.after_crash {
            self.was == DomainState::Running
                && match hypervisor.state(&self.domain).await {
                    Ok(state) => state == DomainState::Paused,
                    Err(e) => return Err(format!("cannot read the domain's state: {e}")),
                }
        } else {
            self.paused_since.is_some()
        };
        if paused_by_us {
            hypervisor
                .resume(&self.domain)
                .await
                .map_err(|e| format!("cannot resume the domain: {e}"))?;
            self.paused_since = None;
        }
        Ok(())
    }

    /// Undoes the disk snapshots the create may have made: internal snapshots that exist are
    /// deleted; an overlay the domain writes to is committed back into its image; overlay files
    /// are removed. Returns what could not be undone.
    async fn undo_disks(&self) -> Vec<String> {
        if !self.made_internal && !self.made_overlays {
            return Vec::new();
        }
        let hypervisor = &self.orchestrator.hypervisor;
        let backend = match hypervisor.disk_backend(&self.domain).await {
            Ok(backend) => backend,
            Err(e) => return vec![format!("cannot reach the disks: {e}")],
        };
        let active = match hypervisor.disks(&self.domain).await {
            Ok(active) => active,
            Err(e) => return vec![format!("cannot read the domain's disks: {e}")],
        };
        let mut problems = Vec::new();
        let mut active_after = active.clone();
        for disk in &self.disks {
            let undone = match &disk.snapshot {
                DiskSnapshot::Internal { .. } if !self.made_internal => Ok(()),
                DiskSnapshot::External { .. } if !self.made_overlays => Ok(()),
                DiskSnapshot::Excluded => Ok(()),
                DiskSnapshot::Internal { name } => delete_internal_if_present(&*backend, &disk.image, name)
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot delete internal snapshot {name} of {}: {e}",
                            disk.image.display()
                        )
                    }),
                DiskSnapshot::External { overlay, .. } => {
                    undo_overlay(&*backend, disk, overlay, &active, &mut active_after).await
                }
            };
            problems.extend(undone.err());
        }
        if active_after != active {
            if let Err(e) = self.orchestrator.define_disks(&self.domain, &active_after).await {
                problems.push(format!("cannot record the domain's disks: {e}"));
            }
        }
        problems
    }

    /// Removes the create's folder, overlay list entries and intent. Returns what failed.
    fn forget(&self) -> Vec<String> {
        let store = &self.orchestrator.store;
        let image_outside = match &self.memory_path {
            Some(path) => remove_file(path)
                .map_err(|e| Error::Io {
                    operation: "cannot remove the memory image",
                    path: path.clone(),
                    source: e,
                })
                .and_then(|()| remove_temporaries_of(path)),
            None => Ok(()),
        };
        [
            image_outside,
            store.remove(&self.domain, &self.snapshot),
            self.orchestrator
                .remove_overlays_from_list(&self.domain, &new_overlays(&self.disks)),
            store.clear_intent(&self.domain),
        ]
        .into_iter()
        .filter_map(|result| result.err().map(|e| e.to_string()))
        .collect()
    }
}

/// Removes the temporaries a killed create left beside a file it writes outside the store (a
/// memory image the user placed, an overlay); the store's own folders are swept by
/// [`crate::SnapshotStore::remove_temporaries`].
fn remove_temporaries_of(file: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (file.parent(), file.file_name().and_then(|n| n.to_str())) else {
        return Ok(());
    };
    durable::remove_temporaries(dir, |dest| dest == name)?;
    Ok(())
}

/// Undoes one external disk snapshot: an overlay the domain writes to is committed back into
/// its image (`active_after` follows), then the overlay file goes.
async fn undo_overlay(
    backend: &dyn disk::DiskSnapshots,
    disk: &DiskRecord,
    overlay: &Path,
    active: &[crate::hypervisor::DiskTarget],
    active_after: &mut [crate::hypervisor::DiskTarget],
) -> std::result::Result<(), String> {
    let in_use = active
        .iter()
        .any(|t| t.target == disk.target && t.image == overlay);
    if in_use {
        let parent = backend
            .delete_external(overlay, overlay, disk::MergeMethod::CommitIntoParent)
            .await
            .map_err(|e| {
                format!(
                    "cannot merge overlay {} back into {}: {e}",
                    overlay.display(),
                    disk.image.display()
                )
            })?;
        for target in active_after.iter_mut().filter(|t| t.target == disk.target) {
            target.image = parent.clone();
        }
    }
    remove_file(overlay).map_err(|e| format!("cannot remove overlay {}: {e}", overlay.display()))?;
    remove_temporaries_of(overlay).map_err(|e| e.to_string())
}

/// The report of a committed create.
fn report(record: SnapshotRecord, saved: Saved, started: Instant) -> CreateReport {
    let rounds: Vec<RoundReport> = saved
        .summary
        .iter()
        .flat_map(|s| &s.rounds)
        .map(RoundReport::from)
        .collect();
    let page = memory::PAGE_SIZE as u64;
    let (memory_bytes, memory_pages) = match (&saved.summary, &saved.streamed) {
        (Some(summary), _) => (
            rounds.iter().map(|r| r.bytes_written).sum(),
            Some((summary.total_pages, summary.present_pages)),
        ),
        (None, Some(streamed)) => (
            streamed.pages * page,
            Some((streamed.ram_bytes / page, streamed.stored_pages)),
        ),
        (None, None) => (0, None),
    };
    let memory_read = match saved.mode {
        SavedMemory::None => None,
        _ if saved.streamed.is_some() => Some(MemoryRead::Stream),
        _ => Some(MemoryRead::Direct),
    };
    CreateReport {
        memory_mode: saved.mode,
        memory_read,
        memory_bytes,
        memory_rounds: rounds,
        memory_pages,
        streamed: saved.streamed,
        record,
        total_ms: millis(started.elapsed()),
        guest_pause_ms: millis(saved.guest_pause),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
