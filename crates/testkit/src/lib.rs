//! Test harness for domsnap: finds QEMU 10 and the test guest, and starts QEMU processes that are
//! killed when the test ends.
//!
//! Tests that need QEMU call these helpers and **fail loudly** (panic with what to run) when QEMU
//! or the guest is missing; they never skip silently. `cargo xtask setup` installs both.
//!
//! Two guests: the tiny one ([`guest`]: a Debian kernel and a busybox initramfs running the
//! workload) and a real Debian 12 system ([`debian_guest`], booted with [`DebianGuest::vm`]).
//!
//! ```no_run
//! let qemu = testkit::Qemu::builder("demo").paused().spawn();
//! println!("QMP at {}", qemu.qmp_socket().display());
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use guest_workload::{marker_sector, parse_marker, parse_serial_line, SerialLine};

mod debian;
mod debian_vm;
mod huge_pages;

pub use debian::{
    counters, debian_guest, debian_guest_dir, parse_counter_line, BuildStep, DebianBoot, DebianGuest,
    DebianGuestInfo, DebianVm, DebianVmBuilder, COUNTER_PREFIX, DEBIAN_CMDLINE, DEBIAN_DISK_FILE,
    DEBIAN_HTTP_PORT, DEBIAN_INFO_FILE, DEBIAN_INITRD_FILE, DEBIAN_KERNEL_FILE, DEBIAN_ROOT_FILE,
    DEBIAN_ROOT_LABEL, DEBIAN_SUBDIR, GUEST_AGENT_PORT_NAME,
};
pub use debian_vm::{
    agent_execute, agent_shell, free_port, http_counter, http_counter_above, http_get, OVMF_CODE, OVMF_VARS,
};
pub use huge_pages::{
    huge_pages_available, reserve_huge_pages, HugePages, HUGE_PAGES_MOUNT, HUGE_PAGE_BYTES,
};

/// The QEMU major version the project is built and tested against.
pub const QEMU_MAJOR: u32 = 10;

/// Path of `qemu-system-x86_64`, checked to be QEMU 10. Panics with a clear message otherwise.
pub fn qemu_system() -> PathBuf {
    require_tool("qemu-system-x86_64")
}

/// Path of a QEMU tool (`qemu-img`, `qemu-io`, `qemu-system-x86_64`), checked to be QEMU 10.
/// Panics with a clear message when it is missing or another version.
pub fn require_tool(name: &str) -> PathBuf {
    let output = Command::new(name).arg("--version").output().unwrap_or_else(|e| {
        panic!("{name} is required by this test but cannot be run ({e}); run `cargo xtask setup`")
    });
    let text = String::from_utf8_lossy(&output.stdout);
    let major = text
        .split_whitespace()
        .skip_while(|word| *word != "version")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse::<u32>().ok());
    assert_eq!(
        major,
        Some(QEMU_MAJOR),
        "{name} must be QEMU {QEMU_MAJOR}.x, it says: {}; run `cargo xtask setup`",
        text.lines().next().unwrap_or_default()
    );
    PathBuf::from(name)
}

/// The test guest built by `cargo xtask setup`.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs with the workload.
    pub initrd: PathBuf,
}

/// Environment variable naming the guest folder (exported by `cargo xtask test` to the tests).
pub const GUEST_DIR_ENV: &str = "DOMSNAP_GUEST_DIR";
/// The kernel inside the guest folder.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs (uncompressed newc cpio) inside the guest folder.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";

/// The guest folder: `$DOMSNAP_GUEST_DIR`, else `$HOME/.cache/domsnap/guest`.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(GUEST_DIR_ENV).filter(|dir| !dir.is_empty()) {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/domsnap/guest")
}

/// The test guest. Panics with a clear message if it has not been built.
pub fn guest() -> Guest {
    let dir = guest_dir();
    let guest = Guest {
        kernel: dir.join(KERNEL_FILE),
        initrd: dir.join(INITRAMFS_FILE),
    };
    for file in [&guest.kernel, &guest.initrd] {
        assert!(
            file.is_file(),
            "test guest file {} is missing; run `cargo xtask setup`",
            file.display()
        );
    }
    guest
}

