//! The qcow2 header and its extensions (QEMU `docs/interop/qcow2.rst`), parsed from the bytes of
//! cluster 0 without I/O so that the parser can be fuzzed on its own.

use crate::num::{to_u64, to_usize, u32_to_usize};
use std::fmt;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header; version 3 headers are at least [`V3_MIN_HEADER_LEN`].
pub const V2_HEADER_LEN: u32 = 72;
/// The shortest version 3 header (up to and including `header_length`).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header length this crate writes (with the compression type byte, padded to 8).
pub const V3_HEADER_LEN: u32 = 112;

/// Byte offsets of the header fields that are rewritten in place. Each group that must change
/// together is adjacent, so one small write switches it atomically.
pub mod offsets {
    /// `l1_size` (u32) followed by `l1_table_offset` (u64).
    pub const L1: u64 = 36;
    /// `refcount_table_offset` (u64) followed by `refcount_table_clusters` (u32).
    pub const REFCOUNT_TABLE: u64 = 48;
    /// `nb_snapshots` (u32) followed by `snapshots_offset` (u64).
    pub const SNAPSHOTS: u64 = 60;
    /// `autoclear_features` (u64).
    pub const AUTOCLEAR: u64 = 88;
}

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be inconsistent (lazy refcounts in use, image not closed cleanly).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The `compression_type` field is used.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this crate understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Autoclear feature bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Header extension types.
pub mod extension {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    /// Persistent dirty bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const ENCRYPTION: u32 = 0x0537_be77;
    /// External data file name.
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// Why cluster 0 does not hold a usable qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not qcow2, or fields that cannot be right.
    Invalid(String),
    /// Valid, but something this crate will not handle.
    Unsupported(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Invalid(reason) | HeaderError::Unsupported(reason) => f.write_str(reason),
        }
    }
}

/// Which feature field a feature name table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// The field.
    pub kind: FeatureKind,
    /// The bit number.
    pub bit: u8,
    /// The name, e.g. `dirty bit`.
    pub name: String,
}

/// Header extensions as (type, data), and the offset just past them.
type Extensions<'a> = (Vec<(u32, &'a [u8])>, usize);

/// A parsed qcow2 header, version 2 or 3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (0 for version 2).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6; 4 for version 2).
    pub refcount_order: u32,
    /// Length of the header proper; extensions follow it.
    pub header_length: u32,
    /// 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format extension.
    pub backing_format: Option<String>,
    /// The feature name table extension.
    pub feature_names: Vec<FeatureName>,
    /// Whether a bitmaps extension is present.
    pub has_bitmaps_extension: bool,
    /// The full-disk-encryption header (offset, length), if any.
    pub encryption_header: Option<(u64, u64)>,
    /// The external data file name extension.
    pub external_data_file: Option<String>,
    /// Types of extensions this crate does not know (kept untouched in the image).
    pub unknown_extensions: Vec<u32>,
}

/// Big-endian readers over a byte slice that report what was being read when it runs short.
pub(crate) fn be_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8-byte slice"))
}
pub(crate) fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4-byte slice"))
}
pub(crate) fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(buf[at..at + 2].try_into().expect("2-byte slice"))
}

