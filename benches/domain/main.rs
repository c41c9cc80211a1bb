//! The issue-5 benchmark: domsnap against QEMU's own snapshot and migration commands, on one 1 GiB test
//! guest, in one run, side by side. Run it with `cargo xtask bench --only domain` (or
//! `cargo bench -p integration --bench domain -- --reps N`); method and results in
//! `docs/benchmarks.md`.
//!
//! One source guest (1 GiB, rewriting a 64 MiB working set at 48 MiB/s, about 50 MB/s) serves every
//! create and `snapshot-load`; every revert and `migrate-incoming` gets a fresh QEMU. The repetitions
//! of the scenarios are interleaved, so a burst of other work on the machine hits both sides alike.
//! The domsnap side is in [`domsnap`] (one function per scenario), QEMU's in [`baseline`].

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
use memory::{Durability, GuestMemory};
use qmp::{commands::*, Client, ClientOptions, MigrationStatus};
use report::{Pick, Results, Row, Target};
use serde_json::json;
use tempfile::TempDir;
use testkit::{Qemu, Workload};

/// Guest RAM.
const RAM_MIB: u64 = 1024;
/// Repetitions of every scenario unless `--reps` says otherwise.
const DEFAULT_REPS: usize = 5;
/// Where QEMU's RAM files live, as for a real domain (tmpfs).
const SHM: &str = "/dev/shm";
/// The source guest's boot, and any wait for the guest to print something.
const BOOT: Duration = Duration::from_secs(120);
/// How long the guest runs between two measurements, so each starts from a guest that is dirtying
/// memory at its steady rate (a pause stops the workload's clock).
const SETTLE: Duration = Duration::from_millis(1500);
/// Longest wait for a migration (a live one to a file can take many seconds here).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's migration bandwidth limit when lifted: no limit in practice (libvirt lifts it the same way
/// when it saves a domain to a file).
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// The block node holding `snapshot-save`'s VM state: a qcow2 image that is not a guest disk, so
/// the targets of the reverts need no disk and neither side snapshots any guest disk.
const VMSTATE_NODE: &str = "vmstate";

/// The guest's workload: 48 MiB/s (50.3 MB/s) over a 64 MiB working set.
fn workload() -> Workload {
    Workload::Dirty {
        rate_mib: 48,
        wss_mib: 64,
    }
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

/// What the run shares: the async runtime for QMP and the folders.
#[derive(Debug)]
pub struct Bench {
    runtime: tokio::runtime::Runtime,
    /// Snapshot files: on the disk, where snapshots are kept.
    work: TempDir,
}

impl Bench {
    /// Runs a QMP future to completion.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A file in the snapshot folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }
}

/// How a QEMU starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// Boots the guest.
    Boot,
    /// Waits for device state without RAM (`-incoming defer`, `send-configuration=off`, `-S`): a
    /// domsnap revert, whose RAM the toolstack writes.
    IncomingDevices,
    /// Waits for a whole migration stream (`-incoming defer`, `-S`): QEMU's `migrate-incoming`.
    IncomingStream,
}

/// A QEMU with its QMP connection and its folder on tmpfs (removed after QEMU is killed: the fields
/// drop in this order).
#[derive(Debug)]
pub struct Vm {
    /// The process.
    pub qemu: Qemu,
    /// Its QMP connection.
    pub qmp: Client,
    _dir: TempDir,
}

