//! The Debian 12 test guest: a real operating system (systemd, the Debian kernel and its initramfs,
//! `qemu-guest-agent`, a static 10.0.2.15 plus DHCP on its virtio NIC) with one service of ours, `dscounter`, that counts once
//! a second in memory, prints `DSCOUNTER <n>` on the serial console and serves the value over HTTP on
//! port 80. `cargo xtask setup` builds it into `<guest dir>/debian/` (see `docs/debian-guest.md`).
//!
//! ```no_run
//! let guest = testkit::debian_guest();
//! let vm = guest.vm("deb").spawn();
//! let n = vm.wait_for_counter_after(0, std::time::Duration::from_secs(300)).unwrap();
//! assert!(vm.http_counter(std::time::Duration::from_secs(60)).unwrap() >= n);
//! vm.agent_ping(std::time::Duration::from_secs(60)).unwrap();
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::guest_dir;

pub use crate::debian_vm::{DebianBoot, DebianVm, DebianVmBuilder};

/// The Debian guest's folder inside the guest folder.
pub const DEBIAN_SUBDIR: &str = "debian";
/// The Debian kernel (`/boot/vmlinuz-*` of the image).
pub const DEBIAN_KERNEL_FILE: &str = "vmlinuz";
/// The Debian initramfs (`/boot/initrd.img-*` of the image, made by initramfs-tools).
pub const DEBIAN_INITRD_FILE: &str = "initrd.img";
/// The root filesystem: ext4 on the whole disk (no partition table), qcow2. Booted with
/// [`DEBIAN_KERNEL_FILE`], [`DEBIAN_INITRD_FILE`] and [`DEBIAN_CMDLINE`].
pub const DEBIAN_ROOT_FILE: &str = "root.qcow2";
/// The same system on a bootable disk, qcow2: GPT, an EFI system partition (FAT, also marked legacy
/// BIOS bootable) holding the kernel, the initramfs, SYSLINUX (SeaBIOS) and systemd-boot (OVMF),
/// then the ext4 root partition.
pub const DEBIAN_DISK_FILE: &str = "disk.qcow2";
/// The build's description ([`DebianGuestInfo`]), written last: it marks a complete build.
pub const DEBIAN_INFO_FILE: &str = "debian.json";
/// The kernel command line for [`DEBIAN_ROOT_FILE`] on the first virtio disk.
pub const DEBIAN_CMDLINE: &str = "root=/dev/vda rw console=ttyS0";
/// The filesystem label of the root filesystem in both images.
pub const DEBIAN_ROOT_LABEL: &str = "domsnap-root";
/// The TCP port the counter is served on inside the guest (`GET /counter` or `GET /`).
pub const DEBIAN_HTTP_PORT: u16 = 80;
/// The virtio-serial port name `qemu-guest-agent` listens on.
pub const GUEST_AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// What the counter prints on the serial console before its value, once a second.
pub const COUNTER_PREFIX: &str = "DSCOUNTER ";

/// `debian.json`: what `cargo xtask setup` built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebianGuestInfo {
    /// Layout version of the Debian guest folder (bumped when the build changes).
    pub format: u32,
    /// Hash of the build's inputs (suite, packages, our guest files, modules, sizes, format); the
    /// guest is rebuilt when it changes.
    pub stamp: String,
    /// The Debian suite (`bookworm`).
    pub suite: String,
    /// The mirror it was bootstrapped from.
    pub mirror: String,
    /// The packages asked for (`debootstrap --variant=minbase --include=...`).
    pub packages: Vec<String>,
    /// Every installed package as `name version`.
    pub installed: Vec<String>,
    /// `uname -r` of the guest kernel, e.g. `6.1.0-50-amd64`.
    pub kernel_release: String,
    /// The kernel modules kept in the image (those asked for and their dependencies).
    pub kernel_modules: u64,
    /// The kernel command line for [`DEBIAN_ROOT_FILE`].
    pub cmdline: String,
    /// Bytes in the root filesystem tree (file sizes added up).
    pub tree_bytes: u64,
    /// Size of [`DEBIAN_KERNEL_FILE`].
    pub kernel_bytes: u64,
    /// Size of [`DEBIAN_INITRD_FILE`].
    pub initrd_bytes: u64,
    /// Virtual size of [`DEBIAN_ROOT_FILE`].
    pub root_virtual_bytes: u64,
    /// File size of [`DEBIAN_ROOT_FILE`].
    pub root_file_bytes: u64,
    /// Virtual size of [`DEBIAN_DISK_FILE`].
    pub disk_virtual_bytes: u64,
    /// File size of [`DEBIAN_DISK_FILE`].
    pub disk_file_bytes: u64,
    /// Wall time of the build in seconds.
    pub build_seconds: f64,
    /// Wall time of each build step in seconds, in order.
    pub steps: Vec<BuildStep>,
    /// When it was built (seconds since the Unix epoch).
    pub built_unix_time: u64,
}

/// One step of the build and its wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildStep {
    /// e.g. `debootstrap (first stage)`.
    pub name: String,
    /// Seconds.
    pub seconds: f64,
}

/// The built Debian guest.
#[derive(Debug, Clone)]
pub struct DebianGuest {
    /// `<guest dir>/debian`.
    pub dir: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The root filesystem image (qcow2, ext4 without a partition table). Never write to it: boot an
    /// overlay ([`DebianGuest::vm`] makes one per VM).
    pub root: PathBuf,
    /// The bootable disk image (qcow2, GPT, for SeaBIOS or OVMF). Never write to it either.
    pub disk: PathBuf,
    /// The build's description.
    pub info: DebianGuestInfo,
}

