//! `vmr standby` processes and the replication API, for the tests that protect a VM.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{scratch, vmr, wait_for_socket};

/// A key file of 32 bytes of `byte`.
pub fn key_file(name: &str, byte: u8) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, [byte; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A TCP port free now on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `vmr standby` running in the background, its log in a file.
pub struct StandbyProc {
    /// The process.
    pub child: Child,
    log: PathBuf,
    /// Where it listens for a primary.
    pub addr: String,
    api: PathBuf,
}

impl StandbyProc {
    pub fn spawn(name: &str, key: &Path, extra: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = scratch(&format!("{name}.stderr"));
        let api = scratch(&format!("{name}.sock"));
        let child = Command::new(env!("CARGO_BIN_EXE_vmr"))
            .args(["standby", "--listen", &addr, "--key-file"])
            .arg(key)
            .arg("--api")
            .arg(&api)
            .args(extra)
            .env("VMR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Self {
            child,
            log,
            addr,
            api,
        };
        s.wait_log("listening", |l| l.contains("standing by for a primary"));
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn api(&self) -> &Path {
        &self.api
    }

    /// Waits (60 s at most) until a line of the log satisfies `f`; that line.
    pub fn wait_log(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            if let Some(line) = self.log().lines().find(|l| f(l)) {
                return line.to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the standby logged no {what} within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StandbyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vmr ctl --api SOCKET protect STANDBY`.
pub fn protect(api: &Path, standby: &str) -> Output {
    vmr(&["ctl", "--api", api.to_str().unwrap(), "protect", standby])
}

/// [`protect`], which must succeed.
pub fn protect_ok(api: &Path, standby: &str) -> Output {
    let out = protect(api, standby);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `vmr ctl --api SOCKET replication`, parsed.
pub fn replication(api: &Path) -> serde_json::Value {
    ctl_json(api, "replication")
}

/// `vmr ctl --api SOCKET ACTION`, which must succeed, its JSON answer parsed.
pub fn ctl_json(api: &Path, action: &str) -> serde_json::Value {
    let out = vmr(&["ctl", "--api", api.to_str().unwrap(), action]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `vmr ctl replication` (60 s at most) until `f` holds; that status.
pub fn wait_replication(api: &Path, f: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_for_socket(api);
    let t0 = Instant::now();
    loop {
        let status = replication(api);
        if f(&status) {
            return status;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "not reached within 60 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn writer_args(kernel: &Path) -> Vec<String> {
    ["run", "--kernel", &kernel.display().to_string()]
        .into_iter()
        .chain(["--mem", "64", "--allow-pvm"])
        .map(String::from)
        .collect()
}
