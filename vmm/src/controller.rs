//! Serves the API socket's requests on the monitor's thread: status, the resource graph,
//! pause and resume, snapshots, live migration (on its own thread, freezing the VM through the
//! monitor thread at the end), metrics and replication (through the [`ReplicationHook`] the
//! `vmr` binary plugs in). A standby, which runs no VM, answers with [`answer_without_vm`].

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::{
    ApiCall, ApiError, ApiReceiver, ApiReply, ApiRequest, ApiResult, FailoverParams, HealthState,
    Metric, MetricKind, MigrateParams, MigrationInfo, PeerState, ProtectParams, ProtectReply,
    Relation, ReplicationHook, ReplicationRole, ReplicationStatus, ResourceEdge, ResourceGraph,
    ResourceKind, ResourceNode, SnapshotInfo, SnapshotParams, SnapshotType, VmInfo, VmState,
    NO_KEY_MESSAGE,
};
use crate::microvm::{
    freeze_channel, lock, ControlError, FreezeChannel, FreezeHandle, MicroVm, VmPhase,
};
use crate::migration::source::{self, MigrateOptions, MigrationError, MigrationReport};
use crate::snapshot::{SnapshotError, SnapshotKind};
use crate::vstate::memory::PAGE_SIZE;

/// Why a monitor that runs no VM (a standby) refuses a request.
pub const STANDBY_MESSAGE: &str = "this is a standby: no VM runs here (see GET /replication)";

/// A migration under way.
struct Migration {
    call: ApiCall,
    destination: String,
    thread: JoinHandle<Result<MigrationReport, MigrationError>>,
}

/// The API's side of a running microVM.
pub struct Controller {
    receiver: ApiReceiver,
    freezes: FreezeChannel,
    freeze_handle: FreezeHandle,
    migration: Option<Migration>,
    id: String,
    snapshots: u64,
    last_snapshot: Option<(f64, f64)>,
    migrations_failed: u64,
    replication: Replication,
}

impl Controller {
    /// A controller serving `receiver`'s calls for `vm` (whose event loop it wakes).
    pub fn new(receiver: ApiReceiver, vm: &mut MicroVm, id: String) -> std::io::Result<Self> {
        let (freezes, freeze_handle) = freeze_channel()?;
        vm.add_wakeup(receiver.event_fd().as_raw_fd());
        vm.add_wakeup(freezes.fd());
        Ok(Self {
            receiver,
            freezes,
            freeze_handle,
            migration: None,
            id,
            snapshots: 0,
            last_snapshot: None,
            migrations_failed: 0,
            replication: Replication::default(),
        })
    }

    /// Plugs the replicator in: `GET /replication` and `PUT /replication/protect` go to `hook`,
    /// and the metrics and the resource graph show the replication. Without a hook the
    /// monitor is unprotected and refuses to be protected ([`NO_KEY_MESSAGE`]).
    pub fn set_replication(&mut self, hook: Arc<dyn ReplicationHook>) {
        self.replication = Replication::new(Some(hook));
    }

    /// Serves what is pending: freeze requests of a migration, its end, and API calls.
    pub fn poll(&mut self, vm: &mut MicroVm) {
        vm.serve_freeze(&self.freezes);
        self.finish_migration(vm);
        for call in self.receiver.drain() {
            if call.is_abandoned() {
                continue;
            }
            match &call.request {
                ApiRequest::Migrate(params) => {
                    let params = params.clone();
                    self.start_migration(vm, call, params);
                }
                ApiRequest::Protect(_) if self.migration.is_some() => {
                    call.respond(Err(ApiError::conflict("a migration is under way")));
                }
                ApiRequest::Protect(params) => {
                    let params = params.clone();
                    self.replication.protect(call, params);
                }
                ApiRequest::Failover(params) => {
                    let params = params.clone();
                    self.replication.failover(call, params);
                }
                request => {
                    let result = self.handle(vm, request);
                    call.respond(result);
                }
            }
        }
    }