/// What the test guest runs, chosen on its kernel command line.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Prints `DOMSNAP TICK n` once a second.
    Idle,
    /// Also rewrites `wss_mib` MiB of memory at `rate_mib` MiB/s.
    Dirty {
        /// MiB per second.
        rate_mib: u64,
        /// Working-set size in MiB.
        wss_mib: u64,
    },
    /// Fills `mib` MiB of tmpfs from `seed` and prints its checksum; `verify` on the console
    /// recomputes it.
    Fingerprint {
        /// PRNG seed.
        seed: u64,
        /// Size in MiB.
        mib: u64,
    },
}

impl Workload {
    /// The checksum a healthy fingerprint guest prints (computed on the host).
    pub fn expected_fingerprint(&self) -> Option<u64> {
        match *self {
            Workload::Fingerprint { seed, mib } => Some(guest_workload::fingerprint_sum(seed, mib)),
            _ => None,
        }
    }

    /// The kernel command-line words selecting this workload.
    pub fn cmdline(&self) -> String {
        let mode = match self {
            Workload::Idle => "domsnap.mode=idle".into(),
            Workload::Dirty { rate_mib, wss_mib } => {
                format!("domsnap.mode=dirty domsnap.rate_mib={rate_mib} domsnap.wss_mib={wss_mib}")
            }
            Workload::Fingerprint { seed, mib } => {
                format!("domsnap.mode=fingerprint domsnap.seed={seed} domsnap.fp_mib={mib}")
            }
        };
        // Under TCG on a busy host the kernel's boot-time check of the IO-APIC timer can miss
        // its ticks and panic ("IO-APIC + timer doesn't work"); the check proves nothing here.
        format!("{NO_TIMER_CHECK} {mode}")
    }
}

/// The kernel parameter that skips the boot-time timer check (see [`Workload::cmdline`]).
pub const NO_TIMER_CHECK: &str = "no_timer_check";

/// Builds a QEMU command line for tests: q35 under TCG, guest RAM in a shared file, QMP on a
/// Unix socket, serial console logged to a file.
#[derive(Debug)]
pub struct QemuBuilder {
    name: String,
    memory_mib: u64,
    paused: bool,
    incoming_defer: bool,
    workload: Option<Workload>,
    kernel: Option<KernelBoot>,
    disks: Vec<PathBuf>,
    extra: Vec<String>,
    dir: Option<PathBuf>,
}

/// A kernel QEMU loads itself (`-kernel`, `-initrd`, `-append`).
#[derive(Debug, Clone)]
struct KernelBoot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
}

/// A running QEMU, killed on drop. Its files live in a temporary folder removed on drop.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
}

