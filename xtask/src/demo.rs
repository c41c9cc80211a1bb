//! `cargo xtask demo`: the whole story through the `domsnap` CLI (release build). Start a domain
//! whose guest keeps working, take a live snapshot while it works, let it change, revert, and
//! show that it went on from the snapshot — with the timings. On the Debian guest when it is
//! built (`demo_debian.rs`: its service answers over the network before and after the
//! revert), else on the tiny guest, whose workload rewrites memory.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use testkit::{SerialLine, Workload};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const TICK_TIMEOUT: Duration = Duration::from_secs(30);
const MEMORY_MIB: u64 = 512;

/// Runs the demo; the guest must have been built (`run_setup`).
pub fn run() -> Result<()> {
    let started = Instant::now();
    step("build domsnap (release)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::cmd::run(
        Command::new(cargo).current_dir(crate::workspace_root()).args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "domsnap",
        ]),
        false,
    )?;
    let binary = release_binary()?;

    let dir = tempfile::Builder::new().prefix("dsdemo").tempdir_in("/tmp")?;
    let demo = Demo {
        binary,
        state: dir.path().join("state"),
        serial_log: dir.path().join("state/domains/demo/serial.log"),
    };
    match testkit::DebianGuest::load(&testkit::debian_guest_dir()) {
        Ok(guest) => crate::demo_debian::run(&demo, dir.path(), &guest)?,
        Err(why) => {
            println!("(the Debian guest is not built: {why}; the demo runs on the tiny guest)");
            run_tiny(&demo, dir.path())?;
        }
    }
    println!("\ndemo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The story on the tiny guest: its serial console ticks, and it rewrites a working set.
fn run_tiny(demo: &Demo, dir: &Path) -> Result<()> {
    let config = write_config(dir)?;

    step(&format!(
        "start domain \"demo\": {MEMORY_MIB} MiB, a guest rewriting 20 MiB/s of a 64 MiB working set, \
         disks vda and vdb"
    ));
    demo.show(&["domain", "start", config.to_str().context("UTF-8 path")?])?;
    // QEMU runs daemonized: if a step fails, end it rather than leave it running.
    let mut running = Running {
        demo,
        domain: "demo",
        stopped: false,
    };
    demo.wait_serial("DOMSNAP READY")?;
    let tick = demo.wait_tick_above(1)?;
    println!("the guest works: tick {tick}");

    step("live snapshot while the guest works (vda: internal snapshot, vdb: external overlay)");
    let before = demo.last_tick();
    let report = demo.json(&[
        "snapshot",
        "create",
        "demo",
        "before",
        "--live",
        "--disk",
        "vdb=external",
        "--description",
        "taken by cargo xtask demo",
    ])?;
    let at_snapshot = demo.last_tick();
    print_created(&report);
    println!("the guest's counter was between {before} and {at_snapshot} when the snapshot was taken");

    step("let the guest change");
    let later = demo.wait_tick_above(at_snapshot + 5)?;
    println!("counter now {later}");
    demo.show(&["snapshot", "list", "demo"])?;
    demo.show(&["snapshot", "show", "demo", "before"])?;

    step("revert to the snapshot");
    let position = demo.serial_position();
    let old = demo.last_tick();
    let report = demo.json(&["snapshot", "revert", "demo", "before"])?;
    print_reverted(&report);
    let resumed_at = demo.first_reverted_tick(position, old)?;
    println!(
        "the guest went on at tick {resumed_at}: from the snapshot (taken at {before}..{at_snapshot}), \
         not from {later}"
    );
    ensure!(
        before < resumed_at && resumed_at <= at_snapshot + 2,
        "the guest did not continue from the snapshot"
    );

    step("check, delete, stop");
    demo.show(&["snapshot", "verify", "demo", "before"])?;
    demo.show(&["snapshot", "delete", "demo", "before"])?;
    demo.show(&["domain", "stop", "demo", "--force"])?;
    running.stopped = true;
    Ok(())
}

/// What a create report says about the pause, QEMU's downtime and the memory image.
pub(crate) fn print_created(report: &Value) {
    let pages = &report["memory_pages"];
    let streamed = &report["streamed"];
    println!(
        "created in {:.0} ms ({}, memory read from {}); guest paused {:.1} ms, QEMU's downtime {} \
         (the disk snapshots are taken inside it, while QEMU holds the guest before the switch-over)",
        report["total_ms"].as_f64().unwrap_or_default(),
        report["memory_mode"].as_str().unwrap_or("?"),
        match report["memory_read"].as_str() {
            Some("stream") => "QEMU's migration stream",
            Some("direct") => "the shared RAM",
            _ => "?",
        },
        report["guest_pause_ms"].as_f64().unwrap_or_default(),
        streamed["hypervisor_downtime_ms"]
            .as_f64()
            .map_or("not reported".to_owned(), |ms| format!("{ms:.0} ms"))
    );
    println!(
        "  {} passes over RAM while the guest ran, {:.1} MiB streamed; {} of {} pages stored (the rest are \
         zero)",
        streamed["passes"],
        streamed["stream_bytes"].as_f64().unwrap_or_default() / f64::from(1 << 20),
        pages[1],
        pages[0]
    );
}

/// What a revert report says about its time and how memory came back.
pub(crate) fn print_reverted(report: &Value) {
    println!(
        "reverted in {:.0} ms: {}; the domain is {}",
        report["total_ms"].as_f64().unwrap_or_default(),
        match report["memory_load"].as_str() {
            Some("mapped") =>
                "QEMU maps the snapshot's memory image copy-on-write, nothing copied".to_owned(),
            Some(load) => format!(
                "memory {load} ({:.0} ms)",
                report["memory_ms"].as_f64().unwrap_or_default()
            ),
            None => format!(
                "memory copied into the new QEMU's RAM ({:.0} ms)",
                report["memory_ms"].as_f64().unwrap_or_default()
            ),
        },
        report["state"].as_str().unwrap_or("?")
    );
    if let Some(downtime) = report["downtime_ms"].as_f64() {
        match report["standby_unavailable"].as_str() {
            None => println!(
                "the new QEMU started beside the old one: the domain had no guest for {downtime:.0} ms"
            ),
            Some(reason) => println!(
                "the new QEMU started after the old one ended ({reason}): the domain had no guest \
                 for {downtime:.0} ms"
            ),
        }
    }
}

pub(crate) fn step(text: &str) {
    println!("\n== {text}");
}

fn release_binary() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"));
    let binary = target.join("release/domsnap");
    ensure!(binary.exists(), "{} was not built", binary.display());
    Ok(binary)
}

