//! Safe helpers for passing file descriptors to QEMU.

use std::os::fd::BorrowedFd;

use crate::{
    commands::{AddFd, AddFdInfo, Closefd, Getfd, RemoveFd},
    error::Result,
    Client,
};

impl Client {
    /// Passes `fd` to QEMU under `name` (`getfd`), e.g. for `migrate` with `fd:NAME`.
    /// QEMU gets its own copy; the caller's descriptor stays open.
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fds(&Getfd { fdname: name.into() }, &[fd])
            .await?;
        Ok(())
    }

    /// Closes a descriptor passed with [`Client::getfd`].
    pub async fn closefd(&self, name: &str) -> Result<()> {
        self.execute(&Closefd { fdname: name.into() }).await?;
        Ok(())
    }

    /// Adds `fd` to an fd set (a new one when `fdset_id` is `None`); QEMU can then open
    /// `/dev/fdset/N` instead of a path.
    pub async fn add_fd(
        &self,
        fdset_id: Option<u64>,
        fd: BorrowedFd<'_>,
        opaque: Option<&str>,
    ) -> Result<AddFdInfo> {
        self.execute_with_fds(
            &AddFd {
                fdset_id,
                opaque: opaque.map(str::to_owned),
            },
            &[fd],
        )
        .await
    }

    /// Removes a descriptor (or, with `fd: None`, a whole set) from the fd sets.
    pub async fn remove_fd(&self, fdset_id: u64, fd: Option<i64>) -> Result<()> {
        self.execute(&RemoveFd { fdset_id, fd }).await?;
        Ok(())
    }
}
