//! QEMU's migration settings around a streamed snapshot, and the checks before one: no other
//! migration, no capability that changes the stream, RAM laid out as the image expects.

use std::{collections::BTreeMap, time::Instant};

use memory::ImageLayout;
use qmp::{
    commands::{
        MigrateSetCapabilities, MigrateSetParameters, MigrationCapability, MigrationCapabilityStatus,
        QueryMigrate,
    },
    Client, MigrationStatus,
};
use snapshot_core::StreamMode;

use crate::{
    command_line::RAM_BACKEND_ID,
    error::{Error, Result},
    migration_stream::ExpectedBlocks,
    ram_layout::ram_layout,
};

/// Capabilities that may be on: they do not change the stream (the snapshot capabilities are set
/// explicitly by every snapshot).
const HARMLESS_CAPABILITIES: [&str; 3] = ["events", "background-snapshot", "pause-before-switchover"];

pub(super) async fn check_migration_idle(client: &Client) -> Result<()> {
    let info = client.execute(&QueryMigrate).await.map_err(|source| Error::Qmp {
        operation: "querying the migration state",
        source,
    })?;
    match info.status {
        None
        | Some(
            MigrationStatus::None
            | MigrationStatus::Completed
            | MigrationStatus::Failed
            | MigrationStatus::Cancelled,
        ) => Ok(()),
        Some(status) => Err(Error::MigrationBusy {
            status: status.as_str().to_owned(),
        }),
    }
}

/// Refuses capabilities and modes that change the stream (the parser would refuse most of them
/// later, but x-ignore-shared, for one, leaves guest RAM out of the stream). Returns the settings
/// a snapshot changes, to be put back afterwards.
pub(super) async fn check_settings(client: &Client) -> Result<Settings> {
    let qmp = |operation| move |source| Error::Qmp { operation, source };
    let capabilities = client
        .execute_raw("query-migrate-capabilities", serde_json::Value::Null)
        .await
        .map_err(qmp("querying migration capabilities"))?;
    let on: Vec<&str> = capabilities
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str())
        .collect();
    let changing: Vec<&str> = on
        .iter()
        .copied()
        .filter(|name| !HARMLESS_CAPABILITIES.contains(name))
        .collect();
    if !changing.is_empty() {
        return Err(Error::MigrationSettings {
            reason: format!("migration capabilities {} are on", changing.join(", ")),
        });
    }
    let parameters = client
        .execute_raw("query-migrate-parameters", serde_json::Value::Null)
        .await
        .map_err(qmp("querying migration parameters"))?;
    match parameters["mode"].as_str() {
        None | Some("normal") => {}
        Some(mode) => {
            return Err(Error::MigrationSettings {
                reason: format!("migration mode is {mode}"),
            })
        }
    }
    Ok(Settings {
        events: on.contains(&"events"),
        max_bandwidth: parameters["max-bandwidth"].as_u64(),
        downtime_limit: parameters["downtime-limit"].as_u64(),
    })
}

/// The migration settings a snapshot changes, as they were before.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    events: bool,
    max_bandwidth: Option<u64>,
    downtime_limit: Option<u64>,
}

impl Settings {
    /// Sets QEMU up for `mode`: its capability on (and the other off: a crashed toolstack may
    /// have left it on), `MIGRATION` events on, no bandwidth limit (the reader is local), and
    /// for pre-copy the downtime limit.
    pub(super) async fn apply(&self, client: &Client, mode: StreamMode) -> Result<()> {
        set_capabilities(client, mode, true).await?;
        let downtime_limit = match mode {
            StreamMode::Precopy { max_downtime, .. } => {
                Some(u64::try_from(max_downtime.as_millis()).unwrap_or(u64::MAX).max(1))
            }
            StreamMode::Paused | StreamMode::Background => None,
        };
        set_parameters(client, Some(0), downtime_limit).await
    }

    /// Puts back what [`Settings::apply`] changed.
    pub(super) async fn restore(&self, client: &Client, mode: StreamMode) -> Result<()> {
        let capabilities = set_capabilities(client, mode, self.events).await;
        let parameters = set_parameters(client, self.max_bandwidth, self.downtime_limit).await;
        capabilities.and(parameters)
    }
}

