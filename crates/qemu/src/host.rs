//! What the host offers a domain: whether KVM is usable (probed, not guessed from the device
//! file), and what the QEMU binary is: its version and the machine types it provides (from
//! `-machine help`, remembered in the state directory per binary file).

use std::{fs, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    config::Accel,
    error::{Error, Result},
    process::{qemu_output, remembered},
};

/// The KVM device.
const KVM_DEVICE: &str = "/dev/kvm";
/// The KVM API version every Linux since 2.6.22 reports (`KVM_API_VERSION`).
const KVM_API_VERSION: i32 = 12;

/// `KVM_GET_API_VERSION`, with its argument 0: the kernel answers EINVAL to any other
/// argument, so the ioctl must not be issued without one (as `nix::ioctl_none!` would, leaving
/// whatever the register holds).
///
/// # Safety
///
/// `fd` is an open descriptor.
unsafe fn kvm_get_api_version(fd: std::os::fd::RawFd) -> nix::Result<nix::libc::c_int> {
    let request = nix::request_code_none!(0xAE, 0x00);
    // SAFETY: the caller gives an open descriptor; the request takes an integer argument (0)
    // and writes nothing.
    nix::errno::Errno::result(unsafe { nix::libc::ioctl(fd, request, nix::libc::c_ulong::from(0u8)) })
}

/// Whether KVM is usable by this process: `/dev/kvm` opens read-write and answers
/// `KVM_GET_API_VERSION` with 12. Returns why not otherwise.
pub fn probe_kvm() -> std::result::Result<(), String> {
    probe_kvm_at(Path::new(KVM_DEVICE))
}

fn probe_kvm_at(device: &Path) -> std::result::Result<(), String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|error| format!("cannot open {}: {error}", device.display()))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number; the descriptor
    // is open for the duration of the call.
    let version =
        unsafe { kvm_get_api_version(std::os::fd::AsRawFd::as_raw_fd(&file)) }.map_err(|errno| {
            format!(
                "{} does not answer KVM_GET_API_VERSION: {errno}",
                device.display()
            )
        })?;
    if version != KVM_API_VERSION {
        return Err(format!(
            "{} reports KVM API version {version}, not {KVM_API_VERSION}",
            device.display()
        ));
    }
    Ok(())
}

/// The accelerator a domain gets when its configuration names none: KVM when usable, else TCG.
pub fn default_accel() -> Accel {
    match probe_kvm() {
        Ok(()) => Accel::Kvm,
        Err(reason) => {
            tracing::debug!(%reason, "KVM is not usable; the domain runs under TCG");
            Accel::Tcg
        }
    }
}

/// A machine type QEMU offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineType {
    /// Its name, e.g. `pc-q35-10.0`.
    pub name: String,
    /// The name it is an alias of, for aliases (`q35` → `pc-q35-10.0`).
    pub alias_of: Option<String>,
}

/// What a QEMU binary is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuFacts {
    /// Its version, e.g. `10.0.2`.
    pub version: String,
    /// The machine types it offers.
    pub machines: Vec<MachineType>,
}

impl QemuFacts {
    /// The versioned machine type `requested` is (itself, or what the alias stands for), if
    /// QEMU offers it.
    pub fn resolve(&self, requested: &str) -> Option<&str> {
        let machine = self.machines.iter().find(|m| m.name == requested)?;
        Some(machine.alias_of.as_deref().unwrap_or(&machine.name))
    }

    /// The versioned types of the family of `machine` (`pc-q35-` types for `pc-q35-9.2`), for
    /// messages.
    pub fn family(&self, machine: &str) -> Vec<&str> {
        let prefix = machine.rsplit_once('-').map_or(machine, |(family, _)| family);
        self.machines
            .iter()
            .filter(|m| m.alias_of.is_none() && m.name.starts_with(prefix))
            .map(|m| m.name.as_str())
            .collect()
    }
}

