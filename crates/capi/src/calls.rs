//! Every call of the C API into the orchestrator, the store and the QEMU driver, in one place:
//! when a signature of theirs changes, this file is the one to follow it. It also maps a
//! snapshot's arguments onto [`CreateOptions`], refusing what the orchestrator cannot express
//! yet (never ignoring it).

use std::{path::Path, sync::Arc, time::Duration};

use qemu::{DomainConfig, QemuDriver, StopMode};
use serde::Serialize;
use snapshot_core::{
    filter_records, CreateOptions, CreateReport, DeleteReport, DiskKind, DiskRequest, FsStore, ListFilter,
    LiveOptions, MemoryMode, Name, Observer, Orchestrator, RevertOptions, RevertReport, SnapshotRecord,
    SnapshotStore,
};

use crate::{
    args::{DiskArgs, DiskArgsKind, SnapshotArgs},
    error::CapiError,
};

/// The version of the JSON documents `domsnap_snapshot_list` and `domsnap_snapshot_show`
/// return (their `"version"`; the CLI's JSON has the same version).
pub const DOMSNAP_JSON_VERSION: u32 = 1;

/// How long a clean stop waits for the guest to power off (the CLI's default).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The driver, the store and the orchestrator of one context (the CLI's wiring).
#[derive(Debug)]
pub struct Api {
    driver: QemuDriver,
    store: Arc<FsStore>,
    orchestrator: Orchestrator,
}

/// `domsnap_snapshot_list`'s document.
#[derive(Debug, Serialize)]
struct ListDocument<'a> {
    version: u32,
    domain: &'a Name,
    current: Option<Name>,
    snapshots: Vec<SnapshotRecord>,
}

/// A report with the documents' version in front: `{"version": 1, ...the report's keys}`.
#[derive(Debug, Serialize)]
struct Versioned<'a, T: Serialize> {
    version: u32,
    #[serde(flatten)]
    body: &'a T,
}

/// `domsnap_snapshot_show`'s document.
#[derive(Debug, Serialize)]
struct ShowDocument {
    version: u32,
    current: bool,
    record: SnapshotRecord,
}

impl Api {
    /// The QEMU driver, store and orchestrator over the state directory `state_dir`
    /// (absolute), reporting steps to `observer`.
    pub fn new(state_dir: &Path, observer: Arc<dyn Observer>) -> Self {
        let driver = QemuDriver::new(state_dir);
        let store = Arc::new(FsStore::new(state_dir));
        let orchestrator = Orchestrator::new(Arc::new(driver.clone()), store.clone(), observer);
        Api {
            driver,
            store,
            orchestrator,
        }
    }

    /// A defined domain's name: calls on unknown domains fail before they touch the state
    /// directory (`DOMSNAP_NOT_FOUND`).
    pub fn defined(&self, domain: &str) -> Result<Name, CapiError> {
        let domain = Name::new(domain)?;
        self.driver.definition(&domain)?;
        Ok(domain)
    }

    /// Creates snapshot `args.name` of `domain`; `live` saves memory while the guest runs.
    pub async fn create(
        &self,
        domain: &str,
        args: SnapshotArgs,
        live: bool,
    ) -> Result<CreateReport, CapiError> {
        let domain = self.defined(domain)?;
        let snapshot = Name::new(&args.name)?;
        let options = Self::create_options(args, live);
        Ok(self.orchestrator.create(&domain, &snapshot, options).await?)
    }

    /// The orchestrator's options for `args`: `memory = false` is a disk-only snapshot (of a
    /// running domain too).
    fn create_options(args: SnapshotArgs, live: bool) -> CreateOptions {
        let memory = match (args.memory, live) {
            (false, _) => MemoryMode::DisksOnly,
            // Pre-copy through the hypervisor's stream: the shortest pause, as `--live`.
            (true, true) => MemoryMode::Live(LiveOptions::default()),
            (true, false) => MemoryMode::Paused,
        };
        CreateOptions {
            memory,
            disks: args.disks.into_iter().map(disk_request).collect(),
            description: args.description,
            memory_path: args.memory_path,
            quiesce: args.quiesce,
        }
    }

    /// Deletes snapshot `snapshot` of `domain` (its children are re-parented).
    pub async fn delete(&self, domain: &str, snapshot: &str) -> Result<DeleteReport, CapiError> {
        let domain = self.defined(domain)?;
        let snapshot = Name::new(snapshot)?;
        Ok(self.orchestrator.delete(&domain, &snapshot, false).await?)
    }

    /// Reverts `domain` to `snapshot`; it runs afterwards (if the snapshot has memory).
    pub async fn revert(&self, domain: &str, snapshot: &str) -> Result<RevertReport, CapiError> {
        let domain = self.defined(domain)?;
        let snapshot = Name::new(snapshot)?;
        let options = RevertOptions {
            paused: false,
            eager: false,
        };
        Ok(self.orchestrator.revert(&domain, &snapshot, options).await?)
    }

