//! Building the Debian guest ([`crate::debian`]) in a temporary folder inside its cache folder, then
//! moving the results into place:
//!
//! 1. `debootstrap --foreign --variant=minbase --include=PACKAGES bookworm TREE MIRROR` (download and
//!    unpack; .debs cached in `debs/`);
//! 2. our early files (initramfs-tools: `MODULES=list`; dpkg: no docs, no fsync), then the second stage
//!    in the chroot (installs everything: the kernel's postinst builds the small initramfs);
//! 3. our files (counter service, network, journal, fstab) and `configure.sh` in the chroot;
//! 4. the images ([`crate::debian_image`]), then `debian.json` last.
//!
//! Every command in the chroot runs in a private mount namespace (`unshare --mount`), so mounts made
//! there (debootstrap mounts /proc and /sys) vanish with it, even when the build fails.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use testkit::BuildStep;

use crate::cmd;
use crate::debian::{
    DebianGuestInfo, GuestFile, CONFIGURE_SCRIPT, DEBIAN_CMDLINE, DEBIAN_DISK_FILE, DEBIAN_INFO_FILE,
    DEBIAN_INITRD_FILE, DEBIAN_KERNEL_FILE, DEBIAN_ROOT_FILE, DEBS_DIR, EARLY_FILES, FILES, MODULES,
    PACKAGES, SUITE, VARIANT,
};
use crate::debian_image;

/// The environment of every command run in the chroot (nothing of the host's leaks in).
const CHROOT_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("LC_ALL", "C"),
    ("DEBIAN_FRONTEND", "noninteractive"),
];

/// Wall times of the build's steps.
#[derive(Debug, Default)]
pub struct Steps {
    started: Option<Instant>,
    steps: Vec<BuildStep>,
}

impl Steps {
    /// Runs `step`, timing it, and names it in the error if it fails.
    pub fn run<T>(&mut self, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        self.started.get_or_insert_with(Instant::now);
        println!("setup: Debian guest: {name}");
        let start = Instant::now();
        let out = step().with_context(|| format!("Debian guest build: {name}"))?;
        let seconds = start.elapsed().as_secs_f64();
        println!("setup: Debian guest: {name}: {seconds:.1} s");
        self.steps.push(BuildStep {
            name: name.to_string(),
            seconds,
        });
        Ok(out)
    }

    fn total_seconds(&self) -> f64 {
        self.started.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }
}

/// Builds the guest into `dir` (the `debian` folder) and returns its description.
pub fn build(dir: &Path, stamp: &str, mirror: &str) -> Result<DebianGuestInfo> {
    let mut steps = Steps::default();
    remove_stale_builds(dir)?;
    let debs = dir.join(DEBS_DIR);
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    // Inside `dir`: same filesystem as the results (renamed into place), removed on drop.
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a build folder in {}", dir.display()))?;
    let tree = work.path().join("tree");
    steps.run("debootstrap, first stage (download, unpack)", || {
        first_stage(&tree, &debs, mirror)
    })?;
    steps.run("debootstrap, second stage (install)", || {
        write_files(&tree, EARLY_FILES)?;
        second_stage(&tree)
    })?;
    steps.run("configure", || {
        write_files(&tree, FILES)?;
        configure(&tree)
    })?;
    let facts = steps.run("inspect the tree", || TreeFacts::read(&tree))?;
    let images = steps.run("images (root.qcow2, disk.qcow2)", || {
        debian_image::build(&tree, &facts.kernel, &facts.initrd, work.path())
    })?;
    let mut info = DebianGuestInfo {
        format: crate::debian::FORMAT,
        stamp: stamp.to_string(),
        suite: SUITE.to_string(),
        mirror: mirror.to_string(),
        packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
        installed: facts.installed,
        kernel_release: facts.kernel_release,
        kernel_modules: facts.kernel_modules,
        cmdline: DEBIAN_CMDLINE.to_string(),
        tree_bytes: facts.tree_bytes,
        kernel_bytes: len(&facts.kernel)?,
        initrd_bytes: len(&facts.initrd)?,
        root_virtual_bytes: images.root_virtual_bytes,
        root_file_bytes: len(&images.root)?,
        disk_virtual_bytes: images.disk_virtual_bytes,
        disk_file_bytes: len(&images.disk)?,
        build_seconds: 0.0,
        steps: Vec::new(),
        built_unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    steps.run("install into the cache", || {
        install(dir, &facts.kernel, &facts.initrd, &images)
    })?;
    info.build_seconds = steps.total_seconds();
    info.steps = steps.steps;
    write_info(dir, &info)?;
    Ok(info)
}

/// Removes the build folders of builds that were killed (the caller holds the lock, so none is in
/// use). Refuses to touch one with anything mounted inside (the chroot commands mount only in their
/// own namespace, so there should never be).
fn remove_stale_builds(dir: &Path) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let stale = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(".build-"));
        if !stale {
            continue;
        }
        let prefix = format!("{}/", path.display());
        if mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .any(|mount_point| mount_point.starts_with(&prefix))
        {
            bail!(
                "{} is a stale build folder with filesystems mounted inside: unmount them and remove it",
                path.display()
            );
        }
        println!("setup: removing the stale build folder {}", path.display());
        fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

fn len(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("size of {}", path.display()))?
        .len())
}

/// `debootstrap --foreign`: resolves, downloads (into `debs`) and unpacks the packages.
fn first_stage(tree: &Path, debs: &Path, mirror: &str) -> Result<()> {
    let mut debootstrap = Command::new("debootstrap");
    // The host's environment stays (a proxy setting, say), with sbin in PATH and messages in English.
    debootstrap
        .env("PATH", CHROOT_ENV[0].1)
        .env("LC_ALL", "C")
        .arg("--foreign")
        .arg(format!("--variant={VARIANT}"))
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(SUITE)
        .arg(tree)
        .arg(mirror);
    cmd::run(&mut debootstrap, true).map(drop)
}

