//! `vmr standby`: a standby host for one VM. It listens for a primary (`vmr run --protect`),
//! authenticates it with the shared key, sizes its committed memory from the primary's
//! `Hello` (after checking this host can hold the VM: memory, vCPUs, devices, disks), and
//! serves its epochs, committing each atomically.
//!
//! One VM per standby: once an epoch is committed, the committed state is what a failover
//! resumes, so it is kept when the primary's link ends, and a later pairing is refused (with
//! its reason, to the primary) — a fresh `vmr standby` protects a VM again. A pairing that
//! ends before any commit leaves the standby fresh.
//!
//! # Failover
//!
//! Once synchronised, a primary silent for `--detect-ms`, or whose link breaks without a
//! goodbye (a primary that lets its standby go, or ends protection, says so first), is lost.
//! With `--coordinator` the standby then claims the VM (the compare-and-swap of its term) and,
//! if it wins, takes it over: the committed state becomes the running VM, in this process
//! ([`replicator::standby::takeover`]), and the API socket goes on serving it as a primary
//! (`vmr ctl protect` pairs a new standby). An unreachable coordinator is retried; a claim
//! lost (the primary went on, or another standby won) leaves the standby as it is. Without a
//! coordinator nothing happens by itself: `vmr ctl failover --force` takes the VM over.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm::health::HostResources;

use replicator::auth::ReplicationKey;
use replicator::compat::{Hello, StandbyProfile, PROTOCOL};
use replicator::conn::Conn;
use replicator::coordinator::Member;
use replicator::pairing::{self, PairError};
use replicator::primary::EngineOptions;
use replicator::standby::committed::DiskImage;
use replicator::standby::host::{Standby, StandbyError};
use replicator::standby::staging::StagingOptions;
use replicator::standby::takeover::{self, TakeoverError};
use replicator::standby::ServeError;
use replicator::wire::FrameError;
use vmm::api::{
    ApiError, ApiReceiver, ApiServer, FailoverParams, ProtectParams, ProtectReply, ReplicationHook,
    ReplicationRole, ReplicationStatus, SnapshotInfo, SnapshotParams, SnapshotType,
};
use vmm::builder::RestoreOptions;
use vmm::config::NetConfig;
use vmm::controller::answer_without_vm;
use vmm::snapshot::SnapshotError;

use crate::coordination::Coordination;
use crate::primary;
use crate::protect::{devices, disk_sizes, Protection};

/// How long a connection may take to pair.
const PAIRING_TIMEOUT: Duration = Duration::from_secs(5);
/// Until the first epoch is committed, a primary silent this long is gone: it captures and
/// sends all of memory first, to each of its standbys in turn.
const FIRST_EPOCH_SILENCE: Duration = Duration::from_secs(120);
/// After it, until this standby may take the VM over, or always without a coordinator, a
/// primary silent this long is gone. Then, with a coordinator, `--detect-ms` (it sends an
/// epoch at least every epoch period).
const SYNC_SILENCE: Duration = Duration::from_secs(10);
/// Default of `--detect-ms`: a primary silent this long, once synchronised, is lost.
pub const DEFAULT_DETECT: Duration = Duration::from_millis(50);
/// How often a takeover whose claim could not be made (coordinator unreachable) is retried.
const CLAIM_RETRY: Duration = Duration::from_millis(100);
/// How long the standbys of a lost primary give each other to register what they hold before
/// the most up-to-date claims: they detect the loss within about one epoch of each other.
const ELECTION_WINDOW: Duration = Duration::from_millis(30);
/// How long a standby waits for a more up-to-date one to claim before it claims itself (the
/// other may be dead too).
const ELECTION_DEFER: Duration = Duration::from_secs(2);
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Errors of `vmr standby`. One variant per failing call.
#[derive(Debug, thiserror::Error)]
pub enum StandbyHostError {
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] replicator::auth::KeyError),
    /// A disk cannot be measured.
    #[error(transparent)]
    Disk(#[from] crate::protect::ProtectError),
    /// The listening socket.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A thread could not start.
    #[error("cannot start a thread: {0}")]
    Spawn(std::io::Error),
    /// The API socket.
    #[error(transparent)]
    Api(vmm::api::ApiServerError),
}

/// What `vmr standby` is given.
pub struct StandbyOptions {
    /// Where to listen.
    pub listen: String,
    /// The replication key.
    pub key_file: PathBuf,
    /// The disk images the VM's disks are replicated to, in order.
    pub disks: Vec<PathBuf>,
    /// The TAPs the VM would use here, in order.
    pub nets: Vec<NetConfig>,
    /// The console and PVM choice of the VM once taken over here.
    pub restore: RestoreOptions,
    /// The coordinator, if any: without one, failover is manual (`--force`).
    pub coordination: Option<Coordination>,
    /// A synchronised primary silent this long is lost.
    pub detect: Duration,
    /// The VM this standby offers itself to before any primary paired with it (`--join`):
    /// registered in the coordinator, a primary of that VM pairs with it by itself.
    pub join: Option<String>,
    /// Where primaries reach this standby (`--advertise`, default the listen address).
    pub advertise: String,
}

