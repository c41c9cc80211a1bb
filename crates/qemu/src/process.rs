//! The QEMU process seen from outside: which binary, whether a pid is still our QEMU, waiting
//! for it to exit, killing it, and the end of its log.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

/// Environment variable naming the `qemu-system-x86_64` binary to use.
pub const QEMU_ENV: &str = "DOMSNAP_QEMU";

/// The QEMU major version the driver is built for (its command line and QMP use).
const QEMU_MAJOR: u32 = 10;

/// How often [`wait_exit`] looks again during its first [`EXIT_POLL_FAST_FOR`]: a revert's guest
/// has no process from the old QEMU's `quit` until the wait ends, and QEMU is gone a few ms
/// after `quit` (the revert's stop step took 2.6–4.4 ms with this, 2.0–10.5 ms looking every
/// 5 ms). A look is one read of `/proc/PID/cmdline`. A pidfd was tried and is slower: it is
/// told only once the kernel has torn down QEMU's address space, while the command line
/// empties when the teardown starts (QEMU has closed its images by then).
const EXIT_POLL_FAST: Duration = Duration::from_millis(1);
const EXIT_POLL_FAST_FOR: Duration = Duration::from_millis(100);
/// How often it looks after that (a clean shutdown can take seconds).
const EXIT_POLL: Duration = Duration::from_millis(5);

/// The bytes of QEMU's stderr quoted in errors.
const STDERR_TAIL: usize = 2048;

/// `$DOMSNAP_QEMU`, else `qemu-system-x86_64` (from `PATH`).
fn configured_binary() -> PathBuf {
    std::env::var_os(QEMU_ENV)
        .filter(|value| !value.is_empty())
        .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from)
}

/// A binary as it was when it passed the version check: its path and the identity of its file
/// (a replaced or changed file has another inode or change time).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Checked {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Checked {
    /// The file `binary` names (a bare name is looked up in `PATH`, as the start does).
    fn of(binary: &Path) -> Option<Checked> {
        let path = if binary.components().count() > 1 {
            binary.to_owned()
        } else {
            let paths = std::env::var_os("PATH")?;
            std::env::split_paths(&paths)
                .map(|dir| dir.join(binary))
                .find(|candidate| candidate.is_file())?
        };
        let path = fs::canonicalize(path).ok()?;
        let meta = fs::metadata(&path).ok()?;
        Some(Checked {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            path,
        })
    }
}

/// [`find_qemu`], remembered in the file `record`: while the binary's file is the one that
/// passed last time, it is not run again (`qemu --version` costs tens of milliseconds, in the
/// path of every start and so of every revert). Any doubt runs the check.
pub(crate) async fn find_qemu_remembered(record: &Path) -> Result<PathBuf> {
    remembered(&configured_binary(), record, find_qemu()).await
}

/// A value learnt from the QEMU binary `binary` (by `learn`), remembered in the file `record`
/// with the identity of the binary's file: while the file stays the same, `learn` does not run
/// again. A record that cannot be read or written only costs the learning.
pub(crate) async fn remembered<T, F>(binary: &Path, record: &Path, learn: F) -> Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    F: std::future::Future<Output = Result<T>>,
{
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Record<T> {
        #[serde(flatten)]
        binary: Checked,
        value: T,
    }
    let identity = Checked::of(binary);
    if let (Some(identity), Ok(text)) = (&identity, fs::read(record)) {
        match serde_json::from_slice::<Record<T>>(&text) {
            Ok(recorded) if recorded.binary == *identity => return Ok(recorded.value),
            _ => {}
        }
    }
    let value = learn.await?;
    if let Some(binary) = identity {
        let record_of = Record { binary, value };
        let written = serde_json::to_vec(&record_of)
            .map_err(|error| error.to_string())
            .and_then(|text| durable::write_atomic(record, &text).map_err(|error| error.to_string()));
        if let Err(error) = written {
            tracing::debug!(%error, record = %record.display(), "cannot remember what QEMU said");
        }
        return Ok(record_of.value);
    }
    Ok(value)
}

/// `$DOMSNAP_QEMU`, else `qemu-system-x86_64` from `PATH`, checked to be QEMU 10.
pub(crate) async fn find_qemu() -> Result<PathBuf> {
    let binary = configured_binary();
    let text = qemu_output(&binary, &["--version"]).await?;
    let first_line = text.lines().next().unwrap_or_default().to_owned();
    match parse_major(&first_line) {
        Some(QEMU_MAJOR) => Ok(binary),
        _ => Err(Error::QemuVersion {
            binary,
            found: first_line,
        }),
    }
}

