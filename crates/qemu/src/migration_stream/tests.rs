//! The parser against streams written the way QEMU writes them: whole, cut at every byte,
//! carrying what it refuses, and damaged at random.

use super::{format::*, *};

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
