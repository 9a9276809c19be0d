//! `cargo xtask`: the project's benchmarks, run side by side with their comparison (QEMU) in the
//! same lab run, printed as tables, written as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod lab;
#[cfg(test)]
mod readme_tests;
mod report;
mod soak;
mod stats;

#[derive(Parser)]
#[command(about = "vmr's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a benchmark (inside the lab when this host cannot boot stock Linux guests).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// Run a lab scenario N times, each a first try, and print its pass rate and the causes
    /// of its failures.
    Soak(soak::SoakArgs),
    /// Write docs/benchmarks.md and its plots from the benchmarks' latest JSON.
    Report(report::ReportArgs),
}

#[derive(Subcommand)]
enum Bench {
    /// Time from starting the monitor to the guest's init marker, vmr against QEMU microvm.
    Boot(bench::boot::BootArgs),
    /// Live migration downtime and total time, idle and under a memory-dirtying load, vmr
    /// against QEMU's own migration.
    Migrate(bench::migrate::MigrateArgs),
    /// Snapshot creation and restore-to-running time, vmr against QEMU (migration to a file
    /// and `-incoming` from it).
    Snapshot(bench::snapshot::SnapshotArgs),
    /// Epoch checkpoints' pause at 1, 10, 100 MiB dirty, vmr (copy-before-write) against the
    /// naive copy inside the pause; guest slowdown, epoch rate, bytes (direct, tiny guest).
    Epoch(bench::epoch::EpochArgs),
    /// redis-benchmark throughput and p50/p99 latency of a redis guest unprotected and
    /// protected by one standby (vmr), and the same for QEMU and QEMU COLO (lab).
    Protect(bench::protect::ProtectArgs),
    /// Failover of a protected redis over N losses of its primary: detection, resume, the
    /// client's gap, acknowledged writes lost; against a restart from the latest snapshot
    /// (lab).
    Failover(bench::failover::FailoverArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { which } => match which {
            Bench::Boot(args) => bench::boot::run(args),
            Bench::Migrate(args) => bench::migrate::run(args),
            Bench::Snapshot(args) => bench::snapshot::run(args),
            Bench::Epoch(args) => bench::epoch::run(args),
            Bench::Protect(args) => bench::protect::run(args),
            Bench::Failover(args) => bench::failover::run(args),
        },
        Command::Soak(args) => soak::run(args),
        Command::Report(args) => report::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (xtask lives in `xtask/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}
