//! What the device does on split virtqueue rings beyond `virtio_queue::Queue`:
//! - publishing several used buffers at once ([`add_used_batch`]): a frame spread over merged
//!   receive buffers must appear to the driver whole, or Linux drops it ("buffers missing");
//! - asking for a notification once the driver makes more buffers available than the device
//!   has seen ([`wait_for_avail`]), when what is there is not enough for the waiting frame;
//! - deciding whether the driver wants an interrupt ([`Notifier`]), from `used_event` under
//!   `VIRTIO_RING_F_EVENT_IDX` or from `VRING_AVAIL_F_NO_INTERRUPT` otherwise.
//!
//! Ring layout (virtio spec 1.1 §2.6): avail = flags, idx, `ring[size]`, used_event; used = flags,
//! idx, `ring[size]` of {id: u32, len: u32}, avail_event. All little-endian.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Bytes before the ring array in both rings (flags, idx).
const RING_HEADER: u64 = 4;
const USED_ELEM: u64 = 8;
const AVAIL_ELEM: u64 = 2;

fn offset(base: u64, off: u64) -> Result<GuestAddress, Error> {
    GuestAddress(base)
        .0
        .checked_add(off)
        .map(GuestAddress)
        .ok_or(Error::AddressOverflow)
}

/// Adds `used` (head index, bytes written) to the used ring and makes them visible to the driver
/// with a single update of the used index.
pub fn add_used_batch<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    used: &[(u16, u32)],
) -> Result<(), Error> {
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let start = Wrapping(queue.next_used());
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= size {
            return Err(Error::InvalidDescriptorIndex);
        }
        let slot = (start + Wrapping(i as u16)).0 % size;
        let addr = offset(queue.used_ring(), RING_HEADER + USED_ELEM * u64::from(slot))?;
        let mut elem = [0u8; USED_ELEM as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr).map_err(Error::GuestMemory)?;
    }
    // The last element goes through the queue, which stores the new used index with release
    // ordering: the driver sees all the elements or none.
    queue.set_next_used((start + Wrapping(rest.len() as u16)).0);
    if let Err(err) = queue.add_used(mem, last_head, last_len) {
        queue.set_next_used(start.0);
        return Err(err);
    }
    Ok(())
}

/// Asks the driver to notify the device when it makes available buffers beyond avail index
/// `seen`; returns true if it already has (look again rather than wait).
pub fn wait_for_avail<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    seen: Wrapping<u16>,
) -> Result<bool, Error> {
    if queue.event_idx_enabled() {
        // avail_event = seen: the driver notifies when it moves its index past `seen`.
        let addr = offset(
            queue.used_ring(),
            RING_HEADER + USED_ELEM * u64::from(queue.size()),
        )?;
        mem.store(u16::to_le(seen.0), addr, Ordering::Relaxed)
            .map_err(Error::GuestMemory)?;
    } else {
        queue.enable_notification(mem)?;
    }
    // The request must be visible before the index is read again (the driver does the mirror
    // image: publish its index, then read ours).
    fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire)? != seen)
}

/// Interrupt suppression for one queue: remembers the used index at the last decision.
#[derive(Debug, Default, Clone, Copy)]
pub struct Notifier {
    last: Wrapping<u16>,
}

impl Notifier {
    /// A notifier for `queue` as it is now (nothing to signal yet).
    pub fn new(queue: &Queue) -> Self {
        Self {
            last: Wrapping(queue.next_used()),
        }
    }

