//! Intent records: what a multi-step operation is about to do, written before its first step so
//! that `recover` can finish or undo it after a crash.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{
    metadata::{DiskRecord, DomainState, SnapshotRecord},
    name::Name,
};

/// An operation in progress on one domain (at most one: the domain lock serialises them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum Intent {
    /// A snapshot is being created. Recovery: if its record was committed the create is
    /// finished, else everything it may have made is undone.
    Create {
        /// The snapshot.
        snapshot: Name,
        /// The domain's state before the create (recovery resumes a domain the create paused).
        was: DomainState,
        /// The disk snapshots it makes (internal names, overlays).
        disks: Vec<DiskRecord>,
        /// The memory image's path when the caller chose it (outside the snapshot's folder);
        /// absent in records of older versions, which had none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_path: Option<PathBuf>,
        /// The create freezes the guest's filesystems (recovery thaws them); absent in records
        /// of older versions, which never froze them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiesce: bool,
    },
    /// A snapshot is being deleted. Recovery finishes the delete (every step is idempotent).
    Delete {
        /// The record as it was before the delete (its metadata file goes early); boxed, as the
        /// largest variant by far (the JSON is the record's all the same).
        record: Box<SnapshotRecord>,
    },
    /// The domain is being reverted to a snapshot. Recovery runs the revert again from the
    /// start: its steps redo cleanly, and the domain's old state is already gone once it stops.
    Revert {
        /// The snapshot.
        snapshot: Name,
        /// Leave the domain paused afterwards.
        paused: bool,
        /// Copy memory into fresh RAM instead of mapping the image (absent in records of older
        /// versions: recovery then maps it, as a revert does by default).
        #[serde(default)]
        eager: bool,
        /// Overlays this revert creates.
        new_overlays: Vec<PathBuf>,
    },
}

impl Intent {
    /// The snapshot the operation is about.
    pub fn snapshot(&self) -> &Name {
        match self {
            Intent::Create { snapshot, .. } | Intent::Revert { snapshot, .. } => snapshot,
            Intent::Delete { record } => &record.name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revert_intent_of_an_older_version_recovers_as_a_lazy_one() {
        let old = r#"{"operation": "revert", "snapshot": "s1", "paused": false, "new_overlays": []}"#;
        let Intent::Revert { eager, paused, .. } = serde_json::from_str(old).unwrap() else {
            panic!("not a revert");
        };
        assert!(!eager && !paused);
    }
}
