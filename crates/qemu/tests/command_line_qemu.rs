//! The driver's command line runs on a real QEMU 10 (testkit starts every test QEMU with
//! [`qemu::qemu_args`]): the test guest boots from it and finds its disk, and the restore form
//! waits for incoming state.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking, and unwrap says where"
)]

use std::time::Duration;

use qmp::{commands::*, Client, ClientOptions, RunState};
use testkit::{Qemu, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_boots_from_the_driver_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("vda.qcow2");
    testkit::create_qcow2(&disk, "16M");
    let qemu = Qemu::builder("cmdline-boot")
        .memory_mib(128)
        .guest(Workload::Idle)
        .disk(&disk)
        .spawn();
    let qmp = Client::connect_unix(qemu.qmp_socket(), ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(qmp.execute(&QueryStatus).await.unwrap().status, RunState::Running);
    let memdevs = qmp.execute(&QueryMemdev).await.unwrap();
    assert!(memdevs[0].share && memdevs[0].size == 128 << 20, "{memdevs:?}");
    let nodes = qmp
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    let (file_node, format_node) = qemu::disk_nodes("vda");
    for name in [file_node, format_node] {
        assert!(
            nodes
                .iter()
                .any(|n| n.node_name.as_deref() == Some(name.as_str())),
            "{name}: {nodes:?}"
        );
    }
    // The guest found its disk through the driver's blockdev + virtio-blk line.
    tokio::task::block_in_place(|| {
        qemu.wait_for_serial("DOMSNAP DISK-MARKER-BOOT none", Duration::from_secs(90));
        qemu.wait_for_serial("DOMSNAP TICK 1", Duration::from_secs(10));
    });
}

#[tokio::test]
async fn the_restore_command_line_waits_for_incoming_state() {
    let qemu = Qemu::builder("cmdline-incoming")
        .memory_mib(64)
        .incoming_defer()
        .spawn();
    let qmp = Client::connect_unix(qemu.qmp_socket(), ClientOptions::default())
        .await
        .unwrap();
    let status = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!((status.running, status.status), (false, RunState::InMigrate));
}

#[tokio::test]
async fn the_ram_layout_comes_from_qemu_and_maps_the_whole_ram_file() {
    for (mib, expected) in [
        (128_u64, vec![(0_u64, 128_u64 << 20, 0_u64)]),
        // Past 2.75 GiB q35 keeps 2 GiB below the PCI hole and maps the rest from 4 GiB up.
        (3072, vec![(0, 2 << 30, 0), (4 << 30, 1 << 30, 2 << 30)]),
    ] {
        let qemu = Qemu::builder("ram-layout").memory_mib(mib).paused().spawn();
        let qmp = Client::connect_unix(qemu.qmp_socket(), ClientOptions::default())
            .await
            .unwrap();
        let regions = qemu::ram_layout(&qmp).await.unwrap();
        let found: Vec<_> = regions.iter().map(|r| (r.gpa, r.len, r.file_offset)).collect();
        assert_eq!(found, expected, "{mib} MiB");
        let mapped = memory::GuestMemory::from_ram_file(&qemu.ram_file(), &regions).unwrap();
        assert_eq!(mapped.size(), mib << 20);
    }
}
