//! The API server: an axum router on a Unix socket, run by a single-threaded tokio runtime on
//! a thread of its own. Each valid request becomes an [`ApiCall`] queued for the monitor's
//! event-loop thread, which learns of it through the eventfd of its [`ApiReceiver`]: the VM
//! never runs on, or waits for, the runtime.

use std::fs;
use std::future::IntoFuture;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::EventFd;

use super::{
    render_prometheus, ApiError, ApiReply, ApiRequest, ApiResult, ErrorBody, MigrateParams,
    ProtectParams, SnapshotParams, MIGRATE_TIMEOUT, PROMETHEUS_CONTENT_TYPE, PROTECT_TIMEOUT,
    REQUEST_TIMEOUT,
};

/// The largest request body the server reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long resolving a migration destination or a standby's address may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket path could not be inspected.
    #[error("cannot inspect the API socket path {path}: {source}")]
    Inspect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The socket path holds something else than a socket.
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    /// Another server answers on the socket.
    #[error("another monitor already serves the API socket {0}")]
    AlreadyServing(PathBuf),
    /// Connecting to an existing socket to see whether it is live failed oddly.
    #[error("cannot tell whether a monitor serves the API socket {path}: {source}")]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale API socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `bind` failed.
    #[error("cannot bind the API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `chmod 0600` on the socket failed.
    #[error("cannot restrict the API socket {path} to mode 0600: {source}")]
    Chmod {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Making the listener non-blocking failed.
    #[error("cannot make the API socket non-blocking: {0}")]
    Nonblocking(io::Error),
    /// Creating or duplicating the eventfd failed.
    #[error("cannot create the API eventfd: {0}")]
    EventFd(io::Error),
    /// Building the tokio runtime failed.
    #[error("cannot build the API runtime: {0}")]
    Runtime(io::Error),
    /// Registering the listener with the runtime failed.
    #[error("cannot register the API socket with the runtime: {0}")]
    Listener(io::Error),
    /// Spawning the server thread failed.
    #[error("cannot spawn the API server thread: {0}")]
    SpawnThread(io::Error),
}

/// An HTTP method the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteMethod {
    /// `GET` (which also answers `HEAD`).
    Get,
    /// `PUT`.
    Put,
}

impl RouteMethod {
    /// The method's name, e.g. `GET`.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteMethod::Get => "GET",
            RouteMethod::Put => "PUT",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            RouteMethod::Get => MethodFilter::GET,
            RouteMethod::Put => MethodFilter::PUT,
        }
    }
}

/// What a route asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    GetVm,
    GetResources,
    Pause,
    Resume,
    CreateSnapshot,
    Migrate,
    GetMetrics,
    GetReplication,
    Protect,
    Failover,
}

/// One route of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The method.
    pub method: RouteMethod,
    /// The path.
    pub path: &'static str,
    endpoint: Endpoint,
}

/// Every route the server serves; the router is built from this table and nothing else.
pub const ROUTES: &[Route] = &[
    Route {
        method: RouteMethod::Get,
        path: "/vm",
        endpoint: Endpoint::GetVm,
    },
    Route {
        method: RouteMethod::Get,
        path: "/vm/resources",
        endpoint: Endpoint::GetResources,
    },
    Route {
        method: RouteMethod::Put,
        path: "/vm/pause",
        endpoint: Endpoint::Pause,
    },
    Route {
        method: RouteMethod::Put,
        path: "/vm/resume",
        endpoint: Endpoint::Resume,
    },
    Route {
        method: RouteMethod::Put,
        path: "/snapshot/create",
        endpoint: Endpoint::CreateSnapshot,
    },
    Route {
        method: RouteMethod::Put,
        path: "/migrate",
        endpoint: Endpoint::Migrate,
    },
    Route {
        method: RouteMethod::Get,
        path: "/metrics",
        endpoint: Endpoint::GetMetrics,
    },
    Route {
        method: RouteMethod::Get,
        path: "/replication",
        endpoint: Endpoint::GetReplication,
    },
    Route {
        method: RouteMethod::Put,
        path: "/replication/protect",
        endpoint: Endpoint::Protect,
    },
    Route {
        method: RouteMethod::Put,
        path: "/replication/failover",
        endpoint: Endpoint::Failover,
    },
];

