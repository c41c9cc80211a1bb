//! The stream form: a live save streamed and received equals the at-rest image of the same memory;
//! damaged or truncated streams leave no image.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::path::Path;

use common::{fill_random, snapshot, two_regions, Rng};
use memory::{
    receive_stream, reference, ContentCompare, Durability, Error, GuestMemory, ImageLayout, LiveSave,
    ReceiveOptions, SaveOptions, StreamWriter, PAGE_SIZE,
};

const OPTS: ReceiveOptions = ReceiveOptions {
    durability: Durability::NoSync,
    max_guest_bytes: 1 << 30,
};

/// A three-round live save into a stream, changing memory between rounds (including zeroing pages).
fn streamed(mem: &GuestMemory, layout: &ImageLayout) -> (Vec<u8>, Vec<u8>) {
    let mut stream = Vec::new();
    let sink = StreamWriter::new(&mut stream, layout.clone()).unwrap();
    let mut save = LiveSave::begin(
        mem,
        Box::new(ContentCompare::new()),
        Box::new(sink),
        SaveOptions::default(),
    )
    .unwrap();
    let mut rng = Rng(61);
    for _ in 0..2 {
        fill_random(mem, 5, &mut rng);
        for _ in 0..10 {
            mem.write(mem.gpa_of_page(rng.below(mem.total_pages())), &[0u8; PAGE_SIZE])
                .unwrap();
        }
        save.round().unwrap();
    }
    let at_finish = snapshot(mem);
    save.finish().unwrap().seal().unwrap();
    (stream, at_finish)
}

fn leftovers(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn received_stream_equals_reference_image() {
    let mem = two_regions(700, 60);
    fill_random(&mem, 30, &mut Rng(60));
    let layout = ImageLayout::with_seed(&mem, 17);
    let (mut stream, at_finish) = streamed(&mem, &layout);
    stream.extend_from_slice(b"device state follows");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut input = stream.as_slice();
    let info = receive_stream(&mut input, &path, &OPTS).unwrap();
    assert_eq!(
        input, b"device state follows",
        "receiver must stop at the end record"
    );
    assert_eq!(info.total_pages, mem.total_pages());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        reference::image_bytes(&at_finish, &layout)
    );
}

#[test]
fn damaged_streams_are_rejected_and_leave_nothing() {
    let mem = two_regions(40, 8);
    fill_random(&mem, 40, &mut Rng(62));
    let (stream, _) = streamed(&mem, &ImageLayout::with_seed(&mem, 3));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut rng = Rng(63);
    let offsets: Vec<usize> = (0..200)
        .map(|_| rng.below(stream.len() as u64) as usize)
        .chain(0..80)
        .chain(4090..4200)
        .collect();
    for offset in offsets {
        let mut damaged = stream.clone();
        damaged[offset] ^= 1 << rng.below(8);
        let result = receive_stream(damaged.as_slice(), &path, &OPTS);
        assert!(result.is_err(), "bit flip at {offset} accepted");
        assert_eq!(leftovers(dir.path()), 0);
    }
    for len in (0..stream.len())
        .step_by(997)
        .chain(stream.len() - 30..stream.len())
    {
        let err = receive_stream(&stream[..len], &path, &OPTS).unwrap_err();
        assert!(
            matches!(err, Error::StreamTruncated { .. }),
            "truncated to {len}: {err}"
        );
        assert_eq!(leftovers(dir.path()), 0);
    }
}

#[test]
fn oversized_stream_is_refused() {
    let mem = GuestMemory::anonymous(64 * PAGE_SIZE as u64).unwrap();
    let mut stream = Vec::new();
    drop(StreamWriter::new(&mut stream, ImageLayout::of(&mem)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let small = ReceiveOptions {
        max_guest_bytes: 4096,
        ..OPTS
    };
    let err = receive_stream(stream.as_slice(), &dir.path().join("img"), &small).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    let mut bad = stream.clone();
    bad[..8].copy_from_slice(b"DSMEMIMG");
    let err = receive_stream(bad.as_slice(), &dir.path().join("img"), &OPTS).unwrap_err();
    assert!(matches!(err, Error::BadMagic { kind: "stream", .. }), "{err}");
}
