//! Recovery: finishes or undoes an operation a crash interrupted, from its intent record.

use std::path::PathBuf;

use super::{
    at,
    create::CreateJob,
    revert::{check_pages, NewProcess},
    Orchestrator, Recovery, RecoveryOutcome, RevertOptions, StepError, StepResult,
};
use crate::{
    error::{Error, Operation, Result, Step},
    intent::Intent,
    metadata::{DiskRecord, DomainState},
    name::Name,
};

impl Orchestrator {
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

    /// Recovery, with the domain's lock held.
    pub(super) async fn recover_locked(&self, domain: &Name) -> Result<Option<Recovery>> {
        for path in self.store.remove_temporaries(domain)? {
            tracing::warn!(%domain, path = %path.display(), "removed a temporary file a killed command left");
        }
        let Some(intent) = self.store.intent(domain)? else {
            return Ok(None);
        };
        let snapshot = intent.snapshot().clone();
        let fail =
            |e: StepError, rollback| self.failed(Operation::Recover, domain, &snapshot, e, rollback, None);
        let (operation, outcome) = match intent {
            Intent::Create {
                snapshot,
                was,
                disks,
                memory_path,
                quiesce,
            } => {
                let outcome = self
                    .recover_create(domain, &snapshot, was, disks, memory_path, quiesce)
                    .await?;
                (Operation::Create, outcome)
            }
            Intent::Delete { record } => {
                self.delete_steps(&record)
                    .await
                    .map_err(|e| fail(e, Vec::new()))?;
                self.store.clear_intent(domain)?;
                (Operation::Delete, RecoveryOutcome::Finished)
            }
            Intent::Revert {
                snapshot,
                paused,
                eager,
                new_overlays,
            } => {
                let record = self.store.get(domain, &snapshot)?;
                let files = self.store.files(domain, &snapshot).of_record(&record);
                let options = RevertOptions { paused, eager };
                // The crash may have come while the revert still checked the snapshot (for an
                // eager one, its pages too: the copy after the stop would find a damaged page only
                // once the domain is gone).
                self.check_revertible(&record, &files)
                    .await
                    .map_err(|e| fail((Step::Check, e), Vec::new()))?;
                if eager && record.memory.is_some() {
                    check_pages(&files)
                        .await
                        .map_err(|e| fail((Step::Check, e), Vec::new()))?;
                }
                self.revert_steps(&record, &files, options, &new_overlays, NewProcess::AFTER_STOP)
                    .await
                    .map_err(|e| fail(e, Vec::new()))?;
                self.store.clear_intent(domain)?;
                (Operation::Revert, RecoveryOutcome::Finished)
            }
        };
        tracing::info!(%domain, %snapshot, %operation, %outcome, "recovered an interrupted operation");
        Ok(Some(Recovery {
            domain: domain.clone(),
            operation,
            snapshot,
            outcome,
        }))
    }

    /// A create is finished if its record was committed (only the tidy-up and a resume may be
    /// missing), else undone.
    async fn recover_create(
        &self,
        domain: &Name,
        snapshot: &Name,
        was: DomainState,
        disks: Vec<DiskRecord>,
        memory_path: Option<PathBuf>,
        quiesce: bool,
    ) -> Result<RecoveryOutcome> {
        let fail =
            |e: StepError, rollback| self.failed(Operation::Recover, domain, snapshot, e, rollback, None);
        if self.store.get(domain, snapshot).is_ok() {
            self.resume_if_paused(domain, was)
                .await
                .map_err(|e| fail(e, Vec::new()))?;
            self.store.set_current(domain, Some(snapshot.clone()))?;
            self.store.clear_intent(domain)?;
            return Ok(RecoveryOutcome::Finished);
        }
        let rollback = CreateJob::interrupted(self, domain, snapshot, was, disks, memory_path, quiesce)
            .rollback()
            .await;
        if rollback.is_empty() {
            return Ok(RecoveryOutcome::Undone);
        }
        let error: Error = fail(
            (
                Step::SnapshotDisks,
                "the interrupted create could not be undone".into(),
            ),
            rollback,
        );
        Err(error)
    }

    async fn resume_if_paused(&self, domain: &Name, was: DomainState) -> StepResult<()> {
        if was == DomainState::Running
            && self.hypervisor.state(domain).await.map_err(at(Step::Resume))? == DomainState::Paused
        {
            self.hypervisor.resume(domain).await.map_err(at(Step::Resume))?;
        }
        Ok(())
    }
}
