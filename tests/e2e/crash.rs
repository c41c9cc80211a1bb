//! Crash safety end to end: `domsnap` killed (SIGKILL) at every step, then `recover`.

mod common;