/// debootstrap's second stage in the chroot (configures every package).
fn second_stage(tree: &Path) -> Result<()> {
    let done = in_chroot(tree, &["/debootstrap/debootstrap", "--second-stage"]);
    done.map(drop).map_err(|err| {
        let log = fs::read_to_string(tree.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(0);
        err.context(format!("debootstrap.log ends with:\n{}", &log[start..]))
    })
}

/// Runs `args` in the chroot at `tree` in a private mount namespace, with [`CHROOT_ENV`].
fn in_chroot(tree: &Path, args: &[&str]) -> Result<String> {
    let mut command = Command::new("unshare");
    command
        .env_clear()
        .envs(CHROOT_ENV.iter().copied())
        .args(["--mount", "--propagation", "private", "chroot"])
        .arg(tree)
        .args(args);
    cmd::run(&mut command, true)
}

/// Writes `files` into the tree (parents created, modes set).
fn write_files(tree: &Path, files: &[GuestFile]) -> Result<()> {
    for file in files {
        let path = tree.join(file.path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&path, file.text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(file.mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    Ok(())
}

/// Runs [`CONFIGURE_SCRIPT`] in the chroot with [`MODULES`].
fn configure(tree: &Path) -> Result<()> {
    let script = "tmp/domsnap-configure.sh";
    fs::write(tree.join(script), CONFIGURE_SCRIPT).with_context(|| format!("writing {script}"))?;
    let mut args = vec!["/bin/sh", "/tmp/domsnap-configure.sh"];
    args.extend(MODULES);
    let out = in_chroot(tree, &args)?;
    print!("{out}");
    // configure.sh empties /tmp, itself included.
    match fs::remove_file(tree.join(script)) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {script}"))
        }
        _ => Ok(()),
    }
}

/// What the build reads back from the finished tree.
#[derive(Debug)]
struct TreeFacts {
    kernel: PathBuf,
    initrd: PathBuf,
    kernel_release: String,
    kernel_modules: u64,
    installed: Vec<String>,
    tree_bytes: u64,
}

impl TreeFacts {
    fn read(tree: &Path) -> Result<TreeFacts> {
        let modules = tree.join("usr/lib/modules");
        let releases: Vec<String> = fs::read_dir(&modules)
            .with_context(|| format!("reading {}", modules.display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        let [kernel_release] = releases.as_slice() else {
            bail!("expected one kernel in {}, found {releases:?}", modules.display());
        };
        let boot = tree.join("boot");
        let (kernel, initrd) = (
            boot.join(format!("vmlinuz-{kernel_release}")),
            boot.join(format!("initrd.img-{kernel_release}")),
        );
        for file in [&kernel, &initrd] {
            if !file.is_file() {
                bail!("{} is missing", file.display());
            }
        }
        let installed = in_chroot(tree, &["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"])?;
        let (tree_bytes, _) = tree_size(tree)?;
        let (_, kernel_modules) = tree_size(&modules.join(kernel_release).join("kernel"))?;
        Ok(TreeFacts {
            kernel,
            initrd,
            kernel_release: kernel_release.clone(),
            kernel_modules,
            installed: installed.lines().map(str::to_string).collect(),
            tree_bytes,
        })
    }
}

/// Bytes and number of regular files under `dir` (symbolic links not followed).
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                bytes += meta.len();
                files += 1;
            }
        }
    }
    Ok((bytes, files))
}

/// Moves the results into `dir`: `debian.json` goes first (so a half-replaced folder is never
/// taken as built) and comes back last, through [`write_info`].
fn install(dir: &Path, kernel: &Path, initrd: &Path, images: &debian_image::Images) -> Result<()> {
    match fs::remove_file(dir.join(DEBIAN_INFO_FILE)) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("removing the old {DEBIAN_INFO_FILE}"))
        }
        _ => {}
    }
    for (from, name) in [
        (kernel, DEBIAN_KERNEL_FILE),
        (initrd, DEBIAN_INITRD_FILE),
        (images.root.as_path(), DEBIAN_ROOT_FILE),
        (images.disk.as_path(), DEBIAN_DISK_FILE),
    ] {
        let to = dir.join(name);
        fs::rename(from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn write_info(dir: &Path, info: &DebianGuestInfo) -> Result<()> {
    let partial = dir.join(format!(".{DEBIAN_INFO_FILE}.partial"));
    fs::write(&partial, serde_json::to_string_pretty(info)? + "\n")
        .with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, dir.join(DEBIAN_INFO_FILE))
        .with_context(|| format!("renaming {} into place", partial.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_timed_and_named_in_errors() {
        let mut steps = Steps::default();
        assert_eq!(steps.run("one", || Ok(7)).unwrap(), 7);
        let err = steps.run("two", || -> Result<()> { bail!("boom") }).unwrap_err();
        assert_eq!(format!("{err:#}"), "Debian guest build: two: boom");
        assert_eq!(steps.steps.len(), 1);
        assert_eq!(steps.steps[0].name, "one");
    }

    #[test]
    fn files_land_with_their_modes_and_sizes_add_up() {
        let tmp = tempfile::tempdir().unwrap();
        let files = [GuestFile {
            path: "usr/local/sbin/x",
            mode: 0o755,
            text: "#!/bin/sh\n",
        }];
        write_files(tmp.path(), &files).unwrap();
        let meta = fs::metadata(tmp.path().join("usr/local/sbin/x")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(tree_size(tmp.path()).unwrap(), (10, 1));
    }
}
