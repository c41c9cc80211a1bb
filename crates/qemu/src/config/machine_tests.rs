//! Parsing and checking the keys that describe the machine.

use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<DomainConfig> {
    DomainConfig::parse(
        &format!("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n{text}"),
        Path::new("/etc/domsnap"),
    )
}

fn refused(text: &str, expected: &str) {
    let error = parse(text).unwrap_err().to_string();
    assert!(error.contains(expected), "{text:?}: {error}");
}

const FULL: &str = r#"
    accel = "kvm"
    machine = "pc"
    cpu = "host"
    firmware = "uefi"
    guest_agent = true
    [[disks]]
    id = "root"
    path = "root.raw"
    format = "raw"
    bus = "scsi"
    cache = "none"
    boot = 1
    [[disks]]
    id = "iso"
    path = "/img/install.qcow2"
    readonly = true
    [[nics]]
    type = "user"
    hostfwd = ["tcp::8080-:80", "udp:127.0.0.1:5353-10.0.2.15:53"]
    [[nics]]
    type = "tap"
    ifname = "tap0"
    model = "e1000"
    mac = "52:54:00:AB:cd:01"
    [[nics]]
    type = "bridge"
    br = "br0"
"#;

#[test]
fn every_machine_key_parses_and_survives_the_definitions_round_trip() {
    let config = parse(FULL).unwrap();
    assert_eq!(config.accel, Some(Accel::Kvm));
    assert_eq!(config.machine(), "pc");
    assert_eq!(config.cpu.as_deref(), Some("host"));
    assert_eq!(config.firmware, Firmware::Uefi);
    assert!(config.guest_agent);
    let root = config.disk("root").unwrap();
    assert_eq!(root.path, Path::new("/etc/domsnap/root.raw"));
    assert_eq!(
        (root.format, root.bus, root.cache, root.boot, root.readonly),
        (
            DiskFormat::Raw,
            DiskBus::Scsi,
            Some(DiskCache::None),
            Some(1),
            false
        )
    );
    assert!(config.disk("iso").unwrap().readonly);
    assert_eq!(config.nics.len(), 3);
    assert_eq!(config.nics[0].kind, NicType::User);
    assert_eq!(config.nics[0].hostfwd.len(), 2);
    assert_eq!(config.nics[1].ifname.as_deref(), Some("tap0"));
    assert_eq!(config.nics[2].br.as_deref(), Some("br0"));
    let again = DomainConfig::parse(&toml::to_string(&config).unwrap(), Path::new("/")).unwrap();
    assert_eq!(again, config);
}

#[test]
fn defaults_describe_the_machine_domsnap_always_ran() {
    let config = parse("[[disks]]\nid = \"vda\"\npath = \"/d\"").unwrap();
    // Unpinned (a definition made before these keys): TCG on q35, QEMU's default vCPU.
    assert_eq!(
        (config.accel(), config.machine(), config.cpu.as_deref()),
        (Accel::Tcg, "q35", None)
    );
    assert_eq!(config.firmware, Firmware::Bios);
    assert!(!config.guest_agent && config.nics.is_empty() && config.nvram.is_none());
    let disk = config.disk("vda").unwrap();
    assert_eq!(disk, &DiskConfig::qcow2("vda", "/d"));
    // The defaults are not written out, so older definitions read the same.
    let text = toml::to_string(&config).unwrap();
    for key in [
        "accel",
        "machine",
        "cpu",
        "firmware",
        "guest_agent",
        "nics",
        "format",
        "bus",
        "readonly",
    ] {
        assert!(!text.contains(&format!("\n{key} =")), "{key} in {text}");
    }
    assert_eq!(Accel::Kvm.default_cpu(), "host");
    assert_eq!(Accel::Tcg.default_cpu(), "max");
}

#[test]
fn bad_machine_keys_are_refused_with_the_reason() {
    let cases = [
        ("accel = \"xen\"", "unknown variant `xen`"),
        ("machine = \"microvm\"", "machine = \"microvm\""),
        ("machine = \"q35,accel=kvm\"", "machine = \"q35,accel=kvm\""),
        ("cpu = \"max,+vmx\"", "cpu = \"max,+vmx\""),
        ("firmware = \"coreboot\"", "unknown variant `coreboot`"),
        ("nvram = \"/n.qcow2\"", "BIOS has none"),
        ("guest_agent = \"yes\"", "invalid type"),
        ("[[disks]]\nid = \"nvram\"\npath = \"/d\"", "reserved"),
        ("[[disks]]\nid = \"vda\"\npath = \"/d\"\nformat = \"vmdk\"", "unknown variant `vmdk`"),
        ("[[disks]]\nid = \"vda\"\npath = \"/d\"\nbus = \"ide\"", "unknown variant `ide`"),
        ("[[disks]]\nid = \"vda\"\npath = \"/d\"\ncache = \"fast\"", "unknown variant `fast`"),
        ("[[disks]]\nid = \"vda\"\npath = \"/d\"\nboot = 1\n[[disks]]\nid = \"vdb\"\npath = \"/e\"\nboot = 1", "boot = 1 is given to two disks"),
        ("[[disks]]\nid = \"vda\"\npath = \"/d\"\nreadonly = 1", "invalid type"),
    ];
    for (text, expected) in cases {
        refused(text, expected);
    }
}

