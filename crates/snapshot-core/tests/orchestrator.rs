//! The orchestrator's steps and rollbacks against a simulated hypervisor and disks (mockall
//! mocks over shared state) and the real on-disk store. A failure is injected at every step;
//! afterwards the domain must be as it was and nothing of the snapshot may remain.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod sim;

use sim::*;

#[tokio::test]
async fn create_saves_memory_devices_and_disks_and_resumes() {
    let f = fixture(DomainState::Running);
    let report = f.create("s1", true).await.unwrap();
    let record = &report.record;
    assert_eq!(record.state, DomainState::Running);
    assert_eq!(record.memory.as_ref().unwrap().ram_bytes, RAM);
    assert!(report.memory_rounds.last().unwrap().final_round);
    let sim = f.sim();
    assert_eq!(sim.state, DomainState::Running);
    assert!(sim
        .internal
        .contains(&(f.dir.path().join("vda.qcow2"), "s1".into())));
    let overlay = f.dir.path().join("vdb.s1.qcow2");
    assert_eq!(sim.disks[1].image, overlay);
    let files = f.store.files(&f.domain, &name("s1"));
    memory::verify(&files.memory_image).unwrap();
    assert!(files.device_state.exists());
    assert_eq!(f.store.current(&f.domain).unwrap(), Some(name("s1")));
    assert_eq!(f.store.overlays(&f.domain).unwrap(), vec![overlay]);
    assert!(f.store.intent(&f.domain).unwrap().is_none());
    // The domain was paused exactly once, for the final round.
    let calls = f.calls();
    assert_eq!(calls.iter().filter(|c| **c == "pause").count(), 1);
    assert_eq!(calls.iter().filter(|c| **c == "resume").count(), 1);
}

#[tokio::test]
async fn each_pause_is_prepared_while_the_guest_runs_and_counted_from_its_request() {
    let f = fixture(DomainState::Running);
    f.sim.lock().unwrap().pause_takes = Duration::from_millis(200);
    let report = f.create("s1", false).await.unwrap();
    // The guest stopped before the hypervisor answered.
    assert!(report.guest_pause_ms >= 200.0, "{}", report.guest_pause_ms);
    let calls = f.calls();
    let pause = calls.iter().position(|c| *c == "pause").unwrap();
    assert_eq!(calls[pause - 1], "prepare_pause", "{calls:?}");

    // A revert prepares the end of the domain's process the same way.
    f.orchestrator
        .revert(&f.domain, &name("s1"), EAGER)
        .await
        .unwrap();
    let calls = f.calls();
    let destroy = calls.iter().rposition(|c| *c == "destroy").unwrap();
    assert_eq!(calls[destroy - 1], "prepare_pause", "{calls:?}");

    // Best effort: a create whose preparation fails goes on.
    f.fail_at("prepare_pause");
    f.create("s2", false).await.unwrap();
    assert_eq!(f.sim().state, DomainState::Running);
}

#[tokio::test]
async fn a_running_domains_disk_only_create_is_prepared_and_a_shut_off_ones_is_not() {
    for (state, prepared) in [(DomainState::Running, true), (DomainState::ShutOff, false)] {
        let f = fixture(state);
        let options = CreateOptions {
            memory: MemoryMode::DisksOnly,
            disks: mixed_disks(),
            description: None,
            memory_path: None,
            quiesce: false,
        };
        f.orchestrator
            .create(&f.domain, &name("d"), options)
            .await
            .unwrap();
        let calls = f.calls();
        assert!(!calls.contains(&"pause"), "{state:?}: {calls:?}");
        let disks = calls.iter().position(|c| *c == "create_internal").unwrap();
        let preparation = calls.iter().position(|c| *c == "prepare_pause");
        match prepared {
            true => assert!(preparation.is_some_and(|p| p < disks), "{state:?}: {calls:?}"),
            false => assert_eq!(preparation, None, "{state:?}: {calls:?}"),
        }
        assert_eq!(f.sim().state, state);
    }
}

#[tokio::test]
async fn a_paused_domain_stays_paused_and_a_shut_off_one_gets_disks_only() {
    let f = fixture(DomainState::Paused);
    let report = f.create("p", false).await.unwrap();
    assert_eq!(report.guest_pause_ms, 0.0);
    assert!(!f.calls().contains(&"resume"));
    assert_eq!(f.sim.lock().unwrap().state, DomainState::Paused);

    let f = fixture(DomainState::ShutOff);
    let report = f.create("off", false).await.unwrap();
    assert!(report.record.memory.is_none());
    assert!(!f.calls().contains(&"guest_memory"));
    // Offline, the orchestrator records that the domain now writes to the overlay.
    assert!(f.calls().contains(&"define"));
    assert_eq!(
        f.sim.lock().unwrap().disks[1].image,
        f.dir.path().join("vdb.off.qcow2")
    );
}

