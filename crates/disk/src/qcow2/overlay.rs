//! Writing a fresh qcow2 overlay image on top of a backing file.

use std::{io::Write, os::unix::fs::FileExt, path::Path};

use super::header::{self, Header};
use crate::error::{io_err, Error, Result};

/// Overlays use QEMU's default layout: 64 KiB clusters, 16-bit refcounts.
const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;

/// Creates a qcow2 v3 image at `path` (which must not exist) of `size` bytes whose backing file
/// is recorded as `backing` (format `backing_format`). The file is created 0600, written in full
/// under a private temporary name ([`durable::TempFile`]), synced, and linked into place so that `path` appears complete or
/// not at all (and an existing file is never replaced).
pub fn create_overlay(path: &Path, backing: &str, backing_format: &str, size: u64) -> Result<()> {
    let invalid = |reason: &str| Error::InvalidArgument {
        what: "overlay",
        value: path.display().to_string(),
        reason: reason.into(),
    };
    if backing.is_empty() || backing.len() > 1023 || backing.contains('\0') {
        return Err(invalid(
            "the backing file name must be 1 to 1023 bytes without NUL",
        ));
    }
    if path.file_name().is_none() {
        return Err(invalid("not a file path"));
    }
    let l2_span = (CLUSTER_SIZE / 8) * CLUSTER_SIZE;
    let l1_size = size.div_ceil(l2_span);
    if l1_size * 8 > 32 << 20 {
        return Err(invalid("the virtual size is too large for a qcow2 image"));
    }
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER_SIZE).max(1);
    // Cluster 0 header, 1 refcount table, 2 refcount block, then the L1 table.
    let clusters = 3 + l1_clusters;
    let header = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: CLUSTER_BITS,
        size,
        crypt_method: 0,
        l1_size: u32::try_from(l1_size)
            .map_err(|_| invalid("the virtual size is too large for a qcow2 image"))?,
        l1_table_offset: 3 * CLUSTER_SIZE,
        refcount_table_offset: CLUSTER_SIZE,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: header::V3_HEADER_LEN,
        compression_type: 0,
        backing_file: Some(backing.into()),
        backing_format: Some(backing_format.into()),
        feature_names: Vec::new(),
        has_bitmaps_extension: false,
        encryption_header: None,
        external_data_file: None,
        unknown_extensions: Vec::new(),
    };
    let cluster0 = header::encode_v3(&header);
    let table = (2 * CLUSTER_SIZE).to_be_bytes();
    let block: Vec<u8> = (0..clusters).flat_map(|_| 1u16.to_be_bytes()).collect();

    let mut temp = durable::TempFile::create(path)?;
    let file = temp.file_mut();
    let written = (|| {
        file.write_all(&cluster0)?;
        file.write_all_at(&table, CLUSTER_SIZE)?;
        file.write_all_at(&block, 2 * CLUSTER_SIZE)?;
        // The L1 table is all zeros: leave it sparse.
        file.set_len(clusters * CLUSTER_SIZE)
    })();
    written.map_err(io_err("cannot write overlay", temp.path()))?;
    // fsync, link into place (never replacing an existing file), fsync the folder.
    temp.persist_new(durable::Sync::Yes).map_err(|e| {
        if e.is_already_exists() {
            invalid("the file already exists")
        } else {
            e.into()
        }
    })
}
