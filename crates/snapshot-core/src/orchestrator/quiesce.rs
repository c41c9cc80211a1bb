//! Quiesce: a create's freeze of the guest's filesystems (through its agent) and the thaw that
//! follows on every path, failures and recovery included.

use super::{at, create::CreateJob, Orchestrator, StepResult};
use crate::{
    error::{Error, Result, Step},
    metadata::DomainState,
    name::Name,
};

impl Orchestrator {
    /// Refuses a quiesce the domain cannot do: it must run (its agent is a guest process) and
    /// have a guest agent channel.
    pub(super) async fn check_quiesce(&self, domain: &Name, was: DomainState) -> Result<()> {
        if was != DomainState::Running {
            return Err(Error::InvalidRequest(format!(
                "domain {domain} is {was}: a quiesced snapshot needs a running guest (its agent \
                 freezes the filesystems)"
            )));
        }
        let has_agent = self.hypervisor.has_guest_agent(domain).await;
        let has_agent = has_agent.map_err(|source| Error::Driver {
            domain: domain.clone(),
            action: "look for the guest agent of",
            source,
        })?;
        if !has_agent {
            return Err(Error::Unsupported(format!(
                "domain {domain} has no guest agent channel, so its filesystems cannot be frozen: \
                 set guest_agent = true in its configuration (and run qemu-guest-agent in the guest)"
            )));
        }
        Ok(())
    }
}

impl CreateJob<'_> {
    /// Freezes the guest's filesystems if the create is quiesced. Undo: [`CreateJob::thaw`].
    pub(super) async fn freeze(&mut self) -> StepResult<()> {
        if !self.quiesce {
            return Ok(());
        }
        self.observe(Step::Freeze);
        self.froze = true;
        let hypervisor = &self.orchestrator.hypervisor;
        let frozen = hypervisor.freeze_filesystems(&self.domain).await;
        frozen.map(drop).map_err(at(Step::Freeze))
    }

    /// Thaws the filesystems the create froze (once; a no-op otherwise).
    pub(super) async fn thaw(&mut self) -> StepResult<()> {
        if !self.froze {
            return Ok(());
        }
        self.observe(Step::Thaw);
        let hypervisor = &self.orchestrator.hypervisor;
        hypervisor
            .thaw_filesystems(&self.domain)
            .await
            .map_err(at(Step::Thaw))?;
        self.froze = false;
        Ok(())
    }

    /// Thaws the guest's filesystems if the create froze them (after a crash: if it was to). The
    /// agent is a guest process: a guest that could not be resumed cannot answer, and then the
    /// thaw is left to the next `recover`.
    pub(super) async fn thaw_after_failure(&mut self) -> std::result::Result<(), String> {
        let may_be_frozen = self.froze || (self.after_crash && self.quiesce);
        if !may_be_frozen {
            return Ok(());
        }
        let hypervisor = &self.orchestrator.hypervisor;
        match hypervisor.state(&self.domain).await {
            Ok(DomainState::Running) => {}
            Ok(DomainState::ShutOff) => return Ok(()),
            Ok(DomainState::Paused) => {
                return Err(
                    "the guest's filesystems stay frozen: it is paused, so its agent cannot thaw them".into(),
                )
            }
            Err(e) => return Err(format!("cannot read the domain's state: {e}")),
        }
        hypervisor
            .thaw_filesystems(&self.domain)
            .await
            .map_err(|e| format!("cannot thaw the guest's filesystems: {e}"))?;
        self.froze = false;
        Ok(())
    }
}