fn write_config(dir: &Path) -> Result<PathBuf> {
    let guest = testkit::guest();
    let workload = Workload::Dirty {
        rate_mib: 20,
        wss_mib: 64,
    };
    let mut config = format!(
        "name = \"demo\"\nmemory_mib = {MEMORY_MIB}\nvcpus = 1\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
         cmdline = \"console=ttyS0 quiet {}\"\n",
        guest.kernel.display(),
        guest.initrd.display(),
        workload.cmdline()
    );
    for id in ["vda", "vdb"] {
        let image = dir.join(format!("{id}.qcow2"));
        testkit::create_qcow2(&image, "64M");
        config.push_str(&format!(
            "[[disks]]\nid = \"{id}\"\npath = \"{}\"\n",
            image.display()
        ));
    }
    let path = dir.join("demo.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// Stops the demo's domain when the demo ends early.
pub(crate) struct Running<'d> {
    pub(crate) demo: &'d Demo,
    pub(crate) domain: &'static str,
    pub(crate) stopped: bool,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self
                .demo
                .command(&["domain", "stop", self.domain, "--force"])
                .output();
        }
    }
}

/// The release `domsnap` on the demo's state directory.
pub(crate) struct Demo {
    binary: PathBuf,
    state: PathBuf,
    serial_log: PathBuf,
}

impl Demo {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--state-dir").arg(&self.state).args(args);
        command
    }

    /// Runs a command and shows it with its output.
    pub(crate) fn show(&self, args: &[&str]) -> Result<()> {
        println!("$ domsnap {}", args.join(" "));
        let output = self.command(args).output()?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        if !output.status.success() {
            bail!(
                "domsnap {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Runs a command with --json (shown without it) and returns its document.
    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        println!("$ domsnap {}", args.join(" "));
        self.quiet_json(args)
    }

    /// Runs a command with --json, not shown, and returns its document.
    pub(crate) fn quiet_json(&self, args: &[&str]) -> Result<Value> {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        let output = self.command(&with_json).output()?;
        if !output.status.success() {
            bail!(
                "domsnap {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    fn serial(&self) -> Vec<String> {
        std::fs::read_to_string(&self.serial_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn serial_position(&self) -> usize {
        self.serial().len()
    }

    fn ticks_since(&self, position: usize) -> Vec<u64> {
        self.serial()
            .iter()
            .skip(position)
            .filter_map(|line| match testkit::parse_serial_line(line) {
                Some(SerialLine::Tick { n, .. }) => Some(n),
                _ => None,
            })
            .collect()
    }

    fn last_tick(&self) -> u64 {
        self.ticks_since(0).last().copied().unwrap_or(0)
    }

    fn wait_serial(&self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(line) = self.serial().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            ensure!(Instant::now() < deadline, "the guest did not print {needle:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_tick_above(&self, above: u64) -> Result<u64> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(tick) = self.ticks_since(0).into_iter().find(|t| *t > above) {
                return Ok(tick);
            }
            ensure!(Instant::now() < deadline, "the guest did not count past {above}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The reverted guest's first tick: the first after `position` that breaks the old guest's
    /// sequence (which went on from `old`).
    fn first_reverted_tick(&self, position: usize, old: u64) -> Result<u64> {
        let deadline = Instant::now() + TICK_TIMEOUT;
        loop {
            let mut previous = old;
            let jump = self.ticks_since(position).into_iter().find(|t| {
                let jump = *t != previous + 1;
                previous = *t;
                jump
            });
            if let Some(tick) = jump {
                return Ok(tick);
            }
            ensure!(Instant::now() < deadline, "the reverted guest printed no tick");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
