//! Replication as the API shows it: the body of `GET /replication` ([`ReplicationStatus`]),
//! the body of `PUT /replication/protect` ([`ProtectParams`]) and the hook
//! ([`ReplicationHook`]) through which the `vmr` binary plugs the replicator into the monitor.
//!
//! `vmm` never imports the replicator: it only defines these plain types and the trait, and
//! serves them on the API socket. Without a hook the monitor is [unprotected and has no
//! key](ReplicationStatus::without_key).

use serde::{Deserialize, Serialize};

use super::{render_prometheus, HealthState, Metric, MetricKind};

/// Why a monitor without a replication hook cannot be protected.
pub const NO_KEY_MESSAGE: &str = "this monitor was started without a replication key \
                                  (--key-file): it cannot be protected";

/// What this monitor is in replication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationRole {
    /// The VM runs here and nothing replicates it.
    #[default]
    Unprotected,
    /// The VM runs here and is replicated to standbys (or is being paired with one).
    Primary,
    /// No VM runs here: this monitor holds the committed state of a primary's VM.
    Standby,
}

/// Where a primary stands with one of its standbys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Paired; the initial synchronisation of the whole VM is under way.
    #[default]
    Syncing,
    /// Synchronised: every epoch is sent to it and its acks release the VM's output.
    Protecting,
    /// Given up on (unreachable, too slow, or it refused an epoch); see its `reason`.
    Dropped,
}

/// How long the VM is paused at the end of each epoch, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseFigures {
    /// The last epoch's pause.
    pub last: u64,
    /// The longest pause so far.
    pub max: u64,
    /// The median pause of the recent epochs (0 when unknown).
    pub p50: u64,
    /// The 99th percentile of the pauses of the recent epochs (0 when unknown).
    pub p99: u64,
    /// Where the recent pauses went.
    #[serde(default)]
    pub parts: PauseParts,
}

/// Where the recent pauses went: the median of each part, in microseconds (0 when unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseParts {
    /// Stopping the vCPUs.
    pub stop: u64,
    /// Taking the dirty set.
    pub harvest: u64,
    /// Saving the devices, the VM and the vCPUs.
    pub state: u64,
    /// Copying the dirty pages (a small epoch) or write-protecting them.
    pub pages: u64,
    /// Resuming the vCPUs.
    pub resume: u64,
}

/// How long the standbys take to acknowledge an epoch, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// The last epoch's.
    pub last: u64,
    /// The longest so far.
    pub max: u64,
}

/// One peer of a replicating monitor: on a primary, a standby.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationPeer {
    /// The peer's address, as `host:port`.
    pub name: String,
    /// Where the primary stands with it.
    pub state: PeerState,
    /// The last epoch it acknowledged.
    pub acked_epoch: u64,
    /// Epochs sent to it and not yet acknowledged.
    pub lag_epochs: u64,
    /// Why it was dropped (only for a dropped peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How far the copy of the VM to it has come (only while it is being copied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyFigures>,
}

/// How far the copy of the VM's memory and disks to a synchronising standby has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyFigures {
    /// Bytes copied (a disk's holes count as copied).
    pub copied_bytes: u64,
    /// Bytes to copy: memory and disks, plus the pages the guest wrote meanwhile.
    pub total_bytes: u64,
}

/// The body of `GET /replication`: the monitor's role and the replication's figures.
///
/// Counters count since the monitor started; figures a role does not have stay 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// Unprotected, primary or standby.
    pub role: ReplicationRole,
    /// Whether the VM's output waits for at least one synchronised standby (a primary with a
    /// standby in the `protecting` state).
    pub protected: bool,
    /// The replication term: grows each time a standby takes over.
    pub term: u64,
    /// Whether this monitor holds a replication key, i.e. whether it can be protected.
    pub key: bool,
    /// The longest an epoch lasts, in milliseconds.
    pub period_ms: u64,
    /// The last epoch every protecting standby acknowledged (whose output was released).
    pub last_committed_epoch: u64,
    /// The last epoch sent to the standbys.
    pub last_sent_epoch: u64,
    /// Epochs sent and not yet committed.
    pub lag_epochs: u64,
    /// Epochs ended so far.
    pub epochs: u64,
    /// Epochs ended before their period, by an event (e.g. output waiting too long).
    pub early_epochs: u64,
    /// How long the VM is paused at the end of an epoch, in microseconds.
    pub pause_us: PauseFigures,
    /// Guest pages dirtied in the last epoch.
    pub dirty_pages_last: u64,
    /// Guest pages dirtied in all epochs.
    pub dirty_pages_total: u64,
    /// Bytes of state collected for the standbys, before compression.
    pub bytes_raw: u64,
    /// Bytes sent to the standbys.
    pub bytes_sent: u64,
    /// How long the standbys take to acknowledge an epoch, in microseconds.
    pub ack_latency_us: LatencyFigures,
    /// Network frames the VM sent that wait for their epoch's commit.
    pub held_egress_frames: u64,
    /// Bytes of those frames.
    pub held_egress_bytes: u64,
    /// Inbound network frames logged for the standbys (to replay after a takeover).
    pub inbound_frames_logged: u64,
    /// The peers: on a primary, its standbys.
    pub peers: Vec<ReplicationPeer>,
    /// On a standby: the primary's address, as `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Anything else the operator should know, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What this host supervises of the resources the VM needs (absent from an older monitor;
    /// boxed: the status travels in every API reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Box<HealthState>>,
}

