//! Fuzzes the qcow2 header, extension and snapshot table parsers: any input must give a value
//! or a clear error, never a panic; a parsed table must survive re-encoding.
#![no_main]

use disk::qcow2::{header::Header, snapshot_table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::parse(data) else { return };
    let _ = header.check_supported();
    let _ = header.check_writable();
    // Treat the bytes after the header area as a snapshot table.
    let table = data.get(header.header_length as usize..).unwrap_or_default();
    let count = header.nb_snapshots.min(4096);
    let Ok((entries, _)) = snapshot_table::parse(table, count, header.cluster_size()) else { return };
    let (again, len) = snapshot_table::parse(&snapshot_table::encode(&entries), count, header.cluster_size())
        .expect("a re-encoded table parses");
    assert_eq!(len % 8, 0);
    for (a, b) in entries.iter().zip(&again) {
        assert_eq!((&a.id, &a.name, a.l1_table_offset, a.vm_state_size), (&b.id, &b.name, b.l1_table_offset, b.vm_state_size));
    }
});
