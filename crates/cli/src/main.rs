//! `domsnap`: whole-domain snapshots of QEMU domains from the command line.
//!
//! Every command first finishes or undoes an operation a crash interrupted (`recover`), under
//! the domain's lock. `--json` prints one JSON document per command (with `"version"`, errors
//! too: `contract`); otherwise a short report, with progress on a terminal. Failures print a
//! one-line error and exit with their class's status.

mod contract;
mod disk_option;
mod generate;
mod output;
mod progress;
mod snapshots;

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use contract::{Flat, Keyed};
use disk_option::parse_disk;
use progress::Progress;
use qemu::{DomainConfig, QemuDriver, StopMode};
use snapshot_core::{
    Activity, CreateOptions, FsStore, LiveMethod, LiveOptions, MemoryMode, Name, Orchestrator, RevertOptions,
    SnapshotStore,
};

/// Whole-domain snapshots for QEMU domains: memory, device state and disks.
#[derive(Debug, Parser)]
#[command(name = "domsnap", version)]
struct Cli {
    /// State directory (default: $DOMSNAP_STATE_DIR, else /var/lib/domsnap for root,
    /// $XDG_STATE_HOME/domsnap otherwise).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print one JSON document and no progress.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Define, start, stop and inspect domains.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Create, list, delete and revert snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Finish or undo operations interrupted by a crash (on every domain, or on NAME)
    ///
    /// With --abandon, give up NAME's interrupted operation instead (when its recovery can never
    /// succeed): the intent record is dropped, and what the operation left behind is listed.
    Recover {
        /// The domain (default: every domain).
        name: Option<String>,
        /// Drop NAME's interrupted operation after listing what it leaves behind.
        #[arg(long, requires = "name")]
        abandon: bool,
    },
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: generate::Shell,
    },
    /// Print the man page (roff) to stdout, e.g. `domsnap man > /usr/local/share/man/man1/domsnap.1`.
    Man,
}

