//! The snapshot store: metadata and files of every domain's snapshots under a state directory
//! (its layout: [`crate::StateDir`]).
//!
//! Every metadata write is atomic ([`durable::write_atomic`]): a private temporary file in the
//! same folder, fsync, rename over the target, fsync of the folder. A crash leaves either the old
//! or the new file, never a torn one. A domain's own files (pointer, intent, lists) are not
//! written again when their content would not change. Every file is 0600 and every folder 0700:
//! memory images hold the guest's secrets.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;

use crate::{
    error::{io_error, Error, Result},
    intent::Intent,
    metadata::SnapshotRecord,
    name::Name,
    state_dir::{list_dir, DomainDir, DomainLock, StateDir},
};

const META_FILE: &str = "meta.json";
const MEMORY_FILE: &str = "memory.img";
const DEVICE_STATE_FILE: &str = "devices.bin";

/// Images and the backing file each one's header names (absolute; `None`: it has none).
pub type ImageLinks = BTreeMap<PathBuf, Option<PathBuf>>;

/// Paths of one snapshot's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFiles {
    /// The snapshot's folder.
    pub dir: PathBuf,
    /// Where the memory image goes.
    pub memory_image: PathBuf,
    /// Where the device state goes.
    pub device_state: PathBuf,
}

impl SnapshotFiles {
    /// These files with the memory image where `record` says it is (a path the caller chose at
    /// create; else it stays in the snapshot's folder).
    pub fn of_record(mut self, record: &SnapshotRecord) -> Self {
        if let Some(path) = record.memory.as_ref().and_then(|m| m.image_path.as_ref()) {
            self.memory_image = path.clone();
        }
        self
    }
}

/// Where snapshot records and files live. The orchestrator only talks to this trait.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Takes the domain's lock, waiting up to `wait` for another command to release it.
    async fn lock(&self, domain: &Name, wait: Duration) -> Result<DomainLock>;
    /// Takes the domain's lock if it is free; else the holder's pid, when known. Never waits.
    fn try_lock(&self, domain: &Name) -> Result<std::result::Result<DomainLock, Option<u32>>>;
    /// Every complete snapshot of the domain, oldest first.
    fn list(&self, domain: &Name) -> Result<Vec<SnapshotRecord>>;
    /// One snapshot.
    fn get(&self, domain: &Name, snapshot: &Name) -> Result<SnapshotRecord>;
    /// Creates the folder of a new snapshot and returns its file paths; fails if the name is taken.
    fn prepare(&self, domain: &Name, snapshot: &Name) -> Result<SnapshotFiles>;
    /// The file paths of a snapshot (existing or being created).
    fn files(&self, domain: &Name, snapshot: &Name) -> SnapshotFiles;
    /// Writes a snapshot's record (atomically); the snapshot is complete from then on.
    fn commit(&self, record: &SnapshotRecord) -> Result<()>;
    /// Removes a snapshot: its record first (so a crash never leaves a record without files),
    /// then its files and folder. Removing a snapshot that is already gone succeeds.
    fn remove(&self, domain: &Name, snapshot: &Name) -> Result<()>;
    /// The domain's current snapshot.
    fn current(&self, domain: &Name) -> Result<Option<Name>>;
    /// Sets (or clears) the domain's current snapshot.
    fn set_current(&self, domain: &Name, snapshot: Option<Name>) -> Result<()>;
    /// The operation in progress on the domain, if one was interrupted.
    fn intent(&self, domain: &Name) -> Result<Option<Intent>>;
    /// Records the operation in progress.
    fn set_intent(&self, domain: &Name, intent: &Intent) -> Result<()>;
    /// Clears the operation in progress (it finished or was undone).
    fn clear_intent(&self, domain: &Name) -> Result<()>;
    /// The overlay images domsnap created for the domain (external snapshots and reverts): the
    /// only images it ever deletes.
    fn overlays(&self, domain: &Name) -> Result<Vec<PathBuf>>;
    /// Replaces the list of overlays domsnap created.
    fn set_overlays(&self, domain: &Name, overlays: &[PathBuf]) -> Result<()>;
    /// Each image of the domain's disk chains and the backing file its header named, as the
    /// last rescan read them; `None` before the first rescan.
    fn links(&self, domain: &Name) -> Result<Option<ImageLinks>>;
    /// Records the links a rescan read (see [`SnapshotStore::links`]).
    fn set_links(&self, domain: &Name, links: &ImageLinks) -> Result<()>;
    /// Removes the temporary files that a command killed in the middle of a write left in the
    /// domain's folder and in its snapshots' folders (a memory image's can be gigabytes); returns
    /// what it removed. Call it holding the domain's lock, which every writer there holds.
    fn remove_temporaries(&self, domain: &Name) -> Result<Vec<PathBuf>>;
    /// Every domain that has a folder in the store.
    fn domains(&self) -> Result<Vec<Name>>;
    /// Removes what the store keeps for a domain that is being undefined. Refused while the
    /// domain has snapshots or an interrupted operation. Call it holding the domain's lock (the
    /// lock file itself stays).
    fn forget_domain(&self, domain: &Name) -> Result<()>;
}

