//! Helpers for vmr's end-to-end tests: the guest images, the monitor binary, and running a
//! scenario script inside the lab (an emulated host with hardware virtualization, or this host
//! directly when it has VT-x/AMD-V), watched for progress, with every run's outcome recorded.
//!
//! Two watchdogs end a run that stopped, instead of waiting for a timeout:
//! - inside the lab, `tests/lab/common.sh` watches the scenario's scratch files (consoles, vmr's
//!   logs, client logs) and the guests' TAP traffic; when none moved for
//!   [`WATCHDOG_SECS`], it dumps the guests and ends the scenario with status 86
//!   ([`Outcome::GuestStuck`]);
//! - here, [`run_attempt`] watches the lab's own stdout and stderr and the scratch directory;
//!   when all of them were silent for [`LAB_SILENCE_SECS`] (the lab froze, its watchdog with
//!   it), it kills the lab's whole process tree ([`Outcome::LabFrozen`]).
//!
//! Every attempt is appended as one JSON line to `target/lab-results/<run id>.jsonl`
//! ([`AttemptRecord`]); `lab-summary` prints them as a table.

pub mod readme;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Labs running at once in this process ([`lab_slot`]).
static LAB: (Mutex<usize>, std::sync::Condvar) = (Mutex::new(0), std::sync::Condvar::new());

/// How many labs may run at once: `$VMR_LAB_SLOTS`, else one per core of the machine (a lab
/// has one CPU, [`LAB_CPUS`], emulated by one host thread), at most two. `cargo test` runs as
/// many tests at once as there are cores: on two, two scenarios share the machine.
pub fn lab_slots() -> usize {
    std::env::var("VMR_LAB_SLOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() / LAB_CPUS as usize)
                .unwrap_or(1)
                .clamp(1, 2)
        })
}

/// A slot for one lab, held while it runs.
pub struct LabSlot;

/// Waits for a free lab slot ([`lab_slots`]).
pub fn lab_slot() -> LabSlot {
    let (count, freed) = &LAB;
    let mut running = count.lock().unwrap_or_else(|e| e.into_inner());
    while *running >= lab_slots() {
        running = freed.wait(running).unwrap_or_else(|e| e.into_inner());
    }
    *running += 1;
    LabSlot
}

impl Drop for LabSlot {
    fn drop(&mut self) {
        let (count, freed) = &LAB;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        freed.notify_one();
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds (or finds in the cache) the guest and lab images: `VMR_KERNEL`, `VMR_INITRAMFS`, ...
pub fn images() -> HashMap<String, String> {
    let out = Command::new(repo_root().join("images/build"))
        .output()
        .expect("cannot run images/build");
    assert!(
        out.status.success(),
        "images/build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `vmr` binary the lab runs: `$VMR_BIN`, else the release build, else the debug build.
pub fn vmr_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("VMR_BIN") {
        return PathBuf::from(bin);
    }
    let target = repo_root().join("target");
    for profile in ["release", "debug"] {
        let bin = target.join(profile).join("vmr");
        if bin.exists() {
            return bin;
        }
    }
    panic!("no vmr binary: run `cargo build --release -p vmr` first (or set VMR_BIN)");
}

/// How a run of a scenario ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The scenario printed `SCENARIO PASS <name>` and exited 0.
    Passed,
    /// The lab itself failed (`images/lab` exit 125: its kernel died or QEMU failed).
    LabFault,
    /// The scenario's watchdog found no progress for [`WATCHDOG_SECS`] (exit 86).
    GuestStuck,
    /// The lab printed nothing and wrote nothing for [`LAB_SILENCE_SECS`], or did not finish
    /// within [`SCENARIO_TIMEOUT_SECS`]: killed.
    LabFrozen,
    /// A check of the scenario failed (its `FAIL:` line), the lab stayed up.
    CheckFailed,
}

impl Outcome {
    /// The name used in the JSON records and the tables.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::LabFault => "lab_fault",
            Outcome::GuestStuck => "guest_stuck",
            Outcome::LabFrozen => "lab_frozen",
            Outcome::CheckFailed => "check_failed",
        }
    }