/// Switches `mode`'s capability on (`on`) or every snapshot capability off, `events` as given.
///
/// `events` is set on its own (QEMU refuses no combination with it), and while
/// `background-snapshot` is off: QEMU checks the whole resulting set at each call, and with
/// `background-snapshot` in it that check registers and write-protects all of guest RAM with
/// userfaultfd (84 ms per call measured at 4 GiB). So `events` goes first when switching on and
/// last when switching off, and the check runs once.
async fn set_capabilities(client: &Client, mode: StreamMode, on: bool) -> Result<()> {
    let setting = |capability, state| MigrationCapabilityStatus { capability, state };
    let capabilities = MigrateSetCapabilities {
        capabilities: vec![
            setting(
                MigrationCapability::BackgroundSnapshot,
                on && mode == StreamMode::Background,
            ),
            setting(
                MigrationCapability::PauseBeforeSwitchover,
                on && mode.hypervisor_pauses(),
            ),
        ],
    };
    let events = MigrateSetCapabilities {
        capabilities: vec![setting(MigrationCapability::Events, on)],
    };
    let (first, second) = match on {
        true => ((&events, EVENTS), (&capabilities, MODE)),
        false => ((&capabilities, MODE), (&events, EVENTS)),
    };
    for (capabilities, operation) in [first, second] {
        client
            .execute(capabilities)
            .await
            .map_err(|source| Error::Qmp { operation, source })?;
    }
    Ok(())
}

const MODE: &str = "setting migration capabilities";
const EVENTS: &str = "setting the migration events capability";

async fn set_parameters(
    client: &Client,
    max_bandwidth: Option<u64>,
    downtime_limit: Option<u64>,
) -> Result<()> {
    let parameters = MigrateSetParameters {
        max_bandwidth,
        downtime_limit,
        ..MigrateSetParameters::default()
    };
    client
        .execute(&parameters)
        .await
        .map(drop)
        .map_err(|source| Error::Qmp {
            operation: "setting migration parameters",
            source,
        })
}

/// The stream numbers guest RAM by offset in the RAM file, the image by its regions in address
/// order: they agree when the regions sit in the file one after the other, in address order (as q35
/// maps its RAM below and above 4 GiB).
pub(super) async fn check_layout(client: &Client, layout: &ImageLayout) -> Result<()> {
    let regions = ram_layout(client).await?;
    let mut file_offset = 0;
    let agrees = regions.len() == layout.regions().len()
        && regions.iter().zip(layout.regions()).all(|(file, image)| {
            let ok = file.gpa == image.gpa && file.len == image.len && file.file_offset == file_offset;
            file_offset += file.len;
            ok
        });
    if agrees {
        Ok(())
    } else {
        Err(Error::RamLayout {
            reason: format!(
                "the image layout {:?} is not the RAM file's regions in file order {regions:?}",
                layout.regions()
            ),
        })
    }
}

/// The RAM blocks of the QEMU behind `client` (`info ramblock`), as a stream of it must declare
/// them: the guest RAM block ([`RAM_BACKEND_ID`]) checked to have `ram_size` bytes, the others
/// (ROMs) with their current sizes.
pub async fn expected_blocks(client: &Client, ram_size: u64) -> Result<ExpectedBlocks> {
    let text = client
        .execute_raw(
            "human-monitor-command",
            serde_json::json!({ "command-line": "info ramblock" }),
        )
        .await
        .map_err(|source| Error::Qmp {
            operation: "listing RAM blocks",
            source,
        })?;
    let mut blocks = parse_ramblocks(text.as_str().unwrap_or_default())?;
    match blocks.remove(RAM_BACKEND_ID) {
        Some(size) if size == ram_size => Ok(ExpectedBlocks {
            ram_block: RAM_BACKEND_ID.to_owned(),
            ram_size,
            other_blocks: blocks
                .into_iter()
                .map(|(name, size)| (name, Some(size)))
                .collect(),
        }),
        Some(size) => Err(Error::RamLayout {
            reason: format!("RAM block `{RAM_BACKEND_ID}` has {size} bytes, the image {ram_size}"),
        }),
        None => Err(Error::RamLayout {
            reason: format!("QEMU has no RAM block `{RAM_BACKEND_ID}`"),
        }),
    }
}

