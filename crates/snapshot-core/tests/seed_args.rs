//! The seed's arguments against the simulated hypervisor and disks: disks left out, per-disk
//! internal names, disk-only creates of a running domain and a memory image path the caller
//! chooses; each through create, verify, revert, delete and recovery, with bad requests refused
//! before anything changes and failures rolled back.

#![allow(clippy::unwrap_used, reason = "a test that cannot unwrap has failed")]

mod sim;

use sim::*;
use snapshot_core::{CreateReport, DiskSnapshot, ErrorClass};

fn internal(target: &str, snapshot: Option<&str>) -> DiskRequest {
    DiskRequest {
        target: target.into(),
        kind: DiskKind::Internal {
            name: snapshot.map(str::to_owned),
        },
    }
}

fn excluded(target: &str) -> DiskRequest {
    DiskRequest {
        target: target.into(),
        kind: DiskKind::Excluded,
    }
}

fn options(memory: MemoryMode, disks: Vec<DiskRequest>, memory_path: Option<PathBuf>) -> CreateOptions {
    CreateOptions {
        memory,
        disks,
        description: None,
        memory_path,
        quiesce: false,
    }
}

impl Fixture {
    async fn create_with(
        &self,
        snapshot: &str,
        options: CreateOptions,
    ) -> snapshot_core::Result<CreateReport> {
        self.orchestrator
            .create(&self.domain, &name(snapshot), options)
            .await
    }

    fn image(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.qcow2"))
    }

    /// Nothing happened to the domain: no pause, no intent, no snapshot.
    fn untouched(&self) {
        assert!(!self.calls().contains(&"pause"), "{:?}", self.calls());
        assert!(!self.calls().contains(&"create_internal"), "{:?}", self.calls());
        assert!(self.store.intent(&self.domain).unwrap().is_none());
        assert!(self.store.list(&self.domain).unwrap().is_empty());
        assert_eq!(self.stray_files(), Vec::<PathBuf>::new());
    }
}

#[tokio::test]
async fn a_disk_left_out_is_recorded_and_a_revert_leaves_it_as_it_is() {
    let f = fixture(DomainState::Running);
    let disks = vec![internal("vda", Some("mine")), excluded("vdb")];
    let report = f
        .create_with("s1", options(MemoryMode::Paused, disks, None))
        .await
        .unwrap();
    let recorded: Vec<&DiskSnapshot> = report.record.disks.iter().map(|d| &d.snapshot).collect();
    assert_eq!(
        recorded,
        [
            &DiskSnapshot::Internal { name: "mine".into() },
            &DiskSnapshot::Excluded
        ]
    );
    let sim = f.sim();
    assert_eq!(
        sim.internal.iter().cloned().collect::<Vec<_>>(),
        vec![(f.image("vda"), "mine".to_owned())]
    );
    assert_eq!(
        sim.disks[1].image,
        f.image("vdb"),
        "no overlay for a disk left out"
    );
    assert!(f
        .orchestrator
        .verify(&f.domain, &name("s1"))
        .await
        .unwrap()
        .problems
        .is_empty());

    // The domain moves on to another image for vdb; the revert keeps it.
    let moved = f.dir.path().join("vdb-new.img");
    std::fs::write(&moved, b"new").unwrap();
    f.sim.lock().unwrap().disks[1].image = moved.clone();
    f.orchestrator
        .revert(&f.domain, &name("s1"), PAUSED)
        .await
        .unwrap();
    let sim = f.sim();
    assert_eq!(sim.disks[0].image, f.image("vda"));
    assert_eq!(sim.disks[1].image, moved);
    assert_eq!(sim.applied, vec![(f.image("vda"), "mine".to_owned())]);

    f.orchestrator
        .delete(&f.domain, &name("s1"), false)
        .await
        .unwrap();
    assert!(
        f.sim().internal.is_empty(),
        "the per-disk name is what is deleted"
    );
}

