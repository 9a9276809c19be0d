//! Loading the guest kernel (ELF vmlinux or bzImage), the initrd and the command line into
//! guest memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::boot::{self, InitrdLocation};
use crate::arch::layout;
use crate::vstate::memory::GuestMemoryMmap;

/// 64-bit entry point offset from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

/// Errors from loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The kernel path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("{path} is not a loadable x86_64 kernel (ELF vmlinux: {elf}; bzImage: {bzimage})")]
    InvalidKernel {
        /// The kernel path.
        path: PathBuf,
        /// Why it is not an ELF kernel.
        elf: linux_loader::loader::Error,
        /// Why it is not a bzImage.
        bzimage: linux_loader::loader::Error,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("{0} is a bzImage without a 64-bit entry point")]
    Not64Bit(PathBuf),
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        /// The initrd path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd is empty.
    #[error("initrd {0} is empty")]
    EmptyInitrd(PathBuf),
    /// The initrd does not fit in guest memory above the kernel.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel: give the VM more memory")]
    InitrdTooBig {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: usize,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    CopyInitrd {
        /// The initrd path.
        path: PathBuf,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line: {0}")]
    LoadCmdline(linux_loader::loader::Error),
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Guest physical address of the 64-bit entry point.
    pub entry: GuestAddress,
    /// First guest physical address after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, for `boot_params`.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel at `path`: an ELF vmlinux, else a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let open = || {
        File::open(path).map_err(|source| LoaderError::OpenKernel {
            path: path.to_path_buf(),
            source,
        })
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let elf = match Elf::load(mem, None, &mut open()?, himem) {
        Ok(result) => {
            return Ok(LoadedKernel {
                entry: result.kernel_load,
                end: result.kernel_end,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut open()?, himem) {
        Ok(result) => {
            let header = result.setup_header;
            if header.is_some_and(|h| h.xloadflags & XLF_KERNEL_64 == 0) {
                return Err(LoaderError::Not64Bit(path.to_path_buf()));
            }
            Ok(LoadedKernel {
                entry: result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                end: result.kernel_end,
                setup_header: header,
            })
        }
        Err(bzimage) => Err(LoaderError::InvalidKernel {
            path: path.to_path_buf(),
            elf,
            bzimage,
        }),
    }
}

/// Loads the initrd at `path` at the top of low RAM, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel_end: u64,
    path: &Path,
) -> Result<InitrdLocation, LoaderError> {
    let read_err = |source| LoaderError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len() as usize;
    if size == 0 {
        return Err(LoaderError::EmptyInitrd(path.to_path_buf()));
    }
    let address =
        boot::initrd_address(mem, kernel_end, size).ok_or_else(|| LoaderError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
        })?;
    mem.read_exact_volatile_from(address, &mut file, size)
        .map_err(|source| LoaderError::CopyInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(InitrdLocation { address, size })
}

/// Builds a command line from space-separated arguments.
pub fn build_cmdline(args: &str) -> Result<Cmdline, LoaderError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    cmdline.insert_str(args).map_err(LoaderError::Cmdline)?;
    Ok(cmdline)
}

/// Writes the command line at [`layout::CMDLINE_START`]; returns its size with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, LoaderError> {
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(LoaderError::LoadCmdline)?;
    Ok(cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes_with_nul()
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;

    #[test]
    fn garbage_kernel_is_refused() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut f = tempfile_in_target("garbage-kernel");
        f.1.write_all(&[0x5a; 8192]).unwrap();
        let err = load_kernel(&mem, &f.0).unwrap_err();
        assert!(matches!(err, LoaderError::InvalidKernel { .. }), "{err}");
        assert!(err.to_string().contains("not a loadable x86_64 kernel"));
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, LoaderError::OpenKernel { .. }));
    }

    #[test]
    fn initrd_is_copied_below_the_gap() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let mut f = tempfile_in_target("initrd");
        f.1.write_all(b"initrd contents").unwrap();
        let loc = load_initrd(&mem, 16 << 20, &f.0).unwrap();
        let mut buf = [0u8; 15];
        vm_memory::Bytes::read_slice(&mem, &mut buf, loc.address).unwrap();
        assert_eq!(&buf, b"initrd contents");
        let empty = tempfile_in_target("empty-initrd");
        assert!(matches!(
            load_initrd(&mem, 16 << 20, &empty.0),
            Err(LoaderError::EmptyInitrd(_))
        ));
    }

    fn tempfile_in_target(name: &str) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!("vmr-{}-{name}", std::process::id()));
        let file = File::create(&path).unwrap();
        (path, file)
    }
}
