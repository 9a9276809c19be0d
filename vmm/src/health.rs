//! Health supervision of the resources a VM needs: the TAPs of its network devices (up, down,
//! gone), its disk images (still linked, I/O errors) and the guest's progress (KVM's count of
//! vCPU exits, which grows while a guest runs: its timer ticks, I/O and the host's interrupts
//! all make its vCPUs leave it). The [`Supervisor`] checks them from the monitor's event loop
//! every [`CHECK_EVERY`] (a few ioctls, an fstat per disk and a `pread` per vCPU); its
//! [`Health`] is what the API and the replication read. [`decide`] says what a primary does
//! about a failure.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{
    DiskHealth, DiskState, GuestHealth, GuestState, HealthState, TapHealth, TapState,
};
use crate::microvm::lock;
use crate::vstate::vcpu::ExitCounter;

/// How often the supervisor checks.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How long a running guest may go without a single vCPU exit before it is stalled. A running
/// Linux guest's vCPUs exit at least at every timer tick it programs (an idle tickless one
/// still wakes several times a second for its timers and the clocksource watchdog), and a
/// spinning guest's at the host's own timer interrupts: seconds without one mean the vCPU
/// thread is stuck (e.g. in a device's emulation) or the guest halted for good.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

/// The last health checked, shared between the supervisor and its readers.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<HealthState>>);

impl Health {
    /// The health as last checked.
    pub fn state(&self) -> HealthState {
        lock(&self.0).clone()
    }

    fn set(&self, state: HealthState) {
        *lock(&self.0) = state;
    }
}

/// Reads interface flags by name (`SIOCGIFFLAGS`) through a socket of the monitor's network
/// namespace: the one its TAPs were opened in.
#[derive(Debug)]
pub struct TapProbe {
    sock: Option<OwnedFd>,
}

/// `struct ifreq` as `SIOCGIFFLAGS` uses it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl TapProbe {
    /// A probe with its own socket (without one, every TAP reads down).
    pub fn new() -> Self {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        let sock = if fd < 0 {
            tracing::warn!(
                "health: cannot open a socket to read TAP flags: {}",
                std::io::Error::last_os_error()
            );
            None
        } else {
            // SAFETY: `fd` is a socket just opened and owned by nobody else.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Self { sock }
    }

    /// How the interface `name` stands: gone without such an interface, up when
    /// administratively up and, if the monitor `held` it open, running (carrier), else down.
    pub fn state(&self, name: &str, held: bool) -> TapState {
        let Some(sock) = &self.sock else {
            return TapState::Down;
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return TapState::Gone;
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `sock` is an open socket and `req` a valid `struct ifreq` (40 bytes) that
        // outlives the call; the kernel writes the flags into it and nothing else.
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENODEV) => TapState::Gone,
                _ => {
                    tracing::debug!(tap = name, "health: cannot read the TAP's flags: {err}");
                    TapState::Down
                }
            };
        }
        let flags = i32::from(req.flags);
        let up = flags & libc::IFF_UP != 0;
        let running = flags & libc::IFF_RUNNING != 0;
        if up && (running || !held) {
            TapState::Up
        } else {
            TapState::Down
        }
    }
}

impl Default for TapProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// How the disk image at `path`, held open as `file`, stands: gone once no link to it is left
/// (deleted, or replaced by a rename), failing once `io_errors` requests failed on it.
pub fn disk_health(path: &Path, file: &File, io_errors: u64) -> DiskHealth {
    let state = match file.metadata() {
        Ok(m) if m.nlink() == 0 => DiskState::Gone,
        Ok(_) if io_errors > 0 => DiskState::Failing,
        Ok(_) => DiskState::Ok,
        Err(e) => {
            tracing::debug!(path = %path.display(), "health: cannot stat the disk image: {e}");
            DiskState::Failing
        }
    };
    DiskHealth {
        path: path.to_path_buf(),
        state,
        io_errors,
    }
}

/// The guest's progress from one reading of its exit count to the next.
#[derive(Debug)]
pub struct GuestProgress {
    exits: Option<u64>,
    since: Instant,
    stall_after: Duration,
}

impl GuestProgress {
    /// A guest not seen yet, stalled after `stall_after` without progress.
    pub fn new(stall_after: Duration, now: Instant) -> Self {
        Self {
            exits: None,
            since: now,
            stall_after,
        }
    }

