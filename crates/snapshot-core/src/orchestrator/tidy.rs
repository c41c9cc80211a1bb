//! Tidy-up after a delete or a revert: the overlays domsnap made that no snapshot needs any more
//! are folded away and removed. Every image is read through the disk backend; this crate never
//! opens a disk image itself.

use std::{collections::HashSet, path::PathBuf};

use disk::{DiskSnapshots, MergeMethod};

use super::{disk_plan::snapshot_images, remove_file, Orchestrator};
use crate::{
    error::DriverError,
    hypervisor::{DiskTarget, ImageFormat},
    name::Name,
};

/// What the tidy-up works from: the images snapshots read, and the overlays domsnap made.
struct Images {
    snapshots: HashSet<PathBuf>,
    owned: Vec<PathBuf>,
}

impl Orchestrator {
    /// Folds away and removes the overlays domsnap made that no snapshot needs any more, after
    /// a delete or a revert. Two passes:
    /// - fold: while a disk's active image is a domsnap overlay no snapshot reads, and its
    ///   parent is neither a snapshot's image nor read by another image, the overlay is
    ///   committed into its parent (which becomes active) and removed;
    /// - sweep: domsnap overlays outside every backing chain of the active images and the
    ///   snapshots' images (a revert's replaced overlay, for one) are removed.
    ///
    /// Returns the images removed.
    pub(super) async fn tidy_disks(&self, domain: &Name) -> Result<Vec<PathBuf>, DriverError> {
        let owned = self.store.overlays(domain)?;
        if owned.is_empty() {
            // Only domsnap's overlays are ever folded or removed: nothing to read the chains for.
            return Ok(Vec::new());
        }
        let mut images = Images {
            snapshots: self
                .store
                .list(domain)?
                .iter()
                .flat_map(|r| snapshot_images(r).cloned().collect::<Vec<_>>())
                .collect(),
            owned,
        };
        let backend = self.hypervisor.disk_backend(domain).await?;
        let mut active = self.hypervisor.disks(domain).await?;
        let before = active.clone();
        let mut removed = Vec::new();
        for index in 0..active.len() {
            while let Some(folded) = self
                .fold_active(domain, &*backend, &mut images, &mut active, index)
                .await?
            {
                removed.push(folded);
            }
        }
        if active != before {
            self.define_disks(domain, &active).await?;
        }
        removed.extend(self.sweep(domain, &*backend, images, &active).await?);
        Ok(removed)
    }

    /// Commits disk `index`'s active image into its parent and removes it, if it is a domsnap
    /// overlay nothing else needs. Returns the image removed.
    async fn fold_active(
        &self,
        domain: &Name,
        backend: &dyn DiskSnapshots,
        images: &mut Images,
        active: &mut [DiskTarget],
        index: usize,
    ) -> Result<Option<PathBuf>, DriverError> {
        let image = active[index].image.clone();
        if !images.owned.contains(&image) || images.snapshots.contains(&image) {
            return Ok(None);
        }
        let Some(parent) = backend.backing_file(&image).await? else {
            return Ok(None);
        };
        if images.snapshots.contains(&parent) {
            return Ok(None);
        }
        let readers: Vec<PathBuf> = images
            .owned
            .iter()
            .chain(&images.snapshots)
            .chain(active.iter().map(|t| &t.image))
            .filter(|other| **other != image && other.exists())
            .cloned()
            .collect();
        for other in &readers {
            if backend.backing_file(other).await?.as_ref() == Some(&parent) {
                return Ok(None);
            }
        }
        // The parent's format as the overlay records it (a raw disk's base is raw).
        let parent_format = match backend
            .backing_chain(&image)
            .await?
            .get(1)
            .map(|i| i.format.as_str())
        {
            Some("raw") => ImageFormat::Raw,
            _ => ImageFormat::Qcow2,
        };
        active[index].image = backend
            .delete_external(&image, &image, MergeMethod::CommitIntoParent)
            .await?;
        active[index].format = parent_format;
        remove_file(&image)?;
        images.owned.retain(|o| o != &image);
        self.store.set_overlays(domain, &images.owned)?;
        Ok(Some(image))
    }

    /// Removes the domsnap overlays outside every backing chain of the active images and the
    /// snapshots' images. Returns the images removed.
    async fn sweep(
        &self,
        domain: &Name,
        backend: &dyn DiskSnapshots,
        images: Images,
        active: &[DiskTarget],
    ) -> Result<Vec<PathBuf>, DriverError> {
        let mut needed = HashSet::new();
        let mut stack: Vec<PathBuf> = active
            .iter()
            .map(|t| t.image.clone())
            .chain(images.snapshots)
            .collect();
        while let Some(image) = stack.pop() {
            if image.exists() && needed.insert(image.clone()) {
                stack.extend(backend.backing_file(&image).await?);
            }
        }
        let (keep, unused): (Vec<PathBuf>, Vec<PathBuf>) =
            images.owned.into_iter().partition(|o| needed.contains(o));
        for image in &unused {
            remove_file(image)?;
        }
        self.store.set_overlays(domain, &keep)?;
        Ok(unused)
    }
}
