//! The domain driver: [`QemuDriver`] (its documentation has the state layout, supervision,
//! run states and disk handling).

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use qmp::{
    commands::{Cont, MigrateCancel, QueryMigrate, Quit, Stop},
    Client, MigrationStatus, RunState,
};
use snapshot_core::{DomainLock, DomainState, Name, StateDir};

pub(crate) use crate::files::DomainFiles;
use crate::{
    command_line::{RuntimePaths, StartMode},
    config::{Accel, DomainConfig},
    connections::Connections,
    error::{Error, Result},
    process,
};

/// Longest wait for QEMU to answer `quit` and exit before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the process to vanish after SIGKILL.
pub(crate) const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for another process that is starting or stopping the domain.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// The file in the state directory that remembers the QEMU binary that passed its version
/// check (so that starts need not run `qemu --version` again).
const QEMU_RECORD: &str = "qemu-binary.json";

/// The QEMU domain driver: named domains under a state directory, each run by a QEMU 10 process
/// that outlives the process that started it (the `domsnap` CLI runs one short process per
/// command).
///
/// # State layout
///
/// ```text
/// STATE/qemu-binary.json             the QEMU binary that passed the version check (its path,
///                                    inode, size and change time): not run again while it stays
/// STATE/domains/NAME/domain.toml     the definition: DomainConfig as TOML with absolute paths,
///                                    replaced atomically (temporary file, fsync, rename, fsync)
/// STATE/domains/NAME/serial.log      the serial console, appended across runs and restores
///                                    (unless the definition sets `serial_log`)
/// STATE/domains/NAME/run/            files of the running QEMU (mode 0700), removed when it ends:
///                    qmp.sock        QMP
///                    status.sock     a second QMP monitor, for state queries only
///                    console.sock    the serial console, to type into the guest
///                    qemu.pid        QEMU's pid (written by QEMU: -pidfile)
///                    qemu.log        QEMU's stdout, stderr and -D log
///                    ram-base.img    after a lazy revert: a hard link (mode 0400) of the snapshot's
///                                    memory image that QEMU maps as guest RAM, copy-on-write, so
///                                    the data outlives a delete of the snapshot while QEMU runs
///                    ram-base.origin the path of the image it links to (for messages)
/// STATE/domains/NAME/run-1/          the second run slot, the same files: a revert's standby
///                                    QEMU starts there beside the running one (see `standby`)
/// STATE/domains/NAME/active-slot     which slot the domain's QEMU runs in: `0` (run/, also
///                                    when the file is absent) or `1` (run-1/)
/// /dev/shm/domsnap-UID-HASH-NAME.ram guest RAM (mode 0600), HASH = first 8 hex digits of the
///                                    xxh3-64 of the canonical state directory; slot 1's is
///                                    `NAME+1.ram`
/// ```
///
/// Every call but the standby's own uses the active slot (see `files`), so once a standby is
/// promoted, status, pause, destroy, the consoles and the guest agent find the new QEMU.
///
/// Guest RAM is on tmpfs because `share=on` RAM in a file on a disk would be written back to the
/// disk. The paths come from [`snapshot_core::StateDir`], the one owner of the layout; the
/// snapshot store owns the rest of the domain folder (`current`, `snapshots/`, ...); the driver
/// never touches it, and `undefine` leaves the folder to it. Unix socket paths
/// are limited to 107 bytes: a state directory that makes them longer is refused when a domain
/// is defined or started.
///
/// # Supervision
///
/// A domain runs iff the process in its active slot's `qemu.pid` is alive and its
/// `/proc/PID/cmdline` names that slot's QMP socket (a recycled pid or a zombie does not count). When the driver finds
/// the QEMU dead (the guest powered off, QEMU crashed or was killed), it removes `run/` and the
/// RAM file and reports the domain shut off. Starting, stopping, defining and undefining take the
/// domain's one lock ([`snapshot_core::StateDir::lock`], the same lock snapshot operations
/// hold), so two processes never start the same domain twice, and the stale-file cleanup of one
/// never removes the files of a QEMU another is starting. Its [`snapshot_core::Hypervisor`]
/// methods run under the caller's lock and never take it again.
///
/// QEMU runs in a session of its own (no terminal, it outlives the command that started it); a
/// start waits until its status monitor answers the QMP handshake, which QEMU's main loop does
/// only once initialisation has finished (disks open and locked, privileges dropped), with its
/// errors in `run/qemu.log`. (Not `-daemonize`, whose extra fork and wait cost 30–40 ms here.)
///
/// QEMU serves one client at a time on a QMP socket. A driver keeps one connection to
/// `qmp.sock` per running domain (and run slot) and reuses it (reconnecting when it closed or the pid changed);
/// while one process holds it, another process's commands on that domain fail after a few
/// seconds with [`Error::QmpConnect`] (drop the driver, or end the process, to let another one
/// talk). State queries of a driver that holds no connection go to `status.sock` instead
/// (connect, `query-status`, disconnect), so `status` and `list` answer while another process
/// works on the domain.
///
/// # Run states
///
/// QEMU's `running` maps to [`DomainState::Running`]. Every other state of a live QEMU maps to
/// [`DomainState::Paused`]: `paused`, `prelaunch` (started with `-S`), `inmigrate` (started to
/// receive saved state), `finish-migrate`, `postmigrate`, `save-vm`, `restore-vm`, `suspended`,
/// `debug`, `io-error`, `internal-error`, `guest-panicked`, `watchdog`, `shutdown`, `colo`: the
/// vCPUs are not running in any of them. No process is [`DomainState::ShutOff`].
///
/// # Disks
///
/// The definition names each disk's active image. A live external snapshot (or a merge of the
/// active image) makes QEMU write to another image, so while QEMU runs the driver takes the
/// active images from QEMU (`query-block`: the image of the root node attached to the device
/// whose id is the disk id) and rewrites the definition whenever they differ from it: after
/// every change made through the disk backend the driver hands out
/// ([`snapshot_core::Hypervisor::disk_backend`]), and when the disks or configuration are read
/// or the domain is stopped. A later cold start therefore uses the overlay. Images changed while
/// the domain is shut off are recorded by the caller with [`snapshot_core::Hypervisor::define`].
///
/// Cheap to clone; clones share their QMP connections.
#[derive(Debug, Clone)]
pub struct QemuDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state_dir: PathBuf,
    /// The canonical state directory, once it exists.
    root: OnceLock<PathBuf>,
    /// The QEMU binary, once checked.
    qemu: tokio::sync::OnceCell<PathBuf>,
    /// The QMP connections to the domains' QEMUs.
    connections: Connections,
}

