//! The live backend: disk snapshots of a running QEMU through QMP.
//!
//! Disks are found by their active image's path among QEMU's named block nodes. Snapshots of
//! several disks, internal and external together, run in one `transaction` (all or none). Overlays are written natively (0600,
//! backing file recorded), opened with `blockdev-add` and switched to with `blockdev-snapshot`
//! inside the transaction. Merges run `block-commit` / `block-stream` jobs to completion.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use async_trait::async_trait;
use qmp::{
    commands::{
        node_image_file, BlockCommit, BlockDeviceInfo, BlockJobOptions, BlockStream, BlockdevAdd,
        BlockdevDel, BlockdevSnapshot, BlockdevSnapshotDeleteInternalSync, BlockdevSnapshotInternalSync,
        QueryNamedBlockNodes, Transaction, TransactionAction,
    },
    Client, JobOptions,
};
use serde_json::Value;

use crate::{
    api::{ChainImage, DiskSnapshots, ExternalSnapshot, InternalSnapshot, MergeMethod, NewInternal},
    error::{Error, Result},
    names, offline, qcow2,
};

/// Longest backing chain followed.
const MAX_CHAIN: usize = 256;

/// [`DiskSnapshots`] for the disks of a running QEMU.
#[derive(Debug, Clone)]
pub struct LiveBackend {
    qmp: Client,
    jobs: JobOptions,
    /// QEMU's block nodes looked up by [`DiskSnapshots::prepare_snapshots`], for the next
    /// [`DiskSnapshots::create_snapshots`] (shared by clones).
    prepared_nodes: Arc<Mutex<Option<Vec<BlockDeviceInfo>>>>,
}

/// Unique suffixes for node and job names within this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// One image of a chain as QEMU has it open.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    path: PathBuf,
    info: BlockDeviceInfo,
}

impl LiveBackend {
    /// A backend on a connected QMP client; block jobs wait up to 10 minutes.
    pub fn new(qmp: Client) -> Self {
        Self {
            qmp,
            jobs: JobOptions::default(),
            prepared_nodes: Arc::default(),
        }
    }

    /// Uses `jobs` for block-commit and block-stream jobs (e.g. a longer timeout).
    pub fn with_job_options(mut self, jobs: JobOptions) -> Self {
        self.jobs = jobs;
        self
    }

    fn qmp_error<'a>(operation: &'static str, path: &'a Path) -> impl FnOnce(qmp::Error) -> Error + 'a {
        move |source| Error::Qmp {
            operation,
            path: path.to_owned(),
            source,
        }
    }

    async fn nodes(&self, path: &Path) -> Result<Vec<BlockDeviceInfo>> {
        self.qmp
            .execute(&QueryNamedBlockNodes { flat: Some(true) })
            .await
            .map_err(Self::qmp_error("query-named-block-nodes", path))
    }

    /// QEMU's block nodes for the disks of `internal` and `external` (`first` is one of them):
    /// those looked up by [`DiskSnapshots::prepare_snapshots`] (taken: they serve one call) if
    /// they have every disk, else fresh ones.
    async fn nodes_for(
        &self,
        first: &Path,
        internal: &[NewInternal],
        external: &[ExternalSnapshot],
    ) -> Result<Vec<BlockDeviceInfo>> {
        let prepared = self
            .prepared_nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut disks = internal
            .iter()
            .map(|i| &i.disk)
            .chain(external.iter().map(|e| &e.disk));
        match prepared {
            Some(nodes) if disks.all(|disk| Self::find(&nodes, disk).is_ok()) => Ok(nodes),
            _ => self.nodes(first).await,
        }
    }

    /// The format node that has `path` open.
    fn find(nodes: &[BlockDeviceInfo], path: &Path) -> Result<Node> {
        nodes
            .iter()
            .filter(|n| n.drv != "file")
            .find_map(|n| {
                let file = node_image_file(&n.file)?;
                let name = n.node_name.clone().filter(|_| names::same_file(&file, path))?;
                Some(Node {
                    name,
                    path: file,
                    info: n.clone(),
                })
            })
            .ok_or_else(|| Error::NodeNotFound {
                path: path.to_owned(),
            })
    }

    async fn node(&self, path: &Path) -> Result<Node> {
        Self::find(&self.nodes(path).await?, path)
    }

