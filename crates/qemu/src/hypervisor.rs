//! [`snapshot_core::Hypervisor`] for [`QemuDriver`]: the Xen split on QEMU 10. The toolstack
//! reads and writes guest RAM in the shared RAM file; QEMU saves the device state without RAM
//! (`xen-save-devices-state`) and loads it into a QEMU started with `-incoming defer`
//! (`migrate-incoming` from an `fd:` socket domsnap feeds the file into: the saved file is itself
//! a migration stream, `QEVM` version 3, then QEMU's configuration section, holding no RAM
//! section). The configuration section matters: a QEMU that loaded a stream without one (which
//! needs `-global migration.send-configuration=off`) aborts on its next outgoing migration, so the
//! driver writes it into every file it saves and inserts it when it loads a file of an older
//! domsnap version that lacks it.
//!
//! A lazy revert starts the domain on the snapshot's memory image instead of the shared RAM file
//! ([`snapshot_core::IncomingRam::Image`], see `mapped_ram`): QEMU maps it copy-on-write, and
//! [`Hypervisor::guest_memory`] refuses such a domain, whose RAM is QEMU's own.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom, Write},
    os::{fd::AsFd, unix::fs::OpenOptionsExt, unix::net::UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use disk::{
    ChainImage, DiskSnapshots, ExternalSnapshot, InternalSnapshot, LiveBackend, MergeMethod, NewInternal,
    OfflineBackend,
};
use memory::GuestMemory;
use qmp::{
    commands::{QueryMigrate, XenSaveDevicesState},
    MigrationStatus, RunState,
};
use snapshot_core::{
    CaptureSignals, DiskTarget, DomainState, DriverResult, Hypervisor, IncomingRam, IncomingStart,
    MemoryAccess, Name, Standby, StreamMode, StreamedSave,
};

use crate::{
    config::DomainConfig,
    driver::{io_error, qmp_error, DomainFiles, QemuDriver},
    error::{Error, Result},
    migration_stream::{device_state_format, device_state_prefix, DeviceStateFormat, DEVICE_STATE_HEADER},
    pin::{recorded_config, QEMU_VERSION_KEY},
    process,
};

/// Longest wait for QEMU to load a device state (about 80 KB; it takes milliseconds).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the load is looked at, at first and at most: after [`LOAD_QUICK`] the wait
/// doubles from the first to the last (a device state loads in about 10 ms, in a revert's
/// critical path).
const POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(20));
/// How long a device-state load is looked at every [`POLL`]`.0`.
const LOAD_QUICK: Duration = Duration::from_millis(50);
/// The name the device-state stream's socket is filed under in QEMU (`getfd`, `fd:NAME`).
const LOAD_FD_NAME: &str = "domsnap-device-state";
/// Bytes read to tell a device-state file's layout: the header and the longest configuration
/// section.
const FORMAT_PROBE: usize = DEVICE_STATE_HEADER.len() + 5 + 256;

#[async_trait]
impl Hypervisor for QemuDriver {
    async fn state(&self, domain: &Name) -> DriverResult<DomainState> {
        Ok(self.status(domain).await?.state)
    }

    /// The definition, and the version of this QEMU (under `qemu_version`): a snapshot records
    /// both, and a revert checks them ([`Hypervisor::check_restorable`]).
    async fn config(&self, domain: &Name) -> DriverResult<serde_json::Value> {
        let mut value = serde_json::to_value(self.current_config(domain).await?)?;
        let version = self.qemu_facts().await?.version;
        if let Some(map) = value.as_object_mut() {
            map.insert(QEMU_VERSION_KEY.to_owned(), version.into());
        }
        Ok(value)
    }

    /// The writable disks and a UEFI domain's NVRAM image (`nvram`); read-only disks are left
    /// out of snapshots.
    async fn disks(&self, domain: &Name) -> DriverResult<Vec<DiskTarget>> {
        Ok(self.current_config(domain).await?.disk_targets())
    }

