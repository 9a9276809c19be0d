//! Snapshots of a whole microVM: a directory holding a versioned, checksummed state file and a
//! sparse memory file.
//!
//! A full snapshot holds every non-zero page; a diff snapshot holds the pages written since its
//! parent (KVM's dirty log OR the monitor's own bitmap) and names its parent by path and id.
//! Restoring the newest of a chain loads the full snapshot's memory and applies each diff in
//! order. Everything is checked (versions, checksums, lengths, the chain's ids and regions)
//! before any of it is used, and a snapshot is written to a temporary directory renamed into
//! place only once complete, so a failed snapshot leaves nothing behind.

pub mod memory_file;
pub mod state_file;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use self::memory_file::{MemoryFileError, MemoryFileState, PageSelection};
use self::state_file::StateFileError;
use crate::config::VmConfig;
use crate::devices::DevicesState;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::{DirtyBitmap, VmState};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Longest chain of diffs restored.
pub const MAX_CHAIN: usize = 64;

/// Why a snapshot cannot be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The target exists.
    #[error("{0} already exists: snapshots are never written over")]
    Exists(PathBuf),
    /// The target's parent directory does not exist.
    #[error("cannot create snapshot directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Moving the finished snapshot into place failed.
    #[error("cannot move the snapshot into {path}: {source}")]
    Rename {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a snapshot directory.
    #[error("{0} is not a snapshot directory (no {STATE_FILE} file)")]
    NotASnapshot(PathBuf),
    /// The state file is bad.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The memory file is bad.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// A diff's parent is not the snapshot it was taken against.
    #[error(
        "{child} is a diff of snapshot {expected:016x}, but {parent} is snapshot {found:016x}"
    )]
    ParentMismatch {
        /// The diff.
        child: PathBuf,
        /// Its parent's directory.
        parent: PathBuf,
        /// The parent id the diff names.
        expected: u64,
        /// The id found there.
        found: u64,
    },
    /// A diff and its parent describe different guest RAM.
    #[error("{child} and its parent {parent} have different memory layouts")]
    ParentLayout {
        /// The diff.
        child: PathBuf,
        /// Its parent.
        parent: PathBuf,
    },
    /// Too many diffs, or a loop.
    #[error("{0}: the chain of diff snapshots is longer than {MAX_CHAIN} (or loops)")]
    ChainTooLong(PathBuf),
    /// A diff was asked for without a snapshot to diff against.
    #[error("a diff snapshot needs an earlier snapshot of this VM (take a full one first)")]
    NoParent,
}

/// Full or diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Every page.
    Full,
    /// The pages written since the parent.
    Diff,
}

/// The snapshot a diff applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Its id.
    pub id: u64,
    /// Its directory.
    pub path: PathBuf,
}

/// Identity and lineage of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// A random id.
    pub id: u64,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// For a diff: its parent.
    pub parent: Option<ParentRef>,
    /// When it was taken (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// The vmr version that wrote it.
    pub vmr_version: String,
}

/// Everything about a paused microVM but the contents of its memory.
#[derive(Serialize, Deserialize)]
pub struct MicroVmState {
    /// The configuration it was started with.
    pub config: VmConfig,
    /// The VM-wide KVM state.
    pub vm: VmState,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DevicesState,
}

/// The state file's content.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// Identity and lineage.
    pub meta: SnapshotMeta,
    /// What the memory file holds.
    pub memory: MemoryFileState,
    /// The machine.
    pub microvm: MicroVmState,
}

/// What a finished snapshot took.
#[derive(Debug, Clone)]
pub struct WrittenSnapshot {
    /// Its id.
    pub id: u64,
    /// Its directory.
    pub path: PathBuf,
    /// Pages in its memory file.
    pub pages: u64,
    /// Bytes of memory written.
    pub memory_bytes: u64,
}

fn random_id() -> u64 {
    let mut id = [0u8; 8];
    // SAFETY: getrandom writes at most `id.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n == id.len() as isize {
        u64::from_ne_bytes(id)
    } else {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    }
}

