//! Installing QEMU 10 (`qemu-system-x86_64`, `qemu-img`, `qemu-io`) on Debian 12 from bookworm-backports.
//!
//! Never install `qemu-system-x86` from plain bookworm: that is QEMU 7.2 and it removes qemu-utils 10.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

pub use testkit::QEMU_MAJOR;
/// The apt source file `setup` writes when bookworm-backports is not configured.
pub const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";
const DEBIAN_SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const DEFAULT_URIS: &str = "http://deb.debian.org/debian";
const DEFAULT_SIGNED_BY: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Installed QEMU tools and their versions (`None` = not installed or not runnable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersions {
    /// `qemu-system-x86_64 --version`.
    pub system: Option<String>,
    /// `qemu-img --version`.
    pub img: Option<String>,
    /// `qemu-io --version`.
    pub io: Option<String>,
}

impl QemuVersions {
    /// Asks the installed tools.
    pub fn probe() -> QemuVersions {
        let version = |program: &str| {
            cmd::probe(Command::new(program).arg("--version")).and_then(|out| parse_version(&out))
        };
        QemuVersions {
            system: version("qemu-system-x86_64"),
            img: version("qemu-img"),
            io: version("qemu-io"),
        }
    }

    /// All three are present and report version 10.x.
    pub fn ok(&self) -> bool {
        [&self.system, &self.img, &self.io]
            .iter()
            .all(|v| v.as_deref().and_then(major) == Some(QEMU_MAJOR))
    }

    /// e.g. `qemu-system-x86_64 10.0.2, qemu-img 10.0.2, qemu-io 10.0.2`.
    pub fn summary(&self) -> String {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "missing".to_string());
        format!(
            "qemu-system-x86_64 {}, qemu-img {}, qemu-io {}",
            show(&self.system),
            show(&self.img),
            show(&self.io)
        )
    }
}

/// The version number in a `--version` output's first line, e.g. `10.0.2` from
/// `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)`.
pub fn parse_version(output: &str) -> Option<String> {
    let first = output.lines().next()?;
    let mut words = first.split_whitespace();
    words.find(|w| *w == "version")?;
    let v = words.next()?;
    v.chars().next()?.is_ascii_digit().then(|| v.to_string())
}

fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

/// Makes sure QEMU 10 is installed (installing it from bookworm-backports if not) and returns the versions.
pub fn ensure_qemu() -> Result<QemuVersions> {
    let before = QemuVersions::probe();
    if before.ok() {
        println!(
            "setup: QEMU {QEMU_MAJOR} present ({}): nothing to install",
            before.summary()
        );
        return Ok(before);
    }
    println!("setup: QEMU {QEMU_MAJOR} needed, found {}", before.summary());
    let codename = os_codename();
    if codename.as_deref() != Some("bookworm") {
        bail!(
            "QEMU {QEMU_MAJOR} is missing and this is not Debian 12 (VERSION_CODENAME={}): install \
             qemu-system-x86_64, qemu-img and qemu-io version {QEMU_MAJOR} yourself",
            codename.as_deref().unwrap_or("unknown")
        );
    }
    ensure_backports_source()?;
    println!("setup: installing qemu-system-x86 and qemu-utils from bookworm-backports");
    cmd::run(cmd::as_root("apt-get", cmd::APT_ENV).arg("update"), false)?;
    cmd::run(
        cmd::as_root("apt-get", cmd::APT_ENV).args([
            "install",
            "-y",
            "--no-install-recommends",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
            "qemu-utils",
        ]),
        false,
    )?;
    let after = QemuVersions::probe();
    if !after.ok() {
        bail!(
            "after installing from bookworm-backports QEMU is still not {QEMU_MAJOR}: {}",
            after.summary()
        );
    }
    println!("setup: installed QEMU ({})", after.summary());
    Ok(after)
}

/// The tools the C API's test needs (`crates/capi/tests/c_smoke.rs`): a C compiler to build the
/// C program against `domsnap.h`, and valgrind to check it for leaks and invalid accesses.
/// (program, Debian package).
pub const C_TEST_TOOLS: &[(&str, &str)] = &[("cc", "gcc"), ("valgrind", "valgrind")];

