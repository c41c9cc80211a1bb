//! Each disk's part of a snapshot: the plan from the caller's requests, and taking it.

use std::path::{Path, PathBuf};

use disk::{DiskSnapshots, ExternalSnapshot, NewInternal};

use super::{DiskKind, DiskRequest};
use crate::{
    error::{Error, Result},
    hypervisor::{DiskTarget, ImageFormat},
    metadata::{DiskRecord, DiskSnapshot},
    name::Name,
};

/// Decides each disk's snapshot from the requests (disks not named: internal, named like the
/// snapshot; raw disks, which cannot hold internal snapshots: external, beside the image). A
/// disk-only snapshot (`disks_only`) must snapshot at least one disk.
pub(super) fn plan_disks(
    snapshot: &Name,
    targets: &[DiskTarget],
    requests: &[DiskRequest],
    disks_only: bool,
) -> Result<Vec<DiskRecord>> {
    check_requests(targets, requests)?;
    let internal = DiskKind::Internal { name: None };
    let external = DiskKind::External {
        path: None,
        format: None,
    };
    let mut planned: Vec<DiskRecord> = Vec::new();
    for target in targets {
        let default = match target.format {
            ImageFormat::Qcow2 => &internal,
            ImageFormat::Raw => &external,
        };
        let kind = requests
            .iter()
            .find(|r| r.target == target.target)
            .map_or(default, |r| &r.kind);
        let snapshot_kind = match kind {
            DiskKind::Internal { name } => plan_internal(snapshot, target, name.as_deref())?,
            DiskKind::External { path, format } => {
                plan_external(snapshot, target, path.as_deref(), format.as_deref(), &planned)?
            }
            DiskKind::Excluded => DiskSnapshot::Excluded,
        };
        planned.push(DiskRecord {
            target: target.target.clone(),
            image: target.image.clone(),
            snapshot: snapshot_kind,
        });
    }
    if disks_only && planned.iter().all(|d| d.snapshot == DiskSnapshot::Excluded) {
        return Err(Error::InvalidRequest(format!(
            "snapshot {snapshot} would hold nothing: it has no memory and every disk is left out"
        )));
    }
    Ok(planned)
}

/// An internal snapshot of `target`, named `name` (default: the snapshot's name). Refused for
/// a raw image, which has nowhere to keep one.
fn plan_internal(snapshot: &Name, target: &DiskTarget, name: Option<&str>) -> Result<DiskSnapshot> {
    if target.format == ImageFormat::Raw {
        return Err(Error::Unsupported(format!(
            "disk {} ({}) is a raw image, which cannot hold an internal snapshot: use --disk \
             {}=external (the default for raw disks) or {}=no",
            target.target,
            target.image.display(),
            target.target,
            target.target
        )));
    }
    let (name, whose) = match name {
        Some(name) => (name, "the name given for it"),
        None => (snapshot.as_str(), "the snapshot's name"),
    };
    disk::names::validate_snapshot_name(name).map_err(|e| {
        Error::InvalidRequest(format!(
            "disk {}: an internal snapshot cannot be named {name:?} ({whose}): {e}",
            target.target
        ))
    })?;
    Ok(DiskSnapshot::Internal {
        name: name.to_owned(),
    })
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
        return Err(Error::Unsupported(format!(
            "disk {}: overlay format {format:?} is not supported (qcow2 only)",
            target.target
        )));
    }
    let overlay = path.map_or_else(
        || disk::names::snapshot_overlay_path(&target.image, snapshot.as_str()),
        Path::to_path_buf,
    );
    disk::names::validate_image_path(&overlay, "overlay path")
        .map_err(|e| Error::InvalidRequest(format!("disk {}: {e}", target.target)))?;
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
        DiskSnapshot::Internal { .. } | DiskSnapshot::Excluded => None,
    }
}

/// The overlays a create makes.
pub(super) fn new_overlays(disks: &[DiskRecord]) -> Vec<PathBuf> {
    disks.iter().filter_map(external_overlay).cloned().collect()
}

