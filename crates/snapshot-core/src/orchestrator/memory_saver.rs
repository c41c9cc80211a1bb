//! A memory save on its own thread, driven in stages by a create.

use std::{path::PathBuf, sync::Arc};

use memory::{ConvergencePolicy, GuestMemory, RoundStats, SaveSummary};
use tokio::{sync::oneshot, task::JoinHandle};

use super::Observer;
use crate::error::DriverError;

/// A memory save on its own thread (copying and hashing pages is CPU-bound), driven in stages:
/// pre-copy while the domain runs, the final copy once it is paused, the seal after it resumed.
pub(super) struct MemorySaver {
    precopied: Option<oneshot::Receiver<()>>,
    paused: Option<std::sync::mpsc::Sender<()>>,
    copied: Option<oneshot::Receiver<()>>,
    seal: Option<std::sync::mpsc::Sender<()>>,
    thread: JoinHandle<memory::Result<Option<SaveSummary>>>,
}

impl MemorySaver {
    /// Starts the save: with `live`, pre-copy rounds begin at once.
    pub(super) fn start(
        mem: GuestMemory,
        image: PathBuf,
        live: Option<ConvergencePolicy>,
        observer: Arc<dyn Observer>,
    ) -> Self {
        let (precopied_tx, precopied) = oneshot::channel();
        let (paused, paused_rx) = std::sync::mpsc::channel();
        let (copied_tx, copied) = oneshot::channel();
        let (seal, seal_rx) = std::sync::mpsc::channel::<()>();
        let thread = tokio::task::spawn_blocking(move || {
            let layout = memory::ImageLayout::of(&mem);
            let sink = Box::new(memory::ImageWriter::create(
                &image,
                layout,
                memory::Durability::Sync,
            )?);
            let finished = match live {
                Some(policy) => {
                    let options = memory::SaveOptions {
                        policy,
                        progress: Some(Box::new(move |stats: &RoundStats| observer.memory_round(stats))),
                    };
                    let source = Box::new(memory::ContentCompare::new());
                    let mut save = memory::LiveSave::begin(&mem, source, sink, options)?;
                    save.precopy()?;
                    let _ = precopied_tx.send(());
                    if paused_rx.recv().is_err() {
                        return Ok(None);
                    }
                    save.finish()?
                }
                None => {
                    let _ = precopied_tx.send(());
                    if paused_rx.recv().is_err() {
                        return Ok(None);
                    }
                    memory::copy_paused(&mem, sink)?
                }
            };
            let _ = copied_tx.send(());
            if seal_rx.recv().is_err() {
                return Ok(None);
            }
            finished.seal().map(Some)
        });
        MemorySaver {
            precopied: Some(precopied),
            paused: Some(paused),
            copied: Some(copied),
            seal: Some(seal),
            thread,
        }
    }

    /// Waits for a stage; if the thread ended instead, its error.
    async fn stage(&mut self, signal: Option<oneshot::Receiver<()>>) -> std::result::Result<(), DriverError> {
        let signal = signal.ok_or("memory save stage reached twice")?;
        if signal.await.is_ok() {
            return Ok(());
        }
        match (&mut self.thread).await {
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(_)) => Err("the memory save stopped early".into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until pre-copy has converged (at once for a paused save).
    pub(super) async fn precopied(&mut self) -> std::result::Result<(), DriverError> {
        let signal = self.precopied.take();
        self.stage(signal).await
    }

    /// Runs the copy that needs the domain paused and waits for it.
    pub(super) async fn copy_while_paused(&mut self) -> std::result::Result<(), DriverError> {
        if let Some(paused) = self.paused.take() {
            let _ = paused.send(());
        }
        let signal = self.copied.take();
        self.stage(signal).await
    }

    /// Seals the image (fsync, rename) and returns the statistics.
    pub(super) async fn seal(mut self) -> std::result::Result<SaveSummary, DriverError> {
        if let Some(seal) = self.seal.take() {
            let _ = seal.send(());
        }
        match self.thread.await? {
            Ok(Some(summary)) => Ok(summary),
            Ok(None) => Err("the memory save was abandoned".into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Abandons the save (its temporary image is removed) and waits for the thread.
    pub(super) async fn abandon(mut self) {
        self.paused.take();
        self.seal.take();
        let _ = self.thread.await;
    }
}
