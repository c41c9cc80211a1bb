//! The domain benchmark (issue 11, part 5): domsnap against QEMU's own migration and snapshot
//! commands, on a test guest with one qcow2 disk rewriting a 64 MiB working set at 48 MiB/s, at
//! 1 GiB and 4 GiB of RAM, in one run, side by side. Run it with `cargo xtask bench --only domain`
//! (or `cargo bench -p integration --bench domain -- --reps N --sizes 1024,4096`); method and
//! results in `docs/benchmarks.md`.
//!
//! The domsnap side is the product itself ([`domsnap`]): an in-process `Orchestrator` over a
//! `QemuDriver` and an `FsStore` on a temporary state directory. QEMU's side ([`baseline`]) runs on
//! that same domain's QEMU through its second QMP monitor; only `migrate-incoming` gets a QEMU of
//! its own (a new one each time, as each domsnap revert starts one). The repetitions of the
//! scenarios are interleaved, so a burst of other work on the machine hits both sides alike. The
//! guest pauses of the live creates come from QEMU's own `STOP` and `RESUME` event timestamps; the
//! guest's behaviour after a revert from its ticks, timestamped as they reach the serial log.
//!
//! Three phases per guest size: the creates and the reverts on a domain whose RAM is on tmpfs (4 KiB
//! pages), then a second domain like it (its own fresh disk, the same workload) whose RAM is in
//! 2 MiB huge pages (`hugepages`, testkit's hugetlbfs mount, the host's pool grown for its QEMU
//! while it runs): its QEMU's first background create, then domsnap's background creates and
//! QEMU's `background-snapshot` on that QEMU, interleaved (QEMU write-protects guest RAM one
//! page-table entry per page inside the pause, so huge pages shorten it), then both again, each
//! right after 512 MiB written to the guest disk through QEMU (QEMU's stop flushes what waits in
//! the host's page cache; domsnap writes it back before the pause).

mod baseline;
mod domsnap;
mod report;
mod rows;

