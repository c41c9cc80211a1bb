//! The machine's parts a configuration names: accelerator, firmware, network cards and disks,
//! with their checks.

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The disk id the NVRAM variables of a UEFI domain are reported under (a reserved disk id).
pub const NVRAM_DISK_ID: &str = "nvram";

/// How QEMU runs the guest's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// The host's KVM (`/dev/kvm`).
    Kvm,
    /// QEMU's emulator (TCG).
    Tcg,
}

impl Accel {
    /// The name QEMU and the configuration use.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The vCPU model used when the configuration names none: the host's under KVM, QEMU's
    /// richest emulated one under TCG.
    pub fn default_cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guest boots with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS, QEMU's default.
    #[default]
    Bios,
    /// OVMF (UEFI) from Debian's `ovmf` package, with per-domain NVRAM variables.
    Uefi,
}

impl Firmware {
    pub(crate) fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }
}

/// One network card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Where the card's traffic goes.
    #[serde(rename = "type")]
    pub kind: NicType,
    /// The guest's device model (default `virtio-net-pci`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The card's MAC address; generated (`52:54:00:xx:xx:xx`) when the domain is defined
    /// without one, and kept in its definition from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// User networking: host ports forwarded into the guest, QEMU's `hostfwd` syntax
    /// (`tcp::8080-:80`, `udp:127.0.0.1:5353-:53`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostfwd: Vec<String>,
    /// A tap card's interface on the host (it must exist; QEMU runs no scripts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// A bridge card's bridge on the host (QEMU's `qemu-bridge-helper` attaches it; the
    /// bridge must be allowed in `/etc/qemu/bridge.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub br: Option<String>,
}

/// How a network card reaches the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicType {
    /// QEMU's user-mode network stack (slirp), optionally with host port forwards.
    User,
    /// An existing tap interface.
    Tap,
    /// A host bridge, through `qemu-bridge-helper`.
    Bridge,
}

/// The NIC model when the configuration names none.
pub const DEFAULT_NIC_MODEL: &str = "virtio-net-pci";

/// A disk image's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2: internal and external snapshots.
    #[default]
    Qcow2,
    /// A raw image: external (qcow2 overlay) snapshots only.
    Raw,
}

impl DiskFormat {
    /// QEMU's driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }

    pub(crate) fn is_qcow2(&self) -> bool {
        *self == DiskFormat::Qcow2
    }
}

/// The bus a disk is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk, one PCI device per disk.
    #[default]
    Virtio,
    /// A `scsi-hd` on the domain's one virtio-scsi controller.
    Scsi,
    /// An NVMe controller per disk. QEMU cannot migrate NVMe controllers, so a domain with one
    /// takes disk-only snapshots only (a memory snapshot is refused, naming the device).
    Nvme,
}

impl DiskBus {
    pub(crate) fn is_virtio(&self) -> bool {
        *self == DiskBus::Virtio
    }
}

/// A disk's host cache mode (QEMU's `cache=` shorthand).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// O_DIRECT (`cache.direct=on`), bypassing the host page cache.
    None,
    /// The host page cache, flushes honoured (QEMU's default).
    Writeback,
    /// Every write synced.
    Writethrough,
    /// O_DIRECT and every write synced.
    Directsync,
    /// Flushes ignored: fast and unsafe on a host crash.
    Unsafe,
}

