//! The disk-snapshot trait the orchestrator uses, and its types. Nothing here knows QEMU.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::error::Result;

/// An internal snapshot of one disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalSnapshot {
    /// Unique id within the image (a decimal number by convention).
    pub id: String,
    /// The name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u64,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock when taken, nanoseconds (0 when taken offline).
    pub vm_clock_nsec: u64,
    /// Virtual disk size when taken, if recorded.
    pub disk_size: Option<u64>,
    /// Bytes of VM state saved inside the image with it (0 for disk-only snapshots).
    pub vm_state_size: u64,
}

/// A new internal snapshot of one disk: its name in the image (disks of one snapshot may name
/// theirs differently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInternal {
    /// The disk's active image.
    pub disk: PathBuf,
    /// The internal snapshot's name.
    pub name: String,
}

/// The images of `internal` grouped by snapshot name, in the order the names first appear (for
/// the calls that take one name for several images).
pub fn internal_by_name(internal: &[NewInternal]) -> Vec<(&str, Vec<PathBuf>)> {
    let mut groups: Vec<(&str, Vec<PathBuf>)> = Vec::new();
    for snapshot in internal {
        match groups.iter_mut().find(|(name, _)| *name == snapshot.name) {
            Some((_, disks)) => disks.push(snapshot.disk.clone()),
            None => groups.push((&snapshot.name, vec![snapshot.disk.clone()])),
        }
    }
    groups
}

/// How a new overlay records its backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingPath {
    /// The backing image's absolute path.
    #[default]
    Absolute,
    /// The backing image's path relative to the overlay's folder (the pair can be moved).
    Relative,
}

/// An external snapshot (or revert) of one disk: a new qcow2 overlay whose backing file is
/// `disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSnapshot {
    /// For a snapshot: the disk's current active image, which becomes read-only history.
    /// For a revert: the snapshot's image, which the new overlay starts from.
    pub disk: PathBuf,
    /// The overlay to create (absolute path; must not exist). It becomes the disk's active
    /// image.
    pub overlay: PathBuf,
    /// How the overlay names `disk`.
    pub backing_path: BackingPath,
}

/// How [`DiskSnapshots::delete_external`] removes an image from a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeMethod {
    /// Write the image's data into its backing image (its parent) and point the image's
    /// child at the parent. The parent changes: use this only if no other chain (branch) uses
    /// the parent.
    CommitIntoParent,
    /// Copy the image's data (and what it shows from below `base`) into its child, which then
    /// backs onto the image's parent. Only the child changes: safe when other branches share
    /// the parent or the image.
    StreamIntoChild,
}

/// One image of a disk's backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainImage {
    /// The image file.
    pub path: PathBuf,
    /// Its format, e.g. `qcow2` or `raw`.
    pub format: String,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// Disk snapshots of a domain's disks, each disk named by the path of its active (top) image.
