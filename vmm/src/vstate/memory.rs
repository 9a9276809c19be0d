//! Guest memory: anonymous mmap regions with a dirty bitmap, so that every write the monitor
//! itself makes into guest RAM (device DMA, boot setup) is tracked beside KVM's dirty log.

use vm_memory::bitmap::{AtomicBitmap, NewBitmap, BS};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice,
};

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
    /// The host has no room for guest memory.
    #[error("cannot map guest memory: {0}")]
    Map(std::io::Error),
    /// vm-memory refused the mapping.
    #[error("cannot use the guest memory mapping: {0}")]
    Region(vm_memory::mmap::MmapRegionError),
    /// The regions overlap (a bug in the memory layout).
    #[error("invalid guest memory layout")]
    Layout,
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

/// Alignment of guest RAM in the monitor's address space: a transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Maps `size` bytes of anonymous, private memory at a 2 MiB-aligned address.
///
/// Guest RAM starts at 2 MiB-aligned guest addresses; KVM can map it with huge pages in the
/// second-level page tables only when its host address is aligned the same way (Linux before
/// 6.7 does not align large anonymous mappings by itself). Misaligned, every 4 KiB the guest
/// touches first costs an EPT/NPT fault: under nested virtualization that is most of the
/// kernel's time spent unpacking an initramfs.
///
/// The mapping is never unmapped: vm-memory hands out references to guest memory that outlive
/// any owner we could give it. [`release_guest_memory`] returns its pages to the host.
fn map_aligned(size: usize) -> std::io::Result<*mut u8> {
    let reserve = size + HUGE_PAGE;
    // SAFETY: a new private anonymous mapping; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = base as usize;
    let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    // SAFETY: [aligned, aligned + size) lies inside the reservation just made, which nothing
    // else uses; MAP_FIXED replaces exactly that part of it.
    let mem = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        // SAFETY: unmapping our own reservation.
        unsafe { libc::munmap(base, reserve) };
        return Err(err);
    }
    let tail = start + reserve - (aligned + size);
    // SAFETY: the head and tail of the reservation are ours and unused.
    unsafe {
        if aligned > start {
            libc::munmap(base, aligned - start);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    // No MADV_HUGEPAGE: with Linux's default `defrag=madvise`, a huge-page fault in a madvised
    // range compacts memory synchronously, which stalled guests for minutes in the lab. The
    // host's THP policy ("always" on Debian) still backs the aligned range with huge pages
    // whenever one is free.
    Ok(mem.cast())
}

/// Maps anonymous, private guest memory of `mem_size` bytes, 2 MiB-aligned so that the host's
/// transparent huge pages can back it (see `map_aligned`).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (addr, size) in ram_ranges(mem_size) {
        let ptr = map_aligned(size).map_err(MemoryError::Map)?;
        // SAFETY: `ptr` is a fresh read-write mapping of `size` bytes that is never unmapped.
        let mapping = unsafe {
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_raw_mmap_pointer(ptr)
        }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(MemoryError::Region)?;
        regions.push(GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::Layout)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Layout)
}

/// Gives the pages of guest memory back to the host once the VM is gone (the mappings stay,
/// reading as zeros).
pub fn release_guest_memory(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        // SAFETY: MADV_DONTNEED on our own private anonymous mapping only drops its contents.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// Whether `page` is all zeros (compared a word at a time).
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Total bytes of guest RAM.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// One page of guest RAM, to copy from or into (writes through it are marked in the bitmap).
pub type PageSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// Guest RAM as pages numbered across its regions in order: the numbering of snapshot memory
/// files and of migration streams (page `p` sits at byte `p * PAGE_SIZE` of a memory file).
pub struct PageMap<'a> {
    /// (first page, region), in order.
    regions: Vec<(u64, &'a GuestRegionMmap)>,
    pages: u64,
}

impl<'a> PageMap<'a> {
    /// The numbering of `mem`'s pages.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mut pages = 0;
        let regions = mem
            .iter()
            .map(|r| {
                let first = pages;
                pages += r.len() / PAGE_SIZE as u64;
                (first, r)
            })
            .collect();
        Self { regions, pages }
    }

    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The number of the first page of region `slot`, and its page count.
    pub fn region(&self, slot: usize) -> Option<(u64, u64)> {
        self.regions
            .get(slot)
            .map(|(first, r)| (*first, r.len() / PAGE_SIZE as u64))
    }

    /// Page `page`, if it exists.
    pub fn page(&self, page: u64) -> Option<PageSlice<'a>> {
        self.pages_at(page, 1)
    }

    /// Pages `page..page + count`, if they exist and lie in one region (contiguous in the
    /// monitor's memory).
    pub fn pages_at(&self, page: u64, count: u64) -> Option<PageSlice<'a>> {
        let (first, region) = self.locate(page)?;
        region
            .get_slice(
                MemoryRegionAddress((page - first) * PAGE_SIZE as u64),
                usize::try_from(count).ok()?.checked_mul(PAGE_SIZE)?,
            )
            .ok()
    }

    /// How many pages from `page` on lie in the same region (0 if `page` does not exist).
    pub fn contiguous_from(&self, page: u64) -> u64 {
        self.locate(page).map_or(0, |(first, r)| {
            (first + r.len() / PAGE_SIZE as u64).saturating_sub(page)
        })
    }

    /// The region `page` would lie in, with the number of its first page.
    fn locate(&self, page: u64) -> Option<(u64, &'a GuestRegionMmap)> {
        self.regions
            .iter()
            .rev()
            .find(|(first, _)| *first <= page)
            .map(|&(first, region)| (first, region))
    }
}