/// A takeover asked for: by the API (`vmr ctl failover`) or by the loss of the primary.
pub struct TakeoverRequest {
    /// Without the coordinator's claim.
    force: bool,
    /// Why (for the log).
    cause: String,
    /// The API's answer, if the API asked.
    reply: Option<ProtectReply>,
    /// A planned switch-over: the primary chose this standby and stopped (no election).
    planned: bool,
}

/// The VM this standby holds (or is being paired with).
pub struct Held {
    /// Its committed state.
    pub standby: Arc<Standby<DiskImage>>,
    /// The primary's `Hello`.
    pub hello: Hello,
    /// The primary's address.
    pub primary: SocketAddr,
    /// Whether its link is up.
    pub serving: bool,
    /// Why its link ended, when it did.
    pub ended: Option<String>,
}

/// A standby host's state, shared between the listener, the serving thread and the API.
pub struct StandbyHost {
    key: ReplicationKey,
    options: StandbyOptions,
    disk_sizes: Vec<u64>,
    held: Mutex<Option<Held>>,
    takeovers: Mutex<Sender<TakeoverRequest>>,
    /// Set once the VM is taken over: the API thread hands its receiver to the VM.
    taken_over: AtomicBool,
    /// The TAPs and disk images the VM would use here, whose health the status shows.
    resources: HostResources,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StandbyHost {
    /// Loads the key and measures the disks; the takeovers asked for come out of the
    /// receiver ([`run`] serves them).
    pub fn new(
        options: StandbyOptions,
    ) -> Result<(Self, Receiver<TakeoverRequest>), StandbyHostError> {
        let key = ReplicationKey::from_file(&options.key_file)?;
        let disk_sizes = disk_sizes(options.disks.iter().map(PathBuf::as_path))?;
        let (takeovers, requests) = channel();
        let resources = HostResources::new(
            options.nets.iter().map(|n| n.tap.clone()).collect(),
            &options.disks,
        );
        let host = Self {
            resources,
            key,
            options,
            disk_sizes,
            held: Mutex::new(None),
            takeovers: Mutex::new(takeovers),
            taken_over: AtomicBool::new(false),
        };
        Ok((host, requests))
    }

    fn ask_takeover(&self, request: TakeoverRequest) {
        if let Err(e) = lock(&self.takeovers).send(request) {
            if let Some(reply) = e.0.reply {
                reply(Err("the standby is ending".into()));
            }
        }
    }

    /// The VM held, locked.
    pub fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        lock(&self.held)
    }

    /// The VM held, if any, and its primary: the committed state (for a snapshot, the API).
    pub fn standby(&self) -> Option<Arc<Standby<DiskImage>>> {
        self.held().as_ref().map(|h| h.standby.clone())
    }

    /// The TAPs given (the VM's network devices here).
    pub fn nets(&self) -> &[NetConfig] {
        &self.options.nets
    }

