//! Simple, single-threaded, obviously-correct versions of the fast paths, for tests and benchmarks
//! to compare against. Not for production use: they hold whole copies of guest memory.

use crate::error::Result;
use crate::format::{Footer, ImageLayout, FIXED_HEADER_LEN, FORMAT_VERSION, IMAGE_MAGIC};
use crate::guest::{GuestMemory, PAGE, PAGE_SIZE};
use crate::num::{to_u64, to_usize};
use crate::table::{block_hash, page_hash, DirtySet, PageTable};

/// A copy of all of `mem`, regions concatenated in address order (page `i` at `i * PAGE_SIZE`).
pub fn snapshot(mem: &GuestMemory) -> Result<Vec<u8>> {
    let mut out = vec![0u8; to_usize(mem.size())];
    let mut at = 0;
    for r in mem.regions() {
        let len = to_usize(r.len());
        mem.read(r.gpa(), &mut out[at..at + len])?;
        at += len;
    }
    Ok(out)
}

/// Writes `contents` (as from [`snapshot`]) back into `mem`.
pub fn write_all(mem: &GuestMemory, contents: &[u8]) -> Result<()> {
    let mut at = 0;
    for r in mem.regions() {
        let len = to_usize(r.len());
        mem.write(r.gpa(), &contents[at..at + len])?;
        at += len;
    }
    Ok(())
}

/// The pages that differ between two snapshots.
pub fn dirty_pages(before: &[u8], after: &[u8]) -> DirtySet {
    assert_eq!(before.len(), after.len(), "snapshots of different memories");
    let mut set = DirtySet::empty(to_u64(before.len() / PAGE_SIZE));
    for (i, (a, b)) in before.chunks(PAGE_SIZE).zip(after.chunks(PAGE_SIZE)).enumerate() {
        if a != b {
            set.insert(to_u64(i));
        }
    }
    set
}

/// The complete image file a save of memory holding `contents` must produce for `layout`, built
/// page by page in memory: header, data (zeros where a page is zero), page table, footer.
pub fn image_bytes(contents: &[u8], layout: &ImageLayout) -> Vec<u8> {
    image_bytes_of_version(contents, layout, FORMAT_VERSION)
}

/// [`image_bytes`] in format `version` (1: what older domsnap versions wrote).
pub fn image_bytes_of_version(contents: &[u8], layout: &ImageLayout, version: u32) -> Vec<u8> {
    assert_eq!(
        to_u64(contents.len()),
        layout.total_pages() * PAGE,
        "contents of another layout"
    );
    let mut image = layout.encode_header_of_version(IMAGE_MAGIC, version);
    let header_checksum = block_hash(&image[..FIXED_HEADER_LEN + 16 * layout.regions().len()]);
    let mut table = PageTable::new(layout.total_pages(), layout.seed());
    for (i, page) in contents.chunks(PAGE_SIZE).enumerate() {
        let zero = page.iter().all(|&b| b == 0);
        table.set(to_u64(i), (!zero).then(|| page_hash(layout.seed(), page)));
        image.extend_from_slice(page);
    }
    let encoded = table.encode(version);
    let footer = Footer {
        table_checksum: block_hash(&encoded),
        header_checksum,
    };
    image.extend_from_slice(&encoded);
    image.extend_from_slice(&footer.encode(layout));
    image
}

/// Reads every byte of `mem` once (OR-reduce) on all cores, in the same chunks as the fast paths:
/// the floor that a content-comparison round is measured against.
pub fn read_scan(mem: &GuestMemory) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let acc = AtomicU64::new(0);
    let chunks = (0..mem.total_pages()).step_by(crate::table::CHUNK_PAGES);
    let scanned = crate::par::for_each(
        chunks,
        || (),
        |(), start| {
            let end = (start + to_u64(crate::table::CHUNK_PAGES)).min(mem.total_pages());
            for (region, pages) in mem.segments(start..end) {
                let or = region
                    .live(pages)
                    .chunks_exact(PAGE_SIZE)
                    .fold(0u8, |a, p| a | p.iter().fold(0, |x, &b| x | b));
                acc.fetch_or(u64::from(or), Ordering::Relaxed);
            }
            Ok(())
        },
    );
    scanned.expect("scanning cannot fail");
    acc.into_inner()
}
