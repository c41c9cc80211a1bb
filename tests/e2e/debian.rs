//! Snapshots of a real operating system: the Debian 12 test guest (systemd, ext4 root,
//! qemu-guest-agent, a counter served over HTTP) driven through the `domsnap` CLI under TCG.
//!
//! - a live, quiesced snapshot of a domain with a user NIC (host forward), a qcow2 root disk
//!   (internal snapshot) and a raw data disk (external overlay); the guest writes files and its
//!   counter moves; the revert brings the counter back to the snapshot's and it continues, the
//!   files are as they were, the host reaches the service again, the filesystems are thawed;
//! - a disk-only snapshot of the shut-off domain (booted by SeaBIOS from its disk), then a guest
//!   that writes and is killed; the revert leaves a root filesystem that `e2fsck -n` finds clean;
//! - the guest booted from its disk through OVMF (`firmware = "uefi"`) survives a snapshot and a
//!   revert, NVRAM included.
//!
//! Needs `cargo xtask setup` (which builds the guest); fails, never skips, without it. Boots take
//! 35-90 s under TCG here, so each test boots as few times as it can.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::Cli;
use serde_json::Value;
use testkit::{agent_shell, debian_guest, http_counter, DebianBoot, DebianGuest};

/// Generous for a shared 2-core machine.
const BOOT: Duration = Duration::from_secs(300);
const SHORT: Duration = Duration::from_secs(60);

/// A Debian domain's files and the host port forwarded to its service.
struct Debian {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    http_port: u16,
}

impl Debian {
    /// Writes the configuration ([`DebianGuest::domain_config`]: 1 GiB under TCG, the guest
    /// agent, a user NIC forwarding a free host port to port 80, the root disk vda and a 64 MiB
    /// raw data disk vdb).
    fn define(cli: &Cli, guest: &DebianGuest, name: &str, boot: DebianBoot) -> Debian {
        let dir = cli.dir.path().join(format!("{name}-files"));
        let http_port = testkit::free_port();
        let config = guest.domain_config(&dir, name, boot, http_port);
        Debian {
            name: name.to_owned(),
            dir,
            config,
            http_port,
        }
    }

    /// Starts it (from its file the first time) and waits until its service answers.
    fn start(&self, cli: &Cli, from_file: bool) -> u64 {
        let what = if from_file {
            self.config.display().to_string()
        } else {
            self.name.clone()
        };
        cli.ok(&["domain", "start", &what]);
        self.counter(BOOT)
    }

