//! Reference counts held in memory: decoded refcount blocks, changes tracked per block so
//! that only changed blocks are written back, and cluster allocation.

use crate::num::{to_u64, to_usize};
use std::collections::{BTreeMap, BTreeSet};

/// Why a refcount change is impossible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefcountError {
    /// The count would exceed the refcount width.
    Overflow {
        /// Cluster index.
        cluster: u64,
        /// The largest count.
        max: u64,
    },
    /// The count would drop below zero: the image's refcounts are wrong.
    Underflow {
        /// Cluster index.
        cluster: u64,
    },
}

/// The refcounts of an image, per cluster index.
///
/// Blocks are kept in their on-disk encoding (one cluster each), so that the memory held is
/// the size of the refcount blocks themselves, whatever the refcount width.
#[derive(Debug, Clone)]
pub struct Refcounts {
    order: u32,
    /// Entries per refcount block.
    per_block: u64,
    /// Bytes per refcount block (one cluster).
    block_bytes: usize,
    /// Blocks by block index, as stored. A missing block means all zero.
    blocks: BTreeMap<u64, Vec<u8>>,
    /// Blocks changed since the last [`Refcounts::take_dirty`].
    dirty: BTreeSet<u64>,
    /// No free cluster below this index (allocation starts searching here).
    free_hint: u64,
    /// One past the highest cluster [`Refcounts::allocate`] returned.
    allocated_end: u64,
}

impl Refcounts {
    /// An empty set of refcounts for `cluster_bits` and `refcount_order`.
    pub fn new(cluster_bits: u32, order: u32) -> Self {
        let per_block = ((1u64 << cluster_bits) * 8) >> order;
        Self {
            order,
            per_block,
            block_bytes: 1usize << cluster_bits,
            blocks: BTreeMap::new(),
            dirty: BTreeSet::new(),
            free_hint: 0,
            allocated_end: 0,
        }
    }

    /// The largest count an entry holds.
    pub fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    /// Entry `i` of an encoded block.
    fn decode(&self, bytes: &[u8], i: usize) -> u64 {
        let bits = 1usize << self.order;
        match bits {
            // Sub-byte widths pack entries from the least significant bit (as QEMU does).
            1 | 2 | 4 => u64::from((bytes[i * bits / 8] >> ((i * bits) % 8)) & ((1u8 << bits) - 1)),
            _ => {
                let width = bits / 8;
                bytes[i * width..(i + 1) * width]
                    .iter()
                    .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
            }
        }
    }

