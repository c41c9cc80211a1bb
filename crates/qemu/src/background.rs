//! A live memory snapshot consistent at its start: QEMU's `background-snapshot` migration (it
//! write-protects guest RAM, stops the guest only to save the device state, and streams RAM while the
//! guest runs on) written into a socket this process reads, parsed as it arrives into the toolstack's
//! own memory image and a device-state file.

use snapshot_core::CaptureSignals;
use std::{
    collections::BTreeMap,
    io::BufWriter,
    net::Shutdown,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use memory::{Durability, ImageLayout, ImageWriter, ImportStats, PageImport, PAGE_SIZE};
use qmp::{
    commands::{
        MigrateCancel, MigrateSetCapabilities, MigrationCapability, MigrationCapabilityStatus, MigrationInfo,
        QueryMigrate,
    },
    Client, MigrationStatus,
};
use tokio::sync::oneshot;

use crate::{
    command_line::RAM_BACKEND_ID,
    error::{Error, Result},
    migration_stream::{parse_migration_stream, ExpectedBlocks, RamSink, StreamStats},
    ram_layout::ram_layout,
};

/// The name the stream's socket is filed under in QEMU (`getfd`, `migrate fd:NAME`).
const FD_NAME: &str = "domsnap-background-snapshot";
/// How often QEMU's migration state is looked at.
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for the end of the stream once QEMU reports the migration completed (it closes the
/// socket right after), or for QEMU to end a cancelled migration.
const END_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket send buffer asked for QEMU's end (the kernel caps it at `net.core.wmem_max`): QEMU can run
/// ahead of the reader by this much.
const SOCKET_BUFFER: usize = 4 << 20;
/// Write buffer of the device-state file (the parser hands it small pieces as well as large ones).
const DEVICE_STATE_BUFFER: usize = 1 << 16;
/// Capabilities that may be on: they do not change the stream.
const HARMLESS_CAPABILITIES: [&str; 2] = ["events", "background-snapshot"];

/// What a background snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackgroundStats {
    /// How long QEMU stopped the guest (its `downtime`): to save the device state and write-protect
    /// RAM, at the start.
    pub downtime: Duration,
    /// Wall time of the whole call, from the first check to both files in place.
    pub total_time: Duration,
    /// QEMU's own `total-time` of the migration.
    pub qemu_total_time: Duration,
    /// What the stream held.
    pub stream: StreamStats,
    /// What the memory image holds.
    pub image: ImportStats,
}

/// Takes a memory snapshot of the running (or paused) QEMU behind `client` that is consistent at the
/// moment it starts: QEMU's `background-snapshot` migration streams into a socket this process
/// reads; guest RAM goes into a memory image at `image` (its `layout` must be that of the domain's
/// RAM file, e.g. [`ImageLayout::of`] the mapped RAM) and the device state into `device_state`, a
/// file `migrate-incoming` loads on a QEMU started with `-incoming defer` after the image was
/// restored into its RAM file.
///
/// The guest stops for [`BackgroundStats::downtime`] only, then runs on (slowed while pages it
/// writes are still write-protected). `signals` lets the caller place the snapshot's instant:
/// `prepared` fires once the checks are done and the files exist, and QEMU starts when `capture`
/// arrives (dropped instead, the snapshot gives up and leaves nothing behind); `captured` fires
/// once QEMU has saved the device state and write-protected RAM: the snapshot's contents are fixed
/// from then on, so a caller that paused the domain to snapshot its disks at the same instant may
/// resume it (QEMU keeps a paused domain paused). It is dropped unsent if the snapshot fails
/// before. QEMU's RAM must be a shared file on tmpfs or hugetlbfs
/// (userfaultfd write-protection); no other migration may run, and no migration capability that
/// changes the stream may be on. Both files are written under temporary names and appear (fsynced
/// per `durability`) only when everything succeeded; on any error neither exists, the migration is
/// cancelled, and the capability is switched off again. Do not drop the returned future before it
/// completes: the capability would stay on.
pub async fn background_snapshot(
    client: &Client,
    layout: ImageLayout,
    image: &Path,
    device_state: &Path,
    durability: Durability,
    signals: CaptureSignals,
) -> Result<BackgroundStats> {
    let CaptureSignals {
        prepared,
        capture,
        captured,
    } = signals;
    let started = Instant::now();
    check_migration_idle(client).await?;
    check_capabilities(client).await?;
    check_layout(client, &layout).await?;
    let expected = expected_blocks(client, layout.total_pages() * PAGE_SIZE as u64).await?;
    populate_ram(client).await;
    let outputs = Outputs::create(image, device_state, layout, durability)?;
    let (reader, writer) = UnixStream::pair().map_err(|source| Error::StreamSocket { source })?;
    // Best effort: a larger buffer lets QEMU run further ahead of the reader.
    let _ = nix::sys::socket::setsockopt(&writer, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER);
    let mut parser = Parser::spawn(reader, expected, outputs, captured)?;
    let (info, stream, outputs) = match run(client, writer, &mut parser, prepared, capture).await {
        Ok(done) => done,
        Err(error) => {
            parser.abort().await;
            return Err(error);
        }
    };
    let image_stats = outputs.import.stats();
    if image_stats.pages_missing > 0 {
        return Err(Error::StreamIncomplete {
            missing: image_stats.pages_missing,
        });
    }
    let image_stats = tokio::task::spawn_blocking(move || outputs.seal())
        .await
        .expect("sealing does not panic")?;
    Ok(BackgroundStats {
        downtime: Duration::from_millis(info.downtime.unwrap_or_default()),
        total_time: started.elapsed(),
        qemu_total_time: Duration::from_millis(info.total_time.unwrap_or_default()),
        stream,
        image: image_stats,
    })
}

/// Makes QEMU populate all guest RAM now, while the guest runs. A background snapshot
/// write-protects every page, and QEMU first populates the ones never touched; the first snapshot
/// of a QEMU process would do that inside the caller's pause (≈ 1.2 s for 1 GiB here). Setting the
/// memory backend's `prealloc` does it ahead, once per process (later calls see it set). It costs
/// no memory the snapshot would not take anyway. Best effort: a QEMU that refuses only pays the
/// longer first pause.
async fn populate_ram(client: &Client) {
    let path = format!("/objects/{RAM_BACKEND_ID}");
    let get = serde_json::json!({ "path": path, "property": "prealloc" });
    if let Ok(serde_json::Value::Bool(true)) = client.execute_raw("qom-get", get).await {
        return;
    }
    let started = Instant::now();
    let set = serde_json::json!({ "path": path, "property": "prealloc", "value": true });
    match client.execute_raw("qom-set", set).await {
        Ok(_) => tracing::debug!(elapsed = ?started.elapsed(), "guest RAM populated before the pause"),
        Err(error) => tracing::warn!(%error, "cannot populate guest RAM ahead; the first pause is longer"),
    }
}

/// Switches the capability on, runs the migration, and switches it off again whatever happened.
async fn run(
    client: &Client,
    writer: UnixStream,
    parser: &mut Parser,
    prepared: oneshot::Sender<()>,
    capture: oneshot::Receiver<()>,
) -> Result<(MigrationInfo, StreamStats, Outputs)> {
    set_background_capability(client, true).await?;
    let migrated = migrate(client, writer, parser, prepared, capture).await;
    let switched_off = set_background_capability(client, false).await;
    let done = migrated?;
    switched_off?;
    Ok(done)
}

/// Passes `writer` to QEMU, announces `prepared`, and once `capture` arrives runs the migration
/// into it (everything that can be done before is, so that a caller's pause holds little more than
/// QEMU's capture); returns QEMU's final report and the parser's outputs once both QEMU and the
/// parser are done. On error the migration is cancelled.
async fn migrate(
    client: &Client,
    writer: UnixStream,
    parser: &mut Parser,
    prepared: oneshot::Sender<()>,
    capture: oneshot::Receiver<()>,
) -> Result<(MigrationInfo, StreamStats, Outputs)> {
    let qmp = |operation| move |source| Error::Qmp { operation, source };
    let passed = client
        .getfd(FD_NAME, std::os::fd::AsFd::as_fd(&writer))
        .await
        .map_err(qmp("passing the stream socket to QEMU"));
    // QEMU has its own copy: the stream ends (EOF) when QEMU closes it.
    drop(writer);
    passed?;
    let _ = prepared.send(());
    if capture.await.is_err() {
        let _ = client.closefd(FD_NAME).await;
        return Err(Error::CaptureAbandoned);
    }
    let started = client
        .execute(&qmp::commands::Migrate {
            uri: format!("fd:{FD_NAME}"),
        })
        .await
        .map_err(qmp("starting the background snapshot"));
    if let Err(error) = started {
        // `migrate` takes the descriptor out of QEMU's table once it parsed the URI; if it failed
        // before that, the descriptor is still filed and must not leak.
        let _ = client.closefd(FD_NAME).await;
        return Err(error);
    }
    match follow(client, parser).await {
        Ok(done) => Ok(done),
        Err(error) => {
            // Stop reading first: QEMU's next write then fails at once (broken pipe) instead of
            // waiting on a full socket. QEMU may be gone already; a cancel covers the rest. Wait
            // for QEMU to let go of the domain.
            parser.stop();
            let _ = client.execute(&MigrateCancel).await;
            let deadline = Instant::now() + END_TIMEOUT;
            while Instant::now() < deadline {
                match client.execute(&QueryMigrate).await.map(|info| info.status) {
                    Ok(Some(
                        MigrationStatus::Active | MigrationStatus::Setup | MigrationStatus::Cancelling,
                    )) => tokio::time::sleep(POLL).await,
                    _ => break,
                }
            }
            Err(error)
        }
    }
}

/// Waits for QEMU to complete the migration and the parser to reach the end of the stream.
async fn follow(client: &Client, parser: &mut Parser) -> Result<(MigrationInfo, StreamStats, Outputs)> {
    let mut parsed = None;
    let info = loop {
        if parsed.is_none() {
            if let Ok(outcome) = tokio::time::timeout(POLL, parser.result()).await {
                let (stream, outputs) = outcome?;
                parsed = Some((stream, outputs));
            }
        } else {
            tokio::time::sleep(POLL).await;
        }
        let info = client.execute(&QueryMigrate).await.map_err(|source| Error::Qmp {
            operation: "following the background snapshot",
            source,
        })?;
        match info.status {
            Some(MigrationStatus::Completed) => break info,
            Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                return Err(Error::MigrationFailed {
                    reason: info.error_desc.unwrap_or_else(|| "QEMU gave no reason".into()),
                })
            }
            _ => {}
        }
    };
    let (stream, outputs) = match parsed {
        Some(done) => done,
        None => tokio::time::timeout(END_TIMEOUT, parser.result())
            .await
            .map_err(|_| Error::MigrationFailed {
                reason: format!(
                    "QEMU reported the snapshot complete, but its stream did not end within {} s",
                    END_TIMEOUT.as_secs()
                ),
            })??,
    };
    Ok((info, stream, outputs))
}

