//! Starting a domain's QEMU: the checks, a fresh run folder, guest RAM (a fresh shared file, or
//! a memory image mapped copy-on-write, see `mapped_ram`), the daemonized process and the wait
//! for its initialisation.

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
    driver::{io_error, DomainFiles, QemuDriver, KILL_TIMEOUT},
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

    /// Spawns the daemonized QEMU of a prepared launch in `mode` and waits until it has
    /// initialised. A failed start removes the run folder and the RAM file.
    pub(crate) async fn spawn_qemu(&self, name: &Name, launch: &Launch, mode: StartMode) -> Result<()> {
        let Launch {
            files,
            config,
            binary,
        } = launch;
        if !matches!(mode, StartMode::IncomingMapped { .. }) {
            // A fresh, private RAM file: a restore writes only the non-zero pages into it.
            let created = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&files.ram_file);
            if let Err(source) = created {
                let _ = files.clean();
                return Err(io_error("cannot create the RAM file", &files.ram_file)(source));
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
            "-daemonize".into(),
            "-pidfile".into(),
            files.pid_file.clone().into(),
            "-D".into(),
            files.qemu_log.clone().into(),
        ]);
        let spawned = tokio::process::Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            // Not in the caller's process group: a Ctrl-C at the terminal must not reach QEMU
            // before it has detached.
            .process_group(0)
            .spawn();
        match spawned {
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

/// Waits for QEMU's first process to exit (`-daemonize`: once initialisation has finished) and
/// checks that the daemon lives; on failure ends it and removes the domain's runtime files.
async fn wait_initialised(name: &Name, files: &DomainFiles, mut child: tokio::process::Child) -> Result<()> {
    let failure = match tokio::time::timeout(START_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => None,
        Ok(Ok(status)) => Some(format!("QEMU {status}")),
        Ok(Err(error)) => Some(format!("cannot wait for QEMU: {error}")),
        Err(_) => {
            let _ = child.start_kill();
            Some(format!(
                "it did not finish initialising within {} s",
                START_TIMEOUT.as_secs()
            ))
        }
    };
    let failure = failure.or_else(|| {
        files
            .pid()
            .is_none()
            .then(|| "QEMU exited right after initialising".to_owned())
    });
    let Some(reason) = failure else {
        return Ok(());
    };
    // The daemon may have been forked before the failure.
    if let Some(pid) = files.pid() {
        let _ = process::kill(pid, &files.marker());
        process::wait_exit(pid, &files.marker(), KILL_TIMEOUT).await;
    }
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
