//! `cargo xtask bench protect`: what protection costs a networked guest. The same redis guest
//! (the lab's `tests/lab/redis.sh` guest: 2 vCPUs, 256 MiB, redis started by `vmr.run64`) is
//! driven by `redis-benchmark` from the host side of its TAP, in a network namespace of its
//! own, with the same `-n`, `-c` and `-t set,get` for every configuration, in one lab run:
//!
//! 1. `vmr run`, unprotected;
//! 2. `vmr run --protect` with one `vmr standby` on the same host (loopback, a key file), at
//!    vmr's default epoch period (`--epoch-ms` to choose one): every reply leaves the primary
//!    only once the standby acknowledged the epoch that produced it;
//! 3. QEMU (Debian's, microvm), unprotected, the baseline of 4;
//! 4. QEMU COLO (`x-colo` migration to a secondary QEMU on the same host, `colo-compare`,
//!    `filter-mirror`, `filter-redirector`, `filter-rewriter`, as QEMU's docs/COLO-FT.txt sets
//!    it up; the guest has no disk, so no block replication).
//!
//! Each configuration has a short warm-up run first (the emulated lab translates code the
//! first time it runs). Throughput is over both tests (SET and GET: the same number of
//! requests each, so the harmonic mean of their rates), latencies the mean of the two tests'
//! p50 and p99 as `redis-benchmark --csv` prints them. A configuration that cannot be run is
//! reported with the step, the command and the monitor's error, and the others go on.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use super::guest::{base64, Monitor, Scratch, Setup};
use super::proc;
use super::qmp::{qmp_arg, Qmp};
use crate::lab;

const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.2";
/// The guest's MAC, the same for every monitor (and for COLO's two copies).
const GUEST_MAC: &str = "06:00:0a:00:02:02";
/// Where the standby listens, inside the namespace.
const STANDBY_ADDR: &str = "127.0.0.1:7171";
/// How long a guest may take from its start to redis answering (boot under emulation, a
/// protected VM's initial synchronisation).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Args, Clone)]
pub struct ProtectArgs {
    /// Requests per test (`redis-benchmark -n`, the same for every configuration); 0: chosen
    /// from the unprotected guest's warm-up so that its measurement lasts about --target-secs.
    #[arg(long, default_value_t = 0)]
    requests: u64,
    /// The length of one measurement (SET and GET) of the unprotected guest, when
    /// --requests is 0.
    #[arg(long, default_value_t = 30)]
    target_secs: u64,
    /// Requests of each warm-up test.
    #[arg(long, default_value_t = 500)]
    warmup_requests: u64,
    /// A configuration whose measurement would take longer than this (at its warm-up's rate)
    /// runs fewer requests, recorded in its results.
    #[arg(long, default_value_t = 240)]
    max_secs: u64,
    /// Parallel connections (`redis-benchmark -c`).
    #[arg(long, default_value_t = 10)]
    clients: u32,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// vmr's epoch period in ms (`--epoch-ms`) [default: vmr's own].
    #[arg(long)]
    epoch_ms: Option<u64>,
    /// Leave out QEMU and QEMU COLO.
    #[arg(long)]
    no_qemu: bool,
    /// COLO's periodic checkpoint (`x-checkpoint-delay`) in ms [default: QEMU's own].
    #[arg(long)]
    colo_checkpoint_ms: Option<u64>,
    /// Print the monitors' logs.
    #[arg(long)]
    verbose: bool,
    /// Directory for the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure here (set when re-run inside the lab).
    #[arg(long, hide = true)]
    inside: bool,
}

impl ProtectArgs {
    fn as_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--requests={}", self.requests),
            format!("--target-secs={}", self.target_secs),
            format!("--warmup-requests={}", self.warmup_requests),
            format!("--max-secs={}", self.max_secs),
            format!("--clients={}", self.clients),
            format!("--vcpus={}", self.vcpus),
            format!("--mem={}", self.mem),
        ];
        a.extend(self.epoch_ms.map(|ms| format!("--epoch-ms={ms}")));
        a.extend(
            self.colo_checkpoint_ms
                .map(|ms| format!("--colo-checkpoint-ms={ms}")),
        );
        a.extend(self.no_qemu.then(|| "--no-qemu".to_string()));
        a.extend(self.verbose.then(|| "--verbose".to_string()));
        a
    }
}

pub fn run(args: ProtectArgs) -> Result<(), String> {
    let out = super::out_dir(args.out.as_deref())?;
    if args.inside || lab::can_boot_linux_here() {
        return measure(&args, &out);
    }
    eprintln!("bench protect: this host cannot boot stock Linux guests; running in the lab");
    super::rerun_in_lab("protect", args.as_args(), &out)
}

