//! Delete: a snapshot's disk snapshots, its memory and device-state files and its record; its
//! children are re-parented, and overlays no snapshot reads any more are folded away.
//!
//! A domain reverted lazily maps its snapshot's memory image through a hard link of the driver's
//! own ([`crate::IncomingRam::Image`]): deleting that snapshot removes the snapshot's name of the
//! image only, and the report says that its data stays until the domain stops.

use std::{os::unix::fs::MetadataExt, path::Path, path::PathBuf, time::Instant};

use super::{
    at, disk_plan::delete_internal_if_present, millis, remove_file, DeleteReport, Orchestrator, StepResult,
};
use crate::{
    error::{DriverError, Operation, Result, Step},
    intent::Intent,
    metadata::{DiskSnapshot, SnapshotRecord},
    name::Name,
    tree::SnapshotTree,
};

impl Orchestrator {
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
                    record: Box::new(victim.clone()),
                },
            )?;
            let files = self.store.files(domain, &victim.name).of_record(&victim);
            let in_use = victim.memory.is_some() && has_other_links(&files.memory_image);
            let removed = self
                .delete_steps(&victim)
                .await
                .map_err(|e| self.failed(Operation::Delete, domain, &victim.name, e, Vec::new(), None))?;
            self.store.clear_intent(domain)?;
            report.removed_images.extend(removed);
            if in_use {
                tracing::info!(
                    %domain, snapshot = %victim.name,
                    "the domain maps the deleted snapshot's memory image: its data stays until the domain stops"
                );
                report.memory_in_use.push(victim.name.clone());
            }
            report.deleted.push(victim.name);
        }
        report.total_ms = millis(started.elapsed());
        Ok(report)
    }

    /// The steps of one delete. Each is idempotent, so recovery runs them again. Returns the
    /// overlay images removed.
    pub(super) async fn delete_steps(&self, record: &SnapshotRecord) -> StepResult<Vec<PathBuf>> {
        let domain = &record.domain;
        self.observer.step(Operation::Delete, Step::DeleteDisks);
        self.delete_disks(record).await.map_err(at(Step::DeleteDisks))?;

        self.observer.step(Operation::Delete, Step::RemoveFiles);
        // A memory image the caller placed outside the snapshot's folder goes first: once the
        // folder (and the record) is gone, nothing names it any more.
        if let Some(image) = record.memory.as_ref().and_then(|m| m.image_path.as_ref()) {
            remove_file(image).map_err(at(Step::RemoveFiles))?;
        }
        self.store
            .remove(domain, &record.name)
            .map_err(at(Step::RemoveFiles))?;

        self.observer.step(Operation::Delete, Step::UpdateTree);
        self.unlink_from_tree(record).map_err(at(Step::UpdateTree))?;

        self.observer.step(Operation::Delete, Step::TidyDisks);
        self.tidy_disks(domain).await.map_err(at(Step::TidyDisks))
    }

    /// Re-parents the deleted snapshot's children to its parent, which also becomes current if
    /// the deleted one was.
    fn unlink_from_tree(&self, record: &SnapshotRecord) -> Result<()> {
        let domain = &record.domain;
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
    }

    /// Deletes a snapshot's internal disk snapshots (where still present). Its external ones
    /// need no step of their own: once the record is gone, [`Orchestrator::tidy_disks`] folds
    /// away the overlays no snapshot reads any more.
    async fn delete_disks(&self, record: &SnapshotRecord) -> std::result::Result<(), DriverError> {
        let backend = self.hypervisor.disk_backend(&record.domain).await?;
        for disk in &record.disks {
            // A broken snapshot's image may be gone: nothing is left to delete in it.
            if let (DiskSnapshot::Internal { name }, true) = (&disk.snapshot, disk.image.exists()) {
                delete_internal_if_present(&*backend, &disk.image, name).await?;
            }
        }
        Ok(())
    }
}

/// Whether the file at `path` has names other than this one (a hard link the hypervisor driver
/// made to map it). A missing file has none.
fn has_other_links(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.nlink() > 1)
}
