//! The domsnap test guest's workload. See the library docs (`lib.rs`) for the serial interface.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guest_workload::{
    format_sum, fp_line, marker_sector, parse_args, parse_marker, parse_request, tick_line, Command, Config,
    Fnv1a64, Mode, Request, SplitMix64, LINE_PREFIX, MIB, PAGE, SECTOR, USAGE,
};

/// Prints one line to stdout (the serial console) with a single write, then flushes.
fn emit(line: &str) {
    let mut out = io::stdout().lock();
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    // Nothing useful can be done if the console is gone.
    let _ = out.write_all(buf.as_bytes());
    let _ = out.flush();
}

fn main() -> ExitCode {
    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(cfg)) => cfg,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("guest-workload: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(&format!("{LINE_PREFIX} ERROR {e}"));
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> io::Result<()> {
    let mut disk = cfg.disk.as_deref().and_then(Disk::open);

    let fp_path = match cfg.mode {
        Mode::Fingerprint => {
            let path = cfg.fp_path();
            write_fingerprint_file(&path, cfg.seed, cfg.fp_mib).map_err(|e| annotate(e, "writing", &path))?;
            let sum = checksum_file(&path).map_err(|e| annotate(e, "reading", &path))?;
            emit(&fp_line(cfg.seed, cfg.fp_mib, sum));
            Some(path)
        }
        Mode::Idle | Mode::Dirty => None,
    };

    let dirtied_pages = Arc::new(AtomicU64::new(0));
    if cfg.mode == Mode::Dirty {
        let words = usize::try_from(cfg.wss_mib)
            .ok()
            .and_then(|m| m.checked_mul(MIB / 8))
            .ok_or_else(|| io::Error::other("working set too large"))?;
        let mut wss = Vec::new();
        wss.try_reserve_exact(words)
            .map_err(|e| io::Error::other(format!("allocating {} MiB: {e}", cfg.wss_mib)))?;
        // Touch every page with a non-zero value, so the working set is real, non-zero guest RAM.
        wss.extend((0..words as u64).map(|i| i / (PAGE as u64 / 8) + 1));
        let rate_pages = cfg.rate_mib * (MIB / PAGE) as u64;
        let counter = Arc::clone(&dirtied_pages);
        thread::Builder::new()
            .name("dirtier".into())
            .spawn(move || dirty_forever(wss, rate_pages, &counter))?;
    }

    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || serve_stdin(fp_path.as_deref()))?;
    watch_power_button();

    emit(&format!("{LINE_PREFIX} READY mode={}", cfg.mode));

    let second = Duration::from_secs(1);
    let mut next = Instant::now() + second;
    let mut n: u64 = 0;
    loop {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        n += 1;
        if let Some(d) = disk.as_mut() {
            if let Err(e) = d.write_marker(n) {
                emit(&format!("{LINE_PREFIX} DISK-ERROR {}: {e}", d.path.display()));
                disk = None;
            }
        }
        let dirtied =
            (cfg.mode == Mode::Dirty).then(|| dirtied_pages.load(Ordering::Relaxed) / (MIB / PAGE) as u64);
        emit(&tick_line(n, dirtied));
        next += second;
        // After a long stall (the VM was paused, or the clock jumped), resume the one-a-second rhythm
        // instead of printing a burst of catch-up ticks.
        let now = Instant::now();
        if now > next + second {
            next = now + second;
        }
    }
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The tick-marker disk.
struct Disk {
    path: PathBuf,
    file: File,
}

impl Disk {
    /// Opens the disk and prints `DISK-MARKER-BOOT` (or `DISK-ERROR`).
    fn open(path: &Path) -> Option<Disk> {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .and_then(|file| {
                let mut sector = [0u8; SECTOR];
                file.read_exact_at(&mut sector, 0)?;
                Ok((file, sector))
            });
        match opened {
            Ok((file, sector)) => {
                let marker = parse_marker(&sector).unwrap_or_else(|| "none".to_string());
                emit(&format!("{LINE_PREFIX} DISK-MARKER-BOOT {marker}"));
                Some(Disk {
                    path: path.to_path_buf(),
                    file,
                })
            }
            Err(e) => {
                emit(&format!("{LINE_PREFIX} DISK-ERROR {}: {e}", path.display()));
                None
            }
        }
    }

    /// Writes the marker for tick `n` into sector 0 and makes it durable (fdatasync).
    fn write_marker(&mut self, n: u64) -> io::Result<()> {
        self.file.write_all_at(&marker_sector(n), 0)?;
        self.file.sync_data()
    }
}

fn write_fingerprint_file(path: &Path, seed: u64, mib: u64) -> io::Result<()> {
    let mut file = File::create(path)?;
    let mut rng = SplitMix64::new(seed);
    let mut chunk = vec![0u8; MIB];
    for _ in 0..mib {
        rng.fill(&mut chunk);
        file.write_all(&chunk)?;
    }
    file.sync_all()
}

fn checksum_file(path: &Path) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut hasher = Fnv1a64::new();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Rewrites the working set page by page, cycling through it, at `rate_pages` pages per second spread over
/// 10 ms slots. Every write fills a whole page with a value that changes on every pass.
fn dirty_forever(mut wss: Vec<u64>, rate_pages: u64, counter: &AtomicU64) -> ! {
    const SLOT: Duration = Duration::from_millis(10);
    let words_per_page = PAGE / 8;
    let pages = wss.len() / words_per_page;
    let mut page = 0usize;
    let mut pass: u64 = 1;
    let mut total: u64 = 0;
    // Pages owed, in units of 1/1e9 page (rate_pages * elapsed nanoseconds).
    let mut owed_nano_pages: u128 = 0;
    let mut last = Instant::now();
    loop {
        thread::sleep(SLOT);
        let now = Instant::now();
        // Cap the slot at 100 ms so a paused VM does not cause a burst afterwards.
        let elapsed = (now - last).min(SLOT * 10);
        last = now;
        owed_nano_pages += u128::from(rate_pages) * elapsed.as_nanos();
        // At most 100 ms of the rate: far below u64::MAX.
        let due = u64::try_from(owed_nano_pages / 1_000_000_000).unwrap_or(u64::MAX);
        owed_nano_pages %= 1_000_000_000;
        for _ in 0..due {
            let value = (pass << 32) ^ (page as u64) ^ 0x5a5a_0000_0000_0000;
            wss[page * words_per_page..(page + 1) * words_per_page].fill(value);
            page += 1;
            if page == pages {
                page = 0;
                pass += 1;
            }
        }
        // The working set is never read: make sure the compiler keeps the stores.
        std::hint::black_box(&mut wss);
        total += due;
        counter.store(total, Ordering::Relaxed);
    }
}

/// `EV_KEY` and `KEY_POWER` from linux/input-event-codes.h.
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on x86_64: timeval (16 bytes), type (u16), code (u16), value (i32).
const INPUT_EVENT_LEN: usize = 24;

/// Powers the guest off when the ACPI power button is pressed (QMP `system_powerdown`), so the
/// toolstack's clean stop works: with the `button` and `evdev` modules (loaded by init) the
/// kernel reports the button as `KEY_POWER` on an input device.
fn watch_power_button() {
    let Ok(entries) = std::fs::read_dir("/dev/input") else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("event") {
            let path = entry.path();
            let _ = thread::Builder::new()
                .name("power-button".into())
                .spawn(move || wait_for_power_key(&path));
        }
    }
}

