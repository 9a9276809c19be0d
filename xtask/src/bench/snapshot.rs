//! `cargo xtask bench snapshot`: saving a running guest to files and bringing it back, vmr
//! (`PUT /snapshot/create`, `vmr restore --from`) against QEMU (QMP `stop` + `migrate` to
//! `exec:cat > FILE`, then `-incoming exec:cat FILE` + `cont`, as `virsh save`/`restore` do);
//! same guest, same workload, files in the same (memory-backed) directory; runs alternating.
//!
//! - create: from asking for the snapshot to the files being complete (vmr's API call returns
//!   then; QEMU's migration reports `completed`).
//! - restore to running: from starting the restoring monitor process to the guest's first
//!   heartbeat on its console (the guest ticks every [`TICK_MS`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::guest::{dirty_cmdline, Monitor, Scratch, Setup, BOOT_TIMEOUT, TICK_MS};
use super::qmp::{qmp_arg, Qmp};
use crate::lab;
use crate::stats::Summary;

const SETTLE: Duration = Duration::from_secs(1);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args, Clone)]
pub struct SnapshotArgs {
    /// Snapshots and restores per monitor.
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
    /// Directory for the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure here (set when re-run inside the lab).
    #[arg(long, hide = true)]
    inside: bool,
}

/// One snapshot and its restore.
struct Sample {
    create_ms: f64,
    restore_ms: f64,
    bytes: u64,
}

#[derive(Serialize)]
struct MonitorResult {
    failed_runs: usize,
    create_ms: Summary,
    restore_to_running_ms: Summary,
    snapshot_mib: Summary,
    samples_create_ms: Vec<f64>,
    samples_restore_to_running_ms: Vec<f64>,
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
                    "{label}: create {:7.1} ms, restore to running {:7.1} ms, {:6.1} MiB on disk",
                    s.create_ms,
                    s.restore_ms,
                    s.bytes as f64 / 1048576.0
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
            create_ms: of(|s| s.create_ms),
            restore_to_running_ms: of(|s| s.restore_ms),
            snapshot_mib: of(|s| s.bytes as f64 / 1048576.0),
            samples_create_ms: self.ok.iter().map(|s| s.create_ms).collect(),
            samples_restore_to_running_ms: self.ok.iter().map(|s| s.restore_ms).collect(),
        })
    }
}

#[derive(Serialize)]
struct SnapshotReport {
    vcpus: u8,
    mem_mib: u64,
    working_set_mib: u64,
    kernel: String,
    initrd: String,
    vmr: MonitorResult,
    qemu: MonitorResult,
    create_ratio: f64,
    restore_ratio: f64,
}

pub fn run(args: SnapshotArgs) -> Result<(), String> {
    let out = super::out_dir(args.out.as_deref())?;
    if args.inside || lab::can_boot_linux_here() {
        return measure(&args, &out);
    }
    eprintln!("bench snapshot: this host cannot boot stock Linux guests; running in the lab");
    let rerun = vec![
        format!("--runs={}", args.runs),
        format!("--vcpus={}", args.vcpus),
        format!("--mem={}", args.mem),
        format!("--working-set={}", args.working_set),
    ];
    super::rerun_in_lab("snapshot", rerun, &out)
}

/// Bytes the files under `path` occupy (allocated blocks: sparse holes do not count).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

/// Waits for the restored guest's first heartbeat; the time since `start`.
fn first_heartbeat(restored: &Monitor, start: Instant) -> Result<f64, String> {
    let first = restored
        .console
        .wait_ticks_after(start, 1, RESTORE_TIMEOUT)
        .map_err(|e| format!("the restored guest does not run: {e}"))?;
    // A few more: it keeps running.
    restored
        .console
        .wait_ticks_after(start, 5, RESTORE_TIMEOUT)
        .map_err(|e| format!("the restored guest stopped: {e}"))?;
    Ok((first - start).as_secs_f64() * 1000.0)
}

fn vmr_once(setup: &Setup, args: &SnapshotArgs, scratch: &Scratch) -> Result<Sample, String> {
    let cmdline = dirty_cmdline(args.working_set, 0, TICK_MS);
    let socket = scratch.path("vmr.sock");
    let dir = scratch.path("vmr-snapshot");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&dir);
    let src = Monitor::spawn(
        "vmr run",
        setup
            .vmr_run(args.vcpus, args.mem, &cmdline)
            .arg("--api")
            .arg(&socket),
    )?;
    src.console.wait_ready(BOOT_TIMEOUT)?;
    std::thread::sleep(SETTLE);
    let start = Instant::now();
    vmm::api::client::ApiClient::new(&socket)
        .snapshot(&dir, vmm::api::SnapshotType::Full)
        .map_err(|e| format!("snapshot: {e}"))?;
    let create_ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(src);

    let start = Instant::now();
    let restored = Monitor::spawn(
        "vmr restore",
        setup.vmr().args(["restore", "--from"]).arg(&dir),
    )?;
    let restore_ms = first_heartbeat(&restored, start)?;
    drop(restored);
    let bytes = disk_usage(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Sample {
        create_ms,
        restore_ms,
        bytes,
    })
}

