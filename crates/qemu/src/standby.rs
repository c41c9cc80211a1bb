//! A revert's standby QEMU: the domain's next process, started in its other run slot (see
//! `files`) while the current one runs on.
//!
//! QEMU started with `-incoming defer` opens its disk images inactive: it takes none of their
//! locks and neither reads their metadata for good nor writes them until it activates them
//! (and reads their qcow2 metadata again). So the standby can
//! start on the same images as the running QEMU; once that one has ended, the revert applies
//! internal snapshots to the images offline, and the standby, which loaded the device state
//! before the old QEMU ended (its disks kept inactive), is promoted to the active slot and
//! activates the reverted disks. A revert that fails before the old QEMU ends therefore leaves
//! the domain running as it was, and the guest's gap is only: the old QEMU quits, the disks
//! are reverted, the new QEMU activates them, the vCPUs continue.
//!
//! What two QEMUs cannot share makes a standby unavailable (`DomainConfig::standby_blocker`);
//! the revert then ends the old QEMU before it starts the new one, as before.

use std::path::Path;

use memory::GuestMemory;
use qmp::{
    commands::{MigrateSetCapabilities, MigrationCapability, MigrationCapabilityStatus},
    Client, RunState,
};
use snapshot_core::{DiskTarget, IncomingRam, Name, Standby};

use crate::{
    config::DomainConfig,
    driver::{absolute_paths, qmp_error, DomainFiles, QemuDriver},
    error::{Error, Result},
    hypervisor::{revert_config, shared_memory},
};

impl QemuDriver {
    /// [`snapshot_core::Hypervisor::start_standby`], with the domain's lock held by the caller:
    /// the domain's QEMU must run; the standby runs `config` (a recorded configuration) on
    /// `disks`, in the domain's standby slot, started as `start_incoming` starts the active one.
    /// A failed start ends what it started and removes the standby's files; the running QEMU
    /// is never touched.
    pub(crate) async fn start_standby_locked(
        &self,
        name: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
        ram: IncomingRam<'_>,
    ) -> Result<Standby> {
        let unavailable = |reason: String| Ok(Standby::Unavailable { reason });
        let active = self.files(name)?;
        self.load_definition(name, &active)?;
        if active.pid().is_none() {
            return unavailable(format!("domain {name} is not running"));
        }
        let config = absolute_paths(&revert_config(name, config, disks)?)?;
        config.validate()?;
        if let Some(reason) = config.standby_blocker() {
            return unavailable(reason);
        }
        // The running QEMU holds the ports: the standby gets them when it takes over.
        let config = config.without_host_forwards();
        let files = self.standby_files(name)?;
        // The second slot's paths are a little longer than the first's.
        if let Err(error) = files.check_socket_paths() {
            return unavailable(error.to_string());
        }
        // A standby left by an interrupted revert.
        self.end_slot(name, &files).await?;
        let started = match self.prepare_run(name, files, config).await {
            Ok(launch) => self.start_prepared_incoming(name, launch, ram).await,
            Err(error) => Err(error),
        };
        match started {
            Ok(started) => Ok(Standby::Started(started)),
            Err(error) => {
                if let Err(cleanup) = self.discard_standby_locked(name).await {
                    tracing::warn!(domain = %name, %cleanup, "cannot clean up after a failed standby start");
                }
                Err(error)
            }
        }
    }

    /// [`snapshot_core::Hypervisor::promote_standby`], with the domain's lock held by the
    /// caller: once the active slot's QEMU has ended, the standby slot becomes the active one
    /// (recorded durably), and the old slot's leftovers go.
    pub(crate) async fn promote_standby_locked(&self, name: &Name) -> Result<()> {
        let active = self.files(name)?;
        let config = self.load_definition(name, &active)?;
        if let Some(pid) = active.pid() {
            return Err(Error::Running {
                domain: name.clone(),
                action: "promote the standby QEMU of",
                pid,
            });
        }
        let standby = self.standby_files(name)?;
        if standby.pid().is_none() {
            self.forget(name, standby.slot);
            standby.clean()?;
            return Err(Error::NoStandby { domain: name.clone() });
        }
        standby.make_active()?;
        self.forget(name, active.slot);
        // Promoted all the same: the next start, standby or discard removes them.
        if let Err(error) = active.clean() {
            tracing::warn!(domain = %name, %error, "cannot remove the files of the ended QEMU");
        }
        let (files, pid, client) = self.running(name).await?;
        self.activate_disks(name, &files, pid, &client).await?;
        add_host_forwards(name, &config, &client).await
    }

