//! Seed inputs for the fuzz targets, made by the project's own writers and by qemu-img.
//!
//! A fuzzer that starts from nothing rarely gets past a magic number and a checksum: without seeds
//! the memory targets stayed at 62-69 covered edges over 13-16 million runs. Valid inputs let it
//! mutate the fields behind them instead. Seeds are written once, as `seed-*` files beside the
//! corpus libFuzzer grows; the migration stream target has none (it needs a stream recorded from
//! QEMU).

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use memory::{save_paused, Durability, GuestMemory, ImageLayout, ImageWriter, StreamWriter};

use crate::cmd;

/// Writes the seeds of fuzz target `target` into its corpus folder `corpus`, unless they are
/// there already. Returns how many it wrote.
pub fn write(target: &str, corpus: &Path) -> Result<usize> {
    let seeds = match target {
        "memory_image" => vec![("image".to_owned(), memory_image()?)],
        "memory_stream" => vec![("stream".to_owned(), memory_stream()?)],
        "qmp_message" => vec![("session".to_owned(), QMP_SESSION.as_bytes().to_vec())],
        "qcow2_header" => qcow2_images()?,
        // Its first byte picks the operations; the same image under each of a few choices.
        "qcow2_image" => qcow2_images()?
            .into_iter()
            .flat_map(|(name, image)| {
                QCOW2_OPERATIONS.iter().map(move |&ops| {
                    let mut seed = vec![ops];
                    seed.extend_from_slice(&image);
                    (format!("{name}-ops{ops:02x}"), seed)
                })
            })
            .collect(),
        _ => Vec::new(),
    };
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut written = 0;
    for (name, bytes) in seeds {
        let path = corpus.join(format!("seed-{name}"));
        if !path.exists() {
            fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            written += 1;
        }
    }
    Ok(written)
}

/// A QMP conversation's server side: greeting, a return, an event, an error.
const QMP_SESSION: &str = concat!(
    r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#,
    "\r\n",
    r#"{"return": {}, "id": 1}"#,
    "\r\n",
    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
    "\r\n",
    r#"{"error": {"class": "GenericError", "desc": "no such snapshot"}, "id": 2}"#,
    "\r\n",
);

/// First bytes for the qcow2 image target: two operations each (0 create, 1 delete, 2 apply,
/// 3 create another), and which snapshot they name.
const QCOW2_OPERATIONS: [u8; 4] = [0x00, 0x06, 0x19, 0x2b];

/// Two regions with a gap between them; a zero page, two pages alike and some that differ.
fn guest() -> Result<GuestMemory> {
    let mem = GuestMemory::builder()
        .anonymous(0, 8 * 4096)
        .and_then(|b| b.anonymous(0x10_0000, 4 * 4096))
        .and_then(|b| b.build())?;
    for (gpa, bytes) in [
        (0x0000, &b"first page"[..]),
        (0x2000, b"alike"),
        (0x3000, b"alike"),
        (0x7fe0, b"end of the first region"),
        (0x10_1000, b"second region"),
    ] {
        mem.write(gpa, bytes)?;
    }
    Ok(mem)
}

fn memory_image() -> Result<Vec<u8>> {
    let mem = guest()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("seed.img");
    let sink = ImageWriter::create(&path, ImageLayout::of(&mem), Durability::NoSync)?;
    save_paused(&mem, Box::new(sink))?;
    Ok(fs::read(&path)?)
}

fn memory_stream() -> Result<Vec<u8>> {
    let mem = guest()?;
    let mut stream = Vec::new();
    let sink = StreamWriter::new(&mut stream, ImageLayout::of(&mem))?;
    save_paused(&mem, Box::new(sink))?;
    Ok(stream)
}

/// Small qcow2 images (512-byte clusters): empty, with data, and with data and an internal
/// snapshot. None when qemu-img is missing (the targets then start without them).
fn qcow2_images() -> Result<Vec<(String, Vec<u8>)>> {
    if cmd::probe(Command::new("qemu-img").arg("--version")).is_none() {
        eprintln!("xtask: no qemu-img: the qcow2 targets start without seeds");
        return Ok(Vec::new());
    }
    let dir = tempfile::tempdir()?;
    let mut images = Vec::new();
    for (name, write, snapshot) in [
        ("empty", false, false),
        ("data", true, false),
        ("snapshot", true, true),
    ] {
        let path = dir.path().join(format!("{name}.qcow2"));
        cmd::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"])
                .arg(&path)
                .arg("64K"),
            false,
        )?;
        if write {
            cmd::run(
                Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", "write -P 0x5a 0 1536"])
                    .arg(&path),
                true,
            )?;
        }
        if snapshot {
            cmd::run(
                Command::new("qemu-img").args(["snapshot", "-c", "s1"]).arg(&path),
                false,
            )?;
        }
        images.push((name.to_owned(), fs::read(&path)?));
    }
    Ok(images)
}
