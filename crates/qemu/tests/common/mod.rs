//! Helpers of the driver's real-QEMU tests: a state directory that cleans up after its
//! domains, and the test guest's serial log.

#![allow(dead_code)] // Each test binary uses its own subset.
#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use disk::{BackingPath, ExternalSnapshot};
use memory::{save_paused, Durability, ImageLayout, ImageWriter};
use qemu::{Accel, DiskConfig, DomainConfig, Firmware, QemuDriver};
use snapshot_core::{DiskTarget, Hypervisor, Name};
use testkit::{SerialLine, Workload};

pub const BOOT: Duration = Duration::from_secs(90);
pub const WAIT: Duration = Duration::from_secs(20);

/// A state directory whose domains' QEMUs are killed and RAM files removed when the test ends,
/// whatever happened (the driver's QEMUs outlive the test process otherwise).
pub struct State {
    dir: tempfile::TempDir,
    names: Vec<Name>,
}

impl State {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("domsnap-driver-")
                .tempdir()
                .unwrap(),
            names: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn driver(&self) -> QemuDriver {
        QemuDriver::new(self.path())
    }

    /// A domain of the test guest running `workload` (or nothing to run, when `None`).
    pub fn config(&mut self, name: &str, workload: Option<Workload>, disks: &[PathBuf]) -> DomainConfig {
        let name = Name::new(name).unwrap();
        self.names.push(name.clone());
        let guest = testkit::guest();
        DomainConfig {
            name,
            memory_mib: 128,
            vcpus: 1,
            kernel: Some(guest.kernel),
            initrd: Some(guest.initrd),
            cmdline: workload.map(|w| format!("console=ttyS0 quiet {}", w.cmdline())),
            serial_log: None,
            run_as: None,
            // KVM guests stall on these machines: the tests run under TCG.
            accel: Some(Accel::Tcg),
            machine: None,
            cpu: None,
            firmware: Firmware::Bios,
            nvram: None,
            guest_agent: false,
            hugepages: None,
            nics: Vec::new(),
            disks: disks
                .iter()
                .enumerate()
                .map(|(index, path)| DiskConfig::qcow2(testkit::disk_id(index), path.clone()))
                .collect(),
        }
    }

    /// A domain of the test guest running `workload` on a fresh 16 MiB qcow2 disk
    /// `STATE/NAME.qcow2`, defined and started (paused with `paused`); its name and disk.
    pub async fn started_on_disk(
        &mut self,
        name: &str,
        workload: Option<Workload>,
        paused: bool,
    ) -> (Name, PathBuf) {
        let disk = self.path().join(format!("{name}.qcow2"));
        testkit::create_qcow2(&disk, "16M");
        let config = self.config(name, workload, std::slice::from_ref(&disk));
        let driver = self.driver();
        driver.define(&config).await.unwrap();
        driver.start(&config.name, paused).await.unwrap();
        (config.name, disk)
    }

    pub fn pid(&self, name: &Name) -> Option<i32> {
        let pid_file = self
            .path()
            .join("domains")
            .join(name.as_str())
            .join("run/qemu.pid");
        fs::read_to_string(pid_file).ok()?.trim().parse().ok()
    }
}

/// The run folders of a domain's two run slots (the second holds a revert's standby QEMU).
const RUN_SLOTS: [&str; 2] = ["run", "run-1"];

impl Drop for State {
    fn drop(&mut self) {
        let driver = self.driver();
        for name in &self.names {
            for slot in RUN_SLOTS {
                let pid_file = self
                    .path()
                    .join("domains")
                    .join(name.as_str())
                    .join(slot)
                    .join("qemu.pid");
                let pid = fs::read_to_string(pid_file)
                    .ok()
                    .and_then(|pid| pid.trim().parse().ok());
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if let Ok(paths) = driver.runtime_paths(name) {
                // Both slots' RAM files: NAME.ram and NAME+1.ram.
                let ram = paths.ram_file.to_string_lossy().into_owned();
                let stem = ram
                    .strip_suffix("+1.ram")
                    .or(ram.strip_suffix(".ram"))
                    .unwrap_or(&ram);
                let _ = fs::remove_file(format!("{stem}.ram"));
                let _ = fs::remove_file(format!("{stem}+1.ram"));
            }
        }
    }
}

/// What a paused create saves of a running domain: pauses it, writes its RAM into the memory
/// image `image` (from the shared RAM file) and its device state into `devices`.
pub async fn save_memory_and_devices(driver: &QemuDriver, name: &Name, image: &Path, devices: &Path) {
    driver.pause(name).await.unwrap();
    let ram = driver.guest_memory(name).await.unwrap();
    let writer = ImageWriter::create(image, ImageLayout::of(&ram), Durability::Sync).unwrap();
    save_paused(&ram, Box::new(writer)).unwrap();
    drop(ram);
    driver.save_device_state(name, devices).await.unwrap();
}

/// Disk `vda` (the first test disk) on the qcow2 image `image`, as the orchestrator names it.
pub fn vda(image: &Path) -> DiskTarget {
    DiskTarget {
        target: "vda".into(),
        image: image.to_owned(),
        format: snapshot_core::ImageFormat::Qcow2,
    }
}

/// A new overlay `overlay` on `disk` (an external snapshot of it, or a revert to it), naming
/// its backing file by its absolute path.
pub fn overlay_on(disk: &Path, overlay: &Path) -> ExternalSnapshot {
    ExternalSnapshot {
        disk: disk.to_owned(),
        overlay: overlay.to_owned(),
        backing_path: BackingPath::Absolute,
    }
}

/// The parsed `DOMSNAP` lines of a serial log.
pub fn serial_lines(log: &Path) -> Vec<SerialLine> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(testkit::parse_serial_line)
        .collect()
}

pub fn last_tick(log: &Path) -> Option<u64> {
    serial_lines(log).into_iter().rev().find_map(|line| match line {
        SerialLine::Tick { n, .. } => Some(n),
        _ => None,
    })
}

/// Waits for a serial line that `check` accepts; panics with the log if none comes in time.
pub async fn wait_serial<T>(
    log: &Path,
    timeout: Duration,
    mut check: impl FnMut(&[SerialLine]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check(&serial_lines(log)) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not print what the test waits for within {timeout:?}; serial log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first tick the guest prints after the log's first `position` lines (a restored guest's,
/// when the log also holds later ticks of an earlier run).
pub async fn first_tick_from(log: &Path, position: usize) -> u64 {
    wait_serial(log, WAIT, |lines| {
        lines.iter().skip(position).find_map(|line| match line {
            SerialLine::Tick { n, .. } => Some(*n),
            _ => None,
        })
    })
    .await
}

pub async fn wait_tick_after(log: &Path, after: u64, timeout: Duration) -> u64 {
    wait_serial(log, timeout, |_| last_tick(log).filter(|&n| n > after)).await
}
