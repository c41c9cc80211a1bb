//! The guest data path that merging images of a backing chain needs: mapping a guest range of
//! one image (L1/L2, extended L2 subclusters, zero flags), reading guest bytes through a chain,
//! and writing whole clusters into an image with crash-safe ordering. Compressed clusters are
//! counted and overwritten but never decompressed (the crate has no deflate/zstd): reading one
//! is refused with [`Error::Unsupported`].

use std::{
    collections::{btree_map::Entry, BTreeMap, HashSet},
    fs::File,
    path::PathBuf,
};

use super::{
    header::{be_u64, HeaderError},
    image::{data_clusters, read_up_to, Image, COMPRESSED, COPIED, OFFSET_MASK},
};
use crate::error::{io_err, Error, Result};
use crate::num::{to_u64, to_usize};

/// Standard L2 entry flag (version 3): the cluster reads as zeros.
const ZERO: u64 = 1;
/// Extended L2 bitmap: every subcluster allocated (low half) / every subcluster zero (high half).
const ALL_ALLOCATED: u64 = 0xffff_ffff;
const ALL_ZERO: u64 = 0xffff_ffff << 32;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;
/// Clusters written per batch: each batch costs a handful of syncs, so batches amortise them
/// while bounding the work a crash can leak.
const BATCH: usize = 512;

/// What a guest range of one image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Data at this host offset.
    Data(u64),
    /// Reads as zeros (zero flag or zero subcluster bit).
    Zero,
    /// A compressed cluster.
    Compressed,
    /// Not mapped here: the backing image shows through.
    Unallocated,
}

/// A cluster written by [`Image::stage_cluster`] that [`Image::commit_staged`] has yet to map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Staged {
    /// Guest cluster index.
    cluster: u64,
    /// Where its data was written; `None` maps it as a zero cluster.
    host: Option<u64>,
}