    fn handle(&mut self, vm: &mut MicroVm, request: &ApiRequest) -> ApiResult {
        if self.migration.is_some()
            && !matches!(
                request,
                ApiRequest::GetVm
                    | ApiRequest::GetResources
                    | ApiRequest::GetMetrics
                    | ApiRequest::GetReplication
            )
        {
            return Err(ApiError::conflict("a migration is under way"));
        }
        match request {
            ApiRequest::GetVm => Ok(ApiReply::Vm(self.info(vm))),
            ApiRequest::GetResources => {
                let mut graph = resources(vm);
                health_resources(&mut graph, &vm.health().state());
                self.replication.add_resources(&mut graph);
                Ok(ApiReply::Resources(graph))
            }
            ApiRequest::Pause => vm.pause().map(|()| ApiReply::Done).map_err(control_error),
            ApiRequest::Resume => vm.resume().map(|()| ApiReply::Done).map_err(control_error),
            ApiRequest::CreateSnapshot(params) => self.snapshot(vm, params),
            ApiRequest::GetMetrics => Ok(ApiReply::Metrics(self.metrics(vm))),
            ApiRequest::GetReplication => {
                let mut status = self.replication.status();
                status.health = Some(Box::new(vm.health().state()));
                Ok(ApiReply::Replication(Box::new(status)))
            }
            ApiRequest::Migrate(_) | ApiRequest::Protect(_) | ApiRequest::Failover(_) => Err(
                ApiError::internal(format!("{} requests are served apart", request.name())),
            ),
        }
    }

    fn info(&self, vm: &MicroVm) -> VmInfo {
        let state = if self.migration.is_some() {
            VmState::Migrating
        } else if vm.phase() == VmPhase::Paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        VmInfo {
            id: self.id.clone(),
            state,
            uptime_ms: vm.uptime().as_millis() as u64,
            vcpus: vm.config().vcpus,
            mem_mib: vm.config().mem_mib,
            config: serde_json::to_value(vm.config()).unwrap_or_default(),
        }
    }

    fn snapshot(&mut self, vm: &mut MicroVm, params: &SnapshotParams) -> ApiResult {
        let kind = match params.snapshot_type {
            SnapshotType::Full => SnapshotKind::Full,
            SnapshotType::Diff => SnapshotKind::Diff,
        };
        let report = vm
            .snapshot(&params.snapshot_path, kind)
            .map_err(control_error)?;
        self.snapshots += 1;
        let info = SnapshotInfo {
            path: report.path,
            snapshot_type: params.snapshot_type,
            memory_bytes: report.memory_bytes,
            pages: report.pages,
            pause_ms: ms(report.pause),
            total_ms: ms(report.total),
        };
        self.last_snapshot = Some((info.pause_ms, info.total_ms));
        tracing::info!(path = %info.path.display(), pages = info.pages, pause_ms = info.pause_ms, "snapshot written");
        Ok(ApiReply::Snapshot(info))
    }

