//! The native qcow2 backend against qemu-img and qemu-io.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::{
    fs,
    os::unix::fs::{FileExt, PermissionsExt},
    path::PathBuf,
};

use common::*;
use disk::{offline, qcow2, BackingPath, Error, ExternalSnapshot};

fn one(path: &std::path::Path) -> Vec<PathBuf> {
    vec![path.to_owned()]
}

#[test]
fn lists_snapshots_made_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for opts in ["compat=1.1", "compat=0.10", "cluster_size=4096,refcount_bits=8"] {
        let img = create(dir.path(), &format!("l-{}.qcow2", opts.len()), "16M", opts);
        tool("qemu-img", &["snapshot", "-c", "first", &s(&img)]);
        tool("qemu-img", &["snapshot", "-c", "second", &s(&img)]);
        let list = offline::list_internal(&img).unwrap();
        assert_eq!(
            list.iter().map(|s| (&*s.id, &*s.name)).collect::<Vec<_>>(),
            [("1", "first"), ("2", "second")]
        );
        assert!(list
            .iter()
            .all(|s| s.vm_state_size == 0 && s.date_sec > 1_600_000_000));
        if opts != "compat=0.10" {
            assert!(list.iter().all(|s| s.disk_size == Some(16 << 20)));
        }
    }
}

#[test]
fn refuses_unsupported_images_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let set_incompatible = |bits: u64| {
        let img = create(dir.path(), &format!("bits-{bits}.qcow2"), "1M", "");
        fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&bits.to_be_bytes(), 72)
            .unwrap();
        img
    };
    let cases = [
        (set_incompatible(1), "dirty bit"),
        (set_incompatible(2), "corrupt bit"),
        (set_incompatible(1 << 20), "unknown incompatible features: bit 20"),
    ];
    for (img, want) in &cases {
        let err = offline::create_internal(&one(img), "s").unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains(want), "{err}");
        assert!(offline::list_internal(img).is_err());
    }
    let data = dir.path().join("data.raw");
    let ext = create(dir.path(), "ext.qcow2", "1M", &format!("data_file={}", s(&data)));
    let err = offline::list_internal(&ext).unwrap_err().to_string();
    assert!(err.contains("external data file"), "{err}");

    let bitmaps = create(dir.path(), "bitmaps.qcow2", "1M", "");
    tool("qemu-img", &["bitmap", "--add", &s(&bitmaps), "b0"]);
    assert!(offline::list_internal(&bitmaps).unwrap().is_empty());
    let err = offline::create_internal(&one(&bitmaps), "s")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bitmaps"), "{err}");

    let raw = dir.path().join("plain.raw");
    fs::write(&raw, vec![0u8; 4096]).unwrap();
    let err = offline::list_internal(&raw).unwrap_err().to_string();
    assert!(err.contains("bad magic"), "{err}");
    let short = dir.path().join("short.qcow2");
    fs::write(&short, b"QFI\xfb\0\0\0\x03").unwrap();
    assert!(matches!(
        offline::list_internal(&short),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn refuses_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "n.qcow2", "1M", "");
    for bad in ["", "42", "a b", "../x"] {
        assert!(matches!(
            offline::create_internal(&one(&img), bad),
            Err(Error::InvalidArgument { .. })
        ));
    }
    offline::create_internal(&one(&img), "s").unwrap();
    assert!(matches!(
        offline::create_internal(&one(&img), "s"),
        Err(Error::SnapshotExists { .. })
    ));
    assert!(matches!(
        offline::apply_internal(&one(&img), "nope"),
        Err(Error::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        offline::delete_internal(&one(&img), "nope"),
        Err(Error::SnapshotNotFound { .. })
    ));
    check_clean(&img);
}

/// Create, overwrite, apply, delete with data checks, on several layouts.
#[test]
fn internal_snapshots_keep_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let layouts = [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=2",
        "cluster_size=4096,refcount_bits=64",
        "cluster_size=65536,extended_l2=on",
        "cluster_size=2097152",
    ];
    for (i, opts) in layouts.iter().enumerate() {
        let img = create(dir.path(), &format!("d{i}.qcow2"), "8M", opts);
        write(&img, 0x11, 0, 1 << 20);
        write(&img, 0x12, 5 << 20, 12345);
        let v1 = contents(&img, None);
        offline::create_internal(&one(&img), "one").unwrap();
        check_clean(&img);
        write(&img, 0x21, 512 << 10, 1 << 20);
        let v2 = contents(&img, None);
        offline::create_internal(&one(&img), "two").unwrap();
        check_clean(&img);
        write(&img, 0x31, 0, 64 << 10);
        assert_eq!(qemu_snapshot_names(&img), ["one", "two"], "{opts}");
        assert_eq!(contents(&img, Some("one")), v1, "{opts}");
        assert_eq!(contents(&img, Some("two")), v2, "{opts}");

        offline::apply_internal(&one(&img), "one").unwrap();
        check_clean(&img);
        assert_eq!(contents(&img, None), v1, "{opts}");
        write(&img, 0x41, 7 << 20, 4096);
        offline::delete_internal(&one(&img), "one").unwrap();
        check_clean(&img);
        assert_eq!(contents(&img, Some("two")), v2, "{opts}");
        offline::apply_internal(&one(&img), "two").unwrap();
        check_clean(&img);
        assert_eq!(contents(&img, None), v2, "{opts}");
        offline::delete_internal(&one(&img), "two").unwrap();
        check_clean(&img);
        assert_eq!(contents(&img, None), v2, "{opts}");
        assert!(qemu_snapshot_names(&img).is_empty());
    }
}

