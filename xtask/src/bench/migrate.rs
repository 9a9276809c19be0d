//! `cargo xtask bench migrate`: live migration of the same guest by vmr (`vmr receive` +
//! `PUT /migrate`) and by QEMU (`-incoming tcp:` + QMP `migrate`), on one host, idle and while
//! the guest dirties memory at a steady rate; runs alternating.
//!
//! Downtime is what the guest's heartbeat shows: `vmr-dirty` prints a line every
//! [`TICK_MS`], each timed on arrival from the source's and then the destination's console, and
//! the downtime is the longest gap between two heartbeats less one tick (a heartbeat line the
//! source began and the destination finished counts when it is whole). It is the same
//! measure for both monitors, taken outside both; each monitor's own figure is reported beside
//! it (vmr: from pausing to the destination's acknowledgement; QEMU: `query-migrate`'s
//! `downtime`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::guest::{dirty_cmdline, longest_gap, Monitor, Scratch, Setup, BOOT_TIMEOUT, TICK_MS};
use super::qmp::{qmp_arg, Qmp};
use crate::lab;
use crate::stats::Summary;

/// Time the workload runs before the migration starts.
const SETTLE: Duration = Duration::from_secs(2);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Args, Clone)]
pub struct MigrateArgs {
    /// Migrations per monitor and workload.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Memory the guest workload allocates and touches, in MiB.
    #[arg(long, default_value_t = 128)]
    working_set: u64,
    /// How fast the loaded guest dirties its working set, in MiB/s.
    #[arg(long, default_value_t = 16)]
    dirty_rate: u64,
    /// The downtime both monitors are asked to stay under (vmr's `max_downtime_ms`, QEMU's
    /// `downtime-limit`).
    #[arg(long, default_value_t = 300)]
    max_downtime_ms: u64,
    /// Print vmr's log of every migration (set `VMR_LOG=info` to have one).
    #[arg(long)]
    verbose: bool,
    /// Directory for the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure here (set when re-run inside the lab).
    #[arg(long, hide = true)]
    inside: bool,
}

impl MigrateArgs {
    fn as_args(&self) -> Vec<String> {
        vec![
            format!("--runs={}", self.runs),
            format!("--vcpus={}", self.vcpus),
            format!("--mem={}", self.mem),
            format!("--working-set={}", self.working_set),
            format!("--dirty-rate={}", self.dirty_rate),
            format!("--max-downtime-ms={}", self.max_downtime_ms),
        ]
        .into_iter()
        .chain(self.verbose.then(|| "--verbose".to_string()))
        .collect()
    }
}

/// One migration.
struct Sample {
    /// Longest heartbeat gap less one tick.
    downtime_ms: f64,
    /// The heartbeat gap across the move (last at the source to first at the destination)
    /// less one tick.
    switch_over_ms: f64,
    /// The monitor's own downtime figure.
    reported_downtime_ms: f64,
    /// From asking for the migration to its end as the source sees it.
    total_ms: f64,
}

#[derive(Serialize)]
struct MonitorResult {
    failed_runs: usize,
    downtime_ms: Summary,
    switch_over_ms: Summary,
    reported_downtime_ms: Summary,
    total_ms: Summary,
    samples_downtime_ms: Vec<f64>,
}

#[derive(Default)]
struct Samples {
    ok: Vec<Sample>,
    failed: usize,
}

impl Samples {
    fn record(&mut self, label: &str, run: Result<Sample, String>) {
        match run {
            Ok(s) => {
                eprintln!(
                    "{label}: downtime {:7.1} ms (switch-over {:7.1}, monitor says {:7.1}), \
                     total {:8.1} ms",
                    s.downtime_ms, s.switch_over_ms, s.reported_downtime_ms, s.total_ms
                );
                self.ok.push(s);
            }
            Err(e) => {
                eprintln!("{label}: FAILED: {e}");
                self.failed += 1;
            }
        }
    }

    fn result(&self) -> Option<MonitorResult> {
        if self.ok.is_empty() {
            return None;
        }
        let of = |f: fn(&Sample) -> f64| Summary::of(&self.ok.iter().map(f).collect::<Vec<_>>());
        Some(MonitorResult {
            failed_runs: self.failed,
            downtime_ms: of(|s| s.downtime_ms),
            switch_over_ms: of(|s| s.switch_over_ms),
            reported_downtime_ms: of(|s| s.reported_downtime_ms),
            total_ms: of(|s| s.total_ms),
            samples_downtime_ms: self.ok.iter().map(|s| s.downtime_ms).collect(),
        })
    }
}

