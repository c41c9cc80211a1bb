//! A save's heap use is bounded: buffers plus at most 16 bytes per guest page, never a copy of RAM.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{fill_random, Rng};
use memory::{
    save_paused, ContentCompare, Durability, GuestMemory, ImageLayout, ImageWriter, LiveSave, SaveOptions,
};

struct Counting;
static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn save_heap_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::anonymous(256 << 20).unwrap();
    fill_random(&mem, 20, &mut Rng(81));
    let threads = std::thread::available_parallelism().unwrap().get();
    // Per worker: a 512 KiB staging buffer; plus the table encoder's 64 KiB piece and small change.
    let bound = 16 * mem.total_pages() as usize + threads * (513 << 10) + (128 << 10);

    let base = IN_USE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let sink = ImageWriter::create(&dir.path().join("a"), ImageLayout::of(&mem), Durability::NoSync).unwrap();
    save_paused(&mem, Box::new(sink)).unwrap();
    let paused = PEAK.load(Ordering::Relaxed) - base;
    assert!(
        paused <= bound,
        "paused save used {paused} bytes of heap, bound {bound}"
    );

    PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
    let base = IN_USE.load(Ordering::Relaxed);
    let sink = ImageWriter::create(&dir.path().join("b"), ImageLayout::of(&mem), Durability::NoSync).unwrap();
    let mut save = LiveSave::begin(
        &mem,
        Box::new(ContentCompare::new()),
        Box::new(sink),
        SaveOptions::default(),
    )
    .unwrap();
    fill_random(&mem, 5, &mut Rng(82));
    save.round().unwrap();
    save.finish().unwrap().seal().unwrap();
    let live = PEAK.load(Ordering::Relaxed) - base;
    assert!(
        live <= bound,
        "live save used {live} bytes of heap, bound {bound}"
    );
}
