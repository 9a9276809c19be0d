//! The virtio-mmio transport, version 2 ("modern", virtio spec 1.1 §4.2.2).
//!
//! [`MmioTransport`] owns the register file of one virtio-mmio window: feature negotiation,
//! queue setup and the device status state machine. When the driver sets `DRIVER_OK` it builds
//! the [`Queue`]s from the registers, checks them against guest memory and hands them to the
//! [`VirtioDevice`]: every queue up to the last one the driver made ready. A driver leaves the
//! last queues alone when it did not negotiate the feature they serve (virtio-net's control
//! queue without `VIRTIO_NET_F_CTRL_VQ`); the device checks that it got what its features
//! need. The device itself runs on the event-loop thread; the transport only runs on
//! vCPU threads (through the MMIO bus), so the two meet under the device's mutex.
//!
//! Queue notifications do not come through here: [`MmioTransport::register_ioevents`] asks KVM
//! to signal each queue's eventfd directly when the driver writes the queue's index to
//! `QueueNotify`.
//!
//! **Save and restore** ([`Persist`]): [`MmioState`] holds the registers, the queue registers,
//! the `InterruptStatus` bits, the device's state and, if the device runs, each queue's indices
//! as the device left them. The restore of a running device rebuilds its queues from these,
//! exactly (the next available and used indices are the saved ones, not re-read from the rings,
//! which the driver may have moved on), checks that the rings lie in guest memory, and activates
//! the device with them: the driver goes on without noticing. A state saved with fewer queues
//! than the device now has (a virtio-net device before its control queue) restores with the
//! missing queues as after a reset: its driver never set them up.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{
    ActivateError, VirtioDevice, VirtioDeviceState, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use crate::arch::layout;
use crate::persist::Persist;
use crate::vstate::memory::GuestMemoryMmap;

