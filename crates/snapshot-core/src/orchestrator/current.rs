//! The domain's current snapshot: the one the domain was last snapshotted or reverted to, and
//! the parent of its next snapshot.

use super::Orchestrator;
use crate::{error::Result, name::Name};

impl Orchestrator {
    /// The domain's current snapshot, if it has one. Reads the store only: never waits for the
    /// domain's lock.
    pub fn current(&self, domain: &Name) -> Result<Option<Name>> {
        self.store.current(domain)
    }

    /// Makes `snapshot` the domain's current snapshot (the parent of its next one), under the
    /// domain's lock. A snapshot the domain does not have is refused
    /// ([`crate::Error::SnapshotNotFound`]); nothing else changes (the domain keeps running as
    /// it is, a revert is what puts it back to a snapshot).
    pub async fn set_current(&self, domain: &Name, snapshot: &Name) -> Result<()> {
        let _lock = self.begin(domain).await?;
        self.store.get(domain, snapshot)?;
        self.store.set_current(domain, Some(snapshot.clone()))
    }
}
