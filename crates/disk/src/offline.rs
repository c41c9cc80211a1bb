//! The offline backend: edits the qcow2 images of a shut-off domain directly.
//!
//! The synchronous functions do the work (usable on their own); [`OfflineBackend`] runs them on
//! tokio's blocking pool behind [`DiskSnapshots`]. Every image being changed is opened for
//! writing first, which takes QEMU's lock bytes: an image a running QEMU holds is refused with
//! [`Error::Locked`], and a QEMU started meanwhile cannot open it.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;

use crate::{
    api::{BackingPath, ChainImage, DiskSnapshots, ExternalSnapshot, InternalSnapshot, MergeMethod},
    error::{io_err, Error, Result},
    names,
    qcow2::{self, header::MAGIC, snapshot_table::SnapshotEntry, Access, Image},
};

/// Longest backing chain followed (a longer one is most likely a loop).
const MAX_CHAIN: usize = 256;

/// The internal snapshots of a qcow2 image.
pub fn list_internal(disk: &Path) -> Result<Vec<InternalSnapshot>> {
    let image = Image::open(disk, Access::Read)?;
    Ok(image.snapshots()?.0.iter().map(to_snapshot).collect())
}

fn to_snapshot(e: &SnapshotEntry) -> InternalSnapshot {
    InternalSnapshot {
        id: String::from_utf8_lossy(&e.id).into_owned(),
        name: String::from_utf8_lossy(&e.name).into_owned(),
        date_sec: u64::from(e.date_sec),
        date_nsec: e.date_nsec,
        vm_clock_nsec: e.vm_clock_nsec,
        disk_size: e.disk_size,
        vm_state_size: e.vm_state_size,
    }
}

/// Opens every image for writing (locking them all for the whole operation).
fn open_all(disks: &[PathBuf]) -> Result<Vec<Image>> {
    disks
        .iter()
        .map(|disk| Image::open(disk, Access::Write))
        .collect()
}

/// Fails unless every image holds the snapshot `name`.
fn require_everywhere(images: &[Image], name: &str) -> Result<()> {
    for image in images {
        if !image.snapshots()?.0.iter().any(|e| e.name == name.as_bytes()) {
            return Err(Error::SnapshotNotFound {
                path: image.path().to_owned(),
                name: name.into(),
            });
        }
    }
    Ok(())
}