    async fn check_restorable(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        with_memory: bool,
    ) -> DriverResult<()> {
        Ok(self.check_restorable_config(domain, config, with_memory).await?)
    }

    async fn prepare_pause(&self, domain: &Name) {
        // A domain without a process has nothing to write back.
        if let Ok((_, _, client)) = self.running(domain).await {
            crate::write_back::write_back_disks(&client).await;
        }
    }

    async fn pause(&self, domain: &Name) -> DriverResult<()> {
        Ok(QemuDriver::pause(self, domain).await?)
    }

    async fn resume(&self, domain: &Name) -> DriverResult<()> {
        Ok(QemuDriver::resume(self, domain).await?)
    }

    async fn guest_memory(&self, domain: &Name) -> DriverResult<GuestMemory> {
        let (files, _, client) = self.running(domain).await?;
        Ok(shared_memory(domain, &files, &client).await?)
    }

    async fn save_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        Ok(self.save_devices(domain, path).await?)
    }

    async fn freeze_filesystems(&self, domain: &Name) -> DriverResult<u64> {
        Ok(QemuDriver::freeze_filesystems(self, domain).await?)
    }

    async fn has_guest_agent(&self, domain: &Name) -> DriverResult<bool> {
        Ok(self.guest_agent_socket(domain)?.is_some())
    }

    async fn thaw_filesystems(&self, domain: &Name) -> DriverResult<u64> {
        Ok(QemuDriver::thaw_filesystems(self, domain).await?)
    }

    async fn disk_backend(&self, domain: &Name) -> DriverResult<Arc<dyn DiskSnapshots>> {
        let files = self.files(domain)?;
        self.load_definition(domain, &files)?;
        Ok(match files.pid() {
            Some(pid) => {
                let client = self.client(domain, &files, pid).await?;
                // After a completed outgoing migration (a toolstack that died before its
                // `cont`), QEMU's disks are inactive and a write to them aborts QEMU.
                crate::stream_save::settle_after_migration(&client).await?;
                Arc::new(LiveDisks {
                    live: LiveBackend::new(client),
                    driver: self.clone(),
                    domain: domain.clone(),
                })
            }
            None => Arc::new(OfflineBackend),
        })
    }

    async fn destroy(&self, domain: &Name) -> DriverResult<()> {
        Ok(self.destroy_locked(domain).await?)
    }

    async fn define(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
    ) -> DriverResult<()> {
        Ok(self.define_locked(&revert_config(domain, config, disks)?)?)
    }

    async fn undefine(&self, domain: &Name) -> DriverResult<()> {
        Ok(self.undefine_locked(domain).await?)
    }

    async fn start_incoming<'a>(&self, domain: &Name, ram: IncomingRam<'a>) -> DriverResult<IncomingStart> {
        let launch = self.prepare_launch(domain).await?;
        Ok(self.start_prepared_incoming(domain, launch, ram).await?)
    }

    /// Unavailable for a domain that does not run, and for configurations two QEMUs cannot
    /// share (see `DomainConfig::standby_blocker`); the standby runs in the domain's other run
    /// slot (see `standby`).
    async fn start_standby<'a>(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
        ram: IncomingRam<'a>,
    ) -> DriverResult<Standby> {
        Ok(self.start_standby_locked(domain, config, disks, ram).await?)
    }

    async fn load_standby_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        Ok(self.load_standby_device_state_locked(domain, path).await?)
    }

    async fn promote_standby(&self, domain: &Name) -> DriverResult<()> {
        Ok(self.promote_standby_locked(domain).await?)
    }

    async fn standby_guest_memory(&self, domain: &Name) -> DriverResult<GuestMemory> {
        Ok(QemuDriver::standby_guest_memory(self, domain).await?)
    }

    async fn discard_standby(&self, domain: &Name) -> DriverResult<()> {
        Ok(self.discard_standby_locked(domain).await?)
    }

    /// Fails, before anything is paused or written, when QEMU says it cannot migrate the domain
    /// (`query-migrate`'s `blocked-reasons`): every memory snapshot asks this first.
    async fn memory_access(&self, domain: &Name) -> DriverResult<MemoryAccess> {
        let (_, _, client) = self.running(domain).await?;
        check_migratable(domain, &client).await?;
        let regions = crate::ram_layout(&client).await?;
        let ram_bytes = regions.iter().map(|r| r.len).sum();
        let shared = match self.guest_memory(domain).await {
            Ok(mem) => Some(mem),
            Err(error) => {
                tracing::debug!(%domain, %error, "guest RAM is not shared; memory goes through QEMU's stream");
                None
            }
        };
        // QEMU write-protects RAM with userfaultfd, which needs a shared file on tmpfs or
        // hugetlbfs: the RAM this driver gives every domain it starts fresh.
        let no_background = shared.is_none().then(|| {
            "QEMU cannot write-protect its RAM, which is not the shared RAM file (it is mapped \
             from a snapshot's image by a lazy revert)"
                .to_owned()
        });
        Ok(MemoryAccess {
            ram_bytes,
            shared,
            streams: true,
            no_background,
        })
    }

    async fn streamed_save(
        &self,
        domain: &Name,
        image: &Path,
        device_state: &Path,
        mode: StreamMode,
        signals: CaptureSignals,
    ) -> DriverResult<StreamedSave> {
        let (_, _, client) = self.running(domain).await?;
        let regions = crate::ram_layout(&client).await?;
        let layout = memory::ImageLayout::for_regions(
            regions
                .iter()
                .map(|r| memory::RegionInfo {
                    gpa: r.gpa,
                    len: r.len,
                })
                .collect(),
        )
        .map_err(|source| Error::Memory {
            domain: domain.clone(),
            source,
        })?;
        let ram_bytes = regions.iter().map(|r| r.len).sum();
        let stats = crate::stream_snapshot(
            &client,
            layout,
            image,
            device_state,
            memory::Durability::Sync,
            mode,
            signals,
        )
        .await?;
        Ok(StreamedSave {
            ram_bytes,
            stream_bytes: stats.stream.bytes_read,
            pages: stats.stream.ram_pages,
            zero_pages: stats.stream.ram_zero_pages,
            stored_pages: stats.image.present_pages,
            device_state_bytes: stats.stream.device_state_bytes,
            hypervisor_downtime_ms: Some(stats.downtime.as_secs_f64() * 1e3),
            passes: stats.passes,
        })
    }

    async fn load_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        Ok(self.load_devices(domain, path).await?)
    }
}