#[derive(Debug, Subcommand)]
enum DomainCommand {
    /// Define a domain from CONFIG.toml and start it, or start a defined domain NAME.
    Start {
        /// A configuration file (defines or redefines the domain) or a domain name.
        #[arg(value_name = "CONFIG.toml | NAME")]
        domain: String,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
    },
    /// Shut a domain down cleanly (ACPI power button), or end it at once with --force.
    Stop {
        /// The domain.
        name: String,
        /// QEMU quits at once (disk images are closed cleanly; the guest is not asked).
        #[arg(long)]
        force: bool,
        /// Seconds the guest may take to power off.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Pause a domain's vCPUs.
    Pause {
        /// The domain.
        name: String,
    },
    /// Resume a domain's vCPUs.
    Resume {
        /// The domain.
        name: String,
    },
    /// Thaw the guest's filesystems through its guest agent (after a paused revert to a
    /// quiesced snapshot, once the domain runs, or after an interrupted quiesced create).
    Thaw {
        /// The domain.
        name: String,
    },
    /// Every defined domain: name, state (running, paused, shut-off), pid.
    List,
    /// One domain's name, state and pid.
    Status {
        /// The domain.
        name: String,
    },
    /// Forget a shut-off domain's definition (refused while it has snapshots).
    Undefine {
        /// The domain.
        name: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LiveMode {
    Precopy,
    Background,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshot a domain: memory, device state and disks (disks only if it is shut off).
    Create(CreateArgs),
    /// A domain's snapshots (broken ones marked), all or those a filter keeps.
    List {
        /// The domain.
        name: String,
        /// Show parents and children as a tree (with --json: nested, each with its children).
        #[arg(long, conflicts_with = "filter")]
        tree: bool,
        #[command(flatten)]
        filter: snapshots::FilterArgs,
    },
    /// A domain's snapshots as a tree of parents and children (the same as `list --tree`).
    Tree {
        /// The domain.
        name: String,
    },
    /// Print the domain's current snapshot (the parent of its next one), or make SNAP current.
    Current {
        /// The domain.
        name: String,
        /// The snapshot to make current (it must exist).
        snap: Option<String>,
    },
    /// Re-read every disk's backing chain and internal snapshots and reconcile the records.
    ///
    /// A snapshot whose disk part is gone or changed outside domsnap (an internal snapshot
    /// deleted, an image removed or rebased) is marked broken with the reason, and a revert to it
    /// is refused; one whose parts are back is unmarked. Changes to the domain's chains made
    /// outside domsnap are reported and recorded. With SNAP, only that snapshot is reconciled.
    Rescan {
        /// The domain.
        name: String,
        /// Only this snapshot.
        snap: Option<String>,
    },
    /// One snapshot in detail.
    Show {
        /// The domain.
        name: String,
        /// The snapshot.
        snap: String,
    },
    /// Delete a snapshot: its memory and device state and its disk snapshots.
    Delete {
        /// The domain.
        name: String,
        /// The snapshot.
        snap: String,
        /// Delete its descendants too (otherwise they are re-parented to its parent).
        #[arg(long)]
        children: bool,
    },
    /// Revert a domain to a snapshot (running afterwards unless --paused).
    ///
    /// By default QEMU maps the snapshot's memory image copy-on-write: the guest runs at once and
    /// pages are read as it touches them; the image's pages are not checked (`snapshot verify`
    /// does that), only its header, page table and footer. Such a domain's RAM is private to
    /// QEMU. --eager copies the image into fresh shared RAM first, checking every page.
    Revert {
        /// The domain.
        name: String,
        /// The snapshot.
        snap: String,
        /// Leave the domain paused.
        #[arg(long)]
        paused: bool,
        /// Copy memory into fresh shared RAM (checking every page) instead of mapping the image.
        #[arg(long)]
        eager: bool,
    },
    /// Check that a snapshot's memory image and disk snapshots exist and are intact.
    Verify {
        /// The domain.
        name: String,
        /// The snapshot.
        snap: String,
    },
}

/// `snapshot create`'s arguments.
#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The domain.
    name: String,
    /// The new snapshot's name ([A-Za-z0-9_.-], up to 64).
    snap: String,
    /// Save memory while the guest runs, with a short pause (pre-copy unless --live-mode
    /// says).
    #[arg(long)]
    live: bool,
    /// precopy: QEMU copies memory in passes while the guest runs and stops it for the rest
    /// (the pause stays within --max-downtime whatever the RAM size; consistent at the end).
    /// background: QEMU's write-protect snapshot streamed into the image (pause about 30 ms;
    /// consistent at the start). Implies --live.
    #[arg(long, value_enum, value_name = "MODE")]
    live_mode: Option<LiveMode>,
    /// The longest final pause pre-copy aims at, in milliseconds (QEMU's downtime limit).
    #[arg(long, value_name = "MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    max_downtime: u64,
    /// How long pre-copy may run before the create gives up (rolled back; the guest runs
    /// on), in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    converge_within: u64,
    /// Per-disk snapshot kind (default: internal, named like the snapshot, for every disk).
    /// internal:NAME names the disk's internal snapshot; external's PATH defaults to
    /// IMAGE-STEM.SNAP.qcow2 beside the image, FORMAT to qcow2; no leaves the disk out.
    #[arg(long = "disk", value_name = disk_option::FORMS)]
    disks: Vec<String>,
    /// Disks only, even of a running domain: no memory, no pause (one atomic step for all
    /// disks); a revert leaves the domain shut off.
    #[arg(long, conflicts_with_all = ["live", "live_mode", "memory_path"])]
    disk_only: bool,
    /// Where the memory image goes (its folder must exist, the file must not); default: the
    /// snapshot's folder. The device state stays there.
    #[arg(long, value_name = "PATH")]
    memory_path: Option<PathBuf>,
    /// Freeze the guest's filesystems through its guest agent (guest_agent = true, and
    /// qemu-guest-agent in the guest) for the snapshot; they are thawed as soon as the guest
    /// runs again, failures included. A revert to the snapshot thaws the restored guest.
    #[arg(long)]
    quiesce: bool,
    /// Free text stored with the snapshot.
    #[arg(long)]
    description: Option<String>,
}

impl CreateArgs {
    /// The orchestrator's options for these arguments.
    fn options(self) -> Result<CreateOptions> {
        let method = match (self.live, self.live_mode) {
            (_, Some(LiveMode::Precopy)) => Some(LiveMethod::Precopy),
            (_, Some(LiveMode::Background)) => Some(LiveMethod::Background),
            (true, None) => Some(LiveMethod::Auto),
            (false, None) => None,
        };
        let memory = match method {
            _ if self.disk_only => MemoryMode::DisksOnly,
            Some(method) => MemoryMode::Live(LiveOptions {
                method,
                max_downtime: Duration::from_millis(self.max_downtime),
                converge_within: Duration::from_secs(self.converge_within),
            }),
            None => MemoryMode::Paused,
        };
        Ok(CreateOptions {
            memory,
            disks: self.disks.iter().map(|d| parse_disk(d)).collect::<Result<_>>()?,
            description: self.description,
            memory_path: self.memory_path.map(std::path::absolute).transpose()?,
            quiesce: self.quiesce,
        })
    }
}

fn main() {
    let cli = parse_args();
    let json = cli.json;
    if let Some(result) = print_generated(&cli.command) {
        if let Err(error) = result {
            fail(json, &error);
        }
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("DOMSNAP_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(error) = runtime.block_on(run(cli)) {
        fail(json, &error);
    }
}

/// The command line; a usage error is also a JSON document on stdout with `--json` (clap prints
/// its message and exits with status 2).
fn parse_args() -> Cli {
    Cli::try_parse().unwrap_or_else(|error| {
        if !error.use_stderr() {
            // --help, --version: not errors.
            error.exit()
        }
        if std::env::args_os().any(|arg| arg == "--json") {
            let rendered = error.to_string();
            let message = rendered.lines().next().unwrap_or_default();
            let message = message.strip_prefix("error: ").unwrap_or(message);
            println!("{}", contract::usage_document(message));
        }
        let _ = error.print();
        std::process::exit(contract::EXIT_USAGE)
    })
}

/// Prints the completions or the man page, for the commands that ask for them.
fn print_generated(command: &Command) -> Option<Result<()>> {
    let mut stdout = std::io::stdout().lock();
    match command {
        Command::Completions { shell } => {
            generate::completions(*shell, &mut Cli::command(), &mut stdout);
            Some(Ok(()))
        }
        Command::Man => Some(generate::man(Cli::command(), &mut stdout)),
        _ => None,
    }
}

/// Reports a failure (one line on stderr; with `--json` its document on stdout) and exits with
/// its class's status.
fn fail(json: bool, error: &anyhow::Error) -> ! {
    let chain: Vec<String> = error.chain().map(ToString::to_string).collect();
    let message = dedup_chain(&chain).join(": ");
    eprintln!("domsnap: error: {message}");
    if json {
        println!("{}", contract::error_document(error, message));
    }
    std::process::exit(contract::exit_code(contract::classify(error)));
}

/// Drops messages that repeat the one before them (wrappers that print their source).
fn dedup_chain(chain: &[String]) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for message in chain {
        if !kept.last().is_some_and(|last| last.contains(message.as_str())) {
            kept.push(message.clone());
        }
    }
    kept
}

/// The state directory: --state-dir, $DOMSNAP_STATE_DIR, /var/lib/domsnap for root,
/// $XDG_STATE_HOME/domsnap (or ~/.local/state/domsnap) otherwise.
fn state_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = flag.or_else(|| std::env::var_os("DOMSNAP_STATE_DIR").map(PathBuf::from)) {
        return Ok(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/domsnap"));
    }
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("domsnap"));
    }
    let home = std::env::var_os("HOME").context("cannot choose a state directory: HOME is not set")?;
    Ok(PathBuf::from(home).join(".local/state/domsnap"))
}