#[tokio::test]
async fn bad_disk_requests_are_refused_before_anything_changes() {
    let f = fixture(DomainState::Running);
    f.sim
        .lock()
        .unwrap()
        .internal
        .insert((f.image("vda"), "taken".into()));
    let cases = [
        (vec![excluded("vdz")], "has no disk \"vdz\""),
        (vec![internal("vda", Some("123"))], "cannot be named \"123\""),
        (vec![internal("vda", Some("-x"))], "cannot be named \"-x\""),
        (
            vec![internal("vda", Some("taken"))],
            "already holds an internal snapshot named taken",
        ),
        (vec![excluded("vda"), excluded("vda")], "named twice"),
    ];
    for (disks, expected) in cases {
        let error = f
            .create_with("s1", options(MemoryMode::Paused, disks, None))
            .await
            .unwrap_err();
        assert_eq!(error.class(), ErrorClass::InvalidArgument, "{error}");
        assert!(error.to_string().contains(expected), "{expected}: {error}");
        f.untouched();
    }
    // A disk-only snapshot of nothing.
    let nothing = options(
        MemoryMode::DisksOnly,
        vec![excluded("vda"), excluded("vdb")],
        None,
    );
    let error = f.create_with("s1", nothing).await.unwrap_err();
    assert!(error.to_string().contains("would hold nothing"), "{error}");
    f.untouched();
    assert!(f.sim().internal.contains(&(f.image("vda"), "taken".into())));
}

#[tokio::test]
async fn a_disk_only_create_of_a_running_domain_takes_the_disks_at_once_without_a_pause() {
    let f = fixture(DomainState::Running);
    let report = f
        .create_with("d1", options(MemoryMode::DisksOnly, mixed_disks(), None))
        .await
        .unwrap();
    assert!(report.record.memory.is_none());
    assert_eq!(report.record.state, DomainState::Running);
    assert_eq!(report.memory_mode, SavedMemory::None);
    assert_eq!(report.guest_pause_ms, 0.0);
    let calls = domain_calls(&f);
    assert_eq!(
        calls,
        ["create_internal", "create_external"],
        "one call, no pause"
    );
    assert!(!f.calls().contains(&"guest_memory"));
    assert_eq!(f.sim().state, DomainState::Running);
    assert_eq!(f.sim().disks[1].image, f.dir.path().join("vdb.d1.qcow2"));

    let reverted = f
        .orchestrator
        .revert(&f.domain, &name("d1"), RevertOptions::default())
        .await
        .unwrap();
    assert_eq!(reverted.state, DomainState::ShutOff);
    assert_eq!(reverted.memory_load, MemoryLoad::None);
    assert_eq!(f.sim().state, DomainState::ShutOff);
    assert_eq!(f.sim().applied, vec![(f.image("vda"), "d1".to_owned())]);
}

#[tokio::test]
async fn a_failed_disk_only_create_is_rolled_back_with_the_guest_running() {
    for failure in ["create_internal", "create_external", "disk_backend"] {
        let f = fixture(DomainState::Running);
        f.fail_at(failure);
        let error = f
            .create_with("d1", options(MemoryMode::DisksOnly, mixed_disks(), None))
            .await
            .unwrap_err();
        assert!(chain(&error).contains(failure), "{failure}: {}", chain(&error));
        assert_eq!(error.class(), ErrorClass::FailedRolledBack, "{failure}");
        f.sim.lock().unwrap().fail = None;
        let sim = f.sim();
        assert_eq!(sim.state, DomainState::Running, "{failure}");
        assert!(sim.internal.is_empty(), "{failure}");
        assert_eq!(sim.disks[1].image, f.image("vdb"), "{failure}");
        assert!(f.store.intent(&f.domain).unwrap().is_none(), "{failure}");
        assert_eq!(f.stray_files(), Vec::<PathBuf>::new(), "{failure}");
    }
}

/// An error and its sources, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The calls that change the domain or its disks, in order.
fn domain_calls(f: &Fixture) -> Vec<&'static str> {
    let steps = ["pause", "create_internal", "create_external", "resume"];
    f.calls().into_iter().filter(|c| steps.contains(c)).collect()
}

