//! Revert: stop the domain, put its disks back to the snapshot's, restore its configuration
//! and, if the snapshot has memory, start it from the saved memory and device state.
//!
//! Memory is loaded lazily by default: the hypervisor maps the sealed memory image copy-on-write
//! ([`IncomingRam::Image`]) and reads only what the guest touches. With
//! [`RevertOptions::eager`] (or when the image cannot be mapped) it is copied into fresh RAM.
//! Either way the check before the domain is touched reads only the image's metadata (header,
//! page table and footer checksums) and its size: a lazy revert leaves the pages to `snapshot
//! verify`, an eager one checks each page's checksum as it copies it.
//!
//! Where the hypervisor can run two processes of the domain at once, the new one is started
//! beside the running one first ([`Hypervisor::start_standby`], its disks inactive), while the
//! snapshot is checked, and given the device state: a failure up to there leaves the domain
//! running as it was, and the guest is gone only while the old process ends, the internal disk
//! snapshots are applied and the new process takes the disks over.
//!
//! [`Hypervisor::start_standby`]: crate::Hypervisor::start_standby

use std::{path::PathBuf, time::Instant};

use disk::ExternalSnapshot;

use super::{
    at,
    disk_plan::{external_overlay, holds_internal, internal_snapshots},
    millis, now_unix_ms, remove_file, MemoryLoad, Orchestrator, RevertOptions, RevertReport, StepError,
    StepResult, ThawOutcome,
};
use crate::{
    error::{DriverError, Operation, Result, Step},
    hypervisor::{DiskTarget, ImageFormat, IncomingRam, IncomingStart, Standby},
    intent::Intent,
    metadata::{DiskSnapshot, DomainState, MemoryState, SnapshotRecord},
    name::Name,
    store::SnapshotFiles,
};

/// What a revert replaces, so that a failed one can put it back.
struct Replaced {
    state: DomainState,
    config: serde_json::Value,
    disks: Vec<DiskTarget>,
}

/// The domain's state after the revert's steps, and how its memory was loaded.
pub(super) struct Reverted {
    state: DomainState,
    memory: MemoryLoad,
    fallback: Option<String>,
    memory_ms: f64,
    thaw: Option<ThawOutcome>,
    downtime_ms: Option<f64>,
}

/// Memory copied into a new process's fresh RAM.
pub(super) struct Copied {
    ms: f64,
    /// Why the image was not mapped, if that was asked for.
    fallback: Option<String>,
}

/// Where the domain's new process comes from once the old one has ended.
enum Takeover {
    /// The standby takes over, its memory copied already when it has fresh RAM.
    Standby(Option<Copied>),
    /// It is started now.
    Start,
}

/// Whether the revert's new process runs beside the old one already.
pub(super) enum NewProcess {
    /// Started beside the old one ([`Hypervisor::start_standby`](crate::Hypervisor::start_standby))
    /// on `disks` (the revert's external overlays already made), its RAM mapped from the image or
    /// fresh and `copied` into already, its device state loaded.
    Standby {
        disks: Vec<DiskTarget>,
        copied: Option<Copied>,
    },
    /// Started once the old one has ended: why not beside it, if the domain was running, and
    /// the revert's disks if they were made already (the external overlays, before a standby
    /// turned out unavailable).
    AfterStop {
        reason: Option<String>,
        disks: Option<Vec<DiskTarget>>,
    },
}

impl NewProcess {
    /// A new process started after the stop, everything left to do then.
    pub(super) const AFTER_STOP: NewProcess = NewProcess::AfterStop {
        reason: None,
        disks: None,
    };
}

