//! `vmr`: run a Linux microVM.

use std::io::{IsTerminal, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use replicator::primary::{rest_of_duty, EngineOptions};
use vmm::api::{ApiClient, ApiServer, FailoverParams, MigrateParams, ProtectParams, SnapshotType};
use vmm::builder::{restore_microvm, RestoreOptions};
use vmm::config::{DiskConfig, NetConfig, SerialConfig, VmConfig};
use vmm::controller::Controller;
use vmm::microvm::{MicroVm, VmPhase};

mod config;
mod coordination;
mod primary;
mod protect;
#[cfg(test)]
mod readme_tests;
mod standby;

use config::ReplicationConfig;
use coordination::Coordination;
use primary::exit_code;
use protect::Protection;

/// vmr: a minimal KVM microVM monitor with whole-VM replication.
#[derive(Parser)]
#[command(
    name = "vmr",
    version,
    about,
    after_help = "Examples:\n  \
    vmr run --kernel bzImage --initrd initramfs.cpio --net tap=tap0 --api /run/vm.sock\n  \
    vmr ctl --api /run/vm.sock status\n  \
    vmr ctl --api /run/vm.sock migrate desthost:7070\n  \
    vmr standby --listen 0.0.0.0:7171 --key-file /etc/vmr/key   # on the standby host\n  \
    vmr run --config vm.toml --protect standby1:7171 --key-file /etc/vmr/key\n\n\
    Logs go to stderr; VMR_LOG=debug shows more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM and run it until the guest powers off or resets.
    #[command(after_help = "Examples:\n  \
        vmr run --kernel bzImage --initrd initramfs.cpio --vcpus 2 --mem 256 \\\n      \
        --net tap=tap0,mac=06:00:0a:00:02:02 --disk data.raw --api /run/vm.sock \\\n      \
        --cmdline 'vmr.ip=10.0.2.2/24 vmr.run=\"redis-server --protected-mode no\"'\n  \
        vmr run --config vm.toml --serial file:/tmp/console\n  \
        vmr run --config vm.toml --protect standby1:7171 --protect standby2:7171 \\\n      \
        --key-file /etc/vmr/key --epoch-ms 10")]
    Run(RunArgs),
    /// Bring a snapshot back to life in this process: the guest continues where it was.
    #[command(
        after_help = "Example:\n  vmr restore --from /snaps/s2 --net tap=tap1 --api /run/vm2.sock"
    )]
    Restore(RestoreArgs),
    /// Wait for a live migration and run the VM it brings.
    #[command(
        after_help = "Example (then, at the source: vmr ctl --api SOCK migrate HOST:7070):\n  \
        vmr receive --listen 0.0.0.0:7070 --net tap=tap1 --api /run/vm.sock"
    )]
    Receive(ReceiveArgs),
    /// Stand by for one VM: receive the epochs of a protected VM (`vmr run --protect`) and
    /// keep the last one committed, for failover.
    #[command(
        after_help = "Example (then, on the primary: vmr run ... --protect HOST:7171 \
        --key-file KEY):\n  \
        vmr standby --listen 0.0.0.0:7171 --key-file /etc/vmr/key --disk /srv/vm1/data.raw \\\n      \
        --net tap=tap1 --api /run/standby.sock --coordinator etcd://etcd1:2379\n\n\
        The standby sizes itself from the VM the primary describes, and refuses (in one line, on \
        both sides) a VM it cannot hold: a different number or size of disks (--disk, in the \
        VM's order), of network devices (--net), or too little memory. A connection without \
        the key is refused and logged. When the primary is lost (silent for --detect-ms, or its \
        link broken without a goodbye), a standby with --coordinator claims the VM and, if it \
        wins, runs it here from its committed epoch: the API socket then serves the VM. \
        Without a coordinator the committed state is kept: `vmr ctl --api SOCKET failover \
        --force` takes it over by hand, `vmr ctl --api SOCKET snapshot DIR` writes it as a \
        snapshot, which `vmr restore --from DIR` runs."
    )]
    Standby(StandbyArgs),
    /// Drive a running VM through its API socket.
    #[command(after_help = "Examples:\n  \
        vmr ctl --api /run/vm.sock status\n  \
        vmr ctl --api /run/vm.sock snapshot --diff /snaps/s2\n  \
        vmr ctl --api /run/vm.sock migrate desthost:7070 --max-downtime-ms 300\n  \
        vmr ctl --api /run/vm.sock protect standby1:7171\n  \
        vmr ctl --api /run/standby.sock snapshot /snaps/committed   # a standby's committed epoch")]
    Ctl(CtlArgs),
}

