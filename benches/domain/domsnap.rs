//! The domsnap side, measured through the product: an in-process [`Orchestrator`] over a
//! [`QemuDriver`] and an [`FsStore`] on one state directory, wired as the `domsnap` CLI wires them.
//! A [`Domain`] is one domain of that driver; its create, delete and revert are the orchestrator's.
//! A [`StepClock`] observer timestamps the orchestrator's steps, so the table can say which part of
//! an operation a figure is without measuring anything outside the product's own run. A
//! [`SerialWatch`] timestamps the guest's serial lines as they appear (its ticks and how much
//! memory it has rewritten), and an event subscription on the domain's second QMP monitor takes
//! QEMU's own `STOP` and `RESUME` timestamps around a live create.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use qemu::{DiskConfig, DomainConfig, QemuDriver, RuntimePaths};
use qmp::{Event, EventStream};
use snapshot_core::{
    CreateOptions, CreateReport, FsStore, Hypervisor, LiveMethod, LiveOptions, MemoryLoad, MemoryMode, Name,
    Observer, Operation, Orchestrator, RevertOptions, RevertReport, SnapshotStore, Step,
};
use testkit::{SerialLine, Workload};

use crate::{cmd_output, file_size, Bench, Monitor, BOOT, DISK, DISK_SIZE, SETTLE};

/// Longest wait for a reverted guest's ticks (it ticks once a second).
const RESUME_WAIT: Duration = Duration::from_secs(30);
/// How often the serial log is polled for new lines.
const SERIAL_POLL: Duration = Duration::from_millis(2);
/// After a create returns, how long the event stream must stay quiet before the `RESUME` it was
/// waiting for is taken as the last one.
const EVENTS_QUIET: Duration = Duration::from_millis(100);

/// Timestamps the orchestrator's steps as it announces them.
#[derive(Debug, Default)]
struct StepClock {
    steps: Mutex<Vec<(Step, Instant)>>,
}

impl Observer for StepClock {
    fn step(&self, _operation: Operation, step: Step) {
        self.steps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((step, Instant::now()));
    }
}

