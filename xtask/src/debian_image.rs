//! The Debian guest's two disk images, made from the finished tree without mounting anything:
//!
//! - `root.qcow2`: `mke2fs -t ext4 -d TREE` into a sparse raw file (the filesystem is the whole disk),
//!   then `qemu-img convert -O qcow2`;
//! - `disk.qcow2`: a GPT disk: partition 1 is the EFI system partition (FAT32, made with `mkfs.fat` and
//!   filled with mtools, also marked legacy BIOS bootable) holding the kernel, the initramfs, SYSLINUX
//!   (`syslinux --install` works on the image file; SYSLINUX's `gptmbr.bin` in the MBR boots it under
//!   SeaBIOS) and systemd-boot as `EFI/BOOT/BOOTX64.EFI` (OVMF's fallback path); partition 2 is the
//!   same ext4 root, written in place with `mke2fs -E offset=`.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::debian::{DEBIAN_ROOT_LABEL, ESP_FILES, ESP_MIB, ROOT_MIB};

const MIB: u64 = 1 << 20;
/// The EFI system partition starts at 1 MiB.
const ESP_OFFSET: u64 = MIB;
/// SYSLINUX's MBR for GPT disks: boots the partition marked legacy BIOS bootable.
const GPT_MBR: &str = "/usr/lib/syslinux/mbr/gptmbr.bin";
/// systemd-boot inside the tree (package systemd-boot-efi).
const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// The images made in the build folder.
#[derive(Debug)]
pub struct Images {
    /// `root.qcow2`.
    pub root: PathBuf,
    /// Its virtual size.
    pub root_virtual_bytes: u64,
    /// `disk.qcow2`.
    pub disk: PathBuf,
    /// Its virtual size.
    pub disk_virtual_bytes: u64,
}

/// Makes both images from `tree` in `work`.
pub fn build(tree: &Path, kernel: &Path, initrd: &Path, work: &Path) -> Result<Images> {
    let root_bytes = ROOT_MIB * MIB;
    let root_raw = work.join("root.raw");
    sparse_file(&root_raw, root_bytes)?;
    mke2fs(tree, &root_raw, None)?;
    let root = work.join("root.qcow2");
    to_qcow2(&root_raw, &root)?;

    let esp = work.join("esp.raw");
    make_esp(tree, kernel, initrd, &esp)?;
    let disk_raw = work.join("disk.raw");
    let root_offset = ESP_OFFSET + ESP_MIB * MIB;
    // One MiB at the end for the backup GPT.
    let disk_bytes = root_offset + root_bytes + MIB;
    sparse_file(&disk_raw, disk_bytes)?;
    partition(&disk_raw, root_offset)?;
    write_at(&disk_raw, ESP_OFFSET, &fs::read(&esp).context("reading esp.raw")?)?;
    let mbr = fs::read(GPT_MBR).with_context(|| format!("reading {GPT_MBR}"))?;
    write_at(
        &disk_raw,
        0,
        mbr.get(..440).context("gptmbr.bin is shorter than 440 bytes")?,
    )?;
    mke2fs(tree, &disk_raw, Some(root_offset))?;
    let disk = work.join("disk.qcow2");
    to_qcow2(&disk_raw, &disk)?;
    for raw in [&root_raw, &esp, &disk_raw] {
        fs::remove_file(raw).with_context(|| format!("removing {}", raw.display()))?;
    }
    Ok(Images {
        root,
        root_virtual_bytes: root_bytes,
        disk,
        disk_virtual_bytes: disk_bytes,
    })
}

fn sparse_file(path: &Path, bytes: u64) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(bytes)
        .with_context(|| format!("sizing {} to {bytes} bytes", path.display()))
}

/// `mke2fs -t ext4 -d TREE` over [`ROOT_MIB`] MiB of `image`, at byte `offset` if given.
fn mke2fs(tree: &Path, image: &Path, offset: Option<u64>) -> Result<()> {
    let mut mke2fs = Command::new("mke2fs");
    mke2fs
        .args(["-q", "-F", "-t", "ext4", "-L", DEBIAN_ROOT_LABEL, "-d"])
        .arg(tree);
    if let Some(offset) = offset {
        mke2fs.arg("-E").arg(format!("offset={offset}"));
    }
    mke2fs.arg(image).arg(format!("{ROOT_MIB}M"));
    cmd::run(&mut mke2fs, true).map(drop)
}