#[derive(Serialize)]
struct WorkloadResult {
    workload: &'static str,
    dirty_rate_mib_s: u64,
    vmr: MonitorResult,
    qemu: MonitorResult,
    /// vmr's median downtime over QEMU's.
    ratio: f64,
}

#[derive(Serialize)]
struct MigrateReport {
    vcpus: u8,
    mem_mib: u64,
    working_set_mib: u64,
    max_downtime_ms: u64,
    tick_ms: u64,
    kernel: String,
    initrd: String,
    workloads: Vec<WorkloadResult>,
}

pub fn run(args: MigrateArgs) -> Result<(), String> {
    let out = super::out_dir(args.out.as_deref())?;
    if args.inside || lab::can_boot_linux_here() {
        return measure(&args, &out);
    }
    eprintln!("bench migrate: this host cannot boot stock Linux guests; running in the lab");
    super::rerun_in_lab("migrate", args.as_args(), &out)
}

/// A free TCP port on the loopback.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// What the guest's heartbeats (the source's, then the destination's, whose first few it waits
/// for) show of a migration that started at `start`: the longest gap and the gap across the
/// move, each less one tick, in ms.
fn observed_downtime(src: &Monitor, dest: &Monitor, start: Instant) -> Result<(f64, f64), String> {
    dest.console
        .wait_ticks_after(start, 5, Duration::from_secs(30))
        .map_err(|e| format!("the guest does not run on the destination: {e}"))?;
    let end = Instant::now();
    let from = start - Duration::from_millis(5 * TICK_MS);
    let at_source = src.console.ticks();
    let mut at_dest = dest.console.ticks();
    at_dest.extend(dest.console.finished_heartbeat());
    let switch_over = match (at_source.iter().max(), at_dest.iter().min()) {
        (Some(last), Some(first)) if first > last => *first - *last,
        _ => return Err("no heartbeat on one side of the move".into()),
    };
    let mut ticks = at_source;
    ticks.extend(at_dest);
    let less_a_tick = |gap: Duration| (gap.as_secs_f64() * 1000.0 - TICK_MS as f64).max(0.0);
    Ok((
        less_a_tick(longest_gap(&ticks, from, end)),
        less_a_tick(switch_over),
    ))
}

fn vmr_once(
    setup: &Setup,
    args: &MigrateArgs,
    cmdline: &str,
    scratch: &Scratch,
) -> Result<Sample, String> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let dest = Monitor::spawn(
        "vmr receive",
        setup.vmr().args(["receive", "--listen", &addr]),
    )?;
    dest.errors
        .wait_line("waiting for a migration", Duration::from_secs(30))?;
    let socket = scratch.path("vmr-source.sock");
    let _ = std::fs::remove_file(&socket);
    let mut src = Monitor::spawn(
        "vmr run",
        setup
            .vmr_run(args.vcpus, args.mem, cmdline)
            .arg("--api")
            .arg(&socket),
    )?;
    src.console.wait_ready(BOOT_TIMEOUT)?;
    std::thread::sleep(SETTLE);

    let start = Instant::now();
    let info = vmm::api::client::ApiClient::new(&socket)
        .migrate(&vmm::api::MigrateParams {
            destination: addr.clone(),
            max_downtime_ms: Some(args.max_downtime_ms),
            compress: false,
        })
        .map_err(|e| format!("migration: {e}"))?;
    let total = start.elapsed();
    let (downtime_ms, switch_over_ms) = observed_downtime(&src, &dest, start)?;
    src.wait_exit(Duration::from_secs(30))?;
    if args.verbose {
        src.print_log();
        dest.print_log();
    }
    Ok(Sample {
        downtime_ms,
        switch_over_ms,
        reported_downtime_ms: info.downtime_ms,
        total_ms: total.as_secs_f64() * 1000.0,
    })
}

fn qemu_once(
    setup: &Setup,
    args: &MigrateArgs,
    cmdline: &str,
    scratch: &Scratch,
) -> Result<Sample, String> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let dest_qmp = scratch.path("qemu-dest.qmp");
    let dest = Monitor::spawn(
        "qemu -incoming",
        setup
            .qemu(args.vcpus, args.mem, cmdline)
            .args(["-incoming", &format!("tcp:{addr}")])
            .args(["-qmp", &qmp_arg(&dest_qmp)]),
    )?;
    // QMP answers once the incoming socket listens.
    let _dest_control = Qmp::connect(&dest_qmp, Duration::from_secs(30))?;
    let src_qmp = scratch.path("qemu-source.qmp");
    let src = Monitor::spawn(
        "qemu",
        setup
            .qemu(args.vcpus, args.mem, cmdline)
            .args(["-qmp", &qmp_arg(&src_qmp)]),
    )?;
    let mut qmp = Qmp::connect(&src_qmp, Duration::from_secs(30))?;
    src.console.wait_ready(BOOT_TIMEOUT)?;
    std::thread::sleep(SETTLE);
    qmp.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": args.max_downtime_ms, "max-bandwidth": 1u64 << 40 }),
    )?;

    let start = Instant::now();
    qmp.execute("migrate", json!({ "uri": format!("tcp:{addr}") }))?;
    let info = qmp.wait_migration(MIGRATION_TIMEOUT)?;
    let total = start.elapsed();
    let (downtime_ms, switch_over_ms) = observed_downtime(&src, &dest, start)?;
    Ok(Sample {
        downtime_ms,
        switch_over_ms,
        reported_downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        total_ms: total.as_secs_f64() * 1000.0,
    })
}