impl StepClock {
    /// The steps announced since the last call.
    fn take(&self) -> Steps {
        Steps(std::mem::take(
            &mut *self.steps.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// One operation's steps in the order they started.
struct Steps(Vec<(Step, Instant)>);

impl Steps {
    /// When step `step` started (its first announcement).
    fn at(&self, step: Step) -> Option<Instant> {
        self.0.iter().find(|(s, _)| *s == step).map(|(_, at)| *at)
    }

    /// From the start of step `from` to the start of the first later step among `to`, if the
    /// operation announced both.
    fn span(&self, from: Step, to: &[Step]) -> Option<Duration> {
        let start = self.0.iter().position(|(step, _)| *step == from)?;
        let end = self.0[start..].iter().find(|(step, _)| to.contains(step))?;
        Some(end.1 - self.0[start].1)
    }

    /// Like [`Steps::span`], but a missing step is an error.
    fn require(&self, from: Step, to: &[Step]) -> Result<Duration> {
        self.span(from, to).with_context(|| {
            format!(
                "no step {from:?} followed by one of {to:?} in {:?}",
                self.0.iter().map(|(s, _)| *s).collect::<Vec<_>>()
            )
        })
    }
}

/// How a create saves memory, as the bench names its scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// `MemoryMode::Paused` (domsnap reads the shared RAM directly where it can).
    Paused,
    /// `--live`: pre-copy, through QEMU's migration stream with `pause-before-switchover`.
    Precopy,
    /// `--live-mode background`: QEMU's `background-snapshot` stream.
    Background,
}

impl CreateMode {
    fn memory(self) -> MemoryMode {
        match self {
            CreateMode::Paused => MemoryMode::Paused,
            CreateMode::Precopy => MemoryMode::Live(LiveOptions {
                method: LiveMethod::Precopy,
                ..LiveOptions::default()
            }),
            CreateMode::Background => MemoryMode::Live(LiveOptions {
                method: LiveMethod::Background,
                ..LiveOptions::default()
            }),
        }
    }
}

/// A snapshot taken by [`Domain::create`], with what its creation cost.
#[derive(Debug)]
pub struct Created {
    /// Wall time around `Orchestrator::create`.
    pub wall: Duration,
    /// The report's `total_ms` (the same span measured inside the call).
    pub report_total: Duration,
    /// The report's `guest_pause_ms`: from the pause (pre-copy: from the moment the orchestrator
    /// learns that QEMU stopped the guest) to `cont` answered.
    pub pause_report: Duration,
    /// QEMU's own clock: its `STOP` event to its `RESUME` event (only for the live creates, whose
    /// event subscription holds the second monitor).
    pub pause_events: Option<Duration>,
    /// The memory image's length (sparse: RAM size plus metadata).
    pub image_len: u64,
    /// Bytes the memory image occupies.
    pub image_allocated: u64,
    /// Pages stored in the image: the guest's non-zero pages at the consistency point.
    pub pages_stored: u64,
    /// The device state's size.
    pub devices_bytes: u64,
    /// Whether memory came through QEMU's stream (else domsnap read the shared RAM).
    pub streamed: bool,
    /// QEMU's own downtime figure of a streamed save.
    pub qemu_downtime: Option<Duration>,
    /// QEMU's pre-copy passes over RAM of a streamed save.
    pub passes: Option<u64>,
    /// Bytes QEMU streamed.
    pub stream_bytes: Option<u64>,
    /// The parts of the create, from the observer (name, duration), where the mode has them.
    pub splits: Vec<(&'static str, Duration)>,
    /// When the orchestrator paused the guest (or learnt that QEMU had), for the revert's tick
    /// arithmetic.
    pub paused_at: Option<Instant>,
}

/// How a revert loads memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevertMode {
    /// The default: QEMU maps the snapshot's memory image copy-on-write.
    Lazy,
    /// `--eager`: the image is copied into fresh shared RAM.
    Eager,
}

impl RevertMode {
    /// The series' name.
    pub fn key(self) -> &'static str {
        match self {
            RevertMode::Lazy => "revert_lazy",
            RevertMode::Eager => "revert_eager",
        }
    }
}

/// What [`Domain::revert`] cost.
#[derive(Debug)]
pub struct Reverted {
    /// Wall time around `Orchestrator::revert` (the guest running at the end).
    pub wall: Duration,
    /// When the orchestrator resumed the guest (its resume step; else when it returned).
    pub resumed_at: Instant,
    /// When it was called.
    pub called_at: Instant,
    /// The report's `total_ms`.
    pub report_total: Duration,
    /// The report's `memory_ms` (copying memory; zero when mapped).
    pub memory: Duration,
    /// How memory was loaded, as the report says.
    pub memory_load: String,
    /// The parts of the revert, from the observer.
    pub splits: Vec<(&'static str, Duration)>,
}

/// One tick of the guest as the host saw it.
#[derive(Debug, Clone, Copy)]
pub struct Tick {
    /// When the line appeared in the serial log (polled every 2 ms).
    pub at: Instant,
    /// The guest's counter.
    pub n: u64,
    /// MiB the guest had rewritten so far.
    pub dirtied_mib: u64,
}

/// Timestamps the guest's tick lines as they appear in the serial log, on a thread of its own.
#[derive(Debug)]
pub struct SerialWatch {
    ticks: Arc<Mutex<Vec<Tick>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SerialWatch {
    fn start(log: PathBuf) -> SerialWatch {
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (ticks.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut offset = 0u64;
            let mut partial = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(mut file) = fs::File::open(&log) {
                    let mut new = Vec::new();
                    if file.seek(SeekFrom::Start(offset)).is_ok() && file.read_to_end(&mut new).is_ok() {
                        let now = Instant::now();
                        offset += new.len() as u64;
                        partial.extend_from_slice(&new);
                        while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = partial.drain(..=end).collect();
                            let text = String::from_utf8_lossy(&line);
                            if let Some(SerialLine::Tick { n, dirtied_mib }) =
                                testkit::parse_serial_line(&text)
                            {
                                seen.lock().unwrap_or_else(PoisonError::into_inner).push(Tick {
                                    at: now,
                                    n,
                                    dirtied_mib: dirtied_mib.unwrap_or(0),
                                });
                            }
                        }
                    }
                }
                std::thread::sleep(SERIAL_POLL);
            }
        });
        SerialWatch {
            ticks,
            stop,
            thread: Some(thread),
        }
    }

    /// Every tick seen so far.
    pub fn ticks(&self) -> Vec<Tick> {
        self.ticks.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits until a tick `wanted` accepts has been seen after `since`; returns it.
    pub fn wait(
        &self,
        since: Instant,
        timeout: Duration,
        what: &str,
        wanted: impl Fn(&Tick) -> bool,
    ) -> Result<Tick> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(tick) = self.ticks().into_iter().find(|t| t.at >= since && wanted(t)) {
                return Ok(tick);
            }
            if Instant::now() > deadline {
                bail!("no {what} on the serial console within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SerialWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A domain of the driver, booted from the test guest with one qcow2 disk. Its QEMU is ended
/// on drop: it runs daemonized and would outlive the bench, with its RAM file on tmpfs.
pub struct Domain {
    name: Name,
    /// Guest RAM in MiB.
    pub ram_mib: u64,
    driver: QemuDriver,
    store: Arc<FsStore>,
    orchestrator: Orchestrator,
    clock: Arc<StepClock>,
    paths: RuntimePaths,
    runtime: tokio::runtime::Handle,
    /// The guest's ticks.
    pub serial: SerialWatch,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if let Err(e) = self.runtime.block_on(self.driver.destroy(&self.name)) {
            eprintln!("domain bench: cannot end domain {}: {e}", self.name);
        }
    }
}

/// The configuration of a test-guest domain named `name`, as a user would write it (the kernel
/// command line as testkit builds it, so a testkit QEMU with the same workload, RAM and disk has
/// the same machine and can load this domain's migration stream); its RAM in huge pages of the
/// hugetlbfs mount `hugepages` if given, else on tmpfs.
fn config(
    name: &Name,
    ram_mib: u64,
    workload: &Workload,
    disk: &Path,
    hugepages: Option<&Path>,
) -> DomainConfig {
    let guest = testkit::guest();
    DomainConfig {
        name: name.clone(),
        memory_mib: ram_mib,
        vcpus: 1,
        kernel: Some(guest.kernel),
        initrd: Some(guest.initrd),
        cmdline: Some(format!("console=ttyS0 quiet {}", workload.cmdline())),
        serial_log: None,
        run_as: None,
        // As testkit's QEMU: TCG (KVM guests stall on these machines); defining pins the vCPU
        // model TCG gets, max, which testkit uses too.
        accel: Some(qemu::Accel::Tcg),
        machine: None,
        cpu: None,
        firmware: qemu::Firmware::Bios,
        nvram: None,
        guest_agent: false,
        hugepages: hugepages.map(Path::to_path_buf),
        nics: Vec::new(),
        disks: vec![DiskConfig::qcow2(DISK, disk)],
    }
}

/// QEMU's event timestamp as seconds since the epoch.
fn event_seconds(timestamp: qmp::Timestamp) -> f64 {
    timestamp.seconds as f64 + timestamp.microseconds as f64 / 1e6
}

/// QEMU's first `STOP` and last `RESUME` of a create, seconds since the epoch on QEMU's clock,
/// and its `MIGRATION` event saying `completed` if one came between them (a pre-copy's).
#[derive(Debug, Clone, Copy)]
struct StopResume {
    stop: f64,
    resume: f64,
    completed: Option<f64>,
}

/// Drains `events` until it has been quiet for [`EVENTS_QUIET`] after a `RESUME`; returns the
/// first `STOP` and the last `RESUME`.
async fn stop_to_resume(events: &mut EventStream) -> Result<StopResume> {
    let (mut stop, mut resume, mut completed) = (None, None, None);
    loop {
        let wait = if resume.is_some() {
            EVENTS_QUIET
        } else {
            Duration::from_secs(5)
        };
        match tokio::time::timeout(wait, events.next()).await {
            Ok(Ok(message)) => match message.event {
                Event::Stop if stop.is_none() => stop = Some(event_seconds(message.timestamp)),
                Event::Resume => resume = Some(event_seconds(message.timestamp)),
                Event::Migration(ref data)
                    if data.status == qmp::MigrationStatus::Completed && resume.is_none() =>
                {
                    completed = Some(event_seconds(message.timestamp));
                }
                _ => {}
            },
            Ok(Err(error)) => bail!("QMP events: {error}"),
            Err(_) => break,
        }
    }
    match (stop, resume) {
        (Some(stop), Some(resume)) if resume >= stop => Ok(StopResume {
            stop,
            resume,
            completed,
        }),
        other => bail!("no STOP followed by RESUME among QEMU's events: {other:?}"),
    }
}

/// Puts the observer's instants on QEMU's event clock (the host's real-time clock).
#[derive(Debug, Clone, Copy)]
struct WallClock {
    instant: Instant,
    unix: f64,
}

impl WallClock {
    fn now() -> WallClock {
        WallClock {
            instant: Instant::now(),
            unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    /// `at` in seconds since the epoch (`at` after this clock was read).
    fn unix(&self, at: Instant) -> f64 {
        self.unix + at.saturating_duration_since(self.instant).as_secs_f64()
    }
}

/// `later - earlier` seconds as a duration (zero if negative).
fn between(earlier: f64, later: f64) -> Duration {
    Duration::from_secs_f64((later - earlier).max(0.0))
}

impl Domain {
    /// Defines the domain (`ram_mib` of RAM, in huge pages of the hugetlbfs mount `hugepages` if
    /// given; its disk a new qcow2 in the bench folder), starts it, and waits until the guest's
    /// workload runs.
    pub fn boot(
        bench: &Bench,
        name: &str,
        ram_mib: u64,
        workload: &Workload,
        hugepages: Option<&Path>,
    ) -> Result<Domain> {
        let name = Name::new(name)?;
        let disk = bench.file(&format!("{name}-{DISK}.qcow2"));
        testkit::create_qcow2(&disk, DISK_SIZE);
        let driver = QemuDriver::new(bench.state_dir());
        bench.block_on(driver.define(&config(&name, ram_mib, workload, &disk, hugepages)))?;
        let store = Arc::new(FsStore::new(bench.state_dir()));
        let clock = Arc::new(StepClock::default());
        let orchestrator = Orchestrator::new(Arc::new(driver.clone()), store.clone(), clock.clone());
        let paths = driver.runtime_paths(&name)?;
        let domain = Domain {
            serial: SerialWatch::start(paths.serial_log.clone()),
            paths,
            name,
            ram_mib,
            driver,
            store,
            orchestrator,
            clock,
            runtime: bench.runtime.handle().clone(),
        };
        let booted = Instant::now();
        bench.block_on(domain.driver.start(&domain.name, false))?;
        // A few ticks: the workload has allocated its working set and dirties at its rate.
        domain
            .serial
            .wait(booted, BOOT, "tick above 3", |tick| tick.n > 3)
            .with_context(|| format!("domain {} did not boot", domain.name))?;
        Ok(domain)
    }

    /// Lets the guest run between measurements, so each starts from a guest that is dirtying
    /// memory at its steady rate (a pause stops the workload's clock).
    pub fn settle(&self) {
        std::thread::sleep(SETTLE);
    }

    /// Allocates every page of the RAM file without changing its content, as a guest that has run
    /// for a while has: a fresh guest's RAM file is mostly holes.
    pub fn populate_ram_file(&self) -> Result<()> {
        cmd_output(
            Command::new("fallocate")
                .args(["--length", &format!("{}MiB", self.ram_mib)])
                .arg(&self.paths.ram_file),
        )?;
        Ok(())
    }

    /// The second QMP monitor (`run/status.sock`): QEMU serves one client per monitor and the
    /// driver keeps `qmp.sock`. Held only while the driver does not need it: the driver queries
    /// the run state there when it holds no connection of its own (which it does not do during
    /// a live create).
    fn monitor(&self, bench: &Bench) -> Result<Monitor> {
        Monitor::connect(
            bench,
            &self.paths.qmp_socket.with_file_name("status.sock"),
            self.paths.qmp_socket.with_file_name("qemu.log"),
        )
    }

    /// Runs `f` with a QMP connection to the domain's QEMU for QEMU's own commands ([`Domain::monitor`]),
    /// closed before the orchestrator runs again.
    pub fn with_monitor<T>(&self, bench: &Bench, f: impl FnOnce(&Monitor) -> Result<T>) -> Result<T> {
        f(&self.monitor(bench)?)
    }

    /// `Orchestrator::create` of snapshot `snapshot` (every disk internal: the default). A live
    /// create is watched on QEMU's events (its `STOP` and `RESUME` timestamps).
    pub fn create(&self, bench: &Bench, snapshot: &str, mode: CreateMode) -> Result<Created> {
        let snapshot = Name::new(snapshot)?;
        let options = CreateOptions {
            memory: mode.memory(),
            ..CreateOptions::default()
        };
        // A paused create that reads RAM directly asks the run state while saving the device
        // state, on the second monitor if its connection is busy: no subscription then.
        let watch = match mode {
            CreateMode::Paused => None,
            CreateMode::Precopy | CreateMode::Background => {
                // The driver must hold its own connection first: without one it asks the run
                // state on the second monitor, which the subscription holds.
                bench
                    .block_on(Hypervisor::config(&self.driver, &self.name))
                    .map_err(|e| anyhow::anyhow!("domain {}: {e}", self.name))?;
                let monitor = self.monitor(bench)?;
                let events = monitor.client.subscribe();
                Some((monitor, events))
            }
        };
        self.clock.take();
        let wall_clock = WallClock::now();
        let started = Instant::now();
        let report = bench.block_on(self.orchestrator.create(&self.name, &snapshot, options));
        let wall = started.elapsed();
        let steps = self.clock.take();
        let report = report?;
        let events = match watch {
            Some((monitor, mut events)) => {
                let events = bench.block_on(stop_to_resume(&mut events))?;
                drop(monitor);
                Some(events)
            }
            None => None,
        };
        let mut created = self.created(&snapshot, mode, &report, &steps, wall)?;
        if let Some(events) = events {
            created.pause_events = Some(between(events.stop, events.resume));
            // Where the pause goes outside the orchestrator's steps, on one clock: how long after
            // QEMU stopped the guest the orchestrator knew it (pre-copy) or how long its `stop`
            // took to stop it (background), and from its resume step to QEMU's `RESUME`.
            let pause_step = steps.at(Step::Pause).map(|at| wall_clock.unix(at));
            let resume_step = steps.at(Step::Resume).map(|at| wall_clock.unix(at));
            if let Some(pause_step) = pause_step {
                created.splits.push(match mode {
                    CreateMode::Precopy => ("stop_event_to_pause_step", between(events.stop, pause_step)),
                    _ => ("pause_step_to_stop_event", between(pause_step, events.stop)),
                });
            }
            if let Some(completed) = events.completed {
                // QEMU's completion (its `downtime` ends here) to the guest running again.
                created.splits.push((
                    "completed_event_to_resume_event",
                    between(completed, events.resume),
                ));
            }
            if let Some(resume_step) = resume_step {
                created
                    .splits
                    .push(("resume_step_to_resume_event", between(resume_step, events.resume)));
            }
        }
        Ok(created)
    }

    fn created(
        &self,
        snapshot: &Name,
        mode: CreateMode,
        report: &CreateReport,
        steps: &Steps,
        wall: Duration,
    ) -> Result<Created> {
        let files = self.store.files(&self.name, snapshot);
        let (image_len, image_allocated) = file_size(&files.memory_image)?;
        let streamed = report.streamed.as_ref();
        let mut splits = Vec::new();
        let mut split = |name, span: Option<Duration>| {
            if let Some(span) = span {
                splits.push((name, span));
            }
        };
        split(
            "setup",
            steps.span(Step::Inspect, &[Step::Precopy, Step::SaveMemory, Step::Pause]),
        );
        match (mode, streamed.is_some()) {
            (CreateMode::Precopy, true) => {
                // QEMU's passes until it stopped the guest at pre-switchover; the disks while it
                // waits there; `migrate-continue` to completed; after `cont`.
                split("passes_time", steps.span(Step::Precopy, &[Step::Pause]));
                split(
                    "pause_step_to_disks",
                    steps.span(Step::Pause, &[Step::SnapshotDisks]),
                );
                split("pause_disks", steps.span(Step::SnapshotDisks, &[Step::Capture]));
                split("pause_capture", steps.span(Step::Capture, &[Step::Resume]));
                split("after_resume", steps.span(Step::Resume, &[Step::UpdateTree]));
            }
            (CreateMode::Background, _) => {
                split("prepare", steps.span(Step::SaveMemory, &[Step::Pause]));
                split("pause_disks_capture", steps.span(Step::Capture, &[Step::Resume]));
                split("after_resume", steps.span(Step::Resume, &[Step::UpdateTree]));
            }
            (_, true) => {
                split("pause_disks", steps.span(Step::SnapshotDisks, &[Step::Capture]));
                split("pause_capture", steps.span(Step::Capture, &[Step::Resume]));
                split("after_resume", steps.span(Step::Resume, &[Step::UpdateTree]));
            }
            (_, false) => {
                split("precopy", steps.span(Step::Precopy, &[Step::Pause]));
                split(
                    "pause_memory_devices",
                    steps.span(Step::SaveMemory, &[Step::SnapshotDisks]),
                );
                split("pause_disks", steps.span(Step::SnapshotDisks, &[Step::Resume]));
                split("seal", steps.span(Step::SealMemory, &[Step::Commit]));
            }
        }
        if matches!(mode, CreateMode::Precopy | CreateMode::Background) && streamed.is_none() {
            bail!(
                "a {mode:?} create did not go through QEMU's stream: {:?}",
                report.memory_read
            );
        }
        Ok(Created {
            wall,
            report_total: millis(report.total_ms),
            pause_report: millis(report.guest_pause_ms),
            pause_events: None,
            image_len,
            image_allocated,
            pages_stored: report.memory_pages.map_or(0, |(_, stored)| stored),
            devices_bytes: file_size(&files.device_state)?.0,
            streamed: streamed.is_some(),
            qemu_downtime: streamed.and_then(|s| s.hypervisor_downtime_ms).map(millis),
            passes: streamed.map(|s| s.passes),
            stream_bytes: streamed.map(|s| s.stream_bytes),
            splits,
            paused_at: steps.at(Step::Pause),
        })
    }

    /// `Orchestrator::delete` (not timed: it runs between repetitions).
    pub fn delete(&self, bench: &Bench, snapshot: &str) -> Result<()> {
        bench.block_on(self.orchestrator.delete(&self.name, &Name::new(snapshot)?, false))?;
        Ok(())
    }

    /// The one call that differs between a lazy and an eager revert; the guest runs afterwards,
    /// as after a user's `domsnap snapshot revert` (with `--eager` for [`RevertMode::Eager`]).
    async fn revert_call(&self, snapshot: &Name, mode: RevertMode) -> Result<RevertReport> {
        let options = RevertOptions {
            paused: false,
            eager: mode == RevertMode::Eager,
        };
        Ok(self.orchestrator.revert(&self.name, snapshot, options).await?)
    }

    /// How the report says memory was loaded; a lazy revert that fell back to a copy is an error
    /// (its figures would not be a lazy revert's).
    fn memory_load(report: &RevertReport, mode: RevertMode) -> Result<String> {
        let expected = match mode {
            RevertMode::Lazy => MemoryLoad::Mapped,
            RevertMode::Eager => MemoryLoad::Copied,
        };
        if report.memory_load != expected {
            bail!(
                "a {mode:?} revert loaded memory {} ({})",
                report.memory_load,
                report.memory_fallback.as_deref().unwrap_or("no reason given")
            );
        }
        Ok(report.memory_load.to_string())
    }

    /// `Orchestrator::revert` to `snapshot`, the guest running afterwards.
    pub fn revert(&self, bench: &Bench, snapshot: &str, mode: RevertMode) -> Result<Reverted> {
        let snapshot = Name::new(snapshot)?;
        self.clock.take();
        let called_at = Instant::now();
        let report = bench.block_on(self.revert_call(&snapshot, mode))?;
        let returned_at = Instant::now();
        let steps = self.clock.take();
        // The new QEMU starts beside the old one (`standby`) and loads the device state before
        // the stop, or starts after the old one ended (`startup`, between the disks and the
        // device state).
        let mut splits = vec![
            ("intent", steps.require(Step::Intent, &[Step::Check])?),
            // The snapshot's check, beside the standby's start when there is one.
            ("before_stop", steps.require(Step::Check, &[Step::Stop])?),
            ("stop", steps.require(Step::Stop, &[Step::RevertDisks])?),
            (
                "disks",
                steps.require(Step::RevertDisks, &[Step::StartIncoming, Step::PromoteStandby])?,
            ),
        ];
        let to_memory_or_devices = [Step::RestoreMemory, Step::LoadDeviceState];
        if report.standby {
            splits.extend([
                (
                    "standby",
                    steps.require(Step::StartStandby, &to_memory_or_devices)?,
                ),
                ("devices", steps.require(Step::LoadDeviceState, &[Step::Stop])?),
                // Its disks activated as the revert left them, its host forwards added.
                (
                    "promote",
                    steps.require(Step::PromoteStandby, &[Step::Resume, Step::UpdateTree])?,
                ),
            ]);
        } else {
            splits.extend([
                (
                    "startup",
                    steps.require(Step::StartIncoming, &to_memory_or_devices)?,
                ),
                (
                    "devices",
                    steps.require(Step::LoadDeviceState, &[Step::Resume, Step::UpdateTree])?,
                ),
            ]);
        }
        if let Some(downtime) = report.downtime_ms {
            splits.push(("downtime", millis(downtime)));
        }
        if let Some(copy) = steps.span(Step::RestoreMemory, &[Step::LoadDeviceState]) {
            splits.push(("memory_copy", copy));
        }
        if let Some(resume) = steps.span(Step::Resume, &[Step::UpdateTree]) {
            splits.push(("resume", resume));
        }
        Ok(Reverted {
            wall: returned_at - called_at,
            resumed_at: steps.at(Step::Resume).unwrap_or(returned_at),
            called_at,
            report_total: millis(report.total_ms),
            memory: millis(report.memory_ms),
            memory_load: Self::memory_load(&report, mode)?,
            splits,
        })
    }

    /// The guest's dirty rate (MiB per second of host time) over its ticks seen in the last
    /// `window` before `until`, counting only the last run of consecutive ticks (a revert, QEMU's
    /// `snapshot-load` included, sets the counter back); `None` with fewer than two such ticks.
    pub fn steady_rate(&self, until: Instant, window: Duration) -> Option<f64> {
        let ticks: Vec<Tick> = self
            .serial
            .ticks()
            .into_iter()
            .filter(|t| t.at <= until && until - t.at <= window)
            .collect();
        let last = *ticks.last()?;
        let mut first = last;
        for tick in ticks.iter().rev().skip(1) {
            if tick.n + 1 != first.n || tick.dirtied_mib > first.dirtied_mib {
                break;
            }
            first = *tick;
        }
        let seconds = (last.at - first.at).as_secs_f64();
        (last.n > first.n && seconds > 0.0).then(|| (last.dirtied_mib - first.dirtied_mib) as f64 / seconds)
    }
}

/// What the guest's counter said at a moment the guest stopped (a snapshot), estimated from the
/// last tick before it and the steady rate.
#[derive(Debug, Clone, Copy)]
pub struct GuestAt {
    /// The tick the guest prints next (the first a reverted guest prints).
    pub next_tick: u64,
    /// MiB rewritten at the stop (estimated: last tick's count + rate × time since).
    pub dirtied_mib: f64,
    /// Host time from the stop to the guest's next tick (1 s after its last one, on the guest's
    /// clock): how long a reverted guest waits for its first tick whatever the revert did.
    pub to_next_tick: Duration,
}

impl GuestAt {
    /// The guest's counter at `paused_at`, from the ticks of `domain` and its steady `rate`.
    pub fn estimate(domain: &Domain, paused_at: Instant, rate: f64) -> Result<GuestAt> {
        let last = domain
            .serial
            .ticks()
            .into_iter()
            .rev()
            .find(|t| t.at <= paused_at)
            .context("no tick before the snapshot")?;
        let since = (paused_at - last.at).as_secs_f64();
        Ok(GuestAt {
            next_tick: last.n + 1,
            dirtied_mib: last.dirtied_mib as f64 + rate * since,
            to_next_tick: Duration::from_secs_f64((1.0 - since).max(0.0)),
        })
    }
}

/// How the guest behaved after a revert, from its ticks.
#[derive(Debug)]
pub struct AfterRevert {
    /// Revert called → the reverted guest's first tick seen.
    pub first_tick: Duration,
    /// Revert returned (guest running) → first tick, less the wait the guest has anyway
    /// ([`GuestAt::to_next_tick`]): what the revert's aftermath added.
    pub first_tick_late: Duration,
    /// MiB/s rewritten from the resume to the first tick (from the snapshot's estimated count).
    pub rate_to_first_tick: f64,
    /// MiB/s rewritten between the first and the second tick.
    pub rate_first_second: f64,
    /// Resume → the guest has rewritten its whole working set (interpolated between ticks).
    pub working_set: Option<Duration>,
    /// Resume → the end of the first tick interval whose rate is at least 90 % of `steady`.
    pub back_to_steady: Option<Duration>,
}

impl AfterRevert {
    /// Watches the reverted guest until it has printed `ticks` ticks; `at` is its state at the
    /// snapshot, `steady` its rate before the revert, `working_set_mib` its working set.
    pub fn watch(
        domain: &Domain,
        reverted: &Reverted,
        at: &GuestAt,
        steady: f64,
        working_set_mib: u64,
        ticks: u64,
    ) -> Result<AfterRevert> {
        let last = at.next_tick + ticks - 1;
        domain.serial.wait(
            reverted.called_at,
            RESUME_WAIT,
            "ticks of the reverted guest",
            |t| t.n == last,
        )?;
        let seen: Vec<Tick> = domain
            .serial
            .ticks()
            .into_iter()
            .filter(|t| t.at >= reverted.called_at && (at.next_tick..=last).contains(&t.n))
            .collect();
        let first = *seen.first().context("no tick of the reverted guest")?;
        if first.n != at.next_tick || seen.len() < 2 {
            bail!("the reverted guest's ticks {seen:?} do not follow the snapshot's ({at:?})");
        }
        let resumed = reverted.resumed_at;
        let since_resume = |t: &Tick| t.at.saturating_duration_since(resumed).as_secs_f64();
        // (seconds since the resume, MiB since the snapshot)
        let mut points = vec![(0.0, 0.0)];
        points.extend(
            seen.iter()
                .map(|t| (since_resume(t), t.dirtied_mib as f64 - at.dirtied_mib)),
        );
        let target = working_set_mib as f64;
        let working_set = points.windows(2).find_map(|w| {
            let ((t0, d0), (t1, d1)) = (w[0], w[1]);
            (d1 >= target && d1 > d0)
                .then(|| Duration::from_secs_f64(t0 + (t1 - t0) * (target - d0) / (d1 - d0)))
        });
        let back_to_steady = points.windows(2).find_map(|w| {
            let ((t0, d0), (t1, d1)) = (w[0], w[1]);
            (t1 > t0 && (d1 - d0) / (t1 - t0) >= 0.9 * steady).then(|| Duration::from_secs_f64(t1))
        });
        let rate = |a: (f64, f64), b: (f64, f64)| if b.0 > a.0 { (b.1 - a.1) / (b.0 - a.0) } else { 0.0 };
        Ok(AfterRevert {
            first_tick: first.at - reverted.called_at,
            first_tick_late: first
                .at
                .saturating_duration_since(resumed)
                .saturating_sub(at.to_next_tick),
            rate_to_first_tick: rate(points[0], points[1]),
            rate_first_second: rate(points[1], points[2]),
            working_set,
            back_to_steady,
        })
    }
}

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms / 1e3)
}
