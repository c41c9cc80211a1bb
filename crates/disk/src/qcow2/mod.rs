//! Native qcow2 editing: header parsing, the snapshot table, refcounts, internal snapshot
//! operations and overlay creation. Pure Rust; no QEMU needed at run time.

pub mod header;
mod image;
mod ops;
mod overlay;
mod refcount;
pub mod snapshot_table;

pub use image::{Access, Image};
pub use ops::CheckReport;
pub use overlay::create_overlay;