use std::{
    fs,
    future::Future,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use domsnap::{AfterRevert, CreateMode, Domain, GuestAt, RevertMode};
use qmp::{commands::*, Client, ClientOptions, MigrationStatus};
use report::{size_key, size_name, Results};
use serde_json::json;
use snapshot_core::DEFAULT_MAX_DOWNTIME;
use tempfile::TempDir;
use testkit::{Qemu, Workload};

/// Guest sizes measured unless `--sizes` says otherwise (MiB).
const DEFAULT_SIZES: &[u64] = &[1024, 4096];
/// The guest disk: unused by the workload; it is there so that the disk step of a snapshot is part
/// of what is measured, and large enough for [`DISK_WRITES`] (qcow2: it takes only what is written).
const DISK_SIZE: &str = "1G";
/// What [`disk_writes`] writes to the guest disk before each side of the
/// [`HUGE_PAGES_AFTER_DISK_WRITES`] series, from 1 MiB on (the guest's tick marker is at sector 0).
const DISK_WRITES: &str = "512M";
/// The guest disk's target id.
const DISK: &str = "vda";
/// Repetitions of every scenario unless `--reps` says otherwise: 5 up to 1 GiB, 3 above (a
/// 4 GiB guest's QEMU baselines take several seconds each on this 2-core machine).
fn default_reps(ram_mib: u64) -> usize {
    if ram_mib <= 1024 {
        5
    } else {
        3
    }
}
/// Where the `migrate-incoming` QEMUs' RAM files live, as the driver's do (tmpfs).
const SHM: &str = "/dev/shm";
/// The guest's boot, and any wait for the guest to print something.
const BOOT: Duration = Duration::from_secs(180);
/// How long the guest runs between two measurements, so each starts from a guest that is dirtying
/// memory at its steady rate (a pause stops the workload's clock).
const SETTLE: Duration = Duration::from_millis(1500);
/// Longest wait for a migration (a live one to a file can take many seconds here).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU's migration bandwidth limit when lifted: no limit in practice (libvirt lifts it the same way
/// when it saves a domain to a file; domsnap's own migrations set 0, QEMU's "unlimited").
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// The paused snapshot every revert goes back to.
const KEPT: &str = "kept";
/// A guest page.
const PAGE_BYTES: u64 = 4096;
/// The dirtying guest's working set and rate.
const WSS_MIB: u64 = 64;
const RATE_MIB: u64 = 48;
/// Ticks of a reverted guest watched after each revert.
const TICKS_AFTER_REVERT: u64 = 3;

/// The dirtying guest's workload: 48 MiB/s (50.3 MB/s) over a 64 MiB working set.
fn dirty_workload() -> Workload {
    Workload::Dirty {
        rate_mib: RATE_MIB,
        wss_mib: WSS_MIB,
    }
}

fn main() -> ExitCode {
    // `DOMSNAP_LOG=qemu=debug` shows what the product logs while it is measured (as the CLI).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DOMSNAP_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("domain bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line: `--reps N` (every size), `--sizes MIB[,MIB...]`; the rest is ignored, because
/// `cargo xtask bench -- ARGS` hands the same arguments to every bench binary (criterion's among
/// them) and cargo adds `--bench`.
#[derive(Debug)]
struct Args {
    reps: Option<usize>,
    sizes: Vec<u64>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        reps: None,
        sizes: DEFAULT_SIZES.to_vec(),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => {
                let value = args.next().context("--reps needs a number")?;
                let reps: usize = value.parse().with_context(|| format!("--reps {value}"))?;
                if reps == 0 {
                    bail!("--reps must be at least 1");
                }
                parsed.reps = Some(reps);
            }
            "--sizes" => {
                let value = args.next().context("--sizes needs MiB values, e.g. 1024,4096")?;
                parsed.sizes = value
                    .split(',')
                    .map(|size| {
                        size.trim()
                            .parse::<u64>()
                            .with_context(|| format!("--sizes {value}"))
                    })
                    .collect::<Result<_>>()?;
                if parsed.sizes.iter().any(|&size| size < 256 || size % 2 != 0) {
                    bail!("--sizes: each size is a guest RAM in MiB, at least 256");
                }
            }
            "--bench" => {}
            other => eprintln!("domain bench: ignoring argument {other:?}"),
        }
    }
    Ok(parsed)
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
    pub fn spawn_incoming(bench: &Bench, ram_mib: u64, disk: &Path) -> Result<Vm> {
        let dir = tempfile::Builder::new()
            .prefix("domsnap-bench-incoming-")
            .tempdir_in(SHM)
            .with_context(|| format!("create a folder in {SHM}"))?;
        // testkit builds the driver's command line, so this is the domain's machine; without
        // `send-configuration=off`: QEMU's own stream carries the configuration section.
        let qemu = Qemu::builder("bench-incoming")
            .memory_mib(ram_mib)
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

/// The series of one guest size.
struct Sized<'r> {
    results: &'r mut Results,
    ram_mib: u64,
}

impl Sized<'_> {
    fn key(&self, key: &str) -> String {
        size_key(self.ram_mib, key)
    }

    fn time(&mut self, key: &str, value: Duration) {
        let key = self.key(key);
        self.results.time(&key, value);
    }

    fn bytes(&mut self, key: &str, value: u64) {
        let key = self.key(key);
        self.results.bytes(&key, value);
    }

    fn count(&mut self, key: &str, value: u64) {
        let key = self.key(key);
        self.results.count(&key, value);
    }

    fn rate(&mut self, key: &str, value: f64) {
        let key = self.key(key);
        self.results.rate(&key, value);
    }

    /// Records what a create measured as the series `PREFIX.wall`, `PREFIX.pause_events`, ...
    fn create(&mut self, prefix: &str, created: &domsnap::Created) {
        let key = |quantity: &str| format!("{prefix}.{quantity}");
        self.time(&key("wall"), created.wall);
        self.time(&key("report_total"), created.report_total);
        self.time(&key("pause_report"), created.pause_report);
        if let Some(pause) = created.pause_events {
            self.time(&key("pause_events"), pause);
        }
        self.bytes(&key("image_len"), created.image_len);
        self.bytes(&key("image_allocated"), created.image_allocated);
        self.bytes(&key("nonzero_ram"), created.pages_stored * PAGE_BYTES);
        self.bytes(&key("devices_bytes"), created.devices_bytes);
        if let Some(downtime) = created.qemu_downtime {
            self.time(&key("qemu_downtime"), downtime);
        }
        if let Some(passes) = created.passes {
            self.count(&key("passes"), passes);
        }
        if let Some(bytes) = created.stream_bytes {
            self.bytes(&key("stream_bytes"), bytes);
        }
        for (name, span) in &created.splits {
            self.time(&key(name), *span);
        }
    }

    /// Records a QEMU migration to a file as `PREFIX.downtime`, `PREFIX.wall`, ...
    fn migrated(&mut self, prefix: &str, migrated: &baseline::Migrated) {
        let key = |quantity: &str| format!("{prefix}.{quantity}");
        self.time(&key("downtime"), migrated.downtime);
        self.time(&key("wall"), migrated.wall);
        self.time(&key("wall_fsync"), migrated.wall + migrated.fsync);
        self.time(&key("qemu_total"), migrated.qemu_total);
        self.bytes(&key("file_bytes"), migrated.file_bytes);
        self.count(&key("dirty_syncs"), migrated.dirty_syncs);
    }

    /// Records a revert and what the guest did after it as `domsnap.revert_MODE.*`.
    fn revert(&mut self, mode: RevertMode, reverted: &domsnap::Reverted, after: &AfterRevert) {
        let key = |quantity: &str| format!("domsnap.{}.{quantity}", mode.key());
        self.time(&key("wall"), reverted.wall);
        self.time(&key("report_total"), reverted.report_total);
        self.time(&key("memory_ms"), reverted.memory);
        for (name, span) in &reverted.splits {
            self.time(&key(name), *span);
        }
        self.time(&key("first_tick"), after.first_tick);
        self.time(&key("first_tick_late"), after.first_tick_late);
        self.rate(&key("rate_to_first_tick"), after.rate_to_first_tick);
        self.rate(&key("rate_first_second"), after.rate_first_second);
        if let Some(working_set) = after.working_set {
            self.time(&key("working_set"), working_set);
        }
        if let Some(steady) = after.back_to_steady {
            self.time(&key("back_to_steady"), steady);
        }
    }
}