/// One `redis-benchmark` test (one line of its `--csv` output).
#[derive(Debug, Clone, Serialize)]
struct TestResult {
    test: String,
    rps: f64,
    avg_ms: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// One configuration's measurement, or why there is none.
#[derive(Serialize)]
struct ConfigResult {
    /// `vmr`, `vmr-protected`, `qemu`, `qemu-colo`.
    name: &'static str,
    /// For the table.
    label: &'static str,
    /// Requests per second over both tests (their harmonic mean: the same `-n` each).
    rps: Option<f64>,
    /// The mean of the tests' p50 and p99, in ms.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    tests: Vec<TestResult>,
    /// Requests per test: the run's `-n`, or fewer if this configuration is too slow for it
    /// (`--max-secs`).
    requests: Option<u64>,
    /// The measurement's wall time, in s.
    seconds: Option<f64>,
    /// The warm-up's requests per second.
    warmup_rps: Option<f64>,
    /// What failed: the step, the command and the monitor's error.
    error: Option<String>,
    /// The monitor's own view after the measurement: vmr's `GET /replication`, QEMU's
    /// `query-migrate` and `query-colo-status`.
    monitor_status: Option<Value>,
    /// Where the CPU went during the measurement.
    cpu: Option<CpuUse>,
}

/// Where the CPU went during a measurement, in CPU seconds per second of it (1.0: one CPU
/// busy all along).
#[derive(Serialize)]
struct CpuUse {
    /// The host's CPUs (the lab's, inside the lab).
    cpus: usize,
    /// Busy, all of them together.
    busy: f64,
    /// Per thread of the monitors (`PROCESS/THREAD`, threads of one name summed), the
    /// busiest first; the rest of `busy` is everything else (the client, the kernel).
    threads: Vec<(String, f64)>,
}

/// CPU times at the start of a measurement, for [`CpuUse`].
struct CpuProbe {
    procs: Vec<(&'static str, u32)>,
    at: Instant,
    system: (f64, f64),
    threads: Vec<BTreeMap<String, f64>>,
}

impl CpuProbe {
    fn start(procs: &[(&'static str, u32)]) -> Self {
        Self {
            procs: procs.to_vec(),
            at: Instant::now(),
            system: proc::system_cpu_secs(),
            threads: procs
                .iter()
                .map(|&(_, pid)| proc::thread_cpu_secs(pid))
                .collect(),
        }
    }

    fn finish(self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let (busy, _) = proc::system_cpu_secs();
        let mut threads = Vec::new();
        for ((label, pid), before) in self.procs.iter().zip(&self.threads) {
            for (name, secs) in proc::thread_cpu_secs(*pid) {
                let used = secs - before.get(&name).copied().unwrap_or(0.0);
                if used > 0.0 {
                    threads.push((format!("{label}/{name}"), used / wall));
                }
            }
        }
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        CpuUse {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy: (busy - self.system.0) / wall,
            threads,
        }
    }
}

impl ConfigResult {
    fn new(name: &'static str, label: &'static str) -> Self {
        Self {
            name,
            label,
            rps: None,
            p50_ms: None,
            p99_ms: None,
            tests: Vec::new(),
            requests: None,
            seconds: None,
            warmup_rps: None,
            error: None,
            monitor_status: None,
            cpu: None,
        }
    }
}

#[derive(Serialize)]
struct ProtectReport {
    vcpus: u8,
    mem_mib: u64,
    requests: u64,
    clients: u32,
    tests: &'static str,
    redis_benchmark: String,
    /// `--epoch-ms`, or null for vmr's default.
    epoch_ms: Option<u64>,
    colo_checkpoint_ms: Option<u64>,
    kernel: String,
    initrd: String,
    configs: Vec<ConfigResult>,
    /// vmr protected over vmr unprotected, throughput.
    tput_ratio: Option<f64>,
    /// vmr protected less vmr unprotected, in ms.
    p50_added_ms: Option<f64>,
    p99_added_ms: Option<f64>,
    /// QEMU COLO over QEMU unprotected (the same monitor), throughput; null when COLO did
    /// not run.
    colo_tput_ratio: Option<f64>,
    /// QEMU COLO over vmr unprotected, throughput.
    colo_vs_vmr_tput_ratio: Option<f64>,
    colo_p50_added_ms: Option<f64>,
    colo_p99_added_ms: Option<f64>,
}

/// A network namespace with `tap0` (the host's side of the guest, `HOST_IP`) and `tap1` (no
/// address: COLO's secondary, whose output only colo-compare sees); deleted when dropped,
/// with whatever still runs in it.
struct Netns {
    name: String,
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, String> {
    sh(Command::new("ip").args(args))
}

impl Netns {
    fn new() -> Result<Self, String> {
        let _ = Command::new("modprobe").arg("tun").status();
        let name = format!("vmr-bench-protect-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        for tap in ["tap0", "tap1"] {
            ip(&[
                "-n", n, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
            ])?;
            ip(&["-n", n, "link", "set", tap, "up"])?;
        }
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            "tap0",
        ])?;
        Ok(ns)
    }

    /// `program ARGS...` inside the namespace.
    fn cmd(&self, program: impl Into<OsString>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program.into());
        c
    }