/// A domain's state as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    /// The domain.
    pub name: Name,
    /// Running, paused or shut off (see the module docs for QEMU's run states).
    pub state: DomainState,
    /// QEMU's pid while it has a process.
    pub pid: Option<u32>,
    /// The snapshot memory image the guest's RAM is mapped from, copy-on-write (after a lazy
    /// revert), while the domain has a process. Such RAM is private to QEMU: domsnap cannot read
    /// it.
    pub mapped_image: Option<PathBuf>,
    /// The accelerator the domain runs (or would run) under.
    pub accel: Accel,
    /// The Unix socket of the guest agent's channel (`guest_agent = true`), while the domain
    /// has a process.
    pub guest_agent_socket: Option<PathBuf>,
}

/// How [`QemuDriver::stop`] ends a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Press the ACPI power button and wait up to `timeout` for the guest to power off.
    Clean {
        /// How long the guest may take.
        timeout: Duration,
    },
    /// QMP `quit` (QEMU flushes and closes its disk images), SIGKILL if QEMU does not answer.
    Force,
}

/// Builds an [`Error::Io`] for `path`.
pub(crate) fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io {
        operation,
        path,
        source,
    }
}

/// Builds an [`Error::DomainQmp`].
pub(crate) fn qmp_error(domain: &Name, operation: &'static str) -> impl FnOnce(qmp::Error) -> Error {
    let domain = domain.clone();
    move |source| Error::DomainQmp {
        domain,
        operation,
        source,
    }
}

/// The domain state of a live QEMU in run state `state`.
pub(crate) fn domain_state(state: &RunState) -> DomainState {
    if *state == RunState::Running {
        DomainState::Running
    } else {
        DomainState::Paused
    }
}

