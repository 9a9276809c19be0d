//! The snapshot's memory file: guest RAM, region after region, as one sparse file.
//!
//! Only the pages listed in [`MemoryFileState::runs`] are written. In a full snapshot every
//! other page is zero (a hole in the file); in a diff snapshot every other page is whatever the
//! parent snapshot holds. A CRC32 over the written pages, in order, catches corruption.
//! A full snapshot is restored by reading its pages into fresh guest memory, and each diff
//! after it on top; the file is checked before any page is used.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::{create_guest_memory, is_zero, GuestMemoryMmap, PageMap, PAGE_SIZE};
use crate::vstate::vm::DirtyBitmap;

/// Pages copied per read or write system call.
const BATCH_PAGES: usize = 256;
/// Threads reading a memory file at most.
const MAX_READERS: usize = 4;

/// Why the memory file cannot be written, read or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file cannot be created or opened.
    #[error("cannot open memory file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing failed (disk full, I/O error).
    #[error("cannot write memory file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading failed.
    #[error("cannot read memory file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is shorter or longer than the guest RAM it holds.
    #[error("memory file {path} is {len} bytes, the snapshot says {expected}: truncated or not this snapshot's")]
    Length {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// Guest RAM size.
        expected: u64,
    },
    /// The pages do not match their checksum.
    #[error("memory file {path} is corrupt (checksum {found:#010x}, expected {expected:#010x})")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The computed CRC32.
        found: u32,
        /// The stored CRC32.
        expected: u32,
    },
    /// A page run lies outside guest RAM.
    #[error("memory file {path}: pages {first}..{end} are outside guest RAM ({pages} pages)")]
    RunOutOfRange {
        /// The file.
        path: PathBuf,
        /// First page of the run.
        first: u64,
        /// One past its last page.
        end: u64,
        /// Pages of guest RAM.
        pages: u64,
    },
    /// The regions do not match guest RAM.
    #[error("the snapshot's memory regions do not match this VM's")]
    Regions,
    /// Guest memory for the snapshot cannot be created.
    #[error(transparent)]
    Memory(crate::vstate::memory::MemoryError),
}

/// One guest RAM region: where it sits in guest-physical space and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Consecutive pages present in the file: pages `first..first + count` of guest RAM, counted
/// across regions in order (page `p` is at file offset `p * 4096`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First page.
    pub first: u64,
    /// Number of pages.
    pub count: u64,
}

/// What the state file says about the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileState {
    /// Guest RAM regions, in file order.
    pub regions: Vec<RegionState>,
    /// The pages written, in order.
    pub runs: Vec<PageRun>,
    /// CRC32 of the written pages, in run order.
    pub checksum: u32,
}

impl MemoryFileState {
    /// Guest RAM size, which is also the file's length.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Pages written.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }
}

/// The regions of `mem`, in order.
pub fn regions_of(mem: &GuestMemoryMmap) -> Vec<RegionState> {
    mem.iter()
        .map(|r| RegionState {
            gpa: r.start_addr().raw_value(),
            size: r.len(),
        })
        .collect()
}

/// Which pages a snapshot writes.
#[derive(Debug, Clone, Copy)]
pub enum PageSelection<'a> {
    /// Every page that is not all zeros (a full snapshot).
    NonZero,
    /// Exactly the dirty pages, zero or not (a diff snapshot).
    Dirty(&'a DirtyBitmap),
}

/// Accumulates consecutive pages and writes them at their offset.
struct RunWriter<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    first: u64,
    runs: Vec<PageRun>,
    hasher: crc32fast::Hasher,
}

impl RunWriter<'_> {
    fn push(&mut self, page: u64, data: &[u8]) -> Result<(), MemoryFileError> {
        let pending = (self.buf.len() / PAGE_SIZE) as u64;
        if pending > 0 && (self.first + pending != page || pending as usize == BATCH_PAGES) {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.first = page;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MemoryFileError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.first * PAGE_SIZE as u64)
            .map_err(|source| MemoryFileError::Write {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.hasher.update(&self.buf);
        let count = (self.buf.len() / PAGE_SIZE) as u64;
        match self.runs.last_mut() {
            Some(last) if last.first + last.count == self.first => last.count += count,
            _ => self.runs.push(PageRun {
                first: self.first,
                count,
            }),
        }
        self.buf.clear();
        Ok(())
    }
}

/// Writes the selected pages of `mem` to a new sparse file at `path` (synced).
pub fn write(
    path: &Path,
    mem: &GuestMemoryMmap,
    selection: PageSelection<'_>,
) -> Result<MemoryFileState, MemoryFileError> {
    let regions = regions_of(mem);
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| MemoryFileError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let write_err = |source| MemoryFileError::Write {
        path: path.to_path_buf(),
        source,
    };
    file.set_len(total).map_err(write_err)?;
    let mut out = RunWriter {
        file: &file,
        path,
        buf: Vec::with_capacity(BATCH_PAGES * PAGE_SIZE),
        first: 0,
        runs: Vec::new(),
        hasher: crc32fast::Hasher::new(),
    };
    let map = PageMap::new(mem);
    let mut page_buf = vec![0u8; PAGE_SIZE];
    let mut copy = |page: u64, out: &mut RunWriter<'_>, keep_zero: bool| {
        map.page(page)
            .expect("page numbers come from the map")
            .copy_to(&mut page_buf[..]);
        if keep_zero || !is_zero(&page_buf) {
            out.push(page, &page_buf)?;
        }
        Ok::<(), MemoryFileError>(())
    };
    match selection {
        PageSelection::NonZero => {
            for page in 0..map.pages() {
                copy(page, &mut out, false)?;
            }
        }
        PageSelection::Dirty(bitmap) => {
            for page in bitmap.pages(&map) {
                copy(page, &mut out, true)?;
            }
        }
    }
    out.flush()?;
    let state = MemoryFileState {
        regions,
        runs: std::mem::take(&mut out.runs),
        checksum: out.hasher.finalize(),
    };
    file.sync_data().map_err(write_err)?;
    Ok(state)
}

