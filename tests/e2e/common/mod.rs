//! Helpers for the end-to-end tests: they drive the real `domsnap` binary against QEMU 10 and
//! the test guest, the way a user would.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

pub use testkit::{read_disk_marker, SerialLine, Workload};

/// A state directory and the `domsnap` binary that works on it.
pub struct Cli {
    /// Short path: QEMU's socket paths (under it) are limited to 107 bytes.
    pub dir: tempfile::TempDir,
}

/// QEMU runs daemonized and outlives `domsnap`: a test that fails half-way must not leave its
/// domains running. Kill them, then let `domain list` clean their runtime and RAM files.
impl Drop for Cli {
    fn drop(&mut self) {
        let Ok(domains) = std::fs::read_dir(self.state_dir().join("domains")) else {
            return;
        };
        for domain in domains.flatten() {
            // Both run slots: a revert's standby QEMU runs in the other one.
            for run in RUN_SLOTS {
                let pid =
                    std::fs::read_to_string(domain.path().join(run).join("qemu.pid")).unwrap_or_default();
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                }
            }
        }
        let _ = self.command(&["domain", "list"]).output();
    }
}

/// The run folders of a domain's two QEMU slots (a revert starts its new QEMU in the one the
/// running QEMU does not use).
pub const RUN_SLOTS: [&str; 2] = ["run", "run-1"];

/// The run folder of the domain's active QEMU slot (named by `active-slot`; `run` without it).
pub fn active_run_dir(domain_folder: &Path) -> PathBuf {
    let slot = std::fs::read_to_string(domain_folder.join("active-slot")).unwrap_or_default();
    domain_folder.join(if slot.trim() == "1" {
        RUN_SLOTS[1]
    } else {
        RUN_SLOTS[0]
    })
}

/// The outcome of one `domsnap` run.
pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.output.status.success()
    }
}

