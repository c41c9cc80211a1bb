//! Hardening end to end through the `domsnap` CLI, on QEMU 10 with the test guest: private file
//! modes, a user's own internal snapshots, full filesystems, concurrent commands and abandoning
//! an interrupted operation.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{
    collections::BTreeSet,
    io::Write,
    os::unix::{fs::FileTypeExt, fs::PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{internal_snapshots, killed_at, Cli, Domain, Workload};
use nix::{sys::signal::Signal, unistd::Pid};

/// Longest wait for the guest to boot and tick (TCG on a busy machine is slow).
const BOOT: Duration = Duration::from_secs(120);
const TICK_WAIT: Duration = Duration::from_secs(30);
/// A read-only command must answer within this, whatever other commands do.
const READ_ONLY: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------------- helpers

fn domain_dir(cli: &Cli, name: &str) -> PathBuf {
    cli.state_dir().join("domains").join(name)
}

fn has_intent(cli: &Cli, name: &str) -> bool {
    domain_dir(cli, name).join("intent.json").exists()
}

/// `domain status --json` of `name`.
fn status(cli: &Cli, name: &str) -> serde_json::Value {
    cli.json(&["domain", "status", name])
}

fn state(cli: &Cli, name: &str) -> String {
    status(cli, name)["state"].as_str().unwrap_or_default().to_owned()
}

/// The activity of a `domain list` / `domain status` row: (kind, the whole value).
fn activity(row: &serde_json::Value) -> (String, serde_json::Value) {
    let value = row["activity"].clone();
    let kind = value["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("no activity in {row}"))
        .to_owned();
    (kind, value)
}

fn activity_of(cli: &Cli, name: &str) -> String {
    activity(&status(cli, name)).0
}

/// The snapshot names `snapshot list` shows.
fn snapshot_names(cli: &Cli, name: &str) -> Vec<String> {
    let rows = cli.json(&["snapshot", "list", name])["snapshots"].clone();
    rows.as_array()
        .unwrap_or_else(|| panic!("snapshot list: not a list: {rows}"))
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

/// What `recover --json` (every domain) recovered.
fn recover_all(cli: &Cli) -> Vec<serde_json::Value> {
    let report = cli.json(&["recover"])["recovered"].clone();
    report
        .as_array()
        .unwrap_or_else(|| panic!("recover: not a list: {report}"))
        .clone()
}

/// The entries of the domain's snapshots folder (empty if it does not exist).
fn snapshot_folder_entries(cli: &Cli, name: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(domain_dir(cli, name).join("snapshots")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn last_tick(domain: &Domain) -> u64 {
    domain.first_tick_since(0, BOOT);
    domain.last_tick_since(0).unwrap()
}

/// Checks that the guest runs on: a tick above the last one, printed after now.
fn assert_ticking(domain: &Domain) {
    let position = domain.serial_position();
    let last = last_tick(domain);
    domain.wait_tick_above(position, last, TICK_WAIT);
}

fn spawn(cli: &Cli, args: &[&str]) -> Child {
    cli.command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run domsnap")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks that a failed run printed one `domsnap: error:` line; returns it.
fn one_line_error(args: &str, output: &Output) -> String {
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("domsnap: error: ") && stderr.trim_end().lines().count() == 1,
        "{args}: unexpected stderr:\n{stderr}"
    );
    stderr
}

// --------------------------------------------------------------------------------- tmpfs mounts

/// A tmpfs mounted in a test's folder; unmounted when dropped, and the test's folder removed.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        testkit::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                path.to_str().unwrap(),
            ],
        );
        Tmpfs {
            path: path.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = (0..50).any(|_| {
            let done = Command::new("umount")
                .arg(&self.path)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !done {
                std::thread::sleep(Duration::from_millis(100));
            }
            done
        });
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        // The test's folder: its temporary folder could not remove the mount point.
        if let Some(parent) = self.path.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// A [`Cli`] with tmpfs mounts inside its folder. Dropping it kills the domains (whose files
/// are on the mounts) and cleans them up first, then the folder goes, then the mounts.
struct Fixture {
    cli: Cli,
    mounts: Vec<Tmpfs>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let Ok(domains) = std::fs::read_dir(self.cli.state_dir().join("domains")) else {
            return;
        };
        let mut pids = Vec::new();
        for domain in domains.flatten() {
            for run in common::RUN_SLOTS {
                let pid =
                    std::fs::read_to_string(domain.path().join(run).join("qemu.pid")).unwrap_or_default();
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                    pids.push(pid);
                }
            }
        }
        // QEMU must be gone before its files' filesystem can be unmounted.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.cli.command(&["domain", "list"]).output();
    }
}

/// Fills the filesystem holding `path` with the file `path` until it refuses more (ENOSPC).
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let zeros = vec![0u8; chunk];
        loop {
            match file.write_all(&zeros) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = file.sync_all();
    let free = nix::sys::statvfs::statvfs(path).unwrap();
    assert_eq!(free.blocks_available(), 0, "{} is not full", path.display());
}

// ------------------------------------------------------------------------------ 1: file modes

#[test]
fn every_file_and_folder_of_the_state_directory_is_private() {
    let cli = Cli::new();
    let domain = cli.start_domain("md", 128, Workload::Idle, 2);
    domain.first_tick_since(0, BOOT);
    let report = cli.json(&["snapshot", "create", "md", "s1", "--disk", "vdb=external"]);
    assert!(report["record"]["memory"].is_object(), "{report}");

    let root = cli.state_dir();
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    let mode_of = |path: &Path| std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777;
    if mode_of(&root) != 0o700 {
        wrong.push(format!("state directory: {:o}", mode_of(&root)));
    }
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(&root).unwrap().display().to_string();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            let mode = mode_of(&path);
            if kind.is_dir() {
                stack.push(path.clone());
                if mode != 0o700 {
                    wrong.push(format!("folder {relative}: {mode:o}"));
                }
            } else if kind.is_file() {
                if mode != 0o600 {
                    wrong.push(format!("file {relative}: {mode:o}"));
                }
            } else if kind.is_socket() && (relative.contains("/run/") || relative.contains("/run-1/")) {
                // QEMU's sockets: not files.
            } else {
                wrong.push(format!("{relative}: unexpected {kind:?} ({mode:o})"));
            }
            seen.insert(relative);
        }
    }
    assert!(
        wrong.is_empty(),
        "not private:\n{}\nall: {seen:#?}",
        wrong.join("\n")
    );
    for expected in [
        "domains/md/snapshots/s1/memory.img",
        "domains/md/snapshots/s1/devices.bin",
        "domains/md/snapshots/s1/meta.json",
        "domains/md/domain.toml",
        "domains/md/serial.log",
        "domains/md/run/qemu.log",
    ] {
        assert!(seen.contains(expected), "{expected} missing: {seen:#?}");
    }
    assert!(domain.dir.join("vdb.s1.qcow2").exists());
    cli.ok(&["domain", "stop", "md", "--force"]);
}

