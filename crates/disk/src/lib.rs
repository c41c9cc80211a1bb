//! Disk snapshots for domsnap: qcow2 internal snapshots and external overlays, for disks of a
//! running QEMU (over QMP) and of a shut-off domain (by editing the qcow2 images natively).
//!
//! - [`DiskSnapshots`] is the one trait the orchestrator uses; it names each disk by the path
//!   of its active image and knows nothing of QEMU. Enable the `mock` feature for
//!   `MockDiskSnapshots`.
//! - [`LiveBackend`] drives a running QEMU: atomic `transaction`s across all disks, overlays
//!   through `blockdev-add` + `blockdev-snapshot`, merges through `block-commit` /
//!   `block-stream` jobs.
//! - [`OfflineBackend`] (and the synchronous functions in [`offline`]) edits qcow2 images in
//!   pure Rust ([`qcow2`]): list, create, delete and apply internal snapshots with QEMU's
//!   crash-safe write ordering, create overlays, and delete external snapshots by streaming or
//!   committing their data. Images a QEMU holds are refused.
//!
//! The write ordering of the native operations is explained in `docs/qcow2-snapshots.md`.
//!
//! ```no_run
//! use std::path::PathBuf;
//! use disk::{DiskSnapshots, OfflineBackend};
//!
//! # async fn demo() -> disk::Result<()> {
//! let backend = OfflineBackend;
//! let disks = vec![PathBuf::from("/var/lib/domsnap/vm1/root.qcow2")];
//! backend.create_internal(&disks, "before-upgrade").await?;
//! for snapshot in backend.list_internal(&disks[0]).await? {
//!     println!("{} {} taken at {}", snapshot.id, snapshot.name, snapshot.date_sec);
//! }
//! backend.apply_internal(&disks, "before-upgrade").await?;
//! backend.delete_internal(&disks, "before-upgrade").await?;
//! # Ok(())
//! # }
//! ```

mod api;
mod error;
#[cfg(feature = "live")]
mod live;
mod lock;
pub mod names;
mod num;
pub mod offline;
pub mod qcow2;
mod regular;

pub use api::internal_by_name;
#[cfg(any(test, feature = "mock"))]
pub use api::MockDiskSnapshots;
pub use api::{
    BackingPath, ChainImage, DiskSnapshots, ExternalSnapshot, InternalSnapshot, MergeMethod, NewInternal,
};
pub use error::{Error, Result};
#[cfg(feature = "live")]
pub use live::LiveBackend;
pub use offline::OfflineBackend;
