//! Guest RAM in huge pages: a domain with `hugepages = "/dev/hugepages"` keeps its RAM file on
//! that hugetlbfs mount instead of tmpfs.
//!
//! Why a user wants it: QEMU's background snapshot write-protects all guest RAM with userfaultfd
//! while the guest is stopped, one page-table entry per page. On this machine that is about
//! 100 ms for 4 GiB of 4 KiB pages and 1–3 ms in 2 MiB pages (see `docs/benchmarks.md`); KVM
//! hosts use huge pages for the TLB as well.
//!
//! The RAM file keeps its tmpfs name (`files`), as a symbolic link to the file on the mount: every
//! reader (QEMU's `mem-path`, domsnap's direct read and restore) opens the same path, and the
//! cleanup of a run slot finds the huge-page file from the link alone, whatever the definition
//! says by then. Huge pages are a reserved pool (`vm.nr_hugepages`), so a start checks that
//! the pool has the pages before QEMU runs and names what is missing.

use std::{
    fs::{self, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::statfs::{statfs, HUGETLBFS_MAGIC};

/// The page size of the hugetlbfs mount `mount`, checked to hold guests of `memory_bytes`; the
/// error is the reason, for the configuration's message.
pub(crate) fn page_size(mount: &Path, memory_bytes: u64) -> Result<u64, String> {
    let key = format!("hugepages = {:?}", mount.display().to_string());
    let stats = statfs(mount).map_err(|errno| format!("{key}: cannot look at it: {errno}"))?;
    if stats.filesystem_type() != HUGETLBFS_MAGIC {
        return Err(format!(
            "{key} is not a hugetlbfs mount (mount one with `mount -t hugetlbfs none {}`)",
            mount.display()
        ));
    }
    let page = u64::try_from(stats.block_size()).map_err(|_| format!("{key}: no page size"))?;
    if page == 0 || memory_bytes % page != 0 {
        return Err(format!(
            "{key}: memory_mib must be a multiple of its page size, {} KiB",
            page / 1024
        ));
    }
    Ok(page)
}

/// Pages of `page_size` the kernel's pool can still give a new mapping: free and not reserved
/// by another mapping already (`/sys/kernel/mm/hugepages`), and within the mount's own limit
/// (its `size=` option) if it has one.
fn available_pages(mount: &Path, page_size: u64) -> io::Result<u64> {
    let pool = PathBuf::from(format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB",
        page_size / 1024
    ));
    let read = |name: &str| -> io::Result<u64> {
        let path = pool.join(name);
        fs::read_to_string(&path)?.trim().parse().map_err(|error| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: {error}", path.display()))
        })
    };
    let pool_free = read("free_hugepages")?.saturating_sub(read("resv_hugepages")?);
    let stats = statfs(mount).map_err(io::Error::from)?;
    let limited = stats.blocks() > 0;
    Ok(if limited {
        pool_free.min(stats.blocks_available())
    } else {
        pool_free
    })
}

/// How long a start waits for huge pages that are not free yet: a QEMU that has just ended
/// (a stop, or the old QEMU of a revert) gives its pages back while the kernel tears its
/// address space down, after its exit was seen.
const FREEING_GRACE: Duration = Duration::from_secs(3);

/// Waits until `needed` pages of `page` bytes are available for `mount`, for at most
/// [`FREEING_GRACE`].
fn wait_for_pages(mount: &Path, page: u64, needed: u64) -> Result<(), HugePageError> {
    let deadline = Instant::now() + FREEING_GRACE;
    loop {
        let available = available_pages(mount, page).map_err(|source| HugePageError::Io {
            what: "cannot count the free huge pages for",
            path: mount.to_owned(),
            source,
        })?;
        if available >= needed {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HugePageError::TooFew {
                needed,
                available,
                page,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Creates the RAM file of `memory_bytes` on the hugetlbfs `mount` (mode 0600), named as `link`,
/// and `link` pointing to it. Fails with the reason, before anything is created, when the pool
/// lacks the pages (after waiting briefly for pages being given back).
pub(crate) fn create_ram_file(link: &Path, mount: &Path, memory_bytes: u64) -> Result<(), HugePageError> {
    let page = page_size(mount, memory_bytes).map_err(HugePageError::Mount)?;
    let needed = memory_bytes / page;
    wait_for_pages(mount, page, needed)?;
    let target = mount.join(link.file_name().unwrap_or(link.as_os_str()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .map_err(|source| HugePageError::Io {
            what: "cannot create the RAM file",
            path: target.clone(),
            source,
        })?;
    std::os::unix::fs::symlink(&target, link).map_err(|source| {
        let _ = fs::remove_file(&target);
        HugePageError::Io {
            what: "cannot create the RAM file's link",
            path: link.to_owned(),
            source,
        }
    })
}

/// The huge-page file `link` points to, if `link` is a RAM file link this process's user made:
/// owned by us, to a file of the same name on hugetlbfs. Anything else in its place (a plain
/// tmpfs RAM file, or a link somebody else planted in `/dev/shm`) is not followed.
pub(crate) fn linked_ram_file(link: &Path) -> Option<PathBuf> {
    let meta = fs::symlink_metadata(link).ok()?;
    if !meta.file_type().is_symlink() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return None;
    }
    let target = fs::read_link(link).ok()?;
    let on_hugetlbfs = target
        .parent()
        .and_then(|dir| statfs(dir).ok())
        .is_some_and(|stats| stats.filesystem_type() == HUGETLBFS_MAGIC);
    (on_hugetlbfs && target.file_name() == link.file_name()).then_some(target)
}

/// Why guest RAM cannot be made in huge pages.
#[derive(Debug, thiserror::Error)]
pub enum HugePageError {
    /// The mount is not hugetlbfs, or does not fit the guest's size.
    #[error("{0}")]
    Mount(String),
    /// The pool has fewer free pages than the guest needs.
    #[error(
        "the guest needs {needed} huge pages of {} KiB and {available} are free; reserve more \
         (sysctl vm.nr_hugepages) or end another user of them",
        page / 1024
    )]
    TooFew {
        /// Pages the guest's RAM takes.
        needed: u64,
        /// Pages free for it.
        available: u64,
        /// The page size, in bytes.
        page: u64,
    },
    /// A file cannot be made or read.
    #[error("{what} {}", path.display())]
    Io {
        /// What failed.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_that_is_not_hugetlbfs_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let reason = page_size(dir.path(), 1 << 30).unwrap_err();
        assert!(reason.contains("is not a hugetlbfs mount"), "{reason}");
        assert!(reason.contains(&dir.path().display().to_string()), "{reason}");
        let missing = page_size(&dir.path().join("gone"), 1 << 30).unwrap_err();
        assert!(missing.contains("cannot look at it"), "{missing}");
    }

    #[test]
    fn only_our_own_link_to_a_huge_page_file_of_the_same_name_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("domsnap-0-0-vm.ram");
        fs::write(&plain, b"").unwrap();
        assert_eq!(linked_ram_file(&plain), None, "a plain RAM file");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"").unwrap();
        let link = dir.path().join("domsnap-0-0-other.ram");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        assert_eq!(
            linked_ram_file(&link),
            None,
            "a link to a file that is not on hugetlbfs"
        );
        assert_eq!(linked_ram_file(&dir.path().join("missing")), None);
    }
}