impl Cli {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dsn")
            .tempdir_in("/tmp")
            .expect("create state folder");
        Cli { dir }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A `domsnap` command on this state directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_domsnap"));
        command
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .env(qemu::QEMU_ENV, testkit::qemu_system());
        command
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let output = self.command(args).output().expect("run domsnap");
        Run { output }
    }

    /// Runs a command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert!(
            run.success(),
            "domsnap {args:?} failed:\n{}{}",
            run.stdout(),
            run.stderr()
        );
        run.stdout()
    }

    /// Runs a command with `--json` that must succeed; its document.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let stdout = self.ok(&with_json);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("domsnap {args:?}: not JSON ({e}):\n{stdout}"))
    }

    /// Runs a command that must fail; its one-line error.
    pub fn fails(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert!(
            !run.success(),
            "domsnap {args:?} succeeded but should fail:\n{}",
            run.stdout()
        );
        let stderr = run.stderr();
        assert!(
            stderr.starts_with("domsnap: error: "),
            "domsnap {args:?}: unexpected stderr:\n{stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "domsnap {args:?}: error is not one line:\n{stderr}"
        );
        stderr
    }

    /// Writes a domain configuration for the test guest with qcow2 disks `disks` (ids vda, vdb,
    /// ...), defines and starts it, and waits until the guest works.
    pub fn start_domain(&self, name: &str, memory_mib: u64, workload: Workload, disks: usize) -> Domain {
        let domain = self.define_domain(name, memory_mib, workload, disks);
        self.ok(&["domain", "start", domain.config.to_str().unwrap()]);
        domain.wait_for_serial("DOMSNAP READY", Duration::from_secs(90));
        domain
    }

    /// The image domain's disk `id` uses now (its defined configuration: an overlay after an
    /// external snapshot or a revert).
    pub fn active_image(&self, domain: &Domain, id: &str) -> PathBuf {
        let path = self
            .state_dir()
            .join("domains")
            .join(&domain.name)
            .join("domain.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let config: toml::Value = toml::from_str(&text).unwrap();
        let disk = config["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"].as_str() == Some(id))
            .unwrap_or_else(|| panic!("no disk {id} in {text}"));
        PathBuf::from(disk["path"].as_str().unwrap())
    }

    /// Writes the configuration and creates the disks, without starting.
    pub fn define_domain(&self, name: &str, memory_mib: u64, workload: Workload, disks: usize) -> Domain {
        let guest = testkit::guest();
        let dir = self.dir.path().join(format!("{name}-files"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = format!(
            "name = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
             cmdline = \"console=ttyS0 quiet {}\"\n",
            guest.kernel.display(),
            guest.initrd.display(),
            workload.cmdline()
        );
        let mut images = Vec::new();
        for index in 0..disks {
            let id = testkit::disk_id(index);
            let image = dir.join(format!("{id}.qcow2"));
            testkit::create_qcow2(&image, "64M");
            config.push_str(&format!(
                "[[disks]]\nid = \"{id}\"\npath = \"{}\"\n",
                image.display()
            ));
            images.push(image);
        }
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        Domain {
            name: name.to_owned(),
            config: path,
            dir,
            images,
            serial_log: self.state_dir().join("domains").join(name).join("serial.log"),
            folder: self.state_dir().join("domains").join(name),
        }
    }

    /// Every file under the state directory and the domains' disk folders, relative paths
    /// sorted (to compare before/after).
    pub fn files(&self) -> Vec<String> {
        let mut found = Vec::new();
        let root = self.dir.path();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    found.push(path.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        found.sort();
        found
    }

    /// The files of snapshots, overlays and intents: what a snapshot leaves behind.
    pub fn snapshot_files(&self) -> Vec<String> {
        self.files()
            .into_iter()
            .filter(|f| {
                f.contains("/snapshots/")
                    || f.ends_with("intent.json")
                    || f.ends_with("overlays.json")
                    || (f.ends_with(".qcow2") && !f.ends_with("/vda.qcow2") && !f.ends_with("/vdb.qcow2"))
            })
            .collect()
    }
}

/// A domain started through the CLI.
pub struct Domain {
    pub name: String,
    pub config: PathBuf,
    pub dir: PathBuf,
    /// The disks' base images (vda, vdb, ...).
    pub images: Vec<PathBuf>,
    pub serial_log: PathBuf,
    /// The domain's folder in the state directory.
    pub folder: PathBuf,
}

impl Domain {
    /// The serial console's socket, in the active QEMU's run folder.
    pub fn console(&self) -> PathBuf {
        active_run_dir(&self.folder).join("console.sock")
    }

    /// The run folder of the domain's active QEMU.
    pub fn run_dir(&self) -> PathBuf {
        active_run_dir(&self.folder)
    }

    /// The first tick logged since `position` that does not follow `last_tick` one by one: after
    /// a revert, the reverted guest's first tick (the old guest's late ticks continue the
    /// sequence). `None` while there is none yet.
    pub fn first_jump_since(&self, position: usize, last_tick: u64) -> Option<u64> {
        let mut previous = last_tick;
        self.serial_since(position).iter().filter_map(tick).find(|t| {
            let jump = *t != previous + 1;
            previous = *t;
            jump
        })
    }

    fn raw_serial_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.serial_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn serial_lines(&self) -> Vec<SerialLine> {
        self.serial_since(0)
    }

    /// The number of lines in the serial log (a position to read new lines from).
    pub fn serial_position(&self) -> usize {
        self.raw_serial_lines().len()
    }

    /// The guest's lines logged after `position`.
    pub fn serial_since(&self, position: usize) -> Vec<SerialLine> {
        self.raw_serial_lines()
            .iter()
            .skip(position)
            .filter_map(|line| testkit::parse_serial_line(line))
            .collect()
    }

    pub fn wait_for_serial(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.serial_log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "{}: {needle:?} not on the serial console within {timeout:?}:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last tick the guest printed (since `position`).
    pub fn last_tick_since(&self, position: usize) -> Option<u64> {
        self.serial_since(position).iter().rev().find_map(tick)
    }

    /// Waits for a tick above `above` after `position`; returns it.
    pub fn wait_tick_above(&self, position: usize, above: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self
                .serial_since(position)
                .iter()
                .filter_map(tick)
                .find(|t| *t > above)
            {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no tick above {above} within {timeout:?}; serial since {position}: {:?}",
                self.name,
                self.serial_since(position)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The first tick printed after `position`, waiting for one.
    pub fn first_tick_since(&self, position: usize, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.serial_since(position).iter().find_map(tick) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no tick within {timeout:?}; serial since {position}: {:?}",
                self.name,
                self.serial_since(position)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a line to the guest's serial console.
    pub fn console_send(&self, line: &str) {
        let console = self.console();
        let mut stream = std::os::unix::net::UnixStream::connect(&console)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", console.display()));
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        // Give QEMU time to read it before the connection closes.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Asks the fingerprint guest to re-check its data; returns the sum it printed.
    pub fn fingerprint_check(&self) -> String {
        let position = self.serial_position();
        self.console_send("verify");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self
                .serial_since(position)
                .into_iter()
                .find_map(|line| match line {
                    SerialLine::FingerprintCheck(result) => Some(result),
                    _ => None,
                });
            match found {
                Some(Ok(sum)) => return format!("{sum:016x}"),
                Some(Err(error)) => panic!("{}: fingerprint check failed in the guest: {error}", self.name),
                None => {}
            }
            assert!(Instant::now() < deadline, "{}: no FP-CHECK line", self.name);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The fingerprint the guest printed at boot.
    pub fn fingerprint(&self) -> String {
        self.wait_for_serial("DOMSNAP FP ", Duration::from_secs(120));
        self.serial_lines()
            .into_iter()
            .find_map(|line| match line {
                SerialLine::Fingerprint { sum, .. } => Some(format!("{sum:016x}")),
                _ => None,
            })
            .unwrap()
    }

    /// What the domain's QEMU logged (its active run slot's log; empty when there is none).
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.run_dir().join("qemu.log")).unwrap_or_default()
    }

    /// The tick recorded in the disk marker of `image` (sector 0 as the guest sees it).
    pub fn disk_marker_tick(image: &Path) -> Option<u64> {
        read_disk_marker(image).and_then(|m| m.rsplit('=').next().and_then(|t| t.parse().ok()))
    }
}

pub fn tick(line: &SerialLine) -> Option<u64> {
    match line {
        SerialLine::Tick { n, .. } => Some(*n),
        _ => None,
    }
}

/// `qemu-img snapshot -l` of an image: the snapshot names.
pub fn internal_snapshots(image: &Path) -> Vec<String> {
    let out = testkit::run("qemu-img", &["snapshot", "-U", "-l", image.to_str().unwrap()]);
    out.lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// The guest's tick counter around a create: the last tick before it and after it. The snapshot
/// holds a value in between (for a background create, the value at its start).
/// Checks that the disk marker in `image` was written at the snapshot: its tick is within `ticks`.
pub fn assert_marker_within(image: &Path, ticks: &TicksAround) {
    let marker =
        Domain::disk_marker_tick(image).unwrap_or_else(|| panic!("no disk marker in {}", image.display()));
    assert!(
        ticks.before.saturating_sub(1) <= marker && marker <= ticks.after + 1,
        "disk marker tick {marker} of {} is not the snapshot's (between {} and {})",
        image.display(),
        ticks.before,
        ticks.after
    );
}

pub struct TicksAround {
    pub before: u64,
    pub after: u64,
    /// The serial log's length when the create returned.
    pub position: usize,
}

/// `snapshot create DOMAIN SNAPSHOT EXTRA...` with `--json`, timed by the guest's ticks.
pub fn create(
    cli: &Cli,
    domain: &Domain,
    snapshot: &str,
    extra: &[&str],
) -> (TicksAround, serde_json::Value) {
    let before = domain.last_tick_since(0).unwrap_or(0);
    let mut args = vec!["snapshot", "create", &domain.name, snapshot];
    args.extend_from_slice(extra);
    let report = cli.json(&args);
    let after = domain.last_tick_since(0).unwrap_or(0);
    let position = domain.serial_position();
    (
        TicksAround {
            before,
            after,
            position,
        },
        report,
    )
}

/// `snapshot revert DOMAIN SNAPSHOT EXTRA...` with `--json`: checks that the domain runs, that
/// memory was loaded as `--eager` in `extra` says (copied, else mapped from the image, without a
/// fallback) and that the guest goes on from the snapshot's tick: its first tick after the old
/// guest's last one breaks the old sequence and lies within `ticks`. The report.
pub fn revert_expecting(
    cli: &Cli,
    domain: &Domain,
    snapshot: &str,
    ticks: &TicksAround,
    extra: &[&str],
) -> serde_json::Value {
    let position = domain.serial_position();
    let last_tick = domain.last_tick_since(0).unwrap_or(0);
    let mut args = vec!["snapshot", "revert", &domain.name, snapshot];
    args.extend_from_slice(extra);
    let report = cli.json(&args);
    assert_eq!(report["state"], "running", "{report}");
    let expected = if extra.contains(&"--eager") {
        "copied"
    } else {
        "mapped"
    };
    assert_eq!(report["memory_load"], expected, "{report}");
    assert!(report["memory_fallback"].is_null(), "{report}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(first) = domain.first_jump_since(position, last_tick) {
            break first;
        }
        assert!(
            Instant::now() < deadline,
            "revert to {snapshot}: no tick of the reverted guest; QEMU log:\n{}",
            domain.qemu_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        ticks.before < first && first <= ticks.after + 2,
        "revert to {snapshot} {extra:?}: the counter went on at {first}; the snapshot was taken \
         between ticks {} and {}",
        ticks.before,
        ticks.after
    );
    assert_eq!(state(cli, domain), "running");
    report
}

/// The domain's state as `domain status` reports it.
pub fn state(cli: &Cli, domain: &Domain) -> String {
    cli.json(&["domain", "status", &domain.name])["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A folder that exists but cannot be written (a read-only bind mount of itself: even root
/// gets EROFS), so that a disk step fails after every check before the pause passed.
pub struct ReadOnlyDir {
    pub path: PathBuf,
}

impl ReadOnlyDir {
    pub fn new(parent: &Path) -> Self {
        let path = parent.join("read-only");
        std::fs::create_dir(&path).unwrap();
        let mount = |args: &[&str]| {
            let status = Command::new("mount").args(args).status().unwrap();
            assert!(status.success(), "mount {args:?} (needs root)");
        };
        let text = path.to_str().unwrap();
        mount(&["--bind", text, text]);
        mount(&["-o", "remount,bind,ro", text, text]);
        ReadOnlyDir { path }
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// Runs `domsnap ARGS` with the kill hook at `step` and checks that it died by SIGKILL, i.e.
/// that it reached the step (a command that failed or finished before it exits normally).
pub fn killed_at(cli: &Cli, args: &[&str], step: &str) {
    use std::os::unix::process::ExitStatusExt;
    let output = cli
        .command(args)
        .env("DOMSNAP_TEST_KILL_AT", step)
        .output()
        .expect("run domsnap");
    assert_eq!(
        output.status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32),
        "domsnap {args:?} with the kill hook at {step}: not killed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