/// The Debian guest's folder: `<guest dir>/debian` (`$DOMSNAP_GUEST_DIR/debian`, by default
/// `~/.cache/domsnap/guest/debian`).
pub fn debian_guest_dir() -> PathBuf {
    guest_dir().join(DEBIAN_SUBDIR)
}

/// The Debian guest. Panics with a clear message (run `cargo xtask setup`) if it has not been built.
pub fn debian_guest() -> DebianGuest {
    DebianGuest::load(&debian_guest_dir()).unwrap_or_else(|err| panic!("{err}"))
}

impl DebianGuest {
    /// The Debian guest in `dir` (a `debian` folder), or what is missing.
    pub fn load(dir: &Path) -> Result<DebianGuest, String> {
        let hint = "run `cargo xtask setup` to build the Debian test guest";
        let info_path = dir.join(DEBIAN_INFO_FILE);
        let text = fs::read_to_string(&info_path)
            .map_err(|err| format!("no Debian test guest in {} ({err}); {hint}", dir.display()))?;
        let info: DebianGuestInfo = serde_json::from_str(&text)
            .map_err(|err| format!("cannot parse {} ({err}); {hint}", info_path.display()))?;
        let guest = DebianGuest {
            dir: dir.to_path_buf(),
            kernel: dir.join(DEBIAN_KERNEL_FILE),
            initrd: dir.join(DEBIAN_INITRD_FILE),
            root: dir.join(DEBIAN_ROOT_FILE),
            disk: dir.join(DEBIAN_DISK_FILE),
            info,
        };
        for file in [&guest.kernel, &guest.initrd, &guest.root, &guest.disk] {
            if !file.is_file() {
                return Err(format!("{} is missing; {hint}", file.display()));
            }
        }
        Ok(guest)
    }

    /// Starts describing a QEMU VM booting this guest (see [`DebianVmBuilder`]).
    pub fn vm(&self, name: &str) -> DebianVmBuilder {
        DebianVmBuilder::new(self.clone(), name)
    }

    /// A domsnap domain configuration for this guest, written to `dir/NAME.toml` with its disks
    /// beside it: 1 GiB under TCG, the guest agent, a user NIC forwarding 127.0.0.1:`http_port`
    /// to the service's port 80, `vda` (`root.qcow2`, an overlay over the root image for
    /// [`DebianBoot::Kernel`], over the bootable disk image otherwise; `firmware = "uefi"` for
    /// [`DebianBoot::Uefi`]) and `vdb` (`data.raw`, 64 MiB raw). Returns the configuration's path.
    pub fn domain_config(&self, dir: &Path, name: &str, boot: DebianBoot, http_port: u16) -> PathBuf {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let (base, boot_keys) = match boot {
            DebianBoot::Kernel => (
                &self.root,
                format!(
                    "kernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"{DEBIAN_CMDLINE}\"\n",
                    self.kernel.display(),
                    self.initrd.display()
                ),
            ),
            DebianBoot::Bios => (&self.disk, String::new()),
            DebianBoot::Uefi => (&self.disk, "firmware = \"uefi\"\n".to_owned()),
        };
        let root = dir.join("root.qcow2").display().to_string();
        let data = dir.join("data.raw").display().to_string();
        let base = base.display().to_string();
        crate::run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &root],
        );
        crate::run("qemu-img", &["create", "-q", "-f", "raw", &data, "64M"]);
        let config = format!(
            "name = \"{name}\"\nmemory_mib = 1024\nvcpus = 1\naccel = \"tcg\"\n{boot_keys}guest_agent = true\n\n\
             [[nics]]\ntype = \"user\"\nhostfwd = [\"tcp:127.0.0.1:{http_port}-:{DEBIAN_HTTP_PORT}\"]\n\n\
             [[disks]]\nid = \"vda\"\npath = \"{root}\"\nboot = 1\n\n\
             [[disks]]\nid = \"vdb\"\npath = \"{data}\"\nformat = \"raw\"\n"
        );
        let path = dir.join(format!("{name}.toml"));
        fs::write(&path, config).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

/// The counter value of a serial console line holding `DSCOUNTER <n>` (anywhere in the line, since
/// kernel messages may precede it).
pub fn parse_counter_line(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once(COUNTER_PREFIX)?;
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())];
    digits.parse().ok()
}

/// Every counter value in a serial log, in order.
pub fn counters(log: &str) -> Vec<u64> {
    log.lines().filter_map(parse_counter_line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_lines() {
        assert_eq!(parse_counter_line("DSCOUNTER 17"), Some(17));
        assert_eq!(parse_counter_line("DSCOUNTER 17\r"), Some(17));
        assert_eq!(parse_counter_line("[   35.1] ahci: x DSCOUNTER 4"), Some(4));
        assert_eq!(parse_counter_line("DSCOUNTER "), None);
        assert_eq!(parse_counter_line("DOMSNAP TICK 3"), None);
        assert_eq!(counters("a\nDSCOUNTER 1\nb\nDSCOUNTER 2\n"), [1, 2]);
    }

    #[test]
    fn a_missing_guest_says_what_to_run() {
        let tmp = tempfile::tempdir().unwrap();
        let err = DebianGuest::load(tmp.path()).unwrap_err();
        assert!(err.contains("cargo xtask setup"), "{err}");
    }
}