fn to_qcow2(raw: &Path, qcow2: &Path) -> Result<()> {
    cmd::run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(qcow2),
        true,
    )
    .map(drop)
}

/// The EFI system partition as its own image: FAT32, SYSLINUX, systemd-boot, kernel, initramfs and
/// [`ESP_FILES`].
fn make_esp(tree: &Path, kernel: &Path, initrd: &Path, esp: &Path) -> Result<()> {
    sparse_file(esp, ESP_MIB * MIB)?;
    cmd::run(
        Command::new("mkfs.fat")
            .args(["-F", "32", "-n", "DOMSNAP-ESP"])
            .arg(esp),
        true,
    )?;
    cmd::run(Command::new("syslinux").arg("--install").arg(esp), true)?;
    let image = esp.display().to_string();
    cmd::run(
        Command::new("mmd").args([
            "-i",
            &image,
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
        ]),
        true,
    )?;
    let copy = |from: &Path, to: &str| {
        cmd::run(
            Command::new("mcopy")
                .args(["-i", &image])
                .arg(from)
                .arg(format!("::/{to}")),
            true,
        )
        .map(drop)
    };
    copy(kernel, "vmlinuz")?;
    copy(initrd, "initrd.img")?;
    copy(&tree.join(SYSTEMD_BOOT), "EFI/BOOT/BOOTX64.EFI")?;
    let staging = tempfile::tempdir().context("creating a temporary folder")?;
    for file in ESP_FILES {
        let local = staging.path().join(file.path.replace('/', "_"));
        fs::write(&local, file.text).with_context(|| format!("writing {}", local.display()))?;
        copy(&local, file.path)?;
    }
    Ok(())
}

/// The GPT: the EFI system partition (legacy BIOS bootable) at [`ESP_OFFSET`], the root at
/// `root_offset` to the end.
fn partition(disk: &Path, root_offset: u64) -> Result<()> {
    let script = sfdisk_script(root_offset);
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("-q").arg(disk);
    let line = cmd::display(&sfdisk);
    let mut child = sfdisk
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    child
        .stdin
        .take()
        .context("sfdisk's stdin")?
        .write_all(script.as_bytes())
        .with_context(|| format!("writing the partition table to `{line}`"))?;
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}) on the script:\n{script}stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// sfdisk's input for [`partition`] (sectors of 512 bytes).
fn sfdisk_script(root_offset: u64) -> String {
    let sector = |bytes: u64| bytes / 512;
    format!(
        "label: gpt\n\
         start={}, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI\", attrs=\"LegacyBIOSBootable\"\n\
         start={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"{DEBIAN_ROOT_LABEL}\"\n",
        sector(ESP_OFFSET),
        sector(ESP_MIB * MIB),
        sector(root_offset),
        sector(ROOT_MIB * MIB),
    )
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(bytes))
        .with_context(|| {
            format!(
                "writing {} bytes at {offset} into {}",
                bytes.len(),
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_aligned_and_fit() {
        let root_offset = ESP_OFFSET + ESP_MIB * MIB;
        let script = sfdisk_script(root_offset);
        assert!(
            script.contains("start=2048, size=131072, type=C12A7328"),
            "{script}"
        );
        assert!(script.contains("attrs=\"LegacyBIOSBootable\""), "{script}");
        assert!(
            script.contains("start=133120, size=2097152, type=0FC63DAF"),
            "{script}"
        );
        assert_eq!(root_offset % MIB, 0);
    }

    #[test]
    fn bytes_land_at_their_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d.raw");
        sparse_file(&path, 4096).unwrap();
        write_at(&path, 1000, b"abc").unwrap();
        let data = fs::read(&path).unwrap();
        assert_eq!((data.len(), &data[1000..1003], data[999]), (4096, &b"abc"[..], 0));
    }
}