impl ReplicationStatus {
    /// The status of a monitor started without a replication key (and so without a hook):
    /// unprotected, and unable to become protected.
    pub fn without_key() -> Self {
        Self {
            role: ReplicationRole::Unprotected,
            key: false,
            message: Some(NO_KEY_MESSAGE.to_string()),
            ..Self::default()
        }
    }

    /// The figures as metrics named `vmr_replication_*`, the peers' as series labelled
    /// `peer="host:port"`.
    pub fn metrics(&self) -> Vec<Metric> {
        let gauge = |name: &str, help: &str, value: u64| {
            Metric::new(name, help, MetricKind::Gauge, value as f64)
        };
        let counter = |name: &str, help: &str, value: u64| {
            Metric::new(name, help, MetricKind::Counter, value as f64)
        };
        let role = |role: ReplicationRole| {
            gauge(
                "vmr_replication_role",
                "1 for the monitor's replication role, 0 for the others.",
                u64::from(self.role == role),
            )
            .with_label("role", role_name(role))
        };
        let mut m = vec![
            role(ReplicationRole::Unprotected),
            role(ReplicationRole::Primary),
            role(ReplicationRole::Standby),
            gauge(
                "vmr_replication_protected",
                "1 while the VM's output waits for a synchronised standby.",
                u64::from(self.protected),
            ),
            gauge(
                "vmr_replication_key",
                "1 if the monitor holds a replication key (it can be protected).",
                u64::from(self.key),
            ),
            gauge("vmr_replication_term", "The replication term.", self.term),
            gauge(
                "vmr_replication_period_ms",
                "The longest an epoch lasts.",
                self.period_ms,
            ),
            gauge(
                "vmr_replication_last_committed_epoch",
                "The last epoch every protecting standby acknowledged.",
                self.last_committed_epoch,
            ),
            gauge(
                "vmr_replication_last_sent_epoch",
                "The last epoch sent to the standbys.",
                self.last_sent_epoch,
            ),
            gauge(
                "vmr_replication_lag_epochs",
                "Epochs sent and not yet committed.",
                self.lag_epochs,
            ),
            counter("vmr_replication_epochs_total", "Epochs ended.", self.epochs),
            counter(
                "vmr_replication_early_epochs_total",
                "Epochs ended before their period by an event.",
                self.early_epochs,
            ),
        ];
        let pause = |stat: &str, value: u64| {
            gauge(
                "vmr_replication_pause_us",
                "How long the VM is paused at the end of an epoch (0 when unknown).",
                value,
            )
            .with_label("stat", stat)
        };
        m.extend([
            pause("last", self.pause_us.last),
            pause("max", self.pause_us.max),
            pause("p50", self.pause_us.p50),
            pause("p99", self.pause_us.p99),
        ]);
        let part = |name: &str, value: u64| {
            gauge(
                "vmr_replication_pause_part_us",
                "The median of each part of the recent pauses (0 when unknown).",
                value,
            )
            .with_label("part", name)
        };
        let parts = &self.pause_us.parts;
        m.extend([
            part("stop", parts.stop),
            part("harvest", parts.harvest),
            part("state", parts.state),
            part("pages", parts.pages),
            part("resume", parts.resume),
        ]);
        let ack = |stat: &str, value: u64| {
            gauge(
                "vmr_replication_ack_latency_us",
                "How long the standbys take to acknowledge an epoch.",
                value,
            )
            .with_label("stat", stat)
        };
        m.extend([
            ack("last", self.ack_latency_us.last),
            ack("max", self.ack_latency_us.max),
            gauge(
                "vmr_replication_dirty_pages_last",
                "Guest pages dirtied in the last epoch.",
                self.dirty_pages_last,
            ),
            counter(
                "vmr_replication_dirty_pages_total",
                "Guest pages dirtied in all epochs.",
                self.dirty_pages_total,
            ),
            counter(
                "vmr_replication_bytes_raw_total",
                "Bytes of state collected for the standbys, before compression.",
                self.bytes_raw,
            ),
            counter(
                "vmr_replication_bytes_sent_total",
                "Bytes sent to the standbys.",
                self.bytes_sent,
            ),
            gauge(
                "vmr_replication_held_egress_frames",
                "Network frames waiting for their epoch's commit.",
                self.held_egress_frames,
            ),
            gauge(
                "vmr_replication_held_egress_bytes",
                "Bytes of the network frames waiting for their epoch's commit.",
                self.held_egress_bytes,
            ),
            counter(
                "vmr_replication_inbound_frames_logged_total",
                "Inbound network frames logged for the standbys.",
                self.inbound_frames_logged,
            ),
        ]);
        for peer in &self.peers {
            for state in [
                PeerState::Syncing,
                PeerState::Protecting,
                PeerState::Dropped,
            ] {
                m.push(
                    gauge(
                        "vmr_replication_peer_state",
                        "1 for the peer's state, 0 for the others.",
                        u64::from(peer.state == state),
                    )
                    .with_label("peer", peer.name.as_str())
                    .with_label("state", peer_state_name(state)),
                );
            }
        }
        for peer in &self.peers {
            m.push(
                gauge(
                    "vmr_replication_peer_acked_epoch",
                    "The last epoch the peer acknowledged.",
                    peer.acked_epoch,
                )
                .with_label("peer", peer.name.as_str()),
            );
        }
        for peer in &self.peers {
            m.push(
                gauge(
                    "vmr_replication_peer_lag_epochs",
                    "Epochs sent to the peer and not yet acknowledged.",
                    peer.lag_epochs,
                )
                .with_label("peer", peer.name.as_str()),
            );
        }
        m
    }

