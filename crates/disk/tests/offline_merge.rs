//! Deleting external snapshots offline (native stream and commit) against qemu-img and qemu-io:
//! the disk shows the same bytes before and after, and every remaining image checks clean.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use disk::{offline, Error, MergeMethod};
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;

/// Runs one qemu-io command on an image.
fn io(path: &Path, command: &str) {
    tool("qemu-io", &["-f", "qcow2", "-c", command, &s(path)]);
}

/// Creates `name` in `dir` backed by `backing` (named relative to `dir`), with options `opts`.
fn overlay(dir: &Path, name: &str, backing: &str, opts: &str) -> PathBuf {
    let mut all = format!("backing_file={backing},backing_fmt=qcow2");
    if !opts.is_empty() {
        all = format!("{all},{opts}");
    }
    create(dir, name, &SIZE.to_string(), &all)
}

/// base <- mid <- top, with data only in base, only in mid, overwritten in top, and zeroed
/// with `write -z` in top over data below. `opts` gives each image's creation options.
fn chain(dir: &Path, opts: [&str; 3]) -> [PathBuf; 3] {
    let base = create(dir, "base.qcow2", &SIZE.to_string(), opts[0]);
    let mid = overlay(dir, "mid.qcow2", "base.qcow2", opts[1]);
    let top = overlay(dir, "top.qcow2", "mid.qcow2", opts[2]);
    write(&base, 1, 0, 192 << 10);
    write(&base, 2, 1 << 20, 64 << 10);
    write(&base, 3, (3 << 20) + 512, 4096);
    write(&mid, 4, 64 << 10, 64 << 10);
    write(&mid, 5, 2 << 20, 128 << 10);
    write(&mid, 6, (1 << 20) + 4096, 512);
    write(&top, 7, 96 << 10, 32 << 10);
    io(&top, "write -z 0 32k");
    io(&top, &format!("write -z {} 64k", (2 << 20) + (64 << 10)));
    write(&top, 8, (7 << 19) + 1024, 8192);
    [base, mid, top]
}

/// The chain of `disk` as paths.
fn paths(disk: &Path) -> Vec<PathBuf> {
    offline::backing_chain(disk)
        .unwrap()
        .into_iter()
        .map(|c| c.path)
        .collect()
}

const LAYOUTS: [[&str; 3]; 4] = [
    ["", "", ""],
    ["cluster_size=4096", "cluster_size=4096", "cluster_size=4096"],
    ["compat=0.10", "compat=0.10", "compat=0.10"],
    // Different cluster sizes across the chain, and subclusters.
    [
        "cluster_size=4096,refcount_bits=8",
        "extended_l2=on,cluster_size=65536",
        "cluster_size=512",
    ],
];

#[test]
fn merges_keep_the_disk_contents() {
    // Stream the middle image into the active one and the base into the middle one; commit the
    // middle image into the base and the active image into the middle one.
    let cases = [
        (MergeMethod::StreamIntoChild, 1),
        (MergeMethod::StreamIntoChild, 0),
        (MergeMethod::CommitIntoParent, 1),
        (MergeMethod::CommitIntoParent, 2),
    ];
    for opts in LAYOUTS {
        for (method, merged) in cases {
            let dir = tempfile::tempdir().unwrap();
            let images = chain(dir.path(), opts);
            let top = &images[2];
            let before = contents(top, None);
            let active = offline::delete_external(top, &images[merged], method).unwrap();
            // Committing the active image makes its parent the active image.
            let expected = if merged == 2 { &images[1] } else { top };
            assert_eq!(&active, expected, "{opts:?} {method:?} {merged}");
            assert_eq!(contents(&active, None), before, "{opts:?} {method:?} {merged}");
            let remaining: Vec<PathBuf> = images
                .iter()
                .rev()
                .filter(|p| **p != images[merged])
                .cloned()
                .collect();
            assert_eq!(paths(&active), remaining, "{opts:?} {method:?} {merged}");
            for image in &images {
                check_clean(image);
            }
        }
    }
}

#[test]
fn commit_into_a_parent_with_snapshots_keeps_them() {
    for (merged, parent) in [(2, 1), (1, 0)] {
        let dir = tempfile::tempdir().unwrap();
        let images = chain(dir.path(), ["refcount_bits=8", "cluster_size=4096", ""]);
        tool("qemu-img", &["snapshot", "-c", "s1", &s(&images[parent])]);
        // Written after the snapshot: the active state and s1 now differ in the parent.
        write(&images[parent], 12, 2 << 20, 4096);
        let saved = contents(&images[parent], Some("s1"));
        let before = contents(&images[2], None);
        let active =
            offline::delete_external(&images[2], &images[merged], MergeMethod::CommitIntoParent).unwrap();
        assert_eq!(contents(&active, None), before, "merged {merged}");
        assert_eq!(contents(&images[parent], Some("s1")), saved, "merged {merged}");
        assert_eq!(qemu_snapshot_names(&images[parent]), ["s1"]);
        check_clean(&images[parent]);
        // The snapshot is still usable: applying it gives back what it held.
        offline::apply_internal(&[images[parent].clone()], "s1").unwrap();
        assert_eq!(contents(&images[parent], None), saved);
        check_clean(&images[parent]);
    }
}

