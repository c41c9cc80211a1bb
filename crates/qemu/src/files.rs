//! A domain's files, and its two run slots.
//!
//! Each slot is where one QEMU process of the domain keeps its files: slot 0 is `run/` (the
//! only one before standby processes existed, so older state directories keep working), slot
//! 1 is `run-1/`; each has its own sockets, pid file, log, mapped-image link and RAM file in
//! `/dev/shm`. A domain's QEMU runs in its **active** slot, named by the file `active-slot` in
//! the domain's folder (absent: slot 0). A revert starts the new QEMU in the other slot (the
//! standby, see `standby`) while the old one runs on, and makes that slot active once the old
//! one has ended; every other call uses the active slot, so it finds the new QEMU from then on.

use std::{
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use snapshot_core::Name;

use crate::{
    command_line::{escape, RuntimePaths},
    config::DomainConfig,
    driver::{io_error, QemuDriver},
    error::{Error, Result},
    process,
};

/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Where guest RAM files go (tmpfs).
const RAM_DIR: &str = "/dev/shm";
/// The file in the domain's folder naming its active run slot (absent: slot 0).
const ACTIVE_SLOT_FILE: &str = "active-slot";

/// One of a domain's two run slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RunSlot {
    /// `run/`, the RAM file `domsnap-UID-HASH-NAME.ram`.
    Zero,
    /// `run-1/`, the RAM file `domsnap-UID-HASH-NAME+1.ram` (`+` is not allowed in a domain
    /// name, so no other domain's RAM file has this name).
    One,
}

impl RunSlot {
    /// The other slot.
    pub(crate) fn other(self) -> RunSlot {
        match self {
            RunSlot::Zero => RunSlot::One,
            RunSlot::One => RunSlot::Zero,
        }
    }

    /// How the active-slot file names it.
    fn as_str(self) -> &'static str {
        match self {
            RunSlot::Zero => "0",
            RunSlot::One => "1",
        }
    }

    /// The run folder's name in the domain's folder.
    fn run_dir_name(self) -> &'static str {
        match self {
            RunSlot::Zero => "run",
            RunSlot::One => "run-1",
        }
    }

    /// What ends the RAM file's name after the domain's name.
    fn ram_suffix(self) -> &'static str {
        match self {
            RunSlot::Zero => ".ram",
            RunSlot::One => "+1.ram",
        }
    }
}

/// The files of one domain, with those of one of its run slots.
#[derive(Debug)]
pub(crate) struct DomainFiles {
    pub(crate) dir: PathBuf,
    /// The run slot the runtime files below are of.
    pub(crate) slot: RunSlot,
    pub(crate) definition: PathBuf,
    pub(crate) run: PathBuf,
    pub(crate) pid_file: PathBuf,
    pub(crate) qemu_log: PathBuf,
    pub(crate) qmp_socket: PathBuf,
    pub(crate) status_socket: PathBuf,
    console_socket: PathBuf,
    pub(crate) guest_agent_socket: PathBuf,
    default_serial_log: PathBuf,
    pub(crate) ram_file: PathBuf,
    /// The hard link of the memory image the running QEMU maps as its RAM (a lazy revert).
    pub(crate) ram_base: PathBuf,
    /// The path of the image `ram_base` links to, for messages.
    pub(crate) ram_base_origin: PathBuf,
}

impl DomainFiles {
    pub(crate) fn runtime(&self, config: &DomainConfig) -> RuntimePaths {
        RuntimePaths {
            ram_file: self.ram_file.clone(),
            qmp_socket: self.qmp_socket.clone(),
            serial_log: config
                .serial_log
                .clone()
                .unwrap_or_else(|| self.default_serial_log.clone()),
            console_socket: self.console_socket.clone(),
            guest_agent_socket: self.guest_agent_socket.clone(),
        }
    }

    /// What QEMU's command line contains, and no other process's does: the QMP socket option
    /// (the slot's own, so the QEMUs of the two slots are told apart).
    pub(crate) fn marker(&self) -> Vec<u8> {
        format!("unix:{},server=on", escape(&self.qmp_socket)).into_bytes()
    }

    /// QEMU's pid, if the slot's QEMU is alive.
    pub(crate) fn pid(&self) -> Option<u32> {
        process::read_pid(&self.pid_file).filter(|&pid| process::is_our_qemu(pid, &self.marker()))
    }

