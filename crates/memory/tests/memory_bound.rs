//! A save's heap use is bounded: buffers plus at most 16 bytes per guest page, never a copy of RAM.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

#[path = "common/heap.rs"]
mod heap;

use common::{content_compare_save, fill_random, Rng};
use heap::peak_heap;
use memory::{save_paused, Durability, GuestMemory, ImageLayout, ImageWriter};

#[test]
fn save_heap_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::anonymous(256 << 20).unwrap();
    fill_random(&mem, 20, &mut Rng(81));
    let threads = std::thread::available_parallelism().unwrap().get();
    // Per worker: a 512 KiB staging buffer; plus the table encoder's 64 KiB piece and small change.
    let bound = 16 * mem.total_pages() as usize + threads * (513 << 10) + (128 << 10);

    let (_, paused) = peak_heap(|| {
        let sink =
            ImageWriter::create(&dir.path().join("a"), ImageLayout::of(&mem), Durability::NoSync).unwrap();
        save_paused(&mem, Box::new(sink)).unwrap()
    });
    assert!(
        paused <= bound,
        "paused save used {paused} bytes of heap, bound {bound}"
    );

    let (_, live) = peak_heap(|| {
        let mut save = content_compare_save(&mem, &dir.path().join("b"));
        fill_random(&mem, 5, &mut Rng(82));
        save.round().unwrap();
        save.finish().unwrap().seal().unwrap()
    });
    assert!(
        live <= bound,
        "live save used {live} bytes of heap, bound {bound}"
    );
}
