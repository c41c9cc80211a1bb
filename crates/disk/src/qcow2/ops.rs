//! Internal snapshot operations on an [`Image`] opened for writing, and a from-scratch
//! refcount check used as the reference for them.
//!
//! Every operation first does all its refcount arithmetic in memory (so that an overflow or an
//! inconsistent image is reported before anything is written), then writes in this order:
//! increments, the new structures, one small header write that switches to them, decrements,
//! COPIED flags. A crash at any point leaves at most leaked clusters. See
//! `docs/qcow2-snapshots.md`.

use std::collections::BTreeMap;

use super::{
    header::offsets,
    image::{Image, COPIED, OFFSET_MASK},
    refcount::Refcounts,
    snapshot_table::{self, SnapshotEntry},
};
use crate::error::{Error, Result};
use crate::num::{to_u64, u32_to_usize};

impl Image {
    /// Creates an internal snapshot of the active state named `name`, timestamped `date`
    /// (seconds, nanoseconds). Returns the new table entry.
    pub fn create_snapshot(&mut self, name: &str, date: (u32, u32)) -> Result<SnapshotEntry> {
        let (mut entries, old_len) = self.snapshots()?;
        if entries.iter().any(|e| e.name == name.as_bytes()) {
            return Err(Error::SnapshotExists {
                path: self.path().to_owned(),
                name: name.into(),
            });
        }
        let id = entries
            .iter()
            .filter_map(|e| std::str::from_utf8(&e.id).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let header = self.header().clone();
        let l1 = self.read_l1(header.l1_table_offset, header.l1_size)?;

        // In memory: the snapshot's references, its L1 copy and the new table.
        let refs = self.references(&l1)?;
        self.add_refs(&refs, 1)?;
        let l1_offset = self.allocate(to_u64(l1.len()) * 8);
        let entry = SnapshotEntry {
            l1_table_offset: l1_offset,
            l1_size: header.l1_size,
            id: id.to_string().into_bytes(),
            name: name.as_bytes().to_vec(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(header.size),
            icount: u64::MAX,
            extra_rest: Vec::new(),
        };
        entries.push(entry.clone());
        let table = snapshot_table::encode(&entries);
        if table.len() > snapshot_table::MAX_TABLE_LEN {
            return Err(Error::InvalidArgument {
                what: "snapshot name",
                value: name.into(),
                reason: "the snapshot table would exceed QEMU's 64 MiB limit".into(),
            });
        }
        let table_offset = self.allocate(to_u64(table.len()));

        // 1. Increments. 2. The copy and the table (unreferenced yet), COPIED cleared on the
        // active tables now that their clusters are shared. 3. Switch. 4. Free the old table.
        self.flush_refcounts()?;
        let copy: Vec<u8> = l1.iter().flat_map(|e| (e & !COPIED).to_be_bytes()).collect();
        self.write_at(l1_offset, &copy)?;
        self.write_at(table_offset, &table)?;
        self.sync_copied_flags()?;
        self.sync()?;
        let old_offset = header.snapshots_offset;
        self.switch_snapshot_table(entries.len(), table_offset)?;
        let old = self.clusters_of(old_offset, old_len);
        self.add_refs(&old, -1)?;
        self.flush_refcounts()?;
        Ok(entry)
    }

    /// Deletes the internal snapshot named `name`.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        let (mut entries, old_len) = self.snapshots()?;
        let index = self.find(&entries, name)?;
        let gone = entries.remove(index);
        let l1 = self.read_l1(gone.l1_table_offset, gone.l1_size)?;
        let mut released = self.references(&l1)?;
        released.extend(self.clusters_of(gone.l1_table_offset, u64::from(gone.l1_size) * 8));
        released.extend(self.clusters_of(self.header().snapshots_offset, old_len));
        self.check_refs(&released, -1)?;

        let table = snapshot_table::encode(&entries);
        let table_offset = self.allocate(to_u64(table.len()));
        self.flush_refcounts()?;
        self.write_at(table_offset, &table)?;
        self.sync()?;
        self.switch_snapshot_table(entries.len(), table_offset)?;
        // The snapshot is gone from the table: its clusters can be released.
        self.add_refs(&released, -1)?;
        self.flush_refcounts()?;
        self.sync_copied_flags()?;
        self.sync()
    }

    /// Makes the internal snapshot named `name` the active state (the current active state is
    /// discarded).
    pub fn apply_snapshot(&mut self, name: &str) -> Result<()> {
        let (entries, _) = self.snapshots()?;
        let snapshot = entries[self.find(&entries, name)?].clone();
        let header = self.header().clone();
        if let Some(size) = snapshot.disk_size.filter(|&size| size != header.size) {
            return Err(Error::NotSupported {
                operation: "applying a snapshot of another disk size",
                backend: "offline",
                reason: format!(
                    "the snapshot has {size} bytes, the image {} bytes; resize it first",
                    header.size
                ),
            });
        }
        let new_l1 = self.read_l1(snapshot.l1_table_offset, snapshot.l1_size)?;
        let old_l1 = self.read_l1(header.l1_table_offset, header.l1_size)?;
        let mut released = self.references(&old_l1)?;
        released.extend(self.clusters_of(header.l1_table_offset, u64::from(header.l1_size) * 8));
        // A reference both tables hold keeps its count: leaving it alone saves writes and lets
        // narrow refcounts (refcount_bits=2) apply a snapshot that is fully shared.
        let (gained, released) = cancel_common(self.references(&new_l1)?, released);

        // The active L1 keeps covering the whole disk even if the snapshot's is shorter.
        let l1_size = snapshot.l1_size.max(header.l1_size);
        self.add_refs(&gained, 1)?;
        let l1_offset = self.allocate(u64::from(l1_size) * 8);
        self.check_refs(&released, -1)?;

        self.flush_refcounts()?;
        let mut bytes: Vec<u8> = new_l1.iter().flat_map(|e| (e & !COPIED).to_be_bytes()).collect();
        bytes.resize(u32_to_usize(l1_size) * 8, 0);
        self.write_at(l1_offset, &bytes)?;
        self.sync()?;
        let mut switch = l1_size.to_be_bytes().to_vec();
        switch.extend_from_slice(&l1_offset.to_be_bytes());
        self.switch_header(offsets::L1, &switch)?;
        let h = self.header_mut();
        h.l1_size = l1_size;
        h.l1_table_offset = l1_offset;
        self.add_refs(&released, -1)?;
        self.flush_refcounts()?;
        self.sync_copied_flags()?;
        self.sync()
    }

    fn find(&self, entries: &[SnapshotEntry], name: &str) -> Result<usize> {
        entries
            .iter()
            .position(|e| e.name == name.as_bytes())
            .ok_or_else(|| Error::SnapshotNotFound {
                path: self.path().to_owned(),
                name: name.into(),
            })
    }

    /// Points the header at a new snapshot table (count and offset in one write).
    fn switch_snapshot_table(&mut self, count: usize, offset: u64) -> Result<()> {
        let count = u32::try_from(count).map_err(|_| Error::Unsupported {
            path: self.path().to_owned(),
            reason: "more internal snapshots than a qcow2 header can count".into(),
        })?;
        let mut fields = count.to_be_bytes().to_vec();
        fields.extend_from_slice(&offset.to_be_bytes());
        self.switch_header(offsets::SNAPSHOTS, &fields)?;
        let h = self.header_mut();
        h.nb_snapshots = count;
        h.snapshots_offset = offset;
        Ok(())
    }

    /// Recomputes every refcount from the metadata and compares with the stored ones, like
    /// `qemu-img check` (the reference the operations above are tested against, and a cheap
    /// self-check for callers).
    pub fn check(&self) -> Result<CheckReport> {
        let (stored, table) = self.read_refcounts()?;
        self.check_against(&stored, &table)
    }

    /// Refuses to modify an image whose refcounts are lower than its references (a cluster in
    /// use that an allocation could hand out again and overwrite: corruption), or whose stored
    /// refcounts claim clusters far past the end of the file (allocating after them would grow
    /// the file without bound). Leaks and COPIED flags are harmless here: the operations fix
    /// the flags they touch. Run before the first write of every modification.
    pub(crate) fn refuse_inconsistent(&self) -> Result<()> {
        let stored = self.refcounts();
        let report = self.check_against(stored, &self.table)?;
        if let Some(first) = report.errors.first() {
            return Err(self.invalid(format!(
                "refusing to modify an inconsistent image: {} refcount error(s), first: {first}; \
                 run `qemu-img check -r all`",
                report.errors.len()
            )));
        }
        let cluster_size = self.cluster_size();
        let file_clusters = self.file_len().div_ceil(cluster_size);
        // Slack for clusters a crashed writer counted but never wrote (QEMU counts first).
        let slack = file_clusters.max((64 << 20) / cluster_size);
        let end = stored.end();
        if end > file_clusters + slack {
            return Err(self.invalid(format!(
                "refcounts claim clusters up to {:#x}, far past the end of the file ({} bytes); \
                 run `qemu-img check -r leaks`",
                end * cluster_size,
                self.file_len()
            )));
        }
        Ok(())
    }

    /// [`Image::check`] against given refcounts and refcount table.
    pub(crate) fn check_against(&self, stored: &Refcounts, table: &[u64]) -> Result<CheckReport> {
        let cluster_size = self.cluster_size();
        let expected = self.expected_refcounts(table)?;
        let mut report = CheckReport::default();
        let clusters: std::collections::BTreeSet<u64> = expected
            .keys()
            .copied()
            .chain(stored.nonzero().map(|(c, _)| c))
            .collect();
        for c in clusters {
            let want = expected.get(&c).copied().unwrap_or(0);
            let have = stored.get(c);
            if have > want {
                report.leaked_clusters += 1;
            } else if have < want {
                report.errors.push(format!(
                    "cluster {:#x}: refcount {have}, referenced {want} times",
                    c * cluster_size
                ));
            }
        }
        self.check_copied_flags(stored, &mut report)?;
        Ok(report)
    }

    /// How many times each cluster is referenced: by the header, the refcount table and its
    /// blocks (`table`), the encryption header, the snapshot table, and every L1 table, L2 table
    /// and data cluster reached from the active L1 table or a snapshot's.
    fn expected_refcounts(&self, table: &[u64]) -> Result<BTreeMap<u64, u64>> {
        let cluster_size = self.cluster_size();
        let header = self.header();
        let mut expected: BTreeMap<u64, u64> = BTreeMap::new();
        let mut count_times = |clusters: &[u64], times: u64| {
            for &c in clusters {
                *expected.entry(c).or_default() += times;
            }
        };
        count_times(&[0], 1);
        count_times(
            &self.clusters_of(
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters) * cluster_size,
            ),
            1,
        );
        let blocks: Vec<u64> = table
            .iter()
            .filter(|&&e| e != 0)
            .map(|e| e >> header.cluster_bits)
            .collect();
        count_times(&blocks, 1);
        if let Some((offset, len)) = header.encryption_header {
            if offset % cluster_size != 0 || offset.checked_add(len).is_none_or(|end| end > self.file_len()) {
                return Err(self.invalid(format!(
                    "the encryption header ({len} bytes at {offset:#x}) is not aligned or lies beyond \
                     the end of the file ({} bytes)",
                    self.file_len()
                )));
            }
            count_times(&self.clusters_of(offset, len), 1);
        }
        let (entries, table_len) = self.snapshots()?;
        count_times(&self.clusters_of(header.snapshots_offset, table_len), 1);
        // Each distinct L1 table (the active one, the snapshots') is read once and each distinct
        // L2 table parsed once, counted as many times as they are reached: the work stays
        // bounded by the file's size even when many snapshots share tables.
        let mut l1_uses: BTreeMap<(u64, u32), u64> = BTreeMap::new();
        *l1_uses
            .entry((header.l1_table_offset, header.l1_size))
            .or_default() += 1;
        for e in &entries {
            *l1_uses.entry((e.l1_table_offset, e.l1_size)).or_default() += 1;
        }
        let mut l2_uses: BTreeMap<u64, u64> = BTreeMap::new();
        for (&(offset, size), &times) in &l1_uses {
            // Read first: that checks the table lies inside the file.
            let l1 = self.read_l1(offset, size)?;
            count_times(&self.clusters_of(offset, u64::from(size) * 8), times);
            for l2 in self.l2_tables(&l1)? {
                *l2_uses.entry(l2).or_default() += times;
            }
        }
        for (&l2, &times) in &l2_uses {
            count_times(&[l2 >> header.cluster_bits], times);
            count_times(&self.l2_references(l2)?, times);
        }
        Ok(expected)
    }

