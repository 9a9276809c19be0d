//! The primary's epoch engine: ends an epoch periodically, or early when the guest's output
//! waits for release or it flushes a disk; checkpoints the VM (pause, dirty set, state,
//! resume, copy-before-write); ships each epoch to every standby; releases the output of
//! epoch N once every standby acknowledged N (DESIGN.md §1).
//!
//! One thread runs the loop ([`Engine::run`], or [`Engine::step`] driven by a caller); one
//! reader thread per standby turns its frames (acks, heartbeats, refusals) into events and
//! wakes the loop. Sending is sequential on the loop's thread, every write bounded by the
//! standby timeout (a standby that stops reading fails its write).
//!
//! A standby that fails, refuses or does not acknowledge in time is dropped by
//! [`Engine::drop_standby`], the one place that decides what losing a standby means. With an
//! [`Authority`] (a coordinator), the primary must first win the compare-and-swap of its
//! ownership (term `T` to `T + 1`); if it loses (a standby was promoted) or cannot ask, it is
//! fenced: vCPUs paused, unacknowledged output discarded, the engine stops
//! ([`Decision::Fenced`]; why this keeps a deposed primary from ever releasing output:
//! [`authority`]). With none left and the claim won (or without an authority), the engine
//! turns replication off on the devices, releases the held output and stops: the VM goes on
//! unprotected.

pub mod authority;
pub mod vm;

use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::api::PauseParts;
use vmm::devices::replication::{
    EpochWrites, ReplicationMode, ReplicationPorts, DEFAULT_INBOUND_CAPACITY,
};
use vmm::epoch::{EpochCapture, EpochError, EpochOptions, EpochTracker, PauseBreakdown};
use vmm::vstate::dirty::DirtyConsumer;
use vmm::vstate::memory::{is_zero, PAGE_SIZE};
use vmm_sys_util::eventfd::EventFd;

use crate::auth::ReplicationKey;
use crate::compat::{Hello, HelloAck};
use crate::conn::Conn;
use crate::epoch::EpochWriter;
use crate::pairing::{self, Link, PairError};
use crate::wire::{
    Fanout, FrameEncoder, FrameError, FrameReader, FrameSink, FrameWriter, Message, PageBatch,
    BATCH_PAGES, DEFAULT_ZSTD_LEVEL,
};
pub use authority::{Authority, Fenced, Renewal};
use vm::{checkpoint, replication_on, EpochSwitch, VmControl, VmThreadError};

/// Errors of the epoch engine. One variant per failing call.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Pairing with a standby failed.
    #[error("cannot pair with standby {peer}: {source}")]
    Pair {
        /// The standby.
        peer: String,
        /// Why.
        source: PairError,
    },
    /// Connecting to a standby failed.
    #[error("cannot connect to standby {peer}: {source}")]
    Connect {
        /// The standby.
        peer: String,
        /// Why.
        source: std::io::Error,
    },
    /// A paired standby already holds epochs of another run (it needs a fresh start).
    #[error("standby {peer} has committed epoch {committed}: only a fresh standby can pair")]
    NotFresh {
        /// The standby.
        peer: String,
        /// Its committed epoch.
        committed: u64,
    },
    /// The VM's monitor thread failed.
    #[error(transparent)]
    Vm(#[from] VmThreadError),
    /// Starting epoch tracking failed.
    #[error("cannot start epoch tracking: {0}")]
    Tracker(EpochError),
    /// An epoch checkpoint failed.
    #[error("epoch checkpoint failed: {0}")]
    Checkpoint(EpochError),
    /// The engine's wake-up eventfd could not be made.
    #[error("cannot make the engine's wake-up eventfd: {0}")]
    Wakeup(std::io::Error),
    /// A standby's reader thread could not be started.
    #[error("cannot start the reader of standby {peer}: {source}")]
    SpawnReader {
        /// The standby.
        peer: String,
        /// Why.
        source: std::io::Error,
    },
    /// The engine's thread could not be started.
    #[error("cannot start the epoch engine's thread: {0}")]
    SpawnEngine(std::io::Error),
    /// The engine's thread panicked.
    #[error("the epoch engine's thread panicked")]
    EnginePanicked,
    /// Waiting for events failed.
    #[error("cannot wait for the engine's events: {0}")]
    Poll(std::io::Error),
    /// A standby too old for the synchronisation this VM needs.
    #[error("the standby {peer} speaks protocol {protocol}: {what} needs {needed}")]
    StandbyTooOld {
        /// The standby.
        peer: String,
        /// Its protocol.
        protocol: crate::compat::ProtocolVersion,
        /// What needs more.
        what: &'static str,
        /// The protocol needed.
        needed: crate::compat::ProtocolVersion,
    },
    /// The thread copying the VM to a joining standby could not be started.
    #[error("cannot start copying the VM to {peer}: {source}")]
    SpawnCopy {
        /// The standby.
        peer: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What the engine is told to do.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Longest epoch.
    pub period: Duration,
    /// End an epoch early when output waits or the guest flushes a disk.
    pub early_on_events: bool,
    /// After each epoch, the engine rests this many times as long as the epoch took it (at
    /// most [`MAX_REST`]) before it ends the next, even with output waiting (acks are handled
    /// meanwhile): where taking and sending epochs is slow (a host short of CPU, where it
    /// costs the guest what the engine spends), epochs come less often and carry more. 0:
    /// epochs end at the period or events only. See [`rest_of_duty`].
    pub rest: f64,
    /// A standby that has not acknowledged an epoch this long after it was sent, or whose
    /// stream does not take a write for this long, is dropped.
    pub standby_timeout: Duration,
    /// The primary's term (fencing token) without an authority; with one, the term of
    /// [`Authority::ownership`] replaces it.
    pub term: u64,
    /// Who owns the VM (the coordinator, this host, the ownership held). `None`: no
    /// coordinator, losing every standby makes the VM go on unprotected without fencing.
    pub authority: Option<Authority>,
    /// How each epoch is checkpointed (the first one is always full).
    pub epoch: EpochOptions,
    /// Bound of each network device's inbound mirror, in frames.
    pub inbound_capacity: usize,
}

/// Default of [`EngineOptions::period`].
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(10);
/// The longest rest after an epoch ([`EngineOptions::rest`]): an epoch that took long (a
/// large dirty set) does not hold output back for many times as long.
pub const MAX_REST: Duration = Duration::from_millis(100);
/// The most of the time the engine spends on epochs by default, in percent: its
/// [`EngineOptions::rest`] is [`rest_of_duty`] of it.
pub const DEFAULT_DUTY_PCT: u64 = 25;

/// The rest after each epoch that keeps the engine's time on epochs at most `pct` percent
/// (1 to 100).
pub fn rest_of_duty(pct: u64) -> f64 {
    100.0 / pct.clamp(1, 100) as f64 - 1.0
}
/// Default of [`EngineOptions::standby_timeout`].
pub const DEFAULT_STANDBY_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            period: DEFAULT_PERIOD,
            early_on_events: true,
            rest: rest_of_duty(DEFAULT_DUTY_PCT),
            standby_timeout: DEFAULT_STANDBY_TIMEOUT,
            term: 1,
            authority: None,
            epoch: EpochOptions::default(),
            inbound_capacity: DEFAULT_INBOUND_CAPACITY,
        }
    }
}

/// The engine's figures (for `GET /replication` and the metrics).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Metrics {
    /// Whether at least one standby holds the VM.
    pub protected: bool,
    /// Standbys paired now.
    pub standbys: usize,
    /// Standbys dropped, with why.
    pub dropped: Vec<String>,
    /// Every standby paired with the engine, in order (the dropped ones too).
    pub peer_names: Vec<String>,
    /// Standbys synchronising (copied while the guest runs), not protecting yet.
    pub joining: Vec<String>,
    /// How far each standby's copy of memory and disks has come (while it is taken).
    pub syncing: Vec<SyncProgress>,
    /// Epochs taken.
    pub epochs: u64,
    /// Epochs ended early (output waiting, disk flush).
    pub early_epochs: u64,
    /// Last epoch sent.
    pub last_sent_epoch: u64,
    /// Last epoch every standby acknowledged (its output released).
    pub last_committed_epoch: u64,
    /// Last pause, microseconds.
    pub last_pause_us: u64,
    /// Longest pause, microseconds.
    pub max_pause_us: u64,
    /// Median and 99th percentile of the recent pauses (0 until the first; taken again every
    /// 16 epochs), microseconds.
    pub pause_p50_us: u64,
    pub pause_p99_us: u64,
    /// Where the recent pauses went.
    pub pause_parts: PauseParts,
    /// Dirty pages of the last epoch.
    pub last_dirty_pages: u64,
    /// Dirty pages in all.
    pub dirty_pages: u64,
    /// Bytes of page contents and state captured, in all.
    pub bytes_raw: u64,
    /// Bytes written to the standbys' streams (per standby, summed), in all.
    pub bytes_sent: u64,
    /// Last ack latency (end of the epoch's send to its ack), microseconds.
    pub last_ack_latency_us: u64,
    /// Longest ack latency, microseconds.
    pub max_ack_latency_us: u64,
    /// Egress frames held now.
    pub held_frames: usize,
    /// Egress bytes held now.
    pub held_bytes: usize,
    /// Inbound frames mirrored (logged by the standbys), in all.
    pub inbound_frames: u64,
    /// The term epochs are sent with.
    pub term: u64,
    /// The last epoch whose output left without the standbys' acks, once the initial
    /// synchronisation converged: the VM is protected once they committed it.
    pub synced_through: Option<u64>,
    /// Set when the primary was fenced (its ownership lost or unproven): its vCPUs are paused
    /// and it releases nothing more. The owner it learnt is inside.
    pub fenced: Option<Fenced>,
    /// Set when the VM was handed over to a standby (a planned switch-over): to whom, when.
    pub handed_over: Option<String>,
}