/// Streams `base`, the backing image of `top`, into it: `top` shows the same and stands alone.
fn streaming_the_base_flattens(top: &Path, base: &Path) {
    let before = contents(top, None);
    offline::delete_external(top, base, MergeMethod::StreamIntoChild).unwrap();
    assert_eq!(contents(top, None), before);
    assert_eq!(paths(top), [top.to_owned()]);
    check_clean(top);
}

#[test]
fn large_merges_take_several_batches() {
    // 512-byte clusters: 2 MiB of data is 4096 clusters, several batches and refcount blocks.
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", &SIZE.to_string(), "cluster_size=512");
    let top = overlay(dir.path(), "top.qcow2", "base.qcow2", "cluster_size=512");
    write(&base, 13, 0, 2 << 20);
    write(&top, 14, 1 << 20, 4096);
    streaming_the_base_flattens(&top, &base);
}

#[test]
fn streaming_into_one_branch_keeps_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = chain(dir.path(), ["", "", ""]);
    let other = overlay(dir.path(), "other.qcow2", "mid.qcow2", "cluster_size=4096");
    write(&other, 9, 64 << 10, 4096);
    let (top_before, other_before) = (contents(&top, None), contents(&other, None));
    offline::delete_external(&top, &mid, MergeMethod::StreamIntoChild).unwrap();
    assert_eq!(contents(&top, None), top_before);
    assert_eq!(contents(&other, None), other_before);
    assert_eq!(paths(&other), [other.clone(), mid.clone(), base.clone()]);
    for image in [&base, &mid, &top, &other] {
        check_clean(image);
    }
}

#[test]
fn a_backing_name_in_another_folder_is_made_absolute() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = create(dir.path(), "base.qcow2", &SIZE.to_string(), "");
    let mid = overlay(dir.path(), "mid.qcow2", "base.qcow2", "");
    let top = overlay(&sub, "top.qcow2", "../mid.qcow2", "");
    write(&mid, 4, 0, 4096);
    offline::delete_external(&top, &mid, MergeMethod::StreamIntoChild).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", &s(&top)])).unwrap();
    assert_eq!(info["backing-filename"], s(&base.canonicalize().unwrap()));
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(&contents(&top, None)[..4096], &[4u8; 4096][..]);
    check_clean(&top);
}

#[test]
fn a_raw_base_streams_but_is_not_committed_into() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "raw", &s(&base), &SIZE.to_string()],
    );
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 15 4096 12288", &s(&base)],
    );
    let top = create(
        dir.path(),
        "top.qcow2",
        &SIZE.to_string(),
        "backing_file=base.raw,backing_fmt=raw",
    );
    write(&top, 16, 8192, 512);
    let err = offline::delete_external(&top, &top, MergeMethod::CommitIntoParent).unwrap_err();
    assert!(err.to_string().contains("not qcow2"), "{err}");
    streaming_the_base_flattens(&top, &base);
}

#[test]
fn a_backing_name_that_cannot_fit_is_refused_before_writing() {
    // With 512-byte clusters the header area cannot hold a 400-byte absolute backing name.
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("d".repeat(200)).join("e".repeat(200));
    std::fs::create_dir_all(&deep).unwrap();
    let base = create(&deep, "base.qcow2", &SIZE.to_string(), "");
    let mid = overlay(&deep, "mid.qcow2", "base.qcow2", "");
    // The top names it through a short symlink; the base's resolved path is long.
    std::os::unix::fs::symlink(&deep, dir.path().join("link")).unwrap();
    let top = overlay(dir.path(), "top.qcow2", "link/mid.qcow2", "cluster_size=512");
    write(&mid, 4, 0, 4096);
    let images = [base, mid.clone(), top.clone()];
    let before = snapshot_of(&images);
    let err = offline::delete_external(&top, &mid, MergeMethod::StreamIntoChild).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert_eq!(snapshot_of(&images), before);
    for image in &images {
        check_clean(image);
    }
}

/// Every image's contents and chain, to compare before and after a refused merge.
fn snapshot_of(images: &[PathBuf]) -> Vec<(Vec<u8>, Vec<PathBuf>)> {
    images.iter().map(|p| (contents(p, None), paths(p))).collect()
}

