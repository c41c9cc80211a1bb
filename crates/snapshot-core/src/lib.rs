//! Hypervisor-agnostic orchestration of whole-domain snapshots: create, delete, revert.
//!
//! This crate knows no QEMU. It holds the snapshot metadata ([`SnapshotRecord`]), the tree of a
//! domain's snapshots ([`SnapshotTree`]) and the store that keeps them under a state directory
//! ([`SnapshotStore`], [`FsStore`]) with atomic writes and a per-domain lock. The create / delete /
//! revert orchestration over the domain, memory and disk traits arrives with the orchestrator
//! issue; see `docs/architecture.md`.
//!
//! ```
//! use std::time::Duration;
//! use snapshot_core::{FsStore, Name, SnapshotStore};
//!
//! # fn main() -> snapshot_core::Result<()> {
//! let state = tempfile::tempdir().unwrap();
//! let store = FsStore::new(state.path());
//! let domain = Name::new("demo")?;
//! let _lock = store.lock(&domain, Duration::from_secs(5))?;
//! assert!(store.list(&domain)?.is_empty());
//! assert!(Name::new("../escape").is_err());
//! # Ok(())
//! # }
//! ```

mod error;
mod hypervisor;
mod intent;
mod metadata;
mod name;
mod orchestrator;
mod store;
mod tree;

pub use error::{Error, Operation, Result, Step};
pub use hypervisor::{DiskTarget, DriverError, DriverResult, Hypervisor, MockHypervisor, StreamedSave};
pub use intent::Intent;
pub use metadata::{
    Consistency, DiskRecord, DiskSnapshot, DomainState, MemoryState, SnapshotRecord, METADATA_VERSION,
};
pub use name::{Name, MAX_NAME_LEN};
pub use orchestrator::{
    CreateOptions, CreateReport, DeleteReport, DiskKind, DiskRequest, MemoryMode, Observer, Orchestrator,
    Quiet, Recovery, RevertReport, RoundReport, VerifyReport, BACKGROUND_FROM_RAM_BYTES,
};
pub use store::{write_atomic, DomainLock, FsStore, MockSnapshotStore, SnapshotFiles, SnapshotStore};
pub use tree::SnapshotTree;
