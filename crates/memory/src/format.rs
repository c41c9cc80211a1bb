//! Image format v2 (and v1 read): layout, header and footer encoding (see `docs/memory-image-format.md`).
//!
//! All integers are little-endian. Every block carries an xxh3-64 checksum, and decoding checks every
//! field it can derive, so a flipped bit anywhere is reported as the block it hit.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::error::{Error, Result};
use crate::guest::{GuestMemory, PAGE, PAGE_SIZE};
use crate::num::{to_u64, to_usize};
use crate::table::{block_hash, PageTable};

/// Format version written by this build. Version 2 differs from version 1 in one rule only: a
/// zero page's checksum entry in the page table is 0 (in version 1 it is the seeded hash of a zero
/// page), so that the table of a mostly empty guest is mostly zeros, which the writer leaves as
/// holes in the file.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
pub(crate) const IMAGE_MAGIC: [u8; 8] = *b"DSMEMIMG";
pub(crate) const STREAM_MAGIC: [u8; 8] = *b"DSMEMSTR";
pub(crate) const FOOTER_MAGIC: [u8; 8] = *b"DSMEMEND";
/// Bytes of the header before the region table.
pub(crate) const FIXED_HEADER_LEN: usize = 64;
const REGION_ENTRY_LEN: usize = 16;
/// The header is never longer than this (64 Ki regions), so a reader's first allocation is bounded.
const MAX_HEADER_LEN: u64 = 1 << 20;
pub(crate) const FOOTER_LEN: usize = 48;

/// A region as an image records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical base address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The shape of an image: its regions, checksum seed and where each part lives in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    regions: Vec<RegionInfo>,
    seed: u64,
    total_pages: u64,
    header_len: u64,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte field"))
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte field"))
}

