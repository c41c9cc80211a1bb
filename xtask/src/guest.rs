//! The test guest from the outside: where it is cached, how to boot it under QEMU, and how to read what it
//! prints and what it wrote to its disk. `cargo xtask setup` builds it (see [`crate::guest_image`]).
//!
//! # Guest interface
//!
//! * Kernel command line (see [`Workload::kernel_params`]): `domsnap.mode=idle|dirty|fingerprint`,
//!   `domsnap.rate_mib=N`, `domsnap.wss_mib=N` (dirty), `domsnap.seed=N`, `domsnap.fp_mib=N` (fingerprint).
//! * Serial console (ttyS0): lines starting with `DOMSNAP` ([`SerialLine`]), ending in `\r\n`; kernel
//!   messages may appear between them.
//! * Serial input: the line `verify` makes a fingerprint guest print `DOMSNAP FP-CHECK sum=<hex>`; `ping`
//!   gets `DOMSNAP PONG`.
//! * Disk: with a virtio-blk disk, sector 0 holds `domsnap-marker tick=<n>\n` (NUL-padded), rewritten and
//!   fdatasync'ed on every tick before the tick line is printed ([`read_disk_marker`]).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use guest_workload::{fingerprint_sum, marker_sector, parse_marker};

/// Environment variable naming the guest folder (exported by `cargo xtask test` to the tests).
pub const ENV_GUEST_DIR: &str = "DOMSNAP_GUEST_DIR";
/// The kernel inside the guest folder.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs (uncompressed newc cpio) inside the guest folder.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// The description of the build inside the guest folder.
pub const INFO_FILE: &str = "guest.json";
/// Cached .deb packages inside the guest folder.
pub const DEBS_DIR: &str = "debs";

/// id of the RAM memory-backend object when the RAM is a file (`-machine q35,memory-backend=mem`).
pub const RAM_BACKEND_ID: &str = "mem";
/// Node name of the disk's file (protocol) node.
pub const DISK_FILE_NODE: &str = "f0";
/// Node name of the disk's qcow2 (format) node, the one the virtio-blk device uses.
pub const DISK_NODE: &str = "d0";
/// id of the virtio-blk device.
pub const DISK_DEVICE_ID: &str = "vda";

/// The guest folder: `$DOMSNAP_GUEST_DIR` if set, else `$HOME/.cache/domsnap/guest`.
pub fn guest_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(ENV_GUEST_DIR).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache/domsnap/guest")),
        None => bail!("neither {ENV_GUEST_DIR} nor HOME is set: cannot choose the guest folder"),
    }
}

/// `guest.json`: what was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Layout version of the guest folder (bumped when the initramfs layout changes).
    pub format: u32,
    /// Hash of the inputs (init script, workload binary, kernel package, .deb file names, format); the
    /// guest is rebuilt when it changes.
    pub stamp: String,
    /// e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// Debian version of that package, e.g. `6.1.140-1`.
    pub kernel_package_version: String,
    /// `uname -r` of the guest kernel, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Debian version of busybox-static.
    pub busybox_package_version: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Modules that are built into the kernel (nothing to load).
    pub modules_builtin: Vec<String>,
    /// Modules found neither as a file nor built in.
    pub modules_missing: Vec<String>,
    /// Size of the initramfs in bytes.
    pub initramfs_bytes: u64,
    /// Size of the static workload binary in bytes.
    pub workload_bytes: u64,
    /// When it was built (seconds since the Unix epoch).
    pub built_unix_time: u64,
}

/// A built guest: kernel, initramfs and their description.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The guest folder.
    pub dir: PathBuf,
    /// `<dir>/vmlinuz`.
    pub kernel: PathBuf,
    /// `<dir>/initramfs.cpio`.
    pub initrd: PathBuf,
    /// `<dir>/guest.json`.
    pub info: GuestInfo,
}

impl Guest {
    /// The guest in [`guest_dir`]. Fails (telling to run `cargo xtask setup`) if it is not built.
    pub fn locate() -> Result<Guest> {
        Guest::load(&guest_dir()?)
    }

    /// The guest in `dir`.
    pub fn load(dir: &Path) -> Result<Guest> {
        let hint = "run `cargo xtask setup` to build the test guest";
        let info_path = dir.join(INFO_FILE);
        let text = fs::read_to_string(&info_path)
            .with_context(|| format!("no test guest in {} ({hint})", dir.display()))?;
        let info: GuestInfo = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} ({hint})", info_path.display()))?;
        let guest = Guest {
            dir: dir.to_path_buf(),
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRAMFS_FILE),
            info,
        };
        for file in [&guest.kernel, &guest.initrd] {
            if !file.is_file() {
                bail!("{} is missing ({hint})", file.display());
            }
        }
        Ok(guest)
    }
}

