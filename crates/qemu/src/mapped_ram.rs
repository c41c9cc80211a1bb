//! Guest RAM mapped from a snapshot's memory image: the start of a lazy revert.
//!
//! The restoring QEMU maps the sealed image copy-on-write ([`StartMode::IncomingMapped`]): it
//! reads only the pages the guest touches, and the guest's writes stay in QEMU's private pages.
//! The image a running QEMU maps must not change under it and must outlive a delete of its
//! snapshot, so the driver hard-links it into the domain's run folder (`run/ram-base.img`) and
//! QEMU maps the link. The link shares the image's inode, whose mode becomes 0400 (sealed images
//! are never written). The run folder goes when QEMU ends (stop, destroy, the cleanup of a dead
//! QEMU's leftovers, the next start), and with it the last name of a deleted snapshot's image:
//! its data stays on disk exactly as long as a QEMU may read it.
//!
//! The link's existence marks the domain's RAM as private to QEMU: domsnap cannot read or write
//! it, so [`snapshot_core::Hypervisor::guest_memory`] refuses such a domain. A link cannot cross
//! filesystems (EXDEV) and some filesystems have none: the driver then starts the domain on
//! fresh shared RAM instead and says why, and the orchestrator copies the image into it.
//!
//! Before QEMU starts, the image's metadata is checked ([`memory::check_metadata`]: header,
//! length, footer, and the page table against its checksum; not the pages) and its size against
//! the domain's RAM. Once QEMU runs, the RAM layout QEMU reports is compared with the image's regions: the
//! image numbers its pages across its regions in guest-physical order, QEMU's file offsets must
//! follow the same order (they do for q35, also above 4 GiB).

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use memory::{FileRegion, RegionInfo};
use snapshot_core::{IncomingStart, Name};

use crate::{
    command_line::StartMode,
    driver::{io_error, DomainFiles, QemuDriver},
    error::{Error, Result},
    launch::Launch,
};

/// The name of the image's link in the run folder.
pub(crate) const RAM_BASE: &str = "ram-base.img";
/// The file beside it that names the image it links to.
pub(crate) const RAM_BASE_ORIGIN: &str = "ram-base.origin";
/// The mode of a mapped image: read-only for its owner.
const IMAGE_MODE: u32 = 0o400;

/// The memory image the domain's RAM is mapped from, if it is (its QEMU has not ended).
pub(crate) fn mapped_image(files: &DomainFiles) -> Option<PathBuf> {
    std::fs::symlink_metadata(&files.ram_base).ok()?;
    let origin = std::fs::read_to_string(&files.ram_base_origin).ok();
    Some(origin.map_or_else(|| files.ram_base.clone(), PathBuf::from))
}

/// What linking an image gave.
enum Linked {
    /// The link is in place: map it from `offset`; the image has `regions`.
    Yes { offset: u64, regions: Vec<RegionInfo> },
    /// It cannot be linked; the reason.
    No(String),
}

impl QemuDriver {
    /// Starts a prepared launch to receive its state with its RAM mapped from `image` (see the
    /// module documentation), falling back to fresh shared RAM when the image cannot be linked.
    pub(crate) async fn start_mapped(
        &self,
        name: &Name,
        launch: Launch,
        image: &Path,
    ) -> Result<IncomingStart> {
        let started = std::time::Instant::now();
        let image = std::path::absolute(image).map_err(io_error("cannot resolve", image))?;
        let linked = {
            let (image, link, origin) = (
                image.clone(),
                launch.files.ram_base.clone(),
                launch.files.ram_base_origin.clone(),
            );
            let ram_bytes = launch.config.memory_bytes();
            tokio::task::spawn_blocking(move || link_image(&image, &link, &origin, ram_bytes)).await
        };
        let fail = |reason: String| Error::MappedImage {
            domain: name.clone(),
            image: image.clone(),
            reason,
        };
        let checked = started.elapsed();
        let (offset, regions) = match linked {
            Ok(Ok(Linked::Yes { offset, regions })) => (offset, regions),
            Ok(Ok(Linked::No(reason))) => {
                tracing::warn!(domain = %name, %reason, "starting on fresh RAM instead of the image");
                self.spawn_qemu(name, &launch, StartMode::Incoming).await?;
                return Ok(IncomingStart::Fresh {
                    fallback: Some(reason),
                });
            }
            Ok(Err(reason)) => {
                let _ = launch.files.clean();
                return Err(fail(reason));
            }
            Err(error) => {
                let _ = launch.files.clean();
                return Err(fail(format!("the check did not finish: {error}")));
            }
        };
        let mode = StartMode::IncomingMapped {
            image: launch.files.ram_base.clone(),
            offset,
        };
        self.spawn_qemu(name, &launch, mode).await?;
        let spawned = started.elapsed();
        if let Err(reason) = self.check_mapped_layout(name, &launch, &regions).await {
            if let Err(error) = self.end_slot(name, &launch.files).await {
                tracing::warn!(domain = %name, %error, "cannot end the QEMU that maps a mismatched image");
            }
            return Err(fail(reason));
        }
        tracing::debug!(
            domain = %name, ?checked, ?spawned, done = ?started.elapsed(),
            "started on the mapped image"
        );
        Ok(IncomingStart::Mapped)
    }