    /// Whether a retry may help: the lab's faults, not the scenario's own.
    pub fn is_lab_problem(self) -> bool {
        matches!(
            self,
            Outcome::LabFault | Outcome::GuestStuck | Outcome::LabFrozen
        )
    }
}

/// One run of one scenario, as recorded (one JSON line each).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The lab run (a `test.sh` run, a soak) this attempt belongs to.
    pub run_id: String,
    /// The scenario (`tests/lab/<scenario>.sh`).
    pub scenario: String,
    /// 1 for the first try.
    pub attempt: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, for anything but `passed`: the watchdog's reason, the lab's fault, the FAIL line.
    pub reason: String,
    /// `images/lab`'s exit status (none when killed by a signal).
    pub exit_status: Option<i32>,
    /// When the attempt started (seconds since the epoch).
    pub started_unix: u64,
    /// Lab boot, scenario and lab shutdown.
    pub duration_s: f64,
    /// The longest time the scenario's progress (scratch files, TAP traffic) stood still, as
    /// the watchdog inside the lab measured it (none when it left no record).
    pub guest_quiet_max_s: Option<f64>,
    /// The longest time the lab printed nothing and the scratch dir did not change, as seen
    /// from outside.
    pub lab_silent_max_s: f64,
    /// The inner watchdog's bound for this attempt.
    pub watchdog_secs: u32,
    /// The outer watchdog's bound for this attempt.
    pub lab_silence_secs: u32,
    /// The outcome this attempt was meant to have, when not `passed` (the watchdog's check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Outcome>,
    /// What the scenario left (consoles, logs).
    pub scratch: PathBuf,
}

/// What a scenario printed and how it ended.
pub struct ScenarioRun {
    /// Exit status, stdout and stderr of the lab command.
    pub output: Output,
    /// The scenario's scratch directory (consoles, logs), kept for inspection.
    pub scratch: PathBuf,
    /// The outcome, as recorded.
    pub record: AttemptRecord,
}

impl ScenarioRun {
    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Panics with everything the scenario printed unless it passed.
    pub fn assert_success(&self) {
        assert!(
            self.record.outcome == Outcome::Passed,
            "scenario {}: {} ({}; {}):\n--- stdout\n{}\n--- stderr\n{}\n(scratch: {})",
            self.record.scenario,
            self.record.outcome.name(),
            self.record.reason,
            self.output.status,
            self.stdout(),
            String::from_utf8_lossy(&self.output.stderr),
            self.scratch.display()
        );
    }
}

/// How long one scenario may take, lab boot included, before the lab is killed whatever it
/// prints (the longest, protect_redis, whose guest runs protected at the lab's 15-20 epochs
/// a second, took over 420 s with 2000 benchmark requests; stuck runs are ended well before by
/// the watchdogs).
pub const SCENARIO_TIMEOUT_SECS: u32 = 600;
/// The inner watchdog's bound (`VMR_WATCHDOG_SECS` in `tests/lab/common.sh`): a scenario
/// whose consoles, logs and TAP traffic stood still this long is stuck. The longest quiet
/// gaps measured in passing runs (one-CPU lab, every scenario): 11 s at most (migrate_redis
/// 10.9, migrate 10.6, the guest's boot up to 11.7; boot, blk, net, redis 4-8); the bound is
/// over three times that, for a lab that is slower now and then.
pub const WATCHDOG_SECS: u32 = 40;
/// The outer watchdog's bound: the lab silent this long (no output, no scratch file changed)
/// is frozen. Longer than the inner bound plus its dump, so that a stuck guest is reported as
/// such by the inner one.
pub const LAB_SILENCE_SECS: u32 = WATCHDOG_SECS + 40;
/// `images/lab`'s exit status when it killed the lab at its timeout.
const LAB_TIMED_OUT: i32 = 124;
/// `images/lab`'s exit status when the lab failed before the command finished.
const LAB_FAILED: i32 = 125;
/// The scenario's exit status when its watchdog found it stuck (`tests/lab/common.sh`).
const GUEST_STUCK: i32 = 86;
/// The lab's CPUs for the scenarios: one, because QEMU's multi-threaded TCG made the nested
/// guests' faults (below) several times more frequent (redis migration: 1 failure in 6 runs
/// with one CPU, about 1 in 2 with two). Benchmarks keep two.
pub const LAB_CPUS: u32 = 1;
/// Runs of one scenario at most: a lab that died or froze, or a guest stuck, is started
/// again, up to this.
pub const MAX_ATTEMPTS: u32 = 3;
/// Failures of the scenario itself (the lab stayed up) that end the retries.
pub const MAX_SCENARIO_FAILURES: u32 = 2;