    fn start_migration(&mut self, vm: &mut MicroVm, call: ApiCall, params: MigrateParams) {
        if self.migration.is_some() {
            call.respond(Err(ApiError::conflict("a migration is already under way")));
            return;
        }
        let config = match crate::migration::wire::encode_payload(vm.config()) {
            Ok(config) => config,
            Err(e) => {
                call.respond(Err(ApiError::internal(format!(
                    "cannot encode the configuration: {e}"
                ))));
                return;
            }
        };
        let options = MigrateOptions {
            destination: params.destination.clone(),
            max_downtime: params
                .max_downtime_ms
                .map_or(source::DEFAULT_MAX_DOWNTIME, Duration::from_millis),
            compress: params.compress,
        };
        let shared_vm = vm.vm().clone();
        let freeze = self.freeze_handle.clone();
        let vcpus = vm.config().vcpus;
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let result = source::migrate(&shared_vm, &freeze, &config, vcpus, &options);
                // Wake the monitor thread to answer the call.
                freeze.wake();
                result
            });
        match spawned {
            Ok(thread) => {
                tracing::info!(destination = %params.destination, "migration started");
                self.migration = Some(Migration {
                    call,
                    destination: params.destination,
                    thread,
                });
            }
            Err(e) => call.respond(Err(ApiError::internal(format!(
                "cannot start the migration thread: {e}"
            )))),
        }
    }

    /// Answers the migration call once its thread is done (or the VM ended: moved).
    fn finish_migration(&mut self, vm: &MicroVm) {
        let done = self
            .migration
            .as_ref()
            .is_some_and(|m| m.thread.is_finished() || vm.run_state().stop_requested());
        if !done {
            return;
        }
        let Migration {
            call,
            destination,
            thread,
        } = self.migration.take().expect("checked above");
        let result = match thread.join() {
            Ok(Ok(report)) => {
                tracing::info!(
                    %destination,
                    downtime_ms = ms(report.downtime),
                    total_ms = ms(report.total),
                    passes = report.passes,
                    "migration done: the VM runs at the destination"
                );
                Ok(ApiReply::Migrated(MigrationInfo {
                    destination,
                    downtime_ms: ms(report.downtime),
                    total_ms: ms(report.total),
                    iterations: report.passes,
                    bytes_sent: report.bytes_sent,
                    pages_sent: report.pages_sent,
                }))
            }
            Ok(Err(e)) => {
                self.migrations_failed += 1;
                tracing::warn!(%destination, "migration failed, the VM runs on here: {e}");
                Err(migration_error(e))
            }
            Err(_) => Err(ApiError::internal("the migration thread panicked")),
        };
        call.respond(result);
    }

    fn metrics(&self, vm: &MicroVm) -> Vec<Metric> {
        let gauge =
            |name: &str, help: &str, value: f64| Metric::new(name, help, MetricKind::Gauge, value);
        let counter = |name: &str, help: &str, value: f64| {
            Metric::new(name, help, MetricKind::Counter, value)
        };
        let mut m = vec![
            gauge(
                "vmr_up",
                "1 while the VM runs, 0 while paused.",
                f64::from(u8::from(vm.phase() == VmPhase::Running)),
            ),
            gauge(
                "vmr_uptime_seconds",
                "Time since the vCPUs started.",
                vm.uptime().as_secs_f64(),
            ),
            gauge(
                "vmr_vcpus",
                "vCPUs of the VM.",
                f64::from(vm.config().vcpus),
            ),
            gauge(
                "vmr_memory_bytes",
                "Guest RAM.",
                (vm.config().mem_mib << 20) as f64,
            ),
            counter(
                "vmr_snapshots_total",
                "Snapshots written.",
                self.snapshots as f64,
            ),
            counter(
                "vmr_migrations_failed_total",
                "Migrations that failed (the VM ran on).",
                self.migrations_failed as f64,
            ),
        ];
        if let Some((pause, total)) = self.last_snapshot {
            m.push(gauge(
                "vmr_last_snapshot_pause_ms",
                "How long the last snapshot paused the vCPUs.",
                pause,
            ));
            m.push(gauge(
                "vmr_last_snapshot_ms",
                "How long the last snapshot took.",
                total,
            ));
        }
        for (i, slot) in vm.devices().virtio.iter().enumerate() {
            let transport = lock(&slot.transport);
            let device = lock(transport.device());
            let kind = device_name(device.device_type());
            m.push(
                gauge(
                    "vmr_virtio_device_activated",
                    "1 once the guest driver started the device.",
                    f64::from(u8::from(device.is_activated())),
                )
                .with_label("device", format!("{kind}{i}")),
            );
        }
        m.extend(vm.health().state().metrics());
        m.extend(self.replication.metrics());
        m
    }
}

/// The replication side of a monitor running a VM: its [`ReplicationHook`], if the `vmr`
/// binary plugged one in.
#[derive(Clone, Default)]
pub(crate) struct Replication {
    hook: Option<Arc<dyn ReplicationHook>>,
}

impl Replication {
    /// With `hook`, or unprotected for good without one.
    pub(crate) fn new(hook: Option<Arc<dyn ReplicationHook>>) -> Self {
        Self { hook }
    }

    /// The hook's status, or that of a monitor without a key.
    pub(crate) fn status(&self) -> ReplicationStatus {
        self.hook
            .as_ref()
            .map_or_else(ReplicationStatus::without_key, |hook| hook.status())
    }

    /// Hands a protect to the hook, which answers `call` later from its own thread (once
    /// the standby is synchronised); without a hook, answers 409 [`NO_KEY_MESSAGE`] at once.
    pub(crate) fn protect(&self, call: ApiCall, params: ProtectParams) {
        let Some(hook) = &self.hook else {
            call.respond(Err(ApiError::conflict(NO_KEY_MESSAGE)));
            return;
        };
        tracing::info!(standby = %params.standby, "protecting the VM");
        hook.protect(
            params,
            reply_with_status(call, "the VM is protected", "the VM could not be protected"),
        );
    }

    /// Hands a failover to the hook, which answers `call` once the VM runs here (or why it
    /// does not); without a hook, answers 409 [`NO_KEY_MESSAGE`] at once.
    pub(crate) fn failover(&self, call: ApiCall, params: FailoverParams) {
        let Some(hook) = &self.hook else {
            call.respond(Err(ApiError::conflict(NO_KEY_MESSAGE)));
            return;
        };
        tracing::info!(force = params.force, "failover asked");
        hook.failover(
            params,
            reply_with_status(call, "failed over", "the failover"),
        );
    }

