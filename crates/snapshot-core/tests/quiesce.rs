//! Quiesced creates (`CreateOptions::quiesce`) against the simulated hypervisor: the guest's
//! filesystems are frozen before the domain is paused and thawed as soon as it runs again, in
//! every create mode; they are thawed on every failure path, by recovery after a crash, and by a
//! revert to a quiesced snapshot (whose memory holds frozen filesystems).

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod sim;

use sim::*;
use snapshot_core::{ErrorClass, ThawOutcome};

fn quiesced(memory: MemoryMode) -> CreateOptions {
    CreateOptions {
        memory,
        disks: mixed_disks(),
        description: None,
        memory_path: None,
        quiesce: true,
    }
}

fn live(method: LiveMethod) -> MemoryMode {
    MemoryMode::Live(LiveOptions {
        method,
        ..LiveOptions::default()
    })
}

/// Where `call` first appears in `calls`.
fn at(calls: &[&'static str], call: &str) -> usize {
    calls
        .iter()
        .position(|c| *c == call)
        .unwrap_or_else(|| panic!("no {call} in {calls:?}"))
}

#[tokio::test]
async fn every_create_mode_freezes_before_the_pause_and_thaws_after_the_resume() {
    let modes = [
        ("paused", MemoryMode::Paused, false),
        ("engine pre-copy", live(LiveMethod::Precopy), false),
        ("streamed pre-copy", live(LiveMethod::Precopy), true),
        ("background", live(LiveMethod::Background), true),
        ("disks only", MemoryMode::DisksOnly, false),
    ];
    for (what, memory, streams) in modes {
        let f = fixture(DomainState::Running);
        f.sim.lock().unwrap().streams = streams;
        let disks_only = matches!(memory, MemoryMode::DisksOnly);
        let report = f
            .orchestrator
            .create(&f.domain, &name("q"), quiesced(memory))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(report.record.quiesced, "{what}");
        let calls = f.calls();
        let (freeze, thaw) = (at(&calls, "freeze"), at(&calls, "thaw"));
        let disks = at(&calls, "create_internal");
        assert!(freeze < disks && disks < thaw, "{what}: {calls:?}");
        if !disks_only {
            // A streamed pre-copy is paused and resumed by the hypervisor itself (its capture).
            let position = |call| calls.iter().position(|c| *c == call);
            let resume = position("resume").or(position("hypervisor_resume"));
            assert!(
                position("pause").is_none_or(|pause| freeze < pause),
                "{what}: {calls:?}"
            );
            assert!(resume.is_some_and(|resume| resume < thaw), "{what}: {calls:?}");
        }
        assert_eq!(
            calls.iter().filter(|c| **c == "thaw").count(),
            1,
            "{what}: {calls:?}"
        );
        let sim = f.sim();
        assert!(!sim.frozen, "{what}: left frozen");
        assert_eq!(sim.state, DomainState::Running, "{what}");
    }
}

#[tokio::test]
async fn a_failure_at_any_step_thaws_the_guest_and_leaves_it_running() {
    for step in [
        "freeze",
        "pause",
        "save_device_state",
        "create_internal",
        "resume",
    ] {
        let f = fixture(DomainState::Running);
        f.fail_at(step);
        let err = f
            .orchestrator
            .create(&f.domain, &name("q"), quiesced(MemoryMode::Paused))
            .await
            .unwrap_err();
        let rolled_back = match step {
            "resume" => ErrorClass::FailedIncompleteRollback,
            _ => ErrorClass::FailedRolledBack,
        };
        assert_eq!(err.class(), rolled_back, "{step}: {err}");
        let sim = f.sim();
        // A failed resume cannot be undone (the injected failure stays), everything else is.
        if step != "resume" {
            assert!(!sim.frozen, "{step}: left frozen: {:?}", sim.calls);
            assert_eq!(sim.state, DomainState::Running, "{step}");
            assert!(f.store.intent(&f.domain).unwrap().is_none(), "{step}: {err}");
        }
        if step == "resume" {
            // Still paused: the agent cannot answer, so no thaw is tried; recover does it.
            assert!(!sim.calls.contains(&"thaw"), "{:?}", sim.calls);
            assert!(err.to_string().contains("filesystems stay frozen"), "{err}");
            f.sim.lock().unwrap().fail = None;
            f.orchestrator.recover(&f.domain).await.unwrap();
            assert!(!f.sim().frozen && f.sim().state == DomainState::Running);
        } else {
            assert!(sim.calls.contains(&"thaw"), "{step}: {:?}", sim.calls);
        }
        assert!(f.store.get(&f.domain, &name("q")).is_err(), "{step}");
    }
}

#[tokio::test]
async fn a_failed_thaw_fails_the_create_and_the_rollback_says_the_guest_is_frozen() {
    let f = fixture(DomainState::Running);
    f.fail_at("thaw");
    let err = f
        .orchestrator
        .create(&f.domain, &name("q"), quiesced(MemoryMode::Paused))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("thawing the guest's filesystems"), "{err}");
    assert!(err.contains("cannot thaw the guest's filesystems"), "{err}");
    assert!(
        f.store.intent(&f.domain).unwrap().is_some(),
        "the intent stays for recover"
    );

    // Once the agent answers again, recovery thaws the guest and undoes the create.
    f.sim.lock().unwrap().fail = None;
    f.orchestrator.recover(&f.domain).await.unwrap();
    let sim = f.sim();
    assert!(!sim.frozen && sim.state == DomainState::Running);
    assert!(f.store.get(&f.domain, &name("q")).is_err());
}

