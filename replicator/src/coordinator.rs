//! The coordinator: who owns a protected VM, decided by etcd, never by a timeout alone.
//!
//! Per protected VM one key, `/vmr/vms/<vm-id>/owner` ([`owner_key`]), holds an [`Ownership`]
//! as JSON: the host that owns the VM and its **term**.
//!
//! # Fencing
//!
//! The term is the fencing token. It only grows, and every change of owner is a
//! compare-and-swap on the key ([`Coordinator::claim`]): from the ownership the claimer read
//! (term `T`) to itself with term `T + 1`. Of any number of hosts claiming from the same read,
//! exactly one wins; the others learn the winner ([`Claim::Lost`]).
//!
//! - A **promotion** (a standby taking over a lost primary) is `claim(T → T + 1)` from the
//!   ownership the standby last knew. It resumes the VM only if it won.
//! - A **primary that loses all its standbys** must win the same claim (its own term `T` to
//!   `T + 1`, owner itself) before it goes on unprotected, i.e. before it releases output that
//!   no standby acknowledged. If it loses, a standby was promoted: it stops.
//! - Standbys refuse epochs of a term older than the newest they know, and a primary that finds
//!   its term gone ([`Coordinator::still_owner`] false) stops releasing output and stops its
//!   vCPUs. Since output is released only on the standbys' acks or after winning a claim, a
//!   partitioned old primary can never release a frame beside a promoted standby.
//!
//! Leases are not used: etcd's are whole seconds, too slow for failover.
//!
//! The epoch engine is threads, not async: [`Coordinator`] is synchronous. [`EtcdCoordinator`]
//! runs its own small current-thread tokio runtime and bounds every call with a timeout, so an
//! unreachable coordinator is a one-line error ([`CoordinatorError::Unreachable`]) within that
//! time, never a hang. [`MemoryCoordinator`] has the same semantics in memory, for tests.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::EtcdCoordinator;

/// How long one call to the coordinator may take by default (connecting included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The scheme of `--coordinator`.
pub const SCHEME: &str = "etcd://";

/// The owner of a protected VM and its term (the fencing token).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ownership {
    /// The owning host's name (as it introduces itself, e.g. its `--name`).
    pub owner: String,
    /// The term: 1 for the first owner, one more at every successful claim.
    pub term: u64,
}

impl fmt::Display for Ownership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (term {})", self.owner, self.term)
    }
}

/// A standby of a VM as it registers itself in the coordinator ([`Coordinator::register`]):
/// where a primary pairs with it, and what it holds (for the election among standbys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its host's name (its owner name if it takes the VM over).
    pub host: String,
    /// Where it listens for a primary (`HOST:PORT`).
    pub addr: String,
    /// The last epoch it committed (0: fresh, a primary may pair with it).
    pub committed_epoch: u64,
    /// The term of that epoch.
    pub term: u64,
}

/// etcd's revision of the key's last modification (its `mod_revision`).
pub type Revision = i64;

/// The outcome of a [`Coordinator::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claim won: this is now the ownership (owner = me, the new term).
    Won(Ownership),
    /// Someone else changed the ownership since it was read: the current one.
    Lost(Ownership),
}

impl Claim {
    /// Whether the claim won.
    pub fn won(&self) -> bool {
        matches!(self, Claim::Won(_))
    }

    /// The ownership in force after the claim, won or lost.
    pub fn ownership(&self) -> &Ownership {
        match self {
            Claim::Won(o) | Claim::Lost(o) => o,
        }
    }
}

/// Who owns which VM. Every answer is linearizable (etcd's default reads, transactions), and
/// no call waits longer than the coordinator's timeout (transient failures are tried again
/// within it). Object safe: a `Box<dyn Coordinator>` holds an [`EtcdCoordinator`] or, in
/// tests, a [`MemoryCoordinator`].
pub trait Coordinator: Send + Sync {
    /// The VM's current ownership and the revision of the key, or `None` if nobody owns it.
    fn current(&self, vm: &str) -> Result<Option<(Ownership, Revision)>, CoordinatorError>;