    /// The replication's metrics (none without a hook).
    pub(crate) fn metrics(&self) -> Vec<Metric> {
        self.hook
            .as_ref()
            .map(|hook| hook.status().metrics())
            .unwrap_or_default()
    }

    /// Adds the replication to the VM's resource graph (see [`replication_resources`]).
    pub(crate) fn add_resources(&self, graph: &mut ResourceGraph) {
        if let Some(hook) = &self.hook {
            replication_resources(graph, &hook.status());
        }
    }
}

/// The way back for a protect or failover handed to a hook: answers `call`, from whatever
/// thread the hook calls it on (`done` and `failed` say what happened, in the log).
fn reply_with_status(call: ApiCall, done: &'static str, failed: &'static str) -> ProtectReply {
    Box::new(move |result| {
        let result = match result {
            Ok(status) => {
                tracing::info!(term = status.term, "{done}");
                Ok(ApiReply::Replication(Box::new(status)))
            }
            Err(reason) => {
                tracing::warn!("{failed}: {reason}");
                Err(ApiError::bad_gateway(reason))
            }
        };
        call.respond(result);
    })
}

/// Answers one call on a monitor that holds no running VM (a standby), given its
/// replication `hook` and a way to write its committed state as a `snapshot`:
///
/// - `GET /replication`: the hook's status;
/// - `GET /metrics`: the replication's metrics only;
/// - `PUT /snapshot/create`: what `snapshot` answers;
/// - `PUT /replication/failover`: to the hook, which answers once the VM runs here;
/// - anything else: 409 [`STANDBY_MESSAGE`].
///
/// The caller loops over its [`ApiReceiver`]'s calls; this never blocks on more than the
/// hook's status and `snapshot`.
pub fn answer_without_vm(
    call: ApiCall,
    hook: &dyn ReplicationHook,
    snapshot: &dyn Fn(&SnapshotParams) -> Result<SnapshotInfo, ApiError>,
) {
    if call.is_abandoned() {
        return;
    }
    let result = match &call.request {
        ApiRequest::GetReplication => Ok(ApiReply::Replication(Box::new(hook.status()))),
        ApiRequest::GetMetrics => {
            let status = hook.status();
            let mut metrics = status.metrics();
            metrics.extend(status.health.iter().flat_map(|h| h.metrics()));
            Ok(ApiReply::Metrics(metrics))
        }
        ApiRequest::CreateSnapshot(params) => snapshot(params).map(ApiReply::Snapshot),
        ApiRequest::Failover(params) => {
            let params = params.clone();
            let reply = reply_with_status(call, "failed over", "the failover");
            return hook.failover(params, reply);
        }
        _ => Err(ApiError::conflict(STANDBY_MESSAGE)),
    };
    call.respond(result);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn device_name(device_type: u32) -> &'static str {
    match device_type {
        crate::devices::virtio::TYPE_NET => "virtio-net",
        crate::devices::virtio::TYPE_BLOCK => "virtio-blk",
        _ => "virtio",
    }
}

fn control_error(e: ControlError) -> ApiError {
    match e {
        ControlError::NotStarted | ControlError::AlreadyPaused | ControlError::NotPaused => {
            ApiError::conflict(e.to_string())
        }
        ControlError::Snapshot(SnapshotError::Exists(_) | SnapshotError::NoParent) => {
            ApiError::conflict(e.to_string())
        }
        ControlError::Snapshot(SnapshotError::CreateDir { .. }) => {
            ApiError::bad_request(e.to_string())
        }
        _ => ApiError::internal(e.to_string()),
    }
}

fn migration_error(e: MigrationError) -> ApiError {
    match e {
        MigrationError::Resolve { .. } => ApiError::bad_request(e.to_string()),
        MigrationError::Connect { .. }
        | MigrationError::Wire { .. }
        | MigrationError::Refused(_)
        | MigrationError::Protocol(_)
        | MigrationError::FreezeDeadline(_) => ApiError::bad_gateway(e.to_string()),
        _ => ApiError::internal(e.to_string()),
    }
}