/// Parses `info ramblock`: a header line, then per block its name, page size (`4 KiB`), offset,
/// used length, total length, host address and `ro`/`rw`.
fn parse_ramblocks(text: &str) -> Result<BTreeMap<String, u64>> {
    let invalid = |reason: String| Error::RamLayout { reason };
    let mut blocks = BTreeMap::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let used = (words.len() == 8)
            .then(|| words[4].strip_prefix("0x"))
            .flatten()
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| invalid(format!("cannot parse `info ramblock` line {:?}", line.trim())))?;
        blocks.insert(words[0].to_owned(), used);
    }
    if blocks.is_empty() {
        return Err(invalid(format!("`info ramblock` lists no blocks: {text:?}")));
    }
    Ok(blocks)
}

/// Makes QEMU populate all guest RAM now, while the guest runs. A background snapshot
/// write-protects every page, and QEMU first populates the ones never touched; the first snapshot
/// of a QEMU process would do that inside the caller's pause (≈ 1.2 s for 1 GiB here). Setting the
/// memory backend's `prealloc` does it ahead, once per process (later calls see it set). It costs
/// no memory the snapshot would not take anyway. Best effort: a QEMU that refuses only pays the
/// longer first pause.
pub(super) async fn populate_ram(client: &Client) {
    let path = format!("/objects/{RAM_BACKEND_ID}");
    let get = serde_json::json!({ "path": path, "property": "prealloc" });
    if let Ok(serde_json::Value::Bool(true)) = client.execute_raw("qom-get", get).await {
        return;
    }
    let started = Instant::now();
    let set = serde_json::json!({ "path": path, "property": "prealloc", "value": true });
    match client.execute_raw("qom-set", set).await {
        Ok(_) => tracing::debug!(elapsed = ?started.elapsed(), "guest RAM populated before the pause"),
        Err(error) => tracing::warn!(%error, "cannot populate guest RAM ahead; the first pause is longer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream_save::fake_qmp::fake_qmp;

    /// The `arguments` of each `migrate-set-capabilities` QEMU gets, in order (every command is
    /// answered with an empty return).
    async fn capability_calls(mode: StreamMode, on: bool) -> Vec<serde_json::Value> {
        let fake = fake_qmp(|_| Some(serde_json::json!({}))).await;
        set_capabilities(&fake.client, mode, on).await.unwrap();
        drop(fake.client);
        let commands = fake.commands.await.unwrap();
        commands
            .into_iter()
            .filter(|c| c["execute"] == "migrate-set-capabilities")
            .map(|c| c["arguments"].clone())
            .collect()
    }

    fn states(arguments: &serde_json::Value) -> Vec<(String, bool)> {
        let list = arguments["capabilities"].as_array().unwrap();
        list.iter()
            .map(|c| {
                (
                    c["capability"].as_str().unwrap().to_owned(),
                    c["state"].as_bool().unwrap(),
                )
            })
            .collect()
    }

    /// QEMU checks the whole capability set at each call, and with `background-snapshot` on that
    /// check write-protects all of RAM: `events` must never be set while it is on.
    #[tokio::test]
    async fn events_are_set_while_background_snapshot_is_off() {
        let on = capability_calls(StreamMode::Background, true).await;
        assert_eq!(on.len(), 2);
        assert_eq!(states(&on[0]), [("events".to_owned(), true)]);
        assert!(states(&on[1]).contains(&("background-snapshot".to_owned(), true)));
        let off = capability_calls(StreamMode::Background, false).await;
        assert_eq!(off.len(), 2);
        assert!(states(&off[0]).contains(&("background-snapshot".to_owned(), false)));
        assert_eq!(states(&off[1]), [("events".to_owned(), false)]);
    }

    #[test]
    fn ramblocks_from_qemu_10() {
        let text = "              Block Name    PSize              Offset               Used              Total                HVA  RO\r\n                     mem    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007fd65ffff000  rw\r\n    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007fd65ec00000  ro\r\n                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007fd65fe00000  ro\r\n";
        let blocks = parse_ramblocks(text).unwrap();
        assert_eq!(
            blocks,
            [
                ("/rom@etc/acpi/tables".to_owned(), 0x20000),
                ("mem".to_owned(), 0x0800_0000),
                ("pc.bios".to_owned(), 0x40000),
            ]
            .into()
        );
        assert!(parse_ramblocks("header only\n").is_err());
        assert!(parse_ramblocks("header\nmem 4 KiB 0x0 zz 0x0 0x0 rw\n").is_err());
    }
}
