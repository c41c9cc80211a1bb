//! The Debian 12 test guest, built once by `cargo xtask setup` into `<guest dir>/debian/`
//! (`docs/debian-guest.md`):
//!
//! ```text
//! <guest dir>/debian/
//!   vmlinuz      the Debian kernel          (QEMU -kernel)
//!   initrd.img   its initramfs-tools image  (QEMU -initrd), with -append "root=/dev/vda rw console=ttyS0"
//!   root.qcow2   ext4 on the whole disk, no partition table (for -kernel/-initrd)
//!   disk.qcow2   the same system on a bootable GPT disk: SYSLINUX for SeaBIOS, systemd-boot for OVMF
//!   debian.json  DebianGuestInfo (stamp, packages, sizes, build times), written last
//!   debs/        debootstrap's download cache (a rebuild downloads only what changed)
//!   .lock        held while checking or building, so concurrent setups build once
//! ```
//!
//! The build runs only when the stamp (a hash of every input below: the suite, the packages, our
//! guest files, the kernel modules kept, the image sizes and [`FORMAT`]) differs from `debian.json`'s
//! or a file is missing; otherwise setup returns at once. New Debian package versions alone do not
//! cause a rebuild (`cargo xtask setup --force-debian` takes them).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use guest_workload::Fnv1a64;

use crate::cmd;
pub use testkit::{
    debian_guest_dir, DebianGuestInfo, DEBIAN_CMDLINE, DEBIAN_DISK_FILE, DEBIAN_INFO_FILE,
    DEBIAN_INITRD_FILE, DEBIAN_KERNEL_FILE, DEBIAN_ROOT_FILE, DEBIAN_ROOT_LABEL, DEBIAN_SUBDIR,
};

/// Version of the build; bump it when a build step changes in a way the other inputs do not show.
pub const FORMAT: u32 = 1;
/// The Debian release (named: "stable" has moved on to trixie).
pub const SUITE: &str = "bookworm";
/// The default mirror; `DOMSNAP_DEBIAN_MIRROR` overrides it (not part of the stamp).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable naming another Debian mirror.
pub const MIRROR_ENV: &str = "DOMSNAP_DEBIAN_MIRROR";
/// debootstrap's variant: the required packages and apt, nothing else.
pub const VARIANT: &str = "minbase";
/// Packages on top of minbase (their dependencies come along; recommendations do not).
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "qemu-guest-agent",
    "e2fsprogs",
    "busybox",
    "systemd-boot-efi",
];
/// Kernel modules kept in the image, with their dependencies (the rest of the ~400 MB of modules is
/// removed): virtio devices, disks, ext4 and FAT (the EFI partition), the ACPI button, vsock, 9p and
/// virtiofs, and what udev loads for q35's own devices.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "virtio_input",
    "sd_mod",
    "sr_mod",
    "ahci",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "efivarfs",
    "button",
    "evdev",
    "qemu_fw_cfg",
    "i6300esb",
    "autofs4",
    "fuse",
    "loop",
    "overlay",
    "crc32c_intel",
    "vmw_vsock_virtio_transport",
    "9pnet_virtio",
    "9p",
    "virtiofs",
];
/// Size of the root filesystem (and of `root.qcow2`'s virtual disk) in MiB.
pub const ROOT_MIB: u64 = 1024;
/// Size of the EFI system partition of `disk.qcow2` in MiB.
pub const ESP_MIB: u64 = 64;

/// A file of ours copied into the guest tree.
#[derive(Debug, Clone, Copy)]
pub struct GuestFile {
    /// Path inside the tree (relative).
    pub path: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// Contents.
    pub text: &'static str,
}

macro_rules! guest_file {
    ($path:expr, $mode:expr, $source:literal) => {
        GuestFile {
            path: $path,
            mode: $mode,
            text: include_str!(concat!("../debian/", $source)),
        }
    };
}

