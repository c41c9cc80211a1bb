//! The migration stream QEMU 10 writes for a `background-snapshot` migration, parsed as it arrives:
//! the guest-RAM pages go to a [`RamSink`] (in the stream's order, duplicates included), everything
//! from the first device section on is kept as the device-state blob. Only the subset QEMU writes with
//! our domains' settings is accepted; anything else is refused with the byte offset where it was
//! found. The format, what is refused and where the facts come from: `docs/qemu-migration-stream.md`.

mod format;
mod parser;
#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test streams are small (names and lengths fit their fields); random bytes are cut on purpose"
)]
mod tests;

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};

use memory::{PageImport, PAGE_SIZE};

pub use format::{
    configuration_section, device_state_format, device_state_prefix, DeviceStateFormat, DEVICE_STATE_HEADER,
};

use parser::{refused_flags, Input, Parser, READ_BUFFER};

/// Reading a QEMU migration stream failed: the stream is one this parser does not read or is damaged
/// ([`StreamError::Format`], [`StreamError::Truncated`]), or reading it, storing a page or writing
/// the device state failed. Offsets are bytes from the start of the stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream is not one the parser reads, or is damaged.
    #[error("QEMU migration stream, at byte {offset}: {problem}")]
    Format {
        /// Where the offending item starts in the stream.
        offset: u64,
        /// What is wrong.
        problem: FormatError,
    },

    /// The stream ended early.
    #[error(
        "QEMU migration stream cut short: it ends at byte {offset}, inside {inside} starting at byte \
         {item_at}"
    )]
    Truncated {
        /// Length of the stream.
        offset: u64,
        /// What was being read.
        inside: &'static str,
        /// Where that item starts.
        item_at: u64,
    },

    /// Reading the stream failed.
    #[error("cannot read the QEMU migration stream at byte {offset}")]
    Read {
        /// Bytes read before the failure.
        offset: u64,
        /// What the OS said.
        #[source]
        source: io::Error,
    },

    /// A guest RAM page of the stream cannot be stored (the [`RamSink`] failed).
    #[error("cannot store the guest RAM page of the record at byte {offset} of the QEMU migration stream")]
    Ram {
        /// Where the page record starts in the stream.
        offset: u64,
        /// The sink's error.
        #[source]
        source: memory::Error,
    },

    /// The device state taken from the stream cannot be written.
    #[error("cannot write the device state taken from the QEMU migration stream")]
    DeviceStateWrite {
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

impl StreamError {
    /// Where in the stream the error was found (`None` for a failed device-state write).
    pub fn offset(&self) -> Option<u64> {
        match self {
            StreamError::Format { offset, .. }
            | StreamError::Truncated { offset, .. }
            | StreamError::Read { offset, .. }
            | StreamError::Ram { offset, .. } => Some(*offset),
            StreamError::DeviceStateWrite { .. } => None,
        }
    }
}

/// What is wrong with a migration stream the parser refuses ([`StreamError::Format`] says where).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The stream does not start with the magic `QEVM`.
    #[error("magic {magic:#010x} is not QEVM: not a QEMU migration stream")]
    NotAStream {
        /// The first four bytes, big-endian.
        magic: u32,
    },
    /// The stream has another version.
    #[error("stream version {version}, this parser reads version {supported}")]
    Version {
        /// The stream's version.
        version: u32,
        /// The version this parser reads.
        supported: u32,
    },
    /// The configuration section is not where it must be, right after the header.
    #[error("section type {kind:#04x} where the configuration section (0x07) must be")]
    NoConfiguration {
        /// The section type found instead.
        kind: u8,
    },
    /// The configuration section names an implausibly long machine type.
    #[error("machine type name of {len} bytes in the configuration section")]
    MachineTypeTooLong {
        /// The announced length.
        len: u32,
    },
    /// A section this parser does not read at this point.
    #[error("section type {kind:#04x}: {what}")]
    UnexpectedSection {
        /// The section type.
        kind: u8,
        /// What the section is and why it is refused.
        what: &'static str,
    },
    /// A command section other than the switch-over notice.
    #[error(
        "command section: command {command} ({len} bytes), one of post-copy, a return path or \
         COLO, which change the stream"
    )]
    UnsupportedCommand {
        /// QEMU's `MIG_CMD_*` number.
        command: u16,
        /// Its length.
        len: u16,
    },
    /// An iterable section continues that was never started as `ram`.
    #[error("iterable section {id} continues, but only `ram` was started")]
    UnknownSectionId {
        /// The section id.
        id: u32,
    },
    /// An iterable section other than `ram` starts.
    #[error("unknown iterable section `{name}` (only `ram` is read)")]
    UnknownIterableSection {
        /// The section's name.
        name: String,
    },
    /// The `ram` section starts a second time.
    #[error("a second `ram` section starts")]
    SecondRamSection,
    /// The `ram` section has another instance or version.
    #[error(
        "`ram` section instance {instance} version {version} (this parser reads instance 0 version \
         {supported})"
    )]
    RamSectionVersion {
        /// The section's instance.
        instance: u32,
        /// The section's version.
        version: u32,
        /// The version this parser reads.
        supported: u32,
    },
    /// The `ram` section does not start with the RAM block list.
    #[error("the `ram` section starts with flags {flags:#x}, not the block list")]
    NoBlockList {
        /// The flags of its first record.
        flags: u64,
    },
    /// The block list declares too many blocks.
    #[error("more than {max} RAM blocks")]
    TooManyBlocks {
        /// The most blocks accepted.
        max: usize,
    },
    /// The block list declares a block twice.
    #[error("RAM block `{name}` declared twice")]
    DuplicateBlock {
        /// The block.
        name: String,
    },
    /// A block's length is not whole pages or overruns the list's total (the per-block fields of
    /// capabilities whose configuration subsection was not seen land here).
    #[error(
        "RAM block `{name}` of {len:#x} bytes is not whole pages or overruns the {total:#x} bytes the \
         block list announced"
    )]
    BlockLength {
        /// The block.
        name: String,
        /// Its declared length.
        len: u64,
        /// The total the list announced.
        total: u64,
    },
    /// The block list declares a block the domain does not have.
    #[error("RAM block `{name}` is not one of the domain's RAM blocks")]
    UnknownBlock {
        /// The block.
        name: String,
    },
    /// A block's length differs from the domain's.
    #[error("RAM block `{name}` has {len:#x} bytes, the domain's has {expected:#x}")]
    BlockSize {
        /// The block.
        name: String,
        /// Its length in the stream.
        len: u64,
        /// Its length in the domain.
        expected: u64,
    },
    /// The block list lacks the guest-RAM block.
    #[error("the block list has no guest RAM block `{name}`")]
    NoGuestRamBlock {
        /// The guest-RAM block's name.
        name: String,
    },
    /// A RAM record carries flags of capabilities this parser does not read.
    #[error("{}", refused_flags(*.flags))]
    RefusedFlags {
        /// The record's flags.
        flags: u64,
    },
    /// A RAM record of a kind this parser does not expect here.
    #[error("RAM record with flags {flags:#x} at offset {block_offset:#x}")]
    UnexpectedRecord {
        /// The record's flags.
        flags: u64,
        /// The offset the record names.
        block_offset: u64,
    },
    /// A page record continues a block, but no block was named before.
    #[error("a page record continues a block, but none was named")]
    NoBlockToContinue,
    /// A page record names a block the list did not declare.
    #[error("page of RAM block `{name}`, not in the block list")]
    PageOfUnlistedBlock {
        /// The block.
        name: String,
    },
    /// A page lies beyond the end of its block.
    #[error("page at offset {block_offset:#x} is beyond RAM block `{name}` of {block_len:#x} bytes")]
    PageBeyondBlock {
        /// The page's offset in the block.
        block_offset: u64,
        /// The block.
        name: String,
        /// The block's length.
        block_len: u64,
    },
    /// A zero-page record with a fill byte other than zero.
    #[error("zero-page record with fill byte {fill:#04x}")]
    ZeroPageFill {
        /// The fill byte.
        fill: u8,
    },
    /// A section does not end with its footer.
    #[error("section {id} has no footer (found type {kind:#04x}, id {found_id})")]
    MissingFooter {
        /// The section's id.
        id: u32,
        /// The type byte found where the footer must be.
        kind: u8,
        /// The id found there.
        found_id: u32,
    },
}

