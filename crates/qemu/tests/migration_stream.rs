//! The background-snapshot stream parser and driver on real QEMU 10 streams: streams recorded in the
//! test (`migrate` to `file:`) parse into an image identical to a paused save, and restore into a
//! fresh QEMU whose guest continues from the snapshot's start; cut and damaged streams and streams
//! of other capabilities are refused; `stream_snapshot` (background and pre-copy) streams through a
//! socket, and leaves no files when it fails.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs::{self, File},
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use memory::{
    restore, save_paused, verify, Durability, GuestMemory, ImageLayout, ImageWriter, PageImport,
    RestoreOptions, ZeroPages, PAGE_SIZE,
};
use qemu::{
    expected_blocks, parse_migration_stream, Error, ExpectedBlocks, RamSink, StreamError, StreamStats,
};
use qmp::{commands::*, Client, ClientOptions, MigrationStatus};
use snapshot_core::StreamMode;
use testkit::{Qemu, SerialLine, Workload};

const RAM_MIB: u64 = 128;
const RAM_SIZE: u64 = RAM_MIB << 20;
const BOOT: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(30);

/// A folder on tmpfs: QEMU write-protects guest RAM with userfaultfd only there (a RAM file on
/// ext4 gives "Background-snapshot is not compatible with guest memory configuration").
fn shm_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("domsnap-stream-{name}-"))
        .tempdir_in("/dev/shm")
        .unwrap()
}

fn spawn(name: &str, dir: &Path, workload: Option<Workload>, incoming: bool) -> Qemu {
    let mut builder = Qemu::builder(name).memory_mib(RAM_MIB).in_dir(dir);
    if let Some(workload) = workload {
        builder = builder.guest(workload);
    }
    if incoming {
        builder = builder.incoming_defer();
    }
    builder.spawn()
}

async fn connect(qemu: &Qemu) -> Client {
    Client::connect_unix(qemu.qmp_socket(), ClientOptions::default())
        .await
        .unwrap()
}

async fn set_capabilities(qmp: &Client, capabilities: &[(MigrationCapability, bool)]) {
    qmp.execute(&MigrateSetCapabilities {
        capabilities: capabilities
            .iter()
            .map(|(capability, state)| MigrationCapabilityStatus {
                capability: capability.clone(),
                state: *state,
            })
            .collect(),
    })
    .await
    .unwrap();
}

