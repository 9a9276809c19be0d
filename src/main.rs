//! `vmr`: run a Linux microVM.

use std::io::{IsTerminal, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::sync::mpsc::channel;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use replicator::primary::vm::{VmThread, VmThreadError};
use replicator::primary::{Engine, EngineHandle, EngineOptions, NewStandby};
use vmm::api::{
    ApiClient, ApiServer, MigrateParams, ProtectParams, ReplicationHook, ReplicationRole,
    SnapshotType,
};
use vmm::builder::{restore_microvm, RestoreOptions};
use vmm::config::{DiskConfig, NetConfig, SerialConfig, VmConfig};
use vmm::controller::Controller;
use vmm::microvm::{MicroVm, VmPhase};

mod config;
mod protect;
#[cfg(test)]
mod readme_tests;
mod standby;

use config::ReplicationConfig;
use protect::{PrimaryHook, ProtectRequest, Protection};

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
        --net tap=tap1 --api /run/standby.sock\n\n\
        The standby sizes itself from the VM the primary describes, and refuses (in one line, on \
        both sides) a VM it cannot hold: a different number or size of disks (--disk, in the \
        VM's order), of network devices (--net), or too little memory. A connection without \
        the key is refused and logged. When the primary's link ends, the committed state is \
        kept for failover and later pairings are refused: start a fresh `vmr standby` to \
        protect a VM again. `vmr ctl --api SOCKET snapshot DIR` writes the committed epoch \
        as a snapshot, which `vmr restore --from DIR` runs."
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
    /// Serve the API on this Unix socket.
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
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
    /// A standby that does not acknowledge an epoch within N ms is dropped (default 2000).
    #[arg(long, value_name = "N")]
    standby_timeout_ms: Option<u64>,
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
        if self.standby_timeout_ms.is_some() {
            replication.standby_timeout_ms = self.standby_timeout_ms;
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
    let protection = key.map(|key| Protection {
        standbys: replication.standbys,
        key,
        options,
    });
    run_protected(config, api.as_deref(), protection)
}

/// Boots the VM of `config` on its monitor thread, with the API in its loop; with standbys,
/// pairs with each before the guest runs and protects it with the epoch engine on a thread of
/// its own. With a key, `vmr ctl protect` pairs a standby while the guest runs.
fn run_protected(
    config: VmConfig,
    api: Option<&Path>,
    protection: Option<Protection>,
) -> Result<ExitCode, String> {
    let id = format!("vmr-{}", std::process::id());
    let (server, receiver) = match api {
        Some(socket) => {
            let (server, receiver) = ApiServer::start(socket).map_err(|e| e.to_string())?;
            (Some(server), Some(receiver))
        }
        None => (None, None),
    };
    let (requests_tx, requests) = channel();
    let hook = protection
        .as_ref()
        .map(|p| Arc::new(PrimaryHook::new(&p.options, requests_tx.clone())));
    let (paired_tx, paired_rx) = channel();
    let pairing = protection.clone().filter(|p| !p.standbys.is_empty());
    let vm_id = id.clone();
    let api_hook = hook.clone();
    let vm = VmThread::spawn_with(config, move |m| {
        // The standbys are paired once the VM is built, before the guest runs.
        if let Some(p) = &pairing {
            let hello = protect::hello(m.config(), &vm_id).map_err(|e| e.to_string())?;
            let standbys = protect::pair_all(p, &hello).map_err(|e| e.to_string())?;
            let _ = paired_tx.send(standbys);
        }
        let mut controller = match receiver {
            Some(r) => {
                let mut c = Controller::new(r, m, vm_id)
                    .map_err(|e| format!("cannot serve the API: {e}"))?;
                if let Some(h) = api_hook {
                    c.set_replication(h);
                }
                Some(c)
            }
            None => None,
        };
        Ok(move |m: &mut MicroVm| {
            if let Some(c) = controller.as_mut() {
                c.poll(m);
            }
        })
    })
    .map_err(|e| match e {
        // The build's own message says what is wrong with the input.
        VmThreadError::Build(message) => message,
        e => e.to_string(),
    })?;
    let mut engine = None;
    if let (Ok(standbys), Some(p), Some(h)) = (paired_rx.try_recv(), &protection, &hook) {
        match protect_with(&vm, standbys, p, h) {
            Ok(e) => engine = Some(e),
            Err(e) => {
                let _ = vm.stop();
                return Err(e);
            }
        }
    }
    // Protection requests of the API, until the VM ends.
    while !vm.has_ended() {
        let Ok(request) = requests.recv_timeout(Duration::from_millis(50)) else {
            continue;
        };
        match (&protection, &hook) {
            (Some(p), Some(h)) => serve_protect(&vm, &mut engine, p, h, &id, request),
            _ => (request.reply)(Err(vmm::api::NO_KEY_MESSAGE.to_string())),
        }
    }
    drop(requests_tx);
    let reason = vm.wait();
    if let Some(engine) = engine {
        if let Err(e) = engine.stop() {
            tracing::error!("the epoch engine: {e}");
        }
    }
    if let Some(server) = server {
        // Let the server deliver answers given in the last round (a migration's) before it
        // closes every connection.
        std::thread::sleep(Duration::from_millis(200));
        drop(server);
    }
    exit_code(reason.map_err(|e| e.to_string())?)
}

/// Protects the VM with `standbys`, paired: the epoch engine on its own thread, its figures
/// to the API's hook.
fn protect_with(
    vm: &VmThread,
    standbys: Vec<NewStandby>,
    protection: &Protection,
    hook: &PrimaryHook,
) -> Result<EngineHandle, String> {
    let names = standbys.iter().map(|s| s.name.clone()).collect();
    let engine = Engine::start(vm, standbys, protection.options.clone())
        .map_err(|e| format!("cannot protect the VM: {e}"))?;
    let metrics = engine.metrics();
    let handle = engine
        .spawn()
        .map_err(|e| format!("cannot protect the VM: {e}"))?;
    hook.set_engine(metrics, names);
    Ok(handle)
}

/// `PUT /replication/protect`: pairs with the standby and protects the VM with it, answering
/// once its initial synchronisation is committed (on a thread: the VM runs on meanwhile).
fn serve_protect(
    vm: &VmThread,
    engine: &mut Option<EngineHandle>,
    protection: &Protection,
    hook: &Arc<PrimaryHook>,
    id: &str,
    request: ProtectRequest,
) {
    let ProtectRequest { standby, reply } = request;
    if engine.as_ref().is_some_and(EngineHandle::is_running) {
        return reply(Err(
            "the VM is protected already: adding a standby to a running protection is not \
             supported yet"
                .into(),
        ));
    }
    let paired = vm
        .run(|m| m.config().clone())
        .map_err(|e| e.to_string())
        .and_then(|config| protect::hello(&config, id).map_err(|e| e.to_string()))
        .and_then(|hello| {
            protect::pair(
                &standby,
                &protection.key,
                &hello,
                protection.options.standby_timeout,
            )
            .map_err(|e| e.to_string())
        })
        .and_then(|s| protect_with(vm, vec![s], protection, hook));
    let handle = match paired {
        Ok(handle) => handle,
        Err(e) => return reply(Err(e)),
    };
    *engine = Some(handle);
    let hook = hook.clone();
    let waited = std::thread::Builder::new()
        .name("protect".into())
        .spawn(move || {
            let t0 = Instant::now();
            loop {
                let status = hook.status();
                if status.protected {
                    return reply(Ok(status));
                }
                if status.role != ReplicationRole::Primary || t0.elapsed() > SYNC_TIMEOUT {
                    let why = status.peers.first().and_then(|p| p.reason.clone());
                    return reply(Err(format!(
                        "the standby did not complete the initial synchronisation{}",
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    if let Err(e) = waited {
        tracing::error!("cannot wait for the initial synchronisation: {e}");
    }
}

/// Longest wait for a new standby's initial synchronisation before `PUT /replication/protect`
/// answers.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

fn exit_code(reason: vmm::vstate::vcpu::ExitReason) -> Result<ExitCode, String> {
    tracing::info!(?reason, "VM ended");
    if reason.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("the VM ended abnormally: {reason:?}"))
    }
}

fn run_standby(args: StandbyArgs) -> Result<ExitCode, String> {
    let host = standby::StandbyHost::new(standby::StandbyOptions {
        listen: args.listen,
        key_file: args.key_file,
        disks: args.disk,
        nets: args.net,
    })
    .map_err(|e| e.to_string())?;
    let host = Arc::new(host);
    let _server = args
        .api
        .as_deref()
        .map(|socket| standby::serve_api(host.clone(), socket))
        .transpose()
        .map_err(|e| e.to_string())?;
    standby::run(host).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
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
