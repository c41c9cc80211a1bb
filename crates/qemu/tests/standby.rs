//! A revert's standby QEMU on a real QEMU 10: started beside the running QEMU on the same
//! qcow2 image (inactive, no locks), it takes over after the old one ended and the image was
//! reverted offline, and runs the reverted disk; a failed or discarded standby leaves the
//! running QEMU as it was; a live external revert writes its overlay while the old QEMU runs.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use disk::{DiskSnapshots, OfflineBackend};
use snapshot_core::{DomainState, Hypervisor, IncomingRam, IncomingStart, Name, Standby};
use testkit::Workload;

mod common;

use common::{
    first_tick_from, last_tick, overlay_on, save_memory_and_devices, serial_lines, vda, wait_tick_after,
    State, BOOT, WAIT,
};

/// A run slot's folder.
fn slot_dir(state: &State, name: &Name, slot: &str) -> PathBuf {
    state.path().join("domains").join(name.as_str()).join(slot)
}

/// The pid of the live QEMU of a run slot.
fn slot_pid(state: &State, name: &Name, slot: &str) -> Option<u32> {
    let pid: u32 = fs::read_to_string(slot_dir(state, name, slot).join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| !cmdline.is_empty())
        .then_some(pid)
}

/// The tick of the guest's disk marker.
fn marker_tick(path: &Path) -> u64 {
    let marker = testkit::read_disk_marker(path).expect("the guest wrote no marker");
    marker.rsplit('=').next().unwrap().parse().unwrap()
}

