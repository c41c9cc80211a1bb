//! What defining a domain fixes for good (so that its snapshots restore into the same machine):
//! the accelerator, the versioned machine type, the vCPU model, each NIC's MAC and a UEFI
//! domain's NVRAM image; and the check, before a revert touches the domain, that this host can
//! still provide the machine a snapshot was taken on.

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use snapshot_core::Name;

use crate::{
    command_line::{ovmf_installed, OVMF_VARS_TEMPLATE},
    config::{generate_mac, Accel, DomainConfig, Firmware},
    driver::{io_error, QemuDriver},
    error::{Error, Result},
    host::{self, QemuFacts},
};

/// The file in the state directory that remembers the QEMU binary's version and machine types.
const FACTS_CACHE: &str = "qemu-machines.json";
/// The key under which [`snapshot_core::Hypervisor::config`] adds the QEMU version to the
/// configuration it describes (not a configuration key: taken out again when defined).
pub(crate) const QEMU_VERSION_KEY: &str = "qemu_version";
/// The NVRAM image's file name in the domain's folder.
const NVRAM_FILE: &str = "nvram.qcow2";

impl QemuDriver {
    /// The version and machine types of the QEMU binary.
    pub async fn qemu_facts(&self) -> Result<QemuFacts> {
        let binary = self.qemu().await?;
        host::qemu_facts(&binary, &self.state_path().join(FACTS_CACHE)).await
    }

    /// `config` with what the host decides pinned: accelerator (probed), versioned machine type,
    /// vCPU model, MACs (kept from `previous`, the domain's current definition, for the NICs at
    /// the same place of the same type) and a UEFI domain's NVRAM image (kept, or made from
    /// OVMF's template in `domain_dir`).
    pub(crate) async fn pin(
        &self,
        config: &DomainConfig,
        previous: Option<&DomainConfig>,
        domain_dir: &Path,
    ) -> Result<DomainConfig> {
        let mut config = config.clone();
        let accel = *config.accel.get_or_insert_with(host::default_accel);
        if config.cpu.is_none() {
            config.cpu = Some(accel.default_cpu().to_owned());
        }
        let facts = self.qemu_facts().await?;
        let requested = config.machine().to_owned();
        let machine = facts.resolve(&requested).ok_or_else(|| Error::InvalidConfig {
            path: None,
            reason: format!(
                "machine = {requested:?}: QEMU {} has no such machine type (it has {})",
                facts.version,
                facts.family(&requested).join(", ")
            ),
        })?;
        config.machine = Some(machine.to_owned());
        pin_macs(&mut config, previous)?;
        if config.firmware == Firmware::Uefi && config.nvram.is_none() {
            config.nvram = match previous.and_then(|p| p.nvram.clone()) {
                Some(kept) => Some(kept),
                None => Some(make_nvram(&config.name, domain_dir).await?),
            };
        }
        Ok(config)
    }

    /// The disks `config` would have once defined, for the orchestrator's redefinition check
    /// (`check_redefinition`): as [`DomainConfig::disk_targets`], with a UEFI domain's NVRAM
    /// image, which a configuration file never names, kept from the stored definition as
    /// defining keeps it.
    pub fn redefinition_targets(&self, config: &DomainConfig) -> Result<Vec<snapshot_core::DiskTarget>> {
        let mut config = config.clone();
        if config.firmware == Firmware::Uefi && config.nvram.is_none() {
            // No state directory yet: no definition either.
            let files = match self.files(&config.name) {
                Err(Error::UnknownDomain { .. }) => return Ok(config.disk_targets()),
                files => files?,
            };
            if files.definition.is_file() {
                config.nvram = self.load_definition(&config.name, &files)?.nvram;
            }
        }
        Ok(config.disk_targets())
    }

