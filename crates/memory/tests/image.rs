//! Paused save, restore and verify, checked against the reference image builder.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::fs::OpenOptions;

use common::{fill_random, same_shape, snapshot, two_regions, Rng};
use memory::{
    reference, restore, save_paused, verify, Durability, Error, FileRegion, GuestMemory, ImageLayout,
    ImageReader, ImageWriter, RestoreOptions, ZeroPages, PAGE_SIZE,
};

#[test]
fn paused_save_matches_reference_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mem = two_regions(5000, 300);
    fill_random(&mem, 20, &mut Rng(1));
    let layout = ImageLayout::with_seed(&mem, 7);
    let sink = ImageWriter::create(&path, layout.clone(), Durability::Sync).unwrap();
    let summary = save_paused(&mem, Box::new(sink)).unwrap();
    assert_eq!(summary.rounds.len(), 1);

    let contents = snapshot(&mem);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        reference::image_bytes(&contents, &layout)
    );
    let info = verify(&path).unwrap();
    assert_eq!(info.present_pages, summary.present_pages);
    // Only the temporary's final name remains.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let target = same_shape(&mem);
    fill_random(&target, 50, &mut Rng(2)); // dirty target: zero pages must be cleared
    let stats = restore(&path, &target, &RestoreOptions::default()).unwrap();
    assert_eq!(stats.pages_restored, summary.present_pages);
    assert!(stats.pages_cleared > 0);
    assert_eq!(snapshot(&target), contents);
}

#[test]
fn restores_into_a_fresh_ram_file() {
    let dir = tempfile::tempdir().unwrap();
    let mem = two_regions(64, 32);
    fill_random(&mem, 30, &mut Rng(3));
    let path = dir.path().join("img");
    let sink = ImageWriter::create(&path, ImageLayout::of(&mem), Durability::NoSync).unwrap();
    save_paused(&mem, Box::new(sink)).unwrap();

    // Like QEMU's RAM file: the high region follows the low one in the file.
    let ram = dir.path().join("ram");
    OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&ram)
        .unwrap()
        .set_len(96 * 4096)
        .unwrap();
    let regions = [
        FileRegion {
            gpa: 0,
            len: 64 * 4096,
            file_offset: 0,
        },
        FileRegion {
            gpa: 1 << 32,
            len: 32 * 4096,
            file_offset: 64 * 4096,
        },
    ];
    let target = GuestMemory::from_ram_file(&ram, &regions).unwrap();
    restore(
        &path,
        &target,
        &RestoreOptions {
            zero_pages: ZeroPages::AssumeZeroed,
        },
    )
    .unwrap();
    drop(target);
    assert_eq!(std::fs::read(&ram).unwrap(), snapshot(&mem));
}

#[test]
fn region_mismatch_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mem = two_regions(16, 16);
    fill_random(&mem, 100, &mut Rng(4));
    save_paused(
        &mem,
        Box::new(ImageWriter::create(&path, ImageLayout::of(&mem), Durability::NoSync).unwrap()),
    )
    .unwrap();
    for target in [two_regions(16, 17), GuestMemory::anonymous(32 * 4096).unwrap()] {
        let err = restore(&path, &target, &RestoreOptions::default()).unwrap_err();
        assert!(matches!(err, Error::RegionMismatch { .. }), "{err}");
        assert!(
            snapshot(&target).iter().all(|&b| b == 0),
            "target written despite mismatch"
        );
    }
}

#[test]
fn unsealed_image_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::anonymous(8 * 4096).unwrap();
    let writer =
        ImageWriter::create(&dir.path().join("img"), ImageLayout::of(&mem), Durability::NoSync).unwrap();
    drop(writer);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn reader_works_on_bytes() {
    let mem = GuestMemory::anonymous(10 * PAGE_SIZE as u64).unwrap();
    fill_random(&mem, 50, &mut Rng(5));
    let layout = ImageLayout::of(&mem);
    let bytes = reference::image_bytes(&snapshot(&mem), &layout);
    let reader = ImageReader::from_source(bytes.as_slice()).unwrap();
    reader.verify().unwrap();
    let target = same_shape(&mem);
    reader.restore(&target, &RestoreOptions::default()).unwrap();
    assert_eq!(snapshot(&target), snapshot(&mem));
}

#[test]
fn bad_regions_are_errors() {
    assert!(matches!(
        GuestMemory::anonymous(0),
        Err(Error::InvalidRegion { .. })
    ));
    assert!(matches!(
        GuestMemory::anonymous(4097),
        Err(Error::InvalidRegion { .. })
    ));
    let overlap = GuestMemory::builder()
        .anonymous(0, 8192)
        .unwrap()
        .anonymous(4096, 4096)
        .unwrap()
        .build();
    assert!(matches!(overlap, Err(Error::OverlappingRegions { gpa: 4096 })));
    let mem = GuestMemory::anonymous(8192).unwrap();
    assert!(matches!(mem.write(8190, b"abc"), Err(Error::OutOfBounds { .. })));
    let file = tempfile::tempfile().unwrap();
    file.set_len(4096).unwrap();
    let short = GuestMemory::builder().file(0, 8192, &file, 0);
    assert!(matches!(short, Err(Error::InvalidRegion { .. })));
}