/// Waits until the guest's disk marker passes `after`; its tick.
async fn marker_passes(path: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(tick) = testkit::read_disk_marker(path).map(|_| marker_tick(path)) {
            if tick > after {
                return tick;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the guest's disk marker did not pass {after} on {}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_the_running_qemu_with_the_reverted_disk() {
    let mut state = State::new();
    let (name, disk) = state
        .started_on_disk("standby", Some(Workload::Idle), false)
        .await;
    let driver = state.driver();
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    wait_tick_after(&log, 2, BOOT).await;
    marker_passes(&disk, 1).await;

    // A paused create: RAM, device state and an internal disk snapshot, then the guest runs on
    // and writes past the snapshot.
    let image = state.path().join("memory.img");
    let devices = state.path().join("devices.bin");
    save_memory_and_devices(&driver, &name, &image, &devices).await;
    let live = driver.disk_backend(&name).await.unwrap();
    live.create_internal(std::slice::from_ref(&disk), "s1")
        .await
        .unwrap();
    drop(live);
    let (tick_at_save, marker_at_save) = (last_tick(&log).unwrap(), marker_tick(&disk));
    let recorded = driver.config(&name).await.unwrap();
    let disks = driver.disks(&name).await.unwrap();
    assert_eq!(disks, [vda(&disk)]);
    Hypervisor::resume(&driver, &name).await.unwrap();
    let written_later = marker_passes(&disk, marker_at_save + 3).await;

    // The standby starts beside the running QEMU, which answers and runs on.
    let old_pid = driver.status(&name).await.unwrap().pid.unwrap();
    let started = driver
        .start_standby(&name, &recorded, &disks, IncomingRam::Image(&image))
        .await
        .unwrap();
    assert_eq!(started, Standby::Started(IncomingStart::Mapped));
    let standby_pid = slot_pid(&state, &name, "run-1").expect("the standby runs");
    assert_ne!(standby_pid, old_pid);
    let status = driver.status(&name).await.unwrap();
    assert_eq!((status.state, status.pid), (DomainState::Running, Some(old_pid)));
    let now = last_tick(&log).unwrap();
    wait_tick_after(&log, now, WAIT).await;

    // The standby loads the device state while the old QEMU still runs, and keeps its disks
    // inactive; a state that does not load is an error, before anything was stopped.
    let damaged = state.path().join("damaged.bin");
    std::fs::write(&damaged, b"not a device state").unwrap();
    assert!(driver.load_standby_device_state(&name, &damaged).await.is_err());
    Hypervisor::discard_standby(&driver, &name).await.unwrap();
    driver
        .start_standby(&name, &recorded, &disks, IncomingRam::Image(&image))
        .await
        .unwrap();
    let standby_pid = slot_pid(&state, &name, "run-1").expect("the standby runs");
    driver.load_standby_device_state(&name, &devices).await.unwrap();
    let now = last_tick(&log).unwrap();
    wait_tick_after(&log, now, WAIT).await;
    assert_eq!(driver.status(&name).await.unwrap().pid, Some(old_pid));

    // The switch: the old QEMU ends (the standby stays), the disk is reverted offline (the
    // standby holds no lock on it), the domain defined and the standby promoted.
    Hypervisor::destroy(&driver, &name).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::ShutOff);
    assert_eq!(slot_pid(&state, &name, "run-1"), Some(standby_pid));
    let offline = driver.disk_backend(&name).await.unwrap();
    offline
        .apply_internal(std::slice::from_ref(&disk), "s1")
        .await
        .unwrap();
    assert_eq!(marker_tick(&disk), marker_at_save);
    Hypervisor::define(&driver, &name, &recorded, &disks)
        .await
        .unwrap();
    driver.promote_standby(&name).await.unwrap();
    assert!(
        !slot_dir(&state, &name, "run").exists(),
        "the old slot's files stay"
    );
    let status = driver.status(&name).await.unwrap();
    assert_eq!(
        (status.state, status.pid, status.mapped_image.as_deref()),
        (DomainState::Paused, Some(standby_pid), Some(image.as_path()))
    );
    // The serial log also holds what the guest printed on the old QEMU after the save.
    let printed_before = serial_lines(&log).len();
    Hypervisor::resume(&driver, &name).await.unwrap();

    // The guest goes on where it was saved, on the reverted disk.
    let resumed = first_tick_from(&log, printed_before).await;
    assert!(
        resumed <= tick_at_save + 2,
        "saved at {tick_at_save}, resumed at {resumed}"
    );
    let written = marker_passes(&disk, marker_at_save).await;
    assert!(
        written < written_later,
        "the new QEMU wrote tick {written}, the old one had reached {written_later}"
    );
    let status = driver.status(&name).await.unwrap();
    assert_eq!(
        (status.state, status.pid),
        (DomainState::Running, Some(standby_pid))
    );

    // It ends like any domain, its image is consistent, and a normal start follows.
    driver.stop(&name, qemu::StopMode::Force).await.unwrap();
    assert!(!slot_dir(&state, &name, "run-1").exists());
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    driver.start(&name, true).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Paused);
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_cannot_start_leaves_the_running_qemu_and_no_files() {
    let mut state = State::new();
    let (name, _) = state
        .started_on_disk("badstandby", Some(Workload::Idle), false)
        .await;
    let driver = state.driver();
    let old_pid = driver.status(&name).await.unwrap().pid.unwrap();
    let recorded = driver.config(&name).await.unwrap();
    let missing = state.path().join("missing.qcow2");

    let error = driver
        .start_standby(&name, &recorded, &[vda(&missing)], IncomingRam::Fresh)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("QEMU failed to start domain badstandby") && error.contains("missing.qcow2"),
        "{error}"
    );
    let status = driver.status(&name).await.unwrap();
    assert_eq!((status.state, status.pid), (DomainState::Running, Some(old_pid)));
    assert!(!slot_dir(&state, &name, "run-1").exists());
    let ram = driver.runtime_paths(&name).unwrap().ram_file;
    let standby_ram = ram.to_str().unwrap().replace(".ram", "+1.ram");
    assert!(ram.exists() && !Path::new(&standby_ram).exists());
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_or_stale_standby_ends_and_the_running_qemu_goes_on() {
    let mut state = State::new();
    let (name, disk) = state
        .started_on_disk("discard", Some(Workload::Idle), false)
        .await;
    let driver = state.driver();
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    wait_tick_after(&log, 1, BOOT).await;
    let old_pid = driver.status(&name).await.unwrap().pid.unwrap();
    let recorded = driver.config(&name).await.unwrap();
    let disks = [vda(&disk)];

    let started = driver
        .start_standby(&name, &recorded, &disks, IncomingRam::Fresh)
        .await
        .unwrap();
    assert_eq!(started, Standby::Started(IncomingStart::Fresh { fallback: None }));
    let standby_pid = slot_pid(&state, &name, "run-1").unwrap();
    // Its RAM, to restore memory into before the switch, is its own shared RAM file.
    let ram = driver.standby_guest_memory(&name).await.unwrap();
    assert_eq!(ram.size(), 128 << 20);
    drop(ram);
    // Not while the old QEMU runs.
    let error = driver.promote_standby(&name).await.unwrap_err().to_string();
    assert!(
        error.contains("cannot promote the standby QEMU of domain discard"),
        "{error}"
    );

    driver.discard_standby(&name).await.unwrap();
    assert_eq!(slot_pid(&state, &name, "run-1"), None);
    assert!(!slot_dir(&state, &name, "run-1").exists());
    assert!(
        fs::read(format!("/proc/{standby_pid}/cmdline")).map_or(true, |cmdline| cmdline.is_empty()),
        "the standby still runs"
    );
    driver.discard_standby(&name).await.unwrap();
    let status = driver.status(&name).await.unwrap();
    assert_eq!((status.state, status.pid), (DomainState::Running, Some(old_pid)));
    let now = last_tick(&log).unwrap();
    wait_tick_after(&log, now, WAIT).await;
    let error = driver.promote_standby(&name).await.unwrap_err().to_string();
    assert!(error.contains("cannot promote"), "{error}");

    // A standby an interrupted revert left behind (its old QEMU gone) is ended by the next
    // start; a shut-off domain gets none.
    driver
        .start_standby(&name, &recorded, &disks, IncomingRam::Fresh)
        .await
        .unwrap();
    Hypervisor::destroy(&driver, &name).await.unwrap();
    assert!(
        slot_pid(&state, &name, "run-1").is_some(),
        "destroy ends the standby"
    );
    let unavailable = driver
        .start_standby(&name, &recorded, &disks, IncomingRam::Fresh)
        .await
        .unwrap();
    assert_eq!(
        unavailable,
        Standby::Unavailable {
            reason: "domain discard is not running".into()
        }
    );
    driver.start(&name, true).await.unwrap();
    assert_eq!(slot_pid(&state, &name, "run-1"), None);
    assert!(!slot_dir(&state, &name, "run-1").exists());
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Paused);
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_overlay_is_created_while_the_old_qemu_runs_but_never_on_its_active_image() {
    let mut state = State::new();
    let (name, base) = state.started_on_disk("liverevert", None, true).await;
    let driver = state.driver();
    let live = driver.disk_backend(&name).await.unwrap();
    let overlay = state.path().join("base-1.qcow2");
    live.create_external(&[overlay_on(&base, &overlay)])
        .await
        .unwrap();

    // The snapshot's image is the running QEMU's read-only backing file: fine.
    let reverted = state.path().join("base-2.qcow2");
    live.revert_external(&overlay_on(&base, &reverted)).await.unwrap();
    assert_eq!(
        OfflineBackend.backing_file(&reverted).await.unwrap(),
        Some(base.clone())
    );
    // The image QEMU writes: refused, nothing created.
    let refused = state.path().join("base-3.qcow2");
    let error = live
        .revert_external(&overlay_on(&overlay, &refused))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("the running QEMU writes"), "{error}");
    assert!(!refused.exists());
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Paused);
    // The definition still names the running QEMU's image.
    assert_eq!(driver.disks(&name).await.unwrap(), [vda(&overlay)]);
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