    /// Compare-and-swap: if the VM's ownership is still `expected` (`None`: the key must not
    /// exist), make `me` the owner with term `expected.term + 1` (1 when creating) and return
    /// [`Claim::Won`]; otherwise change nothing and return [`Claim::Lost`] with the current
    /// ownership. Of several claims from the same `expected`, exactly one wins.
    fn claim(
        &self,
        vm: &str,
        expected: Option<&Ownership>,
        me: &str,
    ) -> Result<Claim, CoordinatorError>;

    /// Whether `mine` is still the VM's current ownership (same owner, same term); `false`
    /// means it was deposed. A primary checks this before going on unprotected, and may poll
    /// it; it is a read, not a fence: only a won [`claim`](Self::claim) (term `T` to `T + 1`)
    /// entitles it to release output that no standby acknowledged.
    fn still_owner(&self, vm: &str, mine: &Ownership) -> Result<bool, CoordinatorError> {
        Ok(self
            .current(vm)?
            .is_some_and(|(current, _)| current == *mine))
    }

    /// Registers (or updates) `member` as a standby of `vm`, under
    /// `/vmr/vms/<vm>/standbys/<host>` ([`member_key`]).
    fn register(&self, vm: &str, member: &Member) -> Result<(), CoordinatorError>;

    /// The standbys registered for `vm`, by host name.
    fn members(&self, vm: &str) -> Result<Vec<Member>, CoordinatorError>;
}

/// The key under which a standby of `vm` registers: `/vmr/vms/<vm>/standbys/<host>`.
pub fn member_key(vm: &str, host: &str) -> String {
    format!("/vmr/vms/{vm}/standbys/{host}")
}

/// The key's prefix of a VM's standbys.
fn members_prefix(vm: &str) -> String {
    format!("/vmr/vms/{vm}/standbys/")
}

/// A host name usable in a key (as [`check_vm`] for VM ids).
fn check_host(host: &str) -> Result<(), CoordinatorError> {
    check_name(host)
}

/// A name usable as one part of a key: not empty, no `/`, no whitespace or control character.
fn check_name(name: &str) -> Result<(), CoordinatorError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(CoordinatorError::BadVmId {
            vm: name.escape_debug().to_string(),
        });
    }
    Ok(())
}

/// The key that holds a VM's [`Ownership`]: `/vmr/vms/<vm-id>/owner`.
pub fn owner_key(vm: &str) -> String {
    format!("/vmr/vms/{vm}/owner")
}

/// Checks a VM id is usable in a key: not empty, no `/`, no whitespace or control character.
fn check_vm(vm: &str) -> Result<String, CoordinatorError> {
    check_name(vm)?;
    Ok(owner_key(vm))
}

/// The term after `expected`: 1 when creating.
fn next_term(key: &str, expected: Option<&Ownership>) -> Result<u64, CoordinatorError> {
    match expected {
        None => Ok(1),
        Some(e) => e
            .term
            .checked_add(1)
            .ok_or_else(|| CoordinatorError::TermExhausted {
                key: key.to_owned(),
            }),
    }
}

/// The JSON stored under the key.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn encode(ownership: &Ownership) -> Vec<u8> {
    // Field order is the struct's: the same ownership always encodes to the same bytes, which
    // is what the value comparison of a claim relies on. A struct of a String and a u64 cannot
    // fail to serialize; the fallback is unreachable but keeps this free of panics.
    serde_json::to_vec(ownership).unwrap_or_default()
}

/// Parses the value stored under `key`.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn decode(key: &str, value: &[u8]) -> Result<Ownership, CoordinatorError> {
    serde_json::from_slice(value).map_err(|source| CoordinatorError::Malformed {
        key: key.to_owned(),
        value: preview(value),
        source,
    })
}

/// The start of a value, printable on one line.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn preview(value: &[u8]) -> String {
    const MAX: usize = 64;
    let text = String::from_utf8_lossy(&value[..value.len().min(MAX)]);
    let mut s = text.escape_debug().to_string();
    if value.len() > MAX {
        s.push('…');
    }
    s
}