    /// The chain of `disk`, active image first, following each image's backing file.
    async fn chain(&self, disk: &Path) -> Result<Vec<Node>> {
        let nodes = self.nodes(disk).await?;
        let mut chain = vec![Self::find(&nodes, disk)?];
        loop {
            let image = &chain.last().expect("not empty").info.image;
            let Some(backing) = image
                .full_backing_filename
                .as_ref()
                .or(image.backing_filename.as_ref())
            else {
                return Ok(chain);
            };
            if chain.len() == MAX_CHAIN {
                return Err(Error::Chain {
                    disk: disk.to_owned(),
                    image: backing.into(),
                    reason: "backing chain too long".into(),
                });
            }
            chain.push(Self::find(&nodes, Path::new(backing))?);
        }
    }

    async fn transaction(&self, actions: Vec<TransactionAction>, path: &Path) -> Result<()> {
        self.qmp
            .execute(&Transaction {
                actions,
                properties: None,
            })
            .await
            .map(drop)
            .map_err(Self::qmp_error("transaction", path))
    }

    /// Removes overlay nodes (newest first) and files after a failed snapshot (best effort: the
    /// error that caused it is the one reported).
    async fn discard_overlays(&self, nodes: &[String], files: &[PathBuf]) {
        for node in nodes.iter().rev() {
            if let Err(e) = self
                .qmp
                .execute(&BlockdevDel {
                    node_name: node.clone(),
                })
                .await
            {
                tracing::warn!(node, %e, "cannot remove an overlay node after a failed snapshot");
            }
        }
        for file in files {
            let _ = std::fs::remove_file(file);
        }
    }

    /// Opens every overlay without a backing (it gets one from `blockdev-snapshot`), recording
    /// the nodes added in `added`; returns the transaction's actions.
    async fn add_overlays(
        &self,
        snapshots: &[ExternalSnapshot],
        nodes: &[BlockDeviceInfo],
        added: &mut Vec<String>,
    ) -> Result<Vec<TransactionAction>> {
        let mut actions = Vec::new();
        for snapshot in snapshots {
            let node = Self::find(nodes, &snapshot.disk)?;
            let file_node = unique("dsf");
            let format_node = unique("dsd");
            let overlay = snapshot.overlay.to_string_lossy().into_owned();
            let fail = || Self::qmp_error("blockdev-add", &snapshot.overlay);
            // As for the domain's own images: no flush and page-cache drop when QEMU reactivates
            // its disks after a migration that never leaves this host.
            let add_file = BlockdevAdd::file(&file_node, overlay).with("drop-cache", false);
            self.qmp.execute(&add_file).await.map_err(fail())?;
            added.push(file_node.clone());
            let add = BlockdevAdd::qcow2(&format_node, &file_node).with("backing", Value::Null);
            self.qmp.execute(&add).await.map_err(fail())?;
            added.push(format_node.clone());
            actions.push(TransactionAction::BlockdevSnapshot(BlockdevSnapshot {
                node: node.name,
                overlay: format_node,
            }));
        }
        Ok(actions)
    }

    /// Writes every overlay's file (backing file recorded, the disk's format and size); returns
    /// them. If one fails, those already written are removed.
    async fn write_overlays(
        &self,
        snapshots: &[ExternalSnapshot],
        nodes: &[BlockDeviceInfo],
    ) -> Result<Vec<PathBuf>> {
        let mut plans = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            let backing = offline::backing_name(snapshot)?;
            let node = Self::find(nodes, &snapshot.disk)?;
            plans.push((
                snapshot.overlay.clone(),
                backing,
                node.info.drv.clone(),
                node.info.image.virtual_size,
            ));
        }
        let mut files = Vec::new();
        for (overlay, backing, format, size) in plans {
            let created = tokio::task::spawn_blocking({
                let overlay = overlay.clone();
                move || qcow2::create_overlay(&overlay, &backing, &format, size)
            })
            .await
            .map_err(Error::Task)
            .and_then(|r| r);
            if let Err(e) = created {
                self.discard_overlays(&[], &files).await;
                return Err(e);
            }
            files.push(overlay);
        }
        Ok(files)
    }

    async fn run_job<C: qmp::commands::Command>(
        &self,
        command: &C,
        job_id: &str,
        complete: bool,
        path: &Path,
    ) -> Result<()> {
        let options = JobOptions {
            complete_when_ready: complete,
            ..self.jobs.clone()
        };
        self.qmp
            .run_job(command, job_id, &options)
            .await
            .map_err(Self::qmp_error("block job", path))
    }
}