/// Host-side options of a VM that did not boot here (restored or received).
#[derive(Args)]
struct HostArgs {
    /// TAP for each network device, in order (default: the TAP names the VM had).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// Serial console: stdout, file:PATH or none.
    #[arg(long, value_name = "stdout|file:PATH|none", default_value = "stdout")]
    serial: SerialConfig,
    /// Serve the API on this Unix socket.
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// Go ahead on a PVM host (only for PVM-enabled guest kernels).
    #[arg(long)]
    allow_pvm: bool,
}

impl HostArgs {
    fn restore_options(&self) -> RestoreOptions {
        RestoreOptions {
            net: self.net.clone(),
            serial: self.serial.clone(),
            allow_pvm: self.allow_pvm,
        }
    }
}

#[derive(Args)]
struct StandbyArgs {
    /// Address to listen on for the primary, e.g. 0.0.0.0:7171.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The replication key (the primary's --key-file).
    #[arg(long, value_name = "PATH")]
    key_file: PathBuf,
    /// Disk image each of the VM's disks is replicated to, in the VM's order. Repeatable.
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
    /// TAP for each of the VM's network devices here, in order. Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// Serve the API on this Unix socket (the VM's, once taken over here).
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// The coordinator that decides who owns the VM (etcd): with it, this standby takes the
    /// VM over by itself when its primary is lost. Without it, only `vmr ctl failover --force`.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    coordinator: Option<String>,
    /// This host's name as the VM's owner in the coordinator (default <hostname>-standby-<ADDR>).
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// Once synchronised, a primary silent for N ms is lost (default 50).
    #[arg(long, value_name = "N")]
    detect_ms: Option<u64>,
    /// Offer this standby to the VM ID (registered in the coordinator): its primary pairs
    /// with it by itself when it has no standby. Needs --coordinator.
    #[arg(long, value_name = "ID", requires = "coordinator")]
    join: Option<String>,
    /// Where primaries reach this standby, as registered in the coordinator (default: the
    /// --listen address).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Serial console of the VM once taken over here: stdout, file:PATH or none.
    #[arg(long, value_name = "stdout|file:PATH|none", default_value = "none")]
    serial: SerialConfig,
    /// Allow taking over on a PVM host (only for PVM-enabled guest kernels).
    #[arg(long)]
    allow_pvm: bool,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "SOCKET")]
    api: PathBuf,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
