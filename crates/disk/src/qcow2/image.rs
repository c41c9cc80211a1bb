//! An open qcow2 image: reading metadata, the in-memory refcounts and writing them back in a
//! crash-safe order.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use super::{
    header::{be_u64, offsets, Header, HeaderError},
    refcount::{RefcountError, Refcounts},
    snapshot_table::{self, SnapshotEntry, TableError},
};
use crate::num::{to_u64, to_usize, u32_to_usize};
use crate::{
    error::{io_err, Error, Result},
    lock, regular,
};

/// QEMU's largest refcount table (`QCOW_MAX_REFTABLE_SIZE`); a table is never grown past it.
pub const MAX_REFCOUNT_TABLE: u64 = 8 << 20;

/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one": the cluster may be written in place.
pub const COPIED: u64 = 1 << 63;
/// L2 entry describes a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;

/// How an image is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reading metadata only.
    Read,
    /// Reading the header only, even of an image a QEMU holds: the header's backing name
    /// changes only through block jobs, which the caller drives (the snapshot table and
    /// refcounts may change under QEMU and are not read).
    Header,
    /// Editing metadata: the image is locked against QEMU and its refcounts are loaded.
    Write,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    header: Header,
    /// Loaded for [`Access::Write`].
    refcounts: Option<Refcounts>,
    /// The refcount table as in memory (capacity entries); compared with `table_on_disk` to find
    /// entries to write.
    pub(super) table: Vec<u64>,
    table_on_disk: Vec<u64>,
    /// The file's length: no metadata is read, and no cluster referenced, past it.
    file_len: u64,
}