impl LiveBackend {
    /// After an active commit QEMU keeps the old top's nodes if the monitor added them
    /// (`-blockdev`, `blockdev-add`), and the old top still holds the new active image as its
    /// backing child: the new active node is then no root node, and the next commit of it fails
    /// ("Need a root block node"). Deleting the old top's format and protocol nodes releases it.
    /// Nodes QEMU opened itself went away with the commit and are not found.
    async fn release_committed_top(&self, image: &Path) -> Result<()> {
        let nodes = self.nodes(image).await?;
        let stale: Vec<(String, bool)> = nodes
            .iter()
            .filter_map(|n| {
                let file = node_image_file(&n.file)?;
                let name = n.node_name.clone().filter(|_| names::same_file(&file, image))?;
                Some((name, n.drv == "file"))
            })
            .collect();
        // The format node first: it holds the protocol node.
        for (name, _) in stale
            .iter()
            .filter(|(_, protocol)| !protocol)
            .chain(stale.iter().filter(|(_, p)| *p))
        {
            if let Err(error) = self
                .qmp
                .execute(&BlockdevDel {
                    node_name: name.clone(),
                })
                .await
            {
                // A node QEMU owns itself is not the monitor's to delete; it goes with its parent.
                tracing::debug!(node = %name, %error, "old top node not deleted");
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DiskSnapshots for LiveBackend {
    /// An image QEMU has open is listed as QEMU sees it; one it has not (the image of another
    /// branch of the snapshot tree) is read natively, as the offline backend does (reading takes
    /// no lock and writes nothing).
    async fn list_internal(&self, disk: &Path) -> Result<Vec<InternalSnapshot>> {
        let node = match self.node(disk).await {
            Ok(node) => node,
            Err(Error::NodeNotFound { .. }) => {
                let disk = disk.to_owned();
                return offline::blocking(move || offline::list_internal(&disk)).await;
            }
            Err(e) => return Err(e),
        };
        Ok(node
            .info
            .image
            .snapshots
            .iter()
            .map(|s| InternalSnapshot {
                id: s.id.clone(),
                name: s.name.clone(),
                date_sec: u64::try_from(s.date_sec).unwrap_or(0),
                date_nsec: u32::try_from(s.date_nsec.clamp(0, 999_999_999)).unwrap_or(0),
                vm_clock_nsec: u64::try_from(s.vm_clock_sec).unwrap_or(0) * 1_000_000_000
                    + u64::try_from(s.vm_clock_nsec).unwrap_or(0),
                disk_size: None,
                vm_state_size: s.vm_state_size,
            })
            .collect())
    }

    async fn create_internal(&self, disks: &[PathBuf], name: &str) -> Result<()> {
        let internal: Vec<NewInternal> = disks
            .iter()
            .map(|disk| NewInternal {
                disk: disk.clone(),
                name: name.to_owned(),
            })
            .collect();
        self.create_snapshots(&internal, &[]).await
    }

    async fn delete_internal(&self, disks: &[PathBuf], name: &str) -> Result<()> {
        let Some(first) = disks.first() else { return Ok(()) };
        let nodes = self.nodes(first).await?;
        let found = disks
            .iter()
            .map(|disk| Self::find(&nodes, disk))
            .collect::<Result<Vec<_>>>()?;
        // QMP has no transaction action for deletes: check every disk first instead.
        if let Some(missing) = found
            .iter()
            .find(|n| !n.info.image.snapshots.iter().any(|s| s.name == name))
        {
            return Err(Error::SnapshotNotFound {
                path: missing.path.clone(),
                name: name.into(),
            });
        }
        for node in found {
            let delete = BlockdevSnapshotDeleteInternalSync {
                device: node.name.clone(),
                id: None,
                name: Some(name.into()),
            };
            self.qmp.execute(&delete).await.map_err(Self::qmp_error(
                "blockdev-snapshot-delete-internal-sync",
                &node.path,
            ))?;
        }
        Ok(())
    }

    async fn apply_internal(&self, _disks: &[PathBuf], _name: &str) -> Result<()> {
        Err(Error::NotSupported {
            operation: "applying an internal snapshot",
            backend: "live",
            reason: "QEMU reverts a running disk only together with the VM state (snapshot-load); stop the \
                     domain and use the offline backend"
                .into(),
        })
    }

    async fn create_external(&self, snapshots: &[ExternalSnapshot]) -> Result<()> {
        self.create_snapshots(&[], snapshots).await
    }

    /// One `transaction`: the internal snapshots' actions and the overlays' `blockdev-snapshot`s
    /// (the overlays are written and opened first, and removed again if it fails).
    async fn create_snapshots(&self, internal: &[NewInternal], external: &[ExternalSnapshot]) -> Result<()> {
        let Some(first) = internal
            .first()
            .map(|i| &i.disk)
            .or(external.first().map(|e| &e.disk))
        else {
            return Ok(());
        };
        let mut actions = Vec::with_capacity(internal.len() + external.len());
        let nodes = self.nodes_for(first, internal, external).await?;
        for snapshot in internal {
            names::validate_snapshot_name(&snapshot.name)?;
            actions.push(TransactionAction::BlockdevSnapshotInternalSync(
                BlockdevSnapshotInternalSync {
                    device: Self::find(&nodes, &snapshot.disk)?.name,
                    name: snapshot.name.clone(),
                },
            ));
        }
        let files = self.write_overlays(external, &nodes).await?;
        let mut added = Vec::new();
        let result = match self.add_overlays(external, &nodes, &mut added).await {
            Ok(more) => {
                actions.extend(more);
                self.transaction(actions, first).await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.discard_overlays(&added, &files).await;
        }
        result
    }

    async fn prepare_snapshots(&self, internal: &[NewInternal], external: &[ExternalSnapshot]) -> Result<()> {
        let first = internal
            .first()
            .map(|i| &i.disk)
            .or(external.first().map(|e| &e.disk));
        let nodes = match first {
            Some(first) => Some(self.nodes(first).await?),
            None => None,
        };
        *self.prepared_nodes.lock().unwrap_or_else(PoisonError::into_inner) = nodes;
        Ok(())
    }

    /// A fresh overlay on the snapshot's image, written natively ([`offline::revert_external`]):
    /// the running QEMU keeps its disks as they are (the overlay is for the QEMU a revert starts
    /// next), and may hold the snapshot's image as a read-only backing file, but not as an image
    /// it writes: that is refused, by QEMU's block nodes and by its locks.
    async fn revert_external(&self, revert: &ExternalSnapshot) -> Result<()> {
        let nodes = self.nodes(&revert.disk).await?;
        if let Ok(node) = Self::find(&nodes, &revert.disk) {
            if !node.info.ro {
                return Err(Error::NotSupported {
                    operation: "reverting to an external snapshot",
                    backend: "live",
                    reason: format!(
                        "the running QEMU writes {} (node {}); a snapshot's image is never written",
                        node.path.display(),
                        node.name
                    ),
                });
            }
        }
        let revert = revert.clone();
        offline::blocking(move || offline::revert_external(&revert)).await
    }

    async fn delete_external(&self, disk: &Path, image: &Path, method: MergeMethod) -> Result<PathBuf> {
        let chain = self.chain(disk).await?;
        let chain_error = |reason: &str| Error::Chain {
            disk: disk.to_owned(),
            image: image.to_owned(),
            reason: reason.into(),
        };
        let Some(at) = chain.iter().position(|n| names::same_file(&n.path, image)) else {
            return Err(chain_error("the image is not in the disk's backing chain"));
        };
        let root = &chain[0];
        let job_id = unique("dsjob");
        match method {
            MergeMethod::CommitIntoParent => {
                let Some(parent) = chain.get(at + 1) else {
                    return Err(chain_error("it has no backing image to commit into"));
                };
                let commit = BlockCommit {
                    job_id: job_id.clone(),
                    device: root.name.clone(),
                    base_node: Some(parent.name.clone()),
                    top_node: Some(chain[at].name.clone()),
                    backing_file: None,
                    job: BlockJobOptions::default(),
                };
                // Committing the active image needs job-complete, which pivots the disk to the parent.
                let active = at == 0;
                self.run_job(&commit, &job_id, active, image).await?;
                if active {
                    self.release_committed_top(image).await?;
                }
                Ok(if active {
                    parent.path.clone()
                } else {
                    root.path.clone()
                })
            }
            MergeMethod::StreamIntoChild => {
                let Some(child) = at.checked_sub(1).map(|i| &chain[i]) else {
                    return Err(chain_error(
                        "it is the active image, which has no child; commit it instead",
                    ));
                };
                let stream = BlockStream {
                    job_id: job_id.clone(),
                    device: child.name.clone(),
                    base_node: chain.get(at + 1).map(|parent| parent.name.clone()),
                    backing_file: None,
                    job: BlockJobOptions::default(),
                };
                self.run_job(&stream, &job_id, false, image).await?;
                Ok(root.path.clone())
            }
        }
    }

    async fn backing_chain(&self, disk: &Path) -> Result<Vec<ChainImage>> {
        Ok(self
            .chain(disk)
            .await?
            .into_iter()
            .map(|n| ChainImage {
                path: n.path,
                format: n.info.drv,
                virtual_size: n.info.image.virtual_size,
            })
            .collect())
    }

    /// Read natively from the header, like the offline backend: reading takes no lock and
    /// writes nothing, so it is safe while QEMU holds the image.
    async fn backing_file(&self, image: &Path) -> Result<Option<PathBuf>> {
        let image = image.to_owned();
        offline::blocking(move || offline::backing_file(&image)).await
    }
}