enum CtlAction {
    /// State, configuration and uptime.
    Status,
    /// The resource graph: vCPUs, memory, devices, queues, host backends.
    Resources,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Write a snapshot to the new directory DIR.
    #[command(after_help = "Examples:\n  \
        vmr ctl --api /run/vm.sock snapshot /snaps/s1\n  \
        vmr ctl --api /run/vm.sock snapshot --diff /snaps/s2")]
    Snapshot {
        /// The snapshot directory (must not exist).
        dir: PathBuf,
        /// Only the pages written since the previous snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Live-migrate the VM to `vmr receive` at HOST:PORT.
    #[command(
        after_help = "Example:\n  vmr ctl --api /run/vm.sock migrate desthost:7070 --max-downtime-ms 300 --compress"
    )]
    Migrate {
        /// The destination.
        destination: String,
        /// The longest pause of the guest to aim for, in ms.
        #[arg(long)]
        max_downtime_ms: Option<u64>,
        /// Compress the pages with zstd (for a slow link; costs CPU on both ends).
        #[arg(long)]
        compress: bool,
    },
    /// Metrics in the Prometheus text format.
    Metrics,
    /// Replication status: role, standbys or primary, committed epoch, pauses (JSON).
    #[command(after_help = "Examples:\n  \
        vmr ctl --api /run/vm.sock replication\n  \
        vmr ctl --api /run/standby.sock replication")]
    Replication,
    /// Protect the running VM with the standby (`vmr standby`) at HOST:PORT; answers once
    /// its initial synchronisation is committed. The VM must run with --key-file.
    #[command(after_help = "Example:\n  vmr ctl --api /run/vm.sock protect standby1:7171")]
    Protect {
        /// The standby.
        standby: String,
    },
    /// On the primary: a planned switch-over to its standby, with no loss (the VM paused, a
    /// last epoch acknowledged, handed over; this monitor ends). On a standby whose primary is
    /// lost: take the VM over from its committed epoch once the coordinator's claim is won.
    #[command(after_help = "Examples:\n  \
        vmr ctl --api /run/vm.sock failover        # maintenance: move the VM to its standby\n  \
        vmr ctl --api /run/standby.sock failover\n  \
        vmr ctl --api /run/standby.sock failover --force   # no coordinator: the primary is known dead")]
    Failover {
        /// Take over without the coordinator's claim (a standby without --coordinator).
        /// Nothing then keeps the old primary from running beside the VM.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct RestoreArgs {
    /// The snapshot directory (for a diff, its parents are found through it).
    #[arg(long = "from", value_name = "DIR")]
    from: PathBuf,
    #[command(flatten)]
    host: HostArgs,
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
    /// Serve the API on this Unix socket.
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// Protect the VM with the standby (`vmr standby`) at HOST:PORT. Repeatable.
    #[arg(long, value_name = "HOST:PORT")]
    protect: Vec<String>,
    /// The replication key the standbys hold (needed by --protect and `vmr ctl protect`).
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Longest epoch in ms (default 10).
    #[arg(long, value_name = "N")]
    epoch_ms: Option<u64>,
    /// The epoch engine spends at most N % of the time taking and sending epochs: after each,
    /// it waits (N = 25: three times as long as the epoch took) before it ends the next, even
    /// with output waiting (default 25; 100: no wait).
    #[arg(long, value_name = "N")]
    epoch_duty_pct: Option<u64>,
    /// A standby that does not acknowledge an epoch within N ms is dropped (default 2000).
    #[arg(long, value_name = "N")]
    standby_timeout_ms: Option<u64>,
    /// The coordinator that decides who owns the VM (etcd): with it, a standby takes the VM
    /// over by itself when this host is lost, and this host is fenced if it loses the VM.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    coordinator: Option<String>,
    /// The VM's name in the coordinator and to its standbys (default vmr-<pid>).
    #[arg(long, value_name = "ID")]
    vm_id: Option<String>,
    /// This host's name as the VM's owner in the coordinator (default <hostname>-run-<pid>).
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
}

impl RunArgs {
    fn into_config(self) -> Result<(VmConfig, ReplicationConfig), String> {
        let (mut config, mut replication) = match &self.config {
            Some(path) => config::from_file(path).map_err(|e| e.to_string())?,
            None => (
                VmConfig::new(
                    self.kernel
                        .clone()
                        .ok_or("no kernel given: pass --kernel PATH or --config FILE")?,
                ),
                ReplicationConfig::default(),
            ),
        };
        replication.standbys.extend(self.protect);
        if self.key_file.is_some() {
            replication.key_file = self.key_file;
        }
        if self.epoch_ms.is_some() {
            replication.epoch_ms = self.epoch_ms;
        }
        if self.epoch_duty_pct.is_some() {
            replication.epoch_duty_pct = self.epoch_duty_pct;
        }
        if self.standby_timeout_ms.is_some() {
            replication.standby_timeout_ms = self.standby_timeout_ms;
        }
        if self.coordinator.is_some() {
            replication.coordinator = self.coordinator;
        }
        if self.vm_id.is_some() {
            replication.vm_id = self.vm_id;
        }
        if self.host_id.is_some() {
            replication.host_id = self.host_id;
        }
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
        Ok((config, replication))
    }
}

