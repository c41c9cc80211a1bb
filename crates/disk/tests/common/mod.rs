//! Helpers for tests that use qemu-img and qemu-io as the oracle.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

pub fn s(path: &Path) -> String {
    path.display().to_string()
}

/// Runs a QEMU tool, panicking with its output on failure.
pub fn tool(program: &str, args: &[&str]) -> String {
    testkit::require_tool(program);
    testkit::run(program, args)
}

/// Creates a qcow2 image with `qemu-img create -o opts`.
pub fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let p = s(&path);
    args.extend([p.as_str(), size]);
    tool("qemu-img", &args);
    path
}

/// Asserts that `qemu-img check` finds no errors and no leaks.
pub fn check_clean(path: &Path) {
    testkit::require_tool("qemu-img");
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", &s(path)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("qemu-img check: {text} {}", String::from_utf8_lossy(&out.stderr)));
    for field in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            report.get(field).and_then(Value::as_u64).unwrap_or(0),
            0,
            "qemu-img check {}: {report}",
            path.display()
        );
    }
    assert!(
        out.status.success(),
        "qemu-img check {} failed: {report}",
        path.display()
    );
    let image = disk::qcow2::Image::open(path, disk::qcow2::Access::Read).unwrap();
    let ours = image.check().unwrap();
    assert!(
        ours.is_clean(),
        "our check of {} disagrees with qemu-img: {ours:?}",
        path.display()
    );
}

/// Snapshot names as `qemu-img info` lists them.
pub fn qemu_snapshot_names(path: &Path) -> Vec<String> {
    let info: Value = serde_json::from_str(&tool("qemu-img", &["info", "--output=json", &s(path)])).unwrap();
    info["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `len` bytes of `pattern` at `offset` with qemu-io.
pub fn write(path: &Path, pattern: u8, offset: u64, len: u64) {
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
            &s(path),
        ],
    );
}

/// The guest-visible contents (of a snapshot if named), through `qemu-img convert`.
pub fn contents(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("out.raw");
    let mut args = vec![
        "convert".to_owned(),
        "-f".into(),
        "qcow2".into(),
        "-O".into(),
        "raw".into(),
    ];
    if let Some(name) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={name}")]);
    }
    args.extend([s(path), s(&raw)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tool("qemu-img", &args);
    std::fs::read(raw).unwrap()
}

/// Our list of snapshot names.
pub fn our_names(path: &Path) -> Vec<String> {
    disk::offline::list_internal(path)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}
