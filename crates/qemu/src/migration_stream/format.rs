//! The stream's wire format: the file header, section types and RAM record flags QEMU writes, and
//! the device-state files built from them (header, configuration section, then the devices).

use super::FormatError;

/// `QEVM`.
pub(super) const FILE_MAGIC: u32 = u32::from_be_bytes(*b"QEVM");
/// The stream version QEMU has written since 0.13.
pub(super) const FILE_VERSION: u32 = 3;
/// The header of a migration stream and so of every device-state file (the blob
/// [`parse_migration_stream`](super::parse_migration_stream) writes, and what QMP's
/// `xen-save-devices-state` writes): the magic `QEVM` and the stream version 3, both big-endian, as
/// `migrate-incoming` expects them.
pub const DEVICE_STATE_HEADER: [u8; 8] = {
    let magic = FILE_MAGIC.to_be_bytes();
    let version = FILE_VERSION.to_be_bytes();
    [
        magic[0], magic[1], magic[2], magic[3], version[0], version[1], version[2], version[3],
    ]
};

/// The configuration section QEMU writes right after the header of a migration stream (`0x07`,
/// `be32` length, the machine type, e.g. `pc-q35-10.0`). A QEMU started to receive a stream with
/// the default `migration.send-configuration=on` requires it (and checks that the machine type
/// is its own); a QEMU that loaded a stream without it (started with
/// `-global migration.send-configuration=off`) aborts on its next outgoing migration, so every
/// device-state file domsnap writes carries it: [`device_state_prefix`].
///
/// # Errors
///
/// A machine type longer than QEMU's stream allows here (256 bytes).
pub fn configuration_section(machine_type: &str) -> std::result::Result<Vec<u8>, FormatError> {
    let len = u32::try_from(machine_type.len())
        .ok()
        .filter(|len| *len <= MAX_MACHINE_NAME)
        .ok_or(FormatError::MachineTypeTooLong {
            len: u32::try_from(machine_type.len()).unwrap_or(u32::MAX),
        })?;
    let mut section = Vec::with_capacity(5 + machine_type.len());
    section.push(SECTION_CONFIGURATION);
    section.extend_from_slice(&len.to_be_bytes());
    section.extend_from_slice(machine_type.as_bytes());
    Ok(section)
}

/// What a device-state file starts with: [`DEVICE_STATE_HEADER`], then the
/// [`configuration_section`] of `machine_type`; the device sections follow.
///
/// # Errors
///
/// As [`configuration_section`].
pub fn device_state_prefix(machine_type: &str) -> std::result::Result<Vec<u8>, FormatError> {
    let mut prefix = DEVICE_STATE_HEADER.to_vec();
    prefix.extend(configuration_section(machine_type)?);
    Ok(prefix)
}

/// The layout of a device-state file, read from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceStateFormat {
    /// The header, then the configuration section naming this machine type, then the devices:
    /// what domsnap writes since issue 10.
    Configured {
        /// The machine type the configuration section names.
        machine_type: String,
        /// Bytes of header and configuration section; the device sections start here.
        devices_at: usize,
    },
    /// The header, then directly the devices (`xen-save-devices-state`'s own output, and what
    /// older domsnap versions stored). QEMU loads it only with `migration.send-configuration=off`,
    /// after which it cannot migrate again: the driver inserts the configuration section when it
    /// loads such a file.
    Legacy,
}

/// Reads the layout of a device-state file from its first bytes (at least the header; the
/// configuration section when there is one).
///
/// # Errors
///
/// A reason when `start` is not the start of a device-state file.
pub fn device_state_format(start: &[u8]) -> std::result::Result<DeviceStateFormat, String> {
    let not_ours = || "not a QEMU device-state file (it does not start with QEVM, version 3)".to_owned();
    let rest = start
        .strip_prefix(&DEVICE_STATE_HEADER[..])
        .ok_or_else(not_ours)?;
    match rest.first() {
        Some(&SECTION_CONFIGURATION) => {
            let len = rest
                .get(1..5)
                .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
                .map(u32::from_be_bytes)
                .ok_or("the configuration section is cut short")?;
            if len > MAX_MACHINE_NAME {
                return Err(FormatError::MachineTypeTooLong { len }.to_string());
            }
            let end = 5 + len as usize;
            let name = rest.get(5..end).ok_or("the configuration section is cut short")?;
            let machine_type = std::str::from_utf8(name)
                .map_err(|_| "the configuration section's machine type is not UTF-8")?
                .to_owned();
            Ok(DeviceStateFormat::Configured {
                machine_type,
                devices_at: DEVICE_STATE_HEADER.len() + end,
            })
        }
        Some(&SECTION_FULL | &SECTION_EOF) => Ok(DeviceStateFormat::Legacy),
        Some(kind) => Err(format!(
            "section type {kind:#04x} after the header: neither a configuration nor a device section"
        )),
        None => Err("it holds nothing after the header".into()),
    }
}

// Section types (QEMU `migration/savevm.c`).
pub(super) const SECTION_EOF: u8 = 0x00;
pub(super) const SECTION_START: u8 = 0x01;
pub(super) const SECTION_PART: u8 = 0x02;
pub(super) const SECTION_END: u8 = 0x03;
pub(super) const SECTION_FULL: u8 = 0x04;
pub(super) const SECTION_SUBSECTION: u8 = 0x05;
pub(super) const SECTION_VMDESCRIPTION: u8 = 0x06;
pub(super) const SECTION_CONFIGURATION: u8 = 0x07;
pub(super) const SECTION_COMMAND: u8 = 0x08;
/// `MIG_CMD_SWITCHOVER_START`: QEMU 10 tells the destination that the switch-over begins (for
/// devices that load state ahead of it); it carries no data.
pub(super) const CMD_SWITCHOVER_START: u16 = 11;
pub(super) const SECTION_FOOTER: u8 = 0x7e;

// RAM record flags, in the low bits of a record's be64 (QEMU `migration/ram.c`). The offset of a
// page is aligned to the target page (4 KiB on x86), which leaves 12 bits for flags.
pub(super) const FLAG_MASK: u64 = 0xfff;
pub(super) const FLAG_ZERO: u64 = 0x02;
pub(super) const FLAG_MEM_SIZE: u64 = 0x04;
pub(super) const FLAG_PAGE: u64 = 0x08;
pub(super) const FLAG_EOS: u64 = 0x10;
pub(super) const FLAG_CONTINUE: u64 = 0x20;
/// Flags this parser reads; any other bit is refused.
pub(super) const KNOWN_FLAGS: u64 = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE;
/// Names of the flags it refuses, for the error message.
pub(super) const REFUSED_FLAGS: [(u64, &str); 5] = [
    (0x01, "FULL (obsolete)"),
    (0x40, "XBZRLE"),
    (0x80, "HOOK (RDMA)"),
    (0x100, "COMPRESS_PAGE"),
    (0x200, "MULTIFD_FLUSH"),
];

/// The only iterable section this parser reads, and its version in QEMU 10.
pub(super) const RAM_SECTION: &str = "ram";
pub(super) const RAM_SECTION_VERSION: u32 = 4;
/// Longest machine type name accepted in the configuration section.
pub(super) const MAX_MACHINE_NAME: u32 = 256;