    pub(crate) fn check_socket_paths(&self) -> Result<()> {
        for socket in [
            &self.qmp_socket,
            &self.status_socket,
            &self.console_socket,
            &self.guest_agent_socket,
        ] {
            let len = socket.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(Error::SocketPathTooLong {
                    path: socket.clone(),
                    len,
                    max: MAX_SOCKET_PATH,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn has_leftovers(&self) -> bool {
        self.run.exists() || fs::symlink_metadata(&self.ram_file).is_ok()
    }

    /// Removes the slot's runtime files (with a mapped memory image's link) and its RAM file (of
    /// a QEMU that has ended): on tmpfs, or on hugetlbfs with its link (`hugepages`).
    pub(crate) fn clean(&self) -> Result<()> {
        removed(&self.run, fs::remove_dir_all(&self.run))?;
        if let Some(huge_page_file) = crate::hugepages::linked_ram_file(&self.ram_file) {
            removed(&huge_page_file, fs::remove_file(&huge_page_file))?;
        }
        removed(&self.ram_file, fs::remove_file(&self.ram_file))
    }

    /// Makes this slot the domain's active one (durably: written, fsynced, renamed).
    pub(crate) fn make_active(&self) -> Result<()> {
        let text = format!("{}\n", self.slot.as_str());
        Ok(durable::write_atomic(
            &self.dir.join(ACTIVE_SLOT_FILE),
            text.as_bytes(),
        )?)
    }
}

/// The outcome of removing `path`; a path already gone is no error.
fn removed(path: &Path, outcome: io::Result<()>) -> Result<()> {
    match outcome {
        Err(source) if source.kind() != io::ErrorKind::NotFound => {
            Err(io_error("cannot remove", path)(source))
        }
        _ => Ok(()),
    }
}

/// The active slot of the domain whose folder is `dir`.
fn active_slot(dir: &Path) -> Result<RunSlot> {
    let path = dir.join(ACTIVE_SLOT_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => match text.trim() {
            "0" => Ok(RunSlot::Zero),
            "1" => Ok(RunSlot::One),
            other => Err(io_error("cannot read the active run slot from", &path)(
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("it says {other:?}, not 0 or 1"),
                ),
            )),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(RunSlot::Zero),
        Err(error) => Err(io_error("cannot read", &path)(error)),
    }
}

impl QemuDriver {
    /// The domain's files, with its active run slot's; fails for a domain that cannot exist
    /// (no state directory).
    pub(crate) fn files(&self, name: &Name) -> Result<DomainFiles> {
        let dir = self.state(name)?.domain(name);
        self.slot_files(name, active_slot(dir.path())?)
    }

    /// The domain's files, with its standby slot's (the one that is not active).
    pub(crate) fn standby_files(&self, name: &Name) -> Result<DomainFiles> {
        let dir = self.state(name)?.domain(name);
        self.slot_files(name, active_slot(dir.path())?.other())
    }

    fn slot_files(&self, name: &Name, slot: RunSlot) -> Result<DomainFiles> {
        let state = self.state(name)?;
        let domain = state.domain(name);
        let run = match slot {
            // The state directory's owner names the first slot's folder.
            RunSlot::Zero => domain.run_dir(),
            RunSlot::One => domain.path().join(slot.run_dir_name()),
        };
        let hash = xxhash_rust::xxh3::xxh3_64(state.root().as_os_str().as_bytes());
        let ram_file = Path::new(RAM_DIR).join(format!(
            "domsnap-{}-{:08x}-{name}{}",
            nix::unistd::getuid(),
            hash >> 32,
            slot.ram_suffix()
        ));
        Ok(DomainFiles {
            definition: domain.definition_file(),
            pid_file: run.join("qemu.pid"),
            qemu_log: run.join("qemu.log"),
            qmp_socket: run.join("qmp.sock"),
            status_socket: run.join("status.sock"),
            console_socket: run.join("console.sock"),
            guest_agent_socket: run.join("qga.sock"),
            ram_base: run.join(crate::mapped_ram::RAM_BASE),
            ram_base_origin: run.join(crate::mapped_ram::RAM_BASE_ORIGIN),
            default_serial_log: domain.serial_log(),
            ram_file,
            dir: domain.path().to_owned(),
            slot,
            run,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_slots_have_their_own_files_and_the_active_one_is_recorded() {
        let state = tempfile::tempdir().unwrap();
        let driver = QemuDriver::new(state.path());
        let name = Name::new("vm.1").unwrap();
        let dir = state.path().canonicalize().unwrap().join("domains/vm.1");
        durable::create_private_dir_all(&dir).unwrap();
        let (active, standby) = (driver.files(&name).unwrap(), driver.standby_files(&name).unwrap());
        assert_eq!((active.slot, standby.slot), (RunSlot::Zero, RunSlot::One));
        assert_eq!(active.run, dir.join("run"));
        assert_eq!(standby.run, dir.join("run-1"));
        let ram = |files: &DomainFiles| files.ram_file.to_str().unwrap().to_owned();
        assert!(ram(&active).ends_with("-vm.1.ram"), "{}", ram(&active));
        assert!(ram(&standby).ends_with("-vm.1+1.ram"), "{}", ram(&standby));
        assert_ne!(active.marker(), standby.marker());

        standby.make_active().unwrap();
        let (active, standby) = (driver.files(&name).unwrap(), driver.standby_files(&name).unwrap());
        assert_eq!((active.slot, standby.slot), (RunSlot::One, RunSlot::Zero));
        assert_eq!(fs::read_to_string(dir.join(ACTIVE_SLOT_FILE)).unwrap(), "1\n");
        standby.make_active().unwrap();
        assert_eq!(driver.files(&name).unwrap().slot, RunSlot::Zero);

        fs::write(dir.join(ACTIVE_SLOT_FILE), "2").unwrap();
        let error = driver.files(&name).unwrap_err().to_string();
        assert!(error.contains("active-slot"), "{error}");
    }
}