impl QemuDriver {
    /// The definition, with the active disk images read from QEMU while it runs.
    async fn current_config(&self, domain: &Name) -> Result<DomainConfig> {
        let files = self.files(domain)?;
        let config = self.load_definition(domain, &files)?;
        match files.pid() {
            Some(pid) => {
                let client = self.client(domain, &files, pid).await?;
                self.sync_disks(domain, &files, &client).await
            }
            None => Ok(config),
        }
    }

    async fn save_devices(&self, domain: &Name, path: &Path) -> Result<()> {
        let (files, pid, client) = self.running(domain).await?;
        let state = self.run_state(domain, &files, pid).await?;
        if state == RunState::Running {
            return Err(Error::WrongState {
                domain: domain.clone(),
                state: state.as_str().to_owned(),
                hint: "pause it before saving its device state",
            });
        }
        let path = std::path::absolute(path).map_err(io_error("cannot resolve", path))?;
        let fail = |reason: String, stderr: String| Error::DeviceState {
            domain: domain.clone(),
            operation: "save",
            path: path.clone(),
            reason,
            stderr,
        };
        // QEMU writes through a descriptor it is handed (an fd set), so it needs no access to the
        // snapshot folder, into a private temporary; domsnap then writes the final file: the
        // header, the configuration section (which `xen-save-devices-state` leaves out) naming
        // this QEMU's machine type, and QEMU's device sections.
        let machine_type = machine_type(&client)
            .await
            .map_err(|reason| fail(reason, String::new()))?;
        let prefix =
            device_state_prefix(&machine_type).map_err(|error| fail(error.to_string(), String::new()))?;
        let raw = durable::TempFile::create(&path)?;
        let for_qemu = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(raw.path())
            .map_err(io_error("cannot open", raw.path()))?;
        let fdset = client
            .add_fd(None, for_qemu.as_fd(), Some("domsnap device state"))
            .await
            .map_err(|error| fail(error.to_string(), String::new()))?
            .fdset_id;
        let saved = client
            .execute(&XenSaveDevicesState {
                filename: format!("/dev/fdset/{fdset}"),
                live: false,
            })
            .await;
        let removed = client.remove_fd(fdset, None).await;
        drop(for_qemu);
        saved.map_err(|error| fail(error.to_string(), process::log_tail(&files.qemu_log)))?;
        if let Err(error) = removed {
            tracing::warn!(%error, fdset, "cannot remove the device state's fd set from QEMU");
        }
        let mut saved = Vec::new();
        File::open(raw.path())
            .and_then(|mut file| file.read_to_end(&mut saved))
            .map_err(io_error("cannot read", raw.path()))?;
        let devices = match device_state_format(&saved) {
            Ok(DeviceStateFormat::Legacy) => &saved[DEVICE_STATE_HEADER.len()..],
            Ok(DeviceStateFormat::Configured { .. }) => {
                return Err(fail(
                    "QEMU wrote a configuration section into the device state: unexpected".into(),
                    String::new(),
                ))
            }
            Err(reason) => return Err(fail(format!("QEMU wrote {reason}"), String::new())),
        };
        let mut file = durable::TempFile::create(&path)?;
        file.file_mut()
            .write_all(&prefix)
            .and_then(|()| file.file_mut().write_all(devices))
            .map_err(io_error("cannot write", &path))?;
        Ok(file.persist(durable::Sync::Yes)?)
    }

