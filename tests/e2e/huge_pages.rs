//! Guest RAM in huge pages (`hugepages = "/dev/hugepages"`): every create mode and both kinds of
//! revert keep the guest's memory exact, the RAM file lives on hugetlbfs behind its tmpfs name,
//! and stopping the domain gives its pages back. A start the pool cannot serve, and a mount that
//! is not hugetlbfs, fail clearly and leave nothing behind. Real QEMU 10 under TCG, the
//! fingerprint guest; the tests grow the host's huge page pool while they run (root, as in CI).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{create, state, Cli, Domain, TicksAround, Workload};
use testkit::{reserve_huge_pages, HUGE_PAGES_MOUNT, HUGE_PAGE_BYTES};

const BOOT: Duration = Duration::from_secs(120);
const TICKS: Duration = Duration::from_secs(60);
const MEMORY_MIB: u64 = 256;
/// Huge pages one QEMU of the domain takes.
const PAGES: u64 = (MEMORY_MIB << 20) / HUGE_PAGE_BYTES;

/// Defines a fingerprint domain with its RAM in huge pages of `mount` (not started).
fn define(cli: &Cli, name: &str, memory_mib: u64, mount: &Path) -> Domain {
    let domain = cli.define_domain(name, memory_mib, Workload::Fingerprint { seed: 13, mib: 32 }, 1);
    let text = std::fs::read_to_string(&domain.config).unwrap();
    // A top-level key: before the [[disks]] tables.
    let text = format!("hugepages = \"{}\"\n{text}", mount.display());
    std::fs::write(&domain.config, text).unwrap();
    domain
}

/// The RAM files of domain `name` (of either run slot) in `dir`: their links in /dev/shm, the
/// files themselves on the huge page mount.
fn ram_files_in(dir: &str, name: &str) -> Vec<PathBuf> {
    let suffixes = [format!("-{name}.ram"), format!("-{name}+1.ram")];
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            file.starts_with("domsnap-") && suffixes.iter().any(|suffix| file.ends_with(suffix.as_str()))
        })
        .collect()
}

/// The domain's RAM file names in /dev/shm (links or files).
fn ram_links(name: &str) -> Vec<PathBuf> {
    ram_files_in("/dev/shm", name)
}

/// The huge-page files of the domain on the mount.
fn huge_page_files(name: &str) -> Vec<PathBuf> {
    ram_files_in(HUGE_PAGES_MOUNT, name)
}

/// Reverts to `snapshot` and checks that the guest goes on from the snapshot's tick and that
/// its memory is the fingerprint it was booted with.
fn revert_and_check(
    cli: &Cli,
    domain: &Domain,
    snapshot: &str,
    ticks: &TicksAround,
    eager: bool,
    fingerprint: &str,
) {
    // The guest runs past the snapshot's ticks first, so that its first tick after the revert
    // is a jump back.
    if domain.last_tick_since(0).unwrap_or(0) <= ticks.after + 2 {
        domain.wait_tick_above(domain.serial_position(), ticks.after + 2, TICKS);
    }
    let extra: &[&str] = if eager { &["--eager"] } else { &[] };
    common::revert_expecting(cli, domain, snapshot, ticks, extra);
    assert_eq!(
        domain.fingerprint_check(),
        fingerprint,
        "revert to {snapshot} (eager {eager})"
    );
}