struct App {
    json: bool,
    driver: QemuDriver,
    store: Arc<FsStore>,
    orchestrator: Orchestrator,
}

async fn run(cli: Cli) -> Result<()> {
    let dir = state_dir(cli.state_dir)?;
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()?.join(dir)
    };
    let driver = QemuDriver::new(&dir);
    let store = Arc::new(FsStore::new(&dir));
    let progress = Arc::new(Progress::new(!cli.json && std::io::stderr().is_terminal()));
    let orchestrator = Orchestrator::new(Arc::new(driver.clone()), store.clone(), progress.clone());
    let app = App {
        json: cli.json,
        driver,
        store,
        orchestrator,
    };
    let result = match cli.command {
        Command::Domain(command) => app.domain(command).await,
        Command::Snapshot(command) => app.snapshot(command).await,
        Command::Recover { name: None, .. } => {
            let recovered = app.orchestrator.recover_all().await?;
            app.print(&Keyed::new("recovered", &recovered), || {
                output::recoveries(&recovered)
            })
        }
        Command::Recover {
            name: Some(domain),
            abandon,
        } => app.recover(&domain, abandon).await,
        // Printed by `main`, before the runtime starts.
        Command::Completions { .. } | Command::Man => Ok(()),
    };
    progress.finish();
    result
}

