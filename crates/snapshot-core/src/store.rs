//! The snapshot store: metadata and files of every domain's snapshots under a state directory.
//!
//! ```text
//! STATE/domains/DOMAIN/lock                     held (flock) for the duration of a command
//! STATE/domains/DOMAIN/current                  name of the current snapshot (absent: none)
//! STATE/domains/DOMAIN/intent.json              the operation in progress, if any (see Intent)
//! STATE/domains/DOMAIN/overlays.json            overlay images domsnap created for the domain
//! STATE/domains/DOMAIN/snapshots/SNAP/          one folder per snapshot:
//!                                    meta.json  the record, written last: its presence marks the
//!                                               snapshot complete
//!                                    memory.img, devices.bin   memory and device state, if any
//! ```
//!
//! Every metadata write is atomic: a temporary file in the same folder, fsync, rename over the
//! target, fsync of the folder. A crash leaves either the old or the new file, never a torn one.

use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    error::{io_error, Error, Result},
    intent::Intent,
    metadata::SnapshotRecord,
    name::Name,
};

const META_FILE: &str = "meta.json";
const INTENT_FILE: &str = "intent.json";
const OVERLAYS_FILE: &str = "overlays.json";
const MEMORY_FILE: &str = "memory.img";
const DEVICE_STATE_FILE: &str = "devices.bin";

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

/// Held while a command works on a domain; dropping it releases the lock.
pub type DomainLock = Box<dyn std::any::Any + Send>;

/// Where snapshot records and files live. The orchestrator only talks to this trait.
#[mockall::automock]
pub trait SnapshotStore: Send + Sync {
    /// Takes the domain's lock, waiting up to `wait` for another command to release it.
    fn lock(&self, domain: &Name, wait: Duration) -> Result<DomainLock>;
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
    /// Every domain that has a folder in the store.
    fn domains(&self) -> Result<Vec<Name>>;
}

