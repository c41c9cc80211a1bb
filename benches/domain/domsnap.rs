//! The domsnap side, measured through the product: an in-process [`Orchestrator`] over a
//! [`QemuDriver`] and an [`FsStore`] on one state directory, wired as the `domsnap` CLI wires them.
//! A [`Domain`] is one domain of that driver; its create, delete and revert are the orchestrator's.
//! A [`StepClock`] observer timestamps the orchestrator's steps, so the table can say which part of
//! an operation a figure is without measuring anything outside the product's own run.

use std::{
    fs,
    path::Path,
    process::Command,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qemu::{DiskConfig, DomainConfig, QemuDriver, RuntimePaths};
use snapshot_core::{
    CreateOptions, FsStore, LiveMethod, LiveOptions, MemoryMode, Name, Observer, Operation, Orchestrator,
    SnapshotStore, Step,
};
use testkit::{SerialLine, Workload};

use crate::{cmd_output, file_size, Bench, Monitor, BOOT, DISK, DISK_SIZE, RAM_MIB, SETTLE};

/// Longest wait for a restored guest's next tick (it ticks once a second).
const RESUME_WAIT: Duration = Duration::from_secs(30);

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
    /// From the start of step `from` to the start of the first step `to` after it.
    fn span(&self, from: Step, to: Step) -> Result<Duration> {
        let start = self
            .0
            .iter()
            .position(|(step, _)| *step == from)
            .with_context(|| format!("the orchestrator announced no step {from:?}: {:?}", self.names()))?;
        let end = self.0[start..]
            .iter()
            .find(|(step, _)| *step == to)
            .with_context(|| format!("no step {to:?} after {from:?}: {:?}", self.names()))?;
        Ok(end.1 - self.0[start].1)
    }

    fn names(&self) -> Vec<Step> {
        self.0.iter().map(|(step, _)| *step).collect()
    }
}

/// A snapshot taken by [`Domain::create`], with what its creation cost.
#[derive(Debug)]
pub struct Created {
    /// Wall time around `Orchestrator::create`.
    pub wall: Duration,
    /// The report's `total_ms` (the same span measured inside the call).
    pub report_total: Duration,
    /// The report's `guest_pause_ms`: from `stop` answered to `cont` answered.
    pub pause: Duration,
    /// Before memory is copied (or the background save starts): the domain's lock, inspecting the
    /// domain (QMP), the intent record and the snapshot's folder (fsynced).
    pub setup: Duration,
    /// The memory image's length (sparse: RAM size plus 9 bytes per page of metadata).
    pub image_len: u64,
    /// Bytes the memory image occupies.
    pub image_allocated: u64,
    /// Pages stored in the image: the guest's non-zero pages at the consistency point.
    pub pages_stored: u64,
    /// The device state's size.
    pub devices_bytes: u64,
    /// The mode's own steps.
    pub memory: MemorySteps,
}

/// The steps of a create that depend on its memory mode.
#[derive(Debug)]
pub enum MemorySteps {
    /// Paused or pre-copy: domsnap's memory engine reads the RAM file.
    Engine {
        /// Pre-copy while the guest runs (live only; zero when paused).
        precopy: Duration,
        /// The final memory round and the device state (overlapped), while paused.
        memory_devices: Duration,
        /// The final memory round alone (the report's last round): the rest of `memory_devices`
        /// is the device state's save and fsync, when that takes longer.
        final_round: Duration,
        /// The disk snapshot (internal, `blockdev-snapshot-internal-sync`), while paused.
        disks: Duration,
        /// After the resume: sealing the memory image (fsync, rename).
        seal: Duration,
        /// Memory rounds, the final one included (1 for a paused create).
        rounds: u64,
    },
    /// Background: QEMU's `background-snapshot` stream, parsed into the image.
    Streamed {
        /// While the guest runs, before the pause: RAM layout, files, socket, capability, until
        /// the driver is ready to capture.
        prepare: Duration,
        /// While paused: the disk snapshot, then QEMU's capture (device state, write protection),
        /// until the stream's first RAM section arrives.
        disks_capture: Duration,
        /// After the resume: the rest of the stream while the guest runs, sealing the image and the
        /// device state, the record.
        after_resume: Duration,
        /// QEMU's own `downtime` of the background migration (inside the guest pause).
        hypervisor_downtime: Duration,
        /// Bytes of the stream QEMU wrote.
        stream_bytes: u64,
    },
}

/// What [`Domain::revert`] cost.
#[derive(Debug)]
pub struct Reverted {
    /// Wall time around `Orchestrator::revert`.
    pub wall: Duration,
    /// The report's `total_ms`.
    pub report_total: Duration,
    /// The report's `memory_ms`: reading the RAM layout, mapping the new RAM file and restoring the
    /// image into it.
    pub memory: Duration,
    /// Checking the snapshot before the domain is touched (the whole memory image verified) and
    /// inspecting the domain.
    pub check: Duration,
    /// Ending the old QEMU (`quit`, until it has exited).
    pub stop: Duration,
    /// Reverting the disk (offline internal-snapshot apply) and redefining the domain.
    pub disks: Duration,
    /// Starting the new QEMU with `-incoming defer` until it has initialised.
    pub startup: Duration,
    /// From the new QEMU started to the device state loaded: restore the memory image, load the
    /// device state (`migrate-incoming`).
    pub load: Duration,
    /// `startup` and `load`.
    pub with_startup: Duration,
}

