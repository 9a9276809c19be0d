//! The `virtio_net_hdr_v1` that precedes every frame, both in the virtqueues and on the TAP
//! (virtio spec 1.1 §5.1.6): what the device checks and fills in.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};

/// Length of `virtio_net_hdr_v1` (`VIRTIO_F_VERSION_1`): flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;

const FLAGS: usize = 0;
const GSO_TYPE: usize = 1;
const NUM_BUFFERS: usize = 10;

/// Sets `num_buffers`: how many receive buffers the frame spans.
pub fn set_num_buffers(hdr: &mut [u8], count: u16) {
    hdr[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
}

/// `num_buffers` of a header.
pub fn num_buffers(hdr: &[u8]) -> u16 {
    u16::from_le_bytes([hdr[NUM_BUFFERS], hdr[NUM_BUFFERS + 1]])
}

/// Whether the driver, with features `acked`, may receive a frame with header `hdr`; clears
/// what it must not see. A frame the driver cannot take (a segment larger than the MTU, or a
/// partial checksum it did not accept) is refused: this happens only for frames the TAP queued
/// before a driver reset changed the offloads, and such frames are dropped.
pub fn fit_for_driver(hdr: &mut [u8], acked: u64) -> bool {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let flags = u32::from(hdr[FLAGS]);
    let gso_type = u32::from(hdr[GSO_TYPE]);
    let allowed = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => has(VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => has(VIRTIO_NET_F_GUEST_TSO6),
        VIRTIO_NET_HDR_GSO_UDP => has(VIRTIO_NET_F_GUEST_UFO),
        _ => false,
    };
    if !allowed || (gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 && !has(VIRTIO_NET_F_GUEST_ECN)) {
        return false;
    }
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return false;
        }
        // "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set flags to zero."
        hdr[FLAGS] = 0;
    } else {
        hdr[FLAGS] = (flags & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)) as u8;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;
    const TSO4: u64 = 1 << VIRTIO_NET_F_GUEST_TSO4;
    const TSO6: u64 = 1 << VIRTIO_NET_F_GUEST_TSO6;

    fn hdr(flags: u32, gso_type: u32) -> [u8; VNET_HDR_LEN] {
        let mut h = [0u8; VNET_HDR_LEN];
        h[FLAGS] = flags as u8;
        h[GSO_TYPE] = gso_type as u8;
        h
    }

    #[test]
    fn plain_frames_always_fit_and_lose_their_flags_without_guest_csum() {
        let mut h = hdr(VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_NONE);
        assert!(fit_for_driver(&mut h, 0));
        assert_eq!(h[FLAGS], 0);
        let mut h = hdr(VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_NONE);
        assert!(fit_for_driver(&mut h, CSUM));
        assert_eq!(u32::from(h[FLAGS]), VIRTIO_NET_HDR_F_DATA_VALID);
    }

    #[test]
    fn partial_checksums_need_guest_csum() {
        let mut h = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE);
        assert!(!fit_for_driver(&mut h, 0));
        assert!(fit_for_driver(&mut h, CSUM));
    }

    #[test]
    fn segments_need_the_matching_guest_tso() {
        let v4 = VIRTIO_NET_HDR_GSO_TCPV4;
        let v6 = VIRTIO_NET_HDR_GSO_TCPV6;
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        assert!(!fit_for_driver(&mut hdr(csum, v4), CSUM));
        assert!(fit_for_driver(&mut hdr(csum, v4), CSUM | TSO4));
        assert!(!fit_for_driver(&mut hdr(csum, v6), CSUM | TSO4));
        assert!(fit_for_driver(&mut hdr(csum, v6), CSUM | TSO6));
        // ECN and UFO are never offered.
        let ecn = v4 | VIRTIO_NET_HDR_GSO_ECN;
        assert!(!fit_for_driver(&mut hdr(csum, ecn), CSUM | TSO4 | TSO6));
        assert!(!fit_for_driver(
            &mut hdr(csum, VIRTIO_NET_HDR_GSO_UDP),
            CSUM | TSO4
        ));
        assert!(!fit_for_driver(&mut hdr(0, 0x42), u64::MAX));
    }

    #[test]
    fn num_buffers_round_trips() {
        let mut h = [0u8; VNET_HDR_LEN];
        set_num_buffers(&mut h, 0x1234);
        assert_eq!(num_buffers(&h), 0x1234);
        assert_eq!(&h[10..], &[0x34, 0x12]);
    }
}
