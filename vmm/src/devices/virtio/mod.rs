//! Virtio devices over the virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] wraps it, sits on the MMIO
//! bus (driven by vCPU exits) and hands it its queues on `DRIVER_OK`. Queue notifications reach
//! the device through ioeventfds registered with KVM, and the device is an event-manager
//! subscriber processed on the monitor's event-loop thread. Interrupts go out through an irqfd.
//!
//! **Save and restore.** [`mmio::MmioState`] holds a device's whole guest-visible state: the
//! transport registers, the queues (their registers and, once the device runs, their indices)
//! and the device's own state ([`VirtioDeviceState`]). The caller restores the device first
//! (`Block` or `Net` through [`crate::persist::Persist`]), registers it with the event loop,
//! then restores the transport around it, which hands the device its rebuilt queues.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use event_manager::MutEventSubscriber;
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;
use block::BlockState;
use mmio::QueueRuntimeState;
use virtio_net_tap::NetState;

pub mod block;
pub mod mmio;
pub mod net;

/// Virtio device type IDs (virtio spec 5).
pub const TYPE_NET: u32 = 1;
/// Block device type ID.
pub const TYPE_BLOCK: u32 = 2;

/// `VIRTIO_F_VERSION_1`: modern (1.0+) device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bit: a used buffer was returned.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver handed over.
        got: usize,
    },
    /// Signalling the event loop failed.
    #[error("cannot signal the device activation: {0}")]
    ActivateEvent(std::io::Error),
    /// A device-specific failure.
    #[error("{0}")]
    Device(String),
}

/// The interrupt line of one virtio-mmio device: the `InterruptStatus` register and the irqfd
/// that KVM routes to the device's GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// A line signalled through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `kind` (`VIRTIO_MMIO_INT_*`) in the status register and injects the interrupt.
    pub fn trigger(&self, kind: u32) -> std::io::Result<()> {
        self.status.fetch_or(kind, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears the status register (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets the status register to saved `bits`, without injecting anything: an interrupt that
    /// was pending at save time is in the saved interrupt controller state.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The irqfd, for registration with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: MutEventSubscriber + Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled by KVM when the driver writes `QueueNotify`.
    fn queue_events(&self) -> &[EventFd];
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted.
    fn acked_features(&self) -> u64;
    /// Records the features the driver accepted (only those offered are kept).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] has run since the last reset.
    fn is_activated(&self) -> bool;
    /// Stops the device (driver wrote 0 to `Status`); returns to the pre-activation state.
    fn reset(&mut self);
    /// Makes the guest known on the host's network after it moved here (network devices);
    /// returns whether the device's configuration changed, which the transport then signals.
    fn announce(&mut self) -> bool {
        false
    }
    /// How the disk image behind the device stands now (block devices).
    fn disk_health(&self) -> Option<crate::api::DiskHealth> {
        None
    }
    /// The queues the device runs on, in queue order; empty if it is not activated.
    fn queue_states(&self) -> Vec<QueueRuntimeState>;
    /// The device's own state (what its `Persist::save` returns), for the transport's state.
    fn device_state(&self) -> VirtioDeviceState;
    /// Turns replication on or off on the device and returns its port, if it has anything to
    /// replicate beyond guest memory (see [`crate::devices::replication`]).
    fn set_replication(
        &mut self,
        _mode: crate::devices::replication::ReplicationMode,
    ) -> Option<crate::devices::replication::DevicePort> {
        None
    }
}

/// The saved state of the device behind a transport, by device type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A virtio-blk device.
    Block(BlockState),
    /// A virtio-net device.
    Net(NetState),
}

impl VirtioDeviceState {
    /// The virtio device type (`TYPE_*`) of the saved device.
    pub fn device_type(&self) -> u32 {
        match self {
            VirtioDeviceState::Block(_) => TYPE_BLOCK,
            VirtioDeviceState::Net(_) => TYPE_NET,
        }
    }
}
