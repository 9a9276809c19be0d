//! The virtio block device (virtio spec 1.1 §5.2) over a raw disk image file.
//!
//! Requests are served synchronously on the event-loop thread when the driver kicks the queue.
//! Data moves between the image and guest RAM through `vm-memory` only, so every byte the device
//! writes into the guest is recorded in the dirty bitmap that replication reads.
//!
//! The image file is used only from the event-loop thread, with an explicit seek before each
//! transfer: that gives positional (pread/pwrite) semantics. Whoever needs the image elsewhere
//! must open it again rather than share this descriptor (a `dup` shares the file offset).
//!
//! **Replication** ([`VirtioDevice::set_replication`]): when on, every write served is also
//! recorded, with its byte offset, in a journal the replication engine takes at each pause
//! ([`crate::devices::replication::BlockPort::take_epoch`]); the journal is locked for a whole
//! batch of requests, so a batch never straddles two epochs. A `FLUSH` signals the port's flush
//! event. When off (the default) there is no journal, and writes go from guest memory to the
//! image without a copy, as without replication.
//!
//! **Save and restore.** Requests are served whole within one event, so between events the
//! device holds no request: the queue indices (saved by the transport) and [`BlockState`] say
//! everything. Requests the driver made available but the device has not taken yet are in guest
//! memory and are served after the restore, when the restored device is activated.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, ReadVolatile, WriteVolatile,
};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::QueueRuntimeState;
use super::{
    ActivateError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::devices::replication::{BlockPort, DevicePort, Journal, ReplicationMode};
use crate::microvm::lock;
use crate::persist::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// Size of the device's only queue.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk protocol (sector numbers and capacity are in these units).
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request: a chain holds at most `QUEUE_SIZE` descriptors, two of which are
/// the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the request header (`struct virtio_blk_outhdr`): type, reserved, sector.
const HEADER_LEN: u64 = 16;
/// Length of the device ID returned by `VIRTIO_BLK_T_GET_ID`.
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bytes of `struct virtio_blk_config` the device fills in (up to `blk_size`); the rest reads 0.
const CONFIG_LEN: usize = 24;

/// Event-loop token of the queue eventfd.
const QUEUE_TOKEN: u32 = 0;
/// Event-loop token of the activation eventfd.
const ACTIVATE_TOKEN: u32 = 1;

/// Errors from creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The size of the image cannot be determined.
    #[error("cannot get the size of disk image {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An eventfd cannot be created.
    #[error("cannot create an eventfd for the block device: {0}")]
    EventFd(io::Error),
    /// The image to restore on is not of the saved device's size.
    #[error(
        "disk image {} has {found} sectors ({} bytes), the saved device had {saved} sectors \
         ({} bytes)",
        path.display(),
        found * SECTOR_SIZE,
        saved * SECTOR_SIZE
    )]
    CapacityMismatch {
        /// The image.
        path: PathBuf,
        /// Saved capacity in sectors.
        saved: u64,
        /// The image's capacity in sectors.
        found: u64,
    },
    /// The restore asked for a disk read-only where the guest saw it writable, or the reverse.
    #[error(
        "disk image {}: the saved device was {}, the restore asks for it {}",
        path.display(),
        access(*saved),
        access(*asked)
    )]
    ReadOnlyMismatch {
        /// The image.
        path: PathBuf,
        /// Whether the saved device was read-only.
        saved: bool,
        /// Whether the restore asked for read-only.
        asked: bool,
    },
    /// The saved device offered or accepted features this device does not offer.
    #[error(
        "the saved device offered {saved_offered:#x} and the driver accepted {saved_acked:#x}, \
         this device offers {offered:#x}"
    )]
    Features {
        /// Features the saved device offered.
        saved_offered: u64,
        /// Features its driver accepted.
        saved_acked: u64,
        /// Features this device offers.
        offered: u64,
    },
}

fn access(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}

/// The saved state of a [`Block`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The image file.
    pub path: PathBuf,
    /// Whether the guest sees the disk read-only.
    pub read_only: bool,
    /// The `GET_ID` string, zero-padded.
    pub id: [u8; ID_LEN],
    /// The disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// What restoring a block device needs besides its state.
#[derive(Debug, Clone, Default)]
pub struct BlockRestoreArgs {
    /// The image to open instead of the saved path (e.g. the destination host's copy).
    pub path: Option<PathBuf>,
    /// Whether the destination's configuration wants the disk read-only: it must match the
    /// saved device (`None`: as saved).
    pub read_only: Option<bool>,
}

/// Why one request failed. Logged, and reported to the driver as a status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// A driver-readable descriptor after a driver-writable one.
    #[error("readable descriptor after a writable one")]
    DescriptorOrder,
    /// Fewer than 16 readable bytes.
    #[error("request header is shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    /// The header cannot be read from guest memory.
    #[error("cannot read the request header: {0}")]
    ReadHeader(GuestMemoryError),
    /// A read or write whose length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// A read or write past the end of the disk.
    #[error("sector {sector} + {len} bytes is beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length.
        len: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Seeking in the image failed.
    #[error("cannot seek in the image: {0}")]
    Seek(io::Error),
    /// A guest buffer is not in guest RAM.
    #[error("guest buffer at {0:#x} is not in guest memory: {1}")]
    GuestBuffer(u64, GuestMemoryError),
    /// Reading the image into guest memory failed.
    #[error("cannot read the image: {0}")]
    ReadImage(vm_memory::VolatileMemoryError),
    /// Writing guest memory to the image failed.
    #[error("cannot write the image: {0}")]
    WriteImage(vm_memory::VolatileMemoryError),
    /// `fdatasync` failed.
    #[error("cannot flush the image: {0}")]
    Flush(io::Error),
    /// Copying the data of a journaled write out of guest memory failed.
    #[error("cannot read the data to write from guest memory: {0}")]
    ReadData(GuestMemoryError),
    /// Writing the copy of a journaled write to the image failed.
    #[error("cannot write the image: {0}")]
    WriteCopy(io::Error),
    /// Writing the device ID into guest memory failed.
    #[error("cannot write the device ID: {0}")]
    WriteId(GuestMemoryError),
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The `VIRTIO_BLK_S_*` status the driver sees.
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// Whether the host's I/O on the image failed (rather than the guest's request).
    fn is_host_io(&self) -> bool {
        matches!(
            self,
            RequestError::Seek(_)
                | RequestError::ReadImage(_)
                | RequestError::WriteImage(_)
                | RequestError::Flush(_)
                | RequestError::WriteCopy(_)
        )
    }
}