/// The on-disk store under a state directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    state: StateDir,
}

impl FsStore {
    /// A store rooted at `state_dir` (created on first write).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state: StateDir::new(state_dir),
        }
    }

    /// The state directory it keeps its files in.
    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    fn domain_dir(&self, domain: &Name) -> DomainDir {
        self.state.domain(domain)
    }

    fn snapshots_dir(&self, domain: &Name) -> PathBuf {
        self.domain_dir(domain).snapshots_dir()
    }
}

#[async_trait]
impl SnapshotStore for FsStore {
    async fn lock(&self, domain: &Name, wait: Duration) -> Result<DomainLock> {
        self.state.lock(domain, wait).await
    }

    fn try_lock(&self, domain: &Name) -> Result<std::result::Result<DomainLock, Option<u32>>> {
        self.state.try_lock(domain)
    }

    fn list(&self, domain: &Name) -> Result<Vec<SnapshotRecord>> {
        let mut records = Vec::new();
        for entry in list_dir(&self.snapshots_dir(domain))? {
            let meta = entry.path().join(META_FILE);
            // A folder without its record is an unfinished create, not a snapshot.
            if let Some(record) = read_record(&meta)? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| (a.created_unix_ms, &a.name).cmp(&(b.created_unix_ms, &b.name)));
        Ok(records)
    }

    fn get(&self, domain: &Name, snapshot: &Name) -> Result<SnapshotRecord> {
        read_record(&self.files(domain, snapshot).dir.join(META_FILE))?.ok_or_else(|| {
            Error::SnapshotNotFound {
                domain: domain.clone(),
                snapshot: snapshot.clone(),
            }
        })
    }