impl Qemu {
    /// Starts describing a QEMU process named `name` (used for the RAM file name).
    pub fn builder(name: &str) -> QemuBuilder {
        QemuBuilder {
            name: name.to_owned(),
            memory_mib: 128,
            paused: false,
            incoming_defer: false,
            workload: None,
            kernel: None,
            disks: Vec::new(),
            extra: Vec::new(),
            dir: None,
        }
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The file holding guest RAM (`memory-backend-file,id=mem,share=on`).
    pub fn ram_file(&self) -> PathBuf {
        self.dir.join("ram")
    }

    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The serial console socket (write `verify\n` to it to trigger a fingerprint check).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// The folder of this QEMU's files; tests may put their own files there.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What QEMU wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }

    /// Whether the process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for a serial console line containing `needle`; returns the line.
    /// Panics with the log and QEMU's stderr when it does not come.
    pub fn wait_for_serial(&self, needle: &str, timeout: Duration) -> String {
        self.try_wait_for_serial(needle, timeout)
            .unwrap_or_else(|report| panic!("{report}"))
    }

    /// Like [`Qemu::wait_for_serial`], but returns the failure report instead of panicking.
    pub fn try_wait_for_serial(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.poll(timeout, |log| {
            log.lines()
                .find(|line| line.contains(needle))
                .map(|l| l.trim().to_owned())
        })
        .map_err(|log| format!("no serial line containing {needle:?} within {timeout:?}; {log}"))
    }

    /// Waits up to `timeout` for a tick counter above `after`; returns it.
    pub fn try_wait_for_tick_after(&self, after: u64, timeout: Duration) -> Result<u64, String> {
        self.poll(timeout, |log| {
            let last = log
                .lines()
                .rev()
                .filter_map(parse_serial_line)
                .find_map(|line| match line {
                    SerialLine::Tick { n, .. } => Some(n),
                    _ => None,
                });
            last.filter(|&n| n > after)
        })
        .map_err(|log| format!("the guest did not count past {after} within {timeout:?}; {log}"))
    }

    /// Re-reads the serial log until `check` finds what it wants, or reports the log and stderr.
    fn poll<T>(&self, timeout: Duration, mut check: impl FnMut(&str) -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = fs::read_to_string(self.serial_log()).unwrap_or_default();
            if let Some(found) = check(&log) {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "serial log so far:\n{log}\nQEMU stderr:\n{}",
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every `DOMSNAP` line the guest printed so far, parsed.
    pub fn serial_lines(&self) -> Vec<SerialLine> {
        let log = fs::read_to_string(self.serial_log()).unwrap_or_default();
        log.lines().filter_map(parse_serial_line).collect()
    }

    /// The last `DOMSNAP TICK n` counter the guest printed, if any.
    pub fn last_tick(&self) -> Option<u64> {
        self.serial_lines().into_iter().rev().find_map(|line| match line {
            SerialLine::Tick { n, .. } => Some(n),
            _ => None,
        })
    }

    /// Connects to QMP, negotiates capabilities and waits for the reply, then disconnects (QEMU
    /// serves one QMP client at a time, so the test can connect afterwards).
    fn wait_until_initialised(&mut self, deadline: Instant) {
        use std::io::{BufRead, BufReader, Write};
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(self.qmp_socket()) {
                Ok(stream) => break stream,
                Err(err) => {
                    assert!(
                        self.is_running() && Instant::now() < deadline,
                        "cannot connect to QEMU's QMP socket ({err}):\n{}",
                        self.stderr()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        stream.set_read_timeout(Some(left)).expect("set QMP read timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone QMP stream"));
        let mut line = String::new();
        reader.read_line(&mut line).expect("read QMP greeting");
        (&stream)
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .expect("send qmp_capabilities");
        loop {
            line.clear();
            let read = reader
                .read_line(&mut line)
                .unwrap_or_else(|err| panic!("QEMU did not answer on QMP ({err}):\n{}", self.stderr()));
            assert!(read > 0, "QEMU closed QMP during start-up:\n{}", self.stderr());
            if line.contains("\"return\"") {
                return;
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

impl QemuBuilder {
    /// Guest RAM size (default 128 MiB).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Start with the vCPUs stopped (`-S`).
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// Wait for incoming state (`-incoming defer`, vCPUs stopped) as
    /// for a restore.
    pub fn incoming_defer(mut self) -> Self {
        self.incoming_defer = true;
        self
    }

    /// Boot the test guest with this workload.
    pub fn guest(mut self, workload: Workload) -> Self {
        self.workload = Some(workload);
        self
    }

    /// Boot this kernel, initramfs and command line (instead of the test guest's; overrides
    /// [`QemuBuilder::guest`]).
    pub fn kernel(mut self, kernel: &Path, initrd: Option<&Path>, cmdline: impl Into<String>) -> Self {
        self.kernel = Some(KernelBoot {
            kernel: kernel.to_owned(),
            initrd: initrd.map(Path::to_owned),
            cmdline: cmdline.into(),
        });
        self
    }

    /// Attach a qcow2 image as a virtio disk: the first has target id `vda` (block nodes
    /// `file-vda` and `disk-vda`, see [`disk_id`]), the second `vdb`, and so on.
    pub fn disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.disks.push(path.into());
        self
    }

    /// Put this QEMU's files (RAM, sockets, logs) in `dir` instead of a fresh temporary folder
    /// (to restore into a QEMU sharing a folder with an earlier one).
    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Extra command-line arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// The full argument list QEMU is started with, given the folder for its files: the domain
    /// driver's command line ([`qemu::qemu_args`]) plus this builder's extra arguments.
    pub fn args(&self, dir: &Path) -> Vec<std::ffi::OsString> {
        let boot = match (&self.kernel, &self.workload) {
            (Some(boot), _) => Some(boot.clone()),
            (None, Some(workload)) => {
                let guest = guest();
                Some(KernelBoot {
                    kernel: guest.kernel,
                    initrd: Some(guest.initrd),
                    cmdline: format!("console=ttyS0 quiet {}", workload.cmdline()),
                })
            }
            (None, None) => None,
        };
        // Built directly rather than parsed: a QMP-only test QEMU has nothing to boot, which a
        // user's configuration may not do.
        let config = qemu::DomainConfig {
            name: snapshot_core::Name::new(self.name.as_str())
                .expect("test QEMU names are valid domain names"),
            memory_mib: self.memory_mib,
            vcpus: 1,
            kernel: boot.as_ref().map(|boot| boot.kernel.clone()),
            initrd: boot.as_ref().and_then(|boot| boot.initrd.clone()),
            cmdline: boot.map(|boot| boot.cmdline),
            serial_log: None,
            run_as: None,
            // What the driver pins for a domain under TCG (KVM guests stall on these machines),
            // so a test QEMU and a driver's domain of the same guest are the same machine.
            accel: Some(qemu::Accel::Tcg),
            machine: None,
            cpu: Some(qemu::Accel::Tcg.default_cpu().to_owned()),
            firmware: qemu::Firmware::Bios,
            nvram: None,
            guest_agent: false,
            hugepages: None,
            nics: Vec::new(),
            disks: self
                .disks
                .iter()
                .enumerate()
                .map(|(index, path)| qemu::DiskConfig::qcow2(disk_id(index), path.clone()))
                .collect(),
        };
        let paths = qemu::RuntimePaths {
            ram_file: dir.join("ram"),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            console_socket: dir.join("console.sock"),
            guest_agent_socket: dir.join("qga.sock"),
        };
        let mode = if self.incoming_defer {
            qemu::StartMode::Incoming
        } else {
            qemu::StartMode::Boot { paused: self.paused }
        };
        let mut args = qemu::qemu_args(&config, &paths, mode);
        args.extend(self.extra.iter().map(Into::into));
        args
    }

    /// Starts QEMU and waits until it has finished initialising (it answers on QMP, so its disks
    /// are open and locked). Panics (with QEMU's stderr) on failure.
    pub fn spawn(self) -> Qemu {
        let binary = qemu_system();
        let (dir, tempdir) = match &self.dir {
            Some(dir) => {
                fs::create_dir_all(dir).expect("create QEMU folder");
                (dir.clone(), None)
            }
            None => {
                let tempdir = tempfile::Builder::new()
                    .prefix(&format!("domsnap-test-{}-", self.name))
                    .tempdir()
                    .expect("create temporary folder");
                (tempdir.path().to_owned(), Some(tempdir))
            }
        };
        // Stale files of an earlier QEMU in the same folder would be mistaken for ours.
        for stale in ["qmp.sock", "console.sock", "serial.log"] {
            let _ = fs::remove_file(dir.join(stale));
        }
        let stderr = fs::File::create(dir.join("qemu.stderr")).expect("create stderr file");
        let child = Command::new(&binary)
            .args(self.args(&dir))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut qemu = Qemu {
            child,
            dir,
            _tempdir: tempdir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !qemu.qmp_socket().exists() {
            assert!(
                qemu.is_running(),
                "QEMU exited during start-up:\n{}",
                qemu.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "QEMU's QMP socket did not appear:\n{}",
                qemu.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket is created before QEMU has opened (and locked) its disks; a command's
        // reply means initialisation has finished.
        qemu.wait_until_initialised(deadline);
        qemu
    }
}

/// The target id of the test QEMU's disk number `index`: `vda`, `vdb`, ...
pub fn disk_id(index: usize) -> String {
    let letter = u8::try_from(index)
        .ok()
        .filter(|i| *i < 26)
        .expect("at most 26 test disks")
        + b'a';
    format!("vd{}", char::from(letter))
}

/// The `human-monitor-command` arguments that write `length` bytes of 0x5a at `offset` (QEMU's
/// size syntax: `1M`, `512M`) to the disk of virtio device `device` through QEMU's block layer
/// (HMP `qemu-io`), as the guest's own writes go: with the default `cache = "writeback"` they
/// wait in the host's page cache until a flush. QEMU answers `""` once they are written.
pub fn hmp_disk_write(device: &str, offset: &str, length: &str) -> serde_json::Value {
    let line =
        format!("qemu-io -d /machine/peripheral/{device}/virtio-backend \"write -P 0x5a {offset} {length}\"");
    serde_json::json!({ "command-line": line })
}

/// Runs a command to completion and returns its stdout; panics with its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Creates a qcow2 image with `qemu-img create`.
pub fn create_qcow2(path: &Path, size: &str) {
    require_tool("qemu-img");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &path.display().to_string(), size],
    );
}

/// The marker in sector 0 of a qcow2 image (`Some("domsnap-marker tick=<n>")`, or `None` if the
/// sector holds no marker). Works while QEMU runs (`qemu-img dd -U` reads the active layer).
pub fn read_disk_marker(qcow2: &Path) -> Option<String> {
    parse_marker(&read_sector0(qcow2))
}

/// The first 512 bytes of a qcow2 image as the guest sees them (backing chain included).
pub fn read_sector0(qcow2: &Path) -> Vec<u8> {
    require_tool("qemu-img");
    let tmp = tempfile::tempdir().expect("create temporary folder");
    let out = tmp.path().join("sector0.raw");
    run(
        "qemu-img",
        &[
            "dd",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "bs=512",
            "count=1",
            &format!("if={}", qcow2.display()),
            &format!("of={}", out.display()),
        ],
    );
    let bytes = fs::read(&out).expect("read the sector qemu-img wrote");
    assert!(
        bytes.len() >= 512,
        "qemu-img dd gave {} bytes for sector 0 of {}",
        bytes.len(),
        qcow2.display()
    );
    bytes[..512].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_disks_get_target_ids_and_extra_arguments_come_last() {
        assert_eq!(
            (disk_id(0), disk_id(1), disk_id(25)),
            ("vda".into(), "vdb".into(), "vdz".into())
        );
        let args = Qemu::builder("t")
            .disk("/a.qcow2")
            .disk("/b.qcow2")
            .arg("-no-reboot")
            .args(Path::new("/x"));
        let joined = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains("node-name=disk-vda") && joined.contains("id=vdb"),
            "{joined}"
        );
        assert!(joined.ends_with(" -no-reboot"), "{joined}");
    }

    #[test]
    fn disk_marker_from_qcow2() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("d.raw");
        let mut image = marker_sector(17).to_vec();
        image.resize(1 << 20, 0);
        fs::write(&raw, &image).unwrap();
        let qcow2 = tmp.path().join("d.qcow2");
        require_tool("qemu-img");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                raw.to_str().unwrap(),
                qcow2.to_str().unwrap(),
            ],
        );
        assert_eq!(
            read_disk_marker(&qcow2).as_deref(),
            Some("domsnap-marker tick=17")
        );
        let blank = tmp.path().join("blank.qcow2");
        create_qcow2(&blank, "1M");
        assert_eq!(read_disk_marker(&blank), None);
    }
}
