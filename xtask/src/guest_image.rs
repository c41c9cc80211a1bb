//! Building the test guest into the guest folder ([`crate::guest::guest_dir`]):
//!
//! ```text
//! <guest dir>/
//!   vmlinuz          Debian's kernel (linux-image-amd64's current dependency)
//!   initramfs.cpio   newc cpio: /init (init.sh), /bin/busybox, /bin/guest-workload, /lib/modules/*.ko,
//!                    /dev/console, /proc /sys /tmp /run
//!   guest.json       GuestInfo: package versions, modules, sizes, and the stamp of the inputs
//!   debs/            the downloaded .deb files (a rebuild needs no download)
//! ```
//!
//! The build is skipped when `guest.json`'s stamp equals the hash of the inputs: the init script, the
//! workload binary (rebuilt by cargo first; a no-op when nothing changed), the kernel package name, the
//! cached .deb file names and [`FORMAT`].

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use guest_workload::Fnv1a64;

use crate::cmd;
use crate::cpio;
use crate::guest::{GuestInfo, DEBS_DIR, INFO_FILE, INITRAMFS_FILE, KERNEL_FILE};

/// Layout version of the guest folder and initramfs; bump it when the layout changes.
pub const FORMAT: u32 = 1;
/// The init script (PID 1).
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Modules the guest loads, in load order (init.sh loads the same list): virtio for /dev/vda, and
/// the ACPI power button with its input events (the workload powers off on it, for a clean stop).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "button",
    "evdev",
];
/// The target the workload is built for (statically linked).
pub const WORKLOAD_TARGET: &str = "x86_64-unknown-linux-gnu";
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Builds (or confirms up to date) the guest in `dir`. `force` rebuilds even when the stamp matches.
pub fn ensure_guest(workspace: &Path, dir: &Path, force: bool) -> Result<GuestInfo> {
    let started = Instant::now();
    fs::create_dir_all(dir.join(DEBS_DIR)).with_context(|| format!("creating {}", dir.display()))?;
    let workload_path = build_workload(workspace)?;
    let workload =
        fs::read(&workload_path).with_context(|| format!("reading {}", workload_path.display()))?;

    let kernel_package = resolve_kernel_package()?;
    let debs = ensure_debs(dir, &kernel_package)?;
    let stamp = stamp(&workload, &kernel_package, &debs);

    let old = fs::read_to_string(dir.join(INFO_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<GuestInfo>(&t).ok());
    let files_present = dir.join(KERNEL_FILE).is_file()
        && fs::metadata(dir.join(INITRAMFS_FILE)).map(|m| m.len()).ok()
            == old.as_ref().map(|o| o.initramfs_bytes);
    if let Some(old) = old.filter(|o| o.stamp == stamp && files_present && !force) {
        println!(
            "setup: test guest up to date in {} (stamp {stamp})",
            dir.display()
        );
        return Ok(old);
    }

    println!("setup: building the test guest in {}", dir.display());
    let info = build(dir, &kernel_package, &debs, &workload, stamp)?;
    println!(
        "setup: test guest built in {:.1} s: kernel {} ({}), initramfs {} bytes",
        started.elapsed().as_secs_f64(),
        info.kernel_package,
        info.kernel_package_version,
        info.initramfs_bytes
    );
    Ok(info)
}

/// `cargo build --release -p guest-workload --target x86_64-unknown-linux-gnu` with
/// `RUSTFLAGS=-C target-feature=+crt-static`; returns the binary's path.
pub fn build_workload(workspace: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "build",
            "--release",
            "-p",
            "guest-workload",
            "--target",
            WORKLOAD_TARGET,
        ])
        .args(["--message-format=json-render-diagnostics"]);
    let out = cmd::run(&mut build, true)?;
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_bin = msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "guest-workload"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if let (true, Some(exe)) = (is_bin, msg["executable"].as_str()) {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("`{}` reported no guest-workload executable", cmd::display(&build))
}