async fn wait_migration(qmp: &Client) -> MigrationInfo {
    let deadline = Instant::now() + WAIT;
    loop {
        let info = qmp.execute(&QueryMigrate).await.unwrap();
        match info.status {
            Some(MigrationStatus::Completed) => return info,
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                panic!("migration failed: {info:?}")
            }
            _ if Instant::now() > deadline => panic!("migration not done in time: {info:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Records a background snapshot of `qmp`'s QEMU into `path`, with `extra` capabilities on too.
async fn record(qmp: &Client, path: &Path, extra: &[MigrationCapability]) -> MigrationInfo {
    let mut on = vec![(MigrationCapability::BackgroundSnapshot, true)];
    on.extend(extra.iter().map(|c| (c.clone(), true)));
    set_capabilities(qmp, &on).await;
    qmp.execute(&Migrate {
        uri: format!("file:{}", path.display()),
    })
    .await
    .unwrap();
    let info = wait_migration(qmp).await;
    let off: Vec<_> = on.into_iter().map(|(c, _)| (c, false)).collect();
    set_capabilities(qmp, &off).await;
    info
}

async fn map_ram(qemu: &Qemu, qmp: &Client) -> GuestMemory {
    let regions = qemu::ram_layout(qmp).await.unwrap();
    GuestMemory::from_ram_file(&qemu.ram_file(), &regions).unwrap()
}

/// Parses the stream at `path` into an image at `image` and a device-state file.
fn parse_into_image(
    path: &Path,
    expected: &ExpectedBlocks,
    layout: ImageLayout,
    image: &Path,
    device_state: &Path,
) -> (StreamStats, memory::ImportStats) {
    parse_into(File::open(path).unwrap(), expected, layout, image, device_state)
}

/// Parses a stream into an image at `image` and a device-state file.
fn parse_into(
    input: impl Read,
    expected: &ExpectedBlocks,
    layout: ImageLayout,
    image: &Path,
    device_state: &Path,
) -> (StreamStats, memory::ImportStats) {
    let writer = ImageWriter::create(image, layout, Durability::NoSync).unwrap();
    let mut import = PageImport::new(Box::new(writer));
    let mut devices = File::create(device_state).unwrap();
    let stats = parse_migration_stream(input, expected, &mut import, &mut devices).unwrap();
    assert_eq!(
        import.stats().pages_missing,
        0,
        "every page of guest RAM is in the stream"
    );
    (stats, import.seal().unwrap())
}

/// Counts what it is given (for parses whose pages are not kept), and when the capture came.
#[derive(Default)]
struct Count {
    pages: u64,
    captured_after: Option<u64>,
}

impl RamSink for Count {
    fn page(&mut self, _: u64, _: &[u8; PAGE_SIZE]) -> memory::Result<()> {
        self.pages += 1;
        Ok(())
    }
    fn zero(&mut self, _: u64) -> memory::Result<()> {
        self.pages += 1;
        Ok(())
    }
    fn state_captured(&mut self) {
        assert_eq!(self.captured_after, None, "captured once");
        self.captured_after = Some(self.pages);
    }
}

fn parse_bytes(bytes: impl Read, expected: &ExpectedBlocks) -> Result<StreamStats, StreamError> {
    parse_migration_stream(bytes, expected, &mut Count::default(), &mut std::io::sink())
}

fn last_tick(qemu: &Qemu) -> u64 {
    qemu.last_tick().expect("the guest ticked")
}

/// Restores `image` and `device_state` into a fresh QEMU in `dir` and resumes it.
async fn restore_into_new_qemu(dir: &Path, workload: Workload, image: &Path, device_state: &Path) -> Qemu {
    let target = spawn("dst", dir, Some(workload), true);
    let qmp = connect(&target).await;
    let options = RestoreOptions {
        zero_pages: ZeroPages::AssumeZeroed,
    };
    restore(image, &map_ram(&target, &qmp).await, &options).unwrap();
    qmp.execute(&MigrateIncoming {
        uri: format!("file:{}", device_state.display()),
    })
    .await
    .unwrap();
    wait_migration(&qmp).await;
    qmp.execute(&Cont).await.unwrap();
    target
}

/// Asks the fingerprint guest to check its memory; returns its answer.
fn fingerprint_check(qemu: &Qemu) -> Result<u64, String> {
    UnixStream::connect(qemu.console_socket())
        .unwrap()
        .write_all(b"verify\n")
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let found = qemu.serial_lines().into_iter().find_map(|line| match line {
            SerialLine::FingerprintCheck(result) => Some(result),
            _ => None,
        });
        if let Some(result) = found {
            return result;
        }
        assert!(
            Instant::now() < deadline,
            "no fingerprint check:\n{}",
            qemu.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> usize {
    from + haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in the stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_streams_give_the_paused_image_and_restore_the_guest_at_the_snapshot_start() {
    let files = tempfile::tempdir().unwrap();
    let path = |name: &str| files.path().join(name);
    let workload = Workload::Fingerprint { seed: 5, mib: 16 };
    let src_dir = shm_dir("src");
    let source = spawn("src", src_dir.path(), Some(workload.clone()), false);
    source.wait_for_serial("DOMSNAP FP ", BOOT);
    source.try_wait_for_tick_after(1, WAIT).unwrap();
    let qmp = connect(&source).await;
    let ram = map_ram(&source, &qmp).await;
    let expected = expected_blocks(&qmp, RAM_SIZE).await.unwrap();
    assert!(expected.other_blocks.contains_key("pc.bios"), "{expected:?}");

    // Paused guest: the stream's pages are exactly the RAM file, so the image is byte for byte the
    // one a paused save writes with the same seed.
    qmp.execute(&Stop).await.unwrap();
    let started = Instant::now();
    let info = record(&qmp, &path("paused.stream"), &[]).await;
    eprintln!(
        "paused background snapshot to a file: {:?}, QEMU says {info:?}",
        started.elapsed()
    );
    let layout = ImageLayout::with_seed(&ram, 17);
    let parse_started = Instant::now();
    let (stream, image) = parse_into_image(
        &path("paused.stream"),
        &expected,
        layout.clone(),
        &path("paused.img"),
        &path("paused.dev"),
    );
    eprintln!(
        "parsed {} bytes in {:?}: {stream:?} {image:?}",
        stream.bytes_read,
        parse_started.elapsed()
    );
    assert_eq!(
        stream.bytes_read,
        fs::metadata(path("paused.stream")).unwrap().len()
    );
    assert_eq!(
        stream.ram_pages + stream.ram_zero_pages,
        RAM_SIZE / PAGE_SIZE as u64
    );
    assert!(stream.other_pages_skipped > 0 && stream.device_state_bytes > 1000);
    assert_eq!(image.duplicates, 0);
    let writer = ImageWriter::create(&path("reference.img"), layout, Durability::NoSync).unwrap();
    let saved = save_paused(&ram, Box::new(writer)).unwrap();
    assert_eq!(saved.present_pages, image.present_pages);
    assert!(
        fs::read(path("paused.img")).unwrap() == fs::read(path("reference.img")).unwrap(),
        "the image from the stream differs from the paused save"
    );
    drop(ram);
    qmp.execute(&Cont).await.unwrap();

    // Running guest: consistent at the start of the snapshot.
    source.try_wait_for_tick_after(last_tick(&source), WAIT).unwrap();
    let tick_at_start = last_tick(&source);
    record(&qmp, &path("running.stream"), &[]).await;
    let (stream, image) = parse_into_image(
        &path("running.stream"),
        &expected,
        ImageLayout::of(&map_ram(&source, &qmp).await),
        &path("running.img"),
        &path("running.dev"),
    );
    assert_eq!(
        verify(&path("running.img")).unwrap().present_pages,
        image.present_pages
    );
    assert_eq!(
        &fs::read(path("running.dev")).unwrap()[..8],
        b"QEVM\0\0\0\x03",
        "{stream:?}"
    );
    qmp.execute(&Quit).await.unwrap();
    drop(source);

    let dst_dir = shm_dir("dst");
    let target = restore_into_new_qemu(
        dst_dir.path(),
        workload.clone(),
        &path("running.img"),
        &path("running.dev"),
    )
    .await;
    let resumed = target.try_wait_for_tick_after(0, WAIT).unwrap();
    assert!(
        (tick_at_start..=tick_at_start + 2).contains(&resumed),
        "snapshot started at tick {tick_at_start}, the restored guest printed {resumed}"
    );
    assert_eq!(
        fingerprint_check(&target),
        Ok(workload.expected_fingerprint().unwrap())
    );
    assert!(
        !target
            .serial_lines()
            .iter()
            .any(|l| matches!(l, SerialLine::Ready { .. })),
        "the guest rebooted"
    );

    // The same real stream, cut short anywhere, is refused with the offset where it ends.
    let bytes = fs::read(path("running.stream")).unwrap();
    // The device-state file is the header and the configuration section, then the stream's tail.
    let prefix = qemu::device_state_prefix(&stream.machine_type).unwrap().len();
    let device_at = bytes.len() - (usize::try_from(stream.device_state_bytes).unwrap() - prefix);
    let mut cuts: Vec<usize> = (0..300).chain([4100, 9000, 65_536, 1 << 20]).collect();
    cuts.extend((1..=8).map(|i| device_at * i / 9));
    cuts.extend([
        device_at - 1,
        device_at,
        device_at + 1,
        device_at + 50,
        bytes.len() - 1,
    ]);
    let started = Instant::now();
    for &cut in &cuts {
        match parse_bytes(&bytes[..cut], &expected) {
            Err(StreamError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
            other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
        }
    }
    eprintln!("{} cut streams refused in {:?}", cuts.len(), started.elapsed());
    assert!(parse_bytes(&bytes[..], &expected).is_ok());

    // Damaged: the record flags of the first page, its block name, the first device section.
    let config_len = u32::from_be_bytes(bytes[9..13].try_into().unwrap()) as usize;
    let start = 13 + config_len;
    assert_eq!(
        bytes[start], 0x01,
        "the ram section starts after the configuration"
    );
    let id = &bytes[start + 1..start + 5];
    let part = find(&bytes, &[&[0x7e][..], id, &[0x02], id].concat(), start) + 5;
    let record_at = part + 5;
    assert_eq!(&bytes[record_at + 7..record_at + 12], b"\x08\x03mem");
    for (at, xor, expected_text) in [
        (record_at + 7, 0x40, "XBZRLE"),
        (record_at + 6, 0x02, "MULTIFD_FLUSH"),
        (record_at + 7, 0x80, "HOOK"),
        (record_at + 11, 0x01, "`mel`, not in the block list"),
        (record_at, 0x10, "beyond RAM block `mem`"),
        (device_at, 0x04 ^ 0x08, "command section"),
        (0, 0x01, "not QEVM"),
    ] {
        let mut damaged = bytes.clone();
        damaged[at] ^= xor;
        let error = parse_bytes(&damaged[..], &expected).unwrap_err();
        let text = error.to_string();
        assert!(text.contains(expected_text), "byte {at}: {text}");
        if let StreamError::Format { offset, .. } = error {
            assert!(offset == at as u64 || offset == record_at as u64, "{text}");
        }
    }
    drop(target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_other_capabilities_are_refused() {
    // No guest: the firmware alone is enough to produce streams.
    let dir = shm_dir("caps");
    let qemu = spawn("caps", dir.path(), None, false);
    let qmp = connect(&qemu).await;
    let expected = expected_blocks(&qmp, RAM_SIZE).await.unwrap();
    let files = tempfile::tempdir().unwrap();

    let plain = files.path().join("plain.stream");
    record(&qmp, &plain, &[]).await;
    let mut count = Count::default();
    let input = File::open(&plain).unwrap();
    let stats = parse_migration_stream(input, &expected, &mut count, &mut std::io::sink()).unwrap();
    assert_eq!(
        stats.ram_pages + stats.ram_zero_pages,
        RAM_SIZE / PAGE_SIZE as u64
    );
    assert_eq!(count.captured_after, Some(0), "the capture comes before any page");

    for (capability, name) in [
        (MigrationCapability::MappedRam, "mapped-ram"),
        (MigrationCapability::XIgnoreShared, "x-ignore-shared"),
    ] {
        let path = files.path().join(format!("{name}.stream"));
        record(&qmp, &path, &[capability]).await;
        let bytes = fs::read(&path).unwrap();
        let error = parse_bytes(&bytes[..], &expected).unwrap_err().to_string();
        assert!(error.contains("configuration subsection"), "{name}: {error}");
        // Without its announcement, the extra per-block fields still break the block list.
        let subsection = find(&bytes, b"\x05\x1aconfiguration/capabilities", 0);
        let ram_start = find(&bytes, b"\x03ram", subsection) - 5;
        let stripped = [&bytes[..subsection], &bytes[ram_start..]].concat();
        let error = parse_bytes(&stripped[..], &expected).unwrap_err();
        assert!(matches!(error, StreamError::Format { .. }), "{name}: {error}");
        eprintln!("{name}: {error}");
    }

    // The ROM sizes are checked when given; a block the caller did not name is refused.
    let mut wrong = expected.clone();
    wrong.other_blocks.insert("pc.bios".into(), Some(4096));
    let error = parse_bytes(File::open(&plain).unwrap(), &wrong)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`pc.bios` has 0x40000 bytes, the domain's has 0x1000"),
        "{error}"
    );
    let mut unknown = expected.clone();
    unknown.other_blocks.remove("pc.rom");
    let error = parse_bytes(File::open(&plain).unwrap(), &unknown)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`pc.rom` is not one of the domain's RAM blocks"),
        "{error}"
    );
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

/// Reads at most `rate` bytes per second: a consumer slower than QEMU.
struct Throttled<R> {
    inner: R,
    rate: f64,
    read: u64,
    started: Instant,
}

impl<R: Read> Read for Throttled<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = buf.len().min(64 << 10);
        let n = self.inner.read(&mut buf[..len])?;
        self.read += n as u64;
        let due = Duration::from_secs_f64(self.read as f64 / self.rate);
        std::thread::sleep(due.saturating_sub(self.started.elapsed()));
        Ok(n)
    }
}

/// Runs a background snapshot into a socket read by a deliberately slow parser thread (the guest
/// runs on for seconds meanwhile); returns the ticks at its start and end.
async fn slow_snapshot(source: &Qemu, qmp: &Client, image: &Path, devices: &Path) -> (u64, u64) {
    let expected = expected_blocks(qmp, RAM_SIZE).await.unwrap();
    let layout = ImageLayout::of(&map_ram(source, qmp).await);
    let (reader, writer) = UnixStream::pair().unwrap();
    let (image, devices) = (image.to_owned(), devices.to_owned());
    let parser = std::thread::spawn(move || {
        let input = Throttled {
            inner: reader,
            rate: 12e6,
            read: 0,
            started: Instant::now(),
        };
        parse_into(input, &expected, layout, &image, &devices)
    });
    qmp.getfd("slow", std::os::fd::AsFd::as_fd(&writer))
        .await
        .unwrap();
    drop(writer);
    source.try_wait_for_tick_after(last_tick(source), WAIT).unwrap();
    let tick_at_start = last_tick(source);
    set_capabilities(qmp, &[(MigrationCapability::BackgroundSnapshot, true)]).await;
    qmp.execute(&Migrate {
        uri: "fd:slow".into(),
    })
    .await
    .unwrap();
    wait_migration(qmp).await;
    let tick_at_end = last_tick(source);
    set_capabilities(qmp, &[(MigrationCapability::BackgroundSnapshot, false)]).await;
    let (stream, _) = parser.join().unwrap();
    eprintln!("slow reader: ticks {tick_at_start}..{tick_at_end}, {stream:?}");
    (tick_at_start, tick_at_end)
}

/// Restores into a fresh QEMU and checks its first tick is the one after `tick_at_start` (or the one
/// after that, when a tick came between reading the counter and the snapshot's start).
async fn check_restore_continues(workload: Workload, image: &Path, devices: &Path, tick_at_start: u64) {
    let dir = shm_dir("dst");
    let target = restore_into_new_qemu(dir.path(), workload, image, devices).await;
    let resumed = target.try_wait_for_tick_after(0, WAIT).unwrap();
    assert!(
        (tick_at_start..=tick_at_start + 2).contains(&resumed),
        "snapshot started at tick {tick_at_start}, the restored guest printed {resumed}"
    );
    let later = target.try_wait_for_tick_after(resumed, WAIT).unwrap();
    assert_eq!(later, resumed + 1);
    assert!(
        !target
            .serial_lines()
            .iter()
            .any(|l| matches!(l, SerialLine::Ready { .. })),
        "the guest rebooted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_snapshots_of_a_dirtying_guest_restore_to_their_start() {
    let workload = Workload::Dirty {
        rate_mib: 16,
        wss_mib: 32,
    };
    let src_dir = shm_dir("bg-src");
    let mut source = spawn("bg-src", src_dir.path(), Some(workload.clone()), false);
    source.wait_for_serial("DOMSNAP READY", BOOT);
    source.try_wait_for_tick_after(1, WAIT).unwrap();
    let qmp = connect(&source).await;
    let layout = ImageLayout::of(&map_ram(&source, &qmp).await);
    let files = tempfile::tempdir().unwrap();
    let path = |name: &str| files.path().join(name);

    // Through the driver function, as the orchestrator drives it: paused (its disks would be
    // snapshotted now), resumed as soon as the state is captured.
    source.try_wait_for_tick_after(last_tick(&source), WAIT).unwrap();
    qmp.execute(&Stop).await.unwrap();
    let tick_at_start = last_tick(&source);
    let (image_a, devices_a) = (path("a.img"), path("a.dev"));
    let (captured, on_capture) = tokio::sync::oneshot::channel();
    let snapshot = qemu::stream_snapshot(
        &qmp,
        layout.clone(),
        &image_a,
        &devices_a,
        Durability::Sync,
        StreamMode::Background,
        snapshot_core::CaptureSignals::at_once(captured),
    );
    let resume = async {
        on_capture.await.expect("the capture is announced");
        let status = qmp.execute(&QueryStatus).await.unwrap();
        assert!(!status.running, "QEMU keeps a paused guest paused");
        qmp.execute(&Cont).await.unwrap();
    };
    let (stats, ()) = tokio::join!(snapshot, resume);
    let stats = stats.unwrap();
    eprintln!("background snapshot from tick {tick_at_start}: {stats:?}");
    assert!(stats.downtime < Duration::from_secs(1), "{stats:?}");
    assert_eq!(stats.image.pages_missing, 0);
    assert_eq!(
        stats.stream.ram_pages + stats.stream.ram_zero_pages,
        RAM_SIZE / PAGE_SIZE as u64
    );
    assert_eq!(
        verify(&path("a.img")).unwrap().present_pages,
        stats.image.present_pages
    );
    let mut names = entries(files.path());
    names.sort();
    assert_eq!(names, [path("a.dev"), path("a.img")], "only the two files");
    // The capability is off again and the domain runs on.
    let capabilities = qmp
        .execute_raw("query-migrate-capabilities", serde_json::Value::Null)
        .await
        .unwrap();
    assert!(capabilities
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["state"] == false));
    assert!(qmp.execute(&QueryStatus).await.unwrap().running);
    // Guest RAM was populated before the capture (not inside the caller's pause), once per process.
    let prealloc = qmp
        .execute_raw(
            "qom-get",
            serde_json::json!({ "path": format!("/objects/{}", qemu::RAM_BACKEND_ID), "property": "prealloc" }),
        )
        .await
        .unwrap();
    assert_eq!(prealloc, true, "the memory backend was populated ahead");

    // A consumer slower than QEMU: the guest runs on for seconds, the image still holds the start.
    let (slow_start, slow_end) = slow_snapshot(&source, &qmp, &path("b.img"), &path("b.dev")).await;
    assert!(
        slow_end >= slow_start + 4,
        "the guest ran on during the snapshot: {slow_start}..{slow_end}"
    );

    // QEMU killed mid-stream: an error, and no files.
    let (image_c, devices_c) = (path("c.img"), path("c.dev"));
    let (captured, _) = tokio::sync::oneshot::channel();
    let snapshot = qemu::stream_snapshot(
        &qmp,
        layout,
        &image_c,
        &devices_c,
        Durability::Sync,
        StreamMode::Background,
        snapshot_core::CaptureSignals::at_once(captured),
    );
    let kill = async {
        let deadline = Instant::now() + WAIT;
        loop {
            let info = qmp.execute(&QueryMigrate).await.unwrap();
            if info.status == Some(MigrationStatus::Active)
                && info.ram.as_ref().is_some_and(|r| r.transferred > 0)
            {
                break;
            }
            assert!(Instant::now() < deadline, "the snapshot did not start: {info:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        source.kill();
    };
    let (result, ()) = tokio::join!(snapshot, kill);
    let error = result.unwrap_err();
    eprintln!("QEMU killed mid-stream: {error}");
    let mut names = entries(files.path());
    names.sort();
    assert_eq!(
        names,
        [path("a.dev"), path("a.img"), path("b.dev"), path("b.img")]
    );
    drop(source);

    check_restore_continues(workload.clone(), &path("a.img"), &path("a.dev"), tick_at_start).await;
    check_restore_continues(workload, &path("b.img"), &path("b.dev"), slow_start).await;
}

/// Pre-copy with the stop before the switch-over, as the orchestrator drives it.
fn precopy(max_downtime_ms: u64, converge_within: Duration) -> StreamMode {
    StreamMode::Precopy {
        max_downtime: Duration::from_millis(max_downtime_ms),
        converge_within,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_stops_the_guest_for_the_disks_and_restores_to_that_stop() {
    let workload = Workload::Dirty {
        rate_mib: 16,
        wss_mib: 32,
    };
    let src_dir = shm_dir("pc-src");
    let source = spawn("pc-src", src_dir.path(), Some(workload.clone()), false);
    source.wait_for_serial("DOMSNAP READY", BOOT);
    source.try_wait_for_tick_after(1, WAIT).unwrap();
    let qmp = connect(&source).await;
    let layout = ImageLayout::of(&map_ram(&source, &qmp).await);
    let files = tempfile::tempdir().unwrap();
    let path = |name: &str| files.path().join(name);

    // Too little time to converge: cancelled, the guest runs on, no files, settings back.
    let (prepared, on_prepared) = tokio::sync::oneshot::channel();
    let (_capture, capture) = tokio::sync::oneshot::channel();
    let (captured, _) = tokio::sync::oneshot::channel();
    let signals = snapshot_core::CaptureSignals {
        prepared,
        capture,
        captured,
    };
    let error = qemu::stream_snapshot(
        &qmp,
        layout.clone(),
        &path("x.img"),
        &path("x.dev"),
        Durability::NoSync,
        precopy(1, Duration::from_millis(30)),
        signals,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::NotConverged { .. }), "{error}");
    assert!(on_prepared.await.is_err(), "never prepared");
    assert!(entries(files.path()).is_empty());
    assert!(qmp.execute(&QueryStatus).await.unwrap().running);
    // Ended: cancelled, or failed when QEMU's write into the socket the reader shut down came
    // first (a race that the machine's load decides).
    let info = qmp.execute(&QueryMigrate).await.unwrap();
    assert!(
        matches!(
            info.status,
            Some(MigrationStatus::Cancelled | MigrationStatus::Failed)
        ),
        "{info:?}"
    );

    // Converging: QEMU stops the guest, waits for the disks, completes; the guest runs again
    // when the capture is announced.
    let (prepared, on_prepared) = tokio::sync::oneshot::channel();
    let (go, capture) = tokio::sync::oneshot::channel();
    let (captured, on_captured) = tokio::sync::oneshot::channel();
    let signals = snapshot_core::CaptureSignals {
        prepared,
        capture,
        captured,
    };
    let (image_a, devices_a) = (path("a.img"), path("a.dev"));
    let snapshot = qemu::stream_snapshot(
        &qmp,
        layout,
        &image_a,
        &devices_a,
        Durability::Sync,
        precopy(20, WAIT),
        signals,
    );
    let switch_over = async {
        on_prepared.await.expect("pre-copy converged");
        let status = qmp.execute(&QueryStatus).await.unwrap();
        assert!(!status.running, "QEMU stopped the guest before the switch-over");
        let info = qmp.execute(&QueryMigrate).await.unwrap();
        assert_eq!(info.status, Some(MigrationStatus::PreSwitchover));
        // The disks would be snapshotted here.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let tick = last_tick(&source);
        go.send(()).unwrap();
        on_captured.await.expect("the capture is announced");
        // QEMU stopped the guest, and the capture resumed it.
        assert!(qmp.execute(&QueryStatus).await.unwrap().running);
        tick
    };
    let (stats, tick_at_stop) = tokio::join!(snapshot, switch_over);
    let stats = stats.unwrap();
    eprintln!("pre-copy stopped at tick {tick_at_stop}: {stats:?}");
    assert!(stats.passes >= 2, "{stats:?}");
    assert!(stats.downtime < Duration::from_secs(1), "{stats:?}");
    assert_eq!(stats.image.pages_missing, 0);
    // A page sent again replaced its earlier copy: the image holds RAM once.
    let image_len = std::fs::metadata(path("a.img")).unwrap().len();
    assert!(image_len < RAM_SIZE + (1 << 20), "{image_len}");
    assert!(stats.stream.ram_pages + stats.stream.ram_zero_pages > RAM_SIZE / PAGE_SIZE as u64);
    let capabilities = qmp
        .execute_raw("query-migrate-capabilities", serde_json::Value::Null)
        .await
        .unwrap();
    assert!(capabilities
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["state"] == false));
    assert!(qmp.execute(&QueryStatus).await.unwrap().running);
    drop(source);

    check_restore_continues(workload, &path("a.img"), &path("a.dev"), tick_at_stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_snapshots_refused_before_they_start_leave_no_files() {
    let dir = shm_dir("bg-refused");
    let qemu = spawn("bg-refused", dir.path(), None, false);
    let qmp = connect(&qemu).await;
    let layout = ImageLayout::of(&map_ram(&qemu, &qmp).await);
    let files = tempfile::tempdir().unwrap();
    let (image, devices) = (files.path().join("ram.img"), files.path().join("devices"));

    // A capability that changes the stream; the capture is never announced.
    set_capabilities(&qmp, &[(MigrationCapability::XIgnoreShared, true)]).await;
    let (captured, on_capture) = tokio::sync::oneshot::channel();
    let error = qemu::stream_snapshot(
        &qmp,
        layout.clone(),
        &image,
        &devices,
        Durability::Sync,
        StreamMode::Background,
        snapshot_core::CaptureSignals::at_once(captured),
    )
    .await
    .unwrap_err();
    assert!(on_capture.await.is_err());
    assert!(matches!(error, Error::MigrationSettings { .. }), "{error}");
    assert!(error.to_string().contains("x-ignore-shared"), "{error}");
    set_capabilities(&qmp, &[(MigrationCapability::XIgnoreShared, false)]).await;
    assert!(entries(files.path()).is_empty());

    // A layout that is not the RAM file's.
    let half = ImageLayout::new(
        vec![memory::RegionInfo {
            gpa: 0,
            len: RAM_SIZE / 2,
        }],
        1,
    )
    .unwrap();
    let (captured, _) = tokio::sync::oneshot::channel();
    let error = qemu::stream_snapshot(
        &qmp,
        half,
        &image,
        &devices,
        Durability::Sync,
        StreamMode::Background,
        snapshot_core::CaptureSignals::at_once(captured),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::RamLayout { .. }), "{error}");
    assert!(entries(files.path()).is_empty());

    // The same QEMU then snapshots fine.
    let (captured, on_capture) = tokio::sync::oneshot::channel();
    let stats = qemu::stream_snapshot(
        &qmp,
        layout,
        &image,
        &devices,
        Durability::NoSync,
        StreamMode::Background,
        snapshot_core::CaptureSignals::at_once(captured),
    )
    .await
    .unwrap();
    assert_eq!(on_capture.await, Ok(()));
    assert_eq!(stats.image.pages_missing, 0);
    assert_eq!(entries(files.path()).len(), 2);
}
