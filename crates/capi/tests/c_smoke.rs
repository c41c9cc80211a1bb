//! The C API from C: `tests/c/smoke.c`, compiled with `cc` against `include/domsnap.h` and the
//! built `libdomsnap.so`, drives a real QEMU 10 domain with two qcow2 disks (live snapshot with an
//! internal and an external disk, list, show, revert, delete, and every kind of bad input). It
//! runs plainly and under valgrind (no leaks, no invalid accesses).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The folder holding `libdomsnap.so`: cargo builds the library beside (or above) the test.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .find(|dir| dir.join("libdomsnap.so").is_file())
        .unwrap_or_else(|| panic!("no libdomsnap.so beside or above {}", exe.display()))
        .to_owned()
}

/// Compiles the C program into `dir`; its path.
fn compile(dir: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    compile_source(&crate_dir.join("tests/c/smoke.c"), &dir.join("smoke"))
}

/// Compiles and links `source` against the header and the library into `program`.
fn compile_source(source: &Path, program: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let library = library_dir();
    let output = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(crate_dir.join("include"))
        .arg(source)
        .arg("-L")
        .arg(&library)
        .arg(format!("-Wl,-rpath,{}", library.display()))
        .args(["-ldomsnap", "-o"])
        .arg(program)
        .output()
        .expect("cc is required (`cargo xtask setup` installs it)");
    assert!(
        output.status.success(),
        "cc {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    program.to_owned()
}

/// A state directory, a domain configuration for the test guest with two fresh qcow2 disks,
/// and the C program's arguments.
struct Setup {
    /// Short path: QEMU's socket paths under the state directory are limited to 107 bytes.
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Setup {
    /// A domain of `memory_mib` MiB named `domain`.
    fn new(domain: &str, memory_mib: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dsc")
            .tempdir_in("/tmp")
            .expect("a temporary folder");
        let guest = testkit::guest();
        let mut config = format!(
            "name = \"{domain}\"\nmemory_mib = {memory_mib}\nvcpus = 1\naccel = \"tcg\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
             cmdline = \"console=ttyS0 quiet {}\"\n",
            guest.kernel.display(),
            guest.initrd.display(),
            testkit::Workload::Idle.cmdline()
        );
        for id in ["vda", "vdb"] {
            let image = dir.path().join(format!("{id}.qcow2"));
            testkit::create_qcow2(&image, "64M");
            config.push_str(&format!(
                "[[disks]]\nid = \"{id}\"\npath = \"{}\"\n",
                image.display()
            ));
        }
        let config_path = dir.path().join(format!("{domain}.toml"));
        std::fs::write(&config_path, config).expect("write the configuration");
        let state = dir.path().join("state");
        let serial = state.join("domains").join(domain).join("serial.log");
        let args = vec![
            state.display().to_string(),
            config_path.display().to_string(),
            domain.to_owned(),
            serial.display().to_string(),
            dir.path().join("vdb.s1.overlay.qcow2").display().to_string(),
        ];
        Setup { dir, args }
    }

    /// Runs `program` (under `wrapper`, if given) with the C program's arguments.
    fn run(&self, wrapper: &[&str], program: &Path) -> Output {
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        command
            .args(&self.args)
            // cargo's LD_LIBRARY_PATH would win over the program's rpath, and may name a folder
            // with an older libdomsnap.so (`cargo build`'s) than the one this test was built with.
            .env_remove("LD_LIBRARY_PATH")
            .env(qemu::QEMU_ENV, testkit::qemu_system())
            .output()
            .expect("run the C program")
    }
}

/// A domain's QEMU outlives the program that started it: a failed run must not leave it.
impl Drop for Setup {
    fn drop(&mut self) {
        let domains = self.dir.path().join("state/domains");
        for domain in std::fs::read_dir(domains).into_iter().flatten().flatten() {
            let pid = std::fs::read_to_string(domain.path().join("run/qemu.pid")).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) touches no memory of this process; the pid is this test's QEMU.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn report(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn c_program_drives_a_domain_and_gets_every_error_code() {
    let setup = Setup::new("capi", 128);
    let program = compile(setup.dir.path());
    let output = setup.run(&[], &program);
    println!("{}", report(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", report(&output));
    assert!(stdout.contains(" passed, 0 failed"), "{}", report(&output));
    assert!(stdout.contains("ok: create: unknown disk device: invalid_argument"));
}

#[test]
fn c_program_is_clean_under_valgrind() {
    // Memory saves and restores run many times slower under valgrind: the smallest guest that
    // boots (64 MiB does not).
    let setup = Setup::new("capivg", 96);
    let program = compile(setup.dir.path());
    let suppressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/valgrind.supp");
    let suppressions = format!("--suppressions={}", suppressions.display());
    let valgrind = [
        "valgrind",
        "--leak-check=full",
        "--show-leak-kinds=all",
        // Every kind: still-reachable blocks too are errors, except those valgrind.supp
        // explains (process-wide statics of tokio's signal handling).
        "--errors-for-leak-kinds=all",
        "--num-callers=40",
        &suppressions,
        "--error-exitcode=1",
    ];
    let output = setup.run(&valgrind, &program);
    println!("{}", report(&output));
    assert!(output.status.success(), "{}", report(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "{}", report(&output));
    assert!(
        stderr.contains("All heap blocks were freed") || stderr.contains("still reachable: 0 bytes"),
        "{}",
        report(&output)
    );
}

#[test]
fn the_example_of_the_guide_compiles() {
    let guide = include_str!("../../../docs/c-api.md");
    let start = guide.find("```c\n").expect("docs/c-api.md has a C example") + "```c\n".len();
    let length = guide[start..].find("```").expect("the example ends");
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("example.c");
    std::fs::write(&source, &guide[start..start + length]).unwrap();
    compile_source(&source, &dir.path().join("example"));
}