    /// Checks that the started QEMU holds guest RAM where the image has it: the same regions,
    /// at file offsets in the image's page order.
    async fn check_mapped_layout(
        &self,
        name: &Name,
        launch: &Launch,
        regions: &[RegionInfo],
    ) -> std::result::Result<(), String> {
        let pid = launch
            .files
            .pid()
            .ok_or_else(|| "QEMU exited right after starting".to_owned())?;
        let client = self
            .client(name, &launch.files, pid)
            .await
            .map_err(|error| error.to_string())?;
        let mapped = crate::ram_layout(&client)
            .await
            .map_err(|error| error.to_string())?;
        layout_matches(regions, &mapped)
    }
}

/// Links `image` at `link` (mode 0400), records its path in `origin`, and checks its metadata
/// and its size against the domain's `ram_bytes`. An error is the reason, for
/// [`Error::MappedImage`].
fn link_image(
    image: &Path,
    link: &Path,
    origin: &Path,
    ram_bytes: u64,
) -> std::result::Result<Linked, String> {
    if let Err(error) = std::fs::hard_link(image, link) {
        return if cannot_link(&error) {
            Ok(Linked::No(format!(
                "memory image {} cannot be linked into {} ({error}): its data was copied into fresh \
                 RAM instead",
                image.display(),
                link.parent().unwrap_or(link).display()
            )))
        } else {
            Err(format!("cannot link it to {}: {error}", link.display()))
        };
    }
    std::fs::set_permissions(link, std::fs::Permissions::from_mode(IMAGE_MODE))
        .map_err(|error| format!("cannot make {} read-only: {error}", link.display()))?;
    durable::private_options()
        .write(true)
        .create_new(true)
        .open(origin)
        .and_then(|mut file| io::Write::write_all(&mut file, image.as_os_str().as_encoded_bytes()))
        .map_err(|error| format!("cannot write {}: {error}", origin.display()))?;
    let layout = memory::check_metadata(link).map_err(|error| error.to_string())?;
    if layout.ram_bytes() != ram_bytes {
        return Err(format!(
            "it holds {} MiB of RAM, the domain has {} MiB",
            layout.ram_bytes() >> 20,
            ram_bytes >> 20
        ));
    }
    Ok(Linked::Yes {
        offset: layout.data_offset(),
        regions: layout.regions().to_vec(),
    })
}

/// Whether a failed link means that this image cannot be linked here (another filesystem, one
/// without hard links, too many links), rather than a fault.
fn cannot_link(error: &io::Error) -> bool {
    use nix::libc::{EMLINK, EOPNOTSUPP, EPERM, EXDEV};
    error
        .raw_os_error()
        .is_some_and(|errno| [EXDEV, EPERM, EMLINK, EOPNOTSUPP].contains(&errno))
}

