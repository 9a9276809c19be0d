//! `cargo xtask bench epoch`: the pause of an epoch checkpoint, vmr (copy-before-write, small
//! epochs copied inside the pause) against the naive way (every dirty page copied inside the
//! pause), in one run on this host's `/dev/kvm` with the epoch writer guest
//! (`vmm/tests/guests/epoch_writer.S`).
//!
//! - pause at 1, 10 and 100 MiB dirty per epoch: the guest writes a batch of that many
//!   distinct random pages, then an epoch is taken; the next batch starts right after the
//!   resume (so it meets the pages still protected). p50/p99/max and the parts.
//! - guest slowdown: the guest writing records continuously, its progress counter's rate
//!   alone and with epochs every 10 ms.
//! - sustained rate: epochs back to back (each copied and encoded before the next), the guest
//!   writing continuously.
//! - bytes: each capture encoded as a sender would - zero pages as their number only, the
//!   others zstd level 1, 8 bytes of page number each, plus the zstd'ed state - against the
//!   raw dirty bytes. The guest's data: 64-byte records (an 8-byte random key and 56 bytes of
//!   a fixed ASCII template) at random slots of pages that start zero.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{SerialConfig, VmConfig};
use vmm::epoch::{EpochCapture, EpochMode, EpochOptions, EpochTracker, PauseBreakdown};
use vmm::microvm::MicroVmThread;

const CTRL: u64 = 0x70_0000;
const BUF: u64 = 0x100_0000;
const TEMPLATE: &[u8; 56] = b" user:session=active; ttl=3600; region=eu-west; v=1;\n\0\0\0";

/// `len` bytes of pages full of the guest's records (random keys from an LCG).
fn records(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        out.extend_from_slice(&x.to_le_bytes());
        out.extend_from_slice(TEMPLATE);
    }
    out.truncate(len);
    out
}

#[derive(Args, Clone)]
pub struct EpochArgs {
    /// Epochs measured per size and way (after one not counted).
    #[arg(long, default_value_t = 40)]
    epochs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// The guest's buffer in MiB (a power of two; the batches' pages are drawn from it).
    #[arg(long, default_value_t = 128)]
    buffer: u64,
    /// The guest's working set (MiB, a power of two) while its slowdown and the sustained
    /// rate are measured.
    #[arg(long, default_value_t = 4)]
    working_set: u64,
    /// Seconds of each slowdown and rate measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// vmr's `EpochOptions::max_protect_calls`.
    #[arg(long, default_value_t = vmm::epoch::DEFAULT_MAX_PROTECT_CALLS)]
    max_calls: usize,
    /// vmr's `EpochOptions::max_gap_pages`.
    #[arg(long, default_value_t = vmm::epoch::DEFAULT_MAX_GAP_PAGES)]
    max_gap: u64,
    /// vmr's `EpochOptions::inline_copy_max_pages`.
    #[arg(long, default_value_t = vmm::epoch::DEFAULT_INLINE_COPY_MAX_PAGES)]
    inline_pages: usize,
    /// Directory for the JSON results.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The protection plan of the copy-before-write ways (from the command line).
static PLAN: std::sync::OnceLock<(usize, u64, usize)> = std::sync::OnceLock::new();

/// The ways compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Way {
    /// vmr's default: copy-before-write, small epochs copied inside the pause.
    Vmr,
    /// Copy-before-write protecting inside the pause, never copying there.
    CbwOnly,
    /// Every dirty page copied inside the pause.
    Naive,
}