impl Image {
    /// The L2 entry of guest cluster `cluster` as (descriptor, subcluster bitmap); zeros when
    /// no L2 table maps it.
    fn l2_entry(&self, cluster: u64) -> Result<(u64, u64)> {
        let header = self.header();
        let entry_size = header.l2_entry_size();
        let per_l2 = self.cluster_size() / entry_size;
        let index = cluster / per_l2;
        if index >= u64::from(header.l1_size) {
            return Ok((0, 0));
        }
        let l1 = self.read_at(header.l1_table_offset + index * 8, 8, "L1 table")?;
        let l2_offset = be_u64(&l1, 0) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((0, 0));
        }
        if l2_offset % self.cluster_size() != 0 {
            return Err(self.invalid(format!(
                "L1 entry {index}: L2 table offset {l2_offset:#x} is not aligned"
            )));
        }
        let at = l2_offset + (cluster % per_l2) * entry_size;
        let raw = self.read_at(at, to_usize(entry_size), "L2 entry")?;
        let bitmap = if entry_size == 16 { be_u64(&raw, 8) } else { 0 };
        Ok((be_u64(&raw, 0), bitmap))
    }

    /// The guest byte ranges the active state maps something of (data, zeros or compressed
    /// clusters), in order and merged: what a merge must visit. The work is one read per L2
    /// table (each distinct, inside the file), whatever the virtual size.
    pub(crate) fn mapped_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let header = self.header();
        let cluster_size = self.cluster_size();
        let entry_size = header.l2_entry_size();
        let per_l2 = cluster_size / entry_size;
        let l1 = self.read_l1(header.l1_table_offset, header.l1_size)?;
        let mut seen = HashSet::new();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (index, &entry) in l1.iter().enumerate() {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if l2_offset % cluster_size != 0 || !seen.insert(l2_offset) {
                return Err(self.invalid(format!(
                    "L1 entry {index}: L2 table offset {l2_offset:#x} is not aligned or shared"
                )));
            }
            let l2 = self.read_at(l2_offset, to_usize(cluster_size), "L2 table")?;
            for (slot, raw) in l2.chunks_exact(to_usize(entry_size)).enumerate() {
                let descriptor = be_u64(raw, 0);
                let mapped = if descriptor & COMPRESSED != 0 {
                    true
                } else if header.extended_l2() {
                    be_u64(raw, 8) != 0
                } else {
                    descriptor & OFFSET_MASK != 0 || (header.version >= 3 && descriptor & ZERO != 0)
                };
                let start = (to_u64(index) * per_l2 + to_u64(slot)) * cluster_size;
                if !mapped || start >= header.size {
                    continue;
                }
                let len = cluster_size.min(header.size - start);
                match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += len,
                    _ => ranges.push((start, len)),
                }
            }
        }
        Ok(ranges)
    }

    /// What the guest range `offset..offset + len` maps to, as consecutive (length, extent)
    /// pieces covering it.
    pub(crate) fn map(&self, offset: u64, len: u64) -> Result<Vec<(u64, Extent)>> {
        let cluster_size = self.cluster_size();
        let (end, mut at, mut pieces) = (offset + len, offset, Vec::new());
        while at < end {
            let within = at % cluster_size;
            let (descriptor, bitmap) = self.l2_entry(at / cluster_size)?;
            let host = data_clusters(self.header(), descriptor)
                .map_err(|reason| self.invalid(format!("L2 entry of guest offset {at:#x}: {reason}")))?
                .map(|(first, _)| (first * cluster_size) + within);
            let (piece, extent) = if descriptor & COMPRESSED != 0 {
                (cluster_size - within, Extent::Compressed)
            } else if self.header().extended_l2() {
                let sub = cluster_size / SUBCLUSTERS;
                let bit = within / sub;
                let extent = if bitmap >> bit & 1 != 0 {
                    Extent::Data(host.ok_or_else(|| {
                        self.invalid(format!(
                            "subcluster of guest offset {at:#x} allocated without a cluster"
                        ))
                    })?)
                } else if bitmap >> (SUBCLUSTERS + bit) & 1 != 0 {
                    Extent::Zero
                } else {
                    Extent::Unallocated
                };
                (sub - within % sub, extent)
            } else if self.header().version >= 3 && descriptor & ZERO != 0 {
                (cluster_size - within, Extent::Zero)
            } else {
                (
                    cluster_size - within,
                    host.map_or(Extent::Unallocated, Extent::Data),
                )
            };
            let piece = piece.min(end - at);
            pieces.push((piece, extent));
            at += piece;
        }
        Ok(pieces)
    }

    /// Writes `data` (one cluster) for guest cluster `cluster` into a newly allocated cluster,
    /// or nothing if it is all zeros and the image can map a zero cluster (version 3). The
    /// mapping only changes in [`Image::commit_staged`]; until then the data sits in a cluster
    /// that nothing references, and a crash merely leaves it free.
    pub(crate) fn stage_cluster(&mut self, cluster: u64, data: &[u8]) -> Result<Staged> {
        if self.header().version >= 3 && data.iter().all(|&b| b == 0) {
            return Ok(Staged { cluster, host: None });
        }
        let host = self.allocate(to_u64(data.len()));
        self.write_at(host, data)?;
        Ok(Staged {
            cluster,
            host: Some(host),
        })
    }

    /// Maps the staged clusters, in QEMU's order: data (already written) synced; increments
    /// for the data and any new L2 table written; L2 tables written and synced; L1 entries of
    /// new L2 tables written and synced; only then the clusters the old entries referred to
    /// released. A crash at any point leaves the old or the new mapping of each cluster (an L2
    /// entry is written within one sector) and at most leaked clusters.
    ///
    /// An L2 table shared with internal snapshots is copied first and the copy mapped (copy on
    /// write), so the snapshots keep what they showed; other L2 tables are updated in place.
    pub(crate) fn commit_staged(&mut self, staged: &[Staged]) -> Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        self.sync()?;
        let header = self.header().clone();
        let cluster_size = self.cluster_size();
        let entry_size = to_usize(header.l2_entry_size());
        let per_l2 = cluster_size / to_u64(entry_size);
        let l1 = self.read_l1(header.l1_table_offset, header.l1_size)?;
        // L1 index -> (L2 table offset, newly allocated, its contents).
        let mut tables: BTreeMap<u64, (u64, bool, Vec<u8>)> = BTreeMap::new();
        let mut released = Vec::new();
        for s in staged {
            let index = s.cluster / per_l2;
            let Some(&l1_entry) = l1.get(to_usize(index)) else {
                return Err(self.invalid(format!("guest cluster {} lies beyond the L1 table", s.cluster)));
            };
            if let Entry::Vacant(slot) = tables.entry(index) {
                let l2_offset = l1_entry & OFFSET_MASK;
                let table = if l2_offset == 0 {
                    (self.allocate(cluster_size), true, vec![0; to_usize(cluster_size)])
                } else {
                    let bytes = self.read_at(l2_offset, to_usize(cluster_size), "L2 table")?;
                    if self.refcounts().get(l2_offset >> header.cluster_bits) == 1 {
                        (l2_offset, false, bytes)
                    } else {
                        // Shared with an internal snapshot: map a copy (as QEMU does), so the
                        // snapshot keeps the old table. A data cluster counts one reference per
                        // L1 table reaching it, so the copy changes none of their counts; the
                        // old table loses the active L1's reference.
                        released.push(l2_offset >> header.cluster_bits);
                        (self.allocate(cluster_size), true, bytes)
                    }
                };
                slot.insert(table);
            }
            let table = &mut tables.get_mut(&index).expect("inserted above").2;
            let at = to_usize(s.cluster % per_l2) * entry_size;
            let old = be_u64(table, at);
            if let Some((first, count)) = data_clusters(&header, old).map_err(|reason| {
                self.invalid(format!("L2 entry of guest cluster {}: {reason}", s.cluster))
            })? {
                released.extend(first..first + count);
            }
            let (descriptor, bitmap) = match (s.host, header.extended_l2()) {
                (Some(host), extended) => (host | COPIED, if extended { ALL_ALLOCATED } else { 0 }),
                (None, true) => (0, ALL_ZERO),
                (None, false) => (ZERO, 0),
            };
            table[at..at + 8].copy_from_slice(&descriptor.to_be_bytes());
            if header.extended_l2() {
                table[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
            }
        }
        self.check_refs(&released, -1)?;
        self.flush_refcounts()?;
        for (offset, _, table) in tables.values() {
            self.write_at(*offset, table)?;
        }
        self.sync()?;
        let mut new_tables = false;
        for (index, (offset, new, _)) in &tables {
            if *new {
                self.write_at(
                    header.l1_table_offset + index * 8,
                    &(offset | COPIED).to_be_bytes(),
                )?;
                new_tables = true;
            }
        }
        if new_tables {
            self.sync()?;
        }
        self.add_refs(&released, -1)?;
        self.flush_refcounts()
    }

    /// The header area naming another backing file, `(name, format)`, or none; also a check,
    /// before anything is written, that it fits in the first cluster.
    pub(crate) fn backing_header(&self, backing: Option<(&str, &str)>) -> Result<Vec<u8>> {
        let cluster0 = self.read_at(0, to_usize(self.cluster_size()), "header cluster")?;
        self.header()
            .with_backing(&cluster0, backing)
            .map_err(|e| match e {
                HeaderError::Invalid(reason) | HeaderError::Unsupported(reason) => self.invalid(reason),
            })
    }

    /// Records another backing file, `(name, format)`, or none, rewriting the header area in
    /// one write (the switch of a stream or an intermediate commit), then syncs.
    pub(crate) fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        // Built now: the header fields (e.g. a moved refcount table) may have changed since
        // any earlier check.
        let bytes = self.backing_header(backing)?;
        self.switch_header(0, &bytes)?;
        let header = self.header_mut();
        header.backing_file_offset = be_u64(&bytes, 8);
        header.backing_file_size = backing.map_or(0, |(name, _)| {
            u32::try_from(name.len()).expect("backing_header accepted a name of at most 1023 bytes")
        });
        header.backing_file = backing.map(|(name, _)| name.to_owned());
        header.backing_format = backing.map(|(_, format)| format.to_owned());
        Ok(())
    }
}

