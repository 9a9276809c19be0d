//! The monitor's control API: HTTP/1.1 + JSON on a Unix socket.
//!
//! The [`server`] answers on the socket and hands every request, as an [`ApiRequest`], to the
//! monitor's event-loop thread, which answers with an [`ApiResult`]. The [`client`] is the
//! blocking side `vmr ctl` uses. The types here are the JSON bodies both sides exchange;
//! `vmm/api/openapi.yaml` ([`OPENAPI_YAML`]) documents them.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod client;
pub mod health;
pub mod replication;
pub mod server;

#[cfg(test)]
mod tests;

pub use client::{ApiClient, ClientError, HttpResponse};
pub use health::{
    DiskHealth, DiskState, GuestHealth, GuestState, HealthState, TapHealth, TapState,
};
pub use replication::{
    CopyFigures, FailoverParams, LatencyFigures, PauseFigures, PauseParts, PeerState,
    ProtectParams, ProtectReply, ReplicationHook, ReplicationPeer, ReplicationRole,
    ReplicationStatus, NO_KEY_MESSAGE,
};
pub use server::{
    ApiCall, ApiReceiver, ApiServer, ApiServerConfig, ApiServerError, Route, RouteMethod, ROUTES,
};

/// The OpenAPI 3.0 document of the API.
pub const OPENAPI_YAML: &str = include_str!("../../api/openapi.yaml");

/// How long the server waits for the VM to answer a migration.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the server waits for a VM to be protected (pairing with the standby and the initial
/// synchronisation of the whole VM).
pub const PROTECT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the server waits for the VM to answer any other request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A request for the VM, as the event-loop thread receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm`: the VM's state and configuration.
    GetVm,
    /// `GET /vm/resources`: the graph of the VM's resources.
    GetResources,
    /// `PUT /vm/pause`: stop the vCPUs.
    Pause,
    /// `PUT /vm/resume`: run the vCPUs again.
    Resume,
    /// `PUT /snapshot/create`: write a snapshot of the VM.
    CreateSnapshot(SnapshotParams),
    /// `PUT /migrate`: live-migrate the VM to another monitor.
    Migrate(MigrateParams),
    /// `GET /metrics`: the monitor's metrics.
    GetMetrics,
    /// `GET /replication`: the replication's status.
    GetReplication,
    /// `PUT /replication/protect`: start replicating the VM to a standby.
    Protect(ProtectParams),
    /// `PUT /replication/failover`: a standby takes the VM over.
    Failover(FailoverParams),
}

impl ApiRequest {
    /// A short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            ApiRequest::GetVm => "get-vm",
            ApiRequest::GetResources => "get-resources",
            ApiRequest::Pause => "pause",
            ApiRequest::Resume => "resume",
            ApiRequest::CreateSnapshot(_) => "create-snapshot",
            ApiRequest::Migrate(_) => "migrate",
            ApiRequest::GetMetrics => "get-metrics",
            ApiRequest::GetReplication => "get-replication",
            ApiRequest::Protect(_) => "protect",
            ApiRequest::Failover(_) => "failover",
        }
    }

    /// How long the server waits for the VM's answer before giving up with 504.
    pub fn timeout(&self) -> Duration {
        match self {
            ApiRequest::Migrate(_) => MIGRATE_TIMEOUT,
            ApiRequest::Protect(_) | ApiRequest::Failover(_) => PROTECT_TIMEOUT,
            _ => REQUEST_TIMEOUT,
        }
    }

    /// Whether `reply` is an answer of the kind this request expects.
    pub fn accepts(&self, reply: &ApiReply) -> bool {
        matches!(
            (self, reply),
            (ApiRequest::GetVm, ApiReply::Vm(_))
                | (ApiRequest::GetResources, ApiReply::Resources(_))
                | (ApiRequest::Pause | ApiRequest::Resume, ApiReply::Done)
                | (ApiRequest::CreateSnapshot(_), ApiReply::Snapshot(_))
                | (ApiRequest::Migrate(_), ApiReply::Migrated(_))
                | (ApiRequest::GetMetrics, ApiReply::Metrics(_))
                | (
                    ApiRequest::GetReplication | ApiRequest::Protect(_) | ApiRequest::Failover(_),
                    ApiReply::Replication(_)
                )
        )
    }
}

/// A full snapshot holds all guest memory; a diff snapshot only the pages written since the
/// previous snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotType {
    /// All guest memory.
    #[default]
    Full,
    /// The pages dirtied since the previous snapshot.
    Diff,
}

impl fmt::Display for SnapshotType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapshotType::Full => "full",
            SnapshotType::Diff => "diff",
        })
    }
}

/// The body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotParams {
    /// Where to write the snapshot (an absolute path).
    pub snapshot_path: PathBuf,
    /// Full (the default) or diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// The body of `PUT /migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// The destination monitor, as `host:port`.
    pub destination: String,
    /// The longest the VM may stay paused for the final copy; the VM chooses when absent.
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Compress the pages with zstd (for a slow link; costs CPU on both ends).
    #[serde(default)]
    pub compress: bool,
}

