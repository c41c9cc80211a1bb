//! Opens arbitrary bytes as a qcow2 image (a file on tmpfs) and runs the native editor on it:
//! list, check, then internal snapshot create, delete and apply chosen by the first byte. Any
//! input must give a clear error or a result, never a panic, a hang or unbounded memory; an
//! image the editor accepted for writing must stay consistent (`Image::check` finds no
//! refcount errors) after every operation that succeeded.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use disk::qcow2::{Access, Image};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        dir.expect("temporary directory").keep()
    })
}

fn consistent(image: &Image, after: &str) {
    if let Ok(report) = image.check() {
        assert!(
            report.errors.is_empty(),
            "{after} left refcount errors: {:?}",
            report.errors
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ops, bytes)) = data.split_first() else {
        return;
    };
    let path = scratch().join("img.qcow2");
    std::fs::write(&path, bytes).expect("write the image");
    if let Ok(image) = Image::open(&path, Access::Read) {
        let _ = image.snapshots();
        let _ = image.check();
    }
    let Ok(mut image) = Image::open(&path, Access::Write) else {
        return;
    };
    let names: Vec<String> = image
        .snapshots()
        .map(|(entries, _)| {
            entries
                .iter()
                .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                .collect()
        })
        .unwrap_or_default();
    // Two operations from the first byte: 0 create, 1 delete, 2 apply, 3 create another.
    for op in [ops & 3, (ops >> 2) & 3] {
        let name = names
            .get(usize::from(ops >> 4) % names.len().max(1))
            .cloned()
            .unwrap_or_default();
        let result = match op {
            0 => image.create_snapshot("fuzz", (1, 2)).map(drop),
            1 => image.delete_snapshot(&name),
            2 => image.apply_snapshot(&name),
            _ => image.create_snapshot("fuzz2", (3, 4)).map(drop),
        };
        match result {
            Ok(()) => consistent(&image, ["create", "delete", "apply", "create"][usize::from(op)]),
            Err(_) => break,
        }
    }
});
