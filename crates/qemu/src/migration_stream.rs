//! The migration stream QEMU 10 writes for a `background-snapshot` migration, parsed as it arrives:
//! the guest-RAM pages go to a [`RamSink`] (in the stream's order, duplicates included), everything
//! from the first device section on is kept as the device-state blob. Only the subset QEMU writes with
//! our domains' settings is accepted; anything else is refused with the byte offset where it was
//! found. The format, what is refused and where the facts come from: `docs/qemu-migration-stream.md`.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};

use memory::{PageImport, PAGE_SIZE};

/// `QEVM`.
const FILE_MAGIC: u32 = u32::from_be_bytes(*b"QEVM");
/// The stream version QEMU has written since 0.13.
const FILE_VERSION: u32 = 3;
/// The header of a migration stream and so of every device-state file (the blob
/// [`parse_migration_stream`] writes, and what QMP's `xen-save-devices-state` writes): the magic
/// `QEVM` and the stream version 3, both big-endian, as `migrate-incoming` expects them.
pub const DEVICE_STATE_HEADER: [u8; 8] = {
    let magic = FILE_MAGIC.to_be_bytes();
    let version = FILE_VERSION.to_be_bytes();
    [
        magic[0], magic[1], magic[2], magic[3], version[0], version[1], version[2], version[3],
    ]
};

/// The configuration section QEMU writes right after the header of a migration stream (`0x07`,
/// `be32` length, the machine type, e.g. `pc-q35-10.0`). A QEMU started to receive a stream with
/// the default `migration.send-configuration=on` requires it (and checks that the machine type
/// is its own); a QEMU that loaded a stream without it (started with
/// `-global migration.send-configuration=off`) aborts on its next outgoing migration, so every
/// device-state file domsnap writes carries it: [`device_state_prefix`].
///
/// # Errors
///
/// A machine type longer than QEMU's stream allows here (256 bytes).
pub fn configuration_section(machine_type: &str) -> std::result::Result<Vec<u8>, FormatError> {
    let len = u32::try_from(machine_type.len())
        .ok()
        .filter(|len| *len <= MAX_MACHINE_NAME)
        .ok_or(FormatError::MachineTypeTooLong {
            len: u32::try_from(machine_type.len()).unwrap_or(u32::MAX),
        })?;
    let mut section = Vec::with_capacity(5 + machine_type.len());
    section.push(SECTION_CONFIGURATION);
    section.extend_from_slice(&len.to_be_bytes());
    section.extend_from_slice(machine_type.as_bytes());
    Ok(section)
}

/// What a device-state file starts with: [`DEVICE_STATE_HEADER`], then the
/// [`configuration_section`] of `machine_type`; the device sections follow.
///
/// # Errors
///
/// As [`configuration_section`].
pub fn device_state_prefix(machine_type: &str) -> std::result::Result<Vec<u8>, FormatError> {
    let mut prefix = DEVICE_STATE_HEADER.to_vec();
    prefix.extend(configuration_section(machine_type)?);
    Ok(prefix)
}

/// The layout of a device-state file, read from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceStateFormat {
    /// The header, then the configuration section naming this machine type, then the devices:
    /// what domsnap writes since issue 10.
    Configured {
        /// The machine type the configuration section names.
        machine_type: String,
        /// Bytes of header and configuration section; the device sections start here.
        devices_at: usize,
    },
    /// The header, then directly the devices (`xen-save-devices-state`'s own output, and what
    /// older domsnap versions stored). QEMU loads it only with `migration.send-configuration=off`,
    /// after which it cannot migrate again: the driver inserts the configuration section when it
    /// loads such a file.
    Legacy,
}

/// Reads the layout of a device-state file from its first bytes (at least the header; the
/// configuration section when there is one).
///
/// # Errors
///
/// A reason when `start` is not the start of a device-state file.
pub fn device_state_format(start: &[u8]) -> std::result::Result<DeviceStateFormat, String> {
    let not_ours = || "not a QEMU device-state file (it does not start with QEVM, version 3)".to_owned();
    let rest = start
        .strip_prefix(&DEVICE_STATE_HEADER[..])
        .ok_or_else(not_ours)?;
    match rest.first() {
        Some(&SECTION_CONFIGURATION) => {
            let len = rest
                .get(1..5)
                .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
                .map(u32::from_be_bytes)
                .ok_or("the configuration section is cut short")?;
            if len > MAX_MACHINE_NAME {
                return Err(FormatError::MachineTypeTooLong { len }.to_string());
            }
            let end = 5 + len as usize;
            let name = rest.get(5..end).ok_or("the configuration section is cut short")?;
            let machine_type = std::str::from_utf8(name)
                .map_err(|_| "the configuration section's machine type is not UTF-8")?
                .to_owned();
            Ok(DeviceStateFormat::Configured {
                machine_type,
                devices_at: DEVICE_STATE_HEADER.len() + end,
            })
        }
        Some(&SECTION_FULL | &SECTION_EOF) => Ok(DeviceStateFormat::Legacy),
        Some(kind) => Err(format!(
            "section type {kind:#04x} after the header: neither a configuration nor a device section"
        )),
        None => Err("it holds nothing after the header".into()),
    }
}

