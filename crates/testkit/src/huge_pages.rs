//! Huge pages for the tests and benches of domains with `hugepages` (guest RAM on hugetlbfs).
//!
//! The pool of 2 MiB pages is the host's (`vm.nr_hugepages`), so a test grows it for as long as
//! it needs it and gives back what it added: [`reserve_huge_pages`] returns a guard that sets
//! the pool back. The kernel never shrinks the pool below the pages in use or promised to a
//! mapping, so giving back while another user holds pages is safe. Both need root, as CI is.

use std::{
    fs,
    path::Path,
    process::Command,
    sync::{Mutex, MutexGuard},
};

/// The hugetlbfs mount the tests and benches give their domains (Debian's systemd mounts it;
/// [`reserve_huge_pages`] mounts it where it is missing).
pub const HUGE_PAGES_MOUNT: &str = "/dev/hugepages";
/// The huge page size the pool is grown in.
pub const HUGE_PAGE_BYTES: u64 = 2 << 20;

const POOL: &str = "/proc/sys/vm/nr_hugepages";
const POOL_STATE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
/// `HUGETLBFS_MAGIC` of `statfs(2)`.
const HUGETLBFS_MAGIC: &str = "958458f6";

/// One reservation at a time: two tests growing the pool at once would each count the other's
/// pages as theirs.
static RESERVING: Mutex<()> = Mutex::new(());

/// The pool grown for a test; dropping it sets the pool back to its size before.
#[derive(Debug)]
pub struct HugePages {
    before: u64,
    _serial: MutexGuard<'static, ()>,
}

impl HugePages {
    /// Shrinks the pool until exactly `pages` huge pages are available (for a test of a start
    /// that must wait for pages); the guard still sets the pool back on drop.
    pub fn leave_available(&self, pages: u64) -> Result<(), String> {
        let free = huge_pages_available()?;
        if free > pages {
            let total = read_number(Path::new(POOL))?;
            let smaller = total - (free - pages);
            fs::write(POOL, smaller.to_string())
                .map_err(|error| format!("cannot shrink vm.nr_hugepages to {smaller}: {error}"))?;
        }
        match huge_pages_available()? {
            now if now == pages => Ok(()),
            now => Err(format!("asked to leave {pages} huge pages available, {now} are")),
        }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Err(error) = fs::write(POOL, self.before.to_string()) {
            eprintln!(
                "testkit: cannot set vm.nr_hugepages back to {}: {error}",
                self.before
            );
        }
    }
}

/// Makes `pages` huge pages of 2 MiB free for a new mapping on [`HUGE_PAGES_MOUNT`], mounting it
/// and growing the pool as needed. Err says what failed (not root, or the kernel found too
/// little contiguous memory).
pub fn reserve_huge_pages(pages: u64) -> Result<HugePages, String> {
    let serial = RESERVING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    mount_if_missing()?;
    let before = read_number(Path::new(POOL))?;
    let free = huge_pages_available()?;
    if free < pages {
        let wanted = before + (pages - free);
        fs::write(POOL, wanted.to_string())
            .map_err(|error| format!("cannot grow vm.nr_hugepages to {wanted} (root is needed): {error}"))?;
        let now = huge_pages_available()?;
        if now < pages {
            let _ = fs::write(POOL, before.to_string());
            return Err(format!(
                "asked for {pages} free huge pages, the kernel found memory for {now} (vm.nr_hugepages {wanted})"
            ));
        }
    }
    Ok(HugePages {
        before,
        _serial: serial,
    })
}

/// Free huge pages not promised to a mapping.
pub fn huge_pages_available() -> Result<u64, String> {
    let state = Path::new(POOL_STATE);
    Ok(read_number(&state.join("free_hugepages"))?
        .saturating_sub(read_number(&state.join("resv_hugepages"))?))
}

fn mount_if_missing() -> Result<(), String> {
    let kind = Command::new("stat")
        .args(["-f", "-c", "%t", HUGE_PAGES_MOUNT])
        .output()
        .map_err(|error| format!("cannot run stat: {error}"))?;
    if String::from_utf8_lossy(&kind.stdout).trim() == HUGETLBFS_MAGIC {
        return Ok(());
    }
    fs::create_dir_all(HUGE_PAGES_MOUNT)
        .map_err(|error| format!("cannot create {HUGE_PAGES_MOUNT}: {error}"))?;
    let status = Command::new("mount")
        .args(["-t", "hugetlbfs", "none", HUGE_PAGES_MOUNT])
        .status()
        .map_err(|error| format!("cannot run mount: {error}"))?;
    if !status.success() {
        return Err(format!(
            "mount -t hugetlbfs none {HUGE_PAGES_MOUNT} failed ({status})"
        ));
    }
    Ok(())
}

fn read_number(path: &Path) -> Result<u64, String> {
    let text =
        fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|error| format!("{}: {text:?} is not a number: {error}", path.display()))
}
