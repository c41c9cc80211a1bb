//! The domsnap test guest's workload: the pure parts (argument parsing, the fingerprint PRNG and checksum,
//! the disk marker and the serial line formats), kept apart from `main.rs` so they are unit-tested on the
//! host and can be reused by host-side code that must predict what the guest prints.
//!
//! # Serial interface (stdout = the guest's serial console, ttyS0)
//!
//! | line | when |
//! | --- | --- |
//! | `DOMSNAP DISK-MARKER-BOOT <text>` | at start, if `--disk` opened: sector 0's marker text, or `none` |
//! | `DOMSNAP DISK-ERROR <path>: <error>` | the disk could not be opened or written (the disk is then dropped) |
//! | `DOMSNAP FP seed=<S> mib=<M> sum=<16 hex>` | fingerprint mode, after writing and re-reading the file |
//! | `DOMSNAP READY mode=<mode>` | once, when setup is done |
//! | `DOMSNAP TICK <n>` (dirty mode: `DOMSNAP TICK <n> dirtied_mib=<D>`) | once a second, n = 1, 2, 3, ... |
//! | `DOMSNAP FP-CHECK sum=<16 hex>` | answer to the stdin line `verify` (fingerprint mode) |
//! | `DOMSNAP FP-CHECK error=<text>` | answer to `verify` when there is no fingerprint file or it is unreadable |
//! | `DOMSNAP PONG` | answer to the stdin line `ping` |
//! | `DOMSNAP UNKNOWN-COMMAND <line>` | answer to any other non-empty stdin line |
//! | `DOMSNAP ERROR <text>` | setup failed; the workload exits with status 1 |
//!
//! # Fingerprint
//!
//! The file holds `mib` MiB produced by [`SplitMix64`] seeded with the seed: each 64-bit output is written as
//! 8 little-endian bytes. The checksum is FNV-1a 64 ([`Fnv1a64`]) over the file's bytes, printed as 16
//! lower-case hex digits. [`fingerprint_sum`] computes the expected value without a file.
//!
//! # Disk marker
//!
//! Sector 0 (512 bytes) of the disk holds `domsnap-marker tick=<n>\n` padded with NUL bytes
//! ([`marker_sector`]); [`parse_marker`] reads it back (text up to the first NUL or newline).

use std::fmt;
use std::path::PathBuf;

/// Bytes in a MiB.
pub const MIB: usize = 1 << 20;
/// Page size the dirtier works in.
pub const PAGE: usize = 4096;
/// Size of the disk marker (one sector).
pub const SECTOR: usize = 512;
/// Every marker written by the workload starts with this text.
pub const MARKER_PREFIX: &str = "domsnap-marker";
/// Prefix of every line the workload prints.
pub const LINE_PREFIX: &str = "DOMSNAP";
/// Name of the fingerprint file inside `--dir`.
pub const FP_FILE_NAME: &str = "domsnap-fp.bin";

/// Default dirty rate (MiB/s).
pub const DEFAULT_RATE_MIB: u64 = 8;
/// Default dirty working-set size (MiB).
pub const DEFAULT_WSS_MIB: u64 = 32;
/// Default fingerprint file size (MiB).
pub const DEFAULT_FP_MIB: u64 = 16;
/// Default folder for the fingerprint file (a tmpfs mounted by the guest's init).
pub const DEFAULT_DIR: &str = "/run";

/// Usage text printed on `--help` and on argument errors.
pub const USAGE: &str = "\
usage: guest-workload <idle|dirty|fingerprint> [options]
  --rate-mib R   dirty mode: MiB rewritten per second (default 8)
  --wss-mib W    dirty mode: working-set size in MiB (default 32)
  --seed S       fingerprint mode: PRNG seed, decimal or 0x-hex (default 0)
  --mib M        fingerprint mode: file size in MiB (default 16)
  --dir PATH     fingerprint mode: folder of the file (default /run)
  --disk PATH    every mode: block device for the tick marker in sector 0
