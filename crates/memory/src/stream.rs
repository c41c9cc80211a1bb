//! The stream form of an image, for writers that cannot seek (pipes, sockets), and the receiver that
//! turns a stream back into an at-rest image. Format: `docs/memory-image-format.md`, "Stream form".

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::format::{ImageLayout, FORMAT_VERSION, STREAM_MAGIC};
use crate::guest::{PAGE, PAGE_SIZE};
use crate::image::{Durability, ImageInfo, ImageWriter, PageSink};
use crate::num::{to_u64, to_usize};
use crate::page_buf::PageBuf;
use crate::table::{block_hash, is_zero, page_hash, PageTable};

const TAG_PAGES: u32 = 1;
const TAG_ZERO: u32 = 2;
const TAG_END: u32 = 3;
const RECORD_HEADER_LEN: usize = 24;
/// Most pages in one PAGES record (1 MiB of data), which bounds a receiver's buffer.
const MAX_RECORD_PAGES: usize = 256;
const KIND: &str = "stream";

fn record_header(tag: u32, count: u32, first: u64, meta: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&tag.to_le_bytes());
    h[4..8].copy_from_slice(&count.to_le_bytes());
    h[8..16].copy_from_slice(&first.to_le_bytes());
    let sum = record_checksum(&h[..16], meta);
    h[16..].copy_from_slice(&sum.to_le_bytes());
    h
}

fn record_checksum(head: &[u8], meta: &[u8]) -> u64 {
    let mut covered = Vec::with_capacity(head.len() + meta.len());
    covered.extend_from_slice(head);
    covered.extend_from_slice(meta);
    block_hash(&covered)
}

/// A [`PageSink`] that writes the stream form to `W`. Records from concurrent copy workers are written
/// whole, one at a time. Pass `&mut socket` to keep using the connection after the end record.
#[derive(Debug)]
pub struct StreamWriter<W> {
    out: Mutex<W>,
    layout: ImageLayout,
    records: AtomicU64,
}

impl<W: Write + Send> StreamWriter<W> {
    /// Writes the stream header for `layout` to `out`.
    pub fn new(mut out: W, layout: ImageLayout) -> Result<Self> {
        out.write_all(&layout.encode_header(STREAM_MAGIC))
            .map_err(Error::StreamWrite)?;
        Ok(StreamWriter {
            out: Mutex::new(out),
            layout,
            records: AtomicU64::new(0),
        })
    }

    fn record(&self, head: &[u8], parts: &[&[u8]]) -> Result<()> {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        out.write_all(head).map_err(Error::StreamWrite)?;
        for part in parts {
            out.write_all(part).map_err(Error::StreamWrite)?;
        }
        self.records.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl<W: Write + Send> PageSink for StreamWriter<W> {
    fn layout(&self) -> &ImageLayout {
        &self.layout
    }

    fn write_pages(&self, first_page: u64, data: &[u8], checksums: &[u64]) -> Result<()> {
        for (i, (data, sums)) in data
            .chunks(MAX_RECORD_PAGES * PAGE_SIZE)
            .zip(checksums.chunks(MAX_RECORD_PAGES))
            .enumerate()
        {
            let meta: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
            let first = first_page + to_u64(i * MAX_RECORD_PAGES);
            let count = u32::try_from(sums.len()).expect("a record holds at most MAX_RECORD_PAGES pages");
            let head = record_header(TAG_PAGES, count, first, &meta);
            self.record(&head, &[&meta, data])?;
        }
        Ok(())
    }

    fn zero_pages(&self, first_page: u64, count: u64) -> Result<()> {
        let mut done = 0;
        while done < count {
            let n = u32::try_from(count - done).unwrap_or(u32::MAX);
            self.record(&record_header(TAG_ZERO, n, first_page + done, &[]), &[])?;
            done += u64::from(n);
        }
        Ok(())
    }

    fn seal(self: Box<Self>, table: &PageTable) -> Result<()> {
        let digest = table.digest(FORMAT_VERSION).to_le_bytes();
        let head = record_header(TAG_END, 0, self.records.load(Ordering::Relaxed), &digest);
        self.record(&head, &[&digest])?;
        self.out
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
            .map_err(Error::StreamWrite)
    }
}

/// Options for [`receive_stream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// Durability of the image written.
    pub durability: Durability,
    /// Largest guest memory a stream may declare (the receiver keeps 9 bytes per page).
    pub max_guest_bytes: u64,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            durability: Durability::Sync,
            max_guest_bytes: 1 << 40,
        }
    }
}

/// Reads `buf.len()` bytes; the end of input there is a truncated stream.
fn read_full(input: &mut impl Read, buf: &mut [u8], records: u64) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::StreamTruncated { records },
        _ => Error::Io {
            op: "read memory stream",
            path: "<stream>".into(),
            source: e,
        },
    })
}

