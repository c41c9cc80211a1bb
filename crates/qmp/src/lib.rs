//! An async client for QMP, the QEMU Machine Protocol, built for toolstacks.
//!
//! - One connection, many tasks: [`Client`] is a cheap clone; requests carry ids and replies
//!   are routed back to their callers, so calls from different tasks interleave freely.
//! - Typed commands ([`commands`]) with open enums that survive values from newer QEMUs, and
//!   [`Client::execute_raw`] for anything else.
//! - Typed events ([`Event`]) with an [`Event::Unknown`] fallback, per-subscriber streams and
//!   [`EventStream::wait_for`].
//! - Jobs run to completion with [`Client::run_job`] (errors read, job dismissed).
//! - A client for the guest agent ([`GuestAgent`]): synchronised, bounded, with filesystem
//!   freeze and thaw for quiesced snapshots.
//! - File descriptors passed with SCM_RIGHTS ([`Client::getfd`], [`Client::add_fd`]).
//! - Per-call timeouts ([`Client::with_timeout`]); a dead connection fails every pending call at
//!   once; malformed or over-long input closes the connection with a clear error.
//! - Request ids are unique across connections and processes (`"<random tag>-<n>"`, the
//!   handshake included). QEMU hands the reply to a command whose client went away to whoever is
//!   connected when it finishes; a reply that matches no pending call (another connection's id,
//!   or no id) is logged with `tracing::warn!` and dropped, and the connection stays open.
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp::{commands::QueryStatus, Client, ClientOptions, Event};
//!
//! # async fn demo() -> qmp::Result<()> {
//! let qmp = Client::connect_unix("/run/demo/qmp.sock", ClientOptions::default()).await?;
//! println!("QEMU {}", qmp.greeting().version.qemu);
//!
//! let mut events = qmp.subscribe();
//! let status = qmp.execute(&QueryStatus).await?;
//! println!("running: {} ({})", status.running, status.status);
//!
//! qmp.execute(&qmp::commands::Stop).await?;
//! events.wait_for(Duration::from_secs(5), |e| matches!(e, Event::Stop)).await?;
//! # Ok(())
//! # }
//! ```

mod agent;
mod client;
pub mod commands;
mod error;
mod events;
mod fds;
mod jobs;
mod types;
pub mod wire;

pub use agent::{FsfreezeStatus, GuestAgent};
pub use client::{Client, ClientOptions};
pub use error::{Error, Result};
pub use events::{
    BlockJobData, BlockJobErrorData, Event, EventMessage, EventStream, JobStatusChangeData, MigrationData,
    MigrationPassData, ShutdownData, Timestamp,
};
pub use jobs::JobOptions;
pub use types::{Empty, Greeting, JobStatus, JobType, MigrationStatus, RunState, VersionInfo, VersionTriple};