/// A create that is measured and then deleted (not timed).
fn create_and_delete(
    bench: &Bench,
    domain: &Domain,
    name: &str,
    mode: CreateMode,
) -> Result<domsnap::Created> {
    let created = domain.create(bench, name, mode)?;
    domain.delete(bench, name)?;
    Ok(created)
}

/// QEMU's live migration settings for one baseline; the rest stays at QEMU's defaults.
#[derive(Debug, Clone, Copy)]
struct LiveSettings {
    /// `max-bandwidth`, bytes per second.
    bandwidth: u64,
    /// `downtime-limit`, milliseconds.
    downtime_limit: u64,
}

/// Removes a QEMU output file once measured, as domsnap's snapshot is deleted once measured.
/// Kept, it would be truncated by QEMU's next `file:` migration, whose writes would then reuse
/// the page cache that just freed: by hand on this machine 275–422 ms into the same file against
/// 480–584 ms into a new one (docs/benchmarks.md, "The machine").
fn discard(file: &Path) -> Result<()> {
    std::fs::remove_file(file).with_context(|| format!("removing {}", file.display()))
}

/// QEMU's live migration with `settings` for it, QEMU's `defaults` put back afterwards; its
/// file is removed once measured.
fn migrate_live(
    bench: &Bench,
    domain: &Domain,
    file: &Path,
    settings: LiveSettings,
    defaults: LiveSettings,
) -> Result<baseline::Migrated> {
    domain.with_monitor(bench, |qemu| {
        baseline::set_max_bandwidth(bench, qemu, settings.bandwidth)?;
        baseline::set_downtime_limit(bench, qemu, settings.downtime_limit)?;
        let migrated = baseline::migrate_live(bench, qemu, file);
        baseline::set_max_bandwidth(bench, qemu, defaults.bandwidth)?;
        baseline::set_downtime_limit(bench, qemu, defaults.downtime_limit)?;
        let migrated = migrated?;
        discard(file)?;
        Ok(migrated)
    })
}

/// Where a domain's RAM lives, for its background creates: the series they and QEMU's
/// `background-snapshot` beside them are recorded as, and QEMU's output file.
#[derive(Debug)]
struct BackgroundSeries {
    /// Where the RAM is, for the log.
    ram: &'static str,
    /// The first background create of the domain's QEMU process, if the series has it.
    first: Option<&'static str>,
    /// Whether [`DISK_WRITES`] go to the guest disk through QEMU before each side.
    disk_writes: bool,
    /// The later background creates.
    domsnap: &'static str,
    /// QEMU's `background-snapshot` to `file:` on the same QEMU.
    qemu: &'static str,
    /// Its file in the bench folder.
    file: &'static str,
}

