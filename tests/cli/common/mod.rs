//! Helpers shared by the tests that drive the `vmr` binary: running it, scratch files, tiny
//! guests linked as ELF kernels, and VMs left running in the background.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[allow(unused_imports)] // for `openapi`, which names them through `super::`
use vmm::api::{HttpResponse, OPENAPI_YAML};

pub mod proxy;
pub mod standby;

/// vmm's OpenAPI oracle, shared with vmm's API unit tests.
#[path = "../../../vmm/tests/common/openapi.rs"]
pub mod openapi;

/// Runs `vmr ARGS` to completion.
pub fn vmr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmr"))
        .args(args)
        .env("VMR_LOG", "error")
        .output()
        .unwrap()
}

/// A path in this test process's scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmr-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Links `vmm/tests/guests/NAME.S` into an ELF executable at 2 MiB: a kernel `vmr run` can load.
/// Each call makes its own files: tests run in parallel.
pub fn tiny_elf(name: &str) -> PathBuf {
    static BUILDS: AtomicUsize = AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, Ordering::SeqCst);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("vmm/tests/guests/{name}.S"));
    let obj = scratch(&format!("{name}-{n}.o"));
    let elf = scratch(&format!("{name}-{n}.elf"));
    for cmd in [
        Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&obj)
            .arg(&src)
            .status(),
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-e", "_start", "-Ttext=0x200000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status(),
    ] {
        assert!(cmd.expect("binutils (as, ld) must be installed").success());
    }
    elf
}

/// Asserts a clean refusal: exit status 1, one `vmr: error:` line naming `needle`, no panic.
pub fn assert_refused(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("vmr: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(
        errors[0].contains(needle),
        "{:?} does not say {needle:?}",
        errors[0]
    );
}

/// A `vmr` process running in the background, its console in a file.
pub struct Vmr {
    /// The process.
    pub child: Child,
    /// Its console.
    pub console: PathBuf,
    /// Its stderr.
    pub stderr: PathBuf,
}

impl Vmr {
    /// Starts `vmr ARGS --serial file:<scratch>/NAME.console`.
    pub fn spawn(name: &str, args: &[&str]) -> Vmr {
        let console = scratch(&format!("{name}.console"));
        let stderr = scratch(&format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_vmr"))
            .args(args)
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .env("VMR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Vmr {
            child,
            console,
            stderr,
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// What the monitor logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the console has a line for which `f` holds.
    pub fn wait_console(&mut self, what: &str, f: impl Fn(&str) -> bool) {
        let t0 = Instant::now();
        loop {
            if self.console().lines().any(&f) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "vmr ended ({status}) before {what}; console:\n{}\nlog:\n{}",
                    self.console(),
                    self.log()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no {what} within 60 s; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end; returns whether it exited 0.
    pub fn wait(&mut self) -> bool {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!(
                    "vmr still running after 60 s; console:\n{}\nlog:\n{}",
                    self.console(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (host loss).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vmr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the API socket at `path` exists.
pub fn wait_for_socket(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no API socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
