//! The virtio-net device model (virtio spec 1.1 §5.1) over a [`Tap`]: features, configuration
//! space, and the receive and transmit data paths with the egress gate and the ingress tap on
//! them.
//!
//! The model knows nothing of transports or event loops: its owner calls
//! [`NetDevice::process_tx`] when the driver kicks the transmit queue or the gate's room event
//! fires, [`NetDevice::process_rx`] when the TAP is readable or the driver kicks the receive
//! queue, and [`NetDevice::process_ctrl`] when the driver kicks the control queue; each
//! returns whether the driver must be interrupted.
//!
//! **Announce.** [`NetDevice::announce`] (after the guest moved to this host) sends a RARP from
//! the guest's MAC out of the TAP ([`crate::announce`]) and, if the driver negotiated
//! `VIRTIO_NET_F_GUEST_ANNOUNCE`, sets `VIRTIO_NET_S_ANNOUNCE` in the configuration space's
//! `status`; the owner then signals a configuration change. The driver announces the guest
//! itself (Linux: gratuitous ARPs and IPv6 neighbour advertisements for each of its
//! addresses) and acknowledges on the control queue ([`crate::ctrl`]), which clears the bit.
//! Both are sent: the RARP reaches the bridges at once and covers drivers without the
//! feature; the guest's own announcements update its peers' neighbour caches, which a RARP
//! does not.
//!
//! Guest memory is generic over vm-memory's [`GuestMemory`] and is written only through it, so
//! a dirty bitmap behind it (the vmm's `GuestMemoryMmap<AtomicBitmap>`) sees every byte the
//! device writes: frame data, headers, and ring updates.
//!
//! **Receive.** A frame is read from the TAP into a bounce buffer, then copied into the
//! driver's buffers. With `VIRTIO_NET_F_MRG_RXBUF` (offered, and what Linux uses) it may span
//! several buffers; they are all returned at once with `num_buffers` set. When the driver has
//! not made enough buffers available, the frame waits in the device (the buffers taken are put
//! back), the device asks to be notified when more arrive, and the TAP is not read meanwhile:
//! the kernel queues (and past its queue length drops) further frames. Without `MRG_RXBUF`
//! each frame takes one buffer; a frame larger than the buffer is dropped and the buffer left
//! to the next frame.
//!
//! **Transmit.** Each chain is gathered into a frame (its 12-byte header first) and handed to
//! the [`Egress`] gate, which writes it to the TAP or holds it; the chain is returned at once.
//! When the gate is full the chain is left in the ring and transmission stops until the gate
//! signals room.
//!
//! **Save and restore.** Between two calls of the data path the device holds no descriptor
//! chain (chains taken for a frame that did not fit are put back at once), so its queues are
//! fully described by their indices, which the transport saves. What the device alone holds is
//! in [`NetState`]: the features, the MAC, the inbound frames not yet delivered (the one waiting
//! for buffers and the injected backlog), the egress gate with its held frames, the counters,
//! and whether an announce waits for the driver's acknowledgement. Frames still queued in the
//! host kernel's TAP are not: they belong to the TAP. The control queue, like the others, is
//! described by its indices alone (a request is answered in the call that takes it).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::num::Wrapping;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::ctrl::{self, Ack, Command};
use crate::features::{self, has, BASE_FEATURES, OFFLOAD_FEATURES};
use crate::gate::{Admission, Egress, EgressState};
use crate::header::{self, VNET_HDR_LEN};
use crate::ingress::{IngressFrame, IngressSink, Mirrored};
use crate::mac::MacAddr;
use crate::ring::{self, Notifier};
use crate::tap::{Tap, TapError};

/// Largest frame the device moves, header included: a 64 KiB segment behind an Ethernet header
/// with a VLAN tag.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_536 + 18;
/// Smallest frame the device delivers: a header and an Ethernet header.
const MIN_FRAME_LEN: usize = VNET_HDR_LEN + 14;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Length of the configuration space the device fills in: `mac` and `status`.
pub const CONFIG_LEN: usize = 8;

/// Errors of the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The egress gate's eventfd cannot be created.
    #[error("cannot create the egress gate's eventfd: {0}")]
    EventFd(std::io::Error),
    /// The TAP offloads cannot be set for the features the driver accepted.
    #[error(transparent)]
    SetOffload(TapError),
    /// A queue operation on guest memory failed (the driver set up a broken ring).
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The driver's available index runs more than a queue ahead of the device (or its ring
    /// cannot be read): a broken driver. The queue is left alone until the next kick.
    #[error("the {0} queue's available ring is invalid")]
    InvalidAvailRing(&'static str),
    /// Reading a frame from the TAP failed.
    #[error("cannot read from TAP {tap}: {source}")]
    TapRead {
        /// The TAP name.
        tap: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A restore asked for features this device cannot offer (e.g. offloads on a TAP without
    /// them), or a saved state that accepted features it did not offer.
    #[error(
        "the saved device offered {saved_offered:#x} and the driver accepted {saved_acked:#x}, \
         but a device on TAP {tap} offers only {offered:#x}"
    )]
    Features {
        /// The TAP of the restored device.
        tap: String,
        /// Features the saved device offered.
        saved_offered: u64,
        /// Features its driver accepted.
        saved_acked: u64,
        /// Features the new device can offer.
        offered: u64,
    },
    /// A saved inbound frame is longer than the device can hold.
    #[error("a saved inbound frame of {len} bytes exceeds {MAX_FRAME_LEN}")]
    SavedFrameTooLong {
        /// Its length.
        len: usize,
    },
}

/// Why a transmit chain was dropped.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("device-writable buffer in a transmit chain")]
    WriteOnly,
    #[error("frame longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("frame shorter than its virtio-net header")]
    TooShort,
    #[error("cannot read guest memory: {0}")]
    Memory(GuestMemoryError),
}

/// Counters of the data path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest, headers excluded.
    pub rx_bytes: u64,
    /// Inbound frames dropped: too large for the driver's buffers, an offload the driver did
    /// not accept, too short, or a broken buffer.
    pub rx_dropped: u64,
    /// Frames taken from the guest's transmit queue.
    pub tx_frames: u64,
    /// Bytes taken from the guest's transmit queue, headers excluded.
    pub tx_bytes: u64,
    /// Transmit chains dropped as malformed.
    pub tx_malformed: u64,
    /// Mirrored copies lost because the ingress sink was full.
    pub ingress_lost: u64,
}

/// The saved state of a [`NetDevice`] (see the module docs). The ingress sink is not part of
/// it: the restorer connects a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The TAP the device was on (a restore may use another).
    pub tap_name: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The inbound frame (header included) taken from the TAP or the backlog and waiting for
    /// receive buffers.
    pub rx_waiting: Option<Vec<u8>>,
    /// Injected frames not yet taken, in order.
    pub rx_backlog: Vec<Vec<u8>>,
    /// The egress gate, with its held frames and their epochs.
    pub egress: EgressState,
    /// The data-path counters.
    pub stats: NetStats,
    /// `VIRTIO_NET_S_ANNOUNCE` is set: the device asked the driver to announce the guest and
    /// waits for its `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
    ///
    /// Not in this struct's own serde encoding: postcard, which the vmm's state file and wire
    /// protocols use, encodes fields by position, so a field here would shift those after it
    /// for readers of older minor versions. The vmm carries it in an addition at the end of
    /// its devices' state (see `vmm::devices::DevicesState`).
    #[serde(skip)]
    pub announce_pending: bool,
}

