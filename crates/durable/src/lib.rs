//! Crash-safe file writes, one home for every crate of domsnap.
//!
//! A file that a crash could leave half-written must never appear under its final name. Every
//! durable write here follows the same order: a private temporary file beside the destination
//! (unpredictable name, created `O_EXCL | O_NOFOLLOW`, mode 0600), its data, `fsync`, `rename`
//! (or `link` when an existing file must not be replaced), then `fsync` of the folder so the new
//! name itself survives a crash. A temporary that is dropped before it is persisted is removed.
//!
//! ```
//! use std::io::Write;
//! # fn main() -> Result<(), durable::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let dest = dir.path().join("meta.json");
//! durable::write_atomic(&dest, b"{}")?;
//!
//! let mut temp = durable::TempFile::create(&dest)?;
//! temp.file_mut().write_all(b"{\"v\": 2}").unwrap();
//! temp.persist(durable::Sync::Yes)?;
//! assert_eq!(std::fs::read(&dest).unwrap(), b"{\"v\": 2}");
//! # Ok(())
//! # }
//! ```

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Mode of every file domsnap writes: guest RAM and device state hold the guest's secrets.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every folder domsnap creates.
pub const DIR_MODE: u32 = 0o700;

/// A durable write that failed: what was being done, to which path, and why.
#[derive(Debug, thiserror::Error)]
#[error("{operation} {}: {source}", path.display())]
pub struct Error {
    /// What failed, e.g. "cannot fsync".
    pub operation: &'static str,
    /// The file or folder it failed on.
    pub path: PathBuf,
    /// The system's reason.
    #[source]
    pub source: io::Error,
}

impl Error {
    fn new(operation: &'static str, path: &Path, source: io::Error) -> Self {
        Error {
            operation,
            path: path.to_owned(),
            source,
        }
    }

    /// True when the destination already existed (see [`TempFile::persist_new`]).
    pub fn is_already_exists(&self) -> bool {
        self.source.kind() == ErrorKind::AlreadyExists
    }
}

/// Result of this crate's functions.
pub type Result<T> = std::result::Result<T, Error>;

/// Whether a persist waits for the data and the new name to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// fsync the file before the rename and the folder after it (survives power loss).
    Yes,
    /// Rename only: atomic against a crash of the process, not of the machine (benchmarks, tests).
    No,
}

/// A hidden, unpredictable name beside `dest` (another local user cannot guess it in advance and
/// plant a symlink there).
pub fn temporary_name(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}{TEMPORARY_MARK}{:016x}", hasher.finish()))
}

/// What separates a temporary's destination from its random suffix (16 hex digits).
const TEMPORARY_MARK: &str = ".partial-";
const TEMPORARY_SUFFIX_LEN: usize = 16;

/// The file name a temporary of [`temporary_name`] was to become, or `None` if `name` is not
/// such a temporary.
pub fn temporary_destination(name: &OsStr) -> Option<&str> {
    let name = name.to_str()?.strip_prefix('.')?;
    let (dest, suffix) = name.rsplit_once(TEMPORARY_MARK)?;
    let random = suffix.len() == TEMPORARY_SUFFIX_LEN && suffix.bytes().all(|b| b.is_ascii_hexdigit());
    (random && !dest.is_empty()).then_some(dest)
}

/// Removes the temporaries in `dir` (not below it) whose destination file name `of` accepts:
/// what a process killed in the middle of a write leaves. A temporary never carries its final
/// name, so nothing is lost; but a memory image's can be gigabytes. Call it only while no other
/// process may be writing into `dir` (e.g. holding the lock that all its writers hold). Returns
/// what was removed; a missing `dir` has nothing to remove.
pub fn remove_temporaries(dir: &Path, of: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::new("cannot list", dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::new("cannot list", dir, e))?;
        if !temporary_destination(&entry.file_name()).is_some_and(&of) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::new("cannot remove", &path, e)),
        }
    }
    if !removed.is_empty() {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Options for every file domsnap opens to write: created 0600, a symlink in its place refused
/// rather than followed (`O_NOFOLLOW`), not inherited by child processes (`O_CLOEXEC`). The
/// caller adds the access mode (read, write, append, create).
pub fn private_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    options
}