/// Writes a snapshot of a paused VM to the new directory `dir`: a full one when `diff` is
/// `None`, else the pages of `diff` against `parent`.
pub fn write(
    dir: &Path,
    microvm: MicroVmState,
    mem: &GuestMemoryMmap,
    diff: Option<(&DirtyBitmap, ParentRef)>,
) -> Result<WrittenSnapshot, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.with_file_name(format!(
        ".{}.partial-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|source| SnapshotError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let result = write_into(&tmp, microvm, mem, diff).and_then(|written| {
        std::fs::rename(&tmp, dir).map_err(|source| SnapshotError::Rename {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(WrittenSnapshot {
            path: dir.to_path_buf(),
            ..written
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_into(
    tmp: &Path,
    microvm: MicroVmState,
    mem: &GuestMemoryMmap,
    diff: Option<(&DirtyBitmap, ParentRef)>,
) -> Result<WrittenSnapshot, SnapshotError> {
    let (selection, kind, parent) = match diff {
        None => (PageSelection::NonZero, SnapshotKind::Full, None),
        Some((bitmap, parent)) => (
            PageSelection::Dirty(bitmap),
            SnapshotKind::Diff,
            Some(parent),
        ),
    };
    let memory = memory_file::write(&tmp.join(MEMORY_FILE), mem, selection)?;
    let meta = SnapshotMeta {
        id: random_id(),
        kind,
        parent,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        vmr_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let written = WrittenSnapshot {
        id: meta.id,
        path: tmp.to_path_buf(),
        pages: memory.pages(),
        memory_bytes: memory.pages() * crate::vstate::memory::PAGE_SIZE as u64,
    };
    let state = SnapshotState {
        meta,
        memory,
        microvm,
    };
    state_file::write(&tmp.join(STATE_FILE), &state)?;
    Ok(written)
}

/// A snapshot and the chain it restores from.
pub struct LoadedSnapshot {
    /// Full snapshot first, the asked-for snapshot last, with their directories.
    pub chain: Vec<(PathBuf, SnapshotState)>,
}

impl LoadedSnapshot {
    /// The snapshot asked for (the newest of the chain).
    pub fn newest(&self) -> &SnapshotState {
        &self.chain.last().expect("a chain is never empty").1
    }

    /// Guest memory as of the newest snapshot: the full snapshot's pages read, the diffs
    /// applied in order. Every file is checked before its pages are used.
    pub fn restore_memory(&self) -> Result<GuestMemoryMmap, SnapshotError> {
        let (base_dir, base) = &self.chain[0];
        let mem = memory_file::load(&base_dir.join(MEMORY_FILE), &base.memory)?;
        for (dir, diff) in &self.chain[1..] {
            memory_file::apply(&dir.join(MEMORY_FILE), &diff.memory, &mem)?;
        }
        Ok(mem)
    }
}

/// Reads the snapshot in `dir` and, for a diff, its parents, checking how they link.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let mut chain: Vec<(PathBuf, SnapshotState)> = Vec::new();
    let mut next = dir.to_path_buf();
    let mut expected_id = None;
    loop {
        let state_path = next.join(STATE_FILE);
        if !state_path.is_file() {
            return Err(SnapshotError::NotASnapshot(next));
        }
        let state: SnapshotState = state_file::read(&state_path)?;
        if let (Some(expected), Some((child_dir, child))) = (expected_id, chain.last()) {
            if state.meta.id != expected {
                return Err(SnapshotError::ParentMismatch {
                    child: child_dir.clone(),
                    parent: next,
                    expected,
                    found: state.meta.id,
                });
            }
            if state.memory.regions != child.memory.regions {
                return Err(SnapshotError::ParentLayout {
                    child: child_dir.clone(),
                    parent: next,
                });
            }
        }
        let parent = state.meta.parent.clone();
        chain.push((next.clone(), state));
        let Some(parent) = parent else { break };
        if chain.len() > MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong(dir.to_path_buf()));
        }
        expected_id = Some(parent.id);
        // A relative parent path is relative to the directory holding the diff.
        next = next.parent().unwrap_or(Path::new(".")).join(&parent.path);
    }
    chain.reverse();
    Ok(LoadedSnapshot { chain })
}
