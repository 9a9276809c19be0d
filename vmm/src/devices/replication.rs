//! The devices' side of replication: what the epoch engine drives at each pause, per device.
//!
//! [`set_replication`] turns replication on (or off) on every virtio device of a machine and
//! returns their [`ReplicationPorts`]: one [`NetPort`] per network device and one [`BlockPort`]
//! per disk, each in configuration order (the indices the wire protocol names them by).
//!
//! **Network** ([`NetPort`]): output commit and inbound mirroring. With replication on, the
//! egress gate holds every frame the guest sends, tagged with the current epoch;
//! [`DeviceSwitch::begin_epoch`] at each pause starts the next epoch, [`NetPort::release_through`]
//! writes to the TAP, in order, the frames of every acknowledged epoch, and
//! [`NetPort::discard_after`] drops those of epochs that were lost. [`NetPort::waiting_event`]
//! fires on the first frame held in an epoch (end it early). Every inbound frame delivered to the
//! guest is mirrored, tagged with the epoch in which it was delivered, through a bounded channel
//! ([`NetPort::try_recv_inbound`]); an engine that falls behind is told so
//! ([`MirrorError::Overrun`]), never left to guess. On a standby that took over,
//! [`NetPort::inject`] delivers the logged inbound frames to the guest, in order, ahead of the TAP.
//!
//! **Disk** ([`BlockPort`]): with replication on, every write the guest makes is recorded in a
//! journal (byte offset, bytes), under the epoch in which it was served. At each pause,
//! [`BlockPort::take_epoch`] returns the writes of the epoch that ends and starts the next one.
//! A guest `FLUSH` signals [`BlockPort::flush_event`] (end the epoch early: the guest waits for
//! durability, its reply is held with the epoch's output anyway).
//!
//! **Order at the pause.** Save the devices' state *before* taking the journals: a request the
//! event loop serves in between is then in the journal of the ending epoch but not consumed in
//! the saved queues, and a standby that resumes at that epoch serves it again (the same bytes at
//! the same place: harmless). The other order would lose the write on the standby.
//!
//! With replication off (the default), nothing of this costs anything: the gate lets frames
//! out at once, nothing is mirrored, nothing is journaled.
//!
//! **Save and restore.** Held output frames are part of the network device's state
//! ([`virtio_net_tap::EgressState`]), so a snapshot or a migration carries them. The journal is
//! not: its writes are already in the image, and they only concern the standbys of the pairing
//! in progress.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use virtio_net_tap::{Egress, GateMode, MirrorReceiver};
pub use virtio_net_tap::{Epoch, IngressFrame, MirrorError};
use vmm_sys_util::eventfd::EventFd;

use crate::microvm::{lock, Devices, VirtioSlot};

/// Default bound of the inbound mirror channel, in frames.
pub const DEFAULT_INBOUND_CAPACITY: usize = 16 * 1024;

/// Whether the devices replicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicationMode {
    /// Not replicating: output goes out at once, nothing is mirrored or journaled. Frames
    /// already held stay held (release or discard them first) and leave, in order, on release.
    #[default]
    Off,
    /// Replicating from epoch `epoch` on.
    On {
        /// The epoch that starts now.
        epoch: Epoch,
        /// Bound of each network device's inbound mirror channel, in frames.
        inbound_capacity: usize,
    },
}

/// Errors of the replication ports.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The network device cannot be woken to take injected frames.
    #[error("cannot wake network device {tap} to inject frames: {source}")]
    InjectWake {
        /// Its TAP.
        tap: String,
        /// The OS error.
        source: io::Error,
    },
}

/// One device's replication port.
#[derive(Debug)]
pub enum DevicePort {
    /// A network device.
    Net(NetPort),
    /// A disk.
    Block(BlockPort),
}

/// Every device's replication port, by kind, in configuration order.
#[derive(Debug, Default)]
pub struct ReplicationPorts {
    /// Network devices.
    pub net: Vec<NetPort>,
    /// Disks.
    pub block: Vec<BlockPort>,
}

impl ReplicationPorts {
    /// What a pause does to these devices, as a handle of its own (the ports stay with whoever
    /// releases output and reads the inbound frames).
    pub fn switch(&self) -> DeviceSwitch {
        DeviceSwitch {
            egress: self.net.iter().map(|n| n.egress.clone()).collect(),
            block: self.block.clone(),
            hold: Arc::default(),
        }
    }

    /// Releases the output of every epoch up to `epoch` on every network device; returns the
    /// frames released.
    pub fn release_through(&self, epoch: Epoch) -> usize {
        self.net.iter().map(|net| net.release_through(epoch)).sum()
    }