/// Takes the internal snapshot `name` of every disk. If one fails, the snapshot is deleted
/// again from the disks already done, so that either all disks have it or none.
pub fn create_internal(disks: &[PathBuf], name: &str) -> Result<()> {
    names::validate_snapshot_name(name)?;
    let mut images = open_all(disks)?;
    for image in &images {
        if image.snapshots()?.0.iter().any(|e| e.name == name.as_bytes()) {
            return Err(Error::SnapshotExists {
                path: image.path().to_owned(),
                name: name.into(),
            });
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    // The table stores 32-bit seconds, as QEMU does.
    let date = (now.as_secs() as u32, now.subsec_nanos());
    for done in 0..images.len() {
        if let Err(error) = images[done].create_snapshot(name, date) {
            for image in &mut images[..done] {
                if let Err(undo) = image.delete_snapshot(name) {
                    tracing::error!(path = %image.path().display(), %undo, "cannot roll back a partial snapshot");
                }
            }
            return Err(error);
        }
    }
    Ok(())
}

/// Deletes the internal snapshot `name` from every disk (all must hold it).
pub fn delete_internal(disks: &[PathBuf], name: &str) -> Result<()> {
    let mut images = open_all(disks)?;
    require_everywhere(&images, name)?;
    images
        .iter_mut()
        .try_for_each(|image| image.delete_snapshot(name))
}

/// Applies the internal snapshot `name` to every disk (all must hold it).
pub fn apply_internal(disks: &[PathBuf], name: &str) -> Result<()> {
    let mut images = open_all(disks)?;
    require_everywhere(&images, name)?;
    images.iter_mut().try_for_each(|image| image.apply_snapshot(name))
}

/// The format and virtual size of an image: qcow2 if it has the magic, else raw.
fn probe(path: &Path) -> Result<(String, u64)> {
    let file = File::open(path).map_err(io_err("cannot open image", path))?;
    let mut magic = [0u8; 4];
    let is_qcow2 = file.read_exact_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == MAGIC;
    if is_qcow2 {
        let image = Image::open(path, Access::Read)?;
        Ok(("qcow2".into(), image.header().size))
    } else {
        let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
        Ok(("raw".into(), len))
    }
}

/// The backing file name to record in `snapshot.overlay`.
pub(crate) fn backing_name(snapshot: &ExternalSnapshot) -> Result<String> {
    names::validate_image_path(&snapshot.disk, "disk image")?;
    names::validate_image_path(&snapshot.overlay, "overlay")?;
    let name = match snapshot.backing_path {
        BackingPath::Absolute => snapshot.disk.clone(),
        BackingPath::Relative => names::relative_to(
            &snapshot.disk,
            snapshot.overlay.parent().expect("validated path has a folder"),
        ),
    };
    name.into_os_string()
        .into_string()
        .map_err(|_| Error::InvalidArgument {
            what: "disk image",
            value: snapshot.disk.display().to_string(),
            reason: "path is not UTF-8".into(),
        })
}

/// Creates the overlay of every snapshot; if one fails, the overlays already created are
/// removed again.
pub fn create_external(snapshots: &[ExternalSnapshot]) -> Result<()> {
    let mut plans = Vec::with_capacity(snapshots.len());
    for snapshot in snapshots {
        let backing = backing_name(snapshot)?;
        // Reading the disk also refuses one that a running QEMU holds: its contents are moving.
        let (format, size) = probe(&snapshot.disk)?;
        plans.push((snapshot, backing, format, size));
    }
    for (done, (snapshot, backing, format, size)) in plans.iter().enumerate() {
        if let Err(error) = qcow2::create_overlay(&snapshot.overlay, backing, format, *size) {
            for (undo, ..) in &plans[..done] {
                let _ = std::fs::remove_file(&undo.overlay);
            }
            return Err(error);
        }
    }
    Ok(())
}

/// The backing chain of `disk`, active image first.
pub fn backing_chain(disk: &Path) -> Result<Vec<ChainImage>> {
    let mut chain = Vec::new();
    let mut next = Some(disk.to_owned());
    while let Some(path) = next.take() {
        if chain.len() == MAX_CHAIN {
            return Err(Error::Chain {
                disk: disk.to_owned(),
                image: path,
                reason: format!("backing chain longer than {MAX_CHAIN} images (a loop?)"),
            });
        }
        let (format, virtual_size) = probe(&path)?;
        if format == "qcow2" {
            let image = Image::open(&path, Access::Read)?;
            next = image.header().backing_file.as_ref().map(|backing| {
                let backing = Path::new(backing);
                // QEMU resolves a relative backing name against the overlay's folder.
                path.parent()
                    .map_or_else(|| backing.to_owned(), |dir| dir.join(backing))
            });
        }
        chain.push(ChainImage {
            path,
            format,
            virtual_size,
        });
    }
    Ok(chain)
}

/// [`DiskSnapshots`] for the disks of a shut-off domain.
#[derive(Debug, Clone, Copy, Default)]
pub struct OfflineBackend;

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(Error::Task)?
}

#[async_trait]
impl DiskSnapshots for OfflineBackend {
    async fn list_internal(&self, disk: &Path) -> Result<Vec<InternalSnapshot>> {
        let disk = disk.to_owned();
        blocking(move || list_internal(&disk)).await
    }

    async fn create_internal(&self, disks: &[PathBuf], name: &str) -> Result<()> {
        let (disks, name) = (disks.to_vec(), name.to_owned());
        blocking(move || create_internal(&disks, &name)).await
    }

    async fn delete_internal(&self, disks: &[PathBuf], name: &str) -> Result<()> {
        let (disks, name) = (disks.to_vec(), name.to_owned());
        blocking(move || delete_internal(&disks, &name)).await
    }

    async fn apply_internal(&self, disks: &[PathBuf], name: &str) -> Result<()> {
        let (disks, name) = (disks.to_vec(), name.to_owned());
        blocking(move || apply_internal(&disks, &name)).await
    }

    async fn create_external(&self, snapshots: &[ExternalSnapshot]) -> Result<()> {
        let snapshots = snapshots.to_vec();
        blocking(move || create_external(&snapshots)).await
    }

    async fn revert_external(&self, revert: &ExternalSnapshot) -> Result<()> {
        let revert = revert.clone();
        blocking(move || create_external(std::slice::from_ref(&revert))).await
    }

    async fn delete_external(&self, _disk: &Path, _image: &Path, _method: MergeMethod) -> Result<PathBuf> {
        Err(Error::NotSupported {
            operation: "deleting an external snapshot",
            backend: "offline",
            reason: "merging image data needs a qcow2 data path this backend does not have yet; start the \
                     domain paused and use the live backend (block-commit / block-stream)"
                .into(),
        })
    }

    async fn backing_chain(&self, disk: &Path) -> Result<Vec<ChainImage>> {
        let disk = disk.to_owned();
        blocking(move || backing_chain(&disk)).await
    }
}
