//! Per-page bookkeeping: the page table (state + checksum of every page saved so far) and dirty sets.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, Xxh3};

use crate::error::{Error, Result};
use crate::guest::PAGE_SIZE;
use crate::num::{to_u64, to_usize};

/// Pages handled by one unit of parallel work (16 MiB); a multiple of 64 so that chunks of a dirty
/// bitmap are whole words.
pub(crate) const CHUNK_PAGES: usize = 4096;
pub(crate) const CHUNK_WORDS: usize = CHUNK_PAGES / 64;

/// Checksum of one page's bytes (xxh3-64 with the image's seed).
pub(crate) fn page_hash(seed: u64, page: &[u8]) -> u64 {
    xxh3_64_with_seed(page, seed)
}

/// Checksum of a metadata block (unseeded xxh3-64).
pub(crate) fn block_hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// Whether every byte is zero. Works in 512-byte blocks so a non-zero page is usually rejected after
/// its first block; each block's byte-wise OR compiles to wide vector ORs.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(512)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// State of a page in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// All zero; not stored.
    Zero = 0,
    /// Stored, with a checksum.
    Present = 1,
}

impl PageState {
    /// The state's byte in a page table.
    pub(crate) const fn byte(self) -> u8 {
        self as u8
    }
}

/// The state and checksum of every page as last saved: what the image (or stream) holds.
///
/// For a zero page the checksum is the seeded hash of a zero page, so comparing a live page's hash with
/// the table's entry tells whether it changed, whatever its state (encoded from format version 2 on,
/// a zero page's entry is 0). Costs 9 bytes per guest page in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    states: Vec<u8>,
    checksums: Vec<u64>,
    seed: u64,
    zero_hash: u64,
}

impl PageTable {
    /// A table for `pages` pages, all zero (what a fresh image holds).
    pub(crate) fn new(pages: u64, seed: u64) -> Self {
        let zero_hash = page_hash(seed, &[0u8; PAGE_SIZE]);
        let n = to_usize(pages);
        PageTable {
            states: vec![PageState::Zero.byte(); n],
            checksums: vec![zero_hash; n],
            seed,
            zero_hash,
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        to_u64(self.states.len())
    }
    /// The checksum seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// State of page `page`.
    pub fn state(&self, page: u64) -> PageState {
        if self.states[to_usize(page)] == PageState::Present.byte() {
            PageState::Present
        } else {
            PageState::Zero
        }
    }
    /// Checksum of page `page` (the zero-page hash for a zero page).
    pub fn checksum(&self, page: u64) -> u64 {
        self.checksums[to_usize(page)]
    }
    /// Number of present (stored) pages.
    pub fn present_pages(&self) -> u64 {
        to_u64(
            self.states
                .iter()
                .filter(|&&s| s == PageState::Present.byte())
                .count(),
        )
    }
    pub(crate) fn zero_hash(&self) -> u64 {
        self.zero_hash
    }
    pub(crate) fn set(&mut self, page: u64, checksum: Option<u64>) {
        let i = to_usize(page);
        self.states[i] = checksum.map_or(PageState::Zero, |_| PageState::Present).byte();
        self.checksums[i] = checksum.unwrap_or(self.zero_hash);
    }
    /// Mutable views for parallel updates of disjoint chunks.
    pub(crate) fn parts_mut(&mut self) -> (&mut [u8], &mut [u64]) {
        (&mut self.states, &mut self.checksums)
    }

    /// Length of the encoded table: states padded to 8 bytes, then little-endian checksums.
    pub(crate) fn encoded_len(pages: u64) -> u64 {
        pages.next_multiple_of(8) + pages * 8
    }

    /// The checksum entry a zero page has in an encoded table of format `version`: 0 from version
    /// 2 on, the seeded hash of a zero page in version 1.
    fn zero_entry(&self, version: u32) -> u64 {
        if version >= 2 {
            0
        } else {
            self.zero_hash
        }
    }

    /// Emits the table encoded for format `version` in pieces of at most 64 KiB (never a second
    /// copy of the whole table) and returns its checksum.
    pub(crate) fn write_encoded<E>(
        &self,
        version: u32,
        mut out: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let zero_entry = self.zero_entry(version);
        let mut hasher = Xxh3::new();
        let mut emit = |piece: &[u8]| {
            hasher.update(piece);
            out(piece)
        };
        for piece in self.states.chunks(1 << 16) {
            emit(piece)?;
        }
        emit(&[0u8; 8][..self.states.len().next_multiple_of(8) - self.states.len()])?;
        let mut buf = Vec::with_capacity(1 << 16);
        for (sums, states) in self.checksums.chunks(1 << 13).zip(self.states.chunks(1 << 13)) {
            buf.clear();
            for (&sum, &state) in sums.iter().zip(states) {
                let entry = if state == PageState::Zero.byte() {
                    zero_entry
                } else {
                    sum
                };
                buf.extend_from_slice(&entry.to_le_bytes());
            }
            emit(&buf)?;
        }
        Ok(hasher.digest())
    }

    /// The table encoded for format `version`.
    pub(crate) fn encode(&self, version: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(to_usize(Self::encoded_len(self.pages())));
        let Ok(_) = self.write_encoded(version, |piece| {
            out.extend_from_slice(piece);
            Ok::<_, std::convert::Infallible>(())
        });
        out
    }

    /// Checksum of the table encoded for format `version`; binds a stream's end record to the
    /// pages it carried.
    pub(crate) fn digest(&self, version: u32) -> u64 {
        let Ok(digest) = self.write_encoded(version, |_| Ok::<_, std::convert::Infallible>(()));
        digest
    }

    /// Decodes a table of format `version` whose block checksum has already been checked, and
    /// checks each entry.
    pub(crate) fn decode(
        bytes: &[u8],
        pages: u64,
        seed: u64,
        version: u32,
        kind: &'static str,
    ) -> Result<Self> {
        let n = to_usize(pages);
        let states_len = n.next_multiple_of(8);
        if to_u64(bytes.len()) != Self::encoded_len(pages) {
            return Err(Error::corrupt(kind, "page table has the wrong length"));
        }
        let mut table = PageTable::new(pages, seed);
        let zero_entry = table.zero_entry(version);
        if bytes[n..states_len].iter().any(|&b| b != 0) {
            return Err(Error::corrupt(kind, "page table padding is not zero"));
        }
        for (i, (&s, c)) in bytes[..n]
            .iter()
            .zip(bytes[states_len..].chunks_exact(8))
            .enumerate()
        {
            let c = u64::from_le_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes"));
            match s {
                0 if c == zero_entry => {}
                0 => {
                    return Err(Error::corrupt(
                        kind,
                        format!("page table entry {i}: zero page with a data checksum"),
                    ))
                }
                1 => table.set(to_u64(i), Some(c)),
                other => {
                    return Err(Error::corrupt(
                        kind,
                        format!("page table entry {i}: unknown state {other}"),
                    ))
                }
            }
        }
        Ok(table)
    }
}

/// A set of pages, as a bitmap over the memory's page numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    words: Vec<u64>,
    pages: u64,
}