/// What became of the waiting inbound frame.
enum Delivery {
    /// In the guest's buffers; its length (header included).
    Delivered(usize),
    /// Dropped.
    Dropped,
    /// Waiting for buffers; the available index the device has seen.
    NoBuffers(Wrapping<u16>),
}

/// Receive-side state.
struct Rx {
    /// Bounce buffer; holds the waiting frame (header included) when `len` is set.
    buf: Vec<u8>,
    len: Option<usize>,
    /// Frames to deliver before reading the TAP again ([`NetDevice::inject_rx`]).
    backlog: VecDeque<Vec<u8>>,
    /// The device asked the driver for buffers and waits for them.
    starved: bool,
    /// Chains taken for the waiting frame: (head index, bytes written).
    heads: Vec<(u16, u32)>,
    /// Their device-writable buffers: (index in `heads`, address, length).
    segs: Vec<(usize, GuestAddress, u32)>,
}

/// The virtio-net device: a TAP, a MAC, negotiated features, the egress gate, the ingress tap,
/// and the inbound frame waiting for a buffer.
pub struct NetDevice {
    tap: Arc<Tap>,
    mac: MacAddr,
    avail_features: u64,
    acked_features: u64,
    egress: Egress,
    ingress: Option<Box<dyn IngressSink>>,
    rx: Rx,
    tx_frame: Vec<u8>,
    rx_notifier: Notifier,
    tx_notifier: Notifier,
    ctrl_notifier: Notifier,
    stats: NetStats,
    /// `VIRTIO_NET_S_ANNOUNCE` is set in `status`.
    announce_pending: bool,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac.to_string())
            .field(
                "avail_features",
                &format_args!("{:#x}", self.avail_features),
            )
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl NetDevice {
    /// A device on `tap` with MAC `mac`, its gate in pass-through mode. Offloads are offered if
    /// the TAP supports them.
    pub fn new(tap: Tap, mac: MacAddr) -> Result<Self, NetError> {
        if !mac.is_unicast() {
            tracing::warn!(%mac, "virtio-net: the guest's MAC is a multicast address");
        }
        let mut avail_features = BASE_FEATURES;
        if tap.offload_supported() {
            avail_features |= OFFLOAD_FEATURES;
        }
        let tap = Arc::new(tap);
        let egress = Egress::new(tap.clone()).map_err(NetError::EventFd)?;
        Ok(Self {
            tap,
            mac,
            avail_features,
            acked_features: 0,
            egress,
            ingress: None,
            rx: Rx {
                buf: vec![0; MAX_FRAME_LEN],
                len: None,
                backlog: VecDeque::new(),
                starved: false,
                heads: Vec::new(),
                segs: Vec::new(),
            },
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            rx_notifier: Notifier::default(),
            tx_notifier: Notifier::default(),
            ctrl_notifier: Notifier::default(),
            stats: NetStats::default(),
            announce_pending: false,
        })
    }

    /// Captures the device's state (call it between two calls of the data path).
    pub fn save(&self) -> NetState {
        NetState {
            tap_name: self.tap.name().to_string(),
            mac: self.mac,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            rx_waiting: self.rx.len.map(|len| self.rx.buf[..len].to_vec()),
            rx_backlog: self.rx.backlog.iter().cloned().collect(),
            egress: self.egress.save(),
            stats: self.stats,
            announce_pending: self.announce_pending,
        }
    }

    /// A device on `tap` (which may differ from the saved one) in the state `state`: the same
    /// MAC and offered features, the accepted features applied to the TAP's offloads (so the
    /// TAP hands over only what the driver negotiated), the undelivered inbound frames, the
    /// egress gate and the counters. [`NetDevice::activate`] follows, with the restored queues.
    ///
    /// Fails if this TAP cannot offer what the saved device offered.
    pub fn restore(tap: Tap, state: &NetState) -> Result<Self, NetError> {
        let mut dev = NetDevice::new(tap, state.mac)?;
        let wanted = state.avail_features | state.acked_features;
        if wanted & !dev.avail_features != 0 || state.acked_features & !state.avail_features != 0 {
            return Err(NetError::Features {
                tap: dev.tap.name().to_string(),
                saved_offered: state.avail_features,
                saved_acked: state.acked_features,
                offered: dev.avail_features,
            });
        }
        dev.avail_features = state.avail_features;
        dev.set_acked_features(state.acked_features)?;
        if let Some(frame) = &state.rx_waiting {
            let len = frame.len();
            let buf = dev
                .rx
                .buf
                .get_mut(..len)
                .ok_or(NetError::SavedFrameTooLong { len })?;
            buf.copy_from_slice(frame);
            dev.rx.len = Some(len);
        }
        dev.rx.backlog = state.rx_backlog.iter().cloned().collect();
        dev.egress.restore(&state.egress);
        dev.stats = state.stats;
        dev.announce_pending = state.announce_pending;
        tracing::debug!(
            tap = dev.tap.name(),
            saved_tap = state.tap_name,
            rx_waiting = state.rx_waiting.is_some(),
            rx_backlog = state.rx_backlog.len(),
            held = state.egress.held.len(),
            "virtio-net: device restored"
        );
        Ok(dev)
    }

    /// Stops offering checksum and segmentation offloads (before the driver negotiates).
    pub fn without_offloads(mut self) -> Self {
        self.avail_features &= !OFFLOAD_FEATURES;
        self
    }

    /// The TAP.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Features offered (see [`crate::features`]).
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the features the driver accepted (only those offered are kept) and sets the
    /// TAP's offloads to match.
    pub fn set_acked_features(&mut self, features: u64) -> Result<(), NetError> {
        let unknown = features & !self.avail_features;
        if unknown != 0 {
            tracing::warn!(unknown, "virtio-net: driver accepted features not offered");
        }
        self.acked_features = features & self.avail_features;
        if self.tap.offload_supported() {
            self.tap
                .set_offload(features::tap_offload(self.acked_features))
                .map_err(NetError::SetOffload)?;
        }
        Ok(())
    }

    /// `struct virtio_net_config` up to `status`: the MAC, then link up and, while an announce
    /// waits for the driver, `VIRTIO_NET_S_ANNOUNCE`.
    pub fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut status = VIRTIO_NET_S_LINK_UP as u16;
        if self.announce_pending {
            status |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config
    }

    /// Announces the guest on its TAP after it moved here (see the module docs): sends the
    /// RARP and, if the driver negotiated `VIRTIO_NET_F_GUEST_ANNOUNCE`, asks it to announce
    /// itself. Returns whether the configuration space changed, when the owner must signal a
    /// configuration change to the driver.
    pub fn announce(&mut self) -> bool {
        if let Err(err) = crate::announce::announce(&self.tap, self.mac) {
            tracing::warn!(%err, tap = self.tap.name(), "virtio-net: cannot send the RARP");
        }
        if !has(self.acked_features, VIRTIO_NET_F_GUEST_ANNOUNCE) {
            return false;
        }
        self.announce_pending = true;
        true
    }

    /// Whether `VIRTIO_NET_S_ANNOUNCE` is set (the driver has not acknowledged the announce).
    pub fn announce_pending(&self) -> bool {
        self.announce_pending
    }

    /// The egress gate; clone it to drive epochs from another thread.
    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Mirrors every inbound frame delivered to the guest to `sink` from now on (`None`: stop).
    pub fn set_ingress_tap(&mut self, sink: Option<Box<dyn IngressSink>>) {
        self.ingress = sink;
    }

    /// Queues `frame` (a 12-byte virtio-net header, then an Ethernet frame: the form of
    /// [`IngressFrame::data`]) for delivery to the guest ahead of what the TAP has; it goes in
    /// on the next [`NetDevice::process_rx`].
    pub fn inject_rx(&mut self, frame: Vec<u8>) {
        self.rx.backlog.push_back(frame);
    }

    /// Data-path counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Starts the data path on the driver's queues (after feature negotiation).
    pub fn activate(&mut self, rx_queue: &Queue, tx_queue: &Queue) {
        self.rx_notifier = Notifier::new(rx_queue);
        self.tx_notifier = Notifier::new(tx_queue);
        self.rx.starved = false;
    }

    /// Starts serving the control queue (with `VIRTIO_NET_F_CTRL_VQ`, after
    /// [`NetDevice::activate`]).
    pub fn activate_ctrl(&mut self, ctrl_queue: &Queue) {
        self.ctrl_notifier = Notifier::new(ctrl_queue);
    }

    /// Driver reset: forgets the features, turns the TAP offloads off, and drops the frames
    /// waiting for the guest. The egress gate keeps what it holds.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        if self.tap.offload_supported() {
            if let Err(err) = self.tap.set_offload(0) {
                tracing::error!(%err, "virtio-net: cannot turn the TAP offloads off");
            }
        }
        self.rx.len = None;
        self.rx.backlog.clear();
        self.rx.starved = false;
        self.announce_pending = false;
    }

    /// Answers every request the driver queued on the control queue; returns whether the driver
    /// must be interrupted.
    pub fn process_ctrl<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        drain_queue(mem, queue, "control", |chain| {
            let head = chain.head_index();
            let (written, err) = ctrl::serve(mem, chain, |command| self.control(command));
            if let Some(err) = err {
                tracing::warn!(%err, head, "virtio-net: malformed control request");
            }
            Taken::Used(written)
        })?;
        Ok(self.ctrl_notifier.needs_notification(mem, queue)?)
    }

    /// Carries out a control command.
    fn control(&mut self, command: Command) -> Ack {
        match command {
            Command::AnnounceAck if has(self.acked_features, VIRTIO_NET_F_GUEST_ANNOUNCE) => {
                tracing::info!(
                    tap = self.tap.name(),
                    "virtio-net: the guest announced itself"
                );
                self.announce_pending = false;
                Ack::Ok
            }
            command => {
                tracing::debug!(?command, "virtio-net: control command refused");
                Ack::Err
            }
        }
    }

    /// Sends every frame the driver queued for transmission (until the gate is full); returns
    /// whether the driver must be interrupted.
    pub fn process_tx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        drain_queue(mem, queue, "transmit", |chain| {
            let head = chain.head_index();
            match gather(mem, chain, &mut self.tx_frame) {
                Ok(()) => match self.egress.send(&self.tx_frame) {
                    // Leave the chain to the driver's ring; room brings us back.
                    Admission::Full => return Taken::PutBack,
                    Admission::Send | Admission::Held | Admission::Dropped => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += (self.tx_frame.len() - VNET_HDR_LEN) as u64;
                    }
                },
                Err(err) => {
                    self.stats.tx_malformed += 1;
                    tracing::warn!(%err, head, "virtio-net: transmit chain dropped");
                }
            }
            Taken::Used(0)
        })?;
        Ok(self.tx_notifier.needs_notification(mem, queue)?)
    }

    /// Moves inbound frames into the driver's receive buffers until the TAP is empty or the
    /// buffers run out; returns whether the driver must be interrupted.
    pub fn process_rx<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        // The available index at the last shortage: no progress past it means a broken ring.
        let mut last_seen = None;
        loop {
            if self.rx.len.is_none() && !self.next_rx_frame()? {
                break;
            }
            match self.deliver(mem, queue)? {
                Delivery::Delivered(len) => {
                    self.rx.len = None;
                    self.delivered(len);
                    if self.rx.starved {
                        // Buffers again: no need to hear of each new one.
                        self.rx.starved = false;
                        queue.disable_notification(mem)?;
                    }
                }
                Delivery::Dropped => self.rx.len = None,
                Delivery::NoBuffers(seen) => {
                    let more = ring::wait_for_avail(mem, queue, seen)?;
                    if more && last_seen != Some(seen) {
                        last_seen = Some(seen);
                        continue;
                    }
                    self.rx.starved = true;
                    if more {
                        return Err(NetError::InvalidAvailRing("receive"));
                    }
                    break;
                }
            }
        }
        Ok(self.rx_notifier.needs_notification(mem, queue)?)
    }

    /// Whether a frame waits in the device for receive buffers.
    pub fn rx_pending(&self) -> bool {
        self.rx.len.is_some()
    }

    /// Puts the next inbound frame (injected first, then from the TAP) in the bounce buffer;
    /// false when there is none.
    fn next_rx_frame(&mut self) -> Result<bool, NetError> {
        loop {
            let len = if let Some(frame) = self.rx.backlog.pop_front() {
                if frame.len() > MAX_FRAME_LEN {
                    self.stats.rx_dropped += 1;
                    continue;
                }
                self.rx.buf[..frame.len()].copy_from_slice(&frame);
                frame.len()
            } else {
                match self.tap.read_frame(&mut self.rx.buf) {
                    Ok(n) => n,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => return Ok(false),
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) if err.raw_os_error() == Some(libc::EFAULT) => {
                        // Larger than the bounce buffer: the kernel dropped it.
                        self.stats.rx_dropped += 1;
                        continue;
                    }
                    Err(source) => {
                        return Err(NetError::TapRead {
                            tap: self.tap.name().to_string(),
                            source,
                        })
                    }
                }
            };
            if len < MIN_FRAME_LEN {
                self.stats.rx_dropped += 1;
                continue;
            }
            if !header::fit_for_driver(&mut self.rx.buf[..VNET_HDR_LEN], self.acked_features) {
                self.stats.rx_dropped += 1;
                tracing::debug!("virtio-net: inbound frame with an offload the driver refused");
                continue;
            }
            self.rx.len = Some(len);
            return Ok(true);
        }
    }

    /// Gives back the chains taken for the waiting frame.
    fn rewind(&mut self, queue: &mut Queue) {
        for _ in 0..self.rx.heads.len() {
            queue.go_to_previous_position();
        }
        self.rx.heads.clear();
    }

    /// Copies the waiting frame into the driver's buffers, if there are enough.
    fn deliver<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<Delivery, NetError> {
        let len = self.rx.len.expect("a frame is waiting");
        let mergeable = has(self.acked_features, VIRTIO_NET_F_MRG_RXBUF);
        self.rx.heads.clear();
        self.rx.segs.clear();
        let mut capacity = 0usize;
        while capacity < len {
            if (!mergeable && !self.rx.heads.is_empty())
                || self.rx.heads.len() == usize::from(queue.size())
            {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                let seen = Wrapping(queue.next_avail());
                self.rewind(queue);
                return Ok(Delivery::NoBuffers(seen));
            };
            let index = self.rx.heads.len();
            self.rx.heads.push((chain.head_index(), 0));
            for desc in chain.writable() {
                self.rx.segs.push((index, desc.addr(), desc.len()));
                capacity += desc.len() as usize;
            }
        }
        if capacity < len {
            // The driver's buffers cannot hold this frame (without merging, or even all of them
            // together): drop it and leave the buffers to the next frame.
            self.rewind(queue);
            self.stats.rx_dropped += 1;
            tracing::debug!(
                len,
                capacity,
                "virtio-net: inbound frame too large, dropped"
            );
            return Ok(Delivery::Dropped);
        }
        header::set_num_buffers(&mut self.rx.buf[..VNET_HDR_LEN], self.rx.heads.len() as u16);
        let mut written = 0;
        for &(index, addr, seg_len) in &self.rx.segs {
            if written == len {
                break;
            }
            let n = (seg_len as usize).min(len - written);
            if let Err(err) = mem.write_slice(&self.rx.buf[written..written + n], addr) {
                tracing::warn!(%err, "virtio-net: receive buffer outside guest memory");
                for used in &mut self.rx.heads {
                    used.1 = 0;
                }
                ring::add_used_batch(mem, queue, &self.rx.heads)?;
                self.stats.rx_dropped += 1;
                return Ok(Delivery::Dropped);
            }
            self.rx.heads[index].1 += n as u32;
            written += n;
        }
        ring::add_used_batch(mem, queue, &self.rx.heads)?;
        Ok(Delivery::Delivered(len))
    }

    /// Counts a delivered frame and mirrors it.
    fn delivered(&mut self, len: usize) {
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
        let Some(sink) = self.ingress.as_mut() else {
            return;
        };
        let mut data = self.rx.buf[..len].to_vec();
        header::set_num_buffers(&mut data, 0);
        let frame = IngressFrame {
            epoch: self.egress.epoch(),
            data,
        };
        match sink.mirror(frame) {
            Mirrored::Taken => {}
            Mirrored::Lost => self.stats.ingress_lost += 1,
            Mirrored::Closed => {
                tracing::info!(tap = self.tap.name(), "virtio-net: ingress tap closed");
                self.ingress = None;
            }
        }
    }
}