// Section types (QEMU `migration/savevm.c`).
const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SECTION_SUBSECTION: u8 = 0x05;
const SECTION_VMDESCRIPTION: u8 = 0x06;
const SECTION_CONFIGURATION: u8 = 0x07;
const SECTION_COMMAND: u8 = 0x08;
/// `MIG_CMD_SWITCHOVER_START`: QEMU 10 tells the destination that the switch-over begins (for
/// devices that load state ahead of it); it carries no data.
const CMD_SWITCHOVER_START: u16 = 11;
const SECTION_FOOTER: u8 = 0x7e;

// RAM record flags, in the low bits of a record's be64 (QEMU `migration/ram.c`). The offset of a
// page is aligned to the target page (4 KiB on x86), which leaves 12 bits for flags.
const FLAG_MASK: u64 = 0xfff;
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
/// Flags this parser reads; any other bit is refused.
const KNOWN_FLAGS: u64 = FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE;
/// Names of the flags it refuses, for the error message.
const REFUSED_FLAGS: [(u64, &str); 5] = [
    (0x01, "FULL (obsolete)"),
    (0x40, "XBZRLE"),
    (0x80, "HOOK (RDMA)"),
    (0x100, "COMPRESS_PAGE"),
    (0x200, "MULTIFD_FLUSH"),
];

/// The only iterable section this parser reads, and its version in QEMU 10.
const RAM_SECTION: &str = "ram";
const RAM_SECTION_VERSION: u32 = 4;
/// Longest machine type name accepted in the configuration section.
const MAX_MACHINE_NAME: u32 = 256;
/// Most RAM blocks a block list may declare.
const MAX_BLOCKS: usize = 1024;
/// Read buffer: a pipe delivers up to its size per read; 1 MiB keeps system calls rare.
const READ_BUFFER: usize = 1 << 20;
/// Most bytes of the device state's end kept to check its end-of-file marker and description.
const MAX_TAIL: usize = 16 << 20;

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

/// A RAM block declared by the stream.
struct Block {
    name: String,
    len: u64,
    guest_ram: bool,
}

/// The stream with the offset of the next byte to read.
struct Input<R> {
    reader: BufReader<R>,
    pos: u64,
}

impl<R: Read> Input<R> {
    /// Fills `buf`; the end of the stream inside it is a truncation, reported with the offset where
    /// the item being read (`what`) started.
    fn exact(&mut self, buf: &mut [u8], what: &'static str, item_at: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.reader.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        offset: self.pos + done as u64,
                        inside: what,
                        item_at,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StreamError::Read {
                        offset: self.pos + done as u64,
                        source,
                    })
                }
            }
        }
        self.pos += done as u64;
        Ok(())
    }

    fn be16(&mut self, what: &'static str, item_at: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.exact(&mut b, what, item_at)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u8(&mut self, what: &'static str, item_at: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.exact(&mut b, what, item_at)?;
        Ok(b[0])
    }

    fn be32(&mut self, what: &'static str, item_at: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what, item_at)?;
        Ok(u32::from_be_bytes(b))
    }

    fn be64(&mut self, what: &'static str, item_at: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what, item_at)?;
        Ok(u64::from_be_bytes(b))
    }

    /// A string preceded by its length in one byte (block and section names).
    fn name(&mut self, what: &'static str, item_at: u64) -> Result<String> {
        let len = self.u8(what, item_at)?;
        let mut bytes = vec![0u8; usize::from(len)];
        self.exact(&mut bytes, what, item_at)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
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

struct Parser<'a, R, S: ?Sized> {
    input: Input<R>,
    expected: &'a ExpectedBlocks,
    ram: &'a mut S,
    blocks: Vec<Block>,
    /// The block the last page record named: a record with CONTINUE is in it.
    current: Option<usize>,
    /// The section id of `ram`, once its START was read.
    ram_section: Option<u32>,
    /// Whether a RAM section after the START was seen.
    streaming: bool,
    page: Box<[u8; PAGE_SIZE]>,
    stats: StreamStats,
    /// The configuration section as read (type byte, length, machine type).
    configuration: Vec<u8>,
}

fn format_error(offset: u64, problem: FormatError) -> StreamError {
    StreamError::Format { offset, problem }
}

