//! The KVM VM: its file descriptor, guest memory slots with dirty logging, the in-kernel
//! irqchip and PIT.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{DirtyConsumer, DirtyTracker};
use super::memory::{GuestMemoryMmap, PageMap, PAGE_SIZE};
use crate::devices::legacy::IrqLineTrigger;

/// Address of the 3-page TSS region KVM needs on Intel hosts (below the IOAPIC, in the gap).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors from creating or driving the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}: {source}")]
    SetUserMemoryRegion {
        /// The memory slot.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(kvm_ioctls::Error),
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG failed for slot {slot}: {source}")]
    GetDirtyLog {
        /// The memory slot.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` failed.
    #[error("KVM_IRQFD failed for GSI {gsi}: {source}")]
    RegisterIrqfd {
        /// The interrupt line.
        gsi: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Dirty pages were asked for while dirty logging is off.
    #[error("dirty page tracking is not enabled")]
    DirtyLogDisabled,
    /// Dirty pages were asked for by a consumer that is not registered.
    #[error("dirty-page consumer {0:?} is not registered")]
    UnknownDirtyConsumer(DirtyConsumer),
    /// `KVM_GET_PIT2` failed.
    #[error("KVM_GET_PIT2 failed: {0}")]
    GetPit(kvm_ioctls::Error),
    /// `KVM_SET_PIT2` failed.
    #[error("KVM_SET_PIT2 failed: {0}")]
    SetPit(kvm_ioctls::Error),
    /// `KVM_GET_CLOCK` failed.
    #[error("KVM_GET_CLOCK failed: {0}")]
    GetClock(kvm_ioctls::Error),
    /// `KVM_SET_CLOCK` failed.
    #[error("KVM_SET_CLOCK failed: {0}")]
    SetClock(kvm_ioctls::Error),
    /// `KVM_GET_IRQCHIP` failed.
    #[error("KVM_GET_IRQCHIP failed for chip {chip}: {source}")]
    GetIrqchip {
        /// The chip (0: PIC master, 1: PIC slave, 2: IOAPIC).
        chip: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_IRQCHIP` failed.
    #[error("KVM_SET_IRQCHIP failed for chip {chip}: {source}")]
    SetIrqchip {
        /// The chip (0: PIC master, 1: PIC slave, 2: IOAPIC).
        chip: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// A VM state without an irqchip cannot go into a VM with one, and the other way round.
    #[error("the saved VM {saved} an in-kernel irqchip, this one {live}")]
    IrqchipMismatch {
        /// "had" or "had no".
        saved: &'static str,
        /// "has" or "has none".
        live: &'static str,
    },
}

/// The VM-wide state KVM holds: the in-kernel PIT, the kvmclock, the PICs and the IOAPIC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The PIT (`KVM_GET_PIT2`), when there is an in-kernel irqchip.
    pub pit: Option<kvm_pit_state2>,
    /// The kvmclock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave and IOAPIC, when there is an in-kernel irqchip.
    pub irqchips: Vec<kvm_irqchip>,
}

/// How far [`ClockRestore::CatchUp`] moves a guest's clocks at most: a migration's state is
/// seconds old at the destination; more means the two hosts' clocks disagree.
const MAX_CLOCK_CATCH_UP: Duration = Duration::from_secs(10);

/// How a restored guest's clocks (kvmclock and the TSC) go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockRestore {
    /// From where they were saved: for the guest, the time the state spent saved does not
    /// exist (a snapshot may be restored days later; its clock is not made to jump).
    AsSaved,
    /// Forward by the real time that passed since the save, so that the guest's clock stays
    /// right and its timers that fell due meanwhile fire at once (a migration: the state is
    /// milliseconds old; both hosts' clocks are assumed in step).
    CatchUp,
}

impl VmState {
    /// How far the guest's clocks move at restore: for [`ClockRestore::CatchUp`], the real time
    /// since KVM read the clock (`KVM_CLOCK_REALTIME`, which KVM gives when the host's clock
    /// runs on a stable TSC); zero otherwise, or when that time is unknown, negative or longer
    /// than [`MAX_CLOCK_CATCH_UP`] (hosts' clocks apart).
    pub fn clock_advance(&self, policy: ClockRestore) -> Duration {
        if policy == ClockRestore::AsSaved || self.clock.flags & KVM_CLOCK_REALTIME == 0 {
            return Duration::ZERO;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        match now.checked_sub(Duration::from_nanos(self.clock.realtime)) {
            Some(elapsed) if elapsed <= MAX_CLOCK_CATCH_UP => elapsed,
            elapsed => {
                tracing::warn!(
                    ?elapsed,
                    "the saved clock is not from the last seconds of this host's time: the \
                     guest's clocks go on from where they were saved"
                );
                Duration::ZERO
            }
        }
    }
}

/// The in-kernel interrupt controllers, in restore order.
const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Dirty pages of each memory region (slot), one bit per 4 KiB page, in KVM's layout: page `p`
/// is bit `p % 64` of word `p / 64`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyBitmap(pub Vec<Vec<u64>>);

impl DirtyBitmap {
    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.0
            .iter()
            .flatten()
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// The dirty pages, numbered across regions as `map` numbers them.
    pub fn pages<'a>(&'a self, map: &'a PageMap<'_>) -> impl Iterator<Item = u64> + 'a {
        self.0.iter().enumerate().flat_map(move |(slot, words)| {
            let (first, count) = map.region(slot).unwrap_or((0, 0));
            words.iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    Some(page)
                })
                .filter(move |&page| page < count)
                .map(move |page| first + page)
            })
        })
    }

    /// Adds the pages of `other`.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), Vec::new());
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m |= t;
            }
        }
    }

    /// Whether the page at `offset` bytes into region `slot` is dirty.
    pub fn is_dirty(&self, slot: usize, offset: u64) -> bool {
        let page = (offset / PAGE_SIZE as u64) as usize;
        self.0
            .get(slot)
            .and_then(|words| words.get(page / 64))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

/// A KVM VM with its guest memory.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    dirty_logging: std::sync::atomic::AtomicBool,
    irqchip: bool,
    /// Every consumer's pages written since it last took them (diff snapshots, a migration).
    dirty: DirtyTracker,
}

impl Vm {
    /// Creates the VM and registers every region of `memory` as a slot (slot = region index),
    /// with KVM dirty logging when `dirty_logging` is set.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap, dirty_logging: bool) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Self::with_fd(fd, memory, dirty_logging)
    }

    /// As [`Vm::new`], in the VM `fd` created beforehand (and not given memory yet).
    pub fn with_fd(
        fd: VmFd,
        memory: GuestMemoryMmap,
        dirty_logging: bool,
    ) -> Result<Self, VmError> {
        let vm = Vm {
            fd: Arc::new(fd),
            memory,
            dirty_logging: dirty_logging.into(),
            irqchip: false,
            dirty: DirtyTracker::new(),
        };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        let flags = if self.dirty_logging() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.memory`, which outlives the VM
            // fd (both are dropped together), and its size matches `memory_size`.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(|source| VmError::SetUserMemoryRegion { slot, source })?;
        }
        Ok(())
    }

    /// Sets up the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and the PIT. Must run
    /// before any vCPU is created.
    pub fn setup_irqchip(&mut self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::SetTssAddress)?;
        self.fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        self.irqchip = true;
        Ok(())
    }

    /// Whether the in-kernel irqchip (and so per-vCPU LAPICs) exists.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// A trigger that pulses interrupt line `gsi` straight into the in-kernel irqchip.
    pub fn irq_line(&self, gsi: u32) -> IrqLineTrigger {
        IrqLineTrigger::new(self.fd.clone(), gsi)
    }

    /// Routes writes to `evt` into interrupt line `gsi`.
    pub fn register_irqfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::RegisterIrqfd { gsi, source })
    }

    /// Turns KVM dirty logging on or off for every slot.
    /// (Safe while the vCPUs run: KVM switches the slots over atomically.)
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), VmError> {
        if self
            .dirty_logging
            .swap(enabled, std::sync::atomic::Ordering::SeqCst)
            != enabled
        {
            self.register_memory()?;
        }
        Ok(())
    }

    /// Whether KVM dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A new consumer of dirty pages (see [`DirtyTracker`]): [`Vm::take_dirty_pages`] gives
    /// it the pages written since it registered or last took them, whoever else reads the log.
    pub fn register_dirty_consumer(&self) -> DirtyConsumer {
        self.dirty.register()
    }

    /// Forgets `consumer` and the pages it had not taken.
    pub fn unregister_dirty_consumer(&self, consumer: DirtyConsumer) {
        self.dirty.unregister(consumer);
    }

    /// The tracker of every consumer's dirty pages.
    pub fn dirty_tracker(&self) -> &DirtyTracker {
        &self.dirty
    }

    /// Reads and clears both logs - KVM's (the guest's writes) and the vm-memory bitmap (the
    /// monitor's) - and adds what they held to every consumer's set. With no consumer
    /// registered this only clears them (dirty tracking starts afresh).
    pub fn harvest_dirty_log(&self) -> Result<(), VmError> {
        let mut tracker = self.dirty.locked();
        self.harvest_into(&mut tracker)
    }

    fn harvest_into(
        &self,
        tracker: &mut super::dirty::DirtyTrackerGuard<'_>,
    ) -> Result<(), VmError> {
        if !self.dirty_logging() {
            return Err(VmError::DirtyLogDisabled);
        }
        let mut all = Vec::with_capacity(self.memory.num_regions());
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mut kvm_bits = self
                .fd
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| VmError::GetDirtyLog { slot, source })?;
            let vmm_bits = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (k, v) in kvm_bits.iter_mut().zip(vmm_bits) {
                *k |= v;
            }
            all.push(kvm_bits);
        }
        tracker.add(&DirtyBitmap(all));
        Ok(())
    }

    /// The pages written - by the guest or the monitor - since `consumer` registered or last
    /// took its pages, and not given back since. Other consumers' sets keep these pages.
    pub fn take_dirty_pages(&self, consumer: DirtyConsumer) -> Result<DirtyBitmap, VmError> {
        let mut tracker = self.dirty.locked();
        self.harvest_into(&mut tracker)?;
        tracker
            .take(consumer)
            .ok_or(VmError::UnknownDirtyConsumer(consumer))
    }

    /// Gives back dirty pages `consumer` took but did not consume (the snapshot or the send
    /// they were for failed): its next [`Vm::take_dirty_pages`] reports them again.
    pub fn return_dirty_pages(&self, consumer: DirtyConsumer, pages: &DirtyBitmap) {
        self.dirty.give_back(consumer, pages);
    }

    /// Saves the VM-wide state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let mut state = VmState {
            pit: None,
            clock: self.fd.get_clock().map_err(VmError::GetClock)?,
            irqchips: Vec::new(),
        };
        if self.irqchip {
            state.pit = Some(self.fd.get_pit2().map_err(VmError::GetPit)?);
            for chip in IRQCHIPS {
                let mut irqchip = kvm_irqchip {
                    chip_id: chip,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut irqchip)
                    .map_err(|source| VmError::GetIrqchip { chip, source })?;
                state.irqchips.push(irqchip);
            }
        }
        Ok(state)
    }

    /// Restores the VM-wide state saved by [`Vm::save_state`], in the order KVM needs: PIT,
    /// clock, PIC master, PIC slave, IOAPIC. Runs after [`Vm::setup_irqchip`] and before any
    /// vCPU runs. The kvmclock goes on from its saved value plus `advance` (see
    /// [`VmState::clock_advance`]).
    pub fn restore_state(&self, state: &VmState, advance: Duration) -> Result<(), VmError> {
        let saved_irqchip = state.pit.is_some() && state.irqchips.len() == IRQCHIPS.len();
        if saved_irqchip != self.irqchip {
            return Err(VmError::IrqchipMismatch {
                saved: if saved_irqchip { "had" } else { "had no" },
                live: if self.irqchip { "has" } else { "has none" },
            });
        }
        if let Some(pit) = &state.pit {
            self.fd.set_pit2(pit).map_err(VmError::SetPit)?;
        }
        // The advance is computed here rather than left to KVM_CLOCK_REALTIME, so the vCPUs'
        // TSCs move by the very same amount; TSC_STABLE is only ever reported by KVM.
        let clock = kvm_clock_data {
            clock: state.clock.clock + advance.as_nanos() as u64,
            flags: 0,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(VmError::SetClock)?;
        for irqchip in &state.irqchips {
            self.fd
                .set_irqchip(irqchip)
                .map_err(|source| VmError::SetIrqchip {
                    chip: irqchip.chip_id,
                    source,
                })?;
        }
        Ok(())
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state whose clock KVM read `age_ms` ago (in the future for a negative one), with the
    /// real time given or not.
    fn read_ago(age_ms: i64, with_realtime: bool) -> VmState {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        VmState {
            pit: None,
            clock: kvm_clock_data {
                clock: 1_000_000_000,
                flags: if with_realtime { KVM_CLOCK_REALTIME } else { 0 },
                realtime: (now - age_ms * 1_000_000) as u64,
                ..Default::default()
            },
            irqchips: Vec::new(),
        }
    }

    #[test]
    fn clocks_catch_up_only_with_a_recent_real_time_and_when_asked() {
        let state = read_ago(50, true);
        let advance = state.clock_advance(ClockRestore::CatchUp);
        assert!(
            advance >= Duration::from_millis(50) && advance < Duration::from_secs(5),
            "{advance:?}"
        );
        assert_eq!(state.clock_advance(ClockRestore::AsSaved), Duration::ZERO);
        for (state, what) in [
            (read_ago(50, false), "no real time from KVM"),
            (read_ago(-5_000, true), "read in the future"),
            (read_ago(60_000, true), "a minute old"),
        ] {
            assert_eq!(
                state.clock_advance(ClockRestore::CatchUp),
                Duration::ZERO,
                "{what}"
            );
        }
    }
}