/// The disks a domain writes to after a create: external overlays (qcow2) replace their
/// images; the others keep their image and its format (from `before`, the disks before).
pub(super) fn active_after_create(disks: &[DiskRecord], before: &[DiskTarget]) -> Vec<DiskTarget> {
    disks
        .iter()
        .map(|d| match external_overlay(d) {
            Some(overlay) => DiskTarget {
                target: d.target.clone(),
                image: overlay.clone(),
                format: ImageFormat::Qcow2,
            },
            None => DiskTarget {
                target: d.target.clone(),
                image: d.image.clone(),
                format: format_of(before, &d.target),
            },
        })
        .collect()
}

/// The format of disk `target` among `disks` (qcow2 if it is not there).
pub(super) fn format_of(disks: &[DiskTarget], target: &str) -> ImageFormat {
    disks
        .iter()
        .find(|t| t.target == target)
        .map_or(ImageFormat::Qcow2, |t| t.format)
}

/// The internal snapshots to take: each disk's image and its snapshot's name.
pub(super) fn internal_snapshots(disks: &[DiskRecord]) -> Vec<NewInternal> {
    disks
        .iter()
        .filter_map(|d| match &d.snapshot {
            DiskSnapshot::Internal { name } => Some(NewInternal {
                disk: d.image.clone(),
                name: name.clone(),
            }),
            DiskSnapshot::External { .. } | DiskSnapshot::Excluded => None,
        })
        .collect()
}

/// The images of the disks a snapshot covers (those left out are not its).
pub(super) fn snapshot_images(record: &crate::metadata::SnapshotRecord) -> impl Iterator<Item = &PathBuf> {
    record
        .disks
        .iter()
        .filter(|d| d.snapshot != DiskSnapshot::Excluded)
        .map(|d| &d.image)
}

/// The overlays that external snapshots make.
pub(super) fn external_snapshots(disks: &[DiskRecord]) -> Vec<ExternalSnapshot> {
    disks
        .iter()
        .filter_map(|d| {
            external_overlay(d).map(|overlay| ExternalSnapshot {
                disk: d.image.clone(),
                overlay: overlay.clone(),
                backing_path: disk::BackingPath::Absolute,
            })
        })
        .collect()
}

/// Refuses a plan whose internal snapshot name a disk already holds (made outside domsnap, or
/// by a snapshot of the same name deleted from the store only): its undo could not tell the two
/// apart, and the user's snapshot must never be touched.
pub(super) async fn check_names_free(backend: &dyn DiskSnapshots, disks: &[DiskRecord]) -> Result<()> {
    for disk in disks {
        let DiskSnapshot::Internal { name } = &disk.snapshot else {
            continue;
        };
        let held = holds_internal(backend, &disk.image, name).await.map_err(|e| {
            Error::InvalidRequest(format!(
                "disk {}: cannot list its internal snapshots: {e}",
                disk.target
            ))
        })?;
        if held {
            return Err(Error::InvalidRequest(format!(
                "disk {} ({}) already holds an internal snapshot named {name}: choose another name",
                disk.target,
                disk.image.display()
            )));
        }
    }
    Ok(())
}

/// Whether `image` holds an internal snapshot named `name`.
pub(super) async fn holds_internal(
    backend: &dyn DiskSnapshots,
    image: &Path,
    name: &str,
) -> std::result::Result<bool, disk::Error> {
    Ok(backend.list_internal(image).await?.iter().any(|s| s.name == name))
}

/// Deletes the internal snapshot `name` of `image` if the image still holds it: undo and recovery
/// may run after a crash that happened either side of the delete.
pub(super) async fn delete_internal_if_present(
    backend: &dyn DiskSnapshots,
    image: &Path,
    name: &str,
) -> std::result::Result<(), disk::Error> {
    if holds_internal(backend, image, name).await? {
        backend.delete_internal(&[image.to_owned()], name).await?;
    }
    Ok(())
}
