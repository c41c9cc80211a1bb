//! domsnap developer tasks, run as `cargo xtask <task>`: `setup` (QEMU 10, the C API test's cc and
//! valgrind, and the test guests), `test`,
//! `demo`. The modules are a library so other tasks (the demo) can reuse them.

pub mod cmd;
pub mod cpio;
pub mod debian;
pub mod debian_build;
pub mod debian_image;
pub mod demo;
mod demo_debian;
pub mod fuzz;
pub mod fuzz_seeds;
pub mod guest;
pub mod guest_image;
pub mod setup;

use std::path::{Path, PathBuf};

use anyhow::Result;

/// The workspace root (the folder above `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// What `setup` found or made.
#[derive(Debug, Clone)]
pub struct SetupReport {
    /// The QEMU tools' versions.
    pub qemu: setup::QemuVersions,
    /// The guest folder.
    pub guest_dir: PathBuf,
    /// The guest's description.
    pub guest: guest::GuestInfo,
    /// The Debian guest's description (in `<guest_dir>/debian`).
    pub debian: debian::DebianGuestInfo,
}

/// `cargo xtask setup`: QEMU 10, then the test guest (rebuilt when its inputs changed or `force`),
/// then the Debian guest (rebuilt when its inputs changed).
pub fn run_setup(force: bool) -> Result<SetupReport> {
    run_setup_with(force, false)
}

/// [`run_setup`], also rebuilding the Debian guest when `force_debian`.
pub fn run_setup_with(force: bool, force_debian: bool) -> Result<SetupReport> {
    let qemu = setup::ensure_qemu()?;
    setup::ensure_c_test_tools()?;
    setup::ensure_ovmf()?;
    let guest_dir = guest::guest_dir();
    let guest = guest_image::ensure_guest(&workspace_root(), &guest_dir, force)?;
    let debian = debian::ensure_debian_guest(&guest_dir, force_debian)?;
    println!("setup: summary");
    println!("  QEMU:  {}", qemu.summary());
    println!("  guest: {}", guest_dir.display());
    println!(
        "         kernel {} {} ({}), busybox-static {}",
        guest.kernel_package,
        guest.kernel_package_version,
        guest.kernel_release,
        guest.busybox_package_version
    );
    println!(
        "         initramfs {} bytes, modules [{}]{}",
        guest.initramfs_bytes,
        guest.modules.join(" "),
        if guest.modules_builtin.is_empty() {
            String::new()
        } else {
            format!(", built in [{}]", guest.modules_builtin.join(" "))
        }
    );
    println!(
        "  debian: {} (Debian {}, kernel {}, built in {:.0} s)",
        guest_dir.join(debian::DEBIAN_SUBDIR).display(),
        debian.suite,
        debian.kernel_release,
        debian.build_seconds
    );
    println!(
        "         root.qcow2 {} MiB (virtual {} MiB), disk.qcow2 {} MiB, initrd {} KiB, {} packages",
        debian.root_file_bytes >> 20,
        debian.root_virtual_bytes >> 20,
        debian.disk_file_bytes >> 20,
        debian.initrd_bytes >> 10,
        debian.installed.len()
    );
    Ok(SetupReport {
        qemu,
        guest_dir,
        guest,
        debian,
    })
}
