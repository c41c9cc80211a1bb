//! Hypervisor-agnostic orchestration of whole-domain snapshots: create, delete, revert.
//!
//! Filled in by the `snapshot-core` issue; see `docs/architecture.md` for the role this crate plays.