/// Parses `qemu-system-x86_64 -machine help`: a header line, then `NAME  DESCRIPTION` lines,
/// an alias's description ending in `(alias of TARGET)`.
pub fn parse_machine_help(text: &str) -> Vec<MachineType> {
    text.lines()
        .filter(|line| !line.starts_with("Supported machines"))
        .filter_map(|line| {
            let name = line.split_whitespace().next()?;
            let alias_of = line
                .rsplit_once("(alias of ")
                .and_then(|(_, rest)| rest.split(')').next())
                .map(str::to_owned);
            Some(MachineType {
                name: name.to_owned(),
                alias_of,
            })
        })
        .collect()
}

/// The version in `QEMU emulator version 10.0.2 (...)`.
pub(crate) fn parse_version(line: &str) -> Option<String> {
    let version = line.split_whitespace().skip_while(|w| *w != "version").nth(1)?;
    version
        .split('.')
        .all(|part| part.parse::<u32>().is_ok())
        .then(|| version.to_owned())
}

/// Compares dotted versions numerically (`10.0.10` > `10.0.2`).
pub(crate) fn version_less(a: &str, b: &str) -> bool {
    let parts = |v: &str| {
        v.split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    parts(a) < parts(b)
}

/// The facts of `binary` as remembered in `cache`, or read from the binary (and remembered):
/// the cache holds the binary file's identity, so a replaced QEMU is asked again.
pub(crate) async fn qemu_facts(binary: &Path, cache: &Path) -> Result<QemuFacts> {
    remembered(binary, cache, ask_qemu(binary)).await
}

async fn ask_qemu(binary: &Path) -> Result<QemuFacts> {
    let version_text = qemu_output(binary, &["--version"]).await?;
    let first_line = version_text.lines().next().unwrap_or_default();
    let version = parse_version(first_line).ok_or_else(|| Error::QemuVersion {
        binary: binary.to_owned(),
        found: first_line.to_owned(),
    })?;
    let machines = parse_machine_help(&qemu_output(binary, &["-machine", "help"]).await?);
    Ok(QemuFacts { version, machines })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP: &str = "Supported machines are:\n\
        microvm              microvm (i386)\n\
        pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
        pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)\n\
        pc-i440fx-9.2        Standard PC (i440FX + PIIX, 1996)\n\
        q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n\
        pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n\
        pc-q35-9.2           Standard PC (Q35 + ICH9, 2009)\n\
        none                 empty machine\n";

    #[test]
    fn machine_help_resolves_aliases_to_versioned_types() {
        let facts = QemuFacts {
            version: "10.0.2".into(),
            machines: parse_machine_help(HELP),
        };
        assert_eq!(facts.resolve("q35"), Some("pc-q35-10.0"));
        assert_eq!(facts.resolve("pc"), Some("pc-i440fx-10.0"));
        assert_eq!(facts.resolve("pc-q35-9.2"), Some("pc-q35-9.2"));
        assert_eq!(facts.resolve("pc-q35-11.0"), None);
        assert_eq!(facts.family("pc-q35-11.0"), ["pc-q35-10.0", "pc-q35-9.2"]);
    }

    #[test]
    fn versions_parse_and_compare_numerically() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)").as_deref(),
            Some("10.0.2")
        );
        assert_eq!(parse_version("no version here"), None);
        assert!(version_less("10.0.2", "10.0.10"));
        assert!(version_less("9.2.0", "10.0.0"));
        assert!(!version_less("10.0.2", "10.0.2"));
    }

    #[test]
    fn the_kvm_probe_asks_the_device_not_the_file_name() {
        // A file that exists but is no KVM device is not usable.
        let file = tempfile::NamedTempFile::new().unwrap();
        let reason = probe_kvm_at(file.path()).unwrap_err();
        assert!(reason.contains("KVM_GET_API_VERSION"), "{reason}");
        let reason = probe_kvm_at(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(reason.contains("cannot open"), "{reason}");
        // The real device: whatever the host says, the probe agrees with an ioctl of its own.
        if let Ok(kvm) = fs::OpenOptions::new().read(true).write(true).open(KVM_DEVICE) {
            // SAFETY: as in probe_kvm_at.
            let version = unsafe { kvm_get_api_version(std::os::fd::AsRawFd::as_raw_fd(&kvm)) };
            assert_eq!(
                probe_kvm().is_ok(),
                version == Ok(KVM_API_VERSION),
                "{:?}",
                probe_kvm()
            );
        } else {
            assert!(probe_kvm().is_err());
        }
    }
}
