//! The C API's error type, its stable codes, and the per-thread last-error slots.

use std::{
    cell::RefCell,
    collections::HashMap,
    ffi::{c_char, c_int, CStr, CString},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
};

use snapshot_core::ErrorClass;

/// The stable result codes of the C API: `domsnap_last_error` reports one of them. The values
/// never change; new codes may be added at the end. Each one but `DOMSNAP_OK` is an error class
/// of domsnap, the same the CLI prints (`"code"` of its JSON errors) and turns into its exit
/// status.
#[allow(non_camel_case_types, reason = "the C name, as the header spells it")]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum domsnap_code {
    /// The last call succeeded.
    DOMSNAP_OK = 0,
    /// A domain, snapshot or configuration file named in the call does not exist.
    DOMSNAP_NOT_FOUND = 1,
    /// A snapshot of that name exists already.
    DOMSNAP_ALREADY_EXISTS = 2,
    /// Another command holds the domain (its lock, or a start or stop in progress); try again.
    DOMSNAP_BUSY = 3,
    /// An argument is invalid as given or in the domain's current state: a NULL pointer, text
    /// that is not UTF-8, a bad name, an unknown disk device, an overlay path that exists, a
    /// start of a running domain. Nothing was changed.
    DOMSNAP_INVALID_ARGUMENT = 4,
    /// The call asks for something domsnap cannot do (yet). Nothing was changed.
    DOMSNAP_UNSUPPORTED = 5,
    /// A snapshot operation failed at a step and everything it had done was undone.
    DOMSNAP_FAILED_ROLLED_BACK = 6,
    /// A snapshot operation failed and its undo failed too: the message lists what is left; the
    /// next call on the domain (or `domsnap recover`) tries again.
    DOMSNAP_FAILED_INCOMPLETE_ROLLBACK = 7,
    /// Any other failure: an I/O error in the state directory, the hypervisor failing a domain
    /// call (a start, a stop).
    DOMSNAP_FAILED = 8,
    /// A bug in domsnap (a panic, caught before it reached the caller).
    DOMSNAP_INTERNAL = 9,
}

impl From<ErrorClass> for domsnap_code {
    fn from(class: ErrorClass) -> Self {
        match class {
            ErrorClass::NotFound => domsnap_code::DOMSNAP_NOT_FOUND,
            ErrorClass::AlreadyExists => domsnap_code::DOMSNAP_ALREADY_EXISTS,
            ErrorClass::Busy => domsnap_code::DOMSNAP_BUSY,
            ErrorClass::InvalidArgument => domsnap_code::DOMSNAP_INVALID_ARGUMENT,
            ErrorClass::Unsupported => domsnap_code::DOMSNAP_UNSUPPORTED,
            ErrorClass::FailedRolledBack => domsnap_code::DOMSNAP_FAILED_ROLLED_BACK,
            ErrorClass::FailedIncompleteRollback => domsnap_code::DOMSNAP_FAILED_INCOMPLETE_ROLLBACK,
            ErrorClass::Failed => domsnap_code::DOMSNAP_FAILED,
            ErrorClass::Internal => domsnap_code::DOMSNAP_INTERNAL,
        }
    }
}

/// The class's name (`not_found`, ...) for a code, `ok` for 0, `NULL` for a value that is no
/// code.
pub(crate) fn code_name(code: c_int) -> Option<&'static CStr> {
    Some(match code {
        0 => c"ok",
        1 => c"not_found",
        2 => c"already_exists",
        3 => c"busy",
        4 => c"invalid_argument",
        5 => c"unsupported",
        6 => c"failed_rolled_back",
        7 => c"failed_incomplete_rollback",
        8 => c"failed",
        9 => c"internal",
        _ => return None,
    })
}