fn invalid(reason: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(reason.into())
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bits per refcount.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are 128-bit (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// The L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let l2_span = (self.cluster_size() / self.l2_entry_size()) * self.cluster_size();
        size.div_ceil(l2_span)
    }

    /// The name of a feature bit from the feature name table, or a generic description.
    fn feature_name(&self, kind: FeatureKind, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| format!("{:?} (bit {bit})", f.name))
            .unwrap_or_else(|| format!("bit {bit}"))
    }

    /// Parses the header from the start of the image; `cluster0` should hold the whole first
    /// cluster (it may be shorter if the file is). Pure: no I/O, never panics.
    pub fn parse(cluster0: &[u8]) -> Result<Header, HeaderError> {
        if cluster0.len() < u32_to_usize(V2_HEADER_LEN) {
            return Err(invalid(format!(
                "file is {} bytes, shorter than a qcow2 header",
                cluster0.len()
            )));
        }
        if be_u32(cluster0, 0) != MAGIC {
            return Err(invalid("bad magic (not a qcow2 image)"));
        }
        let version = be_u32(cluster0, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Unsupported(format!(
                "qcow2 version {version} (only 2 and 3 are known)"
            )));
        }
        let mut h = Header {
            version,
            backing_file_offset: be_u64(cluster0, 8),
            backing_file_size: be_u32(cluster0, 16),
            cluster_bits: be_u32(cluster0, 20),
            size: be_u64(cluster0, 24),
            crypt_method: be_u32(cluster0, 32),
            l1_size: be_u32(cluster0, 36),
            l1_table_offset: be_u64(cluster0, 40),
            refcount_table_offset: be_u64(cluster0, 48),
            refcount_table_clusters: be_u32(cluster0, 56),
            nb_snapshots: be_u32(cluster0, 60),
            snapshots_offset: be_u64(cluster0, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            has_bitmaps_extension: false,
            encryption_header: None,
            external_data_file: None,
            unknown_extensions: Vec::new(),
        };
        if !(9..=21).contains(&h.cluster_bits) {
            return Err(invalid(format!("cluster_bits {} outside 9..=21", h.cluster_bits)));
        }
        if version == 3 {
            h.parse_v3_fields(cluster0)?;
        }
        h.check_fields()?;
        h.check_layout(cluster0.len())?;
        h.parse_extensions(cluster0)?;
        h.parse_backing_name(cluster0)?;
        Ok(h)
    }

    /// The fields version 3 adds after the version 2 header.
    fn parse_v3_fields(&mut self, cluster0: &[u8]) -> Result<(), HeaderError> {
        if cluster0.len() < u32_to_usize(V3_MIN_HEADER_LEN) {
            return Err(invalid("version 3 header is truncated"));
        }
        self.incompatible_features = be_u64(cluster0, 72);
        self.compatible_features = be_u64(cluster0, 80);
        self.autoclear_features = be_u64(cluster0, 88);
        self.refcount_order = be_u32(cluster0, 96);
        self.header_length = be_u32(cluster0, 100);
        if self.header_length < V3_MIN_HEADER_LEN
            || u64::from(self.header_length) > self.cluster_size()
            || u32_to_usize(self.header_length) > cluster0.len()
        {
            return Err(invalid(format!(
                "header_length {} out of range",
                self.header_length
            )));
        }
        if self.header_length > V3_MIN_HEADER_LEN {
            self.compression_type = cluster0[104];
        }
        Ok(())
    }

    /// Field values this implementation (and QEMU) accepts.
    fn check_fields(&self) -> Result<(), HeaderError> {
        if self.refcount_order > 6 {
            return Err(invalid(format!(
                "refcount_order {} greater than 6",
                self.refcount_order
            )));
        }
        if self.incompatible_features & incompatible::COMPRESSION_TYPE == 0 && self.compression_type != 0 {
            return Err(invalid(
                "compression_type set without the compression type feature bit",
            ));
        }
        if self.compression_type > 1 {
            return Err(HeaderError::Unsupported(format!(
                "compression type {}",
                self.compression_type
            )));
        }
        if self.crypt_method > 2 {
            return Err(invalid(format!("crypt_method {}", self.crypt_method)));
        }
        Ok(())
    }

    /// Offsets and sizes that must be aligned or bounded before anything is read through them.
    fn check_layout(&self, available: usize) -> Result<(), HeaderError> {
        let cluster_size = self.cluster_size();
        let aligned = |what: &str, offset: u64| {
            if offset % cluster_size != 0 {
                Err(invalid(format!("{what} {offset:#x} is not cluster aligned")))
            } else {
                Ok(())
            }
        };
        aligned("l1_table_offset", self.l1_table_offset)?;
        aligned("refcount_table_offset", self.refcount_table_offset)?;
        aligned("snapshots_offset", self.snapshots_offset)?;
        if self.refcount_table_offset == 0 || self.refcount_table_clusters == 0 {
            return Err(invalid("no refcount table"));
        }
        // QEMU's limits: 8 MiB of refcount table, 32 MiB of L1 table, 65536 snapshots.
        if u64::from(self.refcount_table_clusters) * cluster_size > 8 << 20 {
            return Err(invalid(format!(
                "refcount table of {} clusters is too large",
                self.refcount_table_clusters
            )));
        }
        if u64::from(self.l1_size) * 8 > 32 << 20 {
            return Err(invalid(format!("l1_size {} is too large", self.l1_size)));
        }
        if self.size > 1 << 62 {
            return Err(invalid(format!("virtual size {} is too large", self.size)));
        }
        if u64::from(self.l1_size) < self.l1_entries_for(self.size) {
            return Err(invalid(format!(
                "l1_size {} too small for virtual size {}",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(invalid("l1_table_offset is 0"));
        }
        if self.nb_snapshots > 65536 {
            return Err(invalid(format!(
                "{} snapshots (QEMU allows 65536)",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset == 0 {
            return Err(invalid("snapshots_offset is 0 but nb_snapshots is not"));
        }
        if self.backing_file_offset != 0 {
            let end = self
                .backing_file_offset
                .checked_add(u64::from(self.backing_file_size));
            if self.backing_file_size > 1023
                || end.is_none_or(|end| end > cluster_size.min(to_u64(available)))
            {
                return Err(invalid("backing file name does not fit in the first cluster"));
            }
        }
        Ok(())
    }

    /// The header extensions in `cluster0` as (type, data), and the offset just past the last
    /// one (past the end marker if there is one). Extensions end at the backing file name if
    /// there is one, else at the end of cluster 0.
    fn extensions<'a>(&self, cluster0: &'a [u8]) -> Result<Extensions<'a>, HeaderError> {
        let limit = if self.backing_file_offset != 0 {
            (to_usize(self.backing_file_offset)).min(cluster0.len())
        } else {
            cluster0.len()
        };
        let mut found = Vec::new();
        let mut at = u32_to_usize(self.header_length);
        loop {
            if at + 8 > limit {
                // Version 2 images may end the header without an end marker.
                if self.version == 2 && at >= limit {
                    return Ok((found, at));
                }
                return Err(invalid(format!(
                    "header extension at {at:#x} runs past the header area"
                )));
            }
            let kind = be_u32(cluster0, at);
            let len = u32_to_usize(be_u32(cluster0, at + 4));
            if kind == extension::END {
                return Ok((found, at + 8));
            }
            let data_at = at + 8;
            let Some(data) = data_at
                .checked_add(len)
                .filter(|&end| end <= limit)
                .map(|end| &cluster0[data_at..end])
            else {
                return Err(invalid(format!(
                    "header extension {kind:#x} of {len} bytes runs past the header area"
                )));
            };
            found.push((kind, data));
            at = data_at + len.next_multiple_of(8);
        }
    }

    fn parse_extensions(&mut self, cluster0: &[u8]) -> Result<(), HeaderError> {
        for (kind, data) in self.extensions(cluster0)?.0 {
            match kind {
                extension::BACKING_FORMAT => self.backing_format = Some(text(data, "backing format")?),
                extension::FEATURE_NAMES => self.feature_names = feature_names(data)?,
                extension::BITMAPS => self.has_bitmaps_extension = true,
                extension::ENCRYPTION => {
                    if data.len() < 16 {
                        return Err(invalid("encryption header extension shorter than 16 bytes"));
                    }
                    self.encryption_header = Some((be_u64(data, 0), be_u64(data, 8)));
                }
                extension::EXTERNAL_DATA_FILE => {
                    self.external_data_file = Some(text(data, "external data file")?)
                }
                other => self.unknown_extensions.push(other),
            }
        }
        Ok(())
    }

    /// The header area of `cluster0` (this header's image) rewritten to name another backing
    /// file, `(name, format)`, or none: the header fields and every other extension are kept
    /// byte for byte, the backing format extension is replaced (or dropped) and the name
    /// follows the end marker. The result covers at least the old header area (zero padded),
    /// so writing it at offset 0 leaves no stale bytes of the old layout behind.
    pub(crate) fn with_backing(
        &self,
        cluster0: &[u8],
        backing: Option<(&str, &str)>,
    ) -> Result<Vec<u8>, HeaderError> {
        let (extensions, old_end) = self.extensions(cluster0)?;
        let mut out = cluster0[..u32_to_usize(self.header_length)].to_vec();
        let push = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            let len = u32::try_from(data.len()).map_err(|_| invalid("header extension too long"))?;
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
            Ok::<_, HeaderError>(())
        };
        if let Some((_, format)) = backing {
            push(&mut out, extension::BACKING_FORMAT, format.as_bytes())?;
        }
        for (kind, data) in extensions {
            if kind != extension::BACKING_FORMAT {
                push(&mut out, kind, data)?;
            }
        }
        out.extend_from_slice(&[0; 8]); // end of extensions
        let (offset, size) = match backing {
            Some((name, _)) => {
                if name.is_empty() || name.len() > 1023 {
                    return Err(invalid("backing file name must be 1 to 1023 bytes"));
                }
                let size = u32::try_from(name.len()).map_err(|_| invalid("backing file name too long"))?;
                let at = to_u64(out.len());
                out.extend_from_slice(name.as_bytes());
                (at, size)
            }
            None => (0, 0),
        };
        out[8..16].copy_from_slice(&offset.to_be_bytes());
        out[16..20].copy_from_slice(&size.to_be_bytes());
        let old_end = old_end.max(to_usize(
            self.backing_file_offset + u64::from(self.backing_file_size),
        ));
        out.resize(out.len().max(old_end), 0);
        if to_u64(out.len()) > self.cluster_size() {
            return Err(invalid("the new header does not fit in the first cluster"));
        }
        Ok(out)
    }

    fn parse_backing_name(&mut self, cluster0: &[u8]) -> Result<(), HeaderError> {
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return Ok(());
        }
        let start = to_usize(self.backing_file_offset);
        let name = text(
            &cluster0[start..start + u32_to_usize(self.backing_file_size)],
            "backing file name",
        )?;
        self.backing_file = Some(name);
        Ok(())
    }

    /// Refuses images that must not be opened at all (unknown incompatible features) or that
    /// must not be trusted (dirty, corrupt) or whose data is elsewhere (external data file).
    pub fn check_supported(&self) -> Result<(), HeaderError> {
        let unsupported = |reason: String| Err(HeaderError::Unsupported(reason));
        let unknown = self.incompatible_features & !incompatible::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| self.feature_name(FeatureKind::Incompatible, bit))
                .collect();
            return unsupported(format!("unknown incompatible features: {}", names.join(", ")));
        }
        if self.incompatible_features & incompatible::DIRTY != 0 {
            return unsupported(
                "the dirty bit is set (refcounts may be stale); run `qemu-img check -r all` first".into(),
            );
        }
        if self.incompatible_features & incompatible::CORRUPT != 0 {
            return unsupported(
                "the corrupt bit is set; repair the image with `qemu-img check -r all`".into(),
            );
        }
        if self.incompatible_features & incompatible::EXTERNAL_DATA != 0 || self.external_data_file.is_some()
        {
            return unsupported("the image keeps its data in an external data file".into());
        }
        Ok(())
    }

    /// Further refusals before modifying: persistent bitmaps would have to be rewritten with
    /// every snapshot operation, which this crate does not do.
    pub fn check_writable(&self) -> Result<(), HeaderError> {
        self.check_supported()?;
        if self.has_bitmaps_extension && self.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            return Err(HeaderError::Unsupported(
                "the image has persistent dirty bitmaps, which this backend cannot keep consistent".into(),
            ));
        }
        Ok(())
    }
}

