//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

use memory::{
    reference, ContentCompare, Durability, GuestMemory, ImageLayout, ImageWriter, LiveSave, SaveOptions,
    PAGE_SIZE,
};

/// splitmix64: a tiny deterministic generator, enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Fills about `percent`% of the pages of `mem` with random bytes (the rest stay as they are).
pub fn fill_random(mem: &GuestMemory, percent: u64, rng: &mut Rng) {
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..mem.total_pages() {
        if rng.below(100) < percent {
            page.iter_mut().for_each(|b| *b = rng.next() as u8);
            mem.write(mem.gpa_of_page(p), &page).unwrap();
        }
    }
}

/// Two regions with a gap, like a small q35 guest split around a hole.
pub fn two_regions(pages_low: u64, pages_high: u64) -> GuestMemory {
    GuestMemory::builder()
        .anonymous(0, pages_low * PAGE_SIZE as u64)
        .unwrap()
        .anonymous(1 << 32, pages_high * PAGE_SIZE as u64)
        .unwrap()
        .build()
        .unwrap()
}

/// Same shape as `mem`, fresh and zero.
pub fn same_shape(mem: &GuestMemory) -> GuestMemory {
    mem.regions()
        .iter()
        .try_fold(GuestMemory::builder(), |b, r| b.anonymous(r.gpa(), r.len()))
        .unwrap()
        .build()
        .unwrap()
}

pub fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    reference::snapshot(mem).unwrap()
}

/// A live save of `mem` with content comparison into an unsynced image at `path`, round 0 done.
pub fn content_compare_save<'a>(mem: &'a GuestMemory, path: &Path) -> LiveSave<'a> {
    let sink = ImageWriter::create(path, ImageLayout::of(mem), Durability::NoSync).unwrap();
    LiveSave::begin(
        mem,
        Box::new(ContentCompare::new()),
        Box::new(sink),
        SaveOptions::default(),
    )
    .unwrap()
}
