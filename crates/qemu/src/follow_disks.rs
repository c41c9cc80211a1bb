//! Following a running domain's disks: QEMU's active image of each disk (after a live external
//! snapshot or a merge it is another image than the defined one), recorded in the definition
//! only when it is in the chain domsnap expects.

use std::path::{Path, PathBuf};

use qmp::{
    commands::{BlockInfo, QueryBlock},
    Client,
};
use snapshot_core::Name;

use crate::{
    config::{DiskFormat, DomainConfig, NVRAM_DISK_ID},
    driver::{qmp_error, DomainFiles, QemuDriver},
    error::{Error, Result},
};

impl QemuDriver {
    /// Reads the active image of every disk from QEMU and records any change in the definition;
    /// returns the (updated) definition.
    pub(crate) async fn sync_disks(
        &self,
        name: &Name,
        files: &DomainFiles,
        client: &Client,
    ) -> Result<DomainConfig> {
        self.sync_disks_expecting(name, files, client, &[]).await
    }

    /// [`QemuDriver::sync_disks`], also accepting the images in `expected` as active images.
    ///
    /// An image QEMU reports is recorded only when it is in the chain domsnap expects: the
    /// defined image, an image whose backing chain (as QEMU has it open) contains the defined
    /// image (an overlay of a live external snapshot), or one the caller expects. Anything else
    /// (an image swapped in by another QMP client, or a path a compromised QEMU made up) is an
    /// error and the definition is left as it was.
    pub(crate) async fn sync_disks_expecting(
        &self,
        name: &Name,
        files: &DomainFiles,
        client: &Client,
        expected: &[PathBuf],
    ) -> Result<DomainConfig> {
        let mut config = self.load_definition(name, files)?;
        let blocks = client
            .execute(&QueryBlock)
            .await
            .map_err(qmp_error(name, "querying the disks"))?;
        let mut changed = false;
        for disk in config.disk_targets() {
            match active_image(&blocks, &disk.target) {
                Some(active) if active.image != disk.image => {
                    if !chain_expected(&disk.image, &active.image, &active.chain, expected) {
                        return Err(Error::UnexpectedImage {
                            domain: name.clone(),
                            disk: disk.target,
                            image: active.image,
                            defined: disk.image,
                        });
                    }
                    let shown = active.image.display();
                    tracing::info!(domain = %name, disk = disk.target, image = %shown, "active image changed");
                    let format = match active.format.as_str() {
                        "raw" => DiskFormat::Raw,
                        _ => DiskFormat::Qcow2,
                    };
                    config.set_disk_image(&disk.target, active.image, format);
                    changed = true;
                }
                Some(_) => {}
                None => tracing::warn!(domain = %name, disk = disk.target, "QEMU has no such disk"),
            }
        }
        if changed {
            self.write_definition(files, &config)?;
        }
        Ok(config)
    }
}

/// A disk's active image as QEMU has it open.
#[derive(Debug, PartialEq, Eq)]
struct ActiveImage {
    /// The image of the root node.
    image: PathBuf,
    /// Its format driver (`qcow2`, `raw`).
    format: String,
    /// The images of its backing chain, nearest first.
    chain: Vec<PathBuf>,
}

/// The active image of the disk whose device id is `id`: the image of the root node inserted in
/// the device (`-device virtio-blk-pci,id=ID` has the QOM path `/machine/peripheral/ID/...`; a
/// UEFI domain's NVRAM is the second flash, `/machine/system.flash1`), and the images of its
/// backing chain as QEMU has them open, nearest first.
fn active_image(blocks: &[BlockInfo], id: &str) -> Option<ActiveImage> {
    let prefix = format!("/machine/peripheral/{id}/");
    let flash = (id == NVRAM_DISK_ID).then_some("/machine/system.flash1");
    let block = blocks.iter().find(|block| {
        block
            .qdev
            .as_deref()
            .is_some_and(|qdev| qdev.starts_with(&prefix) || qdev == id || Some(qdev) == flash)
    })?;
    let inserted = block.inserted.as_ref()?;
    let image = qmp::commands::node_image_file(&inserted.file)?;
    let mut chain = Vec::new();
    let mut next = inserted.image.backing_image.as_deref();
    while let Some(info) = next {
        chain.extend(qmp::commands::node_image_file(&info.filename));
        next = info.backing_image.as_deref();
    }
    Some(ActiveImage {
        image,
        format: inserted.drv.clone(),
        chain,
    })
}

