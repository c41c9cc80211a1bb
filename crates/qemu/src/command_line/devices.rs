//! The devices of the command line: firmware, disks, network cards and the guest agent channel.

use std::path::Path;

use super::{disk_nodes, escape, Args, RuntimePaths};
use crate::config::{
    DiskBus, DiskConfig, DomainConfig, Firmware, NicConfig, NicType, DEFAULT_NIC_MODEL, NVRAM_DISK_ID,
};

/// OVMF's code (read-only flash), from Debian's `ovmf` package.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's variables template, copied into each UEFI domain's NVRAM image when it is defined.
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The block node of the firmware code.
const OVMF_CODE_NODE: &str = "ovmf-code";
/// The id of the virtio-scsi controller (for `bus = "scsi"` disks).
const SCSI_CONTROLLER: &str = "scsi0";
/// The name of the guest agent's virtio-serial port, which the agent looks for.
pub const GUEST_AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// The `-machine` option's firmware part: the flash nodes of a UEFI domain.
pub(super) fn machine_flash(config: &DomainConfig) -> Option<String> {
    (config.firmware == Firmware::Uefi).then(|| {
        let (_, nvram) = disk_nodes(NVRAM_DISK_ID);
        format!(",pflash0={OVMF_CODE_NODE},pflash1={nvram}")
    })
}

/// The flash images of a UEFI domain: OVMF's code, read-only, and the domain's NVRAM image
/// (qcow2, named like a disk so the disk snapshots find it).
pub(super) fn firmware(args: &mut Args, config: &DomainConfig) {
    if config.firmware != Firmware::Uefi {
        return;
    }
    args.pair(
        "-blockdev",
        format!("driver=file,filename={OVMF_CODE},node-name={OVMF_CODE_NODE}-file,read-only=on"),
    );
    args.pair(
        "-blockdev",
        format!("driver=raw,file={OVMF_CODE_NODE}-file,node-name={OVMF_CODE_NODE},read-only=on"),
    );
    if let Some(nvram) = &config.nvram {
        let (file_node, format_node) = disk_nodes(NVRAM_DISK_ID);
        args.pair(
            "-blockdev",
            format!("driver=file,filename={},node-name={file_node}", escape(nvram)),
        );
        args.pair(
            "-blockdev",
            format!("driver=qcow2,file={file_node},node-name={format_node}"),
        );
    }
}

/// Every disk: a file node and a format node (with the cache mode and read-only flag), and its
/// device on its bus.
pub(super) fn disks(args: &mut Args, config: &DomainConfig) {
    if config.disks.iter().any(|disk| disk.bus == DiskBus::Scsi) {
        args.pair("-device", format!("virtio-scsi-pci,id={SCSI_CONTROLLER}"));
    }
    for disk in &config.disks {
        let (file_node, format_node) = disk_nodes(&disk.id);
        let (direct, no_flush, write_cache) = disk.cache.map(|c| c.options()).unzip3();
        let mut common = String::new();
        if no_flush == Some(true) {
            common.push_str(",cache.no-flush=on");
        }
        if disk.readonly {
            common.push_str(",read-only=on");
        }
        let direct = if direct == Some(true) {
            ",cache.direct=on"
        } else {
            ""
        };
        args.pair(
            "-blockdev",
            format!(
                "driver=file,filename={},node-name={file_node}{direct}{common}",
                escape(&disk.path)
            ),
        );
        args.pair(
            "-blockdev",
            format!(
                "driver={},file={file_node},node-name={format_node}{common}",
                disk.format.as_str()
            ),
        );
        args.pair("-device", disk_device(disk, &format_node, write_cache));
    }
}

/// The `-device` of one disk.
fn disk_device(disk: &DiskConfig, node: &str, write_cache: Option<bool>) -> String {
    let mut device = match disk.bus {
        DiskBus::Virtio => format!("virtio-blk-pci,drive={node},id={}", disk.id),
        DiskBus::Scsi => format!("scsi-hd,bus={SCSI_CONTROLLER}.0,drive={node},id={}", disk.id),
        DiskBus::Nvme => format!("nvme,drive={node},id={},serial={}", disk.id, disk.id),
    };
    if let Some(order) = disk.boot {
        device.push_str(&format!(",bootindex={order}"));
    }
    if let Some(on) = write_cache {
        device.push_str(if on { ",write-cache=on" } else { ",write-cache=off" });
    }
    device
}

/// Every network card: a `-netdev` backend and its device, with the definition's MAC.
pub(super) fn nics(args: &mut Args, config: &DomainConfig) {
    for (index, nic) in config.nics.iter().enumerate() {
        let id = format!("net{index}");
        args.pair("-netdev", netdev(nic, &id));
        let model = nic.model.as_deref().unwrap_or(DEFAULT_NIC_MODEL);
        let mut device = format!("{model},netdev={id},id=nic{index}");
        if let Some(mac) = &nic.mac {
            device.push_str(&format!(",mac={mac}"));
        }
        args.pair("-device", device);
    }
}

/// The `-netdev` of one card.
fn netdev(nic: &NicConfig, id: &str) -> String {
    match nic.kind {
        NicType::User => {
            let mut netdev = format!("user,id={id}");
            for rule in &nic.hostfwd {
                netdev.push_str(&format!(",hostfwd={rule}"));
            }
            netdev
        }
        // QEMU runs no scripts: the interface exists already (its owner set it up).
        NicType::Tap => format!(
            "tap,id={id},ifname={},script=no,downscript=no",
            nic.ifname.as_deref().unwrap_or_default()
        ),
        NicType::Bridge => format!("bridge,id={id},br={}", nic.br.as_deref().unwrap_or_default()),
    }
}

/// The guest agent's channel: a virtio-serial port named [`GUEST_AGENT_PORT`] on a Unix socket.
pub(super) fn guest_agent(args: &mut Args, config: &DomainConfig, paths: &RuntimePaths) {
    if !config.guest_agent {
        return;
    }
    args.pair("-device", "virtio-serial-pci,id=vser0");
    args.pair(
        "-chardev",
        format!(
            "socket,id=qga0,path={},server=on,wait=off",
            escape(&paths.guest_agent_socket)
        ),
    );
    args.pair(
        "-device",
        format!("virtserialport,bus=vser0.0,chardev=qga0,name={GUEST_AGENT_PORT}"),
    );
}

/// Splits an optional triple.
trait Unzip3<A, B, C> {
    fn unzip3(self) -> (Option<A>, Option<B>, Option<C>);
}

impl<A, B, C> Unzip3<A, B, C> for Option<(A, B, C)> {
    fn unzip3(self) -> (Option<A>, Option<B>, Option<C>) {
        match self {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)),
            None => (None, None, None),
        }
    }
}

/// Whether the firmware code OVMF needs is installed.
pub fn ovmf_installed() -> bool {
    Path::new(OVMF_CODE).is_file() && Path::new(OVMF_VARS_TEMPLATE).is_file()
}