Options may be given as `--key value` or `--key=value`; options that do not apply to the mode are ignored.
stdin lines: `verify` (fingerprint re-check), `ping`.";

/// What the workload does besides ticking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only the ticks.
    Idle,
    /// Continuously rewrite a working set at a fixed rate.
    Dirty,
    /// Write a deterministic file and check it on request.
    Fingerprint,
}

impl Mode {
    /// The name used on the command line and in `DOMSNAP READY mode=<name>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Dirty => "dirty",
            Mode::Fingerprint => "fingerprint",
        }
    }

    /// Parses a mode name.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "idle" => Some(Mode::Idle),
            "dirty" => Some(Mode::Dirty),
            "fingerprint" => Some(Mode::Fingerprint),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The mode.
    pub mode: Mode,
    /// Dirty rate in MiB/s (0 = only touch the working set once).
    pub rate_mib: u64,
    /// Working-set size in MiB (at least 1).
    pub wss_mib: u64,
    /// Fingerprint PRNG seed.
    pub seed: u64,
    /// Fingerprint file size in MiB (at least 1).
    pub fp_mib: u64,
    /// Folder of the fingerprint file.
    pub dir: PathBuf,
    /// Block device for the tick marker.
    pub disk: Option<PathBuf>,
}

impl Config {
    /// The configuration for `mode` with every option at its default.
    pub fn new(mode: Mode) -> Config {
        Config {
            mode,
            rate_mib: DEFAULT_RATE_MIB,
            wss_mib: DEFAULT_WSS_MIB,
            seed: 0,
            fp_mib: DEFAULT_FP_MIB,
            dir: PathBuf::from(DEFAULT_DIR),
            disk: None,
        }
    }

    /// Path of the fingerprint file.
    pub fn fp_path(&self) -> PathBuf {
        self.dir.join(FP_FILE_NAME)
    }
}

/// Result of argument parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print [`USAGE`] and exit successfully.
    Help,
    /// Run the workload.
    Run(Config),
}

/// Parses a non-negative integer, decimal or `0x`-prefixed hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses the arguments (without the program name).
pub fn parse_args<I, S>(args: I) -> Result<Command, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args = args.into_iter().map(Into::into);
    let mut mode: Option<Mode> = None;
    let mut cfg = Config::new(Mode::Idle);
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let Some(opt) = arg.strip_prefix("--") else {
            if mode.is_some() {
                return Err(format!("unexpected argument `{arg}`"));
            }
            mode = Some(Mode::parse(&arg).ok_or_else(|| format!("unknown mode `{arg}`"))?);
            continue;
        };
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let v = args
                    .next()
                    .ok_or_else(|| format!("option --{opt} needs a value"))?;
                (opt.to_string(), v)
            }
        };
        let number = |min: u64| -> Result<u64, String> {
            match parse_u64(&value) {
                Some(n) if n >= min => Ok(n),
                _ => Err(format!("--{key}: expected an integer >= {min}, got `{value}`")),
            }
        };
        match key.as_str() {
            "rate-mib" => cfg.rate_mib = number(0)?,
            "wss-mib" => cfg.wss_mib = number(1)?,
            "seed" => cfg.seed = number(0)?,
            "mib" => cfg.fp_mib = number(1)?,
            "dir" => cfg.dir = PathBuf::from(value),
            "disk" => cfg.disk = (!value.is_empty()).then(|| PathBuf::from(value)),
            _ => return Err(format!("unknown option --{key}")),
        }
    }
    cfg.mode = mode.ok_or("missing mode (idle, dirty or fingerprint)")?;
    Ok(Command::Run(cfg))
}

/// The splitmix64 generator (Steele, Lea, Flood 2014): the fingerprint's byte source.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next outputs, 8 little-endian bytes each. The byte stream is the same however it
    /// is split, as long as every `buf` but the last has a length that is a multiple of 8.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&word[..rest.len()]);
        }
    }
}