/// Whether QEMU's active image `image` (backed by `chain`) is one domsnap expects for a disk
/// defined on `defined`: `defined` is in its backing chain, or the caller expects `image`.
fn chain_expected(defined: &Path, image: &Path, chain: &[PathBuf], expected: &[PathBuf]) -> bool {
    let same = |a: &Path, b: &Path| {
        a == b
            || matches!(
                (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                (Ok(a), Ok(b)) if a == b
            )
    };
    chain.iter().any(|backing| same(backing, defined)) || expected.iter().any(|wanted| same(wanted, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(qdev: &str, file: &str) -> BlockInfo {
        serde_json::from_value(serde_json::json!({
            "device": "",
            "qdev": qdev,
            "removable": false,
            "locked": false,
            "inserted": {
                "file": file, "ro": false, "drv": "qcow2", "backing_file_depth": 0,
                "image": {"filename": file, "format": "qcow2", "virtual-size": 1}
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_active_image_is_the_root_node_of_the_disk_device() {
        let blocks = [
            block("/machine/peripheral/vda/virtio-backend", "/img/a.qcow2"),
            block(
                "/machine/peripheral/vdb/virtio-backend",
                concat!(
                    r#"json:{"backing": null, "driver": "qcow2", "#,
                    r#""file": {"driver": "file", "filename": "/img/b-overlay.qcow2"}}"#
                ),
            ),
        ];
        let image = |id| active_image(&blocks, id).map(|active| active.image);
        assert_eq!(image("vda"), Some("/img/a.qcow2".into()));
        assert_eq!(image("vdb"), Some("/img/b-overlay.qcow2".into()));
        assert_eq!(image("vd"), None);
        assert_eq!(image(NVRAM_DISK_ID), None);
        let flash = [block("/machine/system.flash1", "/state/nvram.qcow2")];
        let nvram = active_image(&flash, NVRAM_DISK_ID).unwrap();
        assert_eq!(
            (nvram.image.to_str(), nvram.format.as_str()),
            (Some("/state/nvram.qcow2"), "qcow2")
        );
    }

    #[test]
    fn only_images_in_the_expected_chain_are_accepted() {
        let mut overlay = block("/machine/peripheral/vda/virtio-backend", "/img/a.s1.qcow2");
        let backing = |filename: &str, below: Option<serde_json::Value>| {
            let mut info = serde_json::json!({"filename": filename, "format": "qcow2", "virtual-size": 1});
            if let Some(below) = below {
                info["backing-image"] = below;
            }
            info
        };
        let chain = backing("/img/a.qcow2", Some(backing("/img/base.qcow2", None)));
        overlay.inserted.as_mut().unwrap().image.backing_image =
            Some(Box::new(serde_json::from_value(chain).unwrap()));
        let ActiveImage { image, chain, .. } = active_image(&[overlay], "vda").unwrap();
        assert_eq!(image, Path::new("/img/a.s1.qcow2"));
        assert_eq!(chain, [Path::new("/img/a.qcow2"), Path::new("/img/base.qcow2")]);
        let defined = Path::new("/img/a.qcow2");
        // An overlay on the defined image (or deeper in its chain) is accepted.
        assert!(chain_expected(defined, &image, &chain, &[]));
        assert!(chain_expected(Path::new("/img/base.qcow2"), &image, &chain, &[]));
        // An image not backed by the defined one only when the caller expects it.
        let elsewhere = Path::new("/etc/shadow");
        assert!(!chain_expected(defined, elsewhere, &[], &[]));
        assert!(!chain_expected(
            defined,
            elsewhere,
            &[PathBuf::from("/img/other.qcow2")],
            &[]
        ));
        assert!(chain_expected(defined, elsewhere, &[], &[elsewhere.to_owned()]));
    }
}
