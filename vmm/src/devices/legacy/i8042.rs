//! The i8042 keyboard controller, present so that a guest booted with `reboot=k` can reset the
//! machine (command `0xFE` on port 0x64), which ends the VM cleanly.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// The i8042 on ports 0x60..=0x64.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// An i8042 that signals `reset_evt` when the guest resets the machine.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            device: I8042Device::new(reset_evt),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.device.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.device.write(offset as u8, data[0]) {
                tracing::warn!("cannot signal the i8042 reset: {e}");
            }
        }
    }
}
