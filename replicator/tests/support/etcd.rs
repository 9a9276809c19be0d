//! An etcd of a test's own (Debian's `etcd-server`, installed by images/setup-host): started on
//! free loopback ports with a temporary data directory, killed on drop. Without etcd the test
//! fails, saying what to install. Shared by the tests that need a real coordinator
//! (`#[path = "support/etcd.rs"] mod etcd;`).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replicator::coordinator::{Coordinator, Endpoints, EtcdCoordinator};

/// The etcd binary: `$VMR_ETCD`, else Debian's `/usr/bin/etcd`, else `etcd` on `PATH`.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VMR_ETCD") {
        return p.into();
    }
    let debian = PathBuf::from("/usr/bin/etcd");
    if debian.exists() {
        return debian;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "etcd is not installed (no /usr/bin/etcd, none on PATH, VMR_ETCD unset): run \
         images/setup-host, which installs Debian's etcd-server"
    );
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    l.local_addr().expect("local address").port()
}

/// An etcd of this test's own, killed on drop.
pub struct Etcd {
    child: Child,
    /// Its client endpoints.
    pub endpoints: Endpoints,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Etcd {
    /// Starts it and waits until it answers.
    pub fn start() -> Etcd {
        let bin = etcd_binary();
        let mut last_log = String::new();
        // Free ports can be taken between the probe and etcd's bind: try a few times.
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("temporary directory");
            let (client, peer) = (free_port(), free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = dir.path().join("etcd.log");
            let log_file = std::fs::File::create(&log).expect("etcd log file");
            let child = Command::new(&bin)
                .arg("--name=test")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=test={peer_url}"))
                .arg("--initial-cluster-state=new")
                .arg("--logger=zap")
                .arg("--log-outputs=stderr")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log file"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {} ({e}): run images/setup-host",
                        bin.display()
                    )
                });
            let endpoints = Endpoints::parse(&format!("etcd://127.0.0.1:{client}")).unwrap();
            let mut etcd = Etcd {
                child,
                endpoints,
                _dir: dir,
                log,
            };
            if etcd.wait_ready(Duration::from_secs(20)) {
                return etcd;
            }
            last_log = std::fs::read_to_string(&etcd.log).unwrap_or_default();
        }
        let tail: Vec<&str> = last_log.lines().rev().take(15).collect();
        panic!(
            "etcd did not answer within 20 s (3 attempts); last lines of its log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// Polls until etcd answers a read; false if it exited or never answered.
    fn wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let probe = EtcdCoordinator::connect(&self.endpoints, Duration::from_millis(500))
            .expect("client for the probe");
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if probe.current("probe").is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A client of it (2 s timeout).
    pub fn coordinator(&self) -> EtcdCoordinator {
        EtcdCoordinator::connect(&self.endpoints, Duration::from_secs(2)).expect("coordinator")
    }

    /// Writes `value` under `key` directly (what an operator's etcdctl would do).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("http://{}", self.endpoints.hosts()[0]);
        rt.block_on(async {
            let mut client = etcd_client::Client::connect([url], None).await.unwrap();
            client.put(key, value, None).await.unwrap();
        });
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
