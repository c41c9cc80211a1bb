//! Snapshots end to end through the `domsnap` CLI, on QEMU 10 with the test guest.

mod common;