impl DirtySet {
    /// No pages of `pages`.
    pub fn empty(pages: u64) -> Self {
        DirtySet {
            words: vec![0; to_usize(pages.div_ceil(64))],
            pages,
        }
    }

    /// Every page of `pages`.
    pub fn full(pages: u64) -> Self {
        let mut set = Self::empty(pages);
        set.words.fill(u64::MAX);
        if pages % 64 != 0 {
            if let Some(last) = set.words.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        set
    }

    /// Size of the page numbering this set is over.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Adds page `page` (must be < pages()).
    pub fn insert(&mut self, page: u64) {
        assert!(
            page < self.pages,
            "page {page} outside a set of {} pages",
            self.pages
        );
        self.words[to_usize(page / 64)] |= 1 << (page % 64);
    }

    /// Adds pages `range` (must lie inside pages()).
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) {
        range.for_each(|p| self.insert(p));
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[to_usize(page / 64)] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Adds every page of `other` (same size).
    pub fn union_with(&mut self, other: &DirtySet) {
        assert_eq!(self.pages, other.pages, "dirty sets over different memories");
        self.words.iter_mut().zip(&other.words).for_each(|(a, b)| *a |= b);
    }

    /// The pages in the set, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        set_bits(&self.words, 0)
    }

    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }
    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }
}

/// Indices of the set bits in `words`, numbered from `base`.
pub(crate) fn set_bits(words: &[u64], base: u64) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(move |(i, &w)| {
        let mut bits = w;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                base + to_u64(i) * 64 + u64::from(b)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_matches_naive() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        for pos in [0, 7, 255, 256, 4000, 4095] {
            page[pos] = 1;
            assert!(!is_zero(&page));
            page[pos] = 0;
        }
        assert!(is_zero(&page[..13]));
    }

    #[test]
    fn dirty_set_full_and_iter() {
        let set = DirtySet::full(130);
        assert_eq!(set.count(), 130);
        assert_eq!(set.iter().collect::<Vec<_>>(), (0..130).collect::<Vec<_>>());
        let mut s = DirtySet::empty(130);
        s.insert(129);
        s.insert(3);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 129]);
    }

    #[test]
    fn table_round_trips_in_both_format_versions() {
        let mut t = PageTable::new(10, 42);
        t.set(3, Some(77));
        for version in [1, 2] {
            let encoded = t.encode(version);
            assert_eq!(block_hash(&encoded), t.digest(version));
            let back = PageTable::decode(&encoded, 10, 42, version, "image").unwrap();
            assert_eq!(back, t);
            assert_eq!(back.present_pages(), 1);
            // A zero page's entry is the other version's: refused.
            let other = PageTable::decode(&t.encode(3 - version), 10, 42, version, "image");
            assert!(other
                .unwrap_err()
                .to_string()
                .contains("zero page with a data checksum"));
        }
        // Version 2: every zero page's entry is 0, so only the present page's bytes are not zero.
        let encoded = t.encode(2);
        let sums = &encoded[16..];
        assert!(sums.chunks(8).enumerate().all(|(i, c)| (i == 3) != (c == [0; 8])));
    }
}