    /// The domain's snapshots that `filter` keeps as a JSON document: `{"version", "domain",
    /// "current", "snapshots": [record, ...]}`.
    pub fn list(&self, domain: &str, filter: ListFilter) -> Result<String, CapiError> {
        let domain = self.defined(domain)?;
        let current = self.store.current(&domain)?;
        let records = self.store.list(&domain)?;
        let snapshots = filter_records(&records, filter, current.as_ref())
            .into_iter()
            .cloned()
            .collect();
        let document = ListDocument {
            version: DOMSNAP_JSON_VERSION,
            domain: &domain,
            current,
            snapshots,
        };
        to_json(&document, "snapshot list")
    }

    /// Rescans the domain's disks and reconciles its snapshot records (all, or `snapshot`);
    /// the report as a JSON document, `{"version", ...}` with the keys of `domsnap snapshot
    /// rescan --json`.
    pub async fn rescan(&self, domain: &str, snapshot: Option<&str>) -> Result<String, CapiError> {
        let domain = self.defined(domain)?;
        let snapshot = snapshot.map(Name::new).transpose()?;
        let report = self.orchestrator.rescan(&domain, snapshot.as_ref()).await?;
        let document = Versioned {
            version: DOMSNAP_JSON_VERSION,
            body: &report,
        };
        to_json(&document, "rescan report")
    }

    /// The domain's current snapshot, if it has one.
    pub fn current(&self, domain: &str) -> Result<Option<String>, CapiError> {
        let domain = self.defined(domain)?;
        Ok(self.orchestrator.current(&domain)?.map(String::from))
    }

    /// Makes `snapshot` the domain's current snapshot (it must exist).
    pub async fn set_current(&self, domain: &str, snapshot: &str) -> Result<(), CapiError> {
        let domain = self.defined(domain)?;
        let snapshot = Name::new(snapshot)?;
        Ok(self.orchestrator.set_current(&domain, &snapshot).await?)
    }

    /// One snapshot as a JSON document: `{"version", "current", "record"}`.
    pub fn show(&self, domain: &str, snapshot: &str) -> Result<String, CapiError> {
        let domain = self.defined(domain)?;
        let snapshot = Name::new(snapshot)?;
        let record = self.store.get(&domain, &snapshot)?;
        let current = self.store.current(&domain)?.as_ref() == Some(&snapshot);
        let document = ShowDocument {
            version: DOMSNAP_JSON_VERSION,
            current,
            record,
        };
        to_json(&document, "snapshot")
    }

    /// Defines (or redefines) a domain from a TOML configuration file, as `domsnap domain start
    /// FILE` does before it starts it.
    pub async fn define(&self, config: &str) -> Result<(), CapiError> {
        let config = DomainConfig::load(Path::new(config))?;
        self.orchestrator.recover(&config.name).await?;
        self.orchestrator
            .check_redefinition(&config.name, &self.driver.redefinition_targets(&config)?)
            .await?;
        Ok(self.driver.define(&config).await?)
    }

    /// Starts a defined, shut-off domain.
    pub async fn start(&self, domain: &str, paused: bool) -> Result<(), CapiError> {
        let domain = self.defined(domain)?;
        self.orchestrator.recover(&domain).await?;
        Ok(self.driver.start(&domain, paused).await?)
    }

    /// Stops a running domain: cleanly (ACPI power button, up to a minute) or at once.
    pub async fn stop(&self, domain: &str, force: bool) -> Result<(), CapiError> {
        let domain = self.defined(domain)?;
        self.orchestrator.recover(&domain).await?;
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Clean {
                timeout: STOP_TIMEOUT,
            }
        };
        Ok(self.driver.stop(&domain, mode).await?)
    }
}

/// One disk's request.
fn disk_request(disk: DiskArgs) -> DiskRequest {
    let kind = match disk.kind {
        DiskArgsKind::Internal => DiskKind::Internal { name: disk.name },
        DiskArgsKind::External { path, format } => DiskKind::External { path, format },
        DiskArgsKind::Excluded => DiskKind::Excluded,
    };
    DiskRequest {
        target: disk.device,
        kind,
    }
}

fn to_json<T: Serialize>(document: &T, what: &'static str) -> Result<String, CapiError> {
    serde_json::to_string(document).map_err(|source| CapiError::Json { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_map_onto_requests() {
        let disk = |name: Option<&str>, kind| DiskArgs {
            device: "vda".into(),
            name: name.map(str::to_owned),
            kind,
        };
        let same = disk_request(disk(None, DiskArgsKind::Internal));
        assert_eq!(
            (same.target.as_str(), same.kind),
            ("vda", DiskKind::Internal { name: None })
        );
        let named = disk_request(disk(Some("other"), DiskArgsKind::Internal));
        assert_eq!(
            named.kind,
            DiskKind::Internal {
                name: Some("other".into())
            }
        );
        assert_eq!(
            disk_request(disk(None, DiskArgsKind::Excluded)).kind,
            DiskKind::Excluded
        );
        let external = DiskArgsKind::External {
            path: Some("/o.qcow2".into()),
            format: None,
        };
        assert_eq!(
            disk_request(disk(None, external)).kind,
            DiskKind::External {
                path: Some("/o.qcow2".into()),
                format: None
            }
        );
    }
}