/// What the QEMU binary prints on stdout when run with `args` (`--version`, `-machine help`).
pub(crate) async fn qemu_output(binary: &Path, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .output()
        .await
        .map_err(|source| Error::QemuNotFound {
            binary: binary.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The major version in `QEMU emulator version 10.0.2 (...)`.
fn parse_major(line: &str) -> Option<u32> {
    line.split_whitespace()
        .skip_while(|word| *word != "version")
        .nth(1)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The pid in QEMU's pid file, if the file holds one.
pub(crate) fn read_pid(pid_file: &Path) -> Option<u32> {
    fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live process whose command line names `marker` (the domain's QMP socket
/// as it appears in QEMU's arguments). This guards against a recycled pid; a zombie has an
/// empty command line, so it counts as exited.
pub(crate) fn is_our_qemu(pid: u32, marker: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.windows(marker.len()).any(|window| window == marker))
}

/// Waits up to `timeout` for the process to be gone; returns whether it is.
pub(crate) async fn wait_exit(pid: u32, marker: &[u8], timeout: Duration) -> bool {
    let started = Instant::now();
    loop {
        if !is_our_qemu(pid, marker) {
            return true;
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return false;
        }
        let poll = match waited < EXIT_POLL_FAST_FOR {
            true => EXIT_POLL_FAST,
            false => EXIT_POLL,
        };
        tokio::time::sleep(poll).await;
    }
}

/// Sends SIGKILL to `pid` if it is still our QEMU.
pub(crate) fn kill(pid: u32, marker: &[u8]) -> std::result::Result<(), String> {
    if !is_our_qemu(pid, marker) {
        return Ok(());
    }
    let raw = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), nix::sys::signal::Signal::SIGKILL) {
        // It exited between the check and the signal.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(errno) => Err(format!("SIGKILL failed: {errno}")),
    }
}

/// The last few KiB of QEMU's log, starting at a line boundary.
pub(crate) fn log_tail(log: &Path) -> String {
    let Ok(bytes) = fs::read(log) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    let tail = String::from_utf8_lossy(&bytes[start..]);
    match tail.split_once('\n') {
        Some((_, rest)) if start > 0 => rest.to_owned(),
        _ => tail.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_major_version_comes_from_the_version_line() {
        assert_eq!(
            parse_major("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some(10)
        );
        assert_eq!(parse_major("QEMU emulator version 7.2.15"), Some(7));
        assert_eq!(parse_major("something else"), None);
    }

    #[tokio::test]
    async fn a_checked_binary_is_remembered_until_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("qemu-binary.json");
        let binary = configured_binary();
        let checked = find_qemu_remembered(&record).await.unwrap();
        assert_eq!(checked, binary);
        let recorded: Checked = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
        assert_eq!(Some(&recorded), Checked::of(&binary).as_ref());
        // Another file (here: another inode) is checked again, and the record follows it.
        let other = Checked {
            ino: recorded.ino + 1,
            ..recorded
        };
        fs::write(&record, serde_json::to_vec(&other).unwrap()).unwrap();
        find_qemu_remembered(&record).await.unwrap();
        let again: Checked = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
        assert_eq!(Some(&again), Checked::of(&binary).as_ref());
        // A damaged record is a reason to check, not an error.
        fs::write(&record, b"{").unwrap();
        find_qemu_remembered(&record).await.unwrap();
    }

    #[test]
    fn a_process_is_our_qemu_only_if_its_command_line_names_the_socket() {
        let me = std::process::id();
        let cmdline = fs::read("/proc/self/cmdline").unwrap();
        let first_arg = cmdline.split(|b| *b == 0).next().unwrap();
        assert!(is_our_qemu(me, first_arg));
        assert!(!is_our_qemu(me, b"/no/such/qmp.sock,"));
        assert!(!is_our_qemu(u32::MAX, first_arg));
    }

    #[test]
    fn the_log_tail_starts_at_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("qemu.log");
        assert_eq!(log_tail(&log), "");
        fs::write(&log, "short\n").unwrap();
        assert_eq!(log_tail(&log), "short\n");
        let long: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        fs::write(&log, &long).unwrap();
        let tail = log_tail(&log);
        assert!(
            tail.starts_with("line ") && tail.ends_with("line 999\n"),
            "{tail}"
        );
        assert!(tail.len() <= STDERR_TAIL);
    }
}