#[test]
fn every_create_mode_and_both_reverts_keep_a_huge_page_guest_exact() {
    // Two QEMUs at once in an eager revert.
    let pool = reserve_huge_pages(2 * PAGES).unwrap();
    let free_before = testkit::huge_pages_available().unwrap();
    let cli = Cli::new();
    let domain = define(&cli, "huge", MEMORY_MIB, Path::new(HUGE_PAGES_MOUNT));
    cli.ok(&["domain", "start", domain.config.to_str().unwrap()]);
    let fingerprint = domain.fingerprint();
    domain.wait_tick_above(0, 1, BOOT);

    // The RAM file is on hugetlbfs, behind a link at its tmpfs name; QEMU holds the guest's pages.
    let links = ram_links("huge");
    assert_eq!(links.len(), 1, "{links:?}");
    let target = std::fs::read_link(&links[0]).unwrap();
    assert_eq!(huge_page_files("huge"), [target]);
    assert!(
        testkit::huge_pages_available().unwrap() + PAGES <= free_before,
        "QEMU did not take the guest's huge pages"
    );

    let modes: [(&str, &[&str]); 3] = [
        ("paused", &[]),
        ("background", &["--live", "--live-mode", "background"]),
        ("precopy", &["--live", "--live-mode", "precopy"]),
    ];
    let mut taken = Vec::new();
    for (mode, flags) in modes {
        let (ticks, report) = create(&cli, &domain, mode, flags);
        assert_eq!(report["memory_mode"], mode, "{report}");
        let read = if mode == "paused" { "direct" } else { "stream" };
        assert_eq!(report["memory_read"], read, "{report}");
        let ticks = if mode == "background" {
            // Consistent at its start.
            TicksAround {
                after: ticks.before,
                ..ticks
            }
        } else {
            ticks
        };
        domain.wait_tick_above(ticks.position, ticks.after + 1, TICKS);
        taken.push((mode, ticks));
    }
    // Eager reverts give the domain fresh huge-page RAM; background creates work on it again.
    for (mode, ticks) in &taken {
        revert_and_check(&cli, &domain, mode, ticks, true, &fingerprint);
    }
    let (ticks, report) = create(&cli, &domain, "again", &["--live", "--live-mode", "background"]);
    assert_eq!(report["memory_mode"], "background", "{report}");
    let ticks = TicksAround {
        after: ticks.before,
        ..ticks
    };
    domain.wait_tick_above(ticks.position, ticks.before + 2, TICKS);
    revert_and_check(&cli, &domain, "again", &ticks, false, &fingerprint);
    // The lazy revert maps the image: the huge-page files of both slots are gone.
    assert_eq!(huge_page_files("huge"), Vec::<PathBuf>::new());
    revert_and_check(&cli, &domain, "paused", &taken[0].1, true, &fingerprint);
    assert_eq!(huge_page_files("huge").len(), 1);

    // A QEMU that dies leaves its RAM file: the next look at the domain removes it, link and
    // huge-page file both.
    let pid = cli.json(&["domain", "status", "huge"])["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_pages_given_back(&cli, &domain, free_before);
    cli.ok(&["domain", "start", "huge"]);
    domain.wait_tick_above(domain.serial_position(), 1, BOOT);
    // With no pages to spare, started again at once: the ended QEMU's pages come back while
    // its address space is torn down, after the stop has returned; the start waits for them.
    cli.ok(&["domain", "stop", "huge", "--force"]);
    assert_pages_given_back(&cli, &domain, free_before);
    pool.leave_available(PAGES).unwrap();
    cli.ok(&["domain", "start", "huge"]);
    domain.wait_tick_above(domain.serial_position(), 1, BOOT);
    cli.ok(&["domain", "stop", "huge", "--force"]);
    cli.ok(&["domain", "start", "huge"]);
    domain.wait_tick_above(domain.serial_position(), 1, BOOT);
    cli.ok(&["domain", "stop", "huge", "--force"]);
    assert_pages_given_back(&cli, &domain, PAGES);
    drop(pool);
}

/// The domain is shut off, its RAM file and link are gone and the pool has its pages again.
fn assert_pages_given_back(cli: &Cli, domain: &Domain, free_before: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(cli, domain) != "shut-off" {
        assert!(Instant::now() < deadline, "the domain did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ram_links(&domain.name), Vec::<PathBuf>::new());
    assert_eq!(huge_page_files(&domain.name), Vec::<PathBuf>::new());
    while testkit::huge_pages_available().unwrap() < free_before {
        assert!(
            Instant::now() < deadline,
            "the domain's huge pages were not given back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_start_the_pool_cannot_serve_and_a_mount_that_is_not_hugetlbfs_fail_clearly() {
    let pool = reserve_huge_pages(PAGES).unwrap();
    let cli = Cli::new();
    // More pages than are free: refused before QEMU runs, nothing left behind.
    let too_big = ((testkit::huge_pages_available().unwrap() + PAGES) * HUGE_PAGE_BYTES) >> 20;
    let domain = define(&cli, "toobig", too_big, Path::new(HUGE_PAGES_MOUNT));
    let error = cli.fails(&["domain", "start", domain.config.to_str().unwrap()]);
    assert!(error.contains("huge pages"), "{error}");
    assert!(error.contains("are free"), "{error}");
    assert_eq!(state(&cli, &domain), "shut-off");
    assert_eq!(ram_links("toobig"), Vec::<PathBuf>::new());
    assert_eq!(huge_page_files("toobig"), Vec::<PathBuf>::new());
    assert!(!domain.run_dir().exists(), "{}", domain.run_dir().display());

    // A folder that is not hugetlbfs: refused when the domain is defined.
    let plain = cli.dir.path().join("not-huge");
    std::fs::create_dir_all(&plain).unwrap();
    let domain = define(&cli, "plain", MEMORY_MIB, &plain);
    let error = cli.fails(&["domain", "start", domain.config.to_str().unwrap()]);
    assert!(error.contains("is not a hugetlbfs mount"), "{error}");
    assert!(error.contains("not-huge"), "{error}");
    drop(pool);
}
