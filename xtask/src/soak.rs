//! `cargo xtask soak SCENARIO --runs N`: runs one lab scenario N times, each a first try (no
//! retries), and prints its first-try pass rate and what ended the others, as a table; writes
//! every run to `target/lab-results/soak-<scenario>-<time>.json` (and `.jsonl`).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use serde::Serialize;
use vmr_tests::{AttemptRecord, Outcome, RunOptions};

#[derive(Args)]
pub struct SoakArgs {
    /// The scenario: `tests/lab/<SCENARIO>.sh` (boot, net, blk, redis, snapshot, migrate,
    /// migrate_redis, protect_redis, failover_redis; `stuck` checks the watchdog).
    scenario: String,
    /// How many runs.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// The inner watchdog's bound (seconds without progress in the scenario).
    #[arg(long, default_value_t = vmr_tests::WATCHDOG_SECS)]
    watchdog_secs: u32,
    /// The outer watchdog's bound (seconds of the lab silent); default: the inner one + 40.
    #[arg(long)]
    lab_silence_secs: Option<u32>,
    /// How long one run may take, lab boot included (failover_redis with many kills needs
    /// more than the default).
    #[arg(long, default_value_t = vmr_tests::SCENARIO_TIMEOUT_SECS)]
    timeout_secs: u32,
    /// Where to write the JSON (default: target/lab-results/soak-<scenario>-<time>.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct SoakReport<'a> {
    scenario: &'a str,
    runs: usize,
    first_try_passed: usize,
    first_try_pass_rate: f64,
    outcomes: std::collections::BTreeMap<&'static str, usize>,
    attempts: &'a [AttemptRecord],
}

pub fn run(args: SoakArgs) -> Result<(), String> {
    let script = crate::repo_root().join(format!("tests/lab/{}.sh", args.scenario));
    if !script.exists() {
        return Err(format!("no scenario {}", script.display()));
    }
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    let images = crate::lab::images()?;
    if std::env::var_os("VMR_BIN").is_none() {
        let bin = crate::lab::build_vmr()?;
        std::env::set_var("VMR_BIN", bin);
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let run_id = format!("soak-{}-{stamp}", args.scenario);
    let opts = RunOptions {
        run_id: run_id.clone(),
        watchdog_secs: args.watchdog_secs,
        lab_silence_secs: args.lab_silence_secs.unwrap_or(args.watchdog_secs + 40),
        expected: (args.scenario == "stuck").then_some(Outcome::GuestStuck),
        timeout_secs: args.timeout_secs,
        ..RunOptions::default()
    };
    let out = args
        .out
        .unwrap_or_else(|| vmr_tests::results_dir().join(format!("{run_id}.json")));
    let mut records = Vec::new();
    for i in 1..=args.runs {
        eprintln!("soak {}: run {i} of {}", args.scenario, args.runs);
        let run = vmr_tests::run_attempt(&args.scenario, &images, i, &opts);
        vmr_tests::record(&run.record);
        // What the scenario printed (its dumps, when it failed) beside its logs.
        for (name, text) in [
            ("lab.stdout", &run.output.stdout),
            ("lab.stderr", &run.output.stderr),
        ] {
            let path = run.scratch.join(name);
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("soak: cannot write {}: {e}", path.display());
            }
        }
        if run.record.outcome != Outcome::Passed {
            eprintln!(
                "soak {} run {i}: {}: {} (scratch {})",
                args.scenario,
                run.record.outcome.name(),
                run.record.reason,
                run.scratch.display()
            );
        }
        records.push(run.record);
        // Written after every run: a soak cut short keeps what it measured.
        write_report(&args.scenario, &records, &out)?;
    }
    print!("{}", vmr_tests::soak_table(&args.scenario, &records));
    println!("written: {}", out.display());
    Ok(())
}

fn write_report(scenario: &str, records: &[AttemptRecord], out: &PathBuf) -> Result<(), String> {
    let passed = records
        .iter()
        .filter(|r| r.outcome == Outcome::Passed)
        .count();
    let mut outcomes = std::collections::BTreeMap::new();
    for r in records {
        *outcomes.entry(r.outcome.name()).or_insert(0) += 1;
    }
    let report = SoakReport {
        scenario,
        runs: records.len(),
        first_try_passed: passed,
        first_try_pass_rate: passed as f64 / records.len() as f64,
        outcomes,
        attempts: records,
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(out, text + "\n").map_err(|e| format!("{}: {e}", out.display()))
}
