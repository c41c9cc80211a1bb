//! The issue-5 benchmark: domsnap against QEMU's own snapshot and migration commands, on one 1 GiB test
//! guest with one qcow2 disk, in one run, side by side. Run it with `cargo xtask bench --only domain`
//! (or `cargo bench -p integration --bench domain -- --reps N`); method and results in
//! `docs/benchmarks.md`.
//!
//! The domsnap side is the product itself ([`domsnap`]): an in-process `Orchestrator` over a
//! `QemuDriver` and an `FsStore` on a temporary state directory, whose domain runs the guest
//! (rewriting a 64 MiB working set at 48 MiB/s, about 50 MB/s). QEMU's side ([`baseline`]) runs on
//! that same domain's QEMU through its second QMP monitor; only `migrate-incoming` gets a QEMU of
//! its own (a new one each time, as each domsnap revert starts one). The repetitions of the
//! scenarios are interleaved, so a burst of other work on the machine hits both sides alike. A second
//! domain runs the idle guest for the live creates against QEMU's live migration there. The live
//! create runs in both modes, pre-copy and background (QEMU's `background-snapshot` streamed into
//! domsnap's image); issue 6's table puts them beside QEMU's live `migrate` and QEMU's
//! `background-snapshot` migration to a plain file.

mod baseline;
mod domsnap;
mod report;

