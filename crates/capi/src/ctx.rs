//! The context: a tokio runtime, the orchestrator over the QEMU driver and the store, the
//! progress callback and the last errors; and the boundary every entry point crosses.

use std::{
    ffi::c_int,
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    calls::Api,
    error::{self, CapiError, ErrorSlots, LastError},
    progress::Progress,
};

/// Worker threads of a context's runtime: the orchestrator's work is mostly waiting (QEMU,
/// disks); memory saves run on their own threads.
const WORKER_THREADS: usize = 2;

/// A domsnap context (opaque to C): one per state directory, made by `domsnap_ctx_open`.
///
/// It may be shared between threads: every call takes it by shared reference, calls on one
/// domain wait for each other through the domain's lock (as separate processes do), and each
/// thread has its own last error.
#[allow(non_camel_case_types, reason = "the C name, as the header spells it")]
#[derive(Debug)]
pub struct domsnap_ctx {
    /// `None` only while it is closed.
    runtime: Option<tokio::runtime::Runtime>,
    /// `None` only while it is closed (dropped before the runtime).
    api: Option<Api>,
    progress: Arc<Progress>,
    errors: ErrorSlots,
}

impl domsnap_ctx {
    /// A context over the state directory `state_dir` (made absolute against the working
    /// directory).
    pub fn open(state_dir: &str) -> Result<Self, CapiError> {
        let mut dir = PathBuf::from(state_dir);
        if state_dir.is_empty() {
            return Err(CapiError::InvalidArgument("state_dir is empty".into()));
        }
        if dir.is_relative() {
            let cwd = std::env::current_dir().map_err(|e| {
                CapiError::InvalidArgument(format!(
                    "state_dir {state_dir} is relative and the working directory is unknown: {e}"
                ))
            })?;
            dir = cwd.join(dir);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("domsnap-worker")
            .enable_all()
            .build()
            .map_err(CapiError::Runtime)?;
        let progress = Arc::new(Progress::default());
        let api = Api::new(&dir, progress.clone());
        Ok(domsnap_ctx {
            runtime: Some(runtime),
            api: Some(api),
            progress,
            errors: ErrorSlots::default(),
        })
    }

    /// The progress callback.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Runs `call` (a future over the context's calls) to its end on the calling thread.
    pub fn run<'a, T, F>(&'a self, call: impl FnOnce(&'a Api) -> F) -> Result<T, CapiError>
    where
        F: Future<Output = Result<T, CapiError>> + 'a,
    {
        let (Some(runtime), Some(api)) = (&self.runtime, &self.api) else {
            return Err(CapiError::Panic("the context is closed".into()));
        };
        runtime.block_on(call(api))
    }

    /// Runs a call that does not wait (reads of the store).
    pub fn read<T>(&self, call: impl FnOnce(&Api) -> Result<T, CapiError>) -> Result<T, CapiError> {
        let api = self
            .api
            .as_ref()
            .ok_or_else(|| CapiError::Panic("the context is closed".into()))?;
        call(api)
    }

    /// The calling thread's last error.
    pub fn last_error(&self) -> (error::domsnap_code, *const std::ffi::c_char) {
        self.errors.get()
    }

    /// Drops the driver's connections and tasks, then shuts the runtime down, waiting for its
    /// threads to end (so nothing of it outlives the context).
    pub fn close(mut self) {
        if let Some(runtime) = self.runtime.take() {
            let guard = runtime.enter();
            drop(self.api.take());
            drop(guard);
            drop(runtime);
        }
    }
}

/// The boundary every entry point with a context crosses: a NULL context, an error and a panic
/// all return -1 with the calling thread's last error set; success returns 0 and clears it.
///
/// # Safety
/// `ctx` is NULL or a context from `domsnap_ctx_open` that is not closed during the call.
pub unsafe fn enter(
    ctx: *const domsnap_ctx,
    call: impl FnOnce(&domsnap_ctx) -> Result<(), CapiError>,
) -> c_int {
    // SAFETY: NULL or a live context, by the caller's contract.
    let Some(ctx) = (unsafe { ctx.as_ref() }) else {
        let error = CapiError::InvalidArgument("ctx is NULL".into());
        error::set_without_context(Some(LastError::new(&error)));
        return -1;
    };
    let result = catch_unwind(AssertUnwindSafe(|| call(ctx)))
        .unwrap_or_else(|payload| Err(CapiError::from_panic(payload.as_ref())));
    match result {
        Ok(()) => {
            ctx.errors.set(None);
            0
        }
        Err(error) => {
            ctx.errors.set(Some(LastError::new(&error)));
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;
    use crate::error::domsnap_code;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn a_context_is_shared_between_threads_with_an_error_each() {
        assert_send_sync::<domsnap_ctx>();
        let state = tempfile::tempdir().unwrap();
        let ctx = domsnap_ctx::open(state.path().to_str().unwrap()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: the context is alive for the call.
                let rc = unsafe {
                    enter(&ctx, |ctx| {
                        ctx.read(|api| api.list("nosuch", snapshot_core::ListFilter::All))
                            .map(drop)
                    })
                };
                assert_eq!(rc, -1);
                assert_eq!(ctx.last_error().0, domsnap_code::DOMSNAP_NOT_FOUND);
            })
            .join()
            .unwrap();
        });
        assert_eq!(ctx.last_error().0, domsnap_code::DOMSNAP_OK);
        ctx.close();
    }

    #[test]
    fn a_panic_is_caught_and_reported_as_internal() {
        let state = tempfile::tempdir().unwrap();
        let ctx = domsnap_ctx::open(state.path().to_str().unwrap()).unwrap();
        // SAFETY: the context is alive for the call.
        let rc = unsafe { enter(&ctx, |_| panic!("boom")) };
        assert_eq!(rc, -1);
        let (code, message) = ctx.last_error();
        assert_eq!(code, domsnap_code::DOMSNAP_INTERNAL);
        // SAFETY: the message lives until this thread's next call on the context.
        let message = unsafe { CStr::from_ptr(message) }.to_str().unwrap();
        assert_eq!(message, "internal error (a bug in domsnap): boom");
        // The context still works.
        // SAFETY: as above.
        assert_eq!(unsafe { enter(&ctx, |_| Ok(())) }, 0);
        // SAFETY: a NULL context is allowed.
        assert_eq!(unsafe { enter(std::ptr::null(), |_| Ok(())) }, -1);
        assert_eq!(
            error::get_without_context().0,
            domsnap_code::DOMSNAP_INVALID_ARGUMENT
        );
        ctx.close();
    }
}
