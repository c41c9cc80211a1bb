//! Rescan against the simulated hypervisor and disks (mockall mocks over shared state, real
//! overlay files, the real store): snapshots whose disk part is gone or changed are marked
//! broken with the reason and unmarked once it is back; chains changed outside domsnap are
//! reported and recorded; a broken snapshot cannot be reverted to; the current snapshot is read
//! and set.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod sim;

use sim::*;
use snapshot_core::{Health, RescanReport};

/// A shut-off domain with two disk-only snapshots: s1 (vda internal, vdb external: vdb.qcow2
/// under the overlay vdb.s1.qcow2) and s2 (vda internal, vdb external: vdb.s1.qcow2 under
/// vdb.s1.s2.qcow2).
async fn two_snapshots() -> Fixture {
    let f = fixture(DomainState::ShutOff);
    f.create("s1", false).await.unwrap();
    f.create("s2", false).await.unwrap();
    f
}

async fn rescan(f: &Fixture) -> RescanReport {
    f.orchestrator.rescan(&f.domain, None).await.unwrap()
}

fn changes(report: &RescanReport) -> Vec<(String, Health)> {
    report
        .changed
        .iter()
        .map(|c| (c.snapshot.to_string(), c.health))
        .collect()
}

fn disk_changes<'a>(report: &'a RescanReport, target: &str) -> &'a [String] {
    &report.disks.iter().find(|d| d.target == target).unwrap().changed
}

#[tokio::test]
async fn a_deleted_internal_snapshot_marks_its_snapshot_broken_until_it_is_back() {
    let f = two_snapshots().await;
    let first = rescan(&f).await;
    assert!(
        first.first && first.changed.is_empty() && first.broken.is_empty(),
        "{first:?}"
    );
    let vda = f.dir.path().join("vda.qcow2");
    f.sim.lock().unwrap().internal.remove(&(vda.clone(), "s1".into()));

    let report = rescan(&f).await;
    assert!(!report.first);
    assert_eq!(changes(&report), [("s1".to_owned(), Health::Broken)]);
    assert_eq!(report.broken, [name("s1")]);
    let reason = &report.changed[0].reasons[0];
    assert!(
        reason.starts_with("disk vda: internal snapshot s1 is gone from"),
        "{reason}"
    );
    let broken = f.store.get(&f.domain, &name("s1")).unwrap().broken.unwrap();
    assert_eq!(&broken.reasons[0], reason);
    assert!(f.store.get(&f.domain, &name("s2")).unwrap().broken.is_none());
    // Nothing new: no change is reported again, the mark stays (with its first date).
    let again = rescan(&f).await;
    assert!(
        again.changed.is_empty() && again.broken == [name("s1")],
        "{again:?}"
    );
    let kept = f.store.get(&f.domain, &name("s1")).unwrap().broken.unwrap();
    assert_eq!(kept.since_unix_ms, broken.since_unix_ms);

    // A revert of the broken snapshot is refused before the domain is touched.
    f.sim.lock().unwrap().calls.clear();
    let error = f
        .orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Broken { .. }), "{error}");
    assert!(
        error.to_string().contains("internal snapshot s1 is gone"),
        "{error}"
    );
    assert_eq!(error.class(), snapshot_core::ErrorClass::InvalidArgument);
    assert!(f.calls().is_empty(), "{:?}", f.calls());
    f.orchestrator
        .revert(&f.domain, &name("s2"), RevertOptions::default())
        .await
        .unwrap();

    f.sim.lock().unwrap().internal.insert((vda, "s1".into()));
    let repaired = rescan(&f).await;
    assert_eq!(changes(&repaired), [("s1".to_owned(), Health::Repaired)]);
    assert!(repaired.broken.is_empty() && repaired.changed[0].reasons.is_empty());
    assert!(f.store.get(&f.domain, &name("s1")).unwrap().broken.is_none());
    f.orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_removed_overlay_breaks_the_snapshot_that_reads_it_only() {
    let f = two_snapshots().await;
    let s1_overlay = f.dir.path().join("vdb.s1.qcow2");
    std::fs::remove_file(&s1_overlay).unwrap();
    let report = rescan(&f).await;
    assert_eq!(changes(&report), [("s2".to_owned(), Health::Broken)]);
    assert_eq!(
        report.changed[0].reasons,
        [format!("disk vdb: image {} is missing", s1_overlay.display())]
    );
    let vdb = report.disks.iter().find(|d| d.target == "vdb").unwrap();
    assert_eq!(vdb.chain, [f.dir.path().join("vdb.s1.s2.qcow2")]);
    assert!(vdb.problem.as_ref().unwrap().contains("is missing"), "{vdb:?}");
    // s1 still reverts (a fresh overlay on vdb.qcow2), and the broken s2 can be deleted.
    f.orchestrator
        .revert(&f.domain, &name("s1"), RevertOptions::default())
        .await
        .unwrap();
    f.orchestrator
        .delete(&f.domain, &name("s2"), false)
        .await
        .unwrap();
    assert!(rescan(&f).await.broken.is_empty());
}