#[test]
fn interoperates_with_qemu_img_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "i.qcow2", "4M", "");
    write(&img, 1, 0, 1 << 20);
    let v1 = contents(&img, None);
    tool("qemu-img", &["snapshot", "-c", "theirs", &s(&img)]);
    write(&img, 2, 0, 1 << 20);
    let v2 = contents(&img, None);
    offline::create_internal(&one(&img), "ours").unwrap();
    assert_eq!(our_names(&img), ["theirs", "ours"]);
    assert_eq!(qemu_snapshot_names(&img), ["theirs", "ours"]);
    // Theirs applied by us, ours applied by them.
    offline::apply_internal(&one(&img), "theirs").unwrap();
    check_clean(&img);
    assert_eq!(contents(&img, None), v1);
    tool("qemu-img", &["snapshot", "-a", "ours", &s(&img)]);
    check_clean(&img);
    assert_eq!(contents(&img, None), v2);
    // Theirs deleted by us, ours by them.
    offline::delete_internal(&one(&img), "theirs").unwrap();
    check_clean(&img);
    tool("qemu-img", &["snapshot", "-d", "ours", &s(&img)]);
    check_clean(&img);
    assert!(our_names(&img).is_empty());
    assert_eq!(contents(&img, None), v2);
}

#[test]
fn compressed_clusters_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let plain = create(dir.path(), "p.qcow2", "4M", "");
    write(&plain, 7, 0, 3 << 20);
    let img = dir.path().join("c.qcow2");
    tool(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", &s(&plain), &s(&img)],
    );
    let before = contents(&img, None);
    offline::create_internal(&one(&img), "s").unwrap();
    check_clean(&img);
    write(&img, 8, 0, 1 << 20);
    offline::apply_internal(&one(&img), "s").unwrap();
    check_clean(&img);
    assert_eq!(contents(&img, None), before);
    offline::delete_internal(&one(&img), "s").unwrap();
    check_clean(&img);
}

#[test]
fn refcount_overflow_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "r1.qcow2", "1M", "refcount_bits=1");
    write(&img, 3, 0, 4096);
    let before = fs::read(&img).unwrap();
    let err = offline::create_internal(&one(&img), "s").unwrap_err();
    assert!(matches!(err, Error::RefcountOverflow { .. }), "{err}");
    assert_eq!(
        fs::read(&img).unwrap(),
        before,
        "a refused snapshot must not change the image"
    );
}

#[test]
fn refcount_table_grows_when_full() {
    // 512-byte clusters with 64-bit refcounts: 64 counts per block, so the table fills quickly.
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "g.qcow2", "4M", "cluster_size=512,refcount_bits=64");
    let table = |img: &std::path::Path| {
        qcow2::Image::open(img, qcow2::Access::Read)
            .unwrap()
            .header()
            .refcount_table_offset
    };
    let first = table(&img);
    let mut grew = false;
    for round in 0..40 {
        write(&img, round as u8, (round * 96) << 10, 96 << 10);
        offline::create_internal(&one(&img), &format!("s{round}")).unwrap();
        check_clean(&img);
        if table(&img) != first {
            grew = true;
            break;
        }
    }
    assert!(grew, "the refcount table never had to grow");
}