/// The pauses of the recent epochs, for their percentiles.
#[derive(Default)]
struct PauseWindow {
    recent: VecDeque<PauseBreakdown>,
    pushed: u64,
}

impl PauseWindow {
    /// Epochs the figures are taken over.
    const LEN: usize = 1000;
    /// The figures are taken again every this many epochs (not at every epoch: seven
    /// selections over the window each time).
    const REFRESH: u64 = 16;

    /// Adds `pause`; the figures when they are due (at the first pause, then every
    /// [`PauseWindow::REFRESH`]).
    fn push(&mut self, pause: PauseBreakdown) -> Option<(u64, u64, PauseParts)> {
        if self.recent.len() == Self::LEN {
            self.recent.pop_front();
        }
        self.recent.push_back(pause);
        self.pushed += 1;
        (self.pushed % Self::REFRESH == 1).then(|| self.figures())
    }

    /// The `q` quantile of `part` of the recent pauses, microseconds (0 with none).
    fn quantile(&self, q: f64, part: impl Fn(&PauseBreakdown) -> Duration) -> u64 {
        let mut v: Vec<u64> = self
            .recent
            .iter()
            .map(|p| part(p).as_micros() as u64)
            .collect();
        if v.is_empty() {
            return 0;
        }
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        *v.select_nth_unstable(i).1
    }

    /// (p50, p99, the parts' medians).
    fn figures(&self) -> (u64, u64, PauseParts) {
        let parts = PauseParts {
            stop: self.quantile(0.5, |p| p.stop),
            harvest: self.quantile(0.5, |p| p.harvest),
            state: self.quantile(0.5, |p| p.state),
            pages: self.quantile(0.5, |p| p.copy + p.protect),
            resume: self.quantile(0.5, |p| p.resume),
        };
        (
            self.quantile(0.5, |p| p.total),
            self.quantile(0.99, |p| p.total),
            parts,
        )
    }
}

/// How far the copy of the VM to a synchronising standby has come.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncProgress {
    /// The standby.
    pub standby: String,
    /// Bytes of memory and disks copied (a disk's holes count as copied).
    pub copied_bytes: u64,
    /// Bytes to copy: all of memory and disks, plus the pages written meanwhile as the later
    /// rounds find them.
    pub total_bytes: u64,
}

/// What losing a standby means for the VM ([`Engine::drop_standby`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Other standbys remain: go on, releasing output on their acks.
    Continue,
    /// None remains: go on unprotected, releasing the held output (with an authority, after
    /// winning the claim of the next term).
    Unprotected,
    /// The primary's ownership is lost (a standby was promoted) or cannot be proven (the
    /// coordinator did not answer): vCPUs paused, the output of unacknowledged epochs
    /// discarded, nothing more released, the engine stops.
    Fenced,
}

/// The slowest a standby may take in an epoch's pages (decode, verify, stage, apply) before
/// it is dropped: a large epoch (a joining standby's first, with every page written during its
/// copy) gets that much longer than the standby timeout. A first epoch carrying all of a
/// 256 MiB guest took about 10 s in the emulated lab, against a 2 s timeout.
pub const STANDBY_MIN_APPLY_RATE: u64 = 8 << 20;

/// How long a standby has to acknowledge an epoch of `raw_bytes` once it was sent (or, for an
/// epoch queued behind others, once the standby acknowledged the one before): the standby
/// timeout, plus the epoch's bytes at [`STANDBY_MIN_APPLY_RATE`].
pub fn ack_allowance(standby_timeout: Duration, raw_bytes: u64) -> Duration {
    standby_timeout + Duration::from_secs_f64(raw_bytes as f64 / STANDBY_MIN_APPLY_RATE as f64)
}

/// During the initial synchronisation, the standbys keep up once each acknowledges every
/// epoch within this time of its send: protection (output waiting for their acks) starts.
pub const SYNC_CONVERGED_ACK: Duration = Duration::from_millis(250);

/// The protocol a standby needs to be synchronised while the guest runs (`Join`).
pub const JOIN_SINCE: crate::compat::ProtocolVersion =
    crate::compat::ProtocolVersion { major: 1, minor: 2 };
/// The protocol a standby needs to be given a copy of the VM's disks (`DiskSync`).
pub const DISK_SYNC_SINCE: crate::compat::ProtocolVersion =
    crate::compat::ProtocolVersion { major: 1, minor: 3 };
/// The disk writes a synchronising standby may have waiting for it (the guest's writes since
/// its copy began, sent after the copy): past this, the guest writes faster than the copy
/// goes and the standby is let go.
pub const JOIN_RETAINED_MAX: usize = 512 << 20;
/// The longest epoch while no standby takes epochs (all of them are being copied): the
/// epochs then only rotate the disk journals and the inbound mirrors.
const IDLE_PERIOD: Duration = Duration::from_millis(100);

/// A frame from a standby, or its loss.
enum PeerEvent {
    Ack { peer: u64, epoch: u64 },
    Lost { peer: u64, reason: String },
}

/// Test path: all guest memory and the state at an epoch's pause
/// ([`EpochOptions::reference_image`]), what a standby that committed it must hold.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Guest memory, regions in order ([`vmm::epoch::image_hash`] hashes it).
    pub image: Vec<u8>,
    /// The encoded machine state.
    pub state: Vec<u8>,
}

/// A paired standby as the engine keeps it.
struct Peer {
    id: u64,
    name: String,
    writer: FrameWriter<Conn>,
    conn: Conn,
    /// Epochs sent and not acknowledged, with when their send ended and how long the standby
    /// has to acknowledge each ([`ack_allowance`]).
    in_flight: VecDeque<(u64, Instant, Duration)>,
    /// When its last ack came (or it was paired): the epochs queued behind a large one are
    /// timed from the standby's last progress, not from their own send.
    last_ack_at: Instant,
    acked: u64,
    reader: Option<JoinHandle<()>>,
    /// Of a standby joining the VM protected already ([`Engine::add_standby`]): `Some(0)`
    /// until its first, full, epoch is sent, then `Some(that epoch)` until it keeps up; its
    /// acks release nothing meanwhile. `None`: it protects the VM (or synchronises with the
    /// engine's first standbys).
    joining: Option<u64>,
}

/// A standby joining the VM protected already, while its copy of memory is taken
/// ([`Engine::add_standby`]).
struct Joiner {
    name: String,
    conn: Conn,
    reader: FrameReader<Conn>,
    /// The pages written since the copy began are this consumer's.
    consumer: DirtyConsumer,
    /// The copy, on a thread of its own with the standby's writer: both back when it ends.
    copy: JoinHandle<(FrameWriter<Conn>, Result<u64, CopyError>)>,
    /// The guest's disk writes of every epoch since the copy began (per epoch, per disk): the
    /// copy of the disks may have read the images before them.
    retained: Vec<Vec<EpochWrites>>,
    retained_bytes: usize,
}

/// A joining standby whose copy of memory is done: its first epoch is next.
struct Copied {
    name: String,
    conn: Conn,
    reader: FrameReader<Conn>,
    writer: FrameWriter<Conn>,
    consumer: DirtyConsumer,
    retained: Vec<Vec<EpochWrites>>,
}

