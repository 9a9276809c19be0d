//! Tests of the API server and client against a fake VM thread, with every response checked
//! against `vmm/api/openapi.yaml`.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::server::MAX_BODY_BYTES;
use super::*;
use crate::controller::{answer_without_vm, replication_resources, Replication, STANDBY_MESSAGE};

/// Timeout of a raw test request: longer than the server's test timeouts.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Server timeouts in the tests: long enough for a loaded machine, short enough to fail fast.
const TEST_CONFIG: ApiServerConfig = ApiServerConfig {
    request_timeout: Duration::from_secs(10),
    migrate_timeout: Duration::from_secs(10),
    protect_timeout: Duration::from_secs(10),
};

#[path = "../../tests/common/openapi.rs"]
mod openapi;
use openapi::openapi;

// ---------------------------------------------------------------------------------------------
// A fake VM behind a real server.

/// What the fake VM tracks.
struct FakeVm {
    paused: bool,
    started: Instant,
    /// Calls held unanswered (to provoke 504).
    held: Vec<ApiCall>,
    /// The replication side, as the controller has it.
    replication: Replication,
}

impl FakeVm {
    /// Answers `call` as a VM would; some snapshot paths provoke the server's own errors.
    fn serve(&mut self, call: ApiCall) {
        let result = match &call.request {
            ApiRequest::GetVm => Ok(ApiReply::Vm(VmInfo {
                id: "test-vm".to_string(),
                state: if self.paused {
                    VmState::Paused
                } else {
                    VmState::Running
                },
                uptime_ms: self.started.elapsed().as_millis() as u64,
                vcpus: 2,
                mem_mib: 256,
                config: json!({"vcpus": 2, "mem_mib": 256, "net": [{"tap": "tap0"}]}),
            })),
            ApiRequest::GetResources => Ok(ApiReply::Resources(resource_graph())),
            ApiRequest::Pause if self.paused => Err(ApiError::conflict("the VM is already paused")),
            ApiRequest::Pause => {
                self.paused = true;
                Ok(ApiReply::Done)
            }
            ApiRequest::Resume if !self.paused => Err(ApiError::conflict("the VM is not paused")),
            ApiRequest::Resume => {
                self.paused = false;
                Ok(ApiReply::Done)
            }
            ApiRequest::CreateSnapshot(params) => {
                match params.snapshot_path.file_name().and_then(|n| n.to_str()) {
                    Some("drop-me") => return drop(call),
                    Some("hold-me") => return self.held.push(call),
                    Some("wrong-kind") => Ok(ApiReply::Done),
                    _ if !params.snapshot_path.parent().is_some_and(Path::exists) => {
                        Err(ApiError::not_found(format!(
                            "directory of {} does not exist",
                            params.snapshot_path.display()
                        )))
                    }
                    _ => {
                        let pages = match params.snapshot_type {
                            SnapshotType::Full => 65536,
                            SnapshotType::Diff => 100,
                        };
                        Ok(ApiReply::Snapshot(SnapshotInfo {
                            path: params.snapshot_path.clone(),
                            snapshot_type: params.snapshot_type,
                            memory_bytes: pages * 4096,
                            pages,
                            pause_ms: 12.5,
                            total_ms: 40.25,
                        }))
                    }
                }
            }
            ApiRequest::Migrate(params) if params.destination.ends_with(":1") => {
                Err(ApiError::bad_gateway(format!(
                    "cannot connect to {}: Connection refused",
                    params.destination
                )))
            }
            ApiRequest::Migrate(params) => Ok(ApiReply::Migrated(MigrationInfo {
                destination: params.destination.clone(),
                downtime_ms: params.max_downtime_ms.unwrap_or(300) as f64 / 2.0,
                total_ms: 1234.5,
                iterations: 3,
                bytes_sent: 300 << 20,
                pages_sent: 76800,
            })),
            ApiRequest::GetMetrics => {
                let mut metrics = metrics();
                metrics.extend(self.replication.metrics());
                Ok(ApiReply::Metrics(metrics))
            }
            ApiRequest::GetReplication => {
                Ok(ApiReply::Replication(Box::new(self.replication.status())))
            }
            ApiRequest::Protect(params) => {
                let params = params.clone();
                return self.replication.protect(call, params);
            }
            ApiRequest::Failover(params) => {
                let params = params.clone();
                return self.replication.failover(call, params);
            }
        };
        call.respond(result);
    }
}

fn resource_graph() -> ResourceGraph {
    let node = |id: &str, kind, attrs: Value| ResourceNode {
        id: id.to_string(),
        kind,
        attrs: attrs.as_object().cloned().unwrap_or_default(),
    };
    let edge = |from: &str, to: &str, relation| ResourceEdge {
        from: from.to_string(),
        to: to.to_string(),
        relation,
    };
    ResourceGraph {
        nodes: vec![
            node("vcpu0", ResourceKind::Vcpu, json!({"apic_id": 0})),
            node(
                "memory0",
                ResourceKind::Memory,
                json!({"gpa": 0, "size": 256 << 20}),
            ),
            node(
                "virtio-net0",
                ResourceKind::Device,
                json!({"mmio": "0xd0000000"}),
            ),
            node("virtio-net0/rx", ResourceKind::Queue, json!({"size": 256})),
            node("tap:tap0", ResourceKind::Tap, json!({})),
            node("irq5", ResourceKind::Irq, json!({"gsi": 5})),
            node("file:/var/lib/vmr/disk.img", ResourceKind::File, json!({})),
        ],
        edges: vec![
            edge("virtio-net0", "virtio-net0/rx", Relation::HasQueue),
            edge("virtio-net0", "tap:tap0", Relation::BackedBy),
            edge("virtio-net0/rx", "irq5", Relation::InterruptsVia),
            edge("virtio-net0/rx", "memory0", Relation::Writes),
        ],
    }
}