impl<R: Read, S: RamSink + ?Sized> Parser<'_, R, S> {
    fn run(&mut self, device_state: &mut dyn Write) -> Result<()> {
        let magic = self.input.be32("the file header", 0)?;
        let version = self.input.be32("the file header", 0)?;
        if magic != FILE_MAGIC {
            return Err(format_error(0, FormatError::NotAStream { magic }));
        }
        if version != FILE_VERSION {
            return Err(format_error(
                4,
                FormatError::Version {
                    version,
                    supported: FILE_VERSION,
                },
            ));
        }
        self.configuration()?;
        loop {
            let at = self.input.pos;
            let kind = self.input.u8("the next section (no device state yet)", at)?;
            match kind {
                SECTION_START => self.start_section(at)?,
                // QEMU's background snapshot sends PART sections only; a plain migration ends `ram`
                // with an END section, whose records are the same.
                SECTION_PART | SECTION_END => {
                    let id = self.input.be32("a section header", at)?;
                    if self.ram_section != Some(id) {
                        return Err(format_error(at, FormatError::UnknownSectionId { id }));
                    }
                    if !self.streaming {
                        self.streaming = true;
                        self.ram.state_captured();
                    }
                    self.records()?;
                    self.footer(id)?;
                }
                SECTION_FULL if self.ram_section.is_some() => return self.device_state(at, device_state),
                SECTION_COMMAND => self.command(at)?,
                kind => {
                    return Err(format_error(
                        at,
                        FormatError::UnexpectedSection {
                            kind,
                            what: unexpected_section(kind, self.ram_section),
                        },
                    ))
                }
            }
        }
    }

    /// A command section: only QEMU 10's switch-over notice, which a file holding the state has
    /// no use for; the others belong to post-copy, return paths or COLO, which change the stream.
    fn command(&mut self, at: u64) -> Result<()> {
        let command = self.input.be16("a command section", at)?;
        let len = self.input.be16("a command section", at)?;
        if command == CMD_SWITCHOVER_START && len == 0 {
            return Ok(());
        }
        Err(format_error(at, FormatError::UnsupportedCommand { command, len }))
    }

    /// The configuration section: the machine type, and no subsection (QEMU adds one for
    /// capabilities that change the stream, x-ignore-shared and mapped-ram, and for UUID checks).
    fn configuration(&mut self) -> Result<()> {
        let at = self.input.pos;
        let kind = self.input.u8("the configuration section", at)?;
        if kind != SECTION_CONFIGURATION {
            return Err(format_error(at, FormatError::NoConfiguration { kind }));
        }
        let len = self.input.be32("the configuration section", at)?;
        if len > MAX_MACHINE_NAME {
            return Err(format_error(at, FormatError::MachineTypeTooLong { len }));
        }
        let mut name = vec![0u8; len as usize];
        self.input.exact(&mut name, "the configuration section", at)?;
        self.stats.machine_type = String::from_utf8_lossy(&name).into_owned();
        self.configuration = [SECTION_CONFIGURATION]
            .into_iter()
            .chain(len.to_be_bytes())
            .chain(name)
            .collect();
        Ok(())
    }

    /// A START section: must be `ram` (the only iterable section without extra capabilities), once,
    /// beginning with the RAM block list.
    fn start_section(&mut self, at: u64) -> Result<()> {
        let what = "a section header";
        let id = self.input.be32(what, at)?;
        let name = self.input.name(what, at)?;
        let instance = self.input.be32(what, at)?;
        let version = self.input.be32(what, at)?;
        if name != RAM_SECTION {
            return Err(format_error(at, FormatError::UnknownIterableSection { name }));
        }
        if self.ram_section.is_some() {
            return Err(format_error(at, FormatError::SecondRamSection));
        }
        if instance != 0 || version != RAM_SECTION_VERSION {
            return Err(format_error(
                at,
                FormatError::RamSectionVersion {
                    instance,
                    version,
                    supported: RAM_SECTION_VERSION,
                },
            ));
        }
        self.ram_section = Some(id);
        let list_at = self.input.pos;
        let word = self.input.be64("the RAM block list", list_at)?;
        if word & FLAG_MASK != FLAG_MEM_SIZE {
            return Err(format_error(
                list_at,
                FormatError::NoBlockList {
                    flags: word & FLAG_MASK,
                },
            ));
        }
        self.block_list(word & !FLAG_MASK)?;
        self.records()?;
        self.footer(id)
    }

    /// Blocks (name, used length) until their lengths add up to `total`.
    fn block_list(&mut self, total: u64) -> Result<()> {
        let mut remaining = total;
        while remaining > 0 {
            let at = self.input.pos;
            let name = self.input.name("the RAM block list", at)?;
            let len = self.input.be64("the RAM block list", at)?;
            if self.blocks.len() == MAX_BLOCKS {
                return Err(format_error(at, FormatError::TooManyBlocks { max: MAX_BLOCKS }));
            }
            if self.blocks.iter().any(|b| b.name == name) {
                return Err(format_error(at, FormatError::DuplicateBlock { name }));
            }
            if len % PAGE_SIZE as u64 != 0 || len > remaining {
                // x-ignore-shared and mapped-ram add fields per block, which land here when their
                // configuration subsection was not seen.
                return Err(format_error(at, FormatError::BlockLength { name, len, total }));
            }
            let guest_ram = name == self.expected.ram_block;
            let expected_len = if guest_ram {
                Some(self.expected.ram_size)
            } else {
                match self.expected.other_blocks.get(&name) {
                    Some(expected_len) => *expected_len,
                    None => return Err(format_error(at, FormatError::UnknownBlock { name })),
                }
            };
            if let Some(expected) = expected_len.filter(|&expected| expected != len) {
                return Err(format_error(at, FormatError::BlockSize { name, len, expected }));
            }
            self.blocks.push(Block { name, len, guest_ram });
            remaining -= len;
        }
        if !self.blocks.iter().any(|b| b.guest_ram) {
            return Err(format_error(
                self.input.pos,
                FormatError::NoGuestRamBlock {
                    name: self.expected.ram_block.clone(),
                },
            ));
        }
        Ok(())
    }

    /// Page records up to the end-of-section record.
    fn records(&mut self) -> Result<()> {
        loop {
            let at = self.input.pos;
            let word = self.input.be64("a RAM record header", at)?;
            let (flags, offset) = (word & FLAG_MASK, word & !FLAG_MASK);
            if flags & !KNOWN_FLAGS != 0 {
                return Err(format_error(at, FormatError::RefusedFlags { flags }));
            }
            match flags & !FLAG_CONTINUE {
                FLAG_EOS if word == FLAG_EOS => return Ok(()),
                FLAG_ZERO | FLAG_PAGE => self.page_record(at, flags, offset)?,
                _ => {
                    return Err(format_error(
                        at,
                        FormatError::UnexpectedRecord {
                            flags,
                            block_offset: offset,
                        },
                    ))
                }
            }
        }
    }

    fn page_record(&mut self, at: u64, flags: u64, offset: u64) -> Result<()> {
        let index = if flags & FLAG_CONTINUE != 0 {
            self.current
                .ok_or_else(|| format_error(at, FormatError::NoBlockToContinue))?
        } else {
            let name = self.input.name("a RAM record's block name", at)?;
            let Some(index) = self.blocks.iter().position(|b| b.name == name) else {
                return Err(format_error(at, FormatError::PageOfUnlistedBlock { name }));
            };
            self.current = Some(index);
            index
        };
        let block = &self.blocks[index];
        if offset
            .checked_add(PAGE_SIZE as u64)
            .is_none_or(|end| end > block.len)
        {
            return Err(format_error(
                at,
                FormatError::PageBeyondBlock {
                    block_offset: offset,
                    name: block.name.clone(),
                    block_len: block.len,
                },
            ));
        }
        let guest_ram = block.guest_ram;
        let page = offset / PAGE_SIZE as u64;
        if flags & FLAG_ZERO != 0 {
            let fill = self.input.u8("a zero-page record", at)?;
            if fill != 0 {
                // QEMU 8.2 and later never write one, and refuse to load one.
                return Err(format_error(at, FormatError::ZeroPageFill { fill }));
            }
            if guest_ram {
                self.stats.ram_zero_pages += 1;
                self.ram
                    .zero(page)
                    .map_err(|source| StreamError::Ram { offset: at, source })?;
            } else {
                self.stats.other_pages_skipped += 1;
            }
        } else {
            self.input.exact(&mut self.page[..], "a page's data", at)?;
            if guest_ram {
                self.stats.ram_pages += 1;
                self.ram
                    .page(page, &self.page)
                    .map_err(|source| StreamError::Ram { offset: at, source })?;
            } else {
                self.stats.other_pages_skipped += 1;
            }
        }
        Ok(())
    }

    fn footer(&mut self, id: u32) -> Result<()> {
        let at = self.input.pos;
        let kind = self.input.u8("a section footer", at)?;
        let footer_id = self.input.be32("a section footer", at)?;
        if kind != SECTION_FOOTER || footer_id != id {
            return Err(format_error(
                at,
                FormatError::MissingFooter {
                    id,
                    kind,
                    found_id: footer_id,
                },
            ));
        }
        Ok(())
    }

    /// Copies everything from the FULL section at `at` (its type byte already read) to the end, behind
    /// the header, and checks that it ends as QEMU ends a stream.
    fn device_state(&mut self, at: u64, out: &mut dyn Write) -> Result<()> {
        let write = |out: &mut dyn Write, bytes: &[u8]| {
            out.write_all(bytes)
                .map_err(|source| StreamError::DeviceStateWrite { source })
        };
        // The header and the stream's own configuration section: the QEMU that loads it then
        // runs with its default `send-configuration=on` and can migrate again.
        let mut prefix = DEVICE_STATE_HEADER.to_vec();
        prefix.extend_from_slice(&self.configuration);
        write(out, &prefix)?;
        write(out, &[SECTION_FULL])?;
        let mut tail = vec![SECTION_FULL];
        let mut written = 1u64;
        loop {
            let chunk = match self.input.reader.fill_buf() {
                Ok([]) => break,
                Ok(chunk) => chunk,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(StreamError::Read {
                        offset: self.input.pos,
                        source,
                    })
                }
            };
            write(out, chunk)?;
            tail.extend_from_slice(chunk);
            if tail.len() > 2 * MAX_TAIL {
                tail.drain(..tail.len() - MAX_TAIL);
            }
            let n = chunk.len();
            self.input.reader.consume(n);
            self.input.pos += n as u64;
            written += n as u64;
        }
        if !ends_like_qemu(&tail) {
            return Err(StreamError::Truncated {
                offset: self.input.pos,
                inside: "the device state, which lacks QEMU's end-of-file marker and description",
                item_at: at,
            });
        }
        out.flush()
            .map_err(|source| StreamError::DeviceStateWrite { source })?;
        self.stats.device_state_bytes = prefix.len() as u64 + written;
        Ok(())
    }
}

