//! The QEMU 10 command line of a domain.
//!
//! The accelerator, the machine's (versioned) type and the vCPU model come from the definition
//! (unset in a definition made before domsnap pinned them: TCG, `q35`, QEMU's default CPU).
//! Guest RAM is a `memory-backend-file` with `share=on`, so the toolstack can map the same file to
//! save and restore memory; disks are `-blockdev` file + format (qcow2 or raw) nodes on
//! virtio-blk, a virtio-scsi controller or NVMe; a UEFI domain's NVRAM image is a qcow2 node on
//! the second flash; network cards and the guest agent's virtio-serial channel follow the
//! definition (`devices`); QMP listens on a Unix socket. A restore starts the same machine with `-incoming defer` and QEMU's default
//! `migration.send-configuration=on`: every device-state file the driver loads carries QEMU's
//! configuration section (files of older domsnap versions get it inserted when loaded), and only
//! a QEMU that loaded one with it can migrate, so be snapshotted, again.
//!
//! A lazy revert starts the restoring QEMU on the snapshot's memory image instead
//! ([`StartMode::IncomingMapped`]): `memory-backend-file` with `mem-path` the image,
//! `offset` its header length (the image's data area is guest RAM in page order), `share=off`
//! (a private copy-on-write mapping: the guest's writes never reach the file), `readonly=on`
//! (QEMU opens the file read-only) and `rom=off` (the RAM stays writable for the guest).

use std::{ffi::OsString, path::PathBuf};

use crate::config::DomainConfig;

mod devices;

pub use devices::{ovmf_installed, GUEST_AGENT_PORT, OVMF_CODE, OVMF_VARS_TEMPLATE};

/// QEMU's seccomp sandbox, always on: no obsolete system calls, no changes of scheduling or CPU
/// affinity (`resourcecontrol`). `spawn=deny` is left out because a bridge card's
/// `qemu-bridge-helper` is a process QEMU spawns, and `elevateprivileges=deny` because it
/// forbids the `setuid`/`setgid` with which QEMU drops to a domain's `run_as` user.
pub const SANDBOX: &str = "on,obsolete=deny,resourcecontrol=deny";

/// The memory backend's id (the RAM block QEMU names in its migration stream).
pub const RAM_BACKEND_ID: &str = "mem";

/// Files of a running domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePaths {
    /// Guest RAM (best on tmpfs, e.g. under /dev/shm).
    pub ram_file: PathBuf,
    /// The QMP socket.
    pub qmp_socket: PathBuf,
    /// The serial console log (appended to, so it spans restores).
    pub serial_log: PathBuf,
    /// The serial console as a Unix socket, for typing into the guest.
    pub console_socket: PathBuf,
    /// The guest agent's channel (a domain with `guest_agent = true`).
    pub guest_agent_socket: PathBuf,
}

/// How the domain starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartMode {
    /// Boot normally; with `paused`, the vCPUs wait for `cont`.
    Boot {
        /// Start with `-S`.
        paused: bool,
    },
    /// Wait for `migrate-incoming` with the saved device state (RAM is written into the RAM file
    /// by the toolstack first); the vCPUs stay stopped afterwards until `cont`.
    Incoming,
    /// As [`StartMode::Incoming`], with guest RAM mapped copy-on-write from a memory image
    /// instead of the shared RAM file: `image`'s bytes from `offset` on are guest RAM in page
    /// order (for q35 that is also the order of the RAM file's offsets). The image is never
    /// written, and the toolstack cannot see the guest's RAM.
    IncomingMapped {
        /// The memory image (or a link to it).
        image: PathBuf,
        /// Where its page data starts: the image's header length, a multiple of 4096.
        offset: u64,
    },
}

/// The block node names of a disk.
pub fn disk_nodes(disk_id: &str) -> (String, String) {
    (format!("file-{disk_id}"), format!("disk-{disk_id}"))
}

/// The full argument list for `qemu-system-x86_64`.
pub fn qemu_args(config: &DomainConfig, paths: &RuntimePaths, mode: StartMode) -> Vec<OsString> {
    let mut args = Args::default();
    let mib = config.memory_mib;
    args.pair("-name", format!("{},debug-threads=on", config.name));
    args.pair("-accel", config.accel().as_str());
    args.pair(
        "-machine",
        format!(
            "{},memory-backend={RAM_BACKEND_ID}{}",
            config.machine(),
            devices::machine_flash(config).unwrap_or_default()
        ),
    );
    if let Some(cpu) = &config.cpu {
        args.pair("-cpu", cpu.clone());
    }
    args.pair("-m", format!("{mib}M"));
    args.pair("-smp", config.vcpus.to_string());
    args.pair("-sandbox", SANDBOX);
    if let Some(user) = &config.run_as {
        // QEMU opens its files (RAM, sockets, disks, logs) as root, then drops to the user.
        args.pair("-run-with", format!("user={user}"));
    }
    let ram = match &mode {
        StartMode::IncomingMapped { image, offset } => format!(
            "memory-backend-file,id={RAM_BACKEND_ID},size={mib}M,mem-path={},offset={offset},\
             share=off,readonly=on,rom=off",
            escape(image)
        ),
        StartMode::Boot { .. } | StartMode::Incoming => format!(
            "memory-backend-file,id={RAM_BACKEND_ID},size={mib}M,mem-path={},share=on",
            escape(&paths.ram_file)
        ),
    };
    args.pair("-object", ram);
    args.flag("-nodefaults");
    args.flag("-no-user-config");
    args.pair("-display", "none");
    args.pair(
        "-qmp",
        format!("unix:{},server=on,wait=off", escape(&paths.qmp_socket)),
    );
    args.pair(
        "-chardev",
        format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            escape(&paths.console_socket),
            escape(&paths.serial_log)
        ),
    );
    args.pair("-serial", "chardev:console");
    if let Some(kernel) = &config.kernel {
        args.pair("-kernel", kernel.clone());
        if let Some(initrd) = &config.initrd {
            args.pair("-initrd", initrd.clone());
        }
        if let Some(cmdline) = &config.cmdline {
            args.pair("-append", cmdline.clone());
        }
    }
    devices::firmware(&mut args, config);
    devices::disks(&mut args, config);
    devices::nics(&mut args, config);
    devices::guest_agent(&mut args, config, paths);
    match mode {
        StartMode::Boot { paused: false } => {}
        StartMode::Boot { paused: true } => args.flag("-S"),
        StartMode::Incoming | StartMode::IncomingMapped { .. } => {
            args.pair("-incoming", "defer");
            args.flag("-S");
        }
    }
    args.0
}