#[test]
fn multi_disk_create_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = create(dir.path(), "a.qcow2", "1M", "");
    let b = create(dir.path(), "b.qcow2", "1M", "refcount_bits=1");
    write(&b, 1, 0, 4096);
    let err = offline::create_internal(&[a.clone(), b.clone()], "s").unwrap_err();
    assert!(matches!(err, Error::RefcountOverflow { .. }));
    assert!(
        our_names(&a).is_empty(),
        "the snapshot of the first disk was not rolled back"
    );
    check_clean(&a);
    check_clean(&b);
}

#[test]
fn overlays_are_valid_qcow2_with_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "3G", "");
    write(&base, 5, 1 << 30, 1 << 20);
    let overlay = dir.path().join("top.qcow2");
    let spec = ExternalSnapshot {
        disk: base.clone(),
        overlay: overlay.clone(),
        backing_path: BackingPath::Relative,
    };
    offline::create_external(std::slice::from_ref(&spec)).unwrap();
    assert_eq!(
        fs::metadata(&overlay).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let info: serde_json::Value =
        serde_json::from_str(&tool("qemu-img", &["info", "--output=json", &s(&overlay)])).unwrap();
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 3u64 << 30);
    check_clean(&overlay);
    let read = tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 5 {} 1048576", 1u64 << 30),
            &s(&overlay),
        ],
    );
    assert!(!read.contains("fail"), "{read}");
    write(&overlay, 6, 0, 65536);
    check_clean(&overlay);
    // Internal snapshots work on our overlays too.
    offline::create_internal(&one(&overlay), "o").unwrap();
    check_clean(&overlay);
    // The same path again is refused, as is an overlay in a missing folder.
    assert!(matches!(
        offline::create_external(std::slice::from_ref(&spec)),
        Err(Error::InvalidArgument { .. })
    ));
    let lost = ExternalSnapshot {
        overlay: dir.path().join("no/such/dir.qcow2"),
        ..spec.clone()
    };
    assert!(offline::create_external(&[lost]).is_err());

    // Absolute backing onto a raw image, and the chain.
    let raw = dir.path().join("base.raw");
    fs::write(&raw, vec![9u8; 1 << 20]).unwrap();
    let top2 = dir.path().join("top2.qcow2");
    offline::create_external(&[ExternalSnapshot {
        disk: raw.clone(),
        overlay: top2.clone(),
        backing_path: BackingPath::Absolute,
    }])
    .unwrap();
    check_clean(&top2);
    assert_eq!(contents(&top2, None), vec![9u8; 1 << 20]);
    let chain = offline::backing_chain(&top2).unwrap();
    assert_eq!(
        chain
            .iter()
            .map(|c| (c.path.clone(), c.format.as_str()))
            .collect::<Vec<_>>(),
        [(top2, "qcow2"), (raw, "raw")]
    );
    let chain = offline::backing_chain(&overlay).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].path, base);
}

#[test]
fn images_held_by_qemu_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "locked.qcow2", "16M", "");
    // `spawn` returns once QEMU has initialised, so its disks are open and locked.
    let qemu = testkit::Qemu::builder("disk-lock").paused().disk(&img).spawn();
    let err = offline::create_internal(&one(&img), "s").unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(matches!(offline::list_internal(&img), Err(Error::Locked { .. })));
    drop(qemu);
    check_clean(&img);
}

