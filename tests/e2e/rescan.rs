//! `snapshot rescan` end to end, with the real CLI, qemu-img and QEMU 10: disk parts of snapshots
//! deleted, removed or rebased behind domsnap's back (on shut-off and running domains) mark
//! their snapshots broken, `list` and `show` say so, a revert to them is refused before the
//! domain is touched while the others still revert, and a repaired snapshot is unmarked. Also
//! `snapshot list --roots | --leaves | --current | --json --tree` and `snapshot current`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{path::Path, time::Duration};

use common::{internal_snapshots, state, Cli, Domain, Workload};
use serde_json::{json, Value};

const BOOT: Duration = Duration::from_secs(120);

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A running domain with two disks and two snapshots, s1 and s2 (s2 a child of s1), each with
/// vda internal and vdb external: vdb.qcow2 under vdb.s1.qcow2, which is under vdb.s1.s2.qcow2.
fn domain_with_two_snapshots(cli: &Cli, name: &str) -> Domain {
    let domain = cli.start_domain(name, 128, Workload::Idle, 2);
    domain.wait_tick_above(0, 1, BOOT);
    for snapshot in ["s1", "s2"] {
        cli.ok(&["snapshot", "create", name, snapshot, "--disk", "vdb=external"]);
    }
    domain
}

fn rescan(cli: &Cli, domain: &Domain) -> Value {
    cli.json(&["snapshot", "rescan", &domain.name])
}

fn list_row(cli: &Cli, domain: &Domain, snapshot: &str) -> Value {
    let list = cli.json(&["snapshot", "list", &domain.name]);
    list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == snapshot)
        .unwrap()
        .clone()
}

/// A revert that must be refused as broken (exit status 6, invalid_argument), naming `missing`,
/// with nothing changed.
fn revert_refused(cli: &Cli, domain: &Domain, snapshot: &str, missing: &str) {
    let (before, state_before) = (cli.snapshot_files(), state(cli, domain));
    let run = cli.run(&["snapshot", "revert", &domain.name, snapshot]);
    assert_eq!(run.output.status.code(), Some(6), "{}", run.stderr());
    let error = run.stderr();
    assert!(
        error.contains(&format!(
            "snapshot {snapshot} of domain {} is broken",
            domain.name
        )),
        "{error}"
    );
    assert!(error.contains(missing), "{error}");
    assert_eq!(cli.snapshot_files(), before);
    assert_eq!(state(cli, domain), state_before);
}

#[test]
fn an_internal_snapshot_deleted_with_qemu_img_marks_its_snapshot_broken() {
    let cli = Cli::new();
    let domain = domain_with_two_snapshots(&cli, "rsi");
    cli.ok(&["domain", "stop", "rsi", "--force"]);
    let first = rescan(&cli, &domain);
    assert_eq!(
        (first["first"].clone(), first["broken"].clone()),
        (json!(true), json!([]))
    );

    let vda = &domain.images[0];
    testkit::run("qemu-img", &["snapshot", "-d", "s1", text(vda)]);
    assert_eq!(internal_snapshots(vda), ["s2"]);
    let report = rescan(&cli, &domain);
    let reason = format!("disk vda: internal snapshot s1 is gone from {}", vda.display());
    assert_eq!(
        report["changed"],
        json!([{ "snapshot": "s1", "health": "broken", "reasons": [reason] }]),
        "{report}"
    );
    assert_eq!(report["broken"], json!(["s1"]));
    let again = cli.ok(&["snapshot", "rescan", "rsi"]);
    assert!(again.starts_with("rescanned rsi in "), "{again}");
    assert!(again.ends_with("broken snapshots: s1\n"), "{again}");
    assert_eq!(list_row(&cli, &domain, "s1")["broken"], json!([reason]));
    assert!(list_row(&cli, &domain, "s2")["broken"].is_null());
    let listed = cli.ok(&["snapshot", "list", "rsi"]);
    assert!(listed.contains(&format!("! broken: {reason}")), "{listed}");
    assert!(cli
        .ok(&["snapshot", "list", "rsi", "--tree"])
        .contains("s1 (broken)"));
    let shown = cli.ok(&["snapshot", "show", "rsi", "s1"]);
    assert!(shown.contains("broken:") && shown.contains(&reason), "{shown}");
    let record = &cli.json(&["snapshot", "show", "rsi", "s1"])["record"];
    assert_eq!(record["broken"]["reasons"], json!([reason]));

    revert_refused(&cli, &domain, "s1", &reason);
    let reverted = cli.json(&["snapshot", "revert", "rsi", "s2"]);
    assert_eq!(reverted["state"], "running", "{reverted}");
    assert_eq!(state(&cli, &domain), "running");
    // The broken snapshot can still be deleted.
    cli.ok(&["snapshot", "delete", "rsi", "s1"]);
    assert_eq!(rescan(&cli, &domain)["broken"], json!([]));
}