/// Installs the [`C_TEST_TOOLS`] that are missing (from Debian's own suite: any version will do).
pub fn ensure_c_test_tools() -> Result<()> {
    let missing: Vec<&str> = C_TEST_TOOLS
        .iter()
        .filter(|(program, _)| cmd::probe(Command::new(program).arg("--version")).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        println!("setup: cc and valgrind present: nothing to install");
        return Ok(());
    }
    println!("setup: installing {} (the C API's test)", missing.join(" "));
    apt_install(&missing)?;
    for (program, package) in C_TEST_TOOLS {
        if cmd::probe(Command::new(program).arg("--version")).is_none() {
            bail!("{program} is still missing after installing {package}");
        }
    }
    Ok(())
}

/// The UEFI firmware a `firmware = "uefi"` domain runs (Debian's `ovmf`; any version will do):
/// its code and the NVRAM variables template, as the QEMU driver names them.
pub const OVMF_FILES: &[&str] = &[qemu::OVMF_CODE, qemu::OVMF_VARS_TEMPLATE];

/// Installs Debian's `ovmf` package unless its files are there.
pub fn ensure_ovmf() -> Result<()> {
    if OVMF_FILES.iter().all(|file| Path::new(file).is_file()) {
        println!("setup: OVMF present: nothing to install");
        return Ok(());
    }
    println!("setup: installing ovmf (UEFI domains)");
    apt_install(&["ovmf"])?;
    if let Some(missing) = OVMF_FILES.iter().find(|file| !Path::new(file).is_file()) {
        bail!("{missing} is still missing after installing ovmf");
    }
    Ok(())
}

/// `apt-get update`, then installs `packages` without recommends.
fn apt_install(packages: &[&str]) -> Result<()> {
    cmd::run(cmd::as_root("apt-get", cmd::APT_ENV).arg("update"), false)?;
    cmd::run(
        cmd::as_root("apt-get", cmd::APT_ENV)
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages),
        false,
    )
    .map(drop)
}

/// `VERSION_CODENAME` from /etc/os-release.
pub fn os_codename() -> Option<String> {
    let text = fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
}

/// Writes [`BACKPORTS_SOURCES`] unless bookworm-backports is already configured somewhere.
fn ensure_backports_source() -> Result<()> {
    if let Some(file) = backports_configured_in() {
        println!("setup: bookworm-backports already configured in {file}");
        return Ok(());
    }
    let text = match fs::read_to_string(DEBIAN_SOURCES) {
        Ok(debian) => backports_sources_text(&debian),
        Err(_) => {
            let list = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
            let uris = sources_list_uri(&list).unwrap_or_else(|| DEFAULT_URIS.to_string());
            render_sources(&uris, &[DEFAULT_SIGNED_BY.to_string()])
        }
    };
    println!("setup: writing {BACKPORTS_SOURCES}:\n{text}");
    write_root_file(Path::new(BACKPORTS_SOURCES), &text)
}

/// The first file among /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources} that mentions
/// bookworm-backports on a line that is not a comment.
fn backports_configured_in() -> Option<String> {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("list" | "sources")))
            .collect();
        more.sort();
        files.extend(more);
    }
    files.into_iter().find_map(|path| {
        let text = fs::read_to_string(&path).ok()?;
        mentions_backports(&text).then(|| path.display().to_string())
    })
}

fn mentions_backports(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.split_whitespace().any(|w| w == "bookworm-backports"))
}

/// The deb822 text for bookworm-backports, taking `URIs` and `Signed-By` from the stanza of
/// `debian.sources` whose `Suites` include `bookworm`.
pub fn backports_sources_text(debian_sources: &str) -> String {
    let stanza = parse_deb822(debian_sources).into_iter().find(|fields| {
        field(fields, "Suites").is_some_and(|s| s.join(" ").split_whitespace().any(|w| w == "bookworm"))
    });
    let uris = stanza
        .as_ref()
        .and_then(|f| field(f, "URIs"))
        .map(|v| v.join(" "))
        .unwrap_or_else(|| DEFAULT_URIS.to_string());
    let signed_by = stanza
        .as_ref()
        .and_then(|f| field(f, "Signed-By"))
        .map(<[String]>::to_vec)
        .unwrap_or_else(|| vec![DEFAULT_SIGNED_BY.to_string()]);
    render_sources(&uris, &signed_by)
}