/// Written before debootstrap's second stage, so the packages install with them in place.
pub const EARLY_FILES: &[GuestFile] = &[
    guest_file!("etc/initramfs-tools/conf.d/domsnap", 0o644, "initramfs.conf"),
    guest_file!(
        "usr/share/initramfs-tools/modules.d/domsnap",
        0o644,
        "initramfs-modules"
    ),
    guest_file!("etc/dpkg/dpkg.cfg.d/domsnap-nodoc", 0o644, "dpkg-nodoc"),
    // No fsync per file while installing (removed again by configure.sh).
    GuestFile {
        path: "etc/dpkg/dpkg.cfg.d/domsnap-unsafe-io",
        mode: 0o644,
        text: "force-unsafe-io\n",
    },
];
/// Written after the install: the counter service, the network, the journal, fstab.
pub const FILES: &[GuestFile] = &[
    guest_file!("usr/local/sbin/dscounter", 0o755, "dscounter.sh"),
    guest_file!("etc/systemd/system/dscounter.service", 0o644, "dscounter.service"),
    guest_file!(
        "etc/systemd/system/dscounter-http.service",
        0o644,
        "dscounter-http.service"
    ),
    guest_file!(
        "etc/systemd/network/20-virtio.network",
        0o644,
        "20-virtio.network"
    ),
    guest_file!("etc/systemd/journald.conf.d/domsnap.conf", 0o644, "journald.conf"),
    guest_file!("etc/fstab", 0o644, "fstab"),
];
/// Files on the EFI system partition of `disk.qcow2` (besides the kernel, initramfs and loaders).
pub const ESP_FILES: &[GuestFile] = &[
    guest_file!("syslinux.cfg", 0o644, "syslinux.cfg"),
    guest_file!("loader/loader.conf", 0o644, "loader.conf"),
    guest_file!("loader/entries/debian.conf", 0o644, "loader-entry.conf"),
];
/// Runs in the chroot after [`FILES`] are in place (arguments: [`MODULES`]).
pub const CONFIGURE_SCRIPT: &str = include_str!("../debian/configure.sh");

/// Debian's .deb cache inside the Debian guest folder.
pub const DEBS_DIR: &str = "debs";
const LOCK_FILE: &str = ".lock";