/// The data ranges of a raw file of `size` bytes, from `SEEK_DATA`/`SEEK_HOLE` (the whole
/// file if the file system cannot tell).
fn raw_data_ranges(path: &std::path::Path, file: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use nix::{
        errno::Errno,
        unistd::{lseek, Whence},
    };
    let to_off = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut ranges = Vec::new();
    let mut at = 0u64;
    while at < size {
        let data = match lseek(file, to_off(at), Whence::SeekData) {
            Ok(data) => u64::try_from(data).unwrap_or(size),
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) if at == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(io_err("cannot find the data of", path)(e.into())),
        };
        let hole = match lseek(file, to_off(data), Whence::SeekHole) {
            Ok(hole) => u64::try_from(hole).unwrap_or(size),
            Err(e) => return Err(io_err("cannot find the data of", path)(e.into())),
        };
        let end = hole.min(size);
        if data >= end {
            break;
        }
        ranges.push((data, end - data));
        at = end;
    }
    Ok(ranges)
}

/// One image of a chain opened for merging.
#[derive(Debug)]
pub(crate) enum Layer {
    /// A qcow2 image.
    Qcow2(Box<Image>),
    /// A raw image (only ever read): every byte is data.
    Raw {
        /// The file's path, for errors.
        path: PathBuf,
        /// The file.
        file: File,
        /// Its length, the virtual size.
        size: u64,
    },
}