    fn counter(&self, timeout: Duration) -> u64 {
        http_counter(self.http_port, timeout).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn agent_socket(&self, cli: &Cli) -> PathBuf {
        let status = cli.json(&["domain", "status", &self.name]);
        let socket = status["guest_agent_socket"]
            .as_str()
            .unwrap_or_else(|| panic!("no guest agent socket in {status}"));
        PathBuf::from(socket)
    }

    /// Runs `script` in the guest; its exit code.
    fn shell(&self, cli: &Cli, script: &str) -> i64 {
        agent_shell(&self.agent_socket(cli), script, SHORT)
            .unwrap_or_else(|e| panic!("{}: `{script}`: {e}", self.name))
    }

    fn fsfreeze_status(&self, cli: &Cli) -> Value {
        testkit::agent_execute(&self.agent_socket(cli), "guest-fsfreeze-status", None, SHORT).unwrap()
    }

    /// Waits until the served counter passes `above`.
    fn counter_above(&self, above: u64) -> u64 {
        testkit::http_counter_above(self.http_port, above, SHORT)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }
}

/// The root filesystem of a qcow2 image (the whole image, or its last partition when it has a
/// partition table), checked read-only by `e2fsck` on a raw copy.
fn fsck_root(image: &Path, scratch: &Path) {
    let raw = scratch.join("root-check.raw");
    let raw_text = raw.display().to_string();
    testkit::run(
        "qemu-img",
        &["convert", "-O", "raw", &image.display().to_string(), &raw_text],
    );
    let table = std::process::Command::new("sfdisk")
        .args(["-J", &raw_text])
        .output();
    let root_start = table
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice::<Value>(&out.stdout).ok())
        .and_then(|json| json["partitiontable"]["partitions"].as_array()?.last()?["start"].as_u64());
    // e2fsck opens `FILE?offset=BYTES` at that offset.
    let target = match root_start {
        Some(sector) => format!("{raw_text}?offset={}", sector * 512),
        None => raw_text,
    };
    let output = std::process::Command::new("e2fsck")
        .args(["-fn", &target])
        .output()
        .expect("run e2fsck");
    assert!(
        output.status.success(),
        "e2fsck -fn {target}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn a_live_quiesced_snapshot_of_debian_reverts_its_counter_files_and_network() {
    let cli = Cli::new();
    let guest = debian_guest();
    let deb = Debian::define(&cli, &guest, "deb", DebianBoot::Kernel);
    deb.start(&cli, true);
    let status = cli.json(&["domain", "status", "deb"]);
    assert_eq!(status["accel"], "tcg", "{status}");

    // Files on the root filesystem and a marker on the raw data disk, then the snapshot.
    assert_eq!(
        deb.shell(
            &cli,
            "echo before >/root/before && printf SNAP-A | dd of=/dev/vdb conv=fsync 2>/dev/null && sync"
        ),
        0
    );
    let before = deb.counter(SHORT);
    let report = cli.json(&[
        "snapshot",
        "create",
        "deb",
        "s1",
        "--live",
        "--quiesce",
        "--disk",
        "vdb=external",
    ]);
    let after_create = deb.counter(SHORT);
    assert_eq!(report["record"]["quiesced"], true, "{report}");
    assert_eq!(report["memory_mode"], "precopy", "{report}");
    assert_eq!(deb.fsfreeze_status(&cli), "thawed", "the create thawed the guest");

    // The guest goes on: files change, the counter moves.
    assert_eq!(deb.shell(&cli, "echo after >/root/after && rm /root/before && printf SNAP-B | dd of=/dev/vdb conv=fsync 2>/dev/null && sync"), 0);
    let moved = deb.counter_above(after_create + 3);

    let reverted = cli.json(&["snapshot", "revert", "deb", "s1"]);
    assert_eq!(reverted["thaw"]["outcome"], "thawed", "{reverted}");
    assert_eq!(reverted["state"], "running", "{reverted}");
    // The counter is the snapshot's again (it lives in the guest's RAM) and continues.
    let restored = deb.counter(SHORT);
    assert!(
        (before..=after_create + 1).contains(&restored),
        "after the revert the counter is {restored}: the snapshot was taken between {before} and \
         {after_create}, and it had reached {moved}"
    );
    deb.counter_above(restored);
    assert_eq!(deb.fsfreeze_status(&cli), "thawed");
    assert_eq!(
        deb.shell(&cli, "test -e /root/before && ! test -e /root/after"),
        0,
        "root files"
    );
    assert_eq!(
        deb.shell(&cli, "dd if=/dev/vdb bs=6 count=1 2>/dev/null | grep -q SNAP-A"),
        0,
        "data disk"
    );

    // The thaw happens on every path. A disk step that fails (the overlay's folder is
    // read-only): rolled back, the guest runs and is thawed.
    let read_only = common::ReadOnlyDir::new(&deb.dir);
    let overlay = format!("vdb=external:{}", read_only.path.join("vdb.q.qcow2").display());
    let failed = cli.fails(&["snapshot", "create", "deb", "q", "--quiesce", "--disk", &overlay]);
    assert!(
        failed.contains("rolled back") || failed.contains("snapshotting the disks"),
        "{failed}"
    );
    assert_eq!(deb.fsfreeze_status(&cli), "thawed", "after a failed disk step");
    // domsnap killed while the guest is frozen and paused, in the disk step: `recover`
    // resumes and thaws it.
    common::killed_at(
        &cli,
        &["snapshot", "create", "deb", "q", "--quiesce"],
        "snapshot-disks",
    );
    let recovered = cli.json(&["recover", "deb"]);
    assert_eq!(recovered["recovered"][0]["outcome"], "undone", "{recovered}");
    assert_eq!(deb.fsfreeze_status(&cli), "thawed", "after recover");
    let now = deb.counter(SHORT);
    deb.counter_above(now);

    cli.ok(&["snapshot", "delete", "deb", "s1"]);
    cli.ok(&["domain", "stop", "deb", "--force"]);
}

#[test]
fn a_disk_only_snapshot_of_shut_off_debian_reverts_to_a_clean_root_filesystem() {
    let cli = Cli::new();
    let guest = debian_guest();
    // Booted by SeaBIOS from its disk (no kernel in the configuration).
    let deb = Debian::define(&cli, &guest, "off", DebianBoot::Bios);
    deb.start(&cli, true);
    cli.ok(&["domain", "stop", "off", "--timeout", "180"]);
    let report = cli.json(&["snapshot", "create", "off", "cold"]);
    assert_eq!(report["record"]["memory"], Value::Null, "{report}");

    // A run that writes and is killed: its root filesystem is left unclean.
    deb.start(&cli, false);
    assert_eq!(deb.shell(&cli, "echo dirty >/root/dirty; sync"), 0);
    cli.ok(&["domain", "stop", "off", "--force"]);

    cli.ok(&["snapshot", "revert", "off", "cold"]);
    let status = cli.json(&["domain", "status", "off"]);
    assert_eq!(status["state"], "shut-off", "{status}");
    fsck_root(&deb.dir.join("root.qcow2"), &deb.dir);

    // And it boots from there, without the killed run's file.
    deb.start(&cli, false);
    assert_eq!(deb.shell(&cli, "! test -e /root/dirty"), 0);
    cli.ok(&["domain", "stop", "off", "--force"]);
}

#[test]
fn debian_under_uefi_survives_a_snapshot_and_a_revert_with_its_nvram() {
    let cli = Cli::new();
    let guest = debian_guest();
    let deb = Debian::define(&cli, &guest, "efi", DebianBoot::Uefi);
    deb.start(&cli, true);
    let disks: Vec<String> = cli.json(&["domain", "status", "efi"])["disks"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let before = deb.counter(SHORT);
    let report = cli.json(&[
        "snapshot",
        "create",
        "efi",
        "u1",
        "--live",
        "--disk",
        "vdb=external",
    ]);
    let record_disks: Vec<&str> = report["record"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["target"].as_str().unwrap())
        .collect();
    assert!(
        record_disks.contains(&"nvram"),
        "the NVRAM is snapshotted: {report} (disks {disks:?})"
    );

    // A UEFI variable written after the snapshot is gone after the revert (efivarfs takes the
    // 4-byte attributes, non-volatile + boot + runtime, then the data, in one write).
    let efivar = "/sys/firmware/efi/efivars/DomsnapTest-5f0c9a3e-2b7d-4e61-9c84-3a1d6e0b7f25";
    let write = format!(
        "grep -q efivarfs /proc/mounts || mount -t efivarfs efivarfs /sys/firmware/efi/efivars; \
         printf '\\007\\000\\000\\000x' >/tmp/var && cat /tmp/var >{efivar} && test -e {efivar}"
    );
    assert_eq!(deb.shell(&cli, &write), 0, "write {efivar}");
    deb.counter_above(before + 3);
    cli.json(&["snapshot", "revert", "efi", "u1"]);
    let restored = deb.counter(SHORT);
    assert!(restored >= before, "{restored} < {before}");
    deb.counter_above(restored);
    cli.ok(&["domain", "stop", "efi", "--timeout", "180"]);
    // Booted again from the reverted NVRAM: the variable is not there.
    deb.start(&cli, false);
    assert_eq!(
        deb.shell(&cli, &format!("! test -e {efivar}")),
        0,
        "the NVRAM was reverted"
    );
    cli.ok(&["domain", "stop", "efi", "--force"]);
}
