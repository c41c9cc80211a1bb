//! Memory snapshots through QEMU's own migration stream, written into a socket this process reads
//! and parsed as it arrives into the toolstack's memory image and a device-state file. Three
//! modes ([`StreamMode`]):
//! - **paused**: the caller stops the guest, QEMU streams, the caller resumes it at the end;
//! - **pre-copy**: QEMU copies RAM in passes while the guest runs, tracking dirty pages exactly,
//!   and with `pause-before-switchover` stops the guest for the rest and waits (`pre-switchover`)
//!   so that the caller snapshots the disks at that instant; `migrate-continue` sends the rest.
//!   The pause holds QEMU's last pass (bounded by its `downtime-limit`), the disks and the
//!   device state, whatever the RAM size; the guest is resumed here as soon as QEMU completed.
//!   While QEMU copies, the disks are written back every 100 ms (`write_back`): QEMU's stop
//!   flushes them with the guest stopped;
//! - **background**: QEMU's `background-snapshot` write-protects RAM, saves the device state and
//!   streams RAM while the guest runs on (consistent at its start).

#[cfg(test)]
mod fake_qmp;
mod outputs;
mod settings;
#[cfg(test)]
mod tests;

use std::{
    os::unix::net::UnixStream,
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use memory::{Durability, ImageLayout, ImportStats, PAGE_SIZE};
use qmp::{
    commands::{Cont, MigrateCancel, MigrateContinue, MigrationInfo, QueryMigrate, QueryStatus},
    Client, Event, EventStream, MigrationStatus, RunState,
};
use snapshot_core::{CaptureSignals, StreamMode};
use tokio::sync::oneshot;

pub use settings::expected_blocks;

use crate::{
    error::{Error, Result},
    migration_stream::StreamStats,
};
use outputs::{FirstPage, Outputs, Parser};
use settings::{check_layout, check_migration_idle, check_settings, populate_ram};

/// The name the stream's socket is filed under in QEMU (`getfd`, `migrate fd:NAME`).
const FD_NAME: &str = "domsnap-stream";
/// How often QEMU's migration state is looked at when no `MIGRATION` event came (events wake the
/// wait at once).
const POLL: Duration = Duration::from_millis(50);
/// Longest wait for the end of the stream once QEMU reports the migration completed (it closes the
/// socket right after), or for QEMU to end a cancelled migration.
const END_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket send buffer asked for QEMU's end (the kernel caps it at `net.core.wmem_max`): QEMU can run
/// ahead of the reader by this much.
const SOCKET_BUFFER: usize = 4 << 20;
/// How QEMU refuses `cont` while its migration thread finishes a completed migration.
const NOT_FINALIZED: &str = "Migration is not finalized yet";
/// The wait before `cont` is tried again after that refusal.
const CONT_RETRY: Duration = Duration::from_millis(1);

/// What a streamed snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStats {
    /// How long QEMU stopped the guest, as it reports (its `downtime`). For a background snapshot:
    /// to save the device state and write-protect RAM at the start; for pre-copy: from its stop
    /// to the completion, the caller's disk snapshots at `pre-switchover` included.
    pub downtime: Duration,
    /// Wall time of the whole call, from the first check to both files in place.
    pub total_time: Duration,
    /// QEMU's own `total-time` of the migration.
    pub qemu_total_time: Duration,
    /// Passes over guest RAM (QEMU's dirty-bitmap syncs).
    pub passes: u64,
    /// What the stream held.
    pub stream: StreamStats,
    /// What the memory image holds.
    pub image: ImportStats,
}