impl Orchestrator {
    /// Reverts the domain to a snapshot: stops it, reverts the disks, restores the configuration
    /// and, if the snapshot has memory, starts the domain from it (running, or paused with
    /// [`RevertOptions::paused`]; memory mapped, or copied with [`RevertOptions::eager`]). A
    /// disk-only snapshot leaves the domain shut off.
    ///
    /// The snapshot is checked (memory image metadata and size, files present) before the domain
    /// is touched; a failure after the domain was stopped leaves it shut off with its previous
    /// configuration and disks where those could be kept (external disks).
    pub async fn revert(
        &self,
        domain: &Name,
        snapshot: &Name,
        options: RevertOptions,
    ) -> Result<RevertReport> {
        let started = Instant::now();
        let _lock = self.begin(domain).await?;
        let record = self.store.get(domain, snapshot)?;
        super::rescan::check_not_broken(&record)?;
        let files = self.store.files(domain, snapshot).of_record(&record);
        let fail = |e: StepError| self.failed(Operation::Revert, domain, snapshot, e, Vec::new(), None);

        let (state, config, disks) = self.inspect(domain).await.map_err(fail)?;
        let replaced = Replaced { state, config, disks };
        let stamp = now_unix_ms();
        let new_overlays: Vec<PathBuf> = record
            .disks
            .iter()
            .filter_map(|d| {
                external_overlay(d).map(|overlay| disk::names::revert_overlay_path(overlay, stamp))
            })
            .collect();

        self.observer.step(Operation::Revert, Step::Intent);
        self.add_overlays(domain, &new_overlays)?;
        let intent = Intent::Revert {
            snapshot: snapshot.clone(),
            paused: options.paused,
            eager: options.eager,
            new_overlays: new_overlays.clone(),
        };
        self.store.set_intent(domain, &intent)?;
        let process = match self
            .check_and_prepare(&record, &files, options, &replaced, &new_overlays)
            .await
        {
            Ok(process) => process,
            Err(error) => {
                // The domain was not touched: it runs on as it was.
                let rollback = self.undo_revert(domain, &replaced, false, &new_overlays).await;
                return Err(self.failed(Operation::Revert, domain, snapshot, error, rollback, None));
            }
        };
        let (standby, standby_unavailable) = match &process {
            NewProcess::Standby { .. } => (true, None),
            NewProcess::AfterStop { reason, .. } => (false, reason.clone()),
        };
        match self
            .revert_steps(&record, &files, options, &new_overlays, process)
            .await
        {
            Ok(reverted) => {
                self.store.clear_intent(domain)?;
                Ok(RevertReport {
                    snapshot: snapshot.clone(),
                    state: reverted.state,
                    total_ms: millis(started.elapsed()),
                    memory_load: reverted.memory,
                    memory_fallback: reverted.fallback,
                    memory_ms: reverted.memory_ms,
                    thaw: reverted.thaw,
                    standby,
                    standby_unavailable,
                    downtime_ms: reverted.downtime_ms,
                })
            }
            Err(error) => {
                let stopped = error.0 != Step::Stop;
                let rollback = self.undo_revert(domain, &replaced, stopped, &new_overlays).await;
                let left = (stopped && replaced.state != DomainState::ShutOff)
                    .then(|| "the domain is shut off: its previous run was ended by the revert".to_owned());
                Err(self.failed(Operation::Revert, domain, snapshot, error, rollback, left))
            }
        }
    }

    /// Undoes a failed revert: ends a half-started domain, removes the new overlays, restores
    /// the previous configuration and forgets the intent. Returns what could not be undone; then
    /// the intent stays.
    async fn undo_revert(
        &self,
        domain: &Name,
        replaced: &Replaced,
        stopped: bool,
        new_overlays: &[PathBuf],
    ) -> Vec<String> {
        let mut rollback = Vec::new();
        if let Err(e) = self.hypervisor.discard_standby(domain).await {
            rollback.push(format!("cannot end the domain's new process: {e}"));
        }
        if stopped {
            if let Err(e) = self.hypervisor.destroy(domain).await {
                rollback.push(format!("cannot stop the half-started domain: {e}"));
            }
        }
        for overlay in new_overlays {
            if let Err(e) = remove_file(overlay) {
                rollback.push(format!("cannot remove overlay {}: {e}", overlay.display()));
            }
        }
        if stopped {
            if let Err(e) = self
                .hypervisor
                .define(domain, &replaced.config, &replaced.disks)
                .await
            {
                rollback.push(format!("cannot restore the domain configuration: {e}"));
            }
        }
        if !rollback.is_empty() {
            // `recover` runs the revert again from the start, which ends in a consistent state.
            rollback.push(format!(
                "the intent record stays: `recover {domain}` runs the revert again, \
                 `recover {domain} --abandon` gives it up"
            ));
            return rollback;
        }
        for result in [
            self.remove_overlays_from_list(domain, new_overlays),
            self.store.clear_intent(domain),
        ] {
            if let Err(e) = result {
                rollback.push(e.to_string());
            }
        }
        rollback
    }