/// How long the server waits for the VM's answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiServerConfig {
    /// For every request but a migration and a protect.
    pub request_timeout: Duration,
    /// For a migration.
    pub migrate_timeout: Duration,
    /// For a protect (pairing with the standby and the initial synchronisation).
    pub protect_timeout: Duration,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            request_timeout: REQUEST_TIMEOUT,
            migrate_timeout: MIGRATE_TIMEOUT,
            protect_timeout: PROTECT_TIMEOUT,
        }
    }
}

impl ApiServerConfig {
    fn timeout(&self, request: &ApiRequest) -> Duration {
        match request {
            ApiRequest::Migrate(_) => self.migrate_timeout,
            ApiRequest::Protect(_) | ApiRequest::Failover(_) => self.protect_timeout,
            _ => self.request_timeout,
        }
    }
}

/// A request queued for the VM, with the way back to the client that made it.
///
/// A call is `Send`: it may be answered on another thread than the one that took it (e.g. a
/// protect, answered by the replicator's thread once the standby is synchronised).
#[derive(Debug)]
pub struct ApiCall {
    /// What the client asks.
    pub request: ApiRequest,
    reply: oneshot::Sender<ApiResult>,
}

impl ApiCall {
    /// Answers the client. Dropping the call unanswered answers 503 "the VM is gone".
    pub fn respond(self, result: ApiResult) {
        if self.reply.send(result).is_err() {
            tracing::debug!(
                "the client of the {} request left before its answer",
                self.request.name()
            );
        }
    }

    /// Whether nobody waits for the answer any more (the client left, or the server gave up
    /// with 504 or stopped).
    pub fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// The event-loop thread's end of the API: an eventfd to watch and the queue of calls.
///
/// The eventfd is written once per queued call. On `EPOLLIN`, read the eventfd first, then
/// take calls with [`try_recv`](Self::try_recv) until it returns `None` ([`drain`](Self::drain)
/// does both): a call queued after the read writes the eventfd again, so none is missed.
#[derive(Debug)]
pub struct ApiReceiver {
    evt: EventFd,
    calls: mpsc::Receiver<ApiCall>,
}

impl ApiReceiver {
    /// The eventfd (non-blocking) that becomes readable when calls are queued.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// The next queued call, if any.
    pub fn try_recv(&self) -> Option<ApiCall> {
        self.calls.try_recv().ok()
    }

    /// Resets the eventfd, then returns every queued call.
    pub fn drain(&self) -> Vec<ApiCall> {
        match self.evt.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("cannot read the API eventfd: {e}"),
        }
        std::iter::from_fn(|| self.try_recv()).collect()
    }
}

impl AsRawFd for ApiReceiver {
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

/// The server's end of the queue.
struct Shared {
    calls: mpsc::Sender<ApiCall>,
    evt: EventFd,
    config: ApiServerConfig,
}

/// The socket file we bound, removed when dropped unless something else replaced it.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<Self> {
        let meta = fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove the API socket {}: {e}", self.path.display());
                }
            }
            _ => tracing::debug!("the API socket {} is no longer ours", self.path.display()),
        }
    }
}

/// The running API server. Dropping it (or [`shutdown`](Self::shutdown)) stops the server
/// thread, drops the connections still open and removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    // Dropped after `Drop::drop` has stopped the thread.
    socket: SocketFile,
}

impl ApiServer {
    /// Serves the API on `socket_path` with the default timeouts.
    pub fn start(socket_path: &Path) -> Result<(ApiServer, ApiReceiver), ApiServerError> {
        Self::start_with(socket_path, ApiServerConfig::default())
    }