/// Takes a memory snapshot of the QEMU behind `client` in `mode`: guest RAM goes into a memory
/// image at `image` (its `layout` must be that of the domain's RAM, e.g. [`ImageLayout::of`] the
/// mapped RAM file) and the device state into `device_state`, a file `migrate-incoming` loads on
/// a QEMU started with `-incoming defer` once its RAM holds the image.
///
/// `signals` places the snapshot's instant. `prepared` fires once the checks are done and the
/// files exist (pre-copy: once QEMU has also copied RAM and stopped the guest before the
/// switch-over); QEMU captures when `capture` arrives (dropped instead, the snapshot gives up,
/// leaving nothing behind, and a pre-copy's guest runs again); `captured` fires once the state is
/// fixed and the caller may resume the guest: at the first RAM page of a background snapshot
/// (the parser then rests until QEMU says the guest runs, so that the resume has the CPU),
/// when QEMU completes otherwise. A pre-copy resumes the guest QEMU stopped itself (if it ran
/// when the snapshot started) before it fires `captured`: the pause ends as soon as QEMU allows.
/// `captured` is dropped unsent if the snapshot fails before (then a pre-copy's guest may still
/// be stopped: the caller resumes it).
///
/// A pre-copy that does not reach its switch-over within its `converge_within` is cancelled
/// ([`Error::NotConverged`]). A background snapshot needs RAM QEMU can write-protect (a shared file
/// on tmpfs or hugetlbfs). No other migration may run, and no capability that changes the stream
/// may be on; the settings a snapshot changes (its capabilities, events, bandwidth and downtime
/// limits) are put back afterwards. Both files are written under temporary names and appear
/// (fsynced per `durability`) only when everything succeeded; on any error neither exists and the
/// migration is cancelled. Do not drop the returned future before it completes: the settings
/// would stay changed.
pub async fn stream_snapshot(
    client: &Client,
    layout: ImageLayout,
    image: &Path,
    device_state: &Path,
    durability: Durability,
    mode: StreamMode,
    signals: CaptureSignals,
) -> Result<SnapshotStats> {
    let started = Instant::now();
    check_migration_idle(client).await?;
    let settings = check_settings(client).await?;
    check_layout(client, &layout).await?;
    let expected = expected_blocks(client, layout.total_pages() * PAGE_SIZE as u64).await?;
    if mode == StreamMode::Background {
        populate_ram(client).await;
    }
    let outputs = Outputs::create(image, device_state, layout, durability)?;
    let (reader, writer) = UnixStream::pair().map_err(|source| Error::StreamSocket { source })?;
    // Best effort: a larger buffer lets QEMU run further ahead of the reader.
    let _ = nix::sys::socket::setsockopt(&writer, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER);
    let CaptureSignals {
        prepared,
        capture,
        captured,
    } = signals;
    let (at_first_page, at_completion, resumed) = capture_points(mode, captured);
    let mut parser = Parser::spawn(reader, expected, outputs, at_first_page)?;
    let mut migration = Migration {
        client,
        events: client.subscribe(),
        parser: &mut parser,
        parsed: None,
        resumed,
    };
    let handshake = Handshake {
        prepared,
        capture,
        captured: at_completion,
    };
    let outcome = match settings.apply(client, mode).await {
        Ok(()) => migration.run(writer, mode, handshake).await,
        Err(error) => Err(error),
    };
    let restored = settings.restore(client, mode).await;
    let (info, stream, outputs) = match outcome.and_then(|done| restored.map(|()| done)) {
        Ok(done) => done,
        Err(error) => {
            parser.abort().await;
            return Err(error);
        }
    };
    let image_stats = seal_complete(outputs).await?;
    Ok(SnapshotStats {
        downtime: Duration::from_millis(info.downtime.unwrap_or_default()),
        total_time: started.elapsed(),
        qemu_total_time: Duration::from_millis(info.total_time.unwrap_or_default()),
        passes: info.ram.as_ref().map_or(1, |ram| ram.dirty_sync_count.max(1)),
        stream,
        image: image_stats,
    })
}

/// Where the capture is announced. A background snapshot's state is fixed when QEMU sends RAM: the
/// parser announces it at the first page, then rests until the migration passes on the guest's
/// resume through the returned sender. The others' state is fixed when QEMU is done: the migration
/// announces it at completion.
fn capture_points(
    mode: StreamMode,
    captured: oneshot::Sender<()>,
) -> (
    Option<FirstPage>,
    Option<oneshot::Sender<()>>,
    Option<mpsc::SyncSender<()>>,
) {
    match mode {
        StreamMode::Background => {
            let (resumed, rest) = mpsc::sync_channel(1);
            let first_page = FirstPage {
                captured,
                resumed: rest,
            };
            (Some(first_page), None, Some(resumed))
        }
        StreamMode::Paused | StreamMode::Precopy { .. } => (None, Some(captured), None),
    }
}