#[tokio::test]
async fn a_failure_at_any_create_step_is_rolled_back() {
    for (call, step) in [
        // Mapped and reached while inspecting: the free-space and name checks need them.
        ("guest_memory", Step::Inspect),
        ("pause", Step::Pause),
        ("save_device_state", Step::SaveDeviceState),
        ("disk_backend", Step::Inspect),
        ("create_internal", Step::SnapshotDisks),
        ("create_external", Step::SnapshotDisks),
        ("resume", Step::Resume),
    ] {
        for live in [false, true] {
            let f = fixture(DomainState::Running);
            f.fail_at(call);
            let err = f.create("s1", live).await.unwrap_err();
            match &err {
                Error::Failed { step: failed, .. } => assert_eq!(*failed, step, "{call}: {err}"),
                other => panic!("{call}: unexpected error {other}"),
            }
            assert!(
                err.to_string().contains(&format!("injected failure in {call}")) || {
                    // The error names the step; the source chain names the call.
                    let source = std::error::Error::source(&err).unwrap().to_string();
                    source.contains(call)
                }
            );
            if call == "resume" {
                // The undo could not resume the domain either: the intent stays, and the next
                // recover (once resuming works again) finishes the undo.
                assert!(err.to_string().contains("intent record stays"), "{err}");
                assert!(f.store.intent(&f.domain).unwrap().is_some());
                f.sim.lock().unwrap().fail = None;
                let recovered = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
                assert_eq!(recovered.outcome, RecoveryOutcome::Undone);
            }
            let sim = f.sim();
            assert_eq!(
                sim.state,
                DomainState::Running,
                "{call}: domain left {:?}",
                sim.state
            );
            assert!(
                sim.internal.is_empty(),
                "{call}: internal snapshots left: {:?}",
                sim.internal
            );
            assert_eq!(
                sim.disks[1].image,
                f.dir.path().join("vdb.qcow2"),
                "{call}: overlay still active"
            );
            assert!(f.store.list(&f.domain).unwrap().is_empty(), "{call}");
            assert!(f.store.intent(&f.domain).unwrap().is_none(), "{call}");
            assert!(f.store.overlays(&f.domain).unwrap().is_empty(), "{call}");
            assert_eq!(
                f.stray_files(),
                Vec::<PathBuf>::new(),
                "{call}: files left behind"
            );
        }
    }
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    assert!(matches!(
        f.create("s1", false).await,
        Err(Error::SnapshotExists { .. })
    ));
    let unknown_disk = CreateOptions {
        disks: vec![DiskRequest {
            target: "vdz".into(),
            kind: DiskKind::Internal { name: None },
        }],
        ..CreateOptions::default()
    };
    let err = f
        .orchestrator
        .create(&f.domain, &name("s2"), unknown_disk)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no disk \"vdz\""), "{err}");
    let raw_overlay = CreateOptions {
        disks: vec![DiskRequest {
            target: "vda".into(),
            kind: DiskKind::External {
                path: Some("relative.qcow2".into()),
                format: Some("raw".into()),
            },
        }],
        ..CreateOptions::default()
    };
    let err = f
        .orchestrator
        .create(&f.domain, &name("s2"), raw_overlay)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not supported"), "{err}");
    assert_eq!(f.store.list(&f.domain).unwrap().len(), 1);
    assert!(matches!(
        f.orchestrator
            .revert(&f.domain, &name("nope"), RevertOptions::default())
            .await,
        Err(Error::SnapshotNotFound { .. })
    ));
}

#[tokio::test]
async fn delete_folds_unneeded_overlays_and_reparents_children() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    let internal_only = CreateOptions::default();
    f.orchestrator
        .create(&f.domain, &name("s2"), internal_only)
        .await
        .unwrap();
    assert_eq!(
        f.store.get(&f.domain, &name("s2")).unwrap().parent,
        Some(name("s1"))
    );

    // s2 read the overlay s1 made (as its image): s1's overlay stays.
    let report = f
        .orchestrator
        .delete(&f.domain, &name("s1"), false)
        .await
        .unwrap();
    assert_eq!(report.deleted, vec![name("s1")]);
    assert_eq!(f.store.get(&f.domain, &name("s2")).unwrap().parent, None);
    assert!(f.dir.path().join("vdb.s1.qcow2").exists());
    assert_eq!(f.store.current(&f.domain).unwrap(), Some(name("s2")));

    f.orchestrator
        .delete(&f.domain, &name("s2"), false)
        .await
        .unwrap();
    assert!(f.store.list(&f.domain).unwrap().is_empty());
    assert_eq!(f.store.current(&f.domain).unwrap(), None);
    assert!(f.sim.lock().unwrap().internal.is_empty());

    // With s2 gone, nothing reads s1's overlay: it is folded into the image and removed.
    assert!(f.store.overlays(&f.domain).unwrap().is_empty());
    assert!(!f.dir.path().join("vdb.s1.qcow2").exists());
    assert_eq!(f.sim().disks[1].image, f.dir.path().join("vdb.qcow2"));

    // A lone external snapshot: its overlay is committed back and removed.
    let f = fixture(DomainState::Running);
    f.create("s3", false).await.unwrap();
    f.orchestrator
        .delete(&f.domain, &name("s3"), false)
        .await
        .unwrap();
    assert!(!f.dir.path().join("vdb.s3.qcow2").exists());
    assert_eq!(
        f.sim.lock().unwrap().disks[1].image,
        f.dir.path().join("vdb.qcow2")
    );
    assert!(f.store.overlays(&f.domain).unwrap().is_empty());
}

