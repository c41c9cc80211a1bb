//! Crash safety end to end: `domsnap` killed (SIGKILL) at every step, then `recover`.
//!
//! The kill hook (`DOMSNAP_TEST_KILL_AT=STEP`) makes the CLI kill itself as a step starts, so
//! every interrupted state an operation can leave behind is reached with real QEMU, real disks
//! and real files. After `recover` each test checks that the domain, its snapshots, its disks
//! and its files are in the old state or the new one, and that nothing leaked. The last tests
//! make steps fail for real (a bad overlay path, QEMU killed, a damaged memory image).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use common::{internal_snapshots, killed_at, Cli, Domain, Workload};
use nix::{sys::signal::Signal, unistd::Pid};

/// Guest RAM of every test domain: small, so that memory steps are quick in debug builds.
const MEMORY_MIB: u64 = 128;
/// Longest wait for the guest to show it runs (TCG on a busy machine is slow).
const TICK_WAIT: Duration = Duration::from_secs(20);

/// Every step a create reports, in order.
const CREATE_STEPS: [&str; 11] = [
    "inspect",
    "intent",
    "precopy",
    "pause",
    "save-memory",
    "save-device-state",
    "snapshot-disks",
    "resume",
    "seal-memory",
    "commit",
    "update-tree",
];

/// Every step a delete reports, in order.
const DELETE_STEPS: [&str; 4] = ["delete-disks", "remove-files", "update-tree", "tidy-disks"];

/// Every step a (lazy) revert of a running domain reports, in order: the snapshot is checked
/// while its new QEMU starts beside the old one and loads the device state; the old one is
/// then stopped. An eager one restores memory between `start-standby` and `load-device-state`.
const REVERT_STEPS: [&str; 11] = [
    "intent",
    "check",
    "start-standby",
    "load-device-state",
    "stop",
    "revert-disks",
    "define",
    "promote-standby",
    "resume",
    "update-tree",
    "tidy-disks",
];

fn domain_dir(cli: &Cli, name: &str) -> PathBuf {
    cli.state_dir().join("domains").join(name)
}

/// What `recover --json` reports: (operation, snapshot, outcome) per recovered operation.
fn recover(cli: &Cli) -> Vec<(String, String, String)> {
    let report = cli.json(&["recover"])["recovered"].clone();
    report
        .as_array()
        .unwrap_or_else(|| panic!("recover: not a list: {report}"))
        .iter()
        .map(|r| {
            let field = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
            (field("operation"), field("snapshot"), field("outcome"))
        })
        .collect()
}

/// The domain's state as `domain status` reports it (running, paused, shut-off). The command
/// recovers first, so tests call it only once they have checked the recovery itself.
fn domain_state(cli: &Cli, name: &str) -> String {
    let status = cli.json(&["domain", "status", name]);
    status["state"].as_str().unwrap_or_default().to_owned()
}

/// The domain's pid (from `domain status`).
fn domain_pid(cli: &Cli, name: &str) -> i32 {
    let status = cli.json(&["domain", "status", name]);
    status["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_else(|| panic!("{name} has no pid: {status}"))
}

/// The snapshot names `snapshot list` shows, with the current one.
fn snapshots(cli: &Cli, name: &str) -> (Vec<String>, Option<String>) {
    let rows = cli.json(&["snapshot", "list", name])["snapshots"].clone();
    let rows = rows.as_array().expect("snapshot list is a list").clone();
    let names = rows
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    let current = rows
        .iter()
        .find(|r| r["current"].as_bool() == Some(true))
        .map(|r| r["name"].as_str().unwrap().to_owned());
    (names, current)
}

/// The disks in the domain's definition (STATE/domains/NAME/domain.toml): id → active image.
fn defined_disks(cli: &Cli, name: &str) -> BTreeMap<String, PathBuf> {
    let path = domain_dir(cli, name).join("domain.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let definition: toml::Value = toml::from_str(&text).unwrap();
    definition["disks"]
        .as_array()
        .expect("disks in the definition")
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap().to_owned(),
                PathBuf::from(d["path"].as_str().unwrap()),
            )
        })
        .collect()
}