async fn set_background_capability(client: &Client, state: bool) -> Result<()> {
    client
        .execute(&MigrateSetCapabilities {
            capabilities: vec![MigrationCapabilityStatus {
                capability: MigrationCapability::BackgroundSnapshot,
                state,
            }],
        })
        .await
        .map(drop)
        .map_err(|source| Error::Qmp {
            operation: if state {
                "switching on the background-snapshot capability"
            } else {
                "switching off the background-snapshot capability"
            },
            source,
        })
}

async fn check_migration_idle(client: &Client) -> Result<()> {
    let info = client.execute(&QueryMigrate).await.map_err(|source| Error::Qmp {
        operation: "querying the migration state",
        source,
    })?;
    match info.status {
        None
        | Some(
            MigrationStatus::None
            | MigrationStatus::Completed
            | MigrationStatus::Failed
            | MigrationStatus::Cancelled,
        ) => Ok(()),
        Some(status) => Err(Error::MigrationBusy {
            status: status.as_str().to_owned(),
        }),
    }
}

/// Refuses capabilities and modes that change the stream (the parser would refuse most of them
/// later, but x-ignore-shared, for one, leaves guest RAM out of the stream).
async fn check_capabilities(client: &Client) -> Result<()> {
    let qmp = |operation| move |source| Error::Qmp { operation, source };
    let capabilities = client
        .execute_raw("query-migrate-capabilities", serde_json::Value::Null)
        .await
        .map_err(qmp("querying migration capabilities"))?;
    let on: Vec<&str> = capabilities
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str())
        .filter(|name| !HARMLESS_CAPABILITIES.contains(name))
        .collect();
    if !on.is_empty() {
        return Err(Error::MigrationSettings {
            reason: format!("migration capabilities {} are on", on.join(", ")),
        });
    }
    let parameters = client
        .execute_raw("query-migrate-parameters", serde_json::Value::Null)
        .await
        .map_err(qmp("querying migration parameters"))?;
    match parameters["mode"].as_str() {
        None | Some("normal") => Ok(()),
        Some(mode) => Err(Error::MigrationSettings {
            reason: format!("migration mode is {mode}"),
        }),
    }
}

