//! The two files a streamed snapshot writes, and the parser thread that fills them from the socket
//! QEMU writes into.

use std::{
    io::BufWriter,
    net::Shutdown,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use memory::{Durability, ImageLayout, ImageWriter, ImportStats, PageImport, PAGE_SIZE};
use tokio::sync::oneshot;

use crate::{
    error::{Error, Result},
    migration_stream::{parse_migration_stream, ExpectedBlocks, RamSink, StreamStats},
};

/// Write buffer of the device-state file (the parser hands it small pieces as well as large ones).
const DEVICE_STATE_BUFFER: usize = 1 << 16;
/// Longest rest of the parser after the capture, should the guest's resume never be seen.
const REST_LIMIT: Duration = Duration::from_millis(100);

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

/// What the parser does at the first RAM page of a background snapshot, whose state is fixed once
/// QEMU sends RAM: it announces the capture to the caller, which resumes the guest, and rests
/// until the guest runs (or [`REST_LIMIT`]). Until then a core spent parsing is one the resume
/// waits for, with QEMU's migration thread busy too: on the 2-core machines here, `cont` went out
/// 0.6–2.8 ms after the first page and QEMU answered it 0.6–9.4 ms later while the parser ran
/// on, against 0.2–0.4 and 0.6–3.8 ms with it resting. QEMU fills the socket's buffer meanwhile.
pub(super) struct FirstPage {
    pub(super) captured: oneshot::Sender<()>,
    /// Fires once the guest runs again; its sender is dropped instead when the guest stays
    /// paused (it was paused before the snapshot) or QEMU's events are lost: no rest then.
    pub(super) resumed: mpsc::Receiver<()>,
}

/// Guest RAM into the image; with `first_page`, the capture announced at the first page.
struct ImageSink<'a> {
    import: &'a mut PageImport<'static>,
    first_page: Option<FirstPage>,
}

impl RamSink for ImageSink<'_> {
    fn page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> memory::Result<()> {
        self.import.page(page, data)
    }
    fn zero(&mut self, page: u64) -> memory::Result<()> {
        self.import.zero(page)
    }
    fn state_captured(&mut self) {
        if let Some(FirstPage { captured, resumed }) = self.first_page.take() {
            tracing::debug!("state captured: the first RAM page arrived");
            // The caller may not be waiting for it.
            let _ = captured.send(());
            // A timeout or a dropped sender ends the rest all the same.
            let outcome = resumed.recv_timeout(REST_LIMIT);
            tracing::debug!(?outcome, "the parser goes on after its rest");
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
    /// Starts the parser on `reader`; `first_page` is what it does at the first page of guest RAM.
    pub(super) fn spawn(
        reader: UnixStream,
        expected: ExpectedBlocks,
        mut outputs: Outputs,
        first_page: Option<FirstPage>,
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
                let mut sink = ImageSink { import, first_page };
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use memory::RegionInfo;

    use super::*;

    /// Calls the sink's `state_captured` as the parser does at the first page, with `resumed` as
    /// the rest's end; returns whether the capture was announced, how long the call took and
    /// when it returned.
    fn captured_with(resumed: mpsc::Receiver<()>) -> (bool, Duration, Instant) {
        let dir = tempfile::tempdir().unwrap();
        let layout = ImageLayout::for_regions(vec![RegionInfo {
            gpa: 0,
            len: PAGE_SIZE as u64,
        }])
        .unwrap();
        let mut outputs = Outputs::create(
            &dir.path().join("memory.img"),
            &dir.path().join("device.state"),
            layout,
            Durability::NoSync,
        )
        .unwrap();
        let (captured, announced) = oneshot::channel();
        let mut sink = ImageSink {
            import: &mut outputs.import,
            first_page: Some(FirstPage { captured, resumed }),
        };
        let started = Instant::now();
        sink.state_captured();
        let took = started.elapsed();
        let returned = Instant::now();
        // Once only: the next pages neither announce nor rest.
        sink.state_captured();
        (announced.blocking_recv().is_ok(), took, returned)
    }

    #[test]
    fn the_parser_rests_after_the_capture_until_the_guest_runs() {
        let (resumed, rest) = mpsc::sync_channel(1);
        let resume = std::thread::spawn(move || {
            std::thread::sleep(REST_LIMIT / 2);
            let sent = Instant::now();
            resumed.send(()).unwrap();
            sent
        });
        let (announced, took, returned) = captured_with(rest);
        let sent = resume.join().unwrap();
        assert!(announced);
        assert!(
            returned >= sent,
            "the rest ended {:?} before the resume",
            sent - returned
        );
        assert!(took < REST_LIMIT, "rested {took:?}");
    }

    #[test]
    fn no_rest_for_a_guest_that_stays_paused_or_lost_events_and_never_past_the_limit() {
        // The sender is dropped for a guest that stays paused and when QEMU's events are lost.
        let (dropped, rest) = mpsc::sync_channel(1);
        drop(dropped);
        let (announced, took, _) = captured_with(rest);
        assert!(announced && took < Duration::from_millis(20), "{took:?}");
        let (_never, rest) = mpsc::sync_channel::<()>(1);
        let (announced, took, _) = captured_with(rest);
        assert!(announced && took >= REST_LIMIT, "{took:?}");
    }
}
