//! The standby's staging area: epoch N is received aside and committed only once all of it
//! has arrived and verified; a partial, corrupt, out-of-order, replayed or older-term epoch is
//! discarded and the committed state is never touched (QEMU COLO's known failure, DESIGN.md
//! §5).
//!
//! An epoch opens with `EpochBegin`, whose epoch must follow the last committed one and whose
//! term must not be older. Its pages (page number → contents; a page sent twice keeps the
//! last), machine state and disk writes are staged, each checked on arrival (page numbers
//! against memory, disk writes against the disk's size, the staged bytes against a limit) and
//! accounted in an [`EpochDigest`]. `EpochEnd` then has to name the open epoch, its page count
//! and its digest; only then is the epoch applied:
//!
//! 1. everything was validated while staging, so nothing is left to refuse;
//! 2. disk writes go to the committed images (the only step that can fail on a healthy host),
//!    then pages to committed memory, then the state bytes replace the committed ones, then
//!    the committed epoch and term move on.
//!
//! [`Staging::receive`] takes `&mut self`, so nobody reads the committed state while an epoch
//! is applied: to a reader, a commit happens whole or not at all. A failure *during* the apply
//! (a disk write error) leaves the committed state half-updated; the staging area is then
//! poisoned and refuses everything: the standby needs a full resynchronisation. A crash of the
//! standby in the middle of an apply is out of scope here (the committed state lives in memory
//! and the images; making the images crash-consistent needs an undo/redo log).
//!
//! Inbound frames are not staged with an epoch: the primary mirrors them as the guest receives
//! them, tagged with that epoch (usually one not yet shipped), and they must survive the
//! discard of whatever epoch is being staged. They go to the inbound log whenever they arrive,
//! if their epoch is after the last committed one; each commit drops the frames of the epochs
//! it covers.

use std::collections::{BTreeMap, HashMap};
use std::io;

use vmm::vstate::memory::PAGE_SIZE;

pub use super::committed::{CommittedDisk, CommittedMemory};

use super::committed::MemoryError;
use crate::epoch::EpochDigest;
use crate::wire::{Message, PageBatch};

/// Limits of the staging area, checked before anything is kept.
#[derive(Debug, Clone)]
pub struct StagingOptions {
    /// Largest state plus disk writes staged in one epoch, in bytes (pages are bounded by
    /// memory: each page is staged at most once).
    pub max_staged_bytes: u64,
    /// Largest inbound log, in bytes.
    pub max_inbound_bytes: u64,
    /// Whether to sync the disk images after applying an epoch's writes.
    pub sync_disks: bool,
}

impl Default for StagingOptions {
    fn default() -> Self {
        Self {
            max_staged_bytes: 256 << 20,
            max_inbound_bytes: 64 << 20,
            sync_disks: false,
        }
    }
}

/// Why a message was refused. One variant per failing check. Every one discards the open
/// epoch except the inbound-log ones; none touches the committed state, except the apply
/// failures, which poison the staging area.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// A previous apply failed half-way: the committed state cannot be trusted.
    #[error(
        "the committed state was damaged by a failed apply: a full resynchronisation is needed"
    )]
    Poisoned,
    /// The committed memory was handed over to a VM promoted from it, which runs on it now.
    #[error("this standby was promoted: its committed state runs as the VM, it takes no epochs")]
    HandedOver,
    /// A message that is not part of an epoch stream.
    #[error("unexpected {message} in an epoch stream")]
    Unexpected {
        /// Its name.
        message: &'static str,
    },
    /// Epoch content without `EpochBegin`.
    #[error("{message} outside an epoch")]
    NoEpochOpen {
        /// Its name.
        message: &'static str,
    },
    /// `EpochBegin` while another epoch is open (the open one never ended).
    #[error("epoch {new} begins while epoch {open} is still open")]
    EpochStillOpen {
        /// The open epoch.
        open: u64,
        /// The new one.
        new: u64,
    },
    /// An epoch of an older term than the last committed one (a deposed primary).
    #[error("epoch {epoch} is of term {term}, older than the committed term {committed_term}")]
    StaleTerm {
        /// The epoch.
        epoch: u64,
        /// Its term.
        term: u64,
        /// The committed term.
        committed_term: u64,
    },
    /// An epoch already committed (replayed).
    #[error("epoch {epoch} is already committed (last committed {committed})")]
    AlreadyCommitted {
        /// The epoch.
        epoch: u64,
        /// The last committed.
        committed: u64,
    },
    /// An epoch that skips epochs.
    #[error("epoch {epoch} arrived out of order, expected {expected}")]
    OutOfOrder {
        /// The epoch.
        epoch: u64,
        /// The one expected.
        expected: u64,
    },
    /// A page beyond committed memory.
    #[error("page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// Pages of memory.
        pages: u64,
    },
    /// A write to a disk the standby does not have.
    #[error("write to disk {disk}, the standby has {disks}")]
    UnknownDisk {
        /// The disk.
        disk: u32,
        /// Disks.
        disks: usize,
    },
    /// A write outside an epoch to a disk whose copy was not announced (`DiskSync`).
    #[error("write to disk {disk} outside an epoch, and no copy of that disk was announced")]
    DiskNotSyncing {
        /// The disk.
        disk: u32,
    },
    /// Zeroing a disk image for its copy failed.
    #[error("cannot zero disk {disk} for its copy: {source}")]
    ZeroDisk {
        /// The disk.
        disk: u32,
        /// Why.
        source: io::Error,
    },
    /// A write of a disk's copy failed.
    #[error("cannot write the copy of disk {disk}: {source}")]
    CopyDisk {
        /// The disk.
        disk: u32,
        /// Why.
        source: io::Error,
    },
    /// A write beyond a disk's end.
    #[error("write of {len} bytes at {offset} is outside disk {disk} ({size} bytes)")]
    DiskWriteOutOfRange {
        /// The disk.
        disk: u32,
        /// Where.
        offset: u64,
        /// How much.
        len: usize,
        /// The disk's size.
        size: u64,
    },
    /// The epoch's state and disk writes exceed the staging limit.
    #[error("epoch {epoch} stages more than {limit} bytes of state and disk writes")]
    StagingFull {
        /// The epoch.
        epoch: u64,
        /// The limit.
        limit: u64,
    },
    /// The inbound log is full (the frame is dropped; the open epoch is kept).
    #[error("the inbound log is full ({limit} bytes)")]
    InboundLogFull {
        /// The limit.
        limit: u64,
    },
    /// `EpochEnd` of another epoch than the open one.
    #[error("end of epoch {end} while epoch {open} is open")]
    EndMismatch {
        /// The epoch ended.
        end: u64,
        /// The open one.
        open: u64,
    },
    /// Pages went missing or were added.
    #[error("epoch {epoch} announced {announced} pages, {received} arrived")]
    PageCount {
        /// The epoch.
        epoch: u64,
        /// Pages announced.
        announced: u64,
        /// Pages received.
        received: u64,
    },
    /// The content does not match the digest.
    #[error("epoch {epoch}'s content does not match its digest")]
    Digest {
        /// The epoch.
        epoch: u64,
    },
    /// A disk write failed while applying: the committed state is damaged.
    #[error("applying epoch {epoch} to disk {disk} failed: {source}")]
    ApplyDisk {
        /// The epoch.
        epoch: u64,
        /// The disk.
        disk: u32,
        /// Why.
        source: io::Error,
    },
    /// A memory write failed while applying: the committed state is damaged.
    #[error("applying epoch {epoch} to memory failed: {source}")]
    ApplyMemory {
        /// The epoch.
        epoch: u64,
        /// Why.
        source: MemoryError,
    },
}

