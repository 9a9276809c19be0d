//! Guest memory: anonymous mmap regions with a dirty bitmap, so that every write the monitor
//! itself makes into guest RAM (device DMA, boot setup) is tracked beside KVM's dirty log.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout;

/// The guest memory type used everywhere in vmr: regions carry an [`AtomicBitmap`] of the pages
/// written through `vm-memory` (that is, by the monitor, never by the guest's vCPUs).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Page size used for dirty tracking (KVM's and the bitmap's).
pub const PAGE_SIZE: usize = 4096;

/// Errors from creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Guest memory regions could not be mapped.
    #[error("cannot map guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// The (start, size) ranges of guest RAM for `mem_size` bytes: RAM below the MMIO gap, and the
/// rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let gap_start = layout::MMIO_GAP_START;
    if mem_size <= gap_start {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), gap_start as usize),
            (
                GuestAddress(layout::MMIO_GAP_END),
                (mem_size - gap_start) as usize,
            ),
        ]
    }
}

/// Maps anonymous, private guest memory of `mem_size` bytes, backed by transparent huge pages
/// where the host allows it (fewer, cheaper second-level page faults as the guest touches RAM).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mem = GuestMemoryMmap::from_ranges(&ram_ranges(mem_size))?;
    for region in mem.iter() {
        // SAFETY: the range is exactly one live mapping owned by `mem`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if ret != 0 {
            tracing::debug!("MADV_HUGEPAGE refused: {}", std::io::Error::last_os_error());
        }
    }
    Ok(mem)
}

/// Total bytes of guest RAM.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}