/// The stream numbers guest RAM by offset in the RAM file, the image by its regions in address
/// order: they agree when the regions sit in the file one after the other, in address order (as q35
/// maps its RAM below and above 4 GiB).
async fn check_layout(client: &Client, layout: &ImageLayout) -> Result<()> {
    let regions = ram_layout(client).await?;
    let mut file_offset = 0;
    let agrees = regions.len() == layout.regions().len()
        && regions.iter().zip(layout.regions()).all(|(file, image)| {
            let ok = file.gpa == image.gpa && file.len == image.len && file.file_offset == file_offset;
            file_offset += file.len;
            ok
        });
    if agrees {
        Ok(())
    } else {
        Err(Error::RamLayout {
            reason: format!(
                "the image layout {:?} is not the RAM file's regions in file order {regions:?}",
                layout.regions()
            ),
        })
    }
}

/// The RAM blocks of the QEMU behind `client` (`info ramblock`), as a stream of it must declare
/// them: the guest RAM block ([`RAM_BACKEND_ID`]) checked to have `ram_size` bytes, the others
/// (ROMs) with their current sizes.
pub async fn expected_blocks(client: &Client, ram_size: u64) -> Result<ExpectedBlocks> {
    let text = client
        .execute_raw(
            "human-monitor-command",
            serde_json::json!({ "command-line": "info ramblock" }),
        )
        .await
        .map_err(|source| Error::Qmp {
            operation: "listing RAM blocks",
            source,
        })?;
    let mut blocks = parse_ramblocks(text.as_str().unwrap_or_default())?;
    match blocks.remove(RAM_BACKEND_ID) {
        Some(size) if size == ram_size => Ok(ExpectedBlocks {
            ram_block: RAM_BACKEND_ID.to_owned(),
            ram_size,
            other_blocks: blocks
                .into_iter()
                .map(|(name, size)| (name, Some(size)))
                .collect(),
        }),
        Some(size) => Err(Error::RamLayout {
            reason: format!("RAM block `{RAM_BACKEND_ID}` has {size} bytes, the image {ram_size}"),
        }),
        None => Err(Error::RamLayout {
            reason: format!("QEMU has no RAM block `{RAM_BACKEND_ID}`"),
        }),
    }
}