fn measure(args: &MigrateArgs, out: &Path) -> Result<(), String> {
    let setup = Setup::new()?;
    let scratch = Scratch::new("migrate")?;
    let workloads = [("idle", 0), ("load", args.dirty_rate)];
    let mut samples: Vec<(Samples, Samples)> =
        workloads.iter().map(|_| Default::default()).collect();
    for i in 1..=args.runs {
        for ((name, rate), (vmr, qemu)) in workloads.iter().zip(samples.iter_mut()) {
            let cmdline = dirty_cmdline(args.working_set, *rate, TICK_MS);
            let label = |m: &str| format!("run {i:>2}/{} {name:<4} {m:<4}", args.runs);
            vmr.record(&label("vmr"), vmr_once(&setup, args, &cmdline, &scratch));
            qemu.record(&label("qemu"), qemu_once(&setup, args, &cmdline, &scratch));
        }
    }

    let mut results = Vec::new();
    for ((name, rate), (vmr, qemu)) in workloads.iter().zip(&samples) {
        let (Some(v), Some(q)) = (vmr.result(), qemu.result()) else {
            return Err(format!("every {name} migration of one monitor failed"));
        };
        if vmr.ok.len() * 2 < args.runs || qemu.ok.len() * 2 < args.runs {
            return Err(format!(
                "too many failed {name} migrations (vmr {}, qemu {} of {})",
                vmr.failed, qemu.failed, args.runs
            ));
        }
        let ratio = v.downtime_ms.median / q.downtime_ms.median;
        results.push(WorkloadResult {
            workload: name,
            dirty_rate_mib_s: *rate,
            vmr: v,
            qemu: q,
            ratio,
        });
    }

    println!(
        "\nmigrate: {} MiB guest, {} vCPUs, workload vmr-dirty touching {} MiB, idle and at {} MiB/s; \
         both asked for at most {} ms of downtime; {} runs each, alternating",
        args.mem, args.vcpus, args.working_set, args.dirty_rate, args.max_downtime_ms, args.runs
    );
    println!(
        "downtime: longest gap between the guest's {TICK_MS} ms heartbeats, less one tick; \
         switch-over: the gap across the move (last heartbeat at the source to first at the \
         destination), less one tick; the monitor's own figure beside them"
    );
    println!(
        "{:<10}{:<8}{:>6}{:>14}{:>10}{:>14}{:>16}{:>14}{:>10}",
        "workload",
        "monitor",
        "runs",
        "downtime ms",
        "p90 ms",
        "switch-over",
        "monitor says",
        "total ms",
        "ratio"
    );
    for w in &results {
        for (name, r) in [("vmr", &w.vmr), ("qemu", &w.qemu)] {
            let ratio = if name == "vmr" {
                format!("{:.3}", w.ratio)
            } else {
                String::new()
            };
            println!(
                "{:<10}{:<8}{:>6}{:>14.1}{:>10.1}{:>14.1}{:>16.1}{:>14.1}{:>10}",
                w.workload,
                name,
                r.downtime_ms.runs,
                r.downtime_ms.median,
                r.downtime_ms.p90,
                r.switch_over_ms.median,
                r.reported_downtime_ms.median,
                r.total_ms.median,
                ratio
            );
        }
    }
    let report = MigrateReport {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        working_set_mib: args.working_set,
        max_downtime_ms: args.max_downtime_ms,
        tick_ms: TICK_MS,
        kernel: setup.kernel.clone(),
        initrd: setup.initrd.clone(),
        workloads: results,
    };
    let json = super::write_json(out, "migrate.json", &report)?;
    println!("(JSON: {})", json.display());
    let load = &report.workloads[1];
    println!(
        "migrate: vmr_downtime_ms={:.1} qemu_downtime_ms={:.1} ratio={:.3}",
        load.vmr.downtime_ms.median, load.qemu.downtime_ms.median, load.ratio
    );
    Ok(())
}