    /// Serves the API on `socket_path`, waiting for the VM's answers as `config` says.
    ///
    /// Refuses a path where a live server answers or that is not a socket; removes a stale
    /// socket; makes the new socket mode 0600.
    pub fn start_with(
        socket_path: &Path,
        config: ApiServerConfig,
    ) -> Result<(ApiServer, ApiReceiver), ApiServerError> {
        clear_socket_path(socket_path)?;
        let listener =
            StdUnixListener::bind(socket_path).map_err(|source| ApiServerError::Bind {
                path: socket_path.to_path_buf(),
                source,
            })?;
        let socket = SocketFile::new(socket_path).map_err(|source| ApiServerError::Inspect {
            path: socket_path.to_path_buf(),
            source,
        })?;
        fs::set_permissions(socket_path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            ApiServerError::Chmod {
                path: socket_path.to_path_buf(),
                source,
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(ApiServerError::Nonblocking)?;

        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(ApiServerError::EventFd)?;
        let (calls_tx, calls_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            calls: calls_tx,
            evt: evt.try_clone().map_err(ApiServerError::EventFd)?,
            config,
        });

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .thread_name("vmr-api-blocking")
            .build()
            .map_err(ApiServerError::Runtime)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::from_std(listener).map_err(ApiServerError::Listener)?
        };
        let router = router(shared);
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("vmr-api".to_string())
            .spawn(move || serve(runtime, listener, router, stop_rx))
            .map_err(ApiServerError::SpawnThread)?;
        tracing::info!("API server listening on {}", socket_path.display());

        Ok((
            ApiServer {
                stop: Some(stop_tx),
                thread: Some(thread),
                socket,
            },
            ApiReceiver {
                evt,
                calls: calls_rx,
            },
        ))
    }

    /// The path of the socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// Stops the server and removes its socket.
    pub fn shutdown(self) {
        // `Drop` does the work.
    }

    fn stop_thread(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may already be gone; then there is nothing to stop.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the API server thread panicked");
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_thread();
        tracing::debug!("API server on {} stopped", self.socket.path.display());
    }
}

/// Makes way for a new socket at `path`: nothing there, or a stale socket (removed).
fn clear_socket_path(path: &Path) -> Result<(), ApiServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ApiServerError::NotASocket(path.to_path_buf()));
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::AlreadyServing(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing the stale API socket {}", path.display());
            fs::remove_file(path).map_err(|source| ApiServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(ApiServerError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The server thread: serves until told to stop, then drops every connection at once.
fn serve(
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::UnixListener,
    router: Router,
    stop: oneshot::Receiver<()>,
) {
    runtime.block_on(async move {
        tokio::select! {
            result = axum::serve(listener, router).into_future() => {
                if let Err(e) = result {
                    tracing::error!("the API server stopped: {e}");
                }
            }
            _ = stop => {}
        }
    });
    // Connections still open and a destination lookup still running are abandoned here.
    runtime.shutdown_background();
}

/// The router, built from [`ROUTES`].
fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new();
    for route in ROUTES {
        router = router.route(
            route.path,
            on(
                route.method.filter(),
                move |State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>| {
                    handle(shared, route, body)
                },
            ),
        );
    }
    router
        .fallback(not_found)
        // After the routes: it applies to those already added.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// An error answer: `{"error": message}` with `status`.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let status =
            StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, e.message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!("API answer {}: {}", self.status, self.message);
        } else {
            tracing::debug!("API answer {}: {}", self.status, self.message);
        }
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

async fn not_found(method: Method, uri: Uri) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        format!("no such API path: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Failure {
    let path = uri.path();
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|route| route.path == path)
        .map(|route| route.method.as_str())
        .collect();
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} is not allowed on {path} (use {})",
            allowed.join(" or ")
        ),
    )
}

/// Serves one route: checks the request, queues it for the VM and turns the answer into HTTP.
async fn handle(
    shared: Arc<Shared>,
    route: &'static Route,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return Failure::new(
                rejection.status(),
                format!(
                    "cannot read the body of {} {}: {}",
                    route.method.as_str(),
                    route.path,
                    rejection.body_text()
                ),
            )
            .into_response()
        }
    };
    let request = match parse_request(route, &body).await {
        Ok(request) => request,
        Err(failure) => return failure.into_response(),
    };
    match call_vm(&shared, request).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    }
}

