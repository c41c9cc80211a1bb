//! Random sequences of snapshot operations and guest writes, each step checked against
//! qemu-img (check, snapshot list) and a model of the disk contents.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::path::PathBuf;

use common::*;
use proptest::prelude::*;

const SIZE: u64 = 2 << 20;
const NAMES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

#[derive(Debug, Clone)]
enum Op {
    /// qemu-io writes `len` bytes of `pattern` at `offset`.
    Write {
        offset: u64,
        len: u64,
        pattern: u8,
    },
    /// Native create / delete / apply of the snapshot `NAMES[i]`.
    Create(usize),
    Delete(usize),
    Apply(usize),
    /// The same through qemu-img, so both tools edit the same image.
    QemuCreate(usize),
    QemuDelete(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SIZE / 512, 1..256u64, 1..255u8).prop_map(|(sector, sectors, pattern)| {
            let offset = sector * 512;
            Op::Write { offset, len: (sectors * 512).min(SIZE - offset), pattern }
        }),
        3 => (0..NAMES.len()).prop_map(Op::Create),
        2 => (0..NAMES.len()).prop_map(Op::Delete),
        2 => (0..NAMES.len()).prop_map(Op::Apply),
        1 => (0..NAMES.len()).prop_map(Op::QemuCreate),
        1 => (0..NAMES.len()).prop_map(Op::QemuDelete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 18, max_shrink_iters: 20, ..ProptestConfig::default() })]

    #[test]
    fn snapshot_sequences_match_the_model(
        layout in prop::sample::select(vec!["cluster_size=512", "cluster_size=4096,refcount_bits=8", "compat=1.1", "compat=0.10"]),
        ops in prop::collection::vec(op(), 10..30),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "p.qcow2", &SIZE.to_string(), layout);
        let disks: Vec<PathBuf> = vec![img.clone()];
        let mut active = vec![0u8; SIZE as usize];
        let mut snapshots: Vec<(&str, Vec<u8>)> = Vec::new();
        for op in &ops {
            let position = |name: &str, list: &Vec<(&str, Vec<u8>)>| list.iter().position(|(n, _)| *n == name);
            match *op {
                Op::Write { offset, len, pattern } => {
                    write(&img, pattern, offset, len);
                    active[offset as usize..(offset + len) as usize].fill(pattern);
                }
                Op::Create(i) | Op::QemuCreate(i) => {
                    let name = NAMES[i];
                    let exists = position(name, &snapshots).is_some();
                    if matches!(op, Op::Create(_)) {
                        let result = disk::offline::create_internal(&disks, name);
                        prop_assert_eq!(result.is_ok(), !exists, "create {}: {:?}", name, result);
                    } else if exists {
                        continue; // qemu-img would add a second snapshot of the same name
                    } else {
                        tool("qemu-img", &["snapshot", "-c", name, &s(&img)]);
                    }
                    if !exists {
                        snapshots.push((name, active.clone()));
                    }
                }
                Op::Delete(i) | Op::QemuDelete(i) => {
                    let name = NAMES[i];
                    let Some(at) = position(name, &snapshots) else {
                        prop_assert!(disk::offline::delete_internal(&disks, name).is_err());
                        continue;
                    };
                    if matches!(op, Op::Delete(_)) {
                        disk::offline::delete_internal(&disks, name).unwrap();
                    } else {
                        tool("qemu-img", &["snapshot", "-d", name, &s(&img)]);
                    }
                    snapshots.remove(at);
                }
                Op::Apply(i) => {
                    let name = NAMES[i];
                    let Some(at) = position(name, &snapshots) else {
                        prop_assert!(disk::offline::apply_internal(&disks, name).is_err());
                        continue;
                    };
                    disk::offline::apply_internal(&disks, name).unwrap();
                    active = snapshots[at].1.clone();
                    prop_assert!(contents(&img, None) == active, "contents after applying {}", name);
                }
            }
            check_clean(&img);
            let names: Vec<String> = snapshots.iter().map(|(n, _)| n.to_string()).collect();
            prop_assert_eq!(&qemu_snapshot_names(&img), &names);
            prop_assert_eq!(&our_names(&img), &names);
        }
        prop_assert!(contents(&img, None) == active, "final active contents");
        for (name, data) in &snapshots {
            prop_assert!(&contents(&img, Some(name)) == data, "final contents of {}", name);
        }
    }
}
