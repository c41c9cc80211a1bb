//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` for a while each.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{cmd, workspace_root};

/// Runs every fuzz target (or those in `only`) for `seconds` each, installing cargo-fuzz if it
/// is missing. Uses the nightly toolchain when rustup has one, else stable with
/// `RUSTC_BOOTSTRAP=1`. A target that finds a crash (or an input slower than 10 s, or one using
/// more than 2 GiB) fails the task after the others ran; its input is in `fuzz/artifacts/`.
pub fn run(seconds: u64, only: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    if cmd::probe(Command::new(&cargo).args(["fuzz", "--version"])).is_none() {
        cmd::run(Command::new(&cargo).args(["install", "cargo-fuzz"]), false)?;
    }
    let nightly = cmd::probe(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|list| list.lines().any(|l| l.starts_with("nightly")));
    let dir = workspace_root().join("fuzz");
    let fuzz = || {
        // `cargo +nightly` needs rustup's proxy: run `cargo` by name then, not $CARGO.
        let mut command = if nightly {
            let mut c = Command::new("cargo");
            c.arg("+nightly");
            c
        } else {
            let mut c = Command::new(&cargo);
            c.env("RUSTC_BOOTSTRAP", "1");
            c
        };
        command.current_dir(&dir).arg("fuzz");
        command
    };
    let listed = cmd::output(fuzz().arg("list"))?;
    let targets: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty() && (only.is_empty() || only.iter().any(|o| o == t)))
        .collect();
    if targets.is_empty() {
        bail!("no fuzz target matches {only:?}; `cargo fuzz list` gave:\n{listed}");
    }
    let mut failed = Vec::new();
    for target in &targets {
        let seeded = crate::fuzz_seeds::write(target, &dir.join("corpus").join(target))?;
        if seeded > 0 {
            eprintln!("xtask: fuzz target {target}: {seeded} seed inputs written to its corpus");
        }
        let mut run = fuzz();
        run.args(["run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-detect_leaks=0",
                "-print_final_stats=1",
            ])
            // See fuzz/README.md: LeakSanitizer reports std's per-thread state now and then.
            .env("ASAN_OPTIONS", "detect_leaks=0");
        if let Err(e) = cmd::run(&mut run, false) {
            eprintln!("xtask: fuzz target {target} failed: {e:#}");
            failed.push(*target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets with findings (inputs in fuzz/artifacts/): {failed:?}");
    }
    eprintln!(
        "xtask: {} fuzz targets ran {seconds} s each without findings",
        targets.len()
    );
    Ok(())
}