fn metrics() -> Vec<Metric> {
    vec![
        Metric::new(
            "vmr_vcpu_exits_total",
            "vCPU exits.",
            MetricKind::Counter,
            10.0,
        )
        .with_label("vcpu", "0")
        .with_label("reason", "mmio"),
        Metric::new(
            "vmr_uptime_seconds",
            "Time since boot.",
            MetricKind::Gauge,
            1.5,
        ),
        Metric::new(
            "vmr_vcpu_exits_total",
            "vCPU exits.",
            MetricKind::Counter,
            3.0,
        )
        .with_label("vcpu", "1")
        .with_label("reason", "a \"quoted\\\" reason\nwith a newline"),
    ]
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "vmr-api-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What answers the calls behind a [`TestVm`]'s server.
#[derive(Clone)]
enum Answerer {
    /// A fake VM, with the replication hook given, if any.
    Vm(Option<Arc<dyn ReplicationHook>>),
    /// A standby: no VM, [`answer_without_vm`] with this hook.
    Standby(Arc<dyn ReplicationHook>),
}

/// An API server with a fake VM thread answering it.
struct TestVm {
    client: ApiClient,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
    stop: Arc<AtomicBool>,
    vm_thread: Option<JoinHandle<()>>,
    server: Option<ApiServer>,
    socket: PathBuf,
    dir: TempDir,
}

impl TestVm {
    fn start() -> Self {
        Self::start_with(TEST_CONFIG)
    }

    fn start_with(config: ApiServerConfig) -> Self {
        Self::start_answering(config, Answerer::Vm(None))
    }

    fn start_answering(config: ApiServerConfig, answerer: Answerer) -> Self {
        let dir = TempDir::new();
        let socket = dir.0.join("api.sock");
        let (server, receiver) = ApiServer::start_with(&socket, config).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let vm_thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut vm = FakeVm {
                    paused: false,
                    started: Instant::now(),
                    held: Vec::new(),
                    replication: match &answerer {
                        Answerer::Vm(hook) => Replication::new(hook.clone()),
                        Answerer::Standby(_) => Replication::default(),
                    },
                };
                while !stop.load(Ordering::Relaxed) {
                    // Like the event loop: calls are only taken when the eventfd says so.
                    let mut pollfd = libc::pollfd {
                        fd: receiver.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `pollfd` is a valid, exclusively borrowed pollfd and nfds is 1.
                    let ready = unsafe { libc::poll(&mut pollfd, 1, 20) };
                    if ready <= 0 {
                        continue;
                    }
                    for call in receiver.drain() {
                        seen.lock().unwrap().push(call.request.clone());
                        match &answerer {
                            Answerer::Vm(_) => vm.serve(call),
                            Answerer::Standby(hook) => {
                                answer_without_vm(call, hook.as_ref(), &standby_snapshot)
                            }
                        }
                    }
                }
            })
        };
        Self {
            client: ApiClient::new(&socket),
            seen,
            stop,
            vm_thread: Some(vm_thread),
            server: Some(server),
            socket,
            dir,
        }
    }

    /// Sends a raw request and checks the response against openapi.yaml.
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        let response = self
            .client
            .call(method, path, body.map(str::as_bytes), CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        openapi().check(method, path, &response);
        response
    }

    /// Sends a raw request, expects `status` and returns the JSON body.
    fn expect(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let response = self.request(method, path, body);
        let text = String::from_utf8_lossy(&response.body);
        assert_eq!(response.status, status, "{method} {path} {body:?}: {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Expects an error answer and returns its message.
    fn expect_error(&self, method: &str, path: &str, body: Option<&str>, status: u16) -> String {
        let body = self.expect(method, path, body, status);
        let message = body["error"]
            .as_str()
            .expect("an error message")
            .to_string();
        assert!(!message.is_empty());
        message
    }

    fn seen(&self) -> Vec<ApiRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.vm_thread.take() {
            let _ = thread.join();
        }
        self.server.take();
    }
}

// ---------------------------------------------------------------------------------------------
// The server.

