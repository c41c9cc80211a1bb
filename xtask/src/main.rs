//! `cargo xtask`: domsnap's developer tasks.

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{cmd, demo, guest, run_setup, workspace_root};

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
    /// Install QEMU 10 if needed and build the test guest (idempotent)
    ///
    /// QEMU comes from bookworm-backports; the guest is built into $DOMSNAP_GUEST_DIR
    /// (default ~/.cache/domsnap/guest) and rebuilt only when its inputs changed.
    Setup {
        /// Rebuild the guest even if it is up to date.
        #[arg(long)]
        force: bool,
    },
    /// Run `setup`, then `cargo test --workspace` with DOMSNAP_GUEST_DIR exported
    ///
    /// Arguments after `--` go to cargo test (e.g. `cargo xtask test -- -p qmp -- --nocapture`;
    /// `--workspace` is left out when they select packages with -p/--package).
    Test {
        /// Arguments for `cargo test`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Boot the test guest and drive it over QMP: status, pause/resume, device-state save, quit
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { force } => run_setup(force).map(|_| ExitCode::SUCCESS),
        Task::Test { cargo_args } => test(&cargo_args).map(|()| ExitCode::SUCCESS),
        Task::Demo => run_setup(false).and_then(|_| demo::run()).map(|()| ExitCode::SUCCESS),
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

fn test(cargo_args: &[String]) -> Result<()> {
    let report = run_setup(false)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut test = Command::new(cargo);
    test.current_dir(workspace_root())
        .env(guest::GUEST_DIR_ENV, &report.guest_dir)
        .arg("test");
    if !selects_packages(cargo_args) {
        test.arg("--workspace");
    }
    test.args(cargo_args);
    cmd::run_inherit(&mut test)
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
    fn test_args_pass_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "-p", "qmp", "--", "--nocapture"]).unwrap();
        let Task::Test { cargo_args } = cli.task else {
            panic!("not test")
        };
        assert_eq!(cargo_args, ["-p", "qmp", "--", "--nocapture"]);
        assert!(selects_packages(&cargo_args));
        assert!(!selects_packages(&["--".into(), "-p".into()]));
        assert!(!selects_packages(&["--release".into()]));
        let cli = Cli::try_parse_from(["xtask", "setup", "--force"]).unwrap();
        assert!(matches!(cli.task, Task::Setup { force: true }));
    }
}
