//! Block-layer commands: node queries, node creation, snapshots, transactions, commit/stream.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::command;
use crate::types::Empty;

/// `query-named-block-nodes`: every named block node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Leave out the nested backing-image chain of each node (QEMU ≥ 5.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}
command!(QueryNamedBlockNodes => "query-named-block-nodes", Vec<BlockDeviceInfo>);

/// `query-block`: the block backends (devices) and what is inserted in them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryBlock;
command!(QueryBlock => "query-block", Vec<BlockInfo>);

/// A block node as QEMU describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockDeviceInfo {
    /// The image file name.
    pub file: String,
    /// The node name.
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// Read-only.
    pub ro: bool,
    /// The driver, e.g. `qcow2`.
    pub drv: String,
    /// The backing file name, if any.
    #[serde(default)]
    pub backing_file: Option<String>,
    /// Length of the backing chain.
    #[serde(default)]
    pub backing_file_depth: u32,
    /// The image's details.
    pub image: ImageInfo,
    /// How the node caches (absent from QEMUs that do not say).
    #[serde(default)]
    pub cache: Option<BlockdevCacheInfo>,
}

/// A node's cache mode (`BlockdevCacheInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCacheInfo {
    /// The guest sees a volatile write cache (it must flush for its writes to last).
    pub writeback: bool,
    /// `O_DIRECT`: the host's page cache is bypassed.
    pub direct: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
}

/// An image's details (`ImageInfo`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// File name.
    pub filename: String,
    /// Format, e.g. `qcow2`.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes used on the host.
    #[serde(default)]
    pub actual_size: Option<u64>,
    /// Cluster size, for formats that have one.
    #[serde(default)]
    pub cluster_size: Option<u64>,
    /// Whether the image is marked dirty.
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    /// Backing file as recorded in the image.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// Backing file resolved to a full path.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// Backing file format as recorded in the image.
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    #[serde(default)]
    pub snapshots: Vec<SnapshotInfo>,
    /// The backing image, when the chain was not flattened.
    #[serde(default)]
    pub backing_image: Option<Box<ImageInfo>>,
}

/// An internal snapshot (`SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Unique id.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the VM state stored with it.
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: i64,
    /// Creation time, nanoseconds.
    pub date_nsec: i64,
    /// Guest clock, seconds.
    pub vm_clock_sec: i64,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: i64,
}

/// A block backend (`BlockInfo`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BlockInfo {
    /// The backend's name (empty for anonymous backends of `-blockdev` + `-device`).
    pub device: String,
    /// The device's qdev id or QOM path.
    #[serde(default)]
    pub qdev: Option<String>,
    /// Whether media can be removed.
    pub removable: bool,
    /// Whether the tray is locked.
    pub locked: bool,
    /// The inserted medium's root node.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// `blockdev-add`: open a block node. Common options are fields; driver-specific options go
/// in `options` (see [`BlockdevAdd::file`] and [`BlockdevAdd::qcow2`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAdd {
    /// The driver, e.g. `file` or `qcow2`.
    pub driver: String,
    /// The new node's name.
    pub node_name: String,
    /// Open read-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Driver-specific options, merged into the argument object.
    #[serde(flatten)]
    pub options: Map<String, Value>,
}
command!(BlockdevAdd => "blockdev-add", Empty);

impl BlockdevAdd {
    /// A protocol node on a host file.
    pub fn file(node_name: impl Into<String>, filename: impl Into<String>) -> Self {
        Self::new("file", node_name).with("filename", filename.into())
    }

    /// A qcow2 format node on top of the protocol node `file_node`.
    pub fn qcow2(node_name: impl Into<String>, file_node: impl Into<String>) -> Self {
        Self::new("qcow2", node_name).with("file", file_node.into())
    }

    /// A node of any driver; add its options with [`BlockdevAdd::with`].
    pub fn new(driver: impl Into<String>, node_name: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            node_name: node_name.into(),
            read_only: None,
            options: Map::new(),
        }
    }

    /// Adds a driver-specific option, e.g. `.with("backing", Value::Null)`.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.options.insert(key.to_owned(), value.into());
        self
    }
}

