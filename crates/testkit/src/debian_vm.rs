//! Booting the Debian test guest under QEMU for a test: q35 under TCG (the domain driver's command
//! line, through [`crate::QemuBuilder`]), a fresh qcow2 overlay over the cached image per VM (the cache
//! stays pristine), user networking forwarding a host port to the guest's port 80, and the guest
//! agent's virtio-serial channel on a Unix socket. Also the clients tests need: the counter on the
//! serial console, over HTTP, and the guest agent.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::debian::{
    counters, DebianGuest, DEBIAN_CMDLINE, DEBIAN_DISK_FILE, DEBIAN_HTTP_PORT, DEBIAN_ROOT_FILE,
    GUEST_AGENT_PORT_NAME,
};
use crate::{require_tool, run, Qemu};

/// OVMF's code, read-only (Debian's `ovmf` package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's variable store template; each VM gets its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How the Debian guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebianBoot {
    /// QEMU loads the kernel and initramfs (`-kernel/-initrd/-append`); the disk is the root
    /// filesystem image (the default).
    Kernel,
    /// SeaBIOS boots the bootable disk image (SYSLINUX).
    Bios,
    /// OVMF boots the bootable disk image (systemd-boot), with a private copy of its variables.
    Uefi,
}

/// Describes a QEMU VM booting the Debian guest; [`DebianVmBuilder::spawn`] starts it.
#[derive(Debug)]
pub struct DebianVmBuilder {
    guest: DebianGuest,
    name: String,
    memory_mib: u64,
    boot: DebianBoot,
    paused: bool,
    append: Vec<String>,
    extra: Vec<String>,
}

/// A running Debian guest, killed on drop; its overlay, sockets and logs live in a temporary folder
/// removed on drop.
#[derive(Debug)]
pub struct DebianVm {
    qemu: Qemu,
    overlay: PathBuf,
    http_port: u16,
    boot: DebianBoot,
    _dir: tempfile::TempDir,
}