    async fn load_devices(&self, domain: &Name, path: &Path) -> Result<()> {
        let (files, pid, client) = self.running(domain).await?;
        self.load_devices_into(domain, &files, pid, &client, path).await
    }

    /// Loads a device state into the QEMU of run slot `files`, started to receive it.
    pub(crate) async fn load_devices_into(
        &self,
        domain: &Name,
        files: &DomainFiles,
        pid: u32,
        client: &qmp::Client,
        path: &Path,
    ) -> Result<()> {
        let state = self.run_state(domain, files, pid).await?;
        if state != RunState::InMigrate {
            return Err(Error::WrongState {
                domain: domain.clone(),
                state: state.as_str().to_owned(),
                hint: "device state loads only into a domain started to receive it",
            });
        }
        let path = std::path::absolute(path).map_err(io_error("cannot resolve", path))?;
        let fail = |reason: String, stderr: String| Error::DeviceState {
            domain: domain.clone(),
            operation: "load",
            path: path.clone(),
            reason,
            stderr,
        };
        let (mut file, prefix) = device_state_source(client, &path, &fail).await?;
        // The stream goes through a socket QEMU is handed, so QEMU needs no access to the file.
        let (ours, theirs) =
            UnixStream::pair().map_err(io_error("cannot create a socket pair for", &path))?;
        let passed = client.getfd(LOAD_FD_NAME, theirs.as_fd()).await;
        drop(theirs);
        passed.map_err(|error| fail(error.to_string(), String::new()))?;
        let stopper = ours
            .try_clone()
            .map_err(io_error("cannot duplicate the socket for", &path))?;
        let feeder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut ours = ours;
            ours.write_all(&prefix)?;
            std::io::copy(&mut file, &mut ours)?;
            // EOF for QEMU.
            ours.shutdown(std::net::Shutdown::Write)
        });
        let loaded = self.follow_load(domain, files, client, &fail).await;
        if let Err(error) = loaded {
            // A QEMU that stopped reading must not keep the feeder waiting. `migrate-incoming`
            // takes the descriptor out of QEMU's table once it parsed the URI; a failure before
            // that leaves it filed.
            let _ = stopper.shutdown(std::net::Shutdown::Both);
            let _ = feeder.await;
            let _ = client.closefd(LOAD_FD_NAME).await;
            return Err(error);
        }
        // QEMU read what it needed and closed its end: the feeder is done (a write after QEMU's
        // last read may have failed; the state is loaded all the same).
        match feeder.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "QEMU closed the device-state stream early"),
            Err(error) => tracing::warn!(%error, "the device-state feeder did not finish"),
        }
        Ok(())
    }

    /// Starts `migrate-incoming` from the descriptor filed as [`LOAD_FD_NAME`] and waits until QEMU
    /// loaded it.
    async fn follow_load(
        &self,
        domain: &Name,
        files: &DomainFiles,
        client: &qmp::Client,
        fail: &impl Fn(String, String) -> Error,
    ) -> Result<()> {
        client
            .execute_raw(
                "migrate-incoming",
                // Keep QEMU alive on a bad stream, to report QEMU's error.
                serde_json::json!({ "uri": format!("fd:{LOAD_FD_NAME}"), "exit-on-error": false }),
            )
            .await
            .map_err(|error| fail(error.to_string(), process::log_tail(&files.qemu_log)))?;
        let started = Instant::now();
        let mut poll = POLL.0;
        loop {
            let info = client
                .execute(&QueryMigrate)
                .await
                .map_err(qmp_error(domain, "following the device-state load"))?;
            match info.status {
                Some(MigrationStatus::Completed) => return Ok(()),
                Some(MigrationStatus::Failed | MigrationStatus::Cancelled) => {
                    let reason = info.error_desc.unwrap_or_else(|| "QEMU gave no reason".into());
                    return Err(fail(reason, process::log_tail(&files.qemu_log)));
                }
                _ if started.elapsed() > LOAD_TIMEOUT => {
                    return Err(fail(
                        format!("not loaded within {} s", LOAD_TIMEOUT.as_secs()),
                        process::log_tail(&files.qemu_log),
                    ))
                }
                _ => {
                    tokio::time::sleep(poll).await;
                    // Doubling from the first poll would notice the end of a load of a few
                    // ms up to as late again.
                    if started.elapsed() > LOAD_QUICK {
                        poll = (poll * 2).min(POLL.1);
                    }
                }
            }
        }
    }

    /// Records the active images in the definition after the disk backend changed them;
    /// `expected` are images the change made active that are not backed by the defined ones (the
    /// parent an active overlay was committed into).
    async fn record_active_images(&self, domain: &Name, expected: &[PathBuf]) -> Result<()> {
        let (files, _, client) = self.running(domain).await?;
        self.sync_disks_expecting(domain, &files, &client, expected)
            .await
            .map(drop)
    }
}

