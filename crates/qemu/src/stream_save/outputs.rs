//! The two files a streamed snapshot writes, and the parser thread that fills them from the socket
//! QEMU writes into.

use std::{
    io::BufWriter,
    net::Shutdown,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use memory::{Durability, ImageLayout, ImageWriter, ImportStats, PageImport, PAGE_SIZE};
use tokio::sync::oneshot;

use crate::{
    error::{Error, Result},
    migration_stream::{parse_migration_stream, ExpectedBlocks, RamSink, StreamStats},
};

/// Write buffer of the device-state file (the parser hands it small pieces as well as large ones).
const DEVICE_STATE_BUFFER: usize = 1 << 16;

/// The files being written: the memory image and the device-state file, both under temporary names.
pub(super) struct Outputs {
    pub(super) import: PageImport<'static>,
    /// The device state, private (it holds guest secrets: CPU registers, device buffers).
    device_state: durable::TempFile,
    /// Whether the device state is fsynced (with its folder) when put in place.
    sync: durable::Sync,
    /// Where the image appears when sealed.
    image: PathBuf,
}

impl Outputs {
    pub(super) fn create(
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

    /// Seals the image and puts the device state in place, both at once: their fsyncs overlap
    /// (each on its own blocking thread). Neither file names the other, and the snapshot that
    /// names both is recorded only after this returned, so a crash in between leaves no snapshot
    /// that looks complete. On error neither file is left.
    pub(super) async fn seal(self) -> Result<ImportStats> {
        let Outputs {
            import,
            device_state,
            sync,
            image,
        } = self;
        let devices = device_state.dest().to_owned();
        let sealing = tokio::task::spawn_blocking(move || import.seal());
        let persisting = tokio::task::spawn_blocking(move || device_state.persist(sync));
        let (sealed, persisted) = tokio::join!(sealing, persisting);
        let sealed = sealed
            .map_err(panicked("sealing the memory image"))
            .and_then(|sealed| {
                sealed.map_err(|source| Error::MemoryImage {
                    path: image.clone(),
                    source,
                })
            });
        let persisted = persisted
            .map_err(panicked("putting the device state in place"))
            .and_then(|persisted| persisted.map_err(Error::from));
        match (sealed, persisted) {
            (Ok(stats), Ok(())) => Ok(stats),
            (Ok(_), Err(error)) => {
                let _ = std::fs::remove_file(&image);
                Err(error)
            }
            (Err(error), persisted) => {
                if persisted.is_ok() {
                    let _ = std::fs::remove_file(&devices);
                }
                Err(error)
            }
        }
    }
}

/// A blocking task of the seal that panicked (its file is removed by the unwinding).
fn panicked(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
    move |error| Error::MigrationFailed {
        reason: format!("{what} failed: {error}"),
    }
}

/// Guest RAM into the image; with `captured`, the capture announced to the caller at the first
/// page (a background snapshot's state is fixed once QEMU sends RAM).
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

pub(super) type ParseOutcome = Result<(StreamStats, Outputs)>;

/// The parser on its own thread, reading the socket as QEMU writes.
pub(super) struct Parser {
    /// Our end of the socket, to stop the reader (shutting down reading makes it see the end).
    socket: UnixStream,
    result: Option<oneshot::Receiver<ParseOutcome>>,
}

impl Parser {
    /// Starts the parser on `reader`; `captured` fires at the first page of guest RAM.
    pub(super) fn spawn(
        reader: UnixStream,
        expected: ExpectedBlocks,
        mut outputs: Outputs,
        captured: Option<oneshot::Sender<()>>,
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
                let mut sink = ImageSink { import, captured };
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

    /// Whether the parser's outcome was taken.
    pub(super) fn finished(&self) -> bool {
        self.result.is_none()
    }

    /// The parser's outcome (once: later calls wait forever).
    pub(super) async fn result(&mut self) -> ParseOutcome {
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
    pub(super) fn stop(&self) {
        // Fails only if the socket is not connected any more, which has the same effect.
        let _ = self.socket.shutdown(Shutdown::Read);
    }

    /// Stops the parser and waits for it, so that its files are gone when this returns.
    pub(super) async fn abort(&mut self) {
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