    /// Discards the output of every epoch after `epoch`; returns the frames dropped.
    pub fn discard_after(&self, epoch: Epoch) -> usize {
        self.net.iter().map(|net| net.discard_after(epoch)).sum()
    }
}

/// The devices' part of a pause, after their state was saved: starts the next epoch on every
/// egress gate and disk journal ([`DeviceSwitch::begin_epoch`]). Cheap to clone; a
/// [`crate::epoch::PauseStep`] in the tracker's numbering (the capture of epoch N starts the
/// devices' epoch N + 1).
#[derive(Debug, Clone)]
pub struct DeviceSwitch {
    egress: Vec<Egress>,
    block: Vec<BlockPort>,
    /// Set by [`DeviceSwitch::hold_from_next_epoch`].
    hold: Arc<AtomicBool>,
}

impl DeviceSwitch {
    /// Starts epoch `next` on every device (output and disk writes from now on belong to
    /// it); returns the writes of the epoch that ends, per disk in order.
    pub fn begin_epoch(&self, next: Epoch) -> Vec<EpochWrites> {
        let hold = self.hold.load(Ordering::Acquire);
        for e in &self.egress {
            e.set_epoch(next);
            if hold {
                e.set_mode(GateMode::Held);
            }
        }
        self.block.iter().map(|b| b.take_epoch(next)).collect()
    }

    /// Lets every frame out as the guest sends it (a VM not protected yet), until the epoch
    /// after [`DeviceSwitch::hold_from_next_epoch`].
    pub fn pass_through(&self) {
        for e in &self.egress {
            e.set_mode(GateMode::PassThrough);
        }
    }

    /// From the epoch the next [`DeviceSwitch::begin_epoch`] starts, the egress gates hold
    /// every frame until its epoch is released (switched inside the pause: no frame of that
    /// epoch escapes).
    pub fn hold_from_next_epoch(&self) {
        self.hold.store(true, Ordering::Release);
    }
}

/// Sets replication `mode` on every virtio device of `devices` and returns their ports.
///
/// Safe while the guest runs: each device switches between two requests or frames. Turning it
/// on with the vCPUs paused makes the first epoch's boundary exact.
pub fn set_replication(devices: &Devices, mode: ReplicationMode) -> ReplicationPorts {
    set_replication_on(&devices.virtio, mode)
}

/// [`set_replication`] on the virtio devices in `slots`.
pub fn set_replication_on(slots: &[VirtioSlot], mode: ReplicationMode) -> ReplicationPorts {
    let mut ports = ReplicationPorts::default();
    for slot in slots {
        let device = lock(&slot.transport).device().clone();
        let port = lock(&device).set_replication(mode);
        match port {
            Some(DevicePort::Net(net)) => ports.net.push(net),
            Some(DevicePort::Block(block)) => ports.block.push(block),
            None => {}
        }
    }
    tracing::info!(
        ?mode,
        net = ports.net.len(),
        block = ports.block.len(),
        "replication set on the devices"
    );
    ports
}

/// Frames to deliver to the guest from another thread, in order: the network device takes them
/// on its event loop when woken.
#[derive(Debug, Clone)]
pub struct Injector {
    shared: Arc<InjectorShared>,
}

#[derive(Debug)]
struct InjectorShared {
    frames: Mutex<VecDeque<Vec<u8>>>,
    wake: EventFd,
}