impl StagingError {
    /// Whether the error discards the open epoch.
    fn discards_epoch(&self) -> bool {
        !matches!(self, StagingError::InboundLogFull { .. })
    }
}

/// What a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Staged in the open epoch.
    Staged,
    /// The epoch is committed: acknowledge it.
    Committed {
        /// The epoch.
        epoch: u64,
        /// Its term.
        term: u64,
    },
    /// An inbound frame was logged.
    InboundLogged,
    /// An inbound frame of an epoch already committed was dropped.
    InboundDropped,
    /// A planned switch-over: the primary handed the VM over at `epoch`, the one committed.
    Handover {
        /// The epoch.
        epoch: u64,
    },
    /// A heartbeat (nothing staged).
    Heartbeat {
        /// The sender's term.
        term: u64,
        /// The sender's epoch.
        epoch: u64,
    },
}

/// One inbound frame kept for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFrame {
    /// The network device.
    pub net: u32,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
}

/// The epoch being received.
struct OpenEpoch {
    epoch: u64,
    term: u64,
    digest: EpochDigest,
    /// Page → slot of its contents in `arena`, `None` for a zero page.
    pages: HashMap<u64, Option<usize>>,
    arena: Vec<u8>,
    free_slots: Vec<usize>,
    state: Option<Vec<u8>>,
    disk_writes: Vec<(u32, u64, Vec<u8>)>,
    staged_bytes: u64,
}

impl OpenEpoch {
    fn new(epoch: u64, term: u64) -> Self {
        Self {
            epoch,
            term,
            digest: EpochDigest::new(epoch, term),
            pages: HashMap::new(),
            arena: Vec::new(),
            free_slots: Vec::new(),
            state: None,
            disk_writes: Vec::new(),
            staged_bytes: 0,
        }
    }