/// Whether `tail` ends with QEMU's end of stream: the EOF section type, then the VM description
/// (`0x06`, be32 length, that many bytes of JSON). JSON holds no NUL byte, so the EOF marker is one of
/// the last few NULs.
fn ends_like_qemu(tail: &[u8]) -> bool {
    (0..tail.len().saturating_sub(6)).rev().any(|p| {
        let len = u32::from_be_bytes(tail[p + 2..p + 6].try_into().expect("4 bytes"));
        tail[p] == SECTION_EOF
            && tail[p + 1] == SECTION_VMDESCRIPTION
            && len as usize == tail.len() - (p + 6)
            && tail[p + 6] == b'{'
            && tail.last() == Some(&b'}')
    })
}

/// What an unexpected section of type `kind` is.
fn unexpected_section(kind: u8, ram_started: Option<u32>) -> &'static str {
    match kind {
        SECTION_EOF => "the end of the stream before any device state",
        SECTION_SUBSECTION => {
            "a configuration subsection: capabilities that change the stream (x-ignore-shared, \
             mapped-ram) or UUID validation are on"
        }
        SECTION_FULL if ram_started.is_none() => "device state before the `ram` section",
        SECTION_VMDESCRIPTION => "a VM description before any device state",
        SECTION_CONFIGURATION => "a second configuration section",
        _ => "an unknown section type",
    }
}