impl Layer {
    /// The guest byte ranges the layer maps something of, in order: a qcow2 image's allocated
    /// entries, a raw file's data (its holes skipped with `SEEK_DATA`/`SEEK_HOLE`).
    fn mapped_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match self {
            Layer::Qcow2(image) => image.mapped_ranges(),
            Layer::Raw { path, file, size } => raw_data_ranges(path, file, *size),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(image) => image.header().size,
            Layer::Raw { size, .. } => *size,
        }
    }

    /// Whether the image maps anything of `offset..offset + len` itself (`all`: every byte).
    fn maps(&self, offset: u64, len: u64, all: bool) -> Result<bool> {
        let len = len.min(self.size().saturating_sub(offset));
        match self {
            Layer::Raw { .. } => Ok(len > 0),
            Layer::Qcow2(image) => {
                let pieces = image.map(offset, len)?;
                let mapped = |p: &(u64, Extent)| p.1 != Extent::Unallocated;
                Ok(if all {
                    pieces.iter().all(mapped)
                } else {
                    pieces.iter().any(mapped)
                })
            }
        }
    }
}

/// A backing chain from some image down to its base, index 0 on top.
#[derive(Debug)]
pub(crate) struct Chain {
    layers: Vec<Layer>,
}

impl Chain {
    pub(crate) fn new(layers: Vec<Layer>) -> Self {
        Self { layers }
    }

    /// The qcow2 image at `index`.
    pub(crate) fn image_mut(&mut self, index: usize) -> Option<&mut Image> {
        match self.layers.get_mut(index) {
            Some(Layer::Qcow2(image)) => Some(image),
            _ => None,
        }
    }

