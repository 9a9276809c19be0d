//! `cargo xtask bench failover`: what a client of a protected redis sees when the primary's
//! host is lost, over N failovers in one lab boot (`tests/lab/failover_redis.sh`): a primary
//! and a standby on two TAPs of one bridge, etcd as the coordinator, a client SETting
//! increasing values on one TCP connection. Each time, at a random instant, the primary's
//! monitor is frozen (SIGSTOP: a host that goes silent, its connections not reset, so the
//! standby detects it by its `--detect-ms`; `--mode kill` sends SIGKILL instead), the standby
//! claims the VM, runs it and announces it, and a new standby protects it again.
//!
//! Per failover: the detection (the freeze to the standby's "PRIMARY LOST"), the resume (to
//! "TAKEN OVER": claimed, restored from the committed epoch, running) and the client-visible
//! gap (its last answer before the freeze to its first after). In the same run, for
//! comparison, what a user without vmr gets: the same redis unprotected, killed, and restored
//! from its latest snapshot on the other TAP, the client reconnecting (its gap from its last
//! answer to the first answer of the restored VM, and the acknowledged SETs the snapshot did
//! not hold).
//!
//! Final line: `failover: detect_ms=<p50> resume_ms=<p50> client_gap_ms=<p50>
//! client_gap_p99_ms=<p99> lost_acked=<n>`.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use vmr_tests::{Outcome, RunOptions};