#[tokio::test]
async fn delete_with_children_removes_the_subtree() {
    let f = fixture(DomainState::Running);
    for snapshot in ["a", "b", "c"] {
        f.orchestrator
            .create(&f.domain, &name(snapshot), CreateOptions::default())
            .await
            .unwrap();
    }
    let report = f.orchestrator.delete(&f.domain, &name("a"), true).await.unwrap();
    assert_eq!(report.deleted, vec![name("c"), name("b"), name("a")]);
    assert!(f.store.list(&f.domain).unwrap().is_empty());
    assert!(f.sim.lock().unwrap().internal.is_empty());
}

/// The calls of a revert that matter for its order, from the last `destroy` on.
fn revert_calls(f: &Fixture) -> Vec<&'static str> {
    let calls = f.calls();
    let from = calls.iter().rposition(|c| *c == "destroy").unwrap();
    calls[from..]
        .iter()
        .copied()
        .filter(|c| {
            [
                "destroy",
                "revert_external",
                "apply_internal",
                "define",
                "start_incoming",
                "mapped",
                "guest_memory",
                "load_device_state",
                "resume",
            ]
            .contains(c)
        })
        .collect()
}

#[tokio::test]
async fn revert_restores_memory_disks_and_configuration() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    assert_eq!(report.state, DomainState::Running);
    // Lazy by default: the hypervisor maps the image, nothing is copied.
    assert_eq!(report.memory_load, MemoryLoad::Mapped);
    assert_eq!((report.memory_fallback.as_deref(), report.memory_ms), (None, 0.0));
    // The external disk's fresh overlay was made before the stop, for a standby that this
    // domain cannot have.
    assert_eq!(
        revert_calls(&f),
        [
            "destroy",
            "apply_internal",
            "define",
            "start_incoming",
            "mapped",
            "load_device_state",
            "resume"
        ]
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["memory_load"], "mapped", "{json}");
    // vdb now writes to a fresh overlay on the snapshot's image; the replaced overlay went.
    let sim = f.sim();
    let revert_overlay = &sim.disks[1].image;
    assert!(
        revert_overlay.to_string_lossy().contains(".revert-"),
        "{revert_overlay:?}"
    );
    assert!(!f.dir.path().join("vdb.s1.qcow2").exists());
    assert_eq!(f.store.current(&f.domain).unwrap(), Some(name("s1")));

    // Paused revert.
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), PAUSED)
        .await
        .unwrap();
    assert_eq!(report.state, DomainState::Paused);

    // Eager: fresh RAM, the image copied into it.
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), EAGER)
        .await
        .unwrap();
    assert_eq!(report.state, DomainState::Running);
    assert_eq!(report.memory_load, MemoryLoad::Copied);
    assert_eq!(report.memory_fallback, None);
    assert_eq!(
        revert_calls(&f),
        [
            "destroy",
            "apply_internal",
            "define",
            "start_incoming",
            "guest_memory",
            "load_device_state",
            "resume"
        ]
    );
    assert_eq!(serde_json::to_value(&report).unwrap()["memory_load"], "copied");
}

#[tokio::test]
async fn an_image_the_hypervisor_cannot_map_is_copied_and_the_report_says_why() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    f.sim.lock().unwrap().cannot_map = true;
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    assert_eq!(report.memory_load, MemoryLoad::Copied);
    let fallback = report.memory_fallback.as_deref().unwrap();
    assert!(fallback.contains("another filesystem"), "{fallback}");
    assert!(revert_calls(&f).contains(&"guest_memory"));
    assert_eq!(f.sim().state, DomainState::Running);
}

/// Damages byte `offset` of a file (a negative offset counts from its end).