/// Parses `info ramblock`: a header line, then per block its name, page size (`4 KiB`), offset,
/// used length, total length, host address and `ro`/`rw`.
fn parse_ramblocks(text: &str) -> Result<BTreeMap<String, u64>> {
    let invalid = |reason: String| Error::RamLayout { reason };
    let mut blocks = BTreeMap::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let used = (words.len() == 8)
            .then(|| words[4].strip_prefix("0x"))
            .flatten()
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| invalid(format!("cannot parse `info ramblock` line {:?}", line.trim())))?;
        blocks.insert(words[0].to_owned(), used);
    }
    if blocks.is_empty() {
        return Err(invalid(format!("`info ramblock` lists no blocks: {text:?}")));
    }
    Ok(blocks)
}

/// The files being written: the memory image and the device-state file, both under temporary names.
struct Outputs {
    import: PageImport<'static>,
    /// The device state, private (it holds guest secrets: CPU registers, device buffers).
    device_state: durable::TempFile,
    /// Whether the device state is fsynced (with its folder) when put in place.
    sync: durable::Sync,
    /// Where the image appears when sealed.
    image: PathBuf,
}

impl Outputs {
    fn create(
        image: &Path,
        device_state: &Path,
        layout: ImageLayout,
        durability: Durability,
    ) -> Result<Self> {
        let writer = ImageWriter::create(image, layout, durability).map_err(|source| Error::MemoryImage {
            path: image.to_owned(),
            source,
        })?;
        Ok(Outputs {
            import: PageImport::new(Box::new(writer)),
            device_state: durable::TempFile::create(device_state)?,
            sync: match durability {
                Durability::Sync => durable::Sync::Yes,
                Durability::NoSync => durable::Sync::No,
            },
            image: image.to_owned(),
        })
    }