/// The domain of phases 1 and 2: RAM on tmpfs, in 4 KiB pages.
const TMPFS_BACKGROUND: BackgroundSeries = BackgroundSeries {
    ram: "on tmpfs",
    first: Some("domsnap.background_first"),
    disk_writes: false,
    domsnap: "domsnap.background",
    qemu: "qemu.background_snapshot",
    file: "background-snapshot.bin",
};

/// The domain of phase 3: RAM in 2 MiB huge pages.
const HUGE_PAGES_BACKGROUND: BackgroundSeries = BackgroundSeries {
    ram: "in huge pages",
    first: Some("domsnap.background_huge_first"),
    disk_writes: false,
    domsnap: "domsnap.background_huge",
    qemu: "qemu.background_snapshot_huge",
    file: "background-snapshot-huge.bin",
};

/// Phase 3's domain again, each side after [`DISK_WRITES`] written through QEMU: QEMU's stop
/// flushes what waits in the host's page cache with the guest stopped, unless it was written back
/// before the pause. (On this domain: its pause is short, and no revert follows on its disk.)
const HUGE_PAGES_AFTER_DISK_WRITES: BackgroundSeries = BackgroundSeries {
    ram: "in huge pages, after disk writes",
    first: None,
    disk_writes: true,
    domsnap: "domsnap.background_huge_after_writes",
    qemu: "qemu.background_snapshot_huge_after_writes",
    file: "background-snapshot-huge-after-writes.bin",
};

/// The first background create of the domain's freshly started QEMU process (QEMU populates its
/// RAM for write protection once per process: the driver does it before the pause), one sample.
fn first_background(
    bench: &Bench,
    domain: &Domain,
    series: &BackgroundSeries,
    out: &mut Sized<'_>,
) -> Result<()> {
    let key = series.first.context("a series without a first create")?;
    domain.settle();
    let first = create_and_delete(bench, domain, "background-first", CreateMode::Background)?;
    out.create(key, &first);
    eprintln!(
        "domain bench: {}: first background create, RAM {}, paused the guest {:.1} ms (events; report \
         {:.1} ms)",
        size_name(out.ram_mib),
        series.ram,
        first.pause_events.unwrap_or_default().as_secs_f64() * 1e3,
        first.pause_report.as_secs_f64() * 1e3
    );
    Ok(())
}

/// A domsnap background create, then QEMU's `background-snapshot` to `file:` on the same QEMU (its
/// file removed once measured), the guest settling before each.
fn backgrounds(bench: &Bench, domain: &Domain, series: &BackgroundSeries, out: &mut Sized<'_>) -> Result<()> {
    domain.settle();
    disk_writes(bench, domain, series)?;
    let background = create_and_delete(bench, domain, "background", CreateMode::Background)?;
    out.create(series.domsnap, &background);

    domain.settle();
    disk_writes(bench, domain, series)?;
    let file = bench.file(series.file);
    let qemu_background =
        domain.with_monitor(bench, |qemu| baseline::background_snapshot(bench, qemu, &file))?;
    discard(&file)?;
    out.migrated(series.qemu, &qemu_background);
    Ok(())
}

/// Writes [`DISK_WRITES`] to the guest disk through QEMU's block layer (HMP `qemu-io` on the
/// disk's device), as the guest's own writes go, if `series` asks for it.
fn disk_writes(bench: &Bench, domain: &Domain, series: &BackgroundSeries) -> Result<()> {
    if !series.disk_writes {
        return Ok(());
    }
    let write = testkit::hmp_disk_write(DISK, "1M", DISK_WRITES);
    let said = domain.with_monitor(bench, |qemu| {
        bench
            .block_on(qemu.client.execute_raw("human-monitor-command", write))
            .context("HMP qemu-io")
    })?;
    if said != json!("") {
        bail!("qemu-io writing to {DISK}: {said}");
    }
    Ok(())
}