    /// Refuses a snapshot whose recorded configuration `recorded` this host cannot restore: a
    /// machine type this QEMU lacks, with memory a QEMU older than the one that saved it (QEMU
    /// loads the state of older versions of a versioned machine type, not of newer ones), or
    /// KVM where it is not usable.
    pub(crate) async fn check_restorable_config(
        &self,
        domain: &Name,
        recorded: &serde_json::Value,
        with_memory: bool,
    ) -> Result<()> {
        let refuse = |reason: String| Error::NotRestorable {
            domain: domain.clone(),
            reason,
        };
        let (config, saved_by) = recorded_config(recorded)?;
        let facts = self.qemu_facts().await?;
        let machine = config.machine();
        if facts.resolve(machine).is_none() {
            return Err(refuse(format!(
                "it was taken on machine type {machine}, which QEMU {} does not provide (it has {})",
                facts.version,
                facts.family(machine).join(", ")
            )));
        }
        if let Some(saved_by) = saved_by.filter(|_| with_memory) {
            if host::version_less(&facts.version, &saved_by) {
                return Err(refuse(format!(
                    "its state was saved by QEMU {saved_by}, which is newer than this QEMU {}: \
                     an older QEMU cannot load it",
                    facts.version
                )));
            }
        }
        if config.accel() == Accel::Kvm {
            host::probe_kvm().map_err(|reason| {
                refuse(format!(
                    "it was taken under KVM, which is not usable here: {reason}"
                ))
            })?;
        }
        Ok(())
    }
}

/// A configuration as [`snapshot_core::Hypervisor::config`] described it: the definition and
/// the version of the QEMU it ran on (absent in records of older domsnap versions).
pub(crate) fn recorded_config(recorded: &serde_json::Value) -> Result<(DomainConfig, Option<String>)> {
    let mut value = recorded.clone();
    let version = value
        .as_object_mut()
        .and_then(|map| map.remove(QEMU_VERSION_KEY))
        .and_then(|v| v.as_str().map(str::to_owned));
    let config = DomainConfig::deserialize(&value).map_err(|error| Error::InvalidConfig {
        path: None,
        reason: error.to_string(),
    })?;
    Ok((config, version))
}

/// Gives every NIC without a MAC one: the MAC of the NIC at the same place in `previous` if it
/// has the same type, else a fresh one.
fn pin_macs(config: &mut DomainConfig, previous: Option<&DomainConfig>) -> Result<()> {
    let kept = |index: usize, kind| {
        previous
            .and_then(|p| p.nics.get(index))
            .filter(|nic| nic.kind == kind)
            .and_then(|nic| nic.mac.clone())
    };
    let mut taken: Vec<String> = config.nics.iter().filter_map(|n| n.mac.clone()).collect();
    for index in 0..config.nics.len() {
        if config.nics[index].mac.is_some() {
            continue;
        }
        let mac = match kept(index, config.nics[index].kind).filter(|mac| !taken.contains(mac)) {
            Some(mac) => mac,
            None => loop {
                let fresh = generate_mac().map_err(io_error("cannot read", Path::new("/dev/urandom")))?;
                if !taken.contains(&fresh) {
                    break fresh;
                }
            },
        };
        taken.push(mac.clone());
        config.nics[index].mac = Some(mac);
    }
    Ok(())
}

