//! Epoch checkpoints of a running microVM, for replication: a short pause takes the dirty set,
//! the device and vCPU state and write-protects the dirty pages; the guest resumes at once, and
//! the pages are copied afterwards, each before the guest's next write to it
//! (copy-before-write with userfaultfd, as QEMU's background snapshot does).
//!
//! - [`EpochTracker`]: the replication consumer of the dirty tracker, the userfaultfd over guest
//!   RAM and its fault-handler thread. Make one per protected VM ([`EpochTracker::new`]).
//! - [`MicroVm::checkpoint_epoch`] (on the monitor thread) or [`crate::microvm::FreezeHandle::epoch`]
//!   (from any thread): pause, collect, protect, resume; returns a [`PendingEpoch`].
//! - [`PendingEpoch::wait`]: the [`EpochCapture`] - the pages and encoded state of the instant
//!   of the pause - once the copier has copied every protected page.
//!
//! Pause: stop vCPUs, harvest the dirty log (KVM's OR the monitor's bitmap, plus the virtqueue
//! ring pages), save devices and vCPUs, write-protect, resume. After the resume a copier thread
//! copies the protected pages in address order and unprotects them range by range, ahead of the
//! guest; the fault-handler thread serves a guest write that comes first by copying that page,
//! then unprotecting it. A page is claimed (an atomic per page of the epoch) by whoever copies
//! it, and unprotected only once copied: the capture holds every page as it was at the pause.
//!
//! [`EpochMode::Naive`] copies the dirty pages inside the pause instead (for comparison).

use std::hash::Hasher;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::replication::{DeviceSwitch, EpochWrites};
use crate::devices::DevicesState;
use crate::microvm::{ControlError, MicroVm};
use crate::vstate::dirty::DirtyConsumer;
use crate::vstate::memory::{GuestMemoryMmap, PAGE_SIZE};
use crate::vstate::uffd::{UffdError, WriteProtector};
use crate::vstate::vm::{DirtyBitmap, Vm, VmError};

const PAGE: u64 = PAGE_SIZE as u64;

/// Errors of an epoch checkpoint; none of them stops the VM, and the pages of a failed epoch
/// stay in the replication consumer's set.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Pausing, saving or resuming the VM failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Taking the dirty pages (or turning dirty logging on) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A userfaultfd call failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The fault-handler thread could not be started.
    #[error("cannot start the epoch fault handler: {0}")]
    SpawnHandler(std::io::Error),
    /// The copier thread could not be started.
    #[error("cannot start the epoch copier: {0}")]
    SpawnCopier(std::io::Error),
    /// The copier thread ended without a capture.
    #[error("the epoch copier ended without a capture")]
    CopierGone,
    /// Copy-before-write was asked of a tracker made without write-protection.
    #[error("this epoch tracker has no userfaultfd (made without write-protection)")]
    NoWriteProtect,
    /// The state could not be encoded.
    #[error("cannot encode the state: {0}")]
    Encode(String),
    /// The previous epoch's copier did not finish in time.
    #[error("the previous epoch's copy has not finished after {0:?}")]
    PreviousEpochStuck(Duration),
}

/// How the dirty pages are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EpochMode {
    /// Write-protect in the pause, copy after the resume (copy-before-write).
    CopyBeforeWrite,
    /// Copy inside the pause.
    Naive,
}

/// Default of [`EpochOptions::max_protect_calls`].
pub const DEFAULT_MAX_PROTECT_CALLS: usize = 16;
/// Default of [`EpochOptions::max_gap_pages`].
pub const DEFAULT_MAX_GAP_PAGES: u64 = 16;
/// Default of [`EpochOptions::inline_copy_max_pages`].
pub const DEFAULT_INLINE_COPY_MAX_PAGES: usize = 1024;

/// What one checkpoint does.
#[derive(Debug, Clone)]
pub struct EpochOptions {
    /// Copy-before-write or naive.
    pub mode: EpochMode,
    /// Capture every page of guest RAM, not only the dirty ones (a first, full epoch).
    pub full: bool,
    /// Up to this many runs of dirty pages (runs closer than [`EpochOptions::max_gap_pages`]
    /// joined) are write-protected one `UFFDIO_WRITEPROTECT` each; with more, one call covers
    /// each region from its first to its last dirty page.
    pub max_protect_calls: usize,
    /// Runs of dirty pages at most this many clean pages apart are protected as one.
    pub max_gap_pages: u64,
    /// Copy-before-write copies an epoch of at most this many pages inside the pause anyway:
    /// below some size copying costs the pause less than write-protecting (measured by
    /// `cargo xtask bench epoch`). 0: always protect.
    pub inline_copy_max_pages: usize,
    /// Copy-before-write write-protects the pages dirty so far *before* the pause, while the
    /// guest runs (faults meanwhile are only noted), and inside the pause copies just the pages
    /// written since: the protection's cost leaves the pause.
    pub protect_before_pause: bool,
    /// Test and measurement: copy all guest memory inside the pause
    /// ([`EpochCapture::reference_image`]); that time is left out of the pause figures.
    pub reference_image: bool,
    /// Test and measurement: the copier waits this long after the resume before it starts, so
    /// the guest's writes reach protected pages first (the fault handler copies them).
    pub copier_delay: Duration,
    /// Also take this consumer's dirty pages inside the pause (the pages written since a
    /// standby joining the VM began copying its memory,
    /// [`EpochTracker::register_consumer`]): the capture holds them too, and
    /// [`EpochCapture::delta_pfns`] the epoch's own.
    pub join: Option<DirtyConsumer>,
}

impl Default for EpochOptions {
    fn default() -> Self {
        Self {
            mode: EpochMode::CopyBeforeWrite,
            full: false,
            max_protect_calls: DEFAULT_MAX_PROTECT_CALLS,
            max_gap_pages: DEFAULT_MAX_GAP_PAGES,
            inline_copy_max_pages: DEFAULT_INLINE_COPY_MAX_PAGES,
            protect_before_pause: true,
            reference_image: false,
            copier_delay: Duration::ZERO,
            join: None,
        }
    }
}