    /// Takes a reading at `now`: the vCPUs' exit count (`None` if it cannot be read) and
    /// whether the guest is `running` (`Some(false)`: paused; `None`: not started).
    pub fn observe(
        &mut self,
        exits: Option<u64>,
        running: Option<bool>,
        now: Instant,
    ) -> GuestHealth {
        let grew = match (self.exits, exits) {
            (Some(before), Some(after)) => after != before,
            _ => true,
        };
        // Paused or not started, a guest makes no progress and is not expected to: its idle
        // time counts from when it runs again.
        if grew || running != Some(true) {
            self.since = now;
        }
        if exits.is_some() {
            self.exits = exits;
        }
        let idle = now.saturating_duration_since(self.since);
        let state = match (running, exits) {
            (None, _) | (_, None) => GuestState::Unknown,
            (Some(false), _) => GuestState::Paused,
            (Some(true), _) if idle >= self.stall_after => GuestState::Stalled,
            (Some(true), _) => GuestState::Progressing,
        };
        GuestHealth {
            state,
            exits: self.exits.unwrap_or(0),
            idle_ms: idle.as_millis() as u64,
            stall_ms: self.stall_after.as_millis() as u64,
        }
    }
}

/// Checks a running VM's resources every [`CHECK_EVERY`], on the monitor's thread.
#[derive(Debug)]
pub struct Supervisor {
    taps: TapProbe,
    seen_up: Vec<bool>,
    exits: Vec<ExitCounter>,
    guest: GuestProgress,
    last: Option<Instant>,
    health: Health,
}

impl Supervisor {
    /// A supervisor reading the guest's progress from `exits` (one counter per vCPU; none
    /// where KVM has no statistics: the progress is then unknown).
    pub fn new(exits: Vec<ExitCounter>) -> Self {
        Self {
            taps: TapProbe::new(),
            seen_up: Vec::new(),
            exits,
            guest: GuestProgress::new(STALL_AFTER, Instant::now()),
            last: None,
            health: Health::default(),
        }
    }

    /// The health it keeps up to date.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Whether a check is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|t| now.duration_since(t) >= CHECK_EVERY)
    }

    /// Checks now: the TAPs named `taps` (held open by the VM's devices), the `disks` as their
    /// devices report them, and the guest's progress while it is `running` (see
    /// [`GuestProgress::observe`]). Logs what changed.
    pub fn check(
        &mut self,
        now: Instant,
        taps: &[&str],
        disks: Vec<DiskHealth>,
        running: Option<bool>,
    ) {
        self.last = Some(now);
        self.seen_up.resize(taps.len(), false);
        let taps: Vec<TapHealth> = taps
            .iter()
            .zip(self.seen_up.iter_mut())
            .map(|(name, seen_up)| {
                let state = self.taps.state(name, true);
                *seen_up |= state == TapState::Up;
                TapHealth {
                    name: name.to_string(),
                    state,
                    seen_up: *seen_up,
                }
            })
            .collect();
        let exits = self
            .exits
            .iter()
            .map(ExitCounter::read)
            .sum::<Option<u64>>()
            .filter(|_| !self.exits.is_empty());
        let guest = self.guest.observe(exits, running, now);
        let state = HealthState {
            taps,
            disks,
            guest: Some(guest),
        };
        let before = self.health.state();
        if state.failures() != before.failures() || state.stalled() != before.stalled() {
            log_change(&state);
        }
        self.health.set(state);
    }
}

fn log_change(state: &HealthState) {
    let failures = state.failures();
    if state.stalled() {
        tracing::warn!("health: the guest makes no progress (no vCPU exit)");
    }
    if failures.is_empty() {
        tracing::info!("health: the VM's resources are all well");
    } else {
        tracing::warn!("health: {}", failures.join(", "));
    }
}

/// The resources a standby holds for a VM it may take over, checked when asked: its TAPs
/// (not opened before the takeover: up when administratively up) and its disk images (held
/// open here to see them deleted).
#[derive(Debug)]
pub struct HostResources {
    taps: TapProbe,
    tap_names: Vec<String>,
    disks: Vec<(PathBuf, Option<File>)>,
}