fn qemu_once(setup: &Setup, args: &SnapshotArgs, scratch: &Scratch) -> Result<Sample, String> {
    let cmdline = dirty_cmdline(args.working_set, 0, TICK_MS);
    let file = scratch.path("qemu-snapshot");
    let qmp_socket = scratch.path("qemu.qmp");
    let _ = std::fs::remove_file(&file);
    let qmp_arg = qmp_arg(&qmp_socket);
    let src = Monitor::spawn(
        "qemu",
        setup
            .qemu(args.vcpus, args.mem, &cmdline)
            .args(["-qmp", &qmp_arg]),
    )?;
    let mut qmp = Qmp::connect(&qmp_socket, Duration::from_secs(30))?;
    src.console.wait_ready(BOOT_TIMEOUT)?;
    std::thread::sleep(SETTLE);
    let start = Instant::now();
    qmp.execute("stop", json!({}))?;
    let uri = format!("exec:cat > {}", file.display());
    qmp.execute("migrate", json!({ "uri": uri }))?;
    qmp.wait_migration(Duration::from_secs(120))?;
    let create_ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(qmp);
    drop(src);
    let _ = std::fs::remove_file(&qmp_socket);

    let start = Instant::now();
    let restored = Monitor::spawn(
        "qemu -incoming",
        setup
            .qemu(args.vcpus, args.mem, &cmdline)
            .args(["-incoming", &format!("exec:cat {}", file.display())])
            .args(["-qmp", &qmp_arg]),
    )?;
    let mut qmp = Qmp::connect(&qmp_socket, Duration::from_secs(30))?;
    // The saved VM was stopped, so the loaded one waits for `cont`.
    qmp.wait_status("paused", RESTORE_TIMEOUT)?;
    qmp.execute("cont", json!({}))?;
    let restore_ms = first_heartbeat(&restored, start)?;
    drop(restored);
    let bytes = disk_usage(&file);
    let _ = std::fs::remove_file(&file);
    Ok(Sample {
        create_ms,
        restore_ms,
        bytes,
    })
}

fn measure(args: &SnapshotArgs, out: &Path) -> Result<(), String> {
    let setup = Setup::new()?;
    let scratch = Scratch::new("snapshot")?;
    let mut vmr = Samples::default();
    let mut qemu = Samples::default();
    for i in 1..=args.runs {
        let label = |m: &str| format!("run {i:>2}/{} {m:<4}", args.runs);
        vmr.record(&label("vmr"), vmr_once(&setup, args, &scratch));
        qemu.record(&label("qemu"), qemu_once(&setup, args, &scratch));
    }
    let (Some(v), Some(q)) = (vmr.result(), qemu.result()) else {
        return Err("every run of one monitor failed".into());
    };
    if vmr.ok.len() * 2 < args.runs || qemu.ok.len() * 2 < args.runs {
        return Err(format!(
            "too many failed runs (vmr {}, qemu {} of {})",
            vmr.failed, qemu.failed, args.runs
        ));
    }
    let report = SnapshotReport {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        working_set_mib: args.working_set,
        kernel: setup.kernel.clone(),
        initrd: setup.initrd.clone(),
        create_ratio: v.create_ms.median / q.create_ms.median,
        restore_ratio: v.restore_to_running_ms.median / q.restore_to_running_ms.median,
        vmr: v,
        qemu: q,
    };
    println!(
        "\nsnapshot: {} MiB guest, {} vCPUs, workload vmr-dirty touching {} MiB; files in {}; {} runs each, alternating",
        args.mem,
        args.vcpus,
        args.working_set,
        scratch.0.parent().unwrap_or(&scratch.0).display(),
        args.runs
    );
    println!(
        "{:<8}{:>6}{:>12}{:>10}{:>22}{:>10}{:>14}",
        "monitor", "runs", "create ms", "p90 ms", "restore->running ms", "p90 ms", "on disk MiB"
    );
    for (name, r) in [("vmr", &report.vmr), ("qemu", &report.qemu)] {
        println!(
            "{:<8}{:>6}{:>12.1}{:>10.1}{:>22.1}{:>10.1}{:>14.1}",
            name,
            r.create_ms.runs,
            r.create_ms.median,
            r.create_ms.p90,
            r.restore_to_running_ms.median,
            r.restore_to_running_ms.p90,
            r.snapshot_mib.median
        );
    }
    let json = super::write_json(out, "snapshot.json", &report)?;
    println!("(JSON: {})", json.display());
    println!(
        "snapshot: vmr_create_ms={:.1} qemu_create_ms={:.1} create_ratio={:.3} vmr_restore_ms={:.1} qemu_restore_ms={:.1} restore_ratio={:.3}",
        report.vmr.create_ms.median,
        report.qemu.create_ms.median,
        report.create_ratio,
        report.vmr.restore_to_running_ms.median,
        report.qemu.restore_to_running_ms.median,
        report.restore_ratio
    );
    Ok(())
}