impl Vm {
    /// Starts a 1 GiB QEMU for the test guest and connects to QMP. Returns once QEMU answers.
    pub fn spawn(bench: &Bench, name: &str, start: Start) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("domsnap-bench-{name}-"))
            .tempdir_in(SHM)
            .with_context(|| format!("create a folder in {SHM}"))?;
        let builder = Qemu::builder(name)
            .memory_mib(RAM_MIB)
            .guest(workload())
            .in_dir(dir.path());
        let qemu = match start {
            Start::Boot => builder,
            Start::IncomingDevices => builder.incoming_defer(),
            // Without `send-configuration=off`: QEMU's own stream carries the configuration section.
            Start::IncomingStream => builder.paused().arg("-incoming").arg("defer"),
        }
        .spawn();
        let qmp = bench
            .block_on(Client::connect_unix(qemu.qmp_socket(), ClientOptions::default()))
            .context("connect to QMP")?;
        Ok(Vm { qemu, qmp, _dir: dir })
    }

    /// Runs one QMP command.
    pub fn execute<C: qmp::commands::Command>(&self, bench: &Bench, command: &C) -> Result<C::Response> {
        bench
            .block_on(self.qmp.execute(command))
            .with_context(|| format!("QMP {}", C::NAME))
    }

    /// Maps the RAM file where QEMU says it sits in guest-physical memory.
    pub fn map_ram(&self, bench: &Bench) -> Result<GuestMemory> {
        let regions = bench
            .block_on(qemu::ram_layout(&self.qmp))
            .context("read the RAM layout")?;
        GuestMemory::from_ram_file(&self.qemu.ram_file(), &regions).context("map the RAM file")
    }

    /// Polls `query-migrate` until the migration (either direction) completes; returns its report.
    pub fn wait_migration(&self, bench: &Bench) -> Result<MigrationInfo> {
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self.execute(bench, &QueryMigrate)?;
            match info.status {
                Some(MigrationStatus::Completed) => return Ok(info),
                Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                    bail!("migration ended {info:?}; QEMU stderr:\n{}", self.qemu.stderr())
                }
                _ if Instant::now() > deadline => bail!("migration not complete in time: {info:?}"),
                // Short enough not to blur a sub-second migration, long enough not to load QEMU.
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Resumes a restored guest and waits for its next tick: proof that what was measured was a
    /// working restore (not timed).
    pub fn check_resumes(&self, bench: &Bench, what: &str) -> Result<()> {
        self.execute(bench, &Cont)?;
        self.qemu
            .try_wait_for_tick_after(0, Duration::from_secs(30))
            .map_err(|log| anyhow::anyhow!("the guest restored by {what} does not run: {log}"))?;
        Ok(())
    }
}

/// The guest every create is taken from.
#[derive(Debug)]
pub struct Source {
    /// The QEMU.
    pub vm: Vm,
}

impl Source {
    fn boot(bench: &Bench) -> Result<Source> {
        let vm = Vm::spawn(bench, "bench-src", Start::Boot)?;
        vm.qemu.wait_for_serial("DOMSNAP READY", BOOT);
        // A few ticks: the workload has allocated its working set and dirties at its rate.
        vm.qemu
            .try_wait_for_tick_after(3, BOOT)
            .map_err(|log| anyhow::anyhow!("the guest does not tick: {log}"))?;
        let vmstate = bench.file("vmstate.qcow2");
        testkit::create_qcow2(&vmstate, "64M");
        vm.execute(bench, &BlockdevAdd::file("vmstate-file", path_str(&vmstate)?))?;
        vm.execute(bench, &BlockdevAdd::qcow2(VMSTATE_NODE, "vmstate-file"))?;
        Ok(Source { vm })
    }

    /// Lets the guest run between measurements.
    fn settle(&self) {
        std::thread::sleep(SETTLE);
    }

    /// Allocates every page of the RAM file without changing its content, as a guest that has run
    /// for a while has: a fresh guest's RAM file is mostly holes, which domsnap skips and QEMU's
    /// migration fills on its first run, so without this the two would not read the same memory.
    fn populate_ram_file(&self) -> Result<()> {
        cmd_output(
            Command::new("fallocate")
                .args(["--length", &format!("{RAM_MIB}MiB")])
                .arg(self.vm.qemu.ram_file()),
        )?;
        Ok(())
    }
}