#[test]
fn refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = chain(dir.path(), ["", "", ""]);
    // Compressed data that a merge would have to read.
    io(&base, &format!("write -c -P 11 {} 64k", 15 << 18));
    let images = [base.clone(), mid.clone(), top.clone()];
    let before = snapshot_of(&images);
    let refused = |image: &Path, method, want: &str| {
        let err = offline::delete_external(&top, image, method).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    };
    refused(&top, MergeMethod::StreamIntoChild, "has no child");
    refused(&base, MergeMethod::CommitIntoParent, "no backing image");
    refused(
        &dir.path().join("nope.qcow2"),
        MergeMethod::StreamIntoChild,
        "not in the disk's backing chain",
    );
    refused(
        Path::new("relative.qcow2"),
        MergeMethod::StreamIntoChild,
        "absolute path",
    );
    refused(&base, MergeMethod::StreamIntoChild, "compressed cluster");
    tool("qemu-img", &["snapshot", "-c", "s1", &s(&top)]);
    refused(&mid, MergeMethod::StreamIntoChild, "internal snapshots");
    refused(&top, MergeMethod::CommitIntoParent, "internal snapshots");
    tool("qemu-img", &["snapshot", "-d", "s1", &s(&top)]);
    assert_eq!(snapshot_of(&images), before);
    // Encrypted clusters would not decrypt in another image.
    let secret = dir.path().join("crypt.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=k,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10",
            &s(&secret),
            "4M",
        ],
    );
    let over = dir.path().join("over-crypt.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "crypt.qcow2",
            "-F",
            "qcow2",
            &s(&over),
            "4M",
        ],
    );
    let err = offline::delete_external(&over, &secret, MergeMethod::StreamIntoChild).unwrap_err();
    assert!(err.to_string().contains("encrypted"), "{err}");
    for image in &images {
        check_clean(image);
    }
}

#[test]
fn images_held_by_qemu_are_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = chain(dir.path(), ["", "", ""]);
    let images = [base.clone(), mid.clone(), top.clone()];
    let before = snapshot_of(&images);
    let qemu = testkit::Qemu::builder("disk-merge-lock")
        .paused()
        .disk(&top)
        .spawn();
    let _ = qemu.qmp_socket();
    // The locks are taken when the block nodes open, shortly after the socket appears.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !matches!(offline::list_internal(&top), Err(Error::Locked { .. })) {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU never locked the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for (image, method) in [
        (&mid, MergeMethod::StreamIntoChild),
        (&base, MergeMethod::StreamIntoChild),
        (&mid, MergeMethod::CommitIntoParent),
        (&top, MergeMethod::CommitIntoParent),
    ] {
        let err = offline::delete_external(&top, image, method).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }), "{err}");
    }
    drop(qemu);
    assert_eq!(snapshot_of(&images), before);
    for image in &images {
        check_clean(image);
    }
}

#[tokio::test]
async fn through_the_trait() {
    use disk::{DiskSnapshots, OfflineBackend};
    let dir = tempfile::tempdir().unwrap();
    let [_, mid, top] = chain(dir.path(), ["", "", ""]);
    let before = contents(&top, None);
    let backend: &dyn DiskSnapshots = &OfflineBackend;
    let active = backend
        .delete_external(&top, &top, MergeMethod::CommitIntoParent)
        .await
        .unwrap();
    assert_eq!(active, mid);
    assert_eq!(contents(&mid, None), before);
}

/// A write by qemu-io into one image of the chain: `zero` uses `write -z`.
#[derive(Debug, Clone)]
struct Write {
    image: usize,
    offset: u64,
    len: u64,
    pattern: u8,
    zero: bool,
}

fn a_write() -> impl Strategy<Value = Write> {
    (
        0..3usize,
        0..SIZE / 512,
        1..64u64,
        1..255u8,
        prop::bool::weighted(0.2),
    )
        .prop_map(|(image, sector, sectors, pattern, zero)| {
            let offset = sector * 512;
            Write {
                image,
                offset,
                len: (sectors * 512).min(SIZE - offset),
                pattern,
                zero,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 10, ..ProptestConfig::default() })]

    #[test]
    fn random_chains_merge_to_the_same_contents(
        layout in prop::sample::select(LAYOUTS.to_vec()),
        writes in prop::collection::vec(a_write(), 1..12),
        merged in 0..3usize,
        stream in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let base = create(dir.path(), "base.qcow2", &SIZE.to_string(), layout[0]);
        let mid = overlay(dir.path(), "mid.qcow2", "base.qcow2", layout[1]);
        let top = overlay(dir.path(), "top.qcow2", "mid.qcow2", layout[2]);
        let images = [base, mid, top.clone()];
        for w in &writes {
            let command = if w.zero {
                format!("write -z {} {}", w.offset, w.len)
            } else {
                format!("write -P {} {} {}", w.pattern, w.offset, w.len)
            };
            io(&images[w.image], &command);
        }
        let before = contents(&top, None);
        // Streaming needs a child (not the top); committing needs a parent (not the base).
        let (method, merged) = match (stream, merged) {
            (true, 2) => (MergeMethod::StreamIntoChild, 1),
            (true, m) => (MergeMethod::StreamIntoChild, m),
            (false, 0) => (MergeMethod::CommitIntoParent, 1),
            (false, m) => (MergeMethod::CommitIntoParent, m),
        };
        let active = offline::delete_external(&top, &images[merged], method).unwrap();
        prop_assert_eq!(contents(&active, None), before);
        prop_assert_eq!(paths(&active).len(), 2);
        for image in images.iter().filter(|p| **p != images[merged]) {
            check_clean(image);
        }
    }
}