/// Seals the image and the device state once the stream gave every page.
async fn seal_complete(outputs: Outputs) -> Result<ImportStats> {
    let image_stats = outputs.import.stats();
    if image_stats.pages_missing > 0 {
        return Err(Error::StreamIncomplete {
            missing: image_stats.pages_missing,
        });
    }
    let sealing = Instant::now();
    let image_stats = outputs.seal().await?;
    tracing::debug!(
        elapsed_ms = sealing.elapsed().as_secs_f64() * 1e3,
        "memory image and device state sealed"
    );
    Ok(image_stats)
}

/// The caller's side of the capture (see [`stream_snapshot`]).
struct Handshake {
    prepared: oneshot::Sender<()>,
    capture: oneshot::Receiver<()>,
    /// Fired at completion; `None` when the parser fires it.
    captured: Option<oneshot::Sender<()>>,
}

/// A migration in progress: QEMU's side through `client` and its events, ours in the parser.
struct Migration<'a> {
    client: &'a Client,
    events: EventStream,
    parser: &'a mut Parser,
    /// The parser's outcome, once the stream ended.
    parsed: Option<(StreamStats, Outputs)>,
    /// Tells the parser, resting since a background snapshot's capture ([`FirstPage`]), that the
    /// guest runs again (QEMU's `RESUME`); dropped when it will not be seen.
    resumed: Option<mpsc::SyncSender<()>>,
}

