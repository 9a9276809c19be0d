//! `vmr standby`: a standby host for one VM. It listens for a primary (`vmr run --protect`),
//! authenticates it with the shared key, sizes its committed memory from the primary's
//! `Hello` (after checking this host can hold the VM: memory, vCPUs, devices, disks), and
//! serves its epochs, committing each atomically.
//!
//! One VM per standby: once an epoch is committed, the committed state is what a failover
//! resumes, so it is kept when the primary's link ends, and a later pairing is refused (with
//! its reason, to the primary) — a fresh `vmr standby` protects a VM again. A pairing that
//! ends before any commit leaves the standby fresh.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use replicator::auth::ReplicationKey;
use replicator::compat::{Hello, StandbyProfile, PROTOCOL};
use replicator::conn::Conn;
use replicator::pairing::{self, PairError};
use replicator::standby::committed::DiskImage;
use replicator::standby::host::{Standby, StandbyError};
use replicator::standby::staging::StagingOptions;
use vmm::api::{
    ApiError, ApiServer, ProtectParams, ProtectReply, ReplicationHook, ReplicationRole,
    ReplicationStatus, SnapshotInfo, SnapshotParams, SnapshotType,
};
use vmm::config::NetConfig;
use vmm::controller::answer_without_vm;
use vmm::snapshot::SnapshotError;

use crate::protect::{devices, disk_sizes};

/// How long a connection may take to pair.
const PAIRING_TIMEOUT: Duration = Duration::from_secs(5);
/// A primary silent this long is gone (it sends an epoch every few ms, heartbeats when idle).
const PRIMARY_SILENCE: Duration = Duration::from_secs(10);
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
    /// Accepting a connection failed.
    #[error("cannot accept a connection: {0}")]
    Accept(std::io::Error),
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StandbyHost {
    /// Loads the key and measures the disks.
    pub fn new(options: StandbyOptions) -> Result<Self, StandbyHostError> {
        let key = ReplicationKey::from_file(&options.key_file)?;
        let disk_sizes = disk_sizes(options.disks.iter().map(PathBuf::as_path))?;
        Ok(Self {
            key,
            options,
            disk_sizes,
            held: Mutex::new(None),
        })
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
            // The initial synchronisation is staged whole before it is applied.
            if hello.mem_bytes.saturating_mul(2) > available {
                return Err(format!(
                    "the VM's {} MiB of memory (twice that during the initial synchronisation) \
                     do not fit in this host's {} MiB available",
                    hello.mem_bytes >> 20,
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
        let profile = StandbyProfile {
            mem_bytes: hello.mem_bytes,
            vcpus: hello.vcpus,
            // Not compared yet (see `protect::hello`).
            tsc_khz: hello.tsc_khz,
            tsc_scaling: false,
            cpu_features: hello.cpu_features.clone(),
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
        // A primary sends epochs every few ms: one silent this long is gone.
        if let Err(e) = socket.set_read_timeout(Some(PRIMARY_SILENCE)) {
            tracing::warn!("cannot bound reads from the primary: {e}");
        }
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
                } else {
                    tracing::warn!(
                        primary = %peer,
                        committed_epoch = committed,
                        "the primary's link ended ({end}): the committed state is kept for failover"
                    );
                }
            });
        if let Err(e) = serving {
            tracing::error!("cannot start serving the primary: {e}");
            *self.held() = None;
        }
    }
}

/// The standby's side of the API: `GET /replication`, `GET /metrics`, and
/// `PUT /snapshot/create` writing the committed epoch as a snapshot `vmr restore` runs.
impl ReplicationHook for StandbyHost {
    fn status(&self) -> ReplicationStatus {
        let held = self.held();
        let mut status = ReplicationStatus {
            role: ReplicationRole::Standby,
            key: true,
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
                    (_, true) => Some(format!("holding VM {} from its primary", h.hello.vm_id)),
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

/// Serves the API socket of a standby host on a thread of its own.
pub fn serve_api(host: Arc<StandbyHost>, socket: &Path) -> Result<ApiServer, StandbyHostError> {
    let (server, receiver) = ApiServer::start(socket).map_err(StandbyHostError::Api)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || loop {
            let mut fd = libc::pollfd {
                fd: receiver.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `fd` is one valid pollfd for the call; the eventfd outlives it.
            let n = unsafe { libc::poll(&mut fd, 1, 1000) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!("the API's event loop: {e}");
                    return;
                }
            }
            for call in receiver.drain() {
                answer_without_vm(call, host.as_ref(), &|p| host.snapshot(p));
            }
        })
        .map_err(StandbyHostError::Spawn)?;
    Ok(server)
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

/// Runs a standby host: listens on `options.listen` and pairs with primaries for ever.
pub fn run(host: Arc<StandbyHost>) -> Result<(), StandbyHostError> {
    let addr = host.options.listen.clone();
    let listener = TcpListener::bind(&addr).map_err(|source| StandbyHostError::Listen {
        addr: addr.clone(),
        source,
    })?;
    let progress = host.clone();
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || log_progress(&progress))
        .map_err(StandbyHostError::Spawn)?;
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(addr),
        disks = host.options.disks.len(),
        taps = %host.nets().iter().map(|n| n.tap.as_str()).collect::<Vec<_>>().join(","),
        "standing by for a primary"
    );
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StandbyHostError::Accept(e)),
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!("refused a connection from {peer}: {e}");
            continue;
        }
        host.pair(Conn::Tcp(stream), peer);
    }
}