#[derive(Args, Clone)]
pub struct FailoverArgs {
    /// Failovers to measure.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// How the primary is lost: `freeze` (SIGSTOP, detected by the standby's timeout) or
    /// `kill` (SIGKILL: its connections are reset at once).
    #[arg(long, default_value = "freeze")]
    mode: String,
    /// The standbys' --detect-ms.
    #[arg(long, default_value_t = 600)]
    detect_ms: u64,
    /// Rounds of the comparison (restart from the latest snapshot).
    #[arg(long, default_value_t = 3)]
    baseline: u32,
    /// Directory for the JSON (default: target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One failover, as the scenario measured it.
#[derive(Debug, Clone, Serialize)]
struct Failover {
    kill: u32,
    detect_ms: f64,
    resume_ms: f64,
    client_gap_ms: f64,
}

/// One restart from a snapshot.
#[derive(Debug, Clone, Serialize)]
struct Restart {
    round: u32,
    client_gap_ms: f64,
    lost_acked: u64,
}

/// p50 and p99 (nearest rank) of a sample.
#[derive(Debug, Clone, Copy, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

fn percentiles(samples: &[f64]) -> Percentiles {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Percentiles {
        p50: rank(0.5),
        p99: rank(0.99),
        max: s[s.len() - 1],
    }
}

#[derive(Serialize)]
struct Report {
    mode: String,
    detect_ms_option: u64,
    failovers: Vec<Failover>,
    detect_ms: Percentiles,
    resume_ms: Percentiles,
    client_gap_ms: Percentiles,
    /// Acknowledged SETs missing from the VM after all the failovers (the scenario checks
    /// every one: it fails if any is missing, so a report exists only with 0).
    lost_acked: u64,
    restarts: Vec<Restart>,
    restart_client_gap_ms: Option<Percentiles>,
    restart_lost_acked: u64,
    /// Client gap of a restart from a snapshot over vmr's failover, p50 over p50.
    gap_ratio: Option<f64>,
    scratch: PathBuf,
}

pub fn run(args: FailoverArgs) -> Result<(), String> {
    if args.kills == 0 {
        return Err("--kills must be at least 1".into());
    }
    if args.mode != "freeze" && args.mode != "kill" {
        return Err(format!("--mode {}: expected freeze or kill", args.mode));
    }
    let images = crate::lab::images()?;
    if std::env::var_os("VMR_BIN").is_none() {
        std::env::set_var("VMR_BIN", crate::lab::build_vmr()?);
    }
    let opts = RunOptions {
        run_id: "bench-failover".into(),
        env: vec![
            ("VMR_FAILOVER_KILLS".into(), args.kills.to_string()),
            ("VMR_FAILOVER_MODE".into(), args.mode.clone()),
            ("VMR_FAILOVER_DETECT_MS".into(), args.detect_ms.to_string()),
            ("VMR_FAILOVER_BASELINE".into(), args.baseline.to_string()),
        ],
        // Boot, then about 25 s per failover and 60 s per restart in the emulated lab.
        timeout_secs: 600 + 60 * args.kills + 120 * args.baseline,
        ..RunOptions::default()
    };
    eprintln!(
        "bench failover: {} failovers ({}) and {} restarts from a snapshot, in one lab run",
        args.kills, args.mode, args.baseline
    );
    let run = vmr_tests::run_attempt("failover_redis", &images, 1, &opts);
    if run.record.outcome != Outcome::Passed {
        return Err(format!(
            "the failover scenario did not pass ({:?}: {}); scratch {}\n{}",
            run.record.outcome,
            run.record.reason,
            run.scratch.display(),
            run.stdout()
        ));
    }
    let failovers: Vec<Failover> = read_table(&run.scratch.join("failover.tsv"))?
        .into_iter()
        .map(|f| Failover {
            kill: f[0] as u32,
            detect_ms: f[1],
            resume_ms: f[2],
            client_gap_ms: f[3],
        })
        .collect();
    if failovers.is_empty() {
        return Err(format!(
            "no failover measured (scratch {})",
            run.scratch.display()
        ));
    }
    let restarts: Vec<Restart> = match args.baseline {
        0 => Vec::new(),
        _ => read_table(&run.scratch.join("baseline.tsv"))?
            .into_iter()
            .map(|f| Restart {
                round: f[0] as u32,
                client_gap_ms: f[1],
                lost_acked: f[2] as u64,
            })
            .collect(),
    };
    let of = |f: fn(&Failover) -> f64| percentiles(&failovers.iter().map(f).collect::<Vec<_>>());
    let client_gap_ms = of(|f| f.client_gap_ms);
    let restart_client_gap_ms = (!restarts.is_empty()).then(|| {
        percentiles(&restarts.iter().map(|r| r.client_gap_ms).collect::<Vec<_>>())
    });
    let report = Report {
        mode: args.mode.clone(),
        detect_ms_option: args.detect_ms,
        detect_ms: of(|f| f.detect_ms),
        resume_ms: of(|f| f.resume_ms),
        client_gap_ms,
        lost_acked: 0,
        gap_ratio: restart_client_gap_ms.map(|r| r.p50 / client_gap_ms.p50),
        restart_client_gap_ms,
        restart_lost_acked: restarts.iter().map(|r| r.lost_acked).sum(),
        failovers,
        restarts,
        scratch: run.scratch.clone(),
    };
    print_table(&report);
    let out = super::out_dir(args.out.as_deref())?;
    let path = super::write_json(&out, "failover.json", &report)?;
    println!("written: {}", path.display());
    println!(
        "failover: detect_ms={:.0} resume_ms={:.0} client_gap_ms={:.0} client_gap_p99_ms={:.0} lost_acked={}",
        report.detect_ms.p50,
        report.resume_ms.p50,
        report.client_gap_ms.p50,
        report.client_gap_ms.p99,
        report.lost_acked
    );
    Ok(())
}

/// The rows of a whitespace-separated table with a header line, as numbers.
fn read_table(path: &Path) -> Result<Vec<Vec<f64>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .map(|v| {
                    v.parse::<f64>()
                        .map_err(|_| format!("{}: not a number: {v:?} in {l:?}", path.display()))
                })
                .collect()
        })
        .collect()
}

fn print_table(r: &Report) {
    println!(
        "failover over {} kills ({}, --detect-ms {}), ms",
        r.failovers.len(),
        r.mode,
        r.detect_ms_option
    );
    println!("{:<40} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    let row = |name: &str, p: &Percentiles| {
        println!("{name:<40} {:>8.0} {:>8.0} {:>8.0}", p.p50, p.p99, p.max);
    };
    row("detection", &r.detect_ms);
    row("detection to VM running (resume)", &r.resume_ms);
    row("client gap, vmr failover", &r.client_gap_ms);
    if let Some(g) = &r.restart_client_gap_ms {
        row("client gap, restart from latest snapshot", g);
    }
    println!(
        "acknowledged SETs lost: vmr {} | restart from snapshot {} (over {} restarts)",
        r.lost_acked,
        r.restart_lost_acked,
        r.restarts.len()
    );
    if let Some(ratio) = r.gap_ratio {
        println!("client gap, restart / vmr (p50): {ratio:.1}x");
    }
}