/// Phase 1: the first background create of the freshly booted domain's QEMU process (QEMU
/// populates its RAM for write protection once per process: the driver does it before the pause),
/// then the creates of both sides, interleaved: domsnap paused, pre-copy and background; QEMU's
/// live migration (unlimited and default bandwidth), `background-snapshot` to a file, paused
/// migration to a file, `snapshot-save` and `snapshot-load` (which must run in the QEMU that
/// saved, i.e. before the first revert). Returns the last paused migration file, for the
/// reverts' `migrate-incoming`.
fn creates(bench: &Bench, domain: &Domain, reps: usize, out: &mut Sized<'_>) -> Result<PathBuf> {
    first_background(bench, domain, &TMPFS_BACKGROUND, out)?;
    domain.populate_ram_file()?;
    let defaults = domain.with_monitor(bench, |qemu| {
        Ok(LiveSettings {
            bandwidth: baseline::max_bandwidth(bench, qemu)?,
            downtime_limit: baseline::downtime_limit(bench, qemu)?,
        })
    })?;
    let unlimited = LiveSettings {
        bandwidth: UNLIMITED_BANDWIDTH,
        ..defaults
    };
    // What domsnap's pre-copy asks QEMU for: no bandwidth limit, its default downtime limit.
    let like_ours = LiveSettings {
        bandwidth: UNLIMITED_BANDWIDTH,
        downtime_limit: u64::try_from(DEFAULT_MAX_DOWNTIME.as_millis())?,
    };
    let (paused_file, live_file) = (bench.file("migrate-paused.bin"), bench.file("migrate-live.bin"));
    // One pass of each side first, not measured: the first to touch pages also pays for mapping
    // them into its address space.
    for mode in [CreateMode::Paused, CreateMode::Precopy, CreateMode::Background] {
        domain.settle();
        create_and_delete(bench, domain, "warm-up", mode)?;
    }
    domain.settle();
    migrate_live(bench, domain, &live_file, unlimited, defaults)?;
    for rep in 0..reps {
        eprintln!(
            "domain bench: {}: creates, repetition {}/{reps}",
            size_name(out.ram_mib),
            rep + 1
        );
        domain.settle();
        let paused = create_and_delete(bench, domain, "paused", CreateMode::Paused)?;
        out.create("domsnap.paused", &paused);

        domain.settle();
        let precopy = create_and_delete(bench, domain, "precopy", CreateMode::Precopy)?;
        out.create("domsnap.precopy", &precopy);

        domain.settle();
        let migrated = migrate_live(bench, domain, &live_file, unlimited, defaults)?;
        out.migrated("qemu.live_unlimited", &migrated);

        domain.settle();
        let migrated = migrate_live(bench, domain, &live_file, like_ours, defaults)?;
        out.migrated("qemu.live_like_ours", &migrated);

        backgrounds(bench, domain, &TMPFS_BACKGROUND, out)?;

        domain.settle();
        let migrated = migrate_live(bench, domain, &live_file, defaults, defaults)?;
        out.migrated("qemu.live_default", &migrated);

        domain.settle();
        let migrated =
            domain.with_monitor(bench, |qemu| baseline::migrate_paused(bench, qemu, &paused_file))?;
        // The reverts' `migrate-incoming` loads the last one.
        if rep + 1 < reps {
            discard(&paused_file)?;
        }
        out.migrated("qemu.migrate_paused", &migrated);

        domain.settle();
        let tag = format!("qemu-{rep}");
        let saved = domain.with_monitor(bench, |qemu| baseline::snapshot_save(bench, qemu, &tag))?;
        out.time("qemu.snapshot_save.wall", saved);
        domain.settle();
        let loaded = domain.with_monitor(bench, |qemu| {
            let loaded = baseline::snapshot_load(bench, qemu, &tag)?;
            baseline::snapshot_delete(bench, qemu, &tag)?;
            Ok(loaded)
        })?;
        out.time("qemu.snapshot_load.wall", loaded);
    }
    Ok(paused_file)
}