/// What the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Only the ticks.
    Idle,
    /// Rewrite `wss_mib` MiB at `rate_mib` MiB/s.
    Dirty {
        /// MiB rewritten per second.
        rate_mib: u64,
        /// Working-set size in MiB.
        wss_mib: u64,
    },
    /// Write `mib` MiB from the PRNG seeded with `seed` into /run and print its checksum.
    Fingerprint {
        /// PRNG seed.
        seed: u64,
        /// File size in MiB.
        mib: u64,
    },
}

impl Workload {
    /// The mode name (`DOMSNAP READY mode=<name>`).
    pub fn mode(&self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirty { .. } => "dirty",
            Workload::Fingerprint { .. } => "fingerprint",
        }
    }

    /// The `domsnap.*` kernel parameters selecting this workload.
    pub fn kernel_params(&self) -> String {
        match *self {
            Workload::Idle => "domsnap.mode=idle".to_string(),
            Workload::Dirty { rate_mib, wss_mib } => {
                format!("domsnap.mode=dirty domsnap.rate_mib={rate_mib} domsnap.wss_mib={wss_mib}")
            }
            Workload::Fingerprint { seed, mib } => {
                format!("domsnap.mode=fingerprint domsnap.seed={seed} domsnap.fp_mib={mib}")
            }
        }
    }

    /// The `DOMSNAP FP-CHECK` / `DOMSNAP FP` sum a healthy fingerprint guest prints (computed on the host).
    pub fn expected_fingerprint(&self) -> Option<u64> {
        match *self {
            Workload::Fingerprint { seed, mib } => Some(fingerprint_sum(seed, mib)),
            _ => None,
        }
    }
}

/// The full kernel command line for `workload`.
pub fn kernel_cmdline(workload: &Workload) -> String {
    format!("console=ttyS0 quiet {}", workload.kernel_params())
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// Output only, appended to a file (`-serial file:PATH`).
    File(PathBuf),
    /// A listening unix socket (QEMU is the server, does not wait for a client) for reading output and
    /// writing commands such as `verify`; everything the guest prints is also logged to `log` if given.
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Optional log file of the output.
        log: Option<PathBuf>,
    },
}

/// How to boot the guest. Two QEMUs started from equal `Boot`s (except `incoming`/`start_paused`) have the
/// same machine, which a restore (`-incoming`) needs.
#[derive(Debug, Clone)]
pub struct Boot {
    /// What the guest runs.
    pub workload: Workload,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Back the RAM by this file (`memory-backend-file`, `share=on`, id [`RAM_BACKEND_ID`]), e.g. in /dev/shm.
    pub ram_file: Option<PathBuf>,
    /// A qcow2 image attached as virtio-blk (nodes [`DISK_FILE_NODE`] and [`DISK_NODE`]; /dev/vda inside).
    pub disk: Option<PathBuf>,
    /// Serial console.
    pub serial: Serial,
    /// QMP unix socket (`server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// Start as a restore target: `-incoming defer -global migration.send-configuration=off`.
    pub incoming: bool,
    /// Start paused (`-S`).
    pub start_paused: bool,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<OsString>,
}

impl Boot {
    /// A 256 MiB guest running `workload`, serial console to `serial`, no disk, no QMP.
    pub fn new(workload: Workload, serial: Serial) -> Boot {
        Boot {
            workload,
            mem_mib: 256,
            ram_file: None,
            disk: None,
            serial,
            qmp: None,
            incoming: false,
            start_paused: false,
            extra_args: Vec::new(),
        }
    }