/// The request for the VM that `route` and `body` make, once checked.
async fn parse_request(route: &Route, body: &[u8]) -> Result<ApiRequest, Failure> {
    Ok(match route.endpoint {
        Endpoint::GetVm => ApiRequest::GetVm,
        Endpoint::GetResources => ApiRequest::GetResources,
        Endpoint::Pause => ApiRequest::Pause,
        Endpoint::Resume => ApiRequest::Resume,
        Endpoint::GetMetrics => ApiRequest::GetMetrics,
        Endpoint::GetReplication => ApiRequest::GetReplication,
        Endpoint::CreateSnapshot => {
            let params: SnapshotParams = parse_json(route, body, "SnapshotParams")?;
            check_snapshot(&params)?;
            ApiRequest::CreateSnapshot(params)
        }
        Endpoint::Migrate => {
            let params: MigrateParams = parse_json(route, body, "MigrateParams")?;
            check_migrate(&params).await?;
            ApiRequest::Migrate(params)
        }
        Endpoint::Protect => {
            let params: ProtectParams = parse_json(route, body, "ProtectParams")?;
            check_host_port("standby", &params.standby).await?;
            ApiRequest::Protect(params)
        }
        Endpoint::Failover => ApiRequest::Failover(parse_json(route, body, "FailoverParams")?),
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(
    route: &Route,
    body: &[u8],
    schema: &str,
) -> Result<T, Failure> {
    let what = format!("{} {}", route.method.as_str(), route.path);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Failure::bad_request(format!(
            "{what} needs a JSON body ({schema})"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| Failure::bad_request(format!("invalid {schema} body for {what}: {e}")))
}

fn check_snapshot(params: &SnapshotParams) -> Result<(), Failure> {
    let path = &params.snapshot_path;
    if !path.is_absolute() {
        return Err(Failure::bad_request(format!(
            "snapshot_path {:?} must be an absolute path",
            path.display().to_string()
        )));
    }
    if path.file_name().is_none() {
        return Err(Failure::bad_request(format!(
            "snapshot_path {:?} names no file",
            path.display().to_string()
        )));
    }
    Ok(())
}

async fn check_migrate(params: &MigrateParams) -> Result<(), Failure> {
    if params.max_downtime_ms == Some(0) {
        return Err(Failure::bad_request("max_downtime_ms must be at least 1"));
    }
    check_host_port("destination", &params.destination).await
}

/// Checks that `value`, the body's field `field`, is a `host:port` that resolves.
async fn check_host_port(field: &str, value: &str) -> Result<(), Failure> {
    let bad = |why: String| {
        Failure::bad_request(format!("{field} {value:?} is not a valid host:port: {why}"))
    };
    // `lookup_host` resolves with `ToSocketAddrs` on a blocking thread, so a slow resolver
    // does not stall the other requests.
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(value)).await {
        Err(_) => Err(bad(format!(
            "no answer from the resolver in {} s",
            RESOLVE_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Ok(Ok(mut addrs)) => match addrs.next() {
            Some(_) => Ok(()),
            None => Err(bad("it resolves to no address".to_string())),
        },
    }
}

/// Queues `request` for the VM and waits for its answer.
async fn call_vm(shared: &Shared, request: ApiRequest) -> Result<Response, Failure> {
    let name = request.name();
    let timeout = shared.config.timeout(&request);
    let (reply_tx, reply_rx) = oneshot::channel();
    let call = ApiCall {
        request: request.clone(),
        reply: reply_tx,
    };
    tracing::debug!("API request {name} queued for the VM");
    if shared.calls.send(call).is_err() {
        return Err(Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the VM is gone (its event loop no longer takes requests)",
        ));
    }
    if let Err(e) = shared.evt.write(1) {
        tracing::error!("cannot signal the API eventfd: {e}");
    }
    let reply = match tokio::time::timeout(timeout, reply_rx).await {
        Err(_) => {
            return Err(Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the VM did not answer the {name} request within {} ms",
                    timeout.as_millis()
                ),
            ))
        }
        Ok(Err(_)) => {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the VM is gone (it dropped the {name} request unanswered)"),
            ))
        }
        Ok(Ok(result)) => result?,
    };
    if !request.accepts(&reply) {
        return Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the VM answered the {name} request with a reply of another kind"),
        ));
    }
    Ok(match reply {
        ApiReply::Vm(info) => Json(info).into_response(),
        ApiReply::Resources(graph) => Json(graph).into_response(),
        ApiReply::Done => StatusCode::NO_CONTENT.into_response(),
        ApiReply::Snapshot(info) => Json(info).into_response(),
        ApiReply::Migrated(info) => Json(info).into_response(),
        ApiReply::Metrics(metrics) => (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            render_prometheus(&metrics),
        )
            .into_response(),
        ApiReply::Replication(status) => Json(*status).into_response(),
    })
}
