//! A TAP interface opened through `/dev/net/tun`, carrying frames with a virtio-net header.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

/// Length of `virtio_net_hdr_v1`, the header before every frame (VIRTIO_F_VERSION_1).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNTAP: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);

/// Errors from opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in an interface name.
    #[error("invalid TAP name {0:?}: 1 to 15 characters")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun for TAP {name}: {source}")]
    OpenTun {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `TUNSETIFF` failed: the interface exists and is not a TAP, or is busy, or no permission.
    #[error("cannot open TAP {name} (TUNSETIFF): {source}")]
    SetIff {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the virtio-net header size of TAP {name}: {source}")]
    SetVnetHdrSize {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `TUNSETOFFLOAD` failed.
    #[error("cannot set the offloads of TAP {name}: {source}")]
    SetOffload {
        /// The TAP name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface, non-blocking; each read or write is one frame preceded by a
/// [`VNET_HDR_LEN`]-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
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
                source: std::io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: the fd is a TAP and `hdr_len` a valid int that outlives the call.
        let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // No offloads: frames cross the TAP with complete checksums and no segmentation.
        // SAFETY: the fd is a TAP; TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe { ioctl_with_val(&file, TUNSETOFFLOAD(), 0) };
        if ret < 0 {
            return Err(TapError::SetOffload {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header); `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