#[tokio::test]
async fn a_memory_image_with_damaged_metadata_is_refused_before_the_domain_is_touched() {
    // Page table entry, page table checksum in the footer, header: each is refused by both
    // kinds of revert without touching the domain.
    for (offset, options) in [
        (-60, RevertOptions::default()),
        (-30, EAGER),
        (20, RevertOptions::default()),
    ] {
        let f = fixture(DomainState::Running);
        f.create("s1", false).await.unwrap();
        let image = f.store.files(&f.domain, &name("s1")).memory_image;
        damage(&image, offset);
        f.fail_at("nothing");
        let err = f
            .orchestrator
            .revert(&f.domain, &name("s1"), options)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Failed {
                    step: Step::Check,
                    ..
                }
            ),
            "{offset}: {err}"
        );
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("memory image"), "{offset}: {source}");
        assert!(!f.calls().contains(&"destroy"), "{offset}");
        assert_eq!(f.sim.lock().unwrap().state, DomainState::Running);
        let report = f.orchestrator.verify(&f.domain, &name("s1")).await.unwrap();
        assert!(
            report.problems.iter().any(|p| p.contains("memory image")),
            "{:?}",
            report.problems
        );
    }
}

#[tokio::test]
async fn an_image_of_another_size_is_refused_before_the_domain_is_touched() {
    let f = fixture(DomainState::Running);
    let mut record = f.create("s1", false).await.unwrap().record;
    record.memory.as_mut().unwrap().ram_bytes = 2 * RAM;
    f.store.commit(&record).unwrap();
    f.fail_at("nothing");
    let err = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap_err();
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        source.contains(&format!(
            "holds {RAM} bytes of RAM, but the snapshot's domain had {}",
            2 * RAM
        )),
        "{source}"
    );
    assert!(!f.calls().contains(&"destroy"));
}

#[tokio::test]
async fn damaged_pages_are_left_to_verify_by_a_lazy_revert_and_refused_by_an_eager_one() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    f.damage_a_page("s1");

    // Lazy: only the metadata is read before the start; `verify` finds the page.
    let report = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    assert_eq!(report.memory_load, MemoryLoad::Mapped);
    let verified = f.orchestrator.verify(&f.domain, &name("s1")).await.unwrap();
    assert!(
        verified.problems.iter().any(|p| p.contains("page 1")),
        "{:?}",
        verified.problems
    );

    // Eager: every page is checked before the domain is touched; the damaged one is refused and
    // the domain runs on as it was.
    let state_before = f.sim().state;
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
                step: Step::Check,
                ..
            }
        ),
        "{err}"
    );
    let cause = std::error::Error::source(&err)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(cause.contains("page 1"), "{err}: {cause}");
    assert!(!f.calls().contains(&"destroy"));
    assert_eq!(f.sim().state, state_before);
    assert!(f.store.intent(&f.domain).unwrap().is_none());
}

#[tokio::test]
async fn deleting_a_snapshot_whose_image_a_domain_maps_says_the_data_stays() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    f.create("s2", false).await.unwrap();
    // What a driver's lazy revert leaves: its own link of the image.
    let image = f.store.files(&f.domain, &name("s1")).memory_image;
    let link = f.dir.path().join("ram-base.img");
    std::fs::hard_link(&image, &link).unwrap();
    let before = std::fs::read(&image).unwrap();

    let report = f
        .orchestrator
        .delete(&f.domain, &name("s1"), false)
        .await
        .unwrap();
    assert_eq!(report.memory_in_use, [name("s1")]);
    assert!(!image.exists());
    assert_eq!(std::fs::read(&link).unwrap(), before);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["memory_in_use"], serde_json::json!(["s1"]), "{json}");

    // Once the link is gone (the domain stopped), nothing is reported.
    std::fs::remove_file(&link).unwrap();
    let report = f
        .orchestrator
        .delete(&f.domain, &name("s2"), false)
        .await
        .unwrap();
    assert!(report.memory_in_use.is_empty());
}

