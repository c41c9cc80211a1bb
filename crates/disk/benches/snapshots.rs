//! Native internal snapshot create and delete vs `qemu-img snapshot -c/-d`, on copies of the
//! same sparse 10 GiB image with 4096 allocated clusters spread over it.
//!
//! `cargo bench -p disk --bench snapshots`; compare `native/*` with `qemu-img/*`.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};

const CLUSTERS: u64 = 4096;
const SIZE: u64 = 10 << 30;

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// A 10 GiB qcow2 image with `CLUSTERS` 64 KiB clusters of data spread evenly over it.
fn build_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, &SIZE.to_string()]);
    let stride = SIZE / CLUSTERS;
    let writes: Vec<String> = (0..CLUSTERS)
        .map(|i| format!("write -q -P {} {} 65536", i % 251, i * stride))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(p);
    run("qemu-io", &args);
    path
}

/// Times `timed` after `before`, undoing with `after` outside the measurement.
fn measure(
    iters: u64,
    mut before: impl FnMut(),
    mut timed: impl FnMut(),
    mut after: impl FnMut(),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        before();
        let start = Instant::now();
        timed();
        total += start.elapsed();
        after();
    }
    total
}

fn snapshots(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ours = build_image(dir.path(), "native.qcow2");
    let theirs = dir.path().join("qemu-img.qcow2");
    run(
        "cp",
        &[
            "--sparse=always",
            ours.to_str().unwrap(),
            theirs.to_str().unwrap(),
        ],
    );
    let disks = vec![ours.clone()];
    let t = theirs.to_str().unwrap().to_owned();
    let native_create = || disk::offline::create_internal(&disks, "bench").unwrap();
    let native_delete = || disk::offline::delete_internal(&disks, "bench").unwrap();
    let qemu_create = || run("qemu-img", &["snapshot", "-c", "bench", &t]);
    let qemu_delete = || run("qemu-img", &["snapshot", "-d", "bench", &t]);

    let mut group = c.benchmark_group("internal-snapshot-10GiB-4096-clusters");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("native/create", |b| {
        b.iter_custom(|n| measure(n, || {}, native_create, native_delete))
    });
    group.bench_function("qemu-img/create", |b| {
        b.iter_custom(|n| measure(n, || {}, qemu_create, qemu_delete))
    });
    group.bench_function("native/delete", |b| {
        b.iter_custom(|n| measure(n, native_create, native_delete, || {}))
    });
    group.bench_function("qemu-img/delete", |b| {
        b.iter_custom(|n| measure(n, qemu_create, qemu_delete, || {}))
    });
    group.finish();
}

criterion_group!(benches, snapshots);
criterion_main!(benches);
