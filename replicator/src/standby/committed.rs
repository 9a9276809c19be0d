//! Where a standby keeps its last committed epoch: guest memory and disk images, behind traits
//! so that staging can be tested and fuzzed on the heap as well as on the vmm's guest memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmm::vstate::memory::{GuestMemoryMmap, PageMap, PageSlice, PAGE_SIZE};

/// Why committed memory cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The page does not exist.
    #[error("page {page} is outside committed memory ({pages} pages)")]
    OutOfRange {
        /// The page.
        page: u64,
        /// Pages of memory.
        pages: u64,
    },
}

/// The committed guest memory of a standby, as pages numbered across its regions in order
/// (the numbering of vmm's `PageMap`, snapshot memory files and the wire).
pub trait CommittedMemory {
    /// Pages of memory.
    fn pages(&self) -> u64;
    /// Sets page `page` to `contents` (one page), or to zeros.
    fn write_page(&mut self, page: u64, contents: Option<&[u8]>) -> Result<(), MemoryError>;
    /// Reads page `page` into `buf` (one page).
    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
}

/// The digest (XXH3-128) of all of `memory`, for comparing committed states.
pub fn memory_digest<M: CommittedMemory + ?Sized>(memory: &M) -> u128 {
    let mut hasher = twox_hash::XxHash3_128::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    for page in 0..memory.pages() {
        memory
            .read_page(page, &mut buf)
            .expect("every page below pages() is readable");
        hasher.write(&buf);
    }
    hasher.finish_128()
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Committed memory on the heap (tests, fuzzing, a standby that does not build its VM ahead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapMemory(Vec<u8>);

impl HeapMemory {
    /// `pages` zero pages.
    pub fn new(pages: u64) -> Self {
        Self(vec![0; pages as usize * PAGE_SIZE])
    }

    /// All the bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl CommittedMemory for HeapMemory {
    fn pages(&self) -> u64 {
        (self.0.len() / PAGE_SIZE) as u64
    }

    fn write_page(&mut self, page: u64, contents: Option<&[u8]>) -> Result<(), MemoryError> {
        let pages = self.pages();
        let start = usize::try_from(page)
            .ok()
            .filter(|_| page < pages)
            .ok_or(MemoryError::OutOfRange { page, pages })?
            * PAGE_SIZE;
        self.0[start..start + PAGE_SIZE].copy_from_slice(contents.unwrap_or(&ZERO_PAGE));
        Ok(())
    }

    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let pages = self.pages();
        if page >= pages {
            return Err(MemoryError::OutOfRange { page, pages });
        }
        let start = page as usize * PAGE_SIZE;
        buf.copy_from_slice(&self.0[start..start + PAGE_SIZE]);
        Ok(())
    }
}

/// Committed memory in the vmm's guest memory: the standby's VM, built and ready to run.
///
/// Writes go through vm-memory and so are marked in the regions' dirty bitmaps; whoever runs
/// the VM after a failover starts its dirty tracking afresh.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    pages: u64,
}

impl GuestRam {
    /// Committed memory in `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let pages = PageMap::new(&mem).pages();
        Self { mem, pages }
    }

    /// The guest memory.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Page `page` of guest RAM, numbered as snapshots and migration number them.
    fn page(&self, page: u64) -> Result<PageSlice<'_>, MemoryError> {
        PageMap::new(&self.mem)
            .page(page)
            .ok_or(MemoryError::OutOfRange {
                page,
                pages: self.pages,
            })
    }
}

impl CommittedMemory for GuestRam {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn write_page(&mut self, page: u64, contents: Option<&[u8]>) -> Result<(), MemoryError> {
        self.page(page)?.copy_from(contents.unwrap_or(&ZERO_PAGE));
        Ok(())
    }

    fn read_page(&self, page: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.page(page)?.copy_to(buf);
        Ok(())
    }
}

/// A committed disk image of a standby.
pub trait CommittedDisk {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Writes `bytes` at `offset` (inside the image).
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes the writes durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Makes the whole image zeros (before a copy of the primary's disk is written into it).
    fn zero(&mut self) -> io::Result<()>;
    /// The image's file on this host, if it is one (a snapshot of the committed state, or
    /// the VM promoted from it, opens the disk there).
    fn path(&self) -> Option<&Path> {
        None
    }
}

/// A disk image file.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    size: u64,
    path: PathBuf,
}

impl DiskImage {
    /// Opens the image at `path` for writing; its size is the disk's.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl CommittedDisk for DiskImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn zero(&mut self) -> io::Result<()> {
        if self.file.metadata()?.is_file() {
            // Cut to nothing and grown back: a sparse file of zeros, whatever its size.
            self.file.set_len(0)?;
            return self.file.set_len(self.size);
        }
        // A block device: written over.
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < self.size {
            let n = (self.size - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

/// A disk image on the heap (tests, fuzzing).
impl CommittedDisk for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s.checked_add(bytes.len()).is_some_and(|e| e <= self.len()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write beyond the disk"))?;
        self[start..start + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn zero(&mut self) -> io::Result<()> {
        self.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::vstate::memory::create_guest_memory;

    #[test]
    fn guest_ram_and_heap_memory_agree() {
        let mem = create_guest_memory(1 << 20).unwrap();
        let mut ram = GuestRam::new(mem);
        let mut heap = HeapMemory::new(256);
        assert_eq!(ram.pages(), 256);
        assert_eq!(memory_digest(&ram), memory_digest(&heap));
        let page = vec![0xa5; PAGE_SIZE];
        for m in [&mut ram as &mut dyn CommittedMemory, &mut heap] {
            m.write_page(7, Some(&page)).unwrap();
            m.write_page(255, Some(&page)).unwrap();
            m.write_page(255, None).unwrap();
            assert!(matches!(
                m.write_page(256, None),
                Err(MemoryError::OutOfRange {
                    page: 256,
                    pages: 256
                })
            ));
        }
        assert_eq!(memory_digest(&ram), memory_digest(&heap));
        let mut buf = vec![0; PAGE_SIZE];
        ram.read_page(7, &mut buf).unwrap();
        assert_eq!(buf, page);
        assert!(ram.read_page(256, &mut buf).is_err());
    }

    #[test]
    fn disk_images_take_writes_inside_only() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let mut d = DiskImage::open(f.path()).unwrap();
        assert_eq!(d.size(), 4096);
        assert_eq!(d.path(), Some(f.path()));
        assert_eq!(CommittedDisk::path(&Vec::<u8>::new()), None);
        d.write_at(100, b"hello").unwrap();
        d.sync().unwrap();
        assert_eq!(&std::fs::read(f.path()).unwrap()[100..105], b"hello");
        let mut v = vec![0u8; 10];
        v.write_at(5, b"12345").unwrap();
        assert!(v.write_at(6, b"12345").is_err());
        assert!(v.write_at(u64::MAX, b"1").is_err());
    }
}
