//! Issue 11, part 4: a revert lets QEMU map the snapshot's memory image copy-on-write (the
//! default), or copies it into fresh RAM with `--eager`. The guest goes on exactly where the
//! snapshot was, the image never changes while the guest writes its memory, the snapshot can be
//! deleted while the reverted domain runs (its image's data stays until the domain stops), and
//! reverts follow each other in both modes.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{
    hash::Hasher,
    io::Read,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{create, revert_expecting as revert, state, Cli, Domain, Workload, RUN_SLOTS};

const BOOT: Duration = Duration::from_secs(120);
const TICKS: Duration = Duration::from_secs(60);

/// A hash of a whole file.
fn file_hash(path: &Path) -> u64 {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return hasher.finish();
        }
        hasher.write(&buf[..n]);
    }
}

/// What `domain status` says the domain's RAM is mapped from.
fn mapped_image(cli: &Cli, domain: &Domain) -> Option<PathBuf> {
    let status = cli.json(&["domain", "status", &domain.name]);
    status["mapped_image"].as_str().map(PathBuf::from)
}

#[test]
fn a_lazy_revert_goes_on_exactly_and_keeps_the_image_as_it_was() {
    let cli = Cli::new();
    let domain = cli.start_domain("lazy", 256, Workload::Fingerprint { seed: 5, mib: 16 }, 1);
    let fingerprint = domain.fingerprint();
    domain.wait_tick_above(0, 1, BOOT);
    let (ticks, _) = create(&cli, &domain, "s1", &[]);
    let folder = cli.state_dir().join("domains/lazy");
    let image = folder.join("snapshots/s1/memory.img");
    // The link of the image the running QEMU maps, in its run folder (the slot alternates with
    // each revert that starts the new QEMU beside the old one).
    let link = || domain.run_dir().join("ram-base.img");
    let hash = file_hash(&image);
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);

    // The default: mapped. The guest's memory is the snapshot's.
    let report = revert(&cli, &domain, "s1", &ticks, &[]);
    assert_eq!(report["memory_ms"], 0.0, "{report}");
    assert_eq!(mapped_image(&cli, &domain), Some(image.clone()));
    assert!(link().exists());
    assert_eq!(report["standby"], true, "{report}");
    assert!(report["downtime_ms"].as_f64().unwrap() < report["total_ms"].as_f64().unwrap());
    assert_eq!(domain.fingerprint_check(), fingerprint);
    // The guest runs and writes its memory; the image stays as it was.
    let position = domain.serial_position();
    domain.wait_tick_above(position, domain.last_tick_since(0).unwrap() + 3, TICKS);
    assert_eq!(file_hash(&image), hash, "the mapped image changed");
    let text = cli.ok(&["domain", "status", "lazy"]);
    assert!(text.contains("RAM mapped copy-on-write from"), "{text}");

    // A paused create cannot read mapped RAM directly: QEMU streams it, and the image it maps
    // stays as it was.
    let report = cli.json(&["snapshot", "create", "lazy", "after"]);
    assert_eq!(report["memory_read"], "stream", "{report}");
    assert_eq!(report["memory_mode"], "paused", "{report}");
    assert_eq!(state(&cli, &domain), "running");
    assert_eq!(file_hash(&image), hash, "the mapped image changed");

    // A lazy revert after a lazy revert, then an eager one: shared RAM again.
    revert(&cli, &domain, "s1", &ticks, &[]);
    assert_eq!(domain.fingerprint_check(), fingerprint);
    let report = revert(&cli, &domain, "s1", &ticks, &["--eager"]);
    assert!(report["memory_ms"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(mapped_image(&cli, &domain), None);
    assert!(RUN_SLOTS
        .iter()
        .all(|run| !folder.join(run).join("ram-base.img").exists()));
    assert_eq!(domain.fingerprint_check(), fingerprint);
    // And a lazy one after the eager one.
    revert(&cli, &domain, "s1", &ticks, &[]);
    assert_eq!(file_hash(&image), hash, "the mapped image changed");
    cli.ok(&["snapshot", "verify", "lazy", "s1"]);
    cli.ok(&["domain", "stop", "lazy", "--force"]);
    assert!(RUN_SLOTS.iter().all(|run| !folder.join(run).exists()));
}

#[test]
fn a_snapshot_deleted_while_its_image_is_mapped_keeps_the_data_until_the_domain_stops() {
    let cli = Cli::new();
    let domain = cli.start_domain("keep", 256, Workload::Fingerprint { seed: 9, mib: 16 }, 1);
    let fingerprint = domain.fingerprint();
    domain.wait_tick_above(0, 1, BOOT);
    let (ticks, _) = create(&cli, &domain, "s1", &[]);
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);
    revert(&cli, &domain, "s1", &ticks, &[]);
    let link = domain.run_dir().join("ram-base.img");
    let hash = file_hash(&link);

    let text = cli.ok(&["snapshot", "delete", "keep", "s1"]);
    assert!(
        text.contains("the memory image of s1 is still mapped by the running domain")
            && text.contains("until the domain stops"),
        "{text}"
    );
    assert_eq!(cli.snapshot_files(), Vec::<String>::new());
    // The domain runs on, on the image's data.
    assert_eq!(state(&cli, &domain), "running");
    let position = domain.serial_position();
    domain.wait_tick_above(position, domain.last_tick_since(0).unwrap() + 2, TICKS);
    assert_eq!(domain.fingerprint_check(), fingerprint);
    assert_eq!(file_hash(&link), hash);

    // Once the domain stops, the data is gone.
    cli.ok(&["domain", "stop", "keep", "--force"]);
    assert!(!link.exists());
    assert_eq!(state(&cli, &domain), "shut-off");

    // The JSON report says it too.
    cli.ok(&["domain", "start", "keep"]);
    domain.wait_tick_above(domain.serial_position(), 1, BOOT);
    let (ticks, _) = create(&cli, &domain, "s2", &[]);
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);
    revert(&cli, &domain, "s2", &ticks, &[]);
    let report = cli.json(&["snapshot", "delete", "keep", "s2"]);
    assert_eq!(report["memory_in_use"], serde_json::json!(["s2"]), "{report}");
    cli.ok(&["domain", "stop", "keep", "--force"]);
}

