//! The domain driver on a real QEMU 10 with the test guest: lifecycle and supervision across
//! driver instances (as separate CLI processes would use it), a crashed QEMU, the revert
//! mechanism (RAM through the shared file, device state through QEMU), and the disk backend
//! that follows the domain's state.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs,
    io::Write,
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use memory::{restore, save_paused, Durability, ImageLayout, ImageWriter, RestoreOptions, ZeroPages};
use qemu::{DomainStatus, StopMode};
use snapshot_core::{DiskTarget, DomainState, Hypervisor, IncomingRam, Name};
use testkit::{SerialLine, Workload};

mod common;

use common::{
    first_tick_from, last_tick, overlay_on, serial_lines, vda, wait_serial, wait_tick_after, State, BOOT,
    WAIT,
};

fn status(name: &Name, state: DomainState, pid: Option<u32>) -> DomainStatus {
    DomainStatus {
        name: name.clone(),
        state,
        pid,
        mapped_image: None,
        accel: qemu::Accel::Tcg,
        guest_agent_socket: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_starts_pauses_resumes_and_stops_across_driver_instances() {
    let mut state = State::new();
    let config = state.config("life", Some(Workload::Idle), &[]);
    let name = config.name.clone();
    let driver = state.driver();
    let unknown = Name::new("nobody").unwrap();
    assert_eq!(
        driver.start(&unknown, false).await.unwrap_err().to_string(),
        "domain nobody is not defined"
    );

    driver.define(&config).await.unwrap();
    driver.start(&name, false).await.unwrap();
    let running = driver.status(&name).await.unwrap();
    let pid = running.pid.expect("a running domain has a pid");
    assert_eq!(running, status(&name, DomainState::Running, Some(pid)));
    let error = driver.start(&name, false).await.unwrap_err().to_string();
    assert!(
        error.contains("cannot start domain life while its QEMU runs"),
        "{error}"
    );
    let error = driver.define(&config).await.unwrap_err().to_string();
    assert!(error.contains("cannot redefine domain life"), "{error}");

    let paths = driver.runtime_paths(&name).unwrap();
    assert_eq!(
        paths.serial_log,
        state
            .path()
            .canonicalize()
            .unwrap()
            .join("domains/life/serial.log")
    );
    let first = wait_tick_after(&paths.serial_log, 0, BOOT).await;

    driver.pause(&name).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Paused);
    let at_pause = last_tick(&paths.serial_log).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // One line may have been on its way out when the vCPU stopped.
    assert!(
        last_tick(&paths.serial_log).unwrap() <= at_pause + 1,
        "ticks went on while paused"
    );
    driver.resume(&name).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Running);
    wait_tick_after(&paths.serial_log, at_pause.max(first) + 1, WAIT).await;

    // Another driver (another CLI process) sees the state while this one holds its QMP
    // connection, and can drive the domain once this one lets go of it.
    let other = state.driver();
    let asked = Instant::now();
    assert_eq!(
        other.status(&name).await.unwrap(),
        status(&name, DomainState::Running, Some(pid))
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the state query waited for QMP"
    );
    drop(driver);
    assert_eq!(
        other.list().await.unwrap(),
        [status(&name, DomainState::Running, Some(pid))]
    );
    other.stop(&name, StopMode::Force).await.unwrap();
    assert_eq!(
        other.status(&name).await.unwrap(),
        status(&name, DomainState::ShutOff, None)
    );
    assert!(!state.path().join("domains/life/run").exists());
    assert!(!paths.ram_file.exists());
    assert!(paths.serial_log.exists(), "the serial log outlives the run");
    let error = other.stop(&name, StopMode::Force).await.unwrap_err().to_string();
    assert_eq!(error, "domain life is shut off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_found_dead_and_cleaned_up() {
    let mut state = State::new();
    let config = state.config("crash", None, &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&name, true).await.unwrap();
    let paused = driver.status(&name).await.unwrap();
    assert_eq!(paused.state, DomainState::Paused, "started with -S");
    let ram_file = driver.runtime_paths(&name).unwrap().ram_file;
    assert_eq!(fs::metadata(&ram_file).unwrap().len(), 128 << 20);

    let pid = paused.pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Seen from another process, which also cleans up.
    let other = state.driver();
    let deadline = Instant::now() + WAIT;
    while other.status(&name).await.unwrap().state != DomainState::ShutOff {
        assert!(Instant::now() < deadline, "QEMU did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!state.path().join("domains/crash/run").exists());
    assert!(!ram_file.exists());

    // The first driver's connection to the dead QEMU is replaced.
    driver.start(&name, true).await.unwrap();
    let again = driver.status(&name).await.unwrap();
    assert_eq!(again.state, DomainState::Paused);
    assert_ne!(again.pid, Some(pid));
    Hypervisor::destroy(&driver, &name).await.unwrap();
    Hypervisor::destroy(&driver, &name).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::ShutOff);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_powers_the_guest_off_and_fails_clearly_when_it_cannot() {
    let mut state = State::new();
    let config = state.config("button", Some(Workload::Idle), &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&name, true).await.unwrap();
    let quick = StopMode::Clean {
        timeout: Duration::from_secs(1),
    };
    let error = driver.stop(&name, quick).await.unwrap_err().to_string();
    assert!(
        error.contains("domain button is prelaunch: its vCPUs cannot react to the power button"),
        "{error}"
    );
    // Before its workload runs, nothing in the guest acts on the button.
    driver.resume(&name).await.unwrap();
    let error = driver.stop(&name, quick).await.unwrap_err().to_string();
    assert_eq!(
        error,
        "domain button: the guest did not power off within 1 s; use --force"
    );
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Running);
    // The test guest's workload powers off on the button.
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    wait_tick_after(&log, 0, BOOT).await;
    let patient = StopMode::Clean {
        timeout: Duration::from_secs(60),
    };
    driver.stop(&name, patient).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::ShutOff);
    assert!(fs::read_to_string(&log).unwrap().contains("DOMSNAP POWER-OFF"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_errors_carry_qemus_message_and_leave_nothing_behind() {
    let mut state = State::new();
    let missing = state.path().join("missing.qcow2");
    let config = state.config("broken", None, std::slice::from_ref(&missing));
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    let error = driver.start(&name, true).await.unwrap_err().to_string();
    assert!(
        error.contains("QEMU failed to start domain broken") && error.contains("missing.qcow2"),
        "{error}"
    );
    assert!(!state.path().join("domains/broken/run").exists());
    assert!(!driver.runtime_paths(&name).unwrap().ram_file.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_state_that_qemu_cannot_load_fails_with_qemus_reason() {
    let mut state = State::new();
    let config = state.config("badstate", None, &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start_incoming(&name, IncomingRam::Fresh).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Paused);

    let garbage = state.path().join("garbage.bin");
    fs::write(&garbage, b"not a device state").unwrap();
    let error = driver
        .load_device_state(&name, &garbage)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a QEMU device-state file"), "{error}");
    // The right header, then a section QEMU does not know.
    let truncated = state.path().join("truncated.bin");
    fs::write(&truncated, b"QEVM\0\0\0\x03\x04\0\0\0\x09").unwrap();
    let error = driver
        .load_device_state(&name, &truncated)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot load device state") && error.contains("truncated.bin"),
        "{error}"
    );
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_through_the_driver_continues_the_guest_where_it_was_saved() {
    let mut state = State::new();
    let workload = Workload::Fingerprint { seed: 7, mib: 8 };
    let expected = workload.expected_fingerprint().unwrap();
    let config = state.config("revert", Some(workload), &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&name, false).await.unwrap();
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    let sum = wait_serial(&log, BOOT, |lines| {
        lines.iter().find_map(|line| match line {
            SerialLine::Fingerprint { sum, .. } => Some(*sum),
            _ => None,
        })
    })
    .await;
    assert_eq!(sum, expected);
    wait_tick_after(&log, 1, WAIT).await;

    // Save: pause, RAM from the shared file, device state from QEMU.
    let image = state.path().join("memory.img");
    let devices = state.path().join("devices.bin");
    driver.pause(&name).await.unwrap();
    let error = driver
        .load_device_state(&name, &devices)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("is paused: device state loads only into"),
        "{error}"
    );
    let ram = driver.guest_memory(&name).await.unwrap();
    assert_eq!(ram.size(), 128 << 20);
    let writer = ImageWriter::create(&image, ImageLayout::of(&ram), Durability::Sync).unwrap();
    let saved = save_paused(&ram, Box::new(writer)).unwrap();
    assert!(saved.present_pages > 0);
    drop(ram);
    driver.save_device_state(&name, &devices).await.unwrap();
    assert!(fs::metadata(&devices).unwrap().len() > 1000);
    let tick_at_save = last_tick(&log).unwrap();

    // Revert: a new QEMU waiting for state, RAM written into its fresh file, devices loaded.
    Hypervisor::destroy(&driver, &name).await.unwrap();
    driver.start_incoming(&name, IncomingRam::Fresh).await.unwrap();
    assert_eq!(driver.state(&name).await.unwrap(), DomainState::Paused);
    let ram = driver.guest_memory(&name).await.unwrap();
    let options = RestoreOptions {
        zero_pages: ZeroPages::AssumeZeroed,
    };
    let restored = restore(&image, &ram, &options).unwrap();
    assert_eq!(restored.pages_restored, saved.present_pages);
    drop(ram);
    driver.load_device_state(&name, &devices).await.unwrap();
    assert_eq!(driver.state(&name).await.unwrap(), DomainState::Paused);
    driver.resume(&name).await.unwrap();

    // The counter continues (one more is allowed for a tick line cut by the pause), and the
    // guest's memory is intact.
    let resumed = wait_tick_after(&log, tick_at_save, WAIT).await;
    assert!(
        resumed <= tick_at_save + 2,
        "saved at {tick_at_save}, resumed at {resumed}"
    );
    let console = driver.runtime_paths(&name).unwrap().console_socket;
    UnixStream::connect(console)
        .unwrap()
        .write_all(b"verify\n")
        .unwrap();
    let check = wait_serial(&log, WAIT, |lines| {
        lines.iter().find_map(|line| match line {
            SerialLine::FingerprintCheck(result) => Some(result.clone()),
            _ => None,
        })
    })
    .await;
    assert_eq!(check, Ok(expected));
    let boots = serial_lines(&log)
        .iter()
        .filter(|line| matches!(line, SerialLine::Ready { .. }))
        .count();
    assert_eq!(boots, 1, "the guest rebooted");
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

/// Issue 10, item 1: a QEMU restored from a device-state file must be able to migrate again (a
/// QEMU started with `migration.send-configuration=off` aborted on its next outgoing migration).
/// The saved file carries QEMU's configuration section; a file without it (older domsnap
/// versions) still loads, and that QEMU too can be snapshotted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_domain_snapshots_again_from_new_and_old_device_state_files() {
    let mut state = State::new();
    let config = state.config("again", Some(Workload::Idle), &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&name, false).await.unwrap();
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    wait_tick_after(&log, 1, BOOT).await;

    let image = state.path().join("memory.img");
    let devices = state.path().join("devices.bin");
    driver.pause(&name).await.unwrap();
    let ram = driver.guest_memory(&name).await.unwrap();
    let writer = ImageWriter::create(&image, ImageLayout::of(&ram), Durability::Sync).unwrap();
    save_paused(&ram, Box::new(writer)).unwrap();
    drop(ram);
    driver.save_device_state(&name, &devices).await.unwrap();
    let tick_at_save = last_tick(&log).unwrap();
    let saved = fs::read(&devices).unwrap();
    let qemu::DeviceStateFormat::Configured {
        machine_type,
        devices_at,
    } = qemu::device_state_format(&saved).unwrap()
    else {
        panic!(
            "the device state has no configuration section: {:?}",
            &saved[..32]
        );
    };
    assert!(machine_type.starts_with("pc-q35-"), "{machine_type}");
    // As older domsnap versions wrote it: the header, then the devices.
    let legacy = state.path().join("legacy.bin");
    let mut old = qemu::DEVICE_STATE_HEADER.to_vec();
    old.extend_from_slice(&saved[devices_at..]);
    fs::write(&legacy, &old).unwrap();
    assert_eq!(
        qemu::device_state_format(&old),
        Ok(qemu::DeviceStateFormat::Legacy)
    );

    for (round, file) in [&devices, &legacy].into_iter().enumerate() {
        Hypervisor::destroy(&driver, &name).await.unwrap();
        driver.start_incoming(&name, IncomingRam::Fresh).await.unwrap();
        let ram = driver.guest_memory(&name).await.unwrap();
        let options = RestoreOptions {
            zero_pages: ZeroPages::AssumeZeroed,
        };
        restore(&image, &ram, &options).unwrap();
        drop(ram);
        let position = serial_lines(&log).len();
        driver.load_device_state(&name, file).await.unwrap();
        driver.resume(&name).await.unwrap();
        let resumed = first_tick_from(&log, position).await;
        assert!(
            resumed <= tick_at_save + 2,
            "{}: saved at {tick_at_save}, resumed at {resumed}",
            file.display()
        );

        // The restored QEMU migrates again: a background snapshot, then a paused save.
        let (captured, _) = tokio::sync::oneshot::channel();
        let again = state.path().join(format!("again-{round}.img"));
        let again_devices = state.path().join(format!("again-{round}.bin"));
        let streamed = driver
            .streamed_save(
                &name,
                &again,
                &again_devices,
                snapshot_core::StreamMode::Background,
                snapshot_core::CaptureSignals::at_once(captured),
            )
            .await
            .unwrap();
        assert!(streamed.pages > 0);
        assert!(matches!(
            qemu::device_state_format(&fs::read(&again_devices).unwrap()),
            Ok(qemu::DeviceStateFormat::Configured { .. })
        ));
        assert_eq!(driver.state(&name).await.unwrap(), DomainState::Running);
        let now = last_tick(&log).unwrap();
        wait_tick_after(&log, now, WAIT).await;
        driver.pause(&name).await.unwrap();
        driver.save_device_state(&name, &again_devices).await.unwrap();
        driver.resume(&name).await.unwrap();
        assert_eq!(driver.state(&name).await.unwrap(), DomainState::Running);
    }
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

/// Issue 10, item 8: `run_as` makes QEMU drop to that user once it has opened its files, under
/// the seccomp sandbox; the driver still saves and loads its device state (QEMU gets descriptors,
/// not paths) and stops it. Needs root; the user is `nobody`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_runs_qemu_as_that_user_in_the_sandbox() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can start QEMU as another user");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let mut state = State::new();
    let base = state.path().join("vda.qcow2");
    testkit::create_qcow2(&base, "16M");
    let mut config = state.config("confined", Some(Workload::Idle), std::slice::from_ref(&base));
    config.run_as = Some("nobody".into());
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&name, false).await.unwrap();
    let pid = state.pid(&name).unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .map(|id| id.parse::<u32>().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(uid, [nobody.uid.as_raw(); 4], "{status}");
    let seccomp = status.lines().find(|line| line.starts_with("Seccomp:")).unwrap();
    assert_eq!(seccomp.split_whitespace().nth(1), Some("2"), "{status}");
    let log = driver.runtime_paths(&name).unwrap().serial_log;
    wait_tick_after(&log, 1, BOOT).await;

    // Device state out and back in, through descriptors.
    let image = state.path().join("memory.img");
    let devices = state.path().join("devices.bin");
    driver.pause(&name).await.unwrap();
    let ram = driver.guest_memory(&name).await.unwrap();
    let writer = ImageWriter::create(&image, ImageLayout::of(&ram), Durability::Sync).unwrap();
    save_paused(&ram, Box::new(writer)).unwrap();
    drop(ram);
    driver.save_device_state(&name, &devices).await.unwrap();
    let tick_at_save = last_tick(&log).unwrap();
    // Live internal disk snapshots work on the images QEMU opened as root.
    let live = driver.disk_backend(&name).await.unwrap();
    live.create_internal(std::slice::from_ref(&base), "s1")
        .await
        .unwrap();
    drop(live);
    Hypervisor::destroy(&driver, &name).await.unwrap();
    driver.start_incoming(&name, IncomingRam::Fresh).await.unwrap();
    let ram = driver.guest_memory(&name).await.unwrap();
    let options = RestoreOptions {
        zero_pages: ZeroPages::AssumeZeroed,
    };
    restore(&image, &ram, &options).unwrap();
    drop(ram);
    driver.load_device_state(&name, &devices).await.unwrap();
    driver.resume(&name).await.unwrap();
    let resumed = wait_tick_after(&log, tick_at_save, WAIT).await;
    assert!(
        resumed <= tick_at_save + 2,
        "saved at {tick_at_save}, resumed at {resumed}"
    );
    // A background snapshot: QEMU writes the stream into a socket it is handed.
    let (captured, _) = tokio::sync::oneshot::channel();
    let streamed = driver
        .streamed_save(
            &name,
            &state.path().join("bg.img"),
            &state.path().join("bg.bin"),
            snapshot_core::StreamMode::Background,
            snapshot_core::CaptureSignals::at_once(captured),
        )
        .await;
    // QEMU's write-protect tracking needs userfaultfd, which an unprivileged process gets only
    // with vm.unprivileged_userfaultfd = 1.
    let unprivileged_uffd =
        fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").is_ok_and(|value| value.trim() == "1");
    match streamed {
        Ok(saved) => assert!(unprivileged_uffd && saved.pages > 0),
        Err(error) => {
            assert!(!unprivileged_uffd, "{error}");
            assert!(
                format!("{error:?}").contains("Background-snapshot is not supported by host kernel"),
                "{error:?}"
            );
        }
    }
    assert_eq!(driver.state(&name).await.unwrap(), DomainState::Running);
    driver.stop(&name, StopMode::Force).await.unwrap();
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::ShutOff);

    // An unknown user is refused when the domain is defined.
    let mut config = state.config("ghost", None, &[]);
    config.run_as = Some("no-such-user-here".into());
    let error = driver.define(&config).await.unwrap_err().to_string();
    assert!(
        error.contains("run_as = \"no-such-user-here\": there is no such user on this host"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_backend_follows_the_domain_and_the_definition_follows_the_active_image() {
    let mut state = State::new();
    let (name, base) = state.started_on_disk("disks", None, true).await;
    let driver = state.driver();

    // Live: QEMU takes the snapshots, and the overlay becomes the active image everywhere.
    let live = driver.disk_backend(&name).await.unwrap();
    live.create_internal(std::slice::from_ref(&base), "s1")
        .await
        .unwrap();
    let overlay = state.path().join("vda-1.qcow2");
    live.create_external(&[overlay_on(&base, &overlay)])
        .await
        .unwrap();
    assert_eq!(driver.disks(&name).await.unwrap(), [vda(&overlay)]);
    assert_eq!(driver.definition(&name).unwrap().disks[0].path, overlay);

    // Offline once shut off: the images are edited natively.
    driver.stop(&name, StopMode::Force).await.unwrap();
    let offline = driver.disk_backend(&name).await.unwrap();
    let snapshots = offline.list_internal(&base).await.unwrap();
    assert_eq!(
        snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1"]
    );
    let chain = offline.backing_chain(&overlay).await.unwrap();
    assert_eq!(
        chain.iter().map(|i| i.path.clone()).collect::<Vec<_>>(),
        [overlay.clone(), base.clone()]
    );
    offline
        .create_internal(std::slice::from_ref(&overlay), "s2")
        .await
        .unwrap();

    // Revert-style redefinition from a recorded configuration, with other images.
    let recorded = driver.config(&name).await.unwrap();
    Hypervisor::define(&driver, &name, &recorded, &[vda(&base)])
        .await
        .unwrap();
    assert_eq!(driver.disks(&name).await.unwrap(), [vda(&base)]);
    let vdz = DiskTarget {
        target: "vdz".into(),
        image: base.clone(),
        format: snapshot_core::ImageFormat::Qcow2,
    };
    let error = Hypervisor::define(&driver, &name, &recorded, &[vdz])
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no disk \"vdz\""), "{error}");
    driver.start(&name, true).await.unwrap();
    assert_eq!(driver.disks(&name).await.unwrap(), [vda(&base)]);
    let error = Hypervisor::define(&driver, &name, &recorded, &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot redefine domain disks"), "{error}");
    driver.stop(&name, StopMode::Force).await.unwrap();
}

/// The pages of `path` that wait in the host's page cache to reach storage (dirty or under
/// writeback), through Linux's `cachestat` (6.5 and later).
fn unwritten_pages(path: &std::path::Path) -> u64 {
    #[repr(C)]
    struct Range {
        offset: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    /// Its number on every architecture (syscalls added since 5.1 share one table).
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = fs::File::open(path).unwrap();
    // A length of 0: to the end of the file.
    let range = Range { offset: 0, len: 0 };
    let mut stat = CacheStat::default();
    // SAFETY: `cachestat(fd, range, stat, flags)` reads `range` and writes one `CacheStat`
    // (the kernel's `struct cachestat` layout: five u64); both outlive the call, and `file` keeps
    // the descriptor open through it.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0_u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "cachestat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    stat.dirty + stat.writeback
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preparing_a_pause_writes_back_what_qemu_left_in_the_page_cache() {
    let mut state = State::new();
    let (name, disk) = state.started_on_disk("wb", Some(Workload::Idle), false).await;
    // 16 MiB written through QEMU's block layer, as the guest's writes go (cache=writeback).
    let status_socket = state.path().join("domains/wb/run/status.sock");
    let qmp = qmp::Client::connect_unix(&status_socket, qmp::ClientOptions::default())
        .await
        .unwrap();
    let write = testkit::hmp_disk_write("vda", "0", "16M");
    let said = qmp.execute_raw("human-monitor-command", write).await.unwrap();
    assert_eq!(said, serde_json::json!(""), "qemu-io said {said}");
    drop(qmp);
    let before = unwritten_pages(&disk);
    assert!(
        before >= 4096,
        "16 MiB written, {before} pages wait in the page cache"
    );

    let driver = state.driver();
    Hypervisor::prepare_pause(&driver, &name).await;
    assert_eq!(unwritten_pages(&disk), 0, "{} still waits", disk.display());
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::Running);

    // Nothing to do, and nothing fails, for a domain that is not running or not defined.
    driver.stop(&name, StopMode::Force).await.unwrap();
    Hypervisor::prepare_pause(&driver, &name).await;
    Hypervisor::prepare_pause(&driver, &Name::new("nobody").unwrap()).await;
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::ShutOff);
}