fn text(bytes: &[u8], what: &str) -> Result<String, HeaderError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

fn feature_names(data: &[u8]) -> Result<Vec<FeatureName>, HeaderError> {
    if data.len() % 48 != 0 {
        return Err(invalid(format!(
            "feature name table of {} bytes is not a multiple of 48",
            data.len()
        )));
    }
    Ok(data
        .chunks_exact(48)
        .filter_map(|entry| {
            let kind = match entry[0] {
                0 => FeatureKind::Incompatible,
                1 => FeatureKind::Compatible,
                2 => FeatureKind::Autoclear,
                // Unknown kinds are for newer writers; their names are of no use to us.
                _ => return None,
            };
            let name = &entry[2..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            Some(FeatureName {
                kind,
                bit: entry[1],
                name: String::from_utf8_lossy(&name[..end]).into_owned(),
            })
        })
        .collect())
}

/// Builds cluster 0 of a fresh version 3 image: header, backing format extension, end
/// marker, backing file name. The caller fills the layout fields.
#[allow(
    clippy::cast_possible_truncation,
    reason = "create_overlay checks the backing name is at most 1023 bytes; formats are driver names"
)]
pub(crate) fn encode_v3(h: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&3u32.to_be_bytes());
    out.extend_from_slice(&h.backing_file_offset.to_be_bytes());
    out.extend_from_slice(&h.backing_file_size.to_be_bytes());
    out.extend_from_slice(&h.cluster_bits.to_be_bytes());
    out.extend_from_slice(&h.size.to_be_bytes());
    out.extend_from_slice(&h.crypt_method.to_be_bytes());
    out.extend_from_slice(&h.l1_size.to_be_bytes());
    out.extend_from_slice(&h.l1_table_offset.to_be_bytes());
    out.extend_from_slice(&h.refcount_table_offset.to_be_bytes());
    out.extend_from_slice(&h.refcount_table_clusters.to_be_bytes());
    out.extend_from_slice(&h.nb_snapshots.to_be_bytes());
    out.extend_from_slice(&h.snapshots_offset.to_be_bytes());
    out.extend_from_slice(&h.incompatible_features.to_be_bytes());
    out.extend_from_slice(&h.compatible_features.to_be_bytes());
    out.extend_from_slice(&h.autoclear_features.to_be_bytes());
    out.extend_from_slice(&h.refcount_order.to_be_bytes());
    out.extend_from_slice(&V3_HEADER_LEN.to_be_bytes());
    out.push(h.compression_type);
    out.resize(u32_to_usize(V3_HEADER_LEN), 0);
    if let Some(format) = &h.backing_format {
        out.extend_from_slice(&extension::BACKING_FORMAT.to_be_bytes());
        out.extend_from_slice(&(format.len() as u32).to_be_bytes());
        out.extend_from_slice(format.as_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0; 8]); // end of extensions
    if let Some(backing) = &h.backing_file {
        let at = to_u64(out.len());
        out.extend_from_slice(backing.as_bytes());
        out[8..16].copy_from_slice(&at.to_be_bytes());
        out[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            feature_names: Vec::new(),
            has_bitmaps_extension: false,
            encryption_header: None,
            external_data_file: None,
            unknown_extensions: Vec::new(),
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let h = sample();
        let mut bytes = encode_v3(&h);
        bytes.resize(1 << 16, 0);
        let parsed = Header::parse(&bytes).unwrap();
        assert_eq!(parsed.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(parsed.backing_format.as_deref(), Some("qcow2"));
        // 112-byte header, 16-byte backing format extension, 8-byte end marker.
        assert_eq!(parsed.backing_file_offset, 136);
        assert_eq!(
            (parsed.size, parsed.l1_size, parsed.cluster_bits),
            (h.size, h.l1_size, h.cluster_bits)
        );
    }

    #[test]
    fn refuses_bad_fields_without_panicking() {
        let mut bytes = encode_v3(&sample());
        bytes.resize(1 << 16, 0);
        let with = |at: usize, value: &[u8]| {
            let mut b = bytes.clone();
            b[at..at + value.len()].copy_from_slice(value);
            Header::parse(&b)
        };
        assert!(matches!(with(0, b"QFI\0"), Err(HeaderError::Invalid(r)) if r.contains("magic")));
        assert!(
            matches!(with(20, &30u32.to_be_bytes()), Err(HeaderError::Invalid(r)) if r.contains("cluster_bits"))
        );
        assert!(
            matches!(with(96, &7u32.to_be_bytes()), Err(HeaderError::Invalid(r)) if r.contains("refcount_order"))
        );
        assert!(
            matches!(with(36, &1u32.to_be_bytes()), Err(HeaderError::Invalid(r)) if r.contains("l1_size"))
        );
        assert!(matches!(
            with(4, &4u32.to_be_bytes()),
            Err(HeaderError::Unsupported(_))
        ));
        for len in 0..120 {
            let _ = Header::parse(&bytes[..len]);
        }
    }

    #[test]
    fn names_unknown_incompatible_features() {
        let mut h = sample();
        h.incompatible_features = 1 << 9 | incompatible::DIRTY;
        h.feature_names.push(FeatureName {
            kind: FeatureKind::Incompatible,
            bit: 9,
            name: "future".into(),
        });
        let err = h.check_supported().unwrap_err().to_string();
        assert!(err.contains("\"future\" (bit 9)"), "{err}");
        h.incompatible_features = incompatible::CORRUPT;
        assert!(h.check_supported().unwrap_err().to_string().contains("corrupt"));
        h.incompatible_features = incompatible::EXTERNAL_DATA;
        assert!(h
            .check_supported()
            .unwrap_err()
            .to_string()
            .contains("external data file"));
    }
}