    /// What this host can hold for the VM of `hello`, as a profile checked against it, and
    /// the standby sized for it; the one-line reason otherwise.
    fn prepare(&self, hello: &Hello) -> Result<Arc<Standby<DiskImage>>, String> {
        if let Some(h) = self.held().as_ref() {
            let committed = h.standby.committed().committed_epoch();
            if h.serving {
                return Err(format!(
                    "this standby is serving VM {} from {} already",
                    h.hello.vm_id, h.primary
                ));
            }
            if committed > 0 {
                return Err(format!(
                    "this standby holds epoch {committed} of VM {} from {}, kept for failover: \
                     start a fresh `vmr standby` to protect a VM",
                    h.hello.vm_id, h.primary
                ));
            }
        }
        if let Some(available) = mem_available() {
            // A primary older than protocol 1.2 sends all of memory as the first epoch, staged
            // whole before it is applied; newer ones copy it into place.
            let join = replicator::primary::JOIN_SINCE;
            let staged_whole =
                (hello.protocol.major, hello.protocol.minor) < (join.major, join.minor);
            let needed = hello
                .mem_bytes
                .saturating_mul(if staged_whole { 2 } else { 1 });
            if needed > available {
                return Err(format!(
                    "the VM's {} MiB of memory{} do not fit in this host's {} MiB available",
                    hello.mem_bytes >> 20,
                    if staged_whole {
                        " (twice that during the initial synchronisation from this primary)"
                    } else {
                        ""
                    },
                    available >> 20
                ));
            }
        }
        if hello.vcpus == 0 || hello.vcpus > vmm::arch::mptable::MAX_VCPUS {
            return Err(format!(
                "the VM's {} vCPUs are more than vmr runs",
                hello.vcpus
            ));
        }
        // This host's TSC and CPU features: the VM must be able to run here. A side that
        // cannot tell its TSC (0) is not compared.
        let (tsc_khz, tsc_scaling) = vmm::vstate::vcpu::host_tsc().unwrap_or((0, true));
        let profile = StandbyProfile {
            mem_bytes: hello.mem_bytes,
            vcpus: hello.vcpus,
            tsc_khz: if hello.tsc_khz == 0 { 0 } else { tsc_khz },
            tsc_scaling: tsc_scaling || tsc_khz == 0,
            cpu_features: vmm::vstate::vcpu::host_cpu_features(),
            devices: devices(self.options.nets.len(), self.options.disks.len()),
            disk_sizes: self.disk_sizes.clone(),
        };
        profile
            .check(hello, PROTOCOL)
            .map_err(|e| format!("this standby cannot hold the VM: {e}"))?;
        let disks = self
            .options
            .disks
            .iter()
            .map(|p| {
                DiskImage::open(p).map_err(|e| format!("cannot open disk {}: {e}", p.display()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Standby::new(profile, self.key.clone(), disks, StagingOptions::default())
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }

    /// Pairs with the primary at the other end of `conn` and serves it on a thread of its
    /// own; a connection that fails to pair is logged in one line and closed.
    fn pair(self: &Arc<Self>, conn: Conn, peer: SocketAddr) {
        let setup = conn
            .set_read_timeout(Some(PAIRING_TIMEOUT))
            .and_then(|()| conn.set_write_timeout(Some(PAIRING_TIMEOUT)))
            .and_then(|()| Ok((conn.try_clone()?, conn.try_clone()?)));
        let (reader, socket) = match setup {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("refused a connection from {peer}: {e}");
                return;
            }
        };
        let committed = self
            .standby()
            .map(|s| {
                let c = s.committed();
                (c.committed_epoch(), c.committed_term())
            })
            .unwrap_or((0, 0));
        let mut prepared = None;
        let paired = pairing::accept_with(reader, conn, &self.key, committed, None, |hello| {
            let standby = self.prepare(hello)?;
            let profile = standby.profile().clone();
            prepared = Some(standby);
            Ok(profile)
        });
        let (mut link, hello) = match (paired, prepared) {
            (Ok((link, hello, _)), Some(standby)) => {
                *self.held() = Some(Held {
                    standby,
                    hello: hello.clone(),
                    primary: peer,
                    serving: true,
                    ended: None,
                });
                (link, hello)
            }
            (Ok(_), None) => return,
            (Err(PairError::Auth(e)), _) => {
                tracing::warn!("refused a connection from {peer}: {e}");
                return;
            }
            (Err(e), _) => {
                tracing::warn!("refused to pair with {peer}: {e}");
                return;
            }
        };
        tracing::info!(
            vm = %hello.vm_id,
            primary = %peer,
            mem_mib = hello.mem_bytes >> 20,
            vcpus = hello.vcpus,
            "paired with a primary: standing by"
        );
        // The initial synchronisation may be slow to start; once protected, the primary sends
        // an epoch every few ms, and one silent for `detect` is lost.
        if let Err(e) = socket.set_read_timeout(Some(FIRST_EPOCH_SILENCE)) {
            tracing::warn!("cannot bound reads from the primary: {e}");
        }
        let armed = Arc::new(AtomicBool::new(false));
        self.watch_sync(socket, armed.clone());
        let host = self.clone();
        let serving = std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || {
                let Some(standby) = host.standby() else {
                    return;
                };
                let end = standby.serve_link(&mut link, &hello);
                let mut held = host.held();
                let committed = standby.committed().committed_epoch();
                if let Some(h) = held.as_mut() {
                    h.serving = false;
                    h.ended = Some(end.to_string());
                }
                if committed == 0 {
                    tracing::warn!(
                        primary = %peer,
                        "the primary's link ended before the first commit ({end}): standing by, fresh"
                    );
                    *held = None;
                    return;
                }
                drop(held);
                if let ServeError::Handover(epoch) = end {
                    tracing::info!(
                        primary = %peer,
                        epoch,
                        "the primary handed the VM over: taking it over"
                    );
                    host.ask_takeover(TakeoverRequest {
                        // Without a coordinator: the primary stopped itself, no claim needed.
                        force: host.options.coordination.is_none(),
                        cause: format!("the primary {peer} handed it over at epoch {epoch}"),
                        reply: None,
                        planned: true,
                    });
                    return;
                }
                if let ServeError::Refused(_) = end {
                    tracing::warn!(
                        primary = %peer,
                        committed_epoch = committed,
                        "{end}: the committed state is kept (the primary runs on)"
                    );
                    return;
                }
                let end = match &end {
                    ServeError::Frame(FrameError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        let bound = match (armed.load(Ordering::Relaxed), committed) {
                            (true, _) => host.options.detect,
                            (false, 0) => FIRST_EPOCH_SILENCE,
                            (false, _) => SYNC_SILENCE,
                        };
                        format!("silent for {} ms", bound.as_millis())
                    }
                    end => format!("its link ended: {end}"),
                };
                tracing::warn!(
                    primary = %peer,
                    committed_epoch = committed,
                    "PRIMARY LOST: {end}"
                );
                if host.options.coordination.is_some() {
                    host.ask_takeover(TakeoverRequest {
                        force: false,
                        cause: format!("the primary {peer} was lost ({end})"),
                        reply: None,
                        planned: false,
                    });
                } else {
                    tracing::warn!(
                        "no coordinator: automatic failover is off; the committed state is \
                         kept (`vmr ctl failover --force` takes the VM over)"
                    );
                }
            });
        if let Err(e) = serving {
            tracing::error!("cannot start serving the primary: {e}");
            *self.held() = None;
        }
    }
}

impl StandbyHost {
    /// The VM this standby stands by for: the one it holds, else the one it joins.
    fn vm_id(&self) -> Option<String> {
        self.held()
            .as_ref()
            .map(|h| h.hello.vm_id.clone())
            .or_else(|| self.options.join.clone())
    }

    /// This standby as it registers: its committed epoch and term (0: fresh).
    fn member(&self, c: &Coordination) -> Member {
        let (committed_epoch, term) = self
            .standby()
            .map(|s| {
                let s = s.committed();
                (s.committed_epoch(), s.committed_term())
            })
            .unwrap_or((0, 0));
        Member {
            host: c.me.clone(),
            addr: self.options.advertise.clone(),
            committed_epoch,
            term,
        }
    }

    /// Registers this standby for its VM, if it has one; the VM's id. A failure is logged.
    fn register(&self, c: &Coordination) -> Option<String> {
        let vm = self.vm_id()?;
        if let Err(e) = c.coordinator.register(&vm, &self.member(c)) {
            tracing::debug!("cannot register with the coordinator: {e}");
        }
        Some(vm)
    }

    /// The election among the standbys of a lost primary, before this one claims: registers
    /// what it holds, gives the others [`ELECTION_WINDOW`] to do the same, and defers to the
    /// most up to date (highest committed epoch of the same term; ties to the lowest host
    /// name) for as long as it may take to claim. Returns whether to claim now; `false`: the
    /// VM was claimed by another standby (this one then follows: it is reset to fresh).
    fn elect(&self, c: &Coordination) -> bool {
        let Some(vm) = self.vm_id() else {
            return true;
        };
        let me = self.member(c);
        let rivals = |members: Vec<Member>| -> Vec<Member> {
            members
                .into_iter()
                .filter(|m| m.host != me.host && m.term == me.term && m.committed_epoch > 0)
                .collect()
        };
        // Alone (no other synchronised standby registered for the VM): claim at once. Each
        // call to etcd counts: 100-300 ms each in the emulated lab.
        if c.coordinator
            .members(&vm)
            .map(rivals)
            .is_ok_and(|r| r.is_empty())
        {
            return true;
        }
        self.register(c);
        std::thread::sleep(ELECTION_WINDOW);
        let Ok(members) = c.coordinator.members(&vm) else {
            return true;
        };
        let better = rivals(members).into_iter().find(|m| {
            (m.committed_epoch, std::cmp::Reverse(&m.host))
                > (me.committed_epoch, std::cmp::Reverse(&me.host))
        });
        let Some(better) = better else {
            tracing::info!(
                epoch = me.committed_epoch,
                "elected: the most up-to-date standby"
            );
            return true;
        };
        tracing::info!(
            better = better.host,
            its_epoch = better.committed_epoch,
            epoch = me.committed_epoch,
            "a standby more up to date is to take the VM over: waiting for its claim"
        );
        let t0 = Instant::now();
        while t0.elapsed() < ELECTION_DEFER {
            if let Ok(Some((o, _))) = c.coordinator.current(&vm) {
                if o.term > me.term && o.owner != me.host {
                    self.follow(c, &o);
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            better = better.host,
            "the elected standby did not claim the VM: claiming it here"
        );
        true
    }

    /// If another host owns the VM with a later term than this standby's, follows it.
    fn follow_if_taken(&self, c: &Coordination) {
        let (Some(vm), Some(standby)) = (self.vm_id(), self.standby()) else {
            return;
        };
        let term = standby.committed().committed_term();
        if let Ok(Some((o, _))) = c.coordinator.current(&vm) {
            if o.term > term && o.owner != c.me {
                self.follow(c, &o);
            }
        }
    }

    /// Another standby took the VM over (`owner`): this one drops its committed state and
    /// registers fresh, for the new primary to pair with it.
    fn follow(&self, c: &Coordination, owner: &replicator::coordinator::Ownership) {
        let vm = self.vm_id();
        *self.held() = None;
        tracing::warn!(
            new_primary = %owner,
            "another standby took the VM over: this one is fresh again, for it to pair with"
        );
        if let Some(vm) = vm {
            if let Err(e) = c.coordinator.register(&vm, &self.member(c)) {
                tracing::warn!("cannot register with the coordinator: {e}");
            }
        }
    }

    /// Bounds the reads of `socket` (the primary's link) as the synchronisation goes: by
    /// [`SYNC_SILENCE`] once the first epoch is committed; with a coordinator, by
    /// `--detect-ms` once this standby can take the VM over (it committed the epoch through
    /// which the primary said it is protected), setting `armed`: a primary silent that long is
    /// lost (and taken over). Before, the primary may be busy synchronising another standby,
    /// and a loss would lead to no takeover anyway; without a coordinator, a short silence
    /// decides nothing (no takeover is automatic): the link is kept through the primary's
    /// hiccups.
    fn watch_sync(self: &Arc<Self>, socket: Conn, armed: Arc<AtomicBool>) {
        let host = self.clone();
        let mut first_committed = false;
        let watched = std::thread::Builder::new()
            .name("sync-watch".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(5));
                let Some(standby) = host.standby() else {
                    return;
                };
                if !host.held().as_ref().is_some_and(|h| h.serving) {
                    return;
                }
                if !first_committed && standby.committed().committed_epoch() > 0 {
                    first_committed = true;
                    if let Err(e) = socket.set_read_timeout(Some(SYNC_SILENCE)) {
                        tracing::warn!("cannot bound reads from the primary: {e}");
                    }
                    if host.options.coordination.is_none() {
                        return;
                    }
                }
                if first_committed && standby.check_takeover().is_ok() {
                    let detect = host.options.detect;
                    match socket.set_read_timeout(Some(detect)) {
                        Ok(()) => {
                            armed.store(true, Ordering::Relaxed);
                            tracing::info!(
                                detect_ms = detect.as_millis() as u64,
                                "protected: a primary silent this long is lost"
                            );
                        }
                        Err(e) => tracing::warn!("cannot bound reads from the primary: {e}"),
                    }
                    return;
                }
            });
        if let Err(e) = watched {
            tracing::warn!("cannot watch the initial synchronisation: {e}");
        }
    }

    /// The first half of a takeover: checks that this host holds a committed VM no primary
    /// serves, and claims it (unless forced). The standby, the VM's id and the term won.
    fn claim(&self, force: bool) -> Result<Claimed, ClaimError> {
        let (standby, vm_id, serving) = match self.held().as_ref() {
            Some(h) => (h.standby.clone(), h.hello.vm_id.clone(), h.serving),
            None => return Err(ClaimError::Refused("this standby holds no VM".into())),
        };
        let committed = standby.info();
        if committed.committed_epoch == 0 {
            return Err(ClaimError::Refused(
                "the initial synchronisation is not committed yet: there is no VM to take over"
                    .into(),
            ));
        }
        if committed.promoted {
            return Err(ClaimError::Refused("the VM was taken over already".into()));
        }
        standby
            .check_takeover()
            .map_err(|e| ClaimError::Refused(e.to_string()))?;
        if serving {
            return Err(ClaimError::Refused(
                "the primary is alive and replicating to this standby: stop it first (a planned \
                 switch-over is not supported yet)"
                    .into(),
            ));
        }
        let term =
            match (&self.options.coordination, force) {
                (_, true) => {
                    tracing::warn!(
                    "takeover forced without a claim: nothing keeps the old primary from running \
                     beside this VM"
                );
                    committed.committed_term
                }
                (None, false) => return Err(ClaimError::Refused(
                    "no coordinator (--coordinator): a takeover without a claim must be forced \
                     (vmr ctl failover --force), and only for a primary known to be dead"
                        .into(),
                )),
                (Some(c), false) => {
                    let o = takeover::claim(&standby, c.coordinator.as_ref(), &vm_id, &c.me)
                        .map_err(|e| match e {
                            TakeoverError::Claim { .. } | TakeoverError::Current { .. } => {
                                ClaimError::Retry(e.to_string())
                            }
                            e => ClaimError::Refused(e.to_string()),
                        })?;
                    return Ok(Claimed {
                        standby,
                        authority: Some(c.authority(&vm_id, o.clone())),
                        vm_id,
                        term: o.term,
                    });
                }
            };
        Ok(Claimed {
            standby,
            vm_id,
            term,
            authority: None,
        })
    }
}

/// A VM claimed for takeover ([`StandbyHost::claim`]).
struct Claimed {
    standby: Arc<Standby<DiskImage>>,
    vm_id: String,
    term: u64,
    authority: Option<replicator::primary::Authority>,
}

/// Why a takeover cannot be made now.
enum ClaimError {
    /// The coordinator did not answer: try again.
    Retry(String),
    /// Not now, nor later (the reason, one line).
    Refused(String),
}

/// The standby's side of the API: `GET /replication`, `GET /metrics`,
/// `PUT /snapshot/create` writing the committed epoch as a snapshot `vmr restore` runs, and
/// `PUT /replication/failover`.
impl ReplicationHook for StandbyHost {
    fn status(&self) -> ReplicationStatus {
        let held = self.held();
        let mut status = ReplicationStatus {
            role: ReplicationRole::Standby,
            key: true,
            health: Some(Box::new(self.resources.check())),
            ..ReplicationStatus::default()
        };
        match held.as_ref() {
            None => status.message = Some("standing by for a primary: nothing held yet".into()),
            Some(h) => {
                let info = h.standby.info();
                status.term = info.committed_term;
                status.last_committed_epoch = info.committed_epoch;
                status.last_sent_epoch = info.open_epoch.unwrap_or(info.committed_epoch);
                status.epochs = info.committed_epoch;
                status.inbound_frames_logged = info.inbound_frames;
                status.primary = Some(h.primary.to_string());
                status.message = match (&h.ended, h.serving) {
                    (_, true)
                        if info
                            .protected_through
                            .is_some_and(|t| info.committed_epoch >= t) =>
                    {
                        Some(format!(
                            "holding VM {} from its primary, ready to take it over (automatic \
                             failover {})",
                            h.hello.vm_id,
                            if self.options.coordination.is_some() {
                                "on"
                            } else {
                                "off: no coordinator"
                            }
                        ))
                    }
                    (_, true) => Some(format!(
                        "synchronising VM {} from its primary (not protected yet)",
                        h.hello.vm_id
                    )),
                    (Some(end), false) => Some(format!(
                        "the primary's link ended ({end}): committed epoch {} kept for failover",
                        info.committed_epoch
                    )),
                    (None, false) => None,
                };
            }
        }
        status
    }

    fn protect(&self, _params: ProtectParams, reply: ProtectReply) {
        reply(Err(
            "this is a standby: protect the VM from its primary (vmr ctl protect)".into(),
        ));
    }

    fn failover(&self, params: FailoverParams, reply: ProtectReply) {
        self.ask_takeover(TakeoverRequest {
            force: params.force,
            cause: "asked through the API".into(),
            reply: Some(reply),
            planned: false,
        });
    }
}

impl StandbyHost {
    /// Writes the committed epoch as a snapshot at `params.snapshot_path`.
    fn snapshot(&self, params: &SnapshotParams) -> Result<SnapshotInfo, ApiError> {
        if params.snapshot_type != SnapshotType::Full {
            return Err(ApiError::bad_request(
                "a standby writes its committed epoch as a full snapshot only",
            ));
        }
        let standby = self
            .standby()
            .ok_or_else(|| ApiError::conflict("this standby holds no VM yet"))?;
        let t0 = Instant::now();
        let written = standby
            .write_snapshot(&params.snapshot_path)
            .map_err(|e| match e {
                StandbyError::NothingCommitted
                | StandbyError::Poisoned { .. }
                | StandbyError::Promoted { .. } => ApiError::conflict(e.to_string()),
                StandbyError::Snapshot {
                    source: SnapshotError::Exists(_),
                    ..
                } => ApiError::conflict(e.to_string()),
                StandbyError::Snapshot {
                    source: SnapshotError::CreateDir { .. },
                    ..
                } => ApiError::bad_request(e.to_string()),
                e => ApiError::internal(e.to_string()),
            })?;
        Ok(SnapshotInfo {
            path: written.path,
            snapshot_type: SnapshotType::Full,
            memory_bytes: written.memory_bytes,
            pages: written.pages,
            pause_ms: 0.0,
            total_ms: t0.elapsed().as_secs_f64() * 1000.0,
        })
    }
}

/// The API of a standby host: its server, and the thread answering its calls until the VM
/// is taken over, when the thread ends and hands the calls' receiver to the VM.
pub struct StandbyApi {
    server: ApiServer,
    thread: JoinHandle<ApiReceiver>,
}

/// Serves the API socket of a standby host on a thread of its own.
pub fn serve_api(host: Arc<StandbyHost>, socket: &Path) -> Result<StandbyApi, StandbyHostError> {
    let (server, receiver) = ApiServer::start(socket).map_err(StandbyHostError::Api)?;
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            while !host.taken_over.load(Ordering::Acquire) {
                let mut fd = libc::pollfd {
                    fd: receiver.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `fd` is one valid pollfd for the call; the eventfd outlives it.
                let n = unsafe { libc::poll(&mut fd, 1, 20) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        tracing::error!("the API's event loop: {e}");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    continue;
                }
                for call in receiver.drain() {
                    answer_without_vm(call, host.as_ref(), &|p| host.snapshot(p));
                }
            }
            receiver
        })
        .map_err(StandbyHostError::Spawn)?;
    Ok(StandbyApi { server, thread })
}

/// Memory available on this host (`MemAvailable` of /proc/meminfo), in bytes.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Logs the standby's progress every [`PROGRESS_EVERY`]: the initial synchronisation, then the
/// epochs committed.
fn log_progress(host: &StandbyHost) {
    let (mut last, mut synced, mut at) = (0u64, false, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(standby) = host.standby() else {
            (last, synced) = (0, false);
            continue;
        };
        let epoch = standby.committed().committed_epoch();
        if epoch > 0 && !synced {
            synced = true;
            tracing::info!(
                epoch,
                mem_mib = standby.profile().mem_bytes >> 20,
                "initial synchronisation received and committed"
            );
            (last, at) = (epoch, Instant::now());
        } else if at.elapsed() >= PROGRESS_EVERY && epoch > last {
            let rate = (epoch - last) as f64 / at.elapsed().as_secs_f64();
            tracing::info!(epoch, per_s = format!("{rate:.0}"), "epochs committed");
            (last, at) = (epoch, Instant::now());
        }
    }
}

/// How often a standby reads the ownership of its VM: the coordinator's connection is then
/// up when a takeover claims (a first call sets it up: 0.7 s in the emulated lab), and an
/// unreachable coordinator is said before it matters.
const COORDINATOR_EVERY: Duration = Duration::from_secs(2);

/// Reads the ownership of the VM held (a probe key before) every [`COORDINATOR_EVERY`] until
/// the VM is taken over here, saying when the coordinator stops or starts answering.
fn keep_coordinator_warm(host: &StandbyHost, c: &Coordination) {
    let mut answering = None;
    while !host.taken_over.load(Ordering::Acquire) {
        let read = match host.register(c) {
            Some(vm) => c.coordinator.current(&vm).map(drop),
            None => c.coordinator.current("probe").map(drop),
        };
        match (&read, answering) {
            (Ok(_), Some(true)) | (Err(_), Some(false)) => {}
            (Ok(_), _) => tracing::info!(coordinator = c.endpoints, "the coordinator answers"),
            (Err(e), _) => {
                tracing::warn!("the coordinator does not answer: a takeover would wait for it: {e}")
            }
        }
        answering = Some(read.is_ok());
        // A standby let go (its primary went on without it, or handed the VM to another)
        // follows the VM's owner once it moved on.
        let idle = host
            .held()
            .as_ref()
            .is_some_and(|h| !h.serving && h.standby.committed().committed_epoch() > 0);
        if idle {
            host.follow_if_taken(c);
        }
        std::thread::sleep(COORDINATOR_EVERY);
    }
}

/// Runs a standby host: listens on `options.listen` and pairs with primaries, until a
/// takeover of `requests` succeeds; then runs the VM taken over here until it ends.
pub fn run(
    host: Arc<StandbyHost>,
    requests: Receiver<TakeoverRequest>,
    api: Option<StandbyApi>,
) -> Result<ExitCode, String> {
    let addr = host.options.listen.clone();
    let listener = TcpListener::bind(&addr)
        .map_err(|source| StandbyHostError::Listen {
            addr: addr.clone(),
            source,
        })
        .map_err(|e| e.to_string())?;
    let progress = host.clone();
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || log_progress(&progress))
        .map_err(|e| StandbyHostError::Spawn(e).to_string())?;
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(addr),
        disks = host.options.disks.len(),
        taps = %host.nets().iter().map(|n| n.tap.as_str()).collect::<Vec<_>>().join(","),
        coordinator = host.options.coordination.as_ref().map(|c| c.endpoints.as_str()),
        "standing by for a primary"
    );
    if let Some(c) = host.options.coordination.clone() {
        let watcher = host.clone();
        std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || keep_coordinator_warm(&watcher, &c))
            .map_err(|e| StandbyHostError::Spawn(e).to_string())?;
    }
    let acceptor = host.clone();
    std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept(&acceptor, &listener))
        .map_err(|e| StandbyHostError::Spawn(e).to_string())?;
    let (claimed, reply) = wait_claim(&host, &requests);
    take_over(&host, claimed, reply, api)
}

