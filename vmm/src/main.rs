//! `vmr`: run a Linux microVM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::builder::{build_microvm, restore_microvm, RestoreOptions};
use vmm::config::{DiskConfig, NetConfig, SerialConfig, VmConfig};
use vmm::microvm::MicroVm;

/// vmr: a minimal KVM microVM monitor with whole-VM replication.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM and run it until the guest powers off or resets.
    Run(RunArgs),
    /// Bring a snapshot back to life in this process: the guest continues where it was.
    Restore(RestoreArgs),
}

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot directory (for a diff, its parents are found through it).
    #[arg(long = "from", value_name = "DIR")]
    from: PathBuf,
    /// TAP for each network device, in order (default: the TAP names saved in the snapshot).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// Serial console: stdout, file:PATH or none.
    #[arg(long, value_name = "stdout|file:PATH|none", default_value = "stdout")]
    serial: SerialConfig,
    /// Restore even on a PVM host (only for PVM-enabled guest kernels).
    #[arg(long)]
    allow_pvm: bool,
}

#[derive(Args)]
struct RunArgs {
    /// TOML file with the VM's configuration; flags given as well override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Guest kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Root filesystem image (first disk, root=/dev/vda).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    mem: Option<u64>,
    /// Network device: tap=NAME[,mac=MAC]. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// Block device: PATH[,ro]. Repeatable.
    #[arg(long, value_name = "PATH[,ro]")]
    disk: Vec<DiskConfig>,
    /// Serial console: stdout, file:PATH or none.
    #[arg(long, value_name = "stdout|file:PATH|none")]
    serial: Option<SerialConfig>,
    /// Boot even on a PVM host (only for PVM-enabled guest kernels).
    #[arg(long)]
    allow_pvm: bool,
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig, String> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
            None => VmConfig::new(
                self.kernel
                    .clone()
                    .ok_or("no kernel given: pass --kernel PATH or --config FILE")?,
            ),
        };
        if let Some(kernel) = self.kernel {
            config.kernel = kernel;
        }
        if self.initrd.is_some() {
            config.initrd = self.initrd;
        }
        if self.rootfs.is_some() {
            config.rootfs = self.rootfs;
        }
        if self.cmdline.is_some() {
            config.cmdline = self.cmdline;
        }
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if let Some(mem) = self.mem {
            config.mem_mib = mem;
        }
        config.net.extend(self.net);
        config.disks.extend(self.disk);
        if let Some(serial) = self.serial {
            config.serial = serial;
        }
        config.allow_pvm |= self.allow_pvm;
        Ok(config)
    }
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    let config = args.into_config()?;
    let microvm = build_microvm(&config).map_err(|e| e.to_string())?;
    run_microvm(microvm)
}

fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    let snapshot = vmm::snapshot::load(&args.from).map_err(|e| e.to_string())?;
    let options = RestoreOptions {
        net: args.net,
        serial: args.serial,
        allow_pvm: args.allow_pvm,
    };
    let microvm = restore_microvm(&snapshot, &options).map_err(|e| e.to_string())?;
    tracing::info!(from = %args.from.display(), "VM restored");
    run_microvm(microvm)
}

fn run_microvm(mut microvm: MicroVm) -> Result<ExitCode, String> {
    let reason = microvm.run().map_err(|e| e.to_string())?;
    tracing::info!(?reason, "VM ended");
    if reason.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("the VM ended abnormally: {reason:?}"))
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("vmr: error: {message}");
            ExitCode::FAILURE
        }
    }
}