impl HostResources {
    /// The TAPs named `taps` and the images at `disks` (opened read-only now; one that cannot
    /// be opened reads gone).
    pub fn new(taps: Vec<String>, disks: &[PathBuf]) -> Self {
        let disks = disks
            .iter()
            .map(|p| (p.clone(), File::open(p).ok()))
            .collect();
        Self {
            taps: TapProbe::new(),
            tap_names: taps,
            disks,
        }
    }

    /// How they stand now.
    pub fn check(&self) -> HealthState {
        HealthState {
            taps: self
                .tap_names
                .iter()
                .map(|name| {
                    let state = self.taps.state(name, false);
                    TapHealth {
                        name: name.clone(),
                        state,
                        seen_up: state == TapState::Up,
                    }
                })
                .collect(),
            disks: self
                .disks
                .iter()
                .map(|(path, file)| match file {
                    Some(f) => disk_health(path, f, 0),
                    None => DiskHealth {
                        path: path.clone(),
                        state: DiskState::Gone,
                        io_errors: 0,
                    },
                })
                .collect(),
            guest: None,
        }
    }
}

/// What a primary does about its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthAction {
    /// Nothing to do.
    Nothing,
    /// Hand the VM over to its synchronised standby, for this reason.
    HandOver(String),
    /// Only report this (no standby to move the VM to, or moving it would not help).
    Report(String),
}

impl HealthAction {
    /// The sentence the status message says, if any.
    pub fn message(&self) -> Option<String> {
        match self {
            HealthAction::Nothing => None,
            HealthAction::HandOver(why) => {
                Some(format!("{why}: handing the VM over to its standby"))
            }
            HealthAction::Report(why) => Some(why.clone()),
        }
    }
}