/// The engine's options of a `[replication]` table.
fn engine_options(r: &ReplicationConfig) -> Result<EngineOptions, String> {
    let mut options = EngineOptions::default();
    if let Some(ms) = r.epoch_ms {
        if ms == 0 {
            return Err("--epoch-ms 0: an epoch lasts at least 1 ms".into());
        }
        options.period = Duration::from_millis(ms);
    }
    if let Some(pct) = r.epoch_duty_pct {
        if !(1..=100).contains(&pct) {
            return Err(format!(
                "--epoch-duty-pct {pct}: give a percentage from 1 to 100"
            ));
        }
        options.rest = rest_of_duty(pct);
    }
    if let Some(ms) = r.standby_timeout_ms {
        if ms == 0 {
            return Err("--standby-timeout-ms 0: give a standby at least 1 ms".into());
        }
        options.standby_timeout = Duration::from_millis(ms);
    }
    Ok(options)
}

fn run(args: RunArgs) -> Result<ExitCode, String> {
    let api = args.api.clone();
    let (config, replication) = args.into_config()?;
    let options = engine_options(&replication)?;
    let key = protect::load_key(replication.key_file.as_deref(), &replication.standbys)
        .map_err(|e| e.to_string())?;
    let vm_id = replication
        .vm_id
        .clone()
        .unwrap_or_else(|| format!("vmr-{}", std::process::id()));
    let mut options = options;
    if let Some(endpoints) = &replication.coordinator {
        if key.is_none() {
            return Err(
                "--coordinator needs --key-file PATH: a VM that cannot be protected \
                        needs no owner"
                    .into(),
            );
        }
        let coordination = Coordination::connect(
            endpoints,
            replication.host_id.clone(),
            &format!("-run-{}", std::process::id()),
        )?;
        options.authority = Some(coordination.own(&vm_id)?);
    }
    let protection = key.map(|key| Protection {
        standbys: replication.standbys,
        key,
        options,
    });
    let api = api.map_or(primary::Api::None, primary::Api::Socket);
    primary::run(
        primary::Boot::Config(config),
        api,
        protection,
        vm_id,
        |_| {},
    )
}

fn run_standby(args: StandbyArgs) -> Result<ExitCode, String> {
    let detect = match args.detect_ms {
        Some(0) => return Err("--detect-ms 0: give the primary at least 1 ms".into()),
        Some(ms) => Duration::from_millis(ms),
        None => standby::DEFAULT_DETECT,
    };
    let coordination = args
        .coordinator
        .as_deref()
        .map(|c| {
            Coordination::connect(
                c,
                args.host_id.clone(),
                &format!("-standby-{}", args.listen),
            )
        })
        .transpose()?;
    let advertise = args.advertise.unwrap_or_else(|| args.listen.clone());
    let (host, requests) = standby::StandbyHost::new(standby::StandbyOptions {
        listen: args.listen,
        key_file: args.key_file,
        disks: args.disk,
        nets: args.net.clone(),
        restore: RestoreOptions {
            net: args.net,
            serial: args.serial,
            allow_pvm: args.allow_pvm,
        },
        coordination,
        detect,
        join: args.join,
        advertise,
    })
    .map_err(|e| e.to_string())?;
    let host = Arc::new(host);
    let api = args
        .api
        .as_deref()
        .map(|socket| standby::serve_api(host.clone(), socket))
        .transpose()
        .map_err(|e| e.to_string())?;
    standby::run(host, requests, api)
}

fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    let snapshot = vmm::snapshot::load(&args.from).map_err(|e| e.to_string())?;
    let microvm =
        restore_microvm(&snapshot, &args.host.restore_options()).map_err(|e| e.to_string())?;
    tracing::info!(from = %args.from.display(), "VM restored");
    resume_moved(microvm, args.host.api.as_deref())
}

