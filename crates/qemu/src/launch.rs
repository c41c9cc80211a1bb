//! Starting a domain's QEMU: the checks, a fresh run folder, guest RAM (a fresh shared file, or
//! a memory image mapped copy-on-write, see `mapped_ram`), the QEMU process (in a session of its
//! own) and the wait for its initialisation.

use std::{
    fs::{self, DirBuilder, OpenOptions},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use snapshot_core::{IncomingRam, IncomingStart, Name};

use crate::{
    command_line::{escape, qemu_args, StartMode},
    config::DomainConfig,
    driver::{io_error, DomainFiles, QemuDriver},
    error::{Error, Result},
    process,
};

/// Longest wait for QEMU's initialisation.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl QemuDriver {
    /// Starts QEMU for a shut-off domain.
    pub(crate) async fn launch(&self, name: &Name, mode: StartMode) -> Result<()> {
        let _lock = self.lock(name).await?;
        self.launch_locked(name, mode).await
    }

    /// Starts QEMU, with the domain's lock held by the caller.
    pub(crate) async fn launch_locked(&self, name: &Name, mode: StartMode) -> Result<()> {
        let prepared = self.prepare_launch(name).await?;
        self.spawn_qemu(name, &prepared, mode).await
    }

    /// Checks that the shut-off domain can start and prepares its active run slot
    /// ([`QemuDriver::prepare_run`]). A standby QEMU left by an interrupted revert is ended
    /// first: a domain started normally never has one beside it.
    pub(crate) async fn prepare_launch(&self, name: &Name) -> Result<Launch> {
        let files = self.files(name)?;
        let config = self.load_definition(name, &files)?;
        if let Some(pid) = files.pid() {
            return Err(Error::Running {
                domain: name.clone(),
                action: "start",
                pid,
            });
        }
        self.end_slot(name, &self.standby_files(name)?).await?;
        self.prepare_run(name, files, config).await
    }

    /// Checks that QEMU can start `config` in the run slot `files` (whose QEMU has ended),
    /// removes what an earlier QEMU left there (its run folder, with the link of a mapped
    /// memory image, and its RAM file) and makes a fresh run folder.
    pub(crate) async fn prepare_run(
        &self,
        name: &Name,
        files: DomainFiles,
        config: DomainConfig,
    ) -> Result<Launch> {
        // The run_as user may have gone since the definition.
        config.check_host()?;
        check_firmware(name, &config)?;
        files.check_socket_paths()?;
        self.forget(name, files.slot);
        files.clean()?;
        let binary = self.qemu().await?;
        DirBuilder::new()
            .mode(0o700)
            .create(&files.run)
            .map_err(io_error("cannot create", &files.run))?;
        Ok(Launch {
            files,
            config,
            binary,
        })
    }

    /// Starts a prepared launch to receive its state ([`StartMode::Incoming`]), on fresh shared
    /// RAM or with its RAM mapped from a memory image (`mapped_ram`, which falls back to fresh
    /// RAM when the image cannot be linked).
    pub(crate) async fn start_prepared_incoming(
        &self,
        name: &Name,
        launch: Launch,
        ram: IncomingRam<'_>,
    ) -> Result<IncomingStart> {
        match ram {
            IncomingRam::Fresh => {
                self.spawn_qemu(name, &launch, StartMode::Incoming).await?;
                Ok(IncomingStart::Fresh { fallback: None })
            }
            IncomingRam::Image(image) => self.start_mapped(name, launch, image).await,
        }
    }

    /// Spawns the QEMU of a prepared launch in `mode` and waits until it has initialised. A
    /// failed start removes the run folder and the RAM file.
    pub(crate) async fn spawn_qemu(&self, name: &Name, launch: &Launch, mode: StartMode) -> Result<()> {
        let Launch {
            files,
            config,
            binary,
        } = launch;
        if !matches!(mode, StartMode::IncomingMapped { .. }) {
            if let Err(error) = create_ram_file(name, files, config).await {
                let _ = files.clean();
                return Err(error);
            }
        }
        let log = open_private_log(&files.qemu_log)?;
        // QEMU appends the guest's console to the serial log; it may hold the guest's secrets.
        let runtime = files.runtime(config);
        open_private_log(&runtime.serial_log)?;
        let log_too = log
            .try_clone()
            .map_err(io_error("cannot open", &files.qemu_log))?;

        let mut args = qemu_args(config, &runtime, mode);
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", escape(&files.status_socket)).into(),
            "-pidfile".into(),
            files.pid_file.clone().into(),
            "-D".into(),
            files.qemu_log.clone().into(),
        ]);
        let mut command = tokio::process::Command::new(binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too);
        // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent; it is all
        // the child runs between `fork` and `exec`.
        unsafe {
            // QEMU runs in a session of its own, without a terminal: it outlives the command
            // that started it, and a Ctrl-C or hang-up at the caller's terminal never reaches it.
            command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
        }
        match command.spawn() {
            Ok(child) => wait_initialised(name, files, child).await,
            Err(source) => {
                files.clean()?;
                Err(Error::QemuNotFound {
                    binary: binary.clone(),
                    source,
                })
            }
        }
    }
}

