//! The driver's QMP connections: one per run slot of each domain, reused while its QEMU lives.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use qmp::{commands::QueryStatus, Client, ClientOptions, RunState};
use snapshot_core::Name;

use crate::{
    driver::{qmp_error, DomainFiles, QemuDriver},
    error::{Error, Result},
    files::RunSlot,
};

/// Longest wait for QMP's greeting: QEMU answers at once unless another client is connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One QMP connection slot per domain and run slot (a revert's standby QEMU has its own, beside
/// the running one's); the async mutex makes concurrent callers share one connection attempt
/// (a second one would wait for QEMU to drop the first).
#[derive(Debug, Default)]
pub(crate) struct Connections(Mutex<HashMap<(Name, RunSlot), Held>>);

type Held = Arc<tokio::sync::Mutex<Option<Connection>>>;

#[derive(Debug)]
struct Connection {
    pid: u32,
    client: Client,
}

impl Connections {
    fn entry(&self, name: &Name, slot: RunSlot) -> Held {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((name.clone(), slot))
            .or_default()
            .clone()
    }

    fn get(&self, name: &Name, slot: RunSlot) -> Option<Held> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(name.clone(), slot))
            .cloned()
    }

    fn remove(&self, name: &Name, slot: RunSlot) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(name.clone(), slot));
    }
}

impl QemuDriver {
    /// The QMP connection to the QEMU (pid `pid`) of the domain's run slot `files`, reused while
    /// it stays open.
    pub(crate) async fn client(&self, name: &Name, files: &DomainFiles, pid: u32) -> Result<Client> {
        let slot = self.connections().entry(name, files.slot);
        let mut held = slot.lock().await;
        if let Some(connection) = held.as_ref() {
            if connection.pid == pid && connection.client.closed_reason().is_none() {
                return Ok(connection.client.clone());
            }
        }
        *held = None;
        let client = Client::connect_unix(&files.qmp_socket, client_options())
            .await
            .map_err(|source| Error::QmpConnect {
                domain: name.clone(),
                socket: files.qmp_socket.clone(),
                source,
            })?;
        *held = Some(Connection {
            pid,
            client: client.clone(),
        });
        Ok(client)
    }

    /// Drops the QMP connection to the QEMU of the domain's run slot `slot` (it ended).
    pub(crate) fn forget(&self, name: &Name, slot: RunSlot) {
        self.connections().remove(name, slot);
    }

    /// QEMU's run state, on this driver's connection if it has one, else on the status monitor.
    pub(crate) async fn run_state(&self, name: &Name, files: &DomainFiles, pid: u32) -> Result<RunState> {
        let client = match self.connected(name, files, pid) {
            Some(client) => client,
            None => Client::connect_unix(&files.status_socket, client_options())
                .await
                .map_err(|source| Error::QmpConnect {
                    domain: name.clone(),
                    socket: files.status_socket.clone(),
                    source,
                })?,
        };
        let status = client
            .execute(&QueryStatus)
            .await
            .map_err(qmp_error(name, "querying the run state"))?;
        Ok(status.status)
    }

    /// This driver's open connection to the QEMU (pid `pid`) of run slot `files`, if it has
    /// one at hand.
    fn connected(&self, name: &Name, files: &DomainFiles, pid: u32) -> Option<Client> {
        let slot = self.connections().get(name, files.slot)?;
        let held = slot.try_lock().ok()?;
        held.as_ref()
            .filter(|c| c.pid == pid && c.client.closed_reason().is_none())
            .map(|c| c.client.clone())
    }
}

fn client_options() -> ClientOptions {
    ClientOptions {
        handshake_timeout: HANDSHAKE_TIMEOUT,
        ..ClientOptions::default()
    }
}