/// The on-disk store under a state directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `state_dir` (created on first write).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            root: state_dir.into(),
        }
    }

    fn domain_dir(&self, domain: &Name) -> PathBuf {
        self.root.join("domains").join(domain.as_str())
    }

    fn snapshots_dir(&self, domain: &Name) -> PathBuf {
        self.domain_dir(domain).join("snapshots")
    }

    /// Removes what the store keeps for a domain that is being undefined, and then its folder if
    /// nothing else is left in it. Refused while the domain has snapshots or an interrupted
    /// operation. Call it holding the domain's lock (its file goes too).
    pub fn forget_domain(&self, domain: &Name) -> Result<()> {
        if !self.list(domain)?.is_empty() || self.intent(domain)?.is_some() {
            return Err(Error::InvalidRequest(format!(
                "domain {domain} still has snapshots or an unfinished operation"
            )));
        }
        let dir = self.domain_dir(domain);
        for file in ["current", OVERLAYS_FILE, "lock"] {
            write_or_remove(&dir.join(file), None)?;
        }
        for folder in [self.snapshots_dir(domain), dir] {
            match fs::remove_dir(&folder) {
                Err(e) if e.kind() != ErrorKind::NotFound && e.kind() != ErrorKind::DirectoryNotEmpty => {
                    return Err(io_error("cannot remove", &folder)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl SnapshotStore for FsStore {
    fn lock(&self, domain: &Name, wait: Duration) -> Result<DomainLock> {
        let dir = self.domain_dir(domain);
        create_dir_all(&dir)?;
        let path = dir.join("lock");
        let deadline = Instant::now() + wait;
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_error("cannot open lock file", &path))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut locked) => {
                    // The pid is only for the "busy" message of the next command.
                    let _ = locked.set_len(0);
                    let _ = write!(*locked, "{}", std::process::id());
                    return Ok(Box::new(locked));
                }
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    if Instant::now() >= deadline {
                        let mut pid = String::new();
                        let _ = file.read_to_string(&mut pid);
                        let pid = pid.trim();
                        let holder = if pid.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {pid})")
                        };
                        return Err(Error::Locked {
                            domain: domain.clone(),
                            holder,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, errno)) => return Err(io_error("cannot lock", &path)(errno.into())),
            }
        }
    }

    fn list(&self, domain: &Name) -> Result<Vec<SnapshotRecord>> {
        let mut records = Vec::new();
        for entry in entries(&self.snapshots_dir(domain))? {
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
        match fs::create_dir(&files.dir) {
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
        let dir = self.snapshots_dir(domain).join(snapshot.as_str());
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
        let path = self.domain_dir(domain).join("current");
        match fs::read_to_string(&path) {
            Ok(text) => Name::new(text.trim()).map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read", &path)(e)),
        }
    }

    fn set_current(&self, domain: &Name, snapshot: Option<Name>) -> Result<()> {
        let path = self.domain_dir(domain).join("current");
        write_or_remove(&path, snapshot.map(|name| name.as_str().as_bytes().to_vec()))
    }

    fn intent(&self, domain: &Name) -> Result<Option<Intent>> {
        read_json(&self.domain_dir(domain).join(INTENT_FILE))
    }

    fn set_intent(&self, domain: &Name, intent: &Intent) -> Result<()> {
        write_or_remove(&self.domain_dir(domain).join(INTENT_FILE), Some(to_json(intent)))
    }

    fn clear_intent(&self, domain: &Name) -> Result<()> {
        write_or_remove(&self.domain_dir(domain).join(INTENT_FILE), None)
    }

    fn overlays(&self, domain: &Name) -> Result<Vec<PathBuf>> {
        Ok(read_json(&self.domain_dir(domain).join(OVERLAYS_FILE))?.unwrap_or_default())
    }

    fn set_overlays(&self, domain: &Name, overlays: &[PathBuf]) -> Result<()> {
        let path = self.domain_dir(domain).join(OVERLAYS_FILE);
        write_or_remove(&path, (!overlays.is_empty()).then(|| to_json(&overlays)))
    }

    fn domains(&self) -> Result<Vec<Name>> {
        let mut domains = Vec::new();
        for entry in entries(&self.root.join("domains"))? {
            // Foreign files in the folder are not domains.
            if let Ok(name) = Name::new(entry.file_name().to_string_lossy()) {
                domains.push(name);
            }
        }
        domains.sort();
        Ok(domains)
    }
}

/// The entries of a store folder; a folder not created yet has none.
fn entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<Result<_, _>>()
            .map_err(io_error("cannot list", dir)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error("cannot list", dir)(e)),
    }
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("store records always serialise")
}

/// Writes `path` atomically, or removes it (durably) when `bytes` is `None`.
fn write_or_remove(path: &Path, bytes: Option<Vec<u8>>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    match bytes {
        Some(bytes) => {
            create_dir_all(dir)?;
            write_atomic(path, &bytes)
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
    fs::create_dir_all(dir).map_err(io_error("cannot create", dir))
}

/// Makes a rename or unlink in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync", dir))
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a mix:
/// temporary file in the same folder (mode 0600), fsync, rename, fsync of the folder
/// ([`durable::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    durable::write_atomic(path, bytes).map_err(|e| {
        // Name the destination rather than the hidden temporary (gone by now); a failed fsync of
        // the folder names the folder.
        let named = if path.parent() == Some(e.path.as_path()) {
            e.path
        } else {
            path.to_owned()
        };
        Error::Io {
            operation: e.operation,
            path: named,
            source: e.source,
        }
    })
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

    #[test]
    fn the_domain_lock_excludes_a_second_holder_until_released() {
        let state = tempfile::tempdir().unwrap();
        let store = FsStore::new(state.path());
        let vm = name("vm");
        let held = store.lock(&vm, Duration::ZERO).unwrap();
        // flock locks belong to the open file description: a second open in this process conflicts
        // just as another process would.
        let error = store.lock(&vm, Duration::from_millis(120)).unwrap_err();
        let expected = format!("(pid {})", std::process::id());
        assert!(
            matches!(&error, Error::Locked { holder, .. } if holder.contains(&expected)),
            "{error}"
        );
        drop(held);
        store.lock(&vm, Duration::ZERO).unwrap();
    }
}