impl ImageLayout {
    /// Layout for `regions` (sorted, page aligned, non-overlapping) with checksum seed `seed`.
    pub fn new(regions: Vec<RegionInfo>, seed: u64) -> Result<Self> {
        let bad = |r: &RegionInfo, reason| Error::InvalidRegion {
            gpa: r.gpa,
            len: r.len,
            reason,
        };
        if regions.is_empty() {
            return Err(Error::InvalidRegion {
                gpa: 0,
                len: 0,
                reason: "image has no regions",
            });
        }
        let mut total_pages = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.len == 0 || r.gpa % PAGE != 0 || r.len % PAGE != 0 {
                return Err(bad(r, "empty or not page aligned"));
            }
            let end = r
                .gpa
                .checked_add(r.len)
                .ok_or_else(|| bad(r, "wraps around the address space"))?;
            if regions.get(i + 1).is_some_and(|next| next.gpa < end) {
                return Err(bad(r, "regions not sorted or overlapping"));
            }
            total_pages = total_pages
                .checked_add(r.len / PAGE)
                .ok_or_else(|| bad(r, "too large"))?;
        }
        // The file must be addressable: data and table offsets may not overflow.
        if total_pages > (u64::MAX / 2) / (PAGE + 16) {
            return Err(bad(&regions[0], "image too large"));
        }
        let header_len =
            (to_u64(FIXED_HEADER_LEN + regions.len() * REGION_ENTRY_LEN + 8)).next_multiple_of(PAGE);
        if header_len > MAX_HEADER_LEN {
            return Err(bad(&regions[0], "too many regions"));
        }
        Ok(ImageLayout {
            regions,
            seed,
            total_pages,
            header_len,
        })
    }

    /// Layout matching `mem`, with a fresh random checksum seed (a guest cannot aim hash collisions at a
    /// seed it does not know).
    pub fn of(mem: &GuestMemory) -> Self {
        Self::with_seed(mem, random_seed())
    }

    /// Layout for `regions` (as [`ImageLayout::new`]) with a fresh random checksum seed, for RAM
    /// this process does not map (e.g. a hypervisor's migration stream).
    pub fn for_regions(regions: Vec<RegionInfo>) -> Result<Self> {
        Self::new(regions, random_seed())
    }

    /// Layout matching `mem` with a given seed (for reproducible images in tests).
    pub fn with_seed(mem: &GuestMemory, seed: u64) -> Self {
        Self::new(region_infos(mem), seed).expect("a built GuestMemory has valid regions")
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }
    /// The page checksum seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Total number of pages.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }
    /// File offset of page 0's data (the header block's length, a multiple of the page size): page
    /// `i` lies at `data_offset() + i * 4096`, so the data area is guest RAM in page order, which a
    /// hypervisor can map straight from the file.
    pub fn data_offset(&self) -> u64 {
        self.header_len
    }
    /// Guest RAM the image covers, in bytes (the sum of its regions' lengths).
    pub fn ram_bytes(&self) -> u64 {
        self.total_pages * PAGE
    }
    /// File offset of page `page`'s data.
    pub(crate) fn page_offset(&self, page: u64) -> u64 {
        self.header_len + page * PAGE
    }
    pub(crate) fn table_offset(&self) -> u64 {
        self.page_offset(self.total_pages)
    }
    pub(crate) fn table_len(&self) -> u64 {
        PageTable::encoded_len(self.total_pages)
    }
    pub(crate) fn file_len(&self) -> u64 {
        self.table_offset() + self.table_len() + to_u64(FOOTER_LEN)
    }

    /// Guest-physical address of page `page` (for error messages).
    pub(crate) fn gpa_of_page(&self, page: u64) -> u64 {
        let mut first = 0;
        for r in &self.regions {
            let pages = r.len / PAGE;
            if page < first + pages {
                return r.gpa + (page - first) * PAGE;
            }
            first += pages;
        }
        u64::MAX
    }

    /// Checks that `mem` has exactly this layout's regions.
    pub fn check_matches(&self, mem: &GuestMemory) -> Result<()> {
        let target = region_infos(mem);
        if target.len() != self.regions.len() {
            return Err(Error::RegionMismatch {
                detail: format!(
                    "image has {} regions, target has {}",
                    self.regions.len(),
                    target.len()
                ),
            });
        }
        for (i, (a, b)) in self.regions.iter().zip(&target).enumerate() {
            if a != b {
                return Err(Error::RegionMismatch {
                    detail: format!(
                        "region {i}: image has {:#x} (length {:#x}), target has {:#x} (length {:#x})",
                        a.gpa, a.len, b.gpa, b.len
                    ),
                });
            }
        }
        Ok(())
    }

    /// The header block: fixed fields, region table, checksum, zero padding to `header_len`.
    pub(crate) fn encode_header(&self, magic: [u8; 8]) -> Vec<u8> {
        self.encode_header_of_version(magic, FORMAT_VERSION)
    }

    /// [`Self::encode_header`] for an older format `version` (for tests of older images).
    #[allow(
        clippy::cast_possible_truncation,
        reason = "header_len <= MAX_HEADER_LEN, which also bounds the region count (checked when the layout \
                  was made or decoded); PAGE_SIZE is 4096"
    )]
    pub(crate) fn encode_header_of_version(&self, magic: [u8; 8], version: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(to_usize(self.header_len));
        h.extend_from_slice(&magic);
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&(self.header_len as u32).to_le_bytes());
        h.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // flags: none defined in v1 or v2
        h.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // reserved
        h.extend_from_slice(&self.total_pages.to_le_bytes());
        h.extend_from_slice(&self.seed.to_le_bytes());
        h.extend_from_slice(&self.header_len.to_le_bytes()); // data offset
        h.extend_from_slice(&self.table_offset().to_le_bytes());
        for r in &self.regions {
            h.extend_from_slice(&r.gpa.to_le_bytes());
            h.extend_from_slice(&r.len.to_le_bytes());
        }
        let sum = block_hash(&h);
        h.extend_from_slice(&sum.to_le_bytes());
        h.resize(to_usize(self.header_len), 0);
        h
    }

    /// From the first 16 bytes: checks magic and version and returns the header length to read.
    pub(crate) fn header_len_from_prefix(prefix: &[u8], magic: [u8; 8], kind: &'static str) -> Result<usize> {
        let found: [u8; 8] = prefix[..8].try_into().expect("16-byte prefix");
        if found != magic {
            return Err(Error::BadMagic { kind, found });
        }
        let version = le_u32(prefix, 8);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                kind,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let len = u64::from(le_u32(prefix, 12));
        if len < PAGE || len % PAGE != 0 || len > MAX_HEADER_LEN {
            return Err(Error::corrupt(
                kind,
                format!("header length {len} is not a valid header size"),
            ));
        }
        Ok(to_usize(len))
    }

    /// The format version of a header whose prefix [`Self::header_len_from_prefix`] accepted.
    pub(crate) fn version_of(prefix: &[u8]) -> u32 {
        le_u32(prefix, 8)
    }

    /// Decodes a whole header block (as sized by [`Self::header_len_from_prefix`]); returns the layout
    /// and the header checksum.
    pub(crate) fn decode_header(h: &[u8], magic: [u8; 8], kind: &'static str) -> Result<(Self, u64)> {
        let header_len = Self::header_len_from_prefix(h, magic, kind)?;
        if h.len() != header_len {
            return Err(Error::corrupt(kind, "header block has the wrong length"));
        }
        let count = to_usize(u64::from(le_u32(h, 24)));
        let sum_at = FIXED_HEADER_LEN + count * REGION_ENTRY_LEN;
        if sum_at + 8 > header_len {
            return Err(Error::corrupt(
                kind,
                format!("header region count {count} does not fit the header"),
            ));
        }
        let sum = le_u64(h, sum_at);
        if block_hash(&h[..sum_at]) != sum {
            return Err(Error::corrupt(kind, "header checksum mismatch"));
        }
        if h[sum_at + 8..].iter().any(|&b| b != 0) {
            return Err(Error::corrupt(kind, "header padding is not zero"));
        }
        let page_size = le_u32(h, 16);
        if u64::from(page_size) != PAGE {
            return Err(Error::corrupt(
                kind,
                format!("page size {page_size} (this build handles {PAGE_SIZE})"),
            ));
        }
        let flags = le_u32(h, 20);
        if flags != 0 || le_u32(h, 28) != 0 {
            return Err(Error::corrupt(kind, format!("unknown header flags {flags:#x}")));
        }
        let regions = (0..count)
            .map(|i| {
                let at = FIXED_HEADER_LEN + i * REGION_ENTRY_LEN;
                RegionInfo {
                    gpa: le_u64(h, at),
                    len: le_u64(h, at + 8),
                }
            })
            .collect();
        let layout = Self::new(regions, le_u64(h, 40))
            .map_err(|e| Error::corrupt(kind, format!("header region table: {e}")))?;
        if to_usize(layout.header_len) != header_len
            || layout.total_pages != le_u64(h, 32)
            || layout.header_len != le_u64(h, 48)
            || layout.table_offset() != le_u64(h, 56)
        {
            return Err(Error::corrupt(
                kind,
                "header sizes and offsets do not match its region table",
            ));
        }
        Ok((layout, sum))
    }

    pub(crate) fn header_checksum(&self, magic: [u8; 8]) -> u64 {
        let h = self.encode_header(magic);
        let at = FIXED_HEADER_LEN + self.regions.len() * REGION_ENTRY_LEN;
        le_u64(&h, at)
    }
}