impl DiskCache {
    /// `(cache.direct, cache.no-flush)` of the `-blockdev` nodes, and whether the device's
    /// write cache is on (`write-cache=`).
    pub(crate) fn options(self) -> (bool, bool, bool) {
        match self {
            DiskCache::None => (true, false, true),
            DiskCache::Writeback => (false, false, true),
            DiskCache::Writethrough => (false, false, false),
            DiskCache::Directsync => (true, false, false),
            DiskCache::Unsafe => (false, true, true),
        }
    }
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The target id (`vda`); also names the QEMU device and block nodes.
    pub id: String,
    /// The image the domain uses now (after an external snapshot: the overlay).
    pub path: PathBuf,
    /// The format of `path` (default qcow2). domsnap's overlays are qcow2, so after an
    /// external snapshot of a raw disk this says qcow2 (the raw image is below the overlay).
    #[serde(default, skip_serializing_if = "DiskFormat::is_qcow2")]
    pub format: DiskFormat,
    /// The bus (default virtio).
    #[serde(default, skip_serializing_if = "DiskBus::is_virtio")]
    pub bus: DiskBus,
    /// The guest cannot write to it. Read-only disks are left out of snapshots: nothing on them
    /// changes, a revert leaves them as they are.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    /// Host cache mode (default: QEMU's, writeback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<DiskCache>,
    /// Boot order: the firmware tries disks with lower numbers first (`bootindex`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u32>,
}

impl DiskConfig {
    /// A read-write qcow2 disk on virtio with QEMU's defaults.
    pub fn qcow2(id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            id: id.into(),
            path: path.into(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::Virtio,
            readonly: false,
            cache: None,
            boot: None,
        }
    }
}

/// Checks a MAC address: six two-digit hex bytes separated by colons, unicast (the first byte's
/// lowest bit clear) and not all zero.
pub(crate) fn check_mac(mac: &str) -> Result<(), String> {
    let bytes: Vec<&str> = mac.split(':').collect();
    let well_formed = bytes.len() == 6
        && bytes
            .iter()
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    if !well_formed {
        return Err(format!(
            "mac = {mac:?}: write six hex bytes separated by ':', e.g. 52:54:00:12:34:56"
        ));
    }
    let first = u8::from_str_radix(bytes[0], 16).map_err(|e| e.to_string())?;
    if first & 1 == 1 {
        return Err(format!(
            "mac = {mac:?} is a multicast address (the first byte is odd)"
        ));
    }
    if bytes.iter().all(|b| *b == "00") {
        return Err(format!("mac = {mac:?} is all zero"));
    }
    Ok(())
}

/// A fresh locally administered MAC in QEMU's `52:54:00` range, from the kernel's random bytes.
pub(crate) fn generate_mac() -> std::io::Result<String> {
    let mut bytes = [0u8; 3];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        bytes[0], bytes[1], bytes[2]
    ))
}

/// Checks one `hostfwd` rule: `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
pub(crate) fn check_hostfwd(rule: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "hostfwd {rule:?}: {why}; write [tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, \
             e.g. \"tcp::8080-:80\""
        ))
    };
    let Some((host, guest)) = rule.split_once('-') else {
        return bad("no '-' between the host and the guest side");
    };
    let mut host_parts = host.splitn(3, ':');
    let (Some(proto), Some(host_addr), Some(host_port)) =
        (host_parts.next(), host_parts.next(), host_parts.next())
    else {
        return bad("the host side needs PROTOCOL:ADDRESS:PORT");
    };
    if !matches!(proto, "" | "tcp" | "udp") {
        return bad("the protocol is tcp or udp");
    }
    let Some((guest_addr, guest_port)) = guest.split_once(':') else {
        return bad("the guest side needs ADDRESS:PORT");
    };
    for addr in [host_addr, guest_addr] {
        if !addr.is_empty() && addr.parse::<std::net::Ipv4Addr>().is_err() {
            return bad(&format!("{addr:?} is not an IPv4 address"));
        }
    }
    let guest_port_ok = guest_port.parse::<u16>().is_ok_and(|p| p != 0);
    if host_port.parse::<u16>().is_err() || !guest_port_ok {
        return bad("ports are numbers up to 65535 (the guest's not 0)");
    }
    Ok(())
}

/// A host interface name (tap, bridge): what Linux accepts, without QEMU's option separators.
pub(crate) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A QEMU type name (machine, CPU model, device model): letters, digits, `-`, `_`, `.`, and for
/// CPU models `+`/`-` feature flags after commas are not accepted (one model name only).
pub(crate) fn valid_type_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}