#[test]
fn api_socket_is_mode_0600_and_removed_on_shutdown() {
    let mut vm = TestVm::start();
    let meta = std::fs::symlink_metadata(&vm.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(vm.server.as_ref().unwrap().socket_path(), vm.socket);

    vm.server.take().unwrap().shutdown();
    assert!(!vm.socket.exists());
    let err = vm.client.get_vm().unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(vm.socket.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn start_refuses_a_live_socket_and_replaces_a_stale_one() {
    let vm = TestVm::start();
    let err = ApiServer::start(&vm.socket).unwrap_err();
    assert!(matches!(err, ApiServerError::AlreadyServing(_)), "{err}");
    // The live server still answers.
    vm.expect("GET", "/vm", None, 200);

    let stale = vm.dir.0.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let (server, _receiver) = ApiServer::start(&stale).unwrap();
    assert_eq!(
        std::fs::symlink_metadata(&stale)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    drop(server);
    assert!(!stale.exists());

    let file = vm.dir.0.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = ApiServer::start(&file).unwrap_err();
    assert!(matches!(err, ApiServerError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn get_vm_answers_vm_info() {
    let vm = TestVm::start();
    let body = vm.expect("GET", "/vm", None, 200);
    assert_eq!(body["id"], "test-vm");
    assert_eq!(body["state"], "running");
    assert_eq!(body["vcpus"], 2);
    assert_eq!(body["mem_mib"], 256);
    assert_eq!(body["config"]["net"][0]["tap"], "tap0");
    assert_eq!(vm.seen(), vec![ApiRequest::GetVm]);
}

#[test]
fn get_resources_answers_the_graph() {
    let vm = TestVm::start();
    let body = vm.expect("GET", "/vm/resources", None, 200);
    let graph: ResourceGraph = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(graph, resource_graph());
    assert_eq!(body["nodes"][3]["kind"], "queue");
    assert_eq!(body["edges"][2]["relation"], "interrupts_via");
}

#[test]
fn pause_and_resume_track_the_state_and_conflict_when_repeated() {
    let vm = TestVm::start();
    assert_eq!(vm.expect("PUT", "/vm/pause", None, 204), Value::Null);
    assert_eq!(vm.expect("GET", "/vm", None, 200)["state"], "paused");
    let message = vm.expect_error("PUT", "/vm/pause", None, 409);
    assert_eq!(message, "the VM is already paused");
    assert_eq!(vm.expect("PUT", "/vm/resume", None, 204), Value::Null);
    assert_eq!(vm.expect("GET", "/vm", None, 200)["state"], "running");
    vm.expect_error("PUT", "/vm/resume", None, 409);
    assert_eq!(vm.seen().len(), 6);
}

#[test]
fn snapshot_create_answers_snapshot_info() {
    let vm = TestVm::start();
    let path = vm.dir.0.join("snap");
    let path = path.to_str().unwrap();

    // The type defaults to full.
    let body = vm.expect(
        "PUT",
        "/snapshot/create",
        Some(&format!(r#"{{"snapshot_path": "{path}"}}"#)),
        200,
    );
    assert_eq!(body["path"], path);
    assert_eq!(body["snapshot_type"], "full");
    assert_eq!(body["pages"], 65536);
    assert_eq!(body["pause_ms"], 12.5);

    let body = vm.expect(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{path}", "snapshot_type": "diff"}}"#
        )),
        200,
    );
    assert_eq!(body["snapshot_type"], "diff");
    assert_eq!(body["memory_bytes"], 409600);

    let message = vm.expect_error(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/nonexistent-vmr-dir/snap"}"#),
        404,
    );
    assert!(message.contains("/nonexistent-vmr-dir/snap"), "{message}");

    assert_eq!(
        vm.seen()[1],
        ApiRequest::CreateSnapshot(SnapshotParams {
            snapshot_path: PathBuf::from(path),
            snapshot_type: SnapshotType::Diff,
        })
    );
}

#[test]
fn migrate_answers_migration_info_or_bad_gateway() {
    let vm = TestVm::start();
    let body = vm.expect(
        "PUT",
        "/migrate",
        Some(r#"{"destination": "127.0.0.1:4444", "max_downtime_ms": 50}"#),
        200,
    );
    assert_eq!(body["destination"], "127.0.0.1:4444");
    assert_eq!(body["downtime_ms"], 25.0);
    assert_eq!(body["iterations"], 3);

    // A host name resolves, and max_downtime_ms may be omitted or null.
    vm.expect(
        "PUT",
        "/migrate",
        Some(r#"{"destination": "localhost:4444"}"#),
        200,
    );
    vm.expect(
        "PUT",
        "/migrate",
        Some(r#"{"destination": "[::1]:4444", "max_downtime_ms": null}"#),
        200,
    );

    let message = vm.expect_error(
        "PUT",
        "/migrate",
        Some(r#"{"destination": "127.0.0.1:1"}"#),
        502,
    );
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert_eq!(
        vm.seen()[0],
        ApiRequest::Migrate(MigrateParams {
            destination: "127.0.0.1:4444".to_string(),
            max_downtime_ms: Some(50),
            compress: false,
        })
    );
}

#[test]
fn metrics_answer_prometheus_text() {
    let vm = TestVm::start();
    let response = vm.request("GET", "/metrics", None);
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(response.body).unwrap();
    assert_eq!(text, render_prometheus(&metrics()));
    check_exposition_format(&text);
}

#[test]
fn invalid_requests_are_400_and_never_reach_the_vm() {
    let vm = TestVm::start();
    let cases: &[(&str, &str, &str)] = &[
        ("/snapshot/create", "", "needs a JSON body"),
        ("/snapshot/create", "{", "invalid SnapshotParams body"),
        (
            "/snapshot/create",
            "not json",
            "invalid SnapshotParams body",
        ),
        ("/snapshot/create", "{}", "missing field `snapshot_path`"),
        (
            "/snapshot/create",
            r#"{"snapshot_path": 5}"#,
            "invalid type",
        ),
        (
            "/snapshot/create",
            r#"{"snapshot_path": "/a", "snapshot_type": "half"}"#,
            "unknown variant `half`",
        ),
        (
            "/snapshot/create",
            r#"{"snapshot_path": "/a", "compress": true}"#,
            "unknown field `compress`",
        ),
        (
            "/snapshot/create",
            r#"{"snapshot_path": "relative/snap"}"#,
            "must be an absolute path",
        ),
        (
            "/snapshot/create",
            r#"{"snapshot_path": "/"}"#,
            "names no file",
        ),
        ("/migrate", "[]", "invalid MigrateParams body"),
        ("/migrate", "{}", "missing field `destination`"),
        (
            "/migrate",
            r#"{"destination": ""}"#,
            "not a valid host:port",
        ),
        (
            "/migrate",
            r#"{"destination": "localhost"}"#,
            "not a valid host:port",
        ),
        (
            "/migrate",
            r#"{"destination": "127.0.0.1:notaport"}"#,
            "not a valid host:port",
        ),
        (
            "/migrate",
            r#"{"destination": "127.0.0.1:70000"}"#,
            "not a valid host:port",
        ),
        (
            "/migrate",
            r#"{"destination": "127.0.0.1:4444", "max_downtime_ms": -1}"#,
            "invalid MigrateParams body",
        ),
        (
            "/migrate",
            r#"{"destination": "127.0.0.1:4444", "max_downtime_ms": 0}"#,
            "at least 1",
        ),
        ("/replication/protect", "", "needs a JSON body"),
        ("/replication/protect", "{", "invalid ProtectParams body"),
        ("/replication/protect", "{}", "missing field `standby`"),
        (
            "/replication/protect",
            r#"{"standby": 7070}"#,
            "invalid type",
        ),
        (
            "/replication/protect",
            r#"{"standby": "127.0.0.1:7070", "period_ms": 10}"#,
            "unknown field `period_ms`",
        ),
        (
            "/replication/protect",
            r#"{"standby": "standby-without-port"}"#,
            "standby \"standby-without-port\" is not a valid host:port",
        ),
    ];
    for (path, body, expected) in cases {
        let message = vm.expect_error("PUT", path, Some(body), 400);
        assert!(
            message.contains(expected),
            "PUT {path} {body:?}: {message:?} lacks {expected:?}"
        );
        assert!(!message.contains('\n'), "not one line: {message:?}");
    }
    // A request without any body at all.
    let message = vm.expect_error("PUT", "/migrate", None, 400);
    assert!(message.contains("needs a JSON body"), "{message}");
    assert_eq!(vm.seen(), Vec::new());
}

#[test]
fn oversized_body_is_413() {
    let vm = TestVm::start();
    let body = format!(
        r#"{{"snapshot_path": "/{}"}}"#,
        "a".repeat(MAX_BODY_BYTES + 1)
    );
    let message = vm.expect_error("PUT", "/snapshot/create", Some(&body), 413);
    assert!(message.contains("/snapshot/create"), "{message}");
    assert_eq!(vm.seen(), Vec::new());
}

#[test]
fn unknown_path_is_404_and_wrong_method_is_405() {
    let vm = TestVm::start();
    for path in ["/", "/vm/nope", "/vms", "/snapshot", "/metrics/x"] {
        let message = vm.expect_error("GET", path, None, 404);
        assert!(message.contains(path), "{message}");
    }
    vm.expect_error("PUT", "/nope", Some("{}"), 404);

    let response = vm.request("POST", "/vm/pause", None);
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("PUT"));
    let response = vm.request("PUT", "/vm", None);
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET,HEAD"));
    let message = vm.expect_error("DELETE", "/metrics", None, 405);
    assert_eq!(
        message,
        "method DELETE is not allowed on /metrics (use GET)"
    );
    vm.expect_error("GET", "/snapshot/create", None, 405);
    vm.expect_error("PATCH", "/migrate", Some("{}"), 405);
    assert_eq!(vm.seen(), Vec::new());
}

#[test]
fn dropped_call_is_503() {
    let vm = TestVm::start();
    let message = vm.expect_error(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/drop-me"}"#),
        503,
    );
    assert!(message.starts_with("the VM is gone"), "{message}");
    // The server goes on serving.
    vm.expect("GET", "/vm", None, 200);
}

#[test]
fn gone_event_loop_is_503() {
    let dir = TempDir::new();
    let socket = dir.0.join("api.sock");
    let (_server, receiver) = ApiServer::start(&socket).unwrap();
    drop(receiver);
    let response = ApiClient::new(&socket)
        .call("GET", "/vm", None, CALL_TIMEOUT)
        .unwrap();
    openapi().check("GET", "/vm", &response);
    assert_eq!(response.status, 503);
    let err = ApiClient::new(&socket).pause().unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 503, message } if message.starts_with("the VM is gone")),
        "{err}"
    );
}

#[test]
fn unanswered_call_is_504() {
    let vm = TestVm::start_with(ApiServerConfig {
        request_timeout: Duration::from_millis(300),
        migrate_timeout: Duration::from_millis(300),
        protect_timeout: Duration::from_millis(300),
    });
    let started = Instant::now();
    let message = vm.expect_error(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/hold-me"}"#),
        504,
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        message,
        "the VM did not answer the create-snapshot request within 300 ms"
    );
}

#[test]
fn reply_of_the_wrong_kind_is_500() {
    let vm = TestVm::start();
    let message = vm.expect_error(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/tmp/wrong-kind"}"#),
        500,
    );
    assert!(message.contains("create-snapshot"), "{message}");
}

#[test]
fn calls_queued_together_are_all_answered() {
    let vm = TestVm::start();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let client = vm.client.clone();
            std::thread::spawn(move || client.get_vm().unwrap())
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap().id, "test-vm");
    }
    assert_eq!(vm.seen().len(), 8);
}

#[test]
fn shutdown_does_not_wait_for_calls_in_flight() {
    let mut vm = TestVm::start();
    let client = vm.client.clone();
    let pending =
        std::thread::spawn(move || client.snapshot(Path::new("/tmp/hold-me"), SnapshotType::Full));
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.seen().is_empty() {
        assert!(Instant::now() < deadline, "the call never reached the VM");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    vm.server.take().unwrap().shutdown();
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = pending.join().unwrap().unwrap_err();
    // The connection is closed without an answer.
    assert!(
        matches!(err, ClientError::Malformed { .. } | ClientError::Io { .. }),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document itself.

#[test]
fn openapi_operations_are_the_routes_served() {
    let documented = openapi().operations();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|route| (route.method.as_str().to_string(), route.path.to_string()))
        .collect();
    assert_eq!(documented, served);

    // And the router really serves them: each documented operation reaches the VM, every
    // other method on a documented path is 405.
    let vm = TestVm::start();
    let snapshot = format!(r#"{{"snapshot_path": "{}"}}"#, vm.dir.0.join("s").display());
    let bodies = [
        ("/snapshot/create", snapshot.as_str()),
        ("/migrate", r#"{"destination": "127.0.0.1:4444"}"#),
        ("/replication/protect", r#"{"standby": "127.0.0.1:4444"}"#),
        ("/replication/failover", "{}"),
    ];
    for (method, path) in &documented {
        let body = bodies.iter().find(|(p, _)| p == path).map(|(_, b)| *b);
        let response = vm.request(method, path, body);
        assert!(
            (200..300).contains(&response.status) || response.status == 409,
            "{method} {path}: {}",
            response.status
        );
    }
    assert_eq!(vm.seen().len(), documented.len());
    for route in ROUTES {
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if method != route.method.as_str() {
                vm.expect_error(method, route.path, None, 405);
            }
        }
    }
}

#[test]
fn openapi_schemas_accept_our_bodies_and_reject_others() {
    let doc = openapi();
    let schema = |name: &str| doc.schema(name);
    let ok = |name: &str, value: Value| {
        let errors = doc.errors(&schema(name), &value);
        assert!(errors.is_empty(), "{name} rejects {value}: {errors:?}");
    };
    let bad = |name: &str, value: Value| {
        assert!(
            !doc.errors(&schema(name), &value).is_empty(),
            "{name} accepts {value}"
        );
    };

    ok(
        "ResourceGraph",
        serde_json::to_value(resource_graph()).unwrap(),
    );
    let snapshot = SnapshotParams {
        snapshot_path: PathBuf::from("/s"),
        snapshot_type: SnapshotType::Diff,
    };
    ok("SnapshotParams", serde_json::to_value(&snapshot).unwrap());
    let migrate = MigrateParams {
        destination: "h:1".to_string(),
        max_downtime_ms: Some(5),
        compress: true,
    };
    ok("MigrateParams", serde_json::to_value(&migrate).unwrap());
    ok("Error", json!({"error": "x"}));

    let vm_info = json!({
        "id": "a", "state": "running", "uptime_ms": 1, "vcpus": 1, "mem_mib": 32, "config": {}
    });
    ok("VmInfo", vm_info.clone());
    let mut sleeping = vm_info.clone();
    sleeping["state"] = json!("sleeping");
    bad("VmInfo", sleeping);
    let mut missing = vm_info.clone();
    missing.as_object_mut().unwrap().remove("uptime_ms");
    bad("VmInfo", missing);
    let mut extra = vm_info;
    extra["surprise"] = json!(1);
    bad("VmInfo", extra);
    bad("Error", json!({"message": "x"}));
    bad("SnapshotInfo", json!({"path": "/s"}));
    bad(
        "ResourceEdge",
        json!({"from": "a", "to": "b", "relation": "likes"}),
    );

    // Every $ref in the document resolves.
    fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc.doc, &mut all);
    assert!(!all.is_empty());
    for reference in all {
        assert!(
            doc.doc.pointer(reference.trim_start_matches('#')).is_some(),
            "dangling {reference}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

#[test]
fn client_drives_the_vm() {
    let vm = TestVm::start();
    let client = &vm.client;
    assert_eq!(client.socket(), vm.socket);

    let info = client.get_vm().unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.vcpus, 2);
    assert_eq!(client.get_resources().unwrap(), resource_graph());

    client.pause().unwrap();
    assert_eq!(client.get_vm().unwrap().state, VmState::Paused);
    let err = client.pause().unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 409, message } if message == "the VM is already paused"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the monitor answered 409: the VM is already paused"
    );
    client.resume().unwrap();

    let path = vm.dir.0.join("snap");
    let info = client.snapshot(&path, SnapshotType::Diff).unwrap();
    assert_eq!(info.path, path);
    assert_eq!(info.snapshot_type, SnapshotType::Diff);
    assert_eq!(info.pages, 100);
    let err = client
        .snapshot(Path::new("relative"), SnapshotType::Full)
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 400, message } if message.contains("absolute")),
        "{err}"
    );

    let info = client
        .migrate(&MigrateParams {
            destination: "127.0.0.1:4444".into(),
            max_downtime_ms: Some(100),
            compress: false,
        })
        .unwrap();
    assert_eq!(info.destination, "127.0.0.1:4444");
    assert_eq!(info.downtime_ms, 50.0);
    assert_eq!(info.bytes_sent, 300 << 20);
    let err = client
        .migrate(&MigrateParams {
            destination: "127.0.0.1:1".into(),
            max_downtime_ms: None,
            compress: true,
        })
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 502, .. }),
        "{err}"
    );

    let text = client.metrics().unwrap();
    assert_eq!(text, render_prometheus(&metrics()));
}

// ---------------------------------------------------------------------------------------------
// Prometheus rendering.

/// Checks `text` is well-formed exposition format 0.0.4: comment lines are HELP or TYPE, each
/// once per name and before its samples; samples of one name are contiguous; label values
/// are properly quoted and escaped; values parse as floats.
fn check_exposition_format(text: &str) {
    assert!(text.ends_with('\n'));
    let mut helped = BTreeSet::new();
    let mut typed = BTreeSet::new();
    let mut finished = BTreeSet::new();
    let mut current: Option<String> = None;
    let valid_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "{line}");
            assert!(helped.insert(name.to_string()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(valid_name(name), "{line}");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string()), "second TYPE: {line}");
            continue;
        }
        assert!(!line.starts_with('#'), "{line}");
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let name = &line[..name_end];
        assert!(valid_name(name), "{line}");
        assert!(typed.contains(name) && helped.contains(name), "{line}");
        if current.as_deref() != Some(name) {
            if let Some(previous) = current.replace(name.to_string()) {
                finished.insert(previous);
            }
            assert!(!finished.contains(name), "samples of {name} not contiguous");
        }
        let mut rest = &line[name_end..];
        if let Some(labels) = rest.strip_prefix('{') {
            let (pairs, after) = parse_labels(labels);
            assert!(!pairs.is_empty(), "{line}");
            rest = after;
        }
        let value = rest.strip_prefix(' ').expect("a space before the value");
        assert!(
            ["NaN", "+Inf", "-Inf"].contains(&value) || value.parse::<f64>().is_ok(),
            "{line}"
        );
    }
    assert_eq!(helped, typed);
}

