//! Asynchronous events: the typed [`Event`] enum and per-subscriber [`EventStream`]s.

use std::{sync::Arc, time::Duration};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::{
    error::{Error, Result},
    types::{JobStatus, MigrationStatus},
};

/// When QEMU emitted an event (host time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// One event with its timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMessage {
    /// The decoded event.
    pub event: Event,
    /// When QEMU emitted it.
    pub timestamp: Timestamp,
}

/// The events a toolstack acts on, decoded; everything else (or anything whose data does not
/// have the expected shape) arrives as [`Event::Unknown`] with its raw data, so a newer QEMU
/// never breaks the event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The VM stopped (`STOP`).
    Stop,
    /// The VM resumed (`RESUME`).
    Resume,
    /// The VM shut down (`SHUTDOWN`).
    Shutdown(ShutdownData),
    /// The VM was reset (`RESET`).
    Reset(ShutdownData),
    /// A power-down was requested (`POWERDOWN`).
    Powerdown,
    /// A job changed status (`JOB_STATUS_CHANGE`).
    JobStatusChange(JobStatusChangeData),
    /// A block job finished (`BLOCK_JOB_COMPLETED`).
    BlockJobCompleted(BlockJobData),
    /// A block job was cancelled (`BLOCK_JOB_CANCELLED`).
    BlockJobCancelled(BlockJobData),
    /// A block job is ready for `job-complete` (`BLOCK_JOB_READY`).
    BlockJobReady(BlockJobData),
    /// A block job hit an I/O error (`BLOCK_JOB_ERROR`).
    BlockJobError(BlockJobErrorData),
    /// The migration status changed (`MIGRATION`).
    Migration(MigrationData),
    /// A migration pass began (`MIGRATION_PASS`).
    MigrationPass(MigrationPassData),
    /// Any other event.
    Unknown {
        /// The event name.
        name: String,
        /// The event's data, `{}` when it had none.
        data: Value,
    },
}

/// Data of `SHUTDOWN` and `RESET`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ShutdownData {
    /// Whether the guest asked for it.
    pub guest: bool,
    /// QEMU's reason, e.g. `host-qmp-quit` (an open set, kept as a string).
    pub reason: String,
}

/// Data of `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobStatusChangeData {
    /// The job id.
    pub id: String,
    /// The new status.
    pub status: JobStatus,
}

/// Data of the `BLOCK_JOB_*` completion events.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobData {
    /// The job kind, e.g. `commit`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// The job id (named `device` for historical reasons).
    pub device: String,
    /// Total work.
    pub len: u64,
    /// Work done.
    pub offset: u64,
    /// Speed limit.
    pub speed: u64,
    /// The error, for a failed job.
    #[serde(default)]
    pub error: Option<String>,
}

/// Data of `BLOCK_JOB_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobErrorData {
    /// The job id.
    pub device: String,
    /// `read` or `write`.
    pub operation: String,
    /// What QEMU did about it.
    pub action: String,
}

/// Data of `MIGRATION`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MigrationData {
    /// The new status.
    pub status: MigrationStatus,
}

/// Data of `MIGRATION_PASS`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MigrationPassData {
    /// The pass number.
    pub pass: u64,
}

impl Event {
    /// Decodes an event from its name and data.
    pub fn decode(name: String, data: Value) -> Self {
        fn typed<T: DeserializeOwned>(name: String, data: Value, variant: fn(T) -> Event) -> Event {
            match T::deserialize(&data) {
                Ok(decoded) => variant(decoded),
                Err(error) => {
                    tracing::warn!(%name, %error, "event data has an unexpected shape; kept raw");
                    Event::Unknown { name, data }
                }
            }
        }
        match name.as_str() {
            "STOP" => Event::Stop,
            "RESUME" => Event::Resume,
            "POWERDOWN" => Event::Powerdown,
            "SHUTDOWN" => typed(name, data, Event::Shutdown),
            "RESET" => typed(name, data, Event::Reset),
            "JOB_STATUS_CHANGE" => typed(name, data, Event::JobStatusChange),
            "BLOCK_JOB_COMPLETED" => typed(name, data, Event::BlockJobCompleted),
            "BLOCK_JOB_CANCELLED" => typed(name, data, Event::BlockJobCancelled),
            "BLOCK_JOB_READY" => typed(name, data, Event::BlockJobReady),
            "BLOCK_JOB_ERROR" => typed(name, data, Event::BlockJobError),
            "MIGRATION" => typed(name, data, Event::Migration),
            "MIGRATION_PASS" => typed(name, data, Event::MigrationPass),
            _ => Event::Unknown { name, data },
        }
    }