impl Injector {
    /// An empty injector.
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            shared: Arc::new(InjectorShared {
                frames: Mutex::new(VecDeque::new()),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    fn frames(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.shared
            .frames
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `frames` after those already queued and wakes the device.
    fn push(&self, frames: impl IntoIterator<Item = Vec<u8>>) -> io::Result<usize> {
        let mut queue = self.frames();
        let before = queue.len();
        queue.extend(frames);
        let added = queue.len() - before;
        drop(queue);
        if added > 0 {
            self.shared.wake.write(1)?;
        }
        Ok(added)
    }

    /// The eventfd the device registers with its event loop.
    pub(crate) fn wake_event(&self) -> &EventFd {
        &self.shared.wake
    }

    /// A copy of the queued frames, in order (for the device's saved state).
    pub(crate) fn queued(&self) -> Vec<Vec<u8>> {
        self.frames().iter().cloned().collect()
    }

    /// Takes every queued frame, in order.
    pub(crate) fn take(&self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut *self.frames())
    }
}

/// A network device's replication port. The egress handle may be used from any thread.
#[derive(Debug)]
pub struct NetPort {
    tap: String,
    egress: Egress,
    inbound: Option<MirrorReceiver>,
    injector: Injector,
}

impl NetPort {
    pub(crate) fn new(
        tap: String,
        egress: Egress,
        inbound: Option<MirrorReceiver>,
        injector: Injector,
    ) -> Self {
        Self {
            tap,
            egress,
            inbound,
            injector,
        }
    }

    /// The device's TAP.
    pub fn tap_name(&self) -> &str {
        &self.tap
    }

    /// The egress gate itself (statistics, limit, save).
    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Epoch `epoch` is acknowledged: its frames and those of earlier epochs go to the TAP, in
    /// order. Returns how many.
    pub fn release_through(&self, epoch: Epoch) -> usize {
        let n = self.egress.release_through(epoch);
        tracing::trace!(tap = self.tap, epoch, frames = n, "egress released");
        n
    }

    /// Failover: drops the held frames of every epoch after `epoch`. Returns how many.
    pub fn discard_after(&self, epoch: Epoch) -> usize {
        let n = self.egress.discard_after(epoch);
        if n > 0 {
            tracing::info!(tap = self.tap, epoch, frames = n, "egress discarded");
        }
        n
    }

    /// Readable when a frame of the current epoch waits for release (at most once per epoch);
    /// the engine reads it and may end the epoch early.
    pub fn waiting_event(&self) -> &EventFd {
        self.egress.waiting_event()
    }

    /// Frames held now.
    pub fn held_frames(&self) -> usize {
        self.egress.held_frames()
    }

    /// Bytes held now (virtio-net headers included).
    pub fn held_bytes(&self) -> usize {
        self.egress.held_bytes()
    }

    /// The next inbound frame delivered to the guest, with the epoch it was delivered in;
    /// `Ok(None)` if none waits. [`MirrorError::Overrun`] says frames were lost because the
    /// engine fell behind; [`MirrorError::Closed`] that the device is not mirroring.
    pub fn try_recv_inbound(&self) -> Result<Option<IngressFrame>, MirrorError> {
        match &self.inbound {
            Some(rx) => rx.try_recv(),
            None => Err(MirrorError::Closed),
        }
    }

    /// Every inbound frame waiting now, in delivery order.
    pub fn drain_inbound(&self) -> Result<Vec<IngressFrame>, MirrorError> {
        match &self.inbound {
            Some(rx) => rx.drain(),
            None => Err(MirrorError::Closed),
        }
    }

    /// Delivers `frames` (each a virtio-net header and an Ethernet frame, as mirrored in
    /// [`IngressFrame::data`]) to the guest, in order, ahead of what the TAP has: the device
    /// takes them on its event loop (once activated). Returns how many were queued.
    pub fn inject(
        &self,
        frames: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<usize, ReplicationError> {
        let n = self
            .injector
            .push(frames)
            .map_err(|source| ReplicationError::InjectWake {
                tap: self.tap.clone(),
                source,
            })?;
        tracing::debug!(tap = self.tap, frames = n, "inbound frames injected");
        Ok(n)
    }
}

/// One write the guest made to a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWrite {
    /// Byte offset in the image.
    pub offset: u64,
    /// What was written.
    pub bytes: Vec<u8>,
}

/// The writes of one epoch on one disk, in the order they were served.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EpochWrites {
    /// The epoch.
    pub epoch: Epoch,
    /// The writes.
    pub writes: Vec<DiskWrite>,
    /// Flushes the guest asked for during the epoch.
    pub flushes: u64,
}

impl EpochWrites {
    /// Bytes written.
    pub fn bytes(&self) -> usize {
        self.writes.iter().map(|w| w.bytes.len()).sum()
    }
}

/// The writes of the current epoch, as the block device records them.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    current: EpochWrites,
    bytes: usize,
}

impl Journal {
    /// A journal for epoch `epoch`.
    pub(crate) fn new(epoch: Epoch) -> Self {
        Self {
            current: EpochWrites {
                epoch,
                ..EpochWrites::default()
            },
            bytes: 0,
        }
    }

    /// Records a write served now.
    pub(crate) fn record(&mut self, offset: u64, bytes: Vec<u8>) {
        self.bytes += bytes.len();
        self.current.writes.push(DiskWrite { offset, bytes });
    }

    /// Records a flush served now.
    pub(crate) fn flushed(&mut self) {
        self.current.flushes += 1;
    }

    /// Ends the current epoch: returns its writes and starts `next`.
    fn rotate(&mut self, next: Epoch) -> EpochWrites {
        self.bytes = 0;
        std::mem::replace(
            &mut self.current,
            EpochWrites {
                epoch: next,
                ..EpochWrites::default()
            },
        )
    }
}

/// A disk's replication port. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlockPort {
    path: PathBuf,
    journal: Arc<Mutex<Journal>>,
    flush: Arc<EventFd>,
}

