//! The live backend against a real QEMU 10 running the test guest with two qcow2 disks.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::{path::Path, time::Duration};

use common::*;
use disk::{BackingPath, DiskSnapshots, Error, ExternalSnapshot, LiveBackend, MergeMethod};

fn marker_tick(path: &Path) -> u64 {
    let marker = testkit::read_disk_marker(path).expect("the guest wrote no marker");
    marker.rsplit('=').next().unwrap().parse().unwrap()
}

/// Waits until the guest's disk marker (read through the chain of `path`) passes `after`.
async fn marker_passes(path: &Path, after: u64) -> u64 {
    for _ in 0..100 {
        let tick = testkit::read_disk_marker(path)
            .map(|_| marker_tick(path))
            .unwrap_or(0);
        if tick > after {
            return tick;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the guest stopped writing its marker to {}", path.display());
}

fn names(list: &[disk::InternalSnapshot]) -> Vec<&str> {
    list.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_snapshots_on_a_running_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d0 = dir.path().join("d0.qcow2");
    let d1 = dir.path().join("d1.qcow2");
    testkit::create_qcow2(&d0, "64M");
    testkit::create_qcow2(&d1, "64M");
    write(&d1, 0x5a, 1 << 20, 1 << 20);
    let d1_data = contents(&d1, None);
    let qemu = testkit::Qemu::builder("disk-live")
        .memory_mib(256)
        .guest(testkit::Workload::Idle)
        .disk(&d0)
        .disk(&d1)
        .spawn();
    qemu.wait_for_serial("DOMSNAP READY", Duration::from_secs(90));
    let qmp = qmp::Client::connect_unix(qemu.qmp_socket(), qmp::ClientOptions::default())
        .await
        .unwrap();
    let live = LiveBackend::new(qmp.clone());
    let both = vec![d0.clone(), d1.clone()];

    // An image QEMU has not open (another branch's) is listed natively.
    let other = dir.path().join("other.qcow2");
    testkit::create_qcow2(&other, "1M");
    testkit::run("qemu-img", &["snapshot", "-c", "theirs", other.to_str().unwrap()]);
    assert_eq!(names(&live.list_internal(&other).await.unwrap()), ["theirs"]);
    assert!(live
        .list_internal(&dir.path().join("missing.qcow2"))
        .await
        .is_err());

    // Atomic two-disk internal snapshot, and a transaction failing in its second action.
    live.create_internal(&both, "s1").await.unwrap();
    live.create_internal(&both[1..], "only-d1").await.unwrap();
    let err = live.create_internal(&both, "only-d1").await.unwrap_err();
    assert!(matches!(err, Error::Qmp { .. }), "{err}");
    assert_eq!(
        names(&live.list_internal(&d0).await.unwrap()),
        ["s1"],
        "d0 changed by a failed transaction"
    );
    assert_eq!(names(&live.list_internal(&d1).await.unwrap()), ["s1", "only-d1"]);
    live.delete_internal(&both[1..], "only-d1").await.unwrap();
    assert!(matches!(
        live.apply_internal(&both, "s1").await,
        Err(Error::NotSupported { .. })
    ));
    live.delete_internal(&both, "s1").await.unwrap();
    assert!(live.list_internal(&d0).await.unwrap().is_empty());

    // Prepared ahead (QEMU's nodes looked up before, as before a pause), for one call only.
    let internal = |name: &str| {
        both.iter()
            .map(|disk| disk::NewInternal {
                disk: disk.clone(),
                name: name.to_owned(),
            })
            .collect::<Vec<_>>()
    };
    live.prepare_snapshots(&internal("p1"), &[]).await.unwrap();
    live.create_snapshots(&internal("p1"), &[]).await.unwrap();
    live.create_snapshots(&internal("p2"), &[]).await.unwrap();
    assert_eq!(names(&live.list_internal(&d1).await.unwrap()), ["p1", "p2"]);
    live.delete_internal(&both, "p1").await.unwrap();
    live.delete_internal(&both, "p2").await.unwrap();

    // Atomic two-disk external snapshot; a bad second overlay leaves both disks as they were.
    let o0 = dir.path().join("o0.qcow2");
    let o1 = dir.path().join("o1.qcow2");
    let spec = |disk: &Path, overlay: &Path| ExternalSnapshot {
        disk: disk.into(),
        overlay: overlay.into(),
        backing_path: BackingPath::Relative,
    };
    let bad = [spec(&d0, &o0), spec(&d1, Path::new("/nonexistent/o1.qcow2"))];
    assert!(live.create_external(&bad).await.is_err());
    assert!(!o0.exists(), "the first overlay was not removed");
    assert_eq!(live.backing_chain(&d0).await.unwrap().len(), 1);
    let before = marker_passes(&d0, 0).await;
    let external = [spec(&d0, &o0), spec(&d1, &o1)];
    live.prepare_snapshots(&[], &external).await.unwrap();
    live.create_external(&external).await.unwrap();
    let chain = live.backing_chain(&o0).await.unwrap();
    assert_eq!(
        chain.iter().map(|c| c.path.clone()).collect::<Vec<_>>(),
        [o0.clone(), d0.clone()]
    );
    assert_eq!(chain[0].virtual_size, 64 << 20);
    // The guest keeps writing, now into the overlay.
    let tick = marker_passes(&o0, before).await;

    // A second overlay, then delete the middle one by streaming it into its child.
    let o0b = dir.path().join("o0b.qcow2");
    live.create_external(&[spec(&o0, &o0b)]).await.unwrap();
    let active = live
        .delete_external(&o0b, &o0, MergeMethod::StreamIntoChild)
        .await
        .unwrap();
    assert_eq!(active, o0b);
    let chain = live.backing_chain(&o0b).await.unwrap();
    assert_eq!(
        chain.iter().map(|c| c.path.clone()).collect::<Vec<_>>(),
        [o0b.clone(), d0.clone()]
    );
    let tick = marker_passes(&o0b, tick).await;

    // Two active commits in a row (o0c into o0b, then o0b into d0): the first must release
    // the old top's nodes, or o0b is no root node for the second.
    let o0c = dir.path().join("o0c.qcow2");
    live.create_external(&[spec(&o0b, &o0c)]).await.unwrap();
    let active = live
        .delete_external(&o0c, &o0c, MergeMethod::CommitIntoParent)
        .await
        .unwrap();
    assert_eq!(active, o0b);

    // Delete the active overlay by committing it into its parent: the disk pivots to d0.
    let active = live
        .delete_external(&o0b, &o0b, MergeMethod::CommitIntoParent)
        .await
        .unwrap();
    assert_eq!(active, d0);
    assert_eq!(live.backing_chain(&d0).await.unwrap().len(), 1);
    marker_passes(&d0, tick).await;

    // Stream the base of disk 1 into its overlay: o1 stands alone with the same data.
    live.delete_external(&o1, &d1, MergeMethod::StreamIntoChild)
        .await
        .unwrap();
    assert_eq!(live.backing_chain(&o1).await.unwrap().len(), 1);
    // Stopping the VM flushes QEMU's qcow2 metadata caches, so other readers see the result.
    qmp.execute(&qmp::commands::Stop).await.unwrap();
    assert!(
        contents_shared(&o1) == d1_data,
        "o1 does not hold d1's data after streaming"
    );
    let err = live
        .delete_external(&o1, &o1, MergeMethod::StreamIntoChild)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Chain { .. }), "{err}");
    drop(qemu);
    check_clean(&d0);
    check_clean(&o1);
}

/// Contents of an image QEMU holds (`-U`), without its backing chain.
fn contents_shared(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("out.raw");
    tool(
        "qemu-img",
        &["convert", "-U", "-f", "qcow2", "-O", "raw", &s(path), &s(&raw)],
    );
    std::fs::read(raw).unwrap()
}
