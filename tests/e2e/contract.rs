//! The CLI's machine contract (docs/cli.md, "Output, errors, exit status"): every `--json`
//! document of every command has the keys of its example in docs/cli.md (parsed out of the
//! document, so the two cannot drift), carries `"version": 1`; errors are JSON documents with
//! their class; exit statuses follow the class; completions and the man page are generated.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

mod common;

use std::collections::BTreeMap;

use common::{Cli, Workload};
use serde_json::Value;

/// The examples of docs/cli.md: each fenced block whose info string is `json example:ID`.
fn documented() -> BTreeMap<String, Value> {
    let text = include_str!("../../docs/cli.md");
    let mut examples = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(id) = line.trim().strip_prefix("```json example:") else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let example = serde_json::from_str(&body.join("\n"))
            .unwrap_or_else(|e| panic!("docs/cli.md: example {id} is not JSON: {e}"));
        assert!(
            examples.insert(id.to_owned(), example).is_none(),
            "docs/cli.md: two examples {id}"
        );
    }
    examples
}

/// Where `real` has other keys than `documented` (objects compared key by key, recursively;
/// arrays by their first elements; other values, null against anything, and variants of a
/// tagged enum of another `"kind"` not at all).
fn key_differences(path: &str, documented: &Value, real: &Value, found: &mut Vec<String>) {
    match (documented, real) {
        (Value::Object(doc), Value::Object(out)) if doc.get("kind") != out.get("kind") => {}
        (Value::Object(doc), Value::Object(out)) => {
            for key in doc.keys().filter(|k| !out.contains_key(*k)) {
                found.push(format!("{path}.{key} is documented but not printed"));
            }
            for (key, value) in out {
                match doc.get(key) {
                    Some(doc_value) => key_differences(&format!("{path}.{key}"), doc_value, value, found),
                    None => found.push(format!("{path}.{key} is printed but not documented")),
                }
            }
        }
        (Value::Array(doc), Value::Array(out)) => {
            if let (Some(doc), Some(out)) = (doc.first(), out.first()) {
                key_differences(&format!("{path}[0]"), doc, out, found);
            }
        }
        _ => {}
    }
}

/// Runs a command that must fail with `status`; its JSON error document.
fn json_failure(cli: &Cli, args: &[&str], status: i32) -> Value {
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    let run = cli.run(&with_json);
    assert_eq!(
        run.output.status.code(),
        Some(status),
        "domsnap {args:?}:\n{}{}",
        run.stdout(),
        run.stderr()
    );
    serde_json::from_str(&run.stdout())
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", run.stdout()))
}

/// Every command with a JSON document, run on a real domain: (example id, document).
fn real_documents(cli: &Cli) -> BTreeMap<&'static str, Value> {
    let domain = cli.define_domain("doc", 128, Workload::Idle, 2);
    let name = domain.name.as_str();
    let mut real = BTreeMap::new();
    real.insert(
        "domain-start",
        cli.json(&["domain", "start", domain.config.to_str().unwrap()]),
    );
    domain.wait_for_serial("DOMSNAP READY", std::time::Duration::from_secs(90));
    real.insert("domain-status", cli.json(&["domain", "status", name]));
    real.insert("domain-list", cli.json(&["domain", "list"]));
    real.insert("domain-pause", cli.json(&["domain", "pause", name]));
    real.insert("domain-resume", cli.json(&["domain", "resume", name]));
    let create = [
        "snapshot",
        "create",
        name,
        "s1",
        "--live",
        "--disk",
        "vdb=external",
    ];
    real.insert("snapshot-create", cli.json(&create));
    real.insert("snapshot-list", cli.json(&["snapshot", "list", name]));
    real.insert("snapshot-show", cli.json(&["snapshot", "show", name, "s1"]));
    real.insert("snapshot-verify", cli.json(&["snapshot", "verify", name, "s1"]));
    real.insert("snapshot-revert", cli.json(&["snapshot", "revert", name, "s1"]));
    real.insert("snapshot-current", cli.json(&["snapshot", "current", name, "s1"]));
    real.insert(
        "snapshot-list-tree",
        cli.json(&["snapshot", "list", name, "--tree"]),
    );
    real.insert("snapshot-rescan", cli.json(&["snapshot", "rescan", name]));
    real.insert("snapshot-delete", cli.json(&["snapshot", "delete", name, "s1"]));
    real.insert("recover", cli.json(&["recover"]));
    // A create killed as it pauses the guest leaves an operation to abandon.
    let killed = cli
        .command(&["snapshot", "create", name, "s2"])
        .env("DOMSNAP_TEST_KILL_AT", "pause")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    real.insert("recover-abandon", cli.json(&["recover", name, "--abandon"]));
    real.insert(
        "error",
        json_failure(cli, &["snapshot", "show", name, "nosuch"], 3),
    );
    real.insert("domain-stop", cli.json(&["domain", "stop", name, "--force"]));
    real.insert("domain-undefine", cli.json(&["domain", "undefine", name]));
    real
}

#[test]
fn every_json_document_has_its_documented_keys_and_a_version() {
    let cli = Cli::new();
    let real = real_documents(&cli);
    let documented = documented();
    let ids: Vec<&str> = documented.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        real.keys().copied().collect::<Vec<_>>(),
        "docs/cli.md's examples"
    );
    let mut found = Vec::new();
    for (id, document) in &real {
        assert_eq!(document["version"], 1, "{id}: {document:#}");
        key_differences(id, &documented[*id], document, &mut found);
    }
    assert!(
        found.is_empty(),
        "docs/cli.md and the real output differ:\n{}\n\nreal output:\n{}",
        found.join("\n"),
        serde_json::to_string_pretty(&real).unwrap()
    );
    assert_eq!(real["recover-abandon"]["abandoned"]["operation"], "create");
    assert_eq!(real["error"]["error"]["code"], "not_found");
}

#[test]
fn failures_exit_with_their_class_and_say_it_in_json() {
    let cli = Cli::new();
    let missing = json_failure(&cli, &["domain", "status", "nosuch"], 3);
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    assert_eq!(missing["error"]["message"], "domain nosuch is not defined");
    assert!(missing["error"]["operation"].is_null() && missing["error"]["rollback"].is_null());
    let bad_name = json_failure(&cli, &["domain", "status", "../x"], 6);
    assert_eq!(bad_name["error"]["code"], "invalid_argument", "{bad_name}");
    let usage = json_failure(&cli, &["snapshot", "create"], 2);
    assert_eq!(usage["error"]["code"], "invalid_argument", "{usage}");
    // Without --json: the one-line error only, and the same status.
    let run = cli.run(&["domain", "status", "nosuch"]);
    assert_eq!(run.output.status.code(), Some(3));
    assert!(run.stdout().is_empty());
    assert_eq!(run.stderr(), "domsnap: error: domain nosuch is not defined\n");
}

#[test]
fn completions_and_the_man_page_come_from_the_commands() {
    let cli = Cli::new();
    for shell in ["bash", "zsh", "fish"] {
        let script = cli.ok(&["completions", shell]);
        for word in ["snapshot", "revert", "--live-mode"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let man = cli.ok(&["man"]);
    assert!(man.contains(".TH domsnap 1"), "{man}");
    assert!(man.contains("completions"), "{man}");
    assert_eq!(cli.run(&["completions", "tcsh"]).output.status.code(), Some(2));
}
