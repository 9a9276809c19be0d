//! A VM running here as the primary: booted by `vmr run`, or taken over by a standby. Its
//! monitor thread runs the API in its loop; with a key, the epoch engine protects it with the
//! standbys paired at start or later (`vmr ctl protect`), on a thread of its own.

use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::primary::vm::{VmThread, VmThreadError};
use replicator::primary::{Engine, EngineHandle, EngineOptions, NewStandby};
use vmm::api::{
    ApiReceiver, ApiServer, PeerState, ReplicationHook, ReplicationRole, ReplicationStatus,
};
use vmm::config::VmConfig;
use vmm::controller::Controller;
use vmm::microvm::{MicroVm, VmPhase};

use vmm::health::{decide, HealthAction};

use crate::protect::{self, PrimaryHook, ProtectAction, ProtectRequest, Protection};

/// Where the VM comes from.
pub enum Boot {
    /// Built from its configuration and booted.
    Config(VmConfig),
    /// Made by this closure on the monitor thread (a standby's committed state taken over):
    /// its vCPUs are started, its devices' interrupts raised.
    Built(Box<dyn FnOnce() -> Result<MicroVm, String> + Send>),
}

/// The API of the VM: none, a socket to serve, or one served already (a standby's, whose
/// server goes on answering for the VM taken over).
pub enum Api {
    /// No API.
    None,
    /// Serve the API on this socket.
    Socket(std::path::PathBuf),
    /// A server started already, and its receiver.
    Served(ApiServer, ApiReceiver),
}