/// Parses `name="value",...}` (what follows a sample's `{`): the label pairs, values
/// unescaped, and the text after the `}`.
fn parse_labels(labels: &str) -> (Vec<(String, String)>, &str) {
    let mut pairs = Vec::new();
    let mut rest = labels;
    loop {
        let eq = rest.find("=\"").expect("label=\"");
        let name = &rest[..eq];
        assert!(
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name {name:?}"
        );
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let close = loop {
            let (i, c) = chars.next().expect("a closing quote");
            match c {
                '\\' => match chars.next().expect("an escaped character").1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => panic!("bad escape \\{other} in {labels:?}"),
                },
                '"' => break eq + 2 + i,
                '\n' => panic!("raw newline in {labels:?}"),
                c => value.push(c),
            }
        };
        pairs.push((name.to_string(), value));
        rest = &rest[close + 1..];
        match rest.strip_prefix(',') {
            Some(more) => rest = more,
            None => return (pairs, rest.strip_prefix('}').expect("a closing brace")),
        }
    }
}

#[test]
fn prometheus_groups_samples_and_escapes() {
    let text = render_prometheus(&metrics());
    check_exposition_format(&text);
    assert_eq!(
        text,
        concat!(
            "# HELP vmr_vcpu_exits_total vCPU exits.\n",
            "# TYPE vmr_vcpu_exits_total counter\n",
            "vmr_vcpu_exits_total{vcpu=\"0\",reason=\"mmio\"} 10\n",
            "vmr_vcpu_exits_total{vcpu=\"1\",reason=\"a \\\"quoted\\\\\\\" reason\\nwith a newline\"} 3\n",
            "# HELP vmr_uptime_seconds Time since boot.\n",
            "# TYPE vmr_uptime_seconds gauge\n",
            "vmr_uptime_seconds 1.5\n",
        )
    );
    let line = text.lines().nth(3).unwrap();
    let (pairs, rest) = parse_labels(&line["vmr_vcpu_exits_total{".len()..]);
    assert_eq!(pairs[1].1, "a \"quoted\\\" reason\nwith a newline");
    assert_eq!(rest, " 3");
}