/// Pairs with the primaries that connect, one at a time, for ever (after a takeover,
/// pairings are refused: the VM runs here).
fn accept(host: &Arc<StandbyHost>, listener: &TcpListener) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("cannot accept a connection: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if host.taken_over.load(Ordering::Acquire) {
            tracing::warn!("refused a connection from {peer}: the VM was taken over here");
            continue;
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!("refused a connection from {peer}: {e}");
            continue;
        }
        host.pair(Conn::Tcp(stream), peer);
    }
}

/// Serves takeover requests until one wins its claim: refused ones are answered (or logged),
/// one whose coordinator did not answer is retried while no other request comes.
fn wait_claim(
    host: &StandbyHost,
    requests: &Receiver<TakeoverRequest>,
) -> (Claimed, Option<ProtectReply>) {
    let mut pending: Option<TakeoverRequest> = None;
    let mut pending_retry = false;
    let mut last_log = Instant::now() - PROGRESS_EVERY;
    loop {
        let request = match pending.take() {
            Some(r) => match requests.recv_timeout(CLAIM_RETRY) {
                Ok(newer) => {
                    if let Some(reply) = r.reply {
                        reply(Err("superseded by a later failover request".into()));
                    }
                    newer
                }
                Err(_) => r,
            },
            None => match requests.recv() {
                Ok(r) => r,
                // The host holds a sender: this does not happen.
                Err(_) => loop {
                    std::thread::park();
                },
            },
        };
        let t0 = Instant::now();
        // A loss seen here may be seen by other standbys too: the most up to date claims.
        let automatic = request.reply.is_none() && !request.force && !request.planned;
        if let (true, false, Some(c)) = (automatic, pending_retry, &host.options.coordination) {
            if !host.elect(c) {
                continue;
            }
        }
        pending_retry = false;
        match host.claim(request.force) {
            Ok(claimed) => {
                tracing::info!(
                    vm = claimed.vm_id,
                    term = claimed.term,
                    claim_ms = t0.elapsed().as_secs_f64() * 1000.0,
                    "taking the VM over: {}",
                    request.cause
                );
                return (claimed, request.reply);
            }
            Err(ClaimError::Refused(reason)) => {
                tracing::warn!("no takeover ({}): {reason}", request.cause);
                if let Some(reply) = request.reply {
                    reply(Err(reason));
                }
                // Another standby won: follow it (fresh, for it to pair with).
                if let (true, Some(c)) = (automatic, &host.options.coordination) {
                    host.follow_if_taken(c);
                }
            }
            Err(ClaimError::Retry(reason)) => {
                if last_log.elapsed() >= PROGRESS_EVERY {
                    tracing::warn!("takeover claim failed, retrying: {reason}");
                    last_log = Instant::now();
                }
                pending = Some(request);
                pending_retry = true;
            }
        }
    }
}