/// The mirror to bootstrap from.
pub fn mirror() -> String {
    std::env::var(MIRROR_ENV)
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// Every input of the build, as text.
fn stamp_inputs() -> Vec<String> {
    let mut inputs = vec![
        format!("format={FORMAT} suite={SUITE} variant={VARIANT}"),
        format!("root={ROOT_MIB} esp={ESP_MIB} label={DEBIAN_ROOT_LABEL}"),
        DEBIAN_CMDLINE.to_string(),
        PACKAGES.join(","),
        MODULES.join(","),
        CONFIGURE_SCRIPT.to_string(),
    ];
    for file in EARLY_FILES.iter().chain(FILES).chain(ESP_FILES) {
        inputs.push(format!("{} {:o}", file.path, file.mode));
        inputs.push(file.text.to_string());
    }
    inputs
}

/// The hash of every input of the build.
pub fn stamp() -> String {
    let mut h = Fnv1a64::new();
    for input in stamp_inputs() {
        h.update(&(input.len() as u64).to_le_bytes());
        h.update(input.as_bytes());
    }
    format!("{:016x}", h.finish())
}

/// The built guest's description if it is complete and matches `stamp`.
fn up_to_date(dir: &Path, stamp: &str) -> Option<DebianGuestInfo> {
    let text = fs::read_to_string(dir.join(DEBIAN_INFO_FILE)).ok()?;
    let info: DebianGuestInfo = serde_json::from_str(&text).ok()?;
    let size = |name: &str| fs::metadata(dir.join(name)).ok().map(|m| m.len());
    let complete = size(DEBIAN_KERNEL_FILE) == Some(info.kernel_bytes)
        && size(DEBIAN_INITRD_FILE) == Some(info.initrd_bytes)
        && size(DEBIAN_ROOT_FILE) == Some(info.root_file_bytes)
        && size(DEBIAN_DISK_FILE) == Some(info.disk_file_bytes);
    (info.stamp == stamp && complete).then_some(info)
}

/// Builds (or confirms up to date) the Debian guest in `<guest_dir>/debian`. `force` rebuilds even
/// when it is up to date. Holds the folder's lock throughout, so a second setup waits and then finds
/// the guest built.
pub fn ensure_debian_guest(guest_dir: &Path, force: bool) -> Result<DebianGuestInfo> {
    let dir = guest_dir.join(DEBIAN_SUBDIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    ensure_host_tools(RUNTIME_TOOLS)?;
    let _lock = lock(&dir.join(LOCK_FILE))?;
    let stamp = stamp();
    if let Some(info) = up_to_date(&dir, &stamp).filter(|_| !force) {
        println!(
            "setup: Debian guest up to date in {} (stamp {stamp})",
            dir.display()
        );
        return Ok(info);
    }
    println!(
        "setup: building the Debian guest in {} (takes a few minutes)",
        dir.display()
    );
    ensure_host_tools(BUILD_TOOLS)?;
    let started = Instant::now();
    let info = crate::debian_build::build(&dir, &stamp, &mirror())?;
    println!(
        "setup: Debian guest built in {:.0} s: kernel {}, root.qcow2 {} MiB, disk.qcow2 {} MiB",
        started.elapsed().as_secs_f64(),
        info.kernel_release,
        info.root_file_bytes >> 20,
        info.disk_file_bytes >> 20
    );
    Ok(info)
}

/// An exclusive `flock` on `path`, released when the returned value drops.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    use nix::fcntl::{Flock, FlockArg};
    let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => return Ok(lock),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => file,
        Err((_, errno)) => bail!("locking {}: {errno}", path.display()),
    };
    println!(
        "setup: another setup holds {} (building the Debian guest?): waiting for it",
        path.display()
    );
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow::anyhow!("locking {}: {errno}", path.display()))
}

/// A host program or file the build needs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct HostTool {
    /// A program name (looked up in PATH, /usr/sbin and /sbin) or an absolute file path.
    pub needs: &'static str,
    /// The package that provides it.
    pub package: &'static str,
}

/// Needed to boot the guest in tests (checked at every setup).
pub const RUNTIME_TOOLS: &[HostTool] = &[HostTool {
    needs: testkit::OVMF_CODE,
    package: "ovmf",
}];
/// Needed to build the guest.
pub const BUILD_TOOLS: &[HostTool] = &[
    HostTool {
        needs: "debootstrap",
        package: "debootstrap",
    },
    HostTool {
        needs: "mke2fs",
        package: "e2fsprogs",
    },
    HostTool {
        needs: "sfdisk",
        package: "fdisk",
    },
    HostTool {
        needs: "mkfs.fat",
        package: "dosfstools",
    },
    HostTool {
        needs: "mcopy",
        package: "mtools",
    },
    HostTool {
        needs: "syslinux",
        package: "syslinux",
    },
    HostTool {
        needs: "/usr/lib/syslinux/mbr/gptmbr.bin",
        package: "syslinux-common",
    },
    HostTool {
        needs: "unshare",
        package: "util-linux",
    },
];

/// Where a program or file is, if present.
pub fn find_tool(needs: &str) -> Option<PathBuf> {
    if needs.starts_with('/') {
        return Path::new(needs).is_file().then(|| PathBuf::from(needs));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(needs))
        .find(|candidate| candidate.is_file())
}

