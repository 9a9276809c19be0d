//! Emulated devices: the buses they sit on, legacy PC devices and virtio devices.

pub mod bus;
pub mod legacy;
pub mod replication;
pub mod virtio;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use self::legacy::i8042::{I8042State, I8042};
use self::legacy::serial::{SerialDevice, SerialState};
use self::legacy::EventFdTrigger;
use self::virtio::mmio::MmioState;
use crate::persist::Persist;
use crate::vstate::vcpu::VmRunState;

/// The saved state of every device of a microVM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices with their transports, in MMIO order.
    pub virtio: Vec<MmioState>,
}

impl DevicesState {
    /// The legacy devices as a machine is built with them, and no virtio device.
    pub fn power_on() -> std::io::Result<Self> {
        let serial = SerialDevice::new(EventFdTrigger::new()?, Box::new(std::io::sink()));
        let i8042 = I8042::new(Arc::new(VmRunState::new()?));
        Ok(Self {
            serial: serial.save(),
            i8042: i8042.save(),
            virtio: Vec::new(),
        })
    }
}
