//! Running job-style commands to completion.

use std::time::Duration;

use crate::{
    commands::{Command, JobCancel, JobComplete, JobDismiss, QueryJobs},
    error::{Error, Result},
    events::{Event, EventStream},
    types::JobStatus,
    Client,
};

/// How long a cancelled job may take to conclude.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

/// How [`Client::run_job`] drives a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Give up waiting after this long: the job is then cancelled (`job-cancel`) and dismissed.
    pub timeout: Option<Duration>,
    /// Send `job-complete` when the job becomes ready (active-layer commit, mirror).
    pub complete_when_ready: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            timeout: Some(Duration::from_secs(600)),
            complete_when_ready: false,
        }
    }
}

/// What to do after a job reached a status.
enum Next {
    Wait,
    Complete,
    Finish(Result<()>),
}

impl Client {
    /// Starts a job with `command` (whose job id is `job_id`) and waits until it concludes:
    /// completes it when ready (if asked), reads its error, dismisses it, and returns the job's
    /// error as [`Error::JobFailed`].
    ///
    /// The event subscription starts before the command is sent, so no status change is missed.
    /// If events were lost (a lagging subscriber) the job's state is re-read with `query-jobs`.
    pub async fn run_job<C: Command>(&self, command: &C, job_id: &str, options: &JobOptions) -> Result<()> {
        let mut events = self.subscribe();
        self.execute(command).await?;
        let drive = self.drive_job(&mut events, job_id, options.complete_when_ready);
        let Some(after) = options.timeout else {
            return drive.await;
        };
        match tokio::time::timeout(after, drive).await {
            Ok(result) => result,
            Err(_) => {
                // A job left running would hold its nodes (and the image) busy: cancel it.
                let cancelled = self.cancel_job(job_id).await;
                Err(Error::JobLost {
                    job_id: job_id.into(),
                    reason: match cancelled {
                        Ok(()) => format!("not finished after {after:?}; it was cancelled"),
                        Err(e) => format!("not finished after {after:?}, and cancelling it failed: {e}"),
                    },
                })
            }
        }
    }

    /// Cancels a job and dismisses it once it has concluded (waiting a bounded time).
    async fn cancel_job(&self, job_id: &str) -> Result<()> {
        self.execute(&JobCancel { id: job_id.into() }).await?;
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        loop {
            match self.job_status(job_id).await? {
                None => return Ok(()),
                Some(JobStatus::Concluded) => {
                    return self.execute(&JobDismiss { id: job_id.into() }).await.map(drop)
                }
                Some(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Some(status) => {
                    return Err(Error::JobLost {
                        job_id: job_id.into(),
                        reason: format!("still {status} {CANCEL_WAIT:?} after job-cancel"),
                    })
                }
            }
        }
    }

    async fn drive_job(
        &self,
        events: &mut EventStream,
        job_id: &str,
        complete_when_ready: bool,
    ) -> Result<()> {
        // Block jobs that dismiss themselves report their error only in this event.
        let mut completion_error: Option<String> = None;
        loop {
            let status = match events.next().await {
                Ok(message) => match &message.event {
                    Event::JobStatusChange(change) if change.id == job_id => change.status.clone(),
                    Event::BlockJobCompleted(done) if done.device == job_id => {
                        completion_error = done.error.clone();
                        continue;
                    }
                    _ => continue,
                },
                Err(Error::EventsLagged { .. }) => match self.job_status(job_id).await? {
                    Some(status) => status,
                    None => JobStatus::Null,
                },
                Err(other) => return Err(other),
            };
            match self
                .on_job_status(job_id, &status, complete_when_ready, &completion_error)
                .await
            {
                Next::Wait => {}
                Next::Complete => {
                    self.execute(&JobComplete { id: job_id.into() }).await?;
                }
                Next::Finish(result) => return result,
            }
        }
    }

    async fn on_job_status(
        &self,
        job_id: &str,
        status: &JobStatus,
        complete_when_ready: bool,
        completion_error: &Option<String>,
    ) -> Next {
        match status {
            JobStatus::Ready if complete_when_ready => Next::Complete,
            JobStatus::Concluded => Next::Finish(self.conclude(job_id).await),
            JobStatus::Null => Next::Finish(match completion_error {
                Some(error) => Err(Error::JobFailed {
                    job_id: job_id.into(),
                    error: error.clone(),
                }),
                None => Ok(()),
            }),
            JobStatus::Paused | JobStatus::Standby => {
                tracing::warn!(job_id, %status, "job paused; waiting for someone to resume it");
                Next::Wait
            }
            _ => Next::Wait,
        }
    }

    /// Reads a concluded job's error, dismisses the job, and returns the error if any.
    async fn conclude(&self, job_id: &str) -> Result<()> {
        let jobs = self.execute(&QueryJobs).await?;
        let Some(job) = jobs.into_iter().find(|job| job.id == job_id) else {
            return Err(Error::JobLost {
                job_id: job_id.into(),
                reason: "concluded, but gone from query-jobs before its result was read".into(),
            });
        };
        self.execute(&JobDismiss { id: job_id.into() }).await?;
        match job.error {
            Some(error) => Err(Error::JobFailed {
                job_id: job_id.into(),
                error,
            }),
            None => Ok(()),
        }
    }

    async fn job_status(&self, job_id: &str) -> Result<Option<JobStatus>> {
        let jobs = self.execute(&QueryJobs).await?;
        Ok(jobs
            .into_iter()
            .find(|job| job.id == job_id)
            .map(|job| job.status))
    }
}