    /// [`snapshot_core::Hypervisor::load_standby_device_state`]: the standby loads the state
    /// with its disks left inactive (`late-block-activate`: QEMU would otherwise activate them
    /// once the state is in, while the running QEMU still holds them and before the revert has
    /// applied the internal snapshots); [`QemuDriver::promote_standby_locked`] activates them.
    pub(crate) async fn load_standby_device_state_locked(&self, name: &Name, path: &Path) -> Result<()> {
        let (files, pid, client) = self.standby(name).await?;
        let late_block_activate = |state| MigrateSetCapabilities {
            capabilities: vec![MigrationCapabilityStatus {
                capability: MigrationCapability::LateBlockActivate,
                state,
            }],
        };
        client
            .execute(&late_block_activate(true))
            .await
            .map_err(qmp_error(name, "keeping the standby's disks inactive"))?;
        self.load_devices_into(name, &files, pid, &client, path).await?;
        // Back to QEMU's default, which the domain's later snapshots expect.
        client
            .execute(&late_block_activate(false))
            .await
            .map_err(qmp_error(name, "restoring the standby's migration settings"))?;
        Ok(())
    }

    /// Activates the disks of the domain's QEMU, a promoted standby that loaded its state: QEMU
    /// reads their metadata now, as the revert left them, and takes their locks. One still
    /// waiting for its state activates them when the state is in.
    async fn activate_disks(
        &self,
        name: &Name,
        files: &DomainFiles,
        pid: u32,
        client: &Client,
    ) -> Result<()> {
        if self.run_state(name, files, pid).await? == RunState::InMigrate {
            return Ok(());
        }
        client
            .execute_raw("blockdev-set-active", serde_json::json!({ "active": true }))
            .await
            .map_err(qmp_error(name, "activating the disks of the new QEMU"))?;
        Ok(())
    }

    /// The standby slot's files, its QEMU's pid and a connection to it, as
    /// [`QemuDriver::running`] gives them for the active slot.
    async fn standby(&self, name: &Name) -> Result<(DomainFiles, u32, Client)> {
        let files = self.standby_files(name)?;
        let pid = files
            .pid()
            .ok_or_else(|| Error::NoStandby { domain: name.clone() })?;
        let client = self.client(name, &files, pid).await?;
        Ok((files, pid, client))
    }

    /// The guest RAM of the domain's standby QEMU, started on fresh shared RAM (an eager
    /// revert, or a memory image that could not be mapped): a revert can write the snapshot's
    /// memory into it before it ends the running QEMU, outside the guest's gap (once the
    /// standby is promoted, [`snapshot_core::Hypervisor::guest_memory`] gives the same RAM).
    pub async fn standby_guest_memory(&self, name: &Name) -> Result<GuestMemory> {
        let (files, _, client) = self.standby(name).await?;
        shared_memory(name, &files, &client).await
    }

    /// [`snapshot_core::Hypervisor::discard_standby`], with the domain's lock held by the
    /// caller: ends the standby QEMU if one runs (quit, else kill) and removes its files.
    pub(crate) async fn discard_standby_locked(&self, name: &Name) -> Result<()> {
        self.end_slot(name, &self.standby_files(name)?).await
    }
}

/// Adds `config`'s host port forwards to the domain's QEMU, a standby that took over (it started
/// without them: the old QEMU held the ports).
async fn add_host_forwards(name: &Name, config: &DomainConfig, client: &Client) -> Result<()> {
    for (netdev, rule) in config.host_forwards() {
        let said = client
            .execute_raw(
                "human-monitor-command",
                serde_json::json!({ "command-line": format!("hostfwd_add {netdev} {rule}") }),
            )
            .await
            .map_err(qmp_error(name, "adding a host port forward"))?;
        // HMP answers with an empty text on success, and the reason otherwise.
        let said = said.as_str().unwrap_or_default().trim();
        if !said.is_empty() {
            return Err(Error::HostForward {
                domain: name.clone(),
                rule,
                reason: said.to_owned(),
            });
        }
    }
    Ok(())
}
