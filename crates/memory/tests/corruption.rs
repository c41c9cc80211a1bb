//! Damaged images: every kind of damage is reported, and restore never silently produces wrong memory.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use common::{fill_random, same_shape, snapshot, Rng};
use memory::{reference, Error, GuestMemory, ImageLayout, ImageReader, RestoreOptions, PAGE_SIZE};

fn sample() -> (GuestMemory, Vec<u8>) {
    let mem = GuestMemory::builder()
        .anonymous(0, 12 * PAGE_SIZE as u64)
        .unwrap()
        .anonymous(1 << 30, 4 * PAGE_SIZE as u64)
        .unwrap()
        .build()
        .unwrap();
    fill_random(&mem, 50, &mut Rng(11));
    let image = reference::image_bytes(&snapshot(&mem), &ImageLayout::with_seed(&mem, 3));
    (mem, image)
}

/// Verify must fail; restore must fail or (for damage restore does not read: zero pages' holes)
/// produce exactly the original memory.
fn check_damaged(mem: &GuestMemory, damaged: &[u8], what: &str) {
    let verified = ImageReader::from_source(damaged).and_then(|r| r.verify());
    assert!(verified.is_err(), "verify accepted {what}");
    let target = same_shape(mem);
    let restored =
        ImageReader::from_source(damaged).and_then(|r| r.restore(&target, &RestoreOptions::default()));
    if restored.is_ok() {
        assert_eq!(
            snapshot(&target),
            snapshot(mem),
            "restore silently wrong after {what}"
        );
    }
}

#[test]
fn every_bit_flip_in_metadata_and_sampled_data_is_detected() {
    let (mem, image) = sample();
    let data_start = 4096;
    let data_end = data_start + 16 * PAGE_SIZE;
    let mut rng = Rng(12);
    let sampled: Vec<usize> = (0..400)
        .map(|_| data_start + rng.below((data_end - data_start) as u64) as usize)
        .collect();
    let offsets = (0..data_start)
        .step_by(7)
        .chain(0..128) // every byte of the fixed header and region table
        .chain(data_end..image.len()) // every byte of page table and footer
        .chain(sampled);
    for offset in offsets {
        let mut damaged = image.clone();
        damaged[offset] ^= 1 << rng.below(8);
        check_damaged(&mem, &damaged, &format!("a bit flip at offset {offset}"));
    }
}

#[test]
fn truncation_at_any_offset_is_detected() {
    let (mem, image) = sample();
    for len in (0..image.len()).step_by(61).chain(image.len() - 60..image.len()) {
        let err = ImageReader::from_source(&image[..len]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Truncated { .. } | Error::Corrupt { .. } | Error::BadMagic { .. }
            ),
            "{len}: {err}"
        );
        check_damaged(&mem, &image[..len], &format!("truncation to {len}"));
    }
    let mut longer = image.clone();
    longer.push(0);
    assert!(matches!(
        ImageReader::from_source(longer.as_slice()),
        Err(Error::Truncated { .. })
    ));
}

#[test]
fn wrong_magic_and_version_are_named() {
    let (_, image) = sample();
    let mut bad = image.clone();
    bad[0] = b'X';
    let err = ImageReader::from_source(bad.as_slice()).unwrap_err();
    assert!(matches!(err, Error::BadMagic { kind: "image", .. }), "{err}");
    let mut v3 = image.clone();
    v3[8] = 3;
    let err = ImageReader::from_source(v3.as_slice()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn damaged_page_is_named() {
    let (mem, mut image) = sample();
    let reader = ImageReader::from_source(image.as_slice()).unwrap();
    let page = (0..16)
        .find(|&p| reader.table().state(p) == memory::PageState::Present)
        .unwrap();
    image[4096 + page as usize * PAGE_SIZE + 100] ^= 0x40;
    let err = ImageReader::from_source(image.as_slice())
        .unwrap()
        .restore(&same_shape(&mem), &RestoreOptions::default());
    match err {
        Err(Error::PageCorrupt { page: p, gpa, .. }) => {
            assert_eq!(p, page);
            assert_eq!(gpa, mem.gpa_of_page(page));
        }
        other => panic!("expected PageCorrupt, got {other:?}"),
    }
}

#[test]
fn check_metadata_finds_every_flip_outside_the_pages_and_none_inside() {
    let (_, image) = sample();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.img");
    std::fs::write(&path, &image).unwrap();
    let layout = memory::check_metadata(&path).unwrap();
    assert_eq!(
        (layout.data_offset(), layout.ram_bytes()),
        (4096, 16 * PAGE_SIZE as u64)
    );
    let data = 4096..4096 + 16 * PAGE_SIZE;
    let mut rng = Rng(13);
    let offsets = (0..128)
        .chain((128..4096).step_by(97))
        .chain(data.end..image.len())
        .chain((0..50).map(|i| data.start + (i * 1303) % data.len()))
        .collect::<Vec<_>>();
    for offset in offsets {
        let mut damaged = image.clone();
        damaged[offset] ^= 1 << rng.below(8);
        std::fs::write(&path, &damaged).unwrap();
        let checked = memory::check_metadata(&path);
        if data.contains(&offset) {
            // The pages are `verify`'s.
            assert!(checked.is_ok(), "a flip in page data at {offset}: {checked:?}");
        } else {
            assert!(checked.is_err(), "a flip at {offset} went unnoticed");
        }
    }
    std::fs::write(&path, &image[..image.len() - 1]).unwrap();
    assert!(matches!(
        memory::check_metadata(&path),
        Err(Error::Truncated { .. })
    ));
}
