//! The migration's reading of a stream that ends early, against a scripted QMP peer.

use std::collections::BTreeMap;

use memory::RegionInfo;
use serde_json::{json, Value};

use super::{fake_qmp::fake_qmp, *};
use crate::migration_stream::ExpectedBlocks;

const RAM: u64 = 16 * PAGE_SIZE as u64;

/// Runs a migration's wait on a stream that ends before its first byte, with QEMU's side
/// answering as `answer` does; returns the error the wait reports.
async fn error_of_an_empty_stream(answer: impl FnMut(&Value) -> Option<Value> + Send + 'static) -> Error {
    let fake = fake_qmp(answer).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = ImageLayout::for_regions(vec![RegionInfo { gpa: 0, len: RAM }]).unwrap();
    let outputs = Outputs::create(
        &dir.path().join("memory.img"),
        &dir.path().join("device.state"),
        layout,
        Durability::NoSync,
    )
    .unwrap();
    let (reader, writer) = UnixStream::pair().unwrap();
    drop(writer);
    let expected = ExpectedBlocks {
        ram_block: "mem".into(),
        ram_size: RAM,
        other_blocks: BTreeMap::new(),
    };
    let mut parser = Parser::spawn(reader, expected, outputs, None).unwrap();
    let mut migration = Migration {
        client: &fake.client,
        events: fake.client.subscribe(),
        parser: &mut parser,
        parsed: None,
        resumed: None,
    };
    let error = migration
        .wait_for(MigrationStatus::Completed, None)
        .await
        .unwrap_err();
    parser.abort().await;
    error
}

/// A QEMU killed mid-migration ends its stream wherever it was: the error must say that QEMU is
/// gone, not only that the stream was cut short.
#[tokio::test]
async fn a_stream_cut_by_a_dead_qemu_reports_qemu_gone() {
    // QEMU hangs up at the first command after the stream ended, as a killed one does.
    let error = error_of_an_empty_stream(|_| None).await;
    assert!(matches!(error, Error::Qmp { .. }), "{error:?}");
}

/// With QEMU still there, the stream's own fault is the one to report.
#[tokio::test]
async fn a_stream_cut_short_under_a_live_qemu_reports_the_stream() {
    let error = error_of_an_empty_stream(|_| Some(json!({"status": "active"}))).await;
    assert!(error.to_string().contains("cut short"), "{error}");
}
