//! QEMU's own ways of doing the same, with QEMU's default migration parameters, on the same domain's
//! QEMU (through [`Monitor`]): internal snapshots with the VM state in the guest's qcow2 disk
//! (`snapshot-save` / `snapshot-load` jobs, which snapshot and revert that disk too) and migration
//! to and from a file (`migrate` / `migrate-incoming` with a `file:` URI: memory and devices, no
//! disk snapshot).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use qmp::{commands::*, JobOptions};

use crate::{file_size, fsync, path_str, Bench, Monitor, Vm, DISK};

/// The guest disk's qcow2 node: `snapshot-save` writes the VM state into it and snapshots it, as
/// libvirt's internal snapshot of a domain with one qcow2 disk does.
fn disk_node() -> String {
    qemu::disk_nodes(DISK).1
}

/// Runs a `snapshot-*` job to its end (it is dismissed afterwards, a QMP round trip).
fn run_job<C: qmp::commands::Command>(bench: &Bench, qemu: &Monitor, command: &C, id: &str) -> Result<()> {
    bench
        .block_on(qemu.client.run_job(command, id, &JobOptions::default()))
        .with_context(|| format!("QEMU job {id}"))
}

/// `snapshot-save` of the running guest (QEMU stops it for the whole save and resumes it):
/// from the command until the job concluded.
pub fn snapshot_save(bench: &Bench, qemu: &Monitor, tag: &str) -> Result<Duration> {
    let id = format!("save-{tag}");
    let started = Instant::now();
    let command = SnapshotSave {
        job_id: id.clone(),
        tag: tag.to_owned(),
        vmstate: disk_node(),
        devices: vec![disk_node()],
    };
    run_job(bench, qemu, &command, &id)?;
    Ok(started.elapsed())
}

/// Removes an internal snapshot (not timed), so the image does not grow from one repetition to the
/// next.
pub fn snapshot_delete(bench: &Bench, qemu: &Monitor, tag: &str) -> Result<()> {
    let id = format!("delete-{tag}");
    let command = SnapshotDelete {
        job_id: id.clone(),
        tag: tag.to_owned(),
        devices: vec![disk_node()],
    };
    run_job(bench, qemu, &command, &id)
}

/// `snapshot-load` into the same, running QEMU (memory, devices and the disk), the guest paused
/// before (not timed) so that, like the other reverts, it ends paused: from the command until the
/// job concluded. The guest is resumed after.
pub fn snapshot_load(bench: &Bench, qemu: &Monitor, tag: &str) -> Result<Duration> {
    let id = format!("load-{tag}");
    qemu.execute(bench, &Stop)?;
    let started = Instant::now();
    let command = SnapshotLoad {
        job_id: id.clone(),
        tag: tag.to_owned(),
        vmstate: disk_node(),
        devices: vec![disk_node()],
    };
    run_job(bench, qemu, &command, &id)?;
    let wall = started.elapsed();
    qemu.execute(bench, &Cont)?;
    Ok(wall)
}

/// Sets QEMU's migration bandwidth limit (bytes per second; QEMU's default is 128 MiB/s).
pub fn set_max_bandwidth(bench: &Bench, qemu: &Monitor, bytes_per_second: u64) -> Result<()> {
    qemu.execute(
        bench,
        &MigrateSetParameters {
            max_bandwidth: Some(bytes_per_second),
            ..Default::default()
        },
    )?;
    Ok(())
}

/// Sets QEMU's migration downtime limit (milliseconds; QEMU's default is 300).
pub fn set_downtime_limit(bench: &Bench, qemu: &Monitor, ms: u64) -> Result<()> {
    qemu.execute(
        bench,
        &MigrateSetParameters {
            downtime_limit: Some(ms),
            ..Default::default()
        },
    )?;
    Ok(())
}

/// QEMU's current downtime limit (milliseconds).
pub fn downtime_limit(bench: &Bench, qemu: &Monitor) -> Result<u64> {
    let parameters = bench
        .block_on(
            qemu.client
                .execute_raw("query-migrate-parameters", serde_json::json!({})),
        )
        .context("QMP query-migrate-parameters")?;
    parameters["downtime-limit"]
        .as_u64()
        .with_context(|| format!("no downtime-limit in {parameters}"))
}

/// QEMU's current migration bandwidth limit.
pub fn max_bandwidth(bench: &Bench, qemu: &Monitor) -> Result<u64> {
    let parameters = bench
        .block_on(
            qemu.client
                .execute_raw("query-migrate-parameters", serde_json::json!({})),
        )
        .context("QMP query-migrate-parameters")?;
    parameters["max-bandwidth"]
        .as_u64()
        .with_context(|| format!("no max-bandwidth in {parameters}"))
}

