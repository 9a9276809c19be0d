//! Test helpers: a private network namespace per test thread, TAPs in it, and a packet socket
//! on the host side of a TAP.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::tap::Tap;

/// The calling test thread's own network namespace (when the host allows it), so that TAPs,
/// addresses and routes of a test touch nothing else. It lives as long as the thread and the
/// descriptors opened in it.
pub struct NetNs {
    private: bool,
}

impl NetNs {
    /// Moves the calling thread into a new network namespace; `None` (the test is skipped) only
    /// when the host has no `/dev/net/tun`.
    pub fn enter() -> Option<NetNs> {
        if !Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: no /dev/net/tun on this host");
            return None;
        }
        // SAFETY: unshare(CLONE_NEWNET) changes only the calling thread's network namespace;
        // no memory is involved.
        let private = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
        if private {
            // No IPv6 on the namespace's interfaces: neighbour discovery would add frames.
            std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").ok();
        } else {
            eprintln!(
                "note: cannot make a network namespace ({}); using the current one",
                std::io::Error::last_os_error()
            );
        }
        Some(NetNs { private })
    }

    /// A TAP name for this test, unique across processes when the namespace is shared.
    pub fn tap_name(&self, tag: &str) -> String {
        if self.private {
            format!("vnt-{tag}")
        } else {
            format!("vnt{tag}{}", std::process::id() % 1_000_000)
        }
    }
}

/// Runs `ip ARGS...` in the calling thread's namespace.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads frames from `tap` until `pred` accepts one, for up to two seconds.
pub fn read_tap_until(tap: &Tap, mut pred: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tap.read_frame(&mut buf) {
            Ok(n) if pred(&buf[..n]) => return buf[..n].to_vec(),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    panic!("no matching frame read from TAP {}", tap.name());
}

/// The host side of a TAP that is up: what the socket sends comes out of the TAP fd, and what
/// is written to the TAP fd the socket receives.
pub struct TapPeer {
    /// The interface name.
    pub name: String,
    sock: libc::c_int,
    ifindex: libc::c_int,
    /// Whether the TAP is persistent and deleted with the peer.
    persistent: bool,
}

impl TapPeer {
    /// Opens TAP `vnt-TAG` in `ns`, brings it up, and binds a packet socket to it; returns
    /// both, with the TAP read empty.
    pub fn new(ns: &NetNs, tag: &str) -> (Tap, TapPeer) {
        let name = ns.tap_name(tag);
        let tap = Tap::open(&name).unwrap();
        let peer = TapPeer::bind(name);
        let mut buf = vec![0u8; 70_000];
        while tap.read_frame(&mut buf).is_ok() {}
        (tap, peer)
    }

    /// Creates the persistent TAP `vnt-TAG` in `ns` (it outlives the descriptors opened on it,
    /// so a device can be closed and another opened on it by name), brings it up and binds a
    /// packet socket to it.
    pub fn persistent(ns: &NetNs, tag: &str) -> TapPeer {
        let name = ns.tap_name(tag);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]);
        let mut peer = TapPeer::bind(name);
        peer.persistent = true;
        peer
    }

    /// Waits (up to two seconds) until the TAP's link is up: a persistent TAP gets its carrier
    /// when a device attaches, and the kernel drops what is sent to it before the link is up.
    pub fn wait_link_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let out = Command::new("ip")
                .args(["-o", "link", "show", "dev", &self.name])
                .output()
                .expect("cannot run ip");
            if String::from_utf8_lossy(&out.stdout).contains("state UP") {
                return;
            }
            assert!(Instant::now() < deadline, "TAP {} never came up", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Brings TAP `name` up and binds a packet socket to it, with nothing received yet.
    fn bind(name: String) -> TapPeer {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1").ok();
        ip(&["link", "set", &name, "up"]);
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: `cname` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as libc::c_int;
        assert!(ifindex > 0);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is checked and then owned by the TapPeer.
        let sock = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into()) };
        assert!(
            sock >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let addr = sockaddr_ll(ifindex, proto, None);
        // SAFETY: `addr` is a valid sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                sock,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
        let peer = TapPeer {
            name,
            sock,
            ifindex,
            persistent: false,
        };
        // Forget whatever the kernel sent when the link came up.
        std::thread::sleep(Duration::from_millis(20));
        peer.drain();
        peer
    }

    /// Sends an Ethernet frame out of the host side: the TAP fd reads it.
    pub fn send(&self, frame: &[u8]) {
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let addr = sockaddr_ll(self.ifindex, 0, Some(dst));
        // SAFETY: `frame` and `addr` are valid for the sizes given.
        let n = unsafe {
            libc::sendto(
                self.sock,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    fn try_recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: `buf` is valid for its length; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                self.sock,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        (n >= 0).then_some(n as usize)
    }

    /// Drops every frame received so far.
    pub fn drain(&self) {
        let mut buf = vec![0u8; 70_000];
        while self.try_recv(&mut buf).is_some() {}
    }

    /// The next frame received that starts with `prefix`, within two seconds.
    pub fn recv_matching(&self, prefix: &[u8]) -> Vec<u8> {
        self.try_recv_matching(prefix, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("no frame received on {}", self.name))
    }

    /// The next frame received that starts with `prefix`, if one comes within `wait`.
    pub fn try_recv_matching(&self, prefix: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        let deadline = Instant::now() + wait;
        loop {
            match self.try_recv(&mut buf) {
                Some(n) if buf[..n].starts_with(prefix) => return Some(buf[..n].to_vec()),
                Some(_) => {}
                None if Instant::now() >= deadline => return None,
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

impl Drop for TapPeer {
    fn drop(&mut self) {
        // SAFETY: the socket fd is owned by this struct and closed once.
        unsafe { libc::close(self.sock) };
        if self.persistent {
            // In a private namespace the TAP would go with it; in a shared one it must not stay.
            let _ = Command::new("ip")
                .args(["tuntap", "del", "dev", &self.name, "mode", "tap"])
                .output();
        }
    }
}

fn sockaddr_ll(ifindex: libc::c_int, proto_be: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto_be;
    addr.sll_ifindex = ifindex;
    if let Some(dst) = dst {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
    }
    addr
}

/// An Ethernet frame to `dst` with a local experimental EtherType and `payload`.
pub fn ether_frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(payload);
    f
}

/// `frame` behind an all-zero virtio-net header.
pub fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; crate::header::VNET_HDR_LEN];
    out.extend_from_slice(frame);
    out
}

/// Guest memory as the vmm has it.
pub type Mem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// 1 MiB of guest memory at 0.
pub fn memory() -> Mem {
    Mem::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)]).unwrap()
}