/// Adds the replication to a VM's resource `graph` when `status` is a primary's or a
/// standby's: a `replication-link` node (kind `link`) and a node per peer
/// (`standby:host:port` of kind `standby` on a primary, `primary:host:port` of kind `primary`
/// on a standby), with the peer's state. The guest memory and the virtio devices (whose
/// output waits for the standbys' acks) depend on the link; on a primary the link replicates
/// to every standby not dropped, on a standby the primary replicates to the link.
pub fn replication_resources(graph: &mut ResourceGraph, status: &ReplicationStatus) {
    let (prefix, kind) = match status.role {
        ReplicationRole::Unprotected => return,
        ReplicationRole::Primary => ("standby", ResourceKind::Standby),
        ReplicationRole::Standby => ("primary", ResourceKind::Primary),
    };
    let attrs = |value: serde_json::Value| match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    const LINK: &str = "replication-link";
    let dependents: Vec<String> = graph
        .nodes
        .iter()
        .filter(|n| {
            n.kind == ResourceKind::Memory
                || (n.kind == ResourceKind::Device && n.id.starts_with("virtio-"))
        })
        .map(|n| n.id.clone())
        .collect();
    graph.nodes.push(ResourceNode {
        id: LINK.to_string(),
        kind: ResourceKind::Link,
        attrs: attrs(serde_json::json!({
            "role": status.role, "protected": status.protected, "term": status.term,
            "period_ms": status.period_ms, "last_committed_epoch": status.last_committed_epoch,
            "last_sent_epoch": status.last_sent_epoch, "lag_epochs": status.lag_epochs,
            "held_egress_frames": status.held_egress_frames,
        })),
    });
    for id in dependents {
        graph.edges.push(ResourceEdge {
            from: id,
            to: LINK.to_string(),
            relation: Relation::DependsOn,
        });
    }
    let mut peers: Vec<(String, serde_json::Value, bool)> = status
        .peers
        .iter()
        .map(|peer| {
            (
                peer.name.clone(),
                serde_json::json!({
                    "address": peer.name, "state": peer.state, "acked_epoch": peer.acked_epoch,
                    "lag_epochs": peer.lag_epochs, "reason": peer.reason,
                }),
                peer.state != PeerState::Dropped,
            )
        })
        .collect();
    if let Some(primary) = &status.primary {
        if !peers.iter().any(|(name, ..)| name == primary) {
            peers.push((
                primary.clone(),
                serde_json::json!({"address": primary}),
                true,
            ));
        }
    }
    for (name, peer_attrs, live) in peers {
        let id = format!("{prefix}:{name}");
        graph.nodes.push(ResourceNode {
            id: id.clone(),
            kind,
            attrs: attrs(peer_attrs),
        });
        if live {
            // A primary replicates through the link to its standbys; a standby's link is
            // what its primary replicates to.
            let (from, to) = match status.role {
                ReplicationRole::Standby => (id, LINK.to_string()),
                _ => (LINK.to_string(), id),
            };
            graph.edges.push(ResourceEdge {
                from,
                to,
                relation: Relation::ReplicatesTo,
            });
        }
    }
}

/// Adds `health` to a VM's resource `graph`: `health` (and the TAP's `seen_up`) on the
/// `tap:*` nodes, `health` and `io_errors` on the `file:*` nodes of the disk images, and the
/// guest's progress (`progress`, `exits`, `idle_ms`) on the vCPU nodes.
pub fn health_resources(graph: &mut ResourceGraph, health: &HealthState) {
    for node in &mut graph.nodes {
        let attrs = match node.kind {
            ResourceKind::Tap => health
                .taps
                .iter()
                .find(|t| node.id.strip_prefix("tap:") == Some(t.name.as_str()))
                .map(|t| serde_json::json!({"health": t.state, "seen_up": t.seen_up})),
            ResourceKind::File => health
                .disks
                .iter()
                .find(|d| node.id.strip_prefix("file:") == d.path.to_str())
                .map(|d| serde_json::json!({"health": d.state, "io_errors": d.io_errors})),
            ResourceKind::Vcpu => health.guest.as_ref().map(|g| {
                serde_json::json!({"progress": g.state, "exits": g.exits, "idle_ms": g.idle_ms})
            }),
            _ => None,
        };
        if let Some(serde_json::Value::Object(attrs)) = attrs {
            node.attrs.extend(attrs);
        }
    }
}

