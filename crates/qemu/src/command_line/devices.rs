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
        args.pair("-blockdev", file_blockdev(nvram, &file_node, ""));
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
            file_blockdev(&disk.path, &file_node, &format!("{direct}{common}")),
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

/// The `-blockdev` of a writable image's protocol node; `extra` holds further options.
///
/// `drop-cache=off`: when QEMU reactivates its disks (`cont` after a completed migration, the
/// first `cont` of an incoming QEMU) it would otherwise `fdatasync` the image and drop its page
/// cache, for a destination host that shares the storage. domsnap's migrations never leave this
/// host, whose page cache is coherent with every writer (qemu-img included); the flush waited
/// behind other writeback inside the guest's pause, and the dropped cache made the guest's
/// first reads after a revert go to the disk.
fn file_blockdev(path: &Path, node: &str, extra: &str) -> String {
    format!(
        "driver=file,filename={},node-name={node},drop-cache=off{extra}",
        escape(path)
    )
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
        let id = super::netdev_id(index);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{qemu_args, StartMode};
    use super::*;

    fn line(text: &str) -> String {
        let config = DomainConfig::parse(
            &format!("name = \"vm1\"\nmemory_mib = 256\nkernel = \"/k\"\n{text}"),
            Path::new("/img"),
        )
        .unwrap();
        let paths = RuntimePaths {
            ram_file: "/dev/shm/vm1.ram".into(),
            qmp_socket: "/run/vm1/qmp.sock".into(),
            serial_log: "/run/vm1/serial.log".into(),
            console_socket: "/run/vm1/console.sock".into(),
            guest_agent_socket: "/run/vm1/qga.sock".into(),
        };
        qemu_args(&config, &paths, StartMode::Boot { paused: false })
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn has(line: &str, expected: &[&str]) {
        for part in expected {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
    }

    #[test]
    fn kvm_runs_the_hosts_cpu_and_tcg_the_emulated_max() {
        has(
            &line("accel = \"kvm\"\ncpu = \"host\"\nmachine = \"pc-q35-10.0\""),
            &["-accel kvm -machine pc-q35-10.0,memory-backend=mem -cpu host -m 256M"],
        );
        has(
            &line("accel = \"tcg\"\ncpu = \"max\"\nmachine = \"pc-i440fx-10.0\""),
            &["-accel tcg -machine pc-i440fx-10.0,memory-backend=mem -cpu max -m 256M"],
        );
        // Unpinned (older definitions): as before, TCG on q35 with QEMU's default vCPU.
        let old = line("");
        has(&old, &["-accel tcg -machine q35,memory-backend=mem -m 256M"]);
        assert!(!old.contains("-cpu"), "{old}");
    }

    #[test]
    fn disks_get_their_format_bus_cache_read_only_flag_and_boot_order() {
        assert!(!line("[[disks]]\nid = \"vda\"\npath = \"/a\"").contains("virtio-scsi"));
        let line = line(
            "[[disks]]\nid = \"vda\"\npath = \"a.raw\"\nformat = \"raw\"\nboot = 2\ncache = \"unsafe\"\n\
             [[disks]]\nid = \"sda\"\npath = \"b.qcow2\"\nbus = \"scsi\"\ncache = \"none\"\n\
             [[disks]]\nid = \"sdb\"\npath = \"c.qcow2\"\nbus = \"scsi\"\nreadonly = true\ncache = \"writethrough\"\n\
             [[disks]]\nid = \"nv\"\npath = \"d.qcow2\"\nbus = \"nvme\"",
        );
        has(
            &line,
            &[
                "-blockdev driver=file,filename=/img/a.raw,node-name=file-vda,drop-cache=off,cache.no-flush=on \
                 -blockdev driver=raw,file=file-vda,node-name=disk-vda,cache.no-flush=on \
                 -device virtio-blk-pci,drive=disk-vda,id=vda,bootindex=2,write-cache=on",
                "-device virtio-scsi-pci,id=scsi0",
                "-blockdev driver=file,filename=/img/b.qcow2,node-name=file-sda,drop-cache=off,cache.direct=on \
                 -blockdev driver=qcow2,file=file-sda,node-name=disk-sda \
                 -device scsi-hd,bus=scsi0.0,drive=disk-sda,id=sda,write-cache=on",
                "-blockdev driver=file,filename=/img/c.qcow2,node-name=file-sdb,drop-cache=off,read-only=on \
                 -blockdev driver=qcow2,file=file-sdb,node-name=disk-sdb,read-only=on \
                 -device scsi-hd,bus=scsi0.0,drive=disk-sdb,id=sdb,write-cache=off",
                "-device nvme,drive=disk-nv,id=nv,serial=nv",
            ],
        );
        // One controller for every SCSI disk.
        assert_eq!(line.matches("virtio-scsi-pci").count(), 1, "{line}");
    }

    #[test]
    fn nics_get_their_backend_model_and_mac() {
        has(
            &line(
                "[[nics]]\ntype = \"user\"\nhostfwd = [\"tcp::8080-:80\", \"udp::5353-:53\"]\nmac = \"52:54:00:00:00:01\"\n\
                 [[nics]]\ntype = \"tap\"\nifname = \"tap0\"\nmodel = \"e1000\"\nmac = \"52:54:00:00:00:02\"\n\
                 [[nics]]\ntype = \"bridge\"\nbr = \"br0\"\nmac = \"52:54:00:00:00:03\"",
            ),
            &[
                "-netdev user,id=net0,hostfwd=tcp::8080-:80,hostfwd=udp::5353-:53 \
                 -device virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01",
                "-netdev tap,id=net1,ifname=tap0,script=no,downscript=no \
                 -device e1000,netdev=net1,id=nic1,mac=52:54:00:00:00:02",
                "-netdev bridge,id=net2,br=br0 -device virtio-net-pci,netdev=net2,id=nic2,mac=52:54:00:00:00:03",
            ],
        );
    }

    #[test]
    fn uefi_puts_ovmf_and_the_nvram_image_on_the_flashes() {
        let uefi = line("firmware = \"uefi\"\nnvram = \"/state/vm1/nvram.qcow2\"\nmachine = \"pc-q35-10.0\"");
        has(
            &uefi,
            &[
                "-machine pc-q35-10.0,memory-backend=mem,pflash0=ovmf-code,pflash1=disk-nvram ",
                "-blockdev driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,node-name=ovmf-code-file,read-only=on \
                 -blockdev driver=raw,file=ovmf-code-file,node-name=ovmf-code,read-only=on",
                "-blockdev driver=file,filename=/state/vm1/nvram.qcow2,node-name=file-nvram,drop-cache=off \
                 -blockdev driver=qcow2,file=file-nvram,node-name=disk-nvram",
            ],
        );
        let bios = line("");
        assert!(!bios.contains("pflash") && !bios.contains("OVMF"), "{bios}");
    }

    #[test]
    fn the_guest_agent_gets_its_named_port_on_a_socket() {
        has(
            &line("guest_agent = true"),
            &["-device virtio-serial-pci,id=vser0 \
               -chardev socket,id=qga0,path=/run/vm1/qga.sock,server=on,wait=off \
               -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"],
        );
        assert!(!line("").contains("qga"));
    }
}
