//! The seed's arguments end to end through the `domsnap` CLI on QEMU 10: a disk left out
//! (`--disk ID=no`), a per-disk internal name (`--disk ID=internal:NAME`), a disk-only snapshot
//! of a running domain (`--disk-only`) and a memory image at a chosen path (`--memory-path`),
//! each through revert, verify and delete; bad input is refused with a clear error and changes
//! nothing.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{path::PathBuf, time::Duration};

use common::{create, internal_snapshots, state, Cli, Domain, TicksAround, Workload};

const BOOT: Duration = Duration::from_secs(120);
const TICKS: Duration = Duration::from_secs(60);

/// The image the domain's disk `id` uses now, from its definition.
/// Reverts paused, checks vda's marker, resumes and checks that the counter goes on from the
/// snapshot's value.
fn revert_and_check(cli: &Cli, domain: &Domain, snapshot: &str, ticks: &TicksAround, eager: bool) {
    let mut args = vec!["snapshot", "revert", &domain.name, snapshot, "--paused"];
    if eager {
        args.push("--eager");
    }
    let report = cli.json(&args);
    assert_eq!(report["state"], "paused", "{report}");
    common::assert_marker_within(&cli.active_image(domain, "vda"), ticks);
    let position = domain.serial_position();
    cli.ok(&["domain", "resume", &domain.name]);
    let first = domain.first_tick_since(position, TICKS);
    assert!(
        ticks.before < first && first <= ticks.after + 2,
        "after the revert the counter went on at {first}; the snapshot was taken between {} and {}",
        ticks.before,
        ticks.after
    );
}

/// A create that must fail with exit status `status` and an error naming `expected`, leaving
/// no snapshot file behind and the domain running.
fn refused(cli: &Cli, domain: &Domain, args: &[&str], status: i32, expected: &str) {
    let before = cli.snapshot_files();
    let mut full = vec!["snapshot", "create", &domain.name, "bad"];
    full.extend_from_slice(args);
    let run = cli.run(&full);
    assert_eq!(
        run.output.status.code(),
        Some(status),
        "{args:?}: {}",
        run.stderr()
    );
    assert!(run.stderr().contains(expected), "{args:?}: {}", run.stderr());
    assert_eq!(cli.snapshot_files(), before, "{args:?} left files");
    assert_eq!(state(cli, domain), "running");
}

#[test]
fn disks_left_out_named_internal_snapshots_and_disk_only_snapshots_of_a_running_domain() {
    let cli = Cli::new();
    let domain = cli.start_domain("seed", 128, Workload::Idle, 2);
    domain.wait_tick_above(0, 1, BOOT);
    refused(&cli, &domain, &["--disk", "vdz=no"], 6, "no disk \"vdz\"");
    refused(
        &cli,
        &domain,
        &["--disk", "vda=internal:123"],
        6,
        "cannot be named \"123\"",
    );
    refused(&cli, &domain, &["--disk", "vda=sometimes"], 6, "vda=sometimes");

    let (ticks, report) = create(
        &cli,
        &domain,
        "s1",
        &["--disk", "vda=internal:mine", "--disk", "vdb=no"],
    );
    let disks = &report["record"]["disks"];
    assert_eq!(disks[0]["snapshot"]["name"], "mine", "{report}");
    assert_eq!(disks[1]["snapshot"]["kind"], "excluded", "{report}");
    assert_eq!(internal_snapshots(&domain.images[0]), ["mine"]);
    assert!(internal_snapshots(&domain.images[1]).is_empty());
    let list = cli.json(&["snapshot", "list", "seed"]);
    assert_eq!(
        list["snapshots"][0]["disks"],
        serde_json::json!(["vda:internal", "vdb:excluded"])
    );
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);
    revert_and_check(&cli, &domain, "s1", &ticks, false);
    assert_eq!(
        cli.active_image(&domain, "vdb"),
        domain.images[1],
        "vdb stays as it is"
    );
    cli.ok(&["snapshot", "verify", "seed", "s1"]);

    // Disk-only, running: no pause, no memory; the revert leaves the domain shut off.
    let (ticks, report) = create(&cli, &domain, "d1", &["--disk-only", "--disk", "vdb=external"]);
    assert_eq!(report["memory_mode"], "none", "{report}");
    assert!(report["record"]["memory"].is_null(), "{report}");
    assert_eq!(report["record"]["state"], "running", "{report}");
    assert_eq!(report["guest_pause_ms"], 0.0, "{report}");
    assert_eq!(state(&cli, &domain), "running");
    assert_eq!(internal_snapshots(&domain.images[0]), ["mine", "d1"]);
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);
    let reverted = cli.json(&["snapshot", "revert", "seed", "d1"]);
    assert_eq!(reverted["state"], "shut-off", "{reverted}");
    assert_eq!(reverted["memory_load"], "none", "{reverted}");
    assert_eq!(state(&cli, &domain), "shut-off");
    common::assert_marker_within(&cli.active_image(&domain, "vda"), &ticks);

    cli.ok(&["snapshot", "delete", "seed", "s1"]);
    cli.ok(&["snapshot", "delete", "seed", "d1"]);
    assert!(internal_snapshots(&domain.images[0]).is_empty());
    assert_eq!(cli.snapshot_files(), Vec::<String>::new());
}

#[test]
fn a_memory_image_at_a_chosen_path_is_verified_reverted_and_deleted_there() {
    let cli = Cli::new();
    let domain = cli.start_domain("mp", 128, Workload::Idle, 1);
    domain.wait_tick_above(0, 1, BOOT);
    let folder = domain.dir.join("images");
    std::fs::create_dir(&folder).unwrap();
    let taken = folder.join("taken.img");
    std::fs::write(&taken, b"mine").unwrap();
    let image = folder.join("mp.img");
    let text = |p: &PathBuf| p.to_str().unwrap().to_owned();
    refused(
        &cli,
        &domain,
        &["--memory-path", &text(&taken)],
        6,
        "exists already",
    );
    let missing = folder.join("missing/mp.img");
    refused(
        &cli,
        &domain,
        &["--memory-path", &text(&missing)],
        6,
        "does not exist",
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");

    let (ticks, report) = create(&cli, &domain, "m1", &["--memory-path", &text(&image)]);
    assert_eq!(report["record"]["memory"]["image_path"], text(&image), "{report}");
    assert!(image.exists());
    let snapshot_dir = cli.state_dir().join("domains/mp/snapshots/m1");
    assert!(!snapshot_dir.join("memory.img").exists());
    assert!(snapshot_dir.join("devices.bin").exists());
    let inside = snapshot_dir.join("other.img");
    refused(
        &cli,
        &domain,
        &["--memory-path", &text(&inside)],
        6,
        "inside a snapshot's folder",
    );
    let verified = cli.json(&["snapshot", "verify", "mp", "m1"]);
    assert!(verified["problems"].as_array().unwrap().is_empty(), "{verified}");
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);
    revert_and_check(&cli, &domain, "m1", &ticks, true);
    revert_and_check(&cli, &domain, "m1", &ticks, false);

    cli.ok(&["domain", "stop", "mp", "--force"]);
    let deleted = cli.json(&["snapshot", "delete", "mp", "m1"]);
    assert_eq!(deleted["deleted"], serde_json::json!(["m1"]), "{deleted}");
    assert!(!image.exists(), "delete removes the image where it is");
    assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 1, "only taken.img");
}
