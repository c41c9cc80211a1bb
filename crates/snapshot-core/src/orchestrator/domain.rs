//! Domain policy that every embedder needs, not only the CLI: what a domain with snapshots may
//! not do.

use super::Orchestrator;
use crate::{
    error::{Error, Result},
    hypervisor::DiskTarget,
    name::Name,
};

impl Orchestrator {
    /// Refuses to redefine a domain that has snapshots with disks other than its current ones:
    /// after an external snapshot or a revert the definition points at overlays, and the images
    /// under them are snapshots that must never be written again. `disks` are the new
    /// definition's disks.
    pub async fn check_redefinition(&self, domain: &Name, disks: &[DiskTarget]) -> Result<()> {
        if self.store.list(domain)?.is_empty() {
            return Ok(());
        }
        let current = self
            .hypervisor
            .disks(domain)
            .await
            .map_err(|source| Error::Driver {
                domain: domain.clone(),
                action: "read the disks of",
                source,
            })?;
        for disk in &current {
            let given = disks.iter().find(|d| d.target == disk.target).map(|d| &d.image);
            if given != Some(&disk.image) {
                return Err(Error::InvalidRequest(format!(
                    "domain {domain} has snapshots and its disk {} is now {} (the new definition gives {}): \
                     start it by name instead of redefining it",
                    disk.target,
                    disk.image.display(),
                    given.map_or_else(|| "no such disk".to_owned(), |p| p.display().to_string()),
                )));
            }
        }
        Ok(())
    }

    /// Undefines a shut-off domain that has no snapshots: the driver forgets its definition and
    /// the store its files.
    pub async fn undefine(&self, domain: &Name) -> Result<()> {
        let (_lock, _) = self.begin(domain).await?;
        let snapshots = self.store.list(domain)?;
        if !snapshots.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "domain {domain} has {} snapshot(s); delete them first",
                snapshots.len()
            )));
        }
        self.hypervisor
            .undefine(domain)
            .await
            .map_err(|source| Error::Driver {
                domain: domain.clone(),
                action: "undefine",
                source,
            })?;
        self.store.forget_domain(domain)
    }
}