impl Migration<'_> {
    /// Passes `writer` to QEMU and runs the migration into it; returns QEMU's final report and
    /// the parser's outputs once both QEMU and the parser are done. On error the migration is
    /// cancelled.
    async fn run(
        &mut self,
        writer: UnixStream,
        mode: StreamMode,
        handshake: Handshake,
    ) -> Result<(MigrationInfo, StreamStats, Outputs)> {
        let passed = self
            .client
            .getfd(FD_NAME, std::os::fd::AsFd::as_fd(&writer))
            .await
            .map_err(qmp("passing the stream socket to QEMU"));
        // QEMU has its own copy: the stream ends (EOF) when QEMU closes it.
        drop(writer);
        passed?;
        match self.steps(mode, handshake).await {
            Ok(done) => Ok(done),
            Err(error) => {
                self.cancel().await;
                Err(error)
            }
        }
    }

    async fn steps(
        &mut self,
        mode: StreamMode,
        handshake: Handshake,
    ) -> Result<(MigrationInfo, StreamStats, Outputs)> {
        let Handshake {
            prepared,
            capture,
            captured,
        } = handshake;
        if mode == StreamMode::Background && !self.guest_running().await? {
            // A guest paused before the snapshot stays paused: the parser does not rest.
            self.resumed = None;
        }
        // Whether the stop before the switch-over is ours to end: QEMU stops a running guest only.
        let mut resume = false;
        if let StreamMode::Precopy { converge_within, .. } = mode {
            // Everything up to QEMU's stop happens while the guest runs.
            resume = self.guest_running().await?;
            self.start().await?;
            let deadline = Instant::now() + converge_within;
            let client = self.client;
            // QEMU's stop before the switch-over flushes the disks: only what the guest wrote
            // in the last interval is left for it.
            tokio::select! {
                reached = self.wait_for(MigrationStatus::PreSwitchover, Some((deadline, converge_within))) => reached?,
                () = crate::write_back::keep_writing_back(client) => {}
            }
        }
        let _ = prepared.send(());
        if capture.await.is_err() {
            return Err(Error::CaptureAbandoned);
        }
        match mode {
            StreamMode::Precopy { .. } => {
                let go_on = MigrateContinue {
                    state: MigrationStatus::PreSwitchover,
                };
                self.client
                    .execute(&go_on)
                    .await
                    .map_err(qmp("continuing the migration after the disk snapshots"))?;
            }
            StreamMode::Paused | StreamMode::Background => self.start().await?,
        }
        self.wait_for(MigrationStatus::Completed, None).await?;
        match mode {
            // The domain may stay paused: its disks must be usable.
            StreamMode::Paused => settle_after_migration(self.client).await?,
            // The guest goes on at once: nothing else is left for the pause.
            StreamMode::Precopy { .. } if resume => resume_after_switchover(self.client).await?,
            StreamMode::Precopy { .. } | StreamMode::Background => {}
        }
        if let Some(captured) = captured {
            // The caller may not be waiting for it.
            let _ = captured.send(());
        }
        // QEMU's figures of the migration, read once the guest runs again.
        let info = self
            .client
            .execute(&QueryMigrate)
            .await
            .map_err(qmp("reading the completed migration's figures"))?;
        let (stream, outputs) = match self.parsed.take() {
            Some(done) => done,
            None => tokio::time::timeout(END_TIMEOUT, self.parser.result())
                .await
                .map_err(|_| Error::MigrationFailed {
                    reason: format!(
                        "QEMU reported the migration complete, but its stream did not end within {} s",
                        END_TIMEOUT.as_secs()
                    ),
                })??,
        };
        Ok((info, stream, outputs))
    }

    /// Whether the guest runs now.
    async fn guest_running(&self) -> Result<bool> {
        let status = self
            .client
            .execute(&QueryStatus)
            .await
            .map_err(qmp("reading the run state before the migration"))?;
        Ok(status.running)
    }

    async fn start(&self) -> Result<()> {
        let migrate = qmp::commands::Migrate {
            uri: format!("fd:{FD_NAME}"),
        };
        self.client
            .execute(&migrate)
            .await
            .map(drop)
            .map_err(qmp("starting the migration into the stream"))
    }

    /// Waits until QEMU's migration reaches `target`, following QEMU's `MIGRATION` events (the
    /// stream was subscribed before the migration started, so it holds every change; a slow poll
    /// of `query-migrate` beside it covers lost events); takes the parser's outcome if the stream
    /// ends meanwhile. With a `deadline` (and the limit it came from), gives up when it passes.
    async fn wait_for(
        &mut self,
        target: MigrationStatus,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<()> {
        let mut status = None;
        loop {
            match status {
                Some(ref reached) if *reached == target => return Ok(()),
                Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                    let info = self.query().await?;
                    return Err(Error::MigrationFailed {
                        reason: info.error_desc.unwrap_or_else(|| "QEMU gave no reason".into()),
                    });
                }
                Some(MigrationStatus::Completed) => {
                    return Err(Error::MigrationFailed {
                        reason: "QEMU completed the migration without stopping before the switch-over".into(),
                    })
                }
                _ => {}
            }
            if let Some((deadline, limit)) = deadline {
                if Instant::now() >= deadline {
                    return Err(not_converged(&self.query().await?, limit));
                }
            }
            let parsing = self.parsed.is_none() && !self.parser.finished();
            tokio::select! {
                event = self.events.next() => match event {
                    Ok(message) => match &message.event {
                        Event::Migration(data) => status = Some(data.status.clone()),
                        Event::Resume => {
                            if let Some(resumed) = self.resumed.take() {
                                let _ = resumed.try_send(());
                            }
                            continue;
                        }
                        _ => continue,
                    },
                    // Events lost or the connection gone: the query tells (or fails), and the
                    // parser stops resting.
                    Err(_) => {
                        self.resumed = None;
                        status = self.query().await?.status;
                    }
                },
                outcome = self.parser.result(), if parsing => match outcome {
                    Ok(done) => self.parsed = Some(done),
                    Err(error) => return Err(self.stream_failed(error).await),
                },
                () = tokio::time::sleep(POLL) => status = self.query().await?.status,
            }
        }
    }

    /// The error to report for a stream the parser could not read to its end. A QEMU that died
    /// ends its stream wherever it was, which the parser sees as a stream cut short: the QMP
    /// query then fails and names the real cause instead.
    async fn stream_failed(&self, parse_error: Error) -> Error {
        match self.query().await {
            Ok(_) => parse_error,
            Err(gone) => gone,
        }
    }

    async fn query(&self) -> Result<MigrationInfo> {
        self.client
            .execute(&QueryMigrate)
            .await
            .map_err(qmp("following the migration"))
    }

    /// Cancels the migration and waits for QEMU to let go of the domain (a pre-copy's guest runs
    /// again); the descriptor is taken out of QEMU's table if the migration never took it.
    async fn cancel(&mut self) {
        // Stop reading first: QEMU's next write then fails at once (broken pipe) instead of waiting
        // on a full socket. QEMU may be gone already; a cancel covers the rest.
        self.parser.stop();
        let _ = self.client.execute(&MigrateCancel).await;
        let deadline = Instant::now() + END_TIMEOUT;
        while Instant::now() < deadline {
            match self.client.execute(&QueryMigrate).await.map(|info| info.status) {
                Ok(Some(status)) if migration_running(&status) => tokio::time::sleep(POLL / 10).await,
                _ => break,
            }
        }
        let _ = self.client.closefd(FD_NAME).await;
    }
}

