//! The virtio-net device model (virtio spec 1.1 §5.1) over a [`Tap`]: RX and TX queue
//! processing, the configuration space, and the egress gate and ingress tap on the data path.
//! Guest memory is only touched through vm-memory, so the monitor's dirty bitmap sees every
//! byte the device writes.

use std::io::ErrorKind;
use std::sync::mpsc::Sender;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::Bytes;

use crate::gate::{Admission, EgressGate};
use crate::tap::{Tap, VNET_HDR_LEN};

/// Guest memory as the vmm maps it (with its dirty bitmap).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// `VIRTIO_F_VERSION_1`.
const VIRTIO_F_VERSION_1: u32 = 32;
/// Largest frame with its header: 64 KiB of payload is more than any MTU the TAP carries.
pub const MAX_FRAME_LEN: usize = 65562;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Errors on the data path.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A queue operation on guest memory failed.
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// Reading a frame from the TAP failed.
    #[error("cannot read from TAP {tap}: {source}")]
    TapRead {
        /// The TAP name.
        tap: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Counters of the data path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (without headers).
    pub rx_bytes: u64,
    /// Frames sent by the guest.
    pub tx_frames: u64,
    /// Bytes sent by the guest (without headers).
    pub tx_bytes: u64,
    /// Inbound frames dropped (no buffer large enough).
    pub rx_dropped: u64,
    /// Outbound frames the TAP or the gate refused.
    pub tx_dropped: u64,
}

/// The virtio-net device: a TAP, a MAC, the gate, and the frame waiting for an RX buffer.
pub struct NetDevice {
    tap: Tap,
    mac: [u8; 6],
    acked_features: u64,
    gate: EgressGate,
    ingress: Option<Sender<Vec<u8>>>,
    /// A frame read from the TAP for which the guest had no buffer yet (header included).
    pending_rx: Option<Vec<u8>>,
    rx_buf: Vec<u8>,
    stats: NetStats,
}

impl NetDevice {
    /// A device on `tap` with MAC `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            acked_features: 0,
            gate: EgressGate::default(),
            ingress: None,
            pending_rx: None,
            rx_buf: vec![0; MAX_FRAME_LEN],
            stats: NetStats::default(),
        }
    }

    /// The TAP.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Features offered: modern device, MAC and link status. No offloads: frames carry
    /// complete checksums and are at most one MTU, so RX buffers need no merging.
    pub fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records the accepted features (only those offered).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    /// `struct virtio_net_config`: MAC then status (link up).
    pub fn config_space(&self) -> [u8; 8] {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config
    }

    /// The egress gate.
    pub fn gate_mut(&mut self) -> &mut EgressGate {
        &mut self.gate
    }

    /// Sends a copy of every inbound frame (without header) to `tx` from now on.
    pub fn set_ingress_tap(&mut self, tx: Option<Sender<Vec<u8>>>) {
        self.ingress = tx;
    }

    /// Data-path counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Forgets per-activation state (driver reset). The gate keeps what it holds.
    pub fn reset(&mut self) {
        self.acked_features = 0;
        self.pending_rx = None;
    }

    /// Writes frames released by the gate to the TAP.
    pub fn write_released(&mut self, frames: Vec<Vec<u8>>) {
        for frame in frames {
            self.send_to_tap(&frame);
        }
    }

    fn send_to_tap(&mut self, frame: &[u8]) {
        if let Err(e) = self.tap.write_frame(frame) {
            self.stats.tx_dropped += 1;
            tracing::debug!(tap = self.tap.name(), "TX frame dropped by the TAP: {e}");
        }
    }

    /// Sends every frame the driver queued for transmission; returns whether buffers were
    /// returned to the driver.
    pub fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        let mut used = false;
        let mut frame = Vec::with_capacity(MAX_FRAME_LEN);
        loop {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                frame.clear();
                if gather(mem, chain, &mut frame) && frame.len() >= VNET_HDR_LEN {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
                    match self.gate.admit(&frame) {
                        Admission::Send => self.send_to_tap(&frame),
                        Admission::Held => {}
                        Admission::Dropped => self.stats.tx_dropped += 1,
                    }
                } else {
                    self.stats.tx_dropped += 1;
                    tracing::warn!("malformed TX descriptor chain dropped");
                }
                queue.add_used(mem, head, 0)?;
                used = true;
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        Ok(used)
    }

    /// Moves frames from the TAP into the driver's receive buffers until the TAP is empty or
    /// the buffers run out (then the frame waits, and this is called again when the driver adds
    /// buffers); returns whether buffers were returned to the driver.
    pub fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, NetError> {
        let mut used = false;
        loop {
            let frame = match self.pending_rx.take() {
                Some(frame) => frame,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n >= VNET_HDR_LEN => {
                        let mut frame = self.rx_buf[..n].to_vec();
                        // num_buffers = 1 (VERSION_1 without MRG_RXBUF).
                        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                        frame
                    }
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(NetError::TapRead {
                            tap: self.tap.name().to_string(),
                            source,
                        })
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame and ask to be told when buffers arrive.
                self.pending_rx = Some(frame);
                if queue.enable_notification(mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let written = scatter(mem, chain, &frame);
            if written == frame.len() {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
                if let Some(tx) = &self.ingress {
                    if tx.send(frame[VNET_HDR_LEN..].to_vec()).is_err() {
                        self.ingress = None;
                    }
                }
                queue.add_used(mem, head, written as u32)?;
            } else {
                self.stats.rx_dropped += 1;
                tracing::warn!(
                    len = frame.len(),
                    "RX frame dropped: the guest's buffer holds {written} bytes"
                );
                queue.add_used(mem, head, 0)?;
            }
            used = true;
        }
        Ok(used)
    }
}

/// Copies the device-readable buffers of `chain` into `out`; false if the chain is malformed.
fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    out: &mut Vec<u8>,
) -> bool {
    for desc in chain {
        if desc.is_write_only() {
            return false;
        }
        let start = out.len();
        let len = desc.len() as usize;
        if start + len > MAX_FRAME_LEN {
            return false;
        }
        out.resize(start + len, 0);
        if mem.read_slice(&mut out[start..], desc.addr()).is_err() {
            return false;
        }
    }
    true
}