/// Every file of the test (state directory and disk folders) except those that change while a
/// domain merely runs (QEMU's run folders and which one is active, the serial log, the lock
/// file): what an operation may leave behind.
fn lasting_files(cli: &Cli) -> Vec<String> {
    cli.files()
        .into_iter()
        .filter(|f| {
            !f.contains("/run/")
                && !f.contains("/run-1/")
                && !f.ends_with("/active-slot")
                && !f.ends_with("/serial.log")
                && !f.ends_with("/lock")
        })
        .collect()
}

fn has_intent(cli: &Cli, name: &str) -> bool {
    domain_dir(cli, name).join("intent.json").exists()
}

/// The guest's ticks printed after serial position `position`, in order.
fn ticks_since(domain: &Domain, position: usize) -> Vec<u64> {
    domain
        .serial_since(position)
        .iter()
        .filter_map(common::tick)
        .collect()
}

/// Waits until the guest has printed, after `position`, a tick of at most `at_most` followed by
/// a higher one: the guest was restored to a point at or before `at_most` and runs on from
/// there. Returns the ticks since `position`.
fn wait_restored_and_running(domain: &Domain, position: usize, at_most: u64) -> Vec<u64> {
    let deadline = Instant::now() + TICK_WAIT;
    loop {
        let ticks = ticks_since(domain, position);
        if let Some(index) = ticks.iter().position(|t| *t <= at_most) {
            if ticks[index + 1..].iter().any(|t| *t > ticks[index]) {
                return ticks;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: the guest did not resume from a tick <= {at_most}; ticks since: {ticks:?}",
            domain.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks that the guest keeps running: a new tick after `position` above `last`.
fn assert_ticking(domain: &Domain, position: usize, last: u64) {
    domain.wait_tick_above(position, last, TICK_WAIT);
}

/// Waits until the last tick the guest printed is above `above` (the log holds the ticks of
/// earlier runs too: only the last one is the running guest's).
fn wait_last_tick_above(domain: &Domain, above: u64) {
    let deadline = Instant::now() + TICK_WAIT;
    while domain.last_tick_since(0).is_none_or(|t| t <= above) {
        assert!(
            Instant::now() < deadline,
            "{}: no tick above {above} within {TICK_WAIT:?}",
            domain.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last tick the guest printed so far (waiting for a first one).
fn last_tick(domain: &Domain) -> u64 {
    domain.first_tick_since(0, TICK_WAIT);
    domain.last_tick_since(0).unwrap()
}

// ------------------------------------------------------------------------------------------ create

#[test]
fn create_killed_at_every_step_is_undone_before_its_record_and_finished_after() {
    let cli = Cli::new();
    let domain = cli.start_domain("ck", MEMORY_MIB, Workload::Idle, 2);
    let (vda, vdb) = (domain.images[0].clone(), domain.images[1].clone());
    let files_before = lasting_files(&cli);
    let disks_before = defined_disks(&cli, "ck");
    assert_eq!(disks_before["vdb"], vdb);

    let intent_written = CREATE_STEPS.iter().position(|s| *s == "intent").unwrap();
    let committed = CREATE_STEPS.iter().position(|s| *s == "update-tree").unwrap();
    for (index, step) in CREATE_STEPS.iter().enumerate() {
        let snap = format!("at-{step}");
        let overlay = vdb.with_file_name(format!("vdb.{snap}.qcow2"));
        let mut args = vec![
            "snapshot",
            "create",
            "ck",
            snap.as_str(),
            "--disk",
            "vdb=external",
        ];
        // Pre-copy runs only in a live create; every other step is reached by a paused one.
        if *step == "precopy" {
            args.push("--live");
        }
        let last = last_tick(&domain);
        killed_at(&cli, &args, step);
        // The intent record is written at the `intent` step: a kill there comes just before it.
        assert_eq!(
            has_intent(&cli, "ck"),
            index > intent_written,
            "{step}: intent record"
        );

        let position = domain.serial_position();
        let recovered = if *step == "resume" {
            // Read-only commands never recover: `snapshot list` shows no snapshot and leaves the
            // intent. Any command that changes the domain recovers first: `domain resume` here
            // (the domain is paused at this point, so a missing recovery would show).
            assert_eq!(snapshots(&cli, "ck").0, Vec::<String>::new(), "{step}");
            assert!(has_intent(&cli, "ck"), "{step}: snapshot list recovered");
            cli.ok(&["domain", "resume", "ck"]);
            assert!(!has_intent(&cli, "ck"), "{step}: domain resume did not recover");
            assert!(recover(&cli).is_empty(), "{step}: recovered twice");
            None
        } else {
            let recovered = recover(&cli);
            match recovered.as_slice() {
                [] => None,
                [(operation, snapshot, outcome)] => {
                    assert_eq!((operation.as_str(), snapshot.as_str()), ("create", snap.as_str()));
                    Some(outcome.clone())
                }
                more => panic!("{step}: recovered {more:?}"),
            }
        };
        assert!(!has_intent(&cli, "ck"), "{step}: intent left after recover");
        assert_eq!(domain_state(&cli, "ck"), "running", "{step}");
        assert_ticking(&domain, position, last);

        if index >= committed {
            // The record was written: the create is finished.
            assert_eq!(recovered.as_deref(), Some("finished"), "{step}");
            assert_eq!(
                snapshots(&cli, "ck"),
                (vec![snap.clone()], Some(snap.clone())),
                "{step}"
            );
            cli.ok(&["snapshot", "verify", "ck", &snap]);
            assert_eq!(internal_snapshots(&vda), [snap.as_str()], "{step}: vda");
            assert_eq!(defined_disks(&cli, "ck")["vdb"], overlay, "{step}: vdb");
            // Removing it puts everything back, which checks that the recovered snapshot is
            // an ordinary one (and readies the next iteration).
            cli.ok(&["snapshot", "delete", "ck", &snap]);
        } else {
            let expected = (index > intent_written && *step != "resume").then_some("undone");
            assert_eq!(recovered.as_deref(), expected, "{step}");
            assert_eq!(snapshots(&cli, "ck").0, Vec::<String>::new(), "{step}");
            assert!(
                !domain_dir(&cli, "ck").join("snapshots").join(&snap).exists(),
                "{step}"
            );
            assert!(!overlay.exists(), "{step}: overlay left");
        }
        assert_eq!(internal_snapshots(&vda), Vec::<String>::new(), "{step}: vda");
        assert_eq!(defined_disks(&cli, "ck"), disks_before, "{step}: disks");
        assert_eq!(lasting_files(&cli), files_before, "{step}: files");
    }
    // After all that, a create works and the guest still runs.
    let last = last_tick(&domain);
    let position = domain.serial_position();
    cli.ok(&["snapshot", "create", "ck", "after", "--disk", "vdb=external"]);
    cli.ok(&["snapshot", "verify", "ck", "after"]);
    assert_ticking(&domain, position, last);
}

// ------------------------------------------------------------------------------------------ delete

#[test]
fn delete_killed_at_every_step_is_finished() {
    let cli = Cli::new();
    let domain = cli.start_domain("dk", MEMORY_MIB, Workload::Idle, 2);
    let (vda, vdb) = (domain.images[0].clone(), domain.images[1].clone());
    // A snapshot that stays: each deleted one is its child, so the delete must re-parent the
    // tree, make `base` current again and fold the child's overlay into base's.
    cli.ok(&["snapshot", "create", "dk", "base", "--disk", "vdb=external"]);
    let base_overlay = vdb.with_file_name("vdb.base.qcow2");
    let files_before = lasting_files(&cli);
    let disks_before = defined_disks(&cli, "dk");
    assert_eq!(disks_before["vdb"], base_overlay);

    for step in DELETE_STEPS {
        let snap = format!("at-{step}");
        cli.ok(&["snapshot", "create", "dk", &snap, "--disk", "vdb=external"]);
        // The overlay is named after the image it covers, base's overlay.
        let overlay = vdb.with_file_name(format!("vdb.base.{snap}.qcow2"));
        assert_eq!(defined_disks(&cli, "dk")["vdb"], overlay);
        let last = last_tick(&domain);
        killed_at(&cli, &["snapshot", "delete", "dk", &snap], step);
        assert!(has_intent(&cli, "dk"), "{step}: intent record");

        let position = domain.serial_position();
        assert_eq!(
            recover(&cli),
            [("delete".to_owned(), snap.clone(), "finished".to_owned())],
            "{step}"
        );
        assert!(!has_intent(&cli, "dk"), "{step}: intent left after recover");
        assert_eq!(domain_state(&cli, "dk"), "running", "{step}");
        assert_ticking(&domain, position, last);
        assert_eq!(
            snapshots(&cli, "dk"),
            (vec!["base".to_owned()], Some("base".to_owned())),
            "{step}"
        );
        assert!(
            !domain_dir(&cli, "dk").join("snapshots").join(&snap).exists(),
            "{step}"
        );
        assert_eq!(internal_snapshots(&vda), ["base"], "{step}: vda");
        assert!(!overlay.exists(), "{step}: overlay left");
        assert_eq!(defined_disks(&cli, "dk"), disks_before, "{step}: disks");
        assert_eq!(lasting_files(&cli), files_before, "{step}: files");
        cli.ok(&["snapshot", "verify", "dk", "base"]);
    }
}

// ------------------------------------------------------------------------------------------ revert

/// `files` with each revert overlay's time stamp replaced by `N` (each revert makes a new one).
fn without_stamps(files: &[String]) -> Vec<String> {
    files
        .iter()
        .map(|f| match f.find(".revert-") {
            Some(at) => {
                let start = at + ".revert-".len();
                let digits = f[start..].chars().take_while(char::is_ascii_digit).count();
                format!("{}N{}", &f[..start], &f[start + digits..])
            }
            None => f.clone(),
        })
        .collect()
}

/// The revert overlays (`.revert-STAMP.qcow2`) among the test's files.
fn revert_overlays(cli: &Cli) -> Vec<PathBuf> {
    cli.files()
        .into_iter()
        .filter(|f| f.contains(".revert-"))
        .map(|f| cli.dir.path().join(f))
        .collect()
}

#[test]
fn revert_killed_at_every_step_leaves_the_domain_untouched_or_reverted() {
    let cli = Cli::new();
    let domain = cli.start_domain("rv", MEMORY_MIB, Workload::Idle, 2);
    let vda = domain.images[0].clone();
    wait_last_tick_above(&domain, 2);
    cli.ok(&["snapshot", "create", "rv", "r", "--disk", "vdb=external"]);
    // The guest was paused for the snapshot, so the tick it holds is at most the last one
    // printed once the create returned.
    let at_snapshot = last_tick(&domain);

    // A revert that is not interrupted: the state every recovered revert must reach (up to the
    // fresh overlay's time stamp).
    wait_last_tick_above(&domain, at_snapshot + 3);
    let position = domain.serial_position();
    cli.ok(&["snapshot", "revert", "rv", "r"]);
    wait_restored_and_running(&domain, position, at_snapshot + 2);
    let reverted_files = without_stamps(&lasting_files(&cli));

    let intent_written = REVERT_STEPS.iter().position(|s| *s == "intent").unwrap();
    for (index, step) in REVERT_STEPS.iter().enumerate() {
        // Ticks above the snapshot's tell the guest before the kill from a restored one.
        wait_last_tick_above(&domain, at_snapshot + 3);
        let files_before = lasting_files(&cli);
        let disks_before = defined_disks(&cli, "rv");
        let position = domain.serial_position();
        let last = domain.last_tick_since(0).unwrap();
        killed_at(&cli, &["snapshot", "revert", "rv", "r"], step);
        assert_eq!(
            has_intent(&cli, "rv"),
            index > intent_written,
            "{step}: intent record"
        );

        let recovered = recover(&cli);
        assert!(!has_intent(&cli, "rv"), "{step}: intent left after recover");
        assert_eq!(domain_state(&cli, "rv"), "running", "{step}");
        if index <= intent_written {
            // Killed before the intent: the domain was not touched and runs on.
            assert!(recovered.is_empty(), "{step}: recovered {recovered:?}");
            assert_ticking(&domain, position, last);
            let ticks = ticks_since(&domain, position);
            assert!(
                ticks.windows(2).all(|w| w[1] == w[0] + 1) && ticks[0] > at_snapshot + 2,
                "{step}: the guest did not run on undisturbed: ticks {ticks:?} after {last}"
            );
            assert_eq!(defined_disks(&cli, "rv"), disks_before, "{step}: disks");
            assert_eq!(lasting_files(&cli), files_before, "{step}: files");
        } else {
            assert_eq!(
                recovered,
                [("revert".to_owned(), "r".to_owned(), "finished".to_owned())],
                "{step}"
            );
            wait_restored_and_running(&domain, position, at_snapshot + 2);
            assert_eq!(
                without_stamps(&lasting_files(&cli)),
                reverted_files,
                "{step}: files"
            );
        }
        // Exactly one revert overlay, the one the domain writes to.
        assert_eq!(
            revert_overlays(&cli),
            [defined_disks(&cli, "rv")["vdb"].clone()],
            "{step}: revert overlays"
        );
        assert_eq!(
            snapshots(&cli, "rv"),
            (vec!["r".to_owned()], Some("r".to_owned())),
            "{step}"
        );
        assert_eq!(internal_snapshots(&vda), ["r"], "{step}: vda");
        // A lazy revert, interrupted or not, leaves the domain on the mapped image.
        let status = cli.json(&["domain", "status", "rv"]);
        assert!(status["mapped_image"].is_string(), "{step}: {status}");
    }

    // An eager revert killed while it copies memory: recovery runs it again, eagerly.
    wait_last_tick_above(&domain, at_snapshot + 3);
    let position = domain.serial_position();
    killed_at(
        &cli,
        &["snapshot", "revert", "rv", "r", "--eager"],
        "restore-memory",
    );
    assert!(has_intent(&cli, "rv"));
    assert_eq!(
        recover(&cli),
        [("revert".to_owned(), "r".to_owned(), "finished".to_owned())]
    );
    wait_restored_and_running(&domain, position, at_snapshot + 2);
    let status = cli.json(&["domain", "status", "rv"]);
    assert!(status["mapped_image"].is_null(), "{status}");
    assert_eq!(without_stamps(&lasting_files(&cli)), reverted_files);
    cli.ok(&["snapshot", "verify", "rv", "r"]);
}

// ------------------------------------------------------------------------------- real failures

/// A failed operation's error: one line naming the operation and the step.
fn assert_step_error(error: &str, operation: &str, steps: &[&str]) {
    assert!(
        error.contains(&format!("{operation} of snapshot")) && steps.iter().any(|s| error.contains(s)),
        "the error names none of the steps {steps:?} of {operation}: {error}"
    );
    assert!(
        !error.contains("rollback incomplete"),
        "rollback incomplete: {error}"
    );
}

#[test]
fn a_failing_disk_step_and_a_damaged_memory_image_leave_the_domain_running() {
    let cli = Cli::new();
    let domain = cli.start_domain("fl", MEMORY_MIB, Workload::Idle, 2);
    let vda = domain.images[0].clone();
    let files_before = lasting_files(&cli);
    let disks_before = defined_disks(&cli, "fl");

    // The disks step fails after memory and device state were saved (the overlay's folder
    // is read-only): both are undone and the domain resumed.
    let read_only = common::ReadOnlyDir::new(cli.dir.path());
    let overlay = read_only.path.join("x.qcow2");
    let last = last_tick(&domain);
    let position = domain.serial_position();
    let error = cli.fails(&[
        "snapshot",
        "create",
        "fl",
        "bad",
        "--disk",
        &format!("vdb=external:{}", overlay.display()),
    ]);
    assert_step_error(&error, "create", &["snapshotting the disks"]);
    assert!(error.contains("x.qcow2"), "{error}");
    drop(read_only);
    assert_eq!(domain_state(&cli, "fl"), "running");
    assert_ticking(&domain, position, last);
    assert!(!has_intent(&cli, "fl"));
    assert_eq!(snapshots(&cli, "fl").0, Vec::<String>::new());
    assert_eq!(internal_snapshots(&vda), Vec::<String>::new());
    assert_eq!(defined_disks(&cli, "fl"), disks_before);
    assert_eq!(lasting_files(&cli), files_before);

    // A memory image whose page table was damaged after the create: the revert's check (of the
    // image's metadata) refuses it before the domain is touched.
    cli.ok(&["snapshot", "create", "fl", "good"]);
    let image = domain_dir(&cli, "fl").join("snapshots/good/memory.img");
    flip_byte(&image, std::fs::metadata(&image).unwrap().len() - 64);
    let files_before = lasting_files(&cli);
    let last = last_tick(&domain);
    let position = domain.serial_position();
    let pid = domain_pid(&cli, "fl");
    let error = cli.fails(&["snapshot", "revert", "fl", "good"]);
    assert_step_error(&error, "revert", &["checking the snapshot"]);
    assert!(error.contains("memory image"), "{error}");
    assert_eq!(domain_state(&cli, "fl"), "running");
    assert_eq!(domain_pid(&cli, "fl"), pid, "the domain was restarted");
    assert_ticking(&domain, position, last);
    let ticks = ticks_since(&domain, position);
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1) && ticks[0] > last,
        "the guest did not run on undisturbed: ticks {ticks:?} after {last}"
    );
    assert!(!has_intent(&cli, "fl"));
    assert_eq!(lasting_files(&cli), files_before);
    // `verify` sees the damage too.
    let error = cli.fails(&["snapshot", "verify", "fl", "good"]);
    assert!(
        error.contains("damaged") && error.contains("memory image"),
        "{error}"
    );
}

/// Inverts the byte at `offset` of a file (64 bytes before the end of a memory image: in its
/// page table).
fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[usize::try_from(offset).unwrap()] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn qemu_killed_during_a_live_create_fails_it_cleanly() {
    let cli = Cli::new();
    let workload = Workload::Dirty {
        rate_mib: 20,
        wss_mib: 32,
    };
    let domain = cli.start_domain("fq", MEMORY_MIB, workload, 2);
    domain.first_tick_since(0, TICK_WAIT);
    let files_before = lasting_files(&cli);
    let pid = domain_pid(&cli, "fq");
    let ram = ram_file(pid);
    assert!(ram.exists(), "{}", ram.display());

    let create = cli
        .command(&[
            "snapshot",
            "create",
            "fq",
            "live",
            "--live",
            "--disk",
            "vdb=external",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run domsnap");
    // The memory image is being written once its temporary file exists: QEMU dies in the
    // middle of the memory step, with the guest dirtying pages.
    let folder = domain_dir(&cli, "fq").join("snapshots/live");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_dir(&folder).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(".memory.img.partial"))
    }) {
        assert!(Instant::now() < deadline, "the live create wrote no memory image");
        std::thread::sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let output = create.wait_with_output().unwrap();

    assert!(
        !output.status.success(),
        "the create succeeded without QEMU:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let error = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(error.starts_with("domsnap: error: "), "{error}");
    assert_eq!(error.trim_end().lines().count(), 1, "not one line: {error}");
    // Which step notices depends on timing: the copy (reading RAM QEMU shares) may finish
    // before the pause finds QEMU gone.
    assert_step_error(
        &error,
        "create",
        &[
            "copying memory while the domain runs",
            "pausing the domain",
            "saving memory",
            "saving device state",
        ],
    );
    assert!(
        error.contains("shut off") || error.contains("QMP") || error.contains("qmp"),
        "the error does not say that QEMU is gone: {error}"
    );

    assert!(!has_intent(&cli, "fq"));
    assert!(!folder.exists(), "snapshot folder left");
    assert_eq!(domain_state(&cli, "fq"), "shut-off");
    assert_eq!(snapshots(&cli, "fq").0, Vec::<String>::new());
    assert_eq!(lasting_files(&cli), files_before);
    assert_eq!(internal_snapshots(&domain.images[0]), Vec::<String>::new());
    assert!(
        !ram.exists(),
        "the dead domain's RAM file is left: {}",
        ram.display()
    );
}

/// The guest RAM file of the QEMU with pid `pid` (the `mem-path` on its command line).
fn ram_file(pid: i32) -> PathBuf {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    let path = cmdline
        .split(['\0', ','])
        .find_map(|option| option.strip_prefix("mem-path="))
        .unwrap_or_else(|| panic!("no mem-path in QEMU's command line: {cmdline}"));
    PathBuf::from(path)
}

/// Every step a background create reports, in order (its memory step starts first: the driver
/// prepares while the guest runs).
/// The steps of a background create, in order (the capture runs beside the disk snapshots; a
/// kill at `resume` ends the reader while QEMU streams).
const BACKGROUND_STEPS: [&str; 7] = [
    "save-memory",
    "pause",
    "capture",
    "snapshot-disks",
    "resume",
    "commit",
    "update-tree",
];

/// The steps of a pre-copy create through QEMU's stream, in order: `precopy+30` is 30 ms into
/// QEMU's passes (it streams into a reader that dies); `pause`, `snapshot-disks` and `capture`
/// happen while QEMU holds the guest before its switch-over; `resume` after it completed.
const PRECOPY_STEPS: [&str; 8] = [
    "precopy",
    "precopy+30",
    "pause",
    "snapshot-disks",
    "capture",
    "resume",
    "commit",
    "update-tree",
];

/// Issues 6 and 11: a streamed create killed at each of its steps — including while QEMU streams
/// into a reader that died, and while it holds the guest before its switch-over — is undone (or
/// finished) by `recover`, leaves the guest running, and the next create works (QEMU's migration
/// state, capabilities and disks are usable again).
#[test]
fn streamed_creates_killed_at_every_step_are_recovered_and_the_next_one_works() {
    let cli = Cli::new();
    let domain = cli.start_domain("bk", MEMORY_MIB, Workload::Idle, 2);
    let files_before = lasting_files(&cli);
    let modes: [(&str, &[&str]); 2] = [("background", &BACKGROUND_STEPS), ("precopy", &PRECOPY_STEPS)];
    for (mode, steps) in modes {
        let committed = steps.iter().position(|s| *s == "update-tree").unwrap();
        for (index, step) in steps.iter().enumerate() {
            let snap = format!("{mode}-{}", step.replace('+', "-"));
            let args = [
                "snapshot",
                "create",
                "bk",
                snap.as_str(),
                "--live-mode",
                mode,
                "--disk",
                "vdb=external",
            ];
            killed_at(&cli, &args, step);
            let recovered = recover(&cli);
            assert!(recovered.len() <= 1, "{mode} {step}: {recovered:?}");
            let (names, _) = snapshots(&cli, "bk");
            assert_eq!(domain_state(&cli, "bk"), "running", "{mode} {step}");
            assert!(!has_intent(&cli, "bk"), "{mode} {step}");
            if index >= committed {
                assert_eq!(names, std::slice::from_ref(&snap), "{mode} {step}");
                cli.ok(&["snapshot", "verify", "bk", &snap]);
                cli.ok(&["snapshot", "delete", "bk", &snap]);
            } else {
                assert!(names.is_empty(), "{mode} {step}: {names:?}");
            }
            assert_eq!(lasting_files(&cli), files_before, "{mode} {step}");
            let position = domain.serial_position();
            assert_ticking(&domain, position, last_tick(&domain));
        }
        let report = cli.json(&["snapshot", "create", "bk", mode, "--live-mode", mode]);
        assert_eq!(report["memory_mode"], mode);
        cli.ok(&["snapshot", "verify", "bk", mode]);
        cli.ok(&["snapshot", "delete", "bk", mode]);
    }
}