/// The VM's answer to an [`ApiRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// The answer to [`ApiRequest::GetVm`].
    Vm(VmInfo),
    /// The answer to [`ApiRequest::GetResources`].
    Resources(ResourceGraph),
    /// The answer to [`ApiRequest::Pause`] and [`ApiRequest::Resume`] (HTTP 204).
    Done,
    /// The answer to [`ApiRequest::CreateSnapshot`].
    Snapshot(SnapshotInfo),
    /// The answer to [`ApiRequest::Migrate`].
    Migrated(MigrationInfo),
    /// The answer to [`ApiRequest::GetMetrics`].
    Metrics(Vec<Metric>),
    /// The answer to [`ApiRequest::GetReplication`] and [`ApiRequest::Protect`].
    Replication(Box<ReplicationStatus>),
}

/// Why the VM refused or failed a request; each kind is an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 400: the request makes no sense for this VM (e.g. a diff snapshot without a base).
    BadRequest,
    /// 404: something the request names does not exist (e.g. the snapshot's directory).
    NotFound,
    /// 409: the VM's state forbids the request (e.g. pausing a paused VM).
    Conflict,
    /// 500: the VM failed to carry the request out.
    Internal,
    /// 502: the migration destination or the standby is unreachable, refused or broke off.
    BadGateway,
}

impl ApiErrorKind {
    /// The HTTP status code of this kind.
    pub fn status(self) -> u16 {
        match self {
            ApiErrorKind::BadRequest => 400,
            ApiErrorKind::NotFound => 404,
            ApiErrorKind::Conflict => 409,
            ApiErrorKind::Internal => 500,
            ApiErrorKind::BadGateway => 502,
        }
    }
}

/// A refused or failed request: its kind and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The kind, which gives the HTTP status.
    pub kind: ApiErrorKind,
    /// What went wrong, in a sentence.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A 400 error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadRequest, message)
    }

    /// A 404 error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::NotFound, message)
    }

    /// A 409 error.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Conflict, message)
    }

    /// A 500 error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::Internal, message)
    }

    /// A 502 error.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(ApiErrorKind::BadGateway, message)
    }
}

/// What the VM answers to a request.
pub type ApiResult = Result<ApiReply, ApiError>;

/// The body of every error response: `{"error": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// What the VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are paused.
    Paused,
    /// A live migration is under way.
    Migrating,
    /// A snapshot is being written.
    Snapshotting,
}

/// The body of `GET /vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's identifier.
    pub id: String,
    /// What the VM is doing.
    pub state: VmState,
    /// Time since the VM booted.
    pub uptime_ms: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The VM's configuration, as a JSON object.
    pub config: serde_json::Value,
}

/// The body of `GET /vm/resources`: what the VM is made of and how the parts connect.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceGraph {
    /// The resources.
    pub nodes: Vec<ResourceNode>,
    /// How they connect.
    pub edges: Vec<ResourceEdge>,
}

/// The kind of a [`ResourceNode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// A vCPU.
    Vcpu,
    /// A guest memory region.
    Memory,
    /// A device.
    Device,
    /// A virtqueue of a device.
    Queue,
    /// A host TAP interface.
    Tap,
    /// A host file.
    File,
    /// An interrupt line.
    Irq,
    /// The replication link: the epochs sent to the standbys and their acks.
    Link,
    /// A standby the VM is replicated to.
    Standby,
    /// The primary a standby holds the VM of.
    Primary,
}

