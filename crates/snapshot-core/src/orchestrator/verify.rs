//! Verify: a snapshot's files and disk snapshots exist and are intact.

use disk::DiskSnapshots;

use super::{disk_plan::holds_internal, Orchestrator, VerifyReport};
use crate::{
    error::Result,
    metadata::{DiskRecord, DiskSnapshot},
    name::Name,
    store::SnapshotFiles,
};

impl Orchestrator {
    /// Checks that a snapshot's files and disk snapshots exist and are intact: the memory
    /// image's checksums, the device state, each internal snapshot in its image, each external
    /// snapshot's image and its backing chain.
    pub async fn verify(&self, domain: &Name, snapshot: &Name) -> Result<VerifyReport> {
        let _lock = self.begin(domain).await?;
        let record = self.store.get(domain, snapshot)?;
        let files = self.store.files(domain, snapshot).of_record(&record);
        let mut problems = Vec::new();
        let mut memory_pages = None;
        if record.memory.is_some() {
            memory_pages = verify_memory(&files, &mut problems).await;
        }
        match self.hypervisor.disk_backend(domain).await {
            Err(e) => problems.push(format!("cannot reach the disks: {e}")),
            Ok(backend) => {
                for disk in &record.disks {
                    if let Err(problem) = verify_disk(&*backend, disk).await {
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
}

/// Checks the memory image (every checksum) and the device state; returns the image's pages
/// and how many are stored.
async fn verify_memory(files: &SnapshotFiles, problems: &mut Vec<String>) -> Option<(u64, u64)> {
    let image = files.memory_image.clone();
    let mut pages = None;
    match tokio::task::spawn_blocking(move || memory::verify(&image)).await {
        Ok(Ok(info)) => pages = Some((info.total_pages, info.present_pages)),
        Ok(Err(e)) => problems.push(format!("memory image: {e}")),
        Err(e) => problems.push(format!("memory image check: {e}")),
    }
    match std::fs::metadata(&files.device_state) {
        Ok(meta) if meta.len() > 0 => {}
        Ok(_) => problems.push(format!("device state {} is empty", files.device_state.display())),
        Err(e) => problems.push(format!("device state {}: {e}", files.device_state.display())),
    }
    pages
}

/// Checks one disk's part of the snapshot.
async fn verify_disk(backend: &dyn DiskSnapshots, disk: &DiskRecord) -> std::result::Result<(), String> {
    match &disk.snapshot {
        DiskSnapshot::Internal { name } => match holds_internal(backend, &disk.image, name).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("has no internal snapshot {name}")),
            Err(e) => Err(e.to_string()),
        },
        DiskSnapshot::Excluded => Ok(()),
        DiskSnapshot::External { .. } => backend
            .backing_chain(&disk.image)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}
