//! The state directory: one owner of its layout and of the per-domain lock, shared by the
//! snapshot store and the domain driver.
//!
//! ```text
//! STATE/qemu-binary.json                the driver: the hypervisor binary it checked last
//! STATE/domains/DOMAIN/                 one folder per domain (mode 0700)
//!                      lock             flock'ed for the duration of a command; holds its pid
//!                      current          the store: name of the current snapshot
//!                      intent.json      the store: the operation in progress (see Intent)
//!                      overlays.json    the store: overlay images domsnap created
//!                      snapshots/SNAP/  the store: one folder per snapshot (meta.json,
//!                                       memory.img, devices.bin)
//!                      domain.toml      the driver: the domain's definition
//!                      serial.log       the driver: the serial console
//!                      run/             the driver: files of the running hypervisor process
//! ```
//!
//! One lock per domain: every command that changes a domain (snapshot operations, start, stop,
//! define, undefine) holds it, so they never interleave. The lock file is never truncated or
//! removed while a process may hold it, and a symlink in its place is refused.

use std::{
    fs::{self, File},
    io::{ErrorKind, Read, Seek, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    error::{io_error, Error, Result},
    name::Name,
};

/// How often a waiting lock looks again.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// The paths of one domain's folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDir {
    dir: PathBuf,
}

/// A domain's lock, held until dropped. Proof that the holder may change the domain.
#[derive(Debug)]
pub struct DomainLock {
    domain: Name,
    _file: Flock<File>,
}

impl DomainLock {
    /// The domain it locks.
    pub fn domain(&self) -> &Name {
        &self.domain
    }
}

impl StateDir {
    /// The state directory at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    /// Its path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of every domain.
    pub fn domains_dir(&self) -> PathBuf {
        self.root.join("domains")
    }

    /// One domain's folder.
    pub fn domain(&self, domain: &Name) -> DomainDir {
        DomainDir {
            dir: self.domains_dir().join(domain.as_str()),
        }
    }

    /// Every domain that has a folder, sorted (foreign entries are skipped).
    pub fn domain_names(&self) -> Result<Vec<Name>> {
        let mut names: Vec<Name> = list_dir(&self.domains_dir())?
            .into_iter()
            .filter_map(|entry| Name::new(entry.file_name().to_string_lossy()).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Takes the domain's lock, waiting up to `wait` for another command to release it (without
    /// blocking the async runtime). Creates the domain's folder if needed.
    pub async fn lock(&self, domain: &Name, wait: Duration) -> Result<DomainLock> {
        let deadline = Instant::now() + wait;
        loop {
            match self.try_lock(domain)? {
                Ok(lock) => return Ok(lock),
                Err(holder) if Instant::now() >= deadline => {
                    return Err(Error::Locked {
                        domain: domain.clone(),
                        holder: holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
                    })
                }
                Err(_) => tokio::time::sleep(LOCK_POLL).await,
            }
        }
    }

    /// Takes the domain's lock if it is free; else the holder's pid, when known.
    pub fn try_lock(&self, domain: &Name) -> Result<std::result::Result<DomainLock, Option<u32>>> {
        let dir = self.domain(domain);
        durable::create_private_dir_all(dir.path()).map_err(Error::from)?;
        let path = dir.lock_file();
        let file = durable::private_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("cannot open lock file", &path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut locked) => {
                // The pid is only for the "busy" message of the next command; written through the
                // locked file (never truncated by path), so a symlink can never be followed.
                let pid = format!("{:<10}", std::process::id());
                let _ = locked.rewind().and_then(|()| locked.write_all(pid.as_bytes()));
                Ok(Ok(DomainLock {
                    domain: domain.clone(),
                    _file: locked,
                }))
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Ok(Err(pid.trim().parse().ok()))
            }
            Err((_, errno)) => Err(io_error("cannot lock", &path)(errno.into())),
        }
    }
}

impl DomainDir {
    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The lock file.
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// The store's name of the current snapshot.
    pub fn current_file(&self) -> PathBuf {
        self.dir.join("current")
    }

    /// The store's intent record.
    pub fn intent_file(&self) -> PathBuf {
        self.dir.join("intent.json")
    }

    /// The store's list of overlays domsnap made.
    pub fn overlays_file(&self) -> PathBuf {
        self.dir.join("overlays.json")
    }

    /// The store's record of the domain's disk chains (each image's backing file) as the last
    /// rescan read them.
    pub fn chains_file(&self) -> PathBuf {
        self.dir.join("chains.json")
    }

    /// The folder of the domain's snapshots.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// One snapshot's folder.
    pub fn snapshot_dir(&self, snapshot: &Name) -> PathBuf {
        self.snapshots_dir().join(snapshot.as_str())
    }

    /// The driver's definition of the domain.
    pub fn definition_file(&self) -> PathBuf {
        self.dir.join("domain.toml")
    }

    /// The driver's serial console log (when the definition names none).
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The driver's folder for the files of the running hypervisor process.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
}

/// The entries of a folder; a folder not created yet has none.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<std::result::Result<_, _>>()
            .map_err(io_error("cannot list", dir)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_error("cannot list", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::new(text).unwrap()
    }

    #[tokio::test]
    async fn one_lock_per_domain_with_the_holder_named() {
        let state = tempfile::tempdir().unwrap();
        let dir = StateDir::new(state.path());
        let held = dir.lock(&name("vm"), Duration::ZERO).await.unwrap();
        assert_eq!(held.domain(), &name("vm"));
        let busy = dir
            .lock(&name("vm"), Duration::from_millis(60))
            .await
            .unwrap_err();
        assert!(
            busy.to_string()
                .contains(&format!("(pid {})", std::process::id())),
            "{busy}"
        );
        // Another domain is not affected.
        dir.lock(&name("other"), Duration::ZERO).await.unwrap();
        drop(held);
        dir.lock(&name("vm"), Duration::ZERO).await.unwrap();
        assert_eq!(dir.domain_names().unwrap(), vec![name("other"), name("vm")]);
    }

    #[tokio::test]
    async fn a_symlinked_lock_file_is_refused() {
        let state = tempfile::tempdir().unwrap();
        let dir = StateDir::new(state.path());
        let folder = dir.domain(&name("vm"));
        fs::create_dir_all(folder.path()).unwrap();
        let target = state.path().join("victim");
        fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, folder.lock_file()).unwrap();
        assert!(dir.lock(&name("vm"), Duration::ZERO).await.is_err());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn domain_folders_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let dir = StateDir::new(state.path());
        let _lock = dir.try_lock(&name("vm")).unwrap().unwrap();
        let mode = fs::metadata(dir.domain(&name("vm")).path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let mode = fs::metadata(dir.domain(&name("vm")).lock_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
