//! The benchmarked guest and the two monitors that run it: the same kernel, initramfs, memory,
//! vCPUs and kernel arguments for vmr and for QEMU's microvm machine, and the guest's heartbeat
//! (`vmr-dirty`, in the initramfs) read from their consoles.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::lab;

/// Extra kernel arguments for both monitors: each console byte is a VM exit, so a verbose boot
/// would measure the serial port rather than the monitor.
pub const QUIET: &str = "quiet";
/// The line `vmr-dirty` prints once its memory is allocated and touched.
pub const READY: &str = "VMR-DIRTY-READY";
/// The heartbeat line `vmr-dirty` prints every tick.
pub const TICK: &str = "VMR-TICK";
/// The heartbeat period the benchmarks ask `vmr-dirty` for.
pub const TICK_MS: u64 = 20;
/// How long a guest may take to boot to its workload.
pub const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// What both monitors boot.
pub struct Setup {
    /// The release `vmr` binary.
    pub vmr: PathBuf,
    /// The guest kernel: the uncompressed ELF `vmlinux`, which both monitors boot directly
    /// (vmr at its 64-bit entry, QEMU's microvm through the PVH note), as Firecracker does;
    /// no time goes to self-decompression, the same for both.
    pub kernel: String,
    /// The guest initramfs.
    pub initrd: String,
}

impl Setup {
    /// The images from the environment (`VMR_VMLINUX`, `VMR_INITRAMFS`, `VMR_BIN`, as the lab
    /// passes them) or built here.
    pub fn new() -> Result<Self, String> {
        let mut images: Option<HashMap<String, String>> = None;
        let mut get = |key: &str| -> Result<String, String> {
            if let Ok(v) = std::env::var(key) {
                return Ok(v);
            }
            if images.is_none() {
                images = Some(lab::images()?);
            }
            images
                .as_ref()
                .and_then(|m| m.get(key).cloned())
                .ok_or_else(|| format!("images/build gave no {key}"))
        };
        Ok(Self {
            kernel: get("VMR_VMLINUX")?,
            initrd: get("VMR_INITRAMFS")?,
            vmr: match std::env::var("VMR_BIN") {
                Ok(bin) => PathBuf::from(bin),
                Err(_) => lab::build_vmr()?,
            },
        })
    }

    /// `vmr ARGS...`.
    pub fn vmr(&self) -> Command {
        Command::new(&self.vmr)
    }

    /// `vmr run` of the guest with `vcpus`, `mem` MiB and the kernel arguments `extra` (after
    /// vmr's own).
    pub fn vmr_run(&self, vcpus: u8, mem: u64, extra: &str) -> Command {
        let mut c = self.vmr();
        c.args(["run", "--kernel", &self.kernel, "--initrd", &self.initrd])
            .args(["--vcpus", &vcpus.to_string(), "--mem", &mem.to_string()])
            .args(["--cmdline", extra]);
        c
    }

    /// QEMU's leanest microvm booting the same guest: no option ROMs, legacy timers, ACPI (the
    /// guest kernel has none); an i8042 like vmr's, for the same reset path. The kernel
    /// arguments are vmr's own followed by `extra`.
    pub fn qemu(&self, vcpus: u8, mem: u64, extra: &str) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off",
        ])
        .args(["-enable-kvm", "-cpu", "host", "-device", "i8042"])
        .args(["-smp", &vcpus.to_string(), "-m", &mem.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-kernel", &self.kernel, "-initrd", &self.initrd])
        .args([
            "-append",
            &format!("{} {extra}", vmm::builder::BASE_CMDLINE),
        ]);
        c
    }
}

/// Kernel arguments running `vmr-dirty MIB RATE TICK_MS` as the guest's workload.
pub fn dirty_cmdline(mib: u64, rate: u64, tick_ms: u64) -> String {
    let script = format!("exec vmr-dirty {mib} {rate} {tick_ms}\n");
    format!("{QUIET} vmr.run64={}", base64(script.as_bytes()))
}

pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What has come out of a monitor's console (or error output) so far.
#[derive(Default)]
struct Log {
    ready: Option<Instant>,
    /// The first line, whatever it was.
    first: Option<(Instant, String)>,
    ticks: Vec<Instant>,
    /// Lines (other than ticks) containing a marker asked for with [`Console::wait_line`].
    seen: Vec<(Instant, String)>,
    tail: VecDeque<String>,
    ended: bool,
}

/// A monitor's output, read on its own thread, every line timed on arrival.
#[derive(Clone)]
pub struct Console {
    log: Arc<(Mutex<Log>, Condvar)>,
}

