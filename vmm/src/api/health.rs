//! Health as the API shows it: what the monitor supervises of the resources the VM needs (the
//! TAPs of its network devices, its disk images, the guest's progress) in `GET /replication`
//! ([`HealthState`]), in `GET /vm/resources` (attributes of the `tap:*`, `file:*` and vCPU
//! nodes) and in `GET /metrics` ([`HealthState::metrics`]). `crate::health` checks them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Metric, MetricKind};

/// How a TAP the VM's network device uses stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TapState {
    /// Administratively up, and running (carrier) where the monitor holds it.
    #[default]
    Up,
    /// Administratively down, or without carrier: frames go nowhere.
    Down,
    /// No interface of that name any more (deleted).
    Gone,
}

/// One TAP and how it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapHealth {
    /// The interface name.
    pub name: String,
    /// Up, down or gone.
    pub state: TapState,
    /// Whether it has been seen up since the monitor opened it: a TAP that goes down after
    /// that has failed; one that never was up was never set up.
    #[serde(default)]
    pub seen_up: bool,
}

/// How a disk image stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// Linked, and no request failed on it.
    #[default]
    Ok,
    /// Requests failed on the image (reads, writes or flushes the host refused).
    Failing,
    /// The image file the monitor holds open was deleted (no link left to it).
    Gone,
}

/// One disk image and how it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHealth {
    /// The image's path.
    pub path: PathBuf,
    /// Ok, failing or gone.
    pub state: DiskState,
    /// Requests the device answered with `VIRTIO_BLK_S_IOERR` because the host's I/O on the
    /// image failed (a guest's malformed requests do not count).
    pub io_errors: u64,
}

/// Whether the guest makes progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    /// Its vCPUs leave the guest (exits: timer ticks, I/O, the host's interrupts) as a running
    /// guest's do.
    #[default]
    Progressing,
    /// Running, but no vCPU left the guest for the stall bound.
    Stalled,
    /// Paused through the API.
    Paused,
    /// Not running (not started yet, or its progress cannot be measured on this host).
    Unknown,
}

/// The guest's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHealth {
    /// Progressing, stalled, paused or unknown.
    pub state: GuestState,
    /// KVM's count of vCPU exits, all vCPUs together: grows while the guest runs.
    pub exits: u64,
    /// Milliseconds since that count last grew.
    pub idle_ms: u64,
    /// The bound past which a running guest without exits is stalled, in milliseconds.
    pub stall_ms: u64,
}

/// What the monitor supervises of the resources the VM needs, as last checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    /// The TAPs of the VM's network devices, in order.
    #[serde(default)]
    pub taps: Vec<TapHealth>,
    /// The VM's disk images, in order.
    #[serde(default)]
    pub disks: Vec<DiskHealth>,
    /// The guest's progress (absent on a standby, where no guest runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestHealth>,
}

impl HealthState {
    /// The resources that failed, each in a few words (`TAP tap0 is down`), in order: a TAP
    /// seen up that is down or gone, a disk failing or gone. Empty when all is well.
    pub fn failures(&self) -> Vec<String> {
        let taps = self
            .taps
            .iter()
            .filter(|t| t.seen_up && t.state != TapState::Up)
            .map(|t| {
                let state = match t.state {
                    TapState::Gone => "gone",
                    _ => "down",
                };
                format!("TAP {} is {state}", t.name)
            });
        let disks = self.disks.iter().filter_map(|d| match d.state {
            DiskState::Ok => None,
            DiskState::Failing => Some(format!(
                "disk {} failed {} request(s)",
                d.path.display(),
                d.io_errors
            )),
            DiskState::Gone => Some(format!("disk {} was deleted", d.path.display())),
        });
        taps.chain(disks).collect()
    }

    /// Whether the guest is running and has made no progress for the stall bound.
    pub fn stalled(&self) -> bool {
        self.guest
            .as_ref()
            .is_some_and(|g| g.state == GuestState::Stalled)
    }

    /// The health as metrics: `vmr_tap_up{tap}`, `vmr_disk_ok{path}`, `vmr_disk_io_errors_total{path}`
    /// and, with a guest, `vmr_guest_progressing` and `vmr_guest_exits_total`.
    pub fn metrics(&self) -> Vec<Metric> {
        let gauge = |name: &str, help: &str, value: bool| {
            Metric::new(name, help, MetricKind::Gauge, f64::from(u8::from(value)))
        };
        let mut m: Vec<Metric> = self
            .taps
            .iter()
            .map(|t| {
                gauge(
                    "vmr_tap_up",
                    "1 while the TAP is up (and running where the monitor holds it).",
                    t.state == TapState::Up,
                )
                .with_label("tap", t.name.as_str())
            })
            .collect();
        for d in &self.disks {
            let path = d.path.display().to_string();
            m.push(
                gauge(
                    "vmr_disk_ok",
                    "1 while the disk image is linked and no request failed on it.",
                    d.state == DiskState::Ok,
                )
                .with_label("path", path.as_str()),
            );
            m.push(
                Metric::new(
                    "vmr_disk_io_errors_total",
                    "Requests answered with an I/O error because the host's I/O on the image failed.",
                    MetricKind::Counter,
                    d.io_errors as f64,
                )
                .with_label("path", path),
            );
        }
        if let Some(g) = &self.guest {
            m.push(gauge(
                "vmr_guest_progressing",
                "1 while the guest runs and its vCPUs make progress (leave the guest).",
                g.state == GuestState::Progressing,
            ));
            m.push(Metric::new(
                "vmr_guest_exits_total",
                "KVM's count of vCPU exits, all vCPUs together.",
                MetricKind::Counter,
                g.exits as f64,
            ));
        }
        m
    }
}