impl DebianVmBuilder {
    pub(crate) fn new(guest: DebianGuest, name: &str) -> DebianVmBuilder {
        DebianVmBuilder {
            guest,
            name: name.to_owned(),
            memory_mib: 1024,
            boot: DebianBoot::Kernel,
            paused: false,
            append: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Guest RAM (default 1 GiB).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// How it boots (default [`DebianBoot::Kernel`]).
    pub fn boot(mut self, boot: DebianBoot) -> Self {
        self.boot = boot;
        self
    }

    /// Start with the vCPUs stopped (`-S`).
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// More kernel command-line words (only with [`DebianBoot::Kernel`]).
    pub fn append(mut self, words: impl Into<String>) -> Self {
        self.append.push(words.into());
        self
    }

    /// An extra QEMU argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Makes the overlay, picks a free host port and starts QEMU (returning once it answers on QMP;
    /// the guest is then still booting). Panics with what failed.
    pub fn spawn(self) -> DebianVm {
        let dir = tempfile::Builder::new()
            .prefix(&format!("domsnap-debian-{}-", self.name))
            .tempdir()
            .expect("create a temporary folder for the Debian VM");
        let (base, overlay_name) = match self.boot {
            DebianBoot::Kernel => (&self.guest.root, DEBIAN_ROOT_FILE),
            DebianBoot::Bios | DebianBoot::Uefi => (&self.guest.disk, DEBIAN_DISK_FILE),
        };
        let overlay = dir.path().join(overlay_name);
        create_overlay(base, &overlay);
        let http_port = free_port();
        let mut qemu = Qemu::builder(&self.name)
            .memory_mib(self.memory_mib)
            .in_dir(dir.path())
            .disk(&overlay);
        if self.boot == DebianBoot::Kernel {
            let mut cmdline = DEBIAN_CMDLINE.to_owned();
            for words in &self.append {
                cmdline.push(' ');
                cmdline.push_str(words);
            }
            qemu = qemu.kernel(&self.guest.kernel, Some(&self.guest.initrd), cmdline);
        }
        if self.paused {
            qemu = qemu.paused();
        }
        for arg in extra_args(dir.path(), http_port, self.boot)
            .into_iter()
            .chain(self.extra)
        {
            qemu = qemu.arg(arg);
        }
        DebianVm {
            qemu: qemu.spawn(),
            overlay,
            http_port,
            boot: self.boot,
            _dir: dir,
        }
    }
}

/// `qemu-img create -f qcow2 -b BASE -F qcow2 OVERLAY`.
fn create_overlay(base: &Path, overlay: &Path) {
    require_tool("qemu-img");
    let (base, overlay) = (base.display().to_string(), overlay.display().to_string());
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &overlay,
        ],
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// The QEMU arguments the Debian guest adds to the test command line: its NIC with the host
/// forward, the guest agent's channel, and OVMF's flash for [`DebianBoot::Uefi`].
fn extra_args(dir: &Path, http_port: u16, boot: DebianBoot) -> Vec<String> {
    let escape = |path: &Path| path.display().to_string().replace(',', ",,");
    let mut args = vec![
        "-netdev".to_owned(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{http_port}-:{DEBIAN_HTTP_PORT}"),
        "-device".to_owned(),
        "virtio-net-pci,netdev=n0".to_owned(),
        "-device".to_owned(),
        "virtio-serial-pci".to_owned(),
        "-chardev".to_owned(),
        format!(
            "socket,path={},server=on,wait=off,id=qga0",
            escape(&dir.join("qga.sock"))
        ),
        "-device".to_owned(),
        format!("virtserialport,chardev=qga0,name={GUEST_AGENT_PORT_NAME}"),
    ];
    if boot == DebianBoot::Uefi {
        let vars = dir.join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars)
            .unwrap_or_else(|e| panic!("copy {OVMF_VARS} (install ovmf: run `cargo xtask setup`): {e}"));
        args.extend([
            "-drive".to_owned(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".to_owned(),
            format!("if=pflash,format=raw,unit=1,file={}", escape(&vars)),
        ]);
    }
    args
}

impl DebianVm {
    /// The QEMU process (QMP socket, serial log, kill, ...).
    pub fn qemu(&self) -> &Qemu {
        &self.qemu
    }

    /// The QEMU process, mutably.
    pub fn qemu_mut(&mut self) -> &mut Qemu {
        &mut self.qemu
    }

    /// The qcow2 overlay the guest writes to (its backing file is the cached image).
    pub fn overlay(&self) -> &Path {
        &self.overlay
    }

    /// How it booted.
    pub fn boot(&self) -> DebianBoot {
        self.boot
    }

    /// The host port forwarded to the guest's port 80 (on 127.0.0.1).
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The Unix socket of the guest agent's channel.
    pub fn agent_socket(&self) -> PathBuf {
        self.qemu.dir().join("qga.sock")
    }

    /// Every `DSCOUNTER <n>` value on the serial console so far.
    pub fn serial_counters(&self) -> Vec<u64> {
        counters(&std::fs::read_to_string(self.qemu.serial_log()).unwrap_or_default())
    }

    /// Waits up to `timeout` for a serial `DSCOUNTER` value above `after`; returns the latest.
    pub fn wait_for_counter_after(&self, after: u64, timeout: Duration) -> Result<u64, String> {
        self.qemu
            .poll(timeout, |log| {
                counters(log).last().copied().filter(|&n| n > after)
            })
            .map_err(|log| format!("the counter did not pass {after} within {timeout:?}; {log}"))
    }

    /// `GET path` on the forwarded port, retried until a `200` answer or `timeout`; returns the body.
    pub fn http_get(&self, path: &str, timeout: Duration) -> Result<String, String> {
        http_get(self.http_port, path, timeout)
    }

    /// The counter as the guest serves it over the network (`GET /counter`).
    pub fn http_counter(&self, timeout: Duration) -> Result<u64, String> {
        http_counter(self.http_port, timeout)
    }

    /// Runs a guest-agent command on this VM's agent (see [`agent_execute`]).
    pub fn agent_execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, String> {
        agent_execute(&self.agent_socket(), command, arguments, timeout)
    }

    /// `guest-ping` through the guest agent.
    pub fn agent_ping(&self, timeout: Duration) -> Result<(), String> {
        self.agent_execute("guest-ping", None, timeout).map(drop)
    }

    /// Presses the ACPI power button (QMP `system_powerdown`: systemd-logind powers the guest off)
    /// and waits up to `timeout` for QEMU to exit.
    pub fn power_off(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        qmp_command(&self.qemu.qmp_socket(), "system_powerdown")?;
        self.qemu.wait_exit(timeout).ok_or_else(|| {
            format!(
                "the guest did not power off within {timeout:?}; serial log:\n{}",
                std::fs::read_to_string(self.qemu.serial_log()).unwrap_or_default()
            )
        })
    }
}

/// `GET path` on 127.0.0.1:`port` (a host forward to the guest's service), retried until a `200`
/// answer or `timeout`; returns the body.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get_once(port, path) {
            Ok(body) => return Ok(body),
            Err(err) => err,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "GET {path} on 127.0.0.1:{port} gave no answer within {timeout:?}: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The Debian guest's counter as its service serves it on 127.0.0.1:`port` (`GET /counter`).
pub fn http_counter(port: u16, timeout: Duration) -> Result<u64, String> {
    let body = http_get(port, "/counter", timeout)?;
    body.trim()
        .parse()
        .map_err(|err| format!("GET /counter answered {body:?}, not a number ({err})"))
}

/// The Debian guest's counter on 127.0.0.1:`port` once it has passed `above`, asked every half
/// second for up to `timeout`.
pub fn http_counter_above(port: u16, above: u64, timeout: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = http_counter(port, timeout)?;
        if now > above {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the counter stayed at {now} (not past {above}) for {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs a guest-agent command (`{"execute": command, "arguments": arguments}`) on the agent at
/// `socket` and returns its `return` value. Synchronises first (`guest-sync-delimited`), so it
/// also waits, up to `timeout`, for the agent to start.
pub fn agent_execute(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, String> {
    let mut agent = Agent::connect(socket, Instant::now() + timeout)?;
    agent.sync()?;
    let mut request = json!({ "execute": command });
    if let Some(arguments) = arguments {
        request["arguments"] = arguments;
    }
    agent.send(&request)?;
    let reply = agent.reply(|_| true)?;
    match (reply.get("return"), reply.get("error")) {
        (Some(value), _) => Ok(value.clone()),
        (None, Some(error)) => Err(format!("guest agent: {command} failed: {error}")),
        (None, None) => Err(format!("guest agent: {command}: unexpected reply {reply}")),
    }
}

/// Runs `/bin/sh -c script` in the guest through the agent at `socket` (`guest-exec`, then
/// `guest-exec-status` until it exits) and returns its exit code.
pub fn agent_shell(socket: &Path, script: &str, timeout: Duration) -> Result<i64, String> {
    let deadline = Instant::now() + timeout;
    let started = agent_execute(
        socket,
        "guest-exec",
        Some(json!({ "path": "/bin/sh", "arg": ["-c", script] })),
        timeout,
    )?;
    let pid = started["pid"].clone();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let status = agent_execute(socket, "guest-exec-status", Some(json!({ "pid": pid })), left)?;
        if status["exited"] == true {
            return status["exitcode"]
                .as_i64()
                .ok_or_else(|| format!("`{script}` ended without an exit code: {status}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("`{script}` did not end within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Connects to QMP, negotiates, runs `command` (no arguments) and disconnects.
fn qmp_command(socket: &Path, command: &str) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    let fail = |what: &str, err: std::io::Error| format!("QMP {command}: {what}: {err}");
    let stream = UnixStream::connect(socket).map_err(|e| fail("connect", e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail("set a read timeout", e))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| fail("clone the socket", e))?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| fail("greeting", e))?;
    for request in ["qmp_capabilities", command] {
        (&stream)
            .write_all(format!("{{\"execute\":\"{request}\"}}\n").as_bytes())
            .map_err(|e| fail("send", e))?;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| fail("reply", e))? == 0 {
                return Err(format!("QMP {command}: QEMU closed the connection"));
            }
            if line.contains("\"error\"") {
                return Err(format!("QMP {request}: {}", line.trim()));
            }
            if line.contains("\"return\"") {
                break;
            }
        }
    }
    Ok(())
}

/// One `GET` over HTTP/1.0; the body of a `200` answer.
fn http_get_once(port: u16, path: &str) -> Result<String, String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("set a read timeout: {e}"))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: domsnap-debian\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answer {status:?}"));
    }
    Ok(body.to_owned())
}

/// A connection to the guest agent's socket (JSON in both directions, no greeting).
struct Agent {
    stream: UnixStream,
    pending: Vec<u8>,
    deadline: Instant,
}

impl Agent {
    fn connect(socket: &Path, deadline: Instant) -> Result<Agent, String> {
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(err) if Instant::now() >= deadline => {
                    return Err(format!(
                        "cannot connect to the guest agent at {}: {err}",
                        socket.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(250)))
            .map_err(|e| format!("set a read timeout on the agent socket: {e}"))?;
        Ok(Agent {
            stream,
            pending: Vec::new(),
            deadline,
        })
    }

    fn send(&mut self, request: &Value) -> Result<(), String> {
        let line = format!("{request}\n");
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("guest agent: send {request}: {e}"))
    }

    /// `guest-sync-delimited` with a fresh id: the agent answers `0xFF` then the id, after which the
    /// next reply is the next command's. Replies to anything earlier are skipped.
    fn sync(&mut self) -> Result<(), String> {
        let id = u64::from(std::process::id()) << 32
            | u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or_default(),
            );
        self.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }))?;
        self.reply(|reply| reply.get("return").and_then(Value::as_u64) == Some(id))
            .map(drop)
    }

    /// The next JSON message that `wanted` accepts (others are skipped), before the deadline.
    fn reply(&mut self, wanted: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).filter(|&b| b != 0xff).collect();
                if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                    if wanted(&value) {
                        return Ok(value);
                    }
                }
            }
            if Instant::now() >= self.deadline {
                return Err(format!(
                    "the guest agent did not answer in time (received so far: {:?})",
                    String::from_utf8_lossy(&self.pending)
                ));
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err("the guest agent's socket was closed".to_owned()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => return Err(format!("reading from the guest agent: {err}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_and_agent_arguments() {
        let args = extra_args(Path::new("/run/x,y"), 18080, DebianBoot::Kernel).join(" ");
        assert!(
            args.contains(
                "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:18080-:80 -device virtio-net-pci,netdev=n0"
            ),
            "{args}"
        );
        assert!(
            args.contains("socket,path=/run/x,,y/qga.sock,server=on,wait=off,id=qga0"),
            "{args}"
        );
        assert!(
            args.ends_with("-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"),
            "{args}"
        );
        assert!(!args.contains("pflash"), "{args}");
    }

    #[test]
    fn free_ports_are_free() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