    /// The QEMU arguments (without the program name) to boot `guest`.
    pub fn qemu_args(&self, guest: &Guest) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        let mem = format!("{}M", self.mem_mib);
        push(&[
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-accel",
            "tcg",
        ]);
        match &self.ram_file {
            Some(path) => {
                push(&[
                    "-machine",
                    &format!("q35,memory-backend={RAM_BACKEND_ID}"),
                    "-m",
                    &mem,
                ]);
                push(&[
                    "-object",
                    &format!(
                        "memory-backend-file,id={RAM_BACKEND_ID},size={mem},mem-path={},share=on",
                        opt_path(path)
                    ),
                ]);
            }
            None => push(&["-machine", "q35", "-m", &mem]),
        }
        push(&[
            "-kernel",
            &opt_path(&guest.kernel),
            "-initrd",
            &opt_path(&guest.initrd),
        ]);
        push(&["-append", &kernel_cmdline(&self.workload)]);
        match &self.serial {
            Serial::File(path) => push(&["-serial", &format!("file:{}", path.display())]),
            Serial::Socket { path, log } => {
                let mut chardev = format!("socket,id=con,path={},server=on,wait=off", opt_path(path));
                if let Some(log) = log {
                    let _ = write!(chardev, ",logfile={},logappend=on", opt_path(log));
                }
                push(&["-chardev", &chardev, "-serial", "chardev:con"]);
            }
        }
        if let Some(disk) = &self.disk {
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,filename={},node-name={DISK_FILE_NODE}",
                    opt_path(disk)
                ),
                "-blockdev",
                &format!("driver=qcow2,file={DISK_FILE_NODE},node-name={DISK_NODE}"),
                "-device",
                &format!("virtio-blk-pci,drive={DISK_NODE},id={DISK_DEVICE_ID}"),
            ]);
        }
        if let Some(qmp) = &self.qmp {
            push(&["-qmp", &format!("unix:{},server=on,wait=off", qmp.display())]);
        }
        if self.incoming {
            push(&[
                "-incoming",
                "defer",
                "-global",
                "migration.send-configuration=off",
            ]);
        }
        if self.start_paused {
            push(&["-S"]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// `qemu-system-x86_64` with [`Boot::qemu_args`].
    pub fn command(&self, guest: &Guest) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(self.qemu_args(guest));
        cmd
    }
}

/// A path inside a QEMU option value: commas are doubled (QEMU's escape).
fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// A `DOMSNAP` line of the guest's serial output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialLine {
    /// `DOMSNAP TICK <n>` (dirty mode adds `dirtied_mib=<d>`).
    Tick {
        /// The counter (1, 2, 3, ...; continues after a restore).
        n: u64,
        /// MiB rewritten so far (dirty mode).
        dirtied_mib: Option<u64>,
    },
    /// `DOMSNAP READY mode=<mode>`.
    Ready {
        /// idle, dirty or fingerprint.
        mode: String,
    },
    /// `DOMSNAP FP seed=<s> mib=<m> sum=<hex>`.
    Fingerprint {
        /// The seed.
        seed: u64,
        /// The size in MiB.
        mib: u64,
        /// The checksum.
        sum: u64,
    },
    /// `DOMSNAP FP-CHECK sum=<hex>` (Ok) or `DOMSNAP FP-CHECK error=<text>` (Err).
    FingerprintCheck(Result<u64, String>),
    /// `DOMSNAP DISK-MARKER-BOOT <text>`: the marker found at boot (`None` for `none`).
    DiskMarkerBoot(Option<String>),
    /// `DOMSNAP DISK-ERROR <text>`.
    DiskError(String),
    /// `DOMSNAP PONG`.
    Pong,
    /// `DOMSNAP UNKNOWN-COMMAND <line>`.
    UnknownCommand(String),
    /// `DOMSNAP ERROR <text>`: the workload failed to start.
    Error(String),
    /// `DOMSNAP WORKLOAD-EXIT status=<n>` (printed by init; should never happen).
    WorkloadExit(String),
    /// Any other `DOMSNAP` line (e.g. `DOMSNAP INIT ...`): the text after `DOMSNAP `.
    Other(String),
}