/// What varies between runs of a scenario.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run id the records carry.
    pub run_id: String,
    /// The inner watchdog's bound.
    pub watchdog_secs: u32,
    /// The outer watchdog's bound.
    pub lab_silence_secs: u32,
    /// The outcome expected, when not `passed`.
    pub expected: Option<Outcome>,
    /// More environment for the scenario.
    pub env: Vec<(String, String)>,
    /// The longest a run may take ([`SCENARIO_TIMEOUT_SECS`], longer for a benchmark).
    pub timeout_secs: u32,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            run_id: run_id(),
            watchdog_secs: WATCHDOG_SECS,
            lab_silence_secs: LAB_SILENCE_SECS,
            expected: None,
            env: Vec::new(),
            timeout_secs: SCENARIO_TIMEOUT_SECS,
        }
    }
}

/// This process's run id: `$VMR_LAB_RUN_ID` (test.sh sets it), else one made of the time
/// and the process id.
pub fn run_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::env::var("VMR_LAB_RUN_ID")
            .unwrap_or_else(|_| format!("run-{}-{}", unix_now(), std::process::id()))
    })
    .clone()
}

/// Where the lab's records go.
pub fn results_dir() -> PathBuf {
    repo_root().join("target/lab-results")
}

/// The JSON-lines file of a run's attempts.
pub fn results_file(run_id: &str) -> PathBuf {
    results_dir().join(format!("{run_id}.jsonl"))
}

/// Appends one attempt to its run's results file.
pub fn record(rec: &AttemptRecord) {
    let path = results_file(&rec.run_id);
    let _ = std::fs::create_dir_all(results_dir());
    let mut line = serde_json::to_string(rec).expect("a record serializes");
    line.push('\n');
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(mut f) => {
            if let Err(e) = f.write_all(line.as_bytes()) {
                eprintln!("cannot write {}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("cannot open {}: {e}", path.display()),
    }
}

/// Reads a results file (JSON lines; bad lines are skipped with a warning).
pub fn read_records(path: &Path) -> std::io::Result<Vec<AttemptRecord>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("{}: skipping a bad line: {e}", path.display());
                None
            }
        })
        .collect())
}

/// Runs `tests/lab/NAME.sh` inside the lab with the images, the `vmr` binary and a writable
/// scratch directory in its environment, and records every attempt.
///
/// The emulated lab (nested virtualization under QEMU TCG) is not flawless: its kernel has
/// been seen to die of a recursive page fault in a vCPU thread, to freeze, and its guests to
/// stop for good. A run that ended so ([`Outcome::is_lab_problem`]) is run again, after
/// everything it printed and left has been shown and the retry announced, up to
/// [`MAX_ATTEMPTS`] runs; two failures of the scenario itself ([`Outcome::CheckFailed`]) fail
/// the test.
pub fn run_scenario(name: &str) -> ScenarioRun {
    let _lab = lab_slot();
    let images = images();
    let opts = RunOptions::default();
    let (mut attempt, mut scenario_failures) = (0, 0);
    loop {
        attempt += 1;
        let run = run_attempt(name, &images, attempt, &opts);
        record(&run.record);
        match run.record.outcome {
            Outcome::Passed => return run,
            Outcome::CheckFailed => scenario_failures += 1,
            _ => {}
        }
        if attempt == MAX_ATTEMPTS || scenario_failures == MAX_SCENARIO_FAILURES {
            return run;
        }
        eprintln!(
            "lab scenario {name}: {} ({}; {}); its output:\n{}\n{}\nwhat it left in {}:",
            run.record.outcome.name(),
            run.record.reason,
            run.output.status,
            run.stdout(),
            String::from_utf8_lossy(&run.output.stderr),
            run.scratch.display()
        );
        print_consoles(&run.scratch);
        eprintln!(
            "lab scenario {name}: RETRYING (attempt {} of at most {MAX_ATTEMPTS})",
            attempt + 1
        );
    }
}

