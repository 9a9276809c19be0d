//! The primary's side of `vmr run --protect`: the VM described to its standbys, pairing with
//! each of them before the guest runs, and the epoch engine's options.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use replicator::auth::ReplicationKey;
use replicator::compat::{DeviceDesc, Hello, PROTOCOL};
use replicator::conn::Conn;
use replicator::primary::{pair_standby, EngineError, EngineOptions, Metrics, NewStandby};
use vmm::api::{
    CopyFigures, FailoverParams, HealthState, LatencyFigures, PauseFigures, PeerState,
    ProtectParams, ProtectReply, ReplicationHook, ReplicationPeer, ReplicationRole,
    ReplicationStatus,
};
use vmm::config::VmConfig;
use vmm::health::{decide, Health};

/// Errors of protecting a VM. One variant per failing call.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// Standbys named without the key they hold.
    #[error("--protect needs --key-file PATH (the replication key the standbys hold)")]
    NoKey,
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] replicator::auth::KeyError),
    /// A disk's size cannot be read.
    #[error("cannot read the size of disk {path}: {source}")]
    DiskSize {
        /// The disk image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A standby's address does not resolve.
    #[error("cannot resolve standby {addr}: {reason}")]
    Resolve {
        /// The address given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Connecting to or pairing with a standby failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What `--protect` and the `[replication]` table ask for.
#[derive(Debug, Clone)]
pub struct Protection {
    /// The standbys' addresses.
    pub standbys: Vec<String>,
    /// The key they hold.
    pub key: ReplicationKey,
    /// The engine's options.
    pub options: EngineOptions,
}

impl Protection {
    /// The term epochs go out with: the ownership's, with a coordinator.
    pub fn term(&self) -> u64 {
        self.options
            .authority
            .as_ref()
            .map_or(self.options.term, |a| a.ownership.term)
    }

    /// The engine's options for a protection starting now: with a coordinator, the ownership
    /// as it stands (an earlier engine may have renewed it), which must still be this host's.
    pub fn current_options(&self) -> Result<EngineOptions, String> {
        let mut options = self.options.clone();
        if let Some(a) = options.authority.as_mut() {
            match a.coordinator.current(&a.vm) {
                Ok(Some((o, _))) if o.owner == a.me => a.ownership = o,
                Ok(Some((o, _))) => {
                    return Err(format!(
                        "VM {} is owned by {o} now, not by this host: not protecting it",
                        a.vm
                    ))
                }
                Ok(None) => return Err(format!("VM {} has no owner in the coordinator", a.vm)),
                Err(e) => return Err(format!("cannot read the ownership of VM {}: {e}", a.vm)),
            }
            options.term = a.ownership.term;
        }
        Ok(options)
    }
}

/// The key, if a key file is given; `--protect` without one is refused.
pub fn load_key(
    key_file: Option<&Path>,
    standbys: &[String],
) -> Result<Option<ReplicationKey>, ProtectError> {
    match key_file {
        Some(path) => Ok(Some(ReplicationKey::from_file(path)?)),
        None if standbys.is_empty() => Ok(None),
        None => Err(ProtectError::NoKey),
    }
}

/// The VM's devices as a pairing compares them: `net<i>` and `disk<i>` in order (a standby
/// names its own `--net` and `--disk` the same way).
pub fn devices(nets: usize, disks: usize) -> Vec<DeviceDesc> {
    let net = (0..nets).map(|i| DeviceDesc {
        kind: "net".into(),
        id: format!("net{i}"),
    });
    let block = (0..disks).map(|i| DeviceDesc {
        kind: "block".into(),
        id: format!("disk{i}"),
    });
    net.chain(block).collect()
}

/// The size of each disk image, in order.
pub fn disk_sizes<'a>(paths: impl Iterator<Item = &'a Path>) -> Result<Vec<u64>, ProtectError> {
    paths
        .map(|path| {
            std::fs::metadata(path)
                .map(|m| m.len())
                .map_err(|source| ProtectError::DiskSize {
                    path: path.to_path_buf(),
                    source,
                })
        })
        .collect()
}

/// The `Hello` the VM of `config` is introduced to its standbys with: with this host's TSC
/// frequency and CPU features, which a standby must match (or scale the TSC) to run the VM.
pub fn hello(config: &VmConfig, vm_id: &str, term: u64) -> Result<Hello, ProtectError> {
    let disks = config.all_disks();
    Ok(Hello {
        protocol: PROTOCOL,
        vm_id: vm_id.to_string(),
        term,
        mem_bytes: config.mem_mib << 20,
        vcpus: config.vcpus,
        tsc_khz: vmm::vstate::vcpu::host_tsc().map_or(0, |(khz, _)| khz),
        cpu_features: vmm::vstate::vcpu::host_cpu_features(),
        devices: devices(config.net.len(), disks.len()),
        disk_sizes: disk_sizes(disks.iter().map(|d| d.path.as_path()))?,
    })
}

/// Connects to the standby at `addr` (`HOST:PORT`, or a Unix socket `/PATH`) within
/// `timeout` and pairs with it.
pub fn pair(
    addr: &str,
    key: &ReplicationKey,
    hello: &Hello,
    timeout: Duration,
) -> Result<NewStandby, ProtectError> {
    let connect = |source| EngineError::Connect {
        peer: addr.to_string(),
        source,
    };
    let conn = if addr.starts_with('/') || addr.starts_with("unix:") {
        Conn::connect(addr).map_err(connect)?
    } else {
        let target = addr
            .to_socket_addrs()
            .map_err(|e| ProtectError::Resolve {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ProtectError::Resolve {
                addr: addr.to_string(),
                reason: "no address".into(),
            })?;
        let stream = TcpStream::connect_timeout(&target, timeout).map_err(connect)?;
        stream.set_nodelay(true).map_err(connect)?;
        Conn::Tcp(stream)
    };
    let (conn, link, ack) = pair_standby(addr, conn, key, hello, timeout)?;
    tracing::info!(
        standby = addr,
        committed_epoch = ack.committed_epoch,
        "paired with a standby"
    );
    Ok(NewStandby {
        name: addr.to_string(),
        conn,
        link,
        ack,
    })
}

/// Pairs with every standby of `protection`, in order; the first failure fails them all.
pub fn pair_all(protection: &Protection, hello: &Hello) -> Result<Vec<NewStandby>, ProtectError> {
    protection
        .standbys
        .iter()
        .map(|addr| {
            pair(
                addr,
                &protection.key,
                hello,
                protection.options.standby_timeout,
            )
        })
        .collect()
}

/// A request of the API's replication, for the thread that owns the VM.
pub struct ProtectRequest {
    /// What is asked.
    pub action: ProtectAction,
    /// The answer.
    pub reply: ProtectReply,
}

/// What [`ProtectRequest`] asks.
pub enum ProtectAction {
    /// `PUT /replication/protect`: pair with this standby.
    Protect(String),
    /// `PUT /replication/failover` on the primary: a planned switch-over to its standby.
    HandOver,
}

/// The primary's side of the API ([`ReplicationHook`]): the status from the engine's figures,
/// and protection requests handed to the thread that owns the VM.
pub struct PrimaryHook {
    period: Duration,
    term: u64,
    /// Whether a coordinator decides who owns the VM (automatic failover).
    coordinator: bool,
    /// The figures of the engine protecting the VM.
    engine: Mutex<Option<Arc<Mutex<Metrics>>>>,
    requests: Mutex<Sender<ProtectRequest>>,
    /// The health of the VM's resources, once the VM is built.
    health: Mutex<Option<Health>>,
    /// Why the VM was handed over because of its health, if it was.
    health_handover: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PrimaryHook {
    /// A hook for a VM not protected yet, whose protection requests go to `requests`.
    pub fn new(options: &EngineOptions, requests: Sender<ProtectRequest>) -> Self {
        Self {
            period: options.period,
            term: options
                .authority
                .as_ref()
                .map_or(options.term, |a| a.ownership.term),
            coordinator: options.authority.is_some(),
            engine: Mutex::new(None),
            requests: Mutex::new(requests),
            health: Mutex::new(None),
            health_handover: Mutex::new(None),
        }
    }

    /// The health of the VM's resources, which the status shows from now on.
    pub fn set_health(&self, health: Health) {
        *lock(&self.health) = Some(health);
    }

    /// The health of the VM's resources as last checked (none before the VM is built).
    pub fn health(&self) -> Option<HealthState> {
        lock(&self.health).as_ref().map(Health::state)
    }

    /// Records that the VM is handed over because of its health (`why`; `None` once that
    /// failed), for the status.
    pub fn handing_over_for(&self, why: Option<String>) {
        *lock(&self.health_handover) = why;
    }

    fn ask(&self, action: ProtectAction, reply: ProtectReply) {
        if let Err(e) = lock(&self.requests).send(ProtectRequest { action, reply }) {
            (e.0.reply)(Err("the VM is ending".into()));
        }
    }

    /// The engine now protecting the VM: its figures.
    pub fn set_engine(&self, metrics: Arc<Mutex<Metrics>>) {
        *lock(&self.engine) = Some(metrics);
    }
}

impl ReplicationHook for PrimaryHook {
    fn status(&self) -> ReplicationStatus {
        let mut status = ReplicationStatus {
            role: ReplicationRole::Unprotected,
            key: true,
            term: self.term,
            period_ms: self.period.as_millis() as u64,
            health: self.health().map(Box::new),
            ..ReplicationStatus::default()
        };
        let engine = lock(&self.engine);
        let Some(metrics) = engine.as_ref() else {
            status.message =
                Some("unprotected: `vmr ctl protect HOST:PORT` pairs a standby".into());
            if let Some(problem) = status
                .health
                .as_ref()
                .and_then(|h| decide(h, false).message())
            {
                status.message = Some(problem);
            }
            return status;
        };
        let m = lock(metrics).clone();
        status.term = m.term.max(self.term);
        // Protected once the standbys committed the end of the initial synchronisation.
        let synced = m
            .synced_through
            .is_some_and(|t| m.last_committed_epoch >= t);
        let lag = m.last_sent_epoch.saturating_sub(m.last_committed_epoch);
        status.role = if m.protected {
            ReplicationRole::Primary
        } else {
            ReplicationRole::Unprotected
        };
        status.protected = m.protected && synced;
        status.last_committed_epoch = m.last_committed_epoch;
        status.last_sent_epoch = m.last_sent_epoch;
        status.lag_epochs = lag;
        status.epochs = m.epochs;
        status.early_epochs = m.early_epochs;
        status.pause_us = PauseFigures {
            last: m.last_pause_us,
            max: m.max_pause_us,
            p50: m.pause_p50_us,
            p99: m.pause_p99_us,
            parts: m.pause_parts,
        };
        status.dirty_pages_last = m.last_dirty_pages;
        status.dirty_pages_total = m.dirty_pages;
        status.bytes_raw = m.bytes_raw;
        status.bytes_sent = m.bytes_sent;
        status.ack_latency_us = LatencyFigures {
            last: m.last_ack_latency_us,
            max: m.max_ack_latency_us,
        };
        status.held_egress_frames = m.held_frames as u64;
        status.held_egress_bytes = m.held_bytes as u64;
        status.inbound_frames_logged = m.inbound_frames;
        // A standby paired again after it was dropped appears once more: its n-th pairing
        // goes with its n-th drop, if any.
        let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let copy_of = |name: &str| {
            let p = m.syncing.iter().find(|p| p.standby == name)?;
            Some(CopyFigures {
                copied_bytes: p.copied_bytes,
                total_bytes: p.total_bytes,
            })
        };
        status.peers = m
            .peer_names
            .iter()
            .map(|name| {
                let nth = seen.entry(name.as_str()).or_default();
                *nth += 1;
                let dropped = m
                    .dropped
                    .iter()
                    .filter_map(|d| d.strip_prefix(name.as_str())?.strip_prefix(": "))
                    .nth(*nth - 1);
                match dropped {
                    Some(reason) => ReplicationPeer {
                        name: name.clone(),
                        state: PeerState::Dropped,
                        reason: Some(reason.to_string()),
                        ..ReplicationPeer::default()
                    },
                    None => ReplicationPeer {
                        name: name.clone(),
                        state: if synced && !m.joining.contains(name) {
                            PeerState::Protecting
                        } else {
                            PeerState::Syncing
                        },
                        acked_epoch: m.last_committed_epoch,
                        lag_epochs: lag,
                        reason: None,
                        copy: copy_of(name),
                    },
                }
            })
            .collect();
        let health_problem = status
            .health
            .as_ref()
            .and_then(|h| decide(h, status.protected).message());
        if let Some(h) = &m.handed_over {
            status.message = Some(match lock(&self.health_handover).as_ref() {
                Some(why) => format!("{h}: the VM runs there now (handed over because {why})"),
                None => format!("{h}: the VM runs there now"),
            });
        } else if let Some(f) = &m.fenced {
            status.message = Some(format!(
                "FENCED: {}; the vCPUs are paused and no output is released",
                f.reason
            ));
        } else if let Some(problem) = health_problem {
            status.message = Some(problem);
        } else if !m.protected {
            status.message = Some(
                "unprotected: no standby left; `vmr ctl protect HOST:PORT` pairs a new one".into(),
            );
        } else if !self.coordinator {
            status.message = Some(
                "no coordinator: automatic failover is off (`vmr ctl failover --force` on the \
                 standby takes the VM over by hand)"
                    .into(),
            );
        }
        status
    }

    /// On the primary, a failover is a planned switch-over to its standby.
    fn failover(&self, params: FailoverParams, reply: ProtectReply) {
        if params.force {
            return reply(Err(
                "force is for a standby without a coordinator: on the primary, a failover \
                 is a planned switch-over to its standby"
                    .into(),
            ));
        }
        self.ask(ProtectAction::HandOver, reply);
    }

    fn protect(&self, params: ProtectParams, reply: ProtectReply) {
        self.ask(ProtectAction::Protect(params.standby), reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primarys_status_follows_the_engines_figures() {
        let (tx, rx) = std::sync::mpsc::channel();
        let hook = PrimaryHook::new(&EngineOptions::default(), tx);
        let status = hook.status();
        assert_eq!(status.role, ReplicationRole::Unprotected);
        assert!(status.key && !status.protected);
        assert_eq!(status.period_ms, 10);
        let metrics = Arc::new(Mutex::new(Metrics {
            protected: true,
            standbys: 2,
            last_sent_epoch: 3,
            synced_through: Some(2),
            peer_names: vec!["a:1".into(), "b:1".into()],
            ..Metrics::default()
        }));
        hook.set_engine(metrics.clone());
        let status = hook.status();
        assert_eq!(status.role, ReplicationRole::Primary);
        assert!(!status.protected, "not synchronised yet");
        assert_eq!(status.peers[0].state, PeerState::Syncing);
        {
            let mut m = lock(&metrics);
            m.last_committed_epoch = 3;
            m.last_sent_epoch = 4;
            m.dropped.push("b:1: no ack of epoch 4 within 2s".into());
        }
        let status = hook.status();
        assert!(status.protected);
        assert_eq!(status.lag_epochs, 1);
        assert_eq!(status.peers[0].state, PeerState::Protecting);
        assert_eq!(status.peers[0].acked_epoch, 3);
        assert_eq!(status.peers[1].state, PeerState::Dropped);
        assert_eq!(
            status.peers[1].reason.as_deref(),
            Some("no ack of epoch 4 within 2s")
        );
        // A standby joining the protected VM synchronises while the others protect it.
        {
            let mut m = lock(&metrics);
            m.peer_names.push("c:1".into());
            m.joining.push("c:1".into());
        }
        let status = hook.status();
        assert!(status.protected);
        assert_eq!(status.peers[2].state, PeerState::Syncing);
        assert_eq!(status.peers[0].state, PeerState::Protecting);
        // A standby dropped, then paired again: its second pairing is not the dropped one.
        lock(&metrics).peer_names.push("b:1".into());
        let status = hook.status();
        assert_eq!(status.peers[1].state, PeerState::Dropped);
        assert_eq!(status.peers[3].state, PeerState::Protecting);
        lock(&metrics).protected = false;
        assert_eq!(hook.status().role, ReplicationRole::Unprotected);
        // Protection requests go to the thread that owns the VM.
        hook.protect(
            ProtectParams {
                standby: "c:1".into(),
            },
            Box::new(|_| {}),
        );
        assert!(matches!(
            rx.try_recv().unwrap().action,
            ProtectAction::Protect(s) if s == "c:1"
        ));
    }

    #[test]
    fn the_hello_describes_the_vm_as_a_standby_names_its_own() {
        let dir = std::env::temp_dir().join(format!("vmr-hello-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.raw");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let mut config: VmConfig = toml::from_str(&format!(
            "kernel = \"/k\"\nmem = 64\nvcpus = 2\n[[net]]\ntap = \"t0\"\n[[disk]]\npath = {:?}\n",
            disk.display().to_string()
        ))
        .unwrap();
        let h = hello(&config, "vm", 1).unwrap();
        assert_eq!((h.mem_bytes, h.vcpus), (64 << 20, 2));
        assert_eq!(h.devices, devices(1, 1));
        assert_eq!(h.devices[1].to_string(), "block:disk0");
        assert_eq!(h.disk_sizes, [4096]);
        config.disks[0].path = dir.join("missing.raw");
        let err = hello(&config, "vm", 1).unwrap_err().to_string();
        assert!(err.contains("missing.raw") && !err.contains('\n'), "{err}");
        assert!(matches!(
            load_key(None, &["a:1".into()]),
            Err(ProtectError::NoKey)
        ));
        assert!(load_key(None, &[]).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
