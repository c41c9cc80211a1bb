//! A lazy revert's start on a real QEMU 10: guest RAM mapped copy-on-write from a snapshot's
//! memory image through the driver's own hard link. The guest goes on where it was saved, the
//! image never changes, it outlives its snapshot's name while the domain runs, and the link goes
//! with the domain's process; an image that cannot be linked falls back to fresh RAM, and one
//! that does not fit is refused before QEMU starts.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs,
    io::Write,
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    process::Command,
};

use memory::{save_paused, Durability, GuestMemory, ImageLayout, ImageWriter};
use snapshot_core::{DomainState, Hypervisor, IncomingRam, IncomingStart, Name};
use testkit::{SerialLine, Workload};

mod common;

use common::{last_tick, save_memory_and_devices, wait_serial, wait_tick_after, State, BOOT, WAIT};

/// xxh3-64 of a whole file.
fn file_hash(path: &Path) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&fs::read(path).unwrap())
}

/// The domain's run folder and its link of a mapped image.
fn run_dir(state: &State, name: &Name) -> PathBuf {
    state.path().join("domains").join(name.as_str()).join("run")
}

/// Asks the fingerprint guest to check its memory; its answer.
async fn fingerprint_check(console: &Path, log: &Path) -> Result<u64, String> {
    let position = common::serial_lines(log).len();
    UnixStream::connect(console)
        .unwrap()
        .write_all(b"verify\n")
        .unwrap();
    wait_serial(log, WAIT, |lines| {
        lines.iter().skip(position).find_map(|line| match line {
            SerialLine::FingerprintCheck(result) => Some(result.clone()),
            _ => None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_mapped_from_its_image_runs_on_and_the_image_never_changes() {
    let mut state = State::new();
    let workload = Workload::Fingerprint { seed: 11, mib: 8 };
    let expected = workload.expected_fingerprint().unwrap();
    let config = state.config("lazy", Some(workload), &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    driver.start(&name, false).await.unwrap();
    let paths = driver.runtime_paths(&name).unwrap();
    let log = paths.serial_log.clone();
    wait_tick_after(&log, 1, BOOT).await;

    // A snapshot's files, in the state directory's filesystem.
    let folder = state.path().join("snapshot");
    fs::create_dir(&folder).unwrap();
    let (image, devices) = (folder.join("memory.img"), folder.join("devices.bin"));
    save_memory_and_devices(&driver, &name, &image, &devices).await;
    let tick_at_save = last_tick(&log).unwrap();
    let hash = file_hash(&image);

    Hypervisor::destroy(&driver, &name).await.unwrap();
    let started = driver
        .start_incoming(&name, IncomingRam::Image(&image))
        .await
        .unwrap();
    assert_eq!(started, IncomingStart::Mapped);
    let status = driver.status(&name).await.unwrap();
    assert_eq!(
        (status.state, status.mapped_image.as_deref()),
        (DomainState::Paused, Some(image.as_path()))
    );
    let link = run_dir(&state, &name).join("ram-base.img");
    let meta = fs::metadata(&link).unwrap();
    assert_eq!((meta.nlink(), meta.mode() & 0o777), (2, 0o400));
    assert_eq!(meta.ino(), fs::metadata(&image).unwrap().ino());
    assert!(!paths.ram_file.exists(), "a mapped domain has no shared RAM file");
    // Its RAM is QEMU's own: domsnap cannot map it.
    let error = driver.guest_memory(&name).await.unwrap_err().to_string();
    assert!(
        error.contains("is mapped from snapshot memory image") && error.contains(image.to_str().unwrap()),
        "{error}"
    );

    driver.load_device_state(&name, &devices).await.unwrap();
    driver.resume(&name).await.unwrap();
    let resumed = wait_tick_after(&log, tick_at_save, WAIT).await;
    assert!(
        resumed <= tick_at_save + 2,
        "saved at {tick_at_save}, resumed at {resumed}"
    );
    assert_eq!(fingerprint_check(&paths.console_socket, &log).await, Ok(expected));
    // The guest has run and written its memory: the image is as it was.
    wait_tick_after(&log, resumed + 2, WAIT).await;
    assert_eq!(file_hash(&image), hash, "the mapped image changed");

    // The snapshot's name of the image goes (a delete): the guest runs on, on the link.
    fs::remove_dir_all(&folder).unwrap();
    assert_eq!(fs::metadata(&link).unwrap().nlink(), 1);
    let now = last_tick(&log).unwrap();
    wait_tick_after(&log, now + 1, WAIT).await;
    assert_eq!(fingerprint_check(&paths.console_socket, &log).await, Ok(expected));
    assert_eq!(file_hash(&link), hash);

    // The link goes with the process.
    driver.stop(&name, qemu::StopMode::Force).await.unwrap();
    assert!(!link.exists() && !run_dir(&state, &name).exists());
    assert_eq!(driver.status(&name).await.unwrap().mapped_image, None);
    // A plain start has shared RAM again.
    driver.start(&name, true).await.unwrap();
    assert!(paths.ram_file.exists());
    driver.guest_memory(&name).await.unwrap();
    Hypervisor::destroy(&driver, &name).await.unwrap();
}

/// Writes a sealed image of `mib` MiB of guest RAM (one region at 0, as q35 has it below 2 GiB)
/// with a little data in it.
fn synthetic_image(path: &Path, mib: u64) {
    let mem = GuestMemory::anonymous(mib << 20).unwrap();
    mem.write(0x10_0000, b"not a real guest").unwrap();
    let writer = ImageWriter::create(path, ImageLayout::of(&mem), Durability::NoSync).unwrap();
    save_paused(&mem, Box::new(writer)).unwrap();
}

/// A folder bind-mounted on itself: a link from inside it to anywhere outside crosses mounts
/// (EXDEV), as with a snapshot folder on another filesystem. Unmounted when dropped.
struct OwnMount(PathBuf);

impl OwnMount {
    fn new(path: PathBuf) -> Self {
        fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .arg("--bind")
            .args([&path, &path])
            .status()
            .unwrap();
        assert!(status.success(), "mount --bind {}", path.display());
        OwnMount(path)
    }
}

impl Drop for OwnMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_linked_is_copied_and_one_that_does_not_fit_is_refused() {
    let mut state = State::new();
    let config = state.config("fallback", None, &[]);
    let name = config.name.clone();
    let driver = state.driver();
    driver.define(&config).await.unwrap();
    let run = run_dir(&state, &name);

    // Another size than the domain's RAM: refused, nothing started, nothing left.
    let small = state.path().join("small.img");
    synthetic_image(&small, 64);
    let error = driver
        .start_incoming(&name, IncomingRam::Image(&small))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("cannot map memory image")
            && error.contains("holds 64 MiB of RAM, the domain has 128 MiB"),
        "{error}"
    );
    assert_eq!(driver.status(&name).await.unwrap().state, DomainState::ShutOff);
    assert!(!run.exists());

    // Damaged metadata (a page table checksum): refused the same way.
    let damaged = state.path().join("damaged.img");
    synthetic_image(&damaged, 128);
    let mut bytes = fs::read(&damaged).unwrap();
    let at = bytes.len() - 48 - 8;
    bytes[at] ^= 0x55;
    fs::write(&damaged, bytes).unwrap();
    let error = driver
        .start_incoming(&name, IncomingRam::Image(&damaged))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("corrupt memory image"), "{error}");
    assert!(!run.exists());

    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped the cross-mount fallback: only root can bind-mount");
        return;
    }
    // On another mount: started on fresh shared RAM instead, and the reason says so.
    let elsewhere = OwnMount::new(state.path().join("elsewhere"));
    let image = elsewhere.0.join("memory.img");
    synthetic_image(&image, 128);
    let started = driver
        .start_incoming(&name, IncomingRam::Image(&image))
        .await
        .unwrap();
    let IncomingStart::Fresh {
        fallback: Some(reason),
    } = started
    else {
        panic!("mapped across mounts: {started:?}");
    };
    assert!(
        reason.contains("cannot be linked") && reason.contains("copied into fresh RAM"),
        "{reason}"
    );
    assert!(!run.join("ram-base.img").exists());
    assert_eq!(driver.status(&name).await.unwrap().mapped_image, None);
    let ram = driver.guest_memory(&name).await.unwrap();
    memory::restore(&image, &ram, &memory::RestoreOptions::default()).unwrap();
    let mut read = [0u8; 16];
    ram.read(0x10_0000, &mut read).unwrap();
    assert_eq!(&read, b"not a real guest");
    drop(ram);
    Hypervisor::destroy(&driver, &name).await.unwrap();
    drop(elsewhere);
}