/// Guest memory areas (address, length) that form one logical buffer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Segments(Vec<(GuestAddress, u64)>);

impl Segments {
    fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.0.push((addr, len));
        }
    }

    fn len(&self) -> u64 {
        self.0.iter().map(|&(_, len)| len).sum()
    }

    /// Removes and returns the first `n` bytes, or `None` if there are fewer.
    fn take_front(&mut self, n: u64) -> Option<Segments> {
        if self.len() < n {
            return None;
        }
        let mut front = Segments::default();
        let mut rest = n;
        while rest > 0 {
            let (addr, len) = self.0.remove(0);
            if len > rest {
                front.push(addr, rest);
                self.0
                    .insert(0, (GuestAddress(addr.0.wrapping_add(rest)), len - rest));
                break;
            }
            front.push(addr, len);
            rest -= len;
        }
        Some(front)
    }

    /// Removes and returns the last `n` bytes, or `None` if there are fewer.
    fn take_back(&mut self, n: u64) -> Option<Segments> {
        let keep = self.len().checked_sub(n)?;
        let mut back = self.clone();
        let front = back.take_front(keep)?;
        *self = front;
        Some(back)
    }
}

/// A request's descriptor chain, split by direction.
struct Buffers {
    /// Driver-written bytes: the header, then data of a write.
    readable: Segments,
    /// Device-written bytes: data of a read or ID, then the status byte.
    writable: Segments,
    /// Whether a readable descriptor followed a writable one (a malformed chain).
    misordered: bool,
}

impl Buffers {
    fn from_chain(chain: DescriptorChain<&GuestMemoryMmap>) -> Self {
        let mut buffers = Buffers {
            readable: Segments::default(),
            writable: Segments::default(),
            misordered: false,
        };
        for desc in chain {
            let len = u64::from(desc.len());
            if desc.is_write_only() {
                buffers.writable.push(desc.addr(), len);
            } else {
                buffers.misordered |= buffers.writable.len() > 0;
                buffers.readable.push(desc.addr(), len);
            }
        }
        buffers
    }
}

/// The image file and what the guest sees of it.
#[derive(Debug)]
struct Disk {
    path: PathBuf,
    file: File,
    read_only: bool,
    /// Size in sectors.
    capacity: u64,
    /// The `GET_ID` string, zero-padded.
    id: [u8; ID_LEN],
    /// Requests failed because the host's I/O on the image failed.
    io_errors: u64,
}

impl Disk {
    /// Serves one request; returns the number of data bytes written into guest memory. With a
    /// replication journal, records writes in it and signals `flushed` on a flush.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        buffers: Buffers,
        replication: Option<(&mut Journal, &EventFd)>,
    ) -> Result<u64, RequestError> {
        let Buffers {
            mut readable,
            writable,
            misordered,
        } = buffers;
        if misordered {
            return Err(RequestError::DescriptorOrder);
        }
        let header = readable
            .take_front(HEADER_LEN)
            .ok_or(RequestError::ShortHeader)?;
        let mut raw = [0u8; HEADER_LEN as usize];
        let mut pos = 0;
        for &(addr, len) in &header.0 {
            let end = pos + len as usize;
            mem.read_slice(&mut raw[pos..end], addr)
                .map_err(RequestError::ReadHeader)?;
            pos = end;
        }
        let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap());

        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_range(sector, writable.len())?;
                self.read_into(mem, offset, &writable)?;
                Ok(writable.len())
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_range(sector, readable.len())?;
                match replication {
                    None => self.write_from(mem, offset, &readable)?,
                    Some((journal, _)) => {
                        let bytes = self.write_copy(mem, offset, &readable)?;
                        journal.record(offset, bytes);
                    }
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.file.sync_data().map_err(RequestError::Flush)?;
                if let Some((journal, flushed)) = replication {
                    journal.flushed();
                    if let Err(err) = flushed.write(1) {
                        tracing::error!(%err, "virtio-blk: cannot signal the flush");
                    }
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut done = 0;
                for &(addr, len) in &writable.0 {
                    let n = (len as usize).min(ID_LEN - done);
                    mem.write_slice(&self.id[done..done + n], addr)
                        .map_err(RequestError::WriteId)?;
                    done += n;
                    if done == ID_LEN {
                        break;
                    }
                }
                Ok(done as u64)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Checks a transfer of `len` bytes from `sector`; returns its byte offset in the image.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(RequestError::UnalignedLength(len));
        }
        let out_of_range = || RequestError::OutOfRange {
            sector,
            len,
            capacity: self.capacity,
        };
        let end_sector = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or_else(out_of_range)?;
        if end_sector > self.capacity {
            return Err(out_of_range());
        }
        // Cannot overflow: capacity * SECTOR_SIZE is the image size.
        Ok(sector * SECTOR_SIZE)
    }

    /// Image → guest: fills `segments` from the image at `offset`.
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &Segments,
    ) -> Result<(), RequestError> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(RequestError::Seek)?;
        for &(addr, len) in &segments.0 {
            for slice in mem.get_slices(addr, len as usize) {
                let mut slice = slice.map_err(|e| RequestError::GuestBuffer(addr.0, e))?;
                // Marks the bytes read as dirty in the guest memory bitmap.
                self.file
                    .read_exact_volatile(&mut slice)
                    .map_err(RequestError::ReadImage)?;
            }
        }
        Ok(())
    }

    /// Guest → image: writes `segments` to the image at `offset`.
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &Segments,
    ) -> Result<(), RequestError> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(RequestError::Seek)?;
        for &(addr, len) in &segments.0 {
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice.map_err(|e| RequestError::GuestBuffer(addr.0, e))?;
                self.file
                    .write_all_volatile(&slice)
                    .map_err(RequestError::WriteImage)?;
            }
        }
        Ok(())
    }
}