/// What became of a chain [`drain_queue`] handed over.
enum Taken {
    /// Returned to the driver with this many bytes written.
    Used(u32),
    /// Put back in the driver's ring; the queue stops there.
    PutBack,
}

/// Hands every chain the driver made available on `queue` (the `what` queue) to `take`, until
/// the ring is empty with notifications enabled again, or `take` puts a chain back (then
/// notifications stay off). A ring whose available index says more than it gives is an error.
fn drain_queue<'m, M: GuestMemory>(
    mem: &'m M,
    queue: &mut Queue,
    what: &'static str,
    mut take: impl FnMut(DescriptorChain<&'m M>) -> Taken,
) -> Result<(), NetError> {
    // Rounds in a row that found nothing although the available index said otherwise.
    let mut idle_rounds = 0;
    loop {
        queue.disable_notification(mem)?;
        idle_rounds += 1;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            idle_rounds = 0;
            let head = chain.head_index();
            match take(chain) {
                Taken::Used(len) => queue.add_used(mem, head, len)?,
                Taken::PutBack => {
                    queue.go_to_previous_position();
                    return Ok(());
                }
            }
        }
        if !queue.enable_notification(mem)? {
            return Ok(());
        }
        // One empty round can be a race with the driver; two cannot.
        if idle_rounds >= 2 {
            return Err(NetError::InvalidAvailRing(what));
        }
    }
}