/// Installs (apt-get, as root) the packages of the tools that are missing.
fn ensure_host_tools(tools: &[HostTool]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|t| find_tool(t.needs).is_none())
        .map(|t| t.package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {}", missing.join(" "));
    let install = || {
        cmd::run(
            cmd::as_root("apt-get", cmd::APT_ENV)
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing),
            false,
        )
    };
    if install().is_err() {
        println!("setup: installing failed; updating the package lists and retrying");
        cmd::run(cmd::as_root("apt-get", cmd::APT_ENV).arg("update"), false)?;
        install()?;
    }
    let still: Vec<&str> = tools
        .iter()
        .filter(|t| find_tool(t.needs).is_none())
        .map(|t| t.needs)
        .collect();
    if !still.is_empty() {
        bail!(
            "still missing after installing {}: {}",
            missing.join(" "),
            still.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_is_stable_and_covers_the_files() {
        assert_eq!(stamp(), stamp());
        assert_eq!(stamp().len(), 16);
        let paths: Vec<&str> = FILES.iter().map(|f| f.path).collect();
        assert!(paths.contains(&"usr/local/sbin/dscounter"), "{paths:?}");
        assert!(FILES
            .iter()
            .all(|f| !f.path.starts_with('/') && !f.text.is_empty()));
        let inputs = stamp_inputs();
        for file in EARLY_FILES.iter().chain(FILES).chain(ESP_FILES) {
            assert!(
                inputs.iter().any(|i| i == file.text),
                "{} is not an input",
                file.path
            );
        }
        for list in [PACKAGES, MODULES] {
            assert!(inputs.contains(&list.join(",")));
        }
        assert!(inputs.iter().any(|i| i == CONFIGURE_SCRIPT));
    }

    #[test]
    fn guest_files_say_what_the_tests_rely_on() {
        let text = |path: &str| {
            FILES
                .iter()
                .chain(EARLY_FILES)
                .chain(ESP_FILES)
                .find(|f| f.path == path)
                .map(|f| f.text)
                .unwrap()
        };
        let counter = text("usr/local/sbin/dscounter");
        assert!(counter.contains("printf 'DSCOUNTER %s\\n'"), "{counter}");
        assert!(counter.contains("/run/dscounter"), "{counter}");
        assert!(text("etc/systemd/system/dscounter.service").contains("TTYPath=/dev/ttyS0"));
        assert!(
            text("etc/systemd/system/dscounter-http.service").contains("httpd -f -p 80 -h /run/dscounter")
        );
        assert!(text("etc/systemd/network/20-virtio.network").contains("Address=10.0.2.15/24"));
        assert!(text("etc/fstab").contains(&format!("LABEL={DEBIAN_ROOT_LABEL} / ext4")));
        for esp in ["syslinux.cfg", "loader/entries/debian.conf"] {
            assert!(
                text(esp).contains(&format!("root=LABEL={DEBIAN_ROOT_LABEL} rw console=ttyS0")),
                "{esp}"
            );
        }
        assert!(text("etc/initramfs-tools/conf.d/domsnap").contains("MODULES=list"));
        for module in ["virtio_pci", "virtio_blk", "ext4"] {
            assert!(text("usr/share/initramfs-tools/modules.d/domsnap").contains(module));
            assert!(MODULES.contains(&module));
        }
    }

    #[test]
    fn guest_scripts_are_valid_shell() {
        for script in ["debian/configure.sh", "debian/dscounter.sh"] {
            let out = std::process::Command::new("sh")
                .arg("-n")
                .arg(script)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn tools_are_found_by_name_or_path() {
        assert!(find_tool("sh").is_some());
        assert!(find_tool("/bin/sh").is_some());
        assert!(find_tool("domsnap-no-such-tool").is_none());
        assert!(find_tool("/nonexistent/file").is_none());
    }

    #[test]
    fn a_second_setup_waits_for_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(LOCK_FILE);
        let first = lock(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let second = lock(&path).unwrap();
                tx.send(()).unwrap();
                drop(second);
            })
        };
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
    }

    #[test]
    fn an_incomplete_folder_is_not_up_to_date() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(up_to_date(tmp.path(), &stamp()).is_none());
        fs::write(tmp.path().join(DEBIAN_INFO_FILE), "{}").unwrap();
        assert!(up_to_date(tmp.path(), &stamp()).is_none());
    }
}
