//! Image decoder: any bytes must give a clear error or a checked image, never a panic; an image that
//! verifies must restore into matching memory.
//!
//! Run with `ASAN_OPTIONS=detect_leaks=0` and `-- -detect_leaks=0`: verify and restore spread work
//! over std threads, and LeakSanitizer now and then reports a few bytes of std's per-thread state
//! (the reported inputs never reproduce it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use memory::{GuestMemory, ImageReader, RestoreOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(reader) = ImageReader::from_source(data) else { return };
    let verified = reader.verify();
    let info = reader.info();
    if info.total_pages > 1024 {
        return; // keep each run small
    }
    let target = info
        .regions
        .iter()
        .try_fold(GuestMemory::builder(), |b, r| b.anonymous(r.gpa, r.len))
        .and_then(|b| b.build())
        .expect("a decoded region table describes valid memory");
    let restored = reader.restore(&target, &RestoreOptions::default());
    if verified.is_ok() {
        restored.expect("an image that verifies restores");
    }
});
