//! Reverts whose new process starts beside the running one (`Hypervisor::start_standby`).

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod sim;

use sim::*;

/// A running domain with snapshot `s1` (vda internal, vdb external), on a hypervisor that can
/// start standby processes.
async fn standby_fixture() -> Fixture {
    let f = fixture(DomainState::Running);
    f.sim.lock().unwrap().standby_capable = true;
    f.create("s1", false).await.unwrap();
    f
}

/// The calls of the last revert that matter to the order of its steps.
fn revert_calls(f: &Fixture) -> Vec<&'static str> {
    f.calls()
        .into_iter()
        .filter(|c| {
            [
                "start_standby",
                "discard_standby",
                "destroy",
                "revert_external",
                "apply_internal",
                "define",
                "start_incoming",
                "promote_standby",
                "guest_memory",
                "standby_guest_memory",
                "load_standby_device_state",
                "load_device_state",
                "resume",
            ]
            .contains(c)
        })
        .collect()
}

#[tokio::test]
async fn the_new_process_starts_beside_the_running_one_and_takes_over_after_the_disks() {
    for (options, copied) in [(RevertOptions::default(), false), (EAGER, true)] {
        let f = standby_fixture().await;
        f.fail_at("nothing");
        let report = f
            .orchestrator
            .revert(&f.domain, &name("s1"), options)
            .await
            .unwrap();
        let mut expected = vec![
            // The overlay first: the standby opens it.
            "revert_external",
            "start_standby",
        ];
        if copied {
            // Into the standby's RAM while the old process still runs.
            expected.push("standby_guest_memory");
        }
        expected.extend([
            // Before the stop: a state that does not load leaves the domain running.
            "load_standby_device_state",
            "destroy",
            "apply_internal",
            "define",
            "promote_standby",
            "resume",
        ]);
        assert_eq!(revert_calls(&f), expected, "eager: {copied}");
        assert!(report.standby && report.standby_unavailable.is_none());
        assert_eq!(report.state, DomainState::Running);
        let downtime = report.downtime_ms.unwrap();
        assert!(downtime > 0.0 && downtime <= report.total_ms, "{downtime}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["standby"], true, "{json}");
        // vdb writes to the overlay the standby was started on; nothing else is left.
        let sim = f.sim();
        assert!(sim.disks[1].image.to_string_lossy().contains(".revert-"));
        assert!(sim.standby.is_none());
        assert!(f.store.intent(&f.domain).unwrap().is_none());
    }
}

#[tokio::test]
async fn a_standby_that_fails_to_start_or_to_load_leaves_the_domain_running_as_it_was() {
    for (call, step) in [
        ("start_standby", Step::StartStandby),
        ("load_standby_device_state", Step::LoadDeviceState),
    ] {
        let f = standby_fixture().await;
        f.fail_at(call);
        assert_failed_before_the_stop(&f, step, call).await;
    }
}

#[tokio::test]
async fn a_snapshot_that_fails_its_check_while_the_standby_starts_leaves_the_domain_running() {
    let f = standby_fixture().await;
    let image = f.store.files(&f.domain, &name("s1")).memory_image;
    // The image's footer: its checksums no longer match.
    damage(&image, -30);
    f.fail_at("nothing");
    assert_failed_before_the_stop(&f, Step::Check, "check").await;
    // The check ran beside the standby's start; the standby it started is ended.
    let calls = f.calls();
    assert!(calls.contains(&"start_standby"), "{calls:?}");
    assert!(calls.contains(&"discard_standby"), "{calls:?}");
}

/// Reverts `f`'s domain to `s1`, something set up to go wrong before the stop (`what`), and
/// checks that the revert failed at `step` and left the domain running as it was.
async fn assert_failed_before_the_stop(f: &Fixture, step: Step, what: &str) {
    let disks_before = f.sim().disks;
    let overlays_before = f.store.overlays(&f.domain).unwrap();
    let err = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Failed { step: failed, .. } if failed == step),
        "{what}: {err}"
    );
    assert!(!err.to_string().contains("shut off"), "{what}: {err}");
    let calls = f.calls();
    assert!(
        !calls.contains(&"destroy") && !calls.contains(&"define"),
        "{what}: {calls:?}"
    );
    let sim = f.sim();
    assert_eq!(sim.state, DomainState::Running, "{what}");
    assert!(sim.standby.is_none(), "{what}: the standby was left");
    assert_eq!(sim.disks, disks_before, "{what}");
    assert!(sim.applied.is_empty(), "{what}");
    assert!(f.store.intent(&f.domain).unwrap().is_none(), "{what}");
    assert_eq!(f.store.overlays(&f.domain).unwrap(), overlays_before, "{what}");
    assert!(
        f.stray_files()
            .iter()
            .all(|p| !p.to_string_lossy().contains(".revert-")),
        "{what}: {:?}",
        f.stray_files()
    );
}