impl Image {
    /// Opens and validates an image. [`Access::Write`] takes QEMU's lock bytes exclusively
    /// (failing with [`Error::Locked`] if QEMU or qemu-img has the image open), refuses images
    /// it cannot edit safely, and loads the refcounts. [`Access::Read`] also refuses a locked
    /// image: its metadata may change under us.
    pub fn open(path: &Path, access: Access) -> Result<Self> {
        let file = regular::open(path, access == Access::Write)?;
        let free = match access {
            Access::Write => lock::try_lock_exclusive(&file),
            Access::Read => lock::is_locked_by_other(&file).map(|locked| !locked),
            Access::Header => Ok(true),
        }
        .map_err(io_err("cannot query the locks of", path))?;
        if !free {
            return Err(Error::Locked {
                path: path.to_owned(),
            });
        }
        let mut start = [0u8; 24];
        let got = read_up_to(&file, 0, &mut start).map_err(io_err("cannot read the header of", path))?;
        let cluster_bits = if got == 24 {
            u32::from_be_bytes(start[20..24].try_into().expect("4 bytes"))
        } else {
            9
        };
        // An absurd cluster_bits is reported by the parser; read a bounded amount meanwhile.
        let mut cluster0 = vec![0u8; 1 << cluster_bits.clamp(9, 21)];
        let got = read_up_to(&file, 0, &mut cluster0).map_err(io_err("cannot read the header of", path))?;
        cluster0.truncate(got);
        let header = Header::parse(&cluster0).map_err(|e| header_error(path, e))?;
        match access {
            Access::Read => header.check_supported(),
            Access::Header => Ok(()),
            Access::Write => header.check_writable(),
        }
        .map_err(|e| header_error(path, e))?;
        let file_len = file.metadata().map_err(io_err("cannot stat", path))?.len();
        let mut image = Image {
            path: path.to_owned(),
            file,
            header,
            refcounts: None,
            table: Vec::new(),
            table_on_disk: Vec::new(),
            file_len,
        };
        if access == Access::Write {
            image.load_refcounts()?;
            image.refuse_inconsistent()?;
            image.clear_autoclear()?;
        }
        Ok(image)
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    pub(crate) fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::Invalid {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The file's length when opened (or last extended).
    pub(crate) fn file_len(&self) -> u64 {
        self.file_len
    }

    pub(crate) fn read_at(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        // Checked before allocating: a hostile length never costs more memory than the file.
        if offset
            .checked_add(to_u64(len))
            .is_none_or(|end| end > self.file_len)
        {
            return Err(self.invalid(format!(
                "{what} at {offset:#x} ({len} bytes) lies beyond the end of the file ({} bytes)",
                self.file_len
            )));
        }
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.invalid(format!(
                    "{what} at {offset:#x} ({len} bytes) lies beyond the end of the file"
                ))
            } else {
                Error::Io {
                    action: "cannot read",
                    path: self.path.clone(),
                    source: e,
                }
            }
        })?;
        Ok(buf)
    }

    pub(crate) fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(io_err("cannot write to", &self.path))
    }

    /// Makes everything written so far durable; the ordering points of every operation.
    pub(crate) fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io_err("cannot sync", &self.path))
    }

    /// The internal snapshot table and its length in bytes (padded, as stored).
    pub fn snapshots(&self) -> Result<(Vec<SnapshotEntry>, u64)> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok((Vec::new(), 0));
        }
        // The table's length is only known once parsed: read more until it fits.
        let available = to_usize(self.file_len.saturating_sub(self.header.snapshots_offset));
        let mut want = (64 << 10).min(available);
        loop {
            let mut buf = vec![0u8; want];
            let got = read_up_to(&self.file, self.header.snapshots_offset, &mut buf)
                .map_err(io_err("cannot read the snapshot table of", &self.path))?;
            buf.truncate(got);
            match snapshot_table::parse(&buf, count, self.cluster_size()) {
                Ok(parsed) => return Ok(parsed),
                Err(TableError::Truncated { .. })
                    if got == want && want < snapshot_table::MAX_TABLE_LEN && want < available =>
                {
                    want = (want * 4).min(available);
                }
                Err(e) => return Err(self.invalid(e.to_string())),
            }
        }
    }

    /// Reads an L1 table of `entries` entries.
    pub(crate) fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = self.read_at(offset, u32_to_usize(entries) * 8, "L1 table")?;
        Ok(bytes.chunks_exact(8).map(|e| be_u64(e, 0)).collect())
    }

    /// Every cluster an L1 table reaches, once per reference: its L2 tables and the data
    /// clusters they map (all clusters a compressed cluster spans). This is what a refcount
    /// counts: a cluster reached from two L1 tables through one shared L2 table counts twice.
    pub(crate) fn references(&self, l1: &[u64]) -> Result<Vec<u64>> {
        let mut refs = Vec::new();
        for l2_offset in self.l2_tables(l1)? {
            refs.push(l2_offset >> self.header.cluster_bits);
            refs.extend(self.l2_references(l2_offset)?);
        }
        Ok(refs)
    }

    /// The L2 tables an L1 table names, checked: aligned, and each named once.
    pub(crate) fn l2_tables(&self, l1: &[u64]) -> Result<Vec<u64>> {
        let cluster_size = self.cluster_size();
        // One L1 table reaching one L2 table twice is corruption (`qemu-img check` counts the
        // table twice against its refcount); refusing it also bounds the work by the file's
        // size, since the distinct L2 tables fit in the file.
        let mut seen: HashMap<u64, usize> = HashMap::new();
        let mut tables = Vec::new();
        for (index, &entry) in l1.iter().enumerate() {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if l2_offset % cluster_size != 0 {
                return Err(self.invalid(format!(
                    "L1 entry {index}: L2 table offset {l2_offset:#x} is not aligned"
                )));
            }
            if let Some(first) = seen.insert(l2_offset, index) {
                return Err(self.invalid(format!(
                    "L1 entries {first} and {index} share the L2 table at {l2_offset:#x} \
                     (corrupt image; run `qemu-img check`)"
                )));
            }
            tables.push(l2_offset);
        }
        Ok(tables)
    }

    /// The data clusters the L2 table at `l2_offset` maps, once per entry.
    pub(crate) fn l2_references(&self, l2_offset: u64) -> Result<Vec<u64>> {
        let mut refs = Vec::new();
        let l2 = self.read_at(l2_offset, to_usize(self.cluster_size()), "L2 table")?;
        for (slot, raw) in l2.chunks_exact(to_usize(self.header.l2_entry_size())).enumerate() {
            let clusters = data_clusters(&self.header, be_u64(raw, 0))
                .and_then(|c| self.within_file(c))
                .map_err(|reason| {
                    self.invalid(format!("L2 table at {l2_offset:#x}, entry {slot}: {reason}"))
                })?;
            if let Some((first, count)) = clusters {
                refs.extend(first..first + count);
            }
        }
        Ok(refs)
    }

    /// Refuses clusters that start at or past the end of the file (QEMU's check refuses a
    /// reference that exceeds the file by a cluster or more).
    pub(crate) fn within_file(
        &self,
        clusters: Option<(u64, u64)>,
    ) -> std::result::Result<Option<(u64, u64)>, String> {
        match clusters {
            Some((first, count)) if (first + count - 1) << self.header.cluster_bits >= self.file_len => {
                Err(format!(
                    "cluster at {:#x} lies beyond the end of the file ({} bytes)",
                    (first + count - 1) << self.header.cluster_bits,
                    self.file_len
                ))
            }
            other => Ok(other),
        }
    }

    fn load_refcounts(&mut self) -> Result<()> {
        let (refcounts, table) = self.read_refcounts()?;
        self.table_on_disk = table.clone();
        self.table = table;
        self.refcounts = Some(refcounts);
        Ok(())
    }

    /// The refcounts and the refcount table as stored.
    pub(crate) fn read_refcounts(&self) -> Result<(Refcounts, Vec<u64>)> {
        let cluster_size = self.cluster_size();
        let entries = u64::from(self.header.refcount_table_clusters) * cluster_size / 8;
        let raw = self.read_at(
            self.header.refcount_table_offset,
            to_usize(entries * 8),
            "refcount table",
        )?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|e| be_u64(e, 0)).collect();
        let mut refcounts = Refcounts::new(self.header.cluster_bits, self.header.refcount_order);
        // Each block is held in memory once: distinct blocks inside the file bound the memory
        // by the file's size. Two entries sharing a block are corruption.
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for (index, &offset) in table.iter().enumerate() {
            if offset == 0 {
                continue;
            }
            if offset % cluster_size != 0 {
                return Err(self.invalid(format!(
                    "refcount table entry {index}: block offset {offset:#x} not aligned"
                )));
            }
            if let Some(first) = seen.insert(offset, index) {
                return Err(self.invalid(format!(
                    "refcount table entries {first} and {index} both point at the refcount block at \
                     {offset:#x} (corrupt image; run `qemu-img check`)"
                )));
            }
            let block = self.read_at(offset, to_usize(cluster_size), "refcount block")?;
            refcounts.load_block(to_u64(index), &block);
        }
        refcounts.take_dirty();
        Ok((refcounts, table))
    }

    /// Autoclear bits this crate does not maintain must be cleared before the image changes
    /// (the bitmaps bit never reaches here: such images are refused).
    fn clear_autoclear(&mut self) -> Result<()> {
        if self.header.version < 3 || self.header.autoclear_features == 0 {
            return Ok(());
        }
        self.write_at(offsets::AUTOCLEAR, &0u64.to_be_bytes())?;
        self.sync()?;
        self.header.autoclear_features = 0;
        Ok(())
    }

    pub(crate) fn refcounts(&self) -> &Refcounts {
        self.refcounts
            .as_ref()
            .expect("refcounts are loaded for images opened for writing")
    }

    fn refcounts_mut(&mut self) -> &mut Refcounts {
        self.refcounts
            .as_mut()
            .expect("refcounts are loaded for images opened for writing")
    }

    fn refcount_error(&self, e: RefcountError) -> Error {
        let cluster_size = self.cluster_size();
        match e {
            RefcountError::Overflow { cluster, max } => Error::RefcountOverflow {
                path: self.path.clone(),
                offset: cluster * cluster_size,
                max,
            },
            RefcountError::Underflow { cluster } => self.invalid(format!(
                "refcount of cluster {:#x} is lower than its references (run `qemu-img check -r all`)",
                cluster * cluster_size
            )),
        }
    }

    /// Adds `delta` to the count of every cluster in `clusters` (in memory).
    pub(crate) fn add_refs(&mut self, clusters: &[u64], delta: i64) -> Result<()> {
        let refcounts = self.refcounts_mut();
        let result = clusters.iter().try_for_each(|&c| refcounts.add(c, delta));
        result.map_err(|e| self.refcount_error(e))
    }

    /// Checks (on a copy) that `clusters` can each lose `delta` references, so that a later
    /// step cannot fail after earlier ones were written.
    pub(crate) fn check_refs(&self, clusters: &[u64], delta: i64) -> Result<()> {
        let mut trial = self.refcounts().clone();
        clusters
            .iter()
            .try_for_each(|&c| trial.add(c, delta))
            .map_err(|e| self.refcount_error(e))
    }

    /// Allocates clusters for `len` bytes (in memory); 0 for an empty range.
    pub(crate) fn allocate(&mut self, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        let clusters = len.div_ceil(self.cluster_size());
        let first = self.refcounts_mut().allocate(clusters);
        first << self.header.cluster_bits
    }

    /// The clusters of a byte range.
    pub(crate) fn clusters_of(&self, offset: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        let bits = self.header.cluster_bits;
        // Saturating: callers pass ranges already checked to lie inside the file.
        ((offset >> bits)..=(offset.saturating_add(len - 1) >> bits)).collect()
    }

    /// Writes the changed refcounts.
    ///
    /// Changed blocks without a home get one (and the refcount table grows into new clusters
    /// when it is full); the blocks are written and synced before the table entries or the new
    /// table that point at them, so a crash never exposes an unwritten block. A batch holds
    /// either only increments (before the metadata that uses the clusters is written) or only
    /// decrements (after that metadata stopped referring to them), which is what makes every
    /// intermediate state at worst leak clusters.
    pub(crate) fn flush_refcounts(&mut self) -> Result<()> {
        let old_table = self.home_dirty_refcount_blocks()?;
        self.extend_file()?;
        self.write_dirty_blocks()?;
        match old_table {
            Some((offset, clusters)) => self.switch_refcount_table(offset, clusters),
            None => self.write_changed_table_entries(),
        }
    }

    /// Gives every changed refcount block in use a home in the refcount table, growing the table
    /// (in memory) when a block lies past its end. After a growth it returns the table the file
    /// still points at, as (offset, clusters), for the caller to replace once the new one is
    /// written.
    fn home_dirty_refcount_blocks(&mut self) -> Result<Option<(u64, u32)>> {
        let mut old_table = None;
        loop {
            let refcounts = self.refcounts.as_ref().expect("loaded");
            let needed = refcounts
                .dirty()
                .iter()
                .copied()
                .filter(|&b| refcounts.block_in_use(b))
                .max();
            if let Some(highest) = needed.filter(|&h| h >= to_u64(self.table.len())) {
                self.grow_refcount_table(highest, &mut old_table)?;
                continue;
            }
            let refcounts = self.refcounts.as_mut().expect("loaded");
            let homeless: Vec<u64> = refcounts
                .dirty()
                .iter()
                .copied()
                .filter(|&b| self.table[to_usize(b)] == 0 && refcounts.block_in_use(b))
                .collect();
            if homeless.is_empty() {
                return Ok(old_table);
            }
            for block in homeless {
                self.table[to_usize(block)] = refcounts.allocate(1) << self.header.cluster_bits;
            }
        }
    }

    /// Allocates a refcount table that can address block `highest`, in memory only. The first
    /// growth records the table on disk in `old_table`; a later one drops the previous growth's
    /// table, which was never written.
    fn grow_refcount_table(&mut self, highest: u64, old_table: &mut Option<(u64, u32)>) -> Result<()> {
        let cluster_size = self.cluster_size();
        let capacity = to_u64(self.table.len());
        let refcounts = self.refcounts.as_mut().expect("loaded");
        // Grow with headroom so that the table's own clusters rarely force another growth.
        let needed_bytes = (highest + 1) * 8;
        if needed_bytes > MAX_REFCOUNT_TABLE {
            return Err(self.invalid(format!(
                "the refcount table would need {needed_bytes} bytes, more than QEMU's \
                 {MAX_REFCOUNT_TABLE}-byte limit"
            )));
        }
        let entries = ((highest + 1).max(capacity) * 2).min(MAX_REFCOUNT_TABLE / 8);
        let clusters = (entries * 8).div_ceil(cluster_size);
        let first = refcounts.allocate(clusters);
        match old_table {
            // A table allocated by an earlier growth was never written: drop it.
            Some(_) => {
                let previous = self.header.refcount_table_offset >> self.header.cluster_bits;
                for c in previous..previous + u64::from(self.header.refcount_table_clusters) {
                    refcounts
                        .add(c, -1)
                        .expect("a table allocated by an earlier growth counts one");
                }
            }
            None => {
                *old_table = Some((
                    self.header.refcount_table_offset,
                    self.header.refcount_table_clusters,
                ))
            }
        }
        self.header.refcount_table_offset = first << self.header.cluster_bits;
        self.header.refcount_table_clusters = u32::try_from(clusters)
            .map_err(|_| self.invalid("the refcount table would outgrow its 32-bit cluster count"))?;
        self.table.resize(to_usize(clusters * cluster_size / 8), 0);
        Ok(())
    }

    /// Writes the grown refcount table whole, points the header at it, then frees the old table
    /// (at `offset`, `clusters` long), each step synced before the next.
    fn switch_refcount_table(&mut self, offset: u64, clusters: u32) -> Result<()> {
        let bytes: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_at(self.header.refcount_table_offset, &bytes)?;
        self.sync()?;
        let mut switch = self.header.refcount_table_offset.to_be_bytes().to_vec();
        switch.extend_from_slice(&self.header.refcount_table_clusters.to_be_bytes());
        self.write_at(offsets::REFCOUNT_TABLE, &switch)?;
        self.sync()?;
        self.table_on_disk = self.table.clone();
        // Nothing points at the old table any more.
        let old = self.clusters_of(offset, u64::from(clusters) * self.cluster_size());
        self.add_refs(&old, -1)?;
        self.write_dirty_blocks()
    }

    /// Writes the refcount table entries that changed in place, then syncs.
    fn write_changed_table_entries(&mut self) -> Result<()> {
        let mut wrote = false;
        for index in 0..self.table.len() {
            if self.table[index] != self.table_on_disk[index] {
                let at = self.header.refcount_table_offset + to_u64(index) * 8;
                self.write_at(at, &self.table[index].to_be_bytes())?;
                wrote = true;
            }
        }
        if wrote {
            self.sync()?;
            self.table_on_disk = self.table.clone();
        }
        Ok(())
    }

    /// Writes every changed refcount block that has a home, then syncs.
    fn write_dirty_blocks(&mut self) -> Result<()> {
        let cluster_size = to_usize(self.cluster_size());
        let dirty = self.refcounts_mut().take_dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        for block in dirty {
            let home = self.table.get(to_usize(block)).copied().unwrap_or(0);
            if home == 0 {
                // Only all-zero blocks stay homeless, and they mean the same as no block.
                continue;
            }
            let bytes = self.refcounts().encode_block(block, cluster_size);
            self.write_at(home, &bytes)?;
        }
        self.sync()
    }

    /// Makes the file cover every cluster allocated so far, so that reading any of them works.
    /// (Only allocated clusters: a stored refcount past the end of the file never grows it.)
    fn extend_file(&mut self) -> Result<()> {
        let end = self.refcounts().allocated_end() << self.header.cluster_bits;
        if end > self.file_len {
            self.file
                .set_len(end)
                .map_err(io_err("cannot extend", &self.path))?;
            self.file_len = end;
        }
        Ok(())
    }

    /// Writes `fields` at header offset `at` (one small write: the atomic switch of an
    /// operation), then syncs.
    pub(crate) fn switch_header(&mut self, at: u64, fields: &[u8]) -> Result<()> {
        self.write_at(at, fields)?;
        self.sync()
    }

    pub(crate) fn header_mut(&mut self) -> &mut Header {
        &mut self.header
    }

    /// Sets or clears the COPIED flag of every active L1 and L2 entry so that it is set exactly
    /// when the cluster's refcount is one, as QEMU requires before writing in place. Changed
    /// tables are rewritten (not synced).
    pub(crate) fn sync_copied_flags(&mut self) -> Result<()> {
        let cluster_bits = self.header.cluster_bits;
        let cluster_size = self.cluster_size();
        let entry_size = to_usize(self.header.l2_entry_size());
        let mut l1 = self.read_l1(self.header.l1_table_offset, self.header.l1_size)?;
        let mut l1_changed = false;
        for entry in l1.iter_mut() {
            let l2_offset = *entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            l1_changed |= set_copied(entry, self.refcounts().get(l2_offset >> cluster_bits) == 1);
            let mut l2 = self.read_at(l2_offset, to_usize(cluster_size), "L2 table")?;
            let mut l2_changed = false;
            for raw in l2.chunks_exact_mut(entry_size) {
                let mut e = be_u64(raw, 0);
                let offset = e & OFFSET_MASK;
                if e & COMPRESSED != 0 || offset == 0 {
                    continue;
                }
                if set_copied(&mut e, self.refcounts().get(offset >> cluster_bits) == 1) {
                    raw[..8].copy_from_slice(&e.to_be_bytes());
                    l2_changed = true;
                }
            }
            if l2_changed {
                self.write_at(l2_offset, &l2)?;
            }
        }
        if l1_changed {
            let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_at(self.header.l1_table_offset, &bytes)?;
        }
        Ok(())
    }
}