use std::{
    fs,
    future::Future,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use domsnap::{Domain, MemorySteps};
use qmp::{commands::*, Client, ClientOptions, MigrationStatus};
use report::{GridRow, Pick, Results, Row, Target};
use serde_json::json;
use snapshot_core::{LiveMethod, LiveOptions, MemoryMode};
use tempfile::TempDir;
use testkit::{Qemu, Workload};

/// Guest RAM.
const RAM_MIB: u64 = 1024;
/// The guest disk: small and unused by the workload; it is there so that the disk step of a
/// snapshot is part of what is measured.
const DISK_SIZE: &str = "64M";
/// The guest disk's target id.
const DISK: &str = "vda";
/// Repetitions of every scenario unless `--reps` says otherwise.
const DEFAULT_REPS: usize = 5;
/// Where the `migrate-incoming` QEMUs' RAM files live, as the driver's do (tmpfs).
const SHM: &str = "/dev/shm";
/// The guest's boot, and any wait for the guest to print something.
const BOOT: Duration = Duration::from_secs(120);
/// How long the guest runs between two measurements, so each starts from a guest that is dirtying
/// memory at its steady rate (a pause stops the workload's clock).
const SETTLE: Duration = Duration::from_millis(1500);
/// Longest wait for a migration (a live one to a file can take many seconds here).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's migration bandwidth limit when lifted: no limit in practice (libvirt lifts it the same way
/// when it saves a domain to a file).
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// The paused snapshot every revert goes back to.
const KEPT: &str = "kept";
/// A guest page.
const PAGE_BYTES: u64 = 4096;

/// The dirtying guest's workload: 48 MiB/s (50.3 MB/s) over a 64 MiB working set.
fn dirty_workload() -> Workload {
    Workload::Dirty {
        rate_mib: 48,
        wss_mib: 64,
    }
}

/// The live create's memory mode, as `domsnap snapshot create --live` uses: pre-copy.
fn live() -> MemoryMode {
    MemoryMode::Live(LiveOptions::default())
}

/// The background create's memory mode (`--live-mode background`).
fn background() -> MemoryMode {
    MemoryMode::Live(LiveOptions {
        method: LiveMethod::Background,
        ..LiveOptions::default()
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domain bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--reps N`; the rest is ignored, because `cargo xtask bench -- ARGS` hands the same arguments
/// to every bench binary (criterion's among them) and cargo adds `--bench`.
fn parse_reps() -> Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut reps = DEFAULT_REPS;
    while let Some(arg) = args.next() {
        if arg == "--reps" {
            let value = args.next().context("--reps needs a number")?;
            reps = value.parse().with_context(|| format!("--reps {value}"))?;
            if reps == 0 {
                bail!("--reps must be at least 1");
            }
        } else if arg != "--bench" {
            eprintln!("domain bench: ignoring argument {arg:?}");
        }
    }
    Ok(reps)
}

/// What the run shares: the async runtime and the folder.
#[derive(Debug)]
pub struct Bench {
    runtime: tokio::runtime::Runtime,
    /// The state directory (`state/`) and every other file (disks, QEMU's migration files), on
    /// the disk where snapshots are kept. Under /tmp: QEMU's socket paths below the state
    /// directory are limited to 107 bytes.
    dir: TempDir,
}

impl Bench {
    fn new() -> Result<Bench> {
        let dir = tempfile::Builder::new()
            .prefix("domsnap-bench-")
            .tempdir_in("/tmp")?;
        fs::create_dir(dir.path().join("state"))?;
        Ok(Bench {
            // As the `domsnap` CLI runs the orchestrator.
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            dir,
        })
    }

    /// Runs a future (an orchestrator operation, QMP) to completion.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A file in the bench folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The driver's and the store's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.file("state")
    }
}

/// A QMP connection to a QEMU, for QEMU's own commands.
#[derive(Debug)]
pub struct Monitor {
    /// The connection.
    pub client: Client,
    /// QEMU's log, quoted when a migration fails.
    log: PathBuf,
}

impl Monitor {
    /// Connects to the QMP socket `socket` of a QEMU that logs to `log`.
    pub fn connect(bench: &Bench, socket: &Path, log: PathBuf) -> Result<Monitor> {
        let client = bench
            .block_on(Client::connect_unix(socket, ClientOptions::default()))
            .with_context(|| format!("connect to QMP at {}", socket.display()))?;
        Ok(Monitor { client, log })
    }

    /// Runs one QMP command.
    pub fn execute<C: qmp::commands::Command>(&self, bench: &Bench, command: &C) -> Result<C::Response> {
        bench
            .block_on(self.client.execute(command))
            .with_context(|| format!("QMP {}", C::NAME))
    }

    /// Polls `query-migrate` until the migration (either direction) completes; returns its report.
    pub fn wait_migration(&self, bench: &Bench) -> Result<MigrationInfo> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self.execute(bench, &QueryMigrate)?;
            match info.status {
                Some(MigrationStatus::Completed) => return Ok(info),
                Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                    let log = fs::read_to_string(&self.log).unwrap_or_default();
                    bail!("migration ended {info:?}; QEMU's log:\n{log}")
                }
                _ if Instant::now() > deadline => bail!("migration not complete in time: {info:?}"),
                // Short enough not to blur a sub-second migration, long enough not to load QEMU.
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// A QEMU of the bench's own (testkit's, not the driver's), waiting for a whole migration stream
/// (`-incoming defer`, `-S`), with its folder on tmpfs (removed after QEMU is killed: the fields
/// drop in this order).
#[derive(Debug)]
pub struct Vm {
    /// The process.
    pub qemu: Qemu,
    /// Its QMP connection.
    pub monitor: Monitor,
    _dir: TempDir,
}

impl Vm {
    /// Starts the dirtying domain's machine with `disk` as its guest disk and connects to QMP.
    /// Returns once QEMU answers.
    pub fn spawn_incoming(bench: &Bench, disk: &Path) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix("domsnap-bench-incoming-")
            .tempdir_in(SHM)
            .with_context(|| format!("create a folder in {SHM}"))?;
        // testkit builds the driver's command line, so this is the domain's machine; without
        // `send-configuration=off`: QEMU's own stream carries the configuration section.
        let qemu = Qemu::builder("bench-incoming")
            .memory_mib(RAM_MIB)
            .guest(dirty_workload())
            .disk(disk)
            .in_dir(dir.path())
            .paused()
            .arg("-incoming")
            .arg("defer")
            .spawn();
        let monitor = Monitor::connect(bench, &qemu.qmp_socket(), qemu.dir().join("qemu.stderr"))?;
        Ok(Vm {
            qemu,
            monitor,
            _dir: dir,
        })
    }

    /// Resumes the restored guest and waits for its next tick: proof that what was measured was a
    /// working restore (not timed).
    pub fn check_resumes(&self, bench: &Bench) -> Result<()> {
        self.monitor.execute(bench, &Cont)?;
        self.qemu
            .try_wait_for_tick_after(0, Duration::from_secs(30))
            .map_err(|log| anyhow::anyhow!("the guest restored by migrate-incoming does not run: {log}"))?;
        Ok(())
    }
}

/// A path as the UTF-8 string QMP wants.
pub fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// A file's length and the bytes allocated to it (the sparse image's real size).
pub fn file_size(path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((meta.len(), meta.blocks() * 512))
}

/// fsyncs a file; returns how long it took.
pub fn fsync(path: &Path) -> Result<Duration> {
    let started = Instant::now();
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("fsync {}", path.display()))?;
    Ok(started.elapsed())
}

fn cmd_output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The machine, for the report: what could make the numbers noisy.
fn machine() -> serde_json::Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default().trim().to_owned();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "memory": read("/proc/meminfo").lines().next().unwrap_or_default(),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "qemu": cmd_output(Command::new("qemu-system-x86_64").arg("--version"))
            .unwrap_or_default().lines().next().unwrap_or_default(),
    })
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The rows of the table; series keys are those the scenarios record.
const ROWS: &[Row] = &[
    Row {
        scenario: "paused create, end to end (memory, devices, disk; all fsynced)",
        domsnap: "domsnap.create_paused.wall",
        baseline: Some((
            "`migrate` to `file:`, default bandwidth, + fsync (no disk)",
            "qemu.migrate_paused.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(6.0),
    },
    Row {
        scenario: "paused create, end to end",
        domsnap: "domsnap.create_paused.wall",
        baseline: Some((
            "`migrate` to `file:`, bandwidth unlimited, + fsync (no disk)",
            "qemu.migrate_paused_unlimited.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(6.0),
    },
    Row {
        scenario: "paused create, end to end",
        domsnap: "domsnap.create_paused.wall",
        baseline: Some((
            "`snapshot-save` job (VM state into the disk, disk snapshot)",
            "qemu.snapshot_save.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "paused create: guest pause (report)",
        domsnap: "domsnap.create_paused.pause",
        baseline: Some((
            "`snapshot-save` (guest stopped throughout)",
            "qemu.snapshot_save.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "live create: guest pause (report, stop → cont)",
        domsnap: "domsnap.create_live.pause",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.050),
    },
    Row {
        scenario: "live create: guest pause",
        domsnap: "domsnap.create_live.pause",
        baseline: Some((
            "live `migrate`, default bandwidth: `downtime`",
            "qemu.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "live create: guest pause",
        domsnap: "domsnap.create_live.pause",
        baseline: Some((
            "live `migrate`, bandwidth unlimited: `downtime`",
            "qemu.migrate_live_unlimited.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "background live create: guest pause (stop → cont: disk snapshot, QEMU's capture)",
        domsnap: "domsnap.create_background.pause",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.050),
    },
    Row {
        scenario: "background live create: guest pause",
        domsnap: "domsnap.create_background.pause",
        baseline: Some((
            "live `migrate`, default bandwidth: `downtime`",
            "qemu.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "background live create: guest pause",
        domsnap: "domsnap.create_background.pause",
        baseline: Some((
            "live `migrate`, bandwidth unlimited: `downtime`",
            "qemu.migrate_live_unlimited.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "FIRST background create of the QEMU process (fresh guest): guest pause (one sample)",
        domsnap: "domsnap.create_background_first.pause",
        baseline: Some((
            "live `migrate`, default bandwidth: `downtime`",
            "qemu.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "live create: total time",
        domsnap: "domsnap.create_live.wall",
        baseline: Some((
            "live `migrate`, default bandwidth: start → completed",
            "qemu.migrate_live.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "live create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.create_live.image_allocated",
        baseline: Some(("guest RAM", "guest.ram_bytes")),
        pick: Pick::Max,
        target: Target::RatioAtLeast(1.0),
    },
    Row {
        scenario: "background live create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.create_background.image_allocated",
        baseline: Some(("guest RAM", "guest.ram_bytes")),
        pick: Pick::Max,
        target: Target::RatioAtLeast(1.0),
    },
    Row {
        scenario: "live create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.create_live.image_allocated",
        baseline: Some((
            "live `migrate` file, default bandwidth",
            "qemu.migrate_live.file_bytes",
        )),
        pick: Pick::Max,
        target: Target::None,
    },
    Row {
        scenario: "idle guest: live create, guest pause",
        domsnap: "domsnap.idle.create_live.pause",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.050),
    },
    Row {
        scenario: "idle guest: live create, guest pause",
        domsnap: "domsnap.idle.create_live.pause",
        baseline: Some((
            "live `migrate`, default bandwidth: `downtime`",
            "qemu.idle.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "idle guest: live create, guest pause",
        domsnap: "domsnap.idle.create_live.pause",
        baseline: Some((
            "live `migrate`, bandwidth unlimited: `downtime`",
            "qemu.idle.migrate_live_unlimited.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "idle guest: background live create, guest pause",
        domsnap: "domsnap.idle.create_background.pause",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.050),
    },
    Row {
        scenario: "idle guest: background live create, guest pause",
        domsnap: "domsnap.idle.create_background.pause",
        baseline: Some((
            "live `migrate`, default bandwidth: `downtime`",
            "qemu.idle.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "idle guest: background live create, guest pause",
        domsnap: "domsnap.idle.create_background.pause",
        baseline: Some((
            "live `migrate`, bandwidth unlimited: `downtime`",
            "qemu.idle.migrate_live_unlimited.downtime",
        )),
        pick: Pick::Median,
        target: Target::RatioAbove(1.0),
    },
    Row {
        scenario: "idle guest: FIRST background create of the QEMU process (fresh), pause (one sample)",
        domsnap: "domsnap.idle.create_background_first.pause",
        baseline: Some((
            "live `migrate`, default bandwidth: `downtime`",
            "qemu.idle.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert, end to end (old QEMU ended, disk, new QEMU, memory, devices)",
        domsnap: "domsnap.revert.wall",
        baseline: Some((
            "`migrate-incoming` including QEMU start-up (no disk)",
            "qemu.migrate_incoming.with_startup",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(10.0),
    },
    Row {
        scenario: "revert, end to end",
        domsnap: "domsnap.revert.wall",
        baseline: Some((
            "`snapshot-load` job into the running QEMU (with the disk)",
            "qemu.snapshot_load.wall",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(2.0),
    },
    Row {
        scenario: "revert from QEMU start to loaded (start, memory, devices)",
        domsnap: "domsnap.revert.with_startup",
        baseline: Some((
            "`migrate-incoming` including QEMU start-up",
            "qemu.migrate_incoming.with_startup",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert into the started QEMU (memory, devices)",
        domsnap: "domsnap.revert.load",
        baseline: Some((
            "`snapshot-load` job into the running QEMU",
            "qemu.snapshot_load.wall",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(2.0),
    },
    Row {
        scenario: "revert into the started QEMU",
        domsnap: "domsnap.revert.load",
        baseline: Some((
            "`migrate-incoming` from file, until completed",
            "qemu.migrate_incoming.load",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(10.0),
    },
    Row {
        scenario: "fresh guest (sparse RAM file): paused create, end to end",
        domsnap: "domsnap.fresh.create_paused.wall",
        baseline: Some((
            "`migrate`, default bandwidth, + fsync (populated)",
            "qemu.migrate_paused.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "fresh guest (sparse RAM file): live create pause",
        domsnap: "domsnap.fresh.create_live.pause",
        baseline: Some((
            "live `migrate` `downtime` (populated)",
            "qemu.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "fresh idle guest (sparse RAM file): live create pause",
        domsnap: "domsnap.idle_fresh.create_live.pause",
        baseline: Some((
            "live `migrate` `downtime` (idle, populated)",
            "qemu.idle.migrate_live.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
];

/// Issue 6's methods, in the order of [`GRID`]'s series.
const GRID_METHODS: &[&str] = &[
    "precopy (ours)",
    "background (ours)",
    "QEMU live `migrate` to `file:` (default bandwidth)",
    "QEMU `background-snapshot` to `file:`",
];

/// Issue 6's table: the 1 GiB guest rewriting its working set, the four ways side by side.
const GRID: &[GridRow] = &[
    GridRow {
        quantity: "guest pause (ours: `stop` → `cont`; QEMU: its `downtime`), median",
        pick: Pick::Median,
        series: &[
            "domsnap.create_live.pause",
            "domsnap.create_background.pause",
            "qemu.migrate_live.downtime",
            "qemu.background_snapshot.downtime",
        ],
    },
    GridRow {
        quantity: "total time (ours: `Orchestrator::create`; QEMU: `migrate` → `completed`), median",
        pick: Pick::Median,
        series: &[
            "domsnap.create_live.wall",
            "domsnap.create_background.wall",
            "qemu.migrate_live.wall",
            "qemu.background_snapshot.wall",
        ],
    },
    GridRow {
        quantity: "image / file size, bytes allocated (ours) or length (QEMU), largest",
        pick: Pick::Max,
        series: &[
            "domsnap.create_live.image_allocated",
            "domsnap.create_background.image_allocated",
            "qemu.migrate_live.file_bytes",
            "qemu.background_snapshot.file_bytes",
        ],
    },
];

/// Issue 6's targets, in the format of [`ROWS`].
const ISSUE6_ROWS: &[Row] = &[
    Row {
        scenario: "background create: guest pause (stop → cont, disk snapshot and capture included)",
        domsnap: "domsnap.create_background.pause",
        baseline: Some((
            "QEMU `background-snapshot` to `file:`: `downtime`",
            "qemu.background_snapshot.downtime",
        )),
        pick: Pick::Median,
        target: Target::WithinFactor(1.2),
    },
    Row {
        scenario: "background create: QEMU's own `downtime` inside our pause (report)",
        domsnap: "domsnap.create_background.qemu_downtime",
        baseline: Some((
            "QEMU `background-snapshot` to `file:`: `downtime`",
            "qemu.background_snapshot.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create: total time, end to end (disk snapshot, everything fsynced)",
        domsnap: "domsnap.create_background.wall",
        baseline: Some((
            "QEMU `background-snapshot` to `file:`, `migrate` → `completed`, + fsync",
            "qemu.background_snapshot.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(1.0),
    },
    Row {
        scenario: "background create: total time",
        domsnap: "domsnap.create_background.wall",
        baseline: Some((
            "QEMU `background-snapshot` to `file:`, `migrate` → `completed` (no fsync)",
            "qemu.background_snapshot.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.create_background.image_allocated",
        baseline: Some((
            "the guest's non-zero RAM at the snapshot (pages QEMU sent with data × 4 KiB, largest)",
            "domsnap.create_background.nonzero_ram",
        )),
        pick: Pick::Max,
        target: Target::RatioAtLeast(1.0),
    },
    Row {
        scenario: "background create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.create_background.image_allocated",
        baseline: Some((
            "the guest's non-zero RAM read by domsnap's paused create (largest)",
            "domsnap.create_paused.nonzero_ram",
        )),
        pick: Pick::Max,
        target: Target::None,
    },
    Row {
        scenario: "background create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.create_background.image_allocated",
        baseline: Some((
            "QEMU `background-snapshot` file (largest)",
            "qemu.background_snapshot.file_bytes",
        )),
        pick: Pick::Max,
        target: Target::None,
    },
];

/// Records what a create measured as the series `PREFIX.wall`, `PREFIX.pause`, ...
fn record_create(results: &mut Results, prefix: &str, created: &domsnap::Created) {
    let key = |quantity: &str| format!("{prefix}.{quantity}");
    results.time(&key("wall"), created.wall);
    results.time(&key("report_total"), created.report_total);
    results.time(&key("setup"), created.setup);
    results.time(&key("pause"), created.pause);
    results.bytes(&key("image_len"), created.image_len);
    results.bytes(&key("image_allocated"), created.image_allocated);
    results.bytes(&key("nonzero_ram"), created.pages_stored * PAGE_BYTES);
    results.bytes(&key("devices_bytes"), created.devices_bytes);
    match created.memory {
        MemorySteps::Engine {
            precopy,
            memory_devices,
            final_round,
            disks,
            seal,
            rounds,
        } => {
            results.time(&key("precopy"), precopy);
            results.time(&key("pause_memory_devices"), memory_devices);
            results.time(&key("pause_final_round"), final_round);
            results.time(&key("pause_disks"), disks);
            results.time(&key("seal"), seal);
            results.count(&key("rounds"), rounds);
        }
        MemorySteps::Streamed {
            prepare,
            disks_capture,
            after_resume,
            hypervisor_downtime,
            stream_bytes,
        } => {
            results.time(&key("prepare"), prepare);
            results.time(&key("pause_disks_capture"), disks_capture);
            results.time(&key("after_resume"), after_resume);
            results.time(&key("qemu_downtime"), hypervisor_downtime);
            results.bytes(&key("stream_bytes"), stream_bytes);
        }
    }
}

/// A create that is measured and then deleted (not timed).
fn create_and_delete(
    bench: &Bench,
    domain: &Domain,
    name: &str,
    memory: MemoryMode,
) -> Result<domsnap::Created> {
    let created = domain.create(bench, name, memory)?;
    domain.delete(bench, name)?;
    Ok(created)
}

/// The first background create of the freshly booted domain's QEMU process, measured on its own
/// (series `PREFIX.*`, not in the repetitions' medians): QEMU populates guest RAM for write
/// protection in its first background snapshot, inside domsnap's pause.
fn first_background(bench: &Bench, domain: &Domain, prefix: &str, results: &mut Results) -> Result<()> {
    domain.settle();
    let first = create_and_delete(bench, domain, "background-first", background())?;
    record_create(results, prefix, &first);
    Ok(())
}

/// Records QEMU's background snapshot to a file as the series `PREFIX.downtime`, ...
fn record_background_snapshot(results: &mut Results, prefix: &str, migrated: &baseline::Migrated) {
    let key = |quantity: &str| format!("{prefix}.{quantity}");
    results.time(&key("downtime"), migrated.downtime);
    results.time(&key("wall"), migrated.wall);
    results.time(&key("wall_fsync"), migrated.wall + migrated.fsync);
    results.time(&key("qemu_total"), migrated.qemu_total);
    results.bytes(&key("file_bytes"), migrated.file_bytes);
}

/// Phase 1: the freshly booted guest, whose RAM file is mostly holes: domsnap's paused and live
/// creates, then the QEMU process's first background create (its own row). Only domsnap can be
/// measured here repeatedly: QEMU's migration reads (and so allocates) every page on its first run.
fn fresh_creates(bench: &Bench, source: &Domain, reps: usize, results: &mut Results) -> Result<()> {
    for rep in 0..reps {
        eprintln!("domain bench: fresh guest, repetition {}/{reps}", rep + 1);
        source.settle();
        let paused = create_and_delete(bench, source, "fresh-paused", MemoryMode::Paused)?;
        record_create(results, "domsnap.fresh.create_paused", &paused);
        source.settle();
        let live = create_and_delete(bench, source, "fresh-live", live())?;
        record_create(results, "domsnap.fresh.create_live", &live);
    }
    // Last: QEMU's first background snapshot populates all guest RAM, so the RAM file is no longer
    // sparse afterwards.
    first_background(bench, source, "domsnap.create_background_first", results)?;
    Ok(())
}

/// Phase 2: the creates of both sides on the populated RAM file (paused, pre-copy and background;
/// QEMU's paused, live and background-snapshot migrations), interleaved, and `snapshot-load`
/// (which must run in the QEMU that saved: see `docs/benchmarks.md`). Then takes the paused
/// snapshot [`KEPT`] (not timed) and returns the last paused migration file, for the reverts.
fn creates(bench: &Bench, source: &Domain, reps: usize, results: &mut Results) -> Result<PathBuf> {
    source.populate_ram_file()?;
    let default_bandwidth = source.with_monitor(bench, |qemu| baseline::max_bandwidth(bench, qemu))?;
    // One pass of each side first, not measured: the first to touch the new pages also pays for
    // mapping them into its address space.
    create_and_delete(bench, source, "warm-up", MemoryMode::Paused)?;
    source.with_monitor(bench, |qemu| {
        baseline::migrate_paused(bench, qemu, &bench.file("warm-up.bin"))
    })?;
    let migrate_file = bench.file("migrate-paused.bin");
    let live_file = bench.file("migrate-live.bin");
    let background_file = bench.file("background-snapshot.bin");
    create_and_delete(bench, source, "warm-up", background())?;
    for rep in 0..reps {
        eprintln!("domain bench: creates, repetition {}/{reps}", rep + 1);
        source.settle();
        let paused = create_and_delete(bench, source, "paused", MemoryMode::Paused)?;
        record_create(results, "domsnap.create_paused", &paused);

        source.settle();
        let migrated =
            source.with_monitor(bench, |qemu| baseline::migrate_paused(bench, qemu, &migrate_file))?;
        results.time("qemu.migrate_paused.wall", migrated.wall);
        results.time("qemu.migrate_paused.wall_fsync", migrated.wall + migrated.fsync);
        results.time("qemu.migrate_paused.qemu_total", migrated.qemu_total);
        results.bytes("qemu.migrate_paused.file_bytes", migrated.file_bytes);

        source.settle();
        let unlimited = source.with_monitor(bench, |qemu| {
            baseline::set_max_bandwidth(bench, qemu, UNLIMITED_BANDWIDTH)?;
            let migrated = baseline::migrate_paused(bench, qemu, &bench.file("migrate-unlimited.bin"));
            baseline::set_max_bandwidth(bench, qemu, default_bandwidth)?;
            migrated
        })?;
        results.time("qemu.migrate_paused_unlimited.wall", unlimited.wall);
        results.time(
            "qemu.migrate_paused_unlimited.wall_fsync",
            unlimited.wall + unlimited.fsync,
        );
        results.time("qemu.migrate_paused_unlimited.qemu_total", unlimited.qemu_total);

        source.settle();
        let tag = format!("qemu-{rep}");
        let saved = source.with_monitor(bench, |qemu| baseline::snapshot_save(bench, qemu, &tag))?;
        results.time("qemu.snapshot_save.wall", saved);
        source.settle();
        let loaded = source.with_monitor(bench, |qemu| {
            let loaded = baseline::snapshot_load(bench, qemu, &tag)?;
            baseline::snapshot_delete(bench, qemu, &tag)?;
            Ok(loaded)
        })?;
        results.time("qemu.snapshot_load.wall", loaded);

        source.settle();
        let live = create_and_delete(bench, source, "live", live())?;
        record_create(results, "domsnap.create_live", &live);

        source.settle();
        let background = create_and_delete(bench, source, "background", background())?;
        record_create(results, "domsnap.create_background", &background);

        source.settle();
        let qemu_background = source.with_monitor(bench, |qemu| {
            baseline::background_snapshot(bench, qemu, &background_file)
        })?;
        record_background_snapshot(results, "qemu.background_snapshot", &qemu_background);

        source.settle();
        let migrated_live =
            source.with_monitor(bench, |qemu| baseline::migrate_live(bench, qemu, &live_file))?;
        results.time("qemu.migrate_live.downtime", migrated_live.downtime);
        results.time("qemu.migrate_live.wall", migrated_live.wall);
        results.time("qemu.migrate_live.qemu_total", migrated_live.qemu_total);
        results.bytes("qemu.migrate_live.file_bytes", migrated_live.file_bytes);
        results.count("qemu.migrate_live.dirty_syncs", migrated_live.dirty_syncs);

        source.settle();
        let live_unlimited = source.with_monitor(bench, |qemu| {
            baseline::set_max_bandwidth(bench, qemu, UNLIMITED_BANDWIDTH)?;
            let migrated = baseline::migrate_live(bench, qemu, &live_file);
            baseline::set_max_bandwidth(bench, qemu, default_bandwidth)?;
            migrated
        })?;
        results.time("qemu.migrate_live_unlimited.downtime", live_unlimited.downtime);
        results.time("qemu.migrate_live_unlimited.wall", live_unlimited.wall);
        results.bytes(
            "qemu.migrate_live_unlimited.file_bytes",
            live_unlimited.file_bytes,
        );
        results.count(
            "qemu.migrate_live_unlimited.dirty_syncs",
            live_unlimited.dirty_syncs,
        );
    }
    // Taken after the repetitions, not in the last one: with it in the disk, that repetition's
    // `snapshot-save` took 1.7–3.5 s instead of 0.4–0.6 s.
    source.settle();
    source.create(bench, KEPT, MemoryMode::Paused)?;
    Ok(migrate_file)
}

/// Phase 3: domsnap's revert of the running guest to [`KEPT`] (each ends the domain's QEMU and
/// starts a new one) and `migrate-incoming` of the last paused migration file into a new QEMU,
/// interleaved. Every domsnap revert is checked by resuming its guest before the next one.
fn reverts(
    bench: &Bench,
    source: &Domain,
    migrate_file: &Path,
    reps: usize,
    results: &mut Results,
) -> Result<()> {
    // The incoming QEMU needs a guest disk for the domain's machine, and the domain's own image is
    // locked by the domain's QEMU: an empty one of the same size (the stream holds no disk data).
    let incoming_disk = bench.file("incoming-vda.qcow2");
    testkit::create_qcow2(&incoming_disk, DISK_SIZE);
    for rep in 0..reps {
        eprintln!("domain bench: reverts, repetition {}/{reps}", rep + 1);
        // Every revert ends a running guest, as a user's revert does.
        if rep > 0 {
            source.resume_checked(bench)?;
        }
        source.settle();
        let reverted = source.revert(bench, KEPT)?;
        results.time("domsnap.revert.wall", reverted.wall);
        results.time("domsnap.revert.report_total", reverted.report_total);
        results.time("domsnap.revert.memory", reverted.memory);
        results.time("domsnap.revert.check", reverted.check);
        results.time("domsnap.revert.stop", reverted.stop);
        results.time("domsnap.revert.disks", reverted.disks);
        results.time("domsnap.revert.startup", reverted.startup);
        results.time("domsnap.revert.load", reverted.load);
        results.time("domsnap.revert.with_startup", reverted.with_startup);

        let (incoming, target) = baseline::migrate_incoming(bench, migrate_file, &incoming_disk)?;
        results.time("qemu.migrate_incoming.load", incoming.load);
        results.time("qemu.migrate_incoming.with_startup", incoming.with_startup);
        results.time("qemu.migrate_incoming.startup", incoming.startup);
        if rep == 0 {
            target.check_resumes(bench)?;
        }
    }
    source.resume_checked(bench)
}

/// Phase 4: the idle guest. domsnap's live creates on the fresh guest and then the QEMU process's
/// first background create, then, on the populated RAM file, domsnap's live creates (pre-copy and
/// background) and QEMU's live migration (default and unlimited bandwidth), interleaved.
fn idle_creates(bench: &Bench, idle: &Domain, reps: usize, results: &mut Results) -> Result<()> {
    for rep in 0..reps {
        eprintln!("domain bench: fresh idle guest, repetition {}/{reps}", rep + 1);
        idle.settle();
        let live = create_and_delete(bench, idle, "fresh-live", live())?;
        record_create(results, "domsnap.idle_fresh.create_live", &live);
    }
    first_background(bench, idle, "domsnap.idle.create_background_first", results)?;
    idle.populate_ram_file()?;
    let default_bandwidth = idle.with_monitor(bench, |qemu| baseline::max_bandwidth(bench, qemu))?;
    create_and_delete(bench, idle, "warm-up", MemoryMode::Paused)?;
    idle.with_monitor(bench, |qemu| {
        baseline::migrate_paused(bench, qemu, &bench.file("warm-up.bin"))
    })?;
    let live_file = bench.file("migrate-live-idle.bin");
    create_and_delete(bench, idle, "warm-up", background())?;
    for rep in 0..reps {
        eprintln!("domain bench: idle guest, repetition {}/{reps}", rep + 1);
        idle.settle();
        let live = create_and_delete(bench, idle, "live", live())?;
        record_create(results, "domsnap.idle.create_live", &live);

        idle.settle();
        let background = create_and_delete(bench, idle, "background", background())?;
        record_create(results, "domsnap.idle.create_background", &background);

        idle.settle();
        let migrated = idle.with_monitor(bench, |qemu| baseline::migrate_live(bench, qemu, &live_file))?;
        results.time("qemu.idle.migrate_live.downtime", migrated.downtime);
        results.time("qemu.idle.migrate_live.wall", migrated.wall);
        results.count("qemu.idle.migrate_live.dirty_syncs", migrated.dirty_syncs);

        idle.settle();
        let unlimited = idle.with_monitor(bench, |qemu| {
            baseline::set_max_bandwidth(bench, qemu, UNLIMITED_BANDWIDTH)?;
            let migrated = baseline::migrate_live(bench, qemu, &live_file);
            baseline::set_max_bandwidth(bench, qemu, default_bandwidth)?;
            migrated
        })?;
        results.time("qemu.idle.migrate_live_unlimited.downtime", unlimited.downtime);
        results.time("qemu.idle.migrate_live_unlimited.wall", unlimited.wall);
    }
    Ok(())
}

fn run() -> Result<()> {
    let reps = parse_reps()?;
    let started = Instant::now();
    let load_before = loadavg();
    // Declared first so that it is dropped last: the domains need its runtime to end their QEMUs.
    let bench = Bench::new()?;
    let mut results = Results::default();
    results.bytes("guest.ram_bytes", RAM_MIB << 20);

    eprintln!(
        "domain bench: booting the 1 GiB domain `bench` ({:?}) in {}",
        dirty_workload(),
        bench.state_dir().display()
    );
    let source = Domain::boot(&bench, "bench", &dirty_workload())?;
    fresh_creates(&bench, &source, reps, &mut results)?;
    let migrate_file = creates(&bench, &source, reps, &mut results)?;
    reverts(&bench, &source, &migrate_file, reps, &mut results)?;
    // Ended before the idle guest boots, so that it takes no CPU from what is measured there.
    drop(source);

    eprintln!("domain bench: booting the 1 GiB domain `idle` (Idle)");
    let idle = Domain::boot(&bench, "idle", &Workload::Idle)?;
    idle_creates(&bench, &idle, reps, &mut results)?;
    drop(idle);

    let elapsed = started.elapsed();
    let table = report::table(&results, ROWS);
    println!("\n{table}");
    println!(
        "issue 6, side by side:\n\n{}\n{}",
        report::grid(&results, GRID_METHODS, GRID),
        report::table(&results, ISSUE6_ROWS)
    );
    println!("all series (median [min, max]):\n{}", results.summary());
    let load_after = loadavg();
    println!(
        "{reps} repetitions in {:.0} s; load average before {load_before}, after {load_after}",
        elapsed.as_secs_f64()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("the target folder")?
        .join("bench-domain.json");
    let document = json!({
        "benchmark": "domain: domsnap vs QEMU snapshot-save/snapshot-load/migrate/migrate-incoming",
        "level": "domsnap measured through the product: snapshot_core::Orchestrator over \
                  qemu::QemuDriver and FsStore, see docs/benchmarks.md",
        "guest": {
            "ram_mib": RAM_MIB,
            "disk": format!("{DISK}: qcow2, {DISK_SIZE}, internal snapshots"),
            "workload": format!("{:?}", dirty_workload()),
            "idle_workload": format!("{:?}", Workload::Idle),
        },
        "repetitions": reps,
        "elapsed_seconds": elapsed.as_secs_f64(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": report::rows_json(&results, ROWS),
        "issue6_rows": report::rows_json(&results, ISSUE6_ROWS),
        "series": results.to_json(),
    });
    fs::write(&out, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("write {}", out.display()))?;
    println!("JSON: {}", out.display());
    Ok(())
}