/// `blockdev-del`: close a node that nothing uses any more.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node.
    pub node_name: String,
}
command!(BlockdevDel => "blockdev-del", Empty);

/// `blockdev-create`: create an image; a job (run it with [`crate::Client::run_job`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCreate {
    /// The job's id.
    pub job_id: String,
    /// What to create.
    pub options: BlockdevCreateOptions,
}
command!(BlockdevCreate => "blockdev-create", Empty);

/// What `blockdev-create` creates.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum BlockdevCreateOptions {
    /// A host file.
    File {
        /// Path.
        filename: String,
        /// Size in bytes.
        size: u64,
    },
    /// A qcow2 image on an already opened protocol node.
    Qcow2(CreateQcow2),
}

/// Options of a qcow2 image for `blockdev-create`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateQcow2 {
    /// The protocol node to format.
    pub file: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Backing file to record in the image header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Backing file format to record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_fmt: Option<String>,
    /// Cluster size in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
}

/// `blockdev-snapshot`: make an already added overlay node the new top of `node`'s chain.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshot {
    /// The node that becomes the overlay's backing.
    pub node: String,
    /// The overlay node (added with no backing).
    pub overlay: String,
}
command!(BlockdevSnapshot => "blockdev-snapshot", Empty);

/// `blockdev-snapshot-sync`: create an external overlay file and switch to it.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSnapshotSync {
    /// The device (backend name); give this or `node_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The node to snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The overlay's path.
    pub snapshot_file: String,
    /// The overlay node's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_node_name: Option<String>,
    /// The overlay's format (QEMU's default is qcow2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// `absolute-paths` (create the file) or `existing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}
command!(BlockdevSnapshotSync => "blockdev-snapshot-sync", Empty);

/// `blockdev-snapshot-internal-sync`: take a named internal snapshot of one image.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevSnapshotInternalSync {
    /// The device or (root) node name.
    pub device: String,
    /// The snapshot's name.
    pub name: String,
}
command!(BlockdevSnapshotInternalSync => "blockdev-snapshot-internal-sync", Empty);

/// `blockdev-snapshot-delete-internal-sync`: delete an internal snapshot by id and/or name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlockdevSnapshotDeleteInternalSync {
    /// The device or (root) node name.
    pub device: String,
    /// The snapshot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The snapshot name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
command!(BlockdevSnapshotDeleteInternalSync => "blockdev-snapshot-delete-internal-sync", SnapshotInfo);

/// `transaction`: several actions that succeed or fail together.
#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    /// The actions.
    pub actions: Vec<TransactionAction>,
    /// How jobs started by the actions complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TransactionProperties>,
}
command!(Transaction => "transaction", Empty);

/// One action of a [`Transaction`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum TransactionAction {
    /// Fail the transaction on purpose (useful in tests of rollback).
    Abort {},
    /// See [`BlockdevSnapshot`].
    BlockdevSnapshot(BlockdevSnapshot),
    /// See [`BlockdevSnapshotSync`].
    BlockdevSnapshotSync(BlockdevSnapshotSync),
    /// See [`BlockdevSnapshotInternalSync`].
    BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync),
}

/// Properties of a [`Transaction`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransactionProperties {
    /// `individual` or `grouped`.
    pub completion_mode: String,
}

/// Options shared by [`BlockCommit`] and [`BlockStream`]: jobs are left for the caller to
/// dismiss by default so that their errors can be read ([`crate::Client::run_job`] does that).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobOptions {
    /// Speed limit, bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// `report`, `ignore`, `enospc` or `stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    /// Finalize automatically.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    /// Dismiss automatically (`false` keeps the concluded job, and its error, queryable).
    pub auto_dismiss: bool,
}

/// `block-commit`: merge `top` (default: the active layer) down into `base` (default: the
/// bottom of the chain). Committing the active layer needs `job-complete` once ready.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockCommit {
    /// The job's id.
    pub job_id: String,
    /// The device or root node.
    pub device: String,
    /// The node to commit into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// The top node to commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    /// Backing file string to record in the node above `top`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Job options.
    #[serde(flatten)]
    pub job: BlockJobOptions,
}
command!(BlockCommit => "block-commit", Empty);