/// Why a call to the coordinator failed. One variant per failing call; every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The VM id cannot be part of a key.
    #[error("bad VM id \"{vm}\" for the coordinator (empty, or has '/', whitespace or a control character)")]
    BadVmId {
        /// The id, escaped.
        vm: String,
    },
    /// The coordinator's own runtime could not be built.
    #[error("cannot start the coordinator client's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A synchronous call was made from inside an async runtime (use `spawn_blocking`).
    #[error("the coordinator was called from inside an async runtime (call it from a plain thread or spawn_blocking)")]
    InsideAsync,
    /// The etcd client could not be set up for the endpoints.
    #[error("coordinator {endpoints}: cannot set up the client: {reason}")]
    Connect {
        /// The endpoints, as given.
        endpoints: String,
        /// etcd-client's reason, on one line.
        reason: String,
    },
    /// No answer in time, or no connection: the coordinator is unreachable from here.
    #[error("coordinator {endpoints} unreachable: {op} got no answer within {timeout:?}{}", last_error(.detail))]
    Unreachable {
        /// The endpoints, as given.
        endpoints: String,
        /// What was asked (e.g. `claim /vmr/vms/vm1/owner`).
        op: String,
        /// The timeout of one call.
        timeout: Duration,
        /// The last transient failure seen before the timeout (connection refused…), on one
        /// line.
        detail: Option<String>,
    },
    /// etcd answered the read with an error.
    #[error("coordinator {endpoints}: get {key} failed: {reason}")]
    Get {
        /// The endpoints, as given.
        endpoints: String,
        /// The key read.
        key: String,
        /// etcd's reason, on one line.
        reason: String,
    },
    /// etcd answered the compare-and-swap transaction with an error.
    #[error("coordinator {endpoints}: claim transaction on {key} failed: {reason}")]
    Txn {
        /// The endpoints, as given.
        endpoints: String,
        /// The key claimed.
        key: String,
        /// etcd's reason, on one line.
        reason: String,
    },
    /// The transaction's answer lacks the read of the current value that it asked for.
    #[error("coordinator: claim transaction on {key} answered without the current value")]
    NoReadInTxn {
        /// The key claimed.
        key: String,
    },
    /// The value under the key is not an [`Ownership`].
    #[error("coordinator: the value under {key} is not an ownership ({source}): \"{value}\"")]
    Malformed {
        /// The key.
        key: String,
        /// The start of the value, escaped.
        value: String,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A claim expected an owner, but the key is gone (deleted by hand): nothing to take over
    /// from. Creating it anew (expected `None`) would restart terms at 1: an operator's call.
    #[error("coordinator: claim on {key} expected {expected}, but the key no longer exists")]
    Vanished {
        /// The key.
        key: String,
        /// The ownership the claim expected.
        expected: Ownership,
    },
    /// The term cannot grow any more.
    #[error("coordinator: the term under {key} is at its maximum")]
    TermExhausted {
        /// The key.
        key: String,
    },
    /// etcd refused to write a key.
    #[error("coordinator {endpoints}: put {key} failed: {reason}")]
    Put {
        /// The endpoints, as given.
        endpoints: String,
        /// The key.
        key: String,
        /// etcd's reason, on one line.
        reason: String,
    },
}

/// The tail of [`CoordinatorError::Unreachable`]'s message.
fn last_error(detail: &Option<String>) -> String {
    detail
        .as_ref()
        .map(|d| format!(" (last error: {d})"))
        .unwrap_or_default()
}