/// Runs `work` on a thread, failing the test if it takes longer than `secs` seconds.
fn within<T: Send + 'static>(secs: u64, work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("took longer than {secs} s"))
}

#[test]
fn hostile_sparse_huge_disk_merges_fast() {
    // 1 PiB of virtual size with two allocated clusters: a merge that walked every guest
    // cluster (16 G of them) would run for hours; it must follow the allocated ones.
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "1P", "");
    let mid = create(
        dir.path(),
        "mid.qcow2",
        "1P",
        "backing_file=base.qcow2,backing_fmt=qcow2",
    );
    let top = create(
        dir.path(),
        "top.qcow2",
        "1P",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
    );
    let far = (1u64 << 50) - (1 << 20);
    write(&base, 1, 0, 65536);
    write(&mid, 2, far, 65536);
    write(&top, 3, 65536, 4096);
    let (t, m) = (top.clone(), mid.clone());
    let active = within(60, move || {
        offline::delete_external(&t, &m, MergeMethod::CommitIntoParent)
    })
    .unwrap();
    assert_eq!(active, top);
    let (t, b) = (top.clone(), base.clone());
    within(60, move || {
        offline::delete_external(&t, &b, MergeMethod::StreamIntoChild)
    })
    .unwrap();
    assert_eq!(paths(&top), vec![top.clone()]);
    io(&top, "read -P 1 0 64k");
    io(&top, "read -P 3 64k 4k");
    io(&top, &format!("read -P 2 {far} 64k"));
    io(&top, &format!("read -P 0 {} 64k", far + 65536));
    check_clean(&top);
}

#[test]
fn hostile_backing_file_that_is_a_fifo_fails_fast() {
    // A backing name naming a FIFO: opening it for reading would block until a writer comes,
    // with the domain's lock held. It must be refused without being opened.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("base.raw");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let top = dir.path().join("top.qcow2");
    disk::qcow2::create_overlay(&top, "base.raw", "raw", SIZE).unwrap();
    let t = top.clone();
    let err = within(10, move || offline::backing_chain(&t)).unwrap_err();
    assert!(err.to_string().contains("is a FIFO"), "{err}");
    let (t, f) = (top.clone(), fifo.clone());
    let err = within(10, move || {
        offline::delete_external(&t, &f, MergeMethod::StreamIntoChild)
    })
    .unwrap_err();
    assert!(err.to_string().contains("is a FIFO"), "{err}");
    // Also as a qcow2 backing, and a directory or device.
    for (name, format) in [("base.raw", "qcow2"), (".", "raw"), ("/dev/zero", "raw")] {
        let other = dir.path().join("other.qcow2");
        let _ = std::fs::remove_file(&other);
        disk::qcow2::create_overlay(&other, name, format, SIZE).unwrap();
        let err = within(10, move || offline::backing_chain(&other)).unwrap_err();
        assert!(err.to_string().contains("images must be regular files"), "{err}");
    }
}

#[test]
fn hostile_raw_backing_with_a_qcow2_header_stays_raw() {
    // A guest can write a qcow2 header (naming any host file as its backing) into its raw disk:
    // the backing image is opened as the format its child records, never probed.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![7u8; SIZE as usize]).unwrap();
    let raw = dir.path().join("base.raw");
    create(
        dir.path(),
        "fake.qcow2",
        &SIZE.to_string(),
        "backing_file=secret.raw,backing_fmt=raw",
    );
    std::fs::copy(dir.path().join("fake.qcow2"), &raw).unwrap();
    let top = dir.path().join("top.qcow2");
    disk::qcow2::create_overlay(&top, "base.raw", "raw", SIZE).unwrap();
    let chain = offline::backing_chain(&top).unwrap();
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!((chain[1].path.clone(), chain[1].format.as_str()), (raw, "raw"));
}