/// The driver's side of a split virtqueue in test memory: descriptor table, available and used
/// rings laid out as the spec says (not overlapping), buffers handed over one chain at a time.
pub struct TestQueue<'a> {
    mem: &'a Mem,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries whose rings start at `base`.
    pub fn new(mem: &'a Mem, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        Self {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's `Queue` for these rings.
    pub fn queue(&self, event_idx: bool) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    fn write<T: vm_memory::ByteValued>(&self, val: T, addr: u64) {
        use vm_memory::Bytes;
        self.mem
            .write_obj(val, vm_memory::GuestAddress(addr))
            .unwrap();
    }

    fn read<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        use vm_memory::Bytes;
        self.mem.read_obj(vm_memory::GuestAddress(addr)).unwrap()
    }

    /// Hands the driver's buffers `(addr, len, device_writable)` to the device as one chain;
    /// returns its head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = 0u16;
            if !last {
                flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
            }
            if writable {
                flags |= virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
            }
            let next = (idx + 1) % self.size;
            let at = self.desc + 16 * u64::from(idx);
            self.write(addr.to_le(), at);
            self.write(len.to_le(), at + 8);
            self.write(flags.to_le(), at + 12);
            self.write(next.to_le(), at + 14);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        let slot = self.avail_idx % self.size;
        self.write(head.to_le(), self.avail + 4 + 2 * u64::from(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(self.avail_idx.to_le(), self.avail + 2);
        head
    }

    /// A receive chain of one writable buffer.
    pub fn add_rx(&mut self, addr: u64, len: u32) -> u16 {
        self.add_chain(&[(addr, len, true)])
    }

    /// Overwrites the available index (a broken driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write(idx.to_le(), self.avail + 2);
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.read(self.used + 2))
    }

    /// Used element `i` (counting from the start): (head index, length).
    pub fn used_elem(&self, i: u16) -> (u16, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = u32::from_le(self.read(at));
        (id as u16, u32::from_le(self.read(at + 4)))
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.read(self.used))
    }

    /// `avail_event`, written by the device under EVENT_IDX.
    pub fn avail_event(&self) -> u16 {
        u16::from_le(self.read(self.used + 4 + 8 * u64::from(self.size)))
    }

    /// Sets `used_event`: the driver wants an interrupt once that entry is used.
    pub fn set_used_event(&self, idx: u16) {
        self.write(idx.to_le(), self.avail + 4 + 2 * u64::from(self.size));
    }

    /// Sets the available ring's flags (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&self, flags: u16) {
        self.write(flags.to_le(), self.avail);
    }
}