#[test]
fn a_removed_overlay_and_a_rebased_image_break_their_snapshots_until_repaired() {
    let cli = Cli::new();
    let domain = domain_with_two_snapshots(&cli, "rse");
    cli.ok(&["domain", "stop", "rse", "--force"]);
    let vdb = &domain.images[1];
    let s2_image = domain.dir.join("vdb.s1.qcow2");
    std::fs::remove_file(&s2_image).unwrap();
    let report = rescan(&cli, &domain);
    let missing = format!("disk vdb: image {} is missing", s2_image.display());
    assert_eq!(report["changed"][0]["reasons"], json!([missing]), "{report}");
    assert_eq!(report["broken"], json!(["s2"]));
    let disk = &report["disks"][1];
    assert_eq!(disk["target"], "vdb");
    assert!(
        disk["problem"].as_str().unwrap().contains("is missing"),
        "{report}"
    );
    revert_refused(&cli, &domain, "s2", &missing);
    // s1 still reverts (a fresh overlay on vdb.qcow2), and the broken s2 can be deleted.
    cli.ok(&["snapshot", "revert", "rse", "s1"]);
    cli.ok(&["snapshot", "delete", "rse", "s2"]);
    cli.ok(&["domain", "stop", "rse", "--force"]);
    assert_eq!(rescan(&cli, &domain)["broken"], json!([]));

    // vdb.qcow2 rebased onto another image: s1 is broken, the change is reported and recorded.
    let other = domain.dir.join("other.qcow2");
    testkit::create_qcow2(&other, "64M");
    let rebase = |backing: &str| {
        let args = ["rebase", "-u", "-b", backing, "-F", "qcow2", text(vdb)];
        testkit::run("qemu-img", &args);
    };
    rebase(text(&other));
    let report = rescan(&cli, &domain);
    assert_eq!(report["broken"], json!(["s1"]), "{report}");
    let reason = report["changed"][0]["reasons"][0].as_str().unwrap();
    assert!(
        reason.contains("changed outside domsnap: was no backing file"),
        "{reason}"
    );
    let changed = report["disks"][1]["changed"].to_string();
    assert!(changed.contains("the backing file of") && changed.contains("was not made by domsnap"));
    assert_eq!(
        rescan(&cli, &domain)["disks"][1]["changed"],
        json!([]),
        "recorded"
    );
    revert_refused(&cli, &domain, "s1", "changed outside domsnap");

    testkit::run("qemu-img", &["rebase", "-u", "-b", "", text(vdb)]);
    let repaired = rescan(&cli, &domain);
    assert_eq!(
        repaired["changed"],
        json!([{ "snapshot": "s1", "health": "repaired", "reasons": [] }]),
        "{repaired}"
    );
    assert_eq!(cli.json(&["snapshot", "revert", "rse", "s1"])["state"], "running");
}

#[test]
fn a_running_and_a_paused_domain_are_rescanned_through_qemu() {
    let cli = Cli::new();
    let domain = domain_with_two_snapshots(&cli, "rsr");
    // Back to s1: the domain runs on a fresh overlay on vdb.qcow2; vdb.s1.qcow2, s2's image, is
    // no longer open in QEMU and can go behind domsnap's back.
    cli.ok(&["snapshot", "revert", "rsr", "s1"]);
    let first = rescan(&cli, &domain);
    assert_eq!(first["broken"], json!([]), "{first}");
    assert_eq!(first["disks"][1]["chain"].as_array().unwrap().len(), 2, "{first}");
    let s2_image = domain.dir.join("vdb.s1.qcow2");
    std::fs::remove_file(&s2_image).unwrap();
    let report = rescan(&cli, &domain);
    assert_eq!(report["broken"], json!(["s2"]), "{report}");
    assert_eq!(state(&cli, &domain), "running");
    revert_refused(&cli, &domain, "s2", "is missing");

    cli.ok(&["domain", "pause", "rsr"]);
    let paused = rescan(&cli, &domain);
    assert!(paused["changed"].as_array().unwrap().is_empty(), "{paused}");
    assert_eq!(paused["broken"], json!(["s2"]));
    assert_eq!(state(&cli, &domain), "paused");
    cli.ok(&["domain", "resume", "rsr"]);
    cli.ok(&["snapshot", "revert", "rsr", "s1"]);
}

