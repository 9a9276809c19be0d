//! The control virtqueue (virtio spec 1.1 §5.1.6.5): the driver's requests to the device.
//!
//! A request is one descriptor chain: a device-readable `{ class: u8, command: u8 }` header,
//! the command's data (device-readable), then a device-writable `ack` byte, which the device
//! sets to `VIRTIO_NET_OK` or `VIRTIO_NET_ERR`.
//!
//! The device offers `VIRTIO_NET_F_CTRL_VQ` only for `VIRTIO_NET_F_GUEST_ANNOUNCE`: the one
//! command it carries out is `VIRTIO_NET_CTRL_ANNOUNCE_ACK` (the driver has announced itself
//! after a configuration change with `VIRTIO_NET_S_ANNOUNCE`). Every other class and command
//! (receive filters, VLANs, multiqueue, offloads: features not offered, which a driver does
//! not send) is answered `VIRTIO_NET_ERR`. A chain the device cannot parse (no header, no
//! writable byte for the answer, buffers outside guest memory) is answered with an error if it
//! has room for the answer, else returned with nothing written.

use std::io::{Read, Write};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// Index of the control queue (one queue pair: receive 0, transmit 1, control 2).
pub const CTRL_QUEUE: usize = 2;

/// A request of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `VIRTIO_NET_CTRL_ANNOUNCE_ACK`: the driver announced itself; clear `VIRTIO_NET_S_ANNOUNCE`.
    AnnounceAck,
    /// Anything else, answered `VIRTIO_NET_ERR`.
    Unsupported {
        /// The request's class.
        class: u8,
        /// Its command.
        command: u8,
    },
}

impl Command {
    /// The command of header `{ class, command }`.
    pub fn parse(class: u8, command: u8) -> Self {
        match (u32::from(class), u32::from(command)) {
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => Command::AnnounceAck,
            _ => Command::Unsupported { class, command },
        }
    }
}

/// The device's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// `VIRTIO_NET_OK`.
    Ok,
    /// `VIRTIO_NET_ERR`.
    Err,
}

impl Ack {
    fn byte(self) -> u8 {
        match self {
            Ack::Ok => VIRTIO_NET_OK as u8,
            Ack::Err => VIRTIO_NET_ERR as u8,
        }
    }
}

/// Why a control chain was not understood.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    /// The chain's buffers cannot be mapped (outside guest memory, or a length overflow).
    #[error("cannot map the control chain: {0}")]
    Chain(virtio_queue::Error),
    /// Fewer readable bytes than a request header.
    #[error("control request shorter than its 2-byte header")]
    NoHeader,
    /// No writable byte for the answer.
    #[error("control request without a device-writable ack byte")]
    NoAck,
}

/// Reads the request in `chain`, has `handle` carry it out, and writes its answer. Returns the
/// bytes written to the chain (the used length: 1 with an answer, 0 without) and the error if
/// the chain was malformed (answered `VIRTIO_NET_ERR` when it had room for it).
pub fn serve<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    handle: impl FnOnce(Command) -> Ack,
) -> (u32, Option<CtrlError>) {
    let mut writer = match chain.clone().writer(mem) {
        Ok(writer) => writer,
        Err(err) => return (0, Some(CtrlError::Chain(err))),
    };
    let (ack, err) = match chain.reader(mem) {
        Err(err) => (Ack::Err, Some(CtrlError::Chain(err))),
        Ok(mut reader) => {
            let mut header = [0u8; 2];
            match reader.read_exact(&mut header) {
                // The data of the commands served is empty; other commands' data is not read.
                Ok(()) => (handle(Command::parse(header[0], header[1])), None),
                Err(_) => (Ack::Err, Some(CtrlError::NoHeader)),
            }
        }
    };
    match writer.write_all(&[ack.byte()]) {
        Ok(()) => (writer.bytes_written() as u32, err),
        Err(_) => (0, Some(err.unwrap_or(CtrlError::NoAck))),
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::testutil::{memory, Mem, TestQueue};

    const BUF: u64 = 0x1_0000;

    fn serve_one(
        mem: &Mem,
        queue: &mut Queue,
        handle: impl FnOnce(Command) -> Ack,
    ) -> (u32, Option<CtrlError>) {
        let chain = queue.pop_descriptor_chain(mem).expect("a chain");
        serve(mem, chain, handle)
    }

    #[test]
    fn headers_parse_into_commands() {
        assert_eq!(Command::parse(3, 0), Command::AnnounceAck);
        assert_eq!(
            Command::parse(0, 1),
            Command::Unsupported {
                class: 0,
                command: 1
            }
        );
        assert_eq!(
            Command::parse(3, 1),
            Command::Unsupported {
                class: 3,
                command: 1
            }
        );
    }

    #[test]
    fn a_request_is_read_whole_and_answered_in_its_writable_byte() {
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 8);
        mem.write_slice(&[3, 0], GuestAddress(BUF)).unwrap();
        mem.write_slice(&[0xaa], GuestAddress(BUF + 0x100)).unwrap();
        // Header split over two buffers, as a driver may lay it out.
        tq.add_chain(&[(BUF, 1, false), (BUF + 1, 1, false), (BUF + 0x100, 1, true)]);
        let mut queue = tq.queue(false);
        let mut seen = None;
        let (len, err) = serve_one(&mem, &mut queue, |c| {
            seen = Some(c);
            Ack::Ok
        });
        assert_eq!((len, err.is_none()), (1, true));
        assert_eq!(seen, Some(Command::AnnounceAck));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(BUF + 0x100)).unwrap(), 0);
    }

    #[test]
    fn malformed_chains_are_answered_err_or_dropped() {
        let mem = memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let ack_at = BUF + 0x100;
        let read_ack = || mem.read_obj::<u8>(GuestAddress(ack_at)).unwrap();
        // No header: answered ERR without asking the handler.
        tq.add_chain(&[(BUF, 1, false), (ack_at, 1, true)]);
        // No writable byte: nothing written.
        tq.add_chain(&[(BUF, 2, false)]);
        // Only a writable byte.
        tq.add_chain(&[(ack_at, 1, true)]);
        // A buffer outside guest memory.
        tq.add_chain(&[(0xffff_0000, 2, false), (ack_at, 1, true)]);
        let mut queue = tq.queue(false);
        let never = |_| panic!("a malformed request reached the handler");

        mem.write_obj(0x55u8, GuestAddress(ack_at)).unwrap();
        let (len, err) = serve_one(&mem, &mut queue, never);
        assert_eq!(len, 1);
        assert!(matches!(err, Some(CtrlError::NoHeader)), "{err:?}");
        assert_eq!(read_ack(), VIRTIO_NET_ERR as u8);

        let (len, err) = serve_one(&mem, &mut queue, |_| Ack::Ok);
        assert_eq!(len, 0);
        assert!(matches!(err, Some(CtrlError::NoAck)), "{err:?}");

        mem.write_obj(0x55u8, GuestAddress(ack_at)).unwrap();
        let (len, err) = serve_one(&mem, &mut queue, never);
        assert_eq!(len, 1);
        assert!(matches!(err, Some(CtrlError::NoHeader)), "{err:?}");
        assert_eq!(read_ack(), VIRTIO_NET_ERR as u8);

        mem.write_obj(0x55u8, GuestAddress(ack_at)).unwrap();
        let (len, err) = serve_one(&mem, &mut queue, never);
        assert_eq!(len, 1);
        assert!(matches!(err, Some(CtrlError::Chain(_))), "{err:?}");
        assert_eq!(read_ack(), VIRTIO_NET_ERR as u8);
    }
}
