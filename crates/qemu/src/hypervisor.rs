//! [`snapshot_core::Hypervisor`] for [`QemuDriver`]: the Xen split on QEMU 10. The toolstack
//! reads and writes guest RAM in the shared RAM file; QEMU saves the device state without RAM
//! (`xen-save-devices-state`) and loads it into a QEMU started with `-incoming defer`
//! (`migrate-incoming` from a `file:` URI: the saved file is itself a migration stream, `QEVM`
//! version 3, holding no RAM section).

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use disk::{
    ChainImage, DiskSnapshots, ExternalSnapshot, InternalSnapshot, LiveBackend, MergeMethod, OfflineBackend,
};
use memory::GuestMemory;
use qmp::{
    commands::{QueryMigrate, XenSaveDevicesState},
    MigrationStatus, RunState,
};
use serde::Deserialize as _;
use snapshot_core::{CaptureSignals, DiskTarget, DomainState, DriverResult, Hypervisor, Name, StreamedSave};

use crate::{
    command_line::StartMode,
    config::DomainConfig,
    driver::{io_error, qmp_error, QemuDriver},
    error::{Error, Result},
    process,
};

/// The header of a device-state file: `QEVM` and stream version 3.
const DEVICE_STATE_HEADER: [u8; 8] = *b"QEVM\0\0\0\x03";
/// Longest wait for QEMU to load a device state (about 80 KB; it takes milliseconds).
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the load is looked at.
const POLL: Duration = Duration::from_millis(20);

#[async_trait]
impl Hypervisor for QemuDriver {
    async fn state(&self, domain: &Name) -> DriverResult<DomainState> {
        Ok(self.status(domain).await?.state)
    }

    async fn config(&self, domain: &Name) -> DriverResult<serde_json::Value> {
        Ok(serde_json::to_value(self.current_config(domain).await?)?)
    }

    async fn disks(&self, domain: &Name) -> DriverResult<Vec<DiskTarget>> {
        let config = self.current_config(domain).await?;
        Ok(config
            .disks
            .into_iter()
            .map(|disk| DiskTarget {
                target: disk.id,
                image: disk.path,
            })
            .collect())
    }

    async fn pause(&self, domain: &Name) -> DriverResult<()> {
        Ok(QemuDriver::pause(self, domain).await?)
    }

    async fn resume(&self, domain: &Name) -> DriverResult<()> {
        Ok(QemuDriver::resume(self, domain).await?)
    }

    async fn guest_memory(&self, domain: &Name) -> DriverResult<GuestMemory> {
        let (files, _, client) = self.running(domain).await?;
        let regions = crate::ram_layout(&client).await?;
        Ok(
            GuestMemory::from_ram_file(&files.ram_file, &regions).map_err(|source| Error::Memory {
                domain: domain.clone(),
                source,
            })?,
        )
    }

