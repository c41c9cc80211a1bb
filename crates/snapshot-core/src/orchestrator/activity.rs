//! What is happening on a domain, asked without waiting for anyone, and giving up an operation
//! that can never complete.

use serde::Serialize;

use super::{
    disk_plan::{holds_internal, new_overlays},
    Orchestrator,
};
use crate::{
    error::{Operation, Result},
    intent::Intent,
    metadata::DiskSnapshot,
    name::Name,
};

/// A domain's activity, as read-only commands report it (they never wait for the lock and never
/// run recovery).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Activity {
    /// No command works on the domain and none was interrupted.
    Idle,
    /// Another command holds the domain's lock.
    Busy {
        /// Its process, when known.
        pid: Option<u32>,
        /// The snapshot operation it is running, if it is one.
        operation: Option<Operation>,
        /// That operation's snapshot.
        snapshot: Option<Name>,
    },
    /// An operation was interrupted (its process died): the next command, or `recover`, finishes
    /// or undoes it.
    Interrupted {
        /// The operation.
        operation: Operation,
        /// Its snapshot.
        snapshot: Name,
    },
}

/// What [`Orchestrator::abandon`] gave up, and what it left behind.
#[derive(Debug, Clone, Serialize)]
pub struct Abandoned {
    /// The domain.
    pub domain: Name,
    /// The operation given up.
    pub operation: Operation,
    /// Its snapshot.
    pub snapshot: Name,
    /// What remains of it, for the user to inspect or remove by hand.
    pub left_behind: Vec<String>,
}

fn operation_of(intent: &Intent) -> Operation {
    match intent {
        Intent::Create { .. } => Operation::Create,
        Intent::Delete { .. } => Operation::Delete,
        Intent::Revert { .. } => Operation::Revert,
    }
}

impl Orchestrator {
    /// The domain's activity, without waiting for its lock.
    pub fn activity(&self, domain: &Name) -> Result<Activity> {
        let intent = self.store.intent(domain)?;
        Ok(match (self.store.try_lock(domain)?, intent) {
            (Err(pid), intent) => Activity::Busy {
                pid,
                operation: intent.as_ref().map(operation_of),
                snapshot: intent.as_ref().map(|i| i.snapshot().clone()),
            },
            (Ok(_lock), Some(intent)) => Activity::Interrupted {
                operation: operation_of(&intent),
                snapshot: intent.snapshot().clone(),
            },
            (Ok(_lock), None) => Activity::Idle,
        })
    }

    /// Drops the intent of an interrupted operation that can never complete (recovery keeps
    /// failing), after listing what it leaves behind. Nothing else is changed: the files, disk
    /// snapshots and overlays it lists are the user's to inspect. `None` when nothing was
    /// interrupted.
    pub async fn abandon(&self, domain: &Name) -> Result<Option<Abandoned>> {
        let _lock = self.store.lock(domain, self.lock_wait).await?;
        let Some(intent) = self.store.intent(domain)? else {
            return Ok(None);
        };
        let left_behind = self.left_behind(domain, &intent).await;
        self.store.clear_intent(domain)?;
        tracing::warn!(%domain, ?left_behind, "abandoned an interrupted operation");
        Ok(Some(Abandoned {
            domain: domain.clone(),
            operation: operation_of(&intent),
            snapshot: intent.snapshot().clone(),
            left_behind,
        }))
    }

    /// What an interrupted operation may have left: the snapshot's files, internal snapshots of
    /// its name, overlays, and the domain's state.
    async fn left_behind(&self, domain: &Name, intent: &Intent) -> Vec<String> {
        let mut left = Vec::new();
        let files = self.store.files(domain, intent.snapshot());
        if files.dir.exists() && self.store.get(domain, intent.snapshot()).is_err() {
            left.push(format!(
                "snapshot folder {} (no record: not a snapshot)",
                files.dir.display()
            ));
        }
        if let Intent::Create {
            memory_path: Some(image),
            ..
        } = intent
        {
            if image.exists() {
                left.push(format!("memory image {}", image.display()));
            }
        }
        if let Intent::Create { quiesce: true, .. } = intent {
            left.push("the guest's filesystems, if they are still frozen".to_owned());
        }
        let (disks, overlays) = match intent {
            Intent::Create { disks, .. } => (disks.clone(), new_overlays(disks)),
            Intent::Delete { record } => (record.disks.clone(), Vec::new()),
            Intent::Revert { new_overlays, .. } => (Vec::new(), new_overlays.clone()),
        };
        if let Ok(backend) = self.hypervisor.disk_backend(domain).await {
            for disk in &disks {
                if let DiskSnapshot::Internal { name } = &disk.snapshot {
                    if let Ok(true) = holds_internal(&*backend, &disk.image, name).await {
                        left.push(format!("internal snapshot {name} of {}", disk.image.display()));
                    }
                }
            }
        }
        for overlay in overlays.iter().filter(|o| o.exists()) {
            left.push(format!("overlay {}", overlay.display()));
        }
        match self.hypervisor.state(domain).await {
            Ok(state) => left.push(format!("the domain is {state:?}")),
            Err(e) => left.push(format!("the domain's state is unknown: {e}")),
        }
        left
    }
}