impl Console {
    /// Reads `output` until it ends.
    pub fn attach(output: impl Read + Send + 'static) -> Self {
        let console = Self {
            log: Arc::default(),
        };
        let log = console.log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(output);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).unwrap_or(0);
                let now = Instant::now();
                let (lock, cond) = &*log;
                let mut log = lock.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    log.ended = true;
                    cond.notify_all();
                    return;
                }
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                if log.first.is_none() {
                    log.first = Some((now, text.clone()));
                }
                // A heartbeat counts once its line is whole: a line the source left unfinished
                // as it stopped is only read when its output ends, long after.
                if text.contains(TICK) && line.ends_with(b"\n") {
                    log.ticks.push(now);
                } else {
                    if text.contains(READY) && log.ready.is_none() {
                        log.ready = Some(now);
                    }
                    log.seen.push((now, text.clone()));
                    if log.tail.len() == 20 {
                        log.tail.pop_front();
                    }
                    log.tail.push_back(text);
                }
                cond.notify_all();
            }
        });
        console
    }

    /// Waits until `done` holds for the log, at most `timeout`.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Log) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.log;
        let mut log = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = done(&log) {
                return Ok(v);
            }
            let now = Instant::now();
            if log.ended || now >= deadline {
                let why = if log.ended {
                    "output ended"
                } else {
                    "timed out"
                };
                let tail: Vec<&str> = log.tail.iter().map(String::as_str).collect();
                return Err(format!(
                    "{why} waiting for {what}; last lines: {}",
                    tail.join(" | ")
                ));
            }
            log = cond
                .wait_timeout(log, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the workload's ready line.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Instant, String> {
        self.wait(READY, timeout, |log| log.ready)
    }

    /// Waits for a line containing `marker`.
    pub fn wait_line(&self, marker: &str, timeout: Duration) -> Result<Instant, String> {
        self.wait(marker, timeout, |log| {
            log.seen
                .iter()
                .find(|(_, line)| line.contains(marker))
                .map(|(t, _)| *t)
        })
    }

    /// Waits until `n` heartbeats arrived after `after`; returns when the first of them did.
    pub fn wait_ticks_after(
        &self,
        after: Instant,
        n: usize,
        timeout: Duration,
    ) -> Result<Instant, String> {
        self.wait(&format!("{n} heartbeats"), timeout, |log| {
            let later: Vec<&Instant> = log.ticks.iter().filter(|t| **t > after).collect();
            (later.len() >= n).then(|| *later[0])
        })
    }

    /// When the first line arrived, if it finished a heartbeat another console began: a
    /// migration that stopped the guest in the middle of a heartbeat line has the destination
    /// print the rest of it (this console's first line is then a tail of the heartbeat).
    pub fn finished_heartbeat(&self) -> Option<Instant> {
        let log = self.log.0.lock().unwrap_or_else(|e| e.into_inner());
        let (at, text) = log.first.as_ref()?;
        (text.len() < TICK.len() && TICK.ends_with(text.as_str())).then_some(*at)
    }

    /// The last lines other than heartbeats.
    pub fn tail(&self) -> Vec<String> {
        let log = self.log.0.lock().unwrap_or_else(|e| e.into_inner());
        log.tail.iter().cloned().collect()
    }

    /// When every heartbeat so far arrived.
    pub fn ticks(&self) -> Vec<Instant> {
        let log = self.log.0.lock().unwrap_or_else(|e| e.into_inner());
        log.ticks.clone()
    }
}

/// The longest time between two consecutive heartbeats in `ticks` (merged from every console
/// the guest had) between `from` and `to`.
pub fn longest_gap(ticks: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut window: Vec<Instant> = ticks
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    window.sort();
    window
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// A monitor process, killed when dropped.
pub struct Monitor {
    pub name: String,
    pub child: Child,
    /// Its standard output: the guest's console.
    pub console: Console,
    /// Its error output.
    pub errors: Console,
}

impl Monitor {
    /// Starts `cmd` with its output read by [`Console`]s.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let console = Console::attach(child.stdout.take().expect("piped stdout"));
        let errors = Console::attach(child.stderr.take().expect("piped stderr"));
        Ok(Self {
            name: name.to_string(),
            child,
            console,
            errors,
        })
    }

    /// Prints the last lines of its error output (its log) on stderr.
    pub fn print_log(&self) {
        for line in self.errors.tail() {
            eprintln!("    {}: {line}", self.name);
        }
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().map_err(|e| e.to_string())?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("{} did not exit within {timeout:?}", self.name))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        super::proc::kill(&mut self.child);
    }
}

/// A scratch directory in memory (both monitors write their snapshots and sockets there),
/// removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Result<Self, String> {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vmr-bench-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_like_the_guest_decoder_expects() {
        assert_eq!(base64(b"exec x\n"), "ZXhlYyB4Cg==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
    }

    #[test]
    fn longest_gap_looks_only_inside_the_window() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let ticks = [at(0), at(20), at(40), at(300), at(320), at(1000)];
        assert_eq!(
            longest_gap(&ticks, at(10), at(400)),
            Duration::from_millis(260)
        );
        assert_eq!(
            longest_gap(&ticks, at(0), at(45)),
            Duration::from_millis(20)
        );
    }
}