/// FNV-1a, 64-bit: the fingerprint checksum.
#[derive(Debug, Clone)]
pub struct Fnv1a64 {
    hash: u64,
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64::new()
    }
}

impl Fnv1a64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// A fresh hasher.
    pub fn new() -> Fnv1a64 {
        Fnv1a64 {
            hash: Self::OFFSET_BASIS,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.hash;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(Self::PRIME);
        }
        self.hash = h;
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.hash
    }
}

/// The checksum the guest prints for `seed` and `mib`, computed in memory (no file).
pub fn fingerprint_sum(seed: u64, mib: u64) -> u64 {
    let mut rng = SplitMix64::new(seed);
    let mut hasher = Fnv1a64::new();
    let mut chunk = vec![0u8; MIB];
    for _ in 0..mib {
        rng.fill(&mut chunk);
        hasher.update(&chunk);
    }
    hasher.finish()
}

/// Formats a checksum as the guest prints it (16 lower-case hex digits).
pub fn format_sum(sum: u64) -> String {
    format!("{sum:016x}")
}

/// The `DOMSNAP FP ...` line.
pub fn fp_line(seed: u64, mib: u64, sum: u64) -> String {
    format!("{LINE_PREFIX} FP seed={seed} mib={mib} sum={}", format_sum(sum))
}

/// The `DOMSNAP TICK ...` line.
pub fn tick_line(n: u64, dirtied_mib: Option<u64>) -> String {
    match dirtied_mib {
        Some(d) => format!("{LINE_PREFIX} TICK {n} dirtied_mib={d}"),
        None => format!("{LINE_PREFIX} TICK {n}"),
    }
}

/// Text of the marker written on tick `n` (without the trailing newline).
pub fn marker_text(tick: u64) -> String {
    format!("{MARKER_PREFIX} tick={tick}")
}

/// Sector 0 as written on tick `n`: `domsnap-marker tick=<n>\n`, NUL-padded to 512 bytes.
pub fn marker_sector(tick: u64) -> [u8; SECTOR] {
    let mut sector = [0u8; SECTOR];
    let text = marker_text(tick);
    sector[..text.len()].copy_from_slice(text.as_bytes());
    sector[text.len()] = b'\n';
    sector
}

/// The marker in a sector: the text up to the first NUL or newline if the sector starts with
/// [`MARKER_PREFIX`], else `None`.
pub fn parse_marker(sector: &[u8]) -> Option<String> {
    if !sector.starts_with(MARKER_PREFIX.as_bytes()) {
        return None;
    }
    let end = sector
        .iter()
        .position(|&b| b == 0 || b == b'\n')
        .unwrap_or(sector.len());
    Some(String::from_utf8_lossy(&sector[..end]).into_owned())
}

/// A stdin command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Re-check the fingerprint file.
    Verify,
    /// Liveness probe.
    Ping,
    /// Blank line: ignored.
    Empty,
    /// Anything else (the trimmed line).
    Unknown(String),
}