/// `block-stream`: copy data from the backing chain (down to `base`) into `device`'s image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    /// The job's id.
    pub job_id: String,
    /// The node to stream into.
    pub device: String,
    /// Stop at this node (it stays the new backing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    /// Backing file string to record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    /// Job options.
    #[serde(flatten)]
    pub job: BlockJobOptions,
}
command!(BlockStream => "block-stream", Empty);

/// The host file of an image node, from the file name QEMU reports for it
/// ([`BlockDeviceInfo::file`], [`ImageInfo::filename`]).
///
/// A node opened from a plain file name reports that name. A node opened with explicit options
/// that cannot be written as one (for example an overlay added by `blockdev-add` with
/// `backing: null`) reports a `json:{...}` pseudo-filename instead, holding those options; the
/// host file is then the `filename` of its `file` child:
///
/// ```
/// use std::path::PathBuf;
/// use qmp::commands::node_image_file;
///
/// assert_eq!(node_image_file("/img/a.qcow2"), Some(PathBuf::from("/img/a.qcow2")));
/// let overlay = r#"json:{"backing": null, "driver": "qcow2",
///     "file": {"driver": "file", "filename": "/img/o.qcow2"}}"#;
/// assert_eq!(node_image_file(overlay), Some(PathBuf::from("/img/o.qcow2")));
/// ```
///
/// `None` when the pseudo-filename is not valid JSON or names no `file.filename`.
pub fn node_image_file(filename: &str) -> Option<PathBuf> {
    let Some(json) = filename.strip_prefix("json:") else {
        return Some(filename.into());
    };
    let options: Value = serde_json::from_str(json).ok()?;
    options.pointer("/file/filename")?.as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_match_the_qapi_schema() {
        let add = BlockdevAdd::qcow2("d0", "f0").with("backing", Value::Null);
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            json!({"driver": "qcow2", "node-name": "d0", "file": "f0", "backing": null})
        );
        let action = TransactionAction::BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync {
            device: "d0".into(),
            name: "s1".into(),
        });
        assert_eq!(
            serde_json::to_value(&action).unwrap(),
            json!({"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": "s1"}})
        );
        let create = BlockdevCreate {
            job_id: "c".into(),
            options: BlockdevCreateOptions::Qcow2(CreateQcow2 {
                file: "f1".into(),
                size: 1 << 20,
                backing_file: Some("base.qcow2".into()),
                backing_fmt: Some("qcow2".into()),
                cluster_size: None,
            }),
        };
        assert_eq!(
            serde_json::to_value(&create).unwrap(),
            json!({"job-id": "c", "options": {"driver": "qcow2", "file": "f1", "size": 1048576,
                   "backing-file": "base.qcow2", "backing-fmt": "qcow2"}})
        );
        let commit = BlockCommit {
            job_id: "j".into(),
            device: "d0".into(),
            base_node: None,
            top_node: None,
            backing_file: None,
            job: BlockJobOptions::default(),
        };
        assert_eq!(
            serde_json::to_value(&commit).unwrap(),
            json!({"job-id": "j", "device": "d0", "auto-dismiss": false})
        );
    }

    #[test]
    fn node_image_files_plain_and_json() {
        assert_eq!(node_image_file("/a/b.qcow2"), Some(PathBuf::from("/a/b.qcow2")));
        let json = r#"json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", "filename": "/t/o0.qcow2"}}"#;
        assert_eq!(node_image_file(json), Some(PathBuf::from("/t/o0.qcow2")));
        let json = r#"json:{"backing": {"driver": "qcow2"}, "driver": "qcow2", "file": {"driver": "file", "filename": "/t/o1.qcow2"}}"#;
        assert_eq!(node_image_file(json), Some(PathBuf::from("/t/o1.qcow2")));
        assert_eq!(node_image_file("json:{not json"), None);
        assert_eq!(node_image_file(r#"json:{"driver": "qcow2"}"#), None);
        assert_eq!(node_image_file(r#"json:{"file": {"filename": 3}}"#), None);
    }
}
