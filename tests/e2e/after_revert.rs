//! Issue 10, item 1: a domain restored by a revert must stay fully usable. Its QEMU was started
//! to receive the saved device state (`-incoming defer`); every create mode (paused, live
//! pre-copy, live background) and a second revert must work on it, the domain must stay running
//! and the guest must go on counting. A QEMU restored with `migration.send-configuration=off`
//! aborted on its next outgoing migration (a background create) and the guest was lost.
//!
//! Issue 11: every create mode after an eager revert (`--eager`: RAM copied into fresh shared RAM)
//! and after a lazy one (RAM mapped copy-on-write from the snapshot's image, private to QEMU: a
//! paused create streams it through QEMU's migration instead of reading it, pre-copy is QEMU's
//! anyway, and a background create is refused clearly, QEMU cannot write-protect such RAM).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::time::{Duration, Instant};

use common::{create, state, Cli, Domain, TicksAround, Workload};

const BOOT: Duration = Duration::from_secs(120);
const TICKS: Duration = Duration::from_secs(60);

/// The domain runs and its guest goes on counting past `ticks.after`.
fn assert_runs_on(cli: &Cli, domain: &Domain, ticks: &TicksAround, what: &str) {
    assert_eq!(state(cli, domain), "running", "{what}: the domain is not running");
    let position = ticks.position;
    let deadline = Instant::now() + TICKS;
    while domain
        .serial_since(position)
        .iter()
        .filter_map(common::tick)
        .all(|t| t <= ticks.after + 1)
    {
        assert!(
            Instant::now() < deadline,
            "{what}: the guest stopped counting at {}; QEMU log:\n{}",
            ticks.after,
            domain.qemu_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state(cli, domain), "running", "{what}: the domain is not running");
}

/// Reverts to `snapshot` (eagerly or lazily) and checks that the guest goes on from its tick.
fn revert_and_check(cli: &Cli, domain: &Domain, snapshot: &str, ticks: &TicksAround, eager: bool) {
    let extra: &[&str] = if eager { &["--eager"] } else { &[] };
    common::revert_expecting(cli, domain, snapshot, ticks, extra);
}

#[test]
fn every_create_mode_and_a_second_revert_work_after_an_eager_and_a_lazy_revert() {
    let cli = Cli::new();
    let domain = cli.start_domain("again", 128, Workload::Idle, 1);
    domain.wait_tick_above(0, 1, BOOT);
    let (base, _) = create(&cli, &domain, "base", &[]);
    domain.wait_tick_above(base.position, base.after + 2, TICKS);

    let modes: [(&str, &[&str]); 3] = [
        ("paused", &[]),
        ("precopy", &["--live", "--live-mode", "precopy"]),
        ("background", &["--live", "--live-mode", "background"]),
    ];
    for eager in [true, false] {
        let kind = if eager { "eager" } else { "lazy" };
        for (memory_mode, flags) in modes {
            // Each create runs on a QEMU that a revert has just restored.
            revert_and_check(&cli, &domain, "base", &base, eager);
            let snapshot = format!("{memory_mode}-after-{kind}");
            if !eager && memory_mode == "background" {
                let mut args = vec!["snapshot", "create", "again", snapshot.as_str()];
                args.extend_from_slice(flags);
                let error = cli.fails(&args);
                assert!(
                    error.contains("background snapshot of domain again is impossible"),
                    "{error}"
                );
                assert_eq!(state(&cli, &domain), "running");
                continue;
            }
            let (ticks, report) = create(&cli, &domain, &snapshot, flags);
            assert_eq!(report["memory_mode"], memory_mode, "{report}");
            let read = if eager && memory_mode == "paused" {
                "direct"
            } else {
                "stream"
            };
            assert_eq!(report["memory_read"], read, "{report}");
            let what = format!("{snapshot} create");
            assert_runs_on(&cli, &domain, &ticks, &what);
            // The snapshot taken on a restored QEMU restores in turn, the other way.
            let ticks = if memory_mode == "background" {
                // Consistent at its start.
                TicksAround {
                    after: ticks.before,
                    ..ticks
                }
            } else {
                ticks
            };
            revert_and_check(&cli, &domain, &snapshot, &ticks, !eager);
            cli.ok(&["snapshot", "verify", &domain.name, &snapshot]);
        }
    }

    // Reverts right after reverts, both kinds, then a background create on that QEMU.
    revert_and_check(&cli, &domain, "base", &base, false);
    revert_and_check(&cli, &domain, "base", &base, false);
    revert_and_check(&cli, &domain, "base", &base, true);
    let (ticks, report) = create(&cli, &domain, "last", &["--live", "--live-mode", "background"]);
    assert_eq!(report["memory_mode"], "background", "{report}");
    assert_runs_on(&cli, &domain, &ticks, "background create after three reverts");
    cli.ok(&["domain", "stop", &domain.name, "--force"]);
}
