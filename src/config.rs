//! The `vmr run` configuration file: the VM's own table (`vmm::config::VmConfig`, which
//! snapshots and migrations carry, so it holds only what the machine is) and the host's
//! `[replication]` table (where the VM is protected), parsed here.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmm::config::{ConfigError, VmConfig};

/// The `[replication]` table: standbys to protect the VM with, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The standbys (`vmr standby`), `HOST:PORT` each.
    #[serde(default)]
    pub standbys: Vec<String>,
    /// The replication key the standbys hold.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Longest epoch, in ms.
    #[serde(default)]
    pub epoch_ms: Option<u64>,
    /// Most of the time the epoch engine spends taking and sending epochs, in percent.
    #[serde(default)]
    pub epoch_duty_pct: Option<u64>,
    /// A standby silent this long (ms) is dropped.
    #[serde(default)]
    pub standby_timeout_ms: Option<u64>,
    /// The coordinator, `etcd://HOST:PORT[,HOST:PORT...]`.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// The VM's name in the coordinator and to its standbys.
    #[serde(default)]
    pub vm_id: Option<String>,
    /// This host's name as the VM's owner in the coordinator.
    #[serde(default)]
    pub host_id: Option<String>,
}

/// The name of the host's table in the config file.
const REPLICATION: &str = "replication";

/// Reads a `vmr run` config file: the VM's configuration and the `[replication]` table.
/// Errors are one line, naming the file, as [`VmConfig::from_file`]'s.
pub fn from_file(path: &Path) -> Result<(VmConfig, ReplicationConfig), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::ParseFile {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses a config file's text; the parser's one-line message otherwise.
pub fn parse(text: &str) -> Result<(VmConfig, ReplicationConfig), String> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| one_line(e.message()))?;
    let replication = match table.remove(REPLICATION) {
        None => ReplicationConfig::default(),
        Some(toml::Value::Table(_)) => {
            /// The file seen for its `[replication]` table only, so that an error points at
            /// its line.
            #[derive(Deserialize)]
            struct Replication {
                replication: ReplicationConfig,
            }
            toml::from_str::<Replication>(text)
                .map_err(|e| {
                    let line = e
                        .span()
                        .map(|s| format!(" line {}", text[..s.start].matches('\n').count() + 1))
                        .unwrap_or_default();
                    format!("[{REPLICATION}]{line}: {}", one_line(e.message()))
                })?
                .replication
        }
        Some(_) => return Err(format!("`{REPLICATION}` must be a table ([{REPLICATION}])")),
    };
    let vm = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| one_line(e.message()))?;
    Ok((vm, replication))
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_table_is_parsed_beside_the_vms() {
        let (vm, r) = parse(
            r#"
            kernel = "/k"
            mem = 128
            [[net]]
            tap = "tap0"
            [replication]
            standbys = ["10.0.0.2:7070", "10.0.0.3:7070"]
            key_file = "/etc/vmr/key"
            epoch_ms = 20
            epoch_duty_pct = 50
            standby_timeout_ms = 1500
            "#,
        )
        .unwrap();
        assert_eq!(vm.mem_mib, 128);
        assert_eq!(vm.net[0].tap, "tap0");
        assert_eq!(r.standbys, ["10.0.0.2:7070", "10.0.0.3:7070"]);
        assert_eq!(r.key_file.as_deref(), Some(Path::new("/etc/vmr/key")));
        assert_eq!((r.epoch_ms, r.standby_timeout_ms), (Some(20), Some(1500)));
        assert_eq!(r.epoch_duty_pct, Some(50));
        // The VM's configuration is what it was without the table.
        let (plain, none) = parse("kernel = \"/k\"\nmem = 128\n[[net]]\ntap = \"tap0\"\n").unwrap();
        assert_eq!(plain, vm);
        assert_eq!(none, ReplicationConfig::default());
    }

    #[test]
    fn unknown_or_malformed_keys_are_refused_in_one_line() {
        for (text, needle) in [
            (
                "kernel = \"/k\"\n[replication]\nstandby = [\"a:1\"]\n",
                "standby",
            ),
            (
                "kernel = \"/k\"\n[replication]\nepoch_ms = \"ten\"\n",
                "line 3",
            ),
            ("kernel = \"/k\"\nreplication = 3\n", "must be a table"),
            ("kernel = \"/k\"\nbogus = 1\n", "bogus"),
            ("kernel = \"/k\"\n[replication\n", ""),
        ] {
            let err = parse(text).unwrap_err();
            assert!(!err.contains('\n'), "{err:?}");
            assert!(err.contains(needle), "{err:?} does not name {needle}");
        }
        let err = parse("kernel = \"/k\"\n[replication]\nstandby = [\"a:1\"]\n").unwrap_err();
        assert!(err.starts_with("[replication] line 3: "), "{err}");
    }
}
