//! `vmr standby` and `vmr run --protect` on this host's `/dev/kvm`, with the epoch writer
//! guest (`vmm/tests/guests/epoch_writer.S`, writing records continuously): the standby
//! commits the primary's epochs; a primary without the key, or whose standby nobody serves,
//! is refused in one line; the standby goes on after a refused connection.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_refused, scratch, tiny_elf, vmr, Vmr};

/// A key file of 32 bytes of `byte`.
fn key_file(name: &str, byte: u8) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, [byte; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A TCP port free now on loopback.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `vmr standby` running in the background, its log in a file.
struct StandbyProc {
    child: Child,
    log: PathBuf,
    addr: String,
}

impl StandbyProc {
    fn spawn(name: &str, key: &Path, extra: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = scratch(&format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_vmr"))
            .args(["standby", "--listen", &addr, "--key-file"])
            .arg(key)
            .args(extra)
            .env("VMR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Self { child, log, addr };
        s.wait_log("listening", |l| l.contains("standing by for a primary"));
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (60 s at most) until a line of the log satisfies `f`; that line.
    fn wait_log(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
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

/// The `epoch=N` of a log line.
fn epoch_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("epoch="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn writer_args(kernel: &Path) -> Vec<String> {
    ["run", "--kernel", &kernel.display().to_string()]
        .into_iter()
        .chain(["--mem", "64", "--allow-pvm"])
        .map(String::from)
        .collect()
}

#[test]
fn a_standby_refuses_a_primary_without_the_key_then_commits_a_protected_vms_epochs() {
    let key = key_file("repl.key", 7);
    let wrong = key_file("wrong.key", 8);
    let standby = StandbyProc::spawn("standby", &key, &[]);
    let kernel = tiny_elf("epoch_writer");
    let mut args = writer_args(&kernel);

    // Without the key: refused in one line on both sides, the standby goes on.
    let mut bad = args.clone();
    bad.extend(["--serial", "none", "--protect", &standby.addr, "--key-file"].map(String::from));
    bad.push(wrong.display().to_string());
    let out = vmr(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "replication key");
    let refused = standby.wait_log("refusal", |l| l.contains("refused a connection"));
    assert!(refused.contains("WARN"), "{refused}");
    assert_eq!(standby.log().matches("refused a connection").count(), 1);

    // With the key: the VM runs protected, the standby commits its epochs.
    args.extend(["--protect", &standby.addr, "--key-file"].map(String::from));
    args.push(key.display().to_string());
    let mut primary = Vmr::spawn(
        "protected",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    standby.wait_log("initial synchronisation", |l| {
        l.contains("initial synchronisation received")
    });
    let line = standby.wait_log("5 epochs committed", |l| {
        l.contains("epochs committed") && epoch_of(l) >= 5
    });
    assert!(epoch_of(&line) >= 5, "{line}");
    assert!(
        primary.child.try_wait().unwrap().is_none(),
        "the primary ended: {}",
        primary.log()
    );
    // The primary is lost: the standby keeps its committed state and says so.
    primary.kill();
    let end = standby.wait_log("the end of the link", |l| {
        l.contains("the primary's link ended")
    });
    assert!(end.contains("kept for failover"), "{end}");
    let kept = end
        .split_whitespace()
        .find_map(|w| w.strip_prefix("committed_epoch="))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(kept >= Some(epoch_of(&line)), "{end}");
}

#[test]
fn protecting_with_an_unreachable_standby_or_without_a_key_is_refused_in_one_line() {
    let key = key_file("unreachable.key", 3);
    let kernel = tiny_elf("epoch_writer");
    let mut args = writer_args(&kernel);
    args.extend(["--serial", "none"].map(String::from));
    let nobody = format!("127.0.0.1:{}", free_port());
    let mut unreachable = args.clone();
    unreachable.extend(["--protect", &nobody, "--key-file"].map(String::from));
    unreachable.push(key.display().to_string());
    let out = vmr(&unreachable.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, &format!("cannot connect to standby {nobody}"));

    let mut keyless = args.clone();
    keyless.extend(["--protect", &nobody].map(String::from));
    let out = vmr(&keyless.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "--key-file");
}

#[test]
fn a_standby_that_cannot_hold_the_vm_refuses_it_on_both_sides() {
    let key = key_file("misfit.key", 4);
    let disk = scratch("misfit.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // The standby has a disk, the VM none.
    let standby = StandbyProc::spawn("misfit", &key, &["--disk", disk.to_str().unwrap()]);
    let kernel = tiny_elf("epoch_writer");
    let mut args = writer_args(&kernel);
    args.extend(["--serial", "none", "--protect", &standby.addr, "--key-file"].map(String::from));
    args.push(key.display().to_string());
    let out = vmr(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_refused(&out, "device lists differ");
    let line = standby.wait_log("refusal", |l| l.contains("refused to pair"));
    assert!(line.contains("device lists differ"), "{line}");
}