#[tokio::test]
async fn a_failure_during_revert_removes_new_overlays_and_restores_the_configuration() {
    for call in [
        "destroy",
        "revert_external",
        "apply_internal",
        "define",
        "start_incoming",
        "load_device_state",
    ] {
        let f = fixture(DomainState::Running);
        f.create("s1", false).await.unwrap();
        let before = f.sim.lock().unwrap().disks.clone();
        // No current snapshot before (its snapshot deleted, say): a failed revert leaves none.
        f.store.set_current(&f.domain, None).unwrap();
        f.fail_at(call);
        let err = f
            .orchestrator
            .revert(&f.domain, &name("s1"), RevertOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{call}: {err}");
        let sim = f.sim();
        assert_eq!(sim.disks, before, "{call}");
        // The revert overlays are made before the domain is stopped (a standby would open them).
        if call == "destroy" || call == "revert_external" {
            assert_eq!(sim.state, DomainState::Running, "{call}");
        } else {
            assert_eq!(sim.state, DomainState::ShutOff, "{call}");
            assert!(err.to_string().contains("shut off"), "{call}: {err}");
        }
        if call == "define" {
            // The undo could not restore the configuration either: the intent stays, and the next
            // recover runs the revert again, to its end.
            assert!(err.to_string().contains("intent record stays"), "{err}");
            assert!(f.store.intent(&f.domain).unwrap().is_some());
            f.sim.lock().unwrap().fail = None;
            let recovered = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
            assert_eq!(recovered.outcome, RecoveryOutcome::Finished);
            assert_eq!(f.sim().state, DomainState::Running);
            assert!(f.store.intent(&f.domain).unwrap().is_none());
            assert_eq!(f.store.current(&f.domain).unwrap(), Some(name("s1")));
            continue;
        }
        assert!(f.store.intent(&f.domain).unwrap().is_none());
        assert_eq!(f.store.current(&f.domain).unwrap(), None, "{call}");
        let overlays = f.store.overlays(&f.domain).unwrap();
        assert_eq!(overlays, vec![f.dir.path().join("vdb.s1.qcow2")], "{call}");
        assert!(
            f.stray_files()
                .iter()
                .all(|p| !p.to_string_lossy().contains(".revert-")),
            "{call}"
        );
    }
}

#[tokio::test]
async fn recover_undoes_an_unfinished_create_and_resumes_the_domain() {
    let f = fixture(DomainState::Running);
    // What a create killed after its disk step leaves: intent, folder, internal snapshot,
    // active overlay, paused domain.
    let image = f.dir.path().join("vda.qcow2");
    let overlay = f.dir.path().join("vdb.s1.qcow2");
    let disks = vec![
        snapshot_core::DiskRecord {
            target: "vda".into(),
            image: image.clone(),
            snapshot: snapshot_core::DiskSnapshot::Internal { name: "s1".into() },
        },
        snapshot_core::DiskRecord {
            target: "vdb".into(),
            image: f.dir.path().join("vdb.qcow2"),
            snapshot: snapshot_core::DiskSnapshot::External {
                overlay: overlay.clone(),
                format: "qcow2".into(),
            },
        },
    ];
    f.store
        .set_intent(
            &f.domain,
            &Intent::Create {
                snapshot: name("s1"),
                was: DomainState::Running,
                disks,
                memory_path: None,
                quiesce: false,
            },
        )
        .unwrap();
    f.store
        .set_overlays(&f.domain, std::slice::from_ref(&overlay))
        .unwrap();
    let files = f.store.prepare(&f.domain, &name("s1")).unwrap();
    std::fs::write(&files.device_state, b"half").unwrap();
    disk::offline::create_external(&[disk::ExternalSnapshot {
        disk: f.dir.path().join("vdb.qcow2"),
        overlay: overlay.clone(),
        backing_path: disk::BackingPath::Absolute,
    }])
    .unwrap();
    {
        let mut sim = f.sim.lock().unwrap();
        sim.internal.insert((image, "s1".into()));
        sim.disks[1].image = overlay.clone();
        sim.state = DomainState::Paused;
    }
    // And the temporary of an overlay the kill came in the middle of.
    std::mem::forget(durable::TempFile::create(&overlay).unwrap());
    let recovered = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
    assert_eq!(recovered.outcome, RecoveryOutcome::Undone);
    let sim = f.sim();
    assert_eq!(sim.state, DomainState::Running);
    assert!(sim.internal.is_empty());
    assert_eq!(sim.disks[1].image, f.dir.path().join("vdb.qcow2"));
    assert!(!overlay.exists());
    assert!(f.store.intent(&f.domain).unwrap().is_none());
    assert_eq!(f.stray_files(), Vec::<PathBuf>::new());
    // Nothing left to recover.
    assert!(f.orchestrator.recover(&f.domain).await.unwrap().is_none());
}

/// A command killed in the middle of a write leaves a temporary (never under the final name);
/// the next command's recovery removes it, whether or not an operation was interrupted.
#[tokio::test]
async fn recovery_removes_the_temporaries_a_killed_command_left() {
    let f = fixture(DomainState::Running);
    let report = f.create("s1", false).await.unwrap();
    let domain_dir = f.store.state_dir().domain(&f.domain).path().to_owned();
    let files = f.store.files(&f.domain, &report.record.name);
    let before = f.stray_files().len();
    for dest in [
        domain_dir.join("current"),
        files.memory_image,
        files.dir.join("meta.json"),
    ] {
        std::mem::forget(durable::TempFile::create(&dest).unwrap());
    }
    assert_eq!(f.stray_files().len(), before + 3, "{:?}", f.stray_files());
    assert!(f.orchestrator.recover(&f.domain).await.unwrap().is_none());
    let mut left = f.stray_files();
    left.retain(|p| p.to_string_lossy().contains(".partial-"));
    assert_eq!(left, Vec::<PathBuf>::new());
    assert_eq!(f.store.list(&f.domain).unwrap().len(), 1);
    assert_eq!(f.store.current(&f.domain).unwrap(), Some(name("s1")));
}

#[tokio::test]
async fn recover_finishes_a_committed_create_and_an_interrupted_delete() {
    let f = fixture(DomainState::Running);
    let report = f.create("s1", false).await.unwrap();
    // Killed after the commit, before the tidy-up: intent still there, domain still paused.
    f.store
        .set_intent(
            &f.domain,
            &Intent::Create {
                snapshot: name("s1"),
                was: DomainState::Running,
                disks: report.record.disks.clone(),
                memory_path: None,
                quiesce: false,
            },
        )
        .unwrap();
    f.sim.lock().unwrap().state = DomainState::Paused;
    let recovered = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
    assert_eq!(recovered.outcome, RecoveryOutcome::Finished);
    assert_eq!(f.sim.lock().unwrap().state, DomainState::Running);
    assert_eq!(f.store.list(&f.domain).unwrap().len(), 1);

    // A delete killed after removing the record: recovery finishes it from the intent.
    f.store
        .set_intent(
            &f.domain,
            &Intent::Delete {
                record: Box::new(report.record.clone()),
            },
        )
        .unwrap();
    f.store.remove(&f.domain, &name("s1")).unwrap();
    let recovered = f.orchestrator.recover(&f.domain).await.unwrap().unwrap();
    assert_eq!(recovered.outcome, RecoveryOutcome::Finished);
    assert!(f.sim.lock().unwrap().internal.is_empty());
    assert!(!f.dir.path().join("vdb.s1.qcow2").exists());
    assert_eq!(f.stray_files(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn branches_keep_what_they_read_and_deleting_everything_leaves_no_overlay() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    f.orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    let branch = f.sim().disks[1].image.clone();
    f.create("s2", false).await.unwrap();
    assert_eq!(
        f.store.get(&f.domain, &name("s2")).unwrap().parent,
        Some(name("s1"))
    );

    // s2's snapshot is the revert's overlay: deleting s1 keeps it.
    f.orchestrator
        .delete(&f.domain, &name("s1"), false)
        .await
        .unwrap();
    assert!(branch.exists());
    f.orchestrator
        .delete(&f.domain, &name("s2"), false)
        .await
        .unwrap();
    assert!(!branch.exists());
    assert_eq!(f.sim().disks[1].image, f.dir.path().join("vdb.qcow2"));
    assert!(f.store.overlays(&f.domain).unwrap().is_empty());
    assert_eq!(f.stray_files(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn a_background_create_pauses_for_disks_and_capture_and_is_consistent_at_the_start() {
    let f = fixture(DomainState::Running);
    let options = CreateOptions {
        memory: MemoryMode::Live(LiveOptions {
            method: LiveMethod::Background,
            ..LiveOptions::default()
        }),
        disks: mixed_disks(),
        description: None,
        memory_path: None,
        quiesce: false,
    };
    let report = f
        .orchestrator
        .create(&f.domain, &name("bg"), options.clone())
        .await
        .unwrap();
    assert_eq!(report.memory_mode, SavedMemory::Background);
    assert_eq!(serde_json::to_value(report.memory_mode).unwrap(), "background");
    let memory = report.record.memory.as_ref().unwrap();
    assert_eq!(memory.consistency, snapshot_core::Consistency::Start);
    assert!(report.streamed.is_some());
    // Pause, then the disks, then the capture, then the resume.
    let calls: Vec<&str> = f
        .calls()
        .into_iter()
        .filter(|c| ["pause", "create_internal", "create_external", "stream", "resume"].contains(c))
        .collect();
    assert_eq!(
        calls,
        ["pause", "create_internal", "create_external", "stream", "resume"]
    );
    assert_eq!(f.sim().state, DomainState::Running);
    f.orchestrator
        .revert(&f.domain, &name("bg"), RevertOptions::default())
        .await
        .unwrap();

    // A save failing before or after the capture is rolled back; the domain runs on.
    for failure in ["stream_before_capture", "stream"] {
        let f = fixture(DomainState::Running);
        f.fail_at(failure);
        let err = f
            .orchestrator
            .create(&f.domain, &name("bg"), options.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Failed {
                    step: Step::SaveMemory,
                    ..
                }
            ),
            "{failure}: {err}"
        );
        let sim = f.sim();
        assert_eq!(sim.state, DomainState::Running, "{failure}");
        assert!(sim.internal.is_empty(), "{failure}");
        assert_eq!(sim.disks[1].image, f.dir.path().join("vdb.qcow2"), "{failure}");
        assert_eq!(f.stray_files(), Vec::<PathBuf>::new(), "{failure}");
    }
}

fn live(method: LiveMethod) -> CreateOptions {
    CreateOptions {
        memory: MemoryMode::Live(LiveOptions {
            method,
            ..LiveOptions::default()
        }),
        disks: mixed_disks(),
        description: None,
        memory_path: None,
        quiesce: false,
    }
}

/// The calls of a create that change the domain, in order.
fn domain_calls(f: &Fixture) -> Vec<&'static str> {
    let steps = [
        "precopy",
        "pause",
        "create_internal",
        "create_external",
        "hypervisor_resume",
        "stream",
        "resume",
    ];
    f.calls().into_iter().filter(|c| steps.contains(c)).collect()
}

#[tokio::test]
async fn a_streaming_hypervisor_precopies_and_stops_the_guest_itself_for_the_disks() {
    let f = fixture(DomainState::Running);
    f.sim.lock().unwrap().streams = true;
    let report = f
        .orchestrator
        .create(&f.domain, &name("pc"), live(LiveMethod::Auto))
        .await
        .unwrap();
    assert_eq!(report.memory_mode, SavedMemory::Precopy);
    assert_eq!(report.memory_read, Some(MemoryRead::Stream));
    let memory = report.record.memory.as_ref().unwrap();
    assert_eq!(memory.consistency, snapshot_core::Consistency::End);
    // No pause or resume of ours: the hypervisor stopped the guest, we took the disks, the
    // capture resumed it.
    assert_eq!(
        domain_calls(&f),
        [
            "precopy",
            "create_internal",
            "create_external",
            "hypervisor_resume",
            "stream",
        ]
    );
    assert_eq!(f.sim().state, DomainState::Running);

    // A disk snapshot failing at the switch-over: the stream is cancelled, nothing stays, the
    // guest runs. A capture failing before the hypervisor resumed the guest (or its resume
    // failing): our rollback resumes it. The stream failing after: the guest runs already.
    for failure in [
        "create_external",
        "precopy",
        "stream_before_capture",
        "hypervisor_resume",
        "stream",
    ] {
        let f = fixture(DomainState::Running);
        f.sim.lock().unwrap().streams = true;
        f.fail_at(failure);
        let err = f
            .orchestrator
            .create(&f.domain, &name("pc"), live(LiveMethod::Precopy))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Failed { .. }), "{failure}: {err}");
        let sim = f.sim();
        assert_eq!(sim.state, DomainState::Running, "{failure}");
        assert!(sim.internal.is_empty(), "{failure}");
        assert_eq!(sim.disks[1].image, f.dir.path().join("vdb.qcow2"), "{failure}");
        assert_eq!(f.stray_files(), Vec::<PathBuf>::new(), "{failure}");
    }
}

#[tokio::test]
async fn ram_the_hypervisor_does_not_share_is_saved_through_its_stream() {
    let f = fixture(DomainState::Running);
    {
        let mut sim = f.sim.lock().unwrap();
        sim.shared_ram = false;
        sim.streams = true;
    }
    let paused = CreateOptions {
        disks: mixed_disks(),
        ..CreateOptions::default()
    };
    let report = f
        .orchestrator
        .create(&f.domain, &name("p"), paused)
        .await
        .unwrap();
    assert_eq!(report.memory_mode, SavedMemory::Paused);
    assert_eq!(report.memory_read, Some(MemoryRead::Stream));
    assert_eq!(
        domain_calls(&f),
        ["pause", "create_internal", "create_external", "stream", "resume"]
    );

    // A background snapshot cannot be made there: refused before anything happens.
    f.sim.lock().unwrap().calls.clear();
    let err = f
        .orchestrator
        .create(&f.domain, &name("bg"), live(LiveMethod::Background))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidRequest(m) if m.contains("its RAM is not shared")),
        "{err}"
    );
    assert_eq!(domain_calls(&f), Vec::<&str>::new());
    assert!(f.store.get(&f.domain, &name("bg")).is_err());

    // Neither shared nor streamed: a clear refusal.
    f.sim.lock().unwrap().streams = false;
    let err = f
        .orchestrator
        .create(&f.domain, &name("none"), CreateOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("neither shares"), "{err}");
    assert_eq!(domain_calls(&f), Vec::<&str>::new());
}