impl BlockPort {
    pub(crate) fn new(path: PathBuf, journal: Arc<Mutex<Journal>>, flush: Arc<EventFd>) -> Self {
        Self {
            path,
            journal,
            flush,
        }
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        lock(&self.journal)
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ends the current epoch: returns its writes (in the order they were served) and starts
    /// epoch `next`. Atomic with respect to the device: a batch of requests is journaled whole
    /// in one epoch. Call it in the pause, after saving the devices (see the module docs).
    pub fn take_epoch(&self, next: Epoch) -> EpochWrites {
        let writes = self.journal().rotate(next);
        tracing::trace!(
            path = %self.path.display(),
            epoch = writes.epoch,
            writes = writes.writes.len(),
            bytes = writes.bytes(),
            "disk writes taken"
        );
        writes
    }

    /// The epoch writes are recorded under now.
    pub fn epoch(&self) -> Epoch {
        self.journal().current.epoch
    }

    /// Bytes journaled in the current epoch.
    pub fn pending_bytes(&self) -> usize {
        self.journal().bytes
    }

    /// Readable after the guest flushed the disk; the engine reads it and may end the epoch.
    pub fn flush_event(&self) -> &EventFd {
        &self.flush
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_rotates_per_epoch() {
        let journal = Arc::new(Mutex::new(Journal::new(3)));
        let port = BlockPort::new(
            PathBuf::from("disk.img"),
            journal.clone(),
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        );
        lock(&journal).record(512, vec![1; 512]);
        lock(&journal).flushed();
        lock(&journal).record(0, vec![2; 1024]);
        assert_eq!(port.pending_bytes(), 1536);
        let three = port.take_epoch(4);
        assert_eq!(three.epoch, 3);
        assert_eq!(three.flushes, 1);
        assert_eq!(three.bytes(), 1536);
        assert_eq!(
            three.writes.iter().map(|w| w.offset).collect::<Vec<_>>(),
            vec![512, 0]
        );
        assert_eq!(port.epoch(), 4);
        assert_eq!(port.pending_bytes(), 0);
        assert_eq!(
            port.take_epoch(5),
            EpochWrites {
                epoch: 4,
                ..EpochWrites::default()
            }
        );
    }

    #[test]
    fn injected_frames_queue_in_order_and_wake_once_per_batch() {
        let injector = Injector::new().unwrap();
        assert_eq!(injector.push(Vec::new()).unwrap(), 0);
        assert!(injector.wake_event().read().is_err());
        assert_eq!(injector.push([vec![1], vec![2]]).unwrap(), 2);
        assert_eq!(injector.push([vec![3]]).unwrap(), 1);
        assert_eq!(injector.wake_event().read().unwrap(), 2);
        assert_eq!(injector.take(), VecDeque::from([vec![1], vec![2], vec![3]]));
        assert!(injector.take().is_empty());
    }

    #[test]
    fn set_replication_reaches_every_virtio_device_in_order() {
        use std::io::Write as _;

        use vm_memory::GuestAddress;
        use vmm_sys_util::tempfile::TempFile;

        use crate::devices::virtio::block::Block;
        use crate::devices::virtio::mmio::MmioTransport;
        use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
        use crate::vstate::memory::GuestMemoryMmap;

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let images: Vec<TempFile> = (0..2)
            .map(|_| {
                let image = TempFile::new().unwrap();
                image.as_file().write_all(&[0; 4096]).unwrap();
                image
            })
            .collect();
        let virtio: Vec<VirtioSlot> = images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let block: Arc<Mutex<dyn VirtioDevice>> =
                    Arc::new(Mutex::new(Block::new(image.as_path(), false).unwrap()));
                let interrupt = Arc::new(VirtioInterrupt::new(
                    EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ));
                VirtioSlot {
                    base: 0xd000_0000 + 0x1000 * i as u64,
                    irq: 5 + i as u32,
                    transport: Arc::new(Mutex::new(MmioTransport::new(
                        mem.clone(),
                        block,
                        interrupt,
                    ))),
                }
            })
            .collect();
        let ports = set_replication_on(
            &virtio,
            ReplicationMode::On {
                epoch: 5,
                inbound_capacity: DEFAULT_INBOUND_CAPACITY,
            },
        );
        assert!(ports.net.is_empty());
        let paths: Vec<&Path> = ports.block.iter().map(BlockPort::path).collect();
        assert_eq!(paths, vec![images[0].as_path(), images[1].as_path()]);
        assert!(ports.block.iter().all(|port| port.epoch() == 5));
        let taken = ports.switch().begin_epoch(6);
        assert_eq!(
            taken.iter().map(|w| w.epoch).collect::<Vec<_>>(),
            vec![5, 5]
        );
        assert!(ports.block.iter().all(|port| port.epoch() == 6));
        assert_eq!(ports.release_through(6), 0);
        assert_eq!(ports.discard_after(6), 0);
        let off = set_replication_on(&virtio, ReplicationMode::Off);
        assert_eq!(off.block.len(), 2);
    }
}