fn name(text: &str, what: &str) -> Result<Name> {
    Name::new(text).with_context(|| format!("bad {what} name"))
}

impl App {
    /// Prints `document` as JSON (a [`Flat`] or [`Keyed`] document: `"version"` and the
    /// command's keys), or the human text.
    fn print<T: serde::Serialize>(&self, document: &T, human: impl FnOnce() -> String) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(document)?);
        } else {
            print!("{}", human());
        }
        Ok(())
    }

    async fn domain(&self, command: DomainCommand) -> Result<()> {
        match command {
            DomainCommand::List => {
                // Read-only: never waits for a busy domain's lock, never runs recovery.
                let domains = self.driver.list().await?;
                let rows = domains
                    .iter()
                    .map(|status| self.row(status))
                    .collect::<Result<Vec<output::DomainRow>>>()?;
                self.print(&Keyed::new("domains", &rows), || output::domains(&rows))
            }
            DomainCommand::Start { domain, paused } => {
                let domain = if looks_like_file(&domain) {
                    let config = DomainConfig::load(Path::new(&domain))?;
                    self.orchestrator.recover(&config.name).await?;
                    self.orchestrator
                        .check_redefinition(&config.name, &self.driver.redefinition_targets(&config)?)
                        .await?;
                    self.driver.define(&config).await?;
                    config.name
                } else {
                    let domain = self.defined_domain(&domain)?;
                    self.orchestrator.recover(&domain).await?;
                    domain
                };
                // The driver takes the domain's lock for the start itself.
                self.driver.start(&domain, paused).await?;
                self.status(&domain).await
            }
            DomainCommand::Stop {
                name: domain,
                force,
                timeout,
            } => {
                let domain = self.defined_domain(&domain)?;
                self.orchestrator.recover(&domain).await?;
                let mode = if force {
                    StopMode::Force
                } else {
                    StopMode::Clean {
                        timeout: Duration::from_secs(timeout),
                    }
                };
                self.driver.stop(&domain, mode).await?;
                self.status(&domain).await
            }
            DomainCommand::Pause { name: ref domain } | DomainCommand::Resume { name: ref domain } => {
                let pause = matches!(command, DomainCommand::Pause { .. });
                let domain = self.defined_domain(domain)?;
                let lock = self.orchestrator.begin(&domain).await?;
                if pause {
                    self.driver.pause(&domain).await?;
                } else {
                    self.driver.resume(&domain).await?;
                }
                // Released first: the status would show this command holding the lock (busy).
                drop(lock);
                self.status(&domain).await
            }
            DomainCommand::Status { name: domain } => {
                let domain = self.defined_domain(&domain)?;
                self.status(&domain).await
            }
            DomainCommand::Thaw { name: domain } => {
                let domain = self.defined_domain(&domain)?;
                let _lock = self.orchestrator.begin(&domain).await?;
                let thawed = self.driver.thaw_filesystems(&domain).await?;
                let document = serde_json::json!({ "domain": domain, "thawed": thawed });
                self.print(&Flat::new(&document), || {
                    format!("domain {domain}: {thawed} filesystem(s) thawed\n")
                })
            }
            DomainCommand::Undefine { name: domain } => {
                let domain = self.defined_domain(&domain)?;
                self.orchestrator.undefine(&domain).await?;
                self.print(&Flat::new(&serde_json::json!({ "undefined": domain })), || {
                    format!("domain {domain} undefined\n")
                })
            }
        }
    }

    /// A defined domain's name: commands on unknown domains fail before they touch the state
    /// directory (taking a domain's lock would create its folder).
    fn defined_domain(&self, text: &str) -> Result<Name> {
        let domain = name(text, "domain")?;
        self.driver.definition(&domain)?;
        Ok(domain)
    }

    async fn status(&self, domain: &Name) -> Result<()> {
        let status = self.driver.status(domain).await?;
        let row = self.row(&status)?;
        self.print(&Flat::new(&row), || output::domains(std::slice::from_ref(&row)))
    }

    /// A domain's row: the driver's status and what domsnap is doing on it (never waiting).
    fn row(&self, status: &qemu::DomainStatus) -> Result<output::DomainRow> {
        let activity = self.orchestrator.activity(&status.name)?;
        Ok(output::DomainRow::new(status, activity))
    }

    /// Tells read-only commands' users when the snapshots they see are being changed.
    fn note_activity(&self, domain: &Name) -> Result<()> {
        let activity = self.orchestrator.activity(domain)?;
        if activity != Activity::Idle {
            eprintln!("note: domain {domain}: {}", output::activity_text(&activity));
        }
        Ok(())
    }

    async fn recover(&self, domain: &str, abandon: bool) -> Result<()> {
        let domain = self.defined_domain(domain)?;
        if abandon {
            let abandoned = self.orchestrator.abandon(&domain).await?;
            return self.print(&Keyed::new("abandoned", &abandoned), || {
                output::abandoned(&domain, abandoned.as_ref())
            });
        }
        let recovered: Vec<_> = self.orchestrator.recover(&domain).await?.into_iter().collect();
        self.print(&Keyed::new("recovered", &recovered), || {
            output::recoveries(&recovered)
        })
    }

    async fn snapshot(&self, command: SnapshotCommand) -> Result<()> {
        match command {
            SnapshotCommand::Create(args) => {
                let domain = self.defined_domain(&args.name)?;
                let snap = name(&args.snap, "snapshot")?;
                let report = self.orchestrator.create(&domain, &snap, args.options()?).await?;
                self.print(&Flat::new(&report), || output::created(&report))
            }
            SnapshotCommand::List {
                name: domain,
                tree,
                filter,
            } => {
                let domain = self.defined_domain(&domain)?;
                self.list(&domain, tree, filter.get()).await
            }
            SnapshotCommand::Tree { name: domain } => {
                let domain = self.defined_domain(&domain)?;
                self.list(&domain, true, snapshot_core::ListFilter::All).await
            }
            SnapshotCommand::Current { name: domain, snap } => {
                let domain = self.defined_domain(&domain)?;
                let snap = snap.map(|s| name(&s, "snapshot")).transpose()?;
                self.current(&domain, snap.as_ref()).await
            }
            SnapshotCommand::Rescan { name: domain, snap } => {
                let domain = self.defined_domain(&domain)?;
                let snap = snap.map(|s| name(&s, "snapshot")).transpose()?;
                let report = self.orchestrator.rescan(&domain, snap.as_ref()).await?;
                self.print(&Flat::new(&report), || output::rescanned(&report))
            }
            SnapshotCommand::Show { name: domain, snap } => {
                let (domain, snap) = (self.defined_domain(&domain)?, name(&snap, "snapshot")?);
                self.show(&domain, &snap)
            }
            SnapshotCommand::Delete {
                name: domain,
                snap,
                children,
            } => {
                let (domain, snap) = (self.defined_domain(&domain)?, name(&snap, "snapshot")?);
                let report = self.orchestrator.delete(&domain, &snap, children).await?;
                self.print(&Flat::new(&report), || output::deleted(&report))
            }
            SnapshotCommand::Revert {
                name: domain,
                snap,
                paused,
                eager,
            } => {
                let (domain, snap) = (self.defined_domain(&domain)?, name(&snap, "snapshot")?);
                let options = RevertOptions { paused, eager };
                let report = self.orchestrator.revert(&domain, &snap, options).await?;
                self.print(&Flat::new(&report), || output::reverted(&domain, &report))
            }
            SnapshotCommand::Verify { name: domain, snap } => {
                let (domain, snap) = (self.defined_domain(&domain)?, name(&snap, "snapshot")?);
                self.verify(&domain, &snap).await
            }
        }
    }

    /// `snapshot show`: the record, and whether it is the current snapshot.
    fn show(&self, domain: &Name, snap: &Name) -> Result<()> {
        self.note_activity(domain)?;
        let record = self.store.get(domain, snap)?;
        let current = self.store.current(domain)?;
        let files = self.store.files(domain, snap).of_record(&record);
        let document = output::ShowDocument::new(&record, current.as_ref());
        self.print(&Flat::new(&document), || {
            output::show(&record, current.as_ref(), &files)
        })
    }

    /// `snapshot verify`: a damaged snapshot is a failure listing its problems (with `--json`
    /// only the failure's document is printed: one document per command).
    async fn verify(&self, domain: &Name, snap: &Name) -> Result<()> {
        let report = self.orchestrator.verify(domain, snap).await?;
        if report.problems.is_empty() {
            return self.print(&Flat::new(&report), || output::verified(&report));
        }
        if !self.json {
            print!("{}", output::verified(&report));
        }
        bail!(
            "snapshot {snap} of domain {domain} is damaged: {}",
            report.problems.join("; ")
        )
    }
}