#[tokio::test]
async fn an_eager_revert_copies_into_the_standby_and_a_damaged_page_stops_it_before_the_domain() {
    let f = standby_fixture().await;
    f.damage_a_page("s1");
    f.fail_at("nothing");
    let err = f
        .orchestrator
        .revert(&f.domain, &name("s1"), EAGER)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Failed {
                step: Step::RestoreMemory,
                ..
            }
        ),
        "{err}"
    );
    // No separate check of every page ran first: the copy found it, before the stop.
    let calls = f.calls();
    assert!(calls.contains(&"standby_guest_memory"), "{calls:?}");
    assert!(!calls.contains(&"destroy"), "{calls:?}");
    let sim = f.sim();
    assert_eq!(sim.state, DomainState::Running);
    assert!(sim.standby.is_none());
    assert!(f.store.intent(&f.domain).unwrap().is_none());
}

#[tokio::test]
async fn a_failure_after_the_switch_began_ends_the_standby_and_restores_the_configuration() {
    for call in ["destroy", "apply_internal", "define", "promote_standby", "resume"] {
        let f = standby_fixture().await;
        let disks_before = f.sim().disks;
        f.fail_at(call);
        let err = f
            .orchestrator
            .revert(&f.domain, &name("s1"), RevertOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{call}: {err}");
        let sim = f.sim();
        assert!(sim.standby.is_none(), "{call}: the standby was left");
        assert!(f.calls().contains(&"discard_standby"), "{call}");
        assert_eq!(sim.disks, disks_before, "{call}");
        if call == "destroy" {
            assert_eq!(sim.state, DomainState::Running, "{call}");
        } else {
            assert_eq!(sim.state, DomainState::ShutOff, "{call}");
        }
        // A define that fails cannot restore the configuration either: the intent stays for
        // `recover` (as without a standby).
        assert_eq!(
            f.store.intent(&f.domain).unwrap().is_some(),
            call == "define",
            "{call}"
        );
    }
}

#[tokio::test]
async fn without_a_standby_the_report_says_why_and_the_new_process_starts_after_the_stop() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    f.fail_at("nothing");
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    assert!(!report.standby);
    assert!(
        report
            .standby_unavailable
            .as_deref()
            .is_some_and(|r| r.contains("network card")),
        "{report:?}"
    );
    // The overlay made for the standby, before it turned out unavailable, is the one used.
    let calls = revert_calls(&f);
    assert_eq!(calls[..2], ["revert_external", "start_standby"], "{calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == "revert_external").count(), 1);
    let stop = calls.iter().position(|c| *c == "destroy").unwrap();
    assert_eq!(
        calls[stop..],
        [
            "destroy",
            "discard_standby",
            "apply_internal",
            "define",
            "start_incoming",
            "load_device_state",
            "resume"
        ]
    );
    assert!(report.downtime_ms.is_some());

    // A shut-off domain has no process to keep: nothing is asked of a standby.
    f.orchestrator
        .revert(&f.domain, &name("s1"), PAUSED)
        .await
        .unwrap();
    f.sim.lock().unwrap().state = DomainState::ShutOff;
    f.fail_at("nothing");
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    assert!(!f.calls().contains(&"start_standby"));
    assert_eq!(report.standby_unavailable, None);
}

#[tokio::test]
async fn recovery_of_a_revert_ends_a_standby_the_crash_left() {
    let f = standby_fixture().await;
    // What a revert killed after starting its standby leaves: the intent and the standby.
    interrupted_revert(&f, false);
    f.sim.lock().unwrap().standby = Some(IncomingStart::Mapped);
    f.fail_at("nothing");
    let recovered = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
    assert_eq!(recovered.outcome, RecoveryOutcome::Finished);
    let calls = revert_calls(&f);
    assert_eq!(calls[..2], ["destroy", "discard_standby"], "{calls:?}");
    assert!(calls.contains(&"start_incoming"));
    let sim = f.sim();
    assert!(sim.standby.is_none());
    assert_eq!(sim.state, DomainState::Running);
}

#[tokio::test]
async fn recovery_checks_the_snapshot_again_before_it_finishes_a_revert() {
    // A revert killed while it checked the snapshot, whose image is damaged: in its metadata,
    // or (for an eager one, which recovery copies after the stop) in a page.
    for eager in [false, true] {
        let f = standby_fixture().await;
        interrupted_revert(&f, eager);
        if eager {
            f.damage_a_page("s1");
        } else {
            let image = f.store.files(&f.domain, &name("s1")).memory_image;
            damage(&image, -30);
        }
        f.fail_at("nothing");
        let err = f.orchestrator.recover(&f.domain).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Failed {
                    step: Step::Check,
                    ..
                }
            ),
            "eager {eager}: {err}"
        );
        // Nothing was stopped; the intent stays for `recover --abandon`.
        assert!(!f.calls().contains(&"destroy"), "eager {eager}");
        assert_eq!(f.sim().state, DomainState::Running, "eager {eager}");
        assert!(f.store.intent(&f.domain).unwrap().is_some(), "eager {eager}");
    }
}

/// The intent record a revert of `f`'s domain to `s1` leaves when it is killed.
fn interrupted_revert(f: &Fixture, eager: bool) {
    let intent = Intent::Revert {
        snapshot: name("s1"),
        paused: false,
        eager,
        new_overlays: vec![f.dir.path().join("vdb.revert-1.qcow2")],
    };
    f.store.set_intent(&f.domain, &intent).unwrap();
}