#[test]
fn a_revert_whose_new_qemu_cannot_start_leaves_the_domain_running_as_it_was() {
    let cli = Cli::new();
    let domain = cli.start_domain("fails", 256, Workload::Fingerprint { seed: 3, mib: 16 }, 1);
    let fingerprint = domain.fingerprint();
    domain.wait_tick_above(0, 1, BOOT);
    let (ticks, _) = create(&cli, &domain, "s1", &[]);
    domain.wait_tick_above(ticks.position, ticks.after + 2, TICKS);

    // A QEMU that cannot start beside the running one (in the domain's second run slot).
    let wrapper = cli.dir.path().join("qemu-fails-beside");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *\"/run-1/\"*) echo 'simulated: out of memory' >&2; exit 1;; esac\n\
             exec {} \"$@\"\n",
            testkit::qemu_system().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pid = cli.json(&["domain", "status", "fails"])["pid"].clone();
    let disks_before = cli.active_image(&domain, "vda");
    let snapshot_files = cli.snapshot_files();
    let position = domain.serial_position();
    let last = domain.last_tick_since(0).unwrap();
    let run = cli
        .command(&["--json", "snapshot", "revert", "fails", "s1"])
        .env(qemu::QEMU_ENV, &wrapper)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let failure: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let error = &failure["error"];
    assert_eq!(error["code"], "failed_rolled_back", "{failure}");
    assert_eq!(error["step"], "start-standby", "{failure}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("simulated: out of memory"), "{message}");
    assert!(!message.contains("shut off"), "{message}");

    // The same QEMU runs the same guest on, undisturbed; nothing of the revert is left.
    let status = cli.json(&["domain", "status", "fails"]);
    assert_eq!(
        (&status["state"], &status["pid"]),
        (&"running".into(), &pid),
        "{status}"
    );
    domain.wait_tick_above(position, last + 3, TICKS);
    let ticks_since: Vec<u64> = domain
        .serial_since(position)
        .iter()
        .filter_map(common::tick)
        .collect();
    assert!(
        ticks_since.windows(2).all(|w| w[1] == w[0] + 1),
        "the guest did not run on: {ticks_since:?}"
    );
    assert_eq!(cli.active_image(&domain, "vda"), disks_before);
    assert_eq!(cli.snapshot_files(), snapshot_files);
    assert!(!domain.folder.join("run-1").exists());
    assert!(!domain.folder.join("intent.json").exists());

    // And the revert works once QEMU can start.
    revert(&cli, &domain, "s1", &ticks, &[]);
    assert_eq!(domain.fingerprint_check(), fingerprint);
}