/// Whether something accepts TCP connections on the host's `port`.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_gets_the_host_port_forwards_when_it_takes_over() {
    let mut state = State::new();
    // A free port, for the domain's forward.
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = state.config("fwd", Some(Workload::Idle), &[]);
    config.nics.push(qemu::NicConfig {
        kind: qemu::NicType::User,
        model: None,
        mac: None,
        hostfwd: vec![format!("tcp:127.0.0.1:{port}-:80")],
        ifname: None,
        br: None,
    });
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&config.name, false).await.unwrap();
    let name = config.name.clone();
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    wait_tick_after(&log, 1, BOOT).await;
    assert!(listening(port), "the running QEMU forwards port {port}");

    let image = state.path().join("memory.img");
    let devices = state.path().join("devices.bin");
    save_memory_and_devices(&driver, &name, &image, &devices).await;
    let recorded = driver.config(&name).await.unwrap();
    Hypervisor::resume(&driver, &name).await.unwrap();

    // The standby starts although the running QEMU holds the port: it starts without it.
    let started = driver
        .start_standby(&name, &recorded, &[], IncomingRam::Image(&image))
        .await
        .unwrap();
    assert_eq!(started, Standby::Started(IncomingStart::Mapped));
    driver.load_standby_device_state(&name, &devices).await.unwrap();
    Hypervisor::destroy(&driver, &name).await.unwrap();
    assert!(
        !listening(port),
        "nothing forwards the port between the two QEMUs"
    );
    Hypervisor::define(&driver, &name, &recorded, &[]).await.unwrap();
    driver.promote_standby(&name).await.unwrap();
    assert!(listening(port), "the new QEMU forwards port {port}");
    Hypervisor::resume(&driver, &name).await.unwrap();
    let resumed_from = serial_lines(&log).len();
    first_tick_from(&log, resumed_from).await;
    assert!(listening(port));

    // A port someone else took meanwhile: the takeover says which forward failed.
    driver
        .start_standby(&name, &recorded, &[], IncomingRam::Fresh)
        .await
        .unwrap();
    Hypervisor::destroy(&driver, &name).await.unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    Hypervisor::define(&driver, &name, &recorded, &[]).await.unwrap();
    let error = driver.promote_standby(&name).await.unwrap_err().to_string();
    assert!(
        error.contains(&format!("{port}")) && error.contains("cannot forward"),
        "{error}"
    );
    drop(squatter);
    Hypervisor::destroy(&driver, &name).await.unwrap();
}
