//! `cargo xtask`: domsnap's developer tasks.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use xtask::{cmd, demo, guest, run_setup, run_setup_with, workspace_root};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "domsnap developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install QEMU 10 if needed and build the test guests (idempotent)
    ///
    /// QEMU comes from bookworm-backports, cc and valgrind (the C API test) from Debian; the guests
    /// are built into $DOMSNAP_GUEST_DIR (default ~/.cache/domsnap/guest): the tiny guest (kernel +
    /// busybox initramfs) and, in debian/, a Debian 12 system (debootstrap; a few minutes the first
    /// time). Each is rebuilt only when its inputs changed.
    Setup {
        /// Rebuild the tiny guest even if it is up to date.
        #[arg(long)]
        force: bool,
        /// Rebuild the Debian guest even if it is up to date (takes newer Debian packages).
        #[arg(long)]
        force_debian: bool,
    },
    /// Run the checks (fmt, clippy, doc), `setup`, then `cargo test --workspace` with
    /// DOMSNAP_GUEST_DIR exported
    ///
    /// The checks, in order, each stopping the task when it fails: `cargo fmt --all --check`,
    /// `cargo clippy --workspace --all-targets --all-features -- -D warnings` and
    /// `cargo doc --workspace --no-deps` with RUSTDOCFLAGS=-D warnings.
    ///
    /// Arguments after `--` go to cargo test (e.g. `cargo xtask test -- -p qmp -- --nocapture`;
    /// `--workspace` is left out when they select packages with -p/--package).
    Test {
        /// Arguments for `cargo test`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Run the benchmarks with their same-run baselines: the criterion benches (memory engine, qcow2
    /// snapshots), then the whole-domain benchmark (domsnap vs QEMU's snapshot and migration commands)
    ///
    /// Arguments after `--` go to every bench binary (e.g. `cargo xtask bench -- --sample-size 10`,
    /// `cargo xtask bench --only domain -- --reps 3`). Reports: docs/memory-performance.md,
    /// docs/qcow2-snapshots.md and docs/benchmarks.md.
    Bench {
        /// Run only these benchmarks (repeatable).
        #[arg(long, value_enum)]
        only: Vec<BenchName>,
        /// Arguments for the bench binaries.
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Boot the test guest and drive it over QMP: status, pause/resume, device-state save, quit
    Demo,
    /// Run every cargo-fuzz target in fuzz/ for a while each (installs cargo-fuzz if needed)
    ///
    /// Uses the nightly toolchain if rustup has one (else stable with RUSTC_BOOTSTRAP=1). Crashing
    /// inputs are kept in fuzz/artifacts/<target>/; the task fails if any target found one.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Run only these targets (repeatable).
        #[arg(long)]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { force, force_debian } => run_setup_with(force, force_debian).map(|_| ExitCode::SUCCESS),
        Task::Test { cargo_args } => test(&cargo_args).map(|()| ExitCode::SUCCESS),
        Task::Bench { only, bench_args } => bench(&only, &bench_args).map(|()| ExitCode::SUCCESS),
        Task::Fuzz { time, only } => xtask::fuzz::run(time, &only).map(|()| ExitCode::SUCCESS),
        Task::Demo => run_setup(false)
            .and_then(|_| demo::run())
            .map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e:#}");
        ExitCode::FAILURE
    })
}

fn selects_packages(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--package" || a.starts_with("--package=") || a.starts_with("-p"))
}

/// One check `cargo xtask test` runs before the tests: its name, cargo's arguments and extra
/// environment.
#[derive(Debug)]
struct Check {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// The checks, in the order they run. `--all-features` covers the whole workspace: only `disk`
/// has features (`live`, `mock`), and they build together.
const CHECKS: &[Check] = &[
    Check {
        name: "format",
        args: &["fmt", "--all", "--check"],
        env: &[],
    },
    Check {
        name: "clippy",
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ],
        env: &[],
    },
    Check {
        name: "doc",
        args: &["doc", "--workspace", "--no-deps"],
        env: &[("RUSTDOCFLAGS", "-D warnings")],
    },
];

/// Runs every check in [`CHECKS`]; the first that fails stops with an error naming it.
fn run_checks(cargo: &std::ffi::OsStr) -> Result<()> {
    for check in CHECKS {
        let mut command = Command::new(cargo);
        command
            .current_dir(workspace_root())
            .args(check.args)
            .envs(check.env.iter().copied());
        let line = cmd::display(&command);
        eprintln!("$ {line}");
        let status = command
            .status()
            .with_context(|| format!("check `{}`: cannot run `{line}`", check.name))?;
        if !status.success() {
            bail!(
                "check `{}` failed ({status}): `{line}`; its output is above",
                check.name
            );
        }
    }
    Ok(())
}

fn test(cargo_args: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    report_build_space();
    run_checks(&cargo)?;
    let report = run_setup(false)?;
    let mut test = Command::new(cargo);
    test.current_dir(workspace_root())
        .env(guest::GUEST_DIR_ENV, &report.guest_dir)
        .arg("test")
        // Every failing test is reported, not only those of the first failing test binary.
        .arg("--no-fail-fast");
    if !selects_packages(cargo_args) {
        test.arg("--workspace");
    }
    test.args(cargo_args);
    run_counting_tests(&mut test)
}