/// A `domain start` argument naming a file rather than a domain.
fn looks_like_file(argument: &str) -> bool {
    argument.ends_with(".toml") || argument.contains('/') || Path::new(argument).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_as_documented() {
        Cli::command_for_tests().debug_assert();
        let cli = Cli::try_parse_from([
            "domsnap",
            "--state-dir",
            "/s",
            "--json",
            "snapshot",
            "create",
            "d",
            "s",
            "--live",
            "--disk",
            "vda=internal",
            "--disk",
            "vdb=external:/o.qcow2:qcow2",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Snapshot(SnapshotCommand::Create(CreateArgs { live: true, .. }))
        ));
        let cli = Cli::try_parse_from([
            "domsnap",
            "snapshot",
            "create",
            "d",
            "s",
            "--live-mode",
            "background",
        ])
        .unwrap();
        let Command::Snapshot(SnapshotCommand::Create(args)) = cli.command else {
            panic!("not a create: {:?}", cli.command);
        };
        assert!(matches!(args.live_mode, Some(LiveMode::Background)));
        assert!(matches!(
            args.options().unwrap().memory,
            MemoryMode::Live(LiveOptions {
                method: LiveMethod::Background,
                ..
            })
        ));
        assert!(
            Cli::try_parse_from(["domsnap", "snapshot", "create", "d", "s", "--live-mode", "x"]).is_err()
        );
        let cli = Cli::try_parse_from(["domsnap", "snapshot", "revert", "d", "s", "--eager"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Snapshot(SnapshotCommand::Revert {
                eager: true,
                paused: false,
                ..
            })
        ));
    }

    #[test]
    fn list_filters_exclude_each_other_and_the_tree() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["domsnap", "snapshot"], args].concat());
        assert!(parse(&["list", "d", "--roots"]).is_ok());
        assert!(parse(&["list", "d", "--tree"]).is_ok());
        assert!(parse(&["list", "d", "--roots", "--leaves"]).is_err());
        assert!(parse(&["list", "d", "--current", "--tree"]).is_err());
        let cli = parse(&["list", "d", "--leaves"]).unwrap();
        let Command::Snapshot(SnapshotCommand::List { filter, .. }) = cli.command else {
            panic!("not a list")
        };
        assert_eq!(filter.get(), snapshot_core::ListFilter::Leaves);
        assert!(parse(&["current", "d", "s1"]).is_ok() && parse(&["rescan", "d"]).is_ok());
        assert!(parse(&["tree", "d"]).is_ok() && parse(&["tree", "d", "--roots"]).is_err());
    }

    #[test]
    fn error_chains_drop_repeated_messages() {
        let chain = vec!["a failed: b".to_owned(), "b".to_owned(), "c".to_owned()];
        assert_eq!(dedup_chain(&chain), vec!["a failed: b", "c"]);
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Cli as clap::CommandFactory>::command()
        }
    }
}
