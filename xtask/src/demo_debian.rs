//! The demo on the Debian test guest: a real operating system whose service counts in memory and
//! answers over the network. A live, quiesced snapshot while it serves; files change and the
//! counter moves; the revert brings back the counter (over the network) and the files.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use testkit::{DebianBoot, DebianGuest};

use crate::demo::{print_created, print_reverted, step, Demo, Running};

const DOMAIN: &str = "debian";
/// A Debian boot under TCG takes 35-90 s here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const SHORT: Duration = Duration::from_secs(60);

/// Runs the story on the Debian guest.
pub(crate) fn run(demo: &Demo, dir: &Path, guest: &DebianGuest) -> Result<()> {
    let http_port = testkit::free_port();
    let config = guest.domain_config(&dir.join("debian-files"), DOMAIN, DebianBoot::Kernel, http_port);
    step(&format!(
        "start domain \"{DOMAIN}\": Debian 12 (systemd, ext4 root on a qcow2 overlay, a raw data disk), \
         1 GiB, the guest agent, user networking with 127.0.0.1:{http_port} forwarded to its port 80"
    ));
    demo.show(&["domain", "start", config.to_str().context("UTF-8 path")?])?;
    let mut running = Running {
        demo,
        domain: DOMAIN,
        stopped: false,
    };
    let booted = Instant::now();
    let counter = || testkit::http_counter(http_port, SHORT).map_err(anyhow::Error::msg);
    let first = testkit::http_counter(http_port, BOOT_TIMEOUT).map_err(anyhow::Error::msg)?;
    println!(
        "its service answers over the network after {:.0} s: GET /counter = {first}",
        booted.elapsed().as_secs_f64()
    );
    let shell = |script: &str| -> Result<i64> {
        let socket = agent_socket(demo)?;
        testkit::agent_shell(&socket, script, SHORT).map_err(anyhow::Error::msg)
    };
    ensure!(shell("echo 'written before the snapshot' >/root/demo-before && sync")? == 0);

    step("live snapshot, quiesced (the guest agent freezes the filesystems; vda internal, vdb external)");
    let before = counter()?;
    let report = demo.json(&[
        "snapshot",
        "create",
        DOMAIN,
        "served",
        "--live",
        "--quiesce",
        "--disk",
        "vdb=external",
    ])?;
    let at_snapshot = counter()?;
    print_created(&report);
    println!(
        "quiesced: {}; the counter served over the network was between {before} and {at_snapshot}",
        report["record"]["quiesced"]
    );

    step("the guest changes: a file removed, another written, the counter moves on");
    ensure!(shell("rm /root/demo-before && echo 'written after' >/root/demo-after && sync")? == 0);
    let later = testkit::http_counter_above(http_port, at_snapshot + 5, SHORT).map_err(anyhow::Error::msg)?;
    println!("GET /counter = {later}");

    step("revert to the snapshot");
    let report = demo.json(&["snapshot", "revert", DOMAIN, "served"])?;
    print_reverted(&report);
    println!("thaw of the restored guest's filesystems: {}", report["thaw"]);
    let restored = counter()?;
    println!(
        "GET /counter = {restored} over the network: from the snapshot ({before}..{at_snapshot}), not {later}"
    );
    ensure!(
        before <= restored && restored <= at_snapshot + 2,
        "the service did not continue from the snapshot"
    );
    let files = shell("test -e /root/demo-before && ! test -e /root/demo-after")?;
    ensure!(files == 0, "the files are not as they were at the snapshot");
    println!("/root/demo-before is back and /root/demo-after is gone");

    step("delete, stop");
    demo.show(&["snapshot", "delete", DOMAIN, "served"])?;
    demo.show(&["domain", "stop", DOMAIN, "--timeout", "120"])?;
    running.stopped = true;
    Ok(())
}

fn agent_socket(demo: &Demo) -> Result<PathBuf> {
    let status = demo.quiet_json(&["domain", "status", DOMAIN])?;
    let socket = status["guest_agent_socket"].as_str();
    Ok(PathBuf::from(
        socket.context("the domain has no guest agent socket")?,
    ))
}