/// A folder outside the state directory for memory images.
fn elsewhere(f: &Fixture) -> PathBuf {
    let dir = f.dir.path().join("elsewhere");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

#[tokio::test]
async fn a_memory_path_is_recorded_and_followed_by_verify_revert_and_delete() {
    let f = fixture(DomainState::Running);
    let image = elsewhere(&f).join("memory.img");
    let report = f
        .create_with("m1", options(MemoryMode::Paused, Vec::new(), Some(image.clone())))
        .await
        .unwrap();
    let memory = report.record.memory.as_ref().unwrap();
    assert_eq!(memory.image_path.as_ref(), Some(&image));
    memory::verify(&image).unwrap();
    let files = f.store.files(&f.domain, &name("m1"));
    assert!(
        !files.memory_image.exists(),
        "the image is not in the snapshot's folder"
    );
    assert!(files.device_state.exists(), "the device state is");
    let verified = f.orchestrator.verify(&f.domain, &name("m1")).await.unwrap();
    assert!(verified.problems.is_empty() && verified.memory_pages.is_some());

    for revert in [PAUSED, EAGER] {
        let reverted = f
            .orchestrator
            .revert(&f.domain, &name("m1"), revert)
            .await
            .unwrap();
        assert_ne!(reverted.memory_load, MemoryLoad::None);
    }
    // A damaged image at the chosen path is what verify and revert find.
    let damaged = std::fs::read(&image).unwrap();
    std::fs::write(&image, &damaged[..damaged.len() / 2]).unwrap();
    let verified = f.orchestrator.verify(&f.domain, &name("m1")).await.unwrap();
    assert!(!verified.problems.is_empty());
    let refused = f.orchestrator.revert(&f.domain, &name("m1"), PAUSED).await;
    let refused = chain(&refused.unwrap_err());
    assert!(refused.contains(&image.display().to_string()), "{refused}");
    std::fs::write(&image, &damaged).unwrap();

    f.orchestrator
        .delete(&f.domain, &name("m1"), false)
        .await
        .unwrap();
    assert!(!image.exists(), "delete removes the image where it is");
}

#[tokio::test]
async fn bad_memory_paths_are_refused_and_a_failed_create_removes_its_image() {
    let f = fixture(DomainState::Running);
    let dir = elsewhere(&f);
    let existing = dir.join("exists.img");
    std::fs::write(&existing, b"mine").unwrap();
    f.create_with("s0", options(MemoryMode::DisksOnly, Vec::new(), None))
        .await
        .unwrap();
    let inside = f.store.files(&f.domain, &name("s0")).dir.join("m.img");
    let cases = [
        (existing.clone(), MemoryMode::Paused, "exists already"),
        (
            dir.join("missing/m.img"),
            MemoryMode::Paused,
            "folder does not exist",
        ),
        (inside, MemoryMode::Paused, "inside a snapshot's folder"),
        (dir.join("m.img"), MemoryMode::DisksOnly, "has no memory"),
    ];
    for (path, memory, expected) in cases {
        f.sim.lock().unwrap().calls.clear();
        let error = f
            .create_with("s1", options(memory, Vec::new(), Some(path.clone())))
            .await
            .unwrap_err();
        assert_eq!(error.class(), ErrorClass::InvalidArgument, "{error}");
        assert!(error.to_string().contains(expected), "{expected}: {error}");
        assert!(!f.calls().contains(&"pause"));
        assert_eq!(f.store.list(&f.domain).unwrap().len(), 1);
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"mine");

    let image = dir.join("m.img");
    // (A failing resume is an incomplete rollback: the intent stays for `recover`, which the
    // recovery test below covers.)
    for failure in ["save_device_state", "create_internal"] {
        f.fail_at(failure);
        let result = f
            .create_with("s1", options(MemoryMode::Paused, Vec::new(), Some(image.clone())))
            .await;
        assert!(result.is_err(), "{failure}");
        f.sim.lock().unwrap().fail = None;
        assert!(!image.exists(), "{failure}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "{failure}: only exists.img"
        );
        assert!(f.store.intent(&f.domain).unwrap().is_none(), "{failure}");
    }
}

/// Recovers a create of `s1` that was interrupted while its memory image went to `image`.
async fn recover_a_create_with_its_image_at(f: &Fixture, image: &Path) -> RecoveryOutcome {
    f.store
        .set_intent(
            &f.domain,
            &Intent::Create {
                snapshot: name("s1"),
                was: DomainState::Running,
                disks: Vec::new(),
                memory_path: Some(image.to_owned()),
                quiesce: false,
            },
        )
        .unwrap();
    f.orchestrator.recover(&f.domain).await.unwrap().unwrap().outcome
}

#[tokio::test]
async fn recovery_of_an_interrupted_create_removes_the_image_at_its_path() {
    let f = fixture(DomainState::Running);
    let image = elsewhere(&f).join("m.img");
    std::fs::write(&image, b"sealed before the crash").unwrap();
    assert_eq!(
        recover_a_create_with_its_image_at(&f, &image).await,
        RecoveryOutcome::Undone
    );
    assert!(!image.exists());
}

#[tokio::test]
async fn recovery_of_a_create_killed_while_writing_the_image_removes_its_temporary() {
    let f = fixture(DomainState::Running);
    let image = elsewhere(&f).join("m.img");
    // Killed in the middle of the image: only its temporary exists, beside someone else's.
    std::mem::forget(durable::TempFile::create(&image).unwrap());
    std::mem::forget(durable::TempFile::create(&image.with_file_name("other.img")).unwrap());
    assert_eq!(
        recover_a_create_with_its_image_at(&f, &image).await,
        RecoveryOutcome::Undone
    );
    let left: Vec<String> = std::fs::read_dir(image.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".other.img.partial-"), "{left:?}");
}