    /// Appends [`metrics`](Self::metrics) to `out` in the Prometheus text exposition format,
    /// as `GET /metrics` renders them.
    pub fn prometheus(&self, out: &mut String) {
        out.push_str(&render_prometheus(&self.metrics()));
    }
}

/// The JSON word of `role`.
fn role_name(role: ReplicationRole) -> &'static str {
    match role {
        ReplicationRole::Unprotected => "unprotected",
        ReplicationRole::Primary => "primary",
        ReplicationRole::Standby => "standby",
    }
}

/// The JSON word of `state`.
fn peer_state_name(state: PeerState) -> &'static str {
    match state {
        PeerState::Syncing => "syncing",
        PeerState::Protecting => "protecting",
        PeerState::Dropped => "dropped",
    }
}

/// The body of `PUT /replication/protect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectParams {
    /// The standby monitor to replicate the VM to, as `host:port`.
    pub standby: String,
}

/// The body of `PUT /replication/failover`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverParams {
    /// Take the VM over without the coordinator's claim (a standby started without
    /// `--coordinator`): nothing then keeps the old primary from running beside it, so only
    /// for a primary known to be dead.
    #[serde(default)]
    pub force: bool,
}

/// How a [`ReplicationHook`] answers [`protect`](ReplicationHook::protect): called once, from
/// any thread, with the status once the VM is protected or with why it could not be (a
/// sentence, answered as HTTP 502).
pub type ProtectReply = Box<dyn FnOnce(Result<ReplicationStatus, String>) + Send>;

/// The replicator as the monitor sees it. The `vmr` binary implements it over the
/// replicator's engine (on a primary) or standby (on a standby) and gives it to the
/// [`Controller`](crate::controller::Controller) or to
/// [`answer_without_vm`](crate::controller::answer_without_vm).
///
/// Both methods are called on the monitor's event-loop thread, which runs the VM's devices:
/// neither may block.
pub trait ReplicationHook: Send + Sync {
    /// The replication's status now (a cheap copy of figures the replicator keeps).
    fn status(&self) -> ReplicationStatus;

    /// Starts protecting the VM with the standby `params.standby`, and returns at once.
    ///
    /// Pairing with the standby and the initial synchronisation of the VM take seconds (of
    /// the order of a migration), so this must not block: the hook does the work on its own
    /// thread and calls `reply` when it is done, with the status once the standby is
    /// protecting the VM, or with why it could not. It may also call `reply` before
    /// returning (e.g. to refuse at once). Dropping `reply` uncalled answers 503.
    fn protect(&self, params: ProtectParams, reply: ProtectReply);

    /// Fails the VM over: on a standby, takes the VM over from its committed epoch and runs
    /// it here; `reply` (as for [`protect`](ReplicationHook::protect)) once it runs, with the
    /// new status, or with why it was refused. Must not block either.
    fn failover(&self, params: FailoverParams, reply: ProtectReply);
}