#[tokio::test]
async fn a_domain_with_snapshots_keeps_its_disks_and_its_definition() {
    let f = fixture(DomainState::ShutOff);
    let disks = f.sim().disks;
    // No snapshots: any redefinition goes.
    let moved = vec![DiskTarget {
        target: "vda".into(),
        image: f.dir.path().join("elsewhere.qcow2"),
        format: snapshot_core::ImageFormat::Qcow2,
    }];
    f.orchestrator
        .check_redefinition(&f.domain, &moved)
        .await
        .unwrap();

    f.orchestrator
        .create(
            &f.domain,
            &name("s1"),
            CreateOptions {
                disks: mixed_disks(),
                ..CreateOptions::default()
            },
        )
        .await
        .unwrap();
    let now = f.sim().disks;
    assert_ne!(now, disks, "the external disk moved to its overlay");
    f.orchestrator.check_redefinition(&f.domain, &now).await.unwrap();
    // Back on the original images (the snapshot's read-only history): refused, naming the disk.
    let error = f
        .orchestrator
        .check_redefinition(&f.domain, &disks)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("disk vdb is now"), "{error}");
    let error = f.orchestrator.undefine(&f.domain).await.unwrap_err();
    assert!(error.to_string().contains("1 snapshot(s)"), "{error}");
    assert!(!f.calls().contains(&"undefine"));

    f.orchestrator
        .delete(&f.domain, &name("s1"), false)
        .await
        .unwrap();
    f.orchestrator.undefine(&f.domain).await.unwrap();
    assert!(f.calls().contains(&"undefine"));
    assert!(f.store.overlays(&f.domain).unwrap().is_empty());
}