fn refused_flags(flags: u64) -> String {
    let names: Vec<&str> = REFUSED_FLAGS
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    format!(
        "RAM record flags {flags:#x} include ones this parser does not read{} (multifd, xbzrle, \
         compression or RDMA are not supported)",
        if names.is_empty() {
            String::new()
        } else {
            format!(": {}", names.join(", "))
        }
    )
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test streams are small (names and lengths fit their fields); random bytes are cut on purpose"
)]
mod tests {
    use super::*;

    const PAGE: u64 = PAGE_SIZE as u64;

    /// Records what the parser hands over: (page, first byte), `None` for a zero page.
    #[derive(Debug, Default)]
    struct Recorder(Vec<(u64, Option<u8>)>);

    impl RamSink for Recorder {
        fn page(&mut self, page: u64, data: &[u8; PAGE_SIZE]) -> memory::Result<()> {
            self.0.push((page, Some(data[0])));
            Ok(())
        }
        fn zero(&mut self, page: u64) -> memory::Result<()> {
            self.0.push((page, None));
            Ok(())
        }
        fn state_captured(&mut self) {
            self.0.push((CAPTURED, None));
        }
    }

    /// Where [`Recorder`] notes [`RamSink::state_captured`].
    const CAPTURED: u64 = u64::MAX;

    fn expected() -> ExpectedBlocks {
        ExpectedBlocks {
            ram_block: "mem".into(),
            ram_size: 16 * PAGE,
            other_blocks: [
                ("pc.bios".to_owned(), Some(2 * PAGE)),
                ("pc.rom".to_owned(), None),
            ]
            .into(),
        }
    }

    /// Writes streams the way QEMU does.
    #[derive(Default)]
    struct Stream(Vec<u8>);

    impl Stream {
        fn u8(mut self, b: u8) -> Self {
            self.0.push(b);
            self
        }
        fn be16(mut self, v: u16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }

        fn be32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn be64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn bytes(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn name(self, name: &str) -> Self {
            self.u8(name.len() as u8).bytes(name.as_bytes())
        }
        fn header(self) -> Self {
            self.bytes(b"QEVM")
                .be32(3)
                .u8(SECTION_CONFIGURATION)
                .be32(11)
                .bytes(b"pc-q35-10.0")
        }
        fn ram_start(self, blocks: &[(&str, u64)]) -> Self {
            let total = blocks.iter().map(|b| b.1).sum::<u64>();
            let mut s = self.u8(SECTION_START).be32(2).name("ram").be32(0).be32(4);
            s = s.be64(total | FLAG_MEM_SIZE);
            for (name, len) in blocks {
                s = s.name(name).be64(*len);
            }
            s.be64(FLAG_EOS).u8(SECTION_FOOTER).be32(2)
        }
        fn part(self) -> Self {
            self.u8(SECTION_PART).be32(2)
        }
        fn end_part(self) -> Self {
            self.be64(FLAG_EOS).u8(SECTION_FOOTER).be32(2)
        }
        /// A page record; `block` is `None` for CONTINUE.
        fn page(self, block: Option<&str>, offset: u64, fill: u8) -> Self {
            self.record(block, offset | FLAG_PAGE).bytes(&[fill; PAGE_SIZE])
        }
        fn zero(self, block: Option<&str>, offset: u64) -> Self {
            self.record(block, offset | FLAG_ZERO).u8(0)
        }
        fn record(self, block: Option<&str>, word: u64) -> Self {
            match block {
                Some(name) => self.be64(word).name(name),
                None => self.be64(word | FLAG_CONTINUE),
            }
        }
        fn device_state(self) -> Self {
            let json = br#"{"page_size": 4096, "devices": []}"#;
            self.bytes(DEVICE_BLOB)
                .u8(SECTION_EOF)
                .u8(SECTION_VMDESCRIPTION)
                .be32(json.len() as u32)
                .bytes(json)
        }
    }

