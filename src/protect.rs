//! The primary's side of `vmr run --protect`: the VM described to its standbys, pairing with
//! each of them before the guest runs, and the epoch engine's options.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use replicator::auth::ReplicationKey;
use replicator::compat::{DeviceDesc, Hello, PROTOCOL};
use replicator::conn::Conn;
use replicator::primary::{pair_standby, EngineError, EngineOptions, NewStandby};
use vmm::config::VmConfig;

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

/// The `Hello` the VM of `config` is introduced to its standbys with. The TSC frequency and
/// the CPU features are not compared yet (0 and none): a standby does not run the VM before
/// failover, and `vmr restore` sets the guest's TSC frequency where it runs.
pub fn hello(config: &VmConfig, vm_id: &str) -> Result<Hello, ProtectError> {
    let disks = config.all_disks();
    Ok(Hello {
        protocol: PROTOCOL,
        vm_id: vm_id.to_string(),
        term: 1,
        mem_bytes: config.mem_mib << 20,
        vcpus: config.vcpus,
        tsc_khz: 0,
        cpu_features: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let h = hello(&config, "vm").unwrap();
        assert_eq!((h.mem_bytes, h.vcpus), (64 << 20, 2));
        assert_eq!(h.devices, devices(1, 1));
        assert_eq!(h.devices[1].to_string(), "block:disk0");
        assert_eq!(h.disk_sizes, [4096]);
        config.disks[0].path = dir.join("missing.raw");
        let err = hello(&config, "vm").unwrap_err().to_string();
        assert!(err.contains("missing.raw") && !err.contains('\n'), "{err}");
        assert!(matches!(
            load_key(None, &["a:1".into()]),
            Err(ProtectError::NoKey)
        ));
        assert!(load_key(None, &[]).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