#[tokio::test]
async fn a_name_a_disk_already_holds_is_refused_and_the_users_snapshot_is_never_touched() {
    let f = fixture(DomainState::Running);
    let vda = f.sim().disks[0].image.clone();
    // Made outside domsnap (e.g. `qemu-img snapshot -c s1`).
    f.sim.lock().unwrap().internal.insert((vda.clone(), "s1".into()));
    f.sim.lock().unwrap().calls.clear();
    let error = f.create("s1", true).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("already holds an internal snapshot named s1"),
        "{error}"
    );
    assert!(f.sim().internal.contains(&(vda.clone(), "s1".to_owned())));
    assert!(!f.calls().contains(&"pause"), "{:?}", f.calls());
    assert!(f.store.intent(&f.domain).unwrap().is_none());
    assert!(f.store.list(&f.domain).unwrap().is_empty());

    // Names the disk layer refuses are refused before the domain is touched, too.
    for bad in ["123", "-x", "_x"] {
        let error = f.create(bad, true).await.unwrap_err();
        assert!(
            error.to_string().contains("internal snapshot cannot be named"),
            "{bad}: {error}"
        );
    }
    assert!(!f.calls().contains(&"pause"), "{:?}", f.calls());
    assert!(f.stray_files().is_empty());
}

#[tokio::test]
async fn a_revert_whose_internal_snapshot_is_gone_is_refused_before_the_domain_stops() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    // Deleted behind domsnap's back.
    f.sim.lock().unwrap().internal.clear();
    f.sim.lock().unwrap().calls.clear();
    let error = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            Error::Failed {
                step: Step::Check,
                ..
            }
        ),
        "{error}"
    );
    let source = std::error::Error::source(&error).unwrap().to_string();
    assert!(
        source.contains("no longer holds internal snapshot s1"),
        "{source}"
    );
    assert!(!f.calls().contains(&"destroy"), "{:?}", f.calls());
    assert_eq!(f.sim().state, DomainState::Running);
}