/// Opens the memory file at `path` and checks its length.
fn open_checked(path: &Path, state: &MemoryFileState) -> Result<File, MemoryFileError> {
    let file = File::open(path).map_err(|source| MemoryFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| MemoryFileError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let total = state.total_size();
    if len != total {
        return Err(MemoryFileError::Length {
            path: path.to_path_buf(),
            len,
            expected: total,
        });
    }
    Ok(file)
}

/// The file's runs split into `parts` pieces of about as many pages each, in file order.
fn split_runs(runs: &[PageRun], parts: usize) -> Vec<Vec<PageRun>> {
    let total: u64 = runs.iter().map(|r| r.count).sum();
    let per_part = total.div_ceil(parts.max(1) as u64).max(1);
    let mut out = vec![Vec::new()];
    let mut in_part = 0;
    for run in runs {
        let (mut first, mut count) = (run.first, run.count);
        while count > 0 {
            if in_part == per_part {
                out.push(Vec::new());
                in_part = 0;
            }
            let n = count.min(per_part - in_part);
            out.last_mut()
                .expect("never empty")
                .push(PageRun { first, count: n });
            (first, count, in_part) = (first + n, count - n, in_part + n);
        }
    }
    out
}

/// Reads the pages of `runs` (found at their own offsets in `path`) straight into `map`'s
/// memory, a batch at a time; returns the checksum of what it read, in order.
fn read_runs(
    path: &Path,
    map: &PageMap<'_>,
    runs: &[PageRun],
) -> Result<crc32fast::Hasher, MemoryFileError> {
    let read_err = |source| MemoryFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let mut hasher = crc32fast::Hasher::new();
    for run in runs {
        let (mut page, end) = (run.first, run.first + run.count);
        while page < end {
            let n = (end - page)
                .min(BATCH_PAGES as u64)
                .min(map.contiguous_from(page));
            let slice = map
                .pages_at(page, n)
                .expect("runs were checked against guest RAM");
            let guard = slice.ptr_guard_mut();
            // SAFETY: `slice` is `n` pages of guest memory, mapped for as long as `map`'s
            // memory lives. Nothing else reads or writes them meanwhile: the restored VM has no
            // vCPU yet, and every reader thread gets pages of its own.
            let bytes = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
            file.read_exact_at(bytes, page * PAGE_SIZE as u64)
                .map_err(read_err)?;
            hasher.update(bytes);
            page += n;
        }
    }
    Ok(hasher)
}

/// Guest memory restored from the full snapshot's memory file: fresh guest memory (as a booted
/// VM gets, 2 MiB-aligned), the file checked, then its pages read in. Zero pages stay holes
/// in the file and untouched in memory.
pub fn load(path: &Path, state: &MemoryFileState) -> Result<GuestMemoryMmap, MemoryFileError> {
    let mem = create_guest_memory(state.total_size()).map_err(MemoryFileError::Memory)?;
    apply(path, state, &mem)?;
    Ok(mem)
}

/// Reads a snapshot's pages into `mem` (fresh, or restored from the parent of a diff), checking
/// their checksum in the same pass; the file is read by a few threads, each into its own pages.
/// On an error `mem` holds part of the file: the caller drops it (a restore never runs a VM on
/// it).
pub fn apply(
    path: &Path,
    state: &MemoryFileState,
    mem: &GuestMemoryMmap,
) -> Result<(), MemoryFileError> {
    if regions_of(mem) != state.regions {
        return Err(MemoryFileError::Regions);
    }
    open_checked(path, state)?;
    let map = PageMap::new(mem);
    for run in &state.runs {
        let end = run.first.saturating_add(run.count);
        if end > map.pages() {
            return Err(MemoryFileError::RunOutOfRange {
                path: path.to_path_buf(),
                first: run.first,
                end,
                pages: map.pages(),
            });
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_READERS));
    let parts = split_runs(&state.runs, threads);
    let hashers: Vec<Result<crc32fast::Hasher, MemoryFileError>> = std::thread::scope(|scope| {
        let readers: Vec<_> = parts
            .iter()
            .map(|part| scope.spawn(|| read_runs(path, &map, part)))
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().expect("a snapshot reader thread panicked"))
            .collect()
    });
    let mut hasher = crc32fast::Hasher::new();
    for part in hashers {
        hasher.combine(&part?);
    }
    let found = hasher.finalize();
    if found != state.checksum {
        return Err(MemoryFileError::Checksum {
            path: path.to_path_buf(),
            found,
            expected: state.checksum,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn temp() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new().unwrap()
    }

    #[test]
    fn full_snapshot_holds_only_non_zero_pages_and_maps_back() {
        let mem = create_guest_memory(64 << 20).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[7u8; 8192], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(b"last", GuestAddress((64 << 20) - 4))
            .unwrap();
        let dir = temp();
        let path = dir.as_path().join("memory");
        let state = write(&path, &mem, PageSelection::NonZero).unwrap();
        assert_eq!(state.pages(), 4);
        assert_eq!(state.runs.len(), 3);
        let restored = load(&path, &state).unwrap();
        let mut buf = [0u8; 10];
        restored.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
        let mut big = vec![0u8; 8192];
        restored
            .read_slice(&mut big, GuestAddress(0x10_0000))
            .unwrap();
        assert!(big.iter().all(|&b| b == 7));
        // Writes to the restored memory never reach the file.
        restored.write_slice(b"changed", GuestAddress(0)).unwrap();
        let again = load(&path, &state).unwrap();
        again.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"first page");
    }

    #[test]
    fn a_diff_applies_dirty_pages_even_when_they_became_zero() {
        let mem = create_guest_memory(32 << 20).unwrap();
        mem.write_slice(&[1u8; 4096], GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[2u8; 4096], GuestAddress(0x5000)).unwrap();
        let dir = temp();
        let full = write(&dir.as_path().join("full"), &mem, PageSelection::NonZero).unwrap();

        mem.write_slice(&[0u8; 4096], GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[3u8; 4096], GuestAddress(0x9000)).unwrap();
        let words = (32 << 20) / PAGE_SIZE / 64;
        let mut bits = vec![0u64; words];
        bits[0] = (1 << 2) | (1 << 9);
        let dirty = DirtyBitmap(vec![bits]);
        let diff_path = dir.as_path().join("diff");
        let diff = write(&diff_path, &mem, PageSelection::Dirty(&dirty)).unwrap();
        assert_eq!(diff.pages(), 2);

        let restored = load(&dir.as_path().join("full"), &full).unwrap();
        apply(&diff_path, &diff, &restored).unwrap();
        for (addr, value) in [(0x2000, 0u8), (0x5000, 2), (0x9000, 3)] {
            let mut page = vec![0xffu8; 4096];
            restored.read_slice(&mut page, GuestAddress(addr)).unwrap();
            assert!(page.iter().all(|&b| b == value), "page at {addr:#x}");
        }
    }

    #[test]
    fn runs_split_evenly_and_in_order() {
        let run = |first, count| PageRun { first, count };
        let runs = [run(0, 5), run(10, 2), run(20, 3)];
        let parts = split_runs(&runs, 3);
        assert_eq!(
            parts,
            vec![
                vec![run(0, 4)],
                vec![run(4, 1), run(10, 2), run(20, 1)],
                vec![run(21, 2)]
            ]
        );
        assert_eq!(split_runs(&runs, 1), vec![runs.to_vec()]);
        assert_eq!(split_runs(&[], 4), vec![Vec::<PageRun>::new()]);
    }

    #[test]
    fn truncated_or_corrupt_files_are_refused() {
        let mem = create_guest_memory(32 << 20).unwrap();
        mem.write_slice(&[9u8; 4096], GuestAddress(0x3000)).unwrap();
        let dir = temp();
        let path = dir.as_path().join("memory");
        let state = write(&path, &mem, PageSelection::NonZero).unwrap();

        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[8], 0x3000 + 100).unwrap();
        let err = load(&path, &state).unwrap_err();
        assert!(matches!(err, MemoryFileError::Checksum { .. }), "{err}");

        file.set_len(16 << 20).unwrap();
        let err = load(&path, &state).unwrap_err();
        assert!(matches!(err, MemoryFileError::Length { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut bad = state.clone();
        bad.runs.push(PageRun {
            first: 1 << 40,
            count: 1,
        });
        file.set_len(32 << 20).unwrap();
        let err = load(&path, &bad).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::RunOutOfRange { .. }),
            "{err}"
        );
    }
}
