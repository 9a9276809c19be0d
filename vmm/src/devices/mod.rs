//! Emulated devices: the buses they sit on, legacy PC devices and virtio devices.

pub mod bus;
pub mod legacy;
pub mod virtio;

use serde::{Deserialize, Serialize};

use self::legacy::i8042::I8042State;
use self::legacy::serial::SerialState;
use self::virtio::mmio::MmioState;

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
