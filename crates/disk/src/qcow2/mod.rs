//! Native qcow2 editing: header parsing, the snapshot table, refcounts, internal snapshot
//! operations, overlay creation and the data path for merging images of a chain. Pure Rust;
//! no QEMU needed at run time.

mod data;
pub mod header;
mod image;
mod ops;
mod overlay;
mod refcount;
pub mod snapshot_table;

pub(crate) use data::{Chain, Layer};
pub use image::{Access, Image};
pub use ops::CheckReport;
pub use overlay::create_overlay;
