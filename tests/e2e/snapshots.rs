//! Snapshots end to end through the `domsnap` CLI, on QEMU 10 with the test guest: the guest's
//! counter, its fingerprint (data in tmpfs, so in RAM) and its disk marker prove that memory and
//! disks came back as they were when the snapshot was taken.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::time::Duration;

use common::{create, internal_snapshots, state, Cli, Domain, TicksAround, Workload};

const BOOT: Duration = Duration::from_secs(120);
const TICKS: Duration = Duration::from_secs(60);

/// Lets the guest run on so that a revert visibly goes back.
fn run_on(domain: &Domain, ticks: &TicksAround) {
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);
}

/// A place in the serial log: its line count and the last tick before it.
struct Mark {
    position: usize,
    last_tick: u64,
}

fn mark(domain: &Domain) -> Mark {
    Mark {
        position: domain.serial_position(),
        last_tick: domain.last_tick_since(0).unwrap_or(0),
    }
}

/// After a revert: the first tick the reverted guest prints continues from the snapshot's
/// value. The old guest may still have logged ticks after `mark` before it was stopped; those
/// follow `mark.last_tick` one by one, so the reverted guest's first tick is the first that
/// breaks the sequence.
fn assert_continues(domain: &Domain, mark: &Mark, ticks: &TicksAround) {
    let deadline = std::time::Instant::now() + TICKS;
    let first = loop {
        if let Some(first) = domain.first_jump_since(mark.position, mark.last_tick) {
            break first;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: no tick of the reverted guest (the old one was at {}); since the revert: {:?}",
            domain.name,
            mark.last_tick,
            domain.serial_since(mark.position)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        ticks.before < first && first <= ticks.after + 2,
        "{}: after the revert the counter went on at {first}; the snapshot was taken between ticks {} and {}",
        domain.name,
        ticks.before,
        ticks.after
    );
}

/// The image the domain's disk `id` uses now, from its definition in the state directory.
/// Reverts paused (lazily, or `eager`ly), checks the disk marker while nothing writes it,
/// resumes, and checks the counter.
fn revert_and_check(
    cli: &Cli,
    domain: &Domain,
    snapshot: &str,
    ticks: &TicksAround,
    marker_disk: &str,
    eager: bool,
) {
    let mut args = vec!["snapshot", "revert", &domain.name, snapshot, "--paused"];
    if eager {
        args.push("--eager");
    }
    let report = cli.json(&args);
    assert_eq!(report["state"], "paused", "{report}");
    let load = if eager { "copied" } else { "mapped" };
    assert_eq!(report["memory_load"], load, "{report}");
    assert_eq!(state(cli, domain), "paused");
    common::assert_marker_within(&cli.active_image(domain, marker_disk), ticks);
    let mark = mark(domain);
    cli.ok(&["domain", "resume", &domain.name]);
    assert_continues(domain, &mark, ticks);
}

#[test]
fn paused_snapshot_of_a_fingerprint_guest_brings_back_memory_and_disks() {
    let cli = Cli::new();
    let domain = cli.start_domain("fp", 256, Workload::Fingerprint { seed: 7, mib: 32 }, 2);
    let fingerprint = domain.fingerprint();
    domain.wait_tick_above(0, 1, BOOT);

    let (ticks, report) = create(&cli, &domain, "s1", &["--disk", "vdb=external"]);
    assert_eq!(report["record"]["state"], "running");
    assert_eq!(report["record"]["memory"]["consistency"], "end");
    assert_eq!(report["memory_rounds"].as_array().unwrap().len(), 1);
    assert!(report["guest_pause_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(internal_snapshots(&domain.images[0]), ["s1"]);
    let overlay = domain.dir.join("vdb.s1.qcow2");
    assert_eq!(cli.active_image(&domain, "vdb"), overlay);
    assert_eq!(state(&cli, &domain), "running");
    run_on(&domain, &ticks);

    revert_and_check(&cli, &domain, "s1", &ticks, "vda", false);
    assert_eq!(domain.fingerprint_check(), fingerprint);
    // vdb writes to a fresh overlay on the snapshot's image; the one written since is gone.
    let vdb = cli.active_image(&domain, "vdb");
    assert!(vdb.to_string_lossy().contains(".revert-"), "{}", vdb.display());
    assert!(!overlay.exists());
    cli.ok(&["snapshot", "verify", "fp", "s1"]);
    cli.ok(&["domain", "stop", "fp", "--force"]);
}

#[test]
fn live_snapshot_of_a_dirtying_guest_brings_back_memory_and_disks() {
    let cli = Cli::new();
    let domain = cli.start_domain(
        "dirty",
        256,
        Workload::Dirty {
            rate_mib: 20,
            wss_mib: 64,
        },
        2,
    );
    domain.wait_tick_above(0, 1, BOOT);

    let (ticks, report) = create(&cli, &domain, "live", &["--live", "--disk", "vda=external"]);
    // QEMU copies in passes while the guest runs, then stops it before the switch-over.
    assert_eq!(report["memory_mode"], "precopy", "{report}");
    assert_eq!(report["memory_read"], "stream", "{report}");
    assert_eq!(report["record"]["memory"]["consistency"], "end", "{report}");
    assert!(report["streamed"]["passes"].as_u64().unwrap() >= 2, "{report}");
    let pause = report["guest_pause_ms"].as_f64().unwrap();
    assert!(pause > 0.0, "{report}");
    let pages = report["memory_pages"].as_array().unwrap();
    assert_eq!(pages[0], 256 * 256, "{report}");
    // The image holds what was written, never more than the guest's RAM.
    let image = cli.state_dir().join("domains/dirty/snapshots/live/memory.img");
    assert!(std::fs::metadata(&image).unwrap().len() <= (256 << 20) + (1 << 20));
    assert_eq!(internal_snapshots(&domain.images[1]), ["live"]);
    run_on(&domain, &ticks);

    revert_and_check(&cli, &domain, "live", &ticks, "vda", false);
    assert!(cli
        .active_image(&domain, "vda")
        .to_string_lossy()
        .contains(".revert-"));
    // The guest keeps dirtying memory after the revert.
    let position = domain.serial_position();
    domain.wait_tick_above(position, ticks.after + 3, TICKS);
    cli.ok(&["domain", "stop", "dirty", "--force"]);
}

#[test]
fn a_tree_of_snapshots_reverts_along_every_branch_and_deletes_cleanly() {
    let cli = Cli::new();
    let domain = cli.start_domain("tree", 128, Workload::Idle, 2);
    domain.wait_tick_above(0, 1, BOOT);
    let external = ["--disk", "vdb=external"];

    let (t1, _) = create(&cli, &domain, "s1", &external);
    run_on(&domain, &t1);
    let (t2, _) = create(&cli, &domain, "s2", &external);
    run_on(&domain, &t2);
    let before_revert = mark(&domain);
    // Eager: the create that follows reads the guest's RAM, which a lazy revert leaves private
    // to QEMU.
    cli.ok(&["snapshot", "revert", "tree", "s1", "--eager"]);
    assert_continues(&domain, &before_revert, &t1);
    let (t3, report) = create(&cli, &domain, "s3", &external);
    assert_eq!(report["record"]["parent"], "s1");
    run_on(&domain, &t3);

    let tree = cli.ok(&["snapshot", "list", "tree", "--tree"]);
    assert_eq!(tree, "s1\n  s2\n  s3 *\n", "{tree}");
    assert_eq!(cli.ok(&["snapshot", "tree", "tree"]), tree);

    // Deleting the branch point keeps both branches whole.
    cli.ok(&["snapshot", "delete", "tree", "s1"]);
    let listed = cli.json(&["snapshot", "list", "tree"])["snapshots"].clone();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s2", "s3"]);
    assert!(listed.as_array().unwrap().iter().all(|r| r["parent"].is_null()));
    for (snapshot, ticks) in [("s2", &t2), ("s3", &t3)] {
        let before_revert = mark(&domain);
        cli.ok(&["snapshot", "revert", "tree", snapshot]);
        assert_continues(&domain, &before_revert, ticks);
        cli.ok(&["snapshot", "verify", "tree", snapshot]);
    }

    // Deleting everything leaves nothing behind: no snapshot files, no overlays, no internal
    // snapshots, and vdb is back on its own image.
    cli.ok(&["snapshot", "delete", "tree", "s2"]);
    cli.ok(&["snapshot", "delete", "tree", "s3"]);
    assert_eq!(cli.ok(&["snapshot", "list", "tree", "--tree"]), "");
    assert_eq!(cli.snapshot_files(), Vec::<String>::new());
    assert_eq!(internal_snapshots(&domain.images[0]), Vec::<String>::new());
    assert_eq!(cli.active_image(&domain, "vdb"), domain.images[1]);
    assert_eq!(state(&cli, &domain), "running");
    cli.ok(&["domain", "stop", "tree", "--force"]);
    assert_eq!(internal_snapshots(&domain.images[1]), Vec::<String>::new());
}

#[test]
fn a_shut_off_domain_gets_disk_only_snapshots_and_stays_shut_off_on_revert() {
    let cli = Cli::new();
    let domain = cli.start_domain("off", 128, Workload::Idle, 2);
    domain.wait_tick_above(0, 2, BOOT);
    // A clean stop: the guest powers off on the ACPI power button.
    cli.ok(&["domain", "stop", "off"]);
    assert_eq!(state(&cli, &domain), "shut-off");
    domain.wait_for_serial("DOMSNAP POWER-OFF", TICKS);
    let marker = Domain::disk_marker_tick(&domain.images[0]).expect("the guest wrote its marker");

    let report = cli.json(&["snapshot", "create", "off", "cold", "--disk", "vdb=external"]);
    assert_eq!(report["record"]["state"], "shut-off");
    assert!(report["record"]["memory"].is_null());
    assert_eq!(report["guest_pause_ms"], 0.0);
    assert_eq!(internal_snapshots(&domain.images[0]), ["cold"]);
    assert_eq!(
        cli.active_image(&domain, "vdb"),
        domain.dir.join("vdb.cold.qcow2")
    );

    // Redefining from the file would move vdb back onto the snapshot's image: refused.
    let error = cli.fails(&["domain", "start", domain.config.to_str().unwrap()]);
    assert!(error.contains("start it by name"), "{error}");
    // The guest changes the disk, then the revert brings back the marker and leaves the
    // domain shut off.
    cli.ok(&["domain", "start", "off"]);
    // The rebooted guest counts from 1 again: wait until its marker is past the snapshot's.
    let position = domain.serial_position();
    domain.wait_tick_above(position, marker + 2, BOOT);
    cli.ok(&["domain", "stop", "off", "--force"]);
    assert_ne!(Domain::disk_marker_tick(&domain.images[0]), Some(marker));
    let report = cli.json(&["snapshot", "revert", "off", "cold"]);
    assert_eq!(report["state"], "shut-off");
    assert_eq!(state(&cli, &domain), "shut-off");
    assert_eq!(Domain::disk_marker_tick(&domain.images[0]), Some(marker));
    cli.ok(&["snapshot", "delete", "off", "cold"]);
    assert_eq!(cli.snapshot_files(), Vec::<String>::new());
    assert_eq!(cli.active_image(&domain, "vdb"), domain.images[1]);
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let cli = Cli::new();
    let domain = cli.start_domain("bad", 128, Workload::Idle, 1);
    cli.ok(&["snapshot", "create", "bad", "s1"]);
    let files = cli.snapshot_files();

    let error = cli.fails(&["snapshot", "list", "nosuch"]);
    assert!(error.contains("nosuch"), "{error}");
    let error = cli.fails(&["snapshot", "revert", "bad", "nosuch"]);
    assert!(error.contains("no snapshot nosuch"), "{error}");
    let error = cli.fails(&["snapshot", "create", "bad", "s1"]);
    assert!(error.contains("already has a snapshot s1"), "{error}");
    for name in ["../escape", "with space", ".hidden", ""] {
        let error = cli.fails(&["snapshot", "create", "bad", name]);
        assert!(error.contains("bad snapshot name"), "{name:?}: {error}");
    }
    let error = cli.fails(&["snapshot", "create", "bad", "s2", "--disk", "vdz=internal"]);
    assert!(error.contains("no disk \"vdz\""), "{error}");
    let error = cli.fails(&["snapshot", "create", "bad", "s2", "--disk", "vda=copy"]);
    assert!(error.contains("the kind must be internal"), "{error}");
    let error = cli.fails(&["domain", "undefine", "bad"]);
    assert!(error.contains("snapshot"), "{error}");
    let error = cli.fails(&["domain", "start", domain.config.to_str().unwrap()]);
    assert!(error.contains("QEMU runs"), "{error}");
    assert_eq!(cli.snapshot_files(), files);
    assert_eq!(state(&cli, &domain), "running");

    cli.ok(&["snapshot", "delete", "bad", "s1"]);
    cli.ok(&["domain", "stop", "bad", "--force"]);
    cli.ok(&["domain", "undefine", "bad"]);
    // Undefining forgets the domain's state folder, except the guest's serial log and the lock
    // file (never unlinked: another process may hold or be about to take it).
    let left: Vec<String> = cli
        .files()
        .into_iter()
        .filter(|f| f.contains("state/domains/"))
        .collect();
    assert_eq!(left, ["state/domains/bad/lock", "state/domains/bad/serial.log"]);
    let error = cli.fails(&["domain", "status", "bad"]);
    assert!(error.contains("bad"), "{error}");
}

/// Issue 6: QEMU's background snapshot streamed into the memory image. The guest pauses only
/// for the disks and QEMU's capture; the snapshot is the guest as it was at the *start* of the
/// create, however long the stream then takes.
#[test]
fn background_snapshots_are_consistent_at_their_start() {
    let cli = Cli::new();
    let dirty = cli.start_domain(
        "bgdirty",
        512,
        Workload::Dirty {
            rate_mib: 20,
            wss_mib: 64,
        },
        2,
    );
    let fp = cli.start_domain("bgfp", 256, Workload::Fingerprint { seed: 11, mib: 32 }, 2);
    let fingerprint = fp.fingerprint();
    // The first background create of a QEMU process has it populate guest RAM (and writes back
    // the disks) before the pause, while the guest runs: on a loaded machine the pause can come
    // ticks after the command started. The ticks below bound the second one's instant.
    dirty.wait_tick_above(0, 1, BOOT);
    cli.ok(&[
        "snapshot",
        "create",
        "bgdirty",
        "warm",
        "--live-mode",
        "background",
    ]);
    cli.ok(&["snapshot", "delete", "bgdirty", "warm"]);
    for (domain, flags) in [
        (
            &dirty,
            vec!["--live-mode", "background", "--disk", "vda=external"],
        ),
        (&fp, vec!["--live-mode", "background", "--disk", "vdb=external"]),
    ] {
        domain.wait_tick_above(0, 1, BOOT);
        let (ticks, report) = create(&cli, domain, "bg", &flags);
        assert_eq!(report["memory_mode"], "background", "{report}");
        assert_eq!(report["record"]["memory"]["consistency"], "start");
        assert!(report["memory_rounds"].as_array().unwrap().is_empty());
        let streamed = &report["streamed"];
        assert!(streamed["pages"].as_u64().unwrap() > 0, "{report}");
        assert!(streamed["device_state_bytes"].as_u64().unwrap() > 0, "{report}");
        assert!(report["guest_pause_ms"].as_f64().unwrap() > 0.0);
        let show = cli.ok(&["snapshot", "show", &domain.name, "bg"]);
        assert!(show.contains("consistent at the start"), "{show}");
        run_on(domain, &ticks);

        // Consistent at the start: the counter goes back to (about) the value before the create.
        let at_start = TicksAround {
            after: ticks.before,
            ..ticks
        };
        // Eager: the background create below reads guest RAM, which a lazy revert leaves
        // private to QEMU.
        revert_and_check(&cli, domain, "bg", &at_start, "vda", true);
        cli.ok(&["snapshot", "verify", &domain.name, "bg"]);
    }
    assert_eq!(fp.fingerprint_check(), fingerprint);

    // A disk step that fails rolls back: no snapshot, no files, the guest runs on.
    let files = cli.snapshot_files();
    let read_only = common::ReadOnlyDir::new(cli.dir.path());
    let overlay = format!("vdb=external:{}", read_only.path.join("x.qcow2").display());
    let error = cli.fails(&[
        "snapshot",
        "create",
        "bgfp",
        "broken",
        "--live-mode",
        "background",
        "--disk",
        &overlay,
    ]);
    assert!(error.contains("snapshotting the disks"), "{error}");
    drop(read_only);
    assert_eq!(cli.snapshot_files(), files);
    assert_eq!(state(&cli, &fp), "running");
}