    /// Reads the guest bytes at `offset` as layer `from` shows them: its own data and zeros,
    /// the layers below where it maps nothing, zeros past an image's end.
    pub(crate) fn read(&self, from: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some(layer) = self.layers.get(from) else {
            buf.fill(0);
            return Ok(());
        };
        let inside = to_usize(layer.size().saturating_sub(offset).min(to_u64(buf.len())));
        let (buf, beyond) = buf.split_at_mut(inside);
        beyond.fill(0);
        match layer {
            Layer::Raw { path, file, .. } => {
                let got = read_up_to(file, offset, buf).map_err(io_err("cannot read", path))?;
                buf[got..].fill(0);
            }
            Layer::Qcow2(image) => {
                let mut at = 0usize;
                for (len, extent) in image.map(offset, to_u64(buf.len()))? {
                    let piece = &mut buf[at..at + to_usize(len)];
                    match extent {
                        Extent::Data(host) => {
                            piece.copy_from_slice(&image.read_at(host, piece.len(), "data cluster")?)
                        }
                        Extent::Zero => piece.fill(0),
                        Extent::Unallocated => self.read(from + 1, offset + to_u64(at), piece)?,
                        Extent::Compressed => {
                            return Err(Error::Unsupported {
                                path: image.path().to_owned(),
                                reason: format!(
                                    "guest offset {:#x} is a compressed cluster, which this backend cannot \
                                     decompress; decompress the image with `qemu-img convert` first",
                                    offset + to_u64(at)
                                ),
                            })
                        }
                    }
                    at += to_usize(len);
                }
            }
        }
        Ok(())
    }

    /// Streams layer `into + 1` into layer `into` (a qcow2 image): every cluster of `into` that
    /// it does not map in full but `into + 1` maps something of is written with the contents
    /// `into` shows. Afterwards `into` shows the same through any backing that shows what
    /// `into + 1`'s own backing shows; at every point in between it shows the same as before.
    pub(crate) fn stream(&mut self, into: usize) -> Result<()> {
        let candidates = self.layers[into + 1].mapped_ranges()?;
        self.copy(into, into, &candidates, |chain, offset, len| {
            Ok(!chain.layers[into].maps(offset, len, true)?
                && chain.layers[into + 1].maps(offset, len, false)?)
        })
    }

    /// Commits layer `into - 1` into layer `into` (a qcow2 image): every cluster of `into` that
    /// `into - 1` maps something of is written with the contents `into - 1` shows. Afterwards
    /// `into` shows what `into - 1` showed; `into - 1` shows the same at every point.
    pub(crate) fn commit(&mut self, into: usize) -> Result<()> {
        let candidates = self.layers[into - 1].mapped_ranges()?;
        self.copy(into, into - 1, &candidates, |chain, offset, len| {
            chain.layers[into - 1].maps(offset, len, false)
        })
    }

    /// Writes each cluster of the qcow2 image `into` that overlaps `candidates` (guest byte
    /// ranges, in order) and that `wanted` selects with the contents of layer `view`, in
    /// batches. Only the candidates are visited: the work follows the allocated data, not the
    /// virtual size.
    fn copy(
        &mut self,
        into: usize,
        view: usize,
        candidates: &[(u64, u64)],
        wanted: impl Fn(&Self, u64, u64) -> Result<bool>,
    ) -> Result<()> {
        let Some(Layer::Qcow2(image)) = self.layers.get(into) else {
            return Err(Error::InvalidArgument {
                what: "merge target",
                value: format!("layer {into}"),
                reason: "only qcow2 images can be written".into(),
            });
        };
        let cluster_size = image.cluster_size();
        let clusters = image.header().size.div_ceil(cluster_size);
        let mut buf = vec![0u8; to_usize(cluster_size)];
        let mut staged = Vec::with_capacity(BATCH);
        let mut next = 0u64;
        let selected = candidates.iter().flat_map(|&(start, len)| {
            let first = start / cluster_size;
            let end = (start + len).div_ceil(cluster_size).min(clusters);
            first..end
        });
        for cluster in selected {
            // Ranges of images with larger clusters may round to the same cluster here.
            if cluster < next {
                continue;
            }
            next = cluster + 1;
            let offset = cluster * cluster_size;
            if !wanted(self, offset, cluster_size)? {
                continue;
            }
            self.read(view, offset, &mut buf)?;
            let image = self.image_mut(into).expect("checked to be qcow2");
            staged.push(image.stage_cluster(cluster, &buf)?);
            if staged.len() == BATCH {
                image.commit_staged(&staged)?;
                staged.clear();
            }
        }
        self.image_mut(into)
            .expect("checked to be qcow2")
            .commit_staged(&staged)
    }
}