///
/// Two implementations: [`crate::LiveBackend`] for disks a running QEMU uses (through QMP),
/// and [`crate::OfflineBackend`] for disks of a shut-off domain (editing the images natively).
/// Operations on several disks are all-or-nothing where the backend can make them so (see
/// each backend).
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait DiskSnapshots: Send + Sync {
    /// The internal snapshots of a disk's active image.
    async fn list_internal(&self, disk: &Path) -> Result<Vec<InternalSnapshot>>;

    /// Takes an internal snapshot named `name` of every disk, atomically.
    async fn create_internal(&self, disks: &[PathBuf], name: &str) -> Result<()>;

    /// Deletes the internal snapshot `name` from every disk.
    async fn delete_internal(&self, disks: &[PathBuf], name: &str) -> Result<()>;

    /// Makes the internal snapshot `name` the current state of every disk (the current state is
    /// discarded). Every disk is checked to hold the snapshot before any is changed.
    async fn apply_internal(&self, disks: &[PathBuf], name: &str) -> Result<()>;

    /// Creates an overlay for every disk, atomically; each overlay becomes its disk's active
    /// image and the old active image becomes the snapshot.
    async fn create_external(&self, snapshots: &[ExternalSnapshot]) -> Result<()>;

    /// Takes internal snapshots (each disk's under its own name) and creates overlays, all in
    /// one step: the live backend runs one `transaction` for all of them, so the disks are
    /// consistent with each other without pausing the guest; the offline backend (a shut-off
    /// domain, whose disks do not change) takes them one after the other and undoes what it
    /// made if one fails.
    async fn create_snapshots(&self, internal: &[NewInternal], external: &[ExternalSnapshot]) -> Result<()>;

    /// Gets ready for [`DiskSnapshots::create_snapshots`] of these disks on this backend, so
    /// that the call itself does less (it may run while the guest is paused): the live backend
    /// looks up QEMU's block nodes now, for its next `create_snapshots` only. Best effort: a
    /// failure here changes nothing, and `create_snapshots` works without it. Does nothing by
    /// default.
    async fn prepare_snapshots(&self, internal: &[NewInternal], external: &[ExternalSnapshot]) -> Result<()> {
        let _ = (internal, external);
        Ok(())
    }

    /// Reverts a disk to an external snapshot: a fresh overlay on top of the snapshot's image
    /// (`revert.disk`), which is never written to (later snapshots may depend on it).
    async fn revert_external(&self, revert: &ExternalSnapshot) -> Result<()>;

    /// Removes `image` from the backing chain of the disk whose active image is `disk`, merging
    /// its data so the chain shows the same contents. Returns the disk's active image
    /// afterwards (it changes when the active image is committed into its parent). The removed
    /// image's file is left in place for the caller to delete.
    ///
    /// [`MergeMethod::StreamIntoChild`] needs `image` to have a child in the chain (it cannot
    /// be `disk`) and returns `disk`; [`MergeMethod::CommitIntoParent`] needs a parent and
    /// returns the parent if `image` is `disk`, else `disk`. Both backends report an image not in
    /// the chain, or without the child or parent the method needs, as [`crate::Error::Chain`];
    /// the offline backend also refuses what it cannot merge safely (see
    /// [`crate::offline::delete_external`]).
    async fn delete_external(&self, disk: &Path, image: &Path, method: MergeMethod) -> Result<PathBuf>;

    /// The backing chain of a disk, from its active image down to the base.
    async fn backing_chain(&self, disk: &Path) -> Result<Vec<ChainImage>>;

    /// The backing file named in `image`'s header (absolute, resolved against the image's
    /// folder), without opening the chain: `None` for a raw image or a qcow2 image without
    /// one. Reading a header is safe while QEMU runs, so both backends read it natively.
    async fn backing_file(&self, image: &Path) -> Result<Option<PathBuf>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orchestrator's view: a mock stands in for either backend.
    #[tokio::test]
    async fn the_trait_can_be_mocked() {
        let mut mock = MockDiskSnapshots::new();
        mock.expect_create_internal()
            .withf(|disks, name| disks.len() == 2 && name == "s1")
            .times(1)
            .returning(|_, _| Ok(()));
        mock.expect_delete_external()
            .returning(|disk, _, _| Ok(disk.to_owned()));
        let backend: Box<dyn DiskSnapshots> = Box::new(mock);
        backend
            .create_internal(&[PathBuf::from("/a"), PathBuf::from("/b")], "s1")
            .await
            .unwrap();
        let active = backend
            .delete_external(Path::new("/a"), Path::new("/base"), MergeMethod::StreamIntoChild)
            .await;
        assert_eq!(active.unwrap(), PathBuf::from("/a"));
    }

    #[tokio::test]
    async fn backing_file_can_be_mocked() {
        let mut mock = MockDiskSnapshots::new();
        mock.expect_backing_file()
            .returning(|image| Ok((image == Path::new("/o1")).then(|| PathBuf::from("/base"))));
        let backend: Box<dyn DiskSnapshots> = Box::new(mock);
        assert_eq!(
            backend.backing_file(Path::new("/o1")).await.unwrap(),
            Some(PathBuf::from("/base"))
        );
        assert_eq!(backend.backing_file(Path::new("/base")).await.unwrap(), None);
    }
}
