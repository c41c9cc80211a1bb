//! The memory engine on a real QEMU 10 domain: live-save the RAM of a guest that keeps dirtying
//! memory, pause, finish, save the device state, restore everything into a new QEMU through
//! `-incoming defer`, resume, and check the guest continues from the counter it had when paused.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs::OpenOptions,
    path::Path,
    time::{Duration, Instant},
};

use memory::{
    restore, verify, ContentCompare, ConvergencePolicy, Durability, GuestMemory, ImageLayout, ImageWriter,
    LiveSave, RestoreOptions, SaveOptions,
};
use qmp::{commands::*, Client, ClientOptions, Event, MigrationStatus, RunState};
use serde_json::json;
use testkit::{Qemu, Workload};

const RAM_MIB: u64 = 256;
const BOOT: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(20);

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 test path").to_owned()
}

/// Maps a QEMU's RAM file where QEMU says it sits in guest-physical memory.
fn map_ram(runtime: &tokio::runtime::Runtime, qemu: &Qemu, qmp: &Client) -> GuestMemory {
    let regions = runtime
        .block_on(qemu::ram_layout(qmp))
        .expect("read the RAM layout");
    GuestMemory::from_ram_file(&qemu.ram_file(), &regions).expect("map QEMU's RAM file")
}

async fn connect(qemu: &Qemu) -> Client {
    Client::connect_unix(qemu.qmp_socket(), ClientOptions::default())
        .await
        .expect("connect QMP")
}

#[test]
fn live_save_then_restore_into_a_new_qemu_continues_the_guest() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("ram.img");
    let devstate = work.path().join("devstate");
    let workload = Workload::Dirty {
        rate_mib: 16,
        wss_mib: 32,
    };

    // Source: a guest rewriting 32 MiB at 16 MiB/s.
    let source = Qemu::builder("mem-src")
        .memory_mib(RAM_MIB)
        .guest(workload.clone())
        .spawn();
    source.wait_for_serial("DOMSNAP READY", BOOT);
    source
        .try_wait_for_tick_after(1, WAIT)
        .expect("the source guest ticks");
    let qmp = runtime.block_on(connect(&source));

    let ram = map_ram(&runtime, &source, &qmp);
    let writer = ImageWriter::create(&image, ImageLayout::of(&ram), Durability::Sync).unwrap();
    let options = SaveOptions {
        policy: ConvergencePolicy {
            max_rounds: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut save = LiveSave::begin(&ram, Box::new(ContentCompare::new()), Box::new(writer), options).unwrap();
    save.precopy().unwrap();
    assert!(!save.rounds().is_empty());

    // Pause, copy the last dirty pages, save the devices. The guest must not run in between.
    let paused_at = Instant::now();
    runtime.block_on(async {
        let mut events = qmp.subscribe();
        qmp.execute(&Stop).await.unwrap();
        events.wait_for(WAIT, |e| matches!(e, Event::Stop)).await.unwrap();
    });
    let finished = save.finish().unwrap();
    runtime
        .block_on(qmp.execute(&XenSaveDevicesState {
            filename: path_str(&devstate),
            live: false,
        }))
        .unwrap();
    let pause = paused_at.elapsed();
    // `xen-save-devices-state` writes no configuration section; a QEMU restoring with default
    // migration settings needs one (the driver adds it the same way).
    let machine = runtime
        .block_on(qmp.execute_raw("qom-get", json!({ "path": "/machine", "property": "type" })))
        .unwrap();
    let machine = machine.as_str().unwrap().strip_suffix("-machine").unwrap();
    let saved = std::fs::read(&devstate).unwrap();
    let mut configured = qemu::device_state_prefix(machine).unwrap();
    configured.extend_from_slice(&saved[qemu::DEVICE_STATE_HEADER.len()..]);
    std::fs::write(&devstate, configured).unwrap();
    let tick_at_pause = source.last_tick().expect("the source ticked");
    let summary = finished.seal().unwrap();
    assert!(summary.present_pages > 0);
    eprintln!(
        "live save: {} rounds, pause {pause:?} (memory part {:?})",
        summary.rounds.len(),
        summary.final_pause()
    );
    runtime.block_on(qmp.execute(&Quit)).unwrap();
    drop(source);
    assert_eq!(verify(&image).unwrap().present_pages, summary.present_pages);

    // Target: same machine, waiting for incoming state, RAM restored from the image.
    let target = Qemu::builder("mem-dst")
        .memory_mib(RAM_MIB)
        .guest(workload)
        .incoming_defer()
        .paused()
        .spawn();
    let target_qmp = runtime.block_on(connect(&target));
    let status = runtime.block_on(target_qmp.execute(&QueryStatus)).unwrap();
    assert_eq!(status.status, RunState::InMigrate);
    // Restore only writes: the RAM file must exist with the right size.
    let ram_file = OpenOptions::new().read(true).open(target.ram_file()).unwrap();
    assert_eq!(ram_file.metadata().unwrap().len(), RAM_MIB << 20);
    restore(
        &image,
        &map_ram(&runtime, &target, &target_qmp),
        &RestoreOptions::default(),
    )
    .unwrap();

    runtime.block_on(async {
        target_qmp
            .execute(&MigrateIncoming {
                uri: format!("file:{}", path_str(&devstate)),
            })
            .await
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let info = target_qmp.execute(&QueryMigrate).await.unwrap();
            match info.status {
                Some(MigrationStatus::Completed) => break,
                Some(MigrationStatus::Failed) => {
                    panic!("loading the device state failed: {info:?}\n{}", target.stderr())
                }
                _ if Instant::now() > deadline => panic!("device state not loaded in time: {info:?}"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        target_qmp.execute(&Cont).await.unwrap();
    });

    // The guest continues: its first tick after the restore follows the last one before the pause
    // (one more is allowed when the pause cut a tick line in half between the two serial logs).
    let resumed = target
        .try_wait_for_tick_after(0, WAIT)
        .expect("the restored guest ticks");
    assert!(
        (tick_at_pause..=tick_at_pause + 2).contains(&resumed),
        "restored guest printed tick {resumed}, the source had reached {tick_at_pause}"
    );
    let later = target
        .try_wait_for_tick_after(resumed, WAIT)
        .expect("the restored guest keeps ticking");
    assert_eq!(later, resumed + 1);
    assert!(
        target
            .serial_lines()
            .iter()
            .all(|l| !matches!(l, testkit::SerialLine::Ready { .. })),
        "the guest rebooted"
    );
}