#[test]
fn prometheus_sanitizes_names_and_formats_special_values() {
    let metrics = [
        Metric::new(
            "vmr-net.rx bytes",
            "Multi\nline \\ help.",
            MetricKind::Counter,
            1e21,
        )
        .with_label("0dev", "x"),
        Metric::new("", "Empty.", MetricKind::Gauge, f64::NAN),
        Metric::new("vmr:ratio", "Ratio.", MetricKind::Gauge, f64::INFINITY),
        Metric::new("vmr:ratio", "Ratio.", MetricKind::Gauge, f64::NEG_INFINITY)
            .with_label("a:b", "y"),
    ];
    let text = render_prometheus(&metrics);
    check_exposition_format(&text);
    assert!(
        text.contains("# HELP vmr_net_rx_bytes Multi\\nline \\\\ help.\n"),
        "{text}"
    );
    assert!(
        text.contains("vmr_net_rx_bytes{_0dev=\"x\"} 1000000000000000000000\n"),
        "{text}"
    );
    assert!(text.contains("\n_ NaN\n"), "{text}");
    assert!(text.contains("\nvmr:ratio +Inf\n"), "{text}");
    assert!(text.contains("\nvmr:ratio{a_b=\"y\"} -Inf\n"), "{text}");
    assert_eq!(render_prometheus(&[]), "");
}

// ---------------------------------------------------------------------------------------------
// Replication.

/// How long the fake hook takes to protect the VM.
const PROTECT_DELAY: Duration = Duration::from_millis(300);

/// A replicator as the monitor sees it: a status, and protects answered later from a thread of
/// its own.
struct FakeHook {
    status: Mutex<ReplicationStatus>,
    /// The names of the threads that answered protects.
    replied_on: Arc<Mutex<Vec<String>>>,
}

impl FakeHook {
    fn new(status: ReplicationStatus) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(status),
            replied_on: Arc::new(Mutex::new(Vec::new())),
        })
    }
}

impl ReplicationHook for FakeHook {
    fn status(&self) -> ReplicationStatus {
        self.status.lock().unwrap().clone()
    }

