//! File-descriptor commands. The descriptors travel with the command over the Unix socket
//! (SCM_RIGHTS); see [`crate::Client::getfd`] and [`crate::Client::add_fd`] for the safe helpers.

use serde::{Deserialize, Serialize};

use super::command;
use crate::types::Empty;

/// `getfd`: store the passed descriptor under a name (for `migrate fd:NAME` and friends).
#[derive(Debug, Clone, Serialize)]
pub struct Getfd {
    /// The name to file the descriptor under.
    pub fdname: String,
}
command!(Getfd => "getfd", Empty);

/// `closefd`: close a descriptor stored with `getfd`.
#[derive(Debug, Clone, Serialize)]
pub struct Closefd {
    /// The name given to `getfd`.
    pub fdname: String,
}
command!(Closefd => "closefd", Empty);

/// `add-fd`: add the passed descriptor to an fd set (usable as `/dev/fdset/N` paths).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFd {
    /// The set to add to; a new set when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fdset_id: Option<u64>,
    /// Free-form text stored with the descriptor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}
command!(AddFd => "add-fd", AddFdInfo);

/// `add-fd`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFdInfo {
    /// The fd set the descriptor went into.
    pub fdset_id: u64,
    /// QEMU's number for the descriptor.
    pub fd: i64,
}

/// `remove-fd`: remove one descriptor, or a whole set, from the fd sets.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoveFd {
    /// The set.
    pub fdset_id: u64,
    /// The descriptor (QEMU's number); the whole set when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<i64>,
}
command!(RemoveFd => "remove-fd", Empty);
