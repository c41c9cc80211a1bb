//! What the orchestrator does with what a driver says about the machine: raw disks (external
//! snapshots by default, internal ones refused before the guest is paused) and a snapshot the
//! hypervisor cannot restore (refused before the domain is touched).

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod sim;

use sim::*;
use snapshot_core::{DiskSnapshot, ErrorClass, ImageFormat, Step};

/// A running domain whose disk vdb is a raw image.
fn raw_vdb() -> Fixture {
    let f = fixture(DomainState::Running);
    f.sim.lock().unwrap().disks[1].format = ImageFormat::Raw;
    f
}

fn options(disks: Vec<DiskRequest>) -> CreateOptions {
    CreateOptions {
        memory: MemoryMode::Paused,
        disks,
        description: None,
        memory_path: None,
        quiesce: false,
    }
}

#[tokio::test]
async fn a_raw_disk_gets_an_overlay_by_default_and_its_internal_snapshot_is_refused_before_the_pause() {
    let f = raw_vdb();
    let internal = vec![DiskRequest {
        target: "vdb".into(),
        kind: DiskKind::Internal { name: None },
    }];
    let error = f
        .orchestrator
        .create(&f.domain, &name("bad"), options(internal))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Unsupported);
    assert!(error.to_string().contains("disk vdb"), "{error}");
    assert!(!f.calls().contains(&"pause"), "{:?}", f.calls());
    assert!(f.store.list(&f.domain).unwrap().is_empty());

    let report = f
        .orchestrator
        .create(&f.domain, &name("s1"), options(Vec::new()))
        .await
        .unwrap();
    let kinds: Vec<&DiskSnapshot> = report.record.disks.iter().map(|d| &d.snapshot).collect();
    assert!(matches!(kinds[0], DiskSnapshot::Internal { .. }), "{kinds:?}");
    assert!(matches!(kinds[1], DiskSnapshot::External { .. }), "{kinds:?}");
}

#[tokio::test]
async fn the_overlay_of_a_raw_disk_is_qcow2_and_a_revert_keeps_the_formats() {
    let f = raw_vdb();
    f.sim.lock().unwrap().state = DomainState::ShutOff;
    f.orchestrator
        .create(&f.domain, &name("off"), options(Vec::new()))
        .await
        .unwrap();
    let disks = f.sim().disks;
    assert_eq!(disks[1].image, f.dir.path().join("vdb.off.qcow2"));
    assert_eq!(
        (disks[0].format, disks[1].format),
        (ImageFormat::Qcow2, ImageFormat::Qcow2)
    );
    f.orchestrator
        .revert(&f.domain, &name("off"), RevertOptions::default())
        .await
        .unwrap();
    // A fresh overlay on the raw image, qcow2 again.
    let disks = f.sim().disks;
    assert_ne!(disks[1].image, f.dir.path().join("vdb.qcow2"));
    assert_eq!(disks[1].format, ImageFormat::Qcow2);
}

#[tokio::test]
async fn a_snapshot_the_hypervisor_cannot_restore_is_refused_before_the_domain_is_touched() {
    let f = fixture(DomainState::Running);
    f.create("s1", false).await.unwrap();
    f.fail_at("check_restorable");
    let error = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.failed_step().unwrap().step, Step::Check);
    assert!(error.failed_step().unwrap().rollback.is_empty());
    let calls = f.calls();
    assert!(calls.contains(&"check_restorable"), "{calls:?}");
    assert!(
        !calls.contains(&"destroy") && !calls.contains(&"define"),
        "{calls:?}"
    );
    assert_eq!(f.sim().state, DomainState::Running);
    // The check passes: the revert goes on.
    f.fail_at("nothing");
    f.orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    assert!(f.calls().contains(&"destroy"));
}
