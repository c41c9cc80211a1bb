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

use qemu::{Accel, DiskConfig, DomainConfig, Firmware, QemuDriver};
use snapshot_core::Name;
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
            nics: Vec::new(),
            disks: disks
                .iter()
                .enumerate()
                .map(|(index, path)| DiskConfig::qcow2(testkit::disk_id(index), path.clone()))
                .collect(),
        }
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

impl Drop for State {
    fn drop(&mut self) {
        let driver = self.driver();
        for name in &self.names {
            if let Some(pid) = self.pid(name) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if let Ok(paths) = driver.runtime_paths(name) {
                let _ = fs::remove_file(paths.ram_file);
            }
        }
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

pub async fn wait_tick_after(log: &Path, after: u64, timeout: Duration) -> u64 {
    wait_serial(log, timeout, |_| last_tick(log).filter(|&n| n > after)).await
}