    /// A FULL section as QEMU writes one (`timer`), footer included.
    const DEVICE_BLOB: &[u8] = b"\x04\0\0\0\x03\x05timer\0\0\0\0\0\0\0\x02\x01\x02\x03\x04\x7e\0\0\0\x03";

    fn valid() -> Vec<u8> {
        Stream::default()
            .header()
            .ram_start(&[("mem", 16 * PAGE), ("pc.bios", 2 * PAGE), ("pc.rom", PAGE)])
            .part()
            .page(Some("mem"), 0, 1)
            .zero(None, PAGE)
            .page(Some("pc.bios"), PAGE, 9)
            .zero(None, 0)
            .page(Some("mem"), 15 * PAGE, 2)
            .page(None, 0, 3)
            .end_part()
            .part()
            .end_part()
            .device_state()
            .0
    }

    /// What a parse hands over: statistics, the pages (as [`Recorder`] keeps them), the device state.
    type Parsed = (StreamStats, Vec<(u64, Option<u8>)>, Vec<u8>);

    fn parse(bytes: &[u8]) -> Result<Parsed> {
        let mut ram = Recorder::default();
        let mut device = Vec::new();
        let stats = parse_migration_stream(bytes, &expected(), &mut ram, &mut device)?;
        Ok((stats, ram.0, device))
    }

    fn error_of(bytes: &[u8]) -> String {
        parse(bytes).expect_err("the stream must be refused").to_string()
    }