// --------------------------------------------------------------- 2: a user's internal snapshot

#[test]
fn a_users_own_internal_snapshot_is_never_touched() {
    let cli = Cli::new();
    let domain = cli.define_domain("us", 128, Workload::Idle, 1);
    let vda = domain.images[0].clone();
    // The user's snapshot, made before domsnap ever saw the image.
    testkit::run("qemu-img", &["snapshot", "-c", "s1", vda.to_str().unwrap()]);
    assert_eq!(internal_snapshots(&vda), ["s1"]);
    cli.ok(&["domain", "start", domain.config.to_str().unwrap()]);
    domain.wait_for_serial("DOMSNAP READY", BOOT);
    domain.first_tick_since(0, BOOT);

    let error = cli.fails(&["snapshot", "create", "us", "s1"]);
    assert!(
        error.contains("already holds an internal snapshot named s1") && error.contains("vda"),
        "{error}"
    );
    assert_eq!(state(&cli, "us"), "running");
    assert_ticking(&domain);
    assert_eq!(internal_snapshots(&vda), ["s1"]);
    assert!(!has_intent(&cli, "us"));
    assert_eq!(activity_of(&cli, "us"), "idle");
    assert_eq!(recover_all(&cli), Vec::<serde_json::Value>::new());
    assert_eq!(cli.ok(&["recover"]), "nothing to recover\n");
    assert_eq!(internal_snapshots(&vda), ["s1"]);
    assert_eq!(snapshot_names(&cli, "us"), Vec::<String>::new());
    assert_eq!(cli.snapshot_files(), Vec::<String>::new());

    // Names the disk layer cannot take as internal snapshot names (an id, an option).
    for name in ["123", "-x"] {
        let error = cli.fails(&["snapshot", "create", "us", "--", name]);
        assert!(
            error.contains("internal snapshot cannot be named"),
            "{name:?}: {error}"
        );
        assert_eq!(state(&cli, "us"), "running", "{name:?}");
        assert_eq!(cli.snapshot_files(), Vec::<String>::new(), "{name:?}");
        assert_eq!(snapshot_names(&cli, "us"), Vec::<String>::new(), "{name:?}");
        assert_eq!(internal_snapshots(&vda), ["s1"], "{name:?}");
        assert_eq!(activity_of(&cli, "us"), "idle", "{name:?}");
    }
    assert_ticking(&domain);
    cli.ok(&["domain", "stop", "us", "--force"]);
    assert_eq!(internal_snapshots(&vda), ["s1"]);
}

