//! The streamed save of a create: memory and device state through the hypervisor's own stream,
//! parsed by the driver into the memory image. The driver prepares while the guest runs (for
//! pre-copy: it copies memory in passes until the hypervisor stops the guest for the rest); the
//! job then pauses the guest (unless the hypervisor did), snapshots its disks, lets the
//! hypervisor capture, resumes as soon as it has (the hypervisor resumes a guest it stopped
//! itself), and waits for the stream to end. Memory, devices and disks are all as of the pause.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{at, create::CreateJob, create::Saved, SavedMemory, StepResult};
use crate::{
    error::Step,
    hypervisor::{CaptureSignals, DriverResult, StreamMode, StreamedSave},
    metadata::Consistency,
};

impl CreateJob<'_> {
    pub(super) async fn save_streamed(&mut self, mode: StreamMode, ram_bytes: u64) -> StepResult<Saved> {
        let (prepared, on_prepared) = oneshot::channel();
        let (capture, on_capture) = oneshot::channel();
        let (captured, mut on_captured) = oneshot::channel();
        let signals = CaptureSignals {
            prepared,
            capture: on_capture,
            captured,
        };
        let first_step = match mode {
            StreamMode::Precopy { .. } => Step::Precopy,
            StreamMode::Paused | StreamMode::Background => Step::SaveMemory,
        };
        self.observe(first_step);
        self.prepare_disks().await;
        // The save runs beside the job's own steps (pause, disks), so it gets its own copies.
        let hypervisor = self.orchestrator.hypervisor.clone();
        let (domain, image, device_state) = (
            self.domain.clone(),
            self.files.memory_image.clone(),
            self.files.device_state.clone(),
        );
        let save = hypervisor.streamed_save(&domain, &image, &device_state, mode, signals);
        tokio::pin!(save);
        // A save that ends before it is prepared failed.
        tokio::select! {
            biased;
            Ok(()) = on_prepared => {}
            result = &mut save => {
                let failure = result.err().unwrap_or_else(|| "the streamed save ended before it started".into());
                return Err((first_step, failure));
            }
        }

        // Until the state is captured the guest stays paused. A save that ends first either
        // failed (the rollback resumes the guest) or is complete, capture included.
        let ended_early = self
            .stop_disks_capture(mode, capture, &mut on_captured, &mut save)
            .await?;
        let mut guest_pause = Duration::ZERO;
        if ended_early.as_ref().is_none_or(Result::is_ok) {
            guest_pause = match mode.hypervisor_pauses() {
                // The capture resumed the guest: it can thaw now.
                true => {
                    let paused = self.resumed_by_hypervisor();
                    self.thaw().await?;
                    paused
                }
                false => self.resume().await?,
            };
        }
        let streamed = match ended_early {
            Some(result) => result,
            None => save.await,
        }
        .map_err(at(Step::SaveMemory))?;
        let (saved_as, consistency) = match mode {
            StreamMode::Paused => (SavedMemory::Paused, Consistency::End),
            StreamMode::Precopy { .. } => (SavedMemory::Precopy, Consistency::End),
            StreamMode::Background => (SavedMemory::Background, Consistency::Start),
        };
        Ok(Saved {
            mode: saved_as,
            memory: Some(self.memory_state(consistency, ram_bytes)),
            summary: None,
            streamed: Some(streamed),
            guest_pause,
        })
    }
}

impl CreateJob<'_> {
    /// Stops the guest (or finds it stopped by the hypervisor), snapshots the disks, lets the
    /// hypervisor capture and waits until it has. Returns the save's result if it ended first.
    async fn stop_disks_capture<F>(
        &mut self,
        mode: StreamMode,
        capture: oneshot::Sender<()>,
        on_captured: &mut oneshot::Receiver<()>,
        save: &mut F,
    ) -> StepResult<Option<DriverResult<StreamedSave>>>
    where
        F: std::future::Future<Output = DriverResult<StreamedSave>> + Unpin,
    {
        let captured = match mode {
            StreamMode::Background => {
                // The guest is paused: the hypervisor captures while the disks are snapshotted.
                // The disks are polled first so that their requests reach the hypervisor before
                // the capture's: with QEMU's background migration asked for first, an external
                // snapshot's graph change held the pause for 470 ms and the guest's later writes
                // reached the snapshot's image (tried in this order; the e2e test caught it).
                if let Err(error) = self.pause().await {
                    // Dropping `capture` makes the driver give up; let it clean up first.
                    drop(capture);
                    let _ = save.await;
                    return Err(error);
                }
                self.observe(Step::Capture);
                let _ = capture.send(());
                let (disks, captured) = tokio::join!(self.snapshot_disks(), wait_captured(on_captured, save));
                if let Err(error) = disks {
                    // The capture is under way: let the save end (the rollback removes its files).
                    if captured.is_none() {
                        let _ = save.await;
                    }
                    return Err(error);
                }
                captured
            }
            StreamMode::Paused | StreamMode::Precopy { .. } => {
                // A migration deactivates the disks when it completes: they are snapshotted
                // first (pre-copy: while the hypervisor holds the guest before the switch-over).
                if let Err(error) = self.stop_for_disks(mode).await {
                    drop(capture);
                    let _ = save.await;
                    return Err(error);
                }
                self.observe(Step::Capture);
                let _ = capture.send(());
                wait_captured(on_captured, save).await
            }
        };
        Ok(captured)
    }

    /// Pauses the guest (unless the hypervisor did, which makes undo and resume ours from here)
    /// and snapshots the disks.
    async fn stop_for_disks(&mut self, mode: StreamMode) -> StepResult<()> {
        if mode.hypervisor_pauses() {
            self.paused_by_hypervisor(Instant::now());
        } else {
            self.pause().await?;
        }
        self.snapshot_disks().await
    }
}

/// Waits until the driver announces the capture (`None`) or the save ends first (its result).
async fn wait_captured<F: std::future::Future<Output = DriverResult<StreamedSave>> + Unpin>(
    on_captured: &mut oneshot::Receiver<()>,
    save: &mut F,
) -> Option<DriverResult<StreamedSave>> {
    tokio::select! {
        biased;
        // A dropped sender (no capture) disables this branch.
        Ok(()) = on_captured => None,
        result = save => Some(result),
    }
}