#[tokio::test]
async fn offline_backend_through_the_trait() {
    use disk::{DiskSnapshots, MergeMethod, OfflineBackend};
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "t.qcow2", "4M", "");
    write(&base, 4, 0, 65536);
    let backend: &dyn DiskSnapshots = &OfflineBackend;
    backend.create_internal(&one(&base), "t1").await.unwrap();
    assert_eq!(backend.list_internal(&base).await.unwrap()[0].name, "t1");
    backend.apply_internal(&one(&base), "t1").await.unwrap();
    backend.delete_internal(&one(&base), "t1").await.unwrap();
    check_clean(&base);
    // An external snapshot, then a revert: a fresh overlay on the snapshot's image.
    let top = dir.path().join("top.qcow2");
    let snap = ExternalSnapshot {
        disk: base.clone(),
        overlay: top.clone(),
        backing_path: BackingPath::Absolute,
    };
    backend
        .create_external(std::slice::from_ref(&snap))
        .await
        .unwrap();
    write(&top, 5, 0, 65536);
    let again = ExternalSnapshot {
        overlay: dir.path().join("again.qcow2"),
        ..snap
    };
    backend.revert_external(&again).await.unwrap();
    assert_eq!(&contents(&again.overlay, None)[..65536], &[4u8; 65536][..]);
    assert_eq!(backend.backing_chain(&again.overlay).await.unwrap().len(), 2);
    // Deleting the shared base by streaming it into one branch leaves the other one intact.
    let before = contents(&top, None);
    let active = backend
        .delete_external(&top, &base, MergeMethod::StreamIntoChild)
        .await
        .unwrap();
    assert_eq!(active, top);
    assert_eq!(backend.backing_chain(&top).await.unwrap().len(), 1);
    assert_eq!(contents(&top, None), before);
    assert_eq!(&contents(&again.overlay, None)[..65536], &[4u8; 65536][..]);
    check_clean(&top);
}

// Hostile or broken images, crafted by patching images qemu-img made (64 KiB clusters, 16-bit
// refcounts). Each must be refused with `Error::Invalid` naming the image and the problem,
// before anything is written, and quickly; `qemu-img check` must agree that it is broken.

fn header(img: &std::path::Path) -> qcow2::header::Header {
    qcow2::Image::open(img, qcow2::Access::Header)
        .unwrap()
        .header()
        .clone()
}

fn read_u64(img: &std::path::Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(img).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn patch(img: &std::path::Path, at: u64, bytes: &[u8]) {
    fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

/// Asserts that creating a snapshot is refused as invalid with `reason` in the message, that
/// the image is unchanged, and that `qemu-img check` reports the image as broken.
fn refused_as_corrupt(img: &std::path::Path, reason: &str) {
    let before = fs::read(img).unwrap();
    let started = std::time::Instant::now();
    let err = offline::create_internal(&one(img), "s").unwrap_err();
    assert!(
        started.elapsed().as_secs() < 10,
        "refusing took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, Error::Invalid { .. }), "{text}");
    assert!(
        text.contains(&img.display().to_string()) && text.contains(reason),
        "{text}"
    );
    assert!(
        fs::read(img).unwrap() == before,
        "a refused snapshot must not change the image"
    );
    let check = std::process::Command::new("qemu-img")
        .args(["check", &s(img)])
        .output()
        .unwrap();
    assert!(
        !check.status.success(),
        "qemu-img check accepts {}",
        img.display()
    );
}

#[test]
fn hostile_refcount_table_entries_sharing_one_block() {
    // Every refcount table entry names the same block: loading each as its own block made
    // the old code hold one decoded block per entry (with a 128-cluster table, 1 M entries of
    // 256 KiB each).
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "shared-rb.qcow2", "64M", "");
    write(&img, 1, 0, 65536);
    let h = header(&img);
    let block = read_u64(&img, h.refcount_table_offset);
    let entries = u64::from(h.refcount_table_clusters) * h.cluster_size() / 8;
    let table: Vec<u8> = (0..entries).flat_map(|_| block.to_be_bytes()).collect();
    patch(&img, h.refcount_table_offset, &table);
    refused_as_corrupt(&img, "both point at the refcount block");
}

#[test]
fn hostile_l1_entries_sharing_one_l2_table() {
    // Shared L2 tables within one L1 table are corruption (qemu-img check counts them twice);
    // the old code read the shared table and listed its references once per entry.
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "shared-l2.qcow2", "64G", "");
    write(&img, 1, 0, 65536);
    let h = header(&img);
    let l2 = read_u64(&img, h.l1_table_offset);
    let l1: Vec<u8> = (0..h.l1_size).flat_map(|_| l2.to_be_bytes()).collect();
    patch(&img, h.l1_table_offset, &l1);
    refused_as_corrupt(&img, "share the L2 table");
}

#[test]
fn hostile_l2_entry_past_the_end_of_the_file() {
    // A data cluster at 60 PiB: the old code counted it, grew its refcount table and the file.
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "past-eof.qcow2", "64M", "");
    write(&img, 1, 0, 65536);
    let h = header(&img);
    let l2 = read_u64(&img, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    patch(&img, l2 + 8, &((0xf0u64 << 48) | (1 << 63)).to_be_bytes());
    refused_as_corrupt(&img, "beyond the end of the file");
}

#[test]
fn hostile_referenced_cluster_with_refcount_zero() {
    // The data cluster of guest offset 0 counts zero references: an allocation could hand it
    // out again and overwrite live data.
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "rc0.qcow2", "64M", "");
    write(&img, 1, 0, 65536);
    let h = header(&img);
    let l2 = read_u64(&img, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    let data = read_u64(&img, l2) & 0x00ff_ffff_ffff_fe00;
    let block = read_u64(&img, h.refcount_table_offset);
    patch(&img, block + (data >> h.cluster_bits) * 2, &[0, 0]);
    refused_as_corrupt(&img, "inconsistent image");
}

#[test]
fn hostile_refcounts_far_past_the_end_of_the_file() {
    // A refcount block for clusters at 200 GiB counts them all used: the old code grew the
    // file to cover every counted cluster.
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "far.qcow2", "64M", "");
    write(&img, 1, 0, 65536);
    let h = header(&img);
    let len = fs::metadata(&img).unwrap().len();
    let block = len.next_multiple_of(h.cluster_size());
    patch(&img, block, &vec![0xff; h.cluster_size() as usize]);
    patch(&img, h.refcount_table_offset + 100 * 8, &block.to_be_bytes());
    // The new block counts itself too (entry 0 of block 0 does not cover it): count it there.
    let first = read_u64(&img, h.refcount_table_offset);
    patch(&img, first + (block >> h.cluster_bits) * 2, &[0, 1]);
    let before_len = fs::metadata(&img).unwrap().len();
    let err = offline::create_internal(&one(&img), "s").unwrap_err();
    assert!(err.to_string().contains("far past the end of the file"), "{err}");
    assert_eq!(fs::metadata(&img).unwrap().len(), before_len);
}