    fn protect(&self, params: ProtectParams, reply: ProtectReply) {
        if params.standby.ends_with(":2") {
            // Dropped unanswered.
            return;
        }
        let mut status = primary_status();
        status.peers[0].name = params.standby.clone();
        let replied_on = self.replied_on.clone();
        std::thread::Builder::new()
            .name("fake-replicator".into())
            .spawn(move || {
                std::thread::sleep(PROTECT_DELAY);
                let name = std::thread::current().name().unwrap_or("?").to_string();
                replied_on.lock().unwrap().push(name);
                if params.standby.ends_with(":1") {
                    reply(Err(format!(
                        "cannot reach the standby {}: Connection refused",
                        params.standby
                    )));
                } else {
                    reply(Ok(status));
                }
            })
            .unwrap();
    }

    fn failover(&self, params: FailoverParams, reply: ProtectReply) {
        if params.force {
            let mut status = primary_status();
            status.message = Some("taken over without a claim".into());
            reply(Ok(status));
        } else {
            reply(Err(
                "no coordinator: pass force to take over without a claim".into(),
            ));
        }
    }
}

/// A primary protected by one standby, another dropped.
fn primary_status() -> ReplicationStatus {
    ReplicationStatus {
        role: ReplicationRole::Primary,
        protected: true,
        term: 3,
        key: true,
        period_ms: 25,
        last_committed_epoch: 41,
        last_sent_epoch: 42,
        lag_epochs: 1,
        epochs: 42,
        early_epochs: 5,
        pause_us: PauseFigures {
            last: 900,
            max: 4000,
            p50: 850,
            p99: 3100,
            parts: PauseParts {
                stop: 60,
                harvest: 10,
                state: 120,
                pages: 200,
                resume: 25,
            },
        },
        dirty_pages_last: 120,
        dirty_pages_total: 70000,
        bytes_raw: 300 << 20,
        bytes_sent: 80 << 20,
        ack_latency_us: LatencyFigures {
            last: 350,
            max: 2000,
        },
        held_egress_frames: 4,
        held_egress_bytes: 6000,
        inbound_frames_logged: 17,
        peers: vec![
            ReplicationPeer {
                name: "10.0.0.2:7070".into(),
                state: PeerState::Protecting,
                acked_epoch: 41,
                lag_epochs: 1,
                reason: None,
                copy: None,
            },
            ReplicationPeer {
                name: "10.0.0.3:7070".into(),
                state: PeerState::Dropped,
                acked_epoch: 12,
                lag_epochs: 30,
                reason: Some("no ack within 500 ms".into()),
                copy: None,
            },
            ReplicationPeer {
                name: "10.0.0.4:7070".into(),
                state: PeerState::Syncing,
                acked_epoch: 0,
                lag_epochs: 0,
                reason: None,
                copy: Some(CopyFigures {
                    copied_bytes: 96 << 20,
                    total_bytes: 160 << 20,
                }),
            },
        ],
        primary: None,
        message: None,
        health: None,
    }
}

/// A standby holding epoch 41 of its primary.
fn standby_status() -> ReplicationStatus {
    ReplicationStatus {
        role: ReplicationRole::Standby,
        term: 3,
        key: true,
        last_committed_epoch: 41,
        primary: Some("10.0.0.1:7070".into()),
        health: Some(Box::new(HealthState {
            taps: vec![TapHealth {
                name: "tap1".into(),
                state: TapState::Down,
                seen_up: false,
            }],
            disks: vec![DiskHealth {
                path: "/srv/vm1/data.raw".into(),
                state: DiskState::Gone,
                io_errors: 0,
            }],
            guest: None,
        })),
        ..ReplicationStatus::default()
    }
}

/// What a standby answers to `PUT /snapshot/create`: its committed state.
fn standby_snapshot(params: &SnapshotParams) -> Result<SnapshotInfo, ApiError> {
    if params.snapshot_type == SnapshotType::Diff {
        return Err(ApiError::bad_request(
            "a standby writes full snapshots only",
        ));
    }
    Ok(SnapshotInfo {
        path: params.snapshot_path.clone(),
        snapshot_type: SnapshotType::Full,
        memory_bytes: 4096,
        pages: 1,
        pause_ms: 0.0,
        total_ms: 3.0,
    })
}

fn start_with_hook(hook: Arc<dyn ReplicationHook>) -> TestVm {
    TestVm::start_answering(TEST_CONFIG, Answerer::Vm(Some(hook)))
}

#[test]
fn api_calls_can_be_answered_on_another_thread() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<ApiCall>();
    assert_send::<ProtectReply>();
}

#[test]
fn get_replication_answers_the_hooks_status() {
    let hook = FakeHook::new(primary_status());
    let vm = start_with_hook(hook.clone());
    let body = vm.expect("GET", "/replication", None, 200);
    assert_eq!(body["role"], "primary");
    assert_eq!(body["protected"], true);
    assert_eq!(body["pause_us"]["p99"], 3100);
    assert_eq!(body["pause_us"]["parts"]["state"], 120);
    assert_eq!(body["ack_latency_us"]["last"], 350);
    assert_eq!(body["peers"][0]["state"], "protecting");
    assert_eq!(body["peers"][0].get("reason"), None);
    assert_eq!(body["peers"][1]["state"], "dropped");
    assert_eq!(body["peers"][1]["reason"], "no ack within 500 ms");
    assert_eq!(body.get("primary"), None);
    let status: ReplicationStatus = serde_json::from_value(body).unwrap();
    assert_eq!(status, primary_status());

    hook.status.lock().unwrap().lag_epochs = 9;
    assert_eq!(vm.client.replication().unwrap().lag_epochs, 9);
    assert_eq!(
        vm.seen(),
        vec![ApiRequest::GetReplication, ApiRequest::GetReplication]
    );
}

