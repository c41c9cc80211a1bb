//! Typed commands: each is a struct of its arguments (serialised with serde) that names the
//! command and its reply type. Field names follow the QAPI schema; optional arguments are
//! `Option`s that are left out when `None`.
//!
//! A command without a typed binding can still be run with [`crate::Client::execute_raw`].

use serde::{de::DeserializeOwned, Serialize};

mod block;
mod fd;
mod jobs;
mod machine;
mod migration;

pub use block::*;
pub use fd::*;
pub use jobs::*;
pub use machine::*;
pub use migration::*;

/// A QMP command: its arguments are `Self`, its name and reply type are associated items.
pub trait Command: Serialize + Send + Sync {
    /// The command's name on the wire, e.g. `query-status`.
    const NAME: &'static str;
    /// What a successful reply decodes into.
    type Response: DeserializeOwned;
}

/// Implements [`Command`] for a struct: `command!(Type => "wire-name", Response);`.
macro_rules! command {
    ($ty:ty => $name:literal, $response:ty) => {
        impl $crate::commands::Command for $ty {
            const NAME: &'static str = $name;
            type Response = $response;
        }
    };
}
use command;
