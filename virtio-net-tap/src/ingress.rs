//! The ingress tap: a copy of every inbound frame the device delivers to the guest, for
//! mirroring to the standbys (which log them per epoch and re-inject them on failover).
//!
//! [`mirror_channel`] is the sink replication uses: bounded, and never silent. The device must
//! not block on it (it runs on the event loop), so when the receiver falls behind a copy is
//! lost, counted, logged, and the receiver's next [`MirrorReceiver::try_recv`] reports the
//! overrun ([`MirrorError::Overrun`]) before any later frame: the inbound log of those epochs
//! is incomplete, and the receiver knows it. (The guest still got every frame; a standby that
//! replays an incomplete log looks to the guest like a network that lost those frames.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

use crate::gate::Epoch;
use crate::header::VNET_HDR_LEN;

/// One inbound frame as the guest received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressFrame {
    /// The epoch during which the guest received it (the egress gate's epoch then).
    pub epoch: Epoch,
    /// The 12-byte `virtio_net_hdr_v1` (offload flags and segmentation fields as the guest got
    /// them; `num_buffers` cleared, it describes the guest's buffers, not the frame) followed by
    /// the Ethernet frame. This is the form [`crate::NetDevice::inject_rx`] takes back.
    pub data: Vec<u8>,
}

impl IngressFrame {
    /// The virtio-net header.
    pub fn header(&self) -> &[u8] {
        &self.data[..VNET_HDR_LEN]
    }

    /// The Ethernet frame.
    pub fn ethernet(&self) -> &[u8] {
        &self.data[VNET_HDR_LEN..]
    }
}

/// What became of a mirrored copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mirrored {
    /// Taken by the sink.
    Taken,
    /// The sink was full; this copy is lost (the guest still got the frame).
    Lost,
    /// The sink is gone; the device stops mirroring.
    Closed,
}

/// Where the device sends its copies. It is called on the device's thread and must not block.
pub trait IngressSink: Send {
    /// Takes one copy.
    fn mirror(&mut self, frame: IngressFrame) -> Mirrored;
}

/// An unbounded channel: nothing is ever lost, and memory grows if the receiver falls behind.
impl IngressSink for Sender<IngressFrame> {
    fn mirror(&mut self, frame: IngressFrame) -> Mirrored {
        match self.send(frame) {
            Ok(()) => Mirrored::Taken,
            Err(_) => Mirrored::Closed,
        }
    }
}

/// A bounded channel: memory is bounded, and copies are lost (and counted) while it is full.
impl IngressSink for SyncSender<IngressFrame> {
    fn mirror(&mut self, frame: IngressFrame) -> Mirrored {
        match self.try_send(frame) {
            Ok(()) => Mirrored::Taken,
            Err(TrySendError::Full(_)) => Mirrored::Lost,
            Err(TrySendError::Disconnected(_)) => Mirrored::Closed,
        }
    }
}

/// What the shared side of a mirror channel counts.
#[derive(Debug, Default)]
struct Overrun {
    /// Copies lost since the receiver last heard of it.
    lost: AtomicU64,
    /// Epoch of the first copy lost since then (valid when `lost` > 0).
    first_epoch: AtomicU64,
}

/// The device's end of a [`mirror_channel`].
#[derive(Debug)]
pub struct MirrorSender {
    tx: SyncSender<IngressFrame>,
    overrun: Arc<Overrun>,
}

/// The replication engine's end of a [`mirror_channel`].
#[derive(Debug)]
pub struct MirrorReceiver {
    rx: Receiver<IngressFrame>,
    overrun: Arc<Overrun>,
}

/// Why [`MirrorReceiver::try_recv`] returned no frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// The receiver fell behind: `lost` copies were dropped, the first of epoch `first_epoch`.
    /// The inbound log of that epoch and later ones misses frames. Reported once per overrun.
    #[error(
        "the ingress mirror fell behind: {lost} inbound frames lost from epoch {first_epoch} on"
    )]
    Overrun {
        /// Copies lost.
        lost: u64,
        /// The epoch of the first one.
        first_epoch: Epoch,
    },
    /// The device is gone or stopped mirroring, and every frame was received.
    #[error("the ingress mirror is closed")]
    Closed,
}

