//! Domains described as real machines (docs/cli.md, "Domain configuration"): NICs, raw and SCSI
//! disks, the pinned machine type recorded with every snapshot and checked at revert, migration
//! blockers, and UEFI with its NVRAM snapshotted and reverted with the disks. Real QEMU 10 under
//! TCG; the tiny test guest, or OVMF alone (it reaches its shell without an OS).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{Cli, Domain, Workload};

const BOOT: Duration = Duration::from_secs(90);

/// Writes `name`'s configuration (`extra` after the test guest's kernel lines, or with no kernel
/// when `kernel` is false) and returns the domain, not started.
fn domain(cli: &Cli, name: &str, kernel: bool, extra: &str) -> Domain {
    let guest = testkit::guest();
    let dir = cli.dir.path().join(format!("{name}-files"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = format!("name = \"{name}\"\nmemory_mib = 128\naccel = \"tcg\"\n");
    if kernel {
        config.push_str(&format!(
            "kernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet {}\"\n",
            guest.kernel.display(),
            guest.initrd.display(),
            Workload::Idle.cmdline()
        ));
    }
    config.push_str(extra);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let folder = cli.state_dir().join("domains").join(name);
    Domain {
        name: name.to_owned(),
        config: path,
        dir,
        images: Vec::new(),
        serial_log: folder.join("serial.log"),
        folder,
    }
}

/// Makes the qcow2 images `qcow2` (file name, size) in `name`'s folder, writes its configuration
/// (as [`domain`]), starts it and waits for `ready` on its console.
fn started(cli: &Cli, name: &str, kernel: bool, qcow2: &[(&str, &str)], extra: &str, ready: &str) -> Domain {
    let domain = domain(cli, name, kernel, extra);
    for (file, size) in qcow2 {
        testkit::create_qcow2(&domain.dir.join(file), size);
    }
    cli.ok(&["domain", "start", domain.config.to_str().unwrap()]);
    domain.wait_for_serial(ready, BOOT);
    domain
}

/// The stored definition of a domain.
fn definition(cli: &Cli, name: &str) -> toml::Table {
    let path = cli.state_dir().join("domains").join(name).join("domain.toml");
    std::fs::read_to_string(path).unwrap().parse().unwrap()
}

/// QEMU's command line, from /proc.
fn qemu_cmdline(cli: &Cli, name: &str) -> (u32, String) {
    let pid: u32 = cli.json(&["domain", "status", name])["pid"]
        .as_u64()
        .unwrap()
        .try_into()
        .unwrap();
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    (pid, String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command that must fail with `status` and must not reach the step `never` (the kill
/// hook there would end it with SIGKILL); its stderr.
fn refused_before(cli: &Cli, args: &[&str], status: i32, never: &str) -> String {
    let output = cli
        .command(args)
        .env("DOMSNAP_TEST_KILL_AT", never)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(status), "domsnap {args:?}: {stderr}");
    stderr
}

/// The guest-visible bytes of a qcow2 image (its whole chain, or its internal snapshot `snapshot`).
fn image_bytes(image: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut args = vec!["convert".to_owned(), "-O".into(), "raw".into()];
    if let Some(name) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={name}")]);
    }
    args.extend([image.display().to_string(), out.path().display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    testkit::run("qemu-img", &args);
    std::fs::read(out.path()).unwrap()
}

#[test]
fn a_machine_with_a_nic_raw_and_scsi_disks_keeps_its_mac_across_snapshot_and_revert() {
    let cli = Cli::new();
    let port = free_port();
    let files = cli.dir.path().join("m1-files");
    std::fs::create_dir_all(&files).unwrap();
    let raw = files.join("data.raw");
    std::fs::File::create(&raw).unwrap().set_len(16 << 20).unwrap();
    let extra = format!(
        "guest_agent = true\n\
         [[disks]]\nid = \"vda\"\npath = \"vda.qcow2\"\nboot = 1\n\
         [[disks]]\nid = \"vdb\"\npath = \"data.raw\"\nformat = \"raw\"\ncache = \"writethrough\"\n\
         [[disks]]\nid = \"sda\"\npath = \"sda.qcow2\"\nbus = \"scsi\"\n\
         [[disks]]\nid = \"ro\"\npath = \"ro.qcow2\"\nreadonly = true\n\
         [[nics]]\ntype = \"user\"\nhostfwd = [\"tcp:127.0.0.1:{port}-:80\"]\n"
    );
    let qcow2 = [("vda.qcow2", "64M"), ("sda.qcow2", "32M"), ("ro.qcow2", "16M")];
    let m = started(&cli, "m1", true, &qcow2, &extra, "DOMSNAP READY");

    // Defining pinned the machine and a MAC; status says TCG.
    let defined = definition(&cli, "m1");
    assert_eq!(defined["machine"].as_str(), Some("pc-q35-10.0"), "{defined}");
    assert_eq!(
        (defined["accel"].as_str(), defined["cpu"].as_str()),
        (Some("tcg"), Some("max"))
    );
    let mac = defined["nics"][0]["mac"].as_str().unwrap().to_owned();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    let status = cli.json(&["domain", "status", "m1"]);
    assert_eq!(status["accel"], "tcg");
    // The guest agent's channel listens on its socket in the run folder.
    let agent = PathBuf::from(status["guest_agent_socket"].as_str().unwrap());
    assert!(agent.ends_with("domains/m1/run/qga.sock"), "{}", agent.display());
    std::os::unix::net::UnixStream::connect(&agent).expect("QEMU listens on the agent's socket");
    let (_, line) = qemu_cmdline(&cli, "m1");
    for part in [
        format!("mac={mac}"),
        format!("hostfwd=tcp:127.0.0.1:{port}-:80"),
        "driver=raw,file=file-vdb".to_owned(),
        "scsi-hd,bus=scsi0.0,drive=disk-sda".to_owned(),
        "driver=qcow2,file=file-ro,node-name=disk-ro,read-only=on".to_owned(),
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".to_owned(),
    ] {
        assert!(line.contains(&part), "{part} not in {line}");
    }
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("QEMU forwards the host port");

    // An internal snapshot of the raw disk is refused before anything happens.
    let files_before = cli.snapshot_files();
    let error = refused_before(
        &cli,
        &["snapshot", "create", "m1", "bad", "--disk", "vdb=internal"],
        7,
        "pause",
    );
    assert!(
        error.contains("disk vdb") && error.contains("raw image"),
        "{error}"
    );
    assert_eq!(common::state(&cli, &m), "running");
    assert_eq!(cli.snapshot_files(), files_before);

    // By default the raw disk gets an overlay, the qcow2 disks internal snapshots; the
    // read-only disk is left out.
    let created = cli.json(&["snapshot", "create", "m1", "s1"]);
    let record = &created["record"];
    let kinds: Vec<(&str, &str)> = record["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["target"].as_str().unwrap(),
                d["snapshot"]["kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("vda", "internal"), ("vdb", "external"), ("sda", "internal")]
    );
    assert!(common::internal_snapshots(&m.dir.join("ro.qcow2")).is_empty());
    assert_eq!(record["config"]["machine"], "pc-q35-10.0");
    assert!(
        record["config"]["qemu_version"]
            .as_str()
            .unwrap()
            .starts_with("10."),
        "{record}"
    );
    assert_eq!(record["config"]["nics"][0]["mac"], mac.as_str());
    let overlay = PathBuf::from(record["disks"][1]["snapshot"]["overlay"].as_str().unwrap());
    let defined = definition(&cli, "m1");
    let vdb = &defined["disks"].as_array().unwrap()[1];
    assert_eq!(vdb["path"].as_str(), overlay.to_str());
    assert!(vdb.get("format").is_none(), "the overlay is qcow2: {vdb}");

    // Revert: the same MAC and forwards; the raw image is the snapshot, untouched.
    cli.json(&["snapshot", "revert", "m1", "s1"]);
    let (_, line) = qemu_cmdline(&cli, "m1");
    assert!(line.contains(&format!("mac={mac}")), "{line}");
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("forwarded again after the revert");
    assert_eq!(common::state(&cli, &m), "running");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 << 20);

    check_machine_mismatch(&cli, &m);
    cli.ok(&["domain", "stop", "m1", "--force"]);
}

/// A snapshot whose record names a machine type this QEMU lacks, or memory from a newer QEMU,
/// is refused before the running domain is touched; the real record reverts again.
fn check_machine_mismatch(cli: &Cli, m: &Domain) {
    let meta = cli.state_dir().join("domains/m1/snapshots/s1/meta.json");
    let original = std::fs::read_to_string(&meta).unwrap();
    let (pid, _) = qemu_cmdline(cli, "m1");
    let edited = |key: &str, value: &str| {
        let mut record: serde_json::Value = serde_json::from_str(&original).unwrap();
        record["config"][key] = value.into();
        std::fs::write(&meta, serde_json::to_vec(&record).unwrap()).unwrap();
    };
    edited("machine", "pc-q35-99.0");
    let error = refused_before(cli, &["snapshot", "revert", "m1", "s1"], 8, "stop");
    assert!(
        error.contains("machine type pc-q35-99.0") && error.contains("pc-q35-10.0"),
        "{error}"
    );
    edited("qemu_version", "99.0.0");
    let error = refused_before(cli, &["snapshot", "revert", "m1", "s1"], 8, "stop");
    assert!(error.contains("saved by QEMU 99.0.0"), "{error}");
    // Untouched: the same QEMU runs the guest.
    assert_eq!(qemu_cmdline(cli, "m1").0, pid);
    assert_eq!(common::state(cli, m), "running");
    std::fs::write(&meta, original).unwrap();
    cli.json(&["snapshot", "revert", "m1", "s1"]);
    assert_ne!(qemu_cmdline(cli, "m1").0, pid);
}

#[test]
fn a_migration_blocker_is_reported_before_a_memory_snapshot_starts() {
    let cli = Cli::new();
    let disk = "[[disks]]\nid = \"nvd\"\npath = \"n.qcow2\"\nbus = \"nvme\"\n";
    let m = started(&cli, "nv", true, &[("n.qcow2", "16M")], disk, "DOMSNAP READY");
    let files_before = cli.snapshot_files();
    for extra in [&[][..], &["--live"][..]] {
        let mut args = vec!["snapshot", "create", "nv", "s1"];
        args.extend_from_slice(extra);
        let error = refused_before(&cli, &args, 8, "pause");
        assert!(
            error.contains("cannot be snapshotted with its memory") && error.contains("nvme"),
            "{error}"
        );
    }
    assert_eq!(common::state(&cli, &m), "running");
    assert_eq!(cli.snapshot_files(), files_before);
    // Disks alone need no migration.
    cli.json(&["snapshot", "create", "nv", "d1", "--disk-only"]);
    cli.ok(&["domain", "stop", "nv", "--force"]);
}

#[test]
fn uefi_variables_changed_after_a_snapshot_are_undone_by_its_revert() {
    assert!(qemu::ovmf_installed(), "OVMF is missing: run cargo xtask setup");
    let cli = Cli::new();
    let extra = "firmware = \"uefi\"\n[[disks]]\nid = \"vda\"\npath = \"vda.qcow2\"\n";
    let u = started(&cli, "uefi", false, &[("vda.qcow2", "16M")], extra, "Shell>");
    let nvram = PathBuf::from(definition(&cli, "uefi")["nvram"].as_str().unwrap().to_owned());
    assert_eq!(
        nvram,
        cli.state_dir()
            .canonicalize()
            .unwrap()
            .join("domains/uefi/nvram.qcow2")
    );

    let created = cli.json(&["snapshot", "create", "uefi", "s1"]);
    let nvram_disk = created["record"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == "nvram")
        .cloned()
        .unwrap();
    assert_eq!(nvram_disk["snapshot"]["kind"], "internal", "{created}");

    // A reboot makes OVMF write its variables (its boot counter, the boot options).
    let serial_before = std::fs::read_to_string(&u.serial_log)
        .unwrap()
        .matches("Shell>")
        .count();
    let qmp = cli.state_dir().join("domains/uefi/run/qmp.sock");
    qmp_command(&qmp, "system_reset");
    wait_for(BOOT, || {
        std::fs::read_to_string(&u.serial_log)
            .unwrap()
            .matches("Shell>")
            .count()
            > serial_before
    });
    cli.ok(&["domain", "stop", "uefi", "--force"]);
    let at_snapshot = image_bytes(&nvram, Some("s1"));
    let changed = image_bytes(&nvram, None);
    assert_ne!(at_snapshot, changed, "the reboot changed no UEFI variable");

    // The revert puts the variables back with the disks, and the guest runs on.
    let reverted = cli.json(&["snapshot", "revert", "uefi", "s1"]);
    assert_eq!(reverted["state"], "running");
    cli.ok(&["domain", "stop", "uefi", "--force"]);
    assert!(
        image_bytes(&nvram, None) == at_snapshot,
        "the NVRAM is not the snapshot's"
    );

    // Defined again from its file (which names no NVRAM), the domain keeps its NVRAM image.
    cli.ok(&["domain", "start", u.config.to_str().unwrap()]);
    assert_eq!(definition(&cli, "uefi")["nvram"].as_str(), nvram.to_str());
    cli.ok(&["domain", "stop", "uefi", "--force"]);
}

/// Sends one QMP command without arguments on a socket no one else holds.
fn qmp_command(socket: &Path, command: &str) {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    for execute in ["qmp_capabilities", command] {
        writeln!(writer, "{{\"execute\": \"{execute}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "{execute}: {line}");
        }
    }
}

fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