impl Way {
    fn options(self) -> EpochOptions {
        let (max_protect_calls, max_gap_pages, inline) = PLAN.get().copied().unwrap_or((
            vmm::epoch::DEFAULT_MAX_PROTECT_CALLS,
            vmm::epoch::DEFAULT_MAX_GAP_PAGES,
            vmm::epoch::DEFAULT_INLINE_COPY_MAX_PAGES,
        ));
        let cbw = EpochOptions {
            max_protect_calls,
            max_gap_pages,
            inline_copy_max_pages: inline,
            ..Default::default()
        };
        match self {
            Way::Vmr => cbw,
            Way::CbwOnly => EpochOptions {
                inline_copy_max_pages: 0,
                protect_before_pause: false,
                ..cbw
            },
            Way::Naive => EpochOptions {
                mode: EpochMode::Naive,
                ..Default::default()
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Way::Vmr => "vmr",
            Way::CbwOnly => "cbw-pause",
            Way::Naive => "naive",
        }
    }
}

/// p50, p99 (nearest rank) and max of a sample, in µs.
#[derive(Debug, Clone, Copy, Serialize)]
struct Pct {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Pct {
    fn of(samples: &[f64]) -> Pct {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len().max(1);
        let at = |q: f64| s.get(((q * n as f64).ceil() as usize).clamp(1, n) - 1);
        Pct {
            p50: at(0.5).copied().unwrap_or(0.0),
            p99: at(0.99).copied().unwrap_or(0.0),
            max: s.last().copied().unwrap_or(0.0),
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One row of the pause table.
#[derive(Debug, Clone, Serialize)]
struct PauseRow {
    dirty_mib: u64,
    way: Way,
    epochs: usize,
    pages_mean: f64,
    pause_us: Pct,
    stop_us: Pct,
    harvest_us: Pct,
    state_us: Pct,
    protect_us: Pct,
    copy_in_pause_us: Pct,
    resume_us: Pct,
    /// From the resume until every protected page was copied.
    copy_after_resume_us: Pct,
    /// Pages the fault handler copied (the guest wrote them first), per epoch.
    fault_copies_mean: f64,
    /// Pages copied inside the pause, per epoch.
    in_pause_copies_mean: f64,
    /// Write-protecting before the pause (guest running).
    protect_before_pause_us: Pct,
    raw_bytes: u64,
    sent_bytes: u64,
    /// Every epoch's whole pause, in the order taken (for the report's plot).
    samples_pause_us: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Slowdown {
    way: Way,
    /// Records per second with epochs every 10 ms.
    rate: f64,
    /// 1 - rate / rate alone.
    slowdown: f64,
    epochs_hz: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    guest_data: &'static str,
    mem_mib: u64,
    buffer_mib: u64,
    working_set_mib: u64,
    register_us: f64,
    pauses: Vec<PauseRow>,
    guest_alone_records_per_s: f64,
    slowdown: Vec<Slowdown>,
    sustained_rate_hz: f64,
    sustained_mib_per_epoch: f64,
    bytes_raw: u64,
    bytes_sent: u64,
    bytes_ratio: f64,
    pause_p99_us_1mib: f64,
    pause_ratio_100mib: f64,
}

const GUEST_DATA: &str = "pages full of 64-byte records (8-byte random key + 56 bytes of a fixed \
                          ASCII template), the guest overwriting records at random slots";

/// Assembles the epoch writer guest into an ELF at 2 MiB.
pub(crate) fn guest_elf(dir: &Path) -> Result<PathBuf, String> {
    let src = crate::repo_root().join("vmm/tests/guests/epoch_writer.S");
    let obj = dir.join("epoch_writer.o");
    let elf = dir.join("epoch_writer.elf");
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd
            .output()
            .map_err(|e| format!("binutils (as, ld): {e}"))?;
        if !out.status.success() {
            return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    };
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src))?;
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-e", "_start", "-Ttext=0x200000", "-o"])
        .arg(&elf)
        .arg(&obj))?;
    Ok(elf)
}

fn read(vm: &MicroVmThread, off: u64) -> u64 {
    vm.vm
        .memory()
        .read_obj(GuestAddress(CTRL + off))
        .unwrap_or(0)
}

fn write(vm: &MicroVmThread, off: u64, value: u64) {
    let _ = vm.vm.memory().write_obj(value, GuestAddress(CTRL + off));
}

/// Bytes a sender would send for `capture`: zero pages as their number, the others zstd
/// level 1 in one stream, 8 bytes of number per page, the state zstd level 1.
fn encoded_bytes(capture: &EpochCapture) -> Result<u64, String> {
    let mut nonzero = Vec::with_capacity(capture.data.len());
    for (_, page) in capture.pages() {
        if !vmm::vstate::memory::is_zero(page) {
            nonzero.extend_from_slice(page);
        }
    }
    let pages = zstd::bulk::compress(&nonzero, 1).map_err(|e| e.to_string())?;
    let state = zstd::bulk::compress(&capture.state, 1).map_err(|e| e.to_string())?;
    Ok((pages.len() + state.len() + 8 * capture.pfns.len()) as u64)
}

/// Waits until the guest finished the batch it was asked for.
fn wait_batch(vm: &MicroVmThread) -> Result<(), String> {
    let want = read(vm, 8);
    let t0 = Instant::now();
    while read(vm, 16) != want {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("the guest did not finish its batch in 30 s".into());
        }
        // Sleeping, not spinning: the guest's vCPU and the copy need the host's CPUs.
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

fn next_batch(vm: &MicroVmThread) {
    write(vm, 8, read(vm, 8) + 1);
}

fn pause_row(
    vm: &MicroVmThread,
    tracker: &Arc<EpochTracker>,
    dirty_mib: u64,
    way: Way,
    epochs: usize,
) -> Result<PauseRow, String> {
    write(vm, 0, dirty_mib * 256);
    next_batch(vm);
    let options = way.options();
    let mut pauses: Vec<PauseBreakdown> = Vec::new();
    let (mut pages, mut after, mut faults) = (Vec::new(), Vec::new(), 0u64);
    let (mut before, mut in_pause) = (Vec::new(), 0u64);
    let (mut raw, mut sent) = (0u64, 0u64);
    for n in 0..=epochs {
        wait_batch(vm)?;
        let pending = vm
            .freezes
            .epoch(tracker, &options)
            .map_err(|e| e.to_string())?;
        next_batch(vm);
        let capture = pending.wait().map_err(|e| e.to_string())?;
        if n > 0 {
            pauses.push(capture.pause);
            pages.push(capture.pfns.len() as f64);
            after.push(us(capture.copy.after_resume));
            faults += capture.copy.by_fault;
            in_pause += capture.copy.in_pause;
            before.push(us(capture.copy.protect_before_pause));
            raw += capture.raw_bytes();
            sent += encoded_bytes(&capture)?;
        }
        tracker.recycle(capture);
    }
    wait_batch(vm)?;
    write(vm, 0, 0);
    let part = |f: fn(&PauseBreakdown) -> Duration| {
        Pct::of(&pauses.iter().map(|p| us(f(p))).collect::<Vec<_>>())
    };
    Ok(PauseRow {
        dirty_mib,
        way,
        epochs,
        pages_mean: pages.iter().sum::<f64>() / pages.len() as f64,
        pause_us: part(|p| p.total),
        stop_us: part(|p| p.stop),
        harvest_us: part(|p| p.harvest),
        state_us: part(|p| p.state),
        protect_us: part(|p| p.protect),
        copy_in_pause_us: part(|p| p.copy),
        resume_us: part(|p| p.resume),
        copy_after_resume_us: Pct::of(&after),
        fault_copies_mean: faults as f64 / epochs as f64,
        in_pause_copies_mean: in_pause as f64 / epochs as f64,
        protect_before_pause_us: Pct::of(&before),
        raw_bytes: raw,
        sent_bytes: sent,
        samples_pause_us: pauses.iter().map(|p| us(p.total)).collect(),
    })
}

/// The guest's records per second over `secs`, with epochs every `period` if given; the
/// epochs' rate.
fn progress_rate(
    vm: &MicroVmThread,
    tracker: Option<&Arc<EpochTracker>>,
    epochs: Option<(Way, Duration)>,
    secs: f64,
) -> Result<(f64, f64), String> {
    let p0 = read(vm, 24);
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed().as_secs_f64() < secs {
        match epochs {
            None => std::thread::sleep(Duration::from_millis(10)),
            Some((way, period)) => {
                let tracker = tracker.ok_or("no tracker")?;
                let te = Instant::now();
                let capture = vm
                    .freezes
                    .epoch(tracker, &way.options())
                    .and_then(|p| p.wait())
                    .map_err(|e| e.to_string())?;
                tracker.recycle(capture);
                n += 1;
                std::thread::sleep(period.saturating_sub(te.elapsed()));
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Ok(((read(vm, 24) - p0) as f64 / elapsed, n as f64 / elapsed))
}

/// Epochs back to back, each copied and encoded before the next: epochs per second and MiB
/// per epoch.
fn sustained(
    vm: &MicroVmThread,
    tracker: &Arc<EpochTracker>,
    secs: f64,
) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    while t0.elapsed().as_secs_f64() < secs {
        let capture = vm
            .freezes
            .epoch(tracker, &Way::Vmr.options())
            .and_then(|p| p.wait())
            .map_err(|e| e.to_string())?;
        encoded_bytes(&capture)?;
        bytes += capture.raw_bytes();
        tracker.recycle(capture);
        n += 1;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    Ok((
        n as f64 / elapsed,
        bytes as f64 / 1048576.0 / n.max(1) as f64,
    ))
}

pub fn run(args: EpochArgs) -> Result<(), String> {
    if !args.buffer.is_power_of_two() || 16 + args.buffer > args.mem {
        return Err("--buffer must be a power of two and fit above 16 MiB of --mem".into());
    }
    let _ = PLAN.set((args.max_calls, args.max_gap, args.inline_pages));
    let out = super::out_dir(args.out.as_deref())?;
    let elf = guest_elf(&out)?;
    let mut config = VmConfig::new(elf);
    config.mem_mib = args.mem;
    config.allow_pvm = true;
    config.serial = SerialConfig::None;
    let mask = args.buffer * 256 - 1;
    let buffer_bytes = args.buffer << 20;
    let vm = MicroVmThread::spawn(config, move |m| {
        let mem = m.vm().memory();
        let _ = mem.write_obj(0u64, GuestAddress(CTRL));
        let _ = mem.write_obj(mask, GuestAddress(CTRL + 32));
        let _ = mem.write_slice(&records(buffer_bytes as usize), GuestAddress(BUF));
    })?;
    if !args.working_set.is_power_of_two() || args.working_set > args.buffer {
        return Err("--working-set must be a power of two within --buffer".into());
    }
    write(&vm, 32, args.working_set * 256 - 1);
    eprintln!("bench epoch: warming up");
    std::thread::sleep(Duration::from_secs(2));
    eprintln!("bench epoch: the guest alone for {} s", args.seconds);
    let (alone, _) = progress_rate(&vm, None, None, args.seconds)?;
    let tracker = Arc::new(EpochTracker::new(&vm.vm, true).map_err(|e| e.to_string())?);
    let register_us = us(tracker.register_cost());
    // Dirty logging just started: KVM maps the guest's pages anew.
    std::thread::sleep(Duration::from_secs(1));

    let mut slowdown = Vec::new();
    for way in [Way::Vmr, Way::Naive] {
        eprintln!("bench epoch: epochs every 10 ms, {}", way.name());
        let (rate, hz) = progress_rate(
            &vm,
            Some(&tracker),
            Some((way, Duration::from_millis(10))),
            args.seconds,
        )?;
        slowdown.push(Slowdown {
            way,
            rate,
            slowdown: 1.0 - rate / alone,
            epochs_hz: hz,
        });
    }
    eprintln!("bench epoch: epochs back to back");
    let (rate_hz, mib_per_epoch) = sustained(&vm, &tracker, args.seconds)?;

    write(&vm, 32, mask);
    let mut pauses = Vec::new();
    for dirty_mib in [1u64, 10, 100] {
        if dirty_mib > args.buffer {
            continue;
        }
        let epochs = if dirty_mib >= 100 {
            args.epochs.div_ceil(2)
        } else {
            args.epochs
        };
        for way in [Way::Vmr, Way::CbwOnly, Way::Naive] {
            eprintln!(
                "bench epoch: {dirty_mib} MiB dirty per epoch, {}, {epochs} epochs",
                way.name()
            );
            pauses.push(pause_row(&vm, &tracker, dirty_mib, way, epochs)?);
        }
    }
    drop(tracker);
    vm.stop()?;

    let p99 = |mib: u64, way: Way| {
        pauses
            .iter()
            .find(|r| r.dirty_mib == mib && r.way == way)
            .map_or(f64::NAN, |r| r.pause_us.p99)
    };
    let vmr_rows = pauses.iter().filter(|r| r.way == Way::Vmr);
    let (bytes_raw, bytes_sent) = vmr_rows.fold((0, 0), |(r, s), row| {
        (r + row.raw_bytes, s + row.sent_bytes)
    });
    let report = Report {
        guest_data: GUEST_DATA,
        mem_mib: args.mem,
        buffer_mib: args.buffer,
        working_set_mib: args.working_set,
        register_us,
        guest_alone_records_per_s: alone,
        slowdown,
        sustained_rate_hz: rate_hz,
        sustained_mib_per_epoch: mib_per_epoch,
        bytes_raw,
        bytes_sent,
        bytes_ratio: bytes_sent as f64 / bytes_raw.max(1) as f64,
        pause_p99_us_1mib: p99(1, Way::Vmr),
        pause_ratio_100mib: p99(100, Way::Vmr) / p99(100, Way::Naive),
        pauses,
    };
    print_report(&report);
    let json = super::write_json(&out, "epoch.json", &report)?;
    println!("(JSON: {})", json.display());
    println!(
        "epoch: pause_p99_us={:.0} pause_ratio_100mib={:.3} rate_hz={:.0} bytes_ratio={:.3}",
        report.pause_p99_us_1mib,
        report.pause_ratio_100mib,
        report.sustained_rate_hz,
        report.bytes_ratio
    );
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "epoch checkpoints, direct on this host: {} MiB guest, batches from a {} MiB buffer; \
         userfaultfd registration of guest RAM {:.0} µs",
        r.mem_mib, r.buffer_mib, r.register_us
    );
    println!("guest data: {}", r.guest_data);
    println!();
    println!(
        "{:>5} {:<9} {:>6} | {:>8} {:>8} {:>8} | p50 parts (µs): {:>6} {:>7} {:>6} {:>7} {:>7} {:>6} | {:>7} {:>7} {:>9} {:>7} {:>6}",
        "MiB", "way", "pages", "p50 µs", "p99 µs", "max µs", "stop", "harvest", "state",
        "protect", "copy", "resume", "in-pse", "pre-wp", "after µs", "faults", "sent"
    );
    for row in &r.pauses {
        println!(
            "{:>5} {:<9} {:>6.0} | {:>8.0} {:>8.0} {:>8.0} | {:>22.0} {:>7.0} {:>6.0} {:>7.0} {:>7.0} {:>6.0} | {:>7.0} {:>7.0} {:>9.0} {:>7.1} {:>6.3}",
            row.dirty_mib,
            row.way.name(),
            row.pages_mean,
            row.pause_us.p50,
            row.pause_us.p99,
            row.pause_us.max,
            row.stop_us.p50,
            row.harvest_us.p50,
            row.state_us.p50,
            row.protect_us.p50,
            row.copy_in_pause_us.p50,
            row.resume_us.p50,
            row.in_pause_copies_mean,
            row.protect_before_pause_us.p50,
            row.copy_after_resume_us.p50,
            row.fault_copies_mean,
            row.sent_bytes as f64 / row.raw_bytes.max(1) as f64,
        );
    }
    println!();
    println!(
        "guest writing records into a {} MiB working set, alone: {:.0} records/s; with epochs \
         every 10 ms:",
        r.working_set_mib, r.guest_alone_records_per_s
    );
    for s in &r.slowdown {
        println!(
            "  {:<9} {:>10.0} records/s, slowdown {:>5.1} %, {:.0} epochs/s",
            s.way.name(),
            s.rate,
            s.slowdown * 100.0,
            s.epochs_hz
        );
    }
    println!(
        "sustained (back to back, each copied and encoded): {:.0} epochs/s, {:.2} MiB per epoch",
        r.sustained_rate_hz, r.sustained_mib_per_epoch
    );
    println!(
        "bytes (vmr rows): sent {} of raw {} ({:.3})",
        r.bytes_sent, r.bytes_raw, r.bytes_ratio
    );
}
