//! Domain configuration (TOML).
//!
//! ```toml
//! name = "demo"                    # [A-Za-z0-9_.-]{1,64}
//! memory_mib = 512
//! vcpus = 1
//! accel = "tcg"                    # "kvm" or "tcg"; default: kvm when /dev/kvm is usable
//! machine = "q35"                  # default q35; pinned to QEMU's versioned type (pc-q35-10.0)
//! cpu = "max"                      # default: max under tcg, host under kvm
//! firmware = "bios"                # "bios" (SeaBIOS) or "uefi" (OVMF, per-domain NVRAM)
//! guest_agent = false              # a virtio-serial channel org.qemu.guest_agent.0
//! kernel = "/path/vmlinuz"         # optional with disks that boot
//! initrd = "/path/initrd.gz"       # optional
//! cmdline = "console=ttyS0 quiet"  # optional
//! serial_log = "/path/serial.log"  # optional; default in the domain's state folder
//! run_as = "qemu"                  # optional; QEMU drops to this user (domsnap runs as root)
//! hugepages = "/dev/hugepages"     # optional; guest RAM in the huge pages of this hugetlbfs mount
//! [[disks]]
//! id = "vda"                       # the target name used by --disk
//! path = "/path/disk.qcow2"
//! format = "qcow2"                 # or "raw" (external snapshots only)
//! bus = "virtio"                   # or "scsi" (virtio-scsi) or "nvme" (no memory snapshots)
//! readonly = false                 # read-only disks are left out of snapshots
//! cache = "writeback"              # none, writeback, writethrough, directsync, unsafe
//! boot = 1                         # boot order (bootindex)
//! [[nics]]
//! type = "user"                    # "user", "tap" (ifname) or "bridge" (br)
//! hostfwd = ["tcp::8080-:80"]      # user networking only
//! model = "virtio-net-pci"         # default
//! mac = "52:54:00:12:34:56"        # default: generated when the domain is defined
//! ```
//!
//! Relative paths are taken relative to the configuration file's folder. Unknown keys are refused
//! (a typo must not silently drop a disk). Defining a domain pins what depends on the host:
//! the accelerator, the machine's versioned type, the vCPU model, the NICs' MACs and (UEFI) the
//! NVRAM file; the stored definition says them, snapshots record them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use snapshot_core::{DiskTarget, Name};

use crate::error::{Error, Result};

mod devices;
mod validate;

pub(crate) use devices::generate_mac;
pub use devices::{
    Accel, DiskBus, DiskCache, DiskConfig, DiskFormat, Firmware, NicConfig, NicType, DEFAULT_NIC_MODEL,
    NVRAM_DISK_ID,
};

/// Smallest and largest guest RAM accepted, in MiB.
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u64> = 16..=1 << 20;
/// Largest vCPU count accepted.
pub const MAX_VCPUS: u32 = 64;

/// A domain's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// The domain's name.
    pub name: Name,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    #[serde(default = "one_vcpu")]
    pub vcpus: u32,
    /// The accelerator. Unset in a definition made before domsnap pinned it: TCG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// The machine type: `q35` (the default), `pc`, or a versioned type such as `pc-q35-10.0`.
    /// Defining the domain replaces an alias with the versioned type this QEMU gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The vCPU model (default: `max` under TCG, `host` under KVM; a definition made before
    /// domsnap pinned it uses QEMU's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// BIOS or UEFI.
    #[serde(default, skip_serializing_if = "Firmware::is_bios")]
    pub firmware: Firmware,
    /// UEFI: the domain's NVRAM variables image (qcow2), made from OVMF's template when the
    /// domain is defined, in its state folder; snapshotted and reverted with the disks (as the
    /// disk `nvram`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
    /// A virtio-serial channel `org.qemu.guest_agent.0` for the QEMU guest agent, on a Unix
    /// socket in the domain's run folder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// Kernel to boot directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Where the serial console goes (default: in the domain's state folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_log: Option<PathBuf>,
    /// The user QEMU runs as once it has opened its files (`-run-with user=USER`): QEMU starts as
    /// root (domsnap must run as root) and drops to this user before the guest runs. Checked to
    /// exist when the domain is defined and started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// A hugetlbfs mount (e.g. `/dev/hugepages`): guest RAM is a file there, in huge pages from
    /// the kernel's reserved pool (`vm.nr_hugepages`), instead of on tmpfs. It makes QEMU's
    /// write protection of all RAM (the background create's pause) cheap, and is what KVM hosts
    /// use for their guests' TLBs. Checked to be hugetlbfs, with a page size that divides
    /// `memory_mib`, when the domain is defined and started; a start needs the guest's pages
    /// free (an eager revert twice that, as the new QEMU starts beside the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<PathBuf>,
    /// Disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network cards, in the order the guest sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
}