    /// The event's QMP name, e.g. `JOB_STATUS_CHANGE`.
    pub fn name(&self) -> &str {
        match self {
            Event::Stop => "STOP",
            Event::Resume => "RESUME",
            Event::Shutdown(_) => "SHUTDOWN",
            Event::Reset(_) => "RESET",
            Event::Powerdown => "POWERDOWN",
            Event::JobStatusChange(_) => "JOB_STATUS_CHANGE",
            Event::BlockJobCompleted(_) => "BLOCK_JOB_COMPLETED",
            Event::BlockJobCancelled(_) => "BLOCK_JOB_CANCELLED",
            Event::BlockJobReady(_) => "BLOCK_JOB_READY",
            Event::BlockJobError(_) => "BLOCK_JOB_ERROR",
            Event::Migration(_) => "MIGRATION",
            Event::MigrationPass(_) => "MIGRATION_PASS",
            Event::Unknown { name, .. } => name,
        }
    }
}

/// One subscriber's view of the event stream: every event emitted after [`subscribe`] was
/// called, in order.
///
/// Each subscriber has its own bounded queue; one that falls behind loses the oldest events and
/// is told so with [`Error::EventsLagged`] rather than silently.
///
/// [`subscribe`]: crate::Client::subscribe
#[derive(Debug)]
pub struct EventStream {
    receiver: broadcast::Receiver<Arc<EventMessage>>,
    closed: tokio::sync::watch::Receiver<Option<Arc<str>>>,
}

impl EventStream {
    pub(crate) fn new(
        receiver: broadcast::Receiver<Arc<EventMessage>>,
        closed: tokio::sync::watch::Receiver<Option<Arc<str>>>,
    ) -> Self {
        Self { receiver, closed }
    }

    /// The next event. After the connection closes, the events already queued are still
    /// delivered, then [`Error::Disconnected`].
    pub async fn next(&mut self) -> Result<Arc<EventMessage>> {
        use broadcast::error::{RecvError, TryRecvError};
        loop {
            match self.receiver.try_recv() {
                Ok(event) => return Ok(event),
                Err(TryRecvError::Lagged(missed)) => return Err(Error::EventsLagged { missed }),
                Err(TryRecvError::Closed) => return Err(self.disconnected()),
                Err(TryRecvError::Empty) => {}
            }
            // The reader queues every event before it marks the connection closed, so once
            // closed is seen and the queue is empty, nothing more can arrive.
            if self.closed.borrow().is_some() {
                return Err(self.disconnected());
            }
            tokio::select! {
                received = self.receiver.recv() => {
                    return match received {
                        Ok(event) => Ok(event),
                        Err(RecvError::Lagged(missed)) => Err(Error::EventsLagged { missed }),
                        Err(RecvError::Closed) => Err(self.disconnected()),
                    };
                }
                changed = self.closed.changed() => {
                    if changed.is_err() {
                        return Err(self.disconnected());
                    }
                }
            }
        }
    }

    fn disconnected(&self) -> Error {
        let reason = self.closed.borrow().clone();
        Error::Disconnected {
            reason: reason.unwrap_or_else(|| Arc::from("client shut down")),
        }
    }

    /// Waits up to `timeout` for the first event for which `matches` is true; events before it
    /// are consumed.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Arc<EventMessage>> {
        let search = async {
            loop {
                let message = self.next().await?;
                if matches(&message.event) {
                    return Ok(message);
                }
            }
        };
        tokio::time::timeout(timeout, search)
            .await
            .map_err(|_| Error::EventTimeout { after: timeout })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_events_decode_and_odd_ones_stay_raw() {
        let job = Event::decode(
            "JOB_STATUS_CHANGE".into(),
            json!({"id": "j1", "status": "concluded"}),
        );
        assert_eq!(
            job,
            Event::JobStatusChange(JobStatusChangeData {
                id: "j1".into(),
                status: JobStatus::Concluded
            })
        );
        // A newer status value is kept, not rejected.
        let newer = Event::decode(
            "JOB_STATUS_CHANGE".into(),
            json!({"id": "j1", "status": "teleporting"}),
        );
        assert_eq!(
            newer,
            Event::JobStatusChange(JobStatusChangeData {
                id: "j1".into(),
                status: JobStatus::Other("teleporting".into())
            })
        );
        // A missing field falls back to the raw form instead of failing the stream.
        let odd = Event::decode("SHUTDOWN".into(), json!({"guest": true}));
        assert!(matches!(&odd, Event::Unknown { name, .. } if name == "SHUTDOWN"));
        assert_eq!(odd.name(), "SHUTDOWN");
        let unknown = Event::decode("NIC_RX_FILTER_CHANGED".into(), json!({"path": "/x"}));
        assert_eq!(unknown.name(), "NIC_RX_FILTER_CHANGED");
    }
}
