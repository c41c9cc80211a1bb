//! The client against a real QEMU 10 (q35, TCG, started with `-S`: no guest needed).
//! These tests fail, not skip, when QEMU is missing: run `cargo xtask setup`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

use qmp::{commands::*, Client, ClientOptions, Error, Event, JobOptions, MigrationStatus, RunState};
use serde_json::{json, Value};
use testkit::Qemu;

async fn connect(qemu: &Qemu) -> Client {
    let options = ClientOptions {
        command_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    Client::connect_unix(qemu.qmp_socket(), options)
        .await
        .expect("connect to QEMU's QMP socket")
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

const EVENT_WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn version_status_stop_cont_reset_and_events() {
    let qemu = Qemu::builder("qmp-basics").memory_mib(64).paused().spawn();
    let client = connect(&qemu).await;
    assert_eq!(client.greeting().version.qemu.major, testkit::QEMU_MAJOR);

    let version = client.execute(&QueryVersion).await.unwrap();
    assert_eq!(version, client.greeting().version);

    let status = client.execute(&QueryStatus).await.unwrap();
    assert_eq!((status.running, status.status), (false, RunState::Prelaunch));

    let mut events = client.subscribe();
    client.execute(&Cont).await.unwrap();
    events
        .wait_for(EVENT_WAIT, |e| matches!(e, Event::Resume))
        .await
        .unwrap();
    assert_eq!(
        client.execute(&QueryStatus).await.unwrap().status,
        RunState::Running
    );

    client.execute(&Stop).await.unwrap();
    events
        .wait_for(EVENT_WAIT, |e| matches!(e, Event::Stop))
        .await
        .unwrap();
    assert_eq!(
        client.execute(&QueryStatus).await.unwrap().status,
        RunState::Paused
    );

    client.execute(&SystemReset).await.unwrap();
    let reset = events
        .wait_for(EVENT_WAIT, |e| matches!(e, Event::Reset(_)))
        .await
        .unwrap();
    let Event::Reset(reset) = &reset.event else {
        unreachable!()
    };
    assert!(!reset.guest, "a QMP reset is not guest-initiated");
}

#[tokio::test]
async fn memdev_shows_the_shared_ram_file() {
    let qemu = Qemu::builder("qmp-memdev").memory_mib(64).paused().spawn();
    let client = connect(&qemu).await;
    let memdevs = client.execute(&QueryMemdev).await.unwrap();
    assert_eq!(memdevs.len(), 1, "{memdevs:?}");
    assert_eq!(memdevs[0].id.as_deref(), Some("mem"));
    assert_eq!(memdevs[0].size, 64 << 20);
    assert!(memdevs[0].share);
    assert_eq!(fs::metadata(qemu.ram_file()).unwrap().len(), 64 << 20);
}

#[tokio::test]
async fn errors_name_the_command_and_carry_qemus_class() {
    let qemu = Qemu::builder("qmp-errors").memory_mib(64).paused().spawn();
    let client = connect(&qemu).await;
    let error = client
        .execute_raw("no-such-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(error.qmp_class(), Some("CommandNotFound"), "{error}");
    let error = client
        .execute(&BlockdevSnapshotInternalSync {
            device: "nonexistent".into(),
            name: "s".into(),
        })
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("blockdev-snapshot-internal-sync"),
        "{error}"
    );
    assert!(error.qmp_class().is_some(), "{error}");
    // The connection is still usable after errors.
    client.execute(&QueryStatus).await.unwrap();
}

#[tokio::test]
async fn quit_closes_the_connection_and_fails_later_calls() {
    let mut qemu = Qemu::builder("qmp-quit").memory_mib(64).paused().spawn();
    let client = connect(&qemu).await;
    let mut events = client.subscribe();
    client.execute(&Quit).await.unwrap();
    let shutdown = events
        .wait_for(EVENT_WAIT, |e| matches!(e, Event::Shutdown(_)))
        .await
        .unwrap();
    let Event::Shutdown(shutdown) = &shutdown.event else {
        unreachable!()
    };
    assert_eq!(shutdown.reason, "host-qmp-quit");
    let reason = tokio::time::timeout(EVENT_WAIT, client.wait_closed())
        .await
        .unwrap();
    assert!(reason.contains("closed"), "{reason}");
    let error = client.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(error, Error::Disconnected { .. }), "{error:?}");
    assert!(
        qemu.wait_exit(EVENT_WAIT).is_some(),
        "QEMU did not exit after quit"
    );
}

/// Creates `path` as a qcow2 image through QEMU's own job API and opens it as node `name`.
async fn create_and_add_qcow2(client: &Client, path: &Path, name: &str, backing: Option<&str>) {
    let job = JobOptions::default();
    let file_node = format!("{name}-file");
    let create_file = BlockdevCreate {
        job_id: format!("{name}-mkfile"),
        options: BlockdevCreateOptions::File {
            filename: path_str(path),
            size: 0,
        },
    };
    client
        .run_job(&create_file, &create_file.job_id, &job)
        .await
        .unwrap();
    client
        .execute(&BlockdevAdd::file(&file_node, path_str(path)))
        .await
        .unwrap();
    let format = BlockdevCreate {
        job_id: format!("{name}-mkqcow2"),
        options: BlockdevCreateOptions::Qcow2(CreateQcow2 {
            file: file_node.clone(),
            size: 16 << 20,
            backing_file: backing.map(str::to_owned),
            backing_fmt: backing.map(|_| "qcow2".to_owned()),
            cluster_size: None,
        }),
    };
    client.run_job(&format, &format.job_id, &job).await.unwrap();
    let mut add = BlockdevAdd::qcow2(name, &file_node);
    if backing.is_some() {
        // An overlay for `blockdev-snapshot` must be added without its backing opened.
        add = add.with("backing", Value::Null);
    }
    client.execute(&add).await.unwrap();
}

async fn flat_nodes(client: &Client) -> Vec<BlockDeviceInfo> {
    client
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap()
}

fn node<'a>(nodes: &'a [BlockDeviceInfo], name: &str) -> &'a BlockDeviceInfo {
    nodes
        .iter()
        .find(|n| n.node_name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("node {name} missing from {nodes:#?}"))
}