/// Where the time of a pause went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct PauseBreakdown {
    /// Stopping the vCPUs (kick, park).
    pub stop: Duration,
    /// Harvesting the dirty log and taking the replication set.
    pub harvest: Duration,
    /// Saving devices, the VM and the vCPUs (and adding the ring pages).
    pub state: Duration,
    /// Write-protecting the dirty pages (copy-before-write).
    pub protect: Duration,
    /// Copying the dirty pages (naive).
    pub copy: Duration,
    /// Resuming the vCPUs.
    pub resume: Duration,
    /// The whole pause, from asking the vCPUs to stop to their running again (without the
    /// test path's reference hash).
    pub total: Duration,
}

/// What the copy after the pause did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct CopyStats {
    /// Pages copied by the copier.
    pub by_copier: u64,
    /// Pages copied by the fault handler (the guest wrote them before the copier came).
    pub by_fault: u64,
    /// `UFFDIO_WRITEPROTECT` calls to protect.
    pub protect_calls: u64,
    /// Write-protecting before the pause (the guest running).
    pub protect_before_pause: Duration,
    /// Pages copied inside the pause.
    pub in_pause: u64,
    /// From the resume until every page was copied and unprotected.
    pub after_resume: Duration,
}

/// One epoch: every page written since the previous epoch, as it was at the pause, and the
/// machine's state of that instant.
pub struct EpochCapture {
    /// Epoch number (from 1, per tracker).
    pub epoch: u64,
    /// Page numbers (as [`crate::vstate::memory::PageMap`] numbers them), ascending.
    pub pfns: Vec<u64>,
    /// Of a full epoch ([`EpochOptions::full`]) or one taken for a joining standby
    /// ([`EpochOptions::join`]): the pages a delta epoch would have held (dirty since the last
    /// epoch, and the virtqueues), ascending: what a consumer that holds the previous epoch
    /// needs of this one.
    pub delta_pfns: Option<Vec<u64>>,
    /// Their contents, [`PAGE_SIZE`] bytes each, in the order of `pfns`.
    pub data: Vec<u8>,
    /// The machine's state, encoded as the migration stream sends it (postcard).
    pub state: Vec<u8>,
    /// The pause.
    pub pause: PauseBreakdown,
    /// The copy.
    pub copy: CopyStats,
    /// The disk writes of the epoch, per disk in order, from the pause's device step
    /// ([`EpochTracker::attach_pause_step`]; empty without).
    pub disk_writes: Vec<EpochWrites>,
    /// Test path: all guest memory at the pause, regions in order (pages numbered as
    /// `pfns` are).
    pub reference_image: Option<Vec<u8>>,
}

impl EpochCapture {
    /// (page number, contents) of every captured page.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.pfns
            .iter()
            .copied()
            .zip(self.data.chunks_exact(PAGE_SIZE))
    }

    /// Bytes of page contents.
    pub fn raw_bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

/// A guest RAM region as the epoch code uses it.
#[derive(Debug, Clone, Copy)]
struct RegionInfo {
    /// Host address of its first byte.
    host: u64,
    /// Guest address of its first byte.
    guest: u64,
    /// Pages.
    pages: u64,
    /// Number of its first page across regions.
    first_pfn: u64,
}

fn regions_of(mem: &GuestMemoryMmap) -> Vec<RegionInfo> {
    let mut first_pfn = 0;
    mem.iter()
        .map(|r| {
            let info = RegionInfo {
                host: r.as_ptr() as u64,
                guest: r.start_addr().raw_value(),
                pages: r.len() / PAGE,
                first_pfn,
            };
            first_pfn += info.pages;
            info
        })
        .collect()
}

