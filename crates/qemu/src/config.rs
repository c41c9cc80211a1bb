//! Domain configuration (TOML).
//!
//! ```toml
//! name = "demo"                    # [A-Za-z0-9_.-]{1,64}
//! memory_mib = 512
//! vcpus = 1
//! kernel = "/path/vmlinuz"         # optional with disks that boot
//! initrd = "/path/initrd.gz"       # optional
//! cmdline = "console=ttyS0 quiet"  # optional
//! serial_log = "/path/serial.log"  # optional; default in the domain's state folder
//! run_as = "qemu"                  # optional; QEMU drops to this user (domsnap runs as root)
//! [[disks]]
//! id = "vda"                       # the target name used by --disk
//! path = "/path/disk.qcow2"
//! ```
//!
//! Relative paths are taken relative to the configuration file's folder. Unknown keys are refused
//! (a typo must not silently drop a disk).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use snapshot_core::{DiskTarget, Name};

use crate::error::{Error, Result};

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
    /// Disks, in the order the guest sees them.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The target id (`vda`); also names the QEMU device and block nodes.
    pub id: String,
    /// The qcow2 image.
    pub path: PathBuf,
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
        [&mut self.kernel, &mut self.initrd, &mut self.serial_log]
            .into_iter()
            .flatten()
            .for_each(resolve);
        self.disks.iter_mut().for_each(|disk| resolve(&mut disk.path));
    }

    /// Checks the values: RAM and vCPU ranges, something to boot, unique well-formed disk ids.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { path: None, reason });
        if !MEMORY_MIB_RANGE.contains(&self.memory_mib) {
            return invalid(format!(
                "memory_mib = {} is outside {}..={}",
                self.memory_mib,
                MEMORY_MIB_RANGE.start(),
                MEMORY_MIB_RANGE.end()
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return invalid(format!("vcpus = {} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.kernel.is_none() && self.disks.is_empty() {
            return invalid("nothing to boot: give a kernel or at least one disk".into());
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.cmdline.is_some()) {
            return invalid("initrd and cmdline need a kernel".into());
        }
        if let Some(user) = &self.run_as {
            if !valid_user_name(user) {
                return invalid(format!(
                    "run_as = {user:?}: a user name is 1 to 32 letters, digits, '_', '-' or '.', \
                     not starting with '-'"
                ));
            }
        }
        let mut seen = HashSet::new();
        for disk in &self.disks {
            if !valid_disk_id(&disk.id) {
                return invalid(format!(
                    "disk id {:?}: use a letter then up to 15 letters, digits, '_' or '-'",
                    disk.id
                ));
            }
            if !seen.insert(disk.id.as_str()) {
                return invalid(format!("disk id {:?} is used twice", disk.id));
            }
        }
        Ok(())
    }

    /// Checks what depends on the host rather than on the text: that the `run_as` user exists,
    /// and that this process can make QEMU switch to it (only root can).
    pub fn check_host(&self) -> Result<()> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        let invalid = |reason: String| Err(Error::InvalidConfig { path: None, reason });
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

    /// The disk with target id `id`.
    pub fn disk(&self, id: &str) -> Option<&DiskConfig> {
        self.disks.iter().find(|disk| disk.id == id)
    }

    /// The disks as the orchestrator names them (id and image).
    pub fn disk_targets(&self) -> Vec<DiskTarget> {
        self.disks
            .iter()
            .map(|disk| DiskTarget {
                target: disk.id.clone(),
                image: disk.path.clone(),
            })
            .collect()
    }
}

/// A portable user name (POSIX portable file name characters, as `useradd` accepts them); it
/// goes into QEMU's `-run-with user=`, so no comma.
fn valid_user_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Disk ids become QEMU ids and node names (`disk-ID`, at most 31 characters, starting with a letter).
fn valid_disk_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && id.len() <= 16
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
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