fn one_vcpu() -> u32 {
    1
}

impl DomainConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|error| match error {
            Error::InvalidConfig { reason, .. } => Error::InvalidConfig {
                path: Some(path.to_owned()),
                reason,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let mut config: DomainConfig = toml::from_str(text).map_err(|e| Error::InvalidConfig {
            path: None,
            reason: e.to_string(),
        })?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        [
            &mut self.kernel,
            &mut self.initrd,
            &mut self.serial_log,
            &mut self.nvram,
            &mut self.hugepages,
        ]
        .into_iter()
        .flatten()
        .for_each(resolve);
        self.disks.iter_mut().for_each(|disk| resolve(&mut disk.path));
    }

    /// Checks the values: RAM and vCPU ranges, something to boot, well-formed names, unique
    /// well-formed disk ids, NICs and their options (see the `validate` module).
    pub fn validate(&self) -> Result<()> {
        validate::check(self).map_err(|reason| Error::InvalidConfig { path: None, reason })
    }

    /// The accelerator QEMU runs with: the pinned one, TCG for definitions made before.
    pub fn accel(&self) -> Accel {
        self.accel.unwrap_or(Accel::Tcg)
    }

    /// The machine type QEMU runs: the pinned one, `q35` for definitions made before.
    pub fn machine(&self) -> &str {
        self.machine.as_deref().unwrap_or(DEFAULT_MACHINE)
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Checks what depends on the host rather than on the text: that `hugepages` is a hugetlbfs
    /// mount whose pages divide the RAM, that the `run_as` user exists, and that this process
    /// can make QEMU switch to it (only root can).
    pub fn check_host(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { path: None, reason });
        if let Some(mount) = &self.hugepages {
            if let Err(reason) = crate::hugepages::page_size(mount, self.memory_bytes()) {
                return invalid(reason);
            }
        }
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        match nix::unistd::User::from_name(user) {
            Ok(Some(_)) => {}
            Ok(None) => return invalid(format!("run_as = {user:?}: there is no such user on this host")),
            Err(errno) => return invalid(format!("run_as = {user:?}: cannot look the user up: {errno}")),
        }
        if !nix::unistd::geteuid().is_root() {
            return invalid(format!(
                "run_as = {user:?}: only root can start QEMU as another user; run domsnap as root \
                 or remove run_as"
            ));
        }
        Ok(())
    }

    /// Why a second QEMU of this configuration cannot start beside a running QEMU of the
    /// domain, before its disks are reverted (a revert's standby): `None` when it can.
    /// UEFI firmware reads the NVRAM image into its flash at start, before the revert would
    /// change it, and writes its copy back later; a tap or bridge card's host interface serves
    /// one QEMU. (Host port forwards are bound by the running QEMU: the standby starts without
    /// them and gets them when it takes over, see [`DomainConfig::without_host_forwards`].)
    pub fn standby_blocker(&self) -> Option<String> {
        if self.firmware == Firmware::Uefi {
            return Some(
                "UEFI firmware reads its NVRAM image when QEMU starts, before the revert changes \
                 it: the new QEMU starts after the old one ends"
                    .into(),
            );
        }
        self.nics.iter().enumerate().find_map(|(index, nic)| {
            let reason = match nic.kind {
                NicType::Tap => format!(
                    "its tap interface {} is attached to one QEMU at a time",
                    nic.ifname.as_deref().unwrap_or_default()
                ),
                NicType::Bridge => format!(
                    "bridge {} would get a second port with the guest's MAC",
                    nic.br.as_deref().unwrap_or_default()
                ),
                NicType::User => return None,
            };
            Some(format!(
                "nics[{index}]: {reason}: the new QEMU starts after the old one ends"
            ))
        })
    }

    /// This configuration without its user cards' host port forwards: a standby QEMU cannot
    /// bind the ports the running one holds, so it starts without them and adds them
    /// ([`DomainConfig::host_forwards`]) once the old QEMU has ended.
    pub fn without_host_forwards(&self) -> DomainConfig {
        let mut config = self.clone();
        for nic in &mut config.nics {
            nic.hostfwd.clear();
        }
        config
    }