impl Disk {
    /// Guest → image through a copy: writes `segments` to the image at `offset` and returns
    /// what was written, for the replication journal.
    fn write_copy(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &Segments,
    ) -> Result<Vec<u8>, RequestError> {
        // The length was checked against the disk's size, which fits in memory's address space
        // on any host that maps it.
        let mut bytes = vec![0u8; usize::try_from(segments.len()).unwrap_or(usize::MAX)];
        let mut at = 0;
        for &(addr, len) in &segments.0 {
            let end = at + len as usize;
            mem.read_slice(&mut bytes[at..end], addr)
                .map_err(RequestError::ReadData)?;
            at = end;
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(RequestError::Seek)?;
        self.file
            .write_all(&bytes)
            .map_err(RequestError::WriteCopy)?;
        Ok(bytes)
    }
}

/// What the device holds between `DRIVER_OK` and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device backed by a raw image file.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_evts: [EventFd; 1],
    activate_evt: EventFd,
    active: Option<Active>,
    /// The replication journal, when replication is on.
    journal: Option<Arc<Mutex<Journal>>>,
    /// Signalled after a flush while replication is on.
    flush_evt: Arc<EventFd>,
}

impl Block {
    /// Opens the raw image at `path` (read-only if `read_only`) as a virtio-blk device.
    ///
    /// The device ID (`GET_ID`, Linux's `/sys/block/vdX/serial`) defaults to the image's file
    /// name, truncated to 20 bytes; see [`Block::with_id`].
    pub fn new(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlockError> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        // Seeking to the end works for block devices too, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                size,
                "disk image size is not a multiple of 512: the last partial sector is not visible"
            );
        }
        let capacity = size / SECTOR_SIZE;

        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }

        // struct virtio_blk_config, little endian: capacity, size_max, seg_max, geometry,
        // blk_size.
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let event_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd);
        let block = Self {
            disk: Disk {
                path,
                file,
                read_only,
                capacity,
                id: [0; ID_LEN],
                io_errors: 0,
            },
            avail_features,
            acked_features: 0,
            config,
            queue_evts: [event_fd()?],
            activate_evt: event_fd()?,
            active: None,
            journal: None,
            flush_evt: Arc::new(event_fd()?),
        };
        Ok(block.with_id(name))
    }

    /// Sets the device ID returned by `GET_ID` (truncated to 20 bytes).
    pub fn with_id(mut self, id: impl AsRef<[u8]>) -> Self {
        let id = id.as_ref();
        let n = id.len().min(ID_LEN);
        self.disk.id = [0; ID_LEN];
        self.disk.id[..n].copy_from_slice(&id[..n]);
        self
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    /// Whether the guest sees the disk read-only.
    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Serves every available request, then interrupts the driver if it wants to be told.
    fn process_queue(&mut self) {
        let Some(Active {
            mem,
            queue,
            interrupt,
        }) = self.active.as_mut()
        else {
            return;
        };
        // Held for the whole batch: the replication engine takes the journal between batches.
        let mut journal = self.journal.as_deref().map(lock);
        let mut used = false;
        let mut idle_passes = 0;
        loop {
            // No kicks while we are draining the queue; re-enabled (and re-checked) below.
            if let Err(err) = queue.disable_notification(mem) {
                tracing::error!(%err, "virtio-blk: cannot disable queue notifications");
                break;
            }
            let mut served = false;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let replication = journal.as_deref_mut().map(|j| (j, &*self.flush_evt));
                let len = serve(&mut self.disk, mem, chain, replication);
                if let Err(err) = queue.add_used(mem, head, len) {
                    tracing::error!(%err, head, "virtio-blk: cannot return a used buffer");
                }
                used = true;
                served = true;
            }
            idle_passes = if served { 0 } else { idle_passes + 1 };
            match queue.enable_notification(mem) {
                // More requests arrived meanwhile: serve them. But a driver whose available
                // index stays ahead with nothing to pop (a broken ring) must not spin this
                // thread: a second pass that serves nothing ends the loop.
                Ok(true) if idle_passes < 2 => continue,
                Ok(true) => {
                    tracing::warn!("virtio-blk: available ring ahead of its entries; ignored");
                    break;
                }
                Ok(false) => break,
                Err(err) => {
                    tracing::error!(%err, "virtio-blk: cannot enable queue notifications");
                    break;
                }
            }
        }
        if !used {
            return;
        }
        match queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(err) = interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                    tracing::error!(%err, "virtio-blk: cannot raise the queue interrupt");
                }
            }
            Err(err) => tracing::error!(%err, "virtio-blk: cannot read the used event index"),
        }
    }
}