fn wait_for_power_key(device: &Path) {
    let Ok(mut input) = File::open(device) else {
        return;
    };
    let mut event = [0u8; INPUT_EVENT_LEN];
    while input.read_exact(&mut event).is_ok() {
        let kind = u16::from_ne_bytes([event[16], event[17]]);
        let code = u16::from_ne_bytes([event[18], event[19]]);
        let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            emit(&format!("{LINE_PREFIX} POWER-OFF"));
            // busybox poweroff -f syncs the disks, then powers off without asking init.
            let _ = std::process::Command::new("/bin/busybox")
                .args(["poweroff", "-f"])
                .status();
        }
    }
}

/// Answers stdin lines until end of input.
fn serve_stdin(fp_path: Option<&Path>) {
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match input.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw);
        match parse_request(&line) {
            Request::Empty => {}
            Request::Ping => emit(&format!("{LINE_PREFIX} PONG")),
            Request::Verify => match fp_path {
                None => emit(&format!("{LINE_PREFIX} FP-CHECK error=no-fingerprint-file")),
                Some(path) => match checksum_file(path) {
                    Ok(sum) => emit(&format!("{LINE_PREFIX} FP-CHECK sum={}", format_sum(sum))),
                    Err(e) => emit(&format!("{LINE_PREFIX} FP-CHECK error={e}")),
                },
            },
            Request::Unknown(other) => emit(&format!("{LINE_PREFIX} UNKNOWN-COMMAND {other}")),
        }
    }
}