    /// Checks the snapshot while the revert's new process starts beside the running one (see
    /// [`Orchestrator::start_standby`]): starting a process is most of a revert's time, and the
    /// check reads only metadata. Nothing is stopped before both are done; an error leaves the
    /// domain running as it was (the caller ends a started standby and removes the overlays).
    async fn check_and_prepare(
        &self,
        record: &SnapshotRecord,
        files: &SnapshotFiles,
        options: RevertOptions,
        replaced: &Replaced,
        new_overlays: &[PathBuf],
    ) -> StepResult<NewProcess> {
        self.observer.step(Operation::Revert, Step::Check);
        let check = async {
            self.check_revertible(record, files)
                .await
                .map_err(at(Step::Check))
        };
        let standby = self.start_standby(record, files, options, replaced, new_overlays);
        let (checked, started) = tokio::join!(check, standby);
        // The check's error first: a failed start may only be its consequence.
        checked?;
        let process = started?;
        if matches!(process, NewProcess::AfterStop { .. }) && options.eager && record.memory.is_some() {
            // An eager revert that copies after the stop checks every page first, while the
            // domain still runs as it was (a standby's copy checks them before the stop).
            self.observer.step(Operation::Revert, Step::Check);
            check_pages(files).await.map_err(at(Step::Check))?;
        }
        Ok(process)
    }

