//! The QEMU domain driver: a domain's configuration (TOML) and the QEMU 10 command line that runs
//! it under TCG with guest RAM in a shared file, QMP on a Unix socket and qcow2 disks as
//! `-blockdev` nodes; and where the RAM file sits in guest-physical memory ([`ram_layout`],
//! read from QEMU); and [`QemuDriver`], which keeps named domains under a state directory, runs
//! each in a QEMU process (in a session of its own) that outlives the process that started it, supervises it, and
//! implements [`snapshot_core::Hypervisor`] (device state through `xen-save-devices-state` and
//! `migrate-incoming`, RAM through the shared file or, for a lazy revert, mapped copy-on-write
//! from a snapshot's memory image, a disk backend that follows the domain's state). The driver
//! module's documentation describes the state layout, supervision and the mapping of QEMU's run
//! states.
//!
//! Memory through QEMU's own migration stream: [`stream_snapshot`] runs a migration into a socket
//! (paused, pre-copy stopping before the switch-over so the disks are snapshotted at the same
//! instant, or QEMU's write-protect `background-snapshot`) and [`parse_migration_stream`] turns
//! the stream, as it arrives, into the toolstack's memory image and a device-state file
//! (`docs/qemu-migration-stream.md`).
//!
//! Before a pause ([`snapshot_core::Hypervisor::prepare_pause`], and during a pre-copy), the
//! driver writes back from the host's page cache what QEMU wrote to the disk images, which
//! QEMU's stop would otherwise flush with the vCPUs stopped.
//!
//! ```no_run
//! # async fn demo() -> qemu::Result<()> {
//! use qemu::{DomainConfig, QemuDriver, StopMode};
//! use snapshot_core::Name;
//!
//! let driver = QemuDriver::new("/var/lib/domsnap");
//! let config = DomainConfig::load(std::path::Path::new("demo.toml"))?;
//! driver.define(&config).await?;
//! let name = Name::new("demo").expect("a valid name");
//! driver.start(&name, false).await?;
//! println!("{:?}", driver.status(&name).await?);
//! driver.stop(&name, StopMode::Force).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The command line alone:
//!
//! ```
//! use std::path::Path;
//! use qemu::{qemu_args, DomainConfig, RuntimePaths, StartMode};
//!
//! let config = DomainConfig::parse(
//!     "name = \"demo\"\nmemory_mib = 256\nkernel = \"/boot/vmlinuz\"",
//!     Path::new("/etc/domsnap"),
//! )
//! .unwrap();
//! let paths = RuntimePaths {
//!     ram_file: "/dev/shm/demo/ram".into(),
//!     qmp_socket: "/run/domsnap/demo/qmp.sock".into(),
//!     serial_log: "/run/domsnap/demo/serial.log".into(),
//!     console_socket: "/run/domsnap/demo/console.sock".into(),
//!     guest_agent_socket: "/run/domsnap/demo/qga.sock".into(),
//! };
//! let args = qemu_args(&config, &paths, StartMode::Boot { paused: false });
//! assert!(args.iter().any(|a| a == "-qmp"));
//! ```

mod command_line;
mod config;
mod connections;
mod driver;
mod error;
mod files;
mod follow_disks;
mod guest_agent;
mod host;
mod hugepages;
mod hypervisor;
mod launch;
mod mapped_ram;
mod migration_stream;
mod pin;
mod process;
mod ram_layout;
mod standby;
mod stream_save;
mod write_back;

pub use command_line::{
    disk_nodes, ovmf_installed, qemu_args, RuntimePaths, StartMode, GUEST_AGENT_PORT, OVMF_CODE,
    OVMF_VARS_TEMPLATE, RAM_BACKEND_ID, SANDBOX,
};
pub use config::{
    Accel, DiskBus, DiskCache, DiskConfig, DiskFormat, DomainConfig, Firmware, NicConfig, NicType,
    DEFAULT_MACHINE, DEFAULT_NIC_MODEL, MAX_VCPUS, MEMORY_MIB_RANGE, NVRAM_DISK_ID,
};
pub use driver::{DomainStatus, QemuDriver, StopMode};
pub use error::{error_class, Error, Result};
pub use host::{default_accel, parse_machine_help, probe_kvm, MachineType, QemuFacts};
pub use hugepages::HugePageError;
pub use migration_stream::{
    configuration_section, device_state_format, device_state_prefix, parse_migration_stream,
    DeviceStateFormat, ExpectedBlocks, FormatError, RamSink, StreamError, StreamStats, DEVICE_STATE_HEADER,
};
pub use process::QEMU_ENV;
pub use ram_layout::{parse_ram_layout, ram_layout};
pub use stream_save::{expected_blocks, stream_snapshot, SnapshotStats};
