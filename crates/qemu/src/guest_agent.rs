//! Quiesce: the guest's filesystems frozen and thawed through its QEMU guest agent, which
//! answers on the virtio-serial channel `org.qemu.guest_agent.0` (a Unix socket in the domain's
//! run folder; `guest_agent = true` in the configuration adds it).

use std::time::Duration;

use qmp::GuestAgent;
use snapshot_core::Name;

use crate::{
    driver::QemuDriver,
    error::{Error, Result},
};

/// How long connecting and each plain request may take: a running agent answers at once.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freeze may take: the guest flushes its dirty data first.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);

impl QemuDriver {
    /// Freezes the running guest's filesystems; returns how many the agent froze.
    pub async fn freeze_filesystems(&self, domain: &Name) -> Result<u64> {
        let agent = self.guest_agent(domain).await?;
        let mut agent = agent.with_timeout(FREEZE_TIMEOUT);
        let frozen = agent.fsfreeze_freeze().await;
        frozen.map_err(|source| agent_error(domain, "freeze the filesystems of", source))
    }

    /// Thaws the guest's filesystems; returns how many the agent thawed (0 if none were frozen).
    pub async fn thaw_filesystems(&self, domain: &Name) -> Result<u64> {
        let mut agent = self.guest_agent(domain).await?;
        let thawed = agent.fsfreeze_thaw().await;
        thawed.map_err(|source| agent_error(domain, "thaw the filesystems of", source))
    }

    /// A synchronised connection to the domain's guest agent.
    async fn guest_agent(&self, domain: &Name) -> Result<GuestAgent> {
        let Some(socket) = self.guest_agent_socket(domain)? else {
            return Err(Error::NoGuestAgent {
                domain: domain.clone(),
            });
        };
        // The agent answers only while the domain has a process.
        self.running(domain).await?;
        GuestAgent::connect(&socket, AGENT_TIMEOUT)
            .await
            .map_err(|source| agent_error(domain, "reach the guest agent of", source))
    }
}

fn agent_error(domain: &Name, action: &'static str, source: qmp::Error) -> Error {
    Error::GuestAgent {
        domain: domain.clone(),
        action,
        source,
    }
}
