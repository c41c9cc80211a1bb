//! The Debian test guest boots under TCG, counts on its serial console, serves the counter over the
//! forwarded port, and its guest agent answers. Needs `cargo xtask setup` (fails, never skips,
//! without it).

use std::time::{Duration, Instant};

use testkit::{debian_guest, DebianBoot, DebianVm};

/// Generous for a shared 2-core machine: a boot takes about 35-50 s there.
const BOOT: Duration = Duration::from_secs(300);
const SHORT: Duration = Duration::from_secs(30);

/// Waits for the first counter value and reports how long the boot took.
fn booted(vm: &DebianVm, started: Instant, what: &str) -> u64 {
    let first = vm
        .wait_for_counter_after(0, BOOT)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: DSCOUNTER {first} on the serial console {:.1} s after QEMU started",
        started.elapsed().as_secs_f64()
    );
    first
}

#[test]
fn debian_guest_counts_serves_its_counter_and_answers_the_agent() {
    let guest = debian_guest();
    let started = Instant::now();
    let vm = guest.vm("debian-kernel").spawn();
    let first = booted(&vm, started, "Debian guest (kernel boot)");

    // The counter moves, once a second.
    let later = vm.wait_for_counter_after(first + 1, SHORT).unwrap();
    assert!(later >= first + 2, "{first} then {later}");

    // The host reaches the service through the forwarded port (the link may still be coming up).
    let served = vm.http_counter(BOOT).unwrap();
    assert!(served >= 1, "served {served}");
    let index = vm.http_get("/", SHORT).unwrap();
    assert!(index.trim().parse::<u64>().is_ok(), "GET / answered {index:?}");
    eprintln!(
        "Debian guest (kernel boot): counter {served} over HTTP on 127.0.0.1:{} {:.1} s after QEMU started",
        vm.http_port(),
        started.elapsed().as_secs_f64()
    );

    // The guest agent answers on its socket.
    vm.agent_ping(Duration::from_secs(120)).unwrap();
    let info = vm.agent_execute("guest-info", None, SHORT).unwrap();
    assert!(info["version"].is_string(), "{info}");
    let host = vm.agent_execute("guest-get-host-name", None, SHORT).unwrap();
    assert_eq!(host["host-name"], "domsnap-debian", "{host}");
    eprintln!(
        "Debian guest (kernel boot): guest agent {} answered {:.1} s after QEMU started",
        info["version"],
        started.elapsed().as_secs_f64()
    );

    // The agent can freeze and thaw the filesystems (what `--quiesce` needs).
    let frozen = vm.agent_execute("guest-fsfreeze-freeze", None, SHORT).unwrap();
    assert!(frozen.as_u64().is_some_and(|n| n >= 1), "froze {frozen}");
    assert_eq!(
        vm.agent_execute("guest-fsfreeze-status", None, SHORT).unwrap(),
        "frozen"
    );
    vm.agent_execute("guest-fsfreeze-thaw", None, SHORT).unwrap();
    assert_eq!(
        vm.agent_execute("guest-fsfreeze-status", None, SHORT).unwrap(),
        "thawed"
    );

    // The serial counter went on meanwhile, and the guest writes to its overlay, not the cache.
    assert!(vm.serial_counters().last().copied().unwrap_or(0) >= later);
    let overlay = vm.overlay().display().to_string();
    let info = testkit::run("qemu-img", &["info", "-U", &overlay]);
    assert!(info.contains(&guest.root.display().to_string()), "{info}");

    // The power button shuts it down cleanly: QEMU exits and the root filesystem is clean.
    let mut vm = vm;
    let powered_off = Instant::now();
    vm.power_off(Duration::from_secs(180)).unwrap();
    eprintln!(
        "Debian guest (kernel boot): powered off in {:.1} s",
        powered_off.elapsed().as_secs_f64()
    );
    let raw = vm.qemu().dir().join("root.raw").display().to_string();
    testkit::run("qemu-img", &["convert", "-O", "raw", &overlay, &raw]);
    testkit::run("e2fsck", &["-fn", &raw]);
}

/// Boots the bootable disk image through `boot` and checks the counter and the agent.
fn boots_from_disk(boot: DebianBoot, what: &str) {
    let guest = debian_guest();
    let started = Instant::now();
    let vm = guest
        .vm(&format!("debian-{boot:?}").to_lowercase())
        .boot(boot)
        .spawn();
    let first = booted(&vm, started, what);
    vm.wait_for_counter_after(first, SHORT)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    vm.agent_ping(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let log = std::fs::read_to_string(vm.qemu().serial_log()).unwrap_or_default();
    assert!(
        log.contains("root=LABEL=domsnap-root"),
        "{what}: kernel command line not seen:\n{log}"
    );
}

#[test]
fn debian_disk_boots_under_seabios() {
    boots_from_disk(DebianBoot::Bios, "Debian disk (SeaBIOS, SYSLINUX)");
}

#[test]
fn debian_disk_boots_under_ovmf() {
    boots_from_disk(DebianBoot::Uefi, "Debian disk (OVMF, systemd-boot)");
}
