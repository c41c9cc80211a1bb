//! The driver's command line runs on a real QEMU 10: the test guest boots from it, and the restore
//! form waits for incoming state.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use qemu::{qemu_args, DomainConfig, RuntimePaths, StartMode};
use qmp::{commands::*, Client, ClientOptions, RunState};

/// Kills QEMU when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, mode: StartMode) -> (Running, RuntimePaths, DomainConfig) {
    let guest = testkit::guest();
    let disk = dir.join("vda.qcow2");
    if !disk.exists() {
        testkit::create_qcow2(&disk, "16M");
    }
    let text = format!(
        "name = \"cmdline-test\"\nmemory_mib = 128\nkernel = {:?}\ninitrd = {:?}\n\
         cmdline = \"console=ttyS0 quiet domsnap.mode=idle\"\n[[disks]]\nid = \"vda\"\npath = \"vda.qcow2\"",
        guest.kernel, guest.initrd
    );
    let config = DomainConfig::parse(&text, dir).unwrap();
    let paths = RuntimePaths {
        ram_file: dir.join("ram"),
        qmp_socket: dir.join("qmp.sock"),
        serial_log: dir.join("serial.log"),
        console_socket: dir.join("console.sock"),
    };
    let _ = std::fs::remove_file(&paths.qmp_socket);
    let child = Command::new(testkit::qemu_system())
        .args(qemu_args(&config, &paths, mode))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !paths.qmp_socket.exists() {
        assert!(Instant::now() < deadline, "no QMP socket: {}", std::fs::read_to_string(dir.join("stderr")).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    (running, paths, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_boots_from_the_driver_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, paths, config) = start(dir.path(), StartMode::Boot { paused: false });
    let qmp = Client::connect_unix(&paths.qmp_socket, ClientOptions::default()).await.unwrap();
    assert_eq!(qmp.execute(&QueryStatus).await.unwrap().status, RunState::Running);
    let memdevs = qmp.execute(&QueryMemdev).await.unwrap();
    assert!(memdevs[0].share && memdevs[0].size == config.memory_mib << 20, "{memdevs:?}");
    let nodes = qmp.execute(&QueryNamedBlockNodes { flat: Some(true) }).await.unwrap();
    assert!(nodes.iter().any(|n| n.node_name.as_deref() == Some("disk-vda")), "{nodes:?}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let log = std::fs::read_to_string(&paths.serial_log).unwrap_or_default();
        if log.contains("DOMSNAP TICK") {
            break;
        }
        assert!(Instant::now() < deadline, "the guest did not boot; serial log:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The guest found its disk through the driver's blockdev/virtio-blk line.
    let log = std::fs::read_to_string(&paths.serial_log).unwrap();
    assert!(log.contains("DOMSNAP DISK-MARKER-BOOT"), "{log}");
}

#[tokio::test]
async fn the_restore_command_line_waits_for_incoming_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, paths, _) = start(dir.path(), StartMode::Incoming);
    let qmp = Client::connect_unix(&paths.qmp_socket, ClientOptions::default()).await.unwrap();
    let status = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!((status.running, status.status), (false, RunState::InMigrate));
}
