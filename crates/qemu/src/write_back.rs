//! Writes the guest's disk writes that wait in the host's page cache back to storage while the
//! guest still runs, right before a pause.
//!
//! QEMU's `stop` (its own stop at a migration's switch-over, and `quit`, too) stops the vCPUs and
//! then flushes every disk it wrote to since its last flush, `fdatasync` included. With the
//! default cache mode, what the guest wrote since the kernel last wrote back sits in the host's
//! page cache (up to `vm.dirty_expire_centisecs`, 30 s by default, or `vm.dirty_background_ratio`
//! of the host's memory), so that flush, and with it the guest's pause, grows with the guest's
//! recent writes: by hand, 1 GiB written through QEMU just before a background create made its
//! 40 ms pause 330 ms. An `fdatasync` of the same files from here while the guest runs leaves
//! QEMU's flush only what the guest writes in between.
//!
//! Best effort: a file that cannot be synced here is left to QEMU's flush, which reports its own
//! errors; the pause never depends on this.

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use qmp::{
    commands::{BlockDeviceInfo, QueryNamedBlockNodes},
    Client,
};

/// How often a pre-copy writes back while QEMU copies RAM: the guest's writes of this long at
/// most are left for the flush inside QEMU's stop.
pub(crate) const PRECOPY_INTERVAL: Duration = Duration::from_millis(100);

/// Writes back, from the host's page cache, what QEMU wrote to the disk images of the domain
/// behind `client` (see the module documentation).
pub(crate) async fn write_back_disks(client: &Client) {
    sync_files(written_files(client).await).await;
}

/// [`write_back_disks`] again and again, every [`PRECOPY_INTERVAL`], until dropped. The disks are
/// listed once: the domain's lock keeps its block graph as it is meanwhile.
pub(crate) async fn keep_writing_back(client: &Client) {
    let files = written_files(client).await;
    loop {
        sync_files(files.clone()).await;
        tokio::time::sleep(PRECOPY_INTERVAL).await;
    }
}

/// [`page_cached_files`] of the domain behind `client`; none if QEMU cannot list its nodes.
async fn written_files(client: &Client) -> Vec<PathBuf> {
    match client.execute(&QueryNamedBlockNodes { flat: Some(true) }).await {
        Ok(nodes) => page_cached_files(&nodes),
        Err(error) => {
            tracing::debug!(%error, "cannot list the disks to write back before the pause");
            Vec::new()
        }
    }
}

/// [`sync`]s `files` on a blocking thread, logging what fails.
async fn sync_files(files: Vec<PathBuf>) {
    if files.is_empty() {
        return;
    }
    let started = Instant::now();
    let synced =
        tokio::task::spawn_blocking(move || files.iter().map(|file| sync(file)).collect::<Vec<_>>()).await;
    match synced {
        Ok(results) => {
            for (file, error) in results.into_iter().filter_map(Result::err) {
                tracing::debug!(file = %file.display(), %error, "cannot write back before the pause");
            }
            tracing::debug!(elapsed = ?started.elapsed(), "disks written back before the pause");
        }
        Err(error) => tracing::debug!(%error, "the write-back before the pause did not finish"),
    }
}

/// The host files QEMU writes through the page cache and flushes: the protocol nodes that are
/// writable, not `O_DIRECT` and not told to ignore flushes (a node that ignores them is never
/// flushed inside a pause either). Each file once.
fn page_cached_files(nodes: &[BlockDeviceInfo]) -> Vec<PathBuf> {
    let files: BTreeSet<PathBuf> = nodes
        .iter()
        .filter(|node| matches!(node.drv.as_str(), "file" | "host_device"))
        .filter(|node| !node.ro)
        .filter(|node| node.cache.is_none_or(|cache| !cache.direct && !cache.no_flush))
        .map(|node| PathBuf::from(&node.file))
        .collect();
    files.into_iter().collect()
}

/// `fdatasync` of `file` through a read-only descriptor of its own (Linux syncs the file's
/// pages whoever wrote them).
fn sync(file: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    File::open(file)
        .and_then(|opened| opened.sync_data())
        .map_err(|error| (file.to_path_buf(), error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(drv: &str, file: &str, ro: bool, cache: Option<(bool, bool)>) -> serde_json::Value {
        let mut node = serde_json::json!({
            "file": file, "ro": ro, "drv": drv, "node-name": format!("n-{file}"),
            "image": {"filename": file, "format": drv, "virtual-size": 1_u64 << 30},
        });
        if let Some((direct, no_flush)) = cache {
            node["cache"] = serde_json::json!({"writeback": true, "direct": direct, "no-flush": no_flush});
        }
        node
    }

    fn files_of(nodes: Vec<serde_json::Value>) -> Vec<PathBuf> {
        let nodes: Vec<BlockDeviceInfo> = serde_json::from_value(serde_json::Value::Array(nodes)).unwrap();
        page_cached_files(&nodes)
    }

    #[test]
    fn only_writable_page_cached_protocol_nodes_are_written_back() {
        let files = files_of(vec![
            node("qcow2", "/img/a.qcow2", false, Some((false, false))),
            node("file", "/img/a.qcow2", false, Some((false, false))),
            node("file", "/img/base.qcow2", true, Some((false, false))),
            node("file", "/img/direct.raw", false, Some((true, false))),
            node("file", "/img/unsafe.raw", false, Some((false, true))),
            node("host_device", "/dev/vg/lv", false, Some((false, false))),
            node("file", "/img/old-qemu.raw", false, None),
        ]);
        assert_eq!(
            files,
            ["/dev/vg/lv", "/img/a.qcow2", "/img/old-qemu.raw"].map(PathBuf::from)
        );
    }

    #[test]
    fn a_file_named_by_two_nodes_is_synced_once() {
        let files = files_of(vec![
            node("file", "/img/a.qcow2", false, Some((false, false))),
            node("file", "/img/a.qcow2", false, Some((false, false))),
        ]);
        assert_eq!(files, [PathBuf::from("/img/a.qcow2")]);
    }

    #[test]
    fn a_file_that_cannot_be_opened_names_itself() {
        let (file, error) = sync(Path::new("/nonexistent/domsnap/disk.qcow2")).unwrap_err();
        assert_eq!(file, PathBuf::from("/nonexistent/domsnap/disk.qcow2"));
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_written_here_is_synced_through_a_read_only_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
        sync(&path).unwrap();
    }
}