fn write_pattern(image: &Path, pattern: u8) {
    testkit::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} 0 64k"),
            &path_str(image),
        ],
    );
}

fn read_matches(image: &Path, pattern: u8) -> bool {
    std::process::Command::new("qemu-io")
        .args([
            "-U",
            "-r",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {pattern} 0 64k"),
            &path_str(image),
        ])
        .output()
        .map(|out| {
            out.status.success()
                && !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed")
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn block_nodes_snapshots_transactions_commit_and_stream() {
    testkit::require_tool("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    testkit::create_qcow2(&base, "16M");
    write_pattern(&base, 0x11);
    let qemu = Qemu::builder("qmp-block")
        .memory_mib(64)
        .paused()
        .disk(&base)
        .spawn();
    let client = connect(&qemu).await;

    let nodes = flat_nodes(&client).await;
    assert_eq!(node(&nodes, "disk-vda").drv, "qcow2");
    assert_eq!(node(&nodes, "disk-vda").image.virtual_size, 16 << 20);
    let block = client.execute(&QueryBlock).await.unwrap();
    assert!(
        block
            .iter()
            .any(|b| b.inserted.as_ref().and_then(|i| i.node_name.as_deref()) == Some("disk-vda")),
        "{block:#?}"
    );

    // Internal snapshots, alone and in a transaction, then deleted.
    client
        .execute(&BlockdevSnapshotInternalSync {
            device: "disk-vda".into(),
            name: "first".into(),
        })
        .await
        .unwrap();
    client
        .execute(&Transaction {
            actions: vec![TransactionAction::BlockdevSnapshotInternalSync(
                BlockdevSnapshotInternalSync {
                    device: "disk-vda".into(),
                    name: "second".into(),
                },
            )],
            properties: None,
        })
        .await
        .unwrap();
    let nodes = flat_nodes(&client).await;
    let names: Vec<_> = node(&nodes, "disk-vda")
        .image
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["first", "second"]);
    let deleted = client
        .execute(&BlockdevSnapshotDeleteInternalSync {
            device: "disk-vda".into(),
            id: None,
            name: Some("first".into()),
        })
        .await
        .unwrap();
    assert_eq!(deleted.name, "first");

    // A transaction that aborts changes nothing.
    let aborted = client
        .execute(&Transaction {
            actions: vec![
                TransactionAction::BlockdevSnapshotInternalSync(BlockdevSnapshotInternalSync {
                    device: "disk-vda".into(),
                    name: "never".into(),
                }),
                TransactionAction::Abort {},
            ],
            properties: None,
        })
        .await;
    assert!(aborted.is_err());
    let nodes = flat_nodes(&client).await;
    assert!(node(&nodes, "disk-vda")
        .image
        .snapshots
        .iter()
        .all(|s| s.name != "never"));
    client
        .execute(&BlockdevSnapshotDeleteInternalSync {
            device: "disk-vda".into(),
            id: None,
            name: Some("second".into()),
        })
        .await
        .unwrap();

    // External overlay with blockdev-snapshot-sync inside a transaction.
    let overlay1 = dir.path().join("overlay1.qcow2");
    client
        .execute(&Transaction {
            actions: vec![TransactionAction::BlockdevSnapshotSync(BlockdevSnapshotSync {
                node_name: Some("disk-vda".into()),
                snapshot_file: path_str(&overlay1),
                snapshot_node_name: Some("ov1".into()),
                format: Some("qcow2".into()),
                ..Default::default()
            })],
            properties: None,
        })
        .await
        .unwrap();
    // External overlay made by blockdev-create + blockdev-add + blockdev-snapshot.
    let overlay2 = dir.path().join("overlay2.qcow2");
    create_and_add_qcow2(&client, &overlay2, "ov2", Some(&path_str(&overlay1))).await;
    client
        .execute(&BlockdevSnapshot {
            node: "ov1".into(),
            overlay: "ov2".into(),
        })
        .await
        .unwrap();
    let nodes = flat_nodes(&client).await;
    assert_eq!(
        node(&nodes, "ov2").backing_file.as_deref(),
        Some(path_str(&overlay1).as_str())
    );
    let chain = client
        .execute(&QueryNamedBlockNodes { flat: Some(false) })
        .await
        .unwrap();
    let ov2_backing = node(&chain, "ov2")
        .image
        .backing_image
        .as_ref()
        .expect("ov2 has a backing image");
    assert_eq!(ov2_backing.filename, path_str(&overlay1));
    assert_eq!(
        ov2_backing
            .backing_image
            .as_ref()
            .expect("overlay1 has a backing image")
            .filename,
        path_str(&base)
    );

    // Stream base's data into ov1 (the middle), then commit the active layer ov2 down into ov1.
    client
        .run_job(
            &BlockStream {
                job_id: "stream".into(),
                device: "ov1".into(),
                base_node: None,
                backing_file: None,
                job: BlockJobOptions::default(),
            },
            "stream",
            &JobOptions::default(),
        )
        .await
        .unwrap();
    client
        .run_job(
            &BlockCommit {
                job_id: "commit".into(),
                device: "ov2".into(),
                base_node: Some("ov1".into()),
                top_node: None,
                backing_file: None,
                job: BlockJobOptions::default(),
            },
            "commit",
            &JobOptions {
                complete_when_ready: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let nodes = flat_nodes(&client).await;
    assert_eq!(
        node(&nodes, "ov1").backing_file,
        None,
        "stream made ov1 self-contained"
    );
    assert!(
        read_matches(&overlay1, 0x11),
        "base's data was streamed into overlay1"
    );
    assert!(
        client.execute(&QueryJobs).await.unwrap().is_empty(),
        "jobs were dismissed"
    );

    // A job QEMU refuses to start fails with the command's error, and no job is left behind.
    let refused = client
        .run_job(
            &BlockCommit {
                job_id: "bad-commit".into(),
                device: "ov1".into(),
                base_node: Some("ov1".into()),
                top_node: Some("ov1".into()),
                backing_file: None,
                job: BlockJobOptions::default(),
            },
            "bad-commit",
            &JobOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Command { command, .. } if command == "block-commit"),
        "{refused:?}"
    );
    assert!(client.execute(&QueryJobs).await.unwrap().is_empty());

    // The committed overlay left the chain; it and its file node can now be deleted, in order.
    let in_use = client
        .execute(&BlockdevDel {
            node_name: "ov2-file".into(),
        })
        .await
        .unwrap_err();
    assert!(in_use.qmp_class().is_some(), "{in_use}");
    client
        .execute(&BlockdevDel {
            node_name: "ov2".into(),
        })
        .await
        .unwrap();
    client
        .execute(&BlockdevDel {
            node_name: "ov2-file".into(),
        })
        .await
        .unwrap();
    let nodes = flat_nodes(&client).await;
    assert!(nodes.iter().all(|n| n.node_name.as_deref() != Some("ov2")));
}

#[tokio::test]
async fn whole_vm_snapshot_jobs_save_load_delete() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vm.qcow2");
    testkit::create_qcow2(&image, "16M");
    let qemu = Qemu::builder("qmp-vmsnap")
        .memory_mib(64)
        .paused()
        .disk(&image)
        .spawn();
    let client = connect(&qemu).await;
    let devices = vec!["disk-vda".to_string()];
    let job = JobOptions::default();
    let save = SnapshotSave {
        job_id: "save".into(),
        tag: "vm1".into(),
        vmstate: "disk-vda".into(),
        devices: devices.clone(),
    };
    client.run_job(&save, "save", &job).await.unwrap();
    let nodes = flat_nodes(&client).await;
    let snapshot = &node(&nodes, "disk-vda").image.snapshots[0];
    assert_eq!(snapshot.name, "vm1");
    assert!(snapshot.vm_state_size > 0, "the snapshot holds VM state");

    let load = SnapshotLoad {
        job_id: "load".into(),
        tag: "vm1".into(),
        vmstate: "disk-vda".into(),
        devices: devices.clone(),
    };
    client.run_job(&load, "load", &job).await.unwrap();

    // Loading a snapshot that does not exist fails with QEMU's reason.
    let missing = SnapshotLoad {
        job_id: "load2".into(),
        tag: "nope".into(),
        vmstate: "disk-vda".into(),
        devices: devices.clone(),
    };
    let error = client.run_job(&missing, "load2", &job).await.unwrap_err();
    assert!(
        matches!(&error, Error::JobFailed { job_id, .. } if job_id == "load2"),
        "{error:?}"
    );

    client
        .run_job(
            &SnapshotDelete {
                job_id: "del".into(),
                tag: "vm1".into(),
                devices,
            },
            "del",
            &job,
        )
        .await
        .unwrap();
    let nodes = flat_nodes(&client).await;
    assert!(node(&nodes, "disk-vda").image.snapshots.is_empty());
}

async fn wait_migration(client: &Client, want: MigrationStatus) -> MigrationInfo {
    for _ in 0..500 {
        let info = client.execute(&QueryMigrate).await.unwrap();
        match &info.status {
            Some(status) if *status == want => return info,
            Some(MigrationStatus::Failed) => panic!("migration failed: {info:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("migration did not reach {want}");
}

#[tokio::test]
async fn device_state_and_migration_to_file_and_back() {
    let source = Qemu::builder("qmp-mig-src").memory_mib(64).paused().spawn();
    let client = connect(&source).await;

    let devstate = source.dir().join("devstate");
    client
        .execute(&XenSaveDevicesState {
            filename: path_str(&devstate),
            live: false,
        })
        .await
        .unwrap();
    let saved = fs::read(&devstate).unwrap();
    assert!(saved.starts_with(b"QEVM"), "device state has QEMU's stream magic");

    client
        .execute(&MigrateSetCapabilities {
            capabilities: vec![MigrationCapabilityStatus {
                capability: MigrationCapability::Events,
                state: true,
            }],
        })
        .await
        .unwrap();
    client
        .execute(&MigrateSetParameters {
            downtime_limit: Some(500),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut events = client.subscribe();
    let stream = source.dir().join("stream");
    client
        .execute(&Migrate {
            uri: format!("file:{}", path_str(&stream)),
        })
        .await
        .unwrap();
    let info = wait_migration(&client, MigrationStatus::Completed).await;
    // RAM plus the firmware ROM blocks.
    assert!(
        info.ram.as_ref().is_some_and(|ram| ram.total >= 64 << 20),
        "{info:?}"
    );
    events
        .wait_for(
            EVENT_WAIT,
            |e| matches!(e, Event::Migration(m) if m.status == MigrationStatus::Completed),
        )
        .await
        .unwrap();
    assert_eq!(
        client.execute(&QueryStatus).await.unwrap().status,
        RunState::PostMigrate
    );

    let target = Qemu::builder("qmp-mig-dst")
        .memory_mib(64)
        .paused()
        .arg("-incoming")
        .arg("defer")
        .spawn();
    let target_client = connect(&target).await;
    assert_eq!(
        target_client.execute(&QueryStatus).await.unwrap().status,
        RunState::InMigrate
    );
    target_client
        .execute(&MigrateIncoming {
            uri: format!("file:{}", path_str(&stream)),
        })
        .await
        .unwrap();
    wait_migration(&target_client, MigrationStatus::Completed).await;
}

#[tokio::test]
async fn file_descriptors_pass_over_the_socket() {
    let qemu = Qemu::builder("qmp-fds").memory_mib(64).paused().spawn();
    let client = connect(&qemu).await;

    // getfd + migrate fd:NAME proves QEMU received a working descriptor.
    let target: PathBuf = qemu.dir().join("via-fd");
    let file = fs::File::create(&target).unwrap();
    client.getfd("migfd", file.as_fd()).await.unwrap();
    client
        .execute(&Migrate {
            uri: "fd:migfd".into(),
        })
        .await
        .unwrap();
    wait_migration(&client, MigrationStatus::Completed).await;
    drop(file);
    let written = fs::read(&target).unwrap();
    assert!(
        written.starts_with(b"QEVM") && written.len() > 1 << 16,
        "{} bytes",
        written.len()
    );

    // getfd then closefd; closing twice fails.
    let spare = tempfile::tempfile().unwrap();
    client.getfd("spare", spare.as_fd()).await.unwrap();
    client.closefd("spare").await.unwrap();
    assert!(client.closefd("spare").await.is_err());

    // add-fd / remove-fd with fd sets.
    let info = client.add_fd(None, spare.as_fd(), Some("test")).await.unwrap();
    let again = client
        .add_fd(Some(info.fdset_id), spare.as_fd(), None)
        .await
        .unwrap();
    assert_eq!(again.fdset_id, info.fdset_id);
    assert_ne!(again.fd, info.fd);
    client.remove_fd(info.fdset_id, Some(info.fd)).await.unwrap();
    client.remove_fd(info.fdset_id, None).await.unwrap();
    let raw = client.execute_raw("query-fdsets", Value::Null).await.unwrap();
    assert_eq!(raw, json!([]), "fd set removed");
}

#[tokio::test]
async fn many_tasks_share_one_connection() {
    let qemu = Qemu::builder("qmp-concurrent").memory_mib(64).paused().spawn();
    let client = connect(&qemu).await;
    let tasks: Vec<_> = (0..16)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    if n % 2 == 0 {
                        client.execute(&QueryStatus).await.unwrap();
                    } else {
                        client.execute(&QueryVersion).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn out_of_band_execution_is_negotiated_and_used() {
    let qemu = Qemu::builder("qmp-oob").memory_mib(64).paused().spawn();
    let options = ClientOptions {
        enable_oob: true,
        ..Default::default()
    };
    let client = Client::connect_unix(qemu.qmp_socket(), options).await.unwrap();
    assert!(
        client.greeting().capabilities.iter().any(|c| c == "oob"),
        "QEMU 10 offers oob"
    );
    assert!(client.oob_enabled());
    // `migrate-pause` allows out-of-band execution; without a post-copy migration QEMU refuses it,
    // which proves the exec-oob request reached the out-of-band dispatcher and was answered.
    let error = client
        .execute_oob_raw("migrate-pause", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(error.qmp_class(), Some("GenericError"), "{error}");
    // In-band commands still work on an oob-enabled connection.
    assert_eq!(
        client.execute(&QueryStatus).await.unwrap().status,
        RunState::Prelaunch
    );
    // A command that does not allow oob is refused as such.
    let refused = client
        .execute_oob_raw("query-status", Value::Null)
        .await
        .unwrap_err();
    assert!(refused.qmp_class().is_some(), "{refused}");
}

/// QEMU serves one QMP connection per socket and sends the reply to a command whose client went
/// away to whoever is connected when the command finishes. A client killed in the middle of a
/// slow command must not break the next client: its handshake and first command work at once.
#[tokio::test]
async fn a_new_client_works_at_once_after_one_was_killed_mid_command() {
    use std::io::Read;

    let qemu = Qemu::builder("qmp-stale").memory_mib(64).paused().spawn();
    // The slow command: `dump-guest-memory` into a FIFO. QEMU's main loop opens it and writes
    // the dump synchronously, so it blocks once the pipe is full, until the test drains it.
    let fifo = qemu.dir().join("dump.fifo");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (drain, drain_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            let mut file = fs::File::open(&fifo).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = file.read(&mut buf).unwrap();
            started_tx.send(()).unwrap();
            drain_rx.recv().unwrap();
            loop {
                match file.read(&mut buf).unwrap() {
                    0 => break total,
                    n => total += n,
                }
            }
        }
    });

    let doomed = connect(&qemu).await;
    let dump = tokio::spawn({
        let doomed = doomed.clone();
        let protocol = format!("file:{}", path_str(&fifo));
        async move {
            doomed
                .execute_raw(
                    "dump-guest-memory",
                    json!({"paging": false, "protocol": protocol}),
                )
                .await
        }
    });
    tokio::time::timeout(EVENT_WAIT, started)
        .await
        .expect("QEMU started the dump")
        .unwrap();
    // The client dies mid-command: its socket closes, as the kernel closes a killed process's.
    doomed.close();
    drop(doomed);
    let error = dump.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Disconnected { .. }), "{error:?}");

    // The next client connects while the dump still runs. Once QEMU greets it, the dump may
    // finish: its reply then reaches the new connection, before the handshake's own reply.
    let stream = tokio::net::UnixStream::connect(qemu.qmp_socket()).await.unwrap();
    tokio::time::timeout(EVENT_WAIT, stream.readable())
        .await
        .expect("QEMU greets a new client while a command runs (its monitor I/O thread accepts)")
        .unwrap();
    drain.send(()).unwrap();
    let options = ClientOptions {
        command_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let client = Client::from_unix_stream(stream, options)
        .await
        .expect("the handshake after a killed client");
    assert_eq!(
        client.execute(&QueryStatus).await.unwrap().status,
        RunState::Prelaunch
    );
    assert!(client.closed_reason().is_none(), "{:?}", client.closed_reason());
    let dumped = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert!(dumped > 64 << 20, "the dump completed: {dumped} bytes");
}

/// A job that outlives its timeout is cancelled and dismissed, not left running (it would keep
/// its nodes busy: the next snapshot or commit on the disk would fail).
#[tokio::test]
async fn a_job_past_its_timeout_is_cancelled_not_left_running() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    testkit::create_qcow2(&base, "16M");
    testkit::run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 0 16M", &path_str(&base)],
    );
    let qemu = Qemu::builder("qmp-job-timeout")
        .memory_mib(64)
        .paused()
        .disk(&base)
        .spawn();
    let client = connect(&qemu).await;
    let top = dir.path().join("top.qcow2");
    create_and_add_qcow2(&client, &top, "top", Some(&path_str(&base))).await;
    client
        .execute(&BlockdevSnapshot {
            node: "disk-vda".into(),
            overlay: "top".into(),
        })
        .await
        .unwrap();
    // 16 MiB at 64 KiB/s: minutes, far past the timeout.
    let stream = BlockStream {
        job_id: "slow".into(),
        device: "top".into(),
        base_node: None,
        backing_file: None,
        job: BlockJobOptions {
            speed: Some(64 << 10),
            ..BlockJobOptions::default()
        },
    };
    let options = JobOptions {
        timeout: Some(Duration::from_millis(300)),
        ..JobOptions::default()
    };
    let error = client.run_job(&stream, "slow", &options).await.unwrap_err();
    assert!(error.to_string().contains("it was cancelled"), "{error}");
    assert!(
        client.execute(&QueryJobs).await.unwrap().is_empty(),
        "the job is gone"
    );
}