// ------------------------------------------------------------------------------- 3: disk full

#[test]
fn a_memory_snapshot_that_cannot_fit_is_refused_before_the_pause() {
    let cli = Cli::new();
    let mount = Tmpfs::mount(&cli.state_dir(), "32m");
    let fixture = Fixture {
        cli,
        mounts: vec![mount],
    };
    let cli = &fixture.cli;
    let domain = cli.start_domain("sf", 128, Workload::Idle, 1);
    let vda = domain.images[0].clone();
    domain.first_tick_since(0, BOOT);

    let error = cli.fails(&["snapshot", "create", "sf", "m"]);
    assert!(
        error.contains("not enough free space") && error.contains("128 MiB"),
        "{error}"
    );
    assert_eq!(state(cli, "sf"), "running");
    assert_ticking(&domain);
    assert!(!has_intent(cli, "sf"));
    assert_eq!(activity_of(cli, "sf"), "idle");
    assert_eq!(snapshot_folder_entries(cli, "sf"), Vec::<String>::new());
    assert_eq!(internal_snapshots(&vda), Vec::<String>::new());
    assert_eq!(snapshot_names(cli, "sf"), Vec::<String>::new());

    // Without memory the snapshot fits.
    cli.ok(&["domain", "stop", "sf", "--force"]);
    assert_eq!(state(cli, "sf"), "shut-off");
    let report = cli.json(&["snapshot", "create", "sf", "cold"]);
    assert!(report["record"]["memory"].is_null(), "{report}");
    assert_eq!(report["record"]["state"], "shut-off");
    assert_eq!(snapshot_names(cli, "sf"), ["cold"]);
    assert_eq!(internal_snapshots(&vda), ["cold"]);
    assert_eq!(snapshot_folder_entries(cli, "sf"), ["cold"]);
    assert_eq!(activity_of(cli, "sf"), "idle");
}