/// Copies `frame` into the device-writable buffers of `chain`; returns the bytes written.
fn scatter(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, frame: &[u8]) -> usize {
    let mut written = 0;
    for desc in chain.writable() {
        if written == frame.len() {
            break;
        }
        let n = (desc.len() as usize).min(frame.len() - written);
        if mem
            .write_slice(&frame[written..written + n], desc.addr())
            .is_err()
        {
            break;
        }
        written += n;
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::AsRawFd;
    use std::process::Command;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    const BUF_ADDR: u64 = 0x1_0000;

    /// A TAP that is up, with a packet socket bound to its interface: what the socket sends
    /// comes out of the TAP fd, what is written to the TAP fd the socket receives.
    struct TapPeer {
        name: String,
        sock: libc::c_int,
        ifindex: libc::c_int,
    }

    impl TapPeer {
        fn new(tag: &str) -> Option<(Tap, TapPeer)> {
            if !std::path::Path::new("/dev/net/tun").exists() {
                eprintln!("skipped: no /dev/net/tun");
                return None;
            }
            let name = format!("vnt{tag}{}", std::process::id() % 100_000);
            let mut tap = Tap::open(&name).unwrap();
            // No IPv6 on the test interface: its neighbour discovery would add frames.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
            let up = Command::new("ip")
                .args(["link", "set", &name, "up"])
                .status()
                .unwrap();
            assert!(up.success());
            let cname = std::ffi::CString::new(name.clone()).unwrap();
            // SAFETY: `cname` is a valid NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as libc::c_int;
            assert!(ifindex > 0);
            let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
            // SAFETY: plain socket creation; the fd is checked and owned by TapPeer.
            let sock = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(sock >= 0);
            // SAFETY: an all-zero sockaddr_ll is valid; fields are set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex;
            // SAFETY: `addr` is a valid sockaddr_ll of the size given.
            let ret = unsafe {
                libc::bind(
                    sock,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(ret, 0);
            // Drop anything the kernel sent before the test's frames.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut buf = vec![0u8; MAX_FRAME_LEN];
            while tap.read_frame(&mut buf).is_ok() {}
            Some((
                tap,
                TapPeer {
                    name,
                    sock,
                    ifindex,
                },
            ))
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: an all-zero sockaddr_ll is valid; fields are set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = self.ifindex;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: `frame` and `addr` are valid for the sizes given.
            let n = unsafe {
                libc::sendto(
                    self.sock,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(n, frame.len() as isize);
        }

        /// The next frame the interface received that starts with `prefix`.
        fn recv_matching(&self, prefix: &[u8]) -> Vec<u8> {
            let mut buf = vec![0u8; 2048];
            for _ in 0..100 {
                // SAFETY: `buf` is valid for its length; MSG_DONTWAIT never blocks.
                let n = unsafe {
                    libc::recv(
                        self.sock,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 && buf[..n as usize].starts_with(prefix) {
                    return buf[..n as usize].to_vec();
                }
                if n <= 0 {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            panic!("no frame received on {}", self.name);
        }
    }

    impl Drop for TapPeer {
        fn drop(&mut self) {
            // SAFETY: the socket fd is owned by this struct and closed once.
            unsafe { libc::close(self.sock) };
        }
    }

    fn frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        f.extend_from_slice(payload);
        f
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn chain(vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, u32)]) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i == descs.len() - 1;
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT
                };
                let next = if last { 0 } else { i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
    }

    #[test]
    fn tx_frames_reach_the_tap_interface() {
        let Some((tap, peer)) = TapPeer::new("t") else {
            return;
        };
        let mut dev = NetDevice::new(tap, [6, 0, 0, 0, 0, 1]);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let out = frame([0xff; 6], b"hello from the guest");
        let mut with_hdr = vec![0u8; VNET_HDR_LEN];
        with_hdr.extend_from_slice(&out);
        // Header and frame in two descriptors, as Linux may lay them out.
        mem.write_slice(&with_hdr, GuestAddress(BUF_ADDR)).unwrap();
        chain(
            &vq,
            &[
                (BUF_ADDR, VNET_HDR_LEN as u32, 0),
                (BUF_ADDR + VNET_HDR_LEN as u64, out.len() as u32, 0),
            ],
        );
        let mut queue: Queue = vq.create_queue().unwrap();
        assert!(dev.process_tx(&mem, &mut queue).unwrap());
        assert_eq!(peer.recv_matching(&out[..12]), out);
        assert_eq!(dev.stats().tx_frames, 1);
        assert_eq!(dev.stats().tx_bytes, out.len() as u64);
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn rx_frames_land_in_guest_buffers_dirty_and_mirrored() {
        let Some((tap, peer)) = TapPeer::new("r") else {
            return;
        };
        let mac = [6, 0, 0, 0, 0, 2];
        let mut dev = NetDevice::new(tap, mac);
        let (tx, rx) = std::sync::mpsc::channel();
        dev.set_ingress_tap(Some(tx));
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().unwrap();
        let inbound = frame(mac, b"hello from the host");

        // A frame with no RX buffer waits for one.
        peer.send(&inbound);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!dev.process_rx(&mem, &mut queue).unwrap());
        assert_eq!(dev.stats().rx_frames, 0);

        chain(&vq, &[(BUF_ADDR, 2048, VRING_DESC_F_WRITE)]);
        let region = mem.find_region(GuestAddress(BUF_ADDR)).unwrap();
        let _ = std::ops::Deref::deref(region).bitmap().get_and_reset();
        assert!(dev.process_rx(&mem, &mut queue).unwrap());

        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(elem.len() as usize, VNET_HDR_LEN + inbound.len());
        let mut got = vec![0u8; elem.len() as usize];
        mem.read_slice(&mut got, GuestAddress(BUF_ADDR)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert!(
            region.bitmap().dirty_at(BUF_ADDR as usize),
            "device write not tracked"
        );
        assert_eq!(rx.try_recv().unwrap(), inbound);
        assert_eq!(dev.stats().rx_frames, 1);
    }

    #[test]
    fn held_tx_frames_wait_for_release() {
        let Some((tap, peer)) = TapPeer::new("g") else {
            return;
        };
        let mut dev = NetDevice::new(tap, [6, 0, 0, 0, 0, 3]);
        dev.gate_mut().set_mode(crate::gate::GateMode::Held);
        dev.gate_mut().set_epoch(7);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let out = frame([0xff; 6], b"held until epoch 7 commits");
        let mut with_hdr = vec![0u8; VNET_HDR_LEN];
        with_hdr.extend_from_slice(&out);
        mem.write_slice(&with_hdr, GuestAddress(BUF_ADDR)).unwrap();
        chain(&vq, &[(BUF_ADDR, with_hdr.len() as u32, 0)]);
        let mut queue: Queue = vq.create_queue().unwrap();
        dev.process_tx(&mem, &mut queue).unwrap();
        assert_eq!(dev.gate_mut().held_frames(), 1);
        let released = dev.gate_mut().release_through(7);
        dev.write_released(released);
        assert_eq!(peer.recv_matching(&out[..12]), out);
    }

    #[test]
    fn config_space_and_features() {
        let Some((tap, _peer)) = TapPeer::new("c") else {
            return;
        };
        let mut dev = NetDevice::new(tap, [6, 1, 2, 3, 4, 5]);
        assert_eq!(&dev.config_space()[..6], &[6, 1, 2, 3, 4, 5]);
        assert_eq!(dev.config_space()[6], VIRTIO_NET_S_LINK_UP as u8);
        dev.set_acked_features(u64::MAX);
        assert_eq!(dev.acked_features(), dev.avail_features());
        assert!(dev.tap().as_raw_fd() >= 0);
        assert!(matches!(
            Tap::open("lo"),
            Err(crate::tap::TapError::SetIff { .. })
        ));
        assert!(matches!(Tap::open(""), Err(crate::tap::TapError::Name(_))));
    }
}