/// The VM's resource graph: vCPUs, memory regions, devices with their queues, interrupt lines
/// and host backends.
pub fn resources(vm: &MicroVm) -> ResourceGraph {
    let mut g = ResourceGraph::default();
    let node = |g: &mut ResourceGraph, id: String, kind, attrs: serde_json::Value| {
        let attrs = match attrs {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        g.nodes.push(ResourceNode { id, kind, attrs });
    };
    let edge = |g: &mut ResourceGraph, from: &str, to: &str, relation| {
        g.edges.push(ResourceEdge {
            from: from.to_string(),
            to: to.to_string(),
            relation,
        });
    };
    let phase = format!("{:?}", vm.phase()).to_lowercase();
    for i in 0..vm.config().vcpus {
        node(
            &mut g,
            format!("vcpu{i}"),
            ResourceKind::Vcpu,
            serde_json::json!({"index": i, "state": phase}),
        );
    }
    for (i, region) in crate::snapshot::memory_file::regions_of(vm.vm().memory())
        .iter()
        .enumerate()
    {
        let id = format!("memory{i}");
        node(
            &mut g,
            id.clone(),
            ResourceKind::Memory,
            serde_json::json!({
                "guest_address": region.gpa, "size_bytes": region.size, "pages": region.size / PAGE_SIZE as u64,
                "dirty_logging": vm.vm().dirty_logging(),
            }),
        );
        for v in 0..vm.config().vcpus {
            edge(&mut g, &format!("vcpu{v}"), &id, Relation::Writes);
        }
    }
    node(
        &mut g,
        "serial0".into(),
        ResourceKind::Device,
        serde_json::json!({"type": "8250", "port": crate::arch::layout::SERIAL_PORT, "output": vm.config().serial.to_string()}),
    );
    node(
        &mut g,
        "irq4".into(),
        ResourceKind::Irq,
        serde_json::json!({"gsi": crate::arch::layout::SERIAL_IRQ}),
    );
    edge(&mut g, "serial0", "irq4", Relation::InterruptsVia);
    node(
        &mut g,
        "i8042".into(),
        ResourceKind::Device,
        serde_json::json!({"type": "i8042", "port": crate::arch::layout::I8042_PORT}),
    );
    let disks = vm.config().all_disks();
    let (mut blk, mut net) = (0, 0);
    for slot in &vm.devices().virtio {
        let transport = lock(&slot.transport);
        let device = lock(transport.device());
        let kind = device_name(device.device_type());
        let id = match device.device_type() {
            crate::devices::virtio::TYPE_NET => {
                net += 1;
                format!("virtio-net{}", net - 1)
            }
            _ => {
                blk += 1;
                format!("virtio-blk{}", blk - 1)
            }
        };
        node(
            &mut g,
            id.clone(),
            ResourceKind::Device,
            serde_json::json!({
                "type": kind, "mmio_base": slot.base, "activated": device.is_activated(),
                "acked_features": device.acked_features(),
            }),
        );
        let irq = format!("irq{}", slot.irq);
        node(
            &mut g,
            irq.clone(),
            ResourceKind::Irq,
            serde_json::json!({"gsi": slot.irq}),
        );
        edge(&mut g, &id, &irq, Relation::InterruptsVia);
        let names: &[&str] = if device.device_type() == crate::devices::virtio::TYPE_NET {
            &["rx", "tx"]
        } else {
            &["requests"]
        };
        for (q, config) in transport.queue_configs().iter().enumerate() {
            let qid = format!("{id}/{}", names.get(q).copied().unwrap_or("queue"));
            node(
                &mut g,
                qid.clone(),
                ResourceKind::Queue,
                serde_json::json!({"index": q, "size": config.size, "ready": config.ready}),
            );
            edge(&mut g, &id, &qid, Relation::HasQueue);
        }
        edge(&mut g, &id, "memory0", Relation::Writes);
        if device.device_type() == crate::devices::virtio::TYPE_NET {
            if let Some(cfg) = vm.config().net.get(net - 1) {
                let tap = format!("tap:{}", cfg.tap);
                node(
                    &mut g,
                    tap.clone(),
                    ResourceKind::Tap,
                    serde_json::json!({"name": cfg.tap}),
                );
                edge(&mut g, &id, &tap, Relation::BackedBy);
            }
        } else if let Some(disk) = disks.get(blk - 1) {
            let file = format!("file:{}", disk.path.display());
            node(
                &mut g,
                file.clone(),
                ResourceKind::File,
                serde_json::json!({"path": disk.path, "read_only": disk.read_only}),
            );
            edge(&mut g, &id, &file, Relation::BackedBy);
        }
    }
    g
}