/// The guest RAM of the QEMU of run slot `files` (behind `client`): its shared RAM file, laid
/// out as QEMU reports; refused when its RAM is mapped from a memory image.
pub(crate) async fn shared_memory(
    domain: &Name,
    files: &DomainFiles,
    client: &qmp::Client,
) -> Result<GuestMemory> {
    if let Some(image) = crate::mapped_ram::mapped_image(files) {
        return Err(Error::RamNotShared {
            domain: domain.clone(),
            image,
        });
    }
    let regions = crate::ram_layout(client).await?;
    GuestMemory::from_ram_file(&files.ram_file, &regions).map_err(|source| Error::Memory {
        domain: domain.clone(),
        source,
    })
}

/// The recorded configuration `config` of `domain` (as [`Hypervisor::config`] returned it) with
/// its disks on the images `disks`: what a revert defines, and what its standby QEMU runs.
pub(crate) fn revert_config(
    domain: &Name,
    config: &serde_json::Value,
    disks: &[DiskTarget],
) -> Result<DomainConfig> {
    let invalid = |reason: String| Error::InvalidConfig { path: None, reason };
    let (mut config, _) = recorded_config(config)?;
    if config.name != *domain {
        return Err(invalid(format!(
            "the configuration is of domain {}, not {domain}",
            config.name
        )));
    }
    for target in disks {
        let format = crate::config::disk_format(target.format);
        if !config.set_disk_image(&target.target, target.image.clone(), format) {
            return Err(invalid(format!(
                "the configuration has no disk {:?}",
                target.target
            )));
        }
    }
    Ok(config)
}