/// Shorthand for results of the parser.
type Result<T, E = StreamError> = std::result::Result<T, E>;

/// Receives the pages of the guest-RAM block, in the stream's order; a page may come several times
/// (the later copy wins).
pub trait RamSink {
    /// Page `page` of the block (its byte offset in the block divided by 4096) holds `data`.
    fn page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> memory::Result<()>;
    /// Page `page` of the block is zero.
    fn zero(&mut self, page: u64) -> memory::Result<()>;
    /// Called once, when the first RAM section after the block list begins. In a background
    /// snapshot QEMU writes it only after it stopped the guest, saved the device state and
    /// write-protected RAM (`bg_migration_thread`): the snapshot's contents are fixed from then on,
    /// and a guest paused for the snapshot (to snapshot its disks at the same instant) may resume.
    fn state_captured(&mut self) {}
}

/// The image's page numbering must follow the RAM block's: page `n` is bytes `n * 4096..` of the RAM
/// file. That holds for a layout made of the RAM file's regions when they sit in the file in
/// guest-address order, as on q35 (checked by [`crate::stream_snapshot`]).
impl RamSink for PageImport<'_> {
    fn page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> memory::Result<()> {
        PageImport::page(self, page, data)
    }
    fn zero(&mut self, page: u64) -> memory::Result<()> {
        PageImport::zero(self, page)
    }
}