impl QemuDriver {
    /// A driver for the domains under `state_dir` (created when the first domain is defined).
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state_dir: state_dir.into(),
                root: OnceLock::new(),
                qemu: tokio::sync::OnceCell::new(),
                connections: Connections::default(),
            }),
        }
    }

    /// Defines (or redefines) a domain: validates `config`, pins what the host decides (the
    /// accelerator, the versioned machine type, the vCPU model, MACs, a UEFI domain's NVRAM
    /// image: see `pin`), makes its paths absolute (QEMU runs from `/`) and writes
    /// `domain.toml`. Refused while the domain's QEMU runs.
    pub async fn define(&self, config: &DomainConfig) -> Result<()> {
        config.validate()?;
        let dir = self.inner.state_dir.join("domains").join(config.name.as_str());
        durable::create_private_dir_all(&dir)?;
        let _lock = self.lock(&config.name).await?;
        let files = self.files(&config.name)?;
        let previous = files
            .definition
            .is_file()
            .then(|| self.load_definition(&config.name, &files))
            .transpose()?;
        let pinned = self.pin(config, previous.as_ref(), &files.dir).await?;
        self.define_locked(&pinned)
    }

    /// The driver's QMP connections (shared by its clones).
    pub(crate) fn connections(&self) -> &Connections {
        &self.inner.connections
    }

    /// The state directory as the driver was given it.
    pub(crate) fn state_path(&self) -> &Path {
        &self.inner.state_dir
    }

    /// [`QemuDriver::define`] with the domain's lock held by the caller.
    pub(crate) fn define_locked(&self, config: &DomainConfig) -> Result<()> {
        config.validate()?;
        config.check_host()?;
        let config = absolute_paths(config)?;
        let files = self.files(&config.name)?;
        files.check_socket_paths()?;
        if let Some(pid) = files.pid() {
            return Err(Error::Running {
                domain: config.name.clone(),
                action: "redefine",
                pid,
            });
        }
        self.write_definition(&files, &config)
    }

    /// The stored definition of a domain.
    pub fn definition(&self, name: &Name) -> Result<DomainConfig> {
        self.load_definition(name, &self.files(name)?)
    }

    /// Where the domain's QEMU keeps its RAM, QMP socket, console socket and serial log.
    pub fn runtime_paths(&self, name: &Name) -> Result<RuntimePaths> {
        let files = self.files(name)?;
        Ok(files.runtime(&self.load_definition(name, &files)?))
    }

    /// The Unix socket of the domain's guest agent channel (the host side of the virtio-serial
    /// port `org.qemu.guest_agent.0`), if its definition has `guest_agent = true`. QEMU listens
    /// on it while the domain runs; one client at a time.
    pub fn guest_agent_socket(&self, name: &Name) -> Result<Option<PathBuf>> {
        let files = self.files(name)?;
        let config = self.load_definition(name, &files)?;
        Ok(config.guest_agent.then_some(files.guest_agent_socket))
    }

    /// Boots a shut-off domain; with `paused`, its vCPUs wait for [`QemuDriver::resume`].
    pub async fn start(&self, name: &Name, paused: bool) -> Result<()> {
        self.launch(name, StartMode::Boot { paused }).await
    }

    /// Stops a running domain (see [`StopMode`]); its runtime files and RAM file are removed.
    pub async fn stop(&self, name: &Name, mode: StopMode) -> Result<()> {
        let files = self.files(name)?;
        let _lock = self.lock(name).await?;
        self.load_definition(name, &files)?;
        let Some(pid) = files.pid() else {
            self.forget(name, files.slot);
            files.clean()?;
            return Err(Error::NotRunning { domain: name.clone() });
        };
        match mode {
            StopMode::Force => self.end_process(name, &files, pid).await,
            StopMode::Clean { timeout } => self.power_off(name, &files, pid, timeout).await,
        }
    }

    /// Ends the domain's QEMU at once (as [`StopMode::Force`]); succeeds if it is shut off.
    pub async fn destroy(&self, name: &Name) -> Result<()> {
        let _lock = self.lock(name).await?;
        self.destroy_locked(name).await
    }

    /// [`QemuDriver::destroy`] with the domain's lock held by the caller. A standby QEMU (a
    /// revert's, see `standby`) is left as it is.
    pub(crate) async fn destroy_locked(&self, name: &Name) -> Result<()> {
        let files = self.files(name)?;
        self.load_definition(name, &files)?;
        self.end_slot(name, &files).await
    }

    /// Ends the QEMU of the run slot `files` if it is alive, and removes the slot's files.
    pub(crate) async fn end_slot(&self, name: &Name, files: &DomainFiles) -> Result<()> {
        match files.pid() {
            Some(pid) => self.end_process(name, files, pid).await,
            None => {
                self.forget(name, files.slot);
                files.clean()
            }
        }
    }

    /// Pauses the vCPUs.
    pub async fn pause(&self, name: &Name) -> Result<()> {
        let (_, _, client) = self.running(name).await?;
        client.execute(&Stop).await.map_err(qmp_error(name, "pausing"))?;
        Ok(())
    }

    /// Resumes the vCPUs. QEMU refuses `cont`, changing nothing, while a migration holds the
    /// guest in `finish-migrate`; then the migration is dealt with and `cont` sent again: one
    /// left waiting before its switch-over (by a toolstack that died while it snapshotted the
    /// disks of a pre-copy save) is cancelled, as QEMU keeps the guest stopped until it ends; one
    /// that completed is let settle.
    pub async fn resume(&self, name: &Name) -> Result<()> {
        let (_, _, client) = self.running(name).await?;
        // `cont` first: it is all a pause needs, and the resume is inside the guest's pause.
        match client.execute(&Cont).await {
            Ok(_) => return Ok(()),
            Err(error) if crate::stream_save::refused_in_finish_migrate(&error) => {
                tracing::debug!(domain = %name, %error, "cont refused; settling the migration first");
            }
            Err(error) => return Err(qmp_error(name, "resuming")(error)),
        }
        let migration = client
            .execute(&QueryMigrate)
            .await
            .map_err(qmp_error(name, "querying the migration state"))?;
        match migration.status {
            Some(MigrationStatus::PreSwitchover) => {
                tracing::warn!(domain = %name, "cancelling a migration left before its switch-over");
                client.execute(&MigrateCancel).await.map_err(qmp_error(
                    name,
                    "cancelling a migration left before its switch-over",
                ))?;
                self.wait_migration_ended(name, &client).await?;
            }
            Some(MigrationStatus::Completed) => drop(crate::stream_save::wait_until_settled(&client).await?),
            _ => {}
        }
        client.execute(&Cont).await.map_err(qmp_error(name, "resuming"))?;
        Ok(())
    }

    async fn wait_migration_ended(&self, name: &Name, client: &Client) -> Result<()> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let info = client
                .execute(&QueryMigrate)
                .await
                .map_err(qmp_error(name, "following a cancelled migration"))?;
            match info.status {
                Some(status) if crate::stream_save::migration_running(&status) => {}
                _ => return Ok(()),
            }
            if Instant::now() >= deadline {
                return Err(Error::MigrationFailed {
                    reason: format!("QEMU did not end a cancelled migration within {KILL_TIMEOUT:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The domain's state. Finding its QEMU dead cleans its stale files up.
    pub async fn status(&self, name: &Name) -> Result<DomainStatus> {
        let files = self.files(name)?;
        let config = self.load_definition(name, &files)?;
        if let Some(pid) = files.pid() {
            match self.run_state(name, &files, pid).await {
                Ok(state) => {
                    return Ok(DomainStatus {
                        name: name.clone(),
                        state: domain_state(&state),
                        pid: Some(pid),
                        mapped_image: crate::mapped_ram::mapped_image(&files),
                        accel: config.accel(),
                        guest_agent_socket: config.guest_agent.then(|| files.guest_agent_socket.clone()),
                    })
                }
                // QEMU may have exited since the check.
                Err(error) if files.pid().is_some() => return Err(error),
                Err(_) => {}
            }
        }
        self.clean_if_dead(name, &files)?;
        Ok(DomainStatus {
            name: name.clone(),
            state: DomainState::ShutOff,
            pid: None,
            mapped_image: None,
            accel: config.accel(),
            guest_agent_socket: None,
        })
    }

    /// Every defined domain's status, sorted by name.
    pub async fn list(&self) -> Result<Vec<DomainStatus>> {
        let domains = self.inner.state_dir.join("domains");
        let entries = match fs::read_dir(&domains) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            entries => entries.map_err(io_error("cannot list", &domains))?,
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("cannot list", &domains))?;
            // Foreign files in the folder are not domains.
            let Some(name) = entry.file_name().to_str().and_then(|n| Name::new(n).ok()) else {
                continue;
            };
            if entry.path().join("domain.toml").is_file() {
                names.push(name);
            }
        }
        names.sort();
        let mut statuses = Vec::with_capacity(names.len());
        for name in &names {
            statuses.push(self.status(name).await?);
        }
        Ok(statuses)
    }

    /// Removes a shut-off domain's definition and runtime files; the rest of its folder belongs
    /// to the snapshot store.
    pub async fn undefine(&self, name: &Name) -> Result<()> {
        let _lock = self.lock(name).await?;
        self.undefine_locked(name).await
    }

    /// [`QemuDriver::undefine`] with the domain's lock held by the caller. A standby QEMU left
    /// by an interrupted revert is ended.
    pub(crate) async fn undefine_locked(&self, name: &Name) -> Result<()> {
        let files = self.files(name)?;
        self.load_definition(name, &files)?;
        if let Some(pid) = files.pid() {
            return Err(Error::Running {
                domain: name.clone(),
                action: "undefine",
                pid,
            });
        }
        self.forget(name, files.slot);
        files.clean()?;
        self.end_slot(name, &self.standby_files(name)?).await?;
        fs::remove_file(&files.definition).map_err(io_error("cannot remove", &files.definition))?;
        Ok(durable::sync_dir(&files.dir)?)
    }

    /// The files, pid and a QMP connection of a domain that has a process.
    pub(crate) async fn running(&self, name: &Name) -> Result<(DomainFiles, u32, Client)> {
        let files = self.files(name)?;
        self.load_definition(name, &files)?;
        let Some(pid) = files.pid() else {
            self.clean_if_dead(name, &files)?;
            return Err(Error::NotRunning { domain: name.clone() });
        };
        let client = self.client(name, &files, pid).await?;
        Ok((files, pid, client))
    }

    pub(crate) fn load_definition(&self, name: &Name, files: &DomainFiles) -> Result<DomainConfig> {
        if !files.definition.is_file() {
            return Err(Error::UnknownDomain { domain: name.clone() });
        }
        DomainConfig::load(&files.definition)
    }

    pub(crate) fn write_definition(&self, files: &DomainFiles, config: &DomainConfig) -> Result<()> {
        let text = toml::to_string(config).map_err(|error| Error::InvalidConfig {
            path: None,
            reason: error.to_string(),
        })?;
        // A revert to a snapshot of the domain as it is defined (the usual case) redefines it
        // alike, in the guest's gap: no journal commit for that.
        durable::write_atomic_if_changed(&files.definition, text.as_bytes())
            .map(drop)
            .map_err(|source| Error::SaveDefinition {
                domain: config.name.clone(),
                source: Box::new(snapshot_core::Error::from(source)),
            })
    }

    /// The QEMU binary, checked once per driver.
    pub(crate) async fn qemu(&self) -> Result<PathBuf> {
        let record = self.inner.state_dir.join(QEMU_RECORD);
        let find = || process::find_qemu_remembered(&record);
        self.inner.qemu.get_or_try_init(find).await.cloned()
    }

    /// The canonical state directory: every process names the same domain's files alike, so
    /// the pid check and the RAM file name agree whatever path the caller used.
    fn root(&self) -> io::Result<&Path> {
        if let Some(root) = self.inner.root.get() {
            return Ok(root);
        }
        let root = fs::canonicalize(&self.inner.state_dir)?;
        Ok(self.inner.root.get_or_init(|| root))
    }

    /// The state directory, by its canonical path.
    pub(crate) fn state(&self, name: &Name) -> Result<StateDir> {
        let root = self.root().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => Error::UnknownDomain { domain: name.clone() },
            _ => Error::Io {
                operation: "cannot open the state directory",
                path: self.inner.state_dir.clone(),
                source,
            },
        })?;
        Ok(StateDir::new(root))
    }

    /// Waits for the domain's lock (the one lock of the state directory that every command on
    /// the domain holds). A domain without a folder is unknown, and none is made for it.
    pub(crate) async fn lock(&self, name: &Name) -> Result<DomainLock> {
        let state = self.state(name)?;
        if !state.domain(name).path().is_dir() {
            return Err(Error::UnknownDomain { domain: name.clone() });
        }
        state.lock(name, LOCK_TIMEOUT).await.map_err(|error| match error {
            snapshot_core::Error::Locked { .. } => Error::Busy {
                domain: name.clone(),
                seconds: LOCK_TIMEOUT.as_secs(),
            },
            snapshot_core::Error::Io {
                operation,
                path,
                source,
            } => Error::Io {
                operation,
                path,
                source,
            },
            other => Error::Io {
                operation: "cannot lock",
                path: state.domain(name).lock_file(),
                source: io::Error::other(other.to_string()),
            },
        })
    }

    /// Removes the files of a QEMU that is gone, unless another command holds the domain's lock
    /// (it is starting or stopping the domain, and the files may be its QEMU's).
    fn clean_if_dead(&self, name: &Name, files: &DomainFiles) -> Result<()> {
        if !files.has_leftovers() || !files.dir.is_dir() {
            return Ok(());
        }
        let Ok(Ok(_lock)) = self.state(name)?.try_lock(name) else {
            return Ok(());
        };
        if files.pid().is_none() {
            tracing::info!(domain = %name, "QEMU is gone; removing its stale files");
            self.forget(name, files.slot);
            files.clean()?;
        }
        Ok(())
    }

    /// Presses the power button of a running guest and waits for QEMU to exit.
    async fn power_off(&self, name: &Name, files: &DomainFiles, pid: u32, timeout: Duration) -> Result<()> {
        let client = self.client(name, files, pid).await?;
        let state = self.run_state(name, files, pid).await?;
        if state != RunState::Running {
            return Err(Error::WrongState {
                domain: name.clone(),
                state: state.as_str().to_owned(),
                hint: "its vCPUs cannot react to the power button; resume it or use --force",
            });
        }
        self.sync_disks(name, files, &client).await?;
        client
            .execute_raw("system_powerdown", serde_json::json!({}))
            .await
            .map_err(qmp_error(name, "pressing the power button"))?;
        if !process::wait_exit(pid, &files.marker(), timeout).await {
            return Err(Error::PowerOffTimeout {
                domain: name.clone(),
                seconds: timeout.as_secs(),
            });
        }
        self.forget(name, files.slot);
        files.clean()
    }

    /// Asks QEMU to quit (it closes its images cleanly); kills it if it does not answer or exit.
    async fn end_process(&self, name: &Name, files: &DomainFiles, pid: u32) -> Result<()> {
        let marker = files.marker();
        let quit = async {
            let client = self
                .client(name, files, pid)
                .await?
                .with_timeout(Some(QUIT_TIMEOUT));
            // Only the active slot's QEMU runs the defined disks: a standby's are a revert's.
            let active = self.files(name).is_ok_and(|active| active.slot == files.slot);
            if active {
                if let Err(error) = self.sync_disks(name, files, &client).await {
                    tracing::warn!(domain = %name, %error, "cannot record the active disk images");
                }
            }
            match client.execute(&Quit).await {
                // QEMU may close the connection before its reply is read.
                Err(error) if !error.is_disconnect() => Err(qmp_error(name, "quitting")(error)),
                _ => Ok(()),
            }
        };
        let exited = match quit.await {
            Ok(()) => process::wait_exit(pid, &marker, QUIT_TIMEOUT).await,
            Err(error) => {
                tracing::warn!(domain = %name, %error, "QEMU did not quit; killing it");
                false
            }
        };
        if !exited {
            process::kill(pid, &marker).map_err(|reason| Error::Kill {
                domain: name.clone(),
                pid,
                reason,
            })?;
            if !process::wait_exit(pid, &marker, KILL_TIMEOUT).await {
                return Err(Error::Kill {
                    domain: name.clone(),
                    pid,
                    reason: format!("still alive {} s after SIGKILL", KILL_TIMEOUT.as_secs()),
                });
            }
        }
        self.forget(name, files.slot);
        files.clean()
    }
}