    /// Every host port forward, with the QEMU netdev id of its card.
    pub fn host_forwards(&self) -> Vec<(String, String)> {
        self.nics
            .iter()
            .enumerate()
            .flat_map(|(index, nic)| {
                nic.hostfwd
                    .iter()
                    .map(move |rule| (crate::command_line::netdev_id(index), rule.clone()))
            })
            .collect()
    }

    /// The disk with target id `id`.
    pub fn disk(&self, id: &str) -> Option<&DiskConfig> {
        self.disks.iter().find(|disk| disk.id == id)
    }

    /// The disks as the orchestrator snapshots them (id, image, format): the writable disks,
    /// then a UEFI domain's NVRAM image as disk [`NVRAM_DISK_ID`]. Read-only disks are left out.
    pub fn disk_targets(&self) -> Vec<DiskTarget> {
        let disks = self
            .disks
            .iter()
            .filter(|disk| !disk.readonly)
            .map(|disk| DiskTarget {
                target: disk.id.clone(),
                image: disk.path.clone(),
                format: snapshot_format(disk.format),
            });
        let nvram = self.nvram.iter().map(|image| DiskTarget {
            target: NVRAM_DISK_ID.to_owned(),
            image: image.clone(),
            format: snapshot_core::ImageFormat::Qcow2,
        });
        disks.chain(nvram).collect()
    }

    /// Points disk `id` (or the NVRAM image) at `image` of `format`; false if there is no such
    /// disk.
    pub fn set_disk_image(&mut self, id: &str, image: PathBuf, format: DiskFormat) -> bool {
        if id == NVRAM_DISK_ID && self.nvram.is_some() {
            self.nvram = Some(image);
            return true;
        }
        match self.disks.iter_mut().find(|disk| disk.id == id) {
            Some(disk) => {
                disk.path = image;
                disk.format = format;
                true
            }
            None => false,
        }
    }
}

/// The machine type of a definition that names none.
pub const DEFAULT_MACHINE: &str = "q35";

/// A disk format as the orchestrator knows it.
pub(crate) fn snapshot_format(format: DiskFormat) -> snapshot_core::ImageFormat {
    match format {
        DiskFormat::Qcow2 => snapshot_core::ImageFormat::Qcow2,
        DiskFormat::Raw => snapshot_core::ImageFormat::Raw,
    }
}