    /// Checks what a revert needs before it stops the domain (of its memory, the image's
    /// metadata: the pages are checked as they are copied, or by [`check_pages`]).
    pub(super) async fn check_revertible(
        &self,
        record: &SnapshotRecord,
        files: &SnapshotFiles,
    ) -> std::result::Result<(), DriverError> {
        self.hypervisor
            .check_restorable(&record.domain, &record.config, record.memory.is_some())
            .await?;
        if let Some(memory) = &record.memory {
            check_memory(memory, files).await?;
        }
        let backend = self.hypervisor.disk_backend(&record.domain).await?;
        for disk in &record.disks {
            if disk.snapshot == DiskSnapshot::Excluded {
                continue;
            }
            if !disk.image.exists() {
                return Err(format!("disk {} image {} is missing", disk.target, disk.image.display()).into());
            }
            if let DiskSnapshot::Internal { name } = &disk.snapshot {
                if !holds_internal(&*backend, &disk.image, name).await? {
                    return Err(format!(
                        "disk {} image {} no longer holds internal snapshot {name}",
                        disk.target,
                        disk.image.display()
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Starts the revert's new process beside the running one when the snapshot has memory and
    /// the hypervisor can (making the external disks' revert overlays first: the new process
    /// opens them). An error leaves the domain as it was (the caller removes the overlays).
    async fn start_standby(
        &self,
        record: &SnapshotRecord,
        files: &SnapshotFiles,
        options: RevertOptions,
        replaced: &Replaced,
        new_overlays: &[PathBuf],
    ) -> StepResult<NewProcess> {
        if record.memory.is_none() || replaced.state == DomainState::ShutOff {
            return Ok(NewProcess::AFTER_STOP);
        }
        let domain = &record.domain;
        self.observer.step(Operation::Revert, Step::StartStandby);
        let disks = self
            .revert_targets(record, &replaced.disks, new_overlays, Step::StartStandby)
            .await?;
        let started = self
            .hypervisor
            .start_standby(domain, &record.config, &disks, incoming_ram(files, options))
            .await
            .map_err(at(Step::StartStandby))?;
        let copied = match started {
            Standby::Started(IncomingStart::Mapped) => None,
            Standby::Started(IncomingStart::Fresh { fallback }) => {
                let memory = self
                    .hypervisor
                    .standby_guest_memory(domain)
                    .await
                    .map_err(at(Step::RestoreMemory))?;
                Some(self.copy_memory(domain, files, memory, fallback).await?)
            }
            Standby::Unavailable { reason } => {
                tracing::info!(%domain, %reason, "the new process starts after the old one ends");
                // The overlays serve the process started after the stop as well.
                return Ok(NewProcess::AfterStop {
                    reason: Some(reason),
                    disks: Some(disks),
                });
            }
        };
        // With its memory in place: a device state that does not load stops the revert here,
        // and the guest's gap after the stop does not include the load.
        self.observer.step(Operation::Revert, Step::LoadDeviceState);
        self.hypervisor
            .load_standby_device_state(domain, &files.device_state)
            .await
            .map_err(at(Step::LoadDeviceState))?;
        Ok(NewProcess::Standby { disks, copied })
    }

    /// The steps of a revert from stopping the domain on. They redo cleanly (with the new
    /// process started after the stop), so recovery runs them again after a crash. Returns the
    /// domain's state afterwards and how memory was loaded.
    pub(super) async fn revert_steps(
        &self,
        record: &SnapshotRecord,
        files: &SnapshotFiles,
        options: RevertOptions,
        new_overlays: &[PathBuf],
        process: NewProcess,
    ) -> StepResult<Reverted> {
        let domain = &record.domain;
        let observe = |step| self.observer.step(Operation::Revert, step);
        self.hypervisor.prepare_pause(domain).await;
        observe(Step::Stop);
        let stopping = Instant::now();
        self.hypervisor.destroy(domain).await.map_err(at(Step::Stop))?;
        observe(Step::RevertDisks);
        let (takeover, new_disks) = match process {
            NewProcess::Standby { disks, copied } => (Takeover::Standby(copied), disks),
            NewProcess::AfterStop { disks, .. } => {
                // One left by an interrupted revert would hold the images.
                self.hypervisor
                    .discard_standby(domain)
                    .await
                    .map_err(at(Step::Stop))?;
                let disks = match disks {
                    Some(disks) => disks,
                    None => {
                        // The domain is stopped: these are the images its definition names now.
                        let current = self
                            .hypervisor
                            .disks(domain)
                            .await
                            .map_err(at(Step::RevertDisks))?;
                        self.revert_targets(record, &current, new_overlays, Step::RevertDisks)
                            .await?
                    }
                };
                (Takeover::Start, disks)
            }
        };
        self.apply_internal_snapshots(record).await?;

        observe(Step::Define);
        self.hypervisor
            .define(domain, &record.config, &new_disks)
            .await
            .map_err(at(Step::Define))?;

        let mut reverted = match record.memory {
            Some(_) => {
                let mut reverted = self.restore_state(domain, files, options, takeover).await?;
                reverted.downtime_ms = Some(millis(stopping.elapsed()));
                reverted
            }
            None => Reverted {
                state: DomainState::ShutOff,
                memory: MemoryLoad::None,
                fallback: None,
                memory_ms: 0.0,
                thaw: None,
                downtime_ms: None,
            },
        };
        if record.quiesced && record.memory.is_some() {
            reverted.thaw = Some(self.thaw_restored(domain, reverted.state).await);
        }

        observe(Step::UpdateTree);
        self.store
            .set_current(domain, Some(record.name.clone()))
            .map_err(at(Step::UpdateTree))?;
        // The overlays the domain wrote to before are not needed any more (unless a snapshot
        // reads them).
        observe(Step::TidyDisks);
        self.tidy_disks(domain).await.map_err(at(Step::TidyDisks))?;
        Ok(reverted)
    }

    /// The disks' active images after the revert, made at `step`: a fresh overlay on an
    /// external snapshot's image (made here), the image itself for an internal snapshot, the
    /// domain's `current` image for a disk left out of the snapshot.
    async fn revert_targets(
        &self,
        record: &SnapshotRecord,
        current: &[DiskTarget],
        new_overlays: &[PathBuf],
        step: Step,
    ) -> StepResult<Vec<DiskTarget>> {
        let backend = self
            .hypervisor
            .disk_backend(&record.domain)
            .await
            .map_err(at(step))?;
        let mut new_disks = Vec::new();
        let mut overlays = new_overlays.iter();
        for disk in &record.disks {
            let (image, format) = match &disk.snapshot {
                DiskSnapshot::Internal { .. } => (disk.image.clone(), ImageFormat::Qcow2),
                DiskSnapshot::Excluded => current.iter().find(|t| t.target == disk.target).map_or_else(
                    || (disk.image.clone(), ImageFormat::Qcow2),
                    |t| (t.image.clone(), t.format),
                ),
                DiskSnapshot::External { .. } => {
                    let overlay = overlays
                        .next()
                        .ok_or_else(|| (step, "revert overlay list is short".into()))?;
                    // A crash may have left it from an earlier attempt.
                    remove_file(overlay).map_err(at(step))?;
                    let revert = ExternalSnapshot {
                        disk: disk.image.clone(),
                        overlay: overlay.clone(),
                        backing_path: disk::BackingPath::Absolute,
                    };
                    backend.revert_external(&revert).await.map_err(at(step))?;
                    (overlay.clone(), ImageFormat::Qcow2)
                }
            };
            new_disks.push(DiskTarget {
                target: disk.target.clone(),
                image,
                format,
            });
        }
        Ok(new_disks)
    }

    /// Applies the snapshot's internal disk snapshots (each under its own name); the domain's
    /// process has ended.
    async fn apply_internal_snapshots(&self, record: &SnapshotRecord) -> StepResult<()> {
        let internal = internal_snapshots(&record.disks);
        if internal.is_empty() {
            return Ok(());
        }
        let backend = self
            .hypervisor
            .disk_backend(&record.domain)
            .await
            .map_err(at(Step::RevertDisks))?;
        for (name, images) in disk::internal_by_name(&internal) {
            backend
                .apply_internal(&images, name)
                .await
                .map_err(at(Step::RevertDisks))?;
        }
        Ok(())
    }

    /// Starts the domain to receive its state (its RAM mapped from the memory image, or fresh
    /// and written from it), loads the device state, and resumes it unless `paused`. A
    /// `standby` process (started beside the old one, its memory copied if it has fresh RAM and
    /// its device state loaded) becomes the domain's instead.
    async fn restore_state(
        &self,
        domain: &Name,
        files: &SnapshotFiles,
        options: RevertOptions,
        takeover: Takeover,
    ) -> StepResult<Reverted> {
        let observe = |step| self.observer.step(Operation::Revert, step);
        let (copied, loaded) = match takeover {
            Takeover::Standby(copied) => {
                observe(Step::PromoteStandby);
                self.hypervisor
                    .promote_standby(domain)
                    .await
                    .map_err(at(Step::PromoteStandby))?;
                (copied, true)
            }
            Takeover::Start => {
                observe(Step::StartIncoming);
                let started = self
                    .hypervisor
                    .start_incoming(domain, incoming_ram(files, options))
                    .await
                    .map_err(at(Step::StartIncoming))?;
                let copied = match started {
                    IncomingStart::Mapped => None,
                    IncomingStart::Fresh { fallback } => {
                        let memory = self
                            .hypervisor
                            .guest_memory(domain)
                            .await
                            .map_err(at(Step::RestoreMemory))?;
                        Some(self.copy_memory(domain, files, memory, fallback).await?)
                    }
                };
                (copied, false)
            }
        };
        let mut reverted = Reverted {
            state: DomainState::Paused,
            memory: MemoryLoad::Mapped,
            fallback: None,
            memory_ms: 0.0,
            thaw: None,
            downtime_ms: None,
        };
        if let Some(copied) = copied {
            reverted.memory = MemoryLoad::Copied;
            reverted.memory_ms = copied.ms;
            reverted.fallback = copied.fallback;
        }
        if !loaded {
            observe(Step::LoadDeviceState);
            self.hypervisor
                .load_device_state(domain, &files.device_state)
                .await
                .map_err(at(Step::LoadDeviceState))?;
        }
        if !options.paused {
            observe(Step::Resume);
            self.hypervisor.resume(domain).await.map_err(at(Step::Resume))?;
            reverted.state = DomainState::Running;
        }
        Ok(reverted)
    }

    /// Thaws a guest restored from a quiesced snapshot: its filesystems were frozen when its
    /// memory was saved. A paused guest cannot answer (its agent is a guest process): the thaw
    /// is left to the user. A failed thaw does not undo the revert, which is complete.
    async fn thaw_restored(&self, domain: &Name, state: DomainState) -> ThawOutcome {
        if state != DomainState::Running {
            return ThawOutcome::Pending;
        }
        self.observer.step(Operation::Revert, Step::Thaw);
        match self.hypervisor.thaw_filesystems(domain).await {
            Ok(filesystems) => ThawOutcome::Thawed { filesystems },
            Err(error) => {
                tracing::warn!(%domain, %error, "the restored guest's filesystems stay frozen");
                ThawOutcome::Failed {
                    error: error.to_string(),
                }
            }
        }
    }

    /// Writes the memory image into `memory`, the fresh RAM of a process just started to
    /// receive it, checking each stored page's checksum as it is copied; `fallback` says why the
    /// image was not mapped, if that was asked for.
    async fn copy_memory(
        &self,
        domain: &Name,
        files: &SnapshotFiles,
        memory: memory::GuestMemory,
        fallback: Option<String>,
    ) -> StepResult<Copied> {
        if let Some(reason) = &fallback {
            tracing::warn!(%domain, %reason, "the memory image cannot be mapped; copying it");
        }
        self.observer.step(Operation::Revert, Step::RestoreMemory);
        let started = Instant::now();
        let image = files.memory_image.clone();
        tokio::task::spawn_blocking(move || {
            // The new process's RAM file was just created: all zero.
            let options = memory::RestoreOptions {
                zero_pages: memory::ZeroPages::AssumeZeroed,
            };
            memory::restore(&image, &memory, &options)
        })
        .await
        .map_err(|e| (Step::RestoreMemory, e.into()))?
        .map_err(|e| (Step::RestoreMemory, e.into()))?;
        Ok(Copied {
            ms: millis(started.elapsed()),
            fallback,
        })
    }
}

/// Checks a snapshot's memory before a revert touches the domain: the memory image's metadata
/// (header, page table and footer checksums), that it holds the snapshot's RAM size, and that the
/// device state is there. A lazy revert leaves the pages to `snapshot verify` (reading them all
/// would cost more than the revert); an eager one checks each page as it copies it, into a
/// standby before the domain is stopped, or else after [`check_pages`] checked them all first:
/// either way a damaged page is found while the domain still runs as it was.
async fn check_memory(memory: &MemoryState, files: &SnapshotFiles) -> std::result::Result<(), DriverError> {
    let image = files.memory_image.clone();
    let checked = tokio::task::spawn_blocking(move || memory::check_metadata(&image)).await?;
    let shown = files.memory_image.display();
    let layout = checked.map_err(|e| format!("memory image {shown}: {e}"))?;
    let ram_bytes = layout.ram_bytes();
    if ram_bytes != memory.ram_bytes {
        return Err(format!(
            "memory image {shown} holds {ram_bytes} bytes of RAM, but the snapshot's domain had {}",
            memory.ram_bytes
        )
        .into());
    }
    let devices = std::fs::metadata(&files.device_state)
        .map_err(|e| format!("device state {}: {e}", files.device_state.display()))?;
    if devices.len() == 0 {
        return Err(format!("device state {} is empty", files.device_state.display()).into());
    }
    Ok(())
}

/// Checks every stored page of a snapshot's memory image (its checksum), as `snapshot verify`
/// does: what an eager revert that copies after the stop runs before it.
pub(super) async fn check_pages(files: &SnapshotFiles) -> std::result::Result<(), DriverError> {
    let image = files.memory_image.clone();
    tokio::task::spawn_blocking(move || memory::verify(&image))
        .await?
        .map_err(|e| format!("memory image {}: {e}", files.memory_image.display()))?;
    Ok(())
}

/// The RAM a revert's new process gets: the memory image mapped, or fresh RAM to copy it into.
fn incoming_ram(files: &SnapshotFiles, options: RevertOptions) -> IncomingRam<'_> {
    if options.eager {
        IncomingRam::Fresh
    } else {
        IncomingRam::Image(&files.memory_image)
    }
}