    /// Whether the driver must be interrupted for the buffers used since the last call.
    pub fn needs_notification<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &Queue,
    ) -> Result<bool, Error> {
        let new = Wrapping(queue.next_used());
        let old = std::mem::replace(&mut self.last, new);
        if new == old {
            return Ok(false);
        }
        // The used index must be visible before the driver's wishes are read.
        fence(Ordering::SeqCst);
        if queue.event_idx_enabled() {
            let addr = offset(
                queue.avail_ring(),
                RING_HEADER + AVAIL_ELEM * u64::from(queue.size()),
            )?;
            let used_event: u16 = mem
                .load(addr, Ordering::Relaxed)
                .map_err(Error::GuestMemory)?;
            let used_event = Wrapping(u16::from_le(used_event));
            // vring_need_event: did the index cross used_event + 1 since the last decision?
            Ok(new - used_event - Wrapping(1) < new - old)
        } else {
            let flags: u16 = mem
                .load(GuestAddress(queue.avail_ring()), Ordering::Relaxed)
                .map_err(Error::GuestMemory)?;
            Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{memory, TestQueue};

    const BUF: u64 = 0x8_0000;

    fn pop_head<M: GuestMemory>(q: &mut Queue, m: &M) -> u16 {
        q.pop_descriptor_chain(m).unwrap().head_index()
    }

    #[test]
    fn a_batch_is_published_with_one_index_update() {
        let m = memory();
        let mut tq = TestQueue::new(&m, 0, 8);
        for i in 0..3 {
            tq.add_rx(BUF + i * 0x1000, 0x1000);
        }
        let mut q = tq.queue(false);
        let heads: Vec<u16> = (0..3).map(|_| pop_head(&mut q, &m)).collect();
        let batch = [(heads[0], 100), (heads[1], 200), (heads[2], 7)];
        add_used_batch(&m, &mut q, &batch).unwrap();
        assert_eq!(tq.used_idx(), 3);
        assert_eq!(q.next_used(), 3);
        for (i, elem) in batch.iter().enumerate() {
            assert_eq!(tq.used_elem(i as u16), *elem);
        }
        // An invalid head leaves the queue as it was.
        assert!(add_used_batch(&m, &mut q, &[(99, 1), (0, 1)]).is_err());
        assert!(add_used_batch(&m, &mut q, &[(0, 1), (99, 1)]).is_err());
        assert_eq!(q.next_used(), 3);
        assert_eq!(tq.used_idx(), 3);
        add_used_batch(&m, &mut q, &[]).unwrap();
        assert_eq!(q.next_used(), 3);
    }

    #[test]
    fn batches_wrap_around_the_ring() {
        let m = memory();
        let tq = TestQueue::new(&m, 0, 4);
        let mut q = tq.queue(false);
        q.set_next_used(u16::MAX - 1);
        add_used_batch(&m, &mut q, &[(0, 1), (1, 2), (2, 3)]).unwrap();
        assert_eq!(q.next_used(), 1);
        assert_eq!(tq.used_idx(), 1);
        // Slots 65534 % 4 = 2, then 3, then 0.
        assert_eq!(tq.used_elem(2), (0, 1));
        assert_eq!(tq.used_elem(3), (1, 2));
        assert_eq!(tq.used_elem(0), (2, 3));
    }

    #[test]
    fn event_idx_notifications_follow_used_event() {
        let m = memory();
        let mut tq = TestQueue::new(&m, 0, 8);
        for i in 0..6 {
            tq.add_rx(BUF + i * 0x1000, 0x1000);
        }
        let mut q = tq.queue(true);
        let mut n = Notifier::new(&q);
        assert!(!n.needs_notification(&m, &q).unwrap(), "nothing used");
        // The driver wants an interrupt once entry 2 is used (used_event = 2).
        tq.set_used_event(2);
        let use_one = |q: &mut Queue| {
            let head = pop_head(q, &m);
            add_used_batch(&m, q, &[(head, 1)]).unwrap();
        };
        use_one(&mut q); // used idx 1
        assert!(!n.needs_notification(&m, &q).unwrap());
        use_one(&mut q); // 2
        assert!(!n.needs_notification(&m, &q).unwrap());
        use_one(&mut q); // 3: went past used_event
        assert!(n.needs_notification(&m, &q).unwrap());
        use_one(&mut q); // 4: the driver did not ask again
        assert!(!n.needs_notification(&m, &q).unwrap());
        // Going past used_event within a batch counts too.
        tq.set_used_event(4);
        use_one(&mut q);
        use_one(&mut q); // 6
        assert!(n.needs_notification(&m, &q).unwrap());
    }

    #[test]
    fn without_event_idx_the_no_interrupt_flag_is_honoured() {
        let m = memory();
        let mut tq = TestQueue::new(&m, 0, 8);
        tq.add_rx(BUF, 0x1000);
        tq.add_rx(BUF + 0x1000, 0x1000);
        let mut q = tq.queue(false);
        let mut n = Notifier::new(&q);
        let head = pop_head(&mut q, &m);
        add_used_batch(&m, &mut q, &[(head, 1)]).unwrap();
        assert!(n.needs_notification(&m, &q).unwrap());
        tq.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        let head = pop_head(&mut q, &m);
        add_used_batch(&m, &mut q, &[(head, 1)]).unwrap();
        assert!(!n.needs_notification(&m, &q).unwrap());
    }

    #[test]
    fn waiting_for_buffers_past_what_was_seen() {
        let m = memory();
        let mut tq = TestQueue::new(&m, 0, 8);
        tq.add_rx(BUF, 0x1000);
        let mut q = tq.queue(true);
        // One buffer is there but the device has seen it: wait for more.
        assert!(!wait_for_avail(&m, &mut q, Wrapping(1)).unwrap());
        assert_eq!(tq.avail_event(), 1);
        // The device had seen nothing: look again.
        assert!(wait_for_avail(&m, &mut q, Wrapping(0)).unwrap());

        let mut q = tq.queue(false);
        q.disable_notification(&m).unwrap();
        assert_ne!(tq.used_flags(), 0);
        assert!(!wait_for_avail(&m, &mut q, Wrapping(1)).unwrap());
        assert_eq!(tq.used_flags(), 0, "notifications enabled");
    }
}