#[test]
fn protect_is_answered_later_from_the_hooks_thread() {
    let hook = FakeHook::new(ReplicationStatus {
        key: true,
        ..ReplicationStatus::default()
    });
    let vm = start_with_hook(hook.clone());
    let client = vm.client.clone();
    let started = Instant::now();
    let pending = std::thread::spawn(move || {
        client.protect(&ProtectParams {
            standby: "127.0.0.1:7070".into(),
        })
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.seen().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the protect never reached the VM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VM thread is free while the hook works.
    if started.elapsed() < PROTECT_DELAY {
        assert_eq!(vm.expect("GET", "/vm", None, 200)["id"], "test-vm");
        assert!(!pending.is_finished());
    }
    let status = pending.join().unwrap().unwrap();
    assert!(started.elapsed() >= PROTECT_DELAY);
    assert_eq!(status.role, ReplicationRole::Primary);
    assert!(status.protected);
    assert_eq!(status.peers[0].name, "127.0.0.1:7070");
    assert_eq!(*hook.replied_on.lock().unwrap(), vec!["fake-replicator"]);
    assert_eq!(
        vm.seen()[0],
        ApiRequest::Protect(ProtectParams {
            standby: "127.0.0.1:7070".into()
        })
    );

    // The raw answer, checked against openapi.yaml.
    let body = vm.expect(
        "PUT",
        "/replication/protect",
        Some(r#"{"standby": "localhost:7070"}"#),
        200,
    );
    assert_eq!(body["peers"][0]["name"], "localhost:7070");

    // The hook's failure is a bad gateway; a reply dropped uncalled is a gone VM.
    let message = vm.expect_error(
        "PUT",
        "/replication/protect",
        Some(r#"{"standby": "127.0.0.1:1"}"#),
        502,
    );
    assert_eq!(
        message,
        "cannot reach the standby 127.0.0.1:1: Connection refused"
    );
    let err = vm
        .client
        .protect(&ProtectParams {
            standby: "127.0.0.1:2".into(),
        })
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 503, message } if message.contains("protect")),
        "{err}"
    );
}

#[test]
fn put_replication_failover_goes_to_the_hook() {
    let vm = start_with_hook(FakeHook::new(primary_status()));
    let body = vm.expect(
        "PUT",
        "/replication/failover",
        Some(r#"{"force": true}"#),
        200,
    );
    assert_eq!(body["message"], "taken over without a claim");
    let message = vm.expect_error("PUT", "/replication/failover", Some("{}"), 502);
    assert!(message.starts_with("no coordinator"), "{message}");
    vm.expect_error(
        "PUT",
        "/replication/failover",
        Some(r#"{"forced": 1}"#),
        400,
    );
    let status = vm.client.failover(&FailoverParams { force: true }).unwrap();
    assert_eq!(status.role, ReplicationRole::Primary);
}

#[test]
fn without_a_hook_the_monitor_is_unprotected_and_refuses_protect() {
    let vm = TestVm::start();
    let body = vm.expect("GET", "/replication", None, 200);
    assert_eq!(body["role"], "unprotected");
    assert_eq!(body["key"], false);
    assert_eq!(body["protected"], false);
    assert_eq!(body["peers"], json!([]));
    assert_eq!(body["message"], NO_KEY_MESSAGE);
    assert_eq!(
        vm.client.replication().unwrap(),
        ReplicationStatus::without_key()
    );

    let message = vm.expect_error(
        "PUT",
        "/replication/protect",
        Some(r#"{"standby": "127.0.0.1:7070"}"#),
        409,
    );
    assert_eq!(
        message,
        "this monitor was started without a replication key (--key-file): it cannot be protected"
    );
    let err = vm
        .client
        .protect(&ProtectParams {
            standby: "127.0.0.1:7070".into(),
        })
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 409, message } if message == NO_KEY_MESSAGE),
        "{err}"
    );
    assert!(!vm.client.metrics().unwrap().contains("vmr_replication_"));
}

#[test]
fn metrics_show_the_replication_with_a_hook() {
    let vm = start_with_hook(FakeHook::new(primary_status()));
    let text = vm.client.metrics().unwrap();
    check_exposition_format(&text);
    let mut expected = render_prometheus(&metrics());
    primary_status().prometheus(&mut expected);
    assert_eq!(text, expected);
    for line in [
        "# TYPE vmr_replication_epochs_total counter\n",
        "vmr_replication_role{role=\"primary\"} 1\n",
        "vmr_replication_role{role=\"standby\"} 0\n",
        "vmr_replication_protected 1\n",
        "vmr_replication_last_committed_epoch 41\n",
        "vmr_replication_pause_us{stat=\"p99\"} 3100\n",
        "vmr_replication_pause_part_us{part=\"resume\"} 25\n",
        "vmr_replication_ack_latency_us{stat=\"max\"} 2000\n",
        "vmr_replication_bytes_sent_total 83886080\n",
        "vmr_replication_held_egress_frames 4\n",
        "vmr_replication_peer_state{peer=\"10.0.0.3:7070\",state=\"dropped\"} 1\n",
        "vmr_replication_peer_acked_epoch{peer=\"10.0.0.2:7070\"} 41\n",
        "vmr_replication_peer_lag_epochs{peer=\"10.0.0.3:7070\"} 30\n",
    ] {
        assert!(text.contains(line), "no {line:?} in\n{text}");
    }

    let mut alone = String::new();
    ReplicationStatus::without_key().prometheus(&mut alone);
    check_exposition_format(&alone);
    assert!(alone.contains("vmr_replication_key 0\n"), "{alone}");
    assert!(!alone.contains("peer="), "{alone}");
}

#[test]
fn a_standby_answers_without_a_vm() {
    let hook = FakeHook::new(standby_status());
    let vm = TestVm::start_answering(TEST_CONFIG, Answerer::Standby(hook));
    for (method, path, body) in [
        ("GET", "/vm", None),
        ("GET", "/vm/resources", None),
        ("PUT", "/vm/pause", None),
        ("PUT", "/vm/resume", None),
        (
            "PUT",
            "/migrate",
            Some(r#"{"destination": "127.0.0.1:4444"}"#),
        ),
        (
            "PUT",
            "/replication/protect",
            Some(r#"{"standby": "127.0.0.1:7070"}"#),
        ),
    ] {
        let message = vm.expect_error(method, path, body, 409);
        assert_eq!(message, STANDBY_MESSAGE, "{method} {path}");
    }
    let err = vm.client.get_vm().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the monitor answered 409: this is a standby: no VM runs here (see GET /replication)"
    );

    let body = vm.expect("GET", "/replication", None, 200);
    assert_eq!(body["role"], "standby");
    assert_eq!(body["primary"], "10.0.0.1:7070");
    assert_eq!(vm.client.replication().unwrap(), standby_status());

    let text = vm.client.metrics().unwrap();
    check_exposition_format(&text);
    // The replication's figures, and the health of the standby's own TAPs and disks.
    let mut metrics = standby_status().metrics();
    metrics.extend(standby_status().health.unwrap().metrics());
    assert_eq!(text, render_prometheus(&metrics));
    assert!(text.contains("vmr_replication_role{role=\"standby\"} 1\n"));
    assert!(text.contains("vmr_tap_up{tap=\"tap1\"} 0\n"), "{text}");
    assert!(
        text.lines()
            .all(|l| ["vmr_replication_", "vmr_tap_", "vmr_disk_"]
                .iter()
                .any(|p| l.contains(p))),
        "{text}"
    );

    let path = vm.dir.0.join("committed");
    let info = vm.client.snapshot(&path, SnapshotType::Full).unwrap();
    assert_eq!(info.path, path);
    let err = vm.client.snapshot(&path, SnapshotType::Diff).unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 400, message } if message.contains("full")),
        "{err}"
    );
}