/// QEMU's option syntax: a comma inside a value is written twice.
pub(crate) fn escape(path: &std::path::Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.into());
    }

    fn pair(&mut self, flag: &str, value: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(value.into());
    }
}

/// The QEMU id of network card `index`'s `-netdev` backend.
pub(crate) fn netdev_id(index: usize) -> String {
    format!("net{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> DomainConfig {
        DomainConfig::parse(
            "name = \"vm1\"\nmemory_mib = 256\nkernel = \"/k\"\ncmdline = \"console=ttyS0\"\n\
             [[disks]]\nid = \"vda\"\npath = \"/img/a,b.qcow2\"",
            Path::new("/"),
        )
        .unwrap()
    }

    fn paths() -> RuntimePaths {
        RuntimePaths {
            ram_file: "/dev/shm/vm1/ram".into(),
            qmp_socket: "/run/vm1/qmp.sock".into(),
            serial_log: "/run/vm1/serial.log".into(),
            console_socket: "/run/vm1/console.sock".into(),
            guest_agent_socket: "/run/vm1/qga.sock".into(),
        }
    }

    fn joined(mode: StartMode) -> String {
        qemu_args(&config(), &paths(), mode)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn boot_line_has_shared_ram_qmp_serial_and_blockdev_disks() {
        let line = joined(StartMode::Boot { paused: false });
        for expected in [
            "-accel tcg -machine q35,memory-backend=mem -m 256M -smp 1",
            "-object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/vm1/ram,share=on",
            "-qmp unix:/run/vm1/qmp.sock,server=on,wait=off",
            "-chardev socket,id=console,path=/run/vm1/console.sock,server=on,wait=off,\
             logfile=/run/vm1/serial.log,logappend=on -serial chardev:console",
            "-kernel /k -append console=ttyS0",
            "-blockdev driver=file,filename=/img/a,,b.qcow2,node-name=file-vda,drop-cache=off",
            "-blockdev driver=qcow2,file=file-vda,node-name=disk-vda",
            "-device virtio-blk-pci,drive=disk-vda,id=vda",
        ] {
            assert!(line.contains(expected), "missing {expected:?} in {line}");
        }
        assert!(!line.contains("-S") && !line.contains("-incoming"));
        assert!(
            line.contains("-sandbox on,obsolete=deny,resourcecontrol=deny "),
            "{line}"
        );
        assert!(!line.contains("-run-with"), "{line}");
    }

    #[test]
    fn run_as_makes_qemu_drop_to_the_user() {
        let mut config = config();
        config.run_as = Some("qemu".into());
        let line = qemu_args(&config, &paths(), StartMode::Boot { paused: false })
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(line.contains(" -run-with user=qemu "), "{line}");
    }

    #[test]
    fn restore_line_waits_for_incoming_state_paused() {
        let line = joined(StartMode::Incoming);
        assert!(line.ends_with("-incoming defer -S"), "{line}");
        // A QEMU restored without the configuration section aborts on its next migration.
        assert!(!line.contains("send-configuration"), "{line}");
        assert!(joined(StartMode::Boot { paused: true }).ends_with(" -S"));
    }

    #[test]
    fn a_mapped_image_is_private_read_only_on_disk_and_writable_in_memory() {
        let line = joined(StartMode::IncomingMapped {
            image: "/state/vm1/run/ram,base.img".into(),
            offset: 4096,
        });
        assert!(
            line.contains(
                "-object memory-backend-file,id=mem,size=256M,mem-path=/state/vm1/run/ram,,base.img,\
                 offset=4096,share=off,readonly=on,rom=off "
            ),
            "{line}"
        );
        // Not the shared RAM file, and never shared.
        assert!(
            !line.contains("/dev/shm/vm1/ram") && !line.contains("share=on"),
            "{line}"
        );
        assert!(line.contains("-machine q35,memory-backend=mem -m 256M"), "{line}");
        assert!(line.ends_with("-incoming defer -S"), "{line}");
        assert!(!line.contains("send-configuration"), "{line}");
    }
}