/// Replaces `overlay` with a qcow2 overlay on `backing` (as `qemu-img rebase -u` would).
fn rebase(overlay: &Path, backing: &Path) {
    std::fs::remove_file(overlay).unwrap();
    disk::qcow2::create_overlay(overlay, backing.to_str().unwrap(), "raw", 1 << 20).unwrap();
}

#[tokio::test]
async fn a_backing_file_changed_outside_domsnap_is_reported_recorded_and_breaks_its_readers() {
    let f = two_snapshots().await;
    rescan(&f).await;
    let (s1_overlay, other) = (f.dir.path().join("vdb.s1.qcow2"), f.dir.path().join("other.raw"));
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    rebase(&s1_overlay, &other);

    let report = rescan(&f).await;
    assert_eq!(changes(&report), [("s2".to_owned(), Health::Broken)]);
    let reason = &report.changed[0].reasons[0];
    assert!(reason.contains("changed outside domsnap: was"), "{reason}");
    assert!(reason.ends_with(&format!("now {}", other.display())), "{reason}");
    let vdb = disk_changes(&report, "vdb");
    assert_eq!(vdb.len(), 2, "{vdb:?}");
    assert!(
        vdb[0].contains("the backing file of") && vdb[0].contains("vdb.s1.qcow2"),
        "{vdb:?}"
    );
    assert!(vdb[1].contains("other.raw was not made by domsnap"), "{vdb:?}");
    // Recorded: the next rescan reports no chain change, and s2 stays broken.
    let again = rescan(&f).await;
    assert!(disk_changes(&again, "vdb").is_empty() && again.broken == [name("s2")]);

    rebase(&s1_overlay, &f.dir.path().join("vdb.qcow2"));
    let repaired = rescan(&f).await;
    assert_eq!(changes(&repaired), [("s2".to_owned(), Health::Repaired)]);
}

#[tokio::test]
async fn a_change_made_before_the_first_rescan_is_found_from_the_records() {
    let f = two_snapshots().await;
    let other = f.dir.path().join("other.raw");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    rebase(&f.dir.path().join("vdb.s1.qcow2"), &other);
    let report = rescan(&f).await;
    assert!(report.first);
    assert_eq!(changes(&report), [("s2".to_owned(), Health::Broken)]);
    // s2 records the chain s1 says it had, not the one found.
    let s2 = f.store.get(&f.domain, &name("s2")).unwrap();
    assert_eq!(s2.chains["vdb"], [f.dir.path().join("vdb.qcow2")]);
}

#[tokio::test]
async fn an_image_someone_else_made_on_the_active_image_is_reported() {
    let f = two_snapshots().await;
    rescan(&f).await;
    let active = f.dir.path().join("vdb.s1.s2.qcow2");
    assert!(active.exists());
    let theirs = f.dir.path().join("theirs.qcow2");
    disk::qcow2::create_overlay(&theirs, active.to_str().unwrap(), "qcow2", 1 << 20).unwrap();
    f.sim.lock().unwrap().disks[1].image = theirs.clone();
    let report = rescan(&f).await;
    assert!(report.changed.is_empty(), "{report:?}");
    let vdb = disk_changes(&report, "vdb");
    assert_eq!(
        vdb,
        [format!(
            "{} was not made by domsnap (its backing file: {})",
            theirs.display(),
            active.display()
        )]
    );
    assert!(disk_changes(&rescan(&f).await, "vdb").is_empty());
}

#[tokio::test]
async fn one_snapshot_is_rescanned_alone_and_unknown_ones_are_refused() {
    let f = two_snapshots().await;
    let vda = f.dir.path().join("vda.qcow2");
    {
        let mut sim = f.sim.lock().unwrap();
        sim.internal.remove(&(vda.clone(), "s1".into()));
        sim.internal.remove(&(vda, "s2".into()));
    }
    let report = f.orchestrator.rescan(&f.domain, Some(&name("s2"))).await.unwrap();
    assert_eq!(changes(&report), [("s2".to_owned(), Health::Broken)]);
    assert!(f.store.get(&f.domain, &name("s1")).unwrap().broken.is_none());
    assert!(matches!(
        f.orchestrator.rescan(&f.domain, Some(&name("nope"))).await,
        Err(Error::SnapshotNotFound { .. })
    ));
}

#[tokio::test]
async fn the_current_snapshot_is_read_and_set() {
    let f = two_snapshots().await;
    assert_eq!(f.orchestrator.current(&f.domain).unwrap(), Some(name("s2")));
    f.orchestrator.set_current(&f.domain, &name("s1")).await.unwrap();
    assert_eq!(f.orchestrator.current(&f.domain).unwrap(), Some(name("s1")));
    let error = f
        .orchestrator
        .set_current(&f.domain, &name("nope"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::SnapshotNotFound { .. }), "{error}");
    assert_eq!(f.orchestrator.current(&f.domain).unwrap(), Some(name("s1")));
    // The next snapshot's parent is the current one.
    f.create("s3", false).await.unwrap();
    let s3 = f.store.get(&f.domain, &name("s3")).unwrap();
    assert_eq!(s3.parent, Some(name("s1")));
}