/// Reads and checks the stream's header: the guest's layout and the format version.
fn read_stream_header(input: &mut impl Read, options: &ReceiveOptions) -> Result<(ImageLayout, u32)> {
    let mut prefix = [0u8; 16];
    read_full(input, &mut prefix, 0)?;
    let header_len = ImageLayout::header_len_from_prefix(&prefix, STREAM_MAGIC, KIND)?;
    let mut header = vec![0u8; header_len];
    header[..16].copy_from_slice(&prefix);
    read_full(input, &mut header[16..], 0)?;
    let (layout, _) = ImageLayout::decode_header(&header, STREAM_MAGIC, KIND)?;
    let total = layout.total_pages();
    if total * PAGE > options.max_guest_bytes {
        return Err(Error::TooLarge {
            what: "guest memory declared by the stream",
            value: total * PAGE,
            limit: options.max_guest_bytes,
        });
    }
    Ok((layout, ImageLayout::version_of(&header)))
}

/// Checks a data record's pages (from page `first`) against their checksums in `meta`, and
/// records them in `table`.
fn check_data_pages(
    layout: &ImageLayout,
    table: &mut PageTable,
    first: u64,
    data: &[u8],
    meta: &[u8],
) -> Result<()> {
    for (i, (page, sum)) in data.chunks_exact(PAGE_SIZE).zip(meta.chunks_exact(8)).enumerate() {
        let p = first + to_u64(i);
        let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
        let page_error = |what| Error::PageCorrupt {
            kind: KIND,
            page: p,
            gpa: layout.gpa_of_page(p),
            what,
        };
        if is_zero(page) {
            return Err(page_error("is sent as data but is zero"));
        }
        if page_hash(layout.seed(), page) != sum {
            return Err(page_error("does not match its checksum"));
        }
        table.set(p, Some(sum));
    }
    Ok(())
}

/// Reads a stream from `input` and writes it as a sealed image at `dest`. Reads exactly up to the end
/// record and nothing after it. On any error no image is left behind.
pub fn receive_stream(mut input: impl Read, dest: &Path, options: &ReceiveOptions) -> Result<ImageInfo> {
    let (layout, version) = read_stream_header(&mut input, options)?;
    let total = layout.total_pages();
    let image = ImageWriter::create(dest, layout.clone(), options.durability)?;
    let mut table = PageTable::new(total, layout.seed());
    // Page-aligned, so that an image may take the records' pages direct.
    let mut data = PageBuf::zeroed(MAX_RECORD_PAGES);
    let mut meta = vec![0u8; MAX_RECORD_PAGES * 8];
    let mut records = 0u64;
    loop {
        let mut head = [0u8; RECORD_HEADER_LEN];
        read_full(&mut input, &mut head, records)?;
        let tag = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let count = to_usize(u64::from(u32::from_le_bytes(
            head[4..8].try_into().expect("4 bytes"),
        )));
        let first = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let sum = u64::from_le_bytes(head[16..].try_into().expect("8 bytes"));
        let bad = |what: &str| Error::corrupt(KIND, format!("record {records}: {what}"));
        let meta_len = match tag {
            TAG_PAGES if (1..=MAX_RECORD_PAGES).contains(&count) => count * 8,
            TAG_ZERO if count >= 1 => 0,
            TAG_END if count == 0 => 8,
            _ => return Err(bad(&format!("invalid tag {tag} or count {count}"))),
        };
        read_full(&mut input, &mut meta[..meta_len], records)?;
        if record_checksum(&head[..16], &meta[..meta_len]) != sum {
            return Err(bad("record checksum mismatch"));
        }
        if tag == TAG_END {
            if first != records {
                return Err(bad(&format!(
                    "end record counts {first} records, {records} were read"
                )));
            }
            if meta[..8] != table.digest(version).to_le_bytes() {
                return Err(bad("page table digest mismatch (records lost or damaged)"));
            }
            let info = ImageInfo {
                regions: layout.regions().to_vec(),
                total_pages: total,
                present_pages: table.present_pages(),
            };
            image.seal(&table)?;
            return Ok(info);
        }
        if first.checked_add(to_u64(count)).is_none_or(|end| end > total) {
            return Err(bad(&format!(
                "pages {first}+{count} outside the {total}-page memory"
            )));
        }
        if tag == TAG_ZERO {
            image.zero_pages(first, to_u64(count))?;
            (first..first + to_u64(count)).for_each(|p| table.set(p, None));
        } else {
            let data = &mut data[..count * PAGE_SIZE];
            read_full(&mut input, data, records)?;
            check_data_pages(&layout, &mut table, first, data, &meta[..meta_len])?;
            image.write_pages(first, data, &[])?;
        }
        records += 1;
    }
}
