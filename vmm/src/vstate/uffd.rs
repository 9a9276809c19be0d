//! Write-protection of guest RAM with userfaultfd (`UFFDIO_REGISTER_MODE_WP`), for
//! copy-before-write epochs: pages protected while the VM is paused trap the next write of the
//! guest (or of the monitor) as a fault read from the userfaultfd; whoever serves it copies the
//! page first and then unprotects it, which wakes the writer.
//!
//! Raw ioctls through libc: the numbers and structs are those of `<linux/userfaultfd.h>`.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): protecting a page never touched installs a
/// marker, so its first write faults too (without it, only populated pages can be protected).
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `_UFFDIO_WRITEPROTECT` in `UFFDIO_API`'s answer (`ioctls` of the range).
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;

/// `_IOWR(type, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` for a page fault: event, reserved, then `pagefault.flags` and `.address`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());

/// Errors from userfaultfd; one variant per failing call.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// `userfaultfd(2)` failed (no `CONFIG_USERFAULTFD`, or not permitted).
    #[error("userfaultfd() failed: {0}")]
    Create(std::io::Error),
    /// `UFFDIO_API` failed or does not offer write-protect faults.
    #[error("UFFDIO_API failed: {0}")]
    Api(std::io::Error),
    /// `UFFDIO_REGISTER` (write-protect mode) failed, or the range cannot be write-protected.
    #[error("UFFDIO_REGISTER (write-protect) failed for {len:#x} bytes at {start:#x}: {source}")]
    Register {
        /// Host address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The error.
        source: std::io::Error,
    },
    /// `UFFDIO_WRITEPROTECT` failed.
    #[error("UFFDIO_WRITEPROTECT failed for {len:#x} bytes at {start:#x}: {source}")]
    WriteProtect {
        /// Host address.
        start: u64,
        /// Length in bytes.
        len: u64,
        /// The error.
        source: std::io::Error,
    },
    /// Reading a fault from the userfaultfd failed.
    #[error("reading the userfaultfd failed: {0}")]
    Read(std::io::Error),
}

/// A write fault on a protected page, as read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// The host address written (page-aligned or not).
    pub address: u64,
}

/// A userfaultfd registered for write-protect faults over ranges of the monitor's memory.
#[derive(Debug)]
pub struct WriteProtector {
    fd: OwnedFd,
    unpopulated: bool,
}

impl WriteProtector {
    /// A new userfaultfd with the write-protect feature (non-blocking reads).
    pub fn new() -> Result<Self, UffdError> {
        match Self::with_features(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED) {
            Ok(uffd) => Ok(uffd),
            Err(UffdError::Api(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                let uffd = Self::with_features(UFFD_FEATURE_PAGEFAULT_FLAG_WP)?;
                Ok(uffd)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether protecting never-touched pages protects them (`UFFD_FEATURE_WP_UNPOPULATED`).
    pub fn protects_unpopulated(&self) -> bool {
        self.unpopulated
    }

    fn with_features(features: u64) -> Result<Self, UffdError> {
        // SAFETY: the syscall takes flags only and returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(UffdError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if ret < 0 {
            return Err(UffdError::Api(std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            unpopulated: api.features & UFFD_FEATURE_WP_UNPOPULATED != 0,
        })
    }

    /// Registers `[start, start + len)` (page-aligned, a live private anonymous mapping of the
    /// caller's) for write-protect faults.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; registering
        // changes no memory, only how later faults in the range are served.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        let err = if ret < 0 {
            Some(std::io::Error::last_os_error())
        } else if reg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
            Some(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        } else {
            None
        };
        match err {
            Some(source) => Err(UffdError::Register { start, len, source }),
            None => Ok(()),
        }
    }

    fn write_protect(&self, start: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`; it changes only
        // the protection of pages in a range registered with this fd.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
        if ret < 0 {
            return Err(UffdError::WriteProtect {
                start,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Write-protects `[start, start + len)`: the next write to each page in it faults.
    pub fn protect(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.write_protect(start, len, UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes the write-protection of `[start, start + len)` and wakes the threads waiting on
    /// a write fault in it.
    pub fn unprotect(&self, start: u64, len: u64) -> Result<(), UffdError> {
        self.write_protect(start, len, 0)
    }

    /// The next write-protect fault, if one is pending (non-blocking); other events are skipped.
    pub fn read_fault(&self) -> Result<Option<WpFault>, UffdError> {
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most one `struct uffd_msg` (32 bytes) into `msg`, which has
            // exactly that size.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                return match err.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Read(err)),
                };
            }
            if n as usize == std::mem::size_of::<UffdMsg>()
                && msg.event == UFFD_EVENT_PAGEFAULT
                && msg.flags & UFFD_PAGEFAULT_FLAG_WP != 0
            {
                return Ok(Some(WpFault {
                    address: msg.address,
                }));
            }
        }
    }
}

impl AsRawFd for WriteProtector {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