/// Runs the scenario `name` with `env` as a failover scenario is run: any failure of its own
/// (a failed check, a stuck guest) fails at once; only a run the lab itself ended (its
/// kernel's fault, or frozen) is run again, at most [`MAX_ATTEMPTS`] runs, and the reruns are
/// printed. A run may take `timeout_secs`.
pub fn run_scenario_strict(name: &str, env: &[(&str, &str)], timeout_secs: u32) -> ScenarioRun {
    let _lab = lab_slot();
    let images = images();
    let opts = RunOptions {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_secs,
        ..RunOptions::default()
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let run = run_attempt(name, &images, attempt, &opts);
        record(&run.record);
        let lab_died = matches!(run.record.outcome, Outcome::LabFault | Outcome::LabFrozen);
        if !lab_died || attempt == MAX_ATTEMPTS {
            println!(
                "lab scenario {name}: {} reruns because the lab itself died",
                attempt - 1
            );
            return run;
        }
        eprintln!(
            "lab scenario {name}: the lab itself died ({}; {}): RERUN {} of at most {}",
            run.record.outcome.name(),
            run.record.reason,
            attempt,
            MAX_ATTEMPTS - 1
        );
        print_consoles(&run.scratch);
    }
}

pub fn run_scenario_once(name: &str, opts: &RunOptions) -> ScenarioRun {
    let _lab = lab_slot();
    let run = run_attempt(name, &images(), 1, opts);
    record(&run.record);
    run
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Output read from one of the lab's pipes, and when it last arrived.
struct Pipe {
    data: Arc<Mutex<Vec<u8>>>,
    done: std::sync::mpsc::Receiver<()>,
}

fn read_pipe(mut src: impl Read + Send + 'static, t0: Instant, last: Arc<AtomicU64>) -> Pipe {
    let data = Arc::new(Mutex::new(Vec::new()));
    let (tx, done) = std::sync::mpsc::channel();
    let sink = data.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
        }
        let _ = tx.send(());
    });
    Pipe { data, done }
}

/// A fingerprint of the files under `dir` (two levels): names, sizes and mtimes.
fn dir_state(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32, h: &mut std::collections::hash_map::DefaultHasher) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(md) = e.metadata() else { continue };
            e.file_name().hash(h);
            if md.is_dir() {
                if depth > 0 {
                    walk(&e.path(), depth - 1, h);
                }
            } else {
                md.len().hash(h);
                md.modified().ok().hash(h);
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    walk(dir, 1, &mut h);
    h.finish()
}

/// Every process below `root` (children, their children...), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// Kills the lab: its process group (it was started as a group leader) and every process
/// below it, wherever they went (`timeout` and QEMU may make groups of their own).
fn kill_tree(pid: u32) {
    let below = descendants(pid);
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
    for p in below.into_iter().chain([pid]) {
        // SAFETY: as above, for single processes.
        unsafe {
            libc::kill(p as i32, libc::SIGKILL);
        }
    }
}