    fn prepare(&self, domain: &Name, snapshot: &Name) -> Result<SnapshotFiles> {
        let files = self.files(domain, snapshot);
        create_dir_all(&self.snapshots_dir(domain))?;
        match fs::DirBuilder::new().mode(durable::DIR_MODE).create(&files.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(Error::SnapshotExists {
                    domain: domain.clone(),
                    snapshot: snapshot.clone(),
                })
            }
            Err(e) => return Err(io_error("cannot create", &files.dir)(e)),
        }
        sync_dir(&self.snapshots_dir(domain))?;
        Ok(files)
    }

    fn files(&self, domain: &Name, snapshot: &Name) -> SnapshotFiles {
        let dir = self.domain_dir(domain).snapshot_dir(snapshot);
        SnapshotFiles {
            memory_image: dir.join(MEMORY_FILE),
            device_state: dir.join(DEVICE_STATE_FILE),
            dir,
        }
    }

    fn commit(&self, record: &SnapshotRecord) -> Result<()> {
        let dir = self.files(&record.domain, &record.name).dir;
        write_atomic(&dir.join(META_FILE), &to_json(record))
    }

    fn remove(&self, domain: &Name, snapshot: &Name) -> Result<()> {
        let files = self.files(domain, snapshot);
        let meta = files.dir.join(META_FILE);
        match fs::remove_file(&meta) {
            Ok(()) => sync_dir(&files.dir)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot remove", &meta)(e)),
        }
        match fs::remove_dir_all(&files.dir) {
            Ok(()) => sync_dir(&self.snapshots_dir(domain)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("cannot remove", &files.dir)(e)),
        }
    }

    fn current(&self, domain: &Name) -> Result<Option<Name>> {
        let path = self.domain_dir(domain).current_file();
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(Name::new(text.trim())?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read", &path)(e)),
        }
    }

    fn set_current(&self, domain: &Name, snapshot: Option<Name>) -> Result<()> {
        let path = self.domain_dir(domain).current_file();
        write_or_remove(&path, snapshot.map(|name| name.as_str().as_bytes().to_vec()))
    }

    fn intent(&self, domain: &Name) -> Result<Option<Intent>> {
        read_json(&self.domain_dir(domain).intent_file())
    }

    fn set_intent(&self, domain: &Name, intent: &Intent) -> Result<()> {
        write_or_remove(&self.domain_dir(domain).intent_file(), Some(to_json(intent)))
    }

    fn clear_intent(&self, domain: &Name) -> Result<()> {
        write_or_remove(&self.domain_dir(domain).intent_file(), None)
    }

    fn overlays(&self, domain: &Name) -> Result<Vec<PathBuf>> {
        Ok(read_json(&self.domain_dir(domain).overlays_file())?.unwrap_or_default())
    }

    fn set_overlays(&self, domain: &Name, overlays: &[PathBuf]) -> Result<()> {
        let path = self.domain_dir(domain).overlays_file();
        write_or_remove(&path, (!overlays.is_empty()).then(|| to_json(&overlays)))
    }

    fn links(&self, domain: &Name) -> Result<Option<ImageLinks>> {
        read_json(&self.domain_dir(domain).chains_file())
    }

    fn set_links(&self, domain: &Name, links: &ImageLinks) -> Result<()> {
        write_or_remove(&self.domain_dir(domain).chains_file(), Some(to_json(links)))
    }

    fn remove_temporaries(&self, domain: &Name) -> Result<Vec<PathBuf>> {
        let mut removed = durable::remove_temporaries(self.domain_dir(domain).path(), |_| true)?;
        for entry in list_dir(&self.snapshots_dir(domain))? {
            removed.extend(durable::remove_temporaries(&entry.path(), |_| true)?);
        }
        Ok(removed)
    }

    fn domains(&self) -> Result<Vec<Name>> {
        self.state.domain_names()
    }

    fn forget_domain(&self, domain: &Name) -> Result<()> {
        if !self.list(domain)?.is_empty() || self.intent(domain)?.is_some() {
            return Err(Error::InvalidRequest(format!(
                "domain {domain} still has snapshots or an unfinished operation"
            )));
        }
        let dir = self.domain_dir(domain);
        // The lock file stays while its holder lives: unlinking a held lock would let another
        // process lock a new file of the same name at the same time.
        for file in [dir.current_file(), dir.overlays_file(), dir.chains_file()] {
            write_or_remove(&file, None)?;
        }
        let folder = dir.snapshots_dir();
        match fs::remove_dir(&folder) {
            Err(e) if e.kind() != ErrorKind::NotFound && e.kind() != ErrorKind::DirectoryNotEmpty => {
                Err(io_error("cannot remove", &folder)(e))
            }
            _ => Ok(()),
        }
    }
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("store records always serialise")
}

/// Writes `path` atomically unless it holds `bytes` already, or removes it (durably) when
/// `bytes` is `None`.
fn write_or_remove(path: &Path, bytes: Option<Vec<u8>>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    match bytes {
        Some(bytes) => {
            create_dir_all(dir)?;
            // The domain's pointers and lists often stay as they were (a revert to the snapshot
            // the domain is at): no journal commit for them.
            durable::write_atomic_if_changed(path, &bytes)?;
            Ok(())
        }
        None => match fs::remove_file(path) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("cannot remove", path)(e)),
        },
    }
}

fn read_record(path: &Path) -> Result<Option<SnapshotRecord>> {
    read_json(path)
}

/// Reads a JSON file of the store; `None` if it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("cannot read", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| Error::CorruptMetadata {
            path: path.to_owned(),
            source,
        })
}