/// Makes a domain's NVRAM image: OVMF's variables template as a qcow2 image in `domain_dir`
/// (written to a temporary name, then renamed).
async fn make_nvram(domain: &Name, domain_dir: &Path) -> Result<PathBuf> {
    let fail = |reason: String| Error::Firmware {
        domain: domain.clone(),
        reason,
    };
    if !ovmf_installed() {
        return Err(fail(format!(
            "firmware = \"uefi\" needs OVMF ({OVMF_VARS_TEMPLATE}): install Debian's ovmf \
             package (cargo xtask setup does)"
        )));
    }
    let target = domain_dir.join(NVRAM_FILE);
    let temporary = domain_dir.join(format!(".{NVRAM_FILE}.partial"));
    let output = tokio::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", OVMF_VARS_TEMPLATE])
        .arg(&temporary)
        .output()
        .await
        .map_err(|error| fail(format!("cannot run qemu-img to make the NVRAM image: {error}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "qemu-img cannot make the NVRAM image {}: {}",
            target.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let private = std::os::unix::fs::PermissionsExt::from_mode(durable::FILE_MODE);
    std::fs::set_permissions(&temporary, private).map_err(io_error("cannot make private", &temporary))?;
    std::fs::rename(&temporary, &target).map_err(io_error("cannot rename", &temporary))?;
    durable::sync_dir(domain_dir)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NicType;

    fn config(text: &str) -> DomainConfig {
        DomainConfig::parse(
            &format!("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n{text}"),
            Path::new("/"),
        )
        .unwrap()
    }

    #[test]
    fn macs_are_generated_once_and_kept_on_redefinition() {
        let two = "[[nics]]\ntype = \"user\"\n[[nics]]\ntype = \"tap\"\nifname = \"tap0\"\n";
        let mut first = config(two);
        pin_macs(&mut first, None).unwrap();
        let macs: Vec<String> = first.nics.iter().map(|n| n.mac.clone().unwrap()).collect();
        assert!(
            macs.iter().all(|m| m.starts_with("52:54:00:") && m.len() == 17),
            "{macs:?}"
        );
        assert_ne!(macs[0], macs[1]);
        // The same file defined again keeps them.
        let mut again = config(two);
        pin_macs(&mut again, Some(&first)).unwrap();
        assert_eq!(again.nics, first.nics);
        // A NIC of another type at that place gets a new one; a given MAC is kept as given.
        let mut changed = config(
            "[[nics]]\ntype = \"bridge\"\nbr = \"br0\"\n[[nics]]\ntype = \"tap\"\nifname = \"t\"\nmac = \"52:54:00:00:00:01\"\n",
        );
        pin_macs(&mut changed, Some(&first)).unwrap();
        assert_eq!(changed.nics[0].kind, NicType::Bridge);
        assert_ne!(changed.nics[0].mac.as_deref(), Some(macs[0].as_str()));
        assert_eq!(changed.nics[1].mac.as_deref(), Some("52:54:00:00:00:01"));
        // The generated MAC survives the definition's round trip through TOML.
        let stored = DomainConfig::parse(&toml::to_string(&first).unwrap(), Path::new("/")).unwrap();
        assert_eq!(stored.nics, first.nics);
    }

    #[tokio::test]
    async fn a_revert_needs_the_machine_type_and_for_memory_a_qemu_not_older() {
        let state = tempfile::tempdir().unwrap();
        let driver = QemuDriver::new(state.path());
        let name = Name::new("a").unwrap();
        let facts = driver.qemu_facts().await.unwrap();
        let recorded = |machine: &str, version: &str| {
            let mut value = serde_json::to_value(config(&format!("machine = \"{machine}\""))).unwrap();
            value[QEMU_VERSION_KEY] = version.into();
            value
        };
        let check = |value: serde_json::Value, memory: bool| {
            let driver = driver.clone();
            let name = name.clone();
            async move { driver.check_restorable_config(&name, &value, memory).await }
        };
        let this = recorded("q35", &facts.version);
        check(this.clone(), true).await.unwrap();
        // Unpinned records (older domsnap versions) and older QEMUs restore.
        check(serde_json::to_value(config("")).unwrap(), true)
            .await
            .unwrap();
        check(recorded("pc-q35-10.0", "9.2.0"), true).await.unwrap();
        // A machine type this QEMU lacks never does; memory from a newer QEMU neither, but its
        // disks alone do.
        let error = check(recorded("pc-q35-99.0", &facts.version), false)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("machine type pc-q35-99.0"), "{error}");
        let newer = recorded("q35", "99.0.0");
        let error = check(newer.clone(), true).await.unwrap_err().to_string();
        assert!(error.contains("saved by QEMU 99.0.0"), "{error}");
        check(newer, false).await.unwrap();
    }

    #[test]
    fn a_recorded_configuration_carries_the_qemu_version() {
        let mut value = serde_json::to_value(config("machine = \"pc-q35-10.0\"")).unwrap();
        value[QEMU_VERSION_KEY] = "10.0.2".into();
        let (config, version) = recorded_config(&value).unwrap();
        assert_eq!(config.machine(), "pc-q35-10.0");
        assert_eq!(version.as_deref(), Some("10.0.2"));
    }
}