/// Opens a new private file at `path`: it must not exist (`O_EXCL`), and a symlink there is
/// refused rather than followed (`O_NOFOLLOW`).
pub fn create_new_private(path: &Path) -> Result<File> {
    private_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::new("cannot create", path, e))
}

/// Creates `dir` and its missing parents with mode 0700 (existing folders keep their mode).
pub fn create_private_dir_all(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::new("cannot create folder", dir, e))
}

/// Makes a rename or unlink in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::new("cannot fsync folder", dir, e))
}

/// Makes a rename into `path`'s folder durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    sync_dir(parent_dir(path))
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A private temporary file that becomes `dest` only when persisted; removed if dropped before.
#[derive(Debug)]
pub struct TempFile {
    file: File,
    path: PathBuf,
    dest: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates the temporary beside `dest` (same folder, so the rename is atomic).
    pub fn create(dest: &Path) -> Result<Self> {
        let path = temporary_name(dest);
        let file = create_new_private(&path)
            .map_err(|e| Error::new("cannot create a temporary file for", dest, e.source))?;
        Ok(TempFile {
            file,
            path,
            dest: dest.to_owned(),
            persisted: false,
        })
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The open file, to write through.
    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// The temporary's own path (for error messages; it goes away on persist or drop).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The final name.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// fsync (per `sync`), rename over `dest` (replacing what is there), fsync the folder.
    pub fn persist(mut self, sync: Sync) -> Result<()> {
        self.sync_data(sync)?;
        fs::rename(&self.path, &self.dest)
            .map_err(|e| Error::new("cannot rename into place", &self.path, e))?;
        self.persisted = true;
        self.sync_folder(sync)
    }

    /// Like [`TempFile::persist`], but never replaces an existing `dest`: the new name is a hard
    /// link, which fails with [`Error::is_already_exists`] if another process made `dest` first.
    pub fn persist_new(mut self, sync: Sync) -> Result<()> {
        self.sync_data(sync)?;
        fs::hard_link(&self.path, &self.dest).map_err(|e| Error::new("cannot create", &self.dest, e))?;
        // The temporary name is gone either way below; the link at `dest` is the file now.
        self.persisted = true;
        fs::remove_file(&self.path).map_err(|e| Error::new("cannot remove", &self.path, e))?;
        self.sync_folder(sync)
    }

    fn sync_data(&mut self, sync: Sync) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::new("cannot write", &self.path, e))?;
        if sync == Sync::Yes {
            self.file
                .sync_all()
                .map_err(|e| Error::new("cannot fsync", &self.path, e))?;
        }
        Ok(())
    }

    fn sync_folder(&self, sync: Sync) -> Result<()> {
        match sync {
            Sync::Yes => sync_parent(&self.dest),
            Sync::No => Ok(()),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: a temporary never carries the final name, so it never looks complete.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temp = TempFile::create(path)?;
    temp.file_mut()
        .write_all(bytes)
        .map_err(|e| Error::new("cannot write", path, e))?;
    temp.persist(Sync::Yes)
}

/// [`write_atomic`], unless `path` already holds exactly `bytes` (a redefinition or pointer
/// that changes nothing, e.g. a revert to the snapshot the domain is at): then it is only
/// synced, file and folder, which costs no journal commit when they are clean, and still makes
/// durable a write that a crash interrupted between its rename and its folder's sync. A symlink
/// at `path` is never read through: it is replaced. Returns whether it wrote.
pub fn write_atomic_if_changed(path: &Path, bytes: &[u8]) -> Result<bool> {
    if let Some(file) = holding(path, bytes) {
        file.sync_all().map_err(|e| Error::new("cannot fsync", path, e))?;
        sync_parent(path)?;
        return Ok(false);
    }
    write_atomic(path, bytes)?;
    Ok(true)
}

/// The regular file at `path` (not a symlink), opened, if it holds exactly `bytes`; any error
/// reading it means no. (`O_NONBLOCK`: a FIFO in its place must not hang the open.)
fn holding(path: &Path, bytes: &[u8]) -> Option<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let same_length = file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64);
    let mut current = Vec::with_capacity(bytes.len());
    let same = same_length && io::Read::read_to_end(&mut file, &mut current).is_ok() && current == bytes;
    same.then_some(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_writes_are_private_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a");
        write_atomic(&dest, b"one").unwrap();
        write_atomic(&dest, b"two").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(mode(&dest), 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unchanged_content_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a");
        assert!(
            write_atomic_if_changed(&dest, b"one").unwrap(),
            "a missing file is written"
        );
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let first = inode(&dest);
        assert!(!write_atomic_if_changed(&dest, b"one").unwrap());
        assert_eq!(inode(&dest), first, "the same content keeps the same file");
        for changed in [&b"two"[..], b"twofold", b""] {
            assert!(write_atomic_if_changed(&dest, changed).unwrap());
            assert_eq!(fs::read(&dest).unwrap(), changed);
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_holding_the_content_is_replaced_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"one").unwrap();
        let dest = dir.path().join("a");
        std::os::unix::fs::symlink(&elsewhere, &dest).unwrap();
        assert!(write_atomic_if_changed(&dest, b"one").unwrap());
        assert!(!fs::symlink_metadata(&dest).unwrap().file_type().is_symlink());
        assert_eq!(mode(&dest), 0o600);
    }

    #[test]
    fn temporary_names_are_not_predictable() {
        let dest = Path::new("/x/image");
        assert_ne!(temporary_name(dest), temporary_name(dest));
        assert_eq!(temporary_name(dest).parent(), Some(Path::new("/x")));
    }

    #[test]
    fn temporaries_are_told_from_other_files_by_name() {
        let temporary = temporary_name(Path::new("/x/memory.img"));
        assert_eq!(
            temporary_destination(temporary.file_name().unwrap()),
            Some("memory.img")
        );
        for other in [
            "memory.img",
            ".memory.img",
            ".memory.img.partial-",
            ".memory.img.partial-0123456789abcdeg",
            ".memory.img.partial-0123456789abcdef0",
            "memory.img.partial-0123456789abcdef",
            "..partial-0123456789abcdef",
        ] {
            assert_eq!(temporary_destination(OsStr::new(other)), None, "{other}");
        }
    }

    #[test]
    fn left_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let keep = ["meta.json", ".hidden", "current"];
        for name in keep {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        for dest in ["current", "memory.img"] {
            // Left as a process killed mid-write leaves it: never persisted nor dropped.
            std::mem::forget(TempFile::create(&dir.path().join(dest)).unwrap());
        }
        let other = temporary_name(&dir.path().join("other.img"));
        fs::write(&other, b"x").unwrap();
        let mut removed = remove_temporaries(dir.path(), |dest| dest != "other.img").unwrap();
        removed.sort();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut expected: Vec<String> = keep.iter().map(|n| n.to_string()).collect();
        expected.push(other.file_name().unwrap().to_str().unwrap().to_owned());
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(removed.len(), 2);
        assert!(remove_temporaries(&dir.path().join("missing"), |_| true)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_dropped_temporary_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let temp = TempFile::create(&dir.path().join("a")).unwrap();
        let path = temp.path().to_owned();
        assert!(path.exists());
        drop(temp);
        assert!(!path.exists());
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn persist_new_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("overlay");
        fs::write(&dest, b"someone else's").unwrap();
        let error = TempFile::create(&dest)
            .unwrap()
            .persist_new(Sync::Yes)
            .unwrap_err();
        assert!(error.is_already_exists(), "{error}");
        assert_eq!(fs::read(&dest).unwrap(), b"someone else's");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_new_private(&link).is_err());
        assert!(!target.exists());
    }

    #[test]
    fn private_folders() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        create_private_dir_all(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
    }
}
