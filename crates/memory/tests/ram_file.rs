//! A sparse RAM file (what QEMU's `memory-backend-file` is for a guest that has not touched most of
//! its memory): saving, content comparison and restore never read its holes, so they never fill it.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use memory::{
    reference, restore, save_paused, ContentCompare, Durability, FileRegion, GuestMemory, ImageLayout,
    ImageWriter, LiveSave, RestoreOptions, SaveOptions, PAGE_SIZE,
};

const PAGES: u64 = 2048; // 8 MiB
const REGIONS: [FileRegion; 2] = [
    FileRegion {
        gpa: 0,
        len: 1536 * 4096,
        file_offset: 0,
    },
    FileRegion {
        gpa: 1 << 32,
        len: 512 * 4096,
        file_offset: 1536 * 4096,
    },
];

fn sparse_ram_file(dir: &Path, name: &str) -> (std::path::PathBuf, File) {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(PAGES * PAGE_SIZE as u64).unwrap();
    (path, file)
}

fn allocated_pages(file: &File) -> u64 {
    file.metadata().unwrap().blocks() * 512 / PAGE_SIZE as u64
}

/// What the guest would see: read with read(2), which does not allocate holes.
fn contents(file: &File) -> Vec<u8> {
    let mut buf = vec![0u8; (PAGES * PAGE_SIZE as u64) as usize];
    file.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn holes_are_never_read_or_filled() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (ram_path, ram) = sparse_ram_file(dir.path(), "ram");
    // The "hypervisor" writes a few pages, in both regions.
    for page in [0u64, 1, 2, 700, 1600, 2047] {
        ram.write_all_at(&[(page % 200) as u8 + 1; PAGE_SIZE], page * PAGE_SIZE as u64)
            .unwrap();
    }
    let mem = GuestMemory::from_ram_file(&ram_path, &REGIONS).unwrap();

    let image = dir.path().join("paused.img");
    let layout = ImageLayout::with_seed(&mem, 4);
    let summary = save_paused(
        &mem,
        Box::new(ImageWriter::create(&image, layout.clone(), Durability::NoSync).unwrap()),
    )
    .unwrap();
    assert_eq!(summary.present_pages, 6);
    assert_eq!(
        allocated_pages(&ram),
        6,
        "a paused save filled holes of the RAM file"
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        reference::image_bytes(&contents(&ram), &layout)
    );

    // Live: the guest writes two more pages and discards one (a hole punched into the file).
    let live = dir.path().join("live.img");
    let sink = ImageWriter::create(&live, layout.clone(), Durability::NoSync).unwrap();
    let mut save = LiveSave::begin(
        &mem,
        Box::new(ContentCompare::new()),
        Box::new(sink),
        SaveOptions::default(),
    )
    .unwrap();
    mem.write(0x5000, b"new data").unwrap();
    mem.write((1 << 32) + 0x3000, b"more").unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor the test owns; integer arguments only.
    assert_eq!(unsafe { libc::fallocate(ram.as_raw_fd(), punch, 4096, 4096) }, 0);
    assert_eq!(save.round().unwrap().pages_dirty, 3);
    let summary = save.finish().unwrap().seal().unwrap();
    assert_eq!(summary.present_pages, 7);
    assert_eq!(
        allocated_pages(&ram),
        7,
        "content comparison filled holes of the RAM file"
    );
    assert_eq!(
        std::fs::read(&live).unwrap(),
        reference::image_bytes(&contents(&ram), &layout)
    );

    // Restore into a fresh RAM file, checking zero pages: only stored pages get allocated.
    let (fresh_path, fresh) = sparse_ram_file(dir.path(), "fresh");
    let target = GuestMemory::from_ram_file(&fresh_path, &REGIONS).unwrap();
    let stats = restore(&live, &target, &RestoreOptions::default()).unwrap();
    assert_eq!((stats.pages_restored, stats.pages_cleared), (7, 0));
    assert_eq!(
        allocated_pages(&fresh),
        7,
        "restore filled holes of the target RAM file"
    );
    assert_eq!(contents(&fresh), contents(&ram));
}