/// A bounded mirror channel holding at most `capacity` frames that never loses a copy silently
/// (see the module docs).
pub fn mirror_channel(capacity: usize) -> (MirrorSender, MirrorReceiver) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
    let overrun = Arc::new(Overrun::default());
    (
        MirrorSender {
            tx,
            overrun: overrun.clone(),
        },
        MirrorReceiver { rx, overrun },
    )
}

impl IngressSink for MirrorSender {
    fn mirror(&mut self, frame: IngressFrame) -> Mirrored {
        let epoch = frame.epoch;
        match self.tx.try_send(frame) {
            Ok(()) => Mirrored::Taken,
            Err(TrySendError::Full(_)) => {
                if self.overrun.lost.load(Ordering::Acquire) == 0 {
                    self.overrun.first_epoch.store(epoch, Ordering::Release);
                    tracing::warn!(epoch, "ingress mirror full: inbound frames are being lost");
                }
                self.overrun.lost.fetch_add(1, Ordering::AcqRel);
                Mirrored::Lost
            }
            Err(TrySendError::Disconnected(_)) => Mirrored::Closed,
        }
    }
}

impl MirrorReceiver {
    /// The next mirrored frame, in delivery order; `Ok(None)` when none is waiting. An overrun
    /// is reported as soon as it happened, before the frames mirrored after it.
    pub fn try_recv(&self) -> Result<Option<IngressFrame>, MirrorError> {
        let lost = self.overrun.lost.swap(0, Ordering::AcqRel);
        if lost > 0 {
            return Err(MirrorError::Overrun {
                lost,
                first_epoch: self.overrun.first_epoch.load(Ordering::Acquire),
            });
        }
        match self.rx.try_recv() {
            Ok(frame) => Ok(Some(frame)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(MirrorError::Closed),
        }
    }

    /// Every frame waiting now, in order; stops at an overrun or when the device is gone.
    pub fn drain(&self) -> Result<Vec<IngressFrame>, MirrorError> {
        let mut out = Vec::new();
        loop {
            match self.try_recv() {
                Ok(Some(frame)) => out.push(frame),
                Ok(None) => return Ok(out),
                Err(MirrorError::Closed) if !out.is_empty() => return Ok(out),
                Err(err) => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(epoch: Epoch) -> IngressFrame {
        let mut data = vec![0u8; VNET_HDR_LEN];
        data.extend_from_slice(b"ethernet");
        IngressFrame { epoch, data }
    }

    #[test]
    fn parts() {
        let f = frame(3);
        assert_eq!(f.header().len(), VNET_HDR_LEN);
        assert_eq!(f.ethernet(), b"ethernet");
    }

    #[test]
    fn unbounded_and_bounded_sinks() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sink: Box<dyn IngressSink> = Box::new(tx);
        assert_eq!(sink.mirror(frame(1)), Mirrored::Taken);
        assert_eq!(rx.recv().unwrap().epoch, 1);
        drop(rx);
        assert_eq!(sink.mirror(frame(2)), Mirrored::Closed);

        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut sink: Box<dyn IngressSink> = Box::new(tx);
        assert_eq!(sink.mirror(frame(1)), Mirrored::Taken);
        assert_eq!(sink.mirror(frame(2)), Mirrored::Lost);
        assert_eq!(rx.recv().unwrap().epoch, 1);
        drop(rx);
        assert_eq!(sink.mirror(frame(3)), Mirrored::Closed);
    }

    #[test]
    fn the_mirror_channel_reports_every_overrun() {
        let (mut tx, rx) = mirror_channel(2);
        assert_eq!(rx.try_recv(), Ok(None));
        assert_eq!(tx.mirror(frame(1)), Mirrored::Taken);
        assert_eq!(tx.mirror(frame(1)), Mirrored::Taken);
        assert_eq!(tx.mirror(frame(2)), Mirrored::Lost);
        assert_eq!(tx.mirror(frame(3)), Mirrored::Lost);
        // Reported first, once, with the first epoch that lost a frame.
        assert_eq!(
            rx.try_recv(),
            Err(MirrorError::Overrun {
                lost: 2,
                first_epoch: 2
            })
        );
        assert_eq!(rx.try_recv().unwrap().unwrap().epoch, 1);
        assert_eq!(tx.mirror(frame(4)), Mirrored::Taken);
        let rest = rx.drain().unwrap();
        assert_eq!(rest.iter().map(|f| f.epoch).collect::<Vec<_>>(), vec![1, 4]);
        drop(tx);
        assert_eq!(rx.try_recv(), Err(MirrorError::Closed));
    }
}