#[test]
fn bad_nics_are_refused_with_the_reason() {
    let cases = [
        ("type = \"vde\"", "unknown variant `vde`"),
        ("type = \"user\"\nmac = \"52:54:00:12:34\"", "six hex bytes"),
        ("type = \"user\"\nmac = \"52-54-00-12-34-56\"", "six hex bytes"),
        ("type = \"user\"\nmac = \"53:54:00:12:34:56\"", "multicast"),
        ("type = \"user\"\nmac = \"00:00:00:00:00:00\"", "all zero"),
        (
            "type = \"user\"\nmodel = \"virtio-net-pci,romfile=/x\"",
            "not a QEMU device name",
        ),
        (
            "type = \"user\"\nhostfwd = [\"tcp:8080:80\"]",
            "hostfwd \"tcp:8080:80\"",
        ),
        ("type = \"user\"\nhostfwd = [\"sctp::1-:2\"]", "tcp or udp"),
        (
            "type = \"user\"\nhostfwd = [\"tcp::70000-:80\"]",
            "ports are numbers",
        ),
        (
            "type = \"user\"\nhostfwd = [\"tcp::8080-:0\"]",
            "ports are numbers",
        ),
        (
            "type = \"user\"\nhostfwd = [\"tcp:host:1-:2\"]",
            "not an IPv4 address",
        ),
        (
            "type = \"user\"\nifname = \"tap0\"",
            "ifname is for type = \"tap\" only",
        ),
        ("type = \"tap\"", "ifname is required"),
        (
            "type = \"tap\"\nifname = \"tap0,script=/evil\"",
            "ifname = \"tap0,script=/evil\"",
        ),
        (
            "type = \"tap\"\nifname = \"t\"\nhostfwd = [\"tcp::1-:2\"]",
            "hostfwd is for type = \"user\" only",
        ),
        ("type = \"bridge\"", "br is required"),
        (
            "type = \"bridge\"\nbr = \"br0\"\nifname = \"x\"",
            "ifname is for type = \"tap\" only",
        ),
        (
            "type = \"user\"\nbr = \"br0\"",
            "br is for type = \"bridge\" only",
        ),
        ("type = \"user\"\nspeed = 10", "unknown field `speed`"),
    ];
    for (nic, expected) in cases {
        refused(&format!("[[nics]]\n{nic}"), expected);
    }
    refused(
        "[[nics]]\ntype = \"user\"\nmac = \"52:54:00:00:00:01\"\n[[nics]]\ntype = \"user\"\nmac = \"52:54:00:00:00:01\"",
        "nics[1] (type User): mac 52:54:00:00:00:01 is used by another NIC",
    );
}

#[test]
fn the_disks_snapshots_see_are_the_writable_ones_and_the_nvram() {
    let mut config = parse(FULL).unwrap();
    config.nvram = Some("/state/a/nvram.qcow2".into());
    let targets = config.disk_targets();
    let ids: Vec<(&str, snapshot_core::ImageFormat)> =
        targets.iter().map(|t| (t.target.as_str(), t.format)).collect();
    assert_eq!(
        ids,
        [
            ("root", snapshot_core::ImageFormat::Raw),
            (NVRAM_DISK_ID, snapshot_core::ImageFormat::Qcow2)
        ]
    );
    // An overlay on the raw disk is qcow2; the NVRAM follows its overlays too.
    assert!(config.set_disk_image("root", "/o.qcow2".into(), DiskFormat::Qcow2));
    assert!(config.set_disk_image(NVRAM_DISK_ID, "/state/a/nvram.s1.qcow2".into(), DiskFormat::Qcow2));
    assert!(!config.set_disk_image("vdz", "/x".into(), DiskFormat::Qcow2));
    assert_eq!(config.disk("root").unwrap().format, DiskFormat::Qcow2);
    assert_eq!(
        config.nvram.as_deref(),
        Some(Path::new("/state/a/nvram.s1.qcow2"))
    );
}