/// The hash (xxHash64) of all guest memory, regions in order: what a reconstructed image
/// (pages numbered as [`crate::vstate::memory::PageMap`] does) must hash to with [`image_hash`].
/// The vCPUs must be paused for a hash of one instant.
pub fn memory_hash(mem: &GuestMemoryMmap) -> u64 {
    let mut hasher = twox_hash::XxHash64::with_seed(0);
    for region in mem.iter() {
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`; the vCPUs are
        // paused by the caller, so nothing writes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        hasher.write(bytes);
    }
    hasher.finish()
}

/// A copy of all guest memory, regions in order. The vCPUs must be paused for a copy of one
/// instant.
pub fn memory_image(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut image = Vec::with_capacity(crate::vstate::memory::total_size(mem) as usize);
    for region in mem.iter() {
        // SAFETY: as in `memory_hash`.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        image.extend_from_slice(bytes);
    }
    image
}

/// The hash of a memory image laid out as [`memory_hash`] reads guest memory.
pub fn image_hash(image: &[u8]) -> u64 {
    let mut hasher = twox_hash::XxHash64::with_seed(0);
    hasher.write(image);
    hasher.finish()
}

/// Page states within an epoch.
const PENDING: u8 = 0;
const COPYING: u8 = 1;
const DONE: u8 = 2;

/// The pages of an epoch being copied: shared by the copier and the fault handler.
struct ActiveEpoch {
    pfns: Vec<u64>,
    states: Vec<AtomicU8>,
    buffer: PageBuffer,
    by_fault: AtomicU64,
}

/// The epoch buffer, written by the copier and the fault handler, each page by whoever claimed
/// it (`ActiveEpoch::states`).
struct PageBuffer(std::cell::UnsafeCell<Vec<u8>>);

// SAFETY: slot `i` of the buffer is written only by the thread that moved `states[i]` from
// PENDING to COPYING (one compare-exchange: one winner), and read only once every state is
// DONE (the copier, after it waited for all): no two threads touch the same bytes at once.
unsafe impl Sync for PageBuffer {}

impl ActiveEpoch {
    /// Copies page `slot` (host address `src`) unless another thread claimed it; waits until
    /// it is copied. Returns whether this thread copied it.
    fn copy(&self, slot: usize, src: u64) -> bool {
        let state = &self.states[slot];
        match state.compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // SAFETY: `src` is a page of guest RAM (a live mapping the tracker's `Arc<Vm>`
                // keeps), write-protected until this copy is done; the destination is slot
                // `slot` of the buffer, which this thread alone claimed (see `PageBuffer`).
                unsafe {
                    let dst = (*self.buffer.0.get()).as_mut_ptr().add(slot * PAGE_SIZE);
                    std::ptr::copy_nonoverlapping(src as *const u8, dst, PAGE_SIZE);
                }
                state.store(DONE, Ordering::Release);
                true
            }
            Err(_) => {
                while state.load(Ordering::Acquire) != DONE {
                    std::hint::spin_loop();
                }
                false
            }
        }
    }

    fn slot_of(&self, pfn: u64) -> Option<usize> {
        self.pfns.binary_search(&pfn).ok()
    }
}

/// What the tracker, its fault handler and copiers share.
struct Shared {
    regions: Vec<RegionInfo>,
    protector: Option<WriteProtector>,
    /// The epoch whose pages are being copied, if any.
    active: Mutex<Option<Arc<ActiveEpoch>>>,
    /// Signalled when `active` is cleared.
    idle: Condvar,
    /// While pages are protected before a pause: the pages written since (their faults).
    /// Locked inside `active`'s lock.
    armed: Mutex<Option<Vec<u64>>>,
    stop: EventFd,
    /// Buffers of captures given back ([`EpochTracker::recycle`]), already faulted in.
    pool: Mutex<Vec<Vec<u8>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn host_of(&self, pfn: u64) -> u64 {
        let r = self
            .regions
            .iter()
            .rev()
            .find(|r| r.first_pfn <= pfn)
            .expect("page numbers start at 0");
        r.host + (pfn - r.first_pfn) * PAGE
    }

    fn pfn_of_host(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| addr >= r.host && addr < r.host + r.pages * PAGE)
            .map(|r| r.first_pfn + (addr - r.host) / PAGE)
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut pool = lock(&self.pool);
        match pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut buf = pool.swap_remove(i);
                // SAFETY: u8 has no invalid values and the capacity is at least `len`; every
                // byte is overwritten by a page copy before the capture is handed out.
                unsafe { buf.set_len(len) };
                buf
            }
            None => vec![0; len],
        }
    }

    /// Serves one write-protect fault at host address `addr`.
    fn serve_fault(&self, addr: u64) -> Result<(), UffdError> {
        let protector = self
            .protector
            .as_ref()
            .expect("faults come from the protector");
        let page_addr = addr & !(PAGE - 1);
        // Held while deciding and unprotecting: a new epoch cannot protect this page again
        // between the two.
        let active = lock(&self.active);
        if let Some(pfn) = self.pfn_of_host(addr) {
            if let Some(epoch) = active.as_ref() {
                if let Some(slot) = epoch.slot_of(pfn) {
                    if epoch.copy(slot, page_addr) {
                        epoch.by_fault.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else if let Some(written) = lock(&self.armed).as_mut() {
                // Protected before the pause: the write goes on, the pause copies the page.
                written.push(pfn);
            }
        }
        protector.unprotect(page_addr, PAGE)
    }
}

/// The fault handler: serves write-protect faults until the tracker goes.
fn handle_faults(shared: Arc<Shared>) {
    let protector = shared.protector.as_ref().expect("spawned with a protector");
    let mut fds = [
        libc::pollfd {
            fd: protector.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two valid pollfd structs for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!("epoch fault handler: poll failed");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match protector.read_fault() {
                Ok(Some(fault)) => {
                    if let Err(e) = shared.serve_fault(fault.address) {
                        tracing::error!("epoch fault handler: {e}");
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("epoch fault handler: {e}");
                    return;
                }
            }
        }
    }
}

/// The replication side of a VM's dirty tracking: its own dirty set, the userfaultfd over
/// guest RAM and the thread serving its faults. One per protected VM.
pub struct EpochTracker {
    vm: Arc<Vm>,
    consumer: DirtyConsumer,
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
    next_epoch: AtomicU64,
    /// How long registering guest RAM with the userfaultfd took.
    register_cost: Duration,
    /// What every pause does to the devices once their state is saved.
    step: Mutex<Option<Box<dyn PauseStep>>>,
}

/// What a pause does to the devices once their state is saved: the next epoch starts on
/// them (output and disk writes from then on belong to it), and the disk writes of the epoch
/// that ends, per disk in order, go with its capture.
pub trait PauseStep: Send {
    /// At the end of the tracker's epoch `epoch`, inside the pause.
    fn step(&self, epoch: u64) -> Vec<EpochWrites>;
}

/// The devices number epochs as the tracker does: the capture of epoch N starts their epoch
/// N + 1.
impl PauseStep for DeviceSwitch {
    fn step(&self, epoch: u64) -> Vec<EpochWrites> {
        self.begin_epoch(epoch + 1)
    }
}

impl EpochTracker {
    /// Starts tracking `vm`'s dirty pages for epochs (dirty logging on, a consumer of its
    /// own), and with `write_protect` registers guest RAM with a userfaultfd (write-protect
    /// mode) and starts the fault-handler thread. Safe while the guest runs.
    pub fn new(vm: &Arc<Vm>, write_protect: bool) -> Result<Self, EpochError> {
        vm.set_dirty_logging(true)?;
        let regions = regions_of(vm.memory());
        let t0 = Instant::now();
        let protector = if write_protect {
            let protector = WriteProtector::new()?;
            for r in &regions {
                protector.register(r.host, r.pages * PAGE)?;
            }
            Some(protector)
        } else {
            None
        };
        let register_cost = t0.elapsed();
        let shared = Arc::new(Shared {
            regions,
            protector,
            active: Mutex::new(None),
            idle: Condvar::new(),
            armed: Mutex::new(None),
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(EpochError::SpawnHandler)?,
            pool: Mutex::new(Vec::new()),
        });
        let handler = if write_protect {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("epoch-faults".into())
                    .spawn(move || handle_faults(s))
                    .map_err(EpochError::SpawnHandler)?,
            )
        } else {
            None
        };
        let consumer = vm.register_dirty_consumer();
        tracing::info!(
            write_protect,
            register_us = register_cost.as_micros() as u64,
            "epoch tracking started"
        );
        Ok(Self {
            vm: vm.clone(),
            consumer,
            shared,
            handler,
            next_epoch: AtomicU64::new(1),
            register_cost,
            step: Mutex::new(None),
        })
    }

    /// Has every pause take the devices' step too, once the state is saved: for instance the
    /// [`DeviceSwitch`] of the ports [`crate::microvm::MicroVm::set_replication`] returns.
    pub fn attach_pause_step(&self, step: Box<dyn PauseStep>) {
        *lock(&self.step) = Some(step);
    }

    /// The pause's device step for the end of epoch `epoch`.
    fn device_step(&self, epoch: u64) -> Vec<EpochWrites> {
        lock(&self.step)
            .as_ref()
            .map(|step| step.step(epoch))
            .unwrap_or_default()
    }

    /// The dirty-page consumer of the epochs.
    pub fn consumer(&self) -> DirtyConsumer {
        self.consumer
    }

    /// How long registering guest RAM with the userfaultfd took.
    pub fn register_cost(&self) -> Duration {
        self.register_cost
    }

    /// Whether copy-before-write epochs are possible.
    pub fn write_protects(&self) -> bool {
        self.shared.protector.is_some()
    }

    /// Registers another consumer of the VM's dirty pages (a standby joining the VM copies
    /// its memory while the guest runs; the pages written meanwhile are this consumer's).
    pub fn register_consumer(&self) -> DirtyConsumer {
        self.vm.register_dirty_consumer()
    }

    /// Ends a consumer of [`EpochTracker::register_consumer`].
    pub fn unregister_consumer(&self, consumer: DirtyConsumer) {
        self.vm.unregister_dirty_consumer(consumer);
    }

    /// The pages written since `consumer` last took them, ascending (the guest running).
    pub fn take_dirty_pfns(&self, consumer: DirtyConsumer) -> Result<Vec<u64>, EpochError> {
        let dirty = self.vm.take_dirty_pages(consumer)?;
        Ok(self.dirty_pfns(&dirty))
    }

    /// Gives `pfns` back to `consumer`: its next [`EpochTracker::take_dirty_pfns`] (or an
    /// epoch joining with it) reports them again.
    pub fn give_back_to(&self, consumer: DirtyConsumer, pfns: &[u64]) {
        self.vm.return_dirty_pages(consumer, &self.bitmap_of(pfns));
    }

    /// Copies page `pfn` of guest RAM into `out` (one page) as it is now, the guest running:
    /// a copy taken live, whose pages written meanwhile are dirty for every consumer.
    pub fn read_page(&self, pfn: u64, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE, "one page");
        let src = self.shared.host_of(pfn) as *const u64;
        for (i, word) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: `src` is the page `pfn` of guest RAM, mapped for as long as the
            // tracker's `Arc<Vm>` lives; `i < PAGE_SIZE / 8` keeps the read inside it. The
            // guest may write the word meanwhile: a volatile read takes whichever value.
            let v = unsafe { std::ptr::read_volatile(src.add(i)) };
            word.copy_from_slice(&v.to_ne_bytes());
        }
    }

    /// Gives a capture's buffer back for later epochs (its pages are already faulted in).
    pub fn recycle(&self, capture: EpochCapture) {
        let mut pool = lock(&self.shared.pool);
        if pool.len() < 4 {
            pool.push(capture.data);
        }
    }

    /// Puts a capture's pages back into the epochs' dirty set: what it was taken for (a send)
    /// failed, and the next epoch must carry them again.
    pub fn give_back(&self, capture: &EpochCapture) {
        self.vm
            .return_dirty_pages(self.consumer, &self.bitmap_of(&capture.pfns));
    }

    fn bitmap_of(&self, pfns: &[u64]) -> DirtyBitmap {
        let regions = &self.shared.regions;
        let mut words: Vec<Vec<u64>> = regions
            .iter()
            .map(|r| vec![0; r.pages.div_ceil(64) as usize])
            .collect();
        for &pfn in pfns {
            if let Some((slot, r)) = regions
                .iter()
                .enumerate()
                .rev()
                .find(|(_, r)| r.first_pfn <= pfn)
            {
                let p = pfn - r.first_pfn;
                words[slot][(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        DirtyBitmap(words)
    }

    /// Waits until the previous epoch's copy has finished (its protected pages are all
    /// unprotected), for at most `timeout`.
    fn wait_idle(&self, timeout: Duration) -> Result<(), EpochError> {
        let deadline = Instant::now() + timeout;
        let mut active = lock(&self.shared.active);
        while active.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EpochError::PreviousEpochStuck(timeout));
            }
            active = self
                .shared
                .idle
                .wait_timeout(active, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// The page numbers of `dirty` with the virtqueue ring pages of `devices` added, ascending.
    fn pfns(&self, dirty: &DirtyBitmap, devices: &DevicesState) -> Vec<u64> {
        let regions = &self.shared.regions;
        let mut pfns = self.dirty_pfns(dirty);
        let before = pfns.len();
        for (addr, len) in ring_ranges(devices) {
            for gpa in (addr & !(PAGE - 1)..addr + len).step_by(PAGE_SIZE) {
                if let Some(r) = regions
                    .iter()
                    .find(|r| gpa >= r.guest && gpa < r.guest + r.pages * PAGE)
                {
                    pfns.push(r.first_pfn + (gpa - r.guest) / PAGE);
                }
            }
        }
        if pfns.len() > before {
            pfns.sort_unstable();
            pfns.dedup();
        }
        pfns
    }

    /// The page numbers of `dirty`, ascending.
    fn dirty_pfns(&self, dirty: &DirtyBitmap) -> Vec<u64> {
        let regions = &self.shared.regions;
        let mut pfns = Vec::with_capacity(dirty.count() + 8);
        for (slot, words) in dirty.0.iter().enumerate() {
            let Some(r) = regions.get(slot) else { continue };
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if p < r.pages {
                        pfns.push(r.first_pfn + p);
                    }
                }
            }
        }
        pfns
    }

    /// Write-protects the pages dirty so far while the guest runs (see
    /// [`EpochOptions::protect_before_pause`]); none are protected (empty `ranges`) when there
    /// are few enough to copy in the pause.
    fn arm(&self, options: &EpochOptions) -> Result<Armed, EpochError> {
        let t0 = Instant::now();
        let dirty = self.vm.take_dirty_pages(self.consumer)?;
        let pfns = self.dirty_pfns(&dirty);
        if pfns.len() <= options.inline_copy_max_pages {
            return Ok(Armed {
                dirty,
                pfns,
                ranges: Vec::new(),
                time: t0.elapsed(),
            });
        }
        let ranges = self.protect_ranges(&pfns, options.max_protect_calls, options.max_gap_pages);
        let protector = self
            .shared
            .protector
            .as_ref()
            .expect("checked by the caller");
        *lock(&self.shared.armed) = Some(Vec::new());
        for (i, &(start, len)) in ranges.iter().enumerate() {
            if let Err(e) = protector.protect(start, len) {
                for &(start, len) in &ranges[..i] {
                    let _ = protector.unprotect(start, len);
                }
                *lock(&self.shared.armed) = None;
                self.vm.return_dirty_pages(self.consumer, &dirty);
                return Err(e.into());
            }
        }
        Ok(Armed {
            dirty,
            pfns,
            ranges,
            time: t0.elapsed(),
        })
    }

    /// Undoes [`EpochTracker::arm`] (the pause failed).
    fn disarm(&self, armed: Armed) {
        if let Some(protector) = &self.shared.protector {
            for &(start, len) in &armed.ranges {
                let _ = protector.unprotect(start, len);
            }
        }
        *lock(&self.shared.armed) = None;
        self.vm.return_dirty_pages(self.consumer, &armed.dirty);
    }

    /// The host ranges to write-protect for `pfns` (ascending): runs of pages joined across
    /// gaps of at most `max_gap`; with more than `max_calls` runs, one range per region from
    /// its first to its last page.
    fn protect_ranges(&self, pfns: &[u64], max_calls: usize, max_gap: u64) -> Vec<(u64, u64)> {
        plan_ranges(&self.shared.regions, pfns, max_calls, max_gap)
            .into_iter()
            .map(|(first, end)| (self.shared.host_of(first), (end - first) * PAGE))
            .collect()
    }

    /// Every page number of guest RAM, as the tracker numbers them.
    pub fn all_pfns(&self) -> Vec<u64> {
        let total: u64 = self.shared.regions.iter().map(|r| r.pages).sum();
        (0..total).collect()
    }
}

/// The runs of pages `[first, end)` to write-protect for `pfns` (ascending): runs of pages
/// joined across gaps of at most `max_gap`, never across regions; with more than `max_calls`
/// runs, one per region from its first to its last page.
fn plan_ranges(
    regions: &[RegionInfo],
    pfns: &[u64],
    max_calls: usize,
    max_gap: u64,
) -> Vec<(u64, u64)> {
    let region = |pfn| regions.iter().rposition(|r| r.first_pfn <= pfn);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        match runs.last_mut() {
            Some((first, end)) if pfn <= *end + max_gap && region(*first) == region(pfn) => {
                *end = pfn + 1
            }
            _ => runs.push((pfn, pfn + 1)),
        }
    }
    if runs.len() > max_calls {
        let mut hulls: Vec<(u64, u64)> = Vec::new();
        for (first, end) in runs {
            match hulls.last_mut() {
                Some((f, e)) if region(*f) == region(first) => *e = end,
                _ => hulls.push((first, end)),
            }
        }
        runs = hulls;
    }
    runs
}

impl Drop for EpochTracker {
    fn drop(&mut self) {
        let _ = self.wait_idle(Duration::from_secs(10));
        let _ = self.shared.stop.write(1);
        if let Some(handler) = self.handler.take() {
            let _ = handler.join();
        }
        self.vm.unregister_dirty_consumer(self.consumer);
    }
}

/// The guest ranges of the virtqueue rings of every activated virtio device: the device writes
/// its used ring through guest memory on its own thread, so these pages go with every epoch.
pub fn ring_ranges(devices: &DevicesState) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for dev in &devices.virtio {
        for q in dev.active_queues.iter().flatten() {
            let c = &q.config;
            if !c.ready {
                continue;
            }
            let size = u64::from(c.size);
            ranges.push((c.desc_table, 16 * size));
            ranges.push((c.avail_ring, 6 + 2 * size));
            ranges.push((c.used_ring, 6 + 8 * size));
        }
    }
    ranges
}

/// An epoch whose pause is over; [`PendingEpoch::wait`] gives its capture.
pub struct PendingEpoch {
    /// The epoch's number.
    pub epoch: u64,
    /// The pause.
    pub pause: PauseBreakdown,
    /// Pages in the epoch.
    pub pages: usize,
    result: Receiver<Result<EpochCapture, EpochError>>,
}

impl PendingEpoch {
    /// Waits for the copy to finish; the capture of the instant of the pause.
    pub fn wait(self) -> Result<EpochCapture, EpochError> {
        self.result.recv().map_err(|_| EpochError::CopierGone)?
    }
}

/// The copy after the resume: every page of `epoch` not yet copied, range by range, each range
/// unprotected once all its pages are copied.
fn run_copier(
    shared: &Shared,
    epoch: &Arc<ActiveEpoch>,
    ranges: &[(u64, u64)],
    delay: Duration,
) -> Result<u64, UffdError> {
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let protector = shared
        .protector
        .as_ref()
        .expect("copy-before-write has one");
    let mut copied = 0;
    let mut slot = 0;
    let mut result = Ok(());
    for &(start, len) in ranges {
        while slot < epoch.pfns.len() {
            let src = shared.host_of(epoch.pfns[slot]);
            if src >= start + len {
                break;
            }
            if epoch.copy(slot, src) {
                copied += 1;
            }
            slot += 1;
        }
        if let Err(e) = protector.unprotect(start, len) {
            result = Err(e);
        }
    }
    // Pages outside every range (none if the ranges are right) are copied too.
    while slot < epoch.pfns.len() {
        if epoch.copy(slot, shared.host_of(epoch.pfns[slot])) {
            copied += 1;
        }
        slot += 1;
    }
    result.map(|()| copied)
}

impl MicroVm {
    /// Takes an epoch checkpoint: pauses the vCPUs, takes `tracker`'s dirty pages (plus the
    /// virtqueue ring pages), saves the devices, VM and vCPUs, write-protects the dirty pages
    /// (or, naive, copies them), resumes. The copy goes on after this returns; the capture
    /// comes from [`PendingEpoch::wait`]. Waits first for the previous epoch's copy to end.
    ///
    /// On failure the VM is resumed (if it was running) and the pages stay in the set.
    pub fn checkpoint_epoch(
        &mut self,
        tracker: &EpochTracker,
        options: &EpochOptions,
    ) -> Result<PendingEpoch, EpochError> {
        if options.mode == EpochMode::CopyBeforeWrite && !tracker.write_protects() {
            return Err(EpochError::NoWriteProtect);
        }
        // Pages never touched cannot be protected without `UFFD_FEATURE_WP_UNPOPULATED`: a
        // full epoch then copies inside the pause.
        let unprotectable = options.full
            && !tracker
                .shared
                .protector
                .as_ref()
                .is_some_and(WriteProtector::protects_unpopulated);
        let options = &EpochOptions {
            mode: if unprotectable {
                EpochMode::Naive
            } else {
                options.mode
            },
            ..options.clone()
        };
        tracker.wait_idle(Duration::from_secs(10))?;
        let epoch_no = tracker.next_epoch.fetch_add(1, Ordering::Relaxed);
        let was_running = self.phase() == crate::microvm::VmPhase::Running;

        let armed = if options.mode == EpochMode::CopyBeforeWrite
            && !options.full
            && options.join.is_none()
            && options.protect_before_pause
        {
            Some(tracker.arm(options)?)
        } else {
            None
        };

        let t0 = Instant::now();
        if was_running {
            if let Err(e) = self.pause() {
                if let Some(armed) = armed {
                    tracker.disarm(armed);
                }
                return Err(e.into());
            }
        }
        let t_stop = Instant::now();
        let result = self.collect_epoch(tracker, options, epoch_no, armed);
        let t_collected = Instant::now();
        if was_running {
            if let Err(e) = self.resume() {
                if let Ok(c) = &result {
                    tracker.abandon(c);
                }
                return Err(e.into());
            }
        }
        let t_resumed = Instant::now();
        let mut collected = result?;
        let p = &mut collected.pause;
        p.stop = t_stop - t0;
        p.resume = t_resumed - t_collected;
        p.total = (t_resumed - t0).saturating_sub(collected.hash_time);
        let pause = collected.pause;
        let pages = collected.pfns.len();
        let threaded = collected.active.is_some();
        tracing::debug!(
            epoch = epoch_no,
            pages,
            pause_us = pause.total.as_micros() as u64,
            "epoch paused"
        );

        let (tx, rx) = channel();
        let shared = tracker.shared.clone();
        let delay = options.copier_delay;
        let consumer = tracker.consumer;
        let vm = tracker.vm.clone();
        let give_back = tracker.bitmap_of(&collected.pfns);
        let resumed = t_resumed;
        let finish = move |collected: Collected| {
            let Collected {
                pfns,
                delta_pfns,
                state,
                pause,
                active,
                ranges,
                data,
                reference_image,
                protect_calls,
                protect_before_pause,
                in_pause,
                disk_writes,
                ..
            } = collected;
            let mut copy = CopyStats {
                protect_calls,
                protect_before_pause,
                in_pause,
                ..Default::default()
            };
            let data = match active {
                Some(active) => {
                    let copied = run_copier(&shared, &active, &ranges, delay);
                    copy.after_resume = resumed.elapsed();
                    // Uninstall: no fault is served against this epoch from now on.
                    *lock(&shared.active) = None;
                    shared.idle.notify_all();
                    match copied {
                        Ok(n) => copy.by_copier = n,
                        Err(e) => {
                            vm.return_dirty_pages(consumer, &give_back);
                            return Err(e.into());
                        }
                    }
                    copy.by_fault = active.by_fault.load(Ordering::Relaxed);
                    match Arc::try_unwrap(active) {
                        Ok(active) => active.buffer.0.into_inner(),
                        Err(_) => unreachable!("the epoch is shared only while installed"),
                    }
                }
                None => data,
            };
            let state = crate::migration::wire::encode_payload(&state).map_err(|e| {
                vm.return_dirty_pages(consumer, &give_back);
                EpochError::Encode(e.to_string())
            })?;
            Ok(EpochCapture {
                epoch: epoch_no,
                pfns,
                delta_pfns,
                data,
                state,
                pause,
                copy,
                disk_writes,
                reference_image,
            })
        };
        if threaded {
            let spawned = std::thread::Builder::new()
                .name("epoch-copier".into())
                .spawn(move || {
                    let _ = tx.send(finish(collected));
                });
            if let Err(e) = spawned {
                // The closure (and the epoch) is gone with the failed spawn: unprotect all.
                tracker.unprotect_all();
                *lock(&tracker.shared.active) = None;
                tracker.shared.idle.notify_all();
                return Err(EpochError::SpawnCopier(e));
            }
        } else {
            let _ = tx.send(finish(collected));
        }
        Ok(PendingEpoch {
            epoch: epoch_no,
            pause,
            pages,
            result: rx,
        })
    }

    /// The part of an epoch inside the pause after the vCPUs stopped.
    fn collect_epoch(
        &mut self,
        tracker: &EpochTracker,
        options: &EpochOptions,
        epoch: u64,
        armed: Option<Armed>,
    ) -> Result<Collected, EpochError> {
        let t0 = Instant::now();
        let dirty = match self.vm().take_dirty_pages(tracker.consumer) {
            Ok(dirty) => dirty,
            Err(e) => {
                if let Some(armed) = armed {
                    tracker.disarm(armed);
                }
                return Err(e.into());
            }
        };
        let t_harvest = Instant::now();
        let state = match self.save_state() {
            Ok(state) => state,
            Err(e) => {
                self.vm().return_dirty_pages(tracker.consumer, &dirty);
                if let Some(armed) = armed {
                    tracker.disarm(armed);
                }
                return Err(e.into());
            }
        };
        if let Some(armed) = armed {
            let mut collected =
                self.collect_armed(tracker, options, armed, &dirty, state, t0, t_harvest);
            collected.disk_writes = tracker.device_step(epoch);
            return Ok(collected);
        }
        let delta = tracker.pfns(&dirty, &state.devices);
        let (pfns, delta_pfns) = match (options.full, options.join) {
            (true, _) => (tracker.all_pfns(), Some(delta)),
            (false, Some(joining)) => match self.vm().take_dirty_pages(joining) {
                Ok(written) => {
                    let mut union = tracker.dirty_pfns(&written);
                    union.extend_from_slice(&delta);
                    union.sort_unstable();
                    union.dedup();
                    (union, Some(delta))
                }
                Err(e) => {
                    self.vm().return_dirty_pages(tracker.consumer, &dirty);
                    return Err(e.into());
                }
            },
            (false, None) => (delta, None),
        };
        let t_state = Instant::now();
        let mut collected = Collected {
            pfns,
            delta_pfns,
            state,
            pause: PauseBreakdown {
                harvest: t_harvest - t0,
                state: t_state - t_harvest,
                ..Default::default()
            },
            active: None,
            ranges: Vec::new(),
            data: Vec::new(),
            reference_image: None,
            hash_time: Duration::ZERO,
            protect_calls: 0,
            protect_before_pause: Duration::ZERO,
            in_pause: 0,
            disk_writes: Vec::new(),
        };
        let shared = &tracker.shared;
        let buffer = shared.take_buffer(collected.pfns.len() * PAGE_SIZE);
        let inline = options.mode == EpochMode::Naive
            || (!options.full && collected.pfns.len() <= options.inline_copy_max_pages);
        match if inline {
            EpochMode::Naive
        } else {
            EpochMode::CopyBeforeWrite
        } {
            EpochMode::Naive => {
                let mut buffer = buffer;
                for (slot, &pfn) in collected.pfns.iter().enumerate() {
                    let src = shared.host_of(pfn);
                    // SAFETY: `src` is a page of guest RAM (kept mapped by the tracker's
                    // `Arc<Vm>`), the vCPUs are paused; the destination is slot `slot` of a
                    // buffer of `pfns.len()` pages.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src as *const u8,
                            buffer.as_mut_ptr().add(slot * PAGE_SIZE),
                            PAGE_SIZE,
                        );
                    }
                }
                collected.data = buffer;
                collected.in_pause = collected.pfns.len() as u64;
                collected.pause.copy = t_state.elapsed();
            }
            EpochMode::CopyBeforeWrite => {
                let ranges = if options.full {
                    shared
                        .regions
                        .iter()
                        .map(|r| (r.host, r.pages * PAGE))
                        .collect()
                } else {
                    tracker.protect_ranges(
                        &collected.pfns,
                        options.max_protect_calls,
                        options.max_gap_pages,
                    )
                };
                let states = (0..collected.pfns.len())
                    .map(|_| AtomicU8::new(PENDING))
                    .collect();
                let active = Arc::new(ActiveEpoch {
                    pfns: collected.pfns.clone(),
                    states,
                    buffer: PageBuffer(std::cell::UnsafeCell::new(buffer)),
                    by_fault: AtomicU64::new(0),
                });
                let protector = shared.protector.as_ref().expect("checked by the caller");
                let mut slot = lock(&shared.active);
                for (i, &(start, len)) in ranges.iter().enumerate() {
                    if let Err(e) = protector.protect(start, len) {
                        for &(start, len) in &ranges[..i] {
                            let _ = protector.unprotect(start, len);
                        }
                        drop(slot);
                        self.vm().return_dirty_pages(tracker.consumer, &dirty);
                        return Err(e.into());
                    }
                }
                *slot = Some(active.clone());
                drop(slot);
                collected.protect_calls = ranges.len() as u64;
                collected.ranges = ranges;
                collected.active = Some(active);
                collected.pause.protect = t_state.elapsed();
            }
        }
        collected.disk_writes = tracker.device_step(epoch);
        self.reference(options, &mut collected);
        tracing::trace!(epoch, pages = collected.pfns.len(), "epoch collected");
        Ok(collected)
    }

    fn reference(&self, options: &EpochOptions, collected: &mut Collected) {
        if options.reference_image {
            let t = Instant::now();
            collected.reference_image = Some(memory_image(self.vm().memory()));
            collected.hash_time = t.elapsed();
        }
    }

    /// The pause's part of an epoch whose pages were protected before it: the epoch holds the
    /// pages dirty before the protection and since; those written since (and the ring pages)
    /// are copied here, the others are still protected and copied after the resume.
    #[allow(clippy::too_many_arguments)]
    fn collect_armed(
        &self,
        tracker: &EpochTracker,
        options: &EpochOptions,
        armed: Armed,
        dirty: &DirtyBitmap,
        state: crate::snapshot::MicroVmState,
        t0: Instant,
        t_harvest: Instant,
    ) -> Collected {
        let shared = &tracker.shared;
        let since = tracker.pfns(dirty, &state.devices);
        let mut pfns = armed.pfns.clone();
        pfns.extend_from_slice(&since);
        pfns.sort_unstable();
        pfns.dedup();
        let t_state = Instant::now();
        let buffer = shared.take_buffer(pfns.len() * PAGE_SIZE);
        let states: Vec<AtomicU8> = (0..pfns.len()).map(|_| AtomicU8::new(PENDING)).collect();
        let epoch = Arc::new(ActiveEpoch {
            pfns,
            states,
            buffer: PageBuffer(std::cell::UnsafeCell::new(buffer)),
            by_fault: AtomicU64::new(0),
        });
        let mut in_pause = 0;
        {
            // Under the lock: a fault is served either as written since the protection (noted)
            // or against this epoch (copied first), never in between.
            let mut active = lock(&shared.active);
            let mut copy_now = lock(&shared.armed).take().unwrap_or_default();
            copy_now.extend_from_slice(&since);
            if armed.ranges.is_empty() {
                copy_now = epoch.pfns.clone();
            }
            for pfn in copy_now {
                if let Some(slot) = epoch.slot_of(pfn) {
                    if epoch.copy(slot, shared.host_of(pfn)) {
                        in_pause += 1;
                    }
                }
            }
            *active = Some(epoch.clone());
        }
        let all_copied = in_pause as usize == epoch.pfns.len();
        let mut collected = Collected {
            pfns: epoch.pfns.clone(),
            delta_pfns: None,
            state,
            pause: PauseBreakdown {
                harvest: t_harvest - t0,
                state: t_state - t_harvest,
                copy: t_state.elapsed(),
                ..Default::default()
            },
            active: Some(epoch),
            ranges: armed.ranges,
            data: Vec::new(),
            reference_image: None,
            hash_time: Duration::ZERO,
            protect_calls: 0,
            protect_before_pause: armed.time,
            in_pause,
            disk_writes: Vec::new(),
        };
        collected.protect_calls = collected.ranges.len() as u64;
        if all_copied && collected.ranges.is_empty() {
            // Nothing protected: the epoch is complete already.
            *lock(&shared.active) = None;
            shared.idle.notify_all();
            let epoch = collected.active.take().expect("set above");
            collected.data = match Arc::try_unwrap(epoch) {
                Ok(epoch) => epoch.buffer.0.into_inner(),
                Err(_) => unreachable!("uninstalled"),
            };
        }
        self.reference(options, &mut collected);
        collected
    }
}

/// Pages write-protected before a pause ([`EpochTracker::arm`]).
struct Armed {
    /// The dirty pages taken then (given back if the epoch fails).
    dirty: DirtyBitmap,
    /// Their numbers.
    pfns: Vec<u64>,
    /// The host ranges protected (none: few pages, copied in the pause).
    ranges: Vec<(u64, u64)>,
    /// How long taking and protecting them took.
    time: Duration,
}

/// What the pause collected, for the copy after it.
struct Collected {
    pfns: Vec<u64>,
    delta_pfns: Option<Vec<u64>>,
    state: crate::snapshot::MicroVmState,
    pause: PauseBreakdown,
    active: Option<Arc<ActiveEpoch>>,
    ranges: Vec<(u64, u64)>,
    data: Vec<u8>,
    reference_image: Option<Vec<u8>>,
    hash_time: Duration,
    protect_calls: u64,
    protect_before_pause: Duration,
    in_pause: u64,
    disk_writes: Vec<EpochWrites>,
}

impl EpochTracker {
    /// Undoes a collected epoch whose resume failed: unprotects, gives the pages back.
    fn abandon(&self, collected: &Collected) {
        if collected.active.is_some() {
            self.unprotect_all();
            *lock(&self.shared.active) = None;
            self.shared.idle.notify_all();
        }
        self.vm
            .return_dirty_pages(self.consumer, &self.bitmap_of(&collected.pfns));
    }

    fn unprotect_all(&self) {
        if let Some(protector) = &self.shared.protector {
            for r in &self.shared.regions {
                if let Err(e) = protector.unprotect(r.host, r.pages * PAGE) {
                    tracing::error!("cannot unprotect guest RAM: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> Vec<RegionInfo> {
        vec![
            RegionInfo {
                host: 0x10_0000_0000,
                guest: 0,
                pages: 100,
                first_pfn: 0,
            },
            RegionInfo {
                host: 0x20_0000_0000,
                guest: 1 << 32,
                pages: 100,
                first_pfn: 100,
            },
        ]
    }

    #[test]
    fn protected_runs_join_small_gaps_but_never_regions() {
        let regions = two_regions();
        let pfns = [1, 2, 3, 6, 30, 98, 99, 100, 101];
        // Pages 4 and 5 are a gap of two clean pages.
        assert_eq!(
            plan_ranges(&regions, &pfns, 16, 1),
            vec![(1, 4), (6, 7), (30, 31), (98, 100), (100, 102)]
        );
        assert_eq!(
            plan_ranges(&regions, &pfns, 16, 2),
            vec![(1, 7), (30, 31), (98, 100), (100, 102)]
        );
        // Too many runs: one hull per region.
        assert_eq!(
            plan_ranges(&regions, &pfns, 3, 2),
            vec![(1, 100), (100, 102)]
        );
        assert!(plan_ranges(&regions, &[], 3, 2).is_empty());
    }

    #[test]
    fn image_and_memory_hashes_agree() {
        let mem = crate::vstate::memory::create_guest_memory(1 << 20).unwrap();
        vm_memory::Bytes::write_slice(&mem, &[7; 100], vm_memory::GuestAddress(4096)).unwrap();
        let mut image = vec![0u8; 1 << 20];
        image[4096..4196].fill(7);
        assert_eq!(memory_hash(&mem), image_hash(&image));
    }
}