/// Whether QEMU's RAM layout `mapped` (sorted by guest address) puts the image's pages where
/// the image has them: the same regions, and file offsets that run through them in order, so
/// that image page `i` is RAM file page `i`.
fn layout_matches(image: &[RegionInfo], mapped: &[FileRegion]) -> std::result::Result<(), String> {
    let describe = |regions: Vec<(u64, u64)>| {
        regions
            .iter()
            .map(|(gpa, len)| format!("{gpa:#x}+{len:#x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let same_regions = image.len() == mapped.len()
        && image
            .iter()
            .zip(mapped)
            .all(|(a, b)| a.gpa == b.gpa && a.len == b.len);
    if !same_regions {
        return Err(format!(
            "QEMU maps RAM at {}, the image holds {}",
            describe(mapped.iter().map(|r| (r.gpa, r.len)).collect()),
            describe(image.iter().map(|r| (r.gpa, r.len)).collect())
        ));
    }
    let mut offset = 0u64;
    for region in mapped {
        if region.file_offset != offset {
            return Err(format!(
                "QEMU's RAM at {:#x} is at file offset {:#x}, the image has it at {offset:#x}",
                region.gpa, region.file_offset
            ));
        }
        offset = offset.saturating_add(region.len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, len: u64) -> RegionInfo {
        RegionInfo { gpa, len }
    }

    fn file(gpa: u64, len: u64, file_offset: u64) -> FileRegion {
        FileRegion {
            gpa,
            len,
            file_offset,
        }
    }

    #[test]
    fn the_image_order_must_be_the_ram_file_order() {
        let (g2, g4) = (2u64 << 30, 4u64 << 30);
        let image = [region(0, g2), region(g4, g2)];
        // q35 with 4 GiB: below 4G, then above 4G, in file order.
        layout_matches(&image, &[file(0, g2, 0), file(g4, g2, g2)]).unwrap();
        // The same regions with the file halves swapped: page i would be the wrong page.
        let error = layout_matches(&image, &[file(0, g2, g2), file(g4, g2, 0)]).unwrap_err();
        assert!(error.contains("file offset"), "{error}");
        // Another split.
        let error = layout_matches(&image, &[file(0, 3 << 30, 0), file(g4, 1 << 30, 3 << 30)]).unwrap_err();
        assert!(error.contains("the image holds 0x0+0x80000000"), "{error}");
        let error = layout_matches(&image[..1], &[file(0, g2, 0), file(g4, g2, g2)]).unwrap_err();
        assert!(error.contains("QEMU maps RAM at"), "{error}");
    }

    #[test]
    fn only_the_impossibility_of_a_link_falls_back() {
        for errno in [nix::libc::EXDEV, nix::libc::EPERM, nix::libc::EMLINK] {
            assert!(cannot_link(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [nix::libc::ENOENT, nix::libc::EACCES, nix::libc::ENOSPC] {
            assert!(!cannot_link(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn a_linked_image_is_read_only_named_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("memory.img");
        let mem = memory::GuestMemory::anonymous(1 << 20).unwrap();
        mem.write(0x3000, b"page three").unwrap();
        let sink =
            memory::ImageWriter::create(&image, memory::ImageLayout::of(&mem), memory::Durability::NoSync)
                .unwrap();
        memory::save_paused(&mem, Box::new(sink)).unwrap();
        let (link, origin) = (dir.path().join(RAM_BASE), dir.path().join(RAM_BASE_ORIGIN));

        let error = link_image(&image, &link, &origin, 2 << 20).err().unwrap();
        assert!(
            error.contains("holds 1 MiB of RAM, the domain has 2 MiB"),
            "{error}"
        );
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&origin).unwrap();

        let Ok(Linked::Yes { offset, regions }) = link_image(&image, &link, &origin, 1 << 20) else {
            panic!("not linked");
        };
        assert_eq!((offset, regions), (4096, vec![region(0, 1 << 20)]));
        let mode = std::fs::metadata(&image).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
        assert_eq!(std::fs::read_to_string(&origin).unwrap(), image.to_str().unwrap());
        // Page 3 is where QEMU will map it.
        let data = std::fs::read(&link).unwrap();
        let at = usize::try_from(offset).unwrap() + 0x3000;
        assert_eq!(&data[at..at + 10], b"page three");

        // A damaged page table is refused.
        let (damaged, link2) = (dir.path().join("damaged.img"), dir.path().join("link2"));
        let mut bytes = data.clone();
        let table = bytes.len() - 48 - 8;
        bytes[table] ^= 1;
        std::fs::write(&damaged, bytes).unwrap();
        let error = link_image(&damaged, &link2, &dir.path().join("o2"), 1 << 20)
            .err()
            .unwrap();
        assert!(error.contains("corrupt memory image"), "{error}");
    }
}
