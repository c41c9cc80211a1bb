//! Format versions: images of format v1 (older domsnap versions) are still read, and a v2 image
//! leaves the zero parts of its page table as holes.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a failed unwrap is a failed run, and its sizes are small constants"
)]

mod common;

use std::os::unix::fs::MetadataExt;

use common::{fill_random, same_shape, snapshot, Rng};
use memory::{
    reference, Durability, GuestMemory, ImageLayout, ImageReader, ImageWriter, RestoreOptions,
    FORMAT_VERSION, OLDEST_FORMAT_VERSION, PAGE_SIZE,
};

#[test]
fn a_version_1_image_is_verified_and_restored() {
    assert_eq!((OLDEST_FORMAT_VERSION, FORMAT_VERSION), (1, 2));
    let mem = GuestMemory::builder()
        .anonymous(0, 64 * PAGE_SIZE as u64)
        .unwrap()
        .build()
        .unwrap();
    fill_random(&mem, 20, &mut Rng(5));
    let layout = ImageLayout::with_seed(&mem, 9);
    let v1 = reference::image_bytes_of_version(&snapshot(&mem), &layout, 1);
    let v2 = reference::image_bytes(&snapshot(&mem), &layout);
    assert_eq!(v1.len(), v2.len());
    assert_ne!(v1, v2, "the versions differ in the zero pages' table entries");
    let stored = ImageReader::from_source(v2.as_slice()).unwrap().verify().unwrap();
    let reader = ImageReader::from_source(v1.as_slice()).unwrap();
    assert_eq!(reader.verify().unwrap(), stored);
    let target = same_shape(&mem);
    let reader = ImageReader::from_source(v1.as_slice()).unwrap();
    reader.restore(&target, &RestoreOptions::default()).unwrap();
    assert_eq!(snapshot(&target), snapshot(&mem));
}

#[test]
fn the_zero_parts_of_a_page_table_are_holes() {
    // 64 MiB with 64 non-zero pages at its start: 16384 pages, 144 KiB of page table of which
    // all but the first blocks are zero.
    let mem = GuestMemory::builder()
        .anonymous(0, 64 << 20)
        .unwrap()
        .build()
        .unwrap();
    mem.write(0, &vec![0x5a; 64 * PAGE_SIZE]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ram.img");
    let writer = ImageWriter::create(&path, ImageLayout::of(&mem), Durability::NoSync).unwrap();
    memory::save_paused(&mem, Box::new(writer)).unwrap();
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    // Header, 64 pages, the table's first blocks and its last (with the footer); a v1 table
    // alone would take 144 KiB.
    assert!(
        allocated <= (1 + 64 + 4) * PAGE_SIZE as u64,
        "{allocated} bytes allocated"
    );
    let reader = ImageReader::open(&path).unwrap();
    assert_eq!(reader.verify().unwrap().present_pages, 64);
    let layout = memory::check_metadata(&path).unwrap();
    assert_eq!(layout.regions(), ImageLayout::of(&mem).regions());
}