#[test]
fn list_filters_the_tree_as_json_and_the_current_snapshot() {
    let cli = Cli::new();
    let domain = cli.define_domain("tree", 128, Workload::Idle, 1);
    cli.ok(&["domain", "start", text(&domain.config)]);
    cli.ok(&["domain", "stop", "tree", "--force"]);
    // s1 ─ s2
    //    └ s3       (s1 made current again before s3)
    for snapshot in ["s1", "s2"] {
        cli.ok(&["snapshot", "create", "tree", snapshot]);
    }
    assert_eq!(cli.json(&["snapshot", "current", "tree"])["current"], "s2");
    let set = cli.json(&["snapshot", "current", "tree", "s1"]);
    assert_eq!(
        (set["domain"].clone(), set["current"].clone()),
        (json!("tree"), json!("s1"))
    );
    cli.ok(&["snapshot", "create", "tree", "s3"]);
    assert_eq!(cli.ok(&["snapshot", "current", "tree"]), "s3\n");
    let run = cli.run(&["--json", "snapshot", "current", "tree", "nosuch"]);
    assert_eq!(run.output.status.code(), Some(3), "{}", run.stderr());
    assert!(
        run.stderr().contains("has no snapshot nosuch"),
        "{}",
        run.stderr()
    );
    assert_eq!(cli.json(&["snapshot", "current", "tree"])["current"], "s3");

    let names = |filter: &str| {
        let list = cli.json(&["snapshot", "list", "tree", filter]);
        let rows = list["snapshots"].as_array().unwrap().clone();
        rows.iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(names("--roots"), ["s1"]);
    assert_eq!(names("--leaves"), ["s2", "s3"]);
    assert_eq!(names("--current"), ["s3"]);
    let run = cli.run(&["snapshot", "list", "tree", "--roots", "--leaves"]);
    assert_eq!(run.output.status.code(), Some(2));

    let tree = cli.json(&["snapshot", "list", "tree", "--tree"]);
    let shape = |node: &Value| -> Value {
        let children: Vec<&str> = node["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        json!([node["name"], children])
    };
    let roots = tree["tree"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{tree}");
    assert_eq!(shape(&roots[0]), json!(["s1", ["s2", "s3"]]));
    assert_eq!(roots[0]["children"][1]["current"], true);
    assert_eq!(roots[0]["children"][1]["children"], json!([]));
    assert_eq!(
        cli.ok(&["snapshot", "list", "tree", "--tree"]),
        "s1\n  s2\n  s3 *\n"
    );
}

#[test]
fn an_overlay_made_outside_domsnap_on_the_active_image_is_reported_once() {
    let cli = Cli::new();
    let domain = cli.define_domain("foreign", 128, Workload::Idle, 1);
    cli.ok(&["domain", "start", text(&domain.config)]);
    cli.ok(&["domain", "stop", "foreign", "--force"]);
    assert_eq!(rescan(&cli, &domain)["first"], true);
    // Someone makes an overlay on vda.qcow2 and has the domain run on it.
    let theirs = domain.dir.join("theirs.qcow2");
    let (vda, overlay) = (text(&domain.images[0]), text(&theirs));
    testkit::run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", vda, "-F", "qcow2", overlay],
    );
    let config = std::fs::read_to_string(&domain.config)
        .unwrap()
        .replace(vda, overlay);
    std::fs::write(&domain.config, config).unwrap();
    cli.ok(&["domain", "start", text(&domain.config)]);
    let report = rescan(&cli, &domain);
    assert_eq!(
        report["disks"][0]["changed"],
        json!([format!(
            "{overlay} was not made by domsnap (its backing file: {vda})"
        )]),
        "{report}"
    );
    assert_eq!(report["disks"][0]["chain"], json!([overlay, vda]));
    assert!(cli
        .ok(&["snapshot", "rescan", "foreign"])
        .contains("no snapshot is broken"));
    assert_eq!(
        rescan(&cli, &domain)["disks"][0]["changed"],
        json!([]),
        "recorded"
    );
}