#[test]
fn a_full_image_filesystem_fails_the_create_cleanly_and_it_works_once_freed() {
    let cli = Cli::new();
    let mount = Tmpfs::mount(&cli.dir.path().join("df-files"), "16m");
    let fixture = Fixture {
        cli,
        mounts: vec![mount],
    };
    let cli = &fixture.cli;
    let domain = cli.start_domain("df", 128, Workload::Idle, 2);
    let vda = domain.images[0].clone();
    let overlay = domain.dir.join("vdb.s.qcow2");
    domain.first_tick_since(0, BOOT);
    let filler = fixture.mounts[0].path.join("filler");
    fill(&filler);

    let error = cli.fails(&["snapshot", "create", "df", "s", "--disk", "vdb=external"]);
    println!("create on a full filesystem: {error}");
    assert!(
        error.contains("create of snapshot s of domain df failed while"),
        "the error names no step: {error}"
    );
    assert!(
        !error.contains("rollback incomplete"),
        "rollback incomplete: {error}"
    );
    let status = status(cli, "df");
    assert_eq!(status["state"], "running", "{status}");
    assert_ticking(&domain);
    assert!(!overlay.exists(), "overlay left: {}", overlay.display());
    assert!(!has_intent(cli, "df"));
    assert_eq!(activity(&status).0, "idle", "{status}");
    assert_eq!(recover_all(cli), Vec::<serde_json::Value>::new());
    assert_eq!(snapshot_names(cli, "df"), Vec::<String>::new());
    assert_eq!(snapshot_folder_entries(cli, "df"), Vec::<String>::new());
    assert_eq!(internal_snapshots(&vda), Vec::<String>::new());

    // Only overlays to make: their creation is what fails.
    let external = [
        "snapshot",
        "create",
        "df",
        "e",
        "--disk",
        "vda=external",
        "--disk",
        "vdb=external",
    ];
    let error = cli.fails(&external);
    println!("all-external create on a full filesystem: {error}");
    assert!(
        error.contains("create of snapshot e of domain df failed while")
            && !error.contains("rollback incomplete"),
        "{error}"
    );
    assert_eq!(state(cli, "df"), "running");
    assert_ticking(&domain);
    for id in ["vda", "vdb"] {
        let overlay = domain.dir.join(format!("{id}.e.qcow2"));
        assert!(!overlay.exists(), "overlay left: {}", overlay.display());
    }
    assert!(!has_intent(cli, "df"));
    assert_eq!(activity_of(cli, "df"), "idle");
    assert_eq!(recover_all(cli), Vec::<serde_json::Value>::new());
    assert_eq!(snapshot_names(cli, "df"), Vec::<String>::new());
    assert_eq!(snapshot_folder_entries(cli, "df"), Vec::<String>::new());

    std::fs::remove_file(&filler).unwrap();
    let report = cli.json(&["snapshot", "create", "df", "s", "--disk", "vdb=external"]);
    assert_eq!(report["record"]["state"], "running", "{report}");
    assert!(overlay.exists());
    assert_eq!(internal_snapshots(&vda), ["s"]);
    assert_eq!(snapshot_names(cli, "df"), ["s"]);
    assert_eq!(state(cli, "df"), "running");
    assert_ticking(&domain);
    cli.ok(&["snapshot", "verify", "df", "s"]);
}

// ------------------------------------------------------------------------------ 4: concurrency

/// After concurrent creates on `name` (the names that succeeded): each is listed once, has its
/// internal snapshot on vda, and nothing else is left.
fn assert_consistent(cli: &Cli, domain: &Domain, succeeded: &[String]) {
    let mut expected = succeeded.to_vec();
    expected.sort();
    let mut listed = snapshot_names(cli, &domain.name);
    listed.sort();
    assert_eq!(listed, expected, "{}: snapshot list", domain.name);
    let mut internal = internal_snapshots(&domain.images[0]);
    internal.sort();
    assert_eq!(internal, expected, "{}: internal snapshots", domain.name);
    assert_eq!(
        snapshot_folder_entries(cli, &domain.name),
        expected,
        "{}",
        domain.name
    );
    let prefix = format!("state/domains/{}/", domain.name);
    let unexpected: Vec<String> = cli
        .snapshot_files()
        .into_iter()
        .filter(|f| f.starts_with(&prefix))
        .filter(|f| {
            !expected
                .iter()
                .any(|s| f.starts_with(&format!("{prefix}snapshots/{s}/")))
        })
        .collect();
    assert_eq!(unexpected, Vec::<String>::new(), "{}: left over", domain.name);
    assert!(!has_intent(cli, &domain.name));
    assert_eq!(activity_of(cli, &domain.name), "idle");
    assert_eq!(state(cli, &domain.name), "running");
}

