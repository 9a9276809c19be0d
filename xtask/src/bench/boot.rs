//! `cargo xtask bench boot`: time from starting the monitor to the guest's init marker, vmr
//! against QEMU's microvm machine, same kernel, initramfs, memory and vCPUs, runs alternating.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::proc::{kill, rss_beyond_guest_kib, wait_for_marker};
use crate::lab;
use crate::stats::Summary;

/// The line the guest's /init prints first.
const MARKER: &str = "VMR-INIT-READY";
const TIMEOUT: Duration = Duration::from_secs(90);
/// Extra kernel arguments for both monitors: each console byte is a VM exit (about 1 ms in the
/// nested lab), so a verbose boot would measure the serial port rather than the monitor.
const BENCH_CMDLINE: &str = "quiet";

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
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::repo_root().join("target/bench"));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    if args.inside || lab::can_boot_linux_here() {
        return measure(&args, &out);
    }
    eprintln!("bench boot: this host cannot boot stock Linux guests; running in the lab");
    let mut env = lab::images()?;
    env.insert("VMR_BIN".into(), lab::build_vmr()?.display().to_string());
    let rerun = vec![
        "bench".into(),
        "boot".into(),
        "--inside".into(),
        format!("--runs={}", args.runs),
        format!("--vcpus={}", args.vcpus),
        format!("--mem={}", args.mem),
        format!("--out={}", out.display()),
    ];
    lab::rerun_in_lab(&rerun, &out, &env)
}

struct Setup {
    vmr: PathBuf,
    kernel: String,
    initrd: String,
    cmdline: String,
}

fn env_or_images(
    images: &mut Option<HashMap<String, String>>,
    key: &str,
) -> Result<String, String> {
    if let Ok(v) = std::env::var(key) {
        return Ok(v);
    }
    if images.is_none() {
        *images = Some(lab::images()?);
    }
    images
        .as_ref()
        .and_then(|m| m.get(key).cloned())
        .ok_or_else(|| format!("images/build gave no {key}"))
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
    let mut images = None;
    let setup = Setup {
        vmr: match std::env::var("VMR_BIN") {
            Ok(bin) => PathBuf::from(bin),
            Err(_) => lab::build_vmr()?,
        },
        kernel: env_or_images(&mut images, "VMR_KERNEL")?,
        initrd: env_or_images(&mut images, "VMR_INITRAMFS")?,
        cmdline: format!("{} {BENCH_CMDLINE}", vmm::builder::BASE_CMDLINE),
    };
    let (mem, vcpus) = (args.mem.to_string(), args.vcpus.to_string());
    let vmr_cmd = || {
        let mut c = Command::new(&setup.vmr);
        c.args(["run", "--kernel", &setup.kernel, "--initrd", &setup.initrd])
            .args(["--vcpus", &vcpus, "--mem", &mem, "--cmdline", BENCH_CMDLINE]);
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new("qemu-system-x86_64");
        // QEMU's leanest microvm: no option ROMs, legacy timers, ACPI (the guest kernel has
        // none); an i8042 like vmr's, for the same reset path.
        c.args([
            "-M",
            "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off",
        ])
        .args(["-enable-kvm", "-cpu", "host", "-device", "i8042"])
        .args(["-smp", &vcpus, "-m", &mem])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args(["-kernel", &setup.kernel, "-initrd", &setup.initrd])
        .args(["-append", &setup.cmdline]);
        c
    };

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
        args.runs, args.vcpus, args.mem, setup.cmdline
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
        cmdline: setup.cmdline.clone(),
        vmr,
        qemu,
        ratio,
    };
    let json = out.join("boot.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", json.display()))?;
    println!("(JSON: {})", json.display());
    println!(
        "boot: vmr_ms={:.1} qemu_ms={:.1} ratio={:.3}",
        report.vmr.boot_ms.median, report.qemu.boot_ms.median, ratio
    );
    Ok(())
}