/// `config` with absolute paths (QEMU runs from `/`).
pub(crate) fn absolute_paths(config: &DomainConfig) -> Result<DomainConfig> {
    let absolute = |path: &Path| std::path::absolute(path).map_err(io_error("cannot resolve", path));
    let mut config = config.clone();
    for path in [
        &mut config.kernel,
        &mut config.initrd,
        &mut config.serial_log,
        &mut config.nvram,
    ]
    .into_iter()
    .flatten()
    {
        *path = absolute(path)?;
    }
    for disk in &mut config.disks {
        disk.path = absolute(&disk.path)?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_qemus_running_state_is_running() {
        assert_eq!(domain_state(&RunState::Running), DomainState::Running);
        for state in [
            RunState::Paused,
            RunState::Prelaunch,
            RunState::InMigrate,
            RunState::PostMigrate,
        ] {
            assert_eq!(domain_state(&state), DomainState::Paused);
        }
    }

    #[tokio::test]
    async fn domains_are_defined_listed_and_undefined_without_qemu() {
        let state = tempfile::tempdir().unwrap();
        let driver = QemuDriver::new(state.path());
        let name = Name::new("vm1").unwrap();
        assert!(driver.list().await.unwrap().is_empty());
        let error = driver.status(&name).await.unwrap_err().to_string();
        assert_eq!(error, "domain vm1 is not defined");

        let config = DomainConfig::parse(
            "name = \"vm1\"\nmemory_mib = 64\nkernel = \"/k\"\n[[disks]]\nid = \"vda\"\npath = \"/d.qcow2\"",
            Path::new("/"),
        )
        .unwrap();
        driver.define(&config).await.unwrap();
        let definition = state.path().join("domains/vm1/domain.toml");
        assert!(definition.is_file());
        // Another driver (another process) sees it, with what the host decides pinned (the
        // machine type is QEMU's answer to `-machine help`).
        let other = QemuDriver::new(state.path());
        let mut stored = other.definition(&name).unwrap();
        let accel = crate::host::default_accel();
        assert_eq!(stored.accel, Some(accel));
        assert_eq!(stored.cpu.as_deref(), Some(accel.default_cpu()));
        assert!(stored.machine().starts_with("pc-q35-"), "{stored:?}");
        (stored.accel, stored.cpu, stored.machine) = (None, None, None);
        assert_eq!(stored, config);
        assert_eq!(
            other.list().await.unwrap(),
            [DomainStatus {
                name: name.clone(),
                state: DomainState::ShutOff,
                pid: None,
                mapped_image: None,
                accel: other.definition(&name).unwrap().accel(),
                guest_agent_socket: None,
            }]
        );
        let paths = other.runtime_paths(&name).unwrap();
        assert_eq!(
            paths.serial_log,
            state
                .path()
                .canonicalize()
                .unwrap()
                .join("domains/vm1/serial.log")
        );
        let ram = paths.ram_file.to_str().unwrap().to_owned();
        assert!(
            ram.starts_with("/dev/shm/domsnap-") && ram.ends_with("-vm1.ram"),
            "{ram}"
        );

        // Sorted by name; foreign entries are not domains.
        let mut first = config.clone();
        first.name = Name::new("a0").unwrap();
        driver.define(&first).await.unwrap();
        fs::create_dir(state.path().join("domains/.hidden")).unwrap();
        let names: Vec<_> = other.list().await.unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, [first.name.clone(), name.clone()]);

        let error = driver.stop(&name, StopMode::Force).await.unwrap_err().to_string();
        assert_eq!(error, "domain vm1 is shut off");
        driver.destroy(&name).await.unwrap();
        driver.undefine(&name).await.unwrap();
        assert!(!definition.exists() && state.path().join("domains/vm1").is_dir());
        assert_eq!(driver.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn relative_paths_become_absolute_and_long_socket_paths_are_refused() {
        let state = tempfile::tempdir().unwrap();
        let driver = QemuDriver::new(state.path());
        let mut config =
            DomainConfig::parse("name = \"vm\"\nmemory_mib = 64\nkernel = \"/k\"", Path::new("/")).unwrap();
        config.initrd = Some("relative/initrd".into());
        driver.define(&config).await.unwrap();
        let stored = driver.definition(&config.name).unwrap();
        assert_eq!(
            stored.initrd,
            Some(std::env::current_dir().unwrap().join("relative/initrd"))
        );

        let deep = state.path().join("x".repeat(100));
        let error = QemuDriver::new(&deep)
            .define(&config)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("qmp.sock") && error.contains("107 bytes"),
            "{error}"
        );
    }
}