fn receive(args: ReceiveArgs) -> Result<ExitCode, String> {
    let listener = TcpListener::bind(&args.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    eprintln!("vmr: waiting for a migration on {}", args.listen);
    let (microvm, received) =
        vmm::migration::destination::receive(&listener, &args.host.restore_options())
            .map_err(|e| e.to_string())?;
    // The guest has just started here: one write, not one per piece of the format (stderr is
    // unbuffered), each waking whoever reads it while the guest needs the CPU.
    let line = format!(
        "vmr: migration received: {} pages in {:.1} ms, restored in {:.1} ms\n",
        received.pages,
        received.total.as_secs_f64() * 1000.0,
        received.restore.as_secs_f64() * 1000.0
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    resume_moved(microvm, args.host.api.as_deref())
}

/// Runs a VM that was restored or received: its vCPUs first (a received VM's already run),
/// for the shortest pause, then the announcement on the network, the interrupts the source may
/// have raised as it stopped, and the API.
fn resume_moved(mut microvm: MicroVm, api: Option<&Path>) -> Result<ExitCode, String> {
    if microvm.phase() == VmPhase::Created {
        microvm.start().map_err(|e| e.to_string())?;
    }
    microvm.announce();
    microvm.raise_device_interrupts();
    run_microvm(microvm, api)
}

fn run_microvm(mut microvm: MicroVm, api: Option<&Path>) -> Result<ExitCode, String> {
    let reason = match api {
        None => microvm.run(),
        Some(socket) => {
            let (server, receiver) = ApiServer::start(socket).map_err(|e| e.to_string())?;
            let id = format!("vmr-{}", std::process::id());
            let mut controller =
                Controller::new(receiver, &mut microvm, id).map_err(|e| e.to_string())?;
            let reason = microvm.run_with(|vm| controller.poll(vm));
            // Let the server deliver answers given in the last round (a migration's) before
            // it closes every connection.
            std::thread::sleep(Duration::from_millis(200));
            drop(server);
            reason
        }
    }
    .map_err(|e| e.to_string())?;
    exit_code(reason)
}

fn ctl(args: CtlArgs) -> Result<ExitCode, String> {
    let client = ApiClient::new(&args.api);
    let out = match args.action {
        CtlAction::Status => to_json(&client.get_vm()),
        CtlAction::Resources => to_json(&client.get_resources()),
        CtlAction::Pause => client
            .pause()
            .map(|()| "paused".to_string())
            .map_err(|e| e.to_string()),
        CtlAction::Resume => client
            .resume()
            .map(|()| "resumed".to_string())
            .map_err(|e| e.to_string()),
        CtlAction::Snapshot { dir, diff } => {
            let dir = std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let kind = if diff {
                SnapshotType::Diff
            } else {
                SnapshotType::Full
            };
            to_json(&client.snapshot(&dir, kind))
        }
        CtlAction::Migrate {
            destination,
            max_downtime_ms,
            compress,
        } => to_json(&client.migrate(&MigrateParams {
            destination,
            max_downtime_ms,
            compress,
        })),
        CtlAction::Metrics => client.metrics().map_err(|e| e.to_string()),
        CtlAction::Replication => to_json(&client.replication()),
        CtlAction::Protect { standby } => to_json(&client.protect(&ProtectParams { standby })),
        CtlAction::Failover { force } => to_json(&client.failover(&FailoverParams { force })),
    }?;
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

fn to_json<T: serde::Serialize, E: std::fmt::Display>(
    result: &Result<T, E>,
) -> Result<String, String> {
    match result {
        Ok(value) => serde_json::to_string_pretty(value).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Help and version go out as clap writes them; a usage error becomes one line, like every other
/// error of vmr, with the subcommand whose help explains it.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // `vmr ctl` alone: the help, as clap gives it, is the clearest answer.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    // clap's message is its first paragraph ("error: ..." and, for missing arguments, the
    // indented list of them).
    let rendered = e.render().to_string();
    let message = rendered
        .split("\n\n")
        .next()
        .unwrap_or("invalid usage")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    // The subcommands named on the command line, for the help to point at.
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut path = vec!["vmr".to_string()];
    for arg in std::env::args().skip(1) {
        let Some(sub) = command.find_subcommand(&arg).cloned() else {
            continue;
        };
        path.push(arg);
        command = sub;
    }
    eprintln!("vmr: error: {message} (see `{} --help`)", path.join(" "));
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    // A standby has no console: its progress is logged at info level.
    let default_filter = match cli.command {
        Command::Standby(_) => "warn,vmr=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Standby(args) => run_standby(args),
        Command::Restore(args) => restore(args),
        Command::Receive(args) => receive(args),
        Command::Ctl(args) => ctl(args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("vmr: error: {message}");
            ExitCode::FAILURE
        }
    }
}
