//! The progress callback: the orchestrator's [`Observer`] calling a C function.

use std::{
    ffi::{c_char, c_void, CString},
    sync::{Mutex, PoisonError},
};

use memory::RoundStats;
use snapshot_core::{Observer, Operation, Step};

/// Called as each step of a snapshot operation starts, with the operation's and the step's
/// names (`"create"`, `"snapshot-disks"`: the names of the CLI's JSON and of `domsnap`'s
/// `DOMSNAP_TEST_KILL_AT`) and the `user` pointer given to `domsnap_ctx_set_progress`; after
/// each memory round of a create, with the step `"memory-round"`. The strings live during the
/// callback only. It runs during the domsnap call, on the calling thread or on one of the
/// context's worker threads, and must not call domsnap.
#[allow(non_camel_case_types, reason = "the C name, as the header spells it")]
pub type domsnap_progress_cb =
    Option<unsafe extern "C" fn(operation: *const c_char, step: *const c_char, user: *mut c_void)>;

/// The callback and its `user` pointer.
#[derive(Debug, Clone, Copy)]
struct Callback {
    function: unsafe extern "C" fn(*const c_char, *const c_char, *mut c_void),
    user: *mut c_void,
}

// SAFETY: `domsnap_ctx_set_progress` documents that the callback is called from the context's
// worker threads as well as the caller's, with `user` as given: the caller vouches that both may
// be used from any thread. domsnap never dereferences `user`.
unsafe impl Send for Callback {}
// SAFETY: as for `Send`: the pointer is only copied and handed back to the caller's function.
unsafe impl Sync for Callback {}

/// The context's observer: calls the callback, if one is set.
#[derive(Debug, Default)]
pub struct Progress {
    callback: Mutex<Option<Callback>>,
}

impl Progress {
    /// Sets (or, with `None`, removes) the callback.
    pub fn set(&self, function: domsnap_progress_cb, user: *mut c_void) {
        let callback = function.map(|function| Callback { function, user });
        *self.callback.lock().unwrap_or_else(PoisonError::into_inner) = callback;
    }

    fn call(&self, operation: &str, step: &str) {
        // Copied out: the lock is not held while the caller's code runs.
        let callback = *self.callback.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(Callback { function, user }) = callback else {
            return;
        };
        let (Ok(operation), Ok(step)) = (CString::new(operation), CString::new(step)) else {
            return;
        };
        // SAFETY: the caller set `function` with this signature and `user` for it; the strings
        // are NUL-terminated and outlive the call.
        unsafe { function(operation.as_ptr(), step.as_ptr(), user) };
    }
}

/// The serialised (kebab-case) name of an operation or a step.
fn name<T: serde::Serialize>(value: T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "unknown".to_owned(),
    }
}

impl Observer for Progress {
    fn step(&self, operation: Operation, step: Step) {
        self.call(&name(operation), &name(step));
    }

    fn memory_round(&self, _stats: &RoundStats) {
        self.call(&name(Operation::Create), "memory-round");
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    unsafe extern "C" fn record(operation: *const c_char, step: *const c_char, user: *mut c_void) {
        // SAFETY: `user` is the `Vec` the test passed; the strings are valid during the call.
        let (seen, operation, step) = unsafe {
            (
                &mut *user.cast::<Vec<String>>(),
                CStr::from_ptr(operation),
                CStr::from_ptr(step),
            )
        };
        seen.push(format!(
            "{}/{}",
            operation.to_str().unwrap(),
            step.to_str().unwrap()
        ));
    }

    #[test]
    fn steps_reach_the_callback_by_their_names() {
        let progress = Progress::default();
        progress.step(Operation::Create, Step::Inspect);
        let mut seen: Vec<String> = Vec::new();
        progress.set(Some(record), std::ptr::from_mut(&mut seen).cast());
        progress.step(Operation::Create, Step::SnapshotDisks);
        progress.step(Operation::Revert, Step::LoadDeviceState);
        progress.set(None, std::ptr::null_mut());
        progress.step(Operation::Delete, Step::DeleteDisks);
        assert_eq!(seen, ["create/snapshot-disks", "revert/load-device-state"]);
    }
}