    #[test]
    fn valid_stream_hands_over_pages_and_device_state() {
        let bytes = valid();
        let (stats, pages, device) = parse(&bytes).unwrap();
        assert_eq!(
            pages,
            [
                (CAPTURED, None),
                (0, Some(1)),
                (1, None),
                (15, Some(2)),
                (0, Some(3))
            ]
        );
        let blob_at = bytes
            .windows(DEVICE_BLOB.len())
            .position(|w| w == DEVICE_BLOB)
            .unwrap();
        // The header and the stream's configuration section, then the devices.
        assert_eq!(&device[..24], b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35-10.0");
        assert_eq!(&device[24..], &bytes[blob_at..]);
        assert_eq!(
            device_state_format(&device),
            Ok(DeviceStateFormat::Configured {
                machine_type: "pc-q35-10.0".into(),
                devices_at: 24
            })
        );
        assert_eq!(
            stats,
            StreamStats {
                machine_type: "pc-q35-10.0".into(),
                bytes_read: bytes.len() as u64,
                ram_pages: 3,
                ram_zero_pages: 1,
                other_pages_skipped: 2,
                device_state_bytes: device.len() as u64,
            }
        );
    }

    #[test]
    fn qemu_10s_switch_over_notice_between_ram_sections_is_skipped() {
        let mut bytes = valid();
        let plain = parse(&bytes).unwrap();
        // Before the device state, as a pre-copy migration sends it.
        let blob_at = bytes
            .windows(DEVICE_BLOB.len())
            .position(|w| w == DEVICE_BLOB)
            .unwrap();
        let notice = Stream::default()
            .u8(SECTION_COMMAND)
            .be16(CMD_SWITCHOVER_START)
            .be16(0)
            .0;
        bytes.splice(blob_at..blob_at, notice.iter().copied());
        let (stats, pages, device) = parse(&bytes).unwrap();
        assert_eq!((pages, device), (plain.1, plain.2));
        assert_eq!(stats.bytes_read, plain.0.bytes_read + 5);
    }

    #[test]
    fn device_state_files_are_recognised_with_and_without_configuration() {
        let prefix = device_state_prefix("pc-q35-10.0").unwrap();
        assert_eq!(prefix, b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35-10.0");
        let mut configured = prefix.clone();
        configured.extend_from_slice(DEVICE_BLOB);
        assert_eq!(
            device_state_format(&configured),
            Ok(DeviceStateFormat::Configured {
                machine_type: "pc-q35-10.0".into(),
                devices_at: prefix.len()
            })
        );
        // What `xen-save-devices-state` writes and older domsnap versions stored.
        let mut legacy = DEVICE_STATE_HEADER.to_vec();
        legacy.extend_from_slice(DEVICE_BLOB);
        assert_eq!(device_state_format(&legacy), Ok(DeviceStateFormat::Legacy));
        for (bytes, reason) in [
            (&b"hello, world"[..], "not a QEMU device-state file"),
            (&b"QEVM\0\0\0\x03"[..], "nothing after the header"),
            (&b"QEVM\0\0\0\x03\x07\0\0"[..], "cut short"),
            (&b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35"[..], "cut short"),
            (
                &b"QEVM\0\0\0\x03\x07\0\0\x10\0"[..],
                "machine type name of 4096 bytes",
            ),
            (&b"QEVM\0\0\0\x03\x02"[..], "section type 0x02"),
        ] {
            let error = device_state_format(bytes).unwrap_err();
            assert!(error.contains(reason), "{bytes:?}: {error}");
        }
        assert!(configuration_section(&"x".repeat(257)).is_err());
        assert_eq!(configuration_section("").unwrap(), b"\x07\0\0\0\0");
    }

    #[test]
    fn every_truncation_is_an_error_naming_where_it_ends() {
        let bytes = valid();
        // Every offset, except most of the inside of page data (all alike).
        let cuts = (0..bytes.len()).filter(|&n| bytes[..n].len() % 61 == 0 || !is_in_page_data(&bytes, n));
        for n in cuts {
            let error = parse(&bytes[..n]).expect_err("a cut stream must be refused");
            match &error {
                StreamError::Truncated { offset, .. } => assert_eq!(*offset, n as u64, "{error}"),
                other => panic!("cut at {n}: {other}"),
            }
        }
    }

    /// Whether byte `n` is in the middle of a run of equal bytes (page data in [`valid`]).
    fn is_in_page_data(bytes: &[u8], n: usize) -> bool {
        n > 8 && n + 8 < bytes.len() && bytes[n - 8..n + 8].iter().all(|&b| b == bytes[n])
    }

    #[test]
    fn unknown_record_flags_are_refused_by_name() {
        for (flag, name) in REFUSED_FLAGS.iter().copied().chain([(0x400, "")]) {
            let bytes = Stream::default()
                .header()
                .ram_start(&[("mem", 16 * PAGE)])
                .part()
                .record(Some("mem"), flag | FLAG_PAGE)
                .0;
            let error = error_of(&bytes);
            assert!(
                error.contains("does not read") && error.contains(name),
                "{flag:#x}: {error}"
            );
        }
    }

    #[test]
    fn streams_it_does_not_know_are_refused() {
        let start = || {
            Stream::default()
                .header()
                .ram_start(&[("mem", 16 * PAGE), ("pc.bios", 2 * PAGE)])
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"QEVX\0\0\0\x03".to_vec(), "not QEVM"),
            (b"QEVM\0\0\0\x02".to_vec(), "version 2"),
            (
                Stream::default().bytes(b"QEVM").be32(3).u8(SECTION_START).0,
                "configuration section",
            ),
            (
                Stream::default()
                    .header()
                    .u8(SECTION_SUBSECTION)
                    .name("configuration/capabilities")
                    .0,
                "x-ignore-shared",
            ),
            (
                Stream::default()
                    .header()
                    .u8(SECTION_START)
                    .be32(1)
                    .name("dirty-bitmap")
                    .be32(0)
                    .be32(1)
                    .0,
                "unknown iterable section `dirty-bitmap`",
            ),
            (
                Stream::default().header().bytes(DEVICE_BLOB).0,
                "device state before",
            ),
            (start().u8(SECTION_COMMAND).0, "command section"),
            // MIG_CMD_POSTCOPY_ADVISE, 16 bytes.
            (
                start().u8(SECTION_COMMAND).be16(3).be16(16).0,
                "command 3 (16 bytes)",
            ),
            (start().u8(0x42).0, "unknown section type"),
            (start().u8(SECTION_EOF).0, "before any device state"),
            (start().u8(SECTION_PART).be32(7).0, "section 7 continues"),
            (
                Stream::default()
                    .header()
                    .ram_start(&[("mem", 16 * PAGE), ("nvram", PAGE)])
                    .0,
                "`nvram` is not one of the domain's",
            ),
            (
                Stream::default().header().ram_start(&[("mem", 8 * PAGE)]).0,
                "`mem` has 0x8000 bytes, the domain's has 0x10000",
            ),
            (
                Stream::default()
                    .header()
                    .ram_start(&[("mem", 16 * PAGE), ("pc.bios", PAGE)])
                    .0,
                "`pc.bios` has 0x1000 bytes",
            ),
            (
                Stream::default().header().ram_start(&[("pc.bios", 2 * PAGE)]).0,
                "no guest RAM block",
            ),
            (
                Stream::default()
                    .header()
                    .ram_start(&[("mem", 16 * PAGE), ("mem", 16 * PAGE)])
                    .0,
                "declared twice",
            ),
            (
                // x-ignore-shared's extra field after each block, without its subsection.
                Stream::default()
                    .header()
                    .u8(SECTION_START)
                    .be32(2)
                    .name("ram")
                    .be32(0)
                    .be32(4)
                    .be64((18 * PAGE) | FLAG_MEM_SIZE)
                    .name("mem")
                    .be64(16 * PAGE)
                    .be64(0)
                    .name("pc.bios")
                    .be64(2 * PAGE)
                    .be64(0xfffc_0000)
                    .0,
                "block `` of 0x",
            ),
            (
                start().part().page(Some("mem"), 16 * PAGE, 1).0,
                "beyond RAM block `mem`",
            ),
            (
                start().part().zero(Some("pc.bios"), !FLAG_MASK).0,
                "beyond RAM block `pc.bios`",
            ),
            (
                start().part().page(Some("pc.rom"), 0, 1).0,
                "`pc.rom`, not in the block list",
            ),
            (start().part().page(None, 0, 1).0, "none was named"),
            (
                start().part().record(Some("mem"), FLAG_ZERO).u8(0xaa).0,
                "fill byte 0xaa",
            ),
            (start().part().be64(FLAG_MEM_SIZE).0, "flags 0x4"),
            (start().part().be64(FLAG_EOS | PAGE).0, "flags 0x10"),
            (
                start().part().be64(FLAG_EOS).u8(SECTION_FOOTER).be32(3).0,
                "no footer",
            ),
            (
                start().part().end_part().bytes(DEVICE_BLOB).u8(SECTION_EOF).0,
                "end-of-file marker",
            ),
            (
                Stream::default().header().u8(SECTION_CONFIGURATION).0,
                "a second configuration",
            ),
            (Stream::default().header().0, "no device state yet"),
            (start().0, "no device state yet"),
        ];
        for (bytes, expected) in cases {
            let error = error_of(&bytes);
            assert!(error.contains(expected), "expected {expected:?} in: {error}");
        }
    }

    #[test]
    fn refusals_carry_their_context_and_the_drivers_error_shows_the_same_text() {
        let error = parse(b"QEVX\0\0\0\x03").unwrap_err();
        assert!(
            matches!(
                error,
                StreamError::Format {
                    offset: 0,
                    problem: FormatError::NotAStream { magic: 0x5145_5658 }
                }
            ),
            "{error:?}"
        );
        let text = error.to_string();
        assert_eq!(
            text,
            "QEMU migration stream, at byte 0: magic 0x51455658 is not QEVM: not a QEMU migration stream"
        );
        assert_eq!(crate::Error::from(error).to_string(), text);

        let bytes = Stream::default().header().ram_start(&[("mem", 8 * PAGE)]).0;
        let error = parse(&bytes).unwrap_err();
        let StreamError::Format { problem, .. } = &error else {
            panic!("{error}")
        };
        assert_eq!(
            *problem,
            FormatError::BlockSize {
                name: "mem".into(),
                len: 8 * PAGE,
                expected: 16 * PAGE
            }
        );
        // Header (8), configuration section (16), `ram` START (17), block list total (8).
        assert_eq!(error.offset(), Some(49));
    }

    #[test]
    fn sink_errors_name_the_record() {
        struct Full;
        impl RamSink for Full {
            fn page(&mut self, page: u64, _: &[u8; PAGE_SIZE]) -> memory::Result<()> {
                Err(memory::Error::PageOutOfRange { page, pages: 0 })
            }
            fn zero(&mut self, page: u64) -> memory::Result<()> {
                Err(memory::Error::PageOutOfRange { page, pages: 0 })
            }
        }
        let bytes = valid();
        let error = parse_migration_stream(&bytes[..], &expected(), &mut Full, &mut Vec::new()).unwrap_err();
        // The first page record: 8 bytes before the second `mem` (the first is in the block list).
        let names: Vec<usize> = (0..bytes.len())
            .filter(|&i| bytes[i..].starts_with(b"\x03mem"))
            .collect();
        let first_record = names[1] - 8;
        assert!(
            matches!(error, StreamError::Ram { offset, .. } if offset == first_record as u64),
            "{error}"
        );
    }

    /// splitmix64, for reproducible mutations.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random damage (flipped, overwritten, removed, repeated bytes; random bytes) never panics: the
    /// parser returns a result, and every page it hands over is inside the block.
    #[test]
    fn damaged_streams_never_panic() {
        let valid = valid();
        let mut rng = Rng(7);
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..3000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(5) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = rng.next() as u8,
                    2 => drop(bytes.drain(at..(at + 1 + rng.below(16)).min(bytes.len()))),
                    3 => {
                        let piece = bytes[at..(at + 1 + rng.below(64)).min(bytes.len())].to_vec();
                        bytes.splice(at..at, piece);
                    }
                    _ => bytes.truncate(at),
                }
            }
            match parse(&bytes) {
                Ok((_, pages, _)) => {
                    assert!(pages.iter().all(|&(page, _)| page < 16 || page == CAPTURED));
                    accepted += 1;
                }
                Err(_) => refused += 1,
            }
        }
        for len in [0, 1, 7, 8, 100, 5000] {
            let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(parse(&noise).is_err());
        }
        // Most damage is caught; what is accepted hit page data or the opaque device state.
        assert!(refused > accepted, "{refused} refused, {accepted} accepted");
    }
}