/// A launch whose checks passed and whose run folder is ready.
#[derive(Debug)]
pub(crate) struct Launch {
    pub(crate) files: DomainFiles,
    pub(crate) config: DomainConfig,
    binary: PathBuf,
}

/// Waits until QEMU has initialised: its status monitor answers `qmp_capabilities` only once
/// QEMU's main loop runs (disks open and locked, privileges dropped, every socket listening; the
/// greeting alone comes earlier, from the monitor's own thread). A QEMU that exits first, or
/// takes longer than [`START_TIMEOUT`], fails the start: it is ended and the domain's runtime
/// files removed. Afterwards a task reaps the process when it exits (QEMU is this process's
/// child; once this process has exited, init is its parent).
async fn wait_initialised(name: &Name, files: &DomainFiles, mut child: tokio::process::Child) -> Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let failure = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(format!("QEMU exited while it initialised ({status})")),
            Ok(None) => {}
            Err(error) => break Some(format!("cannot wait for QEMU: {error}")),
        }
        if answers_qmp(&files.status_socket).await {
            break files.pid().is_none().then(|| "QEMU wrote no pid file".to_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            break Some(format!(
                "it did not finish initialising within {} s",
                START_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(READY_POLL).await;
    };
    let Some(reason) = failure else {
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        return Ok(());
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    let stderr = process::log_tail(&files.qemu_log);
    if let Err(error) = files.clean() {
        tracing::warn!(%error, "cannot clean up after a failed start");
    }
    Err(Error::StartFailed {
        domain: name.clone(),
        reason,
        stderr,
    })
}

/// How often [`wait_initialised`] looks whether QEMU is ready.
const READY_POLL: Duration = Duration::from_millis(1);

/// Whether a QMP monitor listens on `socket` and QEMU's main loop has answered its handshake
/// (`qmp_capabilities`).
async fn answers_qmp(socket: &Path) -> bool {
    let options = qmp::ClientOptions {
        handshake_timeout: START_TIMEOUT,
        ..qmp::ClientOptions::default()
    };
    qmp::Client::connect_unix(socket, options).await.is_ok()
}

/// A fresh, private RAM file for the slot `files`: on tmpfs, or on the `hugepages` mount with
/// its link at the tmpfs name. A restore writes only the non-zero pages into it.
async fn create_ram_file(name: &Name, files: &DomainFiles, config: &DomainConfig) -> Result<()> {
    if let Some(mount) = config.hugepages.clone() {
        let (link, bytes) = (files.ram_file.clone(), config.memory_bytes());
        // It may wait for pages a QEMU that just ended gives back.
        let made = tokio::task::spawn_blocking({
            let mount = mount.clone();
            move || crate::hugepages::create_ram_file(&link, &mount, bytes)
        })
        .await
        .map_err(|error| io_error("cannot create the RAM file", &files.ram_file)(error.into()))?;
        return made.map_err(|source| Error::HugePages {
            domain: name.clone(),
            mount,
            source,
        });
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&files.ram_file)
        .map(drop)
        .map_err(io_error("cannot create the RAM file", &files.ram_file))
}

/// A UEFI domain needs OVMF and its NVRAM image (made when it was defined).
fn check_firmware(name: &Name, config: &DomainConfig) -> Result<()> {
    if config.firmware != crate::config::Firmware::Uefi {
        return Ok(());
    }
    let missing = |reason: String| {
        Err(Error::Firmware {
            domain: name.clone(),
            reason,
        })
    };
    if !crate::command_line::ovmf_installed() {
        return missing(format!(
            "firmware = \"uefi\" needs OVMF ({}): install Debian's ovmf package",
            crate::command_line::OVMF_CODE
        ));
    }
    match &config.nvram {
        Some(nvram) if nvram.is_file() => Ok(()),
        Some(nvram) => missing(format!("its NVRAM image {} is missing", nvram.display())),
        None => missing("it has no NVRAM image: define it again".into()),
    }
}

/// Opens (creating if needed) a log file for appending, private to its owner: mode 0600, and a
/// symlink in its place is refused rather than followed.
fn open_private_log(path: &Path) -> Result<fs::File> {
    let file = durable::private_options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error("cannot open", path))?;
    // A log made by an older version may be world-readable.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(durable::FILE_MODE))
        .map_err(io_error("cannot make private", path))?;
    Ok(file)
}