/// Makes any error text one line.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
fn one_line(text: impl fmt::Display) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why `--coordinator` could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointsError {
    /// Not `etcd://…`.
    #[error("--coordinator \"{given}\": expected etcd://HOST:PORT[,HOST:PORT...]")]
    Scheme {
        /// What was given, escaped.
        given: String,
    },
    /// `etcd://` with nothing after it, or an empty item between commas.
    #[error(
        "--coordinator \"{given}\": empty endpoint (expected etcd://HOST:PORT[,HOST:PORT...])"
    )]
    Empty {
        /// What was given, escaped.
        given: String,
    },
    /// An item that is not `HOST:PORT`.
    #[error("--coordinator: bad endpoint \"{endpoint}\": {reason}")]
    Endpoint {
        /// The item, escaped.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The etcd endpoints of `--coordinator etcd://HOST:PORT[,HOST:PORT...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints(Vec<String>);

impl Endpoints {
    /// Parses `etcd://HOST:PORT[,HOST:PORT...]`. A host is a name, an IPv4 address or a
    /// bracketed IPv6 address (`[::1]:2379`); the port is 1..=65535.
    pub fn parse(s: &str) -> Result<Self, EndpointsError> {
        let escaped = || s.escape_debug().to_string();
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| EndpointsError::Scheme { given: escaped() })?;
        let mut endpoints = Vec::new();
        for item in rest.split(',') {
            if item.is_empty() {
                return Err(EndpointsError::Empty { given: escaped() });
            }
            check_endpoint(item)?;
            endpoints.push(item.to_owned());
        }
        Ok(Endpoints(endpoints))
    }

    /// The `HOST:PORT` items.
    pub fn hosts(&self) -> &[String] {
        &self.0
    }

    /// The URLs etcd-client connects to (`http://HOST:PORT`).
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    fn urls(&self) -> Vec<String> {
        self.0.iter().map(|e| format!("http://{e}")).collect()
    }
}

fn check_endpoint(item: &str) -> Result<(), EndpointsError> {
    let bad = |reason| EndpointsError::Endpoint {
        endpoint: item.escape_debug().to_string(),
        reason,
    };
    let (host, port) = item
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(bad("the port must be a number in 1..=65535")),
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .ok_or_else(|| bad("unclosed '[' in the host"))?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address between '[' and ']'"))?;
    } else if host.contains(':') {
        return Err(bad(
            "an IPv6 host must be written in brackets, e.g. [::1]:2379",
        ));
    } else if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
    {
        return Err(bad(
            "the host has characters other than letters, digits, '.', '-' and '_'",
        ));
    }
    Ok(())
}

impl FromStr for Endpoints {
    type Err = EndpointsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.0.join(","))
    }
}

/// A coordinator in memory with the same semantics as [`EtcdCoordinator`], for tests of the
/// code that uses one (one process only: it decides nothing between hosts).
#[derive(Debug, Default)]
pub struct MemoryCoordinator {
    keys: Mutex<MemoryKeys>,
}

/// The keys of a [`MemoryCoordinator`] and its last revision.
#[derive(Debug, Default)]
struct MemoryKeys {
    revision: Revision,
    owners: HashMap<String, (Ownership, Revision)>,
    members: std::collections::BTreeMap<String, Member>,
}

impl MemoryCoordinator {
    /// An empty coordinator: nobody owns anything.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Coordinator for MemoryCoordinator {
    fn current(&self, vm: &str) -> Result<Option<(Ownership, Revision)>, CoordinatorError> {
        let key = check_vm(vm)?;
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        Ok(keys.owners.get(&key).cloned())
    }

    fn claim(
        &self,
        vm: &str,
        expected: Option<&Ownership>,
        me: &str,
    ) -> Result<Claim, CoordinatorError> {
        let key = check_vm(vm)?;
        let term = next_term(&key, expected)?;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let MemoryKeys {
            revision, owners, ..
        } = &mut *keys;
        match (owners.get(&key), expected) {
            (None, Some(e)) => {
                return Err(CoordinatorError::Vanished {
                    key,
                    expected: e.clone(),
                })
            }
            (Some((current, _)), e) if e != Some(current) => {
                return Ok(Claim::Lost(current.clone()))
            }
            _ => {}
        }
        *revision += 1;
        let new = Ownership {
            owner: me.to_owned(),
            term,
        };
        owners.insert(key, (new.clone(), *revision));
        Ok(Claim::Won(new))
    }