/// Makes a QEMU whose last outgoing migration completed usable again: waits for it to leave
/// `finish-migrate` ([`wait_until_settled`]), and reactivates the disks a completed migration
/// leaves inactive for a destination (QEMU aborts on a write to an inactive image, e.g. a disk
/// snapshot before the next `cont`, which reactivates them too). Does nothing otherwise.
pub(crate) async fn settle_after_migration(client: &Client) -> Result<()> {
    let migration = client
        .execute(&QueryMigrate)
        .await
        .map_err(qmp("querying the migration state"))?;
    if migration.status != Some(MigrationStatus::Completed) {
        // Before the switch-over of a pre-copy, `finish-migrate` holds the guest for the disks.
        return Ok(());
    }
    if wait_until_settled(client).await? == RunState::PostMigrate {
        client
            .execute_raw("blockdev-set-active", serde_json::json!({ "active": true }))
            .await
            .map_err(qmp("reactivating the disks after the migration"))?;
    }
    Ok(())
}

/// Waits for a QEMU whose outgoing migration completed to leave `finish-migrate` (`cont` is
/// refused until then); returns its run state.
pub(crate) async fn wait_until_settled(client: &Client) -> Result<RunState> {
    let deadline = Instant::now() + END_TIMEOUT;
    loop {
        let status = client
            .execute(&QueryStatus)
            .await
            .map_err(qmp("reading the run state after the migration"))?;
        if status.status != RunState::FinishMigrate {
            return Ok(status.status);
        }
        if Instant::now() >= deadline {
            return Err(Error::MigrationFailed {
                reason: format!("QEMU stayed in finish-migrate for {} s", END_TIMEOUT.as_secs()),
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Resumes the guest a pre-copy stopped for its switch-over, as soon as QEMU lets it: right
/// after the `completed` event QEMU's migration thread still has to leave `finish-migrate`, and
/// `cont` is refused until it has ("Migration is not finalized yet"), so a refusal is tried
/// again after [`CONT_RETRY`]. `cont` also reactivates the disks the completion deactivated.
async fn resume_after_switchover(client: &Client) -> Result<()> {
    let deadline = Instant::now() + END_TIMEOUT;
    let mut refused = 0u32;
    loop {
        match client.execute(&Cont).await {
            Ok(_) => break,
            Err(error) if refused_in_finish_migrate(&error) && Instant::now() < deadline => {
                refused += 1;
                tokio::time::sleep(CONT_RETRY).await;
            }
            Err(source) => {
                return Err(Error::Qmp {
                    operation: "resuming the guest after the switch-over",
                    source,
                })
            }
        }
    }
    tracing::debug!(refused, "guest resumed after the switch-over");
    Ok(())
}

/// Whether `error` is QEMU refusing `cont` because a migration holds the guest in
/// `finish-migrate` (QEMU then changed nothing).
pub(crate) fn refused_in_finish_migrate(error: &qmp::Error) -> bool {
    matches!(error, qmp::Error::Command { desc, .. } if desc.contains(NOT_FINALIZED))
}

/// Whether a migration in `status` still holds the domain.
pub(crate) fn migration_running(status: &MigrationStatus) -> bool {
    matches!(
        status,
        MigrationStatus::Setup
            | MigrationStatus::Active
            | MigrationStatus::Cancelling
            | MigrationStatus::PreSwitchover
            | MigrationStatus::Device
    )
}

fn not_converged(info: &MigrationInfo, limit: Duration) -> Error {
    let ram = info.ram.as_ref();
    Error::NotConverged {
        after: limit,
        remaining_mib: ram.map_or(0, |r| r.remaining >> 20),
        dirty_pages_per_second: ram.map_or(0, |r| r.dirty_pages_rate),
        passes: ram.map_or(0, |r| r.dirty_sync_count),
    }
}

fn qmp(operation: &'static str) -> impl FnOnce(qmp::Error) -> Error {
    move |source| Error::Qmp { operation, source }
}