/// A migration to a file.
#[derive(Debug)]
pub struct Migrated {
    /// Paused: `stop` sent → `cont` answered. Live: `migrate` sent → completion seen.
    pub wall: Duration,
    /// QEMU's `downtime` (ms resolution): from stopping the guest for the switch-over to completion.
    pub downtime: Duration,
    /// QEMU's `total-time`: from the start of the migration to its completion.
    pub qemu_total: Duration,
    /// fsync of the file afterwards (QEMU does not sync it; the kernel may have written it back
    /// already while a bandwidth-limited migration was running).
    pub fsync: Duration,
    /// The file's size.
    pub file_bytes: u64,
    /// Dirty-bitmap syncs, i.e. pre-copy passes over RAM.
    pub dirty_syncs: u64,
}

fn migrate(bench: &Bench, qemu: &Monitor, file: &Path) -> Result<MigrationInfo> {
    qemu.execute(
        bench,
        &Migrate {
            uri: format!("file:{}", path_str(file)?),
        },
    )?;
    qemu.wait_migration(bench)
}

fn migrated(wall: Duration, info: &MigrationInfo, file: &Path) -> Result<Migrated> {
    Ok(Migrated {
        wall,
        downtime: Duration::from_millis(info.downtime.context("no downtime reported")?),
        qemu_total: Duration::from_millis(info.total_time.context("no total time reported")?),
        fsync: fsync(file)?,
        file_bytes: file_size(file)?.0,
        dirty_syncs: info.ram.as_ref().map_or(0, |ram| ram.dirty_sync_count),
    })
}

/// `migrate` to `file:` with the guest paused: stop, migrate, wait for completion, cont (the
/// guest is in `postmigrate` until then, its disk released; `cont` takes it back).
pub fn migrate_paused(bench: &Bench, qemu: &Monitor, file: &Path) -> Result<Migrated> {
    let started = Instant::now();
    qemu.execute(bench, &Stop)?;
    let info = migrate(bench, qemu, file)?;
    qemu.execute(bench, &Cont)?;
    migrated(started.elapsed(), &info, file)
}

/// Live `migrate` to `file:` of the running guest: QEMU pre-copies, stops the guest for the
/// switch-over and leaves it in `postmigrate`; resumed afterwards (not timed).
pub fn migrate_live(bench: &Bench, qemu: &Monitor, file: &Path) -> Result<Migrated> {
    let started = Instant::now();
    let info = migrate(bench, qemu, file)?;
    let wall = started.elapsed();
    qemu.execute(bench, &Cont)?;
    migrated(wall, &info, file)
}

/// What loading a migration file into a new QEMU cost.
#[derive(Debug)]
pub struct Loaded {
    /// Starting QEMU with `-incoming defer` until it answers on QMP.
    pub startup: Duration,
    /// From QEMU answering until the guest is loaded and paused.
    pub load: Duration,
    /// Both.
    pub with_startup: Duration,
}

/// `migrate-incoming` of a whole migration file into a new QEMU started with `-incoming defer -S`
/// (the domain's machine, with `disk` as its guest disk), until it completed (the guest is paused).
/// Returns the QEMU so the caller may check the guest.
pub fn migrate_incoming(bench: &Bench, ram_mib: u64, file: &Path, disk: &Path) -> Result<(Loaded, Vm)> {
    let started = Instant::now();
    let vm = Vm::spawn_incoming(bench, ram_mib, disk)?;
    let startup = started.elapsed();
    let loading = Instant::now();
    vm.monitor.execute(
        bench,
        &MigrateIncoming {
            uri: format!("file:{}", path_str(file)?),
        },
    )?;
    vm.monitor.wait_migration(bench)?;
    let load = loading.elapsed();
    let loaded = Loaded {
        startup,
        load,
        with_startup: started.elapsed(),
    };
    Ok((loaded, vm))
}

fn set_background_snapshot(bench: &Bench, qemu: &Monitor, state: bool) -> Result<()> {
    qemu.execute(
        bench,
        &MigrateSetCapabilities {
            capabilities: vec![MigrationCapabilityStatus {
                capability: MigrationCapability::BackgroundSnapshot,
                state,
            }],
        },
    )?;
    Ok(())
}

/// QEMU's `background-snapshot` migration of the running guest to `file:` (a snapshot consistent at
/// its start; QEMU stops the guest only to capture the device state and write-protect RAM, then
/// streams RAM while the guest runs and resumes nothing: the guest runs on by itself). `wall` is
/// `migrate` sent → completion seen; the capability is switched off again whatever happened.
pub fn background_snapshot(bench: &Bench, qemu: &Monitor, file: &Path) -> Result<Migrated> {
    set_background_snapshot(bench, qemu, true)?;
    let started = Instant::now();
    let info = migrate(bench, qemu, file);
    let wall = started.elapsed();
    let switched_off = set_background_snapshot(bench, qemu, false);
    let info = info?;
    switched_off?;
    migrated(wall, &info, file)
}
