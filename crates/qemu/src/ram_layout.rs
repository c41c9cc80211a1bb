//! Where the RAM file sits in guest-physical memory, read from QEMU.
//!
//! q35 maps the memory backend through aliases: `ram-below-4g` at GPA 0 and, past 2 GiB of RAM
//! (2.75 GiB threshold), `ram-above-4g` at 4 GiB, split around the PCI hole. The split depends on
//! the machine type and its options, so the toolstack asks QEMU (`info mtree`) instead of assuming it.

use memory::FileRegion;
use qmp::{commands::QueryMemdev, Client};

use crate::{
    command_line::RAM_BACKEND_ID,
    error::{Error, Result},
};

/// The RAM file's regions as QEMU maps them, checked to cover the whole memory backend.
pub async fn ram_layout(qmp: &Client) -> Result<Vec<FileRegion>> {
    let qmp_error = |operation: &'static str| move |source| Error::Qmp { operation, source };
    let mtree = qmp
        .execute_raw(
            "human-monitor-command",
            serde_json::json!({ "command-line": "info mtree" }),
        )
        .await
        .map_err(qmp_error("reading the memory tree"))?;
    let mtree = mtree.as_str().ok_or_else(|| Error::RamLayout {
        reason: format!("`info mtree` returned {mtree}, not text"),
    })?;
    let regions = parse_ram_layout(mtree, RAM_BACKEND_ID)?;
    let memdevs = qmp
        .execute(&QueryMemdev)
        .await
        .map_err(qmp_error("querying memory backends"))?;
    let backend = memdevs
        .iter()
        .find(|m| m.id.as_deref() == Some(RAM_BACKEND_ID))
        .ok_or_else(|| Error::RamLayout {
            reason: format!("no memory backend `{RAM_BACKEND_ID}`"),
        })?;
    let mapped: u64 = regions.iter().map(|r| r.len).sum();
    if mapped != backend.size {
        return Err(Error::RamLayout {
            reason: format!(
                "aliases map {mapped} bytes of `{RAM_BACKEND_ID}`, which has {}",
                backend.size
            ),
        });
    }
    Ok(regions)
}

/// Parses the `address-space: memory` section of `info mtree` for the RAM aliases of `backend`
/// (`GPA-GPA (prio P, ram): alias NAME @BACKEND OFFSET-OFFSET`), sorted by guest address.
pub fn parse_ram_layout(mtree: &str, backend: &str) -> Result<Vec<FileRegion>> {
    let invalid = |reason: String| Error::RamLayout { reason };
    let marker = format!(" @{backend} ");
    let mut regions = Vec::new();
    let mut in_memory_space = false;
    for line in mtree.lines() {
        if let Some(space) = line.strip_prefix("address-space: ") {
            in_memory_space = space.trim() == "memory";
            continue;
        }
        if !in_memory_space || !line.contains("ram): alias ") || !line.contains(&marker) {
            continue;
        }
        let (guest, file) = line
            .split_once(&marker)
            .and_then(|(head, file)| Some((range(head.split_whitespace().next()?)?, range(file.trim())?)))
            .ok_or_else(|| invalid(format!("cannot parse memory tree line {:?}", line.trim())))?;
        if guest.1 - guest.0 != file.1 - file.0 {
            return Err(invalid(format!("alias sizes differ in {:?}", line.trim())));
        }
        regions.push(FileRegion {
            gpa: guest.0,
            len: guest.1 - guest.0 + 1,
            file_offset: file.0,
        });
    }
    if regions.is_empty() {
        return Err(invalid(format!(
            "no RAM alias of backend `{backend}` in the memory address space"
        )));
    }
    // Firmware windows (q35's PAM) alias parts of the same RAM again at the same addresses:
    // keep only the outermost mapping of every byte, and refuse mappings that disagree.
    regions.sort_by_key(|r| std::cmp::Reverse(r.len));
    let mut kept: Vec<FileRegion> = Vec::new();
    for region in regions {
        let file_end = region.file_offset + region.len;
        match kept
            .iter()
            .find(|k| region.file_offset < k.file_offset + k.len && k.file_offset < file_end)
        {
            None => kept.push(region),
            Some(outer)
                if outer.file_offset <= region.file_offset
                    && file_end <= outer.file_offset + outer.len
                    && region.gpa.wrapping_sub(region.file_offset)
                        == outer.gpa.wrapping_sub(outer.file_offset) => {}
            Some(_) => {
                return Err(invalid(
                    "RAM aliases overlap in the backend at different addresses".into(),
                ))
            }
        }
    }
    kept.sort_by_key(|r| r.gpa);
    Ok(kept)
}

/// `START-END` in hex (inclusive end).
fn range(text: &str) -> Option<(u64, u64)> {
    let (start, end) = text.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    (end >= start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTREE_3G: &str = "\
address-space: cpu-memory-0
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @mem 0000000000000000-000000007fffffff
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @mem 0000000000000000-000000007fffffff
    00000000000a0000-00000000000bffff (prio 1, i/o): alias smram-region @pci 00000000000a0000-00000000000bffff
    0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g @mem 0000000080000000-00000000bfffffff
address-space: mch
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @mem 0000000000000000-000000007fffffff
";

    #[test]
    fn q35_splits_ram_around_the_pci_hole() {
        let regions = parse_ram_layout(MTREE_3G, "mem").unwrap();
        assert_eq!(
            regions,
            [
                FileRegion {
                    gpa: 0,
                    len: 2 << 30,
                    file_offset: 0
                },
                FileRegion {
                    gpa: 4 << 30,
                    len: 1 << 30,
                    file_offset: 2 << 30
                },
            ]
        );
    }

    #[test]
    fn firmware_windows_onto_the_same_ram_are_not_extra_regions() {
        let pam = MTREE_3G.replace(
            "    00000000000a0000-00000000000bffff (prio 1, i/o): alias smram-region",
            "    00000000000c0000-00000000000c3fff (prio 1, ram): alias pam-ram @mem 00000000000c0000-00000000000c3fff\n    \
             00000000000a0000-00000000000bffff (prio 1, i/o): alias smram-region",
        );
        assert_eq!(
            parse_ram_layout(&pam, "mem").unwrap(),
            parse_ram_layout(MTREE_3G, "mem").unwrap()
        );
    }

    #[test]
    fn odd_memory_trees_are_errors() {
        for (text, expected) in [
            ("address-space: memory\n", "no RAM alias"),
            (
                "address-space: memory\n  zz-1 (prio 0, ram): alias x @mem 0-1\n",
                "cannot parse",
            ),
            (
                "address-space: memory\n  0-fff (prio 0, ram): alias x @mem 0-1fff\n",
                "sizes differ",
            ),
            (
                "address-space: memory\n  0-fff (prio 0, ram): alias a @mem 0-fff\n  \
                 10000-10fff (prio 0, ram): alias b @mem 800-17ff\n",
                "overlap",
            ),
        ] {
            let error = parse_ram_layout(text, "mem").unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