/// The RAM blocks the stream must declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedBlocks {
    /// The guest-RAM block: the memory backend's id ([`crate::RAM_BACKEND_ID`]).
    pub ram_block: String,
    /// Its size in bytes.
    pub ram_size: u64,
    /// The other blocks the stream may carry (ROMs and firmware tables such as `pc.bios`, `pc.rom`,
    /// `/rom@etc/acpi/tables`), with their size when it is to be checked. Their pages are skipped:
    /// a QEMU started with the same options recreates them.
    pub other_blocks: BTreeMap<String, Option<u64>>,
}

/// What a parse read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// The machine type named by the configuration section, e.g. `pc-q35-10.0`.
    pub machine_type: String,
    /// Bytes of stream read.
    pub bytes_read: u64,
    /// Page records of the guest-RAM block carrying data.
    pub ram_pages: u64,
    /// Zero-page records of the guest-RAM block.
    pub ram_zero_pages: u64,
    /// Page records of other blocks (ROMs), skipped.
    pub other_pages_skipped: u64,
    /// Bytes written as the device state, its header and configuration section included.
    pub device_state_bytes: u64,
}

/// Parses a stream QEMU 10 wrote for a `background-snapshot` migration from `input` (read in large
/// buffered pieces, so it keeps up with QEMU writing into a pipe or socket): checks its header, configuration
/// section and RAM block list against `expected`, hands every page of the guest-RAM block to `ram`
/// as it arrives, skips the pages of the other blocks, and writes the device state (everything from
/// the first device section to the end, behind [`DEVICE_STATE_HEADER`] and the stream's own
/// configuration section) to `device_state`. Reads to
/// the end of the stream.
///
/// Anything this parser does not know (other capabilities' records, sections or blocks) is an
/// error, as is a stream cut short anywhere (the device state must end with QEMU's end-of-file
/// marker and description). After an error, what `ram` and `device_state` received is incomplete and
/// must be discarded.
pub fn parse_migration_stream<S: RamSink + ?Sized>(
    input: impl Read,
    expected: &ExpectedBlocks,
    ram: &mut S,
    device_state: &mut dyn Write,
) -> Result<StreamStats> {
    let mut parser = Parser {
        input: Input {
            reader: BufReader::with_capacity(READ_BUFFER, input),
            pos: 0,
        },
        expected,
        ram,
        blocks: Vec::new(),
        current: None,
        ram_section: None,
        streaming: false,
        page: Box::new([0u8; PAGE_SIZE]),
        stats: StreamStats::default(),
        configuration: Vec::new(),
    };
    parser.run(device_state)?;
    parser.stats.bytes_read = parser.input.pos;
    Ok(parser.stats)
}