fn set_copied(entry: &mut u64, copied: bool) -> bool {
    let new = if copied { *entry | COPIED } else { *entry & !COPIED };
    let changed = new != *entry;
    *entry = new;
    changed
}

/// The host clusters an L2 entry refers to: `(first cluster, count)`, `None` if unallocated.
pub(crate) fn data_clusters(header: &Header, entry: u64) -> Result<Option<(u64, u64)>, String> {
    let bits = header.cluster_bits;
    if entry & COMPRESSED != 0 {
        // Compressed: the offset has 62 - (cluster_bits - 8) bits, then the number of extra
        // 512-byte sectors; the data may straddle clusters and each one is counted.
        let offset_bits = 62 - (bits - 8);
        let offset = entry & ((1u64 << offset_bits) - 1);
        let sectors = ((entry >> offset_bits) & ((1u64 << (bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        let first = offset >> bits;
        return Ok(Some((first, ((offset + len - 1) >> bits) - first + 1)));
    }
    let offset = entry & OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if offset % header.cluster_size() != 0 {
        return Err(format!("data cluster offset {offset:#x} is not aligned"));
    }
    Ok(Some((offset >> bits, 1)))
}

fn header_error(path: &Path, e: HeaderError) -> Error {
    match e {
        HeaderError::Invalid(reason) => Error::Invalid {
            path: path.to_owned(),
            reason,
        },
        HeaderError::Unsupported(reason) => Error::Unsupported {
            path: path.to_owned(),
            reason,
        },
    }
}

/// Reads as much as is there (a short file is not an error here).
pub(super) fn read_up_to(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + to_u64(got)) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