/// One resource of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceNode {
    /// A unique name: `vcpu0`, `memory0`, `virtio-net0`, `virtio-net0/rx`, `tap:tap0`,
    /// `file:/path`, `replication-link`, `standby:host:port`, `primary:host:port`...
    pub id: String,
    /// What the resource is.
    pub kind: ResourceKind,
    /// Free-form attributes (sizes, addresses, counters).
    #[serde(default)]
    pub attrs: serde_json::Map<String, serde_json::Value>,
}

/// How two resources relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// A device has a virtqueue.
    HasQueue,
    /// A device or memory region is backed by a host resource.
    BackedBy,
    /// A device or queue signals the guest through an interrupt.
    InterruptsVia,
    /// A resource writes to another (e.g. a device into guest memory).
    Writes,
    /// A resource's progress waits on another (e.g. guest memory and devices, whose output is
    /// held until the standbys acknowledge the epoch, on the replication link).
    DependsOn,
    /// The replication link sends the VM's epochs to a peer.
    ReplicatesTo,
}

/// A directed edge between two [`ResourceNode`]s, by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceEdge {
    /// The id of the source node.
    pub from: String,
    /// The id of the target node.
    pub to: String,
    /// How the source relates to the target.
    pub relation: Relation,
}

/// The body of a successful `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Where the snapshot was written.
    pub path: PathBuf,
    /// Full or diff.
    pub snapshot_type: SnapshotType,
    /// Bytes of guest memory written.
    pub memory_bytes: u64,
    /// Guest pages written.
    pub pages: u64,
    /// How long the vCPUs were paused.
    pub pause_ms: f64,
    /// How long the whole snapshot took.
    pub total_ms: f64,
}

/// The body of a successful `PUT /migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// The destination, as asked.
    pub destination: String,
    /// How long the VM was paused for the final copy.
    pub downtime_ms: f64,
    /// How long the whole migration took.
    pub total_ms: f64,
    /// Rounds of pre-copy, the final one included.
    pub iterations: u32,
    /// Bytes sent to the destination.
    pub bytes_sent: u64,
    /// Guest pages sent (a page sent twice counts twice).
    pub pages_sent: u64,
}

/// Whether a metric only grows or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// Only grows (until the monitor restarts).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl MetricKind {
    /// The Prometheus `# TYPE` word.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
        }
    }
}

/// One sample of a metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// The metric's name, e.g. `vmr_vcpu_exits_total`.
    pub name: String,
    /// What the metric measures, in a sentence.
    pub help: String,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// Labels of this sample, e.g. `("vcpu", "0")`.
    pub labels: Vec<(String, String)>,
    /// The sample's value.
    pub value: f64,
}

impl Metric {
    /// A sample without labels.
    pub fn new(
        name: impl Into<String>,
        help: impl Into<String>,
        kind: MetricKind,
        value: f64,
    ) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            kind,
            labels: Vec::new(),
            value,
        }
    }

    /// The same sample with one more label.
    pub fn with_label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.push((name.into(), value.into()));
        self
    }
}

/// The content type of [`render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders metrics in the Prometheus text exposition format (version 0.0.4).
///
/// Samples of one name are grouped under a single `# HELP` and `# TYPE` (those of the first
/// sample of that name), in the order names first appear. Characters a metric or label name
/// cannot hold become `_`; label values and help texts are escaped.
pub fn render_prometheus(metrics: &[Metric]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, Vec<&Metric>> = HashMap::new();
    for metric in metrics {
        let name = sanitize_name(&metric.name, true);
        families
            .entry(name.clone())
            .or_insert_with(|| {
                order.push(name);
                Vec::new()
            })
            .push(metric);
    }

    let mut out = String::new();
    for name in &order {
        let samples = &families[name];
        let first = samples[0];
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&first.help));
        let _ = writeln!(out, "# TYPE {name} {}", first.kind.as_str());
        for sample in samples {
            out.push_str(name);
            if !sample.labels.is_empty() {
                out.push('{');
                for (i, (label, value)) in sample.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(
                        out,
                        "{}=\"{}\"",
                        sanitize_name(label, false),
                        escape_label_value(value)
                    );
                }
                out.push('}');
            }
            out.push(' ');
            out.push_str(&format_value(sample.value));
            out.push('\n');
        }
    }
    out
}

/// Makes `name` a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or, without `colons`, a
/// valid label name (`[a-zA-Z_][a-zA-Z0-9_]*`).
fn sanitize_name(name: &str, colons: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        value.to_string()
    }
}
