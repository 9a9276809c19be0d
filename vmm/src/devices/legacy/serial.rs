//! The 8250 UART at COM1, console of the guest, written to stdout or a file.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// Where the console goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1 on the port I/O bus; interrupts go out through an irqfd on IRQ 4.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: EventFdTrigger, out: SerialOut) -> Self {
        Self {
            serial: Serial::new(irq, out),
        }
    }

    /// The interrupt EventFd, to register as an irqfd.
    pub fn irq_evt(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.serial.interrupt_evt().0
    }

    /// Feeds console input to the guest.
    pub fn enqueue_input(&mut self, input: &[u8]) -> std::io::Result<usize> {
        self.serial
            .enqueue_raw_bytes(input)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e}");
            }
        }
    }
}

impl Drop for SerialDevice {
    fn drop(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}
