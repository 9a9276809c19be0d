//! The ingress tap: a copy of every inbound frame the device delivers to the guest, for
//! mirroring to the standbys (which log them per epoch and re-inject them on failover).

use std::sync::mpsc::{Sender, SyncSender, TrySendError};

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
}
