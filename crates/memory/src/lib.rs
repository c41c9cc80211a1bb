//! Guest memory images and the live (pre-copy) save engine.
//!
//! This crate saves a domain's RAM into an image file and restores it, with the domain paused or live
//! (iterative pre-copy, as in live migration). It knows nothing about any hypervisor: it works on
//! [`GuestMemory`] (regions of guest-physical memory mapped into this process, e.g. QEMU's shared RAM
//! file) and a [`DirtySource`] that says which pages changed.
//!
//! - [`GuestMemory`]: regions (guest-physical base, length, host mapping) of anonymous memory or of a
//!   shared RAM file ([`GuestMemory::from_ram_file`]).
//! - Dirty-page sources: [`ContentCompare`] (page hashes compared between rounds; works on memory that
//!   another process writes), [`UffdWriteProtect`] (userfaultfd asynchronous write-protect with
//!   PAGEMAP_SCAN, for memory this process writes) and [`Everything`] (for a paused save).
//! - [`LiveSave`]: `begin` (round 0), [`LiveSave::round`] / [`LiveSave::precopy`] with a
//!   [`ConvergencePolicy`], [`LiveSave::finish`] after the caller paused the domain, then
//!   [`Finished::seal`]. [`save_paused`] does it in one pass.
//! - The image format v1 (`docs/memory-image-format.md`): [`ImageWriter`] writes it,
//!   [`verify`] checks it, [`restore`] loads it back, [`check_metadata`] checks all but its pages
//!   (for a hypervisor that maps the image). Its stream form, for pipes and sockets:
//!   [`StreamWriter`] and [`receive_stream`]. [`PageImport`] builds an image from pages pushed in any
//!   order by a producer it does not drive (a parser of a hypervisor's own save stream).
//!
//! CPU-bound work runs on scoped std threads, one per core. [`reference`](mod@reference) holds simple single-threaded
//! versions of the algorithms that the tests compare the fast paths with.
//!
//! # Saving and restoring a QEMU domain
//! 1. Start QEMU with its RAM in a shared file (`-object memory-backend-file,id=mem,size=SIZE,
//!    mem-path=/dev/shm/NAME,share=on -machine memory-backend=mem`) and map it with
//!    [`GuestMemory::from_ram_file`], one [`FileRegion`] per guest-physical range (take the layout from
//!    QEMU: above 2 GiB q35 splits RAM around the PCI hole). Holes of the file (memory the guest
//!    never touched) are found with `mincore` and `SEEK_DATA` and never read, so scanning neither
//!    fills a sparse RAM file nor spends time on it.
//! 2. [`LiveSave::begin`] with [`ContentCompare`] (write-protection cannot see QEMU's writes) and an
//!    [`ImageWriter`]; [`LiveSave::precopy`] until the policy says stop.
//! 3. Pause the domain, [`LiveSave::finish`] (its duration is the memory part of the pause), save the
//!    device state, resume or stop the domain, then [`Finished::seal`].
//! 4. To restore: create a fresh RAM file of the same size, map it, [`restore`] with
//!    [`ZeroPages::AssumeZeroed`], then start QEMU on that file with `-incoming defer` and load the
//!    device state.
//!
//! # Why not rust-vmm `vm-memory`
//! `vm-memory` was evaluated for [`GuestMemory`]. Its `GuestMemoryMmap` can map file-backed regions
//! and its accessors are careful about memory shared with a guest, but this crate needs neither its
//! bitmap (it tracks only writes made through `vm-memory`'s own accessors, not writes by a hypervisor in
//! another process or by vCPUs) nor its per-access address translation: the hot loops here want one raw
//! host range per region, scanned and hashed at memory bandwidth, and pread straight into on restore.
//! What is used fits in one small module, without pulling `vm-memory` and `vmm-sys-util` into every
//! user of the toolstack. An in-process VMM built on `vm-memory` maps the same (address, length,
//! file, offset) regions into a [`GuestMemory`] with [`GuestMemoryBuilder::file`].
//!
//! # Example
//! ```
//! use memory::{restore, save_paused, verify, Durability, GuestMemory, ImageLayout, ImageWriter, RestoreOptions};
//!
//! # fn main() -> Result<(), memory::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("ram.img");
//!
//! let mem = GuestMemory::anonymous(1 << 20)?;
//! mem.write(0x2000, b"hello")?;
//! let sink = ImageWriter::create(&path, ImageLayout::of(&mem), Durability::Sync)?;
//! let summary = save_paused(&mem, Box::new(sink))?;
//! assert_eq!(summary.present_pages, 1);
//!
//! assert_eq!(verify(&path)?.present_pages, 1);
//! let target = GuestMemory::anonymous(1 << 20)?;
//! restore(&path, &target, &RestoreOptions::default())?;
//! let mut buf = [0u8; 5];
//! target.read(0x2000, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! # Ok(())
//! # }
//! ```

mod direct;
mod dirty;
mod error;
mod format;
mod guest;
mod image;
mod import;
mod num;
mod page_buf;
mod par;
pub mod reference;
mod save;
mod stream;
mod table;
mod writeback;

pub use dirty::{ContentCompare, DirtySource, Everything, UffdWriteProtect};
pub use error::{Error, Result};
pub use format::{ImageLayout, RegionInfo, FORMAT_VERSION, OLDEST_FORMAT_VERSION};
pub use guest::{Backing, FileRegion, GuestMemory, GuestMemoryBuilder, Region, PAGE_SIZE};
pub use image::{
    check_metadata, restore, verify, Durability, ImageInfo, ImageReader, ImageWriter, PageSink, ReadAt,
    RestoreOptions, RestoreStats, ZeroPages,
};
pub use import::{ImportStats, PageImport};
pub use save::{
    copy_paused, save_paused, ConvergencePolicy, Finished, LiveSave, Progress, RoundStats, SaveOptions,
    SaveSummary, StopReason,
};
pub use stream::{receive_stream, ReceiveOptions, StreamWriter};
pub use table::{DirtySet, PageState, PageTable};