    async fn save_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        Ok(self.save_devices(domain, path).await?)
    }

    async fn disk_backend(&self, domain: &Name) -> DriverResult<Arc<dyn DiskSnapshots>> {
        let files = self.files(domain)?;
        self.load_definition(domain, &files)?;
        Ok(match files.pid() {
            Some(pid) => Arc::new(LiveDisks {
                live: LiveBackend::new(self.client(domain, &files, pid).await?),
                driver: self.clone(),
                domain: domain.clone(),
            }),
            None => Arc::new(OfflineBackend),
        })
    }

    async fn destroy(&self, domain: &Name) -> DriverResult<()> {
        Ok(QemuDriver::destroy(self, domain).await?)
    }

    async fn define(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
    ) -> DriverResult<()> {
        let invalid = |reason: String| Error::InvalidConfig { path: None, reason };
        let mut config = DomainConfig::deserialize(config).map_err(|error| invalid(error.to_string()))?;
        if config.name != *domain {
            return Err(invalid(format!(
                "the configuration is of domain {}, not {domain}",
                config.name
            ))
            .into());
        }
        for target in disks {
            let disk = config
                .disks
                .iter_mut()
                .find(|disk| disk.id == target.target)
                .ok_or_else(|| invalid(format!("the configuration has no disk {:?}", target.target)))?;
            disk.path = target.image.clone();
        }
        Ok(QemuDriver::define(self, &config).await?)
    }

    async fn start_incoming(&self, domain: &Name) -> DriverResult<()> {
        Ok(self.launch(domain, StartMode::Incoming).await?)
    }

    async fn background_save(
        &self,
        domain: &Name,
        image: &Path,
        device_state: &Path,
        signals: CaptureSignals,
    ) -> DriverResult<StreamedSave> {
        let mem = self.guest_memory(domain).await?;
        let (_, _, client) = self.running(domain).await?;
        let layout = memory::ImageLayout::of(&mem);
        let stats = crate::background_snapshot(
            &client,
            layout,
            image,
            device_state,
            memory::Durability::Sync,
            signals,
        )
        .await?;
        Ok(StreamedSave {
            ram_bytes: mem.size(),
            stream_bytes: stats.stream.bytes_read,
            pages: stats.stream.ram_pages,
            zero_pages: stats.stream.ram_zero_pages,
            device_state_bytes: stats.stream.device_state_bytes,
            hypervisor_downtime_ms: Some(stats.downtime.as_secs_f64() * 1e3),
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
        let filename = path
            .to_str()
            .ok_or_else(|| fail("QEMU takes only UTF-8 paths".into(), String::new()))?;
        // QEMU keeps the mode of a file that exists: the device state stays private.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("cannot create", &path))?;
        client
            .execute(&XenSaveDevicesState {
                filename: filename.to_owned(),
                live: false,
            })
            .await
            .map_err(|error| fail(error.to_string(), process::log_tail(&files.qemu_log)))?;
        File::open(&path)
            .and_then(|file| file.sync_all())
            .map_err(io_error("cannot sync", &path))
    }

    async fn load_devices(&self, domain: &Name, path: &Path) -> Result<()> {
        let (files, pid, client) = self.running(domain).await?;
        let state = self.run_state(domain, &files, pid).await?;
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
        let uri = device_state_uri(&path).map_err(|reason| fail(reason, String::new()))?;
        check_header(&path).map_err(|reason| fail(reason, String::new()))?;
        client
            .execute_raw(
                "migrate-incoming",
                // Keep QEMU alive on a bad stream, to report QEMU's error.
                serde_json::json!({ "uri": uri, "exit-on-error": false }),
            )
            .await
            .map_err(|error| fail(error.to_string(), process::log_tail(&files.qemu_log)))?;
        let started = Instant::now();
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
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Records the active images in the definition after the disk backend changed them.
    async fn record_active_images(&self, domain: &Name) -> Result<()> {
        let (files, _, client) = self.running(domain).await?;
        self.sync_disks(domain, &files, &client).await.map(drop)
    }
}

/// The `file:` URI of a device-state file; QEMU's URI syntax has no escape for a comma.
fn device_state_uri(path: &Path) -> std::result::Result<String, String> {
    match path.to_str() {
        Some(text) if !text.contains(',') => Ok(format!("file:{text}")),
        Some(_) => Err("QEMU cannot load from a path with a comma".into()),
        None => Err("QEMU takes only UTF-8 paths".into()),
    }
}

/// Checks that `path` starts like a device-state file, so a wrong file fails with a clear
/// reason rather than QEMU's.
fn check_header(path: &Path) -> std::result::Result<(), String> {
    let mut header = [0; DEVICE_STATE_HEADER.len()];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut header))
        .map_err(|error| format!("cannot read it: {error}"))?;
    if header == DEVICE_STATE_HEADER {
        Ok(())
    } else {
        Err("not a QEMU device-state file (it does not start with QEVM, version 3)".into())
    }
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
    async fn record<T>(&self, result: disk::Result<T>) -> disk::Result<T> {
        let value = result?;
        if let Err(error) = self.driver.record_active_images(&self.domain).await {
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
        self.record(self.live.create_external(snapshots).await).await
    }

    async fn revert_external(&self, revert: &ExternalSnapshot) -> disk::Result<()> {
        self.live.revert_external(revert).await
    }

    async fn delete_external(&self, disk: &Path, image: &Path, method: MergeMethod) -> disk::Result<PathBuf> {
        self.record(self.live.delete_external(disk, image, method).await)
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
    fn device_state_files_are_checked_before_qemu_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("devices.bin");
        std::fs::write(&good, b"QEVM\0\0\0\x03\x07rest").unwrap();
        assert_eq!(check_header(&good), Ok(()));
        let bad = dir.path().join("other.bin");
        std::fs::write(&bad, b"hello, world").unwrap();
        assert!(check_header(&bad)
            .unwrap_err()
            .contains("not a QEMU device-state file"));
        assert!(check_header(&dir.path().join("absent"))
            .unwrap_err()
            .contains("cannot read"));
        assert_eq!(
            device_state_uri(Path::new("/s/devices.bin")).unwrap(),
            "file:/s/devices.bin"
        );
        assert!(device_state_uri(Path::new("/a,b")).is_err());
    }
}