/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2 is the modern (non-legacy) virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID`: "VMR\0" in little endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"VMR\0");

/// Register offsets in the virtio-mmio window (virtio spec 1.1 §4.2.2).
pub mod regs {
    /// `MagicValue` (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// `Version` (R).
    pub const VERSION: u64 = 0x004;
    /// `DeviceID` (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// `VendorID` (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DeviceFeatures` (R): 32 feature bits selected by `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DeviceFeaturesSel` (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DriverFeatures` (W): 32 feature bits selected by `DriverFeaturesSel`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DriverFeaturesSel` (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QueueSel` (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QueueNumMax` (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QueueNum` (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QueueReady` (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QueueNotify` (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `InterruptStatus` (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `InterruptACK` (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `Status` (RW).
    pub const STATUS: u64 = 0x070;
    /// `QueueDescLow` (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QueueDescHigh` (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QueueDriverLow` (W): the available ring.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// `QueueDriverHigh` (W).
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// `QueueDeviceLow` (W): the used ring.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// `QueueDeviceHigh` (W).
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// `ConfigGeneration` (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// The driver-visible registers of one virtqueue, as the driver wrote them.
///
/// Plain data: the live [`Queue`] is built from it on `DRIVER_OK` and then belongs to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// `QueueNumMax`: the largest size the device supports.
    pub max_size: u16,
    /// `QueueNum`: the size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
}

impl QueueConfig {
    /// A queue as it is after reset: full size, not ready, no addresses.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    /// Builds the live queue, checking sizes, alignment and that the rings lie in guest RAM.
    fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, QueueSetupError> {
        let mut queue = Queue::new(self.max_size).map_err(QueueSetupError::MaxSize)?;
        queue
            .try_set_size(self.size)
            .map_err(QueueSetupError::Size)?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(QueueSetupError::DescTable)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(QueueSetupError::AvailRing)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(QueueSetupError::UsedRing)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(self.ready);
        if !self.ready {
            return Err(QueueSetupError::NotReady);
        }
        if !queue.is_valid(mem) {
            return Err(QueueSetupError::OutsideMemory {
                size: self.size,
                desc_table: self.desc_table,
                avail_ring: self.avail_ring,
                used_ring: self.used_ring,
            });
        }
        Ok(queue)
    }
}

/// A queue as the device runs it: its registers and where the device is in its rings.
///
/// virtio-queue's `QueueState` mirrored, serializable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRuntimeState {
    /// The registers the queue was built from.
    pub config: QueueConfig,
    /// The next available ring entry the device will take.
    pub next_avail: u16,
    /// The next used ring entry the device will fill: the used index it last published.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx_enabled: bool,
}

impl From<&Queue> for QueueRuntimeState {
    fn from(queue: &Queue) -> Self {
        Self {
            config: QueueConfig {
                max_size: queue.max_size(),
                size: queue.size(),
                ready: queue.ready(),
                desc_table: queue.desc_table(),
                avail_ring: queue.avail_ring(),
                used_ring: queue.used_ring(),
            },
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            event_idx_enabled: queue.event_idx_enabled(),
        }
    }
}

impl QueueRuntimeState {
    /// Rebuilds the live queue, with the same checks as at `DRIVER_OK` and the saved indices.
    pub fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, QueueSetupError> {
        let mut queue = self.config.build(mem, self.event_idx_enabled)?;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        Ok(queue)
    }
}

/// Why a queue the driver set up cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueSetupError {
    /// The device's maximum queue size is not a power of two.
    #[error("invalid maximum queue size: {0}")]
    MaxSize(virtio_queue::Error),
    /// `QueueNum` is zero, above `QueueNumMax` or not a power of two.
    #[error("invalid queue size: {0}")]
    Size(virtio_queue::Error),
    /// The descriptor table is misaligned.
    #[error("invalid descriptor table address: {0}")]
    DescTable(virtio_queue::Error),
    /// The available ring is misaligned.
    #[error("invalid available ring address: {0}")]
    AvailRing(virtio_queue::Error),
    /// The used ring is misaligned.
    #[error("invalid used ring address: {0}")]
    UsedRing(virtio_queue::Error),
    /// The driver did not set `QueueReady`.
    #[error("queue not ready")]
    NotReady,
    /// A ring does not lie in guest RAM.
    #[error(
        "the rings of a {size}-entry queue (descriptors at {desc_table:#x}, available ring at \
         {avail_ring:#x}, used ring at {used_ring:#x}) are not in guest memory"
    )]
    OutsideMemory {
        /// Queue size.
        size: u16,
        /// Guest address of the descriptor table.
        desc_table: u64,
        /// Guest address of the available ring.
        avail_ring: u64,
        /// Guest address of the used ring.
        used_ring: u64,
    },
}

/// The saved state of a virtio-mmio device: the transport's registers and the device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// `Status`.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver wrote (both halves).
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// `InterruptStatus`: the bits not yet acknowledged.
    pub interrupt_status: u32,
    /// The queue registers, one entry per device queue.
    pub queues: Vec<QueueConfig>,
    /// The queues the device runs on, if it is activated.
    pub active_queues: Option<Vec<QueueRuntimeState>>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// What restoring a transport needs besides its state.
pub struct MmioRestoreArgs {
    /// Guest memory, restored before.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line: a new irqfd, registered with KVM by the caller.
    pub interrupt: Arc<VirtioInterrupt>,
    /// The device, restored from [`MmioState::device`] and registered with the event loop.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
}

/// Why a transport cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    /// The device given is not of the saved type.
    #[error(
        "the saved virtio-mmio state is of device type {saved}, the device given of type {device}"
    )]
    DeviceType {
        /// The saved device type.
        saved: u32,
        /// The given device's type.
        device: u32,
    },
    /// The device's queues differ in number or maximum size from the saved ones.
    #[error("the saved queue maximum sizes {saved:?} differ from the device's {device:?}")]
    QueueLayout {
        /// Saved maximum sizes.
        saved: Vec<u16>,
        /// The device's.
        device: Vec<u16>,
    },
    /// The device's accepted features are not those the driver wrote to the transport.
    #[error(
        "the driver's features {driver:#x} differ from those the device accepted ({device:#x})"
    )]
    Features {
        /// The saved driver features.
        driver: u64,
        /// The restored device's accepted features.
        device: u64,
    },
    /// Running queues were saved for a device the driver has not started.
    #[error("queues saved for a device whose status {status:#x} lacks DRIVER_OK")]
    NotStarted {
        /// The saved `Status`.
        status: u32,
    },
    /// The number of running queues saved is not the number of queues the driver set up.
    #[error("{saved} running queues saved for a device whose driver set up {queues}")]
    ActiveQueueCount {
        /// Running queues saved.
        saved: usize,
        /// Queues up to the last one the driver made ready.
        queues: usize,
    },
    /// A running queue's saved registers are not the transport's.
    #[error("queue {index}: the running queue's registers differ from the transport's")]
    QueueRegisters {
        /// Queue index.
        index: usize,
    },
    /// A saved queue cannot be rebuilt (e.g. its rings are not in guest memory).
    #[error("cannot restore queue {index}: {source}")]
    Queue {
        /// Queue index.
        index: usize,
        /// Why.
        source: QueueSetupError,
    },
    /// The device refused its restored queues.
    #[error("cannot activate the restored device: {0}")]
    Activate(ActivateError),
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    /// `Status`.
    status: u32,
    /// `DeviceFeaturesSel`.
    device_features_sel: u32,
    /// `DriverFeaturesSel`.
    driver_features_sel: u32,
    /// The features the driver wrote so far (both 32-bit halves).
    driver_features: u64,
    /// `QueueSel`.
    queue_sel: u32,
    /// One entry per device queue.
    queues: Vec<QueueConfig>,
    /// `ConfigGeneration`.
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose interrupts go out through `interrupt`.
    ///
    /// `device` is the same object the builder registers with the event manager.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
        }
    }

    /// The kernel command-line argument that declares this device to Linux
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`): `virtio_mmio.device=4K@0x<base>:<irq>`.
    pub fn cmdline_arg(base: u64, irq: u32) -> String {
        format!(
            "virtio_mmio.device={}K@{base:#x}:{irq}",
            layout::MMIO_DEVICE_SIZE >> 10
        )
    }

    /// Asks KVM to signal queue `i`'s eventfd when the driver writes `i` to `QueueNotify` of the
    /// window at `base`, without an exit to the monitor.
    pub fn register_ioevents(&self, vm_fd: &VmFd, base: u64) -> Result<(), kvm_ioctls::Error> {
        let device = lock(&self.device);
        let addr = IoEventAddress::Mmio(base + regs::QUEUE_NOTIFY);
        for (index, evt) in device.queue_events().iter().enumerate() {
            // The datamatch is the queue index, written by the driver as a 32-bit value.
            vm_fd.register_ioevent(evt, &addr, index as u32)?;
        }
        Ok(())
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Signals a used-buffer interrupt if the device runs. After a restore or a migration: an
    /// interrupt the source raised just before its vCPUs stopped may have reached KVM after
    /// their interrupt controllers were saved. With `VIRTIO_RING_F_EVENT_IDX` the device would
    /// not raise it again (the driver asked once, for buffers it has not seen yet), so the
    /// driver would wait for ever. If nothing is new, the driver sees a spurious interrupt.
    pub fn raise_used_buffer_interrupt(&self) {
        if !lock(&self.device).is_activated() {
            return;
        }
        if let Err(err) = self.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
            tracing::error!(%err, "virtio-mmio: cannot raise the used-buffer interrupt");
        }
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The queue registers, one entry per queue.
    pub fn queue_configs(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Announces the guest through its device ([`VirtioDevice::announce`]) and signals the
    /// configuration change that asks the driver to announce it too.
    pub fn announce(&mut self) {
        let changed = lock(&self.device).announce();
        if changed {
            self.notify_config_change();
        }
    }

    /// Tells the driver that the device configuration changed: bumps `ConfigGeneration` and
    /// raises a configuration interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(err) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
            tracing::error!(%err, "virtio-mmio: cannot signal a configuration change");
        }
    }

    fn has_status(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Whether the driver may set up queues now (after `FEATURES_OK`, before `DRIVER_OK`).
    fn queue_setup_allowed(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_FEATURES_OK) && !self.has_status(VIRTIO_CONFIG_S_DRIVER_OK)
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The queues the device gets on `DRIVER_OK`: up to the last one the driver made ready.
    fn queues_in_use(&self) -> &[QueueConfig] {
        let used = self
            .queues
            .iter()
            .rposition(|q| q.ready)
            .map_or(0, |i| i + 1);
        &self.queues[..used]
    }

    fn read_register(&self, offset: u64) -> u32 {
        // The device lock is taken only for the registers that need it: the event loop may hold
        // it for a while, and the interrupt path must not wait on it.
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => lock(&self.device).device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => lock(&self.device).avail_features() as u32,
                1 => (lock(&self.device).avail_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::warn!(offset, "virtio-mmio: read of an unknown register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            regs::QUEUE_NOTIFY => self.notify_queue(value),
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => self.write_status(value),
            _ => tracing::warn!(offset, value, "virtio-mmio: write to an unknown register"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.has_status(VIRTIO_CONFIG_S_DRIVER) || self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
        {
            tracing::warn!(
                status = self.status,
                "virtio-mmio: driver features written outside feature negotiation"
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel if value != 0 => {
                tracing::warn!(sel, value, "virtio-mmio: driver acked unknown feature bits");
            }
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_setup_allowed() {
            if offset == regs::QUEUE_READY && value == 0 {
                // Linux deactivates its queues this way after resetting the device.
                tracing::debug!(queue = self.queue_sel, "virtio-mmio: queue disabled");
                return;
            }
            tracing::warn!(
                offset,
                status = self.status,
                "virtio-mmio: queue register written outside queue setup"
            );
            return;
        }
        let Some(queue) = self.queues.get_mut(self.queue_sel as usize) else {
            tracing::warn!(
                queue = self.queue_sel,
                "virtio-mmio: queue register written for a queue that does not exist"
            );
            return;
        };
        let set_low = |reg: &mut u64| *reg = (*reg & !0xffff_ffff) | u64::from(value);
        let set_high = |reg: &mut u64| *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            // A size that does not fit 16 bits becomes 0; bad sizes are refused at activation.
            regs::QUEUE_NUM => queue.size = u16::try_from(value).unwrap_or(0),
            regs::QUEUE_READY => queue.ready = value == 1,
            regs::QUEUE_DESC_LOW => set_low(&mut queue.desc_table),
            regs::QUEUE_DESC_HIGH => set_high(&mut queue.desc_table),
            regs::QUEUE_AVAIL_LOW => set_low(&mut queue.avail_ring),
            regs::QUEUE_AVAIL_HIGH => set_high(&mut queue.avail_ring),
            regs::QUEUE_USED_LOW => set_low(&mut queue.used_ring),
            regs::QUEUE_USED_HIGH => set_high(&mut queue.used_ring),
            _ => unreachable!("not a queue register: {offset:#x}"),
        }
    }

    /// A `QueueNotify` that reached the monitor: normally KVM consumes these through the
    /// ioeventfds, but if they are not registered (or the index is unknown) the write lands here.
    fn notify_queue(&mut self, index: u32) {
        let device = lock(&self.device);
        match device.queue_events().get(index as usize) {
            Some(evt) => {
                if let Err(err) = evt.write(1) {
                    tracing::error!(%err, index, "virtio-mmio: cannot signal a queue event");
                }
            }
            None => tracing::warn!(index, "virtio-mmio: notification for an unknown queue"),
        }
    }

    /// The `Status` state machine (virtio spec 1.1 §3.1.1).
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is ours to set: the driver only echoes it back.
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let keep = self.status & VIRTIO_CONFIG_S_NEEDS_RESET;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!(
                status = value,
                "virtio-mmio: the driver gave up on the device"
            );
            self.status = old | VIRTIO_CONFIG_S_FAILED | keep;
            return;
        }
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        const DRIVER_OK: u32 = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
        match (old, new) {
            (0, ACK) | (ACK, DRIVER) => self.status = new | keep,
            (DRIVER, FEATURES_OK) => {
                if self.accept_features() {
                    self.status = new | keep;
                }
            }
            (FEATURES_OK, DRIVER_OK) => {
                self.status = new | keep;
                self.activate();
            }
            _ if new == old => {}
            _ => tracing::warn!(
                from = self.status,
                to = value,
                "virtio-mmio: invalid device status transition ignored"
            ),
        }
    }

    /// On `FEATURES_OK`: accepts the driver's features if the device offered them all.
    fn accept_features(&mut self) -> bool {
        let mut device = lock(&self.device);
        let offered = device.avail_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            tracing::warn!(
                acked = self.driver_features,
                offered,
                "virtio-mmio: driver acked features the device does not offer"
            );
            return false;
        }
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        if offered & version_1 != 0 && self.driver_features & version_1 == 0 {
            tracing::warn!("virtio-mmio: a legacy driver on a modern-only device");
            return false;
        }
        device.set_acked_features(self.driver_features);
        true
    }

    /// On restore of a running device: rebuilds its queues as saved and activates it.
    fn restore_queues(&self, saved: &[QueueRuntimeState]) -> Result<(), MmioRestoreError> {
        if !self.has_status(VIRTIO_CONFIG_S_DRIVER_OK) {
            return Err(MmioRestoreError::NotStarted {
                status: self.status,
            });
        }
        let in_use = self.queues_in_use();
        if saved.len() != in_use.len() {
            return Err(MmioRestoreError::ActiveQueueCount {
                saved: saved.len(),
                queues: in_use.len(),
            });
        }
        let queues = in_use
            .iter()
            .zip(saved)
            .enumerate()
            .map(|(index, (config, saved))| {
                if saved.config != *config {
                    return Err(MmioRestoreError::QueueRegisters { index });
                }
                saved
                    .build(&self.mem)
                    .map_err(|source| MmioRestoreError::Queue { index, source })
            })
            .collect::<Result<Vec<Queue>, _>>()?;
        lock(&self.device)
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .map_err(MmioRestoreError::Activate)
    }

    /// On `DRIVER_OK`: builds the queues in use and starts the device, or flags
    /// `DEVICE_NEEDS_RESET` (a queue before the last ready one is not ready, or is broken).
    fn activate(&mut self) {
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues: Result<Vec<Queue>, _> = self
            .queues_in_use()
            .iter()
            .enumerate()
            .map(|(index, q)| q.build(&self.mem, event_idx).map_err(|err| (index, err)))
            .collect();
        let result = match queues {
            Ok(queues) => lock(&self.device)
                .activate(self.mem.clone(), queues, self.interrupt.clone())
                .map_err(|err| err.to_string()),
            Err((index, err)) => Err(format!("queue {index}: {err}")),
        };
        if let Err(err) = result {
            tracing::error!(%err, "virtio-mmio: cannot activate the device");
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            if let Err(err) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
                tracing::error!(%err, "virtio-mmio: cannot signal DEVICE_NEEDS_RESET");
            }
        }
    }

    /// `Status` = 0: stops the device and returns every register to its initial value.
    fn reset(&mut self) {
        let mut device = lock(&self.device);
        if device.is_activated() {
            device.reset();
        }
        device.set_acked_features(0);
        drop(device);
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueConfig::new(queue.max_size);
        }
    }
}

impl crate::devices::bus::BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            lock(&self.device).read_config(offset - regs::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(data) {
            Ok(data) if offset & 3 == 0 => *data = self.read_register(offset).to_le_bytes(),
            Ok(data) => {
                tracing::warn!(offset, "virtio-mmio: misaligned register read");
                data.fill(0);
            }
            Err(_) => tracing::warn!(offset, "virtio-mmio: register read not 32 bits wide"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            lock(&self.device).write_config(offset - regs::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(value) if offset & 3 == 0 => self.write_register(offset, u32::from_le_bytes(value)),
            _ => tracing::warn!(offset, len = data.len(), "virtio-mmio: bad register write"),
        }
    }
}

impl Persist for MmioTransport {
    type State = MmioState;
    type ConstructorArgs = MmioRestoreArgs;
    type Error = MmioRestoreError;

    fn save(&self) -> MmioState {
        let device = lock(&self.device);
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.clone(),
            active_queues: device.is_activated().then(|| device.queue_states()),
            device: device.device_state(),
        }
    }

    /// Restores the registers around `args.device` (restored from `state.device`, not yet
    /// activated) and, if the device was running, activates it with its queues as saved.
    fn restore(args: MmioRestoreArgs, state: &MmioState) -> Result<Self, MmioRestoreError> {
        let MmioRestoreArgs {
            mem,
            interrupt,
            device,
        } = args;
        let mut queues = state.queues.clone();
        {
            let device = lock(&device);
            let (saved, actual) = (state.device.device_type(), device.device_type());
            if saved != actual {
                return Err(MmioRestoreError::DeviceType {
                    saved,
                    device: actual,
                });
            }
            // The device may have gained queues since the save (virtio-net's control queue):
            // the saved ones must be its first.
            let saved: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
            if !device.queue_max_sizes().starts_with(&saved) {
                return Err(MmioRestoreError::QueueLayout {
                    saved,
                    device: device.queue_max_sizes().to_vec(),
                });
            }
            queues.extend(
                device.queue_max_sizes()[saved.len()..]
                    .iter()
                    .map(|&max| QueueConfig::new(max)),
            );
            let features_ok = state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
            if features_ok && device.acked_features() != state.driver_features {
                return Err(MmioRestoreError::Features {
                    driver: state.driver_features,
                    device: device.acked_features(),
                });
            }
        }
        interrupt.restore_status(state.interrupt_status);
        let transport = Self {
            device,
            mem,
            interrupt,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queues,
            config_generation: state.config_generation,
        };
        if let Some(saved) = &state.active_queues {
            transport.restore_queues(saved)?;
        }
        tracing::debug!(
            device_type = state.device.device_type(),
            status = state.status,
            running = state.active_queues.is_some(),
            "virtio-mmio: transport restored"
        );
        Ok(transport)
    }
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().expect("virtio device lock poisoned")
}

/// A driver's side of the register interface, for the tests of the transport and its devices.
#[cfg(test)]
pub(crate) mod testing {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK,
    };
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    use super::{regs, MmioTransport};
    use crate::devices::bus::BusDevice;
    use crate::vstate::memory::GuestMemoryMmap;

    /// Reads a 32-bit register.
    pub(crate) fn read_reg(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Writes a 32-bit register.
    pub(crate) fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// What Linux's virtio_mmio driver does up to `DRIVER_OK`: reset, ACKNOWLEDGE, DRIVER,
    /// `features`, FEATURES_OK, then each queue (size and rings of `queues[i]`), DRIVER_OK.
    pub(crate) fn bring_up(
        t: &mut MmioTransport,
        features: u64,
        queues: &[&MockSplitQueue<GuestMemoryMmap>],
    ) {
        const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        const DRIVER: u32 = ACK | VIRTIO_CONFIG_S_DRIVER;
        const FEATURES_OK: u32 = DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        write_reg(t, regs::STATUS, 0);
        write_reg(t, regs::STATUS, ACK);
        write_reg(t, regs::STATUS, DRIVER);
        write_reg(t, regs::DRIVER_FEATURES_SEL, 0);
        write_reg(t, regs::DRIVER_FEATURES, features as u32);
        write_reg(t, regs::DRIVER_FEATURES_SEL, 1);
        write_reg(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
        write_reg(t, regs::STATUS, FEATURES_OK);
        for (index, vq) in queues.iter().enumerate() {
            let queue: Queue = vq.create_queue().unwrap();
            write_reg(t, regs::QUEUE_SEL, index as u32);
            write_reg(t, regs::QUEUE_NUM, u32::from(queue.size()));
            let rings = [
                (regs::QUEUE_DESC_LOW, queue.desc_table()),
                (regs::QUEUE_AVAIL_LOW, queue.avail_ring()),
                (regs::QUEUE_USED_LOW, queue.used_ring()),
            ];
            for (reg, addr) in rings {
                write_reg(t, reg, addr as u32);
                write_reg(t, reg + 4, (addr >> 32) as u32);
            }
            write_reg(t, regs::QUEUE_READY, 1);
        }
        write_reg(t, regs::STATUS, FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// Every register the driver can read, as (offset, selector, value): the plain ones, the
    /// selected ones under each selector value, and the first 64 bytes of configuration space.
    /// The selectors are left as they were.
    pub(crate) fn register_dump(t: &mut MmioTransport) -> Vec<(u64, u32, u32)> {
        let plain = [
            regs::MAGIC_VALUE,
            regs::VERSION,
            regs::DEVICE_ID,
            regs::VENDOR_ID,
            regs::DEVICE_FEATURES,
            regs::QUEUE_NUM_MAX,
            regs::QUEUE_READY,
            regs::INTERRUPT_STATUS,
            regs::STATUS,
            regs::CONFIG_GENERATION,
        ];
        let mut dump: Vec<(u64, u32, u32)> = plain
            .into_iter()
            .map(|offset| (offset, u32::MAX, read_reg(t, offset)))
            .collect();
        let (features_sel, queue_sel) = (t.device_features_sel, t.queue_sel);
        for sel in 0..2 {
            write_reg(t, regs::DEVICE_FEATURES_SEL, sel);
            dump.push((
                regs::DEVICE_FEATURES,
                sel,
                read_reg(t, regs::DEVICE_FEATURES),
            ));
        }
        for sel in 0..t.queues.len() as u32 + 1 {
            write_reg(t, regs::QUEUE_SEL, sel);
            for offset in [regs::QUEUE_NUM_MAX, regs::QUEUE_READY] {
                dump.push((offset, sel, read_reg(t, offset)));
            }
        }
        write_reg(t, regs::DEVICE_FEATURES_SEL, features_sel);
        write_reg(t, regs::QUEUE_SEL, queue_sel);
        for offset in (regs::CONFIG..regs::CONFIG + 64).step_by(4) {
            dump.push((offset, u32::MAX, read_reg(t, offset)));
        }
        dump
    }
}

#[cfg(test)]
mod tests {
    use event_manager::{EventOps, Events, MutEventSubscriber};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::block::BlockState;
    use crate::devices::virtio::{TYPE_BLOCK, TYPE_NET, VIRTIO_MMIO_INT_VRING};

    const QUEUE_MAX: [u16; 2] = [16, 8];
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 9) | (1 << 5);

    /// A device that records what the transport does to it.
    struct FakeDevice {
        device_type: u32,
        queue_evts: Vec<EventFd>,
        acked: u64,
        config: [u8; 8],
        activated: Option<Vec<Queue>>,
        fail_activate: bool,
        /// Fewest queues the device runs on (its last queue is optional if 1).
        min_queues: usize,
        resets: usize,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                device_type: TYPE_BLOCK,
                queue_evts: QUEUE_MAX
                    .iter()
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                acked: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activated: None,
                fail_activate: false,
                min_queues: QUEUE_MAX.len(),
                resets: 0,
            }
        }
    }

    impl MutEventSubscriber for FakeDevice {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
        fn init(&mut self, _ops: &mut EventOps) {}
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            self.device_type
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &QUEUE_MAX
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.queue_evts
        }
        fn avail_features(&self) -> u64 {
            FEATURES
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features & FEATURES;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Device("refused".into()));
            }
            if queues.len() < self.min_queues {
                return Err(ActivateError::QueueCount {
                    expected: self.min_queues,
                    got: queues.len(),
                });
            }
            self.activated = Some(queues);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn queue_states(&self) -> Vec<QueueRuntimeState> {
            self.activated
                .iter()
                .flatten()
                .map(QueueRuntimeState::from)
                .collect()
        }
        fn device_state(&self) -> VirtioDeviceState {
            VirtioDeviceState::Block(BlockState {
                path: "fake".into(),
                read_only: false,
                id: [0; 20],
                capacity_sectors: 0,
                avail_features: FEATURES,
                acked_features: self.acked,
            })
        }
    }

    struct Fixture {
        device: Arc<Mutex<FakeDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        transport: MmioTransport,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(FakeDevice::new()));
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let transport = MmioTransport::new(mem, device.clone(), interrupt.clone());
        Fixture {
            device,
            interrupt,
            transport,
        }
    }

    use super::testing::{read_reg as read, register_dump, write_reg as write};

    /// Drives the transport like Linux's virtio_mmio driver up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport) {
        write(t, regs::STATUS, 0);
        write(t, regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(
            t,
            regs::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        write(t, regs::DRIVER_FEATURES_SEL, 0);
        write(t, regs::DRIVER_FEATURES, FEATURES as u32);
        write(t, regs::DRIVER_FEATURES_SEL, 1);
        write(t, regs::DRIVER_FEATURES, (FEATURES >> 32) as u32);
        write(t, regs::STATUS, FEATURES_OK);
    }

    const FEATURES_OK: u32 =
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

    /// Sets up queue `index` with its rings at `base` (desc, then avail at +0x200, used +0x400).
    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        write(t, regs::QUEUE_SEL, index);
        write(t, regs::QUEUE_NUM, size);
        let addrs = [
            (regs::QUEUE_DESC_LOW, base),
            (regs::QUEUE_AVAIL_LOW, base + 0x200),
            (regs::QUEUE_USED_LOW, base + 0x400),
        ];
        for (reg, addr) in addrs {
            write(t, reg, addr as u32);
            write(t, reg + 4, (addr >> 32) as u32);
        }
        write(t, regs::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let Fixture { mut transport, .. } = fixture();
        let t = &mut transport;
        assert_eq!(read(t, regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read(t, regs::VERSION), 2);
        assert_eq!(read(t, regs::DEVICE_ID), TYPE_BLOCK);
        assert_eq!(read(t, regs::VENDOR_ID), VENDOR_ID);
        assert_eq!(read(t, regs::STATUS), 0);
        assert_eq!(read(t, regs::CONFIG_GENERATION), 0);
    }

    #[test]
    fn device_features_by_page() {
        let Fixture { mut transport, .. } = fixture();
        let t = &mut transport;
        assert_eq!(read(t, regs::DEVICE_FEATURES), FEATURES as u32);
        write(t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(t, regs::DEVICE_FEATURES), 1);
        write(t, regs::DEVICE_FEATURES_SEL, 2);
        assert_eq!(read(t, regs::DEVICE_FEATURES), 0);
    }

    #[test]
    fn status_state_machine() {
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        let t = &mut transport;
        // Skipping ACKNOWLEDGE is refused.
        write(
            t,
            regs::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        assert_eq!(read(t, regs::STATUS), 0);
        write(t, regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(read(t, regs::STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        // Features cannot be written before DRIVER.
        write(t, regs::DRIVER_FEATURES, 0xffff_ffff);
        write(
            t,
            regs::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        // DRIVER_OK before FEATURES_OK is refused.
        write(
            t,
            regs::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(
            read(t, regs::STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        );
        write(t, regs::DRIVER_FEATURES_SEL, 1);
        write(t, regs::DRIVER_FEATURES, 1);
        write(t, regs::STATUS, FEATURES_OK);
        assert_eq!(read(t, regs::STATUS), FEATURES_OK);
        assert_eq!(device.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
        // Features are frozen after FEATURES_OK.
        write(t, regs::DRIVER_FEATURES_SEL, 0);
        write(t, regs::DRIVER_FEATURES, 1 << 9);
        assert_eq!(t.driver_features, 1 << VIRTIO_F_VERSION_1);
        // FAILED is always accepted.
        write(t, regs::STATUS, FEATURES_OK | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(read(t, regs::STATUS), FEATURES_OK | VIRTIO_CONFIG_S_FAILED);
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_legacy_features() {
        let Fixture { mut transport, .. } = fixture();
        let t = &mut transport;
        write(t, regs::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write(
            t,
            regs::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        // An unoffered feature (bit 0).
        write(t, regs::DRIVER_FEATURES, 1);
        write(t, regs::DRIVER_FEATURES_SEL, 1);
        write(t, regs::DRIVER_FEATURES, 1);
        write(t, regs::STATUS, FEATURES_OK);
        assert_eq!(read(t, regs::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        // No VERSION_1.
        write(t, regs::DRIVER_FEATURES_SEL, 0);
        write(t, regs::DRIVER_FEATURES, 1 << 9);
        write(t, regs::DRIVER_FEATURES_SEL, 1);
        write(t, regs::DRIVER_FEATURES, 0);
        write(t, regs::STATUS, FEATURES_OK);
        assert_eq!(read(t, regs::STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    }

    #[test]
    fn queue_setup_and_activation() {
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        let t = &mut transport;
        // Queue registers are ignored before FEATURES_OK.
        write(t, regs::QUEUE_NUM, 4);
        assert_eq!(t.queue_configs()[0].size, 16);

        negotiate(t);
        write(t, regs::QUEUE_SEL, 0);
        assert_eq!(read(t, regs::QUEUE_NUM_MAX), 16);
        write(t, regs::QUEUE_SEL, 1);
        assert_eq!(read(t, regs::QUEUE_NUM_MAX), 8);
        write(t, regs::QUEUE_SEL, 2);
        assert_eq!(read(t, regs::QUEUE_NUM_MAX), 0);

        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 4, 0x2_0000);
        assert_eq!(read(t, regs::QUEUE_READY), 1);
        assert_eq!(
            t.queue_configs()[1],
            QueueConfig {
                max_size: 8,
                size: 4,
                ready: true,
                desc_table: 0x2_0000,
                avail_ring: 0x2_0200,
                used_ring: 0x2_0400,
            }
        );
        write(t, regs::STATUS, DRIVER_OK);
        assert_eq!(read(t, regs::STATUS), DRIVER_OK);

        let device = device.lock().unwrap();
        let queues = device.activated.as_ref().expect("device activated");
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[0].size(), 8);
        assert_eq!(queues[0].desc_table(), 0x1_0000);
        assert_eq!(queues[0].avail_ring(), 0x1_0200);
        assert_eq!(queues[0].used_ring(), 0x1_0400);
        assert!(queues[0].ready());
        assert_eq!(queues[1].size(), 4);
        assert_eq!(queues[1].desc_table(), 0x2_0000);
        assert_eq!(queues[1].used_ring(), 0x2_0400);
        assert!(!queues[1].event_idx_enabled());
    }

    #[test]
    fn bad_queue_sets_needs_reset() {
        let Fixture {
            mut transport,
            device,
            interrupt,
        } = fixture();
        let t = &mut transport;
        negotiate(t);
        setup_queue(t, 0, 8, 0x1_0000);
        // The second queue's rings lie outside guest RAM.
        setup_queue(t, 1, 4, 0x4000_0000);
        write(t, regs::STATUS, DRIVER_OK);
        assert_eq!(
            read(t, regs::STATUS),
            DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert!(!device.lock().unwrap().is_activated());
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        // The driver echoing NEEDS_RESET back does not clear it.
        write(t, regs::STATUS, DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_ne!(read(t, regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        write(t, regs::STATUS, 0);
        assert_eq!(read(t, regs::STATUS), 0);
    }

    #[test]
    fn unready_or_bad_size_queue_is_refused() {
        for (size, ready) in [(3, 1), (32, 1), (0, 1), (8, 0)] {
            let Fixture {
                mut transport,
                device,
                ..
            } = fixture();
            let t = &mut transport;
            negotiate(t);
            setup_queue(t, 0, 8, 0x1_0000);
            setup_queue(t, 1, size, 0x2_0000);
            write(t, regs::QUEUE_READY, ready);
            write(t, regs::STATUS, DRIVER_OK);
            assert_ne!(read(t, regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
            assert!(!device.lock().unwrap().is_activated());
        }
    }

    #[test]
    fn queues_after_the_last_ready_one_are_left_out_and_gaps_refused() {
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        device.lock().unwrap().min_queues = 1;
        let t = &mut transport;
        negotiate(t);
        setup_queue(t, 0, 8, 0x1_0000);
        write(t, regs::STATUS, DRIVER_OK);
        assert_eq!(read(t, regs::STATUS), DRIVER_OK);
        let queues = device.lock().unwrap().activated.as_ref().unwrap().len();
        assert_eq!(queues, 1, "the unset last queue was handed over");
        let state = transport.save();
        assert_eq!(state.active_queues.as_ref().unwrap().len(), 1);

        // The first queue unset, the second ready: a gap, refused.
        let t = &mut transport;
        negotiate(t);
        setup_queue(t, 1, 4, 0x2_0000);
        write(t, regs::STATUS, DRIVER_OK);
        assert_ne!(read(t, regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!device.lock().unwrap().is_activated());
    }

    #[test]
    fn a_state_saved_with_fewer_queues_restores_with_the_new_ones_unset() {
        // Saved before the device had its second queue, the driver using the first only.
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        device.lock().unwrap().min_queues = 1;
        negotiate(&mut transport);
        setup_queue(&mut transport, 0, 8, 0x1_0000);
        write(&mut transport, regs::STATUS, DRIVER_OK);
        let mut old = saved(&transport);
        old.queues.pop();
        assert_eq!(old.active_queues.as_ref().unwrap().len(), 1);

        let mut device = acked_device();
        device.min_queues = 1;
        let Fixture {
            transport: restored,
            device,
            ..
        } = restore(&transport.mem, device, &old).unwrap();
        assert_eq!(restored.queue_configs().len(), 2);
        assert_eq!(restored.queue_configs()[1], QueueConfig::new(QUEUE_MAX[1]));
        assert_eq!(device.lock().unwrap().activated.as_ref().unwrap().len(), 1);

        // More queues than the device has, or others, still do not fit.
        let mut more = old.clone();
        more.queues
            .extend([QueueConfig::new(8), QueueConfig::new(8)]);
        let err = restore(&transport.mem, acked_device(), &more)
            .err()
            .unwrap();
        assert!(matches!(err, MmioRestoreError::QueueLayout { .. }), "{err}");
    }

    #[test]
    fn device_activation_failure_sets_needs_reset() {
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        device.lock().unwrap().fail_activate = true;
        let t = &mut transport;
        negotiate(t);
        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 4, 0x2_0000);
        write(t, regs::STATUS, DRIVER_OK);
        assert_ne!(read(t, regs::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_returns_to_initial_state() {
        let Fixture {
            mut transport,
            device,
            interrupt,
        } = fixture();
        let t = &mut transport;
        negotiate(t);
        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 4, 0x2_0000);
        write(t, regs::STATUS, DRIVER_OK);
        interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        assert!(device.lock().unwrap().is_activated());

        write(t, regs::STATUS, 0);
        assert_eq!(read(t, regs::STATUS), 0);
        assert_eq!(read(t, regs::INTERRUPT_STATUS), 0);
        {
            let device = device.lock().unwrap();
            assert!(!device.is_activated());
            assert_eq!(device.resets, 1);
            assert_eq!(device.acked, 0);
        }
        assert_eq!(t.queue_configs()[0], QueueConfig::new(16));
        assert_eq!(t.queue_configs()[1], QueueConfig::new(8));
        assert_eq!(read(t, regs::QUEUE_READY), 0);

        // The device can be brought up again.
        negotiate(t);
        setup_queue(t, 0, 16, 0x3_0000);
        setup_queue(t, 1, 8, 0x4_0000);
        write(t, regs::STATUS, DRIVER_OK);
        let device = device.lock().unwrap();
        assert_eq!(device.activated.as_ref().unwrap()[0].desc_table(), 0x3_0000);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let Fixture {
            mut transport,
            interrupt,
            ..
        } = fixture();
        let t = &mut transport;
        interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        interrupt.trigger(VIRTIO_MMIO_INT_CONFIG).unwrap();
        assert_eq!(read(t, regs::INTERRUPT_STATUS), 3);
        write(t, regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read(t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(interrupt.irqfd().read().unwrap(), 2);
    }

    #[test]
    fn config_space_goes_to_the_device() {
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        let t = &mut transport;
        let mut b = [0u8; 2];
        t.read(regs::CONFIG + 2, &mut b);
        assert_eq!(b, [3, 4]);
        t.write(regs::CONFIG + 6, &[0xaa]);
        assert_eq!(device.lock().unwrap().config[6], 0xaa);
        let mut q = [0u8; 8];
        t.read(regs::CONFIG, &mut q);
        assert_eq!(q, [1, 2, 3, 4, 5, 6, 0xaa, 8]);
        t.notify_config_change();
        assert_eq!(read(t, regs::CONFIG_GENERATION), 1);
        assert_eq!(read(t, regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn queue_notify_falls_back_to_the_queue_eventfd() {
        let Fixture {
            mut transport,
            device,
            ..
        } = fixture();
        let t = &mut transport;
        write(t, regs::QUEUE_NOTIFY, 1);
        write(t, regs::QUEUE_NOTIFY, 7);
        let device = device.lock().unwrap();
        assert!(device.queue_evts[0].read().is_err());
        assert_eq!(device.queue_evts[1].read().unwrap(), 1);
    }

    #[test]
    fn narrow_register_accesses_are_ignored() {
        let Fixture { mut transport, .. } = fixture();
        let t = &mut transport;
        let mut b = [0xffu8; 2];
        t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        t.write(regs::STATUS, &[1]);
        assert_eq!(read(t, regs::STATUS), 0);
    }

    #[test]
    fn cmdline_arg_format() {
        assert_eq!(
            MmioTransport::cmdline_arg(0xd000_1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    /// The state of `t` after a trip through JSON.
    fn saved(t: &MmioTransport) -> MmioState {
        let json = serde_json::to_string(&t.save()).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    /// A fake device that accepted the fixture's features, as its own restore would give it.
    fn acked_device() -> FakeDevice {
        let mut device = FakeDevice::new();
        device.acked = FEATURES;
        device
    }

    /// Restores `state` around `device` on `mem`, with a new interrupt line.
    fn restore(
        mem: &GuestMemoryMmap,
        device: FakeDevice,
        state: &MmioState,
    ) -> Result<Fixture, MmioRestoreError> {
        let device = Arc::new(Mutex::new(device));
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let transport = MmioTransport::restore(
            MmioRestoreArgs {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                device: device.clone(),
            },
            state,
        )?;
        Ok(Fixture {
            device,
            interrupt,
            transport,
        })
    }

    /// A transport whose device runs, its queues moved on: (5, 3) and (65535, 65534).
    fn running() -> Fixture {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t);
        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 4, 0x2_0000);
        write(t, regs::STATUS, DRIVER_OK);
        {
            let mut device = f.device.lock().unwrap();
            let queues = device.activated.as_mut().unwrap();
            queues[0].set_next_avail(5);
            queues[0].set_next_used(3);
            queues[1].set_next_avail(u16::MAX);
            queues[1].set_next_used(u16::MAX - 1);
        }
        f.interrupt.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
        f
    }

    #[test]
    fn restore_in_the_middle_of_negotiation_lets_the_driver_go_on() {
        let Fixture { mut transport, .. } = fixture();
        let t = &mut transport;
        negotiate(t);
        setup_queue(t, 0, 8, 0x1_0000);
        write(t, regs::QUEUE_SEL, 1);
        write(t, regs::QUEUE_NUM, 4);
        write(t, regs::DEVICE_FEATURES_SEL, 1);
        write(t, regs::DRIVER_FEATURES_SEL, 1);
        t.notify_config_change();
        let state = saved(t);
        assert_eq!(state.active_queues, None);
        assert_eq!(state.interrupt_status, VIRTIO_MMIO_INT_CONFIG);
        let before = register_dump(t);

        let Fixture {
            transport: mut restored,
            device,
            interrupt,
        } = restore(&t.mem, acked_device(), &state).unwrap();
        assert_eq!(register_dump(&mut restored), before);
        assert_eq!(restored.save(), state);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        assert!(!device.lock().unwrap().is_activated());

        // The driver finishes queue 1 (still selected), then starts the device.
        let r = &mut restored;
        for (reg, addr) in [
            (regs::QUEUE_DESC_LOW, 0x2_0000),
            (regs::QUEUE_AVAIL_LOW, 0x2_0200),
            (regs::QUEUE_USED_LOW, 0x2_0400),
        ] {
            write(r, reg, addr);
        }
        write(r, regs::QUEUE_READY, 1);
        write(r, regs::STATUS, DRIVER_OK);
        assert_eq!(read(r, regs::STATUS), DRIVER_OK);
        let device = device.lock().unwrap();
        let queues = device.activated.as_ref().expect("device activated");
        assert_eq!(queues[0].desc_table(), 0x1_0000);
        assert_eq!(queues[0].size(), 8);
        assert_eq!(queues[1].used_ring(), 0x2_0400);
        assert_eq!(queues[1].size(), 4);
    }

    #[test]
    fn a_running_device_gets_its_queues_back_with_their_indices() {
        let Fixture { transport, .. } = running();
        let mut transport = transport;
        let state = saved(&transport);
        let queues = state.active_queues.clone().expect("running queues saved");
        assert_eq!((queues[0].next_avail, queues[0].next_used), (5, 3));
        assert_eq!(
            (queues[1].next_avail, queues[1].next_used),
            (u16::MAX, u16::MAX - 1)
        );
        assert_eq!(queues[1].config, transport.queue_configs()[1]);
        let before = register_dump(&mut transport);

        let Fixture {
            transport: mut restored,
            device,
            interrupt,
        } = restore(&transport.mem, acked_device(), &state).unwrap();
        {
            let device = device.lock().unwrap();
            let running = device.activated.as_ref().expect("device activated");
            let running: Vec<QueueRuntimeState> =
                running.iter().map(QueueRuntimeState::from).collect();
            assert_eq!(running, queues);
        }
        assert_eq!(register_dump(&mut restored), before);
        assert_eq!(restored.save(), state);
        // No interrupt is injected by the restore: the status bit waits for the driver.
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_VRING);
        assert!(interrupt.irqfd().read().is_err());
        // A reset works on the restored device as on any other.
        write(&mut restored, regs::STATUS, 0);
        assert!(!device.lock().unwrap().is_activated());
    }

    #[test]
    fn restore_refuses_queues_outside_memory_or_inconsistent_with_the_registers() {
        let Fixture { transport, .. } = running();
        let state = saved(&transport);
        let mem = &transport.mem;

        // The rings of queue 1 now lie beyond guest memory (a smaller destination VM).
        let mut outside = state.clone();
        outside.queues[1].desc_table = 0x4000_0000;
        outside.active_queues.as_mut().unwrap()[1].config.desc_table = 0x4000_0000;
        let err = restore(mem, acked_device(), &outside).err().unwrap();
        assert!(
            matches!(
                err,
                MmioRestoreError::Queue {
                    index: 1,
                    source: QueueSetupError::OutsideMemory { .. }
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("queue 1") && msg.contains("0x40000000") && msg.contains("guest memory"),
            "{msg}"
        );

        let mut registers = state.clone();
        registers.active_queues.as_mut().unwrap()[0].config.size = 4;
        let err = restore(mem, acked_device(), &registers).err().unwrap();
        assert!(
            matches!(err, MmioRestoreError::QueueRegisters { index: 0 }),
            "{err}"
        );

        let mut not_started = state.clone();
        not_started.status = FEATURES_OK;
        let err = restore(mem, acked_device(), &not_started).err().unwrap();
        assert!(matches!(err, MmioRestoreError::NotStarted { .. }), "{err}");

        let mut count = state.clone();
        count.active_queues.as_mut().unwrap().pop();
        let err = restore(mem, acked_device(), &count).err().unwrap();
        assert!(
            matches!(
                err,
                MmioRestoreError::ActiveQueueCount {
                    saved: 1,
                    queues: 2
                }
            ),
            "{err}"
        );

        // The device's accepted features are not those of the saved driver.
        let err = restore(mem, FakeDevice::new(), &state).err().unwrap();
        assert!(matches!(err, MmioRestoreError::Features { .. }), "{err}");

        let mut layout = state.clone();
        layout.queues[1].max_size = 16;
        let err = restore(mem, acked_device(), &layout).err().unwrap();
        assert!(matches!(err, MmioRestoreError::QueueLayout { .. }), "{err}");

        // The device activation failing is reported too.
        let mut refusing = acked_device();
        refusing.fail_activate = true;
        let err = restore(mem, refusing, &state).err().unwrap();
        assert!(matches!(err, MmioRestoreError::Activate(_)), "{err}");

        restore(mem, acked_device(), &state).unwrap();
    }

    #[test]
    fn restore_refuses_another_or_an_unknown_device_type() {
        let Fixture { transport, .. } = running();
        let state = saved(&transport);
        let mut net = acked_device();
        net.device_type = TYPE_NET;
        let err = restore(&transport.mem, net, &state).err().unwrap();
        assert!(
            matches!(
                err,
                MmioRestoreError::DeviceType {
                    saved: TYPE_BLOCK,
                    device: TYPE_NET
                }
            ),
            "{err}"
        );

        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains(r#""device":{"Block":"#), "{json}");
        let unknown = json.replace(r#""device":{"Block":"#, r#""device":{"Console":"#);
        let err = serde_json::from_str::<MmioState>(&unknown).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `Console`"),
            "{err}"
        );
    }

    #[test]
    fn ioevents_register_with_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let Fixture {
            transport, device, ..
        } = fixture();
        transport.register_ioevents(&vm, 0xd000_0000).unwrap();
        // Registering the same (address, datamatch) twice is refused by KVM: proof that each
        // queue got its own datamatch.
        let fd = device.lock().unwrap().queue_evts[1].try_clone().unwrap();
        let addr = IoEventAddress::Mmio(0xd000_0050);
        assert!(vm.register_ioevent(&fd, &addr, 1u32).is_err());
        vm.register_ioevent(&fd, &addr, 2u32).unwrap();
    }
}
