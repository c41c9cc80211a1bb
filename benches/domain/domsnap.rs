//! The domsnap side, one function per scenario, measured at the mechanism level: the memory engine
//! (`memory`) saving and restoring the RAM file QEMU shares with us, and QMP for the rest (pause,
//! device state without RAM, resume, `migrate-incoming` of the device state). This is what the
//! orchestrator's create and revert do with a QEMU domain, minus its metadata, intent records and
//! disk snapshots; each function's body is the one place to replace with the orchestrator's call.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use memory::{
    restore, save_paused, ContentCompare, Durability, ImageLayout, ImageWriter, LiveSave, RestoreOptions,
    SaveOptions,
};
use qmp::commands::*;

use crate::{file_size, fsync, path_str, Bench, Loaded, Source, Start, Vm};

/// A snapshot taken by a create, with what its creation cost.
#[derive(Debug)]
pub struct Created {
    /// The memory image.
    pub image: PathBuf,
    /// The device state (QEMU's stream without RAM).
    pub devices: PathBuf,
    /// Reading the RAM layout from QEMU and mapping the RAM file.
    pub map: Duration,
    /// From `stop` sent to `cont` answered: how long the guest could not run.
    pub pause: Duration,
    /// The memory engine's part of the pause (the whole save when paused, the final round when
    /// live).
    pub memory: Duration,
    /// From the start until image and device state are on stable storage.
    pub total: Duration,
    /// Pre-copy rounds, the final one included (1 for a paused save).
    pub rounds: u64,
    /// The image's length (a sparse file: RAM size plus 9 bytes per page of metadata).
    pub image_len: u64,
    /// Bytes the image occupies.
    pub image_allocated: u64,
    /// The device state's size.
    pub devices_bytes: u64,
}

/// Writes the device state (`xen-save-devices-state`: CPU and devices, no RAM). The guest must be
/// paused.
fn save_devices(bench: &Bench, vm: &Vm, devices: &std::path::Path) -> Result<()> {
    vm.execute(
        bench,
        &XenSaveDevicesState {
            filename: path_str(devices)?,
            live: false,
        },
    )?;
    Ok(())
}

/// The durations a create measured, in [`Created`]'s order.
struct Times {
    map: Duration,
    pause: Duration,
    memory: Duration,
    total: Duration,
}

fn created(image: PathBuf, devices: PathBuf, times: Times, rounds: u64) -> Result<Created> {
    let (image_len, image_allocated) = file_size(&image)?;
    let (devices_bytes, _) = file_size(&devices)?;
    Ok(Created {
        image,
        devices,
        map: times.map,
        pause: times.pause,
        memory: times.memory,
        total: times.total,
        rounds,
        image_len,
        image_allocated,
        devices_bytes,
    })
}

/// Paused create: map the RAM (as each domsnap command does for itself: a new process), stop, save every non-zero page into a new image (with
/// `Durability::Sync` fsynced and renamed into place), save the device state, cont, fsync the device
/// state (durability needs no paused guest).
pub fn create_paused(bench: &Bench, source: &Source, name: &str, durability: Durability) -> Result<Created> {
    let image = bench.file(&format!("{name}.img"));
    let devices = bench.file(&format!("{name}.devices"));
    let started = Instant::now();
    let ram = source.vm.map_ram(bench)?;
    let map = started.elapsed();
    let paused = Instant::now();
    source.vm.execute(bench, &Stop)?;
    let writer = ImageWriter::create(&image, ImageLayout::of(&ram), durability)?;
    save_paused(&ram, Box::new(writer)).context("save the RAM")?;
    let memory = paused.elapsed();
    save_devices(bench, &source.vm, &devices)?;
    source.vm.execute(bench, &Cont)?;
    let pause = paused.elapsed();
    if durability == Durability::Sync {
        fsync(&devices)?;
    }
    let times = Times {
        map,
        pause,
        memory,
        total: started.elapsed(),
    };
    created(image, devices, times, 1)
}

/// Live create: map the RAM, pre-copy with content comparison (QEMU's vCPUs write the RAM file from another
/// process, so write-protection cannot see them) under the default convergence policy while the
/// guest runs; then stop, final round, device state, cont; then seal (fsync) the image and fsync
/// the device state.
pub fn create_live(bench: &Bench, source: &Source, name: &str) -> Result<Created> {
    let image = bench.file(&format!("{name}.img"));
    let devices = bench.file(&format!("{name}.devices"));
    let started = Instant::now();
    let ram = source.vm.map_ram(bench)?;
    let map = started.elapsed();
    let writer = ImageWriter::create(&image, ImageLayout::of(&ram), Durability::Sync)?;
    let mut save = LiveSave::begin(
        &ram,
        Box::new(ContentCompare::new()),
        Box::new(writer),
        SaveOptions::default(),
    )?;
    save.precopy().context("pre-copy")?;
    let paused = Instant::now();
    source.vm.execute(bench, &Stop)?;
    let finished = save.finish().context("final round")?;
    save_devices(bench, &source.vm, &devices)?;
    source.vm.execute(bench, &Cont)?;
    let pause = paused.elapsed();
    let summary = finished.seal().context("seal the image")?;
    fsync(&devices)?;
    let times = Times {
        map,
        pause,
        memory: summary.final_pause(),
        total: started.elapsed(),
    };
    created(image, devices, times, summary.rounds.len() as u64)
}

/// What a revert cost.
#[derive(Debug)]
pub struct Reverted {
    /// Start-up and load.
    pub loaded: Loaded,
    /// The restore of the memory image alone (part of the load).
    pub memory: Duration,
}

/// Revert into a new QEMU: start it waiting for device state, restore the image into its (fresh)
/// RAM file, `migrate-incoming` the device state, wait until it completes (the guest is paused).
/// Returns the QEMU so the caller may check that the guest runs.
pub fn revert(bench: &Bench, snapshot: &Created) -> Result<(Reverted, Vm)> {
    let started = Instant::now();
    let vm = Vm::spawn(bench, "bench-revert", Start::IncomingDevices)?;
    let startup = started.elapsed();
    let loading = Instant::now();
    let ram = vm.map_ram(bench)?;
    // The default (clear non-zero target pages) rather than assuming the new RAM file is zero:
    // QEMU has started, and a fresh file's holes are skipped without being read anyway.
    let stats = restore(&snapshot.image, &ram, &RestoreOptions::default()).context("restore the RAM")?;
    vm.execute(
        bench,
        &MigrateIncoming {
            uri: format!("file:{}", path_str(&snapshot.devices)?),
        },
    )?;
    vm.wait_migration(bench)?;
    let load = loading.elapsed();
    let loaded = Loaded {
        startup,
        load,
        with_startup: started.elapsed(),
    };
    Ok((
        Reverted {
            loaded,
            memory: stats.duration,
        },
        vm,
    ))
}