    /// Stores `count` (at most [`Refcounts::max`]) as entry `i` of an encoded block.
    fn encode(order: u32, bytes: &mut [u8], i: usize, count: u64) {
        let bits = 1usize << order;
        match bits {
            1 | 2 | 4 => {
                let shift = (i * bits) % 8;
                let mask = ((1u8 << bits) - 1) << shift;
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "a count is at most max(), below 16 for these widths"
                )]
                let value = (count as u8) << shift;
                let byte = &mut bytes[i * bits / 8];
                *byte = (*byte & !mask) | (value & mask);
            }
            _ => {
                let width = bits / 8;
                bytes[i * width..(i + 1) * width].copy_from_slice(&count.to_be_bytes()[8 - width..]);
            }
        }
    }

    /// Loads block `index` from its on-disk encoding (one cluster; shorter input reads as
    /// zeros past its end).
    pub fn load_block(&mut self, index: u64, bytes: &[u8]) {
        let mut block = vec![0u8; self.block_bytes];
        let len = bytes.len().min(self.block_bytes);
        block[..len].copy_from_slice(&bytes[..len]);
        self.blocks.insert(index, block);
    }

    /// The on-disk encoding of block `index` (`per_block` entries, one cluster).
    pub fn encode_block(&self, index: u64, cluster_size: usize) -> Vec<u8> {
        let mut out = self
            .blocks
            .get(&index)
            .cloned()
            .unwrap_or_else(|| vec![0u8; cluster_size]);
        out.resize(cluster_size, 0);
        out
    }

    /// The count of cluster `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        self.blocks
            .get(&(cluster / self.per_block))
            .map_or(0, |block| self.decode(block, to_usize(cluster % self.per_block)))
    }

    /// Adds `delta` to the count of `cluster`.
    pub fn add(&mut self, cluster: u64, delta: i64) -> Result<(), RefcountError> {
        let max = self.max();
        let slot = self.get(cluster);
        let new = if delta >= 0 {
            slot.checked_add(delta.unsigned_abs())
                .filter(|&n| n <= max)
                .ok_or(RefcountError::Overflow { cluster, max })?
        } else {
            slot.checked_sub(delta.unsigned_abs())
                .ok_or(RefcountError::Underflow { cluster })?
        };
        let index = cluster / self.per_block;
        let (order, block_bytes) = (self.order, self.block_bytes);
        let block = self.blocks.entry(index).or_insert_with(|| vec![0; block_bytes]);
        Self::encode(order, block, to_usize(cluster % self.per_block), new);
        self.dirty.insert(index);
        if new == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    /// Finds `count` contiguous free clusters, sets their counts to 1 and returns the first.
    pub fn allocate(&mut self, count: u64) -> u64 {
        let mut start = self.free_hint;
        let mut run = 0;
        let mut cluster = start;
        while run < count {
            if self.get(cluster) == 0 {
                run += 1;
            } else {
                run = 0;
                start = cluster + 1;
            }
            cluster += 1;
        }
        for c in start..start + count {
            self.add(c, 1).expect("a free cluster can count one reference");
        }
        if start == self.free_hint {
            self.free_hint = start + count;
        }
        self.allocated_end = self.allocated_end.max(start + count);
        start
    }

    /// Blocks changed since the last call, forgetting them.
    pub fn take_dirty(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    /// Blocks changed and not yet taken.
    pub fn dirty(&self) -> &BTreeSet<u64> {
        &self.dirty
    }

    /// Whether block `index` holds any nonzero count.
    pub fn block_in_use(&self, index: u64) -> bool {
        self.blocks
            .get(&index)
            .is_some_and(|block| block.iter().any(|&b| b != 0))
    }

    /// Every (cluster, count) with a nonzero count, in order.
    pub fn nonzero(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.blocks.iter().flat_map(move |(&index, block)| {
            (0..to_usize(self.per_block))
                .map(move |i| (index * self.per_block + to_u64(i), self.decode(block, i)))
                .filter(|&(_, c)| c != 0)
        })
    }

    /// One past the highest cluster allocated so far (0 if none).
    pub fn allocated_end(&self) -> u64 {
        self.allocated_end
    }

    /// One past the highest cluster with a nonzero count.
    pub fn end(&self) -> u64 {
        for (&index, block) in self.blocks.iter().rev() {
            if let Some(i) = (0..to_usize(self.per_block))
                .rev()
                .find(|&i| self.decode(block, i) != 0)
            {
                return index * self.per_block + to_u64(i) + 1;
            }
        }
        0
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_wrap, reason = "test counts are small")]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6 {
            let mut rc = Refcounts::new(9, order);
            let max = rc.max();
            let per_block = (512 * 8) >> order;
            for cluster in 0..per_block {
                rc.add(cluster, (cluster % 3).min(max) as i64).unwrap();
            }
            rc.add(per_block - 1, 0).unwrap();
            let bytes = rc.encode_block(0, 512);
            let mut back = Refcounts::new(9, order);
            back.load_block(0, &bytes);
            for cluster in 0..per_block {
                assert_eq!(
                    back.get(cluster),
                    rc.get(cluster),
                    "order {order} cluster {cluster}"
                );
            }
            if order < 6 {
                assert_eq!(
                    rc.add(0, max as i64 + 1).unwrap_err(),
                    RefcountError::Overflow { cluster: 0, max }
                );
            }
            assert_eq!(
                rc.add(0, -1).unwrap_err(),
                RefcountError::Underflow { cluster: 0 }
            );
        }
    }

    #[test]
    fn allocation_is_first_fit_and_contiguous() {
        let mut rc = Refcounts::new(9, 4);
        for c in [0, 1, 3, 6] {
            rc.add(c, 1).unwrap();
        }
        assert_eq!(rc.allocate(1), 2);
        assert_eq!(rc.allocate(2), 4);
        assert_eq!(rc.allocate(3), 7);
        rc.add(4, -1).unwrap();
        assert_eq!(rc.allocate(1), 4);
    }
}