#[test]
fn two_creates_at_once_on_one_domain_are_serialised_or_refused_as_busy() {
    let cli = Cli::new();
    let domain = cli.start_domain("cc", 128, Workload::Idle, 1);
    domain.first_tick_since(0, BOOT);

    let children: Vec<(String, Child)> = ["a", "b"]
        .iter()
        .map(|s| (s.to_string(), spawn(&cli, &["snapshot", "create", "cc", s])))
        .collect();
    let mut succeeded = Vec::new();
    for (snap, child) in children {
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            succeeded.push(snap);
        } else {
            let error = one_line_error(&format!("create {snap}"), &output);
            println!("create {snap} refused: {error}");
            assert!(error.contains("busy"), "create {snap}: not a busy error: {error}");
        }
    }
    println!("succeeded: {succeeded:?}");
    assert!(!succeeded.is_empty(), "neither create succeeded");
    assert_consistent(&cli, &domain, &succeeded);
    assert_ticking(&domain);
}

#[test]
fn creates_on_two_domains_at_once_both_succeed() {
    let cli = Cli::new();
    let first = cli.start_domain("p1", 128, Workload::Idle, 1);
    let second = cli.start_domain("p2", 128, Workload::Idle, 1);
    first.first_tick_since(0, BOOT);
    second.first_tick_since(0, BOOT);

    let children = [
        spawn(&cli, &["snapshot", "create", "p1", "both"]),
        spawn(&cli, &["snapshot", "create", "p2", "both"]),
    ];
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "a create failed:\n{}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
    }
    for domain in [&first, &second] {
        assert_consistent(&cli, domain, &["both".to_owned()]);
        assert_ticking(domain);
    }
}

#[test]
fn read_only_commands_answer_at_once_while_another_command_holds_a_domain() {
    let cli = Cli::new();
    let idle = cli.start_domain("li", 128, Workload::Idle, 1);
    let busy = cli.start_domain("lb", 256, Workload::Idle, 1);
    idle.first_tick_since(0, BOOT);
    busy.first_tick_since(0, BOOT);

    let mut create = spawn(&cli, &["snapshot", "create", "lb", "long"]);
    let pid = create.id();
    // Hold the create once it has written its intent (it holds the lock from its start), so
    // that it stays busy for as long as the checks take.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !has_intent(&cli, "lb") {
        assert!(
            create.try_wait().unwrap().is_none(),
            "the create ended before it wrote its intent"
        );
        assert!(Instant::now() < deadline, "the create wrote no intent");
        std::thread::sleep(Duration::from_millis(1));
    }
    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGSTOP).unwrap();

    for _ in 0..3 {
        let started = Instant::now();
        let rows = cli.json(&["domain", "list"])["domains"].clone();
        let took = started.elapsed();
        assert!(took < READ_ONLY, "domain list took {took:?}");
        let rows = rows.as_array().unwrap();
        let row = |name: &str| {
            rows.iter()
                .find(|r| r["name"] == name)
                .unwrap_or_else(|| panic!("no {name} in {rows:?}"))
                .clone()
        };
        let (kind, value) = activity(&row("lb"));
        assert_eq!(kind, "busy", "{value}");
        assert_eq!(value["operation"], "create", "{value}");
        assert_eq!(value["snapshot"], "long", "{value}");
        assert_eq!(value["pid"], pid, "{value}");
        assert_eq!(activity(&row("li")).0, "idle");
        assert_eq!(row("li")["state"], "running");

        let started = Instant::now();
        let status = status(&cli, "lb");
        let took = started.elapsed();
        assert!(took < READ_ONLY, "domain status took {took:?}");
        assert_eq!(activity(&status).0, "busy", "{status}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let human = cli.ok(&["domain", "status", "lb"]);
    assert!(
        human.contains(&format!("busy: create of snapshot long in progress (pid {pid})")),
        "{human}"
    );
    // A command that changes the domain waits for the lock, then says who holds it.
    let error = cli.fails(&["snapshot", "create", "lb", "other"]);
    assert!(
        error.contains("domain lb is busy") && error.contains(&format!("(pid {pid})")),
        "{error}"
    );

    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGCONT).unwrap();
    let output = create.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the held create failed:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert_consistent(&cli, &busy, &["long".to_owned()]);
    assert_eq!(activity_of(&cli, "li"), "idle");
    assert_ticking(&busy);
}