/// The kernel package `linux-image-amd64` depends on (e.g. `linux-image-6.1.0-56-amd64`); runs
/// `apt-get update` first if the package lists do not know it.
fn resolve_kernel_package() -> Result<String> {
    let query = || {
        cmd::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
            .ok()
            .and_then(|out| parse_kernel_dependency(&out))
    };
    if let Some(pkg) = query() {
        return Ok(pkg);
    }
    println!("setup: apt does not know linux-image-amd64: updating the package lists");
    cmd::run(cmd::as_root("apt-get", cmd::APT_ENV).arg("update"), false)?;
    match query() {
        Some(pkg) => Ok(pkg),
        None => {
            let out = cmd::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
            bail!("`apt-cache depends linux-image-amd64` names no linux-image package:\n{out}")
        }
    }
}

/// The first `Depends: linux-image-...` of `apt-cache depends linux-image-amd64`.
pub fn parse_kernel_dependency(out: &str) -> Option<String> {
    out.lines().find_map(|line| {
        let dep = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?
            .trim();
        (dep.starts_with("linux-image-") && !dep.starts_with('<')).then(|| dep.to_string())
    })
}

/// The cached .deb files of the kernel and busybox.
#[derive(Debug)]
struct Debs {
    kernel: PathBuf,
    busybox: PathBuf,
}