/// What loading a snapshot into a new QEMU cost.
#[derive(Debug)]
pub struct Loaded {
    /// Starting QEMU with `-incoming defer` until it answers on QMP.
    pub startup: Duration,
    /// From QEMU answering until the guest is loaded and paused.
    pub load: Duration,
    /// Both.
    pub with_startup: Duration,
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
        scenario: "paused create, durable (image and device state fsynced)",
        domsnap: "domsnap.create_paused.total",
        baseline: Some((
            "`migrate` to `file:`, default bandwidth, + fsync",
            "qemu.migrate_paused.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(6.0),
    },
    Row {
        scenario: "paused create, durable",
        domsnap: "domsnap.create_paused.total",
        baseline: Some((
            "`migrate` to `file:`, bandwidth unlimited, + fsync",
            "qemu.migrate_paused_unlimited.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(6.0),
    },
    Row {
        scenario: "paused create, not synced",
        domsnap: "domsnap.create_paused_nosync.total",
        baseline: Some((
            "`migrate` to `file:`, bandwidth unlimited, not synced",
            "qemu.migrate_paused_unlimited.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "paused create, durable",
        domsnap: "domsnap.create_paused.total",
        baseline: Some((
            "`snapshot-save` job (VM state into qcow2)",
            "qemu.snapshot_save.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "live create: guest pause (stop → cont)",
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
        scenario: "live create: total time",
        domsnap: "domsnap.create_live.total",
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
        scenario: "revert into a started QEMU (restore RAM, load devices, until paused)",
        domsnap: "domsnap.revert.load",
        baseline: Some(("`snapshot-load` job (guest paused)", "qemu.snapshot_load.wall")),
        pick: Pick::Median,
        target: Target::RatioAtLeast(2.0),
    },
    Row {
        scenario: "revert into a started QEMU",
        domsnap: "domsnap.revert.load",
        baseline: Some((
            "`migrate-incoming` from file, until completed",
            "qemu.migrate_incoming.load",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(10.0),
    },
    Row {
        scenario: "revert including QEMU start-up",
        domsnap: "domsnap.revert.with_startup",
        baseline: Some((
            "`migrate-incoming` including QEMU start-up",
            "qemu.migrate_incoming.with_startup",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert including QEMU start-up",
        domsnap: "domsnap.revert.with_startup",
        baseline: Some((
            "`snapshot-load` (no start-up: same QEMU)",
            "qemu.snapshot_load.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "fresh guest (sparse RAM file): paused create, durable",
        domsnap: "domsnap.fresh.create_paused.total",
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
];

fn run() -> Result<()> {
    let reps = parse_reps()?;
    let started = Instant::now();
    let load_before = loadavg();
    let bench = Bench {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        work: tempfile::Builder::new()
            .prefix("domain-bench-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?,
    };
    let mut results = Results::default();
    results.bytes("guest.ram_bytes", RAM_MIB << 20);

    eprintln!(
        "domain bench: booting the 1 GiB source guest ({workload:?})",
        workload = workload()
    );
    let source = Source::boot(&bench)?;

    // Phase 1: the freshly booted guest, whose RAM file is mostly holes. Only domsnap can be measured
    // here repeatedly: QEMU's migration reads (and so allocates) every page on its first run.
    for rep in 0..reps {
        eprintln!("domain bench: fresh guest, repetition {}/{reps}", rep + 1);
        source.settle();
        let paused = domsnap::create_paused(&bench, &source, "fresh-paused", Durability::Sync)?;
        results.time("domsnap.fresh.create_paused.total", paused.total);
        source.settle();
        let live = domsnap::create_live(&bench, &source, "fresh-live")?;
        results.time("domsnap.fresh.create_live.pause", live.pause);
        results.time("domsnap.fresh.create_live.total", live.total);
    }

    // Phase 2: every page of the RAM file allocated. One pass of each side first, not measured:
    // the first to touch the new pages also pays for mapping them into its address space.
    source.populate_ram_file()?;
    let default_bandwidth = baseline::max_bandwidth(&bench, &source)?;
    domsnap::create_paused(&bench, &source, "warm-up", Durability::NoSync)?;
    baseline::migrate_paused(&bench, &source, &bench.file("warm-up.bin"))?;
    // Then the creates of both sides, interleaved.
    let mut kept = None;
    for rep in 0..reps {
        eprintln!("domain bench: creates, repetition {}/{reps}", rep + 1);
        let last = rep + 1 == reps;
        source.settle();
        let paused = domsnap::create_paused(&bench, &source, "paused", Durability::Sync)?;
        results.time("domsnap.create_paused.total", paused.total);
        results.time("domsnap.create_paused.map", paused.map);
        results.time("domsnap.create_paused.pause", paused.pause);
        results.time("domsnap.create_paused.memory", paused.memory);
        results.bytes("domsnap.create_paused.image_allocated", paused.image_allocated);
        results.bytes("domsnap.create_paused.image_len", paused.image_len);
        results.bytes("domsnap.create_paused.devices_bytes", paused.devices_bytes);
        source.settle();
        let unsynced = domsnap::create_paused(&bench, &source, "paused-nosync", Durability::NoSync)?;
        results.time("domsnap.create_paused_nosync.total", unsynced.total);

        source.settle();
        let migrate_file = bench.file("migrate-paused.bin");
        let migrated = baseline::migrate_paused(&bench, &source, &migrate_file)?;
        results.time("qemu.migrate_paused.wall", migrated.wall);
        results.time("qemu.migrate_paused.wall_fsync", migrated.wall + migrated.fsync);
        results.time("qemu.migrate_paused.qemu_total", migrated.qemu_total);
        results.bytes("qemu.migrate_paused.file_bytes", migrated.file_bytes);

        source.settle();
        baseline::set_max_bandwidth(&bench, &source, UNLIMITED_BANDWIDTH)?;
        let unlimited = baseline::migrate_paused(&bench, &source, &bench.file("migrate-unlimited.bin"))?;
        baseline::set_max_bandwidth(&bench, &source, default_bandwidth)?;
        results.time("qemu.migrate_paused_unlimited.wall", unlimited.wall);
        results.time(
            "qemu.migrate_paused_unlimited.wall_fsync",
            unlimited.wall + unlimited.fsync,
        );
        results.time("qemu.migrate_paused_unlimited.qemu_total", unlimited.qemu_total);

        source.settle();
        let tag = format!("bench-{rep}");
        results.time(
            "qemu.snapshot_save.wall",
            baseline::snapshot_save(&bench, &source, &tag)?,
        );
        if !last {
            baseline::snapshot_delete(&bench, &source, &tag)?;
        }

        source.settle();
        let live = domsnap::create_live(&bench, &source, "live")?;
        results.time("domsnap.create_live.pause", live.pause);
        results.time("domsnap.create_live.memory_pause", live.memory);
        results.time("domsnap.create_live.total", live.total);
        results.count("domsnap.create_live.rounds", live.rounds);
        results.bytes("domsnap.create_live.image_allocated", live.image_allocated);
        results.bytes("domsnap.create_live.image_len", live.image_len);

        source.settle();
        let live_file = bench.file("migrate-live.bin");
        let migrated_live = baseline::migrate_live(&bench, &source, &live_file)?;
        results.time("qemu.migrate_live.downtime", migrated_live.downtime);
        results.time("qemu.migrate_live.wall", migrated_live.wall);
        results.time("qemu.migrate_live.qemu_total", migrated_live.qemu_total);
        results.bytes("qemu.migrate_live.file_bytes", migrated_live.file_bytes);
        results.count("qemu.migrate_live.dirty_syncs", migrated_live.dirty_syncs);

        source.settle();
        baseline::set_max_bandwidth(&bench, &source, UNLIMITED_BANDWIDTH)?;
        let live_unlimited = baseline::migrate_live(&bench, &source, &live_file)?;
        baseline::set_max_bandwidth(&bench, &source, default_bandwidth)?;
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

        if last {
            kept = Some((paused, migrate_file, tag));
        }
    }
    let (snapshot, migrate_file, tag) = kept.context("no repetition ran")?;

    // Reverts: domsnap's image, QEMU's migration file and internal snapshot, all taken above.
    for rep in 0..reps {
        eprintln!("domain bench: reverts, repetition {}/{reps}", rep + 1);
        let (revert, target) = domsnap::revert(&bench, &snapshot)?;
        results.time("domsnap.revert.load", revert.loaded.load);
        results.time("domsnap.revert.with_startup", revert.loaded.with_startup);
        results.time("domsnap.revert.startup", revert.loaded.startup);
        results.time("domsnap.revert.restore_ram", revert.memory);
        if rep == 0 {
            target.check_resumes(&bench, "domsnap")?;
        }
        drop(target);

        let (incoming, target) = baseline::migrate_incoming(&bench, &migrate_file)?;
        results.time("qemu.migrate_incoming.load", incoming.load);
        results.time("qemu.migrate_incoming.with_startup", incoming.with_startup);
        results.time("qemu.migrate_incoming.startup", incoming.startup);
        if rep == 0 {
            target.check_resumes(&bench, "migrate-incoming")?;
        }
        drop(target);

        source.settle();
        results.time(
            "qemu.snapshot_load.wall",
            baseline::snapshot_load(&bench, &source, &tag)?,
        );
    }
    drop(source);

    let elapsed = started.elapsed();
    let table = report::table(&results, ROWS);
    println!("\n{table}");
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
        "level": "domsnap measured at the mechanism level (memory engine + QMP), see docs/benchmarks.md",
        "guest": { "ram_mib": RAM_MIB, "workload": format!("{:?}", workload()) },
        "repetitions": reps,
        "elapsed_seconds": elapsed.as_secs_f64(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": report::rows_json(&results, ROWS),
        "series": results.to_json(),
    });
    fs::write(&out, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("write {}", out.display()))?;
    println!("JSON: {}", out.display());
    Ok(())
}
