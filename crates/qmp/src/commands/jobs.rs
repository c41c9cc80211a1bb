//! Job commands (`job-*`, `query-jobs`) and QEMU's whole-VM internal snapshot jobs.

use serde::{Deserialize, Serialize};

use super::command;
use crate::types::{Empty, JobStatus, JobType};

/// `query-jobs`: every job that has not been dismissed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryJobs;
command!(QueryJobs => "query-jobs", Vec<JobInfo>);

/// One job (`JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// The kind of job.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Its status.
    pub status: JobStatus,
    /// Progress so far.
    pub current_progress: u64,
    /// Estimated total.
    pub total_progress: u64,
    /// Set when the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// Declares a command whose only argument is the job id.
macro_rules! job_id_command {
    ($(#[$meta:meta])* $ty:ident => $name:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Serialize)]
        pub struct $ty {
            /// The job id.
            pub id: String,
        }
        command!($ty => $name, Empty);
    };
}

job_id_command!(
    /// `job-complete`: tell a ready job (e.g. an active commit) to finish.
    JobComplete => "job-complete"
);
job_id_command!(
    /// `job-dismiss`: remove a concluded job.
    JobDismiss => "job-dismiss"
);
job_id_command!(
    /// `job-cancel`: cancel a job.
    JobCancel => "job-cancel"
);
job_id_command!(
    /// `job-finalize`: finalize a pending job (when `auto-finalize` is off).
    JobFinalize => "job-finalize"
);

/// `snapshot-save`: QEMU's own whole-VM internal snapshot into a qcow2 image (a job).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotSave {
    /// The job's id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The node that stores the VM state.
    pub vmstate: String,
    /// The nodes to snapshot.
    pub devices: Vec<String>,
}
command!(SnapshotSave => "snapshot-save", Empty);

/// `snapshot-load`: load a snapshot taken by `snapshot-save` (a job).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotLoad {
    /// The job's id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The node that stores the VM state.
    pub vmstate: String,
    /// The nodes to revert.
    pub devices: Vec<String>,
}
command!(SnapshotLoad => "snapshot-load", Empty);

/// `snapshot-delete`: delete a snapshot from the given nodes (a job).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDelete {
    /// The job's id.
    pub job_id: String,
    /// The snapshot's name.
    pub tag: String,
    /// The nodes to delete it from.
    pub devices: Vec<String>,
}
command!(SnapshotDelete => "snapshot-delete", Empty);
