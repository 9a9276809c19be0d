//! A TAP interface opened through `/dev/net/tun`, carrying Ethernet frames each preceded by a
//! virtio-net header (`IFF_VNET_HDR`, header size [`VNET_HDR_LEN`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use crate::header::VNET_HDR_LEN;

/// The TUN/TAP clone device.
const TUN_PATH: &str = "/dev/net/tun";

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUNSETOFFLOAD` flag: the TAP may hand over frames whose checksum is left partial.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUNSETOFFLOAD` flag: the TAP may hand over TCPv4 segments larger than the MTU.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUNSETOFFLOAD` flag: the TAP may hand over TCPv6 segments larger than the MTU.
pub const TUN_F_TSO6: u32 = 0x04;

const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);

/// Errors from opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in an interface name.
    #[error("invalid TAP name {0:?}: 1 to 15 characters, no '/' or NUL")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open {TUN_PATH} for TAP {name}: {source}{hint}", hint = open_hint(.source))]
    OpenTun {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// `TUNSETIFF` failed: no permission, the TAP is in use, or the name is not a TAP.
    #[error("cannot attach to TAP {name} (TUNSETIFF): {source}{hint}", hint = set_iff_hint(.source))]
    SetIff {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the virtio-net header size of TAP {name} (TUNSETVNETHDRSZ): {source}")]
    SetVnetHdrSize {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// `TUNSETOFFLOAD` failed.
    #[error("cannot set the offloads of TAP {name} to {flags:#x} (TUNSETOFFLOAD): {source}")]
    SetOffload {
        /// The TAP name.
        name: String,
        /// The `TUN_F_*` flags asked for.
        flags: u32,
        /// The OS error.
        source: io::Error,
    },
}

fn open_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            " (no TUN/TAP support: `modprobe tun`, or create /dev/net/tun)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (not allowed: run as root or give access to /dev/net/tun)"
        }
        _ => "",
    }
}

fn set_iff_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM) => {
            " (needs CAP_NET_ADMIN, or a persistent TAP owned by this user: \
             `ip tuntap add NAME mode tap user USER vnet_hdr`)"
        }
        Some(libc::EBUSY) => " (the TAP is in use by another process)",
        Some(libc::EINVAL) => {
            " (an interface of that name exists and is not a single-queue TAP, \
             or it was made without vnet_hdr)"
        }
        _ => "",
    }
}

/// `struct ifreq` as `TUNSETIFF` uses it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface, non-blocking. Each read or write moves one frame preceded by a
/// [`VNET_HDR_LEN`]-byte `virtio_net_hdr_v1`. Reads and writes take `&self`: the kernel keeps
/// frames whole, so one thread may read while another writes.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offload_supported: bool,
}

impl Tap {
    /// Opens the TAP interface `name` (creating it if it does not exist and the caller may),
    /// with a 12-byte virtio-net header on every frame and all offloads off.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.bytes().any(|b| b == b'/' || b == 0)
        {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut ifreq = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        ifreq.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open /dev/net/tun and `ifreq` is a valid `struct ifreq` that
        // outlives the call; the kernel writes at most `sizeof(struct ifreq)` bytes into it.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifreq) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: the fd is a TAP and `hdr_len` is a valid int that outlives the call; the
        // kernel only reads it.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Tap {
            file,
            name: name.to_string(),
            offload_supported: false,
        };
        // Probe the offloads the device may later enable, then start with none: until the
        // driver accepts offload features, frames must be complete and at most one MTU long.
        tap.offload_supported = tap
            .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            .is_ok();
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the TAP accepts [`TUN_F_CSUM`], [`TUN_F_TSO4`] and [`TUN_F_TSO6`].
    pub fn offload_supported(&self) -> bool {
        self.offload_supported
    }

    /// Sets what the kernel may hand over on reads: `TUN_F_*` flags (0: complete checksums and
    /// no segments above the MTU). Frames written to the TAP may use any offload regardless.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: the fd is a TAP; TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), flags.into()) };
        if ret < 0 {
            return Err(TapError::SetOffload {
                name: self.name.clone(),
                flags,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame with its header into `buf`; `WouldBlock` when none is waiting. A frame
    /// longer than `buf` is an error (`EFAULT`) and is lost.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame with its header.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::NetNs;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a-name-of-16-chr", "a/b", "a\0b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
    }

    #[test]
    fn opening_a_non_tap_interface_says_so() {
        let Some(_ns) = NetNs::enter() else { return };
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::SetIff { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("TAP lo") && msg.contains("not a single-queue TAP"),
            "{msg}"
        );
    }

    #[test]
    fn a_tap_in_use_is_reported_busy() {
        let Some(_ns) = NetNs::enter() else { return };
        let first = Tap::open("vnt-busy").unwrap();
        let err = Tap::open("vnt-busy").unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        Tap::open("vnt-busy").unwrap();
    }

    #[test]
    fn open_sets_up_a_tap_with_offloads_off() {
        let Some(_ns) = NetNs::enter() else { return };
        let tap = Tap::open("vnt-open").unwrap();
        assert_eq!(tap.name(), "vnt-open");
        assert!(tap.as_raw_fd() >= 0);
        // A fresh TAP has nothing to read, and reading does not block.
        let mut buf = [0u8; 64];
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        if tap.offload_supported() {
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4).unwrap();
            tap.set_offload(0).unwrap();
        }
        assert!(matches!(
            tap.set_offload(0x8000_0000),
            Err(TapError::SetOffload { .. })
        ));
    }
}