    fn stage_page(&mut self, page: u64, contents: Option<&[u8]>) {
        let old = self.pages.get(&page).copied().flatten();
        let slot = match (contents, old) {
            (None, old) => {
                self.free_slots.extend(old);
                None
            }
            (Some(data), Some(slot)) => {
                self.arena[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(data);
                Some(slot)
            }
            (Some(data), None) => {
                let slot = match self.free_slots.pop() {
                    Some(slot) => {
                        self.arena[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(data);
                        slot
                    }
                    None => {
                        self.arena.extend_from_slice(data);
                        self.arena.len() / PAGE_SIZE - 1
                    }
                };
                Some(slot)
            }
        };
        self.pages.insert(page, slot);
    }

    fn add_staged(&mut self, bytes: usize, limit: u64) -> Result<(), StagingError> {
        self.staged_bytes = self.staged_bytes.saturating_add(bytes as u64);
        if self.staged_bytes > limit {
            return Err(StagingError::StagingFull {
                epoch: self.epoch,
                limit,
            });
        }
        Ok(())
    }
}

/// The standby's committed state and the epoch being staged.
pub struct Staging<M: CommittedMemory, D: CommittedDisk> {
    memory: M,
    disks: Vec<D>,
    state: Vec<u8>,
    epoch: u64,
    term: u64,
    open: Option<OpenEpoch>,
    /// Set by the primary's `Protected`: a takeover needs this epoch committed.
    protected_through: Option<u64>,
    /// Set by the primary's `Join` before anything is committed: pages outside an epoch are
    /// a copy of memory going straight into it, and the first epoch may have any number.
    joining: bool,
    /// Per disk: its copy was announced (`DiskSync`, while joining): writes outside an epoch
    /// go straight into it.
    disk_syncing: Vec<bool>,
    inbound: BTreeMap<u64, Vec<InboundFrame>>,
    inbound_bytes: u64,
    options: StagingOptions,
    poisoned: bool,
    handed_over: bool,
}

impl<M: CommittedMemory, D: CommittedDisk> Staging<M, D> {
    /// A standby holding `memory`, `disks` and `state` as committed epoch `epoch` of `term`
    /// (0, 0 and empty state before the first).
    pub fn new(
        memory: M,
        disks: Vec<D>,
        state: Vec<u8>,
        (epoch, term): (u64, u64),
        options: StagingOptions,
    ) -> Self {
        Self {
            memory,
            disks,
            state,
            epoch,
            term,
            open: None,
            protected_through: None,
            joining: false,
            disk_syncing: Vec::new(),
            inbound: BTreeMap::new(),
            inbound_bytes: 0,
            options,
            poisoned: false,
            handed_over: false,
        }
    }

    /// The last committed epoch (0: none).
    pub fn committed_epoch(&self) -> u64 {
        self.epoch
    }

    /// The last epoch whose output the primary released without this standby's ack (the end
    /// of the initial synchronisation), once the primary said so: a takeover needs it
    /// committed. `None`: the primary never said so; the VM was never protected by this
    /// standby.
    pub fn protected_through(&self) -> Option<u64> {
        self.protected_through
    }

    /// The term of the last committed epoch.
    pub fn committed_term(&self) -> u64 {
        self.term
    }

    /// The committed machine state (the vmm's encoded vCPU and device state).
    pub fn committed_state(&self) -> &[u8] {
        &self.state
    }

    /// The committed memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The committed disks.
    pub fn disks(&self) -> &[D] {
        &self.disks
    }

    /// The epoch being staged, if any.
    pub fn open_epoch(&self) -> Option<u64> {
        self.open.as_ref().map(|o| o.epoch)
    }

    /// Whether a failed apply damaged the committed state.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Whether the committed memory was handed over to a running VM ([`Staging::hand_over`]).
    pub fn is_handed_over(&self) -> bool {
        self.handed_over
    }

    /// Marks the committed memory as handed over to a VM that runs on it (a promotion): the
    /// open epoch is discarded and every message refused from now on
    /// ([`StagingError::HandedOver`]), so nothing writes the running guest's memory.
    pub fn hand_over(&mut self) {
        self.abort_open("the standby was promoted");
        self.handed_over = true;
    }

    /// The logged inbound frames, by epoch, in order of arrival (all after the committed epoch).
    pub fn inbound(&self) -> impl Iterator<Item = (u64, &InboundFrame)> + '_ {
        self.inbound
            .iter()
            .flat_map(|(&epoch, frames)| frames.iter().map(move |f| (epoch, f)))
    }

    /// Discards the epoch being staged (the link to the primary is lost).
    pub fn abort_open(&mut self, why: &str) {
        if let Some(open) = self.open.take() {
            tracing::warn!(epoch = open.epoch, "discarded a partial epoch: {why}");
        }
    }

    /// The parts: committed memory, disks and state.
    pub fn into_parts(self) -> (M, Vec<D>, Vec<u8>) {
        (self.memory, self.disks, self.state)
    }

    /// Takes one message of the epoch stream.
    pub fn receive(&mut self, msg: Message) -> Result<Received, StagingError> {
        if self.handed_over {
            return Err(StagingError::HandedOver);
        }
        if self.poisoned {
            return Err(StagingError::Poisoned);
        }
        let result = self.take(msg);
        if let Err(e) = &result {
            if e.discards_epoch() {
                self.abort_open(&e.to_string());
            }
        }
        result
    }

    fn open_mut(&mut self, message: &'static str) -> Result<&mut OpenEpoch, StagingError> {
        self.open
            .as_mut()
            .ok_or(StagingError::NoEpochOpen { message })
    }

    fn take(&mut self, msg: Message) -> Result<Received, StagingError> {
        let name = msg.name();
        match msg {
            Message::EpochBegin { epoch, term } => self.begin(epoch, term),
            Message::Pages(batch) => self.pages(&batch),
            Message::State(state) => {
                let limit = self.options.max_staged_bytes;
                let open = self.open_mut(name)?;
                open.add_staged(state.len(), limit)?;
                open.digest.state(&state);
                open.state = Some(state);
                Ok(Received::Staged)
            }
            Message::DiskWrite {
                disk,
                offset,
                bytes,
            } => self.disk_write(disk, offset, bytes),
            Message::Inbound { epoch, net, frame } => self.log_inbound(epoch, net, frame),
            Message::EpochEnd {
                epoch,
                pages,
                digest,
            } => self.end(epoch, pages, digest),
            Message::Heartbeat { term, epoch } => Ok(Received::Heartbeat { term, epoch }),
            Message::Handover { epoch } => {
                if self.open.is_some() || epoch != self.epoch {
                    return Err(StagingError::Unexpected { message: name });
                }
                Ok(Received::Handover { epoch })
            }
            Message::Join => {
                if self.open.is_some() || self.epoch != 0 {
                    return Err(StagingError::Unexpected { message: name });
                }
                self.joining = true;
                Ok(Received::Staged)
            }
            Message::DiskSync { disk } => {
                if self.open.is_some() || self.epoch != 0 || !self.joining {
                    return Err(StagingError::Unexpected { message: name });
                }
                let disks = self.disks.len();
                let d = self
                    .disks
                    .get_mut(disk as usize)
                    .ok_or(StagingError::UnknownDisk { disk, disks })?;
                d.zero()
                    .map_err(|source| StagingError::ZeroDisk { disk, source })?;
                self.disk_syncing.resize(disks, false);
                self.disk_syncing[disk as usize] = true;
                Ok(Received::Staged)
            }
            Message::Protected { through } => {
                if self.open.is_some() {
                    return Err(StagingError::Unexpected { message: name });
                }
                self.protected_through = Some(through);
                Ok(Received::Staged)
            }
            Message::Hello(_)
            | Message::HelloAck(_)
            | Message::Refuse { .. }
            | Message::Ack { .. } => Err(StagingError::Unexpected { message: name }),
        }
    }

    fn begin(&mut self, epoch: u64, term: u64) -> Result<Received, StagingError> {
        if let Some(open) = &self.open {
            return Err(StagingError::EpochStillOpen {
                open: open.epoch,
                new: epoch,
            });
        }
        if term < self.term {
            return Err(StagingError::StaleTerm {
                epoch,
                term,
                committed_term: self.term,
            });
        }
        if epoch <= self.epoch {
            return Err(StagingError::AlreadyCommitted {
                epoch,
                committed: self.epoch,
            });
        }
        let expected = match (self.epoch, self.joining) {
            (0, true) => epoch,
            _ => self.epoch + 1,
        };
        if epoch != expected {
            return Err(StagingError::OutOfOrder { epoch, expected });
        }
        self.open = Some(OpenEpoch::new(epoch, term));
        Ok(Received::Staged)
    }

    fn pages(&mut self, batch: &PageBatch) -> Result<Received, StagingError> {
        let pages = self.memory.pages();
        if self.open.is_none() && self.joining && self.epoch == 0 {
            // The copy of memory a joining standby starts from: nothing is committed (and
            // nothing can be taken over) until its first epoch completes it.
            for (page, contents) in batch.iter() {
                if page >= pages {
                    return Err(StagingError::PageOutOfRange { page, pages });
                }
                self.memory
                    .write_page(page, contents)
                    .map_err(|source| StagingError::ApplyMemory { epoch: 0, source })?;
            }
            return Ok(Received::Staged);
        }
        let open = self.open_mut("Pages")?;
        for (page, contents) in batch.iter() {
            if page >= pages {
                return Err(StagingError::PageOutOfRange { page, pages });
            }
            open.digest.page(page, contents);
            open.stage_page(page, contents);
        }
        Ok(Received::Staged)
    }

    fn disk_write(
        &mut self,
        disk: u32,
        offset: u64,
        bytes: Vec<u8>,
    ) -> Result<Received, StagingError> {
        let disks = self.disks.len();
        let size = self
            .disks
            .get(disk as usize)
            .map(|d| d.size())
            .ok_or(StagingError::UnknownDisk { disk, disks });
        let limit = self.options.max_staged_bytes;
        let size = size?;
        if offset
            .checked_add(bytes.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(StagingError::DiskWriteOutOfRange {
                disk,
                offset,
                len: bytes.len(),
                size,
            });
        }
        if self.open.is_none() && self.joining && self.epoch == 0 {
            // The copy of a disk a joining standby starts from, as for memory: nothing is
            // committed until its first epoch completes it.
            if !self
                .disk_syncing
                .get(disk as usize)
                .copied()
                .unwrap_or(false)
            {
                return Err(StagingError::DiskNotSyncing { disk });
            }
            self.disks[disk as usize]
                .write_at(offset, &bytes)
                .map_err(|source| StagingError::CopyDisk { disk, source })?;
            return Ok(Received::Staged);
        }
        let open = self.open_mut("DiskWrite")?;
        open.add_staged(bytes.len(), limit)?;
        open.digest.disk_write(disk, offset, &bytes);
        open.disk_writes.push((disk, offset, bytes));
        Ok(Received::Staged)
    }

    fn log_inbound(
        &mut self,
        epoch: u64,
        net: u32,
        frame: Vec<u8>,
    ) -> Result<Received, StagingError> {
        if epoch <= self.epoch {
            tracing::debug!(epoch, "dropped an inbound frame of a committed epoch");
            return Ok(Received::InboundDropped);
        }
        let limit = self.options.max_inbound_bytes;
        let bytes = self.inbound_bytes.saturating_add(frame.len() as u64);
        if bytes > limit {
            return Err(StagingError::InboundLogFull { limit });
        }
        self.inbound_bytes = bytes;
        self.inbound
            .entry(epoch)
            .or_default()
            .push(InboundFrame { net, frame });
        Ok(Received::InboundLogged)
    }

    fn end(&mut self, epoch: u64, pages: u64, digest: [u8; 16]) -> Result<Received, StagingError> {
        let open = self.open.take().ok_or(StagingError::NoEpochOpen {
            message: "EpochEnd",
        })?;
        if epoch != open.epoch {
            let err = StagingError::EndMismatch {
                end: epoch,
                open: open.epoch,
            };
            self.open = Some(open);
            return Err(err);
        }
        if pages != open.digest.pages() {
            return Err(StagingError::PageCount {
                epoch,
                announced: pages,
                received: open.digest.pages(),
            });
        }
        if digest != open.digest.finish() {
            return Err(StagingError::Digest { epoch });
        }
        self.apply(open)
    }

    /// Applies a complete, verified epoch (see the module's notes).
    fn apply(&mut self, open: OpenEpoch) -> Result<Received, StagingError> {
        let epoch = open.epoch;
        self.poisoned = true;
        // A joining standby's first commit also makes its copies of the disks durable.
        let mut touched = if self.epoch == 0 {
            self.disk_syncing.clone()
        } else {
            Vec::new()
        };
        touched.resize(self.disks.len(), false);
        for (disk, offset, bytes) in &open.disk_writes {
            let d = &mut self.disks[*disk as usize];
            d.write_at(*offset, bytes)
                .map_err(|source| StagingError::ApplyDisk {
                    epoch,
                    disk: *disk,
                    source,
                })?;
            touched[*disk as usize] = true;
        }
        if self.options.sync_disks {
            for (i, d) in self.disks.iter_mut().enumerate() {
                if touched[i] {
                    d.sync().map_err(|source| StagingError::ApplyDisk {
                        epoch,
                        disk: i as u32,
                        source,
                    })?;
                }
            }
        }
        for (&page, slot) in &open.pages {
            let contents = slot.map(|s| &open.arena[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]);
            self.memory
                .write_page(page, contents)
                .map_err(|source| StagingError::ApplyMemory { epoch, source })?;
        }
        if let Some(state) = open.state {
            self.state = state;
        }
        self.epoch = epoch;
        self.term = open.term;
        self.poisoned = false;
        let kept = self.inbound.split_off(&(epoch + 1));
        let dropped: usize = self.inbound.values().flatten().map(|f| f.frame.len()).sum();
        self.inbound_bytes -= dropped as u64;
        self.inbound = kept;
        tracing::debug!(
            epoch,
            term = open.term,
            pages = open.pages.len(),
            disk_writes = open.disk_writes.len(),
            "committed"
        );
        Ok(Received::Committed {
            epoch,
            term: open.term,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::standby::committed::{memory_digest, DiskImage, GuestRam, HeapMemory};
    use proptest::prelude::*;

    pub(crate) const PAGES: u64 = 64;
    pub(crate) const DISK: usize = 64 << 10;

    pub(crate) type HeapStaging = Staging<HeapMemory, Vec<u8>>;

    pub(crate) fn staging() -> HeapStaging {
        Staging::new(
            HeapMemory::new(PAGES),
            vec![vec![0; DISK]],
            b"boot".to_vec(),
            (0, 1),
            StagingOptions::default(),
        )
    }

    pub(crate) fn e_state(n: u64) -> Vec<u8> {
        format!("state of epoch {n}").into_bytes()
    }

    pub(crate) fn contents(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// One epoch's content: pages (seed 0 = a zero page), state, disk writes.
    #[derive(Debug, Clone)]
    pub(crate) struct Epoch {
        pub pages: Vec<(u64, u8)>,
        pub state: Vec<u8>,
        pub writes: Vec<(u64, Vec<u8>)>,
    }

    pub(crate) fn epoch(pages: &[(u64, u8)], state: &[u8]) -> Epoch {
        Epoch {
            pages: pages.to_vec(),
            state: state.to_vec(),
            writes: vec![(pages.len() as u64 * 100, state.to_vec())],
        }
    }

    /// The messages of `e` as epoch `n` of `term`, pages two to a batch.
    pub(crate) fn messages(n: u64, term: u64, e: &Epoch) -> Vec<Message> {
        let mut digest = EpochDigest::new(n, term);
        let mut out = vec![Message::EpochBegin { epoch: n, term }];
        for chunk in e.pages.chunks(2) {
            let mut b = PageBatch::default();
            for &(p, seed) in chunk {
                let data = if seed == 0 {
                    vec![0; PAGE_SIZE]
                } else {
                    contents(seed)
                };
                b.push(p, &data);
                digest.page(p, (seed != 0).then_some(&data[..]));
            }
            out.push(Message::Pages(b));
        }
        digest.state(&e.state);
        out.push(Message::State(e.state.clone()));
        for (offset, bytes) in &e.writes {
            digest.disk_write(0, *offset, bytes);
            out.push(Message::DiskWrite {
                disk: 0,
                offset: *offset,
                bytes: bytes.clone(),
            });
        }
        out.push(Message::EpochEnd {
            epoch: n,
            pages: digest.pages(),
            digest: digest.finish(),
        });
        out
    }

    /// The committed state as a reference model holds it after `epochs`.
    pub(crate) fn model(epochs: &[Epoch]) -> (HeapMemory, Vec<u8>, Vec<u8>) {
        let mut mem = HeapMemory::new(PAGES);
        let mut disk = vec![0u8; DISK];
        let mut state = b"boot".to_vec();
        for e in epochs {
            for &(p, seed) in &e.pages {
                let data = contents(seed);
                mem.write_page(p, (seed != 0).then_some(&data[..])).unwrap();
            }
            state = e.state.clone();
            for (offset, bytes) in &e.writes {
                disk.write_at(*offset, bytes).unwrap();
            }
        }
        (mem, state, disk)
    }

    /// What a reader of the committed state sees, hashed.
    pub(crate) fn fingerprint<M: CommittedMemory, D: CommittedDisk + AsRef<[u8]>>(
        s: &Staging<M, D>,
    ) -> (u128, Vec<u8>, Vec<Vec<u8>>, u64, u64) {
        (
            memory_digest(s.memory()),
            s.committed_state().to_vec(),
            s.disks().iter().map(|d| d.as_ref().to_vec()).collect(),
            s.committed_epoch(),
            s.committed_term(),
        )
    }

    fn feed(s: &mut HeapStaging, msgs: Vec<Message>) -> Result<Received, StagingError> {
        let mut last = Received::Staged;
        for m in msgs {
            last = s.receive(m)?;
        }
        Ok(last)
    }

    fn e1() -> Epoch {
        epoch(&[(1, 1), (2, 2), (63, 3)], b"one")
    }

    fn e2() -> Epoch {
        epoch(&[(2, 0), (1, 4), (5, 5), (1, 6)], b"two")
    }

    #[test]
    fn complete_epochs_commit_in_order() {
        let mut s = staging();
        assert_eq!(
            feed(&mut s, messages(1, 1, &e1())).unwrap(),
            Received::Committed { epoch: 1, term: 1 }
        );
        assert_eq!(
            feed(&mut s, messages(2, 2, &e2())).unwrap(),
            Received::Committed { epoch: 2, term: 2 }
        );
        let (mem, state, disk) = model(&[e1(), e2()]);
        assert_eq!(memory_digest(s.memory()), memory_digest(&mem));
        assert_eq!(s.committed_state(), &state[..]);
        assert_eq!(s.disks()[0], disk);
        // The page sent twice keeps its last contents; the zero page is zero.
        let mut buf = vec![0; PAGE_SIZE];
        s.memory().read_page(1, &mut buf).unwrap();
        assert_eq!(buf, contents(6));
        s.memory().read_page(2, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!((s.committed_epoch(), s.committed_term()), (2, 2));
    }

    /// Feeds epoch 2 edited by `edit` after a good epoch 1; the error, with the committed
    /// state checked unchanged, and epoch 2 then still accepted whole.
    fn refused(edit: impl FnOnce(&mut Vec<Message>)) -> StagingError {
        let mut s = staging();
        feed(&mut s, messages(1, 1, &e1())).unwrap();
        let before = fingerprint(&s);
        let mut msgs = messages(2, 1, &e2());
        edit(&mut msgs);
        let err = feed(&mut s, msgs).unwrap_err();
        assert_eq!(fingerprint(&s), before, "committed state touched by: {err}");
        assert_eq!(s.open_epoch(), None, "{err}");
        s.abort_open("test");
        feed(&mut s, messages(2, 1, &e2())).unwrap();
        assert_eq!(s.committed_epoch(), 2);
        err
    }

    #[test]
    fn a_partial_epoch_never_reaches_the_committed_state() {
        let mut s = staging();
        feed(&mut s, messages(1, 1, &e1())).unwrap();
        let before = fingerprint(&s);
        let mut msgs = messages(2, 1, &e2());
        msgs.pop();
        feed(&mut s, msgs).unwrap();
        assert_eq!(s.open_epoch(), Some(2));
        assert_eq!(fingerprint(&s), before);
        s.abort_open("link lost");
        assert_eq!(fingerprint(&s), before);
        // The next begin of a new epoch while one is open discards both.
        let mut msgs = messages(2, 1, &e2());
        msgs.pop();
        feed(&mut s, msgs).unwrap();
        let err = s
            .receive(Message::EpochBegin { epoch: 3, term: 1 })
            .unwrap_err();
        assert!(
            matches!(err, StagingError::EpochStillOpen { open: 2, new: 3 }),
            "{err}"
        );
        assert_eq!(fingerprint(&s), before);
    }

    #[test]
    fn a_corrupt_epoch_is_refused_by_its_digest() {
        let err = refused(|m| {
            let Message::Pages(b) = &m[1] else { panic!() };
            let mut nb = PageBatch::default();
            for (p, d) in b.iter() {
                let mut d = d.map(<[u8]>::to_vec).unwrap_or(vec![0; PAGE_SIZE]);
                d[100] ^= 1;
                nb.push(p, &d);
            }
            m[1] = Message::Pages(nb);
        });
        assert!(matches!(err, StagingError::Digest { epoch: 2 }), "{err}");
        let err = refused(|m| {
            let i = m.len() - 2;
            if let Message::DiskWrite { bytes, .. } = &mut m[i] {
                bytes[0] ^= 1;
            }
        });
        assert!(matches!(err, StagingError::Digest { epoch: 2 }), "{err}");
        let err = refused(|m| {
            if let Message::State(s) = &mut m[3] {
                s.push(0);
            }
        });
        assert!(matches!(err, StagingError::Digest { .. }), "{err}");
    }

    #[test]
    fn missing_or_duplicated_pages_are_refused_by_their_count() {
        let err = refused(|m| {
            m.remove(1);
        });
        assert!(
            matches!(
                err,
                StagingError::PageCount {
                    announced: 4,
                    received: 2,
                    ..
                }
            ),
            "{err}"
        );
        let err = refused(|m| {
            let dup = m[1].clone();
            m.insert(1, dup);
        });
        assert!(matches!(err, StagingError::PageCount { .. }), "{err}");
    }

    #[test]
    fn out_of_order_replayed_and_older_term_epochs_are_refused() {
        let err = refused(|m| *m = messages(3, 1, &e2()));
        assert!(
            matches!(
                err,
                StagingError::OutOfOrder {
                    epoch: 3,
                    expected: 2
                }
            ),
            "{err}"
        );
        let err = refused(|m| *m = messages(1, 1, &e1()));
        assert!(
            matches!(
                err,
                StagingError::AlreadyCommitted {
                    epoch: 1,
                    committed: 1
                }
            ),
            "{err}"
        );
        let mut s = staging();
        feed(&mut s, messages(1, 5, &e1())).unwrap();
        let before = fingerprint(&s);
        let err = feed(&mut s, messages(2, 4, &e2())).unwrap_err();
        assert!(
            matches!(
                err,
                StagingError::StaleTerm {
                    term: 4,
                    committed_term: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(fingerprint(&s), before);
        // A newer term goes on from the committed epoch.
        feed(&mut s, messages(2, 6, &e2())).unwrap();
        assert_eq!(s.committed_term(), 6);
    }

    #[test]
    fn each_inconsistent_message_is_refused_with_its_reason() {
        let err = refused(|m| {
            let i = m.len() - 1;
            if let Message::EpochEnd { epoch, .. } = &mut m[i] {
                *epoch = 3;
            }
        });
        assert!(
            matches!(err, StagingError::EndMismatch { end: 3, open: 2 }),
            "{err}"
        );
        let err = refused(|m| {
            let mut b = PageBatch::default();
            b.push(PAGES, &contents(1));
            m.insert(1, Message::Pages(b));
        });
        assert!(
            matches!(err, StagingError::PageOutOfRange { page: PAGES, .. }),
            "{err}"
        );
        let err = refused(|m| {
            m.insert(
                1,
                Message::DiskWrite {
                    disk: 1,
                    offset: 0,
                    bytes: vec![1],
                },
            )
        });
        assert!(
            matches!(err, StagingError::UnknownDisk { disk: 1, disks: 1 }),
            "{err}"
        );
        let err = refused(|m| {
            m.insert(
                1,
                Message::DiskWrite {
                    disk: 0,
                    offset: DISK as u64 - 1,
                    bytes: vec![1, 2],
                },
            )
        });
        assert!(
            matches!(err, StagingError::DiskWriteOutOfRange { .. }),
            "{err}"
        );
        let err = refused(|m| {
            m.insert(
                1,
                Message::DiskWrite {
                    disk: 0,
                    offset: u64::MAX,
                    bytes: vec![1, 2],
                },
            )
        });
        assert!(
            matches!(err, StagingError::DiskWriteOutOfRange { .. }),
            "{err}"
        );
        let err = refused(|m| m.insert(1, Message::Ack { epoch: 1 }));
        assert!(
            matches!(err, StagingError::Unexpected { message: "Ack" }),
            "{err}"
        );
        let err = refused(|m| {
            m.remove(0);
        });
        assert!(
            matches!(err, StagingError::NoEpochOpen { message: "Pages" }),
            "{err}"
        );
        let mut s = staging();
        s.options.max_staged_bytes = 4;
        let err = feed(&mut s, messages(1, 1, &e1())).unwrap_err();
        assert!(
            matches!(err, StagingError::StagingFull { limit: 4, .. }),
            "{err}"
        );
        assert_eq!(s.committed_epoch(), 0);
    }

    #[test]
    fn inbound_frames_of_uncommitted_epochs_are_kept_and_older_ones_dropped() {
        let mut s = staging();
        let inbound = |epoch, b: u8| Message::Inbound {
            epoch,
            net: 0,
            frame: vec![b; 60],
        };
        assert_eq!(s.receive(inbound(1, 1)).unwrap(), Received::InboundLogged);
        let mut msgs = messages(1, 1, &e1());
        let end = msgs.pop().unwrap();
        feed(&mut s, msgs).unwrap();
        // Frames arrive in the middle of an epoch: logged, the epoch goes on.
        assert_eq!(s.receive(inbound(2, 2)).unwrap(), Received::InboundLogged);
        assert_eq!(s.receive(inbound(1, 3)).unwrap(), Received::InboundLogged);
        s.receive(end).unwrap();
        let kept: Vec<_> = s.inbound().map(|(e, f)| (e, f.frame[0])).collect();
        assert_eq!(kept, vec![(2, 2)]);
        assert_eq!(s.receive(inbound(1, 4)).unwrap(), Received::InboundDropped);
        // A discarded epoch keeps the log.
        let mut msgs = messages(2, 1, &e2());
        msgs.pop();
        feed(&mut s, msgs).unwrap();
        s.abort_open("test");
        assert_eq!(s.inbound().count(), 1);
        // A full log drops the frame but not the open epoch.
        s.options.max_inbound_bytes = 100;
        s.receive(Message::EpochBegin { epoch: 2, term: 1 })
            .unwrap();
        let err = s.receive(inbound(3, 5)).unwrap_err();
        assert!(
            matches!(err, StagingError::InboundLogFull { limit: 100 }),
            "{err}"
        );
        assert_eq!(s.open_epoch(), Some(2));
    }

    struct FailingDisk;

    impl CommittedDisk for FailingDisk {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
            Err(io::Error::other("medium error"))
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn zero(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_handed_over_staging_area_takes_nothing_more() {
        let mut s = staging();
        for m in messages(1, 1, &e1()) {
            s.receive(m).unwrap();
        }
        let after_one = fingerprint(&s);
        // Epoch 2 half received, then the promotion.
        let two = messages(2, 1, &e1());
        s.receive(two[0].clone()).unwrap();
        assert_eq!(s.open_epoch(), Some(2));
        s.hand_over();
        assert!(s.is_handed_over());
        assert_eq!(s.open_epoch(), None);
        for m in two {
            assert!(matches!(s.receive(m), Err(StagingError::HandedOver)));
        }
        assert_eq!(fingerprint(&s), after_one);
        assert_eq!(s.committed_epoch(), 1);
    }

    #[test]
    fn the_end_of_the_initial_synchronisation_is_recorded_between_epochs_only() {
        let mut s = staging();
        assert_eq!(s.protected_through(), None);
        for m in messages(1, 1, &e1()) {
            s.receive(m).unwrap();
        }
        s.receive(Message::Protected { through: 1 }).unwrap();
        assert_eq!(s.protected_through(), Some(1));
        // Inside an epoch it is out of place: the epoch is discarded, the record kept.
        s.receive(Message::EpochBegin { epoch: 2, term: 1 })
            .unwrap();
        assert!(matches!(
            s.receive(Message::Protected { through: 2 }),
            Err(StagingError::Unexpected {
                message: "Protected"
            })
        ));
        assert_eq!((s.protected_through(), s.committed_epoch()), (Some(1), 1));
    }

    #[test]
    fn a_joining_standby_takes_a_copy_of_memory_then_any_first_epoch() {
        let mut s = staging();
        // Without `Join`, a fresh standby takes epoch 1 only, and no page outside an epoch.
        assert!(matches!(
            feed(&mut s, messages(7, 1, &e1())),
            Err(StagingError::OutOfOrder {
                epoch: 7,
                expected: 1
            })
        ));
        let mut copy = PageBatch::default();
        copy.push(3, &contents(9));
        copy.push(1, &contents(8));
        assert!(matches!(
            s.receive(Message::Pages(copy.clone())),
            Err(StagingError::NoEpochOpen { .. })
        ));
        s.receive(Message::Join).unwrap();
        s.receive(Message::Pages(copy)).unwrap();
        assert_eq!(s.committed_epoch(), 0, "a copy commits nothing");
        assert_eq!(
            feed(&mut s, messages(7, 1, &e1())).unwrap(),
            Received::Committed { epoch: 7, term: 1 }
        );
        feed(&mut s, messages(8, 1, &e2())).unwrap();
        // The epochs wrote over the copy where they overlap (page 1), the rest of it stays.
        let mut buf = vec![0; PAGE_SIZE];
        s.memory().read_page(3, &mut buf).unwrap();
        assert_eq!(buf, contents(9));
        s.memory().read_page(1, &mut buf).unwrap();
        assert_eq!(buf, contents(6));
        // Once something is committed, `Join` is out of place, and so are pages outside an
        // epoch.
        assert!(matches!(
            s.receive(Message::Join),
            Err(StagingError::Unexpected { message: "Join" })
        ));
        let mut late = PageBatch::default();
        late.push(3, &contents(1));
        assert!(matches!(
            s.receive(Message::Pages(late)),
            Err(StagingError::NoEpochOpen { .. })
        ));
        assert_eq!(s.committed_epoch(), 8);
    }

    #[test]
    fn a_joining_standby_takes_a_copy_of_its_disks_zeroed_first() {
        let mut s = staging();
        s.disks[0].fill(0xee);
        let write = |offset: u64, byte: u8| Message::DiskWrite {
            disk: 0,
            offset,
            bytes: vec![byte; 512],
        };
        // Outside an epoch, a disk write needs `Join` and then that disk's `DiskSync`.
        assert!(matches!(
            s.receive(Message::DiskSync { disk: 0 }),
            Err(StagingError::Unexpected {
                message: "DiskSync"
            })
        ));
        s.receive(Message::Join).unwrap();
        assert!(matches!(
            s.receive(write(0, 1)),
            Err(StagingError::DiskNotSyncing { disk: 0 })
        ));
        assert!(matches!(
            s.receive(Message::DiskSync { disk: 1 }),
            Err(StagingError::UnknownDisk { disk: 1, disks: 1 })
        ));
        s.receive(Message::DiskSync { disk: 0 }).unwrap();
        assert!(
            s.disks()[0].iter().all(|&b| b == 0),
            "the image was not zeroed"
        );
        // The copy's data, then a write the guest made meanwhile over part of it.
        s.receive(write(4096, 7)).unwrap();
        s.receive(write(4096 + 256, 8)).unwrap();
        assert!(matches!(
            s.receive(write(DISK as u64 - 256, 1)),
            Err(StagingError::DiskWriteOutOfRange { .. })
        ));
        assert_eq!(s.committed_epoch(), 0, "a copy commits nothing");
        assert_eq!(
            feed(&mut s, messages(5, 1, &e1())).unwrap(),
            Received::Committed { epoch: 5, term: 1 }
        );
        let d = &s.disks()[0];
        assert!(d[4096..4096 + 256].iter().all(|&b| b == 7));
        assert!(d[4096 + 256..4096 + 768].iter().all(|&b| b == 8));
        assert!(d[8192..].iter().all(|&b| b == 0), "outside the copy: zeros");
        // Once committed, the copy is over: writes outside an epoch are refused again.
        assert!(matches!(
            s.receive(write(0, 1)),
            Err(StagingError::NoEpochOpen { .. })
        ));
        assert!(matches!(
            s.receive(Message::DiskSync { disk: 0 }),
            Err(StagingError::Unexpected { .. })
        ));
    }

    #[test]
    fn a_failed_apply_poisons_the_staging_area() {
        let mut s = Staging::new(
            HeapMemory::new(PAGES),
            vec![FailingDisk],
            Vec::new(),
            (0, 1),
            StagingOptions::default(),
        );
        let mut result = Ok(Received::Staged);
        for m in messages(1, 1, &e1()) {
            result = s.receive(m);
        }
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                StagingError::ApplyDisk {
                    epoch: 1,
                    disk: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(s.is_poisoned());
        assert!(matches!(
            s.receive(Message::Heartbeat { term: 1, epoch: 1 }),
            Err(StagingError::Poisoned)
        ));
    }

    #[test]
    fn commits_land_in_vmm_guest_memory_and_a_disk_image_file() {
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(DISK as u64).unwrap();
        let mem = vmm::vstate::memory::create_guest_memory(PAGES * PAGE_SIZE as u64).unwrap();
        let mut s = Staging::new(
            GuestRam::new(mem),
            vec![DiskImage::open(image.path()).unwrap()],
            b"boot".to_vec(),
            (0, 1),
            StagingOptions {
                sync_disks: true,
                ..Default::default()
            },
        );
        for (n, e) in [e1(), e2()].iter().enumerate() {
            for m in messages(n as u64 + 1, 1, e) {
                s.receive(m).unwrap();
            }
        }
        let before = memory_digest(s.memory());
        let mut bad = messages(3, 1, &e1());
        bad.remove(1);
        let err = bad.into_iter().try_for_each(|m| s.receive(m).map(drop));
        assert!(matches!(err, Err(StagingError::PageCount { .. })));
        assert_eq!(memory_digest(s.memory()), before);
        let (mem, state, disk) = model(&[e1(), e2()]);
        assert_eq!(memory_digest(s.memory()), memory_digest(&mem));
        assert_eq!(s.committed_state(), &state[..]);
        assert_eq!(std::fs::read(image.path()).unwrap(), disk);
    }

    fn arb_epoch() -> impl Strategy<Value = Epoch> {
        (
            proptest::collection::vec((0..PAGES, any::<u8>()), 0..10),
            proptest::collection::vec(any::<u8>(), 0..32),
            proptest::collection::vec(
                (
                    0..DISK as u64 - 600,
                    proptest::collection::vec(any::<u8>(), 1..512),
                ),
                0..3,
            ),
        )
            .prop_map(|(pages, state, writes)| Epoch {
                pages,
                state,
                writes,
            })
    }

    #[derive(Debug, Clone)]
    enum Fault {
        None,
        Drop(proptest::sample::Index),
        Duplicate(proptest::sample::Index),
        Swap(proptest::sample::Index),
        Truncate(proptest::sample::Index),
    }

    fn arb_fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            2 => Just(Fault::None),
            1 => any::<proptest::sample::Index>().prop_map(Fault::Drop),
            1 => any::<proptest::sample::Index>().prop_map(Fault::Duplicate),
            1 => any::<proptest::sample::Index>().prop_map(Fault::Swap),
            1 => any::<proptest::sample::Index>().prop_map(Fault::Truncate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever is done to epochs on the way, the committed state is always exactly the
        /// model of the epochs committed so far.
        #[test]
        fn committed_state_is_always_a_whole_prefix_of_epochs(
            epochs in proptest::collection::vec((arb_epoch(), arb_fault()), 1..6)
        ) {
            let mut s = staging();
            let mut committed: Vec<Epoch> = Vec::new();
            for (e, fault) in epochs {
                let n = committed.len() as u64 + 1;
                let mut msgs = messages(n, 1, &e);
                let changed = match &fault {
                    Fault::None => false,
                    Fault::Drop(i) => { msgs.remove(i.index(msgs.len())); true }
                    Fault::Duplicate(i) => {
                        let i = i.index(msgs.len());
                        msgs.insert(i, msgs[i].clone());
                        true
                    }
                    Fault::Swap(i) => {
                        let i = i.index(msgs.len() - 1);
                        let same = msgs[i] == msgs[i + 1];
                        msgs.swap(i, i + 1);
                        !same
                    }
                    Fault::Truncate(i) => { msgs.truncate(i.index(msgs.len())); true }
                };
                let mut result = Ok(Received::Staged);
                for m in msgs {
                    result = s.receive(m);
                    if result.is_err() { break; }
                }
                s.abort_open("next epoch");
                if s.committed_epoch() == n {
                    committed.push(e);
                } else {
                    prop_assert!(changed, "a good epoch was refused: {:?}", result);
                }
                let (mem, state, disk) = model(&committed);
                prop_assert_eq!(memory_digest(s.memory()), memory_digest(&mem));
                prop_assert_eq!(s.committed_state(), &state[..]);
                prop_assert_eq!(&s.disks()[0], &disk);
                prop_assert_eq!(s.committed_epoch(), committed.len() as u64);
            }
        }
    }
}