/// Free space a clean `cargo xtask test` wants in the target folder, with a margin: measured, its
/// target folder grew to 6.7 GiB with cargo's defaults (2.2 GiB with the settings `.ci/run`
/// exports).
const TEST_BUILD_SPACE: u64 = 8 << 30;

/// Prints the free space where the build goes, and a warning when it is short of
/// [`TEST_BUILD_SPACE`]: a disk that fills while a test binary links shows up only as the linker
/// killed by SIGBUS, which names nothing.
fn report_build_space() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    // Before the first build there is no target folder; the workspace holds it.
    let probe = if target.exists() {
        target.clone()
    } else {
        workspace_root()
    };
    match nix::sys::statvfs::statvfs(&probe) {
        Ok(stats) => {
            let free = stats.blocks_available().saturating_mul(stats.fragment_size());
            println!("test: {} MiB free for {}", free >> 20, target.display());
            if free < TEST_BUILD_SPACE {
                eprintln!(
                    "test: warning: a clean build wants about {} MiB there; if a linker dies of \
                     SIGBUS (`signal 7`), the disk is full",
                    TEST_BUILD_SPACE >> 20
                );
            }
        }
        Err(e) => eprintln!("test: cannot tell the free space at {}: {e}", probe.display()),
    }
}

/// A benchmark `cargo xtask bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchName {
    /// The memory engine (criterion).
    Memory,
    /// qcow2 snapshots (criterion).
    Disk,
    /// domsnap vs QEMU's own snapshot and migration on a 1 GiB guest (a program, not criterion).
    Domain,
}

/// Every benchmark in the order they run: (name, package, bench target).
const BENCHES: &[(BenchName, &str, &str)] = &[
    (BenchName::Memory, "memory", "memory"),
    (BenchName::Disk, "disk", "snapshots"),
    (BenchName::Domain, "integration", "domain"),
];

/// The benchmarks `only` selects (all when it is empty), in their running order.
fn selected_benches(
    only: &[BenchName],
) -> impl Iterator<Item = &'static (BenchName, &'static str, &'static str)> + '_ {
    BENCHES
        .iter()
        .filter(move |(name, _, _)| only.is_empty() || only.contains(name))
}

fn bench(only: &[BenchName], bench_args: &[String]) -> Result<()> {
    let report = run_setup(false)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for (_, package, target) in selected_benches(only) {
        let mut bench = Command::new(&cargo);
        bench
            .current_dir(workspace_root())
            // The domain benchmark boots the test guest through testkit.
            .env(guest::GUEST_DIR_ENV, &report.guest_dir)
            .args(["bench", "-p", package, "--bench", target, "--"])
            .args(bench_args);
        let line = cmd::display(&bench);
        eprintln!("$ {line}");
        let status = bench.status().with_context(|| format!("cannot run `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one line adding up every test binary's
/// `test result:` line, so the suite's outcome is stated once, at the end.
fn run_counting_tests(test: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let line = cmd::display(test);
    eprintln!("$ {line}");
    let mut child = test
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let mut totals = TestTotals::default();
    for text in BufReader::new(stdout).lines() {
        let text = text.context("reading cargo test's output")?;
        println!("{text}");
        totals.add(&text);
    }
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("`{line}` failed ({status}); its output is above");
    }
    Ok(())
}

/// Sums of libtest's `test result: ok. N passed; N failed; N ignored; ...` lines.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(result) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in result.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(count), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn checks_run_in_order_with_warnings_denied() {
        let names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
        assert_eq!(names, ["format", "clippy", "doc"]);
        assert!(CHECKS[1].args.ends_with(&["-D", "warnings"]));
        assert_eq!(CHECKS[2].env, [("RUSTDOCFLAGS", "-D warnings")]);
    }

    #[test]
    fn test_results_add_up() {
        let mut totals = TestTotals::default();
        totals.add(
            "test result: ok. 16 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.42s",
        );
        totals.add("test result: FAILED. 7 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.93s");
        totals.add("test foo ... ok");
        assert_eq!(
            totals,
            TestTotals {
                passed: 23,
                failed: 2,
                ignored: 2
            }
        );
    }

    #[test]
    fn test_args_pass_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "-p", "qmp", "--", "--nocapture"]).unwrap();
        let Task::Test { cargo_args } = cli.task else {
            panic!("not test")
        };
        assert_eq!(cargo_args, ["-p", "qmp", "--", "--nocapture"]);
        assert!(selects_packages(&cargo_args));
        assert!(!selects_packages(&["--".into(), "-p".into()]));
        assert!(!selects_packages(&["--release".into()]));
        let cli = Cli::try_parse_from(["xtask", "bench", "--only", "domain", "--", "--reps", "3"]).unwrap();
        let Task::Bench { only, bench_args } = cli.task else {
            panic!("not bench")
        };
        assert_eq!(bench_args, ["--reps", "3"]);
        let targets: Vec<&str> = selected_benches(&only).map(|(_, _, target)| *target).collect();
        assert_eq!(targets, ["domain"]);
        assert_eq!(selected_benches(&[]).count(), BENCHES.len());
        let cli = Cli::try_parse_from(["xtask", "setup", "--force"]).unwrap();
        assert!(matches!(
            cli.task,
            Task::Setup {
                force: true,
                force_debian: false
            }
        ));
        let cli = Cli::try_parse_from(["xtask", "setup", "--force-debian"]).unwrap();
        assert!(matches!(
            cli.task,
            Task::Setup {
                force: false,
                force_debian: true
            }
        ));
    }
}