    fn register(&self, vm: &str, member: &Member) -> Result<(), CoordinatorError> {
        check_vm(vm)?;
        check_host(&member.host)?;
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.members
            .insert(member_key(vm, &member.host), member.clone());
        Ok(())
    }

    fn members(&self, vm: &str) -> Result<Vec<Member>, CoordinatorError> {
        check_vm(vm)?;
        let prefix = members_prefix(vm);
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        Ok(keys
            .members
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, m)| m.clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoints::parse("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(e.hosts(), ["127.0.0.1:2379"]);
        assert_eq!(e.urls(), ["http://127.0.0.1:2379"]);
        let e: Endpoints = "etcd://a.example:1,[::1]:2379,b_c-d:65535".parse().unwrap();
        assert_eq!(e.hosts().len(), 3);
        assert_eq!(e.to_string(), "etcd://a.example:1,[::1]:2379,b_c-d:65535");
    }

    #[test]
    fn endpoints_errors_are_one_line() {
        for bad in [
            "",
            "127.0.0.1:2379",
            "http://127.0.0.1:2379",
            "etcd://",
            "etcd://a:1,",
            "etcd://a:1,,b:2",
            "etcd://a",
            "etcd://:2379",
            "etcd://a:0",
            "etcd://a:65536",
            "etcd://a:x",
            "etcd://::1:2379",
            "etcd://[::1:2379",
            "etcd://[zz]:2379",
            "etcd://a b:1",
            "etcd://a/b:1",
            "etcd://a\n:1",
        ] {
            let err = Endpoints::parse(bad).expect_err(bad).to_string();
            assert!(!err.contains('\n'), "{bad:?}: {err}");
            assert!(err.starts_with("--coordinator"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn vm_ids() {
        assert_eq!(check_vm("vm-1").unwrap(), "/vmr/vms/vm-1/owner");
        for bad in ["", "a/b", "a b", "a\nb"] {
            let err = check_vm(bad).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn encoding_is_stable_and_decoding_refuses_garbage() {
        let o = Ownership {
            owner: "host-a".into(),
            term: 7,
        };
        assert_eq!(encode(&o), br#"{"owner":"host-a","term":7}"#);
        assert_eq!(decode("k", &encode(&o)).unwrap(), o);
        assert_eq!(
            decode("k", br#"{ "term": 7, "owner": "host-a" }"#).unwrap(),
            o
        );
        for bad in [
            &b""[..],
            b"null",
            b"{\"owner\":1}",
            b"\xff\xfe",
            b"{\"owner\":\"a\",\"term\":-1}",
        ] {
            let err = decode("k", bad).unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn memory_coordinator_semantics() {
        let c = MemoryCoordinator::new();
        assert_eq!(c.current("vm").unwrap(), None);
        let first = c.claim("vm", None, "a").unwrap();
        assert_eq!(
            first,
            Claim::Won(Ownership {
                owner: "a".into(),
                term: 1
            })
        );
        // A second creation loses to the first.
        assert_eq!(
            c.claim("vm", None, "b").unwrap(),
            Claim::Lost(first.ownership().clone())
        );
        let second = c.claim("vm", Some(first.ownership()), "b").unwrap();
        assert_eq!(
            second,
            Claim::Won(Ownership {
                owner: "b".into(),
                term: 2
            })
        );
        // A stale claimer learns the current owner.
        assert_eq!(
            c.claim("vm", Some(first.ownership()), "a").unwrap(),
            Claim::Lost(second.ownership().clone())
        );
        assert!(c.still_owner("vm", second.ownership()).unwrap());
        assert!(!c.still_owner("vm", first.ownership()).unwrap());
        assert!(matches!(
            c.claim("other", Some(first.ownership()), "a"),
            Err(CoordinatorError::Vanished { .. })
        ));
        let max = Ownership {
            owner: "a".into(),
            term: u64::MAX,
        };
        assert!(matches!(
            c.claim("vm", Some(&max), "a"),
            Err(CoordinatorError::TermExhausted { .. })
        ));
    }
}