#[tokio::test]
async fn only_a_running_domain_can_be_quiesced() {
    for state in [DomainState::Paused, DomainState::ShutOff] {
        let f = fixture(state);
        let err = f
            .orchestrator
            .create(&f.domain, &name("q"), quiesced(MemoryMode::Paused))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::InvalidArgument, "{state}: {err}");
        assert!(err.to_string().contains("needs a running guest"), "{err}");
        assert!(!f.calls().contains(&"freeze"), "{state}");
        assert!(f.store.intent(&f.domain).unwrap().is_none());
    }
}

#[tokio::test]
async fn a_domain_without_a_guest_agent_is_refused_before_anything_changes() {
    let f = fixture(DomainState::Running);
    f.sim.lock().unwrap().no_agent = true;
    let err = f
        .orchestrator
        .create(&f.domain, &name("q"), quiesced(MemoryMode::Paused))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unsupported, "{err}");
    assert!(err.to_string().contains("guest_agent = true"), "{err}");
    assert!(!f.calls().contains(&"freeze") && !f.calls().contains(&"pause"));
    assert!(f.store.intent(&f.domain).unwrap().is_none());
}

#[tokio::test]
async fn recovery_after_a_crash_while_frozen_thaws_the_guest() {
    let f = fixture(DomainState::Running);
    {
        let mut sim = f.sim.lock().unwrap();
        sim.frozen = true;
        sim.state = DomainState::Paused;
    }
    f.store.prepare(&f.domain, &name("q")).unwrap();
    f.store
        .set_intent(
            &f.domain,
            &Intent::Create {
                snapshot: name("q"),
                was: DomainState::Running,
                disks: Vec::new(),
                memory_path: None,
                quiesce: true,
            },
        )
        .unwrap();
    let recovery = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
    assert_eq!(recovery.outcome, RecoveryOutcome::Undone);
    let sim = f.sim();
    assert!(!sim.frozen, "{:?}", sim.calls);
    assert_eq!(sim.state, DomainState::Running);
    let (resume, thaw) = (at(&sim.calls, "resume"), at(&sim.calls, "thaw"));
    assert!(
        resume < thaw,
        "the agent answers only once the guest runs: {:?}",
        sim.calls
    );
}

#[tokio::test]
async fn abandoning_an_interrupted_quiesced_create_says_the_guest_may_be_frozen() {
    let f = fixture(DomainState::Running);
    let intent = Intent::Create {
        snapshot: name("q"),
        was: DomainState::Running,
        disks: Vec::new(),
        memory_path: None,
        quiesce: true,
    };
    f.store.set_intent(&f.domain, &intent).unwrap();
    let abandoned = f.orchestrator.abandon(&f.domain).await.unwrap().unwrap();
    let left = abandoned.left_behind.join("; ");
    assert!(left.contains("frozen"), "{left}");
}

#[tokio::test]
async fn a_revert_to_a_quiesced_snapshot_thaws_the_restored_guest() {
    let f = fixture(DomainState::Running);
    f.orchestrator
        .create(&f.domain, &name("q"), quiesced(MemoryMode::Paused))
        .await
        .unwrap();

    // The restored guest's memory holds frozen filesystems.
    let q = name("q");
    let revert = |options| {
        f.sim.lock().unwrap().frozen = true;
        f.orchestrator.revert(&f.domain, &q, options)
    };
    let report = revert(RevertOptions::default()).await.unwrap();
    assert_eq!(report.thaw, Some(ThawOutcome::Thawed { filesystems: 2 }));
    assert!(!f.sim().frozen);

    // Paused: the agent cannot answer; the report says the thaw is left to do.
    let report = revert(PAUSED).await.unwrap();
    assert_eq!(report.thaw, Some(ThawOutcome::Pending));
    assert!(f.sim().frozen);

    // A failed thaw does not undo the complete revert; the report says why.
    f.fail_at("thaw");
    let report = revert(RevertOptions::default()).await.unwrap();
    let Some(ThawOutcome::Failed { error }) = report.thaw else {
        panic!("{:?}", report.thaw);
    };
    assert!(error.contains("injected failure in thaw"), "{error}");
    assert_eq!(f.sim().state, DomainState::Running);
    let json = serde_json::to_value(ThawOutcome::Thawed { filesystems: 1 }).unwrap();
    assert_eq!(json, serde_json::json!({"outcome": "thawed", "filesystems": 1}));
}

#[tokio::test]
async fn a_snapshot_that_was_not_quiesced_is_reverted_without_the_agent() {
    let f = fixture(DomainState::Running);
    f.create("plain", false).await.unwrap();
    let report = f
        .orchestrator
        .revert(&f.domain, &name("plain"), RevertOptions::default())
        .await
        .unwrap();
    assert_eq!(report.thaw, None);
    assert!(!f.calls().contains(&"thaw") && !f.calls().contains(&"freeze"));
}