fn render_sources(uris: &str, signed_by: &[String]) -> String {
    // A multi-line Signed-By (an inline key) keeps its continuation lines.
    let mut signed = signed_by.iter();
    let mut text = format!(
        "Types: deb\nURIs: {uris}\nSuites: bookworm-backports\nComponents: main\nSigned-By: {}\n",
        signed.next().map(String::as_str).unwrap_or(DEFAULT_SIGNED_BY)
    );
    for line in signed {
        text.push(' ');
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// deb822 stanzas as lists of (field, value lines); comments dropped, continuation lines kept trimmed.
fn parse_deb822(text: &str) -> Vec<Vec<(String, Vec<String>)>> {
    let mut stanzas = Vec::new();
    let mut current: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !current.is_empty() {
                stanzas.push(std::mem::take(&mut current));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, values)) = current.last_mut() {
                values.push(line.trim().to_string());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            let value = value.trim();
            let values = if value.is_empty() {
                vec![]
            } else {
                vec![value.to_string()]
            };
            current.push((key.trim().to_string(), values));
        }
    }
    if !current.is_empty() {
        stanzas.push(current);
    }
    stanzas
}

fn field<'a>(fields: &'a [(String, Vec<String>)], key: &str) -> Option<&'a [String]> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_slice())
}

/// The URI of the first `deb ... bookworm ...` line of a one-line-style sources.list.
fn sources_list_uri(text: &str) -> Option<String> {
    text.lines().map(str::trim).find_map(|line| {
        let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
        if words.next()? != "deb" {
            return None;
        }
        // Skip a multi-word option block such as `[arch=amd64 signed-by=...]`.
        let rest: Vec<&str> = words
            .skip_while(|w| !w.contains("://") && w.contains('='))
            .collect();
        let (uri, suite) = (rest.first()?, rest.get(1)?);
        (*suite == "bookworm").then(|| uri.to_string())
    })
}

fn write_root_file(path: &Path, text: &str) -> Result<()> {
    if cmd::effective_uid() == Some(0) {
        return fs::write(path, text).with_context(|| format!("writing {}", path.display()));
    }
    let mut child = Command::new("sudo")
        .arg("tee")
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running `sudo tee {}`", path.display()))?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin pipe")?, text.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("`sudo tee {}` failed ({status})", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"),
            Some("10.0.2".into())
        );
        assert_eq!(
            parse_version("qemu-img version 10.0.2 (Debian)\n"),
            Some("10.0.2".into())
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)"),
            Some("7.2.15".into())
        );
        assert_eq!(parse_version("nonsense"), None);
        let v = |s: &str| Some(s.to_string());
        assert!(QemuVersions {
            system: v("10.0.2"),
            img: v("10.0.2"),
            io: v("10.1.0")
        }
        .ok());
        assert!(!QemuVersions {
            system: None,
            img: v("10.0.2"),
            io: v("10.0.2")
        }
        .ok());
        assert!(!QemuVersions {
            system: v("7.2.15"),
            img: v("10.0.2"),
            io: v("10.0.2")
        }
        .ok());
    }

    #[test]
    fn backports_from_debian_sources() {
        let debian = "Types: deb\n\
            # http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
            URIs: http://deb.debian.org/debian\n\
            Suites: bookworm bookworm-updates\n\
            Components: main\n\
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
            \n\
            Types: deb\n\
            URIs: http://deb.debian.org/debian-security\n\
            Suites: bookworm-security\n\
            Components: main\n\
            Signed-By: /usr/share/keyrings/other.gpg\n";
        assert_eq!(
            backports_sources_text(debian),
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        let mirror = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nComponents: main\n";
        assert!(backports_sources_text(mirror).contains("URIs: http://mirror.example/debian\n"));
        assert!(backports_sources_text(mirror).contains(DEFAULT_SIGNED_BY));
        assert!(backports_sources_text("").contains("URIs: http://deb.debian.org/debian\n"));
    }

    #[test]
    fn backports_detection_and_sources_list() {
        assert!(mentions_backports("Types: deb\nSuites: bookworm-backports\n"));
        assert!(mentions_backports(
            "deb http://deb.debian.org/debian bookworm-backports main\n"
        ));
        assert!(!mentions_backports(
            "# deb http://deb.debian.org/debian bookworm-backports main\n"
        ));
        assert!(!mentions_backports("Suites: bookworm bookworm-updates\n"));
        assert_eq!(
            sources_list_uri("deb [arch=amd64] http://ftp.de.debian.org/debian bookworm main\n"),
            Some("http://ftp.de.debian.org/debian".into())
        );
        assert_eq!(
            sources_list_uri("deb http://x/debian bookworm-updates main\n"),
            None
        );
    }
}
