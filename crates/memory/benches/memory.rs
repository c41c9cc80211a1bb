//! Benchmarks of the memory crate against the baselines named in its issue, measured in the same run.
//! Results and ratios are reported in docs/memory-performance.md.
//!
//! Run: `cargo bench -p memory --bench memory` (about three minutes; needs ~3.5 GiB of RAM and
//! /dev/shm). Each group prints extra figures (rounds, pages, peak heap) to stderr.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use memory::{
    restore, save_paused, ContentCompare, ConvergencePolicy, DirtySource, Durability, FileRegion,
    GuestMemory, ImageLayout, ImageWriter, LiveSave, RestoreOptions, SaveOptions, UffdWriteProtect,
    ZeroPages, PAGE_SIZE,
};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/heap.rs"]
mod heap;

use common::{content_compare_save, Rng};
use heap::peak_heap;

const GIB: u64 = 1 << 30;
const PAGES: u64 = GIB / PAGE_SIZE as u64;

/// 1 GiB of guest RAM with 10% random non-zero pages, as a flat buffer. Every page is written:
/// untouched pages would all read the kernel's one shared zero page, from cache, and make the scanning
/// baselines look faster than real RAM allows.
fn guest_contents() -> Vec<u8> {
    let mut rng = Rng(1);
    let mut ram = vec![1u8; GIB as usize];
    for page in ram.chunks_exact_mut(PAGE_SIZE) {
        if rng.next() % 10 == 0 {
            page.chunks_exact_mut(8)
                .for_each(|w| w.copy_from_slice(&rng.next().to_le_bytes()));
        } else {
            page.fill(0);
        }
    }
    ram
}

/// OR of a page's bytes: the same vectorised primitive the crate's zero test uses.
fn page_or(page: &[u8]) -> u8 {
    page.iter().fold(0u8, |acc, &b| acc | b)
}

/// Baseline: read every byte once (OR-reduce, page by page), on all cores.
fn read_scan(ram: &[u8]) -> u8 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        ram.chunks(ram.len().div_ceil(threads))
            .map(|part| s.spawn(move || part.chunks_exact(PAGE_SIZE).fold(0u8, |acc, p| acc | page_or(p))))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold(0, |a, b| a | b)
    })
}