/// The driver's disk format for the orchestrator's.
pub(crate) fn disk_format(format: snapshot_core::ImageFormat) -> DiskFormat {
    match format {
        snapshot_core::ImageFormat::Qcow2 => DiskFormat::Qcow2,
        snapshot_core::ImageFormat::Raw => DiskFormat::Raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        name = "demo"
        memory_mib = 512
        vcpus = 1
        kernel = "/path/vmlinuz"
        initrd = "initrd.gz"
        cmdline = "console=ttyS0 quiet"
        [[disks]]
        id = "vda"
        path = "disks/disk.qcow2"
    "#;

    #[test]
    fn the_documented_example_parses_with_relative_paths_resolved() {
        let config = DomainConfig::parse(EXAMPLE, Path::new("/etc/domsnap")).unwrap();
        assert_eq!(config.name.as_str(), "demo");
        assert_eq!(config.kernel.as_deref(), Some(Path::new("/path/vmlinuz")));
        assert_eq!(
            config.initrd.as_deref(),
            Some(Path::new("/etc/domsnap/initrd.gz"))
        );
        assert_eq!(
            config.disk("vda").unwrap().path,
            Path::new("/etc/domsnap/disks/disk.qcow2")
        );
        assert_eq!(config.serial_log, None);
        // It survives a round trip through TOML (snapshots keep the configuration).
        let again = DomainConfig::parse(&toml::to_string(&config).unwrap(), Path::new("/")).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let cases = [
            ("name = \"../x\"\nmemory_mib = 64\nkernel = \"/k\"", "invalid name"),
            ("name = \"a\"\nmemory_mib = 1\nkernel = \"/k\"", "memory_mib = 1"),
            ("name = \"a\"\nmemory_mib = 64\nvcpus = 0\nkernel = \"/k\"", "vcpus = 0"),
            ("name = \"a\"\nmemory_mib = 64", "nothing to boot"),
            ("name = \"a\"\nmemory_mib = 64\ncmdline = \"x\"\n[[disks]]\nid = \"vda\"\npath = \"/d\"", "need a kernel"),
            ("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\nmemroy = 3", "unknown field"),
            ("name = \"a\"\nmemory_mib = 64\n[[disks]]\nid = \"vda\"\npath = \"/d\"\n[[disks]]\nid = \"vda\"\npath = \"/e\"", "used twice"),
            ("name = \"a\"\nmemory_mib = 64\n[[disks]]\nid = \"9x\"\npath = \"/d\"", "disk id \"9x\""),
            ("name = \"a\"\nmemory_mib = \"lots\"\nkernel = \"/k\"", "invalid type"),
            ("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\nrun_as = \"a,b\"", "run_as = \"a,b\""),
            ("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\nrun_as = \"\"", "run_as = \"\""),
            ("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\nrun_as = \"-x\"", "run_as = \"-x\""),
        ];
        for (text, expected) in cases {
            let error = DomainConfig::parse(text, Path::new("/")).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn run_as_names_an_existing_user() {
        let parse = |user: &str| {
            DomainConfig::parse(
                &format!("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\nrun_as = \"{user}\""),
                Path::new("/"),
            )
            .unwrap()
        };
        let nobody = parse("nobody");
        assert_eq!(nobody.run_as.as_deref(), Some("nobody"));
        let again = DomainConfig::parse(&toml::to_string(&nobody).unwrap(), Path::new("/")).unwrap();
        assert_eq!(again, nobody);
        let error = parse("no-such-user-here").check_host().unwrap_err().to_string();
        assert!(
            error.contains("run_as = \"no-such-user-here\": there is no such user on this host"),
            "{error}"
        );
        let root_only = nobody.check_host();
        if nix::unistd::geteuid().is_root() {
            root_only.unwrap();
        } else {
            assert!(root_only.unwrap_err().to_string().contains("only root"));
        }
        // Without run_as there is nothing to check.
        let plain =
            DomainConfig::parse("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"", Path::new("/")).unwrap();
        assert_eq!(plain.run_as, None);
        plain.check_host().unwrap();
    }

    #[test]
    fn uefi_tap_and_bridge_rule_out_a_standby_and_host_forwards_wait_for_the_switch() {
        let parse = |extra: &str| {
            DomainConfig::parse(
                &format!("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n{extra}"),
                Path::new("/"),
            )
            .unwrap()
        };
        assert_eq!(parse("").standby_blocker(), None);
        assert_eq!(parse("[[nics]]\ntype = \"user\"").standby_blocker(), None);
        // Forwards: the standby starts without them and adds them when it takes over.
        let forwards = parse(
            "[[nics]]\ntype = \"user\"\n[[nics]]\ntype = \"user\"\nhostfwd = [\"tcp::8080-:80\", \"udp::53-:53\"]",
        );
        assert_eq!(forwards.standby_blocker(), None);
        assert_eq!(
            forwards.host_forwards(),
            [
                ("net1".to_owned(), "tcp::8080-:80".to_owned()),
                ("net1".to_owned(), "udp::53-:53".to_owned())
            ]
        );
        let without = forwards.without_host_forwards();
        assert!(without.host_forwards().is_empty());
        assert_eq!(without.nics.len(), 2);
        let cases = [
            ("firmware = \"uefi\"", "UEFI firmware reads its NVRAM image"),
            (
                "[[nics]]\ntype = \"tap\"\nifname = \"tap7\"",
                "nics[0]: its tap interface tap7",
            ),
            (
                "[[nics]]\ntype = \"bridge\"\nbr = \"br0\"",
                "nics[0]: bridge br0 would get a second port",
            ),
        ];
        for (extra, expected) in cases {
            let reason = parse(extra).standby_blocker().unwrap();
            assert!(reason.contains(expected), "{extra:?}: {reason}");
            assert!(
                reason.ends_with("the new QEMU starts after the old one ends"),
                "{reason}"
            );
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.toml");
        std::fs::write(&path, "name = \"a\"\nmemory_mib = 64").unwrap();
        let error = DomainConfig::load(&path).unwrap_err().to_string();
        assert!(
            error.contains("vm.toml") && error.contains("nothing to boot"),
            "{error}"
        );
        let error = DomainConfig::load(&dir.path().join("absent.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("absent.toml"), "{error}");
    }
}

#[cfg(test)]
mod machine_tests;
