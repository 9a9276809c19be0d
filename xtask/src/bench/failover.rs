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
//! With it, in the same command, the same failovers of the tiny epoch-writer guest on this
//! host's own `/dev/kvm` (no network): detection and resume on these machines.
//!
//! Final line (detection and resume on this host when measured, the gap the lab's):
//! `failover: detect_ms=<p50> resume_ms=<p50> client_gap_ms=<p50> client_gap_p99_ms=<p99>
//! lost_acked=<n>`.

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
    /// Skip the failovers of the tiny guest on this host's /dev/kvm.
    #[arg(long)]
    no_direct: bool,
    /// Only the failovers on this host: their figures are added to the `failover.json` of an
    /// earlier lab run in --out (the lab is not run).
    #[arg(long, conflicts_with = "no_direct")]
    direct_only: bool,
    /// The standbys' --detect-ms on this host (tiny guest).
    #[arg(long, default_value_t = 50)]
    direct_detect_ms: u64,
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

/// The failovers of the tiny guest on this host's `/dev/kvm`.
#[derive(Serialize)]
struct Direct {
    detect_ms_option: u64,
    failovers: Vec<Failover>,
    detect_ms: Percentiles,
    resume_ms: Percentiles,
}

#[derive(Serialize)]
struct Report {
    /// On this host (tiny guest, no network): detection and resume on these machines.
    direct: Option<Direct>,
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
    let direct = match args.no_direct {
        true => None,
        false => {
            eprintln!(
                "bench failover: {} failovers of the tiny guest on this host's /dev/kvm",
                args.kills
            );
            let failovers = direct::run(args.kills, args.direct_detect_ms)?;
            let of =
                |f: fn(&Failover) -> f64| percentiles(&failovers.iter().map(f).collect::<Vec<_>>());
            Some(Direct {
                detect_ms_option: args.direct_detect_ms,
                detect_ms: of(|f| f.detect_ms),
                resume_ms: of(|f| f.resume_ms),
                failovers,
            })
        }
    };
    if args.direct_only {
        let (Some(direct), false) = (direct, args.no_direct) else {
            return Err("--direct-only measured nothing".into());
        };
        return add_direct(args.out.as_deref(), direct);
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
    let restart_client_gap_ms = (!restarts.is_empty())
        .then(|| percentiles(&restarts.iter().map(|r| r.client_gap_ms).collect::<Vec<_>>()));
    let report = Report {
        direct,
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
    // The scenario ran in the lab, this process outside it: say so in the meta.
    update_json(&path, |json| {
        json["meta"]["lab"]["mode"] = "images/lab (the scenario)".into();
        json["meta"]["lab"]["cpus"] = vmr_tests::LAB_CPUS.into();
    })?;
    println!("written: {}", path.display());
    // Detection and resume on these machines (this host's KVM) when measured; the client's
    // gap needs the network: the lab's.
    let (detect, resume) = report
        .direct
        .as_ref()
        .map_or((report.detect_ms, report.resume_ms), |d| {
            (d.detect_ms, d.resume_ms)
        });
    println!(
        "failover: detect_ms={:.0} resume_ms={:.0} client_gap_ms={:.0} client_gap_p99_ms={:.0} lost_acked={}",
        detect.p50, resume.p50, report.client_gap_ms.p50, report.client_gap_ms.p99, report.lost_acked
    );
    Ok(())
}

/// Adds `direct` to the `failover.json` of an earlier lab run in `out`, and prints the lines.
fn add_direct(out: Option<&Path>, direct: Direct) -> Result<(), String> {
    let path = super::out_dir(out)?.join("failover.json");
    let value = serde_json::to_value(&direct).map_err(|e| e.to_string())?;
    let json = update_json(&path, |json| json["direct"] = value)
        .map_err(|e| format!("{e} (run the lab part first)"))?;
    let (p50, p99) = (
        json["client_gap_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
        json["client_gap_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "failover of the tiny guest on this host's /dev/kvm over {} freezes (--detect-ms {}): \
         detection p50 {:.1} p99 {:.1} ms, to running p50 {:.1} p99 {:.1} ms",
        direct.failovers.len(),
        direct.detect_ms_option,
        direct.detect_ms.p50,
        direct.detect_ms.p99,
        direct.resume_ms.p50,
        direct.resume_ms.p99
    );
    println!("written: {}", path.display());
    println!(
        "failover: detect_ms={:.0} resume_ms={:.0} client_gap_ms={p50:.0} client_gap_p99_ms={p99:.0} lost_acked={}",
        direct.detect_ms.p50,
        direct.resume_ms.p50,
        json["lost_acked"].as_u64().unwrap_or(0)
    );
    Ok(())
}

/// Reads the JSON at `path`, changes it with `f`, writes it back; the new JSON.
fn update_json(
    path: &Path,
    f: impl FnOnce(&mut serde_json::Value),
) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    f(&mut json);
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(json)
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
    if let Some(d) = &r.direct {
        println!(
            "failover of the tiny guest on this host's /dev/kvm over {} freezes (--detect-ms {}), ms",
            d.failovers.len(),
            d.detect_ms_option
        );
        println!("{:<40} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
        for (name, p) in [
            ("detection", &d.detect_ms),
            ("detection to VM running", &d.resume_ms),
        ] {
            println!("{name:<40} {:>8.1} {:>8.1} {:>8.1}", p.p50, p.p99, p.max);
        }
        println!();
    }
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

/// `--direct`: failovers of the tiny epoch-writer guest on this host's own `/dev/kvm` (no
/// network, no lab): what detection and resume take on these machines. A primary
/// (`vmr run --protect --coordinator`) and a standby, a real etcd; each round freezes the
/// primary (SIGSTOP), the standby takes the VM over, a new standby is paired with
/// `vmr ctl protect`, and the next round freezes the new primary.
mod direct {
    use std::net::TcpListener;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use super::Failover;

    /// A child process killed on drop.
    struct Proc(Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> Result<u16, String> {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port: {e}"))
    }

    /// Seconds since midnight UTC of a tracing timestamp (`2026-12-07T10:07:29.070375Z ...`).
    fn log_time(line: &str) -> Option<f64> {
        let t = line.split_whitespace().next()?;
        let clock = t.split_once('T')?.1.trim_end_matches('Z');
        let mut parts = clock.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    }

    fn now_of_day() -> f64 {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
    }

    /// The first line of `log` containing `needle`, waited for `within`.
    fn wait_line(log: &Path, needle: &str, within: Duration) -> Result<String, String> {
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            if t0.elapsed() > within {
                return Err(format!(
                    "no \"{needle}\" in {} within {within:?}; its end:\n{}",
                    log.display(),
                    text.lines().rev().take(10).collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn spawn(vmr: &Path, args: &[String], log: &Path) -> Result<Proc, String> {
        let err = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        Command::new(vmr)
            .args(args)
            .env("VMR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map(Proc)
            .map_err(|e| format!("cannot run {}: {e}", vmr.display()))
    }

    /// A standby `host-<i>`, its API socket and log.
    fn standby(
        vmr: &Path,
        dir: &Path,
        i: u32,
        key: &Path,
        coordinator: &str,
        detect_ms: u64,
    ) -> Result<(Proc, String, PathBuf, PathBuf), String> {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let api = dir.join(format!("host{i}.sock"));
        let log = dir.join(format!("host{i}.log"));
        let args: Vec<String> = [
            "standby",
            "--listen",
            &addr,
            "--key-file",
            &key.display().to_string(),
            "--api",
            &api.display().to_string(),
            "--coordinator",
            coordinator,
            "--host-id",
            &format!("host{i}"),
            "--detect-ms",
            &detect_ms.to_string(),
            "--allow-pvm",
        ]
        .map(String::from)
        .to_vec();
        let p = spawn(vmr, &args, &log)?;
        wait_line(&log, "standing by for a primary", Duration::from_secs(10))?;
        Ok((p, addr, api, log))
    }

    /// Waits until the standby of `api` may take the VM over.
    fn wait_ready(vmr: &Path, api: &Path) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let out = Command::new(vmr)
                .args(["ctl", "--api"])
                .arg(api)
                .arg("replication")
                .output()
                .map_err(|e| e.to_string())?;
            if String::from_utf8_lossy(&out.stdout).contains("ready to take it over") {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the standby at {} was not ready within 60 s: {}",
                    api.display(),
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn run(kills: u32, detect_ms: u64) -> Result<Vec<Failover>, String> {
        let dir = crate::repo_root().join("target/bench/failover-direct");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let vmr = crate::lab::build_vmr()?;
        let elf = crate::bench::epoch::guest_elf(&dir)?;
        let key = dir.join("key");
        std::fs::write(&key, [7u8; 32]).map_err(|e| e.to_string())?;
        let (client, peer) = (free_port()?, free_port()?);
        let etcd_log = std::fs::File::create(dir.join("etcd.log")).map_err(|e| e.to_string())?;
        let _etcd = Command::new("etcd")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(etcd_log)
            .spawn()
            .map(Proc)
            .map_err(|e| format!("cannot run etcd (Debian's etcd-server): {e}"))?;
        let coordinator = format!("etcd://127.0.0.1:{client}");
        let (mut standby_proc, addr, mut api, mut log) =
            standby(&vmr, &dir, 1, &key, &coordinator, detect_ms)?;
        let primary_args: Vec<String> = [
            "run",
            "--kernel",
            &elf.display().to_string(),
            "--mem",
            "64",
            "--allow-pvm",
            "--serial",
            "none",
            "--protect",
            &addr,
            "--key-file",
            &key.display().to_string(),
            "--coordinator",
            &coordinator,
            "--vm-id",
            "bench",
            "--host-id",
            "host0",
            "--api",
            &dir.join("host0.sock").display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        let mut primary = spawn(&vmr, &primary_args, &dir.join("host0.log"))?;
        let mut results = Vec::new();
        for k in 1..=kills {
            wait_ready(&vmr, &api)?;
            // Let a few epochs go by: the freeze comes at a random point of one.
            std::thread::sleep(Duration::from_millis(200 + u64::from(k * 37 % 100)));
            let stopped = now_of_day();
            // SAFETY: signals a child process of this one, which it has not waited for.
            if unsafe { libc::kill(primary.0.id() as i32, libc::SIGSTOP) } != 0 {
                return Err("cannot stop the primary".into());
            }
            let lost = wait_line(&log, "PRIMARY LOST", Duration::from_secs(30))?;
            let taken = wait_line(&log, "TAKEN OVER", Duration::from_secs(30))?;
            let (Some(lost), Some(taken)) = (log_time(&lost), log_time(&taken)) else {
                return Err(format!("unreadable log times in {}", log.display()));
            };
            results.push(Failover {
                kill: k,
                detect_ms: (lost - stopped) * 1000.0,
                resume_ms: (taken - lost) * 1000.0,
                client_gap_ms: 0.0,
            });
            eprintln!(
                "direct failover {k}/{kills}: detected in {:.1} ms, running {:.1} ms later",
                (lost - stopped) * 1000.0,
                (taken - lost) * 1000.0
            );
            // The standby runs the VM now; a new standby protects it.
            let (next, next_addr, next_api, next_log) =
                standby(&vmr, &dir, k + 1, &key, &coordinator, detect_ms)?;
            let out = Command::new(&vmr)
                .args(["ctl", "--api"])
                .arg(&api)
                .args(["protect", &next_addr])
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "cannot protect the VM again: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            primary = std::mem::replace(&mut standby_proc, next);
            (api, log) = (next_api, next_log);
        }
        drop(primary);
        Ok(results)
    }
}
