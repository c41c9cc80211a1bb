//! Stream receiver: any bytes must give a clear error or a sealed image, never a panic; an image it
//! accepts must verify.
//!
//! Run with `ASAN_OPTIONS=detect_leaks=0` and `-- -detect_leaks=0`: verify and restore spread work
//! over std threads, and LeakSanitizer now and then reports a few bytes of std's per-thread state
//! (the reported inputs never reproduce it).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use memory::{receive_stream, verify, Durability, ReceiveOptions};

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory").keep())
}

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("img");
    let options = ReceiveOptions { durability: Durability::NoSync, max_guest_bytes: 16 << 20 };
    if receive_stream(data, &path, &options).is_ok() {
        verify(&path).expect("a received image verifies");
        std::fs::remove_file(&path).expect("remove received image");
    }
});