// -------------------------------------------------------------------------------- 5: abandon

#[test]
fn an_interrupted_create_is_shown_and_can_be_abandoned() {
    let cli = Cli::new();
    let domain = cli.start_domain("ab", 128, Workload::Idle, 2);
    let vda = domain.images[0].clone();
    domain.first_tick_since(0, BOOT);

    assert_eq!(
        cli.ok(&["recover", "ab", "--abandon"]),
        "domain ab: nothing to abandon\n"
    );
    assert!(cli.json(&["recover", "ab", "--abandon"])["abandoned"].is_null());
    assert_eq!(activity_of(&cli, "ab"), "idle");

    // Killed after the disks were snapshotted, before the guest is resumed.
    killed_at(
        &cli,
        &["snapshot", "create", "ab", "k", "--disk", "vdb=external"],
        "resume",
    );
    for _ in 0..2 {
        let status = status(&cli, "ab");
        let (kind, value) = activity(&status);
        assert_eq!(kind, "interrupted", "{status}");
        assert_eq!(value["operation"], "create", "{status}");
        assert_eq!(value["snapshot"], "k", "{status}");
        // Read-only: the intent is still there.
        assert!(has_intent(&cli, "ab"), "domain status recovered the create");
    }
    let human = cli.ok(&["domain", "status", "ab"]);
    assert!(human.contains("interrupted create of snapshot k"), "{human}");
    assert!(has_intent(&cli, "ab"));

    let folder = domain_dir(&cli, "ab").join("snapshots/k");
    let overlay = domain.dir.join("vdb.k.qcow2");
    let report = cli.ok(&["recover", "ab", "--abandon"]);
    println!("{report}");
    assert!(
        report.starts_with("domain ab: abandoned the interrupted create of snapshot k; left behind:\n"),
        "{report}"
    );
    for expected in [
        format!("internal snapshot k of {}", vda.display()),
        format!("snapshot folder {}", folder.display()),
        format!("overlay {}", overlay.display()),
        "the domain is".to_owned(),
    ] {
        assert!(report.contains(&expected), "{expected:?} not in:\n{report}");
    }
    assert!(!has_intent(&cli, "ab"));
    assert_eq!(activity_of(&cli, "ab"), "idle");
    // Abandoning changes nothing else: what is left is the user's to inspect.
    assert_eq!(internal_snapshots(&vda), ["k"]);
    assert!(folder.exists());
    assert!(overlay.exists());
    assert_eq!(snapshot_names(&cli, "ab"), Vec::<String>::new());
    assert_eq!(recover_all(&cli), Vec::<serde_json::Value>::new());
    assert_eq!(
        cli.ok(&["recover", "ab", "--abandon"]),
        "domain ab: nothing to abandon\n"
    );
}
