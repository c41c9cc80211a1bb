//! Running external commands so that a failure names the command line and shows its stderr.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{bail, Context, Result};

/// How much of a failing command's stderr goes into the error message.
const STDERR_TAIL: usize = 8 * 1024;

/// The command line as a shell would show it (environment overrides first).
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), quote(v))))
        .collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", quote(dir.as_os_str())),
        None => line,
    }
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let text = text.trim_end();
    if start > 0 {
        format!("[...]\n{text}")
    } else {
        text.to_string()
    }
}

/// Runs `cmd` quietly and returns its stdout. Fails, with the command line and its stderr, if it cannot be
/// started or exits unsuccessfully.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}); stderr:\n{}",
            display(cmd),
            out.status,
            tail(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`output`] but returns `None` instead of failing (for probes such as `--version`).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` visibly: prints `$ <command line>`, passes its stderr through while keeping a copy, and either
/// passes stdout through (`capture_stdout == false`, returns an empty string) or returns it. Fails with the
/// command line and its stderr.
pub fn run(cmd: &mut Command, capture_stdout: bool) -> Result<String> {
    let line = display(cmd);
    eprintln!("$ {line}");
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    if capture_stdout {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::inherit());
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot run `{line}`"))?;
    let mut child_stderr = child.stderr.take().context("stderr pipe")?;
    let tee = thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match child_stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let _ = io::stderr().write_all(&buf[..n]);
                    kept.extend_from_slice(&buf[..n]);
                }
            }
        }
        kept
    });
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_end(&mut stdout)
            .with_context(|| format!("reading stdout of `{line}`"))?;
    }
    let status = child.wait().with_context(|| format!("waiting for `{line}`"))?;
    let stderr = tee.join().unwrap_or_default();
    if !status.success() {
        bail!("`{line}` failed ({status}); stderr:\n{}", tail(&stderr));
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// The effective user id of this process (from /proc/self/status).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Environment for apt-get: never ask questions.
pub const APT_ENV: &[(&str, &str)] = &[("DEBIAN_FRONTEND", "noninteractive")];

/// A command that runs `program` as root: directly when we are root, else through `sudo`. `env` is set in
/// either case (sudo would drop it otherwise).
pub fn as_root(program: &str, env: &[(&str, &str)]) -> Command {
    if effective_uid() == Some(0) {
        let mut cmd = Command::new(program);
        cmd.envs(env.iter().copied());
        cmd
    } else {
        let mut cmd = Command::new("sudo");
        cmd.args(env.iter().map(|(k, v)| format!("{k}={v}")));
        cmd.arg(program);
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_and_shows_env() {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "a b", "it's"]);
        assert_eq!(
            display(&cmd),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y 'a b' 'it'\\''s'"
        );
    }

    #[test]
    fn failure_reports_command_and_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        let err = run(Command::new("sh").args(["-c", "exit 4"]), true).unwrap_err();
        assert!(
            format!("{err:#}").contains("sh -c 'exit 4'` failed (exit status: 4)"),
            "{err:#}"
        );
        assert_eq!(run(Command::new("echo").arg("hi"), true).unwrap(), "hi\n");
        assert!(output(&mut Command::new("/nonexistent/program")).is_err());
    }
}