/// Why a call of the C API failed.
#[derive(Debug, thiserror::Error)]
pub enum CapiError {
    /// The orchestrator or the store failed.
    #[error(transparent)]
    Core(#[from] snapshot_core::Error),
    /// The QEMU driver failed (a domain call, a definition).
    #[error(transparent)]
    Driver(#[from] qemu::Error),
    /// A pointer, text or value the caller passed is unusable.
    #[error("{0}")]
    InvalidArgument(String),
    /// The arguments ask for something domsnap cannot do yet.
    #[error("{0}")]
    Unsupported(String),
    /// The tokio runtime of a new context cannot be started.
    #[error("cannot start the context's runtime")]
    Runtime(#[source] std::io::Error),
    /// A report cannot be encoded as JSON.
    #[error("cannot encode the {what} as JSON")]
    Json {
        /// What was being encoded.
        what: &'static str,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A panic caught at the boundary.
    #[error("internal error (a bug in domsnap): {0}")]
    Panic(String),
}

impl From<snapshot_core::InvalidName> for CapiError {
    fn from(error: snapshot_core::InvalidName) -> Self {
        CapiError::Core(error.into())
    }
}

impl CapiError {
    /// The error's class: the orchestrator's and the driver's classification.
    pub fn class(&self) -> ErrorClass {
        match self {
            CapiError::Core(error) => qemu::error_class(error),
            CapiError::Driver(error) => error.class(),
            CapiError::InvalidArgument(_) => ErrorClass::InvalidArgument,
            CapiError::Unsupported(_) => ErrorClass::Unsupported,
            CapiError::Runtime(_) => ErrorClass::Failed,
            CapiError::Json { .. } | CapiError::Panic(_) => ErrorClass::Internal,
        }
    }

    /// The message with its causes, each once (wrappers often print their source already).
    pub fn message(&self) -> String {
        let mut kept: Vec<String> = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = next {
            let message = error.to_string();
            if !kept.last().is_some_and(|last| last.contains(message.as_str())) {
                kept.push(message);
            }
            next = error.source();
        }
        kept.join(": ")
    }

    /// A caught panic's payload as an error.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        CapiError::Panic(text)
    }
}

/// A failed call's code and message, kept until the same thread's next call.
#[derive(Debug)]
pub(crate) struct LastError {
    code: domsnap_code,
    message: CString,
}

impl LastError {
    pub(crate) fn new(error: &CapiError) -> Self {
        LastError {
            code: error.class().into(),
            message: c_string_lossy(error.message()),
        }
    }

    /// The code and the message, which lives as long as this slot is not replaced.
    pub(crate) fn get(&self) -> (domsnap_code, *const c_char) {
        (self.code, self.message.as_ptr())
    }
}

/// `text` as a C string, its NUL bytes (impossible in our messages, but paths may hold
/// anything) replaced.
pub(crate) fn c_string_lossy(text: String) -> CString {
    CString::new(text).unwrap_or_else(|e| {
        let text = String::from_utf8_lossy(&e.into_vec()).replace('\0', "\\0");
        CString::new(text).unwrap_or_default()
    })
}

/// The last error of each thread on one context: a thread's slot is replaced by its next failing
/// call and removed by its next successful one (so the map holds only threads whose last call
/// failed), never by another thread's call. A message's bytes are owned by its `CString`, which
/// does not move when the map does.
#[derive(Debug, Default)]
pub(crate) struct ErrorSlots {
    slots: Mutex<HashMap<u64, LastError>>,
}

/// The calling thread's number: unique in the process and never reused (unlike a thread's
/// `pthread_t`). Not `std::thread::current().id()`: on a thread Rust did not start (the C
/// caller's main thread) that allocates a handle std never frees, which valgrind reports.
fn thread_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static NUMBER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    NUMBER.with(|number| {
        if number.get() == 0 {
            number.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        number.get()
    })
}

impl ErrorSlots {
    pub(crate) fn set(&self, error: Option<LastError>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let thread = thread_number();
        match error {
            Some(error) => slots.insert(thread, error),
            None => slots.remove(&thread),
        };
    }

    /// The calling thread's last error, or `DOMSNAP_OK` and an empty message.
    pub(crate) fn get(&self) -> (domsnap_code, *const c_char) {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .get(&thread_number())
            .map_or((domsnap_code::DOMSNAP_OK, c"".as_ptr()), LastError::get)
    }
}

thread_local! {
    /// Errors of calls without a context (a failed `domsnap_ctx_open`, a NULL `ctx`), read with
    /// `domsnap_last_error(NULL, ...)`.
    static NO_CONTEXT: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// Records the calling thread's error of a call without a context.
pub(crate) fn set_without_context(error: Option<LastError>) {
    NO_CONTEXT.with(|slot| *slot.borrow_mut() = error);
}

/// The calling thread's last error of a call without a context.
pub(crate) fn get_without_context() -> (domsnap_code, *const c_char) {
    NO_CONTEXT.with(|slot| {
        slot.borrow()
            .as_ref()
            .map_or((domsnap_code::DOMSNAP_OK, c"".as_ptr()), LastError::get)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_classes_in_order_and_have_their_names() {
        for (index, class) in ErrorClass::ALL.into_iter().enumerate() {
            let code = domsnap_code::from(class) as c_int;
            assert_eq!(usize::try_from(code).unwrap(), index + 1);
            assert_eq!(code_name(code).unwrap().to_str().unwrap(), class.as_str());
        }
        assert_eq!(code_name(0), Some(c"ok"));
        assert_eq!(code_name(10), None);
    }

    #[test]
    fn messages_keep_each_cause_once() {
        let name = snapshot_core::Name::new("d").unwrap();
        let error = CapiError::from(qemu::Error::UnknownDomain { domain: name });
        assert_eq!(error.message(), "domain d is not defined");
        assert_eq!(error.class(), ErrorClass::NotFound);
        let json = serde_json::from_str::<u8>("x").unwrap_err();
        let error = CapiError::Json {
            what: "list",
            source: json,
        };
        assert!(error
            .message()
            .starts_with("cannot encode the list as JSON: expected"));
    }

    #[test]
    fn slots_are_per_thread() {
        let slots = ErrorSlots::default();
        slots.set(Some(LastError::new(&CapiError::Unsupported("no".into()))));
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(slots.get().0, domsnap_code::DOMSNAP_OK));
        });
        let (code, message) = slots.get();
        assert_eq!(code, domsnap_code::DOMSNAP_UNSUPPORTED);
        // SAFETY: the slot is alive and unchanged until the next `set` on this thread.
        assert_eq!(unsafe { CStr::from_ptr(message) }, c"no");
        slots.set(None);
        assert_eq!(slots.get().0, domsnap_code::DOMSNAP_OK);
        assert_eq!(c_string_lossy("a\0b".into()), c"a\\0b");
    }
}