/// Classifies one stdin line (surrounding white space, including a `\r`, is ignored).
pub fn parse_request(line: &str) -> Request {
    match line.trim() {
        "" => Request::Empty,
        "verify" => Request::Verify,
        "ping" => Request::Ping,
        other => Request::Unknown(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the serial console from the host

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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse_args(args.iter().copied()) {
            Ok(Command::Run(cfg)) => cfg,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn splitmix64_reference_values() {
        // Reference outputs of splitmix64 seeded with 0.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(rng.next_u64(), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn fill_is_split_independent() {
        let mut a = vec![0u8; 4096];
        SplitMix64::new(7).fill(&mut a);
        let mut b = vec![0u8; 4096];
        let mut rng = SplitMix64::new(7);
        for part in b.chunks_mut(1024) {
            rng.fill(part);
        }
        assert_eq!(a, b);
        let mut odd = [0u8; 13];
        SplitMix64::new(7).fill(&mut odd);
        assert_eq!(odd[..], a[..13]);
    }

    #[test]
    fn fnv1a64_reference_values() {
        let hash = |s: &str| {
            let mut h = Fnv1a64::new();
            h.update(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
        let mut h = Fnv1a64::new();
        h.update(b"foo");
        h.update(b"bar");
        assert_eq!(h.finish(), hash("foobar"));
    }

    #[test]
    fn fingerprint_is_deterministic_and_seed_dependent() {
        let a = fingerprint_sum(7, 1);
        assert_eq!(a, fingerprint_sum(7, 1));
        assert_ne!(a, fingerprint_sum(8, 1));
        assert_ne!(a, fingerprint_sum(7, 2));
        assert_eq!(format_sum(a).len(), 16);
        assert_eq!(
            fp_line(7, 1, 0xab),
            "DOMSNAP FP seed=7 mib=1 sum=00000000000000ab"
        );
    }

    #[test]
    fn parse_defaults() {
        let cfg = run(&["idle"]);
        assert_eq!(cfg, Config::new(Mode::Idle));
        assert_eq!(cfg.rate_mib, 8);
        assert_eq!(cfg.wss_mib, 32);
        assert_eq!(cfg.fp_mib, 16);
        assert_eq!(cfg.disk, None);
        assert_eq!(cfg.fp_path(), PathBuf::from("/run/domsnap-fp.bin"));
    }

    #[test]
    fn parse_options_both_spellings() {
        let cfg = run(&["dirty", "--rate-mib", "64", "--wss-mib=128", "--disk", "/dev/vda"]);
        assert_eq!(cfg.mode, Mode::Dirty);
        assert_eq!((cfg.rate_mib, cfg.wss_mib), (64, 128));
        assert_eq!(cfg.disk, Some(PathBuf::from("/dev/vda")));
        let cfg = run(&["--seed=0x10", "fingerprint", "--mib", "4", "--dir", "/tmp"]);
        assert_eq!(cfg.mode, Mode::Fingerprint);
        assert_eq!((cfg.seed, cfg.fp_mib), (16, 4));
        assert_eq!(cfg.fp_path(), PathBuf::from("/tmp/domsnap-fp.bin"));
        // Options of other modes are accepted and ignored.
        assert_eq!(run(&["idle", "--seed", "3"]).mode, Mode::Idle);
    }

    #[test]
    fn parse_errors() {
        for bad in [
            &[][..],
            &["busy"],
            &["idle", "dirty"],
            &["dirty", "--rate-mib"],
            &["dirty", "--rate-mib", "x"],
            &["dirty", "--wss-mib", "0"],
            &["fingerprint", "--mib=0"],
            &["idle", "--bogus", "1"],
            &["idle", "--seed", "-1"],
        ] {
            assert!(parse_args(bad.iter().copied()).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_args(["idle", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn marker_round_trip() {
        let sector = marker_sector(42);
        assert_eq!(sector.len(), 512);
        assert!(sector.starts_with(b"domsnap-marker tick=42\n\0"));
        assert!(sector[24..].iter().all(|&b| b == 0));
        assert_eq!(parse_marker(&sector).as_deref(), Some("domsnap-marker tick=42"));
        assert_eq!(parse_marker(&[0u8; 512]), None);
        assert_eq!(parse_marker(b"hello"), None);
    }

    #[test]
    fn lines_and_requests() {
        assert_eq!(tick_line(3, None), "DOMSNAP TICK 3");
        assert_eq!(tick_line(7, Some(56)), "DOMSNAP TICK 7 dirtied_mib=56");
        assert_eq!(parse_request("verify\r"), Request::Verify);
        assert_eq!(parse_request(" ping "), Request::Ping);
        assert_eq!(parse_request(""), Request::Empty);
        assert_eq!(parse_request("frob x"), Request::Unknown("frob x".into()));
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
        let line = fp_line(5, 2, 0x1234);
        assert_eq!(
            parse_serial_line(&line),
            Some(Fingerprint {
                seed: 5,
                mib: 2,
                sum: 0x1234
            })
        );
    }
}