/// Parses one line of serial output; `None` if it is not a `DOMSNAP` line. Surrounding white space
/// (including the console's `\r`) is ignored; text before `DOMSNAP` on the same line (a kernel message
/// that was not ended) is skipped.
pub fn parse_serial_line(line: &str) -> Option<SerialLine> {
    let start = line.find("DOMSNAP ")?;
    let rest = line[start + "DOMSNAP ".len()..].trim();
    let (word, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let kv = |key: &str| {
        args.split_whitespace()
            .find_map(|t| t.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    let hex = |s: Option<&str>| s.and_then(|s| u64::from_str_radix(s, 16).ok());
    let dec = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok());
    let parsed = match word {
        "TICK" => {
            let n = args.split_whitespace().next().and_then(|n| n.parse().ok());
            n.map(|n| SerialLine::Tick {
                n,
                dirtied_mib: dec(kv("dirtied_mib")),
            })
        }
        "READY" => kv("mode").map(|m| SerialLine::Ready { mode: m.to_string() }),
        "FP" => match (dec(kv("seed")), dec(kv("mib")), hex(kv("sum"))) {
            (Some(seed), Some(mib), Some(sum)) => Some(SerialLine::Fingerprint { seed, mib, sum }),
            _ => None,
        },
        "FP-CHECK" => match (hex(kv("sum")), args.strip_prefix("error=")) {
            (Some(sum), _) => Some(SerialLine::FingerprintCheck(Ok(sum))),
            (None, Some(err)) => Some(SerialLine::FingerprintCheck(Err(err.to_string()))),
            (None, None) => None,
        },
        "DISK-MARKER-BOOT" => Some(SerialLine::DiskMarkerBoot(
            (args != "none").then(|| args.to_string()),
        )),
        "DISK-ERROR" => Some(SerialLine::DiskError(args.to_string())),
        "PONG" => Some(SerialLine::Pong),
        "UNKNOWN-COMMAND" => Some(SerialLine::UnknownCommand(args.to_string())),
        "ERROR" => Some(SerialLine::Error(args.to_string())),
        "WORKLOAD-EXIT" => Some(SerialLine::WorkloadExit(args.to_string())),
        _ => None,
    };
    Some(parsed.unwrap_or_else(|| SerialLine::Other(rest.to_string())))
}

/// The marker in sector 0 of a qcow2 image (`Some("domsnap-marker tick=<n>")`, or `None` if the sector
/// holds no marker). Works while QEMU runs (`qemu-img dd -U`, a read-only look at the active layer).
pub fn read_disk_marker(qcow2: &Path) -> Result<Option<String>> {
    let sector = read_sector0(qcow2)?;
    Ok(parse_marker(&sector))
}

/// The first 512 bytes of a qcow2 image (see [`read_disk_marker`]).
pub fn read_sector0(qcow2: &Path) -> Result<Vec<u8>> {
    let tmp = tempfile::tempdir().context("creating a temporary folder")?;
    let out = tmp.path().join("sector0.raw");
    crate::cmd::output(
        Command::new("qemu-img")
            .args(["dd", "-U", "-f", "qcow2", "-O", "raw", "bs=512", "count=1"])
            .arg(format!("if={}", qcow2.display()))
            .arg(format!("of={}", out.display())),
    )?;
    let bytes = fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    if bytes.len() < 512 {
        bail!(
            "qemu-img dd gave {} bytes for sector 0 of {}",
            bytes.len(),
            qcow2.display()
        );
    }
    Ok(bytes[..512].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> Guest {
        Guest {
            dir: "/g".into(),
            kernel: "/g/vmlinuz".into(),
            initrd: "/g/initramfs.cpio".into(),
            info: GuestInfo {
                format: 1,
                stamp: String::new(),
                kernel_package: String::new(),
                kernel_package_version: String::new(),
                kernel_release: String::new(),
                busybox_package_version: String::new(),
                modules: vec![],
                modules_builtin: vec![],
                modules_missing: vec![],
                initramfs_bytes: 0,
                workload_bytes: 0,
                built_unix_time: 0,
            },
        }
    }

    fn strings(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn minimal_boot_args() {
        let boot = Boot::new(Workload::Idle, Serial::File("/tmp/s.log".into()));
        assert_eq!(
            strings(&boot.qemu_args(&guest())),
            "-nodefaults -display none -no-user-config -accel tcg -machine q35 -m 256M \
             -kernel /g/vmlinuz -initrd /g/initramfs.cpio -append console=ttyS0 quiet domsnap.mode=idle \
             -serial file:/tmp/s.log"
        );
    }

    #[test]
    fn full_boot_args() {
        let mut boot = Boot::new(
            Workload::Fingerprint { seed: 7, mib: 4 },
            Serial::Socket {
                path: "/r/con.sock".into(),
                log: Some("/r/s,1.log".into()),
            },
        );
        boot.mem_mib = 1024;
        boot.ram_file = Some("/dev/shm/vm1".into());
        boot.disk = Some("/r/d.qcow2".into());
        boot.qmp = Some("/r/qmp.sock".into());
        boot.incoming = true;
        boot.start_paused = true;
        let args = strings(&boot.qemu_args(&guest()));
        for want in [
            "-machine q35,memory-backend=mem -m 1024M",
            "-object memory-backend-file,id=mem,size=1024M,mem-path=/dev/shm/vm1,share=on",
            "-append console=ttyS0 quiet domsnap.mode=fingerprint domsnap.seed=7 domsnap.fp_mib=4",
            "-chardev socket,id=con,path=/r/con.sock,server=on,wait=off,logfile=/r/s,,1.log,logappend=on",
            "-serial chardev:con",
            "-blockdev driver=file,filename=/r/d.qcow2,node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0",
            "-device virtio-blk-pci,drive=d0,id=vda",
            "-qmp unix:/r/qmp.sock,server=on,wait=off",
            "-incoming defer -global migration.send-configuration=off -S",
        ] {
            assert!(args.contains(want), "missing `{want}` in `{args}`");
        }
        assert_eq!(boot.workload.expected_fingerprint(), Some(fingerprint_sum(7, 4)));
    }

    #[test]
    fn dirty_params() {
        let w = Workload::Dirty {
            rate_mib: 16,
            wss_mib: 64,
        };
        assert_eq!(
            w.kernel_params(),
            "domsnap.mode=dirty domsnap.rate_mib=16 domsnap.wss_mib=64"
        );
        assert_eq!(w.mode(), "dirty");
    }

    #[test]
    fn serial_lines() {
        use SerialLine::*;
        let cases: &[(&str, Option<SerialLine>)] = &[
            (
                "DOMSNAP TICK 12\r",
                Some(Tick {
                    n: 12,
                    dirtied_mib: None,
                }),
            ),
            (
                "DOMSNAP TICK 7 dirtied_mib=56",
                Some(Tick {
                    n: 7,
                    dirtied_mib: Some(56),
                }),
            ),
            (
                "[   1.0] foo DOMSNAP TICK 3",
                Some(Tick {
                    n: 3,
                    dirtied_mib: None,
                }),
            ),
            (
                "DOMSNAP READY mode=fingerprint",
                Some(Ready {
                    mode: "fingerprint".into(),
                }),
            ),
            (
                "DOMSNAP FP seed=7 mib=16 sum=00000000000000ab",
                Some(Fingerprint {
                    seed: 7,
                    mib: 16,
                    sum: 0xab,
                }),
            ),
            (
                "DOMSNAP FP-CHECK sum=ffffffffffffffff",
                Some(FingerprintCheck(Ok(u64::MAX))),
            ),
            (
                "DOMSNAP FP-CHECK error=no-fingerprint-file",
                Some(FingerprintCheck(Err("no-fingerprint-file".into()))),
            ),
            ("DOMSNAP DISK-MARKER-BOOT none", Some(DiskMarkerBoot(None))),
            (
                "DOMSNAP DISK-MARKER-BOOT domsnap-marker tick=9",
                Some(DiskMarkerBoot(Some("domsnap-marker tick=9".into()))),
            ),
            ("DOMSNAP PONG", Some(Pong)),
            (
                "DOMSNAP UNKNOWN-COMMAND frob",
                Some(UnknownCommand("frob".into())),
            ),
            (
                "DOMSNAP WORKLOAD-EXIT status=1",
                Some(WorkloadExit("status=1".into())),
            ),
            (
                "DOMSNAP INIT exec guest-workload idle",
                Some(Other("INIT exec guest-workload idle".into())),
            ),
            ("DOMSNAP TICK x", Some(Other("TICK x".into()))),
            ("[    0.000000] Linux version 6.1", None),
        ];
        for (line, want) in cases {
            assert_eq!(&parse_serial_line(line), want, "{line}");
        }
        // What the workload prints parses back.
        let line = guest_workload::fp_line(5, 2, 0x1234);
        assert_eq!(
            parse_serial_line(&line),
            Some(Fingerprint {
                seed: 5,
                mib: 2,
                sum: 0x1234
            })
        );
    }

    #[test]
    fn disk_marker_from_qcow2() {
        if crate::cmd::probe(Command::new("qemu-img").arg("--version")).is_none() {
            eprintln!("qemu-img not installed: skipped");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("d.raw");
        let mut image = marker_sector(17).to_vec();
        image.resize(1 << 20, 0);
        fs::write(&raw, &image).unwrap();
        let qcow2 = tmp.path().join("d.qcow2");
        crate::cmd::output(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&qcow2),
        )
        .unwrap();
        assert_eq!(
            read_disk_marker(&qcow2).unwrap().as_deref(),
            Some("domsnap-marker tick=17")
        );
        let blank = tmp.path().join("blank.qcow2");
        crate::cmd::output(
            Command::new("qemu-img")
                .args(["create", "-f", "qcow2"])
                .arg(&blank)
                .arg("1M"),
        )
        .unwrap();
        assert_eq!(read_disk_marker(&blank).unwrap(), None);
        assert!(read_disk_marker(&tmp.path().join("absent.qcow2")).is_err());
    }

    #[test]
    fn guest_dir_from_env_or_home() {
        // Only reads the environment; the variable is not changed here (tests run in parallel).
        let dir = guest_dir().unwrap();
        match std::env::var_os(ENV_GUEST_DIR).filter(|d| !d.is_empty()) {
            Some(d) => assert_eq!(dir, PathBuf::from(d)),
            None => assert!(dir.ends_with(".cache/domsnap/guest")),
        }
    }
}
