//! Feeds arbitrary bytes to QEMU's migration stream parser (`qemu::parse_migration_stream`):
//! any input must give stats or an error, never a panic; pages reported must lie inside the
//! declared RAM block.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memory::PAGE_SIZE;
use qemu::{parse_migration_stream, ExpectedBlocks, RamSink};

const RAM_PAGES: u64 = 64;

struct Sink;

impl RamSink for Sink {
    fn page(&mut self, page: u64, _data: &[u8; PAGE_SIZE]) -> memory::Result<()> {
        assert!(page < RAM_PAGES, "page {page} outside the RAM block");
        Ok(())
    }
    fn zero(&mut self, page: u64) -> memory::Result<()> {
        assert!(page < RAM_PAGES, "page {page} outside the RAM block");
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let expected = ExpectedBlocks {
        ram_block: "mem".into(),
        ram_size: RAM_PAGES * PAGE_SIZE as u64,
        other_blocks: [
            ("pc.bios".to_owned(), Some(2 * PAGE_SIZE as u64)),
            ("pc.rom".to_owned(), None),
        ]
        .into(),
    };
    let mut device_state = Vec::new();
    let _ = parse_migration_stream(data, &expected, &mut Sink, &mut device_state);
});
