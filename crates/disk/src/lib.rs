//! Disk-snapshot backends: qcow2 internal and external snapshots, live (QMP) and offline (native).
//!
//! Filled in by the `disk` issue; see `docs/architecture.md` for the role this crate plays.