/// Baseline: scan every page and memcpy the non-zero ones into `out` (touched), on all cores.
fn scan_and_copy_nonzero(ram: &[u8], out: &mut [u8]) -> usize {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let part = ram.len().div_ceil(threads);
    std::thread::scope(|s| {
        ram.chunks(part)
            .zip(out.chunks_mut(part))
            .map(|(src, dst)| {
                s.spawn(move || {
                    let mut at = 0;
                    for page in src.chunks_exact(PAGE_SIZE) {
                        if page_or(page) != 0 {
                            dst[at..at + PAGE_SIZE].copy_from_slice(page);
                            at += PAGE_SIZE;
                        }
                    }
                    at
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum()
    })
}

struct Setup {
    ram: Vec<u8>,
    ram_file: PathBuf,
    out_dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let ram = guest_contents();
    let ram_file = PathBuf::from(format!("/dev/shm/memory-bench-{}", std::process::id()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&ram_file)
        .unwrap();
    f.write_all(&ram).unwrap(); // fully allocated, like the RAM file of a booted guest
                                // Output on the project's disk (not tmpfs), next to the target directory.
    let out_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    Setup {
        ram,
        ram_file,
        out_dir,
    }
}

fn ram_file_memory(path: &Path) -> GuestMemory {
    GuestMemory::from_ram_file(
        path,
        &[FileRegion {
            gpa: 0,
            len: GIB,
            file_offset: 0,
        }],
    )
    .unwrap()
}

fn paused_save_and_restore(c: &mut Criterion) {
    let s = setup();
    let mem = ram_file_memory(&s.ram_file);
    let image = s.out_dir.path().join("ram.img");
    let mut out = vec![1u8; GIB as usize];

    let mut g = c.benchmark_group("paused_save_1GiB_10pct");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    g.bench_function("baseline_scan_plus_memcpy_nonzero", |b| {
        b.iter(|| scan_and_copy_nonzero(&s.ram, &mut out))
    });
    // The previous output is removed before each timed run (not timed): deleting a sparse file full of
    // fresh extents costs ext4 more than writing it, and belongs to neither tool.
    let shm_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    for (fs, dir) in [("ext4", s.out_dir.path()), ("tmpfs", shm_dir.path())] {
        let image = dir.join("ram.img");
        let copy = dir.join("ram.copy");
        let fresh = |path: &Path| {
            let _ = std::fs::remove_file(path);
        };
        g.bench_function(format!("baseline_cp_sparse_always_{fs}"), |b| {
            b.iter_batched(
                || fresh(&copy),
                |()| {
                    let st = std::process::Command::new("cp")
                        .arg("--sparse=always")
                        .arg(&s.ram_file)
                        .arg(&copy)
                        .status();
                    assert!(st.unwrap().success());
                },
                BatchSize::PerIteration,
            )
        });
        fresh(&copy);
        let durabilities: &[(&str, Durability)] = if fs == "ext4" {
            &[("nosync", Durability::NoSync), ("fsync", Durability::Sync)]
        } else {
            &[("nosync", Durability::NoSync)]
        };
        for &(sync, durability) in durabilities {
            g.bench_function(format!("save_paused_{sync}_{fs}"), |b| {
                b.iter_batched(
                    || fresh(&image),
                    |()| {
                        let sink = ImageWriter::create(&image, ImageLayout::of(&mem), durability).unwrap();
                        save_paused(&mem, Box::new(sink)).unwrap()
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
    let (_, peak) = peak_heap(|| {
        let sink = ImageWriter::create(&image, ImageLayout::of(&mem), Durability::NoSync).unwrap();
        save_paused(&mem, Box::new(sink)).unwrap()
    });
    eprintln!(
        "FIGURE paused_save peak_heap_bytes={peak} ({:.2} bytes per guest page)",
        peak as f64 / PAGES as f64
    );

    let mut g = c.benchmark_group("restore_1GiB_10pct");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let touched = GuestMemory::anonymous(GIB).unwrap();
    memory::reference::write_all(&touched, &vec![0x5a; GIB as usize]).unwrap();
    // Baseline: paused_save_1GiB_10pct/baseline_scan_plus_memcpy_nonzero, measured above.
    g.bench_function("restore_touched", |b| {
        b.iter(|| restore(&image, &touched, &RestoreOptions::default()).unwrap())
    });
    g.bench_function("restore_fresh_memory", |b| {
        b.iter_batched(
            || GuestMemory::anonymous(GIB).unwrap(),
            |fresh| {
                restore(
                    &image,
                    &fresh,
                    &RestoreOptions {
                        zero_pages: ZeroPages::AssumeZeroed,
                    },
                )
                .unwrap();
                fresh
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    drop(touched);

    let mut g = c.benchmark_group("round_1GiB_quiet");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("baseline_read_scan_vec", |b| b.iter(|| read_scan(&s.ram)));
    g.bench_function("baseline_read_scan_ram_file", |b| {
        b.iter(|| memory::reference::read_scan(&mem))
    });
    let mut save = content_compare_save(&mem, &s.out_dir.path().join("live.img"));
    g.bench_function("content_compare_round_ram_file", |b| {
        b.iter(|| assert_eq!(save.round().unwrap().pages_dirty, 0))
    });
    let r = save.rounds().last().unwrap();
    eprintln!(
        "FIGURE quiet round: collect {:?} copy {:?}",
        r.collect_time, r.copy_time
    );
    drop(save);
    g.finish();
    drop(mem);
    let _ = std::fs::remove_file(&s.ram_file);
}

/// Live save of 1 GiB (10% non-zero) while a writer dirties a 256 MiB working set at 50 MB/s.
/// The measured time is that of `finish()` alone: the pause.
fn live_save(c: &mut Criterion) {
    let ram = guest_contents();
    let mem = GuestMemory::anonymous(GIB).unwrap();
    memory::reference::write_all(&mem, &ram).unwrap();
    drop(ram);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut g = c.benchmark_group("live_save_1GiB_50MBps");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(8));
    type MakeSource = fn() -> Box<dyn DirtySource>;
    let sources: [(&str, MakeSource); 2] = [
        ("content_compare_finish", || Box::new(ContentCompare::new())),
        ("uffd_write_protect_finish", || Box::new(UffdWriteProtect::new())),
    ];
    for (name, make) in sources {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut paused = Duration::ZERO;
                for _ in 0..iters {
                    paused += one_live_save(&mem, make(), &dir.path().join("live.img"), name);
                }
                paused
            })
        });
    }
    g.finish();
}

fn one_live_save(mem: &GuestMemory, source: Box<dyn DirtySource>, path: &Path, name: &str) -> Duration {
    const RATE: f64 = 50e6;
    const WORKING_SET: u64 = 256 << 20;
    let stop = AtomicBool::new(false);
    let written_total = std::sync::atomic::AtomicU64::new(0);
    let sink = ImageWriter::create(path, ImageLayout::of(mem), Durability::NoSync).unwrap();
    let policy = ConvergencePolicy::default();
    let (finish_time, rounds, final_pages, reason, peak) = std::thread::scope(|s| {
        s.spawn(|| {
            // A new sequence every save: replaying the last one would rewrite pages with the bytes they
            // already hold, which content comparison rightly does not count as dirty.
            static SAVES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let mut rng = Rng(7 + SAVES.fetch_add(1, Ordering::Relaxed));
            let started = Instant::now();
            let mut written = 0f64;
            let mut page = vec![0u8; PAGE_SIZE];
            while !stop.load(Ordering::Relaxed) {
                while written < started.elapsed().as_secs_f64() * RATE {
                    page[..8].copy_from_slice(&rng.next().to_le_bytes());
                    let p = rng.next() % (WORKING_SET / PAGE_SIZE as u64);
                    mem.write(p * PAGE_SIZE as u64, &page).unwrap();
                    written += PAGE_SIZE as f64;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            // Achieved rate in bytes per second: the writer shares two cores with the save's workers.
            written_total.store(
                (written / started.elapsed().as_secs_f64()) as u64,
                Ordering::Relaxed,
            );
        });
        let ((reason, save), peak) = peak_heap(|| {
            let mut save = LiveSave::begin(
                mem,
                source,
                Box::new(sink),
                SaveOptions {
                    policy,
                    progress: None,
                },
            )
            .unwrap();
            (save.precopy().unwrap(), save)
        });
        stop.store(true, Ordering::Relaxed); // the orchestrator pauses the domain
        std::thread::sleep(Duration::from_millis(2)); // let the writer notice
        let rounds: Vec<u64> = save.rounds().iter().map(|r| r.pages_dirty).collect();
        let t = Instant::now();
        let finished = save.finish().unwrap();
        let finish_time = t.elapsed();
        let last = finished.rounds().last().unwrap();
        let final_pages = (last.pages_dirty, last.collect_time, last.copy_time);
        finished.seal().unwrap();
        (finish_time, rounds, final_pages, reason, peak)
    });
    eprintln!(
        "FIGURE live {name}: precopy_rounds_dirty={rounds:?} writer_rate_Bps={} stop={reason:?} final_round_pages={} (collect {:?}, copy {:?}) finish_ms={:.2} peak_heap_bytes={peak}",
        written_total.load(Ordering::Relaxed),
        final_pages.0,
        final_pages.1,
        final_pages.2,
        finish_time.as_secs_f64() * 1e3
    );
    finish_time
}

/// The same 10% of pages, but in a sparse RAM file whose other pages were never written (as for a
/// guest that has not touched most of its memory): holes are neither read nor allocated.
fn sparse_ram_file(c: &mut Criterion) {
    let ram = guest_contents();
    let ram_file = PathBuf::from(format!("/dev/shm/memory-bench-sparse-{}", std::process::id()));
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&ram_file)
        .unwrap();
    f.set_len(GIB).unwrap();
    for (i, page) in ram.chunks_exact(PAGE_SIZE).enumerate() {
        if page_or(page) != 0 {
            std::os::unix::fs::FileExt::write_all_at(&f, page, (i * PAGE_SIZE) as u64).unwrap();
        }
    }
    drop(ram);
    let mem = ram_file_memory(&ram_file);
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (image, copy) = (dir.path().join("ram.img"), dir.path().join("ram.copy"));
    let mut g = c.benchmark_group("sparse_ram_file_1GiB_10pct");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("baseline_cp_sparse_always_tmpfs", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(&copy);
            },
            |()| {
                let st = std::process::Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&ram_file)
                    .arg(&copy)
                    .status();
                assert!(st.unwrap().success());
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("save_paused_nosync_tmpfs", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(&image);
            },
            |()| {
                let sink = ImageWriter::create(&image, ImageLayout::of(&mem), Durability::NoSync).unwrap();
                save_paused(&mem, Box::new(sink)).unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    let mut save = content_compare_save(&mem, &dir.path().join("live.img"));
    g.bench_function("content_compare_round", |b| {
        b.iter(|| assert_eq!(save.round().unwrap().pages_dirty, 0))
    });
    g.finish();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&f.metadata().unwrap()) * 512;
    eprintln!("FIGURE sparse RAM file allocated after the benchmarks: {allocated} bytes");
    drop(save);
    drop(mem);
    let _ = std::fs::remove_file(&ram_file);
}

criterion_group!(benches, paused_save_and_restore, live_save, sparse_ram_file);
criterion_main!(benches);