/// The machine type of the QEMU behind `client` as its migration stream names it: QOM type
/// `pc-q35-10.0-machine` is machine `pc-q35-10.0` (QEMU's `MachineClass::name`).
/// Refuses a domain QEMU cannot migrate, naming QEMU's reasons (a device that cannot be
/// migrated, a migration blocker a device or option added).
async fn check_migratable(domain: &Name, client: &qmp::Client) -> Result<()> {
    let info = client
        .execute_raw("query-migrate", serde_json::json!({}))
        .await
        .map_err(qmp_error(domain, "asking whether QEMU can save the domain"))?;
    let reasons: Vec<String> = info
        .get("blocked-reasons")
        .and_then(serde_json::Value::as_array)
        .map(|reasons| {
            reasons
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if reasons.is_empty() {
        return Ok(());
    }
    Err(Error::MigrationBlocked {
        domain: domain.clone(),
        reasons,
    })
}

/// Opens the device-state file at `path` for QEMU: the file placed where QEMU's read starts, and
/// the bytes to send QEMU before it.
async fn device_state_source(
    client: &qmp::Client,
    path: &Path,
    fail: &impl Fn(String, String) -> Error,
) -> Result<(File, Vec<u8>)> {
    let mut file =
        File::open(path).map_err(|error| fail(format!("cannot read it: {error}"), String::new()))?;
    let mut start = Vec::with_capacity(FORMAT_PROBE);
    (&mut file)
        .take(FORMAT_PROBE as u64)
        .read_to_end(&mut start)
        .map_err(|error| fail(format!("cannot read it: {error}"), String::new()))?;
    // What QEMU reads: the file as it is, or for a file without configuration section (older
    // domsnap versions) the header, the section naming this QEMU's machine type, then the
    // file's device sections. So the restored QEMU always runs with the default
    // `send-configuration=on` and can migrate (snapshot) again.
    let (prefix, skip) = match device_state_format(&start).map_err(|reason| fail(reason, String::new()))? {
        DeviceStateFormat::Configured { .. } => (Vec::new(), 0),
        DeviceStateFormat::Legacy => {
            let machine_type = machine_type(client)
                .await
                .map_err(|reason| fail(reason, String::new()))?;
            let prefix =
                device_state_prefix(&machine_type).map_err(|error| fail(error.to_string(), String::new()))?;
            (prefix, DEVICE_STATE_HEADER.len())
        }
    };
    file.seek(SeekFrom::Start(skip as u64))
        .map_err(|error| fail(format!("cannot read it: {error}"), String::new()))?;
    Ok((file, prefix))
}

async fn machine_type(client: &qmp::Client) -> std::result::Result<String, String> {
    let value = client
        .execute_raw(
            "qom-get",
            serde_json::json!({ "path": "/machine", "property": "type" }),
        )
        .await
        .map_err(|error| format!("cannot read QEMU's machine type: {error}"))?;
    machine_from_qom_type(&value)
}

fn machine_from_qom_type(value: &serde_json::Value) -> std::result::Result<String, String> {
    value
        .as_str()
        .and_then(|qom_type| qom_type.strip_suffix("-machine"))
        .filter(|machine| !machine.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("QEMU's machine has an unexpected QOM type {value}"))
}

/// The live disk backend of a running domain that records every change of a disk's active image
/// in the domain's definition, so a later cold start (even after a crash) uses the new image.
#[derive(Debug)]
struct LiveDisks {
    live: LiveBackend,
    driver: QemuDriver,
    domain: Name,
}

impl LiveDisks {
    async fn record<T>(
        &self,
        result: disk::Result<T>,
        expected: impl FnOnce(&T) -> Vec<PathBuf>,
    ) -> disk::Result<T> {
        let value = result?;
        let expected = expected(&value);
        if let Err(error) = self.driver.record_active_images(&self.domain, &expected).await {
            let definition = self
                .driver
                .files(&self.domain)
                .map_or_else(|_| PathBuf::new(), |files| files.definition);
            return Err(disk::Error::Io {
                action: "cannot record the new active images in",
                path: definition,
                source: std::io::Error::other(error),
            });
        }
        Ok(value)
    }
}

#[async_trait]
impl DiskSnapshots for LiveDisks {
    async fn list_internal(&self, disk: &Path) -> disk::Result<Vec<InternalSnapshot>> {
        self.live.list_internal(disk).await
    }

    async fn create_internal(&self, disks: &[PathBuf], name: &str) -> disk::Result<()> {
        self.live.create_internal(disks, name).await
    }

    async fn delete_internal(&self, disks: &[PathBuf], name: &str) -> disk::Result<()> {
        self.live.delete_internal(disks, name).await
    }

    async fn apply_internal(&self, disks: &[PathBuf], name: &str) -> disk::Result<()> {
        self.live.apply_internal(disks, name).await
    }

    async fn create_external(&self, snapshots: &[ExternalSnapshot]) -> disk::Result<()> {
        self.record(self.live.create_external(snapshots).await, |()| Vec::new())
            .await
    }

    async fn create_snapshots(
        &self,
        internal: &[NewInternal],
        external: &[ExternalSnapshot],
    ) -> disk::Result<()> {
        let created = self.live.create_snapshots(internal, external).await;
        if external.is_empty() {
            // Internal snapshots leave every active image as it is: nothing to record (and no
            // round trip to QEMU inside the guest's pause).
            return created;
        }
        self.record(created, |()| Vec::new()).await
    }

    async fn prepare_snapshots(
        &self,
        internal: &[NewInternal],
        external: &[ExternalSnapshot],
    ) -> disk::Result<()> {
        self.live.prepare_snapshots(internal, external).await
    }

    async fn revert_external(&self, revert: &ExternalSnapshot) -> disk::Result<()> {
        self.live.revert_external(revert).await
    }

    async fn delete_external(&self, disk: &Path, image: &Path, method: MergeMethod) -> disk::Result<PathBuf> {
        // Committing the active image into its parent makes the parent active.
        self.record(self.live.delete_external(disk, image, method).await, |active| {
            vec![active.clone()]
        })
        .await
    }

    async fn backing_chain(&self, disk: &Path) -> disk::Result<Vec<ChainImage>> {
        self.live.backing_chain(disk).await
    }
    async fn backing_file(&self, image: &Path) -> disk::Result<Option<PathBuf>> {
        self.live.backing_file(image).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_type_is_the_qom_type_without_its_suffix() {
        assert_eq!(
            machine_from_qom_type(&serde_json::json!("pc-q35-10.0-machine")).as_deref(),
            Ok("pc-q35-10.0")
        );
        for bad in [
            serde_json::json!("-machine"),
            serde_json::json!("q35"),
            serde_json::json!(3),
        ] {
            assert!(machine_from_qom_type(&bad)
                .unwrap_err()
                .contains("unexpected QOM type"));
        }
    }
}
