//! The coordinator on etcd (the `etcd` feature, on by default: the fuzz targets build the
//! replicator without it).

use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
};

use super::*;

/// The coordinator on etcd (v3 API), for synchronous callers.
///
/// It owns a current-thread tokio runtime and one etcd client (which balances over the
/// endpoints); each call runs on that runtime under the timeout given to
/// [`connect`](Self::connect). Calls from several threads are serialised (one at a time per
/// `EtcdCoordinator`); give each contender its own. Do not call it from inside an async
/// runtime: that is refused with [`CoordinatorError::InsideAsync`].
///
/// See the [module documentation](self) for the fencing semantics.
pub struct EtcdCoordinator {
    inner: Mutex<Inner>,
    endpoints: Endpoints,
    timeout: Duration,
}

struct Inner {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime inside an async context panics; shutting it down in the
        // background never does.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("endpoints", &self.endpoints.to_string())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EtcdCoordinator {
    /// Sets up a client of `endpoints`; every later call is bounded by `timeout` (e.g.
    /// [`DEFAULT_TIMEOUT`]). Connections are made lazily: an unreachable coordinator shows at
    /// the first call, as [`CoordinatorError::Unreachable`].
    pub fn connect(endpoints: &Endpoints, timeout: Duration) -> Result<Self, CoordinatorError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(CoordinatorError::InsideAsync);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(CoordinatorError::Runtime)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let urls = endpoints.urls();
        let shown = endpoints.to_string();
        let connected = runtime.block_on(async {
            tokio::time::timeout(timeout, Client::connect(urls, Some(options))).await
        });
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(CoordinatorError::Connect {
                    endpoints: shown,
                    reason: one_line(e),
                })
            }
            Err(_) => {
                return Err(CoordinatorError::Unreachable {
                    endpoints: shown,
                    op: "connect".into(),
                    timeout,
                    detail: None,
                })
            }
        };
        tracing::debug!(coordinator = %endpoints, ?timeout, "coordinator client set up");
        Ok(EtcdCoordinator {
            inner: Mutex::new(Inner {
                runtime: Some(runtime),
                client,
            }),
            endpoints: endpoints.clone(),
            timeout,
        })
    }

    /// The endpoints this coordinator talks to.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `f` on the runtime under the timeout. `op` names the call in errors.
    ///
    /// A transient failure (no connection to an endpoint, etcd unavailable) is tried again
    /// with a short backoff until the timeout: the balancer then reaches another endpoint, or
    /// the same one once it is back. `f` is given the attempt number (0 first).
    fn run<T, F, Fut>(&self, op: impl FnOnce() -> String, f: F) -> Result<T, CoordinatorError>
    where
        F: Fn(Client, u32) -> Fut,
        Fut: Future<Output = Result<T, CoordinatorError>>,
    {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(CoordinatorError::InsideAsync);
        }
        // A poisoned lock only means another caller panicked mid-call; the client holds no
        // state of ours that could be half-updated, so go on with it.
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let client = inner.client.clone();
        let timeout = self.timeout;
        let Some(runtime) = inner.runtime.as_ref() else {
            return Err(CoordinatorError::InsideAsync);
        };
        let mut last_transient: Option<String> = None;
        let attempts = async {
            let mut backoff = Duration::from_millis(2);
            let mut attempt = 0u32;
            loop {
                match f(client.clone(), attempt).await {
                    Err(CoordinatorError::Unreachable { detail, .. }) => {
                        tracing::debug!(
                            attempt,
                            ?detail,
                            "coordinator: transient failure, trying again"
                        );
                        last_transient = detail;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(50));
                        attempt = attempt.saturating_add(1);
                    }
                    other => return other,
                }
            }
        };
        match runtime.block_on(async { tokio::time::timeout(timeout, attempts).await }) {
            Ok(result) => result,
            Err(_) => {
                let err = CoordinatorError::Unreachable {
                    endpoints: self.endpoints.to_string(),
                    op: op(),
                    timeout,
                    detail: last_transient,
                };
                tracing::warn!("{err}");
                Err(err)
            }
        }
    }

    /// Maps an etcd-client error: transport failures and "unavailable" are an unreachable
    /// coordinator; anything else is `other`.
    fn classify(
        &self,
        op: &str,
        e: etcd_client::Error,
        other: impl FnOnce(String, String) -> CoordinatorError,
    ) -> CoordinatorError {
        let unreachable = match &e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            _ => false,
        };
        let reason = match &e {
            etcd_client::Error::GRpcStatus(s) => {
                one_line(format_args!("{:?}: {}", s.code(), s.message()))
            }
            e => one_line(e),
        };
        if unreachable {
            CoordinatorError::Unreachable {
                endpoints: self.endpoints.to_string(),
                op: op.to_owned(),
                timeout: self.timeout,
                detail: Some(reason),
            }
        } else {
            other(self.endpoints.to_string(), reason)
        }
    }

    async fn get(
        &self,
        mut client: Client,
        key: &str,
    ) -> Result<Option<(Ownership, Revision)>, CoordinatorError> {
        let resp = client.get(key, None).await.map_err(|e| {
            self.classify(&format!("get {key}"), e, |endpoints, reason| {
                CoordinatorError::Get {
                    endpoints,
                    key: key.to_owned(),
                    reason,
                }
            })
        })?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(key, kv.value())?, kv.mod_revision()))),
        }
    }

    /// One transaction: if `when`, put `new`; else read the key. Returns `Ok(None)` when the put
    /// happened, else the key's current value and revision (`None` if it does not exist).
    async fn swap(
        &self,
        client: &mut Client,
        key: &str,
        when: Compare,
        new: &Ownership,
    ) -> Result<Option<Option<(Vec<u8>, Revision)>>, CoordinatorError> {
        let txn = Txn::new()
            .when([when])
            .and_then([TxnOp::put(key, encode(new), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await.map_err(|e| {
            self.classify(&format!("claim {key}"), e, |endpoints, reason| {
                CoordinatorError::Txn {
                    endpoints,
                    key: key.to_owned(),
                    reason,
                }
            })
        })?;
        if resp.succeeded() {
            return Ok(None);
        }
        let read = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let read = read.ok_or_else(|| CoordinatorError::NoReadInTxn {
            key: key.to_owned(),
        })?;
        Ok(Some(
            read.kvs()
                .first()
                .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        ))
    }

    /// A claim; `attempt` > 0 when an earlier attempt failed in transit.
    async fn claim_async(
        &self,
        client: Client,
        key: &str,
        expected: Option<&Ownership>,
        me: &str,
        attempt: u32,
    ) -> Result<Claim, CoordinatorError> {
        let new = Ownership {
            owner: me.to_owned(),
            term: next_term(key, expected)?,
        };
        match self.try_claim(client, key, expected, &new).await? {
            // An earlier attempt may have been applied with its answer lost: finding our own
            // new ownership in place means that attempt won (owners are unique per claimer:
            // one claimer per host and VM).
            Claim::Lost(current) if attempt > 0 && current == new => {
                tracing::debug!(key, "claim: an earlier attempt had won");
                Ok(Claim::Won(new))
            }
            claim => Ok(claim),
        }
    }

    /// One attempt at a claim of `new` from `expected`.
    async fn try_claim(
        &self,
        mut client: Client,
        key: &str,
        expected: Option<&Ownership>,
        new: &Ownership,
    ) -> Result<Claim, CoordinatorError> {
        let when = match expected {
            // The key must not exist.
            None => Compare::create_revision(key, CompareOp::Equal, 0),
            // The value must be the one read: terms only grow, so an equal value is the same
            // ownership (no ABA).
            Some(e) => Compare::value(key, CompareOp::Equal, encode(e)),
        };
        let (value, revision) = match self.swap(&mut client, key, when, new).await? {
            None => return Ok(Claim::Won(new.clone())),
            Some(Some(current)) => current,
            Some(None) => {
                return match expected {
                    Some(e) => Err(CoordinatorError::Vanished {
                        key: key.to_owned(),
                        expected: e.clone(),
                    }),
                    // The key vanished between the compare and the read: cannot happen in one
                    // transaction; say so rather than guess.
                    None => Err(CoordinatorError::NoReadInTxn {
                        key: key.to_owned(),
                    }),
                };
            }
        };
        let current = decode(key, &value)?;
        if expected != Some(&current) {
            return Ok(Claim::Lost(current));
        }
        // The same ownership written with other bytes (by hand, e.g. with spaces): compare on
        // the revision just read instead, once.
        let when = Compare::mod_revision(key, CompareOp::Equal, revision);
        match self.swap(&mut client, key, when, new).await? {
            None => Ok(Claim::Won(new.clone())),
            Some(Some((value, _))) => Ok(Claim::Lost(decode(key, &value)?)),
            Some(None) => Err(CoordinatorError::Vanished {
                key: key.to_owned(),
                expected: current,
            }),
        }
    }
}

impl EtcdCoordinator {
    async fn put(
        &self,
        mut client: Client,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), CoordinatorError> {
        client.put(key, value, None).await.map(drop).map_err(|e| {
            self.classify(&format!("put {key}"), e, |endpoints, reason| {
                CoordinatorError::Put {
                    endpoints,
                    key: key.to_owned(),
                    reason,
                }
            })
        })
    }

    async fn range(
        &self,
        mut client: Client,
        prefix: &str,
    ) -> Result<Vec<Member>, CoordinatorError> {
        let resp = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| {
                self.classify(&format!("get {prefix}*"), e, |endpoints, reason| {
                    CoordinatorError::Get {
                        endpoints,
                        key: prefix.to_owned(),
                        reason,
                    }
                })
            })?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| decode_member(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect())
    }
}

impl Coordinator for EtcdCoordinator {
    fn register(&self, vm: &str, member: &Member) -> Result<(), CoordinatorError> {
        check_vm(vm)?;
        check_host(&member.host)?;
        let key = member_key(vm, &member.host);
        let value = serde_json::to_vec(member).unwrap_or_default();
        self.run(
            || format!("put {key}"),
            |client, _| self.put(client, &key, value.clone()),
        )
    }

    fn members(&self, vm: &str) -> Result<Vec<Member>, CoordinatorError> {
        check_vm(vm)?;
        let prefix = members_prefix(vm);
        self.run(
            || format!("get {prefix}*"),
            |client, _| self.range(client, &prefix),
        )
    }

    fn current(&self, vm: &str) -> Result<Option<(Ownership, Revision)>, CoordinatorError> {
        let key = check_vm(vm)?;
        self.run(|| format!("get {key}"), |client, _| self.get(client, &key))
    }

    fn claim(
        &self,
        vm: &str,
        expected: Option<&Ownership>,
        me: &str,
    ) -> Result<Claim, CoordinatorError> {
        let key = check_vm(vm)?;
        let claim = self.run(
            || format!("claim {key}"),
            |client, attempt| self.claim_async(client, &key, expected, me, attempt),
        )?;
        match &claim {
            Claim::Won(o) => tracing::info!(vm, ownership = %o, "claim won"),
            Claim::Lost(o) => tracing::info!(vm, current = %o, "claim lost"),
        }
        Ok(claim)
    }
}

/// A registered member's value, decoded; a malformed one is left out (logged).
fn decode_member(key: &str, value: &[u8]) -> Option<Member> {
    match serde_json::from_slice(value) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(key, "not a standby's registration, left out: {e}");
            None
        }
    }
}