/// Runs the VM of `boot` on its monitor thread, with the API in its loop, as `vm_id`; with
/// `protection`'s standbys, pairs with each before the guest runs and protects it. With a key,
/// `vmr ctl protect` pairs a standby while the guest runs. Returns when the VM ends; `started`
/// is given the replication's status once the VM runs.
pub fn run(
    boot: Boot,
    api: Api,
    protection: Option<Protection>,
    vm_id: String,
    started: impl FnOnce(ReplicationStatus),
) -> Result<ExitCode, String> {
    let (server, receiver) = match api {
        Api::None => (None, None),
        Api::Socket(socket) => {
            let (server, receiver) = ApiServer::start(&socket).map_err(|e| e.to_string())?;
            (Some(server), Some(receiver))
        }
        Api::Served(server, receiver) => (Some(server), Some(receiver)),
    };
    let (requests_tx, requests) = channel();
    let hook = protection
        .as_ref()
        .map(|p| Arc::new(PrimaryHook::new(&p.options, requests_tx.clone())));
    let (paired_tx, paired_rx) = channel();
    let pairing = protection.clone().filter(|p| !p.standbys.is_empty());
    let id = vm_id.clone();
    let api_hook = hook.clone();
    let taken_over = matches!(boot, Boot::Built(_));
    let setup = move |m: &mut MicroVm| {
        // The standbys are paired once the VM is built, before the guest runs.
        if let Some(p) = &pairing {
            let hello = protect::hello(m.config(), &id, p.term()).map_err(|e| e.to_string())?;
            let standbys = protect::pair_all(p, &hello).map_err(|e| e.to_string())?;
            let _ = paired_tx.send(standbys);
        }
        if let Some(h) = &api_hook {
            h.set_health(m.health());
        }
        let mut controller = match receiver {
            Some(r) => {
                let mut c =
                    Controller::new(r, m, id).map_err(|e| format!("cannot serve the API: {e}"))?;
                if let Some(h) = api_hook {
                    c.set_replication(h);
                }
                Some(c)
            }
            None => None,
        };
        if taken_over && m.phase() == VmPhase::Created {
            m.start().map_err(|e| e.to_string())?;
            m.announce();
            m.raise_device_interrupts();
        }
        Ok(move |m: &mut MicroVm| {
            if let Some(c) = controller.as_mut() {
                c.poll(m);
            }
        })
    };
    let vm = match boot {
        Boot::Config(config) => VmThread::spawn_with(config, setup),
        Boot::Built(build) => VmThread::spawn_built(build, setup),
    }
    .map_err(|e| match e {
        // The build's own message says what is wrong with the input.
        VmThreadError::Build(message) => message,
        e => e.to_string(),
    })?;
    let mut engine = None;
    if let (Ok(standbys), Some(p), Some(h)) = (paired_rx.try_recv(), &protection, &hook) {
        match protect_with(&vm, standbys, p.options.clone(), h) {
            Ok(e) => engine = Some(e),
            Err(e) => {
                let _ = vm.stop();
                return Err(e);
            }
        }
    }
    started(
        hook.as_ref()
            .map_or_else(ReplicationStatus::without_key, |h| h.status()),
    );
    serve_requests(
        &vm,
        &mut engine,
        protection.as_ref(),
        hook.as_ref(),
        &vm_id,
        &requests,
    );
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

/// Protection requests of the API, until the VM ends.
fn serve_requests(
    vm: &VmThread,
    engine: &mut Option<EngineHandle>,
    protection: Option<&Protection>,
    hook: Option<&Arc<PrimaryHook>>,
    vm_id: &str,
    requests: &Receiver<ProtectRequest>,
) {
    let mut joins = Joins::default();
    let mut supervision = Supervision::default();
    while !vm.has_ended() {
        let Ok(request) = requests.recv_timeout(Duration::from_millis(50)) else {
            if let (Some(p), Some(h)) = (protection, hook) {
                joins.pair_joined(vm, engine, p, h, vm_id);
                supervision.act(vm, engine.as_ref(), h);
            }
            continue;
        };
        let ProtectRequest { action, reply } = request;
        match (protection, hook, action) {
            (Some(p), Some(h), ProtectAction::Protect(standby)) => {
                serve_protect(vm, engine, p, h, vm_id, standby, reply)
            }
            (Some(_), Some(h), ProtectAction::HandOver) => {
                let Some(e) = engine.as_ref().filter(|e| e.is_running()) else {
                    reply(Err(
                        "the VM is not protected: there is no standby to hand it over to".into(),
                    ));
                    continue;
                };
                match e.hand_over() {
                    Ok((standby, epoch)) => {
                        tracing::info!(standby, epoch, "VM handed over: this monitor ends");
                        reply(Ok(h.status()));
                        end_handed_over(vm);
                    }
                    Err(why) => reply(Err(why)),
                }
            }
            _ => reply(Err(vmm::api::NO_KEY_MESSAGE.to_string())),
        }
    }
}

/// Ends this monitor's VM once it was handed over, after letting the API answer (for a
/// moment) that it was.
fn end_handed_over(vm: &VmThread) {
    std::thread::sleep(Duration::from_millis(200));
    let _ = vm.run(|m| {
        m.run_state()
            .request_exit(vmm::vstate::vcpu::ExitReason::Migrated)
    });
}

/// What the primary does about the health of the VM's resources ([`decide`]): hands the VM
/// over to its synchronised standby when a TAP or disk failed, else reports (logged once).
#[derive(Default)]
struct Supervision {
    /// What was last reported, not to log it again.
    reported: Option<String>,
    /// When a handover last failed: tried again after [`HANDOVER_RETRY`].
    failed: Option<Instant>,
}

/// How long after a failed handover the primary tries again.
const HANDOVER_RETRY: Duration = Duration::from_secs(5);

impl Supervision {
    fn act(&mut self, vm: &VmThread, engine: Option<&EngineHandle>, hook: &PrimaryHook) {
        let Some(health) = hook.health() else {
            return;
        };
        let engine = engine.filter(|e| e.is_running());
        let protected = engine.is_some() && hook.status().protected;
        match decide(&health, protected) {
            HealthAction::Nothing => self.reported = None,
            HealthAction::Report(why) => {
                if self.reported.as_ref() != Some(&why) {
                    tracing::warn!("health: {why}");
                    self.reported = Some(why);
                }
            }
            HealthAction::HandOver(why) => {
                let (Some(e), true) = (
                    engine,
                    self.failed.is_none_or(|t| t.elapsed() >= HANDOVER_RETRY),
                ) else {
                    return;
                };
                tracing::warn!("health: {why}: handing the VM over to its standby");
                hook.handing_over_for(Some(why.clone()));
                match e.hand_over() {
                    Ok((standby, epoch)) => {
                        tracing::warn!(standby, epoch, "VM handed over ({why}): this monitor ends");
                        end_handed_over(vm);
                    }
                    Err(e) => {
                        tracing::warn!("health: the VM could not be handed over: {e}");
                        hook.handing_over_for(None);
                        self.failed = Some(Instant::now());
                    }
                }
            }
        }
    }
}

/// Standbys that offered themselves to the VM in the coordinator (`vmr standby --join`, or
/// one that followed a new primary): paired by themselves, as the VM's first standbys or as
/// ones joining its protection.
#[derive(Default)]
struct Joins {
    /// When the coordinator was last read.
    last: Option<Instant>,
    /// Standbys that could not be paired, and when: tried again after [`JOIN_RETRY`].
    failed: std::collections::HashMap<String, Instant>,
}

/// How often a primary with a coordinator looks for standbys that joined.
const JOIN_EVERY: Duration = Duration::from_secs(1);
/// How long a standby that could not be paired is left alone.
const JOIN_RETRY: Duration = Duration::from_secs(10);

impl Joins {
    fn pair_joined(
        &mut self,
        vm: &VmThread,
        engine: &mut Option<EngineHandle>,
        protection: &Protection,
        hook: &PrimaryHook,
        vm_id: &str,
    ) {
        let Some(authority) = &protection.options.authority else {
            return;
        };
        if self.last.is_some_and(|t| t.elapsed() < JOIN_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let running = engine.as_ref().filter(|e| e.is_running());
        let status = hook.status();
        // A protection still synchronising its first standbys takes none more.
        if running.is_some() && !status.protected {
            return;
        }
        let Ok(members) = authority.coordinator.members(vm_id) else {
            return;
        };
        let fresh: Vec<_> = members
            .into_iter()
            .filter(|m| m.host != authority.me && m.committed_epoch == 0)
            .filter(|m| {
                !status
                    .peers
                    .iter()
                    .any(|p| p.name == m.addr && p.state != PeerState::Dropped)
            })
            .filter(|m| {
                self.failed
                    .get(&m.addr)
                    .is_none_or(|t| t.elapsed() >= JOIN_RETRY)
            })
            .collect();
        if fresh.is_empty() {
            return;
        }
        let paired = protection.current_options().and_then(|options| {
            let config = vm.run(|m| m.config().clone()).map_err(|e| e.to_string())?;
            let hello = protect::hello(&config, vm_id, options.term).map_err(|e| e.to_string())?;
            let mut standbys = Vec::new();
            for m in &fresh {
                let new = protect::pair(&m.addr, &protection.key, &hello, options.standby_timeout)
                    .map_err(|e| e.to_string());
                match new.and_then(|s| match running {
                    Some(e) => e.add_standby(s).map(|()| None),
                    None => Ok(Some(s)),
                }) {
                    Ok(Some(s)) => standbys.push(s),
                    Ok(None) => tracing::info!(
                        standby = m.host,
                        "a standby that joined joins the protection"
                    ),
                    Err(e) => {
                        tracing::warn!(
                            standby = m.host,
                            addr = m.addr,
                            "cannot pair with a standby that joined: {e}"
                        );
                        self.failed.insert(m.addr.clone(), Instant::now());
                    }
                }
            }
            if standbys.is_empty() {
                return Ok(None);
            }
            protect_with(vm, standbys, options, hook).map(Some)
        });
        match paired {
            Ok(Some(handle)) => {
                tracing::info!(
                    standbys = fresh.len(),
                    "protecting the VM with the standbys that joined it"
                );
                *engine = Some(handle);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot protect the VM with the standbys that joined: {e}"),
        }
    }
}

/// Protects the VM with `standbys`, paired: the epoch engine on its own thread, its figures
/// to the API's hook.
fn protect_with(
    vm: &VmThread,
    standbys: Vec<NewStandby>,
    options: EngineOptions,
    hook: &PrimaryHook,
) -> Result<EngineHandle, String> {
    let engine =
        Engine::start(vm, standbys, options).map_err(|e| format!("cannot protect the VM: {e}"))?;
    let metrics = engine.metrics();
    let handle = engine
        .spawn()
        .map_err(|e| format!("cannot protect the VM: {e}"))?;
    hook.set_engine(metrics);
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
    standby: String,
    reply: vmm::api::ProtectReply,
) {
    let running = engine.as_ref().filter(|e| e.is_running());
    let paired = protection.current_options().and_then(|options| {
        let config = vm.run(|m| m.config().clone()).map_err(|e| e.to_string())?;
        let hello = protect::hello(&config, id, options.term).map_err(|e| e.to_string())?;
        let new = protect::pair(
            &standby,
            &protection.key,
            &hello,
            protection.options.standby_timeout,
        )
        .map_err(|e| e.to_string())?;
        match running {
            // Protected already: the standby joins the others.
            Some(e) => e.add_standby(new).map(|()| None),
            None => protect_with(vm, vec![new], options, hook).map(Some),
        }
    });
    match paired {
        Ok(Some(handle)) => *engine = Some(handle),
        Ok(None) => {}
        Err(e) => return reply(Err(e)),
    }
    let hook = hook.clone();
    let waited = std::thread::Builder::new()
        .name("protect".into())
        .spawn(move || {
            let t0 = Instant::now();
            loop {
                let status = hook.status();
                let peer = status.peers.iter().rev().find(|p| p.name == standby);
                if status.protected && peer.is_some_and(|p| p.state == PeerState::Protecting) {
                    return reply(Ok(status));
                }
                let dropped = peer.is_some_and(|p| p.state == PeerState::Dropped);
                if dropped || status.role != ReplicationRole::Primary || t0.elapsed() > SYNC_TIMEOUT
                {
                    let why = peer.and_then(|p| p.reason.clone());
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

/// The exit code of a VM that ended for `reason`.
pub fn exit_code(reason: vmm::vstate::vcpu::ExitReason) -> Result<ExitCode, String> {
    tracing::info!(?reason, "VM ended");
    if reason.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("the VM ended abnormally: {reason:?}"))
    }
}