/// A cached `<package>_*.deb` in `debs` (the newest if several).
fn cached_deb(debs: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    let mut found: Vec<(SystemTime, PathBuf)> = fs::read_dir(debs)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// Downloads what is not cached yet (`apt-get download`), retrying once after `apt-get update`.
fn ensure_debs(dir: &Path, kernel_package: &str) -> Result<Debs> {
    let debs_dir = dir.join(DEBS_DIR);
    let missing: Vec<&str> = [kernel_package, BUSYBOX_PACKAGE]
        .into_iter()
        .filter(|p| cached_deb(&debs_dir, p).is_none())
        .collect();
    if !missing.is_empty() {
        println!(
            "setup: downloading {} into {}",
            missing.join(" "),
            debs_dir.display()
        );
        if let Err(first) = download(&debs_dir, &missing) {
            println!("setup: download failed ({first:#}); updating the package lists and retrying");
            cmd::run(cmd::as_root("apt-get", cmd::APT_ENV).arg("update"), false)?;
            download(&debs_dir, &missing)?;
        }
    }
    let get =
        |p: &str| cached_deb(&debs_dir, p).with_context(|| format!("{p}: no .deb in {}", debs_dir.display()));
    let debs = Debs {
        kernel: get(kernel_package)?,
        busybox: get(BUSYBOX_PACKAGE)?,
    };
    // Drop the .debs of kernels that are no longer current (about 70 MB each).
    if let Ok(entries) = fs::read_dir(&debs_dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("linux-image-") && entry.path() != debs.kernel {
                println!("setup: removing the outdated {name}");
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(debs)
}

fn download(debs_dir: &Path, packages: &[&str]) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("domsnap-debs-")
        .tempdir()
        .context("creating a temporary folder")?;
    let mut apt = Command::new("apt-get");
    apt.current_dir(tmp.path());
    if cmd::effective_uid() == Some(0) {
        // As root, apt would switch to the `_apt` user, which cannot write into our private folder, and warn.
        apt.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd::run(apt.arg("download").args(packages), false)?;
    for entry in fs::read_dir(tmp.path())? {
        let entry = entry?;
        let target = debs_dir.join(entry.file_name());
        if fs::rename(entry.path(), &target).is_err() {
            let partial = debs_dir.join(format!(".{}.partial", entry.file_name().to_string_lossy()));
            fs::copy(entry.path(), &partial)
                .with_context(|| format!("copying into {}", partial.display()))?;
            fs::rename(&partial, &target)?;
        }
    }
    Ok(())
}

fn stamp(workload: &[u8], kernel_package: &str, debs: &Debs) -> String {
    let mut h = Fnv1a64::new();
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    for part in [
        format!("format={FORMAT}"),
        INIT_SCRIPT.to_string(),
        kernel_package.to_string(),
        file_name(&debs.kernel),
        file_name(&debs.busybox),
        MODULES.join(","),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&(workload.len() as u64).to_le_bytes());
    h.update(workload);
    format!("{:016x}", h.finish())
}

fn deb_version(deb: &Path) -> Result<String> {
    Ok(
        cmd::output(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"))?
            .trim()
            .to_string(),
    )
}

/// Where a module was found.
#[derive(Debug, PartialEq, Eq)]
enum ModuleSource {
    File(PathBuf),
    BuiltIn,
    Missing,
}

/// Canonical module name: `-` and `_` are the same to the kernel.
fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn find_module(modules_dir: &Path, name: &str, builtin: &str) -> ModuleSource {
    fn walk(dir: &Path, name: &str) -> Option<PathBuf> {
        let mut entries: Vec<_> = fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if entry.file_type().ok()?.is_dir() {
                if let Some(found) = walk(&path, name) {
                    return Some(found);
                }
            } else if module_name(&entry.file_name().to_string_lossy()).as_deref() == Some(name) {
                return Some(path);
            }
        }
        None
    }
    if let Some(path) = walk(&modules_dir.join("kernel"), name) {
        return ModuleSource::File(path);
    }
    let is_builtin = builtin
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .any(|f| module_name(f).as_deref() == Some(name));
    if is_builtin {
        ModuleSource::BuiltIn
    } else {
        ModuleSource::Missing
    }
}

/// A module's bytes, decompressed if Debian shipped it compressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running `{tool} -dc {}`", path.display()))?;
    if !out.status.success() {
        bail!(
            "`{tool} -dc {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

fn single_entry(dir: &Path, what: &str, pred: impl Fn(&str) -> bool) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("{what}: reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| pred(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!(
            "{what}: expected one match in {}, found {n}: {found:?}",
            dir.display()
        ),
    }
}

/// Writes the guest's initramfs (busybox, the workload, the init script and `modules`) next to its
/// final name in `dir` and renames it into place. Returns its size.
fn write_initramfs(dir: &Path, busybox: &[u8], workload: &[u8], modules: &[(&str, Vec<u8>)]) -> Result<u64> {
    let cpio_tmp = dir.join(format!(".{INITRAMFS_FILE}.partial"));
    let file = fs::File::create(&cpio_tmp).with_context(|| format!("creating {}", cpio_tmp.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    for d in ["bin", "dev", "proc", "sys", "run", "lib", "lib/modules"] {
        w.dir(d, 0o755)?;
    }
    w.dir("tmp", 0o1777)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    w.file("bin/busybox", 0o755, busybox)?;
    w.file("bin/guest-workload", 0o755, workload)?;
    for (name, bytes) in modules {
        w.file(&format!("lib/modules/{name}.ko"), 0o644, bytes)?;
    }
    let (out, initramfs_bytes) = w.finish()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(&cpio_tmp, dir.join(INITRAMFS_FILE))?;
    Ok(initramfs_bytes)
}

fn build(dir: &Path, kernel_package: &str, debs: &Debs, workload: &[u8], stamp: String) -> Result<GuestInfo> {
    let tmp = tempfile::Builder::new()
        .prefix("domsnap-guest-")
        .tempdir()
        .context("creating a temporary folder")?;
    let kroot = tmp.path().join("kernel");
    let broot = tmp.path().join("busybox");
    for (deb, root) in [(&debs.kernel, &kroot), (&debs.busybox, &broot)] {
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root), false)?;
    }
    let vmlinuz = single_entry(&kroot.join("boot"), "kernel image", |n| n.starts_with("vmlinuz-"))?;
    let lib_modules = [kroot.join("lib/modules"), kroot.join("usr/lib/modules")]
        .into_iter()
        .find(|p| p.is_dir())
        .with_context(|| format!("{}: no lib/modules", debs.kernel.display()))?;
    let modules_dir = single_entry(&lib_modules, "kernel modules folder", |_| true)?;
    let kernel_release = modules_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let busybox = fs::read(broot.join("bin/busybox")).context("busybox-static has no bin/busybox")?;

    let mut modules = Vec::new();
    let (mut included, mut builtins, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for &name in MODULES {
        match find_module(&modules_dir, name, &builtin) {
            ModuleSource::File(path) => {
                println!(
                    "setup:   module {name}: {}",
                    path.strip_prefix(&kroot).unwrap_or(&path).display()
                );
                modules.push((name, module_bytes(&path)?));
                included.push(name.to_string());
            }
            ModuleSource::BuiltIn => {
                println!("setup:   module {name}: built into the kernel");
                builtins.push(name.to_string());
            }
            ModuleSource::Missing => {
                println!("setup:   module {name}: not found, skipped");
                missing.push(name.to_string());
            }
        }
    }
    if !included.iter().chain(&builtins).any(|m| m == "virtio_blk") {
        bail!("the kernel {kernel_package} has no virtio_blk: the guest could not see its disk");
    }

    let initramfs_bytes = write_initramfs(dir, &busybox, workload, &modules)?;

    let kernel_tmp = dir.join(format!(".{KERNEL_FILE}.partial"));
    fs::copy(&vmlinuz, &kernel_tmp).with_context(|| format!("copying {}", vmlinuz.display()))?;
    fs::rename(&kernel_tmp, dir.join(KERNEL_FILE))?;

    let info = GuestInfo {
        format: FORMAT,
        stamp,
        kernel_package: kernel_package.to_string(),
        kernel_package_version: deb_version(&debs.kernel)?,
        kernel_release,
        busybox_package_version: deb_version(&debs.busybox)?,
        modules: included,
        modules_builtin: builtins,
        modules_missing: missing,
        initramfs_bytes,
        workload_bytes: workload.len() as u64,
        built_unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let info_tmp = dir.join(format!(".{INFO_FILE}.partial"));
    fs::write(&info_tmp, serde_json::to_string_pretty(&info)? + "\n")?;
    fs::rename(&info_tmp, dir.join(INFO_FILE))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dependency() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_dependency(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        let alt = "linux-image-amd64\n |Depends: linux-image-6.12.0-0-amd64\n  Depends: other\n";
        assert_eq!(
            parse_kernel_dependency(alt).as_deref(),
            Some("linux-image-6.12.0-0-amd64")
        );
        assert_eq!(parse_kernel_dependency(""), None);
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("virtio_pci.ko").as_deref(), Some("virtio_pci"));
        assert_eq!(module_name("virtio-blk.ko.xz").as_deref(), Some("virtio_blk"));
        assert_eq!(module_name("virtio.ko.zst").as_deref(), Some("virtio"));
        assert_eq!(module_name("virtio_pci.c"), None);
    }

    #[test]
    fn find_modules_in_a_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let drivers = tmp.path().join("kernel/drivers/virtio");
        fs::create_dir_all(&drivers).unwrap();
        fs::write(drivers.join("virtio_ring.ko"), b"x").unwrap();
        let builtin = "kernel/drivers/virtio/virtio.ko\n";
        assert_eq!(
            find_module(tmp.path(), "virtio_ring", builtin),
            ModuleSource::File(drivers.join("virtio_ring.ko"))
        );
        assert_eq!(find_module(tmp.path(), "virtio", builtin), ModuleSource::BuiltIn);
        assert_eq!(
            find_module(tmp.path(), "virtio_blk", builtin),
            ModuleSource::Missing
        );
    }

    #[test]
    fn init_script_loads_the_module_list() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SCRIPT.contains(&format!("for m in {}; do", MODULES.join(" "))));
        for key in [
            "domsnap.mode=",
            "domsnap.rate_mib=",
            "domsnap.wss_mib=",
            "domsnap.seed=",
            "domsnap.fp_mib=",
        ] {
            assert!(INIT_SCRIPT.contains(key), "{key}");
        }
    }

    #[test]
    fn init_script_is_valid_shell() {
        // `sh -n` only parses; skip where there is no POSIX shell.
        let Ok(out) = Command::new("sh")
            .arg("-n")
            .arg("src/init.sh")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
        else {
            return;
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn stamp_depends_on_every_input() {
        let debs = Debs {
            kernel: "/c/linux-image-1_1.deb".into(),
            busybox: "/c/busybox-static_1.deb".into(),
        };
        let base = stamp(b"bin", "linux-image-1", &debs);
        assert_eq!(base, stamp(b"bin", "linux-image-1", &debs));
        assert_ne!(base, stamp(b"bin2", "linux-image-1", &debs));
        assert_ne!(base, stamp(b"bin", "linux-image-2", &debs));
        let other = Debs {
            kernel: "/c/linux-image-1_2.deb".into(),
            busybox: debs.busybox.clone(),
        };
        assert_ne!(base, stamp(b"bin", "linux-image-1", &other));
    }
}