/// Why copying the VM to a joining standby failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The link failed.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The pages written meanwhile could not be read.
    #[error("{0}")]
    Dirty(#[from] vmm::epoch::EpochError),
    /// A disk image could not be read.
    #[error("cannot read disk image {path}: {source}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How often a standby's copy says how far it has come in the log.
const COPY_LOG_EVERY: Duration = Duration::from_secs(5);

/// Where a copy thread reports how far it has come ([`Metrics::syncing`], and the log every
/// [`COPY_LOG_EVERY`]).
struct CopyProgress {
    metrics: Arc<Mutex<Metrics>>,
    standby: String,
    logged_at: std::cell::Cell<Instant>,
}

impl CopyProgress {
    fn new(metrics: Arc<Mutex<Metrics>>, standby: String) -> Self {
        Self {
            metrics,
            standby,
            logged_at: std::cell::Cell::new(Instant::now()),
        }
    }

    /// `copied` more bytes copied, `more` more to copy.
    fn advance(&self, copied: u64, more: u64) {
        let mut m = lock(&self.metrics);
        let Some(p) = m.syncing.iter_mut().find(|p| p.standby == self.standby) else {
            return;
        };
        p.copied_bytes += copied;
        p.total_bytes += more;
        if self.logged_at.get().elapsed() >= COPY_LOG_EVERY {
            self.logged_at.set(Instant::now());
            tracing::info!(
                standby = self.standby,
                copied_mib = p.copied_bytes >> 20,
                total_mib = p.total_bytes >> 20,
                "copying the VM to the synchronising standby: {:.0} %",
                p.copied_bytes as f64 * 100.0 / p.total_bytes.max(1) as f64
            );
        }
    }
}

/// Rounds of a joining standby's copy of memory: all of it, then the pages written during the
/// round before, while they get fewer.
const JOIN_COPY_ROUNDS: usize = 5;
/// A round of the copy with fewer pages than this is the last: the first epoch carries the rest.
const JOIN_COPY_ENOUGH: usize = 256;

/// Copies the VM to a joining standby while the guest runs: `Join`, its memory
/// ([`copy_memory`]), then each disk image ([`copy_disk`]). The pages sent.
fn copy_vm(
    tracker: &EpochTracker,
    consumer: DirtyConsumer,
    disks: &[std::path::PathBuf],
    out: &mut FrameWriter<Conn>,
    progress: &CopyProgress,
) -> Result<u64, CopyError> {
    out.send(&Message::Join)?;
    let pages = copy_memory(tracker, consumer, out, progress)?;
    for (i, path) in disks.iter().enumerate() {
        copy_disk(i as u32, path, out, progress)?;
    }
    out.flush()?;
    Ok(pages)
}

/// Copies guest memory: every page, then the pages written meanwhile (`consumer`'s) while
/// they get fewer. The pages written after their last copy stay in `consumer`'s set for the
/// standby's first epoch. The pages sent.
fn copy_memory(
    tracker: &EpochTracker,
    consumer: DirtyConsumer,
    out: &mut FrameWriter<Conn>,
    progress: &CopyProgress,
) -> Result<u64, CopyError> {
    let mut pfns = tracker.all_pfns();
    let mut sent = 0u64;
    for round in 0..JOIN_COPY_ROUNDS {
        progress.advance(0, (pfns.len() * PAGE_SIZE) as u64);
        let mut batch = PageBatch::with_capacity(BATCH_PAGES);
        for &pfn in &pfns {
            batch.push_with(pfn, |buf| tracker.read_page(pfn, buf));
            if batch.len() >= BATCH_PAGES {
                out.send(&Message::Pages(std::mem::replace(
                    &mut batch,
                    PageBatch::with_capacity(BATCH_PAGES),
                )))?;
                progress.advance((BATCH_PAGES * PAGE_SIZE) as u64, 0);
            }
        }
        if !batch.is_empty() {
            let n = batch.len();
            out.send(&Message::Pages(batch))?;
            progress.advance((n * PAGE_SIZE) as u64, 0);
        }
        sent += pfns.len() as u64;
        tracing::debug!(round, pages = pfns.len(), "joining standby: round copied");
        if round + 1 == JOIN_COPY_ROUNDS || (round > 0 && pfns.len() < JOIN_COPY_ENOUGH) {
            break;
        }
        let written = tracker.take_dirty_pfns(consumer)?;
        if round > 0 && written.len() >= pfns.len() {
            // Not getting fewer: give them to the first epoch.
            tracker.give_back_to(consumer, &written);
            break;
        }
        pfns = written;
    }
    Ok(sent)
}

/// A disk's copy goes in writes of this much.
const DISK_CHUNK: usize = 1 << 20;

/// Copies disk image `path` (disk `index`) as the guest runs: `DiskSync` (the standby zeroes
/// its image), then a `DiskWrite` outside any epoch per chunk of data that is not zeros; the
/// image's holes are skipped. What the guest writes meanwhile is sent after the copy
/// ([`Joiner::retained`]).
fn copy_disk(
    index: u32,
    path: &std::path::Path,
    out: &mut FrameWriter<Conn>,
    progress: &CopyProgress,
) -> Result<(), CopyError> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let read_err = |source| CopyError::Disk {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    // Also a block device's size.
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    progress.advance(0, size);
    out.send(&Message::DiskSync { disk: index })?;
    let fd = file.as_raw_fd();
    // SAFETY (both): lseek on a descriptor this function owns; it only moves its offset.
    let seek = |at: u64, whence| unsafe { libc::lseek(fd, at as libc::off_t, whence) };
    let mut buf = vec![0u8; DISK_CHUNK];
    let mut at = 0u64;
    while at < size {
        // The next extent of data: its start and end (without SEEK_DATA, all of the rest).
        let data = match seek(at, libc::SEEK_DATA) {
            d if d >= 0 => d as u64,
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => size,
            _ => at,
        };
        let end = match seek(data, libc::SEEK_HOLE) {
            h if h >= 0 && h as u64 > data => (h as u64).min(size),
            _ => size,
        };
        progress.advance(data.saturating_sub(at), 0);
        let mut pos = data;
        while pos < end {
            let n = (end - pos).min(DISK_CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos).map_err(read_err)?;
            if !is_zero(&buf[..n]) {
                out.send(&Message::DiskWrite {
                    disk: index,
                    offset: pos,
                    bytes: buf[..n].to_vec(),
                })?;
            }
            pos += n as u64;
            progress.advance(n as u64, 0);
        }
        at = end.max(data);
    }
    tracing::debug!(disk = index, path = %path.display(), size, "disk copied");
    Ok(())
}

/// How long a goodbye (`Refuse`) to a standby may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(200);

impl Peer {
    /// Whether a synchronising standby keeps up: it committed its first epoch and
    /// acknowledges each within [`SYNC_CONVERGED_ACK`] of its send.
    fn keeps_up(&self) -> bool {
        self.joining
            .is_some_and(|first| first > 0 && self.acked >= first)
            && self
                .in_flight
                .front()
                .is_none_or(|(_, at, _)| at.elapsed() < SYNC_CONVERGED_ACK)
    }

    /// Closes the link. With `goodbye`, the standby is first told why (best effort, within
    /// [`GOODBYE_TIMEOUT`]): a standby told it was let go does not take the VM over, while one
    /// whose link just breaks (the primary's host lost) does.
    fn close(&mut self, goodbye: Option<&str>) {
        if let Some(reason) = goodbye {
            let _ = self.conn.set_write_timeout(Some(GOODBYE_TIMEOUT));
            let _ = self.writer.send_now(&Message::Refuse {
                reason: reason.to_string(),
            });
        }
        self.conn.shutdown();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// A standby link over a [`Conn`], as [`connect_standby`] pairs it.
pub type StandbyLink = Link<Conn, Conn>;

/// Connects to the standby at `addr` and pairs with it. Every write on the link is bounded by
/// `timeout`.
pub fn connect_standby(
    addr: &str,
    key: &ReplicationKey,
    hello: &Hello,
    timeout: Duration,
) -> Result<(Conn, StandbyLink, HelloAck), EngineError> {
    let conn = Conn::connect(addr).map_err(|source| EngineError::Connect {
        peer: addr.to_string(),
        source,
    })?;
    pair_standby(addr, conn, key, hello, timeout)
}

/// Pairs with the standby at the other end of `conn`.
pub fn pair_standby(
    name: &str,
    conn: Conn,
    key: &ReplicationKey,
    hello: &Hello,
    timeout: Duration,
) -> Result<(Conn, StandbyLink, HelloAck), EngineError> {
    let io = |source| EngineError::Connect {
        peer: name.to_string(),
        source,
    };
    conn.set_write_timeout(Some(timeout)).map_err(io)?;
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    let reader = conn.try_clone().map_err(io)?;
    let writer = conn.try_clone().map_err(io)?;
    let (link, ack) = pairing::connect(reader, writer, key, hello, Some(DEFAULT_ZSTD_LEVEL))
        .map_err(|source| EngineError::Pair {
            peer: name.to_string(),
            source,
        })?;
    // Acks are awaited by the reader thread without a bound: the engine times them out.
    conn.set_read_timeout(None).map_err(io)?;
    Ok((conn, link, ack))
}

/// A standby to protect the VM with: its name, its stream and the paired link on it.
pub struct NewStandby {
    /// For logs.
    pub name: String,
    /// The stream (to shut it down).
    pub conn: Conn,
    /// The paired link.
    pub link: StandbyLink,
    /// Its answer to the pairing.
    pub ack: HelloAck,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The primary's epoch engine of one VM.
pub struct Engine {
    vm: VmControl,
    tracker: Arc<EpochTracker>,
    ports: ReplicationPorts,
    switch: EpochSwitch,
    options: EngineOptions,
    peers: Vec<Peer>,
    events: Receiver<PeerEvent>,
    events_tx: Sender<PeerEvent>,
    waker: Arc<EventFd>,
    next_epoch: u64,
    released: u64,
    last_epoch_at: Instant,
    /// No epoch ends before this (see [`EngineOptions::rest`]).
    rest_until: Instant,
    /// When the standbys were last sent an epoch or a heartbeat.
    last_sent_at: Instant,
    /// The recent epochs' pauses.
    pauses: PauseWindow,
    /// Encodes each epoch once for every standby ([`Engine::ship`]).
    encoder: FrameEncoder,
    /// The first epoch whose output waits for the standbys' acks, once the initial
    /// synchronisation converged; before it, each epoch's output leaves as the epoch ends.
    protect_from: Option<u64>,
    /// The epoch after whose shipping the standbys were seen to keep up: the pause that ends
    /// the next one holds the gates.
    hold_requested: Option<u64>,
    metrics: Arc<Mutex<Metrics>>,
    /// The id the next standby paired gets (its reader's events carry it).
    next_peer: u64,
    /// Standbys joining the VM protected already, their memory being copied.
    joiners: Vec<Joiner>,
    protected: bool,
    /// Protection is being ended on purpose ([`Engine::shutdown`]): not a loss.
    stopping: bool,
}

impl Engine {
    /// Starts protecting the VM behind `vm` with `standbys` (paired, fresh): turns replication
    /// on the devices, starts epoch tracking, and synchronises each standby as
    /// [`Engine::add_standby`] does (copied while the guest runs, then its first epoch). The
    /// VM is protected once they keep up ([`Engine::synchronise`]).
    pub fn start(
        vm: &vm::VmThread,
        standbys: Vec<NewStandby>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        for s in &standbys {
            if s.ack.committed_epoch != 0 {
                return Err(EngineError::NotFresh {
                    peer: s.name.clone(),
                    committed: s.ack.committed_epoch,
                });
            }
        }
        let mut options = options;
        if let Some(a) = &options.authority {
            options.term = a.ownership.term;
        }
        let control = vm.control();
        let tracker = Arc::new(EpochTracker::new(&vm.vm, true).map_err(EngineError::Tracker)?);
        let capacity = options.inbound_capacity;
        let ports = control.run(move |m| replication_on(m, 1, capacity))?;
        let switch = EpochSwitch::of(&ports);
        tracker.attach_pause_step(Box::new(switch.clone()));
        // Until the initial synchronisation converges the VM is not protected: its output
        // leaves as it is sent ([`Engine::synchronise`]).
        switch.devices.pass_through();
        let waker = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(EngineError::Wakeup)?);
        let (events_tx, events) = channel();
        let mut engine = Self {
            vm: control,
            tracker,
            ports,
            switch,
            options,
            peers: Vec::new(),
            events,
            events_tx,
            waker,
            next_epoch: 1,
            released: 0,
            last_epoch_at: Instant::now(),
            rest_until: Instant::now(),
            last_sent_at: Instant::now(),
            pauses: PauseWindow::default(),
            encoder: FrameEncoder::new(Some(DEFAULT_ZSTD_LEVEL)),
            protect_from: None,
            hold_requested: None,
            metrics: Arc::new(Mutex::new(Metrics::default())),
            next_peer: 0,
            joiners: Vec::new(),
            protected: true,
            stopping: false,
        };
        let term = engine.options.term;
        engine.update_metrics(|m| {
            m.protected = true;
            m.term = term;
        });
        let count = standbys.len();
        for s in standbys {
            engine.join(s)?;
        }
        tracing::info!(
            standbys = count,
            period_ms = engine.options.period.as_millis() as u64,
            "VM protected: epoch replication started"
        );
        Ok(engine)
    }

    /// Starts the reader of a standby's acks and counts it among the peers.
    fn start_peer(
        &mut self,
        name: String,
        conn: Conn,
        reader: FrameReader<Conn>,
        writer: FrameWriter<Conn>,
        joining: Option<u64>,
    ) -> Result<(), EngineError> {
        let id = self.next_peer;
        self.next_peer += 1;
        let tx = self.events_tx.clone();
        let waker = self.waker.clone();
        let peer_name = name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("standby-{id}"))
            .spawn(move || read_peer(id, reader, tx, waker))
            .map_err(|source| EngineError::SpawnReader {
                peer: peer_name,
                source,
            })?;
        self.peers.push(Peer {
            id,
            name,
            writer,
            conn,
            in_flight: VecDeque::new(),
            last_ack_at: Instant::now(),
            acked: 0,
            reader: Some(handle),
            joining,
        });
        Ok(())
    }

    /// Adds a fresh standby to the VM while the guest runs (and the others, if any, protect
    /// it): see [`Engine::join`].
    pub fn add_standby(&mut self, s: NewStandby) -> Result<(), String> {
        if !self.protected {
            return Err("the VM's protection has ended".into());
        }
        self.join(s).map_err(|e| e.to_string())
    }

    /// Synchronises a fresh standby while the guest runs: a thread copies the VM to it
    /// (`Join`, guest memory as pages outside any epoch, then again the pages written
    /// meanwhile while they get fewer, then each disk image, `DiskSync` and its data); then
    /// the guest's disk writes since the copy began follow, and the next epoch carries it
    /// every page written since ([`EpochOptions::join`]; the other standbys get their delta
    /// of the same capture). Its acks release nothing until it keeps up (every ack within
    /// [`SYNC_CONVERGED_ACK`] of its epoch's send), when it is told `Protected` and protects
    /// the VM with the others.
    fn join(&mut self, s: NewStandby) -> Result<(), EngineError> {
        if s.ack.committed_epoch != 0 {
            return Err(EngineError::NotFresh {
                peer: s.name.clone(),
                committed: s.ack.committed_epoch,
            });
        }
        let disks: Vec<std::path::PathBuf> = self
            .ports
            .block
            .iter()
            .map(|b| b.path().to_path_buf())
            .collect();
        let version = |v: crate::compat::ProtocolVersion| (v.major, v.minor);
        let needs = [
            (true, JOIN_SINCE, "synchronising it while the guest runs"),
            (
                !disks.is_empty(),
                DISK_SYNC_SINCE,
                "copying the VM's disks to it",
            ),
        ];
        for (needed, since, what) in needs {
            if needed && version(s.ack.protocol) < version(since) {
                return Err(EngineError::StandbyTooOld {
                    peer: s.name.clone(),
                    protocol: s.ack.protocol,
                    what,
                    needed: since,
                });
            }
        }
        let NewStandby {
            name, conn, link, ..
        } = s;
        let Link { reader, mut writer } = link;
        let consumer = self.tracker.register_consumer();
        let tracker = self.tracker.clone();
        let progress = CopyProgress::new(self.metrics.clone(), name.clone());
        let copy = std::thread::Builder::new()
            .name("join-copy".into())
            .spawn(move || {
                crate::priority::set_nice(crate::priority::BULK_NICE);
                let copied = copy_vm(&tracker, consumer, &disks, &mut writer, &progress);
                (writer, copied)
            });
        let copy = match copy {
            Ok(copy) => copy,
            Err(source) => {
                self.tracker.unregister_consumer(consumer);
                return Err(EngineError::SpawnCopy { peer: name, source });
            }
        };
        let standbys = self.peers.len() + self.joiners.len() + 1;
        self.update_metrics(|m| {
            m.peer_names.push(name.clone());
            m.joining.push(name.clone());
            m.syncing.push(SyncProgress {
                standby: name.clone(),
                ..SyncProgress::default()
            });
            m.standbys = standbys;
        });
        tracing::info!(
            standby = name,
            "standby synchronising: copying the VM to it while the guest runs"
        );
        self.joiners.push(Joiner {
            name,
            conn,
            reader,
            consumer,
            copy,
            retained: Vec::new(),
            retained_bytes: 0,
        });
        Ok(())
    }

    /// A joining standby whose copy of memory is done, to finish joining at this epoch. A
    /// copy that failed lets its standby go.
    fn copied_joiner(&mut self) -> Option<Copied> {
        let i = self.joiners.iter().position(|j| j.copy.is_finished())?;
        let Joiner {
            name,
            conn,
            reader,
            consumer,
            copy,
            retained,
            ..
        } = self.joiners.remove(i);
        let failed = match copy.join() {
            Ok((writer, Ok(pages))) => {
                tracing::info!(
                    standby = name,
                    pages,
                    "VM copied to the synchronising standby: its first epoch follows"
                );
                return Some(Copied {
                    name,
                    conn,
                    reader,
                    writer,
                    consumer,
                    retained,
                });
            }
            Ok((_, Err(e))) => format!("copying the VM to it failed: {e}"),
            Err(_) => "copying the VM to it panicked".to_string(),
        };
        self.drop_joiner(&name, &conn, consumer, &failed);
        None
    }

    /// Lets a joining standby go (it protected nothing: nothing else to decide).
    fn drop_joiner(&mut self, name: &str, conn: &Conn, consumer: DirtyConsumer, reason: &str) {
        conn.shutdown();
        self.tracker.unregister_consumer(consumer);
        self.joiner_dropped(name, reason);
    }

    /// Lets go every standby still copying memory to join (protection ends).
    fn let_joiners_go(&mut self, reason: &str) {
        for j in std::mem::take(&mut self.joiners) {
            j.conn.shutdown();
            // Its writes fail now: the copy ends.
            let _ = j.copy.join();
            self.tracker.unregister_consumer(j.consumer);
            self.joiner_dropped(&j.name, reason);
        }
    }

    /// Says a joining standby was let go, and why. If it was the last standby while the VM
    /// was not protected yet, protection ends.
    fn joiner_dropped(&mut self, name: &str, reason: &str) {
        tracing::warn!(standby = name, "joining standby dropped: {reason}");
        let standbys = self.peers.len() + self.joiners.len();
        self.update_metrics(|m| {
            m.dropped.push(format!("{name}: {reason}"));
            m.joining.retain(|n| n != name);
            m.syncing.retain(|p| p.standby != name);
            m.standbys = standbys;
        });
        self.none_left_to_synchronise();
    }

    /// Before the VM was protected, losing every standby decides nothing (none could take
    /// the VM over: output never waited for them) but the end of protection.
    fn none_left_to_synchronise(&mut self) -> Decision {
        if self.protected
            && self.protect_from.is_none()
            && self.peers.is_empty()
            && self.joiners.is_empty()
        {
            self.go_unprotected("no standby left to synchronise");
            return Decision::Unprotected;
        }
        Decision::Continue
    }

    /// Joining standbys that keep up (every epoch sent to them acknowledged within
    /// [`SYNC_CONVERGED_ACK`], their first one included) are told `Protected`: from now on
    /// output waits for their acks too, and they may take the VM over once they committed the
    /// last epoch sent (all output released so far is in it).
    fn promote_joiners(&mut self) {
        if self.protect_from.is_none() {
            // The first standbys are promoted together ([`Engine::synchronise`]).
            return;
        }
        let through = self.next_epoch - 1;
        let mut i = 0;
        while i < self.peers.len() {
            let p = &mut self.peers[i];
            if !(p.joining.is_some() && p.keeps_up()) {
                i += 1;
                continue;
            }
            if let Err(e) = p.writer.send_now(&Message::Protected { through }) {
                let reason = format!("telling it the VM is protected failed: {e}");
                if self.drop_standby(i, &reason) != Decision::Continue {
                    return;
                }
                continue;
            }
            p.joining = None;
            let name = p.name.clone();
            self.update_metrics(|m| m.joining.retain(|n| *n != name));
            tracing::info!(
                standby = name,
                epoch = through,
                "standby synchronised: it protects the VM with the others"
            );
            i += 1;
        }
    }

    /// The engine's figures, shared (they change as it runs).
    pub fn metrics(&self) -> Arc<Mutex<Metrics>> {
        self.metrics.clone()
    }

    /// Whether some standby still holds the VM.
    pub fn is_protected(&self) -> bool {
        self.protected
    }

    /// Why the primary was fenced, if it was ([`Decision::Fenced`]).
    pub fn fenced(&self) -> Option<Fenced> {
        lock(&self.metrics).fenced.clone()
    }

    /// The term epochs are sent with (one more after each claim won).
    pub fn term(&self) -> u64 {
        self.options.term
    }

    /// The devices' replication ports (egress gates: held and released output).
    pub fn ports(&self) -> &ReplicationPorts {
        &self.ports
    }

    /// The last epoch every standby acknowledged.
    pub fn committed_epoch(&self) -> u64 {
        self.released
    }

    /// The last epoch whose output left without the standbys' acks, once the initial
    /// synchronisation converged (`None` before: the VM is not protected yet).
    pub fn synced_through(&self) -> Option<u64> {
        self.protect_from.map(|p| p - 1)
    }

    /// The next epoch to be taken.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    fn update_metrics(&self, f: impl FnOnce(&mut Metrics)) {
        f(&mut lock(&self.metrics));
    }

    /// Runs the loop until `stop` is set or the VM is unprotected. A checkpoint that fails
    /// (its pages stay in the dirty set, the devices stay in their epoch) is logged and taken
    /// again at the next period.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), EngineError> {
        self.run_with(stop, &channel().1)
    }

    /// [`Engine::run`], serving `commands` between epochs.
    fn run_with(
        &mut self,
        stop: &AtomicBool,
        commands: &Receiver<Command>,
    ) -> Result<(), EngineError> {
        while self.protected && !stop.load(Ordering::Relaxed) {
            while let Ok(command) = commands.try_recv() {
                match command {
                    Command::HandOver(reply) => {
                        let done = self.hand_over();
                        let handed = done.is_ok();
                        let _ = reply.send(done);
                        if handed {
                            return Ok(());
                        }
                    }
                    Command::AddStandby(standby, reply) => {
                        let _ = reply.send(self.add_standby(*standby));
                    }
                }
            }
            match self.step() {
                Ok(_) => {}
                Err(e @ EngineError::Checkpoint(_)) if self.protected => {
                    tracing::error!("{e}: retrying at the next epoch");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Runs the loop ([`Engine::run`]) on a thread of its own.
    pub fn spawn(mut self) -> Result<EngineHandle, EngineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = self.metrics();
        let waker = self.waker.clone();
        let flag = stop.clone();
        let (commands, command_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("epochs".into())
            .spawn(move || {
                let result = self.run_with(&flag, &command_rx);
                if let Err(e) = &result {
                    tracing::error!("the epoch engine stopped: {e}");
                }
                self.shutdown();
                result
            })
            .map_err(EngineError::SpawnEngine)?;
        Ok(EngineHandle {
            stop,
            waker,
            metrics,
            commands,
            thread: Some(thread),
        })
    }

    /// A planned switch-over to the first protecting standby, with no loss: the vCPUs paused, a last
    /// epoch taken and acknowledged by every standby (all of the guest's output released),
    /// then `Handover` to the first standby, which takes the VM over from that epoch, and a
    /// goodbye to the others. Waits until the standby closes its link and, with an authority,
    /// claims the VM. The VM stays paused here: the caller ends it. On a failure before the
    /// `Handover` the VM resumes, protected as before. Returns the standby and the epoch.
    pub fn hand_over(&mut self) -> Result<(String, u64), String> {
        if !self.protected || self.peers.is_empty() {
            return Err("the VM is not protected: there is no standby to hand it over to".into());
        }
        if self.synced_through().is_none() {
            return Err("the standbys are still synchronising: try again once protected".into());
        }
        let was_running = self
            .vm
            .run(|m| match m.phase() {
                vmm::microvm::VmPhase::Running => m.pause().map(|()| true),
                _ => Ok(false),
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot pause the VM: {e}"))?;
        let resume = |engine: &mut Self, why: String| {
            if was_running {
                let _ = engine.vm.run(|m| m.resume());
            }
            Err(why)
        };
        let n = match self.epoch(false, None) {
            Ok((n, _)) => n,
            Err(e) => return resume(self, format!("the last epoch failed: {e}")),
        };
        let allowed = ack_allowance(self.options.standby_timeout, 0);
        if !self.wait_committed(n, allowed) || self.peers.is_empty() {
            return resume(
                self,
                format!("the standbys did not acknowledge the last epoch {n}"),
            );
        }
        // To a standby that protects the VM (not one still joining).
        let Some(first) = self.peers.iter().position(|p| p.joining.is_none()) else {
            return resume(self, "no standby protects the VM".into());
        };
        self.peers.swap(0, first);
        let name = self.peers[0].name.clone();
        let peer_id = self.peers[0].id;
        if let Err(e) = self.peers[0]
            .writer
            .send_now(&Message::Handover { epoch: n })
        {
            return resume(self, format!("cannot hand over to {name}: {e}"));
        }
        // From here on the standby may run the VM: this one never runs again.
        self.protected = false;
        self.stopping = true;
        self.let_joiners_go(&format!("the VM was handed over to {name}"));
        for p in self.peers.iter_mut().skip(1) {
            p.close(Some(&format!("the VM was handed over to {name}")));
        }
        self.peers.truncate(1);
        tracing::info!(
            standby = name,
            epoch = n,
            "VM handed over: waiting for the standby"
        );
        let deadline = Instant::now() + self.options.standby_timeout;
        while Instant::now() < deadline {
            if let Ok(PeerEvent::Lost { peer, .. }) =
                self.events.recv_timeout(Duration::from_millis(10))
            {
                if peer == peer_id {
                    break;
                }
            }
        }
        if let Some(a) = &self.options.authority {
            let deadline = Instant::now() + self.options.standby_timeout * 2;
            while Instant::now() < deadline {
                if let Ok(Some((o, _))) = a.coordinator.current(&a.vm) {
                    if o.term > a.ownership.term {
                        tracing::info!(owner = %o, "the standby owns the VM");
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for p in &mut self.peers {
            p.close(None);
        }
        self.peers.clear();
        self.update_metrics(|m| {
            m.protected = false;
            m.standbys = 0;
            m.handed_over = Some(format!("handed over to {name} at epoch {n}"));
        });
        Ok((name, n))
    }

    /// Waits for the end of the current epoch (its period, or an event that ends it early),
    /// handling acks meanwhile, then takes and ships it. Returns the epoch shipped, if any.
    pub fn step(&mut self) -> Result<Option<u64>, EngineError> {
        let early = self.wait_epoch_end()?;
        if !self.protected {
            return Ok(None);
        }
        self.epoch(early, None).map(|(n, _)| Some(n))
    }

    /// Takes and ships one epoch now with `options`; returns its number and, if `options` ask
    /// for one, its [`Reference`] (test path).
    pub fn epoch_now(
        &mut self,
        options: EpochOptions,
    ) -> Result<(u64, Option<Reference>), EngineError> {
        self.handle_events();
        self.epoch(false, Some(options))
    }

    /// Steps epochs until the initial synchronisation converged (output waits for the
    /// standbys) or `timeout` passed; whether it did.
    pub fn wait_synchronised(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.protect_from.is_none() && self.protected && Instant::now() < deadline {
            if self.step().is_err() {
                break;
            }
        }
        self.protect_from.is_some()
    }

    /// Handles acks until epoch `epoch` is committed by every standby or `timeout` passes
    /// (or the VM is unprotected); whether it was.
    pub fn wait_committed(&mut self, epoch: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.released < epoch && self.protected && Instant::now() < deadline {
            if let Ok(ev) = self.events.recv_timeout(Duration::from_millis(5)) {
                self.handle_event(ev);
            }
            self.handle_events();
        }
        self.released >= epoch
    }

    /// Waits until the epoch should end; whether an event (not the period) ended it.
    fn wait_epoch_end(&mut self) -> Result<bool, EngineError> {
        let mut fds = vec![libc::pollfd {
            fd: self.waker.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if self.options.early_on_events {
            for n in &self.ports.net {
                fds.push(libc::pollfd {
                    fd: n.waiting_event().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            for b in &self.ports.block {
                fds.push(libc::pollfd {
                    fd: b.flush_event().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        loop {
            self.handle_events();
            if !self.protected {
                return Ok(false);
            }
            let period = if self.peers.is_empty() {
                self.options.period.max(IDLE_PERIOD)
            } else {
                self.options.period
            };
            let now = Instant::now();
            let deadline = (self.last_epoch_at + period).max(self.rest_until);
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(false);
            }
            // Resting after a costly epoch: only acks are handled until the rest is over, and
            // the standbys hear from the primary at least every period meanwhile.
            let rest = self.rest_until.saturating_duration_since(now);
            let (watched, wait) = if rest.is_zero() {
                (fds.len(), left)
            } else {
                let quiet = now.saturating_duration_since(self.last_sent_at);
                if quiet >= self.options.period {
                    self.heartbeat();
                    continue;
                }
                (1, rest.min(self.options.period - quiet))
            };
            let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
            for fd in fds.iter_mut() {
                fd.revents = 0;
            }
            // SAFETY: `fds` is a valid array of at least `watched` pollfd structs for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), watched as libc::nfds_t, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(EngineError::Poll(e));
            }
            if fds[0].revents != 0 {
                let _ = self.waker.read();
            }
            let mut early = false;
            for fd in &fds[1..] {
                if fd.revents != 0 {
                    early = true;
                    // Read the eventfd: re-armed for the next epoch.
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into `v` from an eventfd the ports own.
                    unsafe { libc::read(fd.fd, (&mut v as *mut u64).cast(), 8) };
                }
            }
            if early {
                self.handle_events();
                return Ok(true);
            }
        }
    }

    fn handle_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.handle_event(ev);
        }
        self.check_timeouts();
    }

    fn handle_event(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Ack { peer, epoch } => {
                let Some(p) = self.peers.iter_mut().find(|p| p.id == peer) else {
                    return;
                };
                let mut latency = None;
                while let Some(&(e, at, _)) = p.in_flight.front() {
                    if e > epoch {
                        break;
                    }
                    if e == epoch {
                        latency = Some(at.elapsed());
                    }
                    p.in_flight.pop_front();
                }
                p.acked = p.acked.max(epoch);
                p.last_ack_at = Instant::now();
                if let Some(l) = latency {
                    let us = l.as_micros() as u64;
                    self.update_metrics(|m| {
                        m.last_ack_latency_us = us;
                        m.max_ack_latency_us = m.max_ack_latency_us.max(us);
                    });
                }
                self.release();
                self.promote_joiners();
            }
            PeerEvent::Lost { peer, reason } => {
                if let Some(i) = self.peers.iter().position(|p| p.id == peer) {
                    self.drop_standby(i, &reason);
                }
            }
        }
    }

    fn check_timeouts(&mut self) {
        while let Some(i) = self.peers.iter().position(|p| {
            p.in_flight
                .front()
                .is_some_and(|(_, at, allowed)| (*at).max(p.last_ack_at).elapsed() > *allowed)
        }) {
            let (epoch, allowed) = self.peers[i]
                .in_flight
                .front()
                .map(|e| (e.0, e.2))
                .unwrap_or_default();
            let reason = format!("no ack of epoch {epoch} within {allowed:?}");
            self.drop_standby(i, &reason);
        }
    }

    /// Releases the output of every epoch all protecting standbys acknowledged (before the
    /// VM is protected: that all standbys taking epochs committed).
    fn release(&mut self) {
        let initial = self.protect_from.is_none();
        let Some(all) = self
            .peers
            .iter()
            .filter(|p| initial || p.joining.is_none())
            .map(|p| p.acked)
            .min()
        else {
            return;
        };
        if all > self.released {
            let frames = self.ports.release_through(all);
            self.released = all;
            tracing::trace!(epoch = all, frames, "epoch committed: output released");
            self.update_metrics(|m| m.last_committed_epoch = all);
        }
    }

    /// Drops standby `index` (lost, refused, failed or too slow) and decides what that means
    /// for the VM: the one place where losing a standby is decided.
    ///
    /// With an [`Authority`], any loss needs a won claim of the next term before more output
    /// is released (the dropped standby may be one that was promoted: the others' acks alone
    /// would release output it never saw). Won: go on, with the new term. Lost or no answer:
    /// [`Decision::Fenced`].
    ///
    /// A standby still joining ([`Engine::add_standby`]) protected nothing and could not be
    /// taken over: dropping it decides nothing. Joining standbys left without a protecting
    /// one are let go too.
    pub fn drop_standby(&mut self, index: usize, reason: &str) -> Decision {
        let mut peer = self.peers.remove(index);
        peer.close(Some(&format!("the primary dropped this standby: {reason}")));
        tracing::warn!(
            standby = peer.name,
            acked = peer.acked,
            joining = peer.joining.is_some(),
            "standby dropped: {reason}"
        );
        let left = self.peers.len() + self.joiners.len();
        self.update_metrics(|m| {
            m.dropped.push(format!("{}: {reason}", peer.name));
            m.joining.retain(|n| *n != peer.name);
            m.standbys = left;
        });
        if peer.joining.is_some() {
            return self.none_left_to_synchronise();
        }
        if let Err(d) = self.renew_ownership(&format!("standby {} dropped", peer.name)) {
            return d;
        }
        if self.peers.iter().any(|p| p.joining.is_none()) {
            // The slowest may be gone: the others' acks may release more.
            self.release();
            return Decision::Continue;
        }
        let why = "no standby protecting the VM is left to join";
        self.let_joiners_go(why);
        while let Some(i) = self.peers.iter().position(|p| p.joining.is_some()) {
            self.drop_standby(i, why);
        }
        self.go_unprotected("no standby left");
        Decision::Unprotected
    }

    /// With an authority: claims the next term, or is fenced (`Err(Decision::Fenced)`).
    /// Without one: nothing to do.
    fn renew_ownership(&mut self, why: &str) -> Result<(), Decision> {
        let Some(authority) = self.options.authority.as_mut() else {
            return Ok(());
        };
        let held = authority.ownership.clone();
        match authority.claim_next() {
            Renewal::Won(o) => {
                self.options.term = o.term;
                self.update_metrics(|m| m.term = o.term);
                Ok(())
            }
            Renewal::Lost(owner) => {
                let reason = format!("{why}: the VM is owned by {owner} now, not {held}");
                self.fence(Some(owner), reason);
                Err(Decision::Fenced)
            }
            Renewal::Failed(e) => {
                let reason = format!("{why}: cannot renew ownership {held}: {e}");
                self.fence(None, reason);
                Err(Decision::Fenced)
            }
        }
    }

    /// The ownership is lost or unproven: pauses the vCPUs, discards the held output of every
    /// epoch not acknowledged (never released, so never seen), closes the remaining standbys
    /// and stops the loop. Replication stays on on the devices: turning it off would let the
    /// guest's output out.
    fn fence(&mut self, owner: Option<crate::coordinator::Ownership>, reason: String) {
        self.protected = false;
        match self.vm.run(|m| match m.phase() {
            vmm::microvm::VmPhase::Running => m.pause().map_err(|e| e.to_string()),
            _ => Ok(()),
        }) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("fenced, but cannot pause the vCPUs: {e}"),
            Err(e) => tracing::error!("fenced, but cannot reach the VM to pause it: {e}"),
        }
        let discarded = self.ports.discard_after(self.released);
        self.let_joiners_go("the primary was fenced");
        for mut p in self.peers.drain(..) {
            p.close(None);
        }
        tracing::error!(
            owner = owner.as_ref().map(|o| o.to_string()),
            last_committed_epoch = self.released,
            discarded_frames = discarded,
            "FENCED: {reason}; vCPUs paused, unacknowledged output discarded"
        );
        let held_frames = self.ports.net.iter().map(|p| p.held_frames()).sum();
        let held_bytes = self.ports.net.iter().map(|p| p.held_bytes()).sum();
        self.update_metrics(|m| {
            m.protected = false;
            m.standbys = 0;
            m.held_frames = held_frames;
            m.held_bytes = held_bytes;
            m.fenced = Some(Fenced {
                owner,
                reason,
                discarded_frames: discarded,
            });
        });
    }

    /// No standby is left: replication off on the devices, held output released, the loop
    /// ends; the VM runs on unprotected.
    fn go_unprotected(&mut self, why: &str) {
        self.protected = false;
        match self.vm.run(|m| {
            m.set_replication(ReplicationMode::Off);
        }) {
            Ok(()) => {}
            // The VM ended (the engine is stopped after it): nothing runs on.
            Err(VmThreadError::Gone) => {}
            Err(e) => tracing::error!("cannot turn replication off on the devices: {e}"),
        }
        let frames = self.ports.release_through(u64::MAX);
        if self.stopping {
            tracing::info!(
                released_frames = frames,
                last_committed_epoch = self.released,
                "{why}"
            );
        } else {
            tracing::error!(
                released_frames = frames,
                last_committed_epoch = self.released,
                "{why}: the VM runs on UNPROTECTED (held output released)"
            );
        }
        self.update_metrics(|m| {
            m.protected = false;
            m.held_frames = 0;
            m.held_bytes = 0;
        });
    }

    /// Takes epoch `self.next_epoch` and ships it to every standby.
    fn epoch(
        &mut self,
        early: bool,
        options: Option<EpochOptions>,
    ) -> Result<(u64, Option<Reference>), EngineError> {
        let n = self.next_epoch;
        let started = Instant::now();
        let mut options = options.unwrap_or_else(|| self.options.epoch.clone());
        // A joining standby whose copy is done gets its first epoch now: with the pages
        // written since the copy began.
        let copied = self.copied_joiner();
        if let Some(c) = &copied {
            options.join = Some(c.consumer);
        }
        let tracker = self.tracker.clone();
        let switch = self.switch.clone();
        self.last_epoch_at = Instant::now();
        let taken = self
            .vm
            .run(move |m| checkpoint(m, &tracker, &options, &switch, n + 1))
            .map_err(EngineError::from)
            .and_then(|cp| cp.map_err(EngineError::Checkpoint));
        let pending = match taken {
            Ok(pending) => pending,
            Err(e) => {
                if let Some(c) = copied {
                    self.drop_joiner(&c.name, &c.conn, c.consumer, "its first epoch failed");
                }
                return Err(e);
            }
        };
        self.next_epoch += 1;
        let pause = pending.pause;
        let inbound = self.drain_inbound();
        let mut capture = match pending.wait() {
            Ok(c) => c,
            Err(e) => {
                if let Some(c) = copied {
                    self.drop_joiner(&c.name, &c.conn, c.consumer, "its first epoch failed");
                }
                // Its output and disk writes cannot be shipped without its pages: nobody can
                // hold this epoch.
                let reason = format!("epoch {n} could not be captured: {e}");
                while !self.peers.is_empty() {
                    self.drop_standby(0, &reason);
                }
                return Err(EngineError::Checkpoint(e));
            }
        };
        let writes = std::mem::take(&mut capture.disk_writes);
        self.retain_writes(&writes);
        self.ship(n, &capture, &writes, &inbound);
        if let Some(c) = copied {
            self.first_epoch(c, n, &capture, &writes, &inbound);
        }
        // Pages nobody took are not given back: a standby paired later is copied whole.
        self.synchronise(n);
        let reference = capture.reference_image.as_ref().map(|img| Reference {
            image: img.clone(),
            state: capture.state.clone(),
        });
        let pause_us = pause.total.as_micros() as u64;
        let figures = self.pauses.push(pause);
        let pages = capture.pfns.len() as u64;
        let raw = capture.raw_bytes() + capture.state.len() as u64;
        let held_frames = self.ports.net.iter().map(|p| p.held_frames()).sum();
        let held_bytes = self.ports.net.iter().map(|p| p.held_bytes()).sum();
        self.update_metrics(|m| {
            m.epochs += 1;
            m.early_epochs += u64::from(early);
            m.last_sent_epoch = n;
            m.last_pause_us = pause_us;
            m.max_pause_us = m.max_pause_us.max(pause_us);
            if let Some((p50, p99, parts)) = figures {
                m.pause_p50_us = p50;
                m.pause_p99_us = p99;
                m.pause_parts = parts;
            }
            m.last_dirty_pages = pages;
            m.dirty_pages += pages;
            m.bytes_raw += raw;
            m.held_frames = held_frames;
            m.held_bytes = held_bytes;
            m.inbound_frames += inbound.len() as u64;
        });
        tracing::debug!(epoch = n, pages, pause_us, early, "epoch shipped");
        self.tracker.recycle(capture);
        self.last_sent_at = Instant::now();
        self.rest_until =
            self.last_sent_at + started.elapsed().mul_f64(self.options.rest).min(MAX_REST);
        Ok((n, reference))
    }

    /// Tells every standby the primary is alive (while the engine rests: no epoch to send).
    fn heartbeat(&mut self) {
        self.last_sent_at = Instant::now();
        let msg = Message::Heartbeat {
            term: self.options.term,
            epoch: self.next_epoch - 1,
        };
        let mut i = 0;
        while i < self.peers.len() {
            match self.peers[i].writer.send_now(&msg) {
                Ok(()) => i += 1,
                Err(e) => {
                    let reason = format!("sending a heartbeat failed: {e}");
                    if self.drop_standby(i, &reason) != Decision::Continue {
                        break;
                    }
                }
            }
        }
    }

    /// Every inbound frame delivered to the guest so far, as (epoch, net, frame).
    fn drain_inbound(&mut self) -> Vec<(u64, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        for (i, net) in self.ports.net.iter().enumerate() {
            match net.drain_inbound() {
                Ok(got) => frames.extend(got.into_iter().map(|f| (f.epoch, i as u32, f.data))),
                Err(e) => tracing::error!(tap = net.tap_name(), "inbound mirror: {e}"),
            }
        }
        frames
    }

    /// Keeps the disk writes of the epoch that ended for every standby still being copied
    /// (they follow its copy); one past [`JOIN_RETAINED_MAX`] is let go.
    fn retain_writes(&mut self, writes: &[EpochWrites]) {
        if self.joiners.is_empty() {
            return;
        }
        let bytes: usize = writes.iter().map(EpochWrites::bytes).sum();
        if bytes == 0 {
            return;
        }
        let mut i = 0;
        while i < self.joiners.len() {
            let j = &mut self.joiners[i];
            if j.retained_bytes + bytes <= JOIN_RETAINED_MAX {
                j.retained.push(writes.to_vec());
                j.retained_bytes += bytes;
                i += 1;
                continue;
            }
            let j = self.joiners.remove(i);
            j.conn.shutdown();
            let _ = j.copy.join();
            let reason = format!(
                "the guest wrote more than {} MiB to its disks while the VM was copied",
                JOIN_RETAINED_MAX >> 20
            );
            self.drop_joiner(&j.name, &j.conn, j.consumer, &reason);
        }
    }

    /// Sends epoch `n` to every standby, dropping those that fail. The epoch is encoded and
    /// compressed once for all of them ([`Fanout`]); only the frames' headers are per link.
    fn ship(
        &mut self,
        n: u64,
        capture: &EpochCapture,
        writes: &[EpochWrites],
        inbound: &[(u64, u32, Vec<u8>)],
    ) {
        let term = self.options.term;
        let allowed = ack_allowance(self.options.standby_timeout, capture.raw_bytes());
        // An epoch taken for a joining standby: the others, which hold the epoch before, get
        // only their delta of it.
        let delta = capture.delta_pfns.as_deref();
        let before: Vec<u64> = self.peers.iter().map(|p| p.writer.bytes_sent()).collect();
        let mut fanout = Fanout::new(
            &mut self.encoder,
            self.peers.iter_mut().map(|p| &mut p.writer),
        );
        let sent = send_epoch(&mut fanout, n, term, capture, delta, writes, inbound);
        let outcomes = fanout.finish();
        let mut failed = Vec::new();
        let mut bytes = 0;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let p = &mut self.peers[i];
            bytes += p.writer.bytes_sent() - before[i];
            // A message that could not be encoded fails every link alike.
            match outcome
                .map(|e| e.to_string())
                .or_else(|| sent.as_ref().err().map(|e| e.to_string()))
            {
                None => p.in_flight.push_back((n, Instant::now(), allowed)),
                Some(e) => failed.push((i, format!("sending epoch {n} failed: {e}"))),
            }
        }
        self.update_metrics(|m| m.bytes_sent += bytes);
        // From the last: dropping one leaves the indices before it as they were.
        for (i, reason) in failed.into_iter().rev() {
            if self.drop_standby(i, &reason) != Decision::Continue {
                break;
            }
        }
    }

    /// Sends a joining standby whose VM was copied the guest's disk writes since the copy
    /// began (outside any epoch, straight into its images), then its first epoch `n` (every
    /// page written since the copy began, and the epoch's), and counts it among the peers,
    /// joining.
    fn first_epoch(
        &mut self,
        c: Copied,
        n: u64,
        capture: &EpochCapture,
        writes: &[EpochWrites],
        inbound: &[(u64, u32, Vec<u8>)],
    ) {
        let Copied {
            name,
            conn,
            reader,
            mut writer,
            consumer,
            retained,
        } = c;
        self.tracker.unregister_consumer(consumer);
        self.update_metrics(|m| m.syncing.retain(|p| p.standby != name));
        let term = self.options.term;
        let sent = retained
            .iter()
            .try_for_each(|w| send_disk_writes(&mut writer, w))
            .and_then(|()| send_epoch(&mut writer, n, term, capture, None, writes, inbound));
        if let Err(e) = sent {
            conn.shutdown();
            return self.joiner_dropped(&name, &format!("sending its first epoch {n} failed: {e}"));
        }
        if let Err(e) = self.start_peer(name.clone(), conn, reader, writer, Some(n)) {
            return self.joiner_dropped(&name, &e.to_string());
        }
        let allowed = ack_allowance(self.options.standby_timeout, capture.raw_bytes());
        if let Some(p) = self.peers.last_mut() {
            p.in_flight.push_back((n, Instant::now(), allowed));
        }
    }

    /// While the initial synchronisation runs (the standbys are copied, then take their first
    /// epochs), the egress gates let every frame out as the guest sends it: the VM is not
    /// protected yet, and holding its output would stall every client for the whole
    /// synchronisation. Once every standby is copied and keeps up ([`Peer::keeps_up`], seen
    /// after shipping epoch `c`), the pause that ends epoch `c + 1` switches the gates to
    /// holding; once `c + 1` is shipped, the standbys that committed their first epoch are
    /// told (`Protected`: a takeover needs `c + 1` committed), and from `c + 2` on output
    /// waits for their acks. Until one is, each epoch's output leaves as it is shipped.
    fn synchronise(&mut self, n: u64) {
        if self.protect_from.is_some() || !self.protected {
            return;
        }
        // The output of the epochs so far leaves without waiting (frames held before the
        // gates were opened, or since they hold again).
        self.ports.release_through(n);
        match self.hold_requested {
            Some(c) if n > c => {}
            Some(_) => return,
            None => {
                // All together: the first standbys protect the VM from the same epoch.
                if self.joiners.is_empty()
                    && !self.peers.is_empty()
                    && self.peers.iter().all(Peer::keeps_up)
                {
                    self.switch.devices.hold_from_next_epoch();
                    self.hold_requested = Some(n);
                }
                return;
            }
        }
        let mut promoted = Vec::new();
        let mut i = 0;
        while i < self.peers.len() {
            let p = &mut self.peers[i];
            if p.joining.is_none_or(|first| p.acked < first) {
                i += 1;
                continue;
            }
            match p.writer.send_now(&Message::Protected { through: n }) {
                Ok(()) => {
                    p.joining = None;
                    promoted.push(p.name.clone());
                    i += 1;
                }
                Err(e) => {
                    let reason = format!("telling it the VM is protected failed: {e}");
                    if self.drop_standby(i, &reason) != Decision::Continue {
                        return;
                    }
                }
            }
        }
        if promoted.is_empty() {
            return;
        }
        self.protect_from = Some(n + 1);
        self.update_metrics(|m| {
            m.synced_through = Some(n);
            m.joining.retain(|j| !promoted.contains(j));
        });
        tracing::info!(
            epoch = n,
            standbys = ?promoted,
            "initial synchronisation converged: output waits for the standbys from epoch {}",
            n + 1
        );
    }

    /// Ends protection: closes every standby link (they keep their last commit) and turns
    /// replication off, releasing the held output; with an [`Authority`], only after winning
    /// the claim of the next term (else the primary is fenced). Dropping the engine does the
    /// same.
    pub fn shutdown(self) {}

    fn close_all(&mut self) {
        self.stopping = true;
        self.let_joiners_go("the primary ended protection");
        for p in &mut self.peers {
            p.close(Some("the primary ended protection"));
        }
        self.peers.clear();
        if self.protected {
            self.update_metrics(|m| m.standbys = 0);
            // Releasing what no standby acknowledged needs the ownership, as in drop_standby.
            if self.renew_ownership("protection ended").is_ok() {
                self.go_unprotected("protection ended");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// What an engine running on its own thread is asked between epochs.
enum Command {
    HandOver(Sender<Result<(String, u64), String>>),
    AddStandby(Box<NewStandby>, Sender<Result<(), String>>),
}

/// An engine running on its own thread ([`Engine::spawn`]).
pub struct EngineHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<EventFd>,
    metrics: Arc<Mutex<Metrics>>,
    commands: Sender<Command>,
    thread: Option<JoinHandle<Result<(), EngineError>>>,
}

impl EngineHandle {
    /// The engine's figures.
    pub fn metrics(&self) -> Metrics {
        lock(&self.metrics).clone()
    }

    /// Whether the loop still runs (it ends when the VM is unprotected).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// [`Engine::hand_over`] on the engine's thread; its answer.
    pub fn hand_over(&self) -> Result<(String, u64), String> {
        self.ask(Command::HandOver)
    }

    /// [`Engine::add_standby`] on the engine's thread; its answer.
    pub fn add_standby(&self, standby: NewStandby) -> Result<(), String> {
        self.ask(|reply| Command::AddStandby(Box::new(standby), reply))
    }

    fn ask<T>(
        &self,
        command: impl FnOnce(Sender<Result<T, String>>) -> Command,
    ) -> Result<T, String> {
        let (tx, rx) = channel();
        self.commands
            .send(command(tx))
            .map_err(|_| "the epoch engine has stopped".to_string())?;
        let _ = self.waker.write(1);
        rx.recv()
            .map_err(|_| "the epoch engine has stopped".to_string())?
    }

    /// Stops the loop, closes the standby links and releases the held output; how the loop
    /// ended.
    pub fn stop(mut self) -> Result<(), EngineError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), EngineError> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.write(1);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| EngineError::EnginePanicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// One epoch on one link or several: inbound frames, then the epoch (pages, state, disk
/// writes, end).
fn send_epoch(
    out: &mut impl FrameSink,
    n: u64,
    term: u64,
    capture: &EpochCapture,
    only: Option<&[u64]>,
    writes: &[EpochWrites],
    inbound: &[(u64, u32, Vec<u8>)],
) -> Result<(), FrameError> {
    for (epoch, net, frame) in inbound {
        out.send(&Message::Inbound {
            epoch: *epoch,
            net: *net,
            frame: frame.clone(),
        })?;
    }
    let mut e = EpochWriter::begin(out, n, term)?;
    match only {
        None => {
            for (pfn, contents) in capture.pages() {
                e.page(pfn, contents)?;
            }
        }
        Some(only) => {
            // Both ascending: one pass.
            let mut wanted = only.iter().copied().peekable();
            for (pfn, contents) in capture.pages() {
                while wanted.next_if(|&w| w < pfn).is_some() {}
                if wanted.next_if_eq(&pfn).is_some() {
                    e.page(pfn, contents)?;
                }
            }
        }
    }
    e.state(capture.state.clone())?;
    for (disk, w) in writes.iter().enumerate() {
        for write in &w.writes {
            e.disk_write(disk as u32, write.offset, write.bytes.clone())?;
        }
    }
    e.end()?;
    Ok(())
}

/// The guest's disk writes `writes` (per disk), outside any epoch: to a joining standby,
/// after its copy of the disks.
fn send_disk_writes(out: &mut FrameWriter<Conn>, writes: &[EpochWrites]) -> Result<(), FrameError> {
    for (disk, w) in writes.iter().enumerate() {
        for write in &w.writes {
            out.send(&Message::DiskWrite {
                disk: disk as u32,
                offset: write.offset,
                bytes: write.bytes.clone(),
            })?;
        }
    }
    Ok(())
}

/// A standby's reader: acks and refusals become events for the engine.
fn read_peer(id: u64, mut reader: FrameReader<Conn>, tx: Sender<PeerEvent>, waker: Arc<EventFd>) {
    let event = loop {
        match reader.recv() {
            Ok(Message::Ack { epoch }) => {
                if tx.send(PeerEvent::Ack { peer: id, epoch }).is_err() {
                    return;
                }
                let _ = waker.write(1);
            }
            Ok(Message::Heartbeat { .. }) => {}
            Ok(Message::Refuse { reason }) => {
                break PeerEvent::Lost {
                    peer: id,
                    reason: format!("the standby gave up: {reason}"),
                }
            }
            Ok(other) => {
                break PeerEvent::Lost {
                    peer: id,
                    reason: format!("unexpected {} from the standby", other.name()),
                }
            }
            Err(e) => {
                break PeerEvent::Lost {
                    peer: id,
                    reason: format!("link lost: {e}"),
                }
            }
        }
    };
    let _ = tx.send(event);
    let _ = waker.write(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_epoch_gets_time_to_be_taken_in() {
        let timeout = Duration::from_secs(2);
        // A small epoch: the timeout.
        assert!(ack_allowance(timeout, 4096) < Duration::from_millis(2001));
        // The initial synchronisation of 256 MiB: 32 s more at 8 MiB/s.
        assert_eq!(ack_allowance(timeout, 256 << 20), Duration::from_secs(34));
    }
}