    /// Seals the image, then puts the device state in place; on error neither is left.
    fn seal(self) -> Result<ImportStats> {
        let Outputs {
            import,
            device_state,
            sync,
            image,
        } = self;
        let stats = import.seal().map_err(|source| Error::MemoryImage {
            path: image.clone(),
            source,
        })?;
        if let Err(error) = device_state.persist(sync) {
            let _ = std::fs::remove_file(&image);
            return Err(error.into());
        }
        Ok(stats)
    }
}

/// Guest RAM into the image; the capture announced to the caller.
struct ImageSink<'a> {
    import: &'a mut PageImport<'static>,
    captured: Option<oneshot::Sender<()>>,
}

impl RamSink for ImageSink<'_> {
    fn page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> memory::Result<()> {
        self.import.page(page, data)
    }
    fn zero(&mut self, page: u64) -> memory::Result<()> {
        self.import.zero(page)
    }
    fn state_captured(&mut self) {
        if let Some(captured) = self.captured.take() {
            tracing::debug!("state captured: the first RAM page arrived");
            // The caller may not be waiting for it.
            let _ = captured.send(());
        }
    }
}

type ParseOutcome = Result<(StreamStats, Outputs)>;

/// The parser on its own thread, reading the socket as QEMU writes.
struct Parser {
    /// Our end of the socket, to stop the reader (shutting down reading makes it see the end).
    socket: UnixStream,
    result: Option<oneshot::Receiver<ParseOutcome>>,
}

impl Parser {
    fn spawn(
        reader: UnixStream,
        expected: ExpectedBlocks,
        mut outputs: Outputs,
        captured: oneshot::Sender<()>,
    ) -> Result<Self> {
        let socket = reader
            .try_clone()
            .map_err(|source| Error::StreamSocket { source })?;
        let (send, result) = oneshot::channel();
        std::thread::Builder::new()
            .name("migration-stream".into())
            .spawn(move || {
                let Outputs {
                    import, device_state, ..
                } = &mut outputs;
                let mut sink = ImageSink {
                    import,
                    captured: Some(captured),
                };
                let parsed = {
                    // The parser flushes it at the end of a complete stream.
                    let mut writer = BufWriter::with_capacity(DEVICE_STATE_BUFFER, device_state.file_mut());
                    parse_migration_stream(reader, &expected, &mut sink, &mut writer)
                };
                // The receiver is gone only if the caller gave up: dropping the outputs then removes
                // the files.
                let _ = send.send(parsed.map(|stats| (stats, outputs)).map_err(Error::from));
            })
            .map_err(|source| Error::StreamSocket { source })?;
        Ok(Parser {
            socket,
            result: Some(result),
        })
    }

    /// The parser's outcome (once: later calls wait forever).
    async fn result(&mut self) -> ParseOutcome {
        match self.result.as_mut() {
            Some(receiver) => {
                let outcome = receiver
                    .await
                    .expect("the parser thread sends its outcome before ending");
                self.result = None;
                outcome
            }
            None => std::future::pending().await,
        }
    }

    /// Makes the parser see the end of the stream (after what the socket holds already), and QEMU's
    /// writes fail.
    fn stop(&self) {
        // Fails only if the socket is not connected any more, which has the same effect.
        let _ = self.socket.shutdown(Shutdown::Read);
    }

    /// Stops the parser and waits for it, so that its files are gone when this returns.
    async fn abort(&mut self) {
        self.stop();
        if self.result.is_some() {
            let _ = self.result().await;
        }
    }
}

impl Drop for Parser {
    fn drop(&mut self) {
        // A dropped snapshot must not leave the thread reading: QEMU then fails with a broken pipe.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramblocks_from_qemu_10() {
        let text = "              Block Name    PSize              Offset               Used              Total                HVA  RO\r\n                     mem    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007fd65ffff000  rw\r\n    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007fd65ec00000  ro\r\n                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007fd65fe00000  ro\r\n";
        let blocks = parse_ramblocks(text).unwrap();
        assert_eq!(
            blocks,
            [
                ("/rom@etc/acpi/tables".to_owned(), 0x20000),
                ("mem".to_owned(), 0x0800_0000),
                ("pc.bios".to_owned(), 0x40000),
            ]
            .into()
        );
        assert!(parse_ramblocks("header only\n").is_err());
        assert!(parse_ramblocks("header\nmem 4 KiB 0x0 zz 0x0 0x0 rw\n").is_err());
    }
}