    /// COPIED must be set exactly on the active L1 entries whose L2 table has refcount one.
    fn check_copied_flags(&self, stored: &Refcounts, report: &mut CheckReport) -> Result<()> {
        let header = self.header();
        let active = self.read_l1(header.l1_table_offset, header.l1_size)?;
        for (index, &entry) in active.iter().enumerate() {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if (entry & COPIED != 0) != (stored.get(l2_offset >> header.cluster_bits) == 1) {
                report.flag_errors.push(format!(
                    "L1 entry {index}: COPIED flag does not match the refcount"
                ));
            }
        }
        Ok(())
    }
}

/// Removes from both lists the references they have in common (as multisets).
fn cancel_common(mut gained: Vec<u64>, mut released: Vec<u64>) -> (Vec<u64>, Vec<u64>) {
    gained.sort_unstable();
    released.sort_unstable();
    let (mut only_gained, mut only_released) = (Vec::new(), Vec::new());
    let (mut g, mut r) = (gained.into_iter().peekable(), released.into_iter().peekable());
    loop {
        match (g.peek(), r.peek()) {
            (Some(a), Some(b)) if a == b => {
                g.next();
                r.next();
            }
            (Some(a), Some(b)) if a < b => only_gained.push(g.next().expect("peeked")),
            (Some(_), Some(_)) => only_released.push(r.next().expect("peeked")),
            (Some(_), None) => only_gained.push(g.next().expect("peeked")),
            (None, Some(_)) => only_released.push(r.next().expect("peeked")),
            (None, None) => return (only_gained, only_released),
        }
    }
}

/// What [`Image::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose refcount is higher than their references (harmless, space only).
    pub leaked_clusters: u64,
    /// Refcounts lower than the references (corruption: a cluster in use may be reused).
    pub errors: Vec<String>,
    /// Active L1 entries whose COPIED flag does not match the refcount (QEMU would write a
    /// shared table in place, or copy an unshared one; the operations fix them).
    pub flag_errors: Vec<String>,
}

impl CheckReport {
    /// Neither leaks nor errors.
    pub fn is_clean(&self) -> bool {
        self.leaked_clusters == 0 && self.errors.is_empty() && self.flag_errors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn common_references_cancel() {
        let (g, r) = super::cancel_common(vec![5, 1, 3, 3, 9], vec![3, 2, 9, 9, 1]);
        assert_eq!((g, r), (vec![3, 5], vec![2, 9]));
    }
}