/// The footer: marks an image complete and covers the page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Footer {
    pub table_checksum: u64,
    pub header_checksum: u64,
}

impl Footer {
    pub(crate) fn encode(&self, layout: &ImageLayout) -> [u8; FOOTER_LEN] {
        let mut f = [0u8; FOOTER_LEN];
        f[..8].copy_from_slice(&FOOTER_MAGIC);
        f[8..16].copy_from_slice(&layout.table_len().to_le_bytes());
        f[16..24].copy_from_slice(&self.table_checksum.to_le_bytes());
        f[24..32].copy_from_slice(&self.header_checksum.to_le_bytes());
        f[32..40].copy_from_slice(&layout.file_len().to_le_bytes());
        let sum = block_hash(&f[..40]);
        f[40..].copy_from_slice(&sum.to_le_bytes());
        f
    }

    /// Decodes a footer and checks it against the header it must belong to.
    pub(crate) fn decode(f: &[u8], layout: &ImageLayout, header_checksum: u64) -> Result<Self> {
        let kind = "image";
        if f[..8] != FOOTER_MAGIC {
            return Err(Error::corrupt(
                kind,
                "footer magic missing (image incomplete or damaged)",
            ));
        }
        if block_hash(&f[..40]) != le_u64(f, 40) {
            return Err(Error::corrupt(kind, "footer checksum mismatch"));
        }
        if le_u64(f, 8) != layout.table_len() || le_u64(f, 32) != layout.file_len() {
            return Err(Error::corrupt(kind, "footer sizes do not match the header"));
        }
        let footer = Footer {
            table_checksum: le_u64(f, 16),
            header_checksum: le_u64(f, 24),
        };
        if footer.header_checksum != header_checksum {
            return Err(Error::corrupt(kind, "footer belongs to a different header"));
        }
        Ok(footer)
    }
}

/// The regions of `mem` as an image records them.
fn region_infos(mem: &GuestMemory) -> Vec<RegionInfo> {
    mem.regions()
        .iter()
        .map(|r| RegionInfo {
            gpa: r.gpa(),
            len: r.len(),
        })
        .collect()
}

/// A checksum seed no guest can predict.
fn random_seed() -> u64 {
    RandomState::new().hash_one(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let layout = ImageLayout::new(
            vec![
                RegionInfo {
                    gpa: 0,
                    len: 8 * PAGE,
                },
                RegionInfo {
                    gpa: 1 << 32,
                    len: 4 * PAGE,
                },
            ],
            99,
        )
        .unwrap();
        let h = layout.encode_header(IMAGE_MAGIC);
        assert_eq!(h.len() as u64, layout.header_len);
        let (back, sum) = ImageLayout::decode_header(&h, IMAGE_MAGIC, "image").unwrap();
        assert_eq!(back, layout);
        assert_eq!(sum, layout.header_checksum(IMAGE_MAGIC));
        assert_eq!(back.gpa_of_page(9), (1 << 32) + PAGE);
    }

    #[test]
    fn rejects_overlapping_regions() {
        let r = vec![
            RegionInfo {
                gpa: 0,
                len: 2 * PAGE,
            },
            RegionInfo { gpa: PAGE, len: PAGE },
        ];
        assert!(ImageLayout::new(r, 0).is_err());
    }
}
