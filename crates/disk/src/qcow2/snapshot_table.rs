//! The internal snapshot table: parsing and encoding, without I/O.

use super::header::{be_u16, be_u32, be_u64};
use crate::num::{to_u64, u32_to_usize};

/// Fixed part of a table entry.
const ENTRY_HEADER_LEN: usize = 40;
/// Extra data this crate writes: large VM state size, disk size, icount.
const EXTRA_LEN: usize = 24;
/// QEMU refuses larger extra data.
const MAX_EXTRA_LEN: usize = 1024;
/// QEMU refuses larger snapshot tables.
pub const MAX_TABLE_LEN: usize = 64 << 20;

/// One internal snapshot as stored in the table. Names and ids are kept as raw bytes so that
/// rewriting the table preserves entries other tools wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id (decimal string by convention).
    pub id: Vec<u8>,
    /// Name.
    pub name: Vec<u8>,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Bytes of VM state saved with the snapshot.
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (from extra data; older entries lack it).
    pub disk_size: Option<u64>,
    /// Instruction count (`u64::MAX`: not recorded).
    pub icount: u64,
    /// Extra data beyond the fields above, written by a newer tool; preserved.
    pub extra_rest: Vec<u8>,
}

/// Why the table could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// The buffer ended inside entry `index`; more bytes are needed (when reading from a file).
    Truncated {
        /// The entry being read.
        index: u32,
    },
    /// Entry `index` is malformed.
    Invalid {
        /// The entry.
        index: u32,
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::Truncated { index } => write!(f, "snapshot table ends inside entry {index}"),
            TableError::Invalid { index, reason } => write!(f, "snapshot table entry {index}: {reason}"),
        }
    }
}

/// Parses `count` entries from `buf`, returning them and the table's length in bytes (padded,
/// as stored). Pure; never panics. `cluster_size` checks L1 alignment.
pub fn parse(buf: &[u8], count: u32, cluster_size: u64) -> Result<(Vec<SnapshotEntry>, u64), TableError> {
    let mut entries = Vec::with_capacity(u32_to_usize(count.min(1024)));
    let mut at = 0usize;
    for index in 0..count {
        let need = |end: usize| {
            if end > buf.len() {
                Err(TableError::Truncated { index })
            } else {
                Ok(())
            }
        };
        let invalid = |reason: String| TableError::Invalid { index, reason };
        need(at + ENTRY_HEADER_LEN)?;
        let e = &buf[at..];
        let l1_table_offset = be_u64(e, 0);
        let l1_size = be_u32(e, 8);
        let id_len = usize::from(be_u16(e, 12));
        let name_len = usize::from(be_u16(e, 14));
        let date_sec = be_u32(e, 16);
        let date_nsec = be_u32(e, 20);
        let vm_clock_nsec = be_u64(e, 24);
        let vm_state_size32 = be_u32(e, 32);
        let extra_len = u32_to_usize(be_u32(e, 36));
        if extra_len > MAX_EXTRA_LEN {
            return Err(invalid(format!(
                "{extra_len} bytes of extra data (QEMU allows {MAX_EXTRA_LEN})"
            )));
        }
        if l1_table_offset % cluster_size != 0 {
            return Err(invalid(format!(
                "L1 table offset {l1_table_offset:#x} is not cluster aligned"
            )));
        }
        if u64::from(l1_size) * 8 > 32 << 20 {
            return Err(invalid(format!("l1_size {l1_size} is too large")));
        }
        if l1_size > 0 && l1_table_offset == 0 {
            return Err(invalid("L1 table offset is 0".into()));
        }
        let end = at + ENTRY_HEADER_LEN + extra_len + id_len + name_len;
        need(end)?;
        if end > MAX_TABLE_LEN {
            return Err(invalid(format!("the table exceeds {MAX_TABLE_LEN} bytes")));
        }
        let extra = &e[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + extra_len];
        let field = |offset: usize| (extra.len() >= offset + 8).then(|| be_u64(extra, offset));
        let id_at = ENTRY_HEADER_LEN + extra_len;
        let name_at = id_at + id_len;
        if id_len == 0 {
            return Err(invalid("empty id".into()));
        }
        entries.push(SnapshotEntry {
            l1_table_offset,
            l1_size,
            id: e[id_at..name_at].to_vec(),
            name: e[name_at..name_at + name_len].to_vec(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size: field(0).unwrap_or(u64::from(vm_state_size32)),
            disk_size: field(8),
            icount: field(16).unwrap_or(u64::MAX),
            extra_rest: extra.get(EXTRA_LEN..).unwrap_or_default().to_vec(),
        });
        at = end.next_multiple_of(8);
    }
    Ok((entries, to_u64(at)))
}

/// Encodes a table. Entries written by this crate always carry the 24 bytes of extra data
/// QEMU writes (version 3 requires the disk size in it).
#[allow(
    clippy::cast_possible_truncation,
    reason = "ids, names and extra data were read with 16- and 32-bit lengths or are checked names (at \
              most 128 bytes); vm_state_size is truncated on purpose (see below)"
)]
pub fn encode(entries: &[SnapshotEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&e.l1_size.to_be_bytes());
        out.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&e.date_sec.to_be_bytes());
        out.extend_from_slice(&e.date_nsec.to_be_bytes());
        out.extend_from_slice(&e.vm_clock_nsec.to_be_bytes());
        // The 32-bit field keeps the low bits, as QEMU writes it; the extra data has all 64.
        out.extend_from_slice(&(e.vm_state_size as u32).to_be_bytes());
        out.extend_from_slice(&((EXTRA_LEN + e.extra_rest.len()) as u32).to_be_bytes());
        out.extend_from_slice(&e.vm_state_size.to_be_bytes());
        out.extend_from_slice(&e.disk_size.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&e.icount.to_be_bytes());
        out.extend_from_slice(&e.extra_rest);
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 3,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 7,
            vm_state_size: 1 << 33,
            disk_size: Some(1 << 30),
            icount: u64::MAX,
            extra_rest: vec![9; 8],
        }
    }

    #[test]
    fn round_trips() {
        let entries = vec![entry("1", "first"), entry("2", "a-much-longer-name")];
        let bytes = encode(&entries);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse(&bytes, 2, 0x10000).unwrap(), (entries, bytes.len() as u64));
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let bytes = encode(&[entry("1", "first")]);
        for len in 0..bytes.len() - 1 {
            // Padding may be cut without loss; anything shorter is truncated.
            let result = parse(&bytes[..len], 1, 0x10000);
            assert!(len >= bytes.len() - 7 || matches!(result, Err(TableError::Truncated { index: 0 })));
        }
        let mut bad = bytes.clone();
        bad[7] = 1; // misaligned L1 offset
        assert!(matches!(parse(&bad, 1, 0x10000), Err(TableError::Invalid { .. })));
        assert!(matches!(
            parse(&bytes, 2, 0x10000),
            Err(TableError::Truncated { index: 1 })
        ));
    }
}
