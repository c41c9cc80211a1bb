//! The native backend on a full filesystem: deleting an internal snapshot frees space and needs
//! none, so it must work when the filesystem has no free block left; creating one fails cleanly.
//! Uses a small tmpfs (mounting needs root, which CI and the test machines have).

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed run")]

mod common;

use std::{
    fs::{self, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use common::{check_clean, create, s, tool};
use disk::{DiskSnapshots, OfflineBackend};

/// A tmpfs mounted for the test, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &s(dir.path()),
            ])
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (needs root)");
        SmallFs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&filler)
            .unwrap();
        let block = vec![0xa5u8; 64 << 10];
        while file.write_all(&block).is_ok() {}
        // Finish with the last partial block.
        while file.write_all(&block[..512]).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn internal_snapshots_delete_on_a_full_filesystem_and_create_fails_cleanly() {
    let fs = SmallFs::mount("24m");
    let image = create(fs.path(), "vda.qcow2", "8M", "");
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4M", &s(&image)],
    );
    let disks = [image.clone()];
    OfflineBackend.create_internal(&disks, "s1").await.unwrap();
    // The snapshot shares the data: rewriting it copies clusters.
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 4M", &s(&image)],
    );
    let filler = fs.fill();

    // No space for a new snapshot's table: a clear error, and the image stays consistent.
    let error = OfflineBackend.create_internal(&disks, "s2").await.unwrap_err();
    assert!(!error.to_string().is_empty());
    let names: Vec<String> = OfflineBackend
        .list_internal(&image)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1"], "{error}");
    // Like QEMU interrupted mid-create, the refcounts it raised first stay raised: leaked
    // clusters (safe: never overwritten; `qemu-img check -r leaks` reclaims them), no errors.
    let leaked = leaks_without_errors(&image);

    // Delete needs no new space: it works on the full filesystem and frees s1's clusters.
    OfflineBackend.delete_internal(&disks, "s1").await.unwrap();
    assert!(OfflineBackend.list_internal(&image).await.unwrap().is_empty());
    fs::remove_file(filler).unwrap();
    assert_eq!(
        leaks_without_errors(&image),
        leaked,
        "the delete leaks nothing more"
    );
    tool("qemu-img", &["check", "-q", "-r", "leaks", &s(&image)]);
    check_clean(&image);
    tool("qemu-io", &["-f", "qcow2", "-c", "read -P 0x22 0 4M", &s(&image)]);
}

/// `qemu-img check`'s leaked clusters, asserting it found no errors.
fn leaks_without_errors(image: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "--output=json", &s(image)])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["check-errors"], 0, "{report}");
    report["leaks"].as_u64().unwrap_or(0)
}
