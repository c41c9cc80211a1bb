//! Guest memory images and the live (pre-copy) save engine.
//!
//! Filled in by the `memory` issue; see `docs/architecture.md` for the role this crate plays.