/// The second half of a takeover: the committed state promoted into the running VM on its
/// monitor thread, the API handed over to it; runs it until it ends.
fn take_over(
    host: &Arc<StandbyHost>,
    claimed: Claimed,
    reply: Option<ProtectReply>,
    api: Option<StandbyApi>,
) -> Result<ExitCode, String> {
    let t0 = Instant::now();
    host.taken_over.store(true, Ordering::Release);
    let api = match api {
        Some(StandbyApi { server, thread }) => match thread.join() {
            Ok(receiver) => primary::Api::Served(server, receiver),
            Err(_) => return Err("the API thread panicked".into()),
        },
        None => primary::Api::None,
    };
    let Claimed {
        standby,
        vm_id,
        term,
        authority,
    } = claimed;
    let options = EngineOptions {
        term,
        authority,
        ..EngineOptions::default()
    };
    let protection = Protection {
        standbys: Vec::new(),
        key: host.key.clone(),
        options,
    };
    let restore = RestoreOptions {
        net: host.options.nets.clone(),
        ..host.options.restore.clone()
    };
    let build = Box::new(move || {
        takeover::resume(&standby, term, &restore)
            .map(|t| t.vm)
            .map_err(|e| e.to_string())
    });
    let mut reply = reply;
    let result = primary::run(
        primary::Boot::Built(build),
        api,
        Some(protection),
        vm_id.clone(),
        |status| {
            tracing::info!(
                vm = vm_id,
                term,
                resume_ms = t0.elapsed().as_secs_f64() * 1000.0,
                "TAKEN OVER: the VM runs here as the primary"
            );
            if let Some(reply) = reply.take() {
                reply(Ok(status));
            }
        },
    );
    if let (Err(e), Some(reply)) = (&result, reply) {
        reply(Err(e.clone()));
    }
    result
}
