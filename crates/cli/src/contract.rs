//! The machine contract of the CLI (docs/cli.md, "Output, errors, exit status"): every `--json`
//! document carries `"version": 1`; a failure is a JSON document too, `{"version": 1, "error":
//! {"code", "message", "operation", "step", "rollback"}}`, whose `code` is the error's class
//! ([`ErrorClass`], shared with the C API); and the exit status follows the class.

use serde::{ser::SerializeMap, Serialize, Serializer};
use snapshot_core::{ErrorClass, Operation, Step};

/// The version of every JSON document the CLI prints (`"version"`). It changes only when a
/// document changes incompatibly (a key removed, renamed or retyped); new keys may appear.
pub const VERSION: u32 = 1;

/// Exit status of clap's usage errors (an unknown option, a missing argument).
pub const EXIT_USAGE: i32 = 2;

/// The exit status of a failure of `class` (docs/cli.md has the table).
pub fn exit_code(class: ErrorClass) -> i32 {
    match class {
        ErrorClass::Failed | ErrorClass::Internal => 1,
        ErrorClass::NotFound => 3,
        ErrorClass::AlreadyExists => 4,
        ErrorClass::Busy => 5,
        ErrorClass::InvalidArgument => 6,
        ErrorClass::Unsupported => 7,
        ErrorClass::FailedRolledBack => 8,
        ErrorClass::FailedIncompleteRollback => 9,
    }
}

/// A bad command-line value that clap cannot check itself (e.g. `--disk`): invalid_argument.
#[derive(Debug)]
pub struct BadArgument(pub String);

impl std::fmt::Display for BadArgument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadArgument {}

/// The class of a failure: that of the first error of domsnap's crates in its chain (the
/// orchestrator's or the driver's, see `qemu::error_class`); others are `failed`.
pub fn classify(error: &anyhow::Error) -> ErrorClass {
    for cause in error.chain() {
        if cause.is::<snapshot_core::Error>() || cause.is::<qemu::Error>() {
            return qemu::error_class(cause);
        }
        if cause.is::<snapshot_core::InvalidName>() || cause.is::<BadArgument>() {
            return ErrorClass::InvalidArgument;
        }
    }
    ErrorClass::Failed
}

/// A document whose body is an object: `{"version": 1, ...the body's keys}`.
#[derive(Debug, Serialize)]
pub struct Flat<'a, T: Serialize> {
    version: u32,
    #[serde(flatten)]
    body: &'a T,
}

impl<'a, T: Serialize> Flat<'a, T> {
    pub fn new(body: &'a T) -> Self {
        Flat {
            version: VERSION,
            body,
        }
    }
}

/// A document holding a list or an optional value under one key: `{"version": 1, KEY: value}`.
#[derive(Debug)]
pub struct Keyed<'a, T: Serialize> {
    key: &'static str,
    value: &'a T,
}

impl<'a, T: Serialize> Keyed<'a, T> {
    pub fn new(key: &'static str, value: &'a T) -> Self {
        Keyed { key, value }
    }
}

impl<T: Serialize> Serialize for Keyed<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("version", &VERSION)?;
        map.serialize_entry(self.key, self.value)?;
        map.end()
    }
}

/// `"error"` of a failure's document.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The class, e.g. `not_found`.
    code: ErrorClass,
    /// The one-line message (as on stderr, without `domsnap: error: `).
    message: String,
    /// The snapshot operation that failed at a step, else null.
    operation: Option<Operation>,
    /// Its step, else null.
    step: Option<Step>,
    /// What its undo could not undo (empty: everything was undone), else null.
    rollback: Option<Vec<String>>,
}

/// The document of a failure, `{"version": 1, "error": {...}}`.
pub fn error_document(error: &anyhow::Error, message: String) -> String {
    let failed = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<snapshot_core::Error>())
        .and_then(snapshot_core::Error::failed_step);
    let body = ErrorBody {
        code: classify(error),
        message,
        operation: failed.map(|f| f.operation),
        step: failed.map(|f| f.step),
        rollback: failed.map(|f| f.rollback.to_vec()),
    };
    document(&Keyed::new("error", &body))
}

/// The document of a usage error clap found (`code` invalid_argument, exit status 2).
pub fn usage_document(message: &str) -> String {
    let body = ErrorBody {
        code: ErrorClass::InvalidArgument,
        message: message.to_owned(),
        operation: None,
        step: None,
        rollback: None,
    };
    document(&Keyed::new("error", &body))
}

/// Pretty JSON; our documents always serialise (string keys, no failing `Serialize`).
pub fn document<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| {
        format!(
            "{{\"version\": {VERSION}, \"error\": {{\"code\": \"internal\", \"message\": {:?}, \
             \"operation\": null, \"step\": null, \"rollback\": null}}}}",
            e.to_string()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use snapshot_core::Name;

    #[test]
    fn every_class_has_its_own_exit_status_but_the_catch_all() {
        let mut codes: Vec<i32> = ErrorClass::ALL
            .into_iter()
            .filter(|c| *c != ErrorClass::Internal)
            .map(exit_code)
            .collect();
        codes.push(EXIT_USAGE);
        codes.sort_unstable();
        assert_eq!(codes, (1..=9).collect::<Vec<_>>());
    }

    #[test]
    fn failures_are_classified_through_their_context() {
        let name = Name::new("../x").context("bad snapshot name").unwrap_err();
        assert_eq!(classify(&name), ErrorClass::InvalidArgument);
        let unknown = anyhow::Error::from(qemu::Error::UnknownDomain {
            domain: Name::new("d").unwrap(),
        });
        assert_eq!(classify(&unknown.context("while starting")), ErrorClass::NotFound);
        assert_eq!(classify(&anyhow::anyhow!("other")), ErrorClass::Failed);
        assert_eq!(
            classify(&BadArgument("--disk".into()).into()),
            ErrorClass::InvalidArgument
        );
    }

    #[test]
    fn documents_carry_the_version_and_errors_their_step() {
        let failed = snapshot_core::Error::Failed {
            operation: Operation::Revert,
            domain: Name::new("d").unwrap(),
            snapshot: Name::new("s").unwrap(),
            step: Step::RestoreMemory,
            source: "broken".into(),
            rollback: vec!["cannot remove overlay /o".into()],
            domain_left: None,
        };
        let json: serde_json::Value =
            serde_json::from_str(&error_document(&failed.into(), "revert failed".into())).unwrap();
        assert_eq!(json["version"], 1);
        let error = &json["error"];
        assert_eq!(error["code"], "failed_incomplete_rollback");
        assert_eq!(
            (error["operation"].as_str(), error["step"].as_str()),
            (Some("revert"), Some("restore-memory"))
        );
        assert_eq!(error["rollback"][0], "cannot remove overlay /o");
        let plain: serde_json::Value =
            serde_json::from_str(&error_document(&anyhow::anyhow!("x"), "x".into())).unwrap();
        assert!(plain["error"]["step"].is_null() && plain["error"]["rollback"].is_null());
        let flat = document(&Flat::new(&serde_json::json!({"undefined": "d"})));
        assert_eq!(
            flat.replace(char::is_whitespace, ""),
            r#"{"version":1,"undefined":"d"}"#
        );
        let keyed = document(&Keyed::new("domains", &Vec::<u8>::new()));
        assert_eq!(
            keyed.replace(char::is_whitespace, ""),
            r#"{"version":1,"domains":[]}"#
        );
    }
}
