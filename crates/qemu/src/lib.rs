//! The QEMU domain driver: launches QEMU 10 with guest RAM in a shared file and drives it over QMP.
//!
//! Filled in by the `snapshot-core` issue; see `docs/architecture.md` for the role this crate plays.