/// Copies the device-readable buffers of `chain` into `out` (cleared first).
fn gather<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    out: &mut Vec<u8>,
) -> Result<(), ChainError> {
    out.clear();
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::WriteOnly);
        }
        let start = out.len();
        let len = desc.len() as usize;
        if start + len > MAX_FRAME_LEN {
            return Err(ChainError::TooLong);
        }
        out.resize(start + len, 0);
        mem.read_slice(&mut out[start..], desc.addr())
            .map_err(ChainError::Memory)?;
    }
    if out.len() < VNET_HDR_LEN {
        return Err(ChainError::TooShort);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR,
        VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_OK,
    };
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;
    use crate::gate::GateMode;
    use crate::testutil::{
        ether_frame, ip, memory, read_tap_until, with_header, Mem, NetNs, TapPeer, TestQueue,
    };

    const MAC: [u8; 6] = [6, 0, 0, 0, 0, 2];
    const BUF: u64 = 0x1_0000;
    const PLAIN: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC;
    const MERGE: u64 = PLAIN | 1 << VIRTIO_NET_F_MRG_RXBUF;

    /// A device on a fresh TAP, driver features `acked` accepted, and the TAP's host side.
    fn device(ns: &NetNs, tag: &str, acked: u64) -> (NetDevice, TapPeer) {
        let (tap, peer) = TapPeer::new(ns, tag);
        let mut dev = NetDevice::new(tap, MacAddr(MAC)).unwrap();
        dev.set_acked_features(acked).unwrap();
        (dev, peer)
    }

    fn read_guest(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    /// Waits until the TAP has something to read (the kernel queues frames asynchronously).
    fn wait_readable(dev: &NetDevice) {
        let mut pfd = libc::pollfd {
            fd: dev.tap().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(n, 1, "the TAP never became readable");
    }

    #[test]
    fn config_space_and_features() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, _peer) = device(&ns, "cfg", 0);
        assert_eq!(&dev.config_space()[..6], &MAC);
        assert_eq!(dev.config_space()[6..], [VIRTIO_NET_S_LINK_UP as u8, 0]);
        assert_eq!(dev.mac(), MacAddr(MAC));
        dev.set_acked_features(u64::MAX).unwrap();
        assert_eq!(dev.acked_features(), dev.avail_features());
        assert_eq!(dev.avail_features() & BASE_FEATURES, BASE_FEATURES);
        assert_eq!(
            dev.avail_features() & OFFLOAD_FEATURES != 0,
            dev.tap().offload_supported()
        );
        let dev = dev.without_offloads();
        assert_eq!(dev.avail_features(), BASE_FEATURES);
    }

    /// Features with the announce: a driver like Linux's with only these offered.
    const ANNOUNCE: u64 = MERGE | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;
    const ACK_AT: u64 = BUF + 0x100;

    /// Queues a control request `{class, command}` with its ack byte (preset to 0xff).
    fn queue_ctrl(mem: &Mem, tq: &mut TestQueue, class: u8, command: u8) {
        mem.write_slice(&[class, command], GuestAddress(BUF))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(ACK_AT)).unwrap();
        tq.add_chain(&[(BUF, 2, false), (ACK_AT, 1, true)]);
    }

    fn ack_byte(mem: &Mem) -> u32 {
        mem.read_obj::<u8>(GuestAddress(ACK_AT)).unwrap().into()
    }

    fn status(dev: &NetDevice) -> u32 {
        u16::from_le_bytes([dev.config_space()[6], dev.config_space()[7]]).into()
    }

    #[test]
    fn the_announce_is_offered_with_its_control_queue() {
        let Some(ns) = NetNs::enter() else { return };
        let (dev, _peer) = device(&ns, "feat", 0);
        let offered = dev.without_offloads().avail_features();
        assert_ne!(offered & 1 << VIRTIO_NET_F_CTRL_VQ, 0);
        assert_ne!(offered & 1 << VIRTIO_NET_F_GUEST_ANNOUNCE, 0);
        // Nothing the control queue would have to serve beyond the announce.
        for not_offered in [
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_VLAN,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ] {
            assert_eq!(offered & 1 << not_offered, 0, "bit {not_offered}");
        }
    }

    #[test]
    fn announce_with_the_feature_asks_the_driver_and_its_ack_clears_the_bit() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "ann", ANNOUNCE);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0x8000, 16);
        let mut queue = tq.queue(false);
        dev.activate_ctrl(&queue);
        assert_eq!(status(&dev), VIRTIO_NET_S_LINK_UP);

        // The RARP leaves, and the status asks the driver to announce: a configuration change.
        assert!(dev.announce(), "no configuration change");
        let rarp = peer.recv_matching(&[0xff; 6]);
        assert_eq!(&rarp[..], &crate::announce::rarp_frame(MacAddr(MAC))[..]);
        assert!(dev.announce_pending());
        assert_eq!(status(&dev), VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE);
        assert_eq!(
            status(&dev.restored_for_test(&ns, "ann2")),
            VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE,
            "the saved state keeps the pending announce"
        );

        // The driver's VIRTIO_NET_CTRL_ANNOUNCE_ACK: answered OK, the bit cleared.
        queue_ctrl(&mem, &mut tq, 3, 0);
        assert!(dev.process_ctrl(&mem, &mut queue).unwrap(), "interrupt");
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used_elem(0), (0, 1));
        assert_eq!(ack_byte(&mem), VIRTIO_NET_OK);
        assert!(!dev.announce_pending());
        assert_eq!(status(&dev), VIRTIO_NET_S_LINK_UP);

        // A class the device does not serve (VIRTIO_NET_CTRL_RX, promiscuous on): ERR.
        queue_ctrl(&mem, &mut tq, 0, 0);
        assert!(dev.process_ctrl(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_elem(1), (2, 1));
        assert_eq!(ack_byte(&mem), VIRTIO_NET_ERR);
        // An unknown command of the announce class: ERR, and the bit stays as it was.
        assert!(dev.announce());
        queue_ctrl(&mem, &mut tq, 3, 7);
        dev.process_ctrl(&mem, &mut queue).unwrap();
        assert_eq!(ack_byte(&mem), VIRTIO_NET_ERR);
        assert!(dev.announce_pending());
        // A driver reset forgets it.
        dev.reset();
        assert!(!dev.announce_pending());
    }

    #[test]
    fn announce_without_the_feature_only_sends_the_rarp() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "noann", MERGE);
        assert!(
            !dev.announce(),
            "a configuration change without the feature"
        );
        assert!(!dev.announce_pending());
        assert_eq!(status(&dev), VIRTIO_NET_S_LINK_UP);
        let rarp = peer.recv_matching(&[0xff; 6]);
        assert_eq!(&rarp[12..14], &[0x80, 0x35]);

        // Without the feature an ANNOUNCE_ACK is refused.
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0x8000, 16);
        let mut queue = tq.queue(false);
        dev.activate_ctrl(&queue);
        queue_ctrl(&mem, &mut tq, 3, 0);
        dev.process_ctrl(&mem, &mut queue).unwrap();
        assert_eq!(ack_byte(&mem), VIRTIO_NET_ERR);
    }

    #[test]
    fn malformed_control_chains_are_returned_not_fatal() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, _peer) = device(&ns, "ctlbad", ANNOUNCE);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0x8000, 16);
        tq.add_chain(&[(BUF, 2, false)]); // no ack byte
        tq.add_chain(&[(ACK_AT, 1, true)]); // no header
        tq.add_chain(&[(0xffff_0000, 2, false), (ACK_AT, 1, true)]); // outside guest memory
        tq.add_chain(&[(BUF, 2, true), (ACK_AT, 1, false)]); // writable before readable
        let mut queue = tq.queue(false);
        dev.activate_ctrl(&queue);
        assert!(dev.process_ctrl(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_idx(), 4);
        assert_eq!(tq.used_elem(0).1, 0, "nowhere to answer");
        assert_eq!(tq.used_elem(1).1, 1);
        assert_eq!(tq.used_elem(2).1, 1);
        // A broken available index is an error, as on the data queues.
        tq.set_avail_idx(100);
        assert!(matches!(
            dev.process_ctrl(&mem, &mut queue),
            Err(NetError::InvalidAvailRing("control"))
        ));
    }

    #[test]
    fn a_state_without_the_announce_restores_with_none_pending() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, _peer) = device(&ns, "old", ANNOUNCE);
        assert!(dev.announce());
        let mut json: serde_json::Value = serde_json::to_value(dev.save()).unwrap();
        // The field is not in the struct's own encoding (the vmm carries it, see NetState).
        assert!(json.get("announce_pending").is_none());
        json.as_object_mut().unwrap().remove("announce_pending");
        let old: NetState = serde_json::from_value(json).unwrap();
        assert!(!old.announce_pending);
        let (tap, _peer2) = TapPeer::new(&ns, "old2");
        let restored = NetDevice::restore(tap, &old).unwrap();
        assert!(!restored.announce_pending());
        assert_eq!(restored.acked_features(), ANNOUNCE);
        assert_eq!(status(&restored), VIRTIO_NET_S_LINK_UP);
    }

    impl NetDevice {
        /// This device saved and restored on a fresh TAP `tag`.
        fn restored_for_test(&self, ns: &NetNs, tag: &str) -> NetDevice {
            let (tap, _peer) = TapPeer::new(ns, tag);
            NetDevice::restore(tap, &self.save()).unwrap()
        }
    }

    #[test]
    fn tx_frames_reach_the_tap_interface() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "tx", MERGE);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let out = ether_frame([0xff; 6], b"hello from the guest");
        let framed = with_header(&out);
        mem.write_slice(&framed, GuestAddress(BUF)).unwrap();
        // Header and frame in two buffers, as a driver may lay them out.
        tq.add_chain(&[
            (BUF, VNET_HDR_LEN as u32, false),
            (BUF + VNET_HDR_LEN as u64, out.len() as u32, false),
        ]);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        assert!(dev.process_tx(&mem, &mut queue).unwrap(), "interrupt");
        assert_eq!(peer.recv_matching(&out[..14]), out);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used_elem(0), (0, 0));
        assert_eq!(dev.stats().tx_frames, 1);
        assert_eq!(dev.stats().tx_bytes, out.len() as u64);
        assert_eq!(dev.egress().stats().sent_frames, 1);
        // Nothing new: no interrupt.
        assert!(!dev.process_tx(&mem, &mut queue).unwrap());
    }

    #[test]
    fn malformed_tx_chains_are_returned_and_counted() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, _peer) = device(&ns, "txbad", MERGE);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        tq.add_chain(&[(BUF, 4, false)]); // shorter than a header
        tq.add_chain(&[(BUF, 64, true)]); // device-writable
        tq.add_chain(&[(0xffff_0000, 64, false)]); // outside guest memory
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        assert!(dev.process_tx(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_idx(), 3);
        assert_eq!(dev.stats().tx_malformed, 3);
        assert_eq!(dev.stats().tx_frames, 0);
    }

    #[test]
    fn held_tx_frames_leave_on_release_and_vanish_on_discard() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "held", MERGE);
        let egress = dev.egress().clone();
        egress.set_mode(GateMode::Held);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        let mut send = |epoch, payload: &[u8], at: u64| {
            egress.set_epoch(epoch);
            let framed = with_header(&ether_frame([0xff; 6], payload));
            mem.write_slice(&framed, GuestAddress(at)).unwrap();
            tq.add_chain(&[(at, framed.len() as u32, false)]);
            dev.process_tx(&mem, &mut queue).unwrap();
        };
        send(7, b"epoch seven", BUF);
        send(8, b"epoch eight", BUF + 0x1000);
        // Both chains went back to the guest at once; nothing went out.
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(egress.held_epochs(), vec![7, 8]);
        let head = ether_frame([0xff; 6], b"");
        assert!(peer
            .try_recv_matching(&head, Duration::from_millis(100))
            .is_none());
        assert_eq!(egress.release_through(7), 1);
        assert!(peer.recv_matching(&head).ends_with(b"epoch seven"));
        assert_eq!(egress.discard_after(7), 1);
        assert_eq!(egress.held_frames(), 0);
        assert_eq!(egress.release_through(8), 0);
        assert!(peer
            .try_recv_matching(&head, Duration::from_millis(100))
            .is_none());
        let stats = egress.stats();
        assert_eq!((stats.released_frames, stats.discarded_frames), (1, 1));
    }

    #[test]
    fn a_full_gate_stops_transmission_until_room_is_made() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "full", MERGE);
        let egress = dev.egress().clone();
        let first = with_header(&ether_frame([0xff; 6], b"first"));
        let second = with_header(&ether_frame([0xff; 6], b"second"));
        egress.set_mode(GateMode::Held);
        egress.set_limit(first.len() + 4);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        mem.write_slice(&first, GuestAddress(BUF)).unwrap();
        mem.write_slice(&second, GuestAddress(BUF + 0x1000))
            .unwrap();
        tq.add_chain(&[(BUF, first.len() as u32, false)]);
        tq.add_chain(&[(BUF + 0x1000, second.len() as u32, false)]);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        assert!(dev.process_tx(&mem, &mut queue).unwrap());
        // The second frame did not fit: it is still the driver's.
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(egress.stats().full, 1);
        assert!(egress.room_event().read().is_err(), "no room yet");
        // Another kick changes nothing while the gate is full.
        assert!(!dev.process_tx(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_idx(), 1);

        assert_eq!(egress.release_through(0), 1);
        assert_eq!(egress.room_event().read().unwrap(), 1);
        assert!(dev.process_tx(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_idx(), 2);
        assert_eq!(egress.release_through(0), 1);
        assert!(peer
            .recv_matching(&first[VNET_HDR_LEN..])
            .ends_with(b"first"));
        assert!(peer
            .recv_matching(&second[VNET_HDR_LEN..])
            .ends_with(b"second"));
        assert_eq!(dev.stats().tx_frames, 2);
    }

    #[test]
    fn an_rx_frame_waits_for_a_buffer_then_lands_dirty_and_mirrored() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "rx", PLAIN);
        let (tx, rx) = mpsc::channel();
        dev.set_ingress_tap(Some(Box::new(tx)));
        dev.egress().set_epoch(5);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        queue.disable_notification(&mem).unwrap();
        let inbound = ether_frame(MAC, b"hello from the host");

        // No buffer: the frame waits, and the device asks to hear of new buffers.
        peer.send(&inbound);
        wait_readable(&dev);
        assert!(!dev.process_rx(&mem, &mut queue).unwrap());
        assert!(dev.rx_pending());
        assert_eq!(tq.used_flags(), 0, "notifications enabled");
        assert_eq!(dev.stats().rx_frames, 0);

        tq.add_rx(BUF, 2048);
        let region = mem.find_region(GuestAddress(BUF)).unwrap();
        std::ops::Deref::deref(region).bitmap().reset();
        assert!(dev.process_rx(&mem, &mut queue).unwrap());
        assert!(!dev.rx_pending());
        assert_ne!(tq.used_flags(), 0, "notifications off again");

        let (head, len) = tq.used_elem(0);
        assert_eq!((head, len as usize), (0, VNET_HDR_LEN + inbound.len()));
        let got = read_guest(&mem, BUF, len as usize);
        assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);
        assert_eq!(header::num_buffers(&got), 1);
        assert_eq!(got[0], 0, "no flags without GUEST_CSUM");
        assert!(
            region.bitmap().dirty_at(BUF as usize),
            "the device's write is not in the dirty bitmap"
        );
        let mirrored = rx.try_recv().unwrap();
        assert_eq!(mirrored.epoch, 5);
        assert_eq!(mirrored.ethernet(), &inbound[..]);
        assert_eq!(header::num_buffers(mirrored.header()), 0);
        assert_eq!(dev.stats().rx_frames, 1);
        assert_eq!(dev.stats().rx_bytes, inbound.len() as u64);
    }

    #[test]
    fn rx_frames_merge_across_small_buffers_published_together() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "mrg", MERGE);
        ip(&["link", "set", &peer.name, "mtu", "9000"]);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(true);
        dev.activate(&queue, &queue);
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let inbound = ether_frame(MAC, &payload);
        let total = VNET_HDR_LEN + inbound.len();

        // One 1 KiB buffer is not enough for 3 KiB: the buffer is put back and the device waits
        // for the driver to go past it.
        tq.add_rx(BUF, 1024);
        peer.send(&inbound);
        wait_readable(&dev);
        assert!(!dev.process_rx(&mem, &mut queue).unwrap());
        assert_eq!(queue.next_avail(), 0);
        assert_eq!(tq.used_idx(), 0);
        assert_eq!(tq.avail_event(), 1);

        tq.add_rx(BUF + 0x1000, 1024);
        tq.add_rx(BUF + 0x2000, 1024);
        assert!(dev.process_rx(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_idx(), 3);
        assert_eq!(tq.used_elem(0), (0, 1024));
        assert_eq!(tq.used_elem(1), (1, 1024));
        assert_eq!(tq.used_elem(2), (2, (total - 2048) as u32));
        let mut got = read_guest(&mem, BUF, 1024);
        got.extend(read_guest(&mem, BUF + 0x1000, 1024));
        got.extend(read_guest(&mem, BUF + 0x2000, total - 2048));
        assert_eq!(header::num_buffers(&got), 3);
        assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);
    }

    #[test]
    fn without_merging_a_frame_too_large_is_dropped_and_the_buffer_kept() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "big", PLAIN);
        ip(&["link", "set", &peer.name, "mtu", "9000"]);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        tq.add_rx(BUF, 1526);
        let big = ether_frame(MAC, &[0x55; 3000]);
        let small = ether_frame(MAC, b"small");
        peer.send(&big);
        peer.send(&small);
        wait_readable(&dev);
        std::thread::sleep(Duration::from_millis(20));
        assert!(dev.process_rx(&mem, &mut queue).unwrap());
        assert_eq!(dev.stats().rx_dropped, 1);
        assert_eq!(tq.used_idx(), 1);
        let (_, len) = tq.used_elem(0);
        assert_eq!(
            &read_guest(&mem, BUF, len as usize)[VNET_HDR_LEN..],
            &small[..]
        );
    }

    #[test]
    fn injected_frames_go_in_before_the_tap() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "inj", MERGE);
        let (tx, rx) = mpsc::sync_channel(4);
        dev.set_ingress_tap(Some(Box::new(tx)));
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        let replayed = ether_frame(MAC, b"replayed");
        let live = ether_frame(MAC, b"live");
        peer.send(&live);
        wait_readable(&dev);
        dev.inject_rx(with_header(&replayed));
        tq.add_rx(BUF, 2048);
        tq.add_rx(BUF + 0x1000, 2048);
        assert!(dev.process_rx(&mem, &mut queue).unwrap());
        assert_eq!(tq.used_idx(), 2);
        let (_, len) = tq.used_elem(0);
        assert_eq!(
            &read_guest(&mem, BUF, len as usize)[VNET_HDR_LEN..],
            &replayed[..]
        );
        let (_, len) = tq.used_elem(1);
        assert_eq!(
            &read_guest(&mem, BUF + 0x1000, len as usize)[VNET_HDR_LEN..],
            &live[..]
        );
        assert_eq!(rx.recv().unwrap().ethernet(), &replayed[..]);
        assert_eq!(rx.recv().unwrap().ethernet(), &live[..]);
    }

    #[test]
    fn reset_drops_the_waiting_frame() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "rst", MERGE);
        let mem = memory();
        let tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        peer.send(&ether_frame(MAC, b"lost"));
        wait_readable(&dev);
        dev.process_rx(&mem, &mut queue).unwrap();
        assert!(dev.rx_pending());
        dev.reset();
        assert!(!dev.rx_pending());
        assert_eq!(dev.acked_features(), 0);
    }

    #[test]
    fn a_broken_available_index_is_an_error_not_a_hang() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "brk", MERGE);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut txq = TestQueue::new(&mem, 0x8000, 16);
        tq.set_avail_idx(100);
        txq.set_avail_idx(100);
        let mut rx_queue = tq.queue(true);
        let mut tx_queue = txq.queue(false);
        dev.activate(&rx_queue, &tx_queue);
        assert!(matches!(
            dev.process_tx(&mem, &mut tx_queue),
            Err(NetError::InvalidAvailRing("transmit"))
        ));
        peer.send(&ether_frame(MAC, b"nowhere to go"));
        wait_readable(&dev);
        assert!(matches!(
            dev.process_rx(&mem, &mut rx_queue),
            Err(NetError::InvalidAvailRing("receive"))
        ));
        // The frame still waits: a driver reset and a sane ring will take it.
        assert!(dev.rx_pending());
    }

    #[test]
    fn restore_on_another_tap_keeps_frames_gate_and_offloads() {
        let Some(ns) = NetNs::enter() else { return };
        let (probe, _) = TapPeer::new(&ns, "probe");
        let offloads = probe.offload_supported();
        drop(probe);
        let acked = if offloads {
            MERGE | 1 << VIRTIO_NET_F_GUEST_CSUM
        } else {
            MERGE
        };
        let (mut dev, src_peer) = device(&ns, "ssrc", acked);
        let mem = memory();
        let mut rxq = TestQueue::new(&mem, 0, 16);
        let mut txq = TestQueue::new(&mem, 0x8000, 16);
        let mut rx_queue = rxq.queue(true);
        let mut tx_queue = txq.queue(true);
        dev.activate(&rx_queue, &tx_queue);

        // One frame delivered, one taken from the TAP and waiting for buffers, one injected.
        let first = ether_frame(MAC, b"first");
        let second = ether_frame(MAC, b"second, from the TAP");
        let third = ether_frame(MAC, b"third, injected");
        rxq.add_rx(BUF, 2048);
        src_peer.send(&first);
        wait_readable(&dev);
        assert!(dev.process_rx(&mem, &mut rx_queue).unwrap());
        src_peer.send(&second);
        wait_readable(&dev);
        dev.process_rx(&mem, &mut rx_queue).unwrap();
        assert!(dev.rx_pending());
        dev.inject_rx(with_header(&third));
        // One outbound frame held in epoch 9.
        dev.egress().set_mode(GateMode::Held);
        dev.egress().set_epoch(9);
        let held = with_header(&ether_frame([0xff; 6], b"held in epoch nine"));
        mem.write_slice(&held, GuestAddress(BUF + 0x4000)).unwrap();
        txq.add_chain(&[(BUF + 0x4000, held.len() as u32, false)]);
        assert!(dev.process_tx(&mem, &mut tx_queue).unwrap());

        let state = dev.save();
        let json = serde_json::to_string(&state).unwrap();
        let state: NetState = serde_json::from_str(&json).unwrap();
        assert_eq!(state, dev.save());
        assert_eq!(
            &state.rx_waiting.as_ref().unwrap()[VNET_HDR_LEN..],
            &second[..]
        );
        assert_eq!(state.rx_backlog, vec![with_header(&third)]);
        assert_eq!(state.egress.held.len(), 1);
        assert_eq!(state.egress.held[0].epoch, 9);
        assert_eq!(state.egress.held[0].bytes, held);
        assert_eq!(state.stats.rx_frames, 1);
        assert_eq!(state.acked_features, acked);

        // The destination's TAP: a fresh one, its offloads off until the restore sets them.
        let (dst_tap, dst_peer) = TapPeer::new(&ns, "sdst");
        let mut restored = NetDevice::restore(dst_tap, &state).unwrap();
        assert_eq!(restored.tap().name(), dst_peer.name);
        assert_eq!(
            NetState {
                tap_name: state.tap_name.clone(),
                ..restored.save()
            },
            state
        );
        assert!(restored.rx_pending());
        // The transport rebuilds the queues with the saved indices.
        let mut rx_queue2 = rxq.queue(true);
        rx_queue2.set_next_avail(rx_queue.next_avail());
        rx_queue2.set_next_used(rx_queue.next_used());
        let mut tx_queue2 = txq.queue(true);
        tx_queue2.set_next_avail(tx_queue.next_avail());
        tx_queue2.set_next_used(tx_queue.next_used());
        restored.activate(&rx_queue2, &tx_queue2);
        rxq.add_rx(BUF + 0x1000, 2048);
        rxq.add_rx(BUF + 0x2000, 2048);
        restored.process_rx(&mem, &mut rx_queue2).unwrap();
        assert_eq!(rxq.used_idx(), 3);
        for (i, (frame, at)) in [(&second, BUF + 0x1000), (&third, BUF + 0x2000)]
            .into_iter()
            .enumerate()
        {
            let (head, len) = rxq.used_elem(1 + i as u16);
            assert_eq!(head, 1 + i as u16);
            assert_eq!(
                &read_guest(&mem, at, len as usize)[VNET_HDR_LEN..],
                &frame[..]
            );
        }
        assert_eq!(restored.stats().rx_frames, 3);

        // The held frame leaves through the new TAP when its epoch is released; a frame sent
        // after the restore is held behind it.
        let after = with_header(&ether_frame([0xff; 6], b"sent after the restore"));
        mem.write_slice(&after, GuestAddress(BUF + 0x5000)).unwrap();
        txq.add_chain(&[(BUF + 0x5000, after.len() as u32, false)]);
        restored.process_tx(&mem, &mut tx_queue2).unwrap();
        assert_eq!(txq.used_idx(), 2);
        assert_eq!(restored.egress().held_epochs(), vec![9]);
        assert_eq!(restored.egress().release_through(9), 2);
        let head = ether_frame([0xff; 6], b"");
        assert!(dst_peer
            .recv_matching(&head)
            .ends_with(b"held in epoch nine"));
        assert!(dst_peer
            .recv_matching(&head)
            .ends_with(b"sent after the restore"));

        // The accepted checksum offload is in force on the new TAP.
        if offloads {
            ip(&["addr", "add", "10.9.0.1/24", "dev", &dst_peer.name]);
            let mac = MacAddr(MAC).to_string();
            let neigh = [
                "neigh",
                "add",
                "10.9.0.2",
                "lladdr",
                &mac,
                "dev",
                &dst_peer.name,
            ];
            ip(&[&neigh[..], &["nud", "permanent"]].concat());
            let frame = udp_from_host(&restored, &dst_peer);
            assert_eq!(u32::from(frame[0]), VIRTIO_NET_HDR_F_NEEDS_CSUM);
        }
    }

    #[test]
    fn restore_refuses_features_the_tap_cannot_offer_and_oversized_frames() {
        let Some(ns) = NetNs::enter() else { return };
        let (dev, _peer) = device(&ns, "rfsrc", MERGE);
        let state = dev.save();
        let (tap, _peer2) = TapPeer::new(&ns, "rfdst");
        let bad = NetState {
            avail_features: state.avail_features | 1 << 60,
            ..state.clone()
        };
        let err = NetDevice::restore(tap, &bad).unwrap_err();
        assert!(matches!(err, NetError::Features { .. }), "{err}");
        assert!(err.to_string().contains("vnt-rfdst"), "{err}");

        let (tap, _peer3) = TapPeer::new(&ns, "rfbig");
        let bad = NetState {
            rx_waiting: Some(vec![0; MAX_FRAME_LEN + 1]),
            ..state
        };
        let err = NetDevice::restore(tap, &bad).unwrap_err();
        assert!(matches!(err, NetError::SavedFrameTooLong { .. }), "{err}");
    }

    /// A UDP datagram from the host's stack to the guest's address, as read from the TAP.
    fn udp_from_host(dev: &NetDevice, peer: &TapPeer) -> Vec<u8> {
        let sock = std::net::UdpSocket::bind("10.9.0.1:0").unwrap();
        sock.send_to(b"checksum me", "10.9.0.2:9").unwrap();
        let _ = peer;
        read_tap_until(dev.tap(), |f| {
            f.len() > VNET_HDR_LEN + 23
                && f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x08, 0x00]
                && f[VNET_HDR_LEN + 23] == 17
        })
    }

    #[test]
    fn tap_checksum_offload_follows_guest_csum() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "csum", MERGE);
        if !dev.tap().offload_supported() {
            eprintln!("skipped: the TAP has no offloads");
            return;
        }
        ip(&["addr", "add", "10.9.0.1/24", "dev", &peer.name]);
        let mac = MacAddr(MAC).to_string();
        let neigh = [
            "neigh", "add", "10.9.0.2", "lladdr", &mac, "dev", &peer.name,
        ];
        ip(&[&neigh[..], &["nud", "permanent"]].concat());
        // UDP checksum: 14 (Ethernet) + 20 (IPv4) + 6.
        let udp_csum = VNET_HDR_LEN + 40;

        // Offloads off: the host completes the checksum.
        let frame = udp_from_host(&dev, &peer);
        assert_eq!(frame[0], 0);
        assert_ne!(&frame[udp_csum..udp_csum + 2], &[0, 0]);

        // GUEST_CSUM accepted: the host leaves it to the guest, and the guest gets the flag.
        dev.set_acked_features(MERGE | 1 << VIRTIO_NET_F_GUEST_CSUM)
            .unwrap();
        let frame = udp_from_host(&dev, &peer);
        assert_eq!(u32::from(frame[0]), VIRTIO_NET_HDR_F_NEEDS_CSUM);
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.queue(false);
        dev.activate(&queue, &queue);
        dev.inject_rx(frame.clone());
        tq.add_rx(BUF, 2048);
        assert!(dev.process_rx(&mem, &mut queue).unwrap());
        let got = read_guest(&mem, BUF, frame.len());
        assert_eq!(u32::from(got[0]), VIRTIO_NET_HDR_F_NEEDS_CSUM);
        assert_eq!(&got[VNET_HDR_LEN..], &frame[VNET_HDR_LEN..]);

        // After a reset, a driver without GUEST_CSUM never sees a partial checksum.
        dev.reset();
        dev.set_acked_features(MERGE).unwrap();
        dev.activate(&queue, &queue);
        dev.inject_rx(frame);
        tq.add_rx(BUF + 0x1000, 2048);
        assert!(!dev.process_rx(&mem, &mut queue).unwrap());
        assert_eq!(dev.stats().rx_dropped, 1);
        let frame = udp_from_host(&dev, &peer);
        assert_eq!(frame[0], 0);
    }

    #[test]
    fn output_commit_across_epochs_loses_nothing_when_the_gate_is_full() {
        let Some(ns) = NetNs::enter() else { return };
        let (mut dev, peer) = device(&ns, "oc", MERGE);
        let (mirror_tx, mirror_rx) = crate::ingress::mirror_channel(8);
        dev.set_ingress_tap(Some(Box::new(mirror_tx)));
        let mem = memory();
        let mut rxq = TestQueue::new(&mem, 0, 16);
        let mut txq = TestQueue::new(&mem, 0x8000, 16);
        let mut rx_queue = rxq.queue(false);
        let mut tx_queue = txq.queue(false);
        dev.activate(&rx_queue, &tx_queue);
        let egress = dev.egress().clone();
        let frames: Vec<Vec<u8>> = (0..5)
            .map(|i| with_header(&ether_frame([0xff; 6], format!("frame {i}").as_bytes())))
            .collect();
        let queue_frame = |txq: &mut TestQueue, i: usize| {
            let at = BUF + 0x1000 * i as u64;
            mem.write_slice(&frames[i], GuestAddress(at)).unwrap();
            txq.add_chain(&[(at, frames[i].len() as u32, false)]);
        };
        let head = ether_frame([0xff; 6], b"");
        let nothing_out = |peer: &TapPeer| {
            peer.try_recv_matching(&head, Duration::from_millis(50))
                .is_none()
        };
        egress.set_mode(GateMode::Held);
        egress.set_limit(2 * frames[0].len());

        // Epoch 1: two frames, held. Epoch 2: the gate is full, so both stay in the guest's ring.
        egress.set_epoch(1);
        queue_frame(&mut txq, 0);
        queue_frame(&mut txq, 1);
        dev.process_tx(&mem, &mut tx_queue).unwrap();
        assert_eq!(txq.used_idx(), 2);
        egress.set_epoch(2);
        queue_frame(&mut txq, 2);
        queue_frame(&mut txq, 3);
        dev.process_tx(&mem, &mut tx_queue).unwrap();
        assert_eq!(txq.used_idx(), 2, "a full gate leaves frames in the ring");
        assert_eq!(egress.stats().full, 1);
        assert!(
            nothing_out(&peer),
            "a frame left before its epoch was committed"
        );

        // An inbound frame delivered in epoch 2 is mirrored with that tag.
        let inbound = ether_frame(MAC, b"inbound in epoch 2");
        rxq.add_rx(BUF + 0x10000, 2048);
        dev.inject_rx(with_header(&inbound));
        dev.process_rx(&mem, &mut rx_queue).unwrap();
        let mirrored = mirror_rx.try_recv().unwrap().unwrap();
        assert_eq!((mirrored.epoch, mirrored.ethernet()), (2, &inbound[..]));

        // Epoch 1 committed: its frames leave in order, the room event restarts transmission,
        // and the frames of epoch 2 are taken and held.
        assert_eq!(egress.release_through(1), 2);
        assert!(peer.recv_matching(&head).ends_with(b"frame 0"));
        assert!(peer.recv_matching(&head).ends_with(b"frame 1"));
        assert_eq!(egress.room_event().read().unwrap(), 1);
        dev.process_tx(&mem, &mut tx_queue).unwrap();
        assert_eq!(txq.used_idx(), 4);
        assert_eq!(egress.held_epochs(), vec![2]);
        assert!(nothing_out(&peer));

        // Epoch 3 sends one more; epoch 2 is committed, epoch 3 lost (failover): only epoch
        // 2's frames leave, in order.
        assert_eq!(egress.release_through(1), 0);
        egress.set_limit(3 * frames[0].len());
        egress.set_epoch(3);
        queue_frame(&mut txq, 4);
        dev.process_tx(&mem, &mut tx_queue).unwrap();
        assert_eq!(egress.held_epochs(), vec![2, 3]);
        assert_eq!(egress.discard_after(2), 1);
        assert_eq!(egress.release_through(3), 2);
        assert!(peer.recv_matching(&head).ends_with(b"frame 2"));
        assert!(peer.recv_matching(&head).ends_with(b"frame 3"));
        assert!(nothing_out(&peer), "a discarded frame left");
        assert_eq!(egress.stats().discarded_frames, 1);
        assert_eq!(egress.stats().released_frames, 4);
    }
}
