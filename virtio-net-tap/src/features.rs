//! The feature bits the device offers, and the TAP offloads that follow from those a driver
//! accepts.
//!
//! Offered always: `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS`,
//! `VIRTIO_NET_F_MRG_RXBUF` (a frame may span several receive buffers, so any frame the TAP
//! hands over fits whatever buffer size the driver picks), `VIRTIO_RING_F_EVENT_IDX`,
//! `VIRTIO_RING_F_INDIRECT_DESC`, and `VIRTIO_NET_F_GUEST_ANNOUNCE` with the control queue it
//! needs (`VIRTIO_NET_F_CTRL_VQ`; see [`crate::ctrl`]): after a move the driver announces the
//! guest itself.
//!
//! Offered when the TAP supports `TUNSETOFFLOAD` (and not turned off): checksum offload and TCP
//! segmentation offload both ways. Transmit side (`VIRTIO_NET_F_CSUM`, `HOST_TSO4/6`): the
//! driver may send frames with a partial checksum or TCP segments up to 64 KiB, which the TAP
//! takes as they are (the host stack completes them). Receive side (`GUEST_CSUM`,
//! `GUEST_TSO4/6`): only once the driver has accepted them is the TAP told (`TUN_F_CSUM`,
//! `TUN_F_TSO4/6`) that it may hand over such frames. ECN and UFO are not offered.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features offered by every device.
pub const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_NET_F_CTRL_VQ)
    | bit(VIRTIO_NET_F_GUEST_ANNOUNCE);

/// Checksum and segmentation offloads, offered when the TAP supports them.
pub const OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6);

/// Whether feature `b` is in `features`.
pub fn has(features: u64, b: u32) -> bool {
    features & bit(b) != 0
}

/// The `TUN_F_*` offloads the TAP may use towards a driver that accepted `acked`: segments only
/// with checksum offload (the spec makes `GUEST_TSO*` depend on `GUEST_CSUM`, and so does the
/// TAP).
pub fn tap_offload(acked: u64) -> u32 {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if has(acked, VIRTIO_NET_F_GUEST_TSO4) {
        flags |= TUN_F_TSO4;
    }
    if has(acked, VIRTIO_NET_F_GUEST_TSO6) {
        flags |= TUN_F_TSO6;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offloads_follow_the_guest_features() {
        assert_eq!(tap_offload(0), 0);
        assert_eq!(tap_offload(BASE_FEATURES | bit(VIRTIO_NET_F_HOST_TSO4)), 0);
        // TSO without checksum offload is not a valid combination: nothing.
        assert_eq!(tap_offload(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(tap_offload(bit(VIRTIO_NET_F_GUEST_CSUM)), TUN_F_CSUM);
        assert_eq!(
            tap_offload(OFFLOAD_FEATURES),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
    }

    #[test]
    fn offered_bits() {
        assert!(has(BASE_FEATURES, VIRTIO_F_VERSION_1));
        assert!(has(BASE_FEATURES, VIRTIO_NET_F_MRG_RXBUF));
        // The guest announces itself, on the control queue that needs (spec 5.1.3.1).
        assert!(has(BASE_FEATURES, VIRTIO_NET_F_CTRL_VQ));
        assert!(has(BASE_FEATURES, VIRTIO_NET_F_GUEST_ANNOUNCE));
        assert_eq!(BASE_FEATURES & OFFLOAD_FEATURES, 0);
    }
}
