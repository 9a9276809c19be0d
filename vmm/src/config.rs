//! The VM's configuration, from the command line or a TOML file, and its validation.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use virtio_net_tap::MacAddr;

use crate::arch::mptable::MAX_VCPUS;

/// Smallest guest RAM we accept.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest RAM we accept.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Default guest RAM.
pub const DEFAULT_MEM_MIB: u64 = 256;

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for a VM.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// No kernel given.
    #[error("no kernel given (--kernel or `kernel = ...` in the config file)")]
    NoKernel,
    /// Too few or too many vCPUs.
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u8),
    /// Too little or too much memory.
    #[error("--mem {0} MiB: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    Memory(u64),
    /// A malformed `--net` value.
    #[error("--net {0:?}: expected tap=NAME[,mac=MAC]")]
    Net(String),
    /// A malformed MAC address.
    #[error("invalid MAC address {0:?}: expected six hex bytes like 06:00:ac:10:00:02")]
    Mac(String),
    /// A TAP name the kernel would reject.
    #[error("invalid TAP name {0:?}: 1 to 15 characters, no '/' or whitespace")]
    TapName(String),
    /// A malformed `--disk` value.
    #[error("--disk {0:?}: expected PATH[,ro]")]
    Disk(String),
    /// A malformed `--serial` value.
    #[error("--serial {0:?}: expected stdout, file:PATH or none")]
    Serial(String),
}

/// A virtio-net device on a host TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The TAP interface name.
    pub tap: String,
    /// The guest's MAC address (random, locally administered, if absent).
    #[serde(default)]
    pub mac: Option<String>,
}

impl NetConfig {
    /// Checks the TAP name and parses the MAC.
    pub fn validate(&self) -> Result<Option<MacAddr>, ConfigError> {
        let name = &self.tap;
        if name.is_empty()
            || name.len() > 15
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
        {
            return Err(ConfigError::TapName(name.clone()));
        }
        self.mac
            .as_deref()
            .map(|mac| MacAddr::from_str(mac).map_err(|_| ConfigError::Mac(mac.to_string())))
            .transpose()
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(v.to_string()),
                _ => return Err(ConfigError::Net(s.to_string())),
            }
        }
        let config = NetConfig {
            tap: tap.ok_or_else(|| ConfigError::Net(s.to_string()))?,
            mac,
        };
        config.validate()?;
        Ok(config)
    }
}

/// A virtio-blk device over a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `PATH[,ro]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some(_) => return Err(ConfigError::Disk(s.to_string())),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(ConfigError::Disk(s.to_string()));
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SerialConfig {
    /// The monitor's stdout.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere.
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "none" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

impl std::fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialConfig::Stdout => f.write_str("stdout"),
            SerialConfig::File(path) => write!(f, "file:{}", path.display()),
            SerialConfig::None => f.write_str("none"),
        }
    }
}

impl Serialize for SerialConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything needed to build a microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Root filesystem image: attached as the first disk, `root=/dev/vda`.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, after the monitor's own.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_mem", rename = "mem")]
    pub mem_mib: u64,
    /// Network devices.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Block devices (after the rootfs, if any).
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// The serial console.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Go ahead on a PVM host (for PVM-enabled guest kernels).
    #[serde(default)]
    pub allow_pvm: bool,
}

fn default_vcpus() -> u8 {
    1
}

fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            rootfs: None,
            cmdline: None,
            vcpus: default_vcpus(),
            mem_mib: default_mem(),
            net: Vec::new(),
            disks: Vec::new(),
            serial: SerialConfig::default(),
            allow_pvm: false,
        }
    }

    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
    }

    /// Checks ranges and formats (files are checked when they are opened).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        for net in &self.net {
            net.validate()?;
        }
        Ok(())
    }

    /// All disks in attachment order: the rootfs first, then `disks`.
    pub fn all_disks(&self) -> Vec<DiskConfig> {
        self.rootfs
            .iter()
            .map(|path| DiskConfig {
                path: path.clone(),
                read_only: false,
            })
            .chain(self.disks.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_values() {
        let net: NetConfig = "tap=tap0,mac=06:00:AC:10:00:02".parse().unwrap();
        assert_eq!(net.tap, "tap0");
        assert_eq!(
            net.validate().unwrap(),
            Some(MacAddr([6, 0, 0xac, 0x10, 0, 2]))
        );
        assert!("tap0".parse::<NetConfig>().is_err());
        assert!("tap=a-name-that-is-too-long".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=06:00".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=zz:00:00:00:00:00".parse::<NetConfig>().is_err());

        let disk: DiskConfig = "/img/a.raw,ro".parse().unwrap();
        assert!(disk.read_only);
        assert_eq!(disk.path, PathBuf::from("/img/a.raw"));
        assert!(!"/img/b.raw".parse::<DiskConfig>().unwrap().read_only);
        assert!("/img/c.raw,xx".parse::<DiskConfig>().is_err());

        assert_eq!(
            "stdout".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdout
        );
        assert_eq!(
            "file:/tmp/c".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/c".into())
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn parses_toml_and_validates() {
        let config: VmConfig = toml::from_str(
            r#"
            kernel = "/k"
            initrd = "/i"
            vcpus = 2
            mem = 512
            serial = "file:/tmp/console"
            [[net]]
            tap = "tap0"
            mac = "06:00:00:00:00:01"
            [[disk]]
            path = "/d.raw"
            read_only = true
            "#,
        )
        .unwrap();
        assert_eq!(config.vcpus, 2);
        assert_eq!(config.mem_mib, 512);
        assert_eq!(config.net[0].tap, "tap0");
        assert!(config.disks[0].read_only);
        config.validate().unwrap();

        let mut small = config.clone();
        small.mem_mib = 8;
        assert!(matches!(small.validate(), Err(ConfigError::Memory(8))));
        let mut many = config;
        many.vcpus = 0;
        assert!(matches!(many.validate(), Err(ConfigError::Vcpus(0))));
        assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\nbogus = 1").is_err());
    }
}