/// Phase 2: the paused snapshot [`KEPT`] (not timed), then domsnap's reverts of the running guest
/// to it, lazy and eager (each ends the domain's QEMU and starts a new one; the guest runs
/// afterwards and its ticks are watched), and `migrate-incoming` of the last paused migration file
/// into a new QEMU, interleaved.
fn reverts(
    bench: &Bench,
    domain: &Domain,
    migrate_file: &Path,
    reps: usize,
    out: &mut Sized<'_>,
) -> Result<()> {
    // The incoming QEMU needs a guest disk for the domain's machine, and the domain's own image is
    // locked by the domain's QEMU: an empty one of the same size (the stream holds no disk data).
    let incoming_disk = bench.file(&format!("incoming-{}-vda.qcow2", out.ram_mib));
    testkit::create_qcow2(&incoming_disk, DISK_SIZE);
    // A few consecutive ticks for the steady rate (`snapshot-load` set the guest's counter back).
    std::thread::sleep(SETTLE * 3);
    let steady = domain
        .steady_rate(Instant::now(), Duration::from_secs(4))
        .context("the guest printed no ticks before the snapshot")?;
    let kept = domain.create(bench, KEPT, CreateMode::Paused)?;
    let at = GuestAt::estimate(
        domain,
        kept.paused_at.context("the paused create announced no pause")?,
        steady,
    )?;
    out.rate("guest.steady_rate", steady);
    out.time(
        "guest.working_set_steady",
        Duration::from_secs_f64(WSS_MIB as f64 / steady),
    );
    out.time("guest.kept_to_next_tick", at.to_next_tick);
    let modes = [RevertMode::Lazy, RevertMode::Eager];
    for rep in 0..reps {
        eprintln!(
            "domain bench: {}: reverts, repetition {}/{reps}",
            size_name(out.ram_mib),
            rep + 1
        );
        for mode in modes {
            // The guest being reverted must be past the ticks the reverted one will print, and
            // dirtying at its steady rate.
            let since = Instant::now();
            domain
                .serial
                .wait(since - SETTLE, BOOT, "ticks past the snapshot's", |t| {
                    t.n >= at.next_tick + TICKS_AFTER_REVERT
                })?;
            domain.settle();
            let steady_now = domain
                .steady_rate(Instant::now(), Duration::from_secs(4))
                .unwrap_or(steady);
            out.rate("guest.steady_rate", steady_now);
            let reverted = domain.revert(bench, KEPT, mode)?;
            let after = AfterRevert::watch(domain, &reverted, &at, steady_now, WSS_MIB, TICKS_AFTER_REVERT)?;
            out.revert(mode, &reverted, &after);
            if mode == RevertMode::Lazy {
                // QEMU's RAM is now private to it: a paused create reads memory through QEMU's
                // stream (the direct read's counterpart, measured in the creates).
                let paused = create_and_delete(bench, domain, "paused-stream", CreateMode::Paused)?;
                if !paused.streamed {
                    bail!("a paused create after a lazy revert read the RAM directly");
                }
                out.create("domsnap.paused_stream", &paused);
                // Its pause must not enter the next revert's steady rate.
                std::thread::sleep(SETTLE * 2);
            }
            eprintln!(
                "domain bench: {}: {mode:?} revert ({}) {:.1} ms, first tick after {:.0} ms",
                size_name(out.ram_mib),
                reverted.memory_load,
                reverted.wall.as_secs_f64() * 1e3,
                after.first_tick.as_secs_f64() * 1e3
            );
        }
        let (incoming, target) =
            baseline::migrate_incoming(bench, out.ram_mib, migrate_file, &incoming_disk)?;
        out.time("qemu.migrate_incoming.load", incoming.load);
        out.time("qemu.migrate_incoming.with_startup", incoming.with_startup);
        out.time("qemu.migrate_incoming.startup", incoming.startup);
        if rep == 0 {
            target.check_resumes(bench)?;
        }
    }
    Ok(())
}

/// Every phase on a freshly booted guest of `ram_mib` MiB.
fn measure(bench: &Bench, ram_mib: u64, reps: usize, results: &mut Results) -> Result<()> {
    let mut out = Sized { results, ram_mib };
    out.bytes("guest.ram_bytes", ram_mib << 20);
    out.count("repetitions", reps as u64);
    eprintln!(
        "domain bench: booting the {} domain ({:?}) in {}",
        size_name(ram_mib),
        dirty_workload(),
        bench.state_dir().display()
    );
    let booted = Instant::now();
    let domain = Domain::boot(bench, &format!("g{ram_mib}"), ram_mib, &dirty_workload(), None)?;
    out.time("guest.boot", booted.elapsed());
    let migrate_file = creates(bench, &domain, reps, &mut out)?;
    reverts(bench, &domain, &migrate_file, reps, &mut out)?;
    // Ended before phase 3, whose guest runs alone.
    drop(domain);
    huge_page_backgrounds(bench, reps, &mut out)
}

