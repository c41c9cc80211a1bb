//! Reading the stream: [`Input`] reads it exactly and counts its bytes, [`Parser`] walks its
//! sections and RAM records and copies the device state.

use std::io::{self, BufRead, BufReader, Read, Write};

use memory::PAGE_SIZE;

use super::format::{
    CMD_SWITCHOVER_START, DEVICE_STATE_HEADER, FILE_MAGIC, FILE_VERSION, FLAG_CONTINUE, FLAG_EOS, FLAG_MASK,
    FLAG_MEM_SIZE, FLAG_PAGE, FLAG_ZERO, KNOWN_FLAGS, MAX_MACHINE_NAME, RAM_SECTION, RAM_SECTION_VERSION,
    REFUSED_FLAGS, SECTION_COMMAND, SECTION_CONFIGURATION, SECTION_END, SECTION_EOF, SECTION_FOOTER,
    SECTION_FULL, SECTION_PART, SECTION_START, SECTION_SUBSECTION, SECTION_VMDESCRIPTION,
};
use super::{ExpectedBlocks, FormatError, RamSink, Result, StreamError, StreamStats};

/// Most RAM blocks a block list may declare.
const MAX_BLOCKS: usize = 1024;
/// Read buffer: a pipe delivers up to its size per read; 1 MiB keeps system calls rare.
pub(super) const READ_BUFFER: usize = 1 << 20;
/// Most bytes of the device state's end kept to check its end-of-file marker and description.
const MAX_TAIL: usize = 16 << 20;

/// A RAM block declared by the stream.
pub(super) struct Block {
    name: String,
    len: u64,
    guest_ram: bool,
}

/// The stream with the offset of the next byte to read.
pub(super) struct Input<R> {
    pub(super) reader: BufReader<R>,
    pub(super) pos: u64,
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

pub(super) struct Parser<'a, R, S: ?Sized> {
    pub(super) input: Input<R>,
    pub(super) expected: &'a ExpectedBlocks,
    pub(super) ram: &'a mut S,
    pub(super) blocks: Vec<Block>,
    /// The block the last page record named: a record with CONTINUE is in it.
    pub(super) current: Option<usize>,
    /// The section id of `ram`, once its START was read.
    pub(super) ram_section: Option<u32>,
    /// Whether a RAM section after the START was seen.
    pub(super) streaming: bool,
    pub(super) page: Box<[u8; PAGE_SIZE]>,
    pub(super) stats: StreamStats,
    /// The configuration section as read (type byte, length, machine type).
    pub(super) configuration: Vec<u8>,
}

fn format_error(offset: u64, problem: FormatError) -> StreamError {
    StreamError::Format { offset, problem }
}

impl<R: Read, S: RamSink + ?Sized> Parser<'_, R, S> {
    pub(super) fn run(&mut self, device_state: &mut dyn Write) -> Result<()> {
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

pub(super) fn refused_flags(flags: u64) -> String {
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