/// Serves the request in `chain` and writes its status; returns the used length (bytes written
/// into the chain's device-writable buffers).
fn serve(
    disk: &mut Disk,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    replication: Option<(&mut Journal, &EventFd)>,
) -> u32 {
    let mut buffers = Buffers::from_chain(chain);
    let Some(status) = buffers.writable.take_back(1) else {
        tracing::warn!("virtio-blk: request without a status byte dropped");
        return 0;
    };
    let (code, written) = match disk.execute(mem, buffers, replication) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(err) => {
            tracing::warn!(%err, "virtio-blk: request failed");
            if err.is_host_io() {
                disk.io_errors += 1;
            }
            (err.status(), 0)
        }
    };
    let status_addr = status.0[0].0;
    if let Err(err) = mem.write_obj(code, status_addr) {
        tracing::warn!(%err, "virtio-blk: cannot write the request status");
        return 0;
    }
    // The chain is at most 4 GiB long (virtio-queue stops at that), so this fits.
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Reads an eventfd until it is empty.
fn drain(evt: &EventFd, what: &str) {
    match evt.read() {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
        Err(err) => tracing::error!(%err, "virtio-blk: cannot read the {what} eventfd"),
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            Events::with_data(&self.queue_evts[0], QUEUE_TOKEN, EventSet::IN),
            Events::with_data(&self.activate_evt, ACTIVATE_TOKEN, EventSet::IN),
        ];
        for event in events {
            if let Err(err) = ops.add(event) {
                tracing::error!(?err, "virtio-blk: cannot register with the event loop");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            QUEUE_TOKEN => {
                drain(&self.queue_evts[0], "queue");
                if self.active.is_none() {
                    tracing::debug!("virtio-blk: queue notification before activation ignored");
                    return;
                }
            }
            ACTIVATE_TOKEN => {
                drain(&self.activate_evt, "activation");
                tracing::debug!(path = %self.disk.path.display(), "virtio-blk: activated");
            }
            other => {
                tracing::warn!(token = other, "virtio-blk: unexpected event");
                return;
            }
        }
        self.process_queue();
    }
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockRestoreArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            path: self.disk.path.clone(),
            read_only: self.disk.read_only,
            id: self.disk.id,
            capacity_sectors: self.disk.capacity,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
        }
    }

    /// Reopens the image (`args.path`, else the saved path) with the saved access, ID and
    /// features; refuses an image of another size or another access than saved. The device is
    /// not activated: the transport's restore does that with the saved queues.
    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Self, BlockError> {
        let path = args.path.unwrap_or_else(|| state.path.clone());
        if let Some(asked) = args.read_only.filter(|&ro| ro != state.read_only) {
            return Err(BlockError::ReadOnlyMismatch {
                path,
                saved: state.read_only,
                asked,
            });
        }
        let mut block = Block::new(&path, state.read_only)?;
        if block.disk.capacity != state.capacity_sectors {
            return Err(BlockError::CapacityMismatch {
                path,
                saved: state.capacity_sectors,
                found: block.disk.capacity,
            });
        }
        let wanted = state.avail_features | state.acked_features;
        if wanted & !block.avail_features != 0 {
            return Err(BlockError::Features {
                saved_offered: state.avail_features,
                saved_acked: state.acked_features,
                offered: block.avail_features,
            });
        }
        block.avail_features = state.avail_features;
        block.acked_features = state.acked_features;
        tracing::debug!(path = %path.display(), "virtio-blk: device restored");
        Ok(block.with_id(state.id))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn disk_health(&self) -> Option<crate::api::DiskHealth> {
        Some(crate::health::disk_health(
            &self.disk.path,
            &self.disk.file,
            self.disk.io_errors,
        ))
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        let unknown = features & !self.avail_features;
        if unknown != 0 {
            tracing::warn!(unknown, "virtio-blk: driver acked features not offered");
        }
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| self.config.get(at)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            offset,
            len = data.len(),
            "virtio-blk: write to the read-only configuration space ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queue: queues.remove(0),
            interrupt,
        });
        // Wake the event loop: requests may already be waiting.
        if let Err(err) = self.activate_evt.write(1) {
            self.active = None;
            return Err(ActivateError::ActivateEvent(err));
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn queue_states(&self) -> Vec<QueueRuntimeState> {
        self.active
            .iter()
            .map(|active| QueueRuntimeState::from(&active.queue))
            .collect()
    }

    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.save())
    }

    fn set_replication(&mut self, mode: ReplicationMode) -> Option<DevicePort> {
        let journal = match mode {
            ReplicationMode::Off => {
                self.journal = None;
                Arc::new(Mutex::new(Journal::new(0)))
            }
            ReplicationMode::On { epoch, .. } => {
                let journal = Arc::new(Mutex::new(Journal::new(epoch)));
                self.journal = Some(journal.clone());
                journal
            }
        };
        tracing::info!(path = %self.disk.path.display(), ?mode, "virtio-blk: replication set");
        Some(DevicePort::Block(BlockPort::new(
            self.disk.path.clone(),
            journal,
            self.flush_evt.clone(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryRegion;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::devices::replication::DiskWrite;

    const DISK_SECTORS: u64 = 64;
    const HEADER_ADDR: u64 = 0x1_0000;
    const DATA_ADDR: u64 = 0x2_0000;
    const STATUS_ADDR: u64 = 0x3_0000;

    struct Harness {
        mem: GuestMemoryMmap,
        image: TempFile,
        interrupt: Arc<VirtioInterrupt>,
        block: Block,
    }

    /// A disk of `DISK_SECTORS` sectors where byte `i` holds `i / 512`.
    fn image() -> TempFile {
        let image = TempFile::new().unwrap();
        let data: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        image.as_file().write_all(&data).unwrap();
        image
    }

    fn harness(read_only: bool) -> Harness {
        let image = image();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let block = Block::new(image.as_path(), read_only).unwrap();
        Harness {
            mem,
            image,
            interrupt,
            block,
        }
    }

    fn activate(h: &mut Harness, vq: &MockSplitQueue<GuestMemoryMmap>) {
        let queue = vq.create_queue::<Queue>().unwrap();
        h.block
            .activate(h.mem.clone(), vec![queue], h.interrupt.clone())
            .unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
    }

    /// Chains `descs` (setting NEXT links) at table index `start` and makes it available.
    fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, start: u16, descs: &[RawDescriptor]) {
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i == descs.len() - 1;
                let flags = if last {
                    d.flags()
                } else {
                    d.flags() | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { start + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        vq.add_desc_chains(&linked, start).unwrap();
    }

    fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(HEADER_ADDR)).unwrap();
    }

    /// A request in the usual Linux layout: header, one data buffer, status.
    fn add_request(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        start: u16,
        kind: u32,
        sector: u64,
        data_len: u32,
    ) {
        write_header(mem, kind, sector);
        mem.write_obj(0xffu8, GuestAddress(STATUS_ADDR)).unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_OUT {
            0
        } else {
            VRING_DESC_F_WRITE
        };
        let mut descs = vec![desc(HEADER_ADDR, 16, 0)];
        if data_len > 0 {
            descs.push(desc(DATA_ADDR, data_len, data_flags));
        }
        descs.push(desc(STATUS_ADDR, 1, VRING_DESC_F_WRITE));
        add_chain(vq, start, &descs);
    }

    fn status(mem: &GuestMemoryMmap) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS_ADDR)).unwrap())
    }

    /// The (head, len) of used ring entry `i`.
    fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let elem = vq.used().ring().ref_at(i).unwrap().load();
        (elem.id(), elem.len())
    }

    fn image_bytes(h: &Harness) -> Vec<u8> {
        let mut data = Vec::new();
        File::open(h.image.as_path())
            .unwrap()
            .read_to_end(&mut data)
            .unwrap();
        data
    }

    #[test]
    fn missing_image_error_names_the_path() {
        let err = Block::new("/nonexistent/disk.img", false).err().unwrap();
        assert!(matches!(err, BlockError::Open { .. }));
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/disk.img"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn config_and_features() {
        let h = harness(false);
        assert_eq!(h.block.capacity(), DISK_SECTORS);
        let mut cap = [0u8; 8];
        h.block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
        let mut seg_max = [0u8; 4];
        h.block.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
        let mut beyond = [0xffu8; 4];
        h.block.read_config(58, &mut beyond);
        assert_eq!(beyond, [0; 4]);
        let features = h.block.avail_features();
        assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(
            harness(true).block.avail_features() & (1 << VIRTIO_BLK_F_RO),
            0
        );
        assert_eq!(h.block.queue_max_sizes(), &[QUEUE_SIZE]);
        assert_eq!(h.block.device_type(), TYPE_BLOCK);
    }

    #[test]
    fn write_then_read_back() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        h.mem
            .write_slice(&pattern, GuestAddress(DATA_ADDR))
            .unwrap();
        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_OUT, 3, 1024);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 1));
        assert_eq!(h.interrupt.status(), VIRTIO_MMIO_INT_VRING);
        let disk = image_bytes(&h);
        assert_eq!(&disk[3 * 512..5 * 512], &pattern[..]);
        assert_eq!(disk[2 * 512], 2);
        assert_eq!(disk[5 * 512], 5);

        // Read sectors 2..6 back.
        h.mem
            .write_slice(&[0u8; 2048], GuestAddress(DATA_ADDR))
            .unwrap();
        add_request(&h.mem, &vq, 3, VIRTIO_BLK_T_IN, 2, 2048);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 1), (3, 2048 + 1));
        let mut back = vec![0u8; 2048];
        h.mem
            .read_slice(&mut back, GuestAddress(DATA_ADDR))
            .unwrap();
        assert!(back[..512].iter().all(|&b| b == 2));
        assert_eq!(&back[512..1536], &pattern[..]);
        assert!(back[1536..].iter().all(|&b| b == 5));
    }

    #[test]
    fn reads_mark_guest_pages_dirty() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        let region = mem.iter().next().unwrap();
        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_IN, 0, 8192);
        assert!(!region.bitmap().dirty_at(DATA_ADDR as usize));
        assert!(!region.bitmap().dirty_at(DATA_ADDR as usize + 4096));
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert!(region.bitmap().dirty_at(DATA_ADDR as usize));
        assert!(region.bitmap().dirty_at(DATA_ADDR as usize + 4096));
        assert!(!region.bitmap().dirty_at(DATA_ADDR as usize + 8192));
    }

    #[test]
    fn read_only_refuses_writes() {
        let mut h = harness(true);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        let before = image_bytes(&h);
        h.mem
            .write_slice(&[0xaa; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_OUT, 0, 512);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(used(&vq, 0), (0, 1));
        assert_eq!(image_bytes(&h), before);

        // Reads still work.
        add_request(&h.mem, &vq, 3, VIRTIO_BLK_T_IN, 1, 512);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn out_of_range_and_unaligned_requests_fail() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        let cases = [
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024),
            (VIRTIO_BLK_T_OUT, DISK_SECTORS, 512),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_IN, 0, 100),
        ];
        let before = image_bytes(&h);
        for (i, (kind, sector, len)) in cases.into_iter().enumerate() {
            add_request(&h.mem, &vq, (i * 3) as u16, kind, sector, len);
            h.block.process_queue();
            assert_eq!(status(&h.mem), VIRTIO_BLK_S_IOERR, "case {i}");
            assert_eq!(used(&vq, i).1, 1, "case {i}");
        }
        assert_eq!(image_bytes(&h), before);
        // The last sector itself is fine.
        add_request(&h.mem, &vq, 12, VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 512);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn flush_get_id_and_unsupported() {
        let mut h = harness(false);
        h.block = Block::new(h.image.as_path(), false)
            .unwrap()
            .with_id("vmr-disk-0");
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);

        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_FLUSH, 0, 0);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 1));

        h.mem
            .write_slice(&[0xff; 20], GuestAddress(DATA_ADDR))
            .unwrap();
        add_request(&h.mem, &vq, 2, VIRTIO_BLK_T_GET_ID, 0, 20);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 1), (2, 21));
        let mut id = [0u8; 20];
        h.mem.read_slice(&mut id, GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(&id[..10], b"vmr-disk-0");
        assert!(id[10..].iter().all(|&b| b == 0));

        add_request(&h.mem, &vq, 5, VIRTIO_BLK_T_DISCARD, 0, 16);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn host_io_errors_are_counted_and_guest_errors_are_not() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        // A read beyond the disk is the guest's error: the image is fine.
        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_IN, DISK_SECTORS, 512);
        let served = |h: &mut Harness| {
            h.block.process_queue();
            assert_eq!(status(&h.mem), VIRTIO_BLK_S_IOERR);
            let health = h.block.disk_health().unwrap();
            (health.state, health.io_errors)
        };
        assert_eq!(served(&mut h), (crate::api::DiskState::Ok, 0));
        // The host cannot flush /dev/full (fdatasync of a character device fails).
        h.block = Block::new("/dev/full", false).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x8_0000), 16);
        activate(&mut h, &vq);
        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_FLUSH, 0, 0);
        assert_eq!(served(&mut h), (crate::api::DiskState::Failing, 1));
    }

    #[test]
    fn default_id_is_the_file_name() {
        let h = harness(false);
        let name = h.image.as_path().file_name().unwrap().to_str().unwrap();
        let n = name.len().min(20);
        assert_eq!(&h.block.disk.id[..n], &name.as_bytes()[..n]);
    }

    #[test]
    fn any_descriptor_layout_is_accepted() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        // Header split 10 + 6 with the first data bytes, data and status in one buffer.
        write_header(&h.mem, VIRTIO_BLK_T_IN, 7);
        h.mem
            .write_obj(0xffu8, GuestAddress(DATA_ADDR + 1024))
            .unwrap();
        add_chain(
            &vq,
            0,
            &[
                desc(HEADER_ADDR, 10, 0),
                desc(HEADER_ADDR + 10, 6, 0),
                desc(DATA_ADDR, 100, VRING_DESC_F_WRITE),
                desc(DATA_ADDR + 100, 1024 - 100 + 1, VRING_DESC_F_WRITE),
            ],
        );
        h.block.process_queue();
        let st: u8 = h.mem.read_obj(GuestAddress(DATA_ADDR + 1024)).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        assert_eq!(used(&vq, 0), (0, 1025));
        let mut back = vec![0u8; 1024];
        h.mem
            .read_slice(&mut back, GuestAddress(DATA_ADDR))
            .unwrap();
        assert!(back[..512].iter().all(|&b| b == 7));
        assert!(back[512..].iter().all(|&b| b == 8));
    }

    #[test]
    fn malformed_chains() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        // Short header: IOERR.
        h.mem.write_obj(0xffu8, GuestAddress(STATUS_ADDR)).unwrap();
        add_chain(
            &vq,
            0,
            &[
                desc(HEADER_ADDR, 8, 0),
                desc(STATUS_ADDR, 1, VRING_DESC_F_WRITE),
            ],
        );
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(used(&vq, 0), (0, 1));
        // No writable byte at all: no status, used length 0.
        write_header(&h.mem, VIRTIO_BLK_T_FLUSH, 0);
        add_chain(&vq, 2, &[desc(HEADER_ADDR, 16, 0)]);
        h.block.process_queue();
        assert_eq!(used(&vq, 1), (2, 0));
        // Data buffer outside guest RAM: IOERR.
        add_chain(
            &vq,
            3,
            &[
                desc(HEADER_ADDR, 16, 0),
                desc(0x4000_0000, 512, VRING_DESC_F_WRITE),
                desc(STATUS_ADDR, 1, VRING_DESC_F_WRITE),
            ],
        );
        write_header(&h.mem, VIRTIO_BLK_T_IN, 0);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(vq.used().idx().load(), 3);
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let mut h = harness(false);
        let err = h
            .block
            .activate(h.mem.clone(), Vec::new(), h.interrupt.clone())
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        assert!(!h.block.is_activated());
    }

    #[test]
    fn transport_activates_the_block_device() {
        use crate::devices::bus::BusDevice;
        use crate::devices::virtio::mmio::{regs, MmioTransport};

        let Harness {
            mem,
            image: _image,
            interrupt,
            block,
        } = harness(false);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let block = Arc::new(Mutex::new(block));
        let mut transport = MmioTransport::new(mem.clone(), block.clone(), interrupt.clone());
        let mut write = |offset: u64, value: u32| transport.write(offset, &value.to_le_bytes());
        // What Linux's virtio_mmio + virtio_blk drivers do, in order.
        write(regs::STATUS, 0);
        write(regs::STATUS, 1);
        write(regs::STATUS, 1 | 2);
        write(regs::DRIVER_FEATURES_SEL, 0);
        write(regs::DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
        write(regs::DRIVER_FEATURES_SEL, 1);
        write(regs::DRIVER_FEATURES, 1);
        write(regs::STATUS, 1 | 2 | 8);
        write(regs::QUEUE_SEL, 0);
        write(regs::QUEUE_NUM, 16);
        write(regs::QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32);
        write(regs::QUEUE_AVAIL_LOW, vq.avail_addr().0 as u32);
        write(regs::QUEUE_USED_LOW, vq.used_addr().0 as u32);
        write(regs::QUEUE_READY, 1);
        write(regs::STATUS, 1 | 2 | 8 | 4);
        assert_eq!(transport.status(), 1 | 2 | 8 | 4);
        {
            let block = block.lock().unwrap();
            assert!(block.is_activated());
            assert_eq!(
                block.acked_features(),
                (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH)
            );
        }
        let mut cap = [0u8; 8];
        transport.read(regs::CONFIG, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);

        add_request(&mem, &vq, 0, VIRTIO_BLK_T_IN, 9, 512);
        block.lock().unwrap().process_queue();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let mut isr = [0u8; 4];
        transport.read(regs::INTERRUPT_STATUS, &mut isr);
        assert_eq!(u32::from_le_bytes(isr), VIRTIO_MMIO_INT_VRING);

        transport.write(regs::STATUS, &0u32.to_le_bytes());
        assert!(!block.lock().unwrap().is_activated());
        assert_eq!(block.lock().unwrap().acked_features(), 0);
    }

    #[test]
    fn a_running_disk_is_restored_through_the_transport_and_serves_on() {
        use crate::devices::virtio::mmio::testing::{bring_up, register_dump};
        use crate::devices::virtio::mmio::{MmioRestoreArgs, MmioState, MmioTransport};

        let Harness {
            mem,
            image: _image,
            interrupt,
            block,
        } = harness(false);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let block = Arc::new(Mutex::new(block.with_id("vmr-disk-7")));
        let mut transport = MmioTransport::new(mem.clone(), block.clone(), interrupt);
        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH;
        bring_up(&mut transport, features, &[&vq]);
        assert!(block.lock().unwrap().is_activated());

        // One request served, one made available but not yet taken by the device.
        let pattern: Vec<u8> = (0..512u32).map(|i| (i * 13 + 1) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA_ADDR)).unwrap();
        add_request(&mem, &vq, 0, VIRTIO_BLK_T_OUT, 3, 512);
        block.lock().unwrap().process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        mem.write_slice(&[0u8; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        add_request(&mem, &vq, 3, VIRTIO_BLK_T_IN, 3, 512);

        let before = register_dump(&mut transport);
        let json = serde_json::to_string(&transport.save()).unwrap();
        let state: MmioState = serde_json::from_str(&json).unwrap();
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_VRING);
        let queue = state.active_queues.as_ref().expect("queue saved")[0];
        assert_eq!((queue.next_avail, queue.next_used), (1, 1));
        let VirtioDeviceState::Block(saved) = &state.device else {
            panic!("not a block device: {:?}", state.device);
        };
        assert_eq!(saved.capacity_sectors, DISK_SECTORS);
        assert_eq!(&saved.id[..10], b"vmr-disk-7");
        assert_eq!(saved.acked_features, features);
        drop(transport);
        drop(block);

        // A new device and transport on the same guest memory.
        let block = Block::restore(BlockRestoreArgs::default(), saved).unwrap();
        let block = Arc::new(Mutex::new(block));
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut restored = MmioTransport::restore(
            MmioRestoreArgs {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                device: block.clone(),
            },
            &state,
        )
        .unwrap();
        assert_eq!(register_dump(&mut restored), before);
        assert_eq!(restored.save(), state);
        // The activation wakes the event loop, which serves the request left in the ring.
        assert_eq!(block.lock().unwrap().activate_evt.read().unwrap(), 1);
        block.lock().unwrap().process_queue();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(used(&vq, 1), (3, 512 + 1));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(back, pattern);

        // A request queued after the restore is served, the used index going on.
        add_request(&mem, &vq, 6, VIRTIO_BLK_T_GET_ID, 0, 20);
        block.lock().unwrap().process_queue();
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(used(&vq, 2), (6, 21));
        let mut id = [0u8; 10];
        mem.read_slice(&mut id, GuestAddress(DATA_ADDR)).unwrap();
        assert_eq!(&id, b"vmr-disk-7");
        assert_eq!(interrupt.irqfd().read().unwrap(), 2);
    }

    #[test]
    fn restore_refuses_another_size_or_access() {
        let h = harness(false);
        let state = h.block.save();

        let bigger = TempFile::new().unwrap();
        bigger
            .as_file()
            .write_all(&vec![0u8; (DISK_SECTORS as usize + 1) * 512])
            .unwrap();
        let args = BlockRestoreArgs {
            path: Some(bigger.as_path().to_path_buf()),
            read_only: None,
        };
        let err = Block::restore(args, &state).err().unwrap();
        assert!(
            matches!(
                err,
                BlockError::CapacityMismatch {
                    saved: DISK_SECTORS,
                    found: 65,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("65 sectors (33280 bytes)")
                && msg.contains("64 sectors (32768 bytes)")
                && msg.contains(&*bigger.as_path().to_string_lossy()),
            "{msg}"
        );

        let args = BlockRestoreArgs {
            path: None,
            read_only: Some(true),
        };
        let err = Block::restore(args, &state).err().unwrap();
        assert!(matches!(err, BlockError::ReadOnlyMismatch { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("the saved device was writable, the restore asks for it read-only"),
            "{err}"
        );

        let bad = BlockState {
            acked_features: 1 << VIRTIO_BLK_F_RO,
            ..state.clone()
        };
        let err = Block::restore(BlockRestoreArgs::default(), &bad)
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Features { .. }), "{err}");

        // Another image of the same size is taken, with the saved ID and features.
        let copy = image();
        let args = BlockRestoreArgs {
            path: Some(copy.as_path().to_path_buf()),
            read_only: Some(false),
        };
        let restored = Block::restore(args, &state).unwrap();
        assert_eq!(
            restored.save(),
            BlockState {
                path: copy.as_path().to_path_buf(),
                ..state
            }
        );

        // A read-only disk comes back read-only.
        let ro = harness(true);
        let restored = Block::restore(BlockRestoreArgs::default(), &ro.block.save()).unwrap();
        assert!(restored.is_read_only());
        assert_eq!(restored.save(), ro.block.save());
    }

    #[test]
    fn event_loop_drives_the_device() {
        let h = harness(false);
        let Harness {
            mem,
            image: _image,
            interrupt,
            block,
        } = h;
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let queue_evt = block.queue_events()[0].try_clone().unwrap();
        let block = Arc::new(Mutex::new(block));
        let mut event_loop = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        event_loop.add_subscriber(block.clone());

        // A kick before activation is drained and ignored.
        add_request(&mem, &vq, 0, VIRTIO_BLK_T_IN, 1, 512);
        queue_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 0);
        assert!(queue_evt.read().is_err(), "queue eventfd drained");

        // Activation (from "a vCPU thread") wakes the loop, which serves the pending request.
        let queue = vq.create_queue::<Queue>().unwrap();
        block
            .lock()
            .unwrap()
            .activate(mem.clone(), vec![queue], interrupt.clone())
            .unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(interrupt.irqfd().read().unwrap(), 1);

        // A kick after activation is served.
        add_request(&mem, &vq, 3, VIRTIO_BLK_T_IN, 2, 512);
        queue_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 2);
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA_ADDR)).unwrap();
        assert!(back.iter().all(|&b| b == 2));

        // After reset, kicks are ignored again.
        block.lock().unwrap().reset();
        assert!(!block.lock().unwrap().is_activated());
        add_request(&mem, &vq, 6, VIRTIO_BLK_T_IN, 3, 512);
        queue_evt.write(1).unwrap();
        assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 2);
    }

    fn port(block: &mut Block, mode: ReplicationMode) -> BlockPort {
        match block.set_replication(mode) {
            Some(DevicePort::Block(port)) => port,
            other => panic!("not a block port: {other:?}"),
        }
    }

    /// Writes `fill` to sector `sector` (one sector) through request chain `start`.
    fn write_sector(
        h: &mut Harness,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        start: u16,
        sector: u64,
        fill: u8,
    ) {
        h.mem
            .write_slice(&[fill; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        add_request(&h.mem, vq, start, VIRTIO_BLK_T_OUT, sector, 512);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn replicated_writes_are_journaled_per_epoch_and_a_flush_is_signalled() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        let port = port(
            &mut h.block,
            ReplicationMode::On {
                epoch: 7,
                inbound_capacity: 1,
            },
        );
        assert_eq!(port.path(), h.image.as_path());

        // Epoch 7: two writes, then a flush.
        write_sector(&mut h, &vq, 0, 3, 0xa3);
        write_sector(&mut h, &vq, 3, 9, 0xa9);
        assert!(port.flush_event().read().is_err(), "no flush yet");
        add_request(&h.mem, &vq, 6, VIRTIO_BLK_T_FLUSH, 0, 0);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert_eq!(port.flush_event().read().unwrap(), 1);
        // A read is not journaled.
        add_request(&h.mem, &vq, 8, VIRTIO_BLK_T_IN, 3, 512);
        h.block.process_queue();
        assert_eq!(port.pending_bytes(), 1024);

        let seven = port.take_epoch(8);
        assert_eq!(seven.epoch, 7);
        assert_eq!(seven.flushes, 1);
        assert_eq!(
            seven.writes,
            vec![
                DiskWrite {
                    offset: 3 * 512,
                    bytes: vec![0xa3; 512]
                },
                DiskWrite {
                    offset: 9 * 512,
                    bytes: vec![0xa9; 512]
                },
            ]
        );
        // The writes reached the image too.
        let disk = image_bytes(&h);
        assert!(disk[3 * 512..4 * 512].iter().all(|&b| b == 0xa3));
        assert!(disk[9 * 512..10 * 512].iter().all(|&b| b == 0xa9));

        // Epoch 8: one write, over several descriptors; a failed write is not journaled.
        h.mem
            .write_slice(&[0xb1; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        h.mem
            .write_slice(&[0xb2; 512], GuestAddress(DATA_ADDR + 0x1000))
            .unwrap();
        write_header(&h.mem, VIRTIO_BLK_T_OUT, 20);
        add_chain(
            &vq,
            11,
            &[
                desc(HEADER_ADDR, 16, 0),
                desc(DATA_ADDR, 512, 0),
                desc(DATA_ADDR + 0x1000, 512, 0),
                desc(STATUS_ADDR, 1, VRING_DESC_F_WRITE),
            ],
        );
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        add_request(&h.mem, &vq, 0, VIRTIO_BLK_T_OUT, DISK_SECTORS, 512);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_IOERR);
        let eight = port.take_epoch(9);
        assert_eq!(eight.epoch, 8);
        assert_eq!(eight.flushes, 0);
        let mut expected = vec![0xb1; 512];
        expected.extend([0xb2; 512]);
        assert_eq!(
            eight.writes,
            vec![DiskWrite {
                offset: 20 * 512,
                bytes: expected
            }]
        );

        // The journal applied to the original image gives the primary's image.
        let mut standby = {
            let original = image();
            let mut data = Vec::new();
            File::open(original.as_path())
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            data
        };
        for w in seven.writes.iter().chain(&eight.writes) {
            let at = w.offset as usize;
            standby[at..at + w.bytes.len()].copy_from_slice(&w.bytes);
        }
        assert_eq!(standby, image_bytes(&h));
    }

    #[test]
    fn without_replication_nothing_is_journaled_or_signalled() {
        let mut h = harness(false);
        let mem = h.mem.clone();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut h, &vq);
        let on = ReplicationMode::On {
            epoch: 1,
            inbound_capacity: 1,
        };
        let before = port(&mut h.block, on);
        write_sector(&mut h, &vq, 0, 1, 0x11);
        let off = port(&mut h.block, ReplicationMode::Off);
        assert!(h.block.journal.is_none());
        write_sector(&mut h, &vq, 3, 2, 0x22);
        add_request(&h.mem, &vq, 6, VIRTIO_BLK_T_FLUSH, 0, 0);
        h.block.process_queue();
        assert_eq!(status(&h.mem), VIRTIO_BLK_S_OK);
        assert!(off.flush_event().read().is_err());
        assert_eq!(off.pending_bytes(), 0);
        assert!(off.take_epoch(2).writes.is_empty());
        // The old port saw only the write made while replication was on.
        assert_eq!(before.take_epoch(2).writes.len(), 1);
        assert!(image_bytes(&h)[2 * 512..3 * 512].iter().all(|&b| b == 0x22));
    }
}