#[test]
fn replication_shows_in_the_resource_graph() {
    let mut graph = resource_graph();
    replication_resources(&mut graph, &ReplicationStatus::without_key());
    assert_eq!(graph, resource_graph());

    replication_resources(&mut graph, &primary_status());
    let doc = openapi();
    let value = serde_json::to_value(&graph).unwrap();
    let errors = doc.errors(&doc.schema("ResourceGraph"), &value);
    assert!(errors.is_empty(), "{errors:?}");

    let node = |id: &str| {
        graph
            .nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    };
    assert_eq!(node("replication-link").kind, ResourceKind::Link);
    assert_eq!(node("replication-link").attrs["protected"], true);
    assert_eq!(node("standby:10.0.0.2:7070").kind, ResourceKind::Standby);
    assert_eq!(node("standby:10.0.0.2:7070").attrs["state"], "protecting");
    assert_eq!(node("standby:10.0.0.3:7070").attrs["state"], "dropped");
    assert_eq!(node("standby:10.0.0.4:7070").attrs["state"], "syncing");
    let edges: std::collections::HashSet<(&str, &str, Relation)> = graph
        .edges
        .iter()
        .filter(|e| matches!(e.relation, Relation::DependsOn | Relation::ReplicatesTo))
        .map(|e| (e.from.as_str(), e.to.as_str(), e.relation))
        .collect();
    let expected: std::collections::HashSet<(&str, &str, Relation)> = [
        ("memory0", "replication-link", Relation::DependsOn),
        ("virtio-net0", "replication-link", Relation::DependsOn),
        (
            "replication-link",
            "standby:10.0.0.2:7070",
            Relation::ReplicatesTo,
        ),
        (
            "replication-link",
            "standby:10.0.0.4:7070",
            Relation::ReplicatesTo,
        ),
    ]
    .into_iter()
    .collect();
    assert_eq!(edges, expected);
    assert_eq!(value["edges"][4]["relation"], "depends_on");

    // On a standby, the primary replicates to the link.
    let mut graph = ResourceGraph::default();
    replication_resources(&mut graph, &standby_status());
    assert_eq!(graph.nodes[1].id, "primary:10.0.0.1:7070");
    assert_eq!(graph.nodes[1].kind, ResourceKind::Primary);
    assert_eq!(
        graph.edges,
        vec![ResourceEdge {
            from: "primary:10.0.0.1:7070".into(),
            to: "replication-link".into(),
            relation: Relation::ReplicatesTo,
        }]
    );
}

#[test]
fn openapi_replication_schemas_match_our_types() {
    let doc = openapi();
    let check = |name: &str, value: &Value, ok: bool| {
        let errors = doc.errors(&doc.schema(name), value);
        assert_eq!(errors.is_empty(), ok, "{name} {value}: {errors:?}");
    };
    for status in [
        primary_status(),
        standby_status(),
        ReplicationStatus::without_key(),
        ReplicationStatus::default(),
    ] {
        let value = serde_json::to_value(&status).unwrap();
        check("ReplicationStatus", &value, true);
        assert_eq!(
            serde_json::from_value::<ReplicationStatus>(value).unwrap(),
            status
        );
    }
    let params = ProtectParams {
        standby: "h:1".into(),
    };
    check(
        "ProtectParams",
        &serde_json::to_value(&params).unwrap(),
        true,
    );
    check("ProtectParams", &json!({"standby": "h:1", "x": 1}), false);
    check("ProtectParams", &json!({}), false);

    let good = serde_json::to_value(primary_status()).unwrap();
    let mut leader = good.clone();
    leader["role"] = json!("leader");
    check("ReplicationStatus", &leader, false);
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("held_egress_bytes");
    check("ReplicationStatus", &missing, false);
    let mut extra = good.clone();
    extra["surprise"] = json!(1);
    check("ReplicationStatus", &extra, false);
    let mut peer = good;
    peer["peers"][0]["state"] = json!("lost");
    check("ReplicationStatus", &peer, false);
    let mut health = serde_json::to_value(standby_status()).unwrap();
    health["health"]["guest"] =
        json!({"state": "stalled", "exits": 9, "idle_ms": 10200, "stall_ms": 10000});
    check("ReplicationStatus", &health, true);
    let mut tap = health.clone();
    tap["health"]["taps"][0]["state"] = json!("flapping");
    check("ReplicationStatus", &tap, false);
    health["health"]["disks"][0]
        .as_object_mut()
        .unwrap()
        .remove("io_errors");
    check("ReplicationStatus", &health, false);
    // An older monitor's status, without health, still parses.
    let mut older = serde_json::to_value(standby_status()).unwrap();
    older.as_object_mut().unwrap().remove("health");
    assert_eq!(
        serde_json::from_value::<ReplicationStatus>(older)
            .unwrap()
            .health,
        None
    );

    // Every field of the type is documented and required (but the optional ones).
    let documented = &doc.doc["components"]["schemas"]["ReplicationStatus"];
    let fields: BTreeSet<String> = serde_json::to_value(primary_status())
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let required: BTreeSet<String> = documented["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(fields, required);
    let properties: BTreeSet<String> = documented["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let with_optionals: BTreeSet<String> = serde_json::to_value(standby_status())
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .chain(["message".to_string()])
        .collect();
    assert_eq!(properties, with_optionals);
}

#[test]
fn the_health_shows_on_the_resource_graphs_tap_file_and_vcpu_nodes() {
    let node = |id: &str, kind| ResourceNode {
        id: id.into(),
        kind,
        attrs: serde_json::Map::new(),
    };
    let mut graph = ResourceGraph {
        nodes: vec![
            node("vcpu0", ResourceKind::Vcpu),
            node("tap:tap0", ResourceKind::Tap),
            node("tap:tap9", ResourceKind::Tap),
            node("file:/d.raw", ResourceKind::File),
            node("memory0", ResourceKind::Memory),
        ],
        edges: Vec::new(),
    };
    let mut health = standby_status().health.unwrap();
    health.taps[0].name = "tap0".into();
    health.disks[0] = DiskHealth {
        path: "/d.raw".into(),
        state: DiskState::Failing,
        io_errors: 2,
    };
    health.guest = Some(GuestHealth {
        state: GuestState::Paused,
        exits: 5,
        idle_ms: 0,
        stall_ms: 10_000,
    });
    crate::controller::health_resources(&mut graph, &health);
    let attrs = |i: usize| Value::Object(graph.nodes[i].attrs.clone());
    assert_eq!(
        attrs(0),
        json!({"progress": "paused", "exits": 5, "idle_ms": 0})
    );
    assert_eq!(attrs(1), json!({"health": "down", "seen_up": false}));
    assert_eq!(attrs(2), json!({}), "a TAP the health does not name");
    assert_eq!(attrs(3), json!({"health": "failing", "io_errors": 2}));
    assert_eq!(attrs(4), json!({}));
}
