//! The background save of a create: the hypervisor's own write-protect snapshot, streamed into
//! the memory image while the guest runs. The driver prepares while the guest runs; the job then
//! pauses the guest, snapshots its disks, lets the hypervisor capture, resumes as soon as it has,
//! and waits while memory streams. Memory, devices and disks are all as of the pause.

use std::time::Duration;

use tokio::sync::oneshot;

use super::{at, create::CreateJob, create::Saved, StepResult};
use crate::{error::Step, hypervisor::CaptureSignals, metadata::Consistency};

impl CreateJob<'_> {
    pub(super) async fn save_background(&mut self) -> StepResult<Saved> {
        let (prepared, on_prepared) = oneshot::channel();
        let (capture, on_capture) = oneshot::channel();
        let (captured, mut on_captured) = oneshot::channel();
        let signals = CaptureSignals {
            prepared,
            capture: on_capture,
            captured,
        };
        self.observe(Step::SaveMemory);
        // The save runs beside the job's own steps (pause, disks), so it gets its own copies.
        let hypervisor = self.orchestrator.hypervisor.clone();
        let (domain, image, device_state) = (
            self.domain.clone(),
            self.files.memory_image.clone(),
            self.files.device_state.clone(),
        );
        let save = hypervisor.background_save(&domain, &image, &device_state, signals);
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
            self.pause().await?;
            self.snapshot_disks().await
        };
        if let Err(error) = paused_and_disks.await {
            // Dropping `capture` makes the driver give up; let it clean up before the rollback.
            drop(capture);
            let _ = save.await;
            return Err(error);
        }

        tracing::debug!(domain = %self.domain, "disks snapshotted; capturing");
        let _ = capture.send(());
        // Until the state is captured the guest stays paused. A save that ends first either
        // failed (the rollback resumes the guest) or is complete, capture included.
        let ended_early = tokio::select! {
            biased;
            // A dropped sender (no capture) disables this branch.
            Ok(()) = &mut on_captured => None,
            result = &mut save => Some(result),
        };
        let mut guest_pause = Duration::ZERO;
        if ended_early.as_ref().is_none_or(Result::is_ok) {
            guest_pause = self.resume().await?;
        }
        let streamed = match ended_early {
            Some(result) => result,
            None => save.await,
        }
        .map_err(at(Step::SaveMemory))?;
        Ok(Saved {
            memory: Some(self.memory_state(Consistency::Start, streamed.ram_bytes)),
            summary: None,
            streamed: Some(streamed),
            guest_pause,
        })
    }
}
