//! `cargo xtask demo`: boots the test guest under QEMU 10 and drives it over QMP with the `qmp`
//! crate: status, pause and resume (proved by the guest's tick counter), device-state save, quit.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use qmp::{commands::*, Client, ClientOptions, Event};
use testkit::{Qemu, Workload};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the demo; the guest must have been built (`run_setup`).
pub fn run() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo())
}

fn step(text: &str) {
    println!("\n== {text}");
}

async fn demo() -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new().prefix("domsnap-demo-").tempdir()?;
    let disk = dir.path().join("demo.qcow2");
    testkit::create_qcow2(&disk, "64M");

    step("boot the test guest (q35, TCG, 256 MiB RAM in a shared file, one qcow2 disk)");
    let qemu = Qemu::builder("demo")
        .memory_mib(256)
        .guest(Workload::Idle)
        .disk(&disk)
        .in_dir(dir.path().join("vm"))
        .spawn();
    println!(
        "QMP socket {}, RAM file {}",
        qemu.qmp_socket().display(),
        qemu.ram_file().display()
    );
    let qmp = Client::connect_unix(qemu.qmp_socket(), ClientOptions::default()).await?;
    println!(
        "connected: QEMU {} ({})",
        qmp.greeting().version.qemu,
        qmp.greeting().version.package
    );
    let ready = wait_serial(&qemu, "DOMSNAP READY")?;
    println!("guest says: {ready}");
    let tick = wait_serial(&qemu, "DOMSNAP TICK")?;
    println!("guest says: {tick}");

    step("status and memory backend");
    let status = qmp.execute(&QueryStatus).await?;
    println!("status: {} (running: {})", status.status, status.running);
    for memdev in qmp.execute(&QueryMemdev).await? {
        println!(
            "memdev {:?}: {} MiB, share={}",
            memdev.id,
            memdev.size >> 20,
            memdev.share
        );
    }
    for node in qmp.execute(&QueryNamedBlockNodes { flat: Some(true) }).await? {
        println!("block node {:?}: {} ({})", node.node_name, node.file, node.drv);
    }

    step("pause: STOP event, and the guest's counter stops");
    let mut events = qmp.subscribe();
    qmp.execute(&Stop).await?;
    events
        .wait_for(EVENT_TIMEOUT, |e| matches!(e, Event::Stop))
        .await?;
    let paused_at = qemu.last_tick().context("no tick yet")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = qemu.last_tick().context("no tick yet")?;
    println!(
        "status: {}; counter {paused_at} -> {still} over 2 s",
        qmp.execute(&QueryStatus).await?.status
    );
    ensure!(
        still == paused_at,
        "the guest kept counting while paused ({paused_at} -> {still})"
    );

    step("save CPU and device state (no RAM) while paused");
    let devstate = dir.path().join("devstate");
    let save_started = Instant::now();
    qmp.execute(&XenSaveDevicesState {
        filename: path(&devstate)?,
        live: false,
    })
    .await?;
    let bytes = std::fs::read(&devstate)?;
    ensure!(
        bytes.starts_with(b"QEVM"),
        "device state does not start with QEMU's stream magic"
    );
    println!(
        "{} bytes of device state in {:?}",
        bytes.len(),
        save_started.elapsed()
    );

    step("resume: RESUME event, and the counter goes on");
    qmp.execute(&Cont).await?;
    events
        .wait_for(EVENT_TIMEOUT, |e| matches!(e, Event::Resume))
        .await?;
    let resumed = wait_tick_after(&qemu, still)?;
    println!(
        "status: {}; counter now {resumed}",
        qmp.execute(&QueryStatus).await?.status
    );

    step("quit");
    qmp.execute(&Quit).await?;
    let reason = tokio::time::timeout(EVENT_TIMEOUT, qmp.wait_closed()).await?;
    println!("QMP connection closed: {reason}");
    let marker = testkit::read_disk_marker(&disk);
    println!(
        "disk marker written by the guest: {}",
        marker.as_deref().unwrap_or("none")
    );
    ensure!(
        qmp.execute(&QueryStatus).await.is_err(),
        "QMP still answers after quit"
    );
    println!("\ndemo finished in {:.1} s", started.elapsed().as_secs_f64());
    drop(qemu);
    Ok(())
}

fn path(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Waits for the guest to print a line containing `needle` (blocking on the serial log).
fn wait_serial(qemu: &Qemu, needle: &str) -> Result<String> {
    tokio::task::block_in_place(|| qemu.try_wait_for_serial(needle, BOOT_TIMEOUT)).map_err(anyhow::Error::msg)
}

/// Waits for the guest's tick counter to pass `after`.
fn wait_tick_after(qemu: &Qemu, after: u64) -> Result<u64> {
    tokio::task::block_in_place(|| qemu.try_wait_for_tick_after(after, EVENT_TIMEOUT))
        .map_err(anyhow::Error::msg)
}
