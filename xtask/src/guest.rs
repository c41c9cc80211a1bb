//! The built test guest: its folder and the description of what was built. `cargo xtask setup`
//! builds it (see [`crate::guest_image`]); tests boot it through `testkit`, which also documents the
//! guest's interface (kernel command line, serial lines, disk marker).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use testkit::{guest_dir, GUEST_DIR_ENV, INITRAMFS_FILE, KERNEL_FILE};

/// The description of the build inside the guest folder.
pub const INFO_FILE: &str = "guest.json";
/// Cached .deb packages inside the guest folder.
pub const DEBS_DIR: &str = "debs";

/// `guest.json`: what was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Layout version of the guest folder (bumped when the initramfs layout changes).
    pub format: u32,
    /// Hash of the inputs (init script, workload binary, kernel package, .deb file names, format); the
    /// guest is rebuilt when it changes.
    pub stamp: String,
    /// e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// Debian version of that package, e.g. `6.1.140-1`.
    pub kernel_package_version: String,
    /// `uname -r` of the guest kernel, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Debian version of busybox-static.
    pub busybox_package_version: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Modules that are built into the kernel (nothing to load).
    pub modules_builtin: Vec<String>,
    /// Modules found neither as a file nor built in.
    pub modules_missing: Vec<String>,
    /// Size of the initramfs in bytes.
    pub initramfs_bytes: u64,
    /// Size of the static workload binary in bytes.
    pub workload_bytes: u64,
    /// When it was built (seconds since the Unix epoch).
    pub built_unix_time: u64,
}

/// A built guest: kernel, initramfs and their description.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The guest folder.
    pub dir: PathBuf,
    /// `<dir>/vmlinuz`.
    pub kernel: PathBuf,
    /// `<dir>/initramfs.cpio`.
    pub initrd: PathBuf,
    /// `<dir>/guest.json`.
    pub info: GuestInfo,
}

impl Guest {
    /// The guest in [`guest_dir`]. Fails (telling to run `cargo xtask setup`) if it is not built.
    pub fn locate() -> Result<Guest> {
        Guest::load(&guest_dir())
    }

    /// The guest in `dir`.
    pub fn load(dir: &Path) -> Result<Guest> {
        let hint = "run `cargo xtask setup` to build the test guest";
        let info_path = dir.join(INFO_FILE);
        let text = fs::read_to_string(&info_path)
            .with_context(|| format!("no test guest in {} ({hint})", dir.display()))?;
        let info: GuestInfo = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} ({hint})", info_path.display()))?;
        let guest = Guest {
            dir: dir.to_path_buf(),
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRAMFS_FILE),
            info,
        };
        for file in [&guest.kernel, &guest.initrd] {
            if !file.is_file() {
                bail!("{} is missing ({hint})", file.display());
            }
        }
        Ok(guest)
    }
}
