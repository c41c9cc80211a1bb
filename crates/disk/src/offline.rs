//! The offline backend: edits the qcow2 images of a shut-off domain directly.
//!
//! The synchronous functions do the work (usable on their own); [`OfflineBackend`] runs them on
//! tokio's blocking pool behind [`DiskSnapshots`]. Deleting an external snapshot merges image
//! data natively too ([`delete_external`]: stream into the child or commit into the parent).
//! Every image being changed is opened for writing first, which takes QEMU's lock bytes: an
//! image a running QEMU holds is refused with [`Error::Locked`], and a QEMU started meanwhile
//! cannot open it.

use std::{
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;

use crate::{
    api::{
        BackingPath, ChainImage, DiskSnapshots, ExternalSnapshot, InternalSnapshot, MergeMethod, NewInternal,
    },
    error::{io_err, Error, Result},
    lock, names,
    qcow2::{self, header::MAGIC, snapshot_table::SnapshotEntry, Access, Chain, Image, Layer},
    regular,
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
    #[allow(
        clippy::cast_possible_truncation,
        reason = "QEMU keeps the low 32 bits of the seconds too"
    )]
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

/// Takes every internal snapshot (each disk's under its name), then creates every overlay; if a
/// step fails, what the earlier ones made is deleted again.
pub fn create_snapshots(internal: &[NewInternal], external: &[ExternalSnapshot]) -> Result<()> {
    let groups = crate::api::internal_by_name(internal);
    let undo = |done: &[(&str, Vec<PathBuf>)]| {
        for (name, disks) in done {
            if let Err(undo) = delete_internal(disks, name) {
                tracing::error!(%name, %undo, "cannot roll back a partial snapshot");
            }
        }
    };
    for (done, (name, disks)) in groups.iter().enumerate() {
        if let Err(error) = create_internal(disks, name) {
            undo(&groups[..done]);
            return Err(error);
        }
    }
    if let Err(error) = create_external(external) {
        undo(&groups);
        return Err(error);
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

/// Whether an image (a regular file) has the qcow2 magic.
fn probe_is_qcow2(path: &Path) -> Result<bool> {
    let file = regular::open(path, false)?;
    let mut magic = [0u8; 4];
    Ok(file.read_exact_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == MAGIC)
}

/// The format and virtual size of an image: qcow2 if it has the magic, else raw.
fn probe(path: &Path) -> Result<(String, u64)> {
    if probe_is_qcow2(path)? {
        open_as(path, "qcow2")
    } else {
        open_as(path, "raw")
    }
}

/// The virtual size of an image read as `format` (a backing image is read as the format its
/// child records, never probed: a raw image whose guest wrote a qcow2 header stays raw).
fn open_as(path: &Path, format: &str) -> Result<(String, u64)> {
    match format {
        "qcow2" => {
            let image = Image::open(path, Access::Read)?;
            Ok(("qcow2".into(), image.header().size))
        }
        "raw" => Ok(("raw".into(), regular::len(path)?)),
        other => Err(Error::Unsupported {
            path: path.to_owned(),
            reason: format!("backing format {other:?} is not supported (only qcow2 and raw)"),
        }),
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

/// Reverts a disk to an external snapshot: creates `revert.overlay`, a fresh qcow2 overlay on
/// the snapshot's image `revert.disk`. Only the new file is written; the snapshot's image is
/// read from its header alone (qcow2) or its length (raw), so it may be held by a running QEMU
/// as a read-only backing file (a revert prepares the new overlay before it ends the domain's
/// old QEMU). An image a process has open for writing is refused ([`Error::Locked`]): its
/// contents are moving, and the overlay would show whatever they become.
pub fn revert_external(revert: &ExternalSnapshot) -> Result<()> {
    let backing = backing_name(revert)?;
    let (format, size) = probe_header(&revert.disk)?;
    qcow2::create_overlay(&revert.overlay, &backing, &format, size)
}

/// The format and virtual size of an image, from its header alone: the image may be in use,
/// but not for writing.
fn probe_header(path: &Path) -> Result<(String, u64)> {
    let file = regular::open(path, false)?;
    if lock::is_written_by_other(&file).map_err(io_err("cannot query the locks of", path))? {
        return Err(Error::Locked {
            path: path.to_owned(),
        });
    }
    if probe_is_qcow2(path)? {
        let image = Image::open(path, Access::Header)?;
        Ok(("qcow2".into(), image.header().size))
    } else {
        Ok(("raw".into(), regular::len(path)?))
    }
}

/// The backing file of `image` (`None` for a raw image or a qcow2 image without one), read
/// from the header alone, so it works on images a running QEMU holds.
pub fn backing_file(image: &Path) -> Result<Option<PathBuf>> {
    if probe_is_qcow2(image)? {
        let header = Image::open(image, Access::Header)?;
        Ok(header
            .header()
            .backing_file
            .as_ref()
            .map(|backing| resolve_backing(image, backing)))
    } else {
        Ok(None)
    }
}

/// QEMU resolves a relative backing name against the overlay's folder.
fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    image
        .parent()
        .map_or_else(|| backing.to_owned(), |dir| dir.join(backing))
}

/// The backing chain of `disk`, active image first.
pub fn backing_chain(disk: &Path) -> Result<Vec<ChainImage>> {
    let mut chain = Vec::new();
    let mut next: Option<(PathBuf, Option<String>)> = Some((disk.to_owned(), None));
    while let Some((path, recorded)) = next.take() {
        if chain.len() == MAX_CHAIN {
            return Err(Error::Chain {
                disk: disk.to_owned(),
                image: path,
                reason: format!("backing chain longer than {MAX_CHAIN} images (a loop?)"),
            });
        }
        // The disk itself is probed; a backing image is opened as the format its child
        // records (probed, as QEMU does, only when none is recorded).
        let (format, virtual_size) = match &recorded {
            Some(format) => open_as(&path, format)?,
            None => probe(&path)?,
        };
        if format == "qcow2" {
            let image = Image::open(&path, Access::Read)?;
            let header = image.header();
            next = header
                .backing_file
                .as_ref()
                .map(|backing| (resolve_backing(&path, backing), header.backing_format.clone()));
        }
        chain.push(ChainImage {
            path,
            format,
            virtual_size,
        });
    }
    Ok(chain)
}

/// Removes `image` from the backing chain of the disk whose active image is `disk` by merging
/// its data, and returns the disk's active image afterwards (see
/// [`DiskSnapshots::delete_external`]); the removed image's file is left in place.
///
/// - [`MergeMethod::StreamIntoChild`]: every cluster the child does not map in full but
///   `image` maps something of is written into the child with the contents the child shows;
///   then the child's header names `image`'s backing file (or none) in one write. Only the
///   child changes, so other branches on `image` or below stay valid.
/// - [`MergeMethod::CommitIntoParent`]: every cluster `image` maps something of is written into
///   its parent with the contents `image` shows; then `image`'s child (if `image` is not the
///   active image) names the parent in one header write. The parent changes: other branches
///   on it see the committed data. Internal snapshots of the parent keep their contents (the
///   tables they share with the active state are copied before being written); only the
///   parent's active state takes the committed data.
///
/// Refused, before anything is written: an image of the chain that a QEMU holds
/// ([`Error::Locked`]); images of different virtual sizes; committing into a raw parent;
/// internal snapshots in the child of a stream (they read through the backing file that
/// streaming replaces) or in the committed image (they read through the parent, which the
/// commit changes); encrypted images; compressed clusters that would have to be read (this
/// backend cannot decompress them; compressed clusters that are only counted or replaced are
/// fine).
///
/// Clusters are written in batches (see `docs/qcow2-snapshots.md`): a failure or crash in the
/// middle leaves the disk showing the same contents as before, with at most leaked clusters (a
/// commit's parent may hold part of the committed data, which its other branches see).
pub fn delete_external(disk: &Path, image: &Path, method: MergeMethod) -> Result<PathBuf> {
    names::validate_image_path(disk, "disk image")?;
    names::validate_image_path(image, "image")?;
    let chain = backing_chain(disk)?;
    let refuse = |reason: &str| Error::Chain {
        disk: disk.to_owned(),
        image: image.to_owned(),
        reason: reason.into(),
    };
    let at = chain
        .iter()
        .position(|c| names::same_file(&c.path, image))
        .ok_or_else(|| refuse("the image is not in the disk's backing chain"))?;
    // The images written (and, for a commit, the committed one, whose data must not move):
    // opened for writing, which locks them against QEMU. The first of them tops the layers.
    let written = match method {
        MergeMethod::StreamIntoChild => {
            let child = at
                .checked_sub(1)
                .ok_or_else(|| refuse("it is the active image, which has no child; commit it instead"))?;
            child..=child
        }
        MergeMethod::CommitIntoParent => {
            if at + 1 == chain.len() {
                return Err(refuse("it has no backing image to commit into"));
            }
            if chain[at + 1].format != "qcow2" {
                return Err(refuse(
                    "its backing image is not qcow2; only qcow2 images are written",
                ));
            }
            at.saturating_sub(1)..=at + 1
        }
    };
    let top = *written.start();
    if chain[top..=(at + 1).min(chain.len() - 1)]
        .iter()
        .any(|c| c.virtual_size != chain[at].virtual_size)
    {
        return Err(refuse("the images involved have different virtual sizes"));
    }
    let layers = chain[top..]
        .iter()
        .enumerate()
        .map(|(i, c)| open_layer(c, written.contains(&(top + i))))
        .collect::<Result<Vec<_>>>()?;
    let mut layers = Chain::new(layers);
    let snapshots =
        |layers: &mut Chain, index: usize| layers.image_mut(index).map_or(0, |i| i.header().nb_snapshots);
    let at_layer = at - top;
    match method {
        MergeMethod::StreamIntoChild => {
            if snapshots(&mut layers, 0) > 0 {
                return Err(refuse(
                    "the child has internal snapshots, which read through the backing file that streaming \
                     replaces; delete them first or commit instead",
                ));
            }
            let backing = new_backing(&chain, at, &mut layers, at_layer)?;
            merge_and_rebase(&mut layers, backing, |layers| layers.stream(0))?;
            Ok(chain[0].path.clone())
        }
        MergeMethod::CommitIntoParent => {
            if snapshots(&mut layers, at_layer) > 0 {
                return Err(refuse(
                    "the image has internal snapshots, which read through the parent that the commit \
                     changes; delete them first or stream instead",
                ));
            }
            if at == 0 {
                layers.commit(1)?;
                return Ok(chain[1].path.clone());
            }
            let backing = new_backing(&chain, at, &mut layers, at_layer)?;
            merge_and_rebase(&mut layers, backing, |layers| layers.commit(at_layer + 1))?;
            Ok(chain[0].path.clone())
        }
    }
}

/// Opens one image of a chain to merge: qcow2 for writing (locked) or reading, raw for reading
/// after checking that no QEMU holds it.
fn open_layer(image: &ChainImage, write: bool) -> Result<Layer> {
    let path = &image.path;
    if image.format == "qcow2" {
        let access = if write { Access::Write } else { Access::Read };
        let opened = Image::open(path, access)?;
        // The data is encrypted with keys (and, for LUKS, IVs from host offsets) of its own
        // image: copied clusters would not decrypt.
        if opened.header().crypt_method != 0 {
            return Err(Error::Unsupported {
                path: path.clone(),
                reason: "encrypted images cannot be merged by this backend".into(),
            });
        }
        return Ok(Layer::Qcow2(Box::new(opened)));
    }
    let file = regular::open(path, false)?;
    if lock::is_locked_by_other(&file).map_err(io_err("cannot query the locks of", path))? {
        return Err(Error::Locked { path: path.clone() });
    }
    Ok(Layer::Raw {
        path: path.clone(),
        file,
        size: image.virtual_size,
    })
}

/// The backing file (name, format) that replaces `chain[at]` for its child: what `chain[at]`
/// itself records, or none. A relative name is kept if the child is in the same folder, else
/// the backing image's resolved absolute path is recorded.
fn new_backing(
    chain: &[ChainImage],
    at: usize,
    layers: &mut Chain,
    at_layer: usize,
) -> Result<Option<(String, String)>> {
    let (Some(below), Some(merged)) = (chain.get(at + 1), layers.image_mut(at_layer)) else {
        return Ok(None);
    };
    let recorded = merged.header().backing_file.clone().unwrap_or_default();
    let same_folder = at
        .checked_sub(1)
        .is_some_and(|child| chain[child].path.parent() == chain[at].path.parent());
    let name = if Path::new(&recorded).is_absolute() || same_folder {
        recorded
    } else {
        let resolved = below
            .path
            .canonicalize()
            .map_err(io_err("cannot resolve the backing file", &below.path))?;
        resolved
            .into_os_string()
            .into_string()
            .map_err(|path| Error::InvalidArgument {
                what: "backing file",
                value: path.to_string_lossy().into_owned(),
                reason: "path is not UTF-8".into(),
            })?
    };
    Ok(Some((name, below.format.clone())))
}

/// Runs `merge`, then makes the child (layer 0) name `backing` (the switch). The new header is
/// built first as a check, so that a name that cannot fit fails before anything is written.
fn merge_and_rebase(
    layers: &mut Chain,
    backing: Option<(String, String)>,
    merge: impl FnOnce(&mut Chain) -> Result<()>,
) -> Result<()> {
    let backing = backing
        .as_ref()
        .map(|(name, format)| (name.as_str(), format.as_str()));
    child(layers)?.backing_header(backing)?;
    merge(layers)?;
    child(layers)?.set_backing(backing)
}

/// The child whose backing file a merge replaces (layer 0), which is qcow2 since it has one.
fn child(layers: &mut Chain) -> Result<&mut Image> {
    layers.image_mut(0).ok_or_else(|| Error::InvalidArgument {
        what: "merge target",
        value: "the child".into(),
        reason: "only qcow2 images can be rebased".into(),
    })
}

/// [`DiskSnapshots`] for the disks of a shut-off domain.
#[derive(Debug, Clone, Copy, Default)]
pub struct OfflineBackend;

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
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

    async fn create_snapshots(&self, internal: &[NewInternal], external: &[ExternalSnapshot]) -> Result<()> {
        let (internal, external) = (internal.to_vec(), external.to_vec());
        blocking(move || create_snapshots(&internal, &external)).await
    }

    async fn revert_external(&self, revert: &ExternalSnapshot) -> Result<()> {
        let revert = revert.clone();
        blocking(move || revert_external(&revert)).await
    }

    async fn delete_external(&self, disk: &Path, image: &Path, method: MergeMethod) -> Result<PathBuf> {
        let (disk, image) = (disk.to_owned(), image.to_owned());
        blocking(move || delete_external(&disk, &image, method)).await
    }

    async fn backing_chain(&self, disk: &Path) -> Result<Vec<ChainImage>> {
        let disk = disk.to_owned();
        blocking(move || backing_chain(&disk)).await
    }

    async fn backing_file(&self, image: &Path) -> Result<Option<PathBuf>> {
        let image = image.to_owned();
        blocking(move || backing_file(&image)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revert's overlay reads its backing image's header only: a backing image another
    /// process holds read-only (QEMU's permission byte 100) is fine, one it writes (byte 101) is
    /// refused, and nothing is created then.
    #[test]
    fn a_revert_overlay_needs_its_backing_not_to_be_written() {
        use std::os::fd::AsFd;
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 2 << 20]).unwrap();
        qcow2::create_overlay(&base, raw.to_str().unwrap(), "raw", 2 << 20).unwrap();
        let hold = |byte: i64| {
            let file = std::fs::File::open(&base).unwrap();
            let request = libc::flock {
                l_type: libc::c_short::try_from(libc::F_RDLCK).unwrap(),
                l_whence: libc::c_short::try_from(libc::SEEK_SET).unwrap(),
                l_start: byte,
                l_len: 1,
                l_pid: 0,
            };
            nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_OFD_SETLK(&request)).unwrap();
            file
        };
        let revert = |overlay: &str| ExternalSnapshot {
            disk: base.clone(),
            overlay: dir.path().join(overlay),
            backing_path: BackingPath::Absolute,
        };

        let reader = hold(100);
        revert_external(&revert("o1.qcow2")).unwrap();
        drop(reader);
        let chain = backing_chain(&dir.path().join("o1.qcow2")).unwrap();
        assert_eq!(chain[0].virtual_size, 2 << 20);
        assert_eq!(chain[1].path, base);

        let writer = hold(101);
        let error = revert_external(&revert("o2.qcow2")).unwrap_err();
        assert!(matches!(error, Error::Locked { .. }), "{error}");
        assert!(!dir.path().join("o2.qcow2").exists());
        drop(writer);
    }

    /// The trait's `backing_file` reads the header alone and resolves a relative name against
    /// the image's folder; a raw image has none.
    #[tokio::test]
    async fn backing_file_through_the_trait() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let relative = dir.path().join("relative.qcow2");
        qcow2::create_overlay(&relative, "base.raw", "raw", 1 << 20).unwrap();
        let absolute = dir.path().join("absolute.qcow2");
        let named = relative.to_str().unwrap();
        qcow2::create_overlay(&absolute, named, "qcow2", 1 << 20).unwrap();

        let backend: &dyn DiskSnapshots = &OfflineBackend;
        assert_eq!(backend.backing_file(&relative).await.unwrap(), Some(base.clone()));
        assert_eq!(
            backend.backing_file(&absolute).await.unwrap(),
            Some(relative.clone())
        );
        assert_eq!(backend.backing_file(&base).await.unwrap(), None);
        assert!(backend.backing_file(&dir.path().join("missing")).await.is_err());
    }
}
