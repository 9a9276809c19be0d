//! Helpers for vmr's end-to-end tests: the guest images, the monitor binary, and running a
//! scenario script inside the lab (an emulated host with hardware virtualization, or this host
//! directly when it has VT-x/AMD-V).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// One lab at a time: each uses both cores of the machine.
static LAB: Mutex<()> = Mutex::new(());

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
    panic!("no vmr binary: run `cargo build --release -p vmm` first (or set VMR_BIN)");
}

/// What a scenario printed and how it ended.
pub struct ScenarioRun {
    /// Exit status, stdout and stderr of the lab command.
    pub output: Output,
    /// The scenario's scratch directory (consoles, logs), kept for inspection.
    pub scratch: PathBuf,
}

impl ScenarioRun {
    /// Stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Panics with everything the scenario printed unless it exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.output.status.success(),
            "scenario failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n(scratch: {})",
            self.output.status,
            self.stdout(),
            String::from_utf8_lossy(&self.output.stderr),
            self.scratch.display()
        );
    }
}

/// How long one scenario may take, lab boot included, before the lab is killed (the longest
/// takes about 150 s; a lab that froze is found out at this limit).
const SCENARIO_TIMEOUT_SECS: u32 = 420;
/// `images/lab`'s exit status when it killed the lab at its timeout.
const LAB_TIMED_OUT: i32 = 124;
/// `images/lab`'s exit status when the lab failed before the command finished.
const LAB_FAILED: i32 = 125;
/// The lab's CPUs for the scenarios: one, because QEMU's multi-threaded TCG made the nested
/// guests' faults (below) several times more frequent (redis migration: 1 failure in 6 runs
/// with one CPU, about 1 in 2 with two). Benchmarks keep two.
const LAB_CPUS: u32 = 1;
/// Runs of one scenario at most: a lab that died or froze is started again, up to this.
const MAX_ATTEMPTS: u32 = 3;
/// Failures of the scenario itself (the lab stayed up) that end the retries.
const MAX_SCENARIO_FAILURES: u32 = 2;

/// Runs `tests/lab/NAME.sh` inside the lab with the images, the `vmr` binary and a writable
/// scratch directory in its environment.
///
/// The emulated lab (nested virtualization under QEMU TCG) is not flawless: its kernel has
/// been seen to die of a recursive page fault in a vCPU thread (an interrupt taken between a
/// nested guest's #VMEXIT and the host's VMLOAD), about one run in four of `migrate_redis`,
/// or to freeze; and a guest's page walk to use the lab's own page tables (the guest then
/// loops on nested page faults or triple-faults). A failed scenario is therefore run again,
/// after everything it printed and left (consoles, logs, lab kernel messages, where vmr's
/// threads were, what KVM saw) has been shown and the retry announced: up to
/// [`MAX_ATTEMPTS`] runs when the lab itself died or froze, and two failures of the scenario
/// itself fail the test.
pub fn run_scenario(name: &str) -> ScenarioRun {
    let _lab = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let images = images();
    let (mut attempt, mut scenario_failures) = (0, 0);
    loop {
        attempt += 1;
        let run = run_scenario_once(name, &images, attempt);
        let why = match run.output.status.code() {
            _ if run.output.status.success() => return run,
            Some(LAB_TIMED_OUT) => {
                format!("the lab did not finish within {SCENARIO_TIMEOUT_SECS} s")
            }
            Some(LAB_FAILED) => "the lab itself failed".to_string(),
            _ => {
                scenario_failures += 1;
                "the scenario failed".to_string()
            }
        };
        if attempt == MAX_ATTEMPTS || scenario_failures == MAX_SCENARIO_FAILURES {
            return run;
        }
        eprintln!(
            "lab scenario {name}: {why} ({}); its output:\n{}\n{}\nwhat it left in {}:",
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

fn run_scenario_once(name: &str, images: &HashMap<String, String>, attempt: u32) -> ScenarioRun {
    let scratch = repo_root()
        .join("target/lab-scratch")
        .join(format!("{name}-{}-{attempt}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let script = repo_root().join(format!("tests/lab/{name}.sh"));
    let output = Command::new(repo_root().join("images/lab"))
        .arg("--cpus")
        .arg(LAB_CPUS.to_string())
        .arg("--rwdir")
        .arg(&scratch)
        .arg("--timeout")
        .arg(SCENARIO_TIMEOUT_SECS.to_string())
        .arg("--")
        .arg("bash")
        .arg(&script)
        .envs(images)
        .env("VMR_BIN", vmr_bin())
        .env("VMR_SCRATCH", &scratch)
        .env("VMR_LAB_VERBOSE", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot run images/lab");
    ScenarioRun { output, scratch }
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