/// A domain of the driver, booted from the test guest with one qcow2 disk. Its QEMU is ended
/// on drop: it runs daemonized and would outlive the bench, with its RAM file on tmpfs.
pub struct Domain {
    name: Name,
    driver: QemuDriver,
    store: Arc<FsStore>,
    orchestrator: Orchestrator,
    clock: Arc<StepClock>,
    paths: RuntimePaths,
    runtime: tokio::runtime::Handle,
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

/// The configuration of a 1 GiB test-guest domain named `name`, as a user would write it (the
/// kernel command line as testkit builds it, so a testkit QEMU with the same workload and disk
/// has the same machine and can load this domain's migration stream).
fn config(name: &Name, workload: &Workload, disk: &Path) -> DomainConfig {
    let guest = testkit::guest();
    DomainConfig {
        name: name.clone(),
        memory_mib: RAM_MIB,
        vcpus: 1,
        kernel: Some(guest.kernel),
        initrd: Some(guest.initrd),
        cmdline: Some(format!("console=ttyS0 quiet {}", workload.cmdline())),
        serial_log: None,
        run_as: None,
        disks: vec![DiskConfig {
            id: DISK.to_owned(),
            path: disk.to_owned(),
        }],
    }
}

impl Domain {
    /// Defines the domain (its disk a new qcow2 in the bench folder), starts it, and waits until
    /// the guest's workload runs.
    pub fn boot(bench: &Bench, name: &str, workload: &Workload) -> Result<Domain> {
        let name = Name::new(name)?;
        let disk = bench.file(&format!("{name}-{DISK}.qcow2"));
        testkit::create_qcow2(&disk, DISK_SIZE);
        let driver = QemuDriver::new(bench.state_dir());
        bench.block_on(driver.define(&config(&name, workload, &disk)))?;
        let store = Arc::new(FsStore::new(bench.state_dir()));
        let clock = Arc::new(StepClock::default());
        let orchestrator = Orchestrator::new(Arc::new(driver.clone()), store.clone(), clock.clone());
        let domain = Domain {
            paths: driver.runtime_paths(&name)?,
            name,
            driver,
            store,
            orchestrator,
            clock,
            runtime: bench.runtime.handle().clone(),
        };
        bench.block_on(domain.driver.start(&domain.name, false))?;
        domain.wait_serial(0, BOOT, "DOMSNAP READY", |line| {
            matches!(line, SerialLine::Ready { .. })
        })?;
        // A few ticks: the workload has allocated its working set and dirties at its rate.
        domain.wait_serial(
            0,
            BOOT,
            "a tick above 3",
            |line| matches!(line, SerialLine::Tick { n, .. } if *n > 3),
        )?;
        Ok(domain)
    }

    /// Lets the guest run between measurements, so each starts from a guest that is dirtying
    /// memory at its steady rate (a pause stops the workload's clock).
    pub fn settle(&self) {
        std::thread::sleep(SETTLE);
    }

    /// Waits until the guest prints, after byte `from` of its serial log, a line `wanted` accepts.
    fn wait_serial(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        wanted: impl Fn(&SerialLine) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = fs::read(&self.paths.serial_log).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(from..).unwrap_or_default());
            if new
                .lines()
                .filter_map(testkit::parse_serial_line)
                .any(|l| wanted(&l))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "domain {}: no {what} on the serial console in {timeout:?}:\n{new}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Allocates every page of the RAM file without changing its content, as a guest that has run
    /// for a while has: a fresh guest's RAM file is mostly holes, which domsnap skips and QEMU's
    /// migration fills on its first run, so without this the two would not read the same memory.
    pub fn populate_ram_file(&self) -> Result<()> {
        cmd_output(
            Command::new("fallocate")
                .args(["--length", &format!("{RAM_MIB}MiB")])
                .arg(&self.paths.ram_file),
        )?;
        Ok(())
    }

    /// Runs `f` with a QMP connection to the domain's QEMU for QEMU's own commands. It is the
    /// driver's second monitor (`run/status.sock`): QEMU serves one client per monitor and the
    /// driver keeps `qmp.sock`. The connection is closed before the orchestrator runs again,
    /// because the driver queries the run state on that monitor when it holds no connection.
    pub fn with_monitor<T>(&self, bench: &Bench, f: impl FnOnce(&Monitor) -> Result<T>) -> Result<T> {
        let monitor = Monitor::connect(
            bench,
            &self.paths.qmp_socket.with_file_name("status.sock"),
            self.paths.qmp_socket.with_file_name("qemu.log"),
        )?;
        f(&monitor)
    }