/// Phase 3: a second domain like the first (its own fresh disk, the same workload) with its RAM
/// in 2 MiB huge pages, the host's pool grown for its QEMU while it runs: its QEMU's first
/// background create, then domsnap's background creates and QEMU's `background-snapshot`,
/// interleaved.
fn huge_page_backgrounds(bench: &Bench, reps: usize, out: &mut Sized<'_>) -> Result<()> {
    let ram_mib = out.ram_mib;
    // Declared before the domain, so dropped after it (its QEMU ended), also on an error.
    let _pool = testkit::reserve_huge_pages((ram_mib << 20) / testkit::HUGE_PAGE_BYTES)
        .map_err(|e| anyhow!("huge pages for the {} domain: {e}", size_name(ram_mib)))?;
    eprintln!(
        "domain bench: booting the {} domain with its RAM in huge pages of {}",
        size_name(ram_mib),
        testkit::HUGE_PAGES_MOUNT
    );
    let booted = Instant::now();
    let domain = Domain::boot(
        bench,
        &format!("g{ram_mib}-huge"),
        ram_mib,
        &dirty_workload(),
        Some(Path::new(testkit::HUGE_PAGES_MOUNT)),
    )?;
    out.time("guest.boot_huge_pages", booted.elapsed());
    first_background(bench, &domain, &HUGE_PAGES_BACKGROUND, out)?;
    for rep in 0..reps {
        eprintln!(
            "domain bench: {}: background creates, RAM in huge pages, repetition {}/{reps}",
            size_name(ram_mib),
            rep + 1
        );
        backgrounds(bench, &domain, &HUGE_PAGES_BACKGROUND, out)?;
        backgrounds(bench, &domain, &HUGE_PAGES_AFTER_DISK_WRITES, out)?;
    }
    Ok(())
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let load_before = loadavg();
    // Declared first so that it is dropped last: the domains need its runtime to end their QEMUs.
    let bench = Bench::new()?;
    let mut results = Results::default();
    let mut reps_by_size = serde_json::Map::new();
    for &ram_mib in &args.sizes {
        let reps = args.reps.unwrap_or_else(|| default_reps(ram_mib));
        reps_by_size.insert(ram_mib.to_string(), json!(reps));
        let size_started = Instant::now();
        measure(&bench, ram_mib, reps, &mut results)?;
        results.time(&size_key(ram_mib, "bench.elapsed"), size_started.elapsed());
    }

    let elapsed = started.elapsed();
    let sizes = &args.sizes;
    let table = report::table(&results, rows::ROWS, sizes);
    println!("\n{table}");
    println!(
        "the live ways side by side:\n\n{}",
        report::grid(&results, rows::GRID_METHODS, rows::GRID, sizes)
    );
    println!("all series (median [min, max]):\n{}", results.summary());
    let load_after = loadavg();
    println!(
        "repetitions {reps_by_size:?} in {:.0} s; load average before {load_before}, after {load_after}",
        elapsed.as_secs_f64()
    );
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("the target folder")?
        .join("bench-domain.json");
    let document = json!({
        "benchmark": "domain: domsnap vs QEMU's migration, background-snapshot, snapshot-save/load \
                      and migrate-incoming, issue 11's targets",
        "level": "domsnap measured through the product: snapshot_core::Orchestrator over \
                  qemu::QemuDriver and FsStore, see docs/benchmarks.md",
        "guest": {
            "ram_mib": sizes,
            "disk": format!("{DISK}: qcow2, {DISK_SIZE}, internal snapshots"),
            "workload": format!("{:?}", dirty_workload()),
        },
        "repetitions": reps_by_size,
        "elapsed_seconds": elapsed.as_secs_f64(),
        "machine": machine(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": report::rows_json(&results, rows::ROWS, sizes),
        "series": results.to_json(),
    });
    fs::write(&out, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("write {}", out.display()))?;
    println!("JSON: {}", out.display());
    Ok(())
}