/// What a primary does about `health`, `protected` or not (a synchronised standby holds the
/// VM): a failed TAP or disk moves the VM to the standby, whose host has its own; without one
/// it is only reported, and so is a stalled guest (the standby holds the same guest, which
/// would stall there as well).
pub fn decide(health: &HealthState, protected: bool) -> HealthAction {
    let failures = health.failures();
    if !failures.is_empty() {
        let why = failures.join(", ");
        return if protected {
            HealthAction::HandOver(why)
        } else {
            HealthAction::Report(format!(
                "{why}: the VM cannot be moved (no synchronised standby)"
            ))
        };
    }
    match &health.guest {
        Some(g) if g.state == GuestState::Stalled => HealthAction::Report(format!(
            "the guest made no progress for {} ms (its vCPUs do not exit)",
            g.idle_ms
        )),
        _ => HealthAction::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_net_tap::testutil::{ip, NetNs, TapPeer};

    #[test]
    fn a_tap_set_down_or_deleted_is_reported() {
        let Some(ns) = NetNs::enter() else { return };
        let peer = TapPeer::persistent(&ns, "hl0");
        let probe = TapProbe::new();
        // Administratively up (the peer brought it up), but without a reader: no carrier.
        assert_eq!(probe.state(&peer.name, false), TapState::Up);
        assert_eq!(probe.state(&peer.name, true), TapState::Down);
        let tap = virtio_net_tap::Tap::open(&peer.name).unwrap();
        peer.wait_link_up();
        assert_eq!(probe.state(&peer.name, true), TapState::Up);
        ip(&["link", "set", "dev", &peer.name, "down"]);
        assert_eq!(probe.state(&peer.name, true), TapState::Down);
        assert_eq!(probe.state(&peer.name, false), TapState::Down);
        ip(&["link", "set", "dev", &peer.name, "up"]);
        assert_eq!(probe.state(&peer.name, true), TapState::Up);
        ip(&["link", "del", "dev", &peer.name]);
        assert_eq!(probe.state(&peer.name, true), TapState::Gone);
        drop(tap);
        assert_eq!(probe.state("", true), TapState::Gone);
        assert_eq!(probe.state("a-name-far-too-long", true), TapState::Gone);
    }

    #[test]
    fn a_deleted_disk_image_is_gone_and_io_errors_make_it_failing() {
        let image = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = image.as_path().to_path_buf();
        let file = File::open(&path).unwrap();
        assert_eq!(disk_health(&path, &file, 0).state, DiskState::Ok);
        let failing = disk_health(&path, &file, 3);
        assert_eq!((failing.state, failing.io_errors), (DiskState::Failing, 3));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(disk_health(&path, &file, 0).state, DiskState::Gone);
        let standby = HostResources::new(Vec::new(), std::slice::from_ref(&path));
        assert_eq!(standby.check().disks[0].state, DiskState::Gone);
    }

    #[test]
    fn a_running_guest_without_exits_stalls_and_a_paused_one_does_not() {
        let t0 = Instant::now();
        let mut g = GuestProgress::new(Duration::from_millis(1000), t0);
        // (exits read, running, at ms, state, idle ms)
        let readings = [
            (Some(1), None, 0, GuestState::Unknown, 0),
            (Some(5), Some(true), 200, GuestState::Progressing, 0),
            (Some(5), Some(true), 900, GuestState::Progressing, 700),
            (Some(5), Some(true), 1200, GuestState::Stalled, 1000),
            (Some(6), Some(true), 1400, GuestState::Progressing, 0),
            // Paused for long: not stalled, and its idle time starts again when it resumes.
            (Some(6), Some(false), 5000, GuestState::Paused, 0),
            (Some(6), Some(true), 5500, GuestState::Progressing, 500),
            (None, Some(true), 9000, GuestState::Unknown, 0),
        ];
        for (i, (exits, running, ms, state, idle_ms)) in readings.into_iter().enumerate() {
            let h = g.observe(exits, running, t0 + Duration::from_millis(ms));
            assert_eq!((h.state, h.idle_ms), (state, idle_ms), "reading {i}");
        }
    }

    fn tap(state: TapState, seen_up: bool) -> HealthState {
        HealthState {
            taps: vec![TapHealth {
                name: "tap0".into(),
                state,
                seen_up,
            }],
            ..HealthState::default()
        }
    }

    #[test]
    fn the_decision_hands_over_on_a_failed_tap_or_disk_only_with_a_standby() {
        assert_eq!(
            decide(&tap(TapState::Up, true), true),
            HealthAction::Nothing
        );
        assert_eq!(
            decide(&tap(TapState::Down, true), true),
            HealthAction::HandOver("TAP tap0 is down".into())
        );
        assert_eq!(
            decide(&tap(TapState::Gone, true), true),
            HealthAction::HandOver("TAP tap0 is gone".into())
        );
        // A TAP never seen up was never set up: nothing failed.
        assert_eq!(
            decide(&tap(TapState::Down, false), true),
            HealthAction::Nothing
        );
        let HealthAction::Report(why) = decide(&tap(TapState::Down, true), false) else {
            panic!("without a standby, only a report");
        };
        assert!(
            why.contains("tap0") && why.contains("cannot be moved"),
            "{why}"
        );
        let mut disk = HealthState {
            disks: vec![DiskHealth {
                path: "/d.raw".into(),
                state: DiskState::Gone,
                io_errors: 0,
            }],
            ..HealthState::default()
        };
        assert_eq!(
            decide(&disk, true),
            HealthAction::HandOver("disk /d.raw was deleted".into())
        );
        disk.disks[0].state = DiskState::Failing;
        disk.disks[0].io_errors = 2;
        assert!(
            matches!(decide(&disk, true), HealthAction::HandOver(w) if w.contains("2 request"))
        );
        // A stalled guest is reported, never moved: it would stall on the standby as well.
        let stalled = HealthState {
            guest: Some(GuestHealth {
                state: GuestState::Stalled,
                idle_ms: 12_000,
                ..GuestHealth::default()
            }),
            ..HealthState::default()
        };
        assert!(
            matches!(decide(&stalled, true), HealthAction::Report(w) if w.contains("12000 ms"))
        );
        assert_eq!(
            HealthAction::HandOver("TAP tap0 is down".into())
                .message()
                .unwrap(),
            "TAP tap0 is down: handing the VM over to its standby"
        );
    }

    #[test]
    fn the_health_shows_as_metrics() {
        let mut h = tap(TapState::Down, true);
        h.guest = Some(GuestHealth {
            state: GuestState::Progressing,
            exits: 7,
            ..GuestHealth::default()
        });
        let text = crate::api::render_prometheus(&h.metrics());
        assert!(text.contains("vmr_tap_up{tap=\"tap0\"} 0\n"), "{text}");
        assert!(text.contains("vmr_guest_progressing 1\n"), "{text}");
        assert!(text.contains("vmr_guest_exits_total 7\n"), "{text}");
    }
}