    /// `cmd` (program, arguments, environment) inside the namespace.
    fn wrap(&self, cmd: &Command) -> Command {
        let mut c = self.cmd(cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c
    }

    /// How many commands redis in the guest served so far (`INFO stats`); `None` if it did not
    /// answer within 5 s.
    fn redis_served(&self) -> Option<u64> {
        let out = self
            .cmd("timeout")
            .args(["5", "redis-cli", "-h", GUEST_IP, "info", "stats"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Whether redis in the guest answers PING now.
    fn redis_ping(&self) -> bool {
        self.cmd("timeout")
            .args(["30", "redis-cli", "-h", GUEST_IP, "ping"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = ip(&["netns", "pids", &self.name]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The guest's kernel arguments (after the monitor's own): redis as `tests/lab/redis.sh`
/// starts it, and the lab's guest arguments.
fn redis_cmdline() -> String {
    let script = "redis-server --protected-mode no --save \"\" --appendonly no\n";
    let lab_args = std::env::var("VMR_LAB_GUEST_ARGS").unwrap_or_default();
    format!(
        "quiet vmr.ip={GUEST_IP}/24 vmr.run64={} {lab_args}",
        base64(script.as_bytes())
    )
    .trim_end()
    .to_string()
}

/// `vmr run` of the redis guest on `tap0`, inside `ns`.
fn vmr_run(setup: &Setup, ns: &Netns, args: &ProtectArgs) -> Command {
    let mut c = ns.wrap(&setup.vmr_run(args.vcpus, args.mem, &redis_cmdline()));
    c.args(["--net", &format!("tap=tap0,mac={GUEST_MAC}")]);
    c
}

/// Waits until the guest's network is up and redis answers, while `monitors` run.
fn wait_redis(ns: &Netns, monitors: &mut [&mut Monitor], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if ns.redis_ping() {
            return Ok(());
        }
        for m in monitors.iter_mut() {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before redis answered: {}",
                    m.name,
                    last_lines(m)
                ));
            }
        }
        if Instant::now() >= deadline {
            let lines: Vec<String> = monitors.iter().map(|m| last_lines(m)).collect();
            return Err(format!(
                "redis did not answer PING within {timeout:?}: {}",
                lines.join(" / ")
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A monitor's last lines of console and of error output, in one line.
fn last_lines(m: &Monitor) -> String {
    let tail = |lines: Vec<String>| {
        let n = lines.len();
        lines[n.saturating_sub(6)..].join(" | ")
    };
    format!(
        "{} console: [{}] stderr: [{}]",
        m.name,
        tail(m.console.tail()),
        tail(m.errors.tail())
    )
}

/// How long redis may serve no request while `redis-benchmark` runs before the measurement is
/// taken for stuck and ended (the guest or the lab stopped: 6 of 13 runs of this benchmark
/// once waited for their whole timeout). Chosen from the slowest configurations measured
/// (COLO: 45 requests/s, each answered within 2 s): no live run goes 30 s without one.
const STUCK_SECS: u64 = 30;
/// How often the watchdog asks redis how many commands it served.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Runs `redis-benchmark --csv` with `n` requests per test; its tests. A watchdog ends it
/// (an error saying so) when redis served no command for [`STUCK_SECS`].
fn redis_benchmark(
    ns: &Netns,
    n: u64,
    clients: u32,
    timeout_secs: u64,
) -> Result<(Vec<TestResult>, f64), String> {
    let mut cmd = ns.cmd("timeout");
    cmd.arg(timeout_secs.to_string())
        .args(["redis-benchmark", "-h", GUEST_IP])
        .args(["-n", &n.to_string(), "-c", &clients.to_string()])
        .args(["-t", "set,get", "--csv"]);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("redis-benchmark: {e}"))?;
    let (mut served, mut moved_at, mut asked_at) =
        (ns.redis_served(), Instant::now(), Instant::now());
    while child
        .try_wait()
        .map_err(|e| format!("redis-benchmark: {e}"))?
        .is_none()
    {
        std::thread::sleep(Duration::from_millis(200));
        if asked_at.elapsed() < WATCH_EVERY {
            continue;
        }
        asked_at = Instant::now();
        // Each INFO is a command served: progress is more than the watchdog's own.
        let now = ns.redis_served();
        if now.is_some_and(|c| served.is_none_or(|s| c > s + 1)) {
            (served, moved_at) = (now, Instant::now());
        } else if moved_at.elapsed().as_secs() >= STUCK_SECS {
            // `ip netns exec` became `timeout`, which passes a TERM on to redis-benchmark.
            // SAFETY: kill(2) on our own child's pid, not yet reaped (try_wait saw it run).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
            return Err(format!(
                "stuck: redis served no command for {STUCK_SECS} s (the watchdog ended \
                 redis-benchmark after {:.0} s)",
                start.elapsed().as_secs_f64()
            ));
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("redis-benchmark: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stdout.to_lowercase().contains("error") {
        return Err(format!(
            "redis-benchmark -n {n} -c {clients} ({}): {} {}",
            out.status,
            stdout.trim(),
            stderr.trim()
        ));
    }
    let tests = parse_csv(&stdout)?;
    Ok((tests, secs))
}

/// The tests of `redis-benchmark --csv` output (redis 7: a header line naming the columns,
/// then one quoted line per test).
fn parse_csv(text: &str) -> Result<Vec<TestResult>, String> {
    let split = |l: &str| -> Vec<String> {
        l.split(',')
            .map(|f| f.trim().trim_matches('"').to_string())
            .collect()
    };
    let mut lines = text.lines().map(str::trim).filter(|l| l.starts_with('"'));
    let header = split(lines.next().ok_or("redis-benchmark printed no CSV")?);
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("redis-benchmark's CSV has no {name} column: {header:?}"))
    };
    let (rps, avg, p50, p95, p99, max) = (
        col("rps")?,
        col("avg_latency_ms")?,
        col("p50_latency_ms")?,
        col("p95_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    );
    let mut tests = Vec::new();
    for line in lines {
        let f = split(line);
        let num = |i: usize| -> Result<f64, String> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("bad redis-benchmark line: {line}"))
        };
        tests.push(TestResult {
            test: f[0].clone(),
            rps: num(rps)?,
            avg_ms: num(avg)?,
            p50_ms: num(p50)?,
            p95_ms: num(p95)?,
            p99_ms: num(p99)?,
            max_ms: num(max)?,
        });
    }
    if tests.is_empty() {
        return Err(format!("redis-benchmark printed no test: {text}"));
    }
    Ok(tests)
}

/// Requests per second over `tests` that each ran the same number of requests.
fn combined_rps(tests: &[TestResult]) -> f64 {
    tests.len() as f64 / tests.iter().map(|t| 1.0 / t.rps).sum::<f64>()
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

/// Warms the guest up, then measures it: fills `r`, with the CPU time of the monitors'
/// processes `procs` (label, pid). With `n` 0 the warm-up's rate picks it (so that the
/// measurement lasts `target_secs`).
fn warm_and_measure(
    ns: &Netns,
    args: &ProtectArgs,
    n: &mut u64,
    r: &mut ConfigResult,
    procs: &[(&'static str, u32)],
) -> Result<(), String> {
    let (warm, _) = redis_benchmark(ns, args.warmup_requests, args.clients, args.max_secs)
        .map_err(|e| format!("warm-up: {e}"))?;
    let warm_rps = combined_rps(&warm);
    r.warmup_rps = Some(warm_rps);
    if *n == 0 {
        let per_test = warm_rps * args.target_secs as f64 / 2.0;
        *n = ((per_test / 1000.0).round() as u64 * 1000).clamp(1000, 1_000_000);
        eprintln!(
            "  warm-up: {warm_rps:.0} requests/s: {} requests per test from now on",
            *n
        );
    } else {
        eprintln!("  warm-up: {warm_rps:.0} requests/s");
    }
    // A configuration so slow that the common -n would take longer than --max-secs runs
    // fewer requests, and says so.
    let mut requests = *n;
    let predicted_secs = 2.0 * requests as f64 / warm_rps;
    if predicted_secs > args.max_secs as f64 {
        requests = ((warm_rps * args.max_secs as f64 / 2.0) as u64).max(args.warmup_requests);
        eprintln!(
            "  {}: -n {} would take about {predicted_secs:.0} s at the warm-up's rate:              -n {requests} instead",
            r.label, *n
        );
    }
    r.requests = Some(requests);
    let probe = CpuProbe::start(procs);
    let (tests, secs) = redis_benchmark(ns, requests, args.clients, args.max_secs + 120)?;
    r.cpu = Some(probe.finish());
    r.rps = Some(combined_rps(&tests));
    r.p50_ms = Some(mean(tests.iter().map(|t| t.p50_ms)));
    r.p99_ms = Some(mean(tests.iter().map(|t| t.p99_ms)));
    r.seconds = Some(secs);
    eprintln!(
        "  {}: {:.0} requests/s, p50 {:.3} ms, p99 {:.3} ms ({secs:.1} s)",
        r.label,
        r.rps.unwrap_or(0.0),
        r.p50_ms.unwrap_or(0.0),
        r.p99_ms.unwrap_or(0.0)
    );
    r.tests = tests;
    Ok(())
}

/// The unprotected vmr guest.
fn run_vmr(setup: &Setup, ns: &Netns, args: &ProtectArgs, n: &mut u64) -> ConfigResult {
    let mut r = ConfigResult::new("vmr", "vmr");
    let attempt = (|| {
        let mut cmd = vmr_run(setup, ns, args);
        let shown = format!("{cmd:?}");
        let mut vm = Monitor::spawn("vmr run", &mut cmd).map_err(|e| format!("{shown}: {e}"))?;
        wait_redis(ns, &mut [&mut vm], READY_TIMEOUT).map_err(|e| format!("{shown}: {e}"))?;
        let res = warm_and_measure(ns, args, n, &mut r, &[("vmr", vm.child.id())]);
        if args.verbose {
            vm.print_log();
        }
        res
    })();
    r.error = attempt.err();
    r
}

/// A 32-byte random key file, readable by its owner only.
fn key_file(scratch: &Scratch) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let path = scratch.path("replication.key");
    std::fs::write(&path, key).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// `vmr ctl --api SOCKET replication`, parsed.
fn replication_status(setup: &Setup, socket: &Path) -> Result<Value, String> {
    let out = sh(Command::new("timeout")
        .arg("30")
        .arg(&setup.vmr)
        .arg("ctl")
        .arg("--api")
        .arg(socket)
        .arg("replication"))?;
    serde_json::from_str(&out).map_err(|e| format!("vmr ctl replication: {e}: {out}"))
}

/// The vmr guest protected by a standby on the same host.
fn run_vmr_protected(
    setup: &Setup,
    ns: &Netns,
    args: &ProtectArgs,
    scratch: &Scratch,
    n: &mut u64,
) -> ConfigResult {
    let mut r = ConfigResult::new("vmr-protected", "vmr protected");
    let attempt = (|| {
        let key = key_file(scratch)?;
        let standby_api = scratch.path("standby.sock");
        let mut cmd = ns.cmd(setup.vmr.clone());
        // The standby holds a TAP for the VM's network device (tap1: nothing uses it until a
        // failover, which this benchmark has none of).
        cmd.args(["standby", "--listen", STANDBY_ADDR, "--key-file"])
            .arg(&key)
            .args(["--net", &format!("tap=tap1,mac={GUEST_MAC}")])
            .arg("--api")
            .arg(&standby_api)
            .env("VMR_LOG", "info");
        let shown = format!("{cmd:?}");
        let mut standby =
            Monitor::spawn("vmr standby", &mut cmd).map_err(|e| format!("{shown}: {e}"))?;
        standby
            .errors
            .wait_line("standing by", Duration::from_secs(60))
            .map_err(|e| format!("{shown}: {e}"))?;

        let api = scratch.path("primary.sock");
        let mut cmd = vmr_run(setup, ns, args);
        cmd.arg("--api")
            .arg(&api)
            .args(["--protect", STANDBY_ADDR, "--key-file"])
            .arg(&key)
            .env("VMR_LOG", "info");
        if let Some(ms) = args.epoch_ms {
            cmd.args(["--epoch-ms", &ms.to_string()]);
        }
        let shown = format!("{cmd:?}");
        let mut vm =
            Monitor::spawn("vmr run --protect", &mut cmd).map_err(|e| format!("{shown}: {e}"))?;
        wait_redis(ns, &mut [&mut vm, &mut standby], READY_TIMEOUT)
            .map_err(|e| format!("{shown}: {e}"))?;
        // Protected: the standby holds a committed epoch.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status = replication_status(setup, &api);
            match &status {
                Ok(s) if s["protected"] == true => break,
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "{shown}: not protected within {READY_TIMEOUT:?}: {status:?}; {}",
                        last_lines(&vm)
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        let procs = [("primary", vm.child.id()), ("standby", standby.child.id())];
        let res = warm_and_measure(ns, args, n, &mut r, &procs);
        let status = replication_status(setup, &api);
        if let Ok(s) = &status {
            if s["protected"] != true {
                return Err(format!(
                    "the VM was no longer protected after the measurement: {s}; {}",
                    last_lines(&vm)
                ));
            }
        }
        r.monitor_status = status.ok();
        if args.verbose {
            vm.print_log();
            standby.print_log();
        }
        res
    })();
    r.error = attempt.err();
    r
}

/// QEMU's network for the guest: its TAP, no vhost and no vnet header (COLO's filters would
/// need `vnet_hdr_support` otherwise), the same MAC as vmr's guest.
fn qemu_net(tap: &str) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!("tap,id=hn0,ifname={tap},script=no,downscript=no,vhost=off,vnet_hdr=off"),
        "-device".into(),
        format!("virtio-net-device,netdev=hn0,mac={GUEST_MAC}"),
    ]
}

/// QEMU unprotected: COLO's baseline.
fn run_qemu(setup: &Setup, ns: &Netns, args: &ProtectArgs, n: &mut u64) -> ConfigResult {
    let mut r = ConfigResult::new("qemu", "QEMU");
    let attempt = (|| {
        let mut cmd = ns.wrap(&setup.qemu(args.vcpus, args.mem, &redis_cmdline()));
        cmd.args(qemu_net("tap0"));
        let shown = format!("{cmd:?}");
        let mut vm = Monitor::spawn("qemu", &mut cmd).map_err(|e| format!("{shown}: {e}"))?;
        wait_redis(ns, &mut [&mut vm], READY_TIMEOUT).map_err(|e| format!("{shown}: {e}"))?;
        warm_and_measure(ns, args, n, &mut r, &[("qemu", vm.child.id())])
    })();
    r.error = attempt.err();
    r
}

/// A COLO step's failure: what was done, the command, and what QEMU said.
fn colo_step(step: &str, command: &str, e: String) -> String {
    format!("COLO {step}: `{command}`: {e}")
}

/// QEMU COLO: a primary and a secondary QEMU on this host, set up as docs/COLO-FT.txt does
/// (without its disk: the guest runs from its initramfs).
fn run_colo(
    setup: &Setup,
    ns: &Netns,
    args: &ProtectArgs,
    scratch: &Scratch,
    n: &mut u64,
) -> ConfigResult {
    let mut r = ConfigResult::new("qemu-colo", "QEMU COLO");
    let mut status = serde_json::Map::new();
    let attempt = (|| {
        let cmdline = redis_cmdline();
        let primary_qmp = scratch.path("colo-primary.qmp");
        let secondary_qmp = scratch.path("colo-secondary.qmp");
        let mut primary_cmd = ns.wrap(&setup.qemu(args.vcpus, args.mem, &cmdline));
        primary_cmd
            .args(["-name", "primary", "-qmp", &qmp_arg(&primary_qmp)])
            .args(qemu_net("tap0"))
            .args([
                "-chardev",
                "socket,id=mirror0,host=127.0.0.1,port=9003,server=on,wait=off",
                "-chardev",
                "socket,id=compare1,host=127.0.0.1,port=9004,server=on,wait=on",
                "-chardev",
                "socket,id=compare0,host=127.0.0.1,port=9001,server=on,wait=off",
                "-chardev",
                "socket,id=compare0-0,host=127.0.0.1,port=9001",
                "-chardev",
                "socket,id=compare_out,host=127.0.0.1,port=9005,server=on,wait=off",
                "-chardev",
                "socket,id=compare_out0,host=127.0.0.1,port=9005",
                "-object",
                "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
                "-object",
                "filter-redirector,netdev=hn0,id=redire0,queue=rx,indev=compare_out",
                "-object",
                "filter-redirector,netdev=hn0,id=redire1,queue=rx,outdev=compare0",
                "-object",
                "iothread,id=iothread1",
                "-object",
                "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,\
                 outdev=compare_out0,iothread=iothread1",
            ]);
        let primary_shown = format!("{primary_cmd:?}");
        let mut secondary_cmd = ns.wrap(&setup.qemu(args.vcpus, args.mem, &cmdline));
        secondary_cmd
            .args(["-name", "secondary", "-qmp", &qmp_arg(&secondary_qmp)])
            .args(qemu_net("tap1"))
            .args([
                "-chardev",
                "socket,id=red0,host=127.0.0.1,port=9003,reconnect=1",
                "-chardev",
                "socket,id=red1,host=127.0.0.1,port=9004,reconnect=1",
                "-object",
                "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0",
                "-object",
                "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1",
                "-object",
                "filter-rewriter,id=rew0,netdev=hn0,queue=all",
                "-incoming",
                "tcp:127.0.0.1:9998",
            ]);
        let secondary_shown = format!("{secondary_cmd:?}");

        // The primary waits for the secondary's connection to compare1 before it starts.
        let mut primary = Monitor::spawn("qemu colo primary", &mut primary_cmd)
            .map_err(|e| colo_step("starting the primary", &primary_shown, e))?;
        std::thread::sleep(Duration::from_secs(1));
        let mut secondary = Monitor::spawn("qemu colo secondary", &mut secondary_cmd)
            .map_err(|e| colo_step("starting the secondary", &secondary_shown, e))?;
        let fail = |step: &str, shown: &str, e: String, p: &Monitor, s: &Monitor| {
            colo_step(
                step,
                shown,
                format!("{e}; {}; {}", last_lines(p), last_lines(s)),
            )
        };
        let mut sq = Qmp::connect(&secondary_qmp, Duration::from_secs(120)).map_err(|e| {
            fail(
                "QMP of the secondary",
                &secondary_shown,
                e,
                &primary,
                &secondary,
            )
        })?;
        let colo_cap = json!({ "capabilities": [ { "capability": "x-colo", "state": true } ] });
        sq.execute("migrate-set-capabilities", colo_cap.clone())
            .map_err(|e| {
                fail(
                    "migrate-set-capabilities x-colo on the secondary",
                    &secondary_shown,
                    e,
                    &primary,
                    &secondary,
                )
            })?;
        let mut pq = Qmp::connect(&primary_qmp, Duration::from_secs(120)).map_err(|e| {
            fail(
                "QMP of the primary",
                &primary_shown,
                e,
                &primary,
                &secondary,
            )
        })?;
        // colo-compare holds the primary's every packet until the secondary's matching one
        // comes, or a checkpoint releases it: redis cannot answer before COLO runs. Its
        // console says when it is up.
        primary
            .console
            .wait_line("Ready to accept connections", READY_TIMEOUT)
            .map_err(|e| {
                fail(
                    "booting the primary",
                    &primary_shown,
                    e,
                    &primary,
                    &secondary,
                )
            })?;
        pq.execute("migrate-set-capabilities", colo_cap)
            .map_err(|e| {
                fail(
                    "migrate-set-capabilities x-colo on the primary",
                    &primary_shown,
                    e,
                    &primary,
                    &secondary,
                )
            })?;
        let mut params = json!({ "max-bandwidth": 1u64 << 40 });
        if let Some(ms) = args.colo_checkpoint_ms {
            params["x-checkpoint-delay"] = json!(ms);
        }
        pq.execute("migrate-set-parameters", params).map_err(|e| {
            fail(
                "migrate-set-parameters",
                &primary_shown,
                e,
                &primary,
                &secondary,
            )
        })?;
        pq.execute("migrate", json!({ "uri": "tcp:127.0.0.1:9998" }))
            .map_err(|e| fail("migrate", &primary_shown, e, &primary, &secondary))?;
        // COLO runs once the first checkpoint is in: query-migrate says "colo".
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info = pq
                .execute("query-migrate", json!({}))
                .map_err(|e| fail("query-migrate", &primary_shown, e, &primary, &secondary))?;
            match info["status"].as_str() {
                Some("colo") => break,
                Some("failed") | Some("cancelled") | Some("completed") => {
                    return Err(fail(
                        "the migration into COLO",
                        &primary_shown,
                        format!("query-migrate: {info}"),
                        &primary,
                        &secondary,
                    ))
                }
                _ if Instant::now() >= deadline => {
                    return Err(fail(
                        "the migration into COLO",
                        &primary_shown,
                        format!("not in COLO within {READY_TIMEOUT:?}: {info}"),
                        &primary,
                        &secondary,
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        if let Ok(s) = pq.execute("query-colo-status", json!({})) {
            status.insert("colo_status_before".into(), s);
        }
        eprintln!("  COLO running (query-migrate: colo)");
        wait_redis(ns, &mut [&mut primary, &mut secondary], READY_TIMEOUT)
            .map_err(|e| colo_step("redis under COLO", &primary_shown, e))?;
        let procs = [
            ("primary", primary.child.id()),
            ("secondary", secondary.child.id()),
        ];
        let res = warm_and_measure(ns, args, n, &mut r, &procs).map_err(|e| {
            fail(
                "redis-benchmark under COLO",
                &primary_shown,
                e,
                &primary,
                &secondary,
            )
        });
        for (key, command) in [
            ("migrate", "query-migrate"),
            ("colo_status", "query-colo-status"),
        ] {
            if let Ok(v) = pq.execute(command, json!({})) {
                status.insert(key.into(), v);
            }
        }
        if let Some(Value::String(mode)) = status.get("colo_status").map(|s| s["mode"].clone()) {
            if res.is_ok() && mode != "primary" {
                return Err(fail(
                    "COLO after the measurement",
                    &primary_shown,
                    format!("the primary left COLO: {}", status["colo_status"]),
                    &primary,
                    &secondary,
                ));
            }
        }
        if args.verbose {
            primary.print_log();
            secondary.print_log();
        }
        res
    })();
    r.error = attempt.err();
    if !status.is_empty() {
        r.monitor_status = Some(Value::Object(status));
    }
    r
}

/// Runs one configuration in a fresh network namespace (nothing of the one before left over)
/// and records it.
fn one(
    name: &'static str,
    configs: &mut Vec<ConfigResult>,
    n: &mut u64,
    f: impl FnOnce(&Netns, &mut u64) -> ConfigResult,
) {
    eprintln!("bench protect: {name}");
    let r = match Netns::new() {
        Ok(ns) => f(&ns, n),
        Err(e) => {
            let mut r = ConfigResult::new("?", name);
            r.error = Some(format!("the network namespace: {e}"));
            r
        }
    };
    if let Some(e) = &r.error {
        eprintln!("  {name}: FAILED: {e}");
    }
    configs.push(r);
}

fn measure(args: &ProtectArgs, out: &Path) -> Result<(), String> {
    let setup = Setup::new()?;
    let scratch = Scratch::new("protect")?;
    let version = sh(Command::new("redis-benchmark").arg("--version"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|e| e);
    let mut n = args.requests;
    let mut configs = Vec::new();
    one("vmr, unprotected", &mut configs, &mut n, |ns, n| {
        run_vmr(&setup, ns, args, n)
    });
    if let Some(e) = &configs[0].error {
        return Err(format!("the unprotected guest could not be measured: {e}"));
    }
    one(
        "vmr, protected by one standby",
        &mut configs,
        &mut n,
        |ns, n| run_vmr_protected(&setup, ns, args, &scratch, n),
    );
    if !args.no_qemu {
        one("QEMU, unprotected", &mut configs, &mut n, |ns, n| {
            run_qemu(&setup, ns, args, n)
        });
        one("QEMU COLO", &mut configs, &mut n, |ns, n| {
            run_colo(&setup, ns, args, &scratch, n)
        });
    }

    let find = |name: &str| configs.iter().find(|c| c.name == name && c.rps.is_some());
    let ratio = |a: Option<&ConfigResult>, b: Option<&ConfigResult>| match (a, b) {
        (Some(a), Some(b)) => Some(a.rps? / b.rps?),
        _ => None,
    };
    let added = |a: Option<&ConfigResult>,
                 b: Option<&ConfigResult>,
                 f: fn(&ConfigResult) -> Option<f64>| {
        match (a, b) {
            (Some(a), Some(b)) => Some(f(a)? - f(b)?),
            _ => None,
        }
    };
    let (vmr, prot, qemu, colo) = (
        find("vmr"),
        find("vmr-protected"),
        find("qemu"),
        find("qemu-colo"),
    );
    let report = ProtectReport {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        requests: n,
        clients: args.clients,
        tests: "set,get",
        redis_benchmark: version,
        epoch_ms: args.epoch_ms,
        colo_checkpoint_ms: args.colo_checkpoint_ms,
        kernel: setup.kernel.clone(),
        initrd: setup.initrd.clone(),
        tput_ratio: ratio(prot, vmr),
        p50_added_ms: added(prot, vmr, |c| c.p50_ms),
        p99_added_ms: added(prot, vmr, |c| c.p99_ms),
        colo_tput_ratio: ratio(colo, qemu),
        colo_vs_vmr_tput_ratio: ratio(colo, vmr),
        colo_p50_added_ms: added(colo, qemu, |c| c.p50_ms),
        colo_p99_added_ms: added(colo, qemu, |c| c.p99_ms),
        configs,
    };
    print_table(&report);
    let json = super::write_json(out, "protect.json", &report)?;
    println!("(JSON: {})", json.display());
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}"))
    };
    println!(
        "protect: tput_ratio={} p50_added_ms={} p99_added_ms={} colo_tput_ratio={}",
        opt(report.tput_ratio, 3),
        opt(report.p50_added_ms, 3),
        opt(report.p99_added_ms, 3),
        opt(report.colo_tput_ratio, 3)
    );
    if report.tput_ratio.is_none() {
        return Err("the protected guest could not be measured".into());
    }
    Ok(())
}

fn print_table(r: &ProtectReport) {
    println!(
        "\nprotect: redis guest ({} vCPUs, {} MiB), redis-benchmark -n {} -c {} -t {} --csv \
         from the host ({}); vmr epoch period: {}; COLO checkpoint period: {}",
        r.vcpus,
        r.mem_mib,
        r.requests,
        r.clients,
        r.tests,
        r.redis_benchmark,
        r.epoch_ms
            .map_or_else(|| "vmr's default".to_string(), |ms| format!("{ms} ms")),
        r.colo_checkpoint_ms
            .map_or_else(|| "QEMU's default".to_string(), |ms| format!("{ms} ms")),
    );
    println!(
        "requests/s over SET and GET; p50 and p99 the mean of the two tests'; ratio against \
         the same monitor unprotected"
    );
    println!(
        "{:<16}{:>8}{:>12}{:>10}{:>10}{:>10}{:>10}{:>12}{:>12}  error",
        "config", "-n", "requests/s", "SET", "GET", "p50 ms", "p99 ms", "tput ratio", "p99 added",
    );
    let base = |c: &ConfigResult| {
        let name = if c.name.starts_with("vmr") {
            "vmr"
        } else {
            "qemu"
        };
        r.configs.iter().find(|b| b.name == name && b.rps.is_some())
    };
    let f = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"));
    for c in &r.configs {
        let test = |name: &str| c.tests.iter().find(|t| t.test == name).map(|t| t.rps);
        let b = base(c);
        let ratio = b.and_then(|b| Some(c.rps? / b.rps?));
        let p99_added = b.and_then(|b| Some(c.p99_ms? - b.p99_ms?));
        let mut error = c.error.clone().unwrap_or_default();
        if error.len() > 300 {
            error.truncate(300);
            error.push_str("... (whole in the JSON)");
        }
        println!(
            "{:<16}{:>8}{:>12}{:>10}{:>10}{:>10}{:>10}{:>12}{:>12}  {}",
            c.label,
            c.requests
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            f(c.rps, 0),
            f(test("SET"), 0),
            f(test("GET"), 0),
            f(c.p50_ms, 3),
            f(c.p99_ms, 3),
            f(ratio, 3),
            f(p99_added, 3),
            error
        );
    }
    println!(
        "\nwhere the CPU went during each measurement (CPU seconds per second; the threads \
         above 0.02)"
    );
    for c in &r.configs {
        let Some(cpu) = &c.cpu else { continue };
        let monitors: f64 = cpu.threads.iter().map(|t| t.1).sum();
        let threads: Vec<String> = cpu
            .threads
            .iter()
            .filter(|t| t.1 >= 0.02)
            .map(|(name, share)| format!("{name} {share:.2}"))
            .collect();
        println!(
            "{:<16} busy {:.2} of {} CPU(s), monitors {monitors:.2}: {}",
            c.label,
            cpu.busy,
            cpu.cpus,
            threads.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redis that stops serving (SIGSTOP, as a stuck guest) ends the measurement within
    /// the watchdog's bound, with an error saying so, not at the timeout.
    #[test]
    fn the_watchdog_ends_a_measurement_whose_redis_stopped() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/redis-server").exists() {
            eprintln!("skipped: needs root and redis-server");
            return;
        }
        let ns = Netns::new().unwrap();
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{GUEST_IP}/32"),
            "dev",
            "lo",
        ])
        .unwrap();
        let mut redis = ns
            .cmd("redis-server")
            .args([
                "--bind",
                GUEST_IP,
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while ns.redis_served().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let pid = redis.id();
        let stop = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            // SAFETY: kill(2) on the redis child, still running.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        });
        let start = Instant::now();
        let result = redis_benchmark(&ns, 100_000_000, 4, 600);
        let took = start.elapsed();
        stop.join().unwrap();
        let _ = redis.kill();
        let _ = redis.wait();
        let err = result.unwrap_err();
        assert!(err.starts_with("stuck:"), "{err}");
        assert!(
            took < Duration::from_secs(3 + STUCK_SECS + 2 * WATCH_EVERY.as_secs() + 10),
            "ended after {took:?}"
        );
    }

    #[test]
    fn parses_redis_benchmark_7_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                    \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"2000.00\",\"4.900\",\"0.800\",\"4.500\",\"8.000\",\"12.100\",\"30.000\"\n\
                    \"GET\",\"4000.00\",\"2.400\",\"0.600\",\"2.200\",\"4.000\",\"6.300\",\"20.000\"\n";
        let tests = parse_csv(text).unwrap();
        assert_eq!(tests.len(), 2);
        assert_eq!(tests[0].test, "SET");
        assert_eq!(tests[1].p99_ms, 6.3);
        // 2 x n requests in n/2000 + n/4000 s.
        assert!((combined_rps(&tests) - 2666.666).abs() < 0.01);
        assert!(parse_csv("ERROR: connection refused\n").is_err());
    }
}