    /// `Orchestrator::create` of snapshot `snapshot` (every disk internal: the default).
    pub fn create(&self, bench: &Bench, snapshot: &str, mode: MemoryMode) -> Result<Created> {
        let snapshot = Name::new(snapshot)?;
        let options = CreateOptions {
            memory: mode.clone(),
            ..CreateOptions::default()
        };
        self.clock.take();
        let started = Instant::now();
        let report = bench.block_on(self.orchestrator.create(&self.name, &snapshot, options))?;
        let wall = started.elapsed();
        let steps = self.clock.take();
        let files = self.store.files(&self.name, &snapshot);
        let (image_len, image_allocated) = file_size(&files.memory_image)?;
        let (memory, copy_starts) = match mode {
            MemoryMode::DisksOnly => {
                anyhow::bail!("this benchmark measures memory saves, not disk-only creates")
            }
            MemoryMode::Live(LiveOptions {
                method: LiveMethod::Background,
                ..
            }) => {
                let streamed = report
                    .streamed
                    .as_ref()
                    .context("a background create reported no stream")?;
                let memory = MemorySteps::Streamed {
                    prepare: steps.span(Step::SaveMemory, Step::Pause)?,
                    disks_capture: steps.span(Step::SnapshotDisks, Step::Resume)?,
                    after_resume: steps.span(Step::Resume, Step::UpdateTree)?,
                    hypervisor_downtime: millis(
                        streamed
                            .hypervisor_downtime_ms
                            .context("QEMU reported no downtime")?,
                    ),
                    stream_bytes: streamed.stream_bytes,
                };
                (memory, Step::SaveMemory)
            }
            MemoryMode::Live(_) | MemoryMode::Paused => {
                let live = matches!(mode, MemoryMode::Live(_));
                let memory = MemorySteps::Engine {
                    precopy: if live {
                        steps.span(Step::Precopy, Step::Pause)?
                    } else {
                        Duration::ZERO
                    },
                    memory_devices: steps.span(Step::SaveMemory, Step::SnapshotDisks)?,
                    final_round: report
                        .memory_rounds
                        .last()
                        .map_or(Duration::ZERO, |round| millis(round.duration_ms)),
                    disks: steps.span(Step::SnapshotDisks, Step::Resume)?,
                    seal: steps.span(Step::SealMemory, Step::Commit)?,
                    rounds: report.memory_rounds.len() as u64,
                };
                (memory, if live { Step::Precopy } else { Step::Pause })
            }
        };
        Ok(Created {
            wall,
            report_total: millis(report.total_ms),
            pause: millis(report.guest_pause_ms),
            setup: steps.span(Step::Inspect, copy_starts)?,
            image_len,
            image_allocated,
            pages_stored: report.memory_pages.map_or(0, |(_, stored)| stored),
            devices_bytes: file_size(&files.device_state)?.0,
            memory,
        })
    }

    /// `Orchestrator::delete` (not timed: it runs between repetitions).
    pub fn delete(&self, bench: &Bench, snapshot: &str) -> Result<()> {
        bench.block_on(self.orchestrator.delete(&self.name, &Name::new(snapshot)?, false))?;
        Ok(())
    }

    /// `Orchestrator::revert` to `snapshot`, leaving the guest paused (as the baselines end, and so
    /// that it takes no CPU from what is measured next).
    pub fn revert(&self, bench: &Bench, snapshot: &str) -> Result<Reverted> {
        let snapshot = Name::new(snapshot)?;
        self.clock.take();
        let started = Instant::now();
        // Eager: the figures break the copy down into steps (start, restore, load), as the
        // baselines that copy memory do.
        let options = snapshot_core::RevertOptions {
            paused: true,
            eager: true,
        };
        let report = bench.block_on(self.orchestrator.revert(&self.name, &snapshot, options))?;
        let wall = started.elapsed();
        let steps = self.clock.take();
        Ok(Reverted {
            wall,
            report_total: millis(report.total_ms),
            memory: millis(report.memory_ms),
            check: steps.span(Step::Check, Step::Intent)?,
            stop: steps.span(Step::Stop, Step::RevertDisks)?,
            disks: steps.span(Step::RevertDisks, Step::StartIncoming)?,
            startup: steps.span(Step::StartIncoming, Step::RestoreMemory)?,
            load: steps.span(Step::RestoreMemory, Step::UpdateTree)?,
            with_startup: steps.span(Step::StartIncoming, Step::UpdateTree)?,
        })
    }

    /// Resumes the guest a revert left paused and waits for its next tick: proof that what was
    /// measured was a working restore (not timed).
    pub fn resume_checked(&self, bench: &Bench) -> Result<()> {
        let from = fs::metadata(&self.paths.serial_log).map_or(0, |m| m.len());
        let from = usize::try_from(from)?;
        bench.block_on(self.driver.resume(&self.name))?;
        self.wait_serial(from, RESUME_WAIT, "tick after the revert", |line| {
            matches!(line, SerialLine::Tick { .. })
        })
    }
}

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms / 1e3)
}
