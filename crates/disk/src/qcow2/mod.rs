//! Native qcow2 editing: header parsing, the snapshot table, refcounts, internal snapshot
//! operations, overlay creation and the data path for merging images of a chain. Pure Rust;
//! no QEMU needed at run time.
//!
//! # Hostile or broken images
//!
//! Everything below the header is checked before it is trusted, so that a crafted image costs work
//! and memory bounded by the file's real size and is refused with `Error::Invalid` naming the image
//! and the problem:
//!
//! - Metadata (L1 tables, L2 tables, refcount table and blocks, snapshot table) must lie inside the
//!   file; the length is checked before a buffer is allocated. A data or compressed cluster an L2
//!   entry names must start before the end of the file (`qemu-img check`: "exceeding the end of the
//!   file"). Refcount blocks are held in their on-disk encoding, one per distinct block.
//! - Two refcount table entries naming one block, or two entries of one L1 table naming one L2
//!   table, are corruption (QEMU counts such a table twice against its refcount) and refused.
//!   L2 tables shared *between* L1 tables (the active state and snapshots) are normal.
//! - Opening an image for writing runs the crate's check ([`Image::check`]: refcounts recomputed
//!   from the metadata, each distinct L1 and L2 table read once) against the loaded refcounts and
//!   refuses an image in which a cluster in use has a refcount lower than its references (e.g. a
//!   referenced cluster with refcount 0, or metadata overlapping data: an allocation could hand it
//!   out again and overwrite it), or whose refcounts claim clusters far past the end of the file
//!   (more than the file's size or 64 MiB beyond it: allocating after them would grow the file
//!   without bound). Leaks and COPIED flags are not refused (the operations fix the flags).
//! - The file only grows to cover clusters this crate allocated, and the refcount table is never
//!   grown past QEMU's 8 MiB (`QCOW_MAX_REFTABLE_SIZE`).
//! - Merges visit only the clusters the source layer maps (its L2 entries; a raw file's data
//!   extents from `SEEK_DATA`/`SEEK_HOLE`), not the virtual size: a 1 PiB sparse disk merges in
//!   time proportional to its data.
//! - Images and backing files must be regular files: the path is `stat`ed and a FIFO, device,
//!   socket or directory is refused without being opened (opening a FIFO blocks until a writer
//!   appears; opening a device may have side effects); the open uses `O_NONBLOCK | O_NOCTTY` and
//!   the opened file must be the regular file that was `stat`ed. Symbolic links are followed, as
//!   QEMU does. A backing image is opened as the format its child records (only `qcow2` and `raw`),
//!   never probed: a raw disk whose guest wrote a qcow2 header stays raw. Only an image recording
//!   no format is probed, as QEMU does.
//!
//! The fuzz targets `qcow2_header` and `qcow2_image` (`fuzz/`, `cargo xtask fuzz`) feed arbitrary
//! bytes to the parsers and to open, check, create, delete and apply; every crash they find becomes
//! a crafted-image test in `tests/native.rs` or `tests/offline_merge.rs` (the `hostile_*` tests).

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
