//! Content comparison: a page is dirty when its bytes no longer hash to what was last copied.

use crate::error::Result;
use crate::guest::GuestMemory;
use crate::num::{to_u64, to_usize};
use crate::par;
use crate::table::{is_zero, page_hash, DirtySet, PageState, PageTable, CHUNK_PAGES, CHUNK_WORDS};

use super::DirtySource;

/// Finds dirty pages by hashing every page and comparing with the checksum of the bytes last copied
/// (kept in the engine's page table, so this source costs no memory of its own).
///
/// Works on memory written by another process (QEMU), which write-protection cannot see. Each round
/// reads all of guest RAM once, spread over all cores. Because the table holds the hash of the *copied*
/// bytes, a page changed while it was being copied differs from it and is found in the next round.
/// A guest could only hide a change by hitting a 64-bit hash collision under a seed it does not know.
#[derive(Debug, Default)]
pub struct ContentCompare {
    primed: bool,
}

impl ContentCompare {
    /// A new source.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Whether the live page differs from what the table says was saved. A page saved as zero only needs
/// a zero test, which stops at the first non-zero block.
fn changed(saved: &PageTable, page: u64, live: &[u8]) -> bool {
    match saved.state(page) {
        PageState::Zero => !is_zero(live),
        PageState::Present => page_hash(saved.seed(), live) != saved.checksum(page),
    }
}

impl DirtySource for ContentCompare {
    fn name(&self) -> &'static str {
        "content-compare"
    }

    fn start(&mut self, _mem: &GuestMemory) -> Result<()> {
        self.primed = false;
        Ok(())
    }

    fn collect(&mut self, mem: &GuestMemory, saved: &PageTable) -> Result<DirtySet> {
        let total = mem.total_pages();
        if !std::mem::replace(&mut self.primed, true) {
            return Ok(DirtySet::full(total));
        }
        let mut dirty = DirtySet::empty(total);
        let chunks = dirty.words_mut().chunks_mut(CHUNK_WORDS).enumerate();
        par::for_each(
            chunks,
            || vec![0u8; CHUNK_PAGES],
            |data_map, (index, words)| {
                let start = to_u64(index * CHUNK_PAGES);
                let end = (start + to_u64(CHUNK_PAGES)).min(total);
                for (region, pages) in mem.segments(start..end) {
                    let map = &mut data_map[..to_usize(pages.end - pages.start)];
                    region.data_map(pages.clone(), map);
                    for (page, &data) in pages.zip(map.iter()) {
                        // A hole of the RAM file is zero without reading it.
                        let dirty = if data == 0 {
                            saved.state(page) == PageState::Present
                        } else {
                            changed(saved, page, region.live(page..page + 1))
                        };
                        if dirty {
                            let bit = page - start;
                            words[to_usize(bit / 64)] |= 1 << (bit % 64);
                        }
                    }
                }
                Ok(())
            },
        )?;
        Ok(dirty)
    }

    fn stop(&mut self, _mem: &GuestMemory) -> Result<()> {
        Ok(())
    }
}