fn create_dir_all(dir: &Path) -> Result<()> {
    Ok(durable::create_private_dir_all(dir)?)
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    Ok(durable::sync_dir(dir)?)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(durable::write_atomic(path, bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{DiskRecord, DiskSnapshot, DomainState, METADATA_VERSION};

    fn name(text: &str) -> Name {
        Name::new(text).unwrap()
    }

    fn record(snapshot: &str, created: u64, parent: Option<&str>) -> SnapshotRecord {
        SnapshotRecord {
            version: METADATA_VERSION,
            name: name(snapshot),
            domain: name("vm"),
            description: None,
            created_unix_ms: created,
            parent: parent.map(name),
            state: DomainState::Running,
            config: serde_json::json!({"memory_mib": 256}),
            memory: None,
            disks: vec![DiskRecord {
                target: "vda".into(),
                image: "/images/vda.qcow2".into(),
                snapshot: DiskSnapshot::Internal {
                    name: snapshot.into(),
                },
            }],
            quiesced: false,
            broken: None,
            chains: Default::default(),
        }
    }

    #[test]
    fn records_round_trip_and_list_in_creation_order() {
        let state = tempfile::tempdir().unwrap();
        let store = FsStore::new(state.path());
        let vm = name("vm");
        assert!(store.list(&vm).unwrap().is_empty());
        for (snap, created, parent) in [("b", 2, Some("a")), ("a", 1, None)] {
            store.prepare(&vm, &name(snap)).unwrap();
            store.commit(&record(snap, created, parent)).unwrap();
        }
        let names: Vec<_> = store
            .list(&vm)
            .unwrap()
            .into_iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(store.get(&vm, &name("b")).unwrap(), record("b", 2, Some("a")));
        assert!(matches!(
            store.get(&vm, &name("zz")),
            Err(Error::SnapshotNotFound { .. })
        ));
        assert!(matches!(
            store.prepare(&vm, &name("a")),
            Err(Error::SnapshotExists { .. })
        ));
    }

    #[test]
    fn an_unfinished_create_is_not_listed_and_remove_cleans_it() {
        let state = tempfile::tempdir().unwrap();
        let store = FsStore::new(state.path());
        let vm = name("vm");
        let files = store.prepare(&vm, &name("half")).unwrap();
        fs::write(&files.memory_image, b"partial").unwrap();
        assert!(store.list(&vm).unwrap().is_empty());
        store.remove(&vm, &name("half")).unwrap();
        assert!(!files.dir.exists());
        store.remove(&vm, &name("half")).unwrap();
    }

    #[test]
    fn corrupt_metadata_is_reported_with_its_path() {
        let state = tempfile::tempdir().unwrap();
        let store = FsStore::new(state.path());
        let vm = name("vm");
        let files = store.prepare(&vm, &name("bad")).unwrap();
        fs::write(files.dir.join(META_FILE), b"{not json").unwrap();
        let error = store.list(&vm).unwrap_err();
        assert!(
            matches!(&error, Error::CorruptMetadata { path, .. } if path.ends_with("bad/meta.json")),
            "{error}"
        );
    }

    #[test]
    fn links_round_trip() {
        let state = tempfile::tempdir().unwrap();
        let store = FsStore::new(state.path());
        let vm = name("vm");
        assert_eq!(store.links(&vm).unwrap(), None);
        let links: ImageLinks = [
            (PathBuf::from("/d/o1.qcow2"), Some(PathBuf::from("/d/vda.qcow2"))),
            (PathBuf::from("/d/vda.qcow2"), None),
        ]
        .into();
        store.set_links(&vm, &links).unwrap();
        assert_eq!(store.links(&vm).unwrap(), Some(links));
    }

    #[test]
    fn current_snapshot_is_set_and_cleared() {
        let state = tempfile::tempdir().unwrap();
        let store = FsStore::new(state.path());
        let vm = name("vm");
        assert_eq!(store.current(&vm).unwrap(), None);
        store.set_current(&vm, Some(name("s1"))).unwrap();
        assert_eq!(store.current(&vm).unwrap(), Some(name("s1")));
        store.set_current(&vm, None).unwrap();
        assert_eq!(store.current(&vm).unwrap(), None);
    }

    #[test]
    fn atomic_writes_leave_no_temporary_files_and_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
        let error = write_atomic(&dir.path().join("missing/f.json"), b"x").unwrap_err();
        assert!(error.to_string().contains("missing/f.json"), "{error}");
    }
}