/// Runs `tests/lab/NAME.sh` once inside the lab, under both watchdogs, and classifies how it
/// ended. Does not record it (see [`record`]) nor take a lab slot.
pub fn run_attempt(
    name: &str,
    images: &HashMap<String, String>,
    attempt: u32,
    opts: &RunOptions,
) -> ScenarioRun {
    let scratch = repo_root().join("target/lab-scratch").join(format!(
        "{name}-{}-{}-{attempt}",
        std::process::id(),
        unix_now()
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let script = repo_root().join(format!("tests/lab/{name}.sh"));
    let started_unix = unix_now();
    let t0 = Instant::now();
    let mut child = Command::new(repo_root().join("images/lab"))
        .arg("--cpus")
        .arg(LAB_CPUS.to_string())
        .arg("--rwdir")
        .arg(&scratch)
        .arg("--")
        .arg("bash")
        .arg(&script)
        .envs(images)
        .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("VMR_BIN", vmr_bin())
        .env("VMR_SCRATCH", &scratch)
        .env("VMR_LAB_VERBOSE", "1")
        .env("VMR_WATCHDOG_SECS", opts.watchdog_secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("cannot run images/lab");
    let last = Arc::new(AtomicU64::new(0));
    let out = read_pipe(child.stdout.take().unwrap(), t0, last.clone());
    let err = read_pipe(child.stderr.take().unwrap(), t0, last.clone());

    // The outer watchdog.
    let (mut state, mut last_seen, mut silent_max) = (dir_state(&scratch), 0u64, 0u64);
    let mut killed: Option<String> = None;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for images/lab") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(500));
        let now = t0.elapsed().as_millis() as u64;
        let s = dir_state(&scratch);
        let printed = last.load(Ordering::Relaxed);
        let progress = if s != state {
            now
        } else {
            printed.max(last_seen)
        };
        if progress > last_seen {
            silent_max = silent_max.max(progress - last_seen);
            last_seen = progress;
            state = s;
        }
        let silent = now.saturating_sub(last_seen);
        let why = if silent >= u64::from(opts.lab_silence_secs) * 1000 {
            Some(format!(
                "the lab printed nothing and wrote nothing for {} s",
                opts.lab_silence_secs
            ))
        } else if now >= u64::from(opts.timeout_secs) * 1000 {
            Some(format!(
                "the lab did not finish within {} s",
                opts.timeout_secs
            ))
        } else {
            None
        };
        if let Some(why) = why {
            silent_max = silent_max.max(silent);
            eprintln!("lab scenario {name}: {why}: killing the lab");
            kill_tree(child.id());
            killed = Some(why);
            break child.wait().expect("waiting for images/lab");
        }
    };
    let duration = t0.elapsed();
    // Wait for the pipes to drain, but not for ever: a process that escaped the kill may
    // still hold them.
    for p in [&out, &err] {
        let _ = p.done.recv_timeout(Duration::from_secs(5));
    }
    let output = Output {
        status,
        stdout: std::mem::take(&mut *out.data.lock().unwrap()),
        stderr: std::mem::take(&mut *err.data.lock().unwrap()),
    };
    let (outcome, reason) = classify(name, &output, &scratch, killed);
    let guest_quiet_max_s = std::fs::read_to_string(scratch.join("watchdog.gap"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
    let record = AttemptRecord {
        run_id: opts.run_id.clone(),
        scenario: name.to_string(),
        attempt,
        outcome,
        reason,
        exit_status: output.status.code(),
        started_unix,
        duration_s: round1(duration.as_secs_f64()),
        guest_quiet_max_s,
        lab_silent_max_s: round1(silent_max as f64 / 1000.0),
        watchdog_secs: opts.watchdog_secs,
        lab_silence_secs: opts.lab_silence_secs,
        expected: opts.expected,
        scratch: scratch.clone(),
    };
    eprintln!(
        "lab scenario {name} (attempt {attempt}): {} in {:.1} s{}",
        outcome.name(),
        record.duration_s,
        if record.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", record.reason)
        }
    );
    ScenarioRun {
        output,
        scratch,
        record,
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// How a finished (or killed) lab run ended, and why.
fn classify(
    name: &str,
    output: &Output,
    scratch: &Path,
    killed: Option<String>,
) -> (Outcome, String) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if let Some(why) = killed {
        return (Outcome::LabFrozen, why);
    }
    let watchdog = std::fs::read_to_string(scratch.join("watchdog.reason")).ok();
    match output.status.code() {
        Some(0) if stdout.contains(&format!("SCENARIO PASS {name}")) => {
            (Outcome::Passed, String::new())
        }
        Some(0) => (
            Outcome::CheckFailed,
            "the scenario exited 0 without reaching its end".into(),
        ),
        Some(GUEST_STUCK) => (
            Outcome::GuestStuck,
            watchdog.map_or("exit status 86".into(), |w| w.trim().to_string()),
        ),
        _ if watchdog.is_some() => (Outcome::GuestStuck, watchdog.unwrap().trim().to_string()),
        Some(LAB_FAILED) => (Outcome::LabFault, lab_fault_reason(&stdout, &stderr)),
        Some(LAB_TIMED_OUT) => (Outcome::LabFrozen, "images/lab's timeout".into()),
        None => (
            Outcome::LabFault,
            format!("images/lab killed by a signal ({})", output.status),
        ),
        Some(code) => {
            let fail = stdout
                .lines()
                .find(|l| l.starts_with("FAIL"))
                .map(|l| l.trim().to_string());
            (
                Outcome::CheckFailed,
                fail.unwrap_or_else(|| format!("exit status {code}, no FAIL line")),
            )
        }
    }
}

/// Why the lab failed, from what it printed: the lab kernel's first fatal messages and
/// `images/lab`'s own error.
fn lab_fault_reason(stdout: &str, stderr: &str) -> String {
    const SIGNS: [&str; 9] = [
        "Kernel panic",
        "BUG:",
        "Oops",
        "general protection fault",
        "double fault",
        "RIP:",
        "qemu-system",
        "Killed",
        "images/lab: error",
    ];
    let mut found: Vec<String> = Vec::new();
    for line in stdout.lines().chain(stderr.lines()) {
        let line = line.trim();
        if SIGNS.iter().any(|s| line.contains(s)) && !found.iter().any(|f| f == line) {
            found.push(line.chars().take(160).collect());
        }
    }
    // The lab's error line last, with at most the first three signs of the kernel before it.
    let (errors, kernel): (Vec<String>, Vec<String>) = found
        .into_iter()
        .partition(|l| l.contains("images/lab: error"));
    let mut parts: Vec<String> = kernel.into_iter().take(3).collect();
    parts.extend(errors.into_iter().last());
    if parts.is_empty() {
        "images/lab exit 125 with no message".into()
    } else {
        parts.join(" | ")
    }
}

/// Prints the tail of every console and log a scenario left in `scratch`.
fn print_consoles(scratch: &Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} (last 40 lines)", path.display());
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
}

/// A table of a lab run: per scenario, its attempts, how the first ended, every outcome, and
/// the time it took; then the count of reruns.
pub fn summary_table(records: &[AttemptRecord]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut by: BTreeMap<&str, Vec<&AttemptRecord>> = BTreeMap::new();
    for r in records {
        if !by.contains_key(r.scenario.as_str()) {
            order.push(&r.scenario);
        }
        by.entry(&r.scenario).or_default().push(r);
    }
    let mut rows = vec![[
        "scenario".to_string(),
        "attempts".into(),
        "first try".into(),
        "outcome(s)".into(),
        "duration".into(),
        "max quiet".into(),
    ]];
    let (mut reruns, mut total, mut failed) = (0, 0.0, Vec::new());
    for s in &order {
        let rs = &by[s];
        let outcomes: Vec<&str> = rs.iter().map(|r| r.outcome.name()).collect();
        let time: f64 = rs.iter().map(|r| r.duration_s).sum();
        let quiet = rs
            .iter()
            .filter_map(|r| r.guest_quiet_max_s)
            .fold(None, |m: Option<f64>, q| Some(m.map_or(q, |m| m.max(q))));
        let last = rs.last().unwrap();
        let ok = last.outcome == last.expected.unwrap_or(Outcome::Passed);
        if !ok {
            failed.push(*s);
        }
        reruns += rs.len() - 1;
        total += time;
        let mut shown = outcomes.join(", ");
        if let Some(e) = last.expected {
            shown.push_str(&format!(" (expected {})", e.name()));
        }
        rows.push([
            s.to_string(),
            rs.len().to_string(),
            rs[0].outcome.name().to_string(),
            shown,
            format!("{time:.0} s"),
            quiet.map_or("-".into(), |q| format!("{q:.1} s")),
        ]);
    }
    let mut text = table(&rows);
    text.push_str(&format!(
        "{} scenarios, {} lab runs, {reruns} reruns, {:.0} s in the lab; {}\n",
        order.len(),
        records.len(),
        total,
        if failed.is_empty() {
            "all passed".to_string()
        } else {
            format!("FAILED: {}", failed.join(", "))
        }
    ));
    for r in records.iter().filter(|r| r.outcome != Outcome::Passed) {
        text.push_str(&format!(
            "  {} attempt {}: {}: {}\n",
            r.scenario,
            r.attempt,
            r.outcome.name(),
            r.reason
        ));
    }
    text
}

/// A soak's table: the first-try pass rate, then each outcome with its count, share and
/// reasons, then the durations and quiet gaps of the runs that passed.
pub fn soak_table(scenario: &str, records: &[AttemptRecord]) -> String {
    let n = records.len();
    let passed: Vec<&AttemptRecord> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Passed)
        .collect();
    let mut text = format!(
        "soak {scenario}: {} of {n} runs passed on their first try ({:.0}%)\n",
        passed.len(),
        if n == 0 {
            0.0
        } else {
            100.0 * passed.len() as f64 / n as f64
        }
    );
    let mut by: BTreeMap<Outcome, Vec<&AttemptRecord>> = BTreeMap::new();
    for r in records {
        by.entry(r.outcome).or_default().push(r);
    }
    let mut rows = vec![[
        "outcome".to_string(),
        "runs".into(),
        "share".into(),
        "duration (min/median/max)".into(),
        "causes".into(),
    ]];
    for (o, rs) in &by {
        let mut causes: Vec<String> = rs
            .iter()
            .filter(|r| !r.reason.is_empty())
            .map(|r| {
                format!(
                    "#{}: {}",
                    r.attempt,
                    r.reason.chars().take(150).collect::<String>()
                )
            })
            .collect();
        causes.dedup();
        let d: Vec<f64> = rs.iter().map(|r| r.duration_s).collect();
        rows.push([
            o.name().to_string(),
            rs.len().to_string(),
            format!("{:.0}%", 100.0 * rs.len() as f64 / n as f64),
            min_med_max(&d),
            if causes.is_empty() {
                "-".into()
            } else {
                causes.join("; ")
            },
        ]);
    }
    text.push_str(&table(&rows));
    let quiet: Vec<f64> = passed.iter().filter_map(|r| r.guest_quiet_max_s).collect();
    let silent: Vec<f64> = passed.iter().map(|r| r.lab_silent_max_s).collect();
    if !passed.is_empty() {
        text.push_str(&format!(
            "passed runs: longest quiet gap in the scenario (inner watchdog) {} s; longest silence of the lab (outer) {} s\n",
            min_med_max(&quiet),
            min_med_max(&silent)
        ));
    }
    text
}

fn min_med_max(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!("{:.1}/{:.1}/{:.1}", v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Rows as a table with `|` between columns, the first row as its header.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut width = [0; N];
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut text = String::new();
    for (i, r) in rows.iter().enumerate() {
        let cells: Vec<String> = r
            .iter()
            .zip(width)
            .enumerate()
            .map(|(j, (c, w))| {
                if j == N - 1 {
                    c.clone()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        text.push_str(cells.join(" | ").trim_end());
        text.push('\n');
        if i == 0 {
            let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
            text.push_str(&rule.join("-|-"));
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn output(code: i32, stdout: &str, stderr: &str) -> Output {
        Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn outcomes_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("vmr-classify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = |code, out: &str, err: &str| classify("boot", &output(code, out, err), &dir, None);
        assert_eq!(c(0, "ok: x\nSCENARIO PASS boot\n", "").0, Outcome::Passed);
        assert_eq!(c(0, "ok: x\n", "").0, Outcome::CheckFailed);
        let (o, why) = c(1, "ok: a\nFAIL: guest sees 2 CPUs\n--- console\n", "");
        assert_eq!(
            (o, why.as_str()),
            (Outcome::CheckFailed, "FAIL: guest sees 2 CPUs")
        );
        let (o, why) = c(
            125,
            "",
            "[  80.1] BUG: unable to handle page fault\n[  80.2] Kernel panic - not syncing: Fatal exception\nimages/lab: error: the lab failed\n",
        );
        assert_eq!(o, Outcome::LabFault);
        assert!(why.contains("Kernel panic") && why.ends_with("images/lab: error: the lab failed"));
        assert_eq!(c(86, "", "").0, Outcome::GuestStuck);
        let frozen = classify("boot", &output(137, "", ""), &dir, Some("silent".into()));
        assert_eq!(frozen, (Outcome::LabFrozen, "silent".to_string()));
        // The watchdog's reason file wins over the exit status (killed while failing).
        std::fs::write(dir.join("watchdog.reason"), "no progress for 60s\n").unwrap();
        assert_eq!(
            c(1, "FAIL: x\n", ""),
            (Outcome::GuestStuck, "no progress for 60s".to_string())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kill_tree_ends_processes_that_left_the_group() {
        let mut child = Command::new("sh")
            .args(["-c", "setsid sleep 1000 & sleep 1000"])
            .process_group(0)
            .spawn()
            .unwrap();
        let mut below = Vec::new();
        for _ in 0..100 {
            below = descendants(child.id());
            if below.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(below.len(), 2, "sh's two sleeps");
        kill_tree(child.id());
        child.wait().unwrap();
        for p in below {
            let mut gone = false;
            for _ in 0..100 {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                // Gone, or a zombie waiting for init.
                if stat.is_empty() || stat.contains(") Z") {
                    gone = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(gone, "process {p} survived");
        }
    }

    #[test]
    fn the_summary_counts_reruns() {
        let rec = |scenario: &str, attempt, outcome| AttemptRecord {
            run_id: "t".into(),
            scenario: scenario.into(),
            attempt,
            outcome,
            reason: String::new(),
            exit_status: Some(0),
            started_unix: 0,
            duration_s: 60.0,
            guest_quiet_max_s: Some(5.0),
            lab_silent_max_s: 5.0,
            watchdog_secs: WATCHDOG_SECS,
            lab_silence_secs: LAB_SILENCE_SECS,
            expected: None,
            scratch: PathBuf::new(),
        };
        let text = summary_table(&[
            rec("boot", 1, Outcome::Passed),
            rec("redis", 1, Outcome::GuestStuck),
            rec("redis", 2, Outcome::Passed),
        ]);
        assert!(
            text.contains("redis    | 2        | guest_stuck | guest_stuck, passed | 120 s"),
            "{text}"
        );
        assert!(text.contains("3 lab runs, 1 reruns"), "{text}");
        assert!(text.contains("all passed"), "{text}");
        let soak = soak_table(
            "redis",
            &[
                rec("redis", 1, Outcome::GuestStuck),
                rec("redis", 2, Outcome::Passed),
            ],
        );
        assert!(
            soak.contains("1 of 2 runs passed on their first try (50%)"),
            "{soak}"
        );
    }
}