#[test]
fn hostile_image_names_that_are_not_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.qcow2");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    for path in [fifo, dir.path().to_owned(), PathBuf::from("/dev/null")] {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(offline::list_internal(&p).map(|_| ()).map_err(|e| e.to_string()));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("opening {} hangs", path.display()));
        let err = result.unwrap_err();
        assert!(err.contains("images must be regular files"), "{err}");
    }
}

#[test]
fn hostile_encryption_header_past_the_end_of_the_file() {
    // The LUKS header extension claims 2^60 bytes: counting its clusters listed each one.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("luks.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=domsnap",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            &s(&img),
            "1M",
        ],
    );
    let bytes = fs::read(&img).unwrap();
    let mut at = u64::from(u32::from_be_bytes(bytes[100..104].try_into().unwrap()));
    loop {
        let kind = u32::from_be_bytes(bytes[at as usize..at as usize + 4].try_into().unwrap());
        let len = u64::from(u32::from_be_bytes(
            bytes[at as usize + 4..at as usize + 8].try_into().unwrap(),
        ));
        assert_ne!(kind, 0, "no encryption header extension");
        if kind == 0x0537_be77 {
            patch(&img, at + 16, &(1u64 << 60).to_be_bytes());
            break;
        }
        at += 8 + len.next_multiple_of(8);
    }
    refused_as_corrupt(&img, "the encryption header");
}

#[test]
fn hostile_l1_table_at_the_end_of_the_address_space() {
    // Found by the qcow2_image fuzz target: an L1 table offset near 2^64 made the check add
    // past u64::MAX while listing the table's clusters (a panic).
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "l1-end.qcow2", "64M", "");
    patch(&img, 36, &10_000u32.to_be_bytes());
    patch(&img, 40, &0xffff_ffff_ffff_0000u64.to_be_bytes());
    let image = qcow2::Image::open(&img, qcow2::Access::Read).unwrap();
    let err = image.check().unwrap_err();
    assert!(err.to_string().contains("beyond the end of the file"), "{err}");
    drop(image);
    refused_as_corrupt(&img, "beyond the end of the file");
}
