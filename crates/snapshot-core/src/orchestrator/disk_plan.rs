//! Each disk's part of a snapshot: the plan from the caller's requests, and taking it.

use std::path::{Path, PathBuf};

use disk::{DiskSnapshots, ExternalSnapshot};

use super::{DiskKind, DiskRequest};
use crate::{
    error::{DriverError, Error, Result},
    hypervisor::DiskTarget,
    metadata::{DiskRecord, DiskSnapshot},
    name::Name,
};

/// Decides each disk's snapshot from the requests (disks not named: internal).
pub(super) fn plan_disks(
    snapshot: &Name,
    targets: &[DiskTarget],
    requests: &[DiskRequest],
) -> Result<Vec<DiskRecord>> {
    check_requests(targets, requests)?;
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
                plan_external(snapshot, target, path.as_deref(), format.as_deref(), &planned)?
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

/// Every request names a disk of the domain, once.
fn check_requests(targets: &[DiskTarget], requests: &[DiskRequest]) -> Result<()> {
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
    Ok(())
}

/// An external snapshot of `target`: a qcow2 overlay at `path` (default: beside the image).
fn plan_external(
    snapshot: &Name,
    target: &DiskTarget,
    path: Option<&Path>,
    format: Option<&str>,
    planned: &[DiskRecord],
) -> Result<DiskSnapshot> {
    let format = format.unwrap_or("qcow2").to_owned();
    if format != "qcow2" {
        return Err(Error::InvalidRequest(format!(
            "disk {}: overlay format {format:?} is not supported (qcow2 only)",
            target.target
        )));
    }
    let overlay = path.map_or_else(
        || disk::names::snapshot_overlay_path(&target.image, snapshot.as_str()),
        Path::to_path_buf,
    );
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
    Ok(DiskSnapshot::External { overlay, format })
}

/// The overlay of a disk's external snapshot.
pub(super) fn external_overlay(disk: &DiskRecord) -> Option<&PathBuf> {
    match &disk.snapshot {
        DiskSnapshot::External { overlay, .. } => Some(overlay),
        DiskSnapshot::Internal { .. } => None,
    }
}

/// The overlays a create makes.
pub(super) fn new_overlays(disks: &[DiskRecord]) -> Vec<PathBuf> {
    disks.iter().filter_map(external_overlay).cloned().collect()
}

/// The disks a domain writes to after a create: external overlays replace their images.
pub(super) fn active_after_create(disks: &[DiskRecord]) -> Vec<DiskTarget> {
    disks
        .iter()
        .map(|d| DiskTarget {
            target: d.target.clone(),
            image: external_overlay(d).unwrap_or(&d.image).clone(),
        })
        .collect()
}

/// Internal snapshots of all disks that take one (one atomic call), then the external ones
/// (another); if the second fails the first is undone.
pub(super) async fn take_disk_snapshots(
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

/// Deletes the internal snapshot `name` of `image` if the image still holds it: undo and recovery
/// may run after a crash that happened either side of the delete.
pub(super) async fn delete_internal_if_present(
    backend: &dyn DiskSnapshots,
    image: &Path,
    name: &str,
) -> std::result::Result<(), disk::Error> {
    if backend.list_internal(image).await?.iter().any(|s| s.name == name) {
        backend.delete_internal(&[image.to_owned()], name).await?;
    }
    Ok(())
}