#[tokio::test]
async fn activity_is_read_without_waiting_and_an_impossible_undo_can_be_abandoned() {
    let f = fixture(DomainState::Running);
    assert_eq!(f.orchestrator.activity(&f.domain).unwrap(), Activity::Idle);
    let held = f.store.lock(&f.domain, Duration::ZERO).await.unwrap();
    assert_eq!(
        f.orchestrator.activity(&f.domain).unwrap(),
        Activity::Busy {
            pid: Some(std::process::id()),
            operation: None,
            snapshot: None
        }
    );
    drop(held);

    // A create whose undo cannot resume the domain, ever: recovery keeps failing.
    f.fail_at("resume");
    f.create("s1", true).await.unwrap_err();
    assert_eq!(
        f.orchestrator.activity(&f.domain).unwrap(),
        Activity::Interrupted {
            operation: Operation::Create,
            snapshot: name("s1")
        }
    );
    f.orchestrator.recover(&f.domain).await.unwrap_err();
    let abandoned = f.orchestrator.abandon(&f.domain).await.unwrap().unwrap();
    assert_eq!(abandoned.snapshot, name("s1"));
    assert!(
        abandoned.left_behind.iter().any(|l| l.contains("Paused")),
        "{:?}",
        abandoned.left_behind
    );
    assert!(f.store.intent(&f.domain).unwrap().is_none());
    assert_eq!(f.orchestrator.activity(&f.domain).unwrap(), Activity::Idle);
    assert!(f.orchestrator.abandon(&f.domain).await.unwrap().is_none());
}
