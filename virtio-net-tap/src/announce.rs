//! Announcing a guest on its new host: after a migration or a failover, switches and bridges
//! still send the guest's traffic to the old port until they see a frame from its MAC. Like
//! QEMU's `announce-self`, we send RARP "request reverse" broadcasts from the guest's MAC out
//! of the new TAP, which needs no knowledge of the guest's IP addresses.

use std::io;

use crate::header::VNET_HDR_LEN;
use crate::mac::MacAddr;
use crate::tap::Tap;

/// EtherType of RARP.
const ETH_P_RARP: u16 = 0x8035;
/// Shortest Ethernet frame without its FCS.
const MIN_FRAME: usize = 60;

/// A RARP broadcast from `mac` (RFC 903 "request reverse", sender and target `mac`).
pub fn rarp_frame(mac: MacAddr) -> [u8; MIN_FRAME] {
    let m = mac.bytes();
    let mut f = [0u8; MIN_FRAME];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&m);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // request reverse
    f[22..28].copy_from_slice(&m); // sender hardware address
    f[32..38].copy_from_slice(&m); // target hardware address
    f
}

/// Sends the RARP announcement of `mac` out of `tap` (which carries virtio-net headers).
pub fn announce(tap: &Tap, mac: MacAddr) -> io::Result<()> {
    let mut buf = [0u8; VNET_HDR_LEN + MIN_FRAME];
    buf[VNET_HDR_LEN..].copy_from_slice(&rarp_frame(mac));
    tap.write_frame(&buf).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = MacAddr([0x06, 0, 0x0a, 0, 2, 2]);
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.bytes());
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac.bytes());
        assert_eq!(&f[32..38], &mac.bytes());
        assert_eq!(&f[28..32], &[0; 4]);
    }
}
