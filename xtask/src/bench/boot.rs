//! `cargo xtask bench boot`: time from starting the monitor to the guest's init marker, vmr
//! against QEMU's microvm machine, same kernel, initramfs, memory and vCPUs, runs alternating.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::guest::{Setup, QUIET};
use super::proc::{kill, rss_beyond_guest_kib, wait_for_marker};
use crate::lab;
use crate::stats::Summary;

/// The line the guest's /init prints first.
const MARKER: &str = "VMR-INIT-READY";
const TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Args, Clone)]
pub struct BootArgs {
    /// Runs of each monitor.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// vCPUs of the guest.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Directory for the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure here (set when re-run inside the lab).
    #[arg(long, hide = true)]
    inside: bool,
}

#[derive(Serialize)]
struct MonitorResult {
    failed_runs: usize,
    boot_ms: Summary,
    rss_beyond_guest_mib: Summary,
    samples_ms: Vec<f64>,
}

#[derive(Serialize)]
struct BootReport {
    vcpus: u8,
    mem_mib: u64,
    kernel: String,
    initrd: String,
    cmdline: String,
    vmr: MonitorResult,
    qemu: MonitorResult,
    ratio: f64,
}

pub fn run(args: BootArgs) -> Result<(), String> {
    let out = super::out_dir(args.out.as_deref())?;
    if args.inside || lab::can_boot_linux_here() {
        return measure(&args, &out);
    }
    eprintln!("bench boot: this host cannot boot stock Linux guests; running in the lab");
    let rerun = vec![
        format!("--runs={}", args.runs),
        format!("--vcpus={}", args.vcpus),
        format!("--mem={}", args.mem),
    ];
    super::rerun_in_lab("boot", rerun, &out)
}

fn one_run(name: &str, cmd: &mut Command) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let result = wait_for_marker(stdout, MARKER, start, TIMEOUT)
        .and_then(|elapsed| Ok((elapsed, rss_beyond_guest_kib(child.id())?)));
    kill(&mut child);
    let (elapsed, rss_kib) = result.map_err(|e| format!("{name}: {e}"))?;
    Ok((elapsed.as_secs_f64() * 1000.0, rss_kib as f64 / 1024.0))
}

/// The runs of one monitor.
#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    rss_mib: Vec<f64>,
    failed: usize,
}

impl Samples {
    fn record(&mut self, name: &str, i: usize, runs: usize, run: Result<(f64, f64), String>) {
        match run {
            Ok((ms, rss)) => {
                eprintln!(
                    "run {i:>2}/{runs}: {name:<4} {ms:8.1} ms  {rss:6.2} MiB beyond guest RAM"
                );
                self.ms.push(ms);
                self.rss_mib.push(rss);
            }
            Err(e) => {
                eprintln!("run {i:>2}/{runs}: {name:<4} FAILED: {e}");
                self.failed += 1;
            }
        }
    }

    fn result(self) -> MonitorResult {
        MonitorResult {
            failed_runs: self.failed,
            boot_ms: Summary::of(&self.ms),
            rss_beyond_guest_mib: Summary::of(&self.rss_mib),
            samples_ms: self.ms,
        }
    }
}

fn measure(args: &BootArgs, out: &Path) -> Result<(), String> {
    let setup = Setup::new()?;
    let cmdline = format!("{} {QUIET}", vmm::builder::BASE_CMDLINE);
    let vmr_cmd = || setup.vmr_run(args.vcpus, args.mem, QUIET);
    let qemu_cmd = || setup.qemu(args.vcpus, args.mem, QUIET);

    let mut vmr = Samples::default();
    let mut qemu = Samples::default();
    for i in 1..=args.runs {
        vmr.record("vmr", i, args.runs, one_run("vmr", &mut vmr_cmd()));
        qemu.record("qemu", i, args.runs, one_run("qemu", &mut qemu_cmd()));
    }
    if vmr.ms.len() * 2 < args.runs || qemu.ms.len() * 2 < args.runs {
        return Err(format!(
            "too many failed runs (vmr {}, qemu {} of {})",
            vmr.failed, qemu.failed, args.runs
        ));
    }

    let vmr = vmr.result();
    let qemu = qemu.result();
    let ratio = vmr.boot_ms.median / qemu.boot_ms.median;
    println!(
        "\nboot: monitor start -> {MARKER} on the console; {} runs each, alternating; {} vCPUs, {} MiB; kernel args: {}",
        args.runs, args.vcpus, args.mem, cmdline
    );
    println!(
        "{:<8}{:>6}{:>12}{:>10}{:>10}{:>10}{:>26}",
        "monitor", "runs", "median ms", "p90 ms", "min ms", "max ms", "RSS beyond guest (MiB)"
    );
    for (name, r) in [("vmr", &vmr), ("qemu", &qemu)] {
        println!(
            "{:<8}{:>6}{:>12.1}{:>10.1}{:>10.1}{:>10.1}{:>26.2}",
            name,
            r.boot_ms.runs,
            r.boot_ms.median,
            r.boot_ms.p90,
            r.boot_ms.min,
            r.boot_ms.max,
            r.rss_beyond_guest_mib.median
        );
    }
    let report = BootReport {
        vcpus: args.vcpus,
        mem_mib: args.mem,
        kernel: setup.kernel.clone(),
        initrd: setup.initrd.clone(),
        cmdline,
        vmr,
        qemu,
        ratio,
    };
    let json = super::write_json(out, "boot.json", &report)?;
    println!("(JSON: {})", json.display());
    println!(
        "boot: vmr_ms={:.1} qemu_ms={:.1} ratio={:.3}",
        report.vmr.boot_ms.median, report.qemu.boot_ms.median, ratio
    );
    Ok(())
}
