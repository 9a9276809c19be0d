//! The 8250 UART at COM1, console of the guest, written to stdout or a file.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};

use super::IrqLineTrigger;
use crate::devices::bus::BusDevice;
use crate::persist::Persist;

/// Where the console goes.
pub type SerialOut = Box<dyn Write + Send>;

/// How long an enabled interrupt may stay pending, with the guest not touching the UART, before
/// it is raised again.
const STALLED_INTERRUPT: Duration = Duration::from_millis(100);

/// IIR bit 0: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IIR identification of "transmitter holding register empty", and its IER enable bit.
const IIR_THR_EMPTY: u8 = 0x02;
const IER_THR_EMPTY: u8 = 0x02;
/// IIR identification of "received data available", and its IER enable bit.
const IIR_RX_DATA: u8 = 0x04;
const IER_RX_DATA: u8 = 0x01;

/// COM1 on the port I/O bus; interrupts go out through `T`, pulses on IRQ 4.
///
/// A real UART's interrupt output is a level, held while an enabled condition is pending. Here it
/// is an edge (a pulse on an edge-triggered IOAPIC pin), and KVM drops an edge that arrives
/// while the guest has the pin masked. The guest driver then waits forever for a "transmitter
/// empty" interrupt that never comes: console output stops, and what was buffered is lost when
/// the tty is hung up. [`SerialDevice::raise_stalled_interrupt`] gives the level back.
pub struct SerialDevice<T: Trigger<E = std::io::Error> = IrqLineTrigger> {
    serial: Serial<T, NoEvents, SerialOut>,
    /// When the guest last read or wrote a register, or the interrupt was last raised again.
    last_activity: Instant,
}

impl<T: Trigger<E = std::io::Error>> SerialDevice<T> {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: T, out: SerialOut) -> Self {
        Self {
            serial: Serial::new(irq, out),
            last_activity: Instant::now(),
        }
    }

    /// Raises the interrupt again if an enabled one has been pending, unanswered, for
    /// [`STALLED_INTERRUPT`]. Called from the event loop while the vCPUs run.
    pub fn raise_stalled_interrupt(&mut self) {
        if self.last_activity.elapsed() >= STALLED_INTERRUPT {
            self.raise_pending_interrupt();
        }
    }

    /// Raises the interrupt again if an enabled one is pending: after a restore or a migration,
    /// where the one raised before the source stopped may never have reached the guest.
    pub fn raise_pending_interrupt(&mut self) {
        let state = self.serial.state();
        let (iir, ier) = (state.interrupt_identification, state.interrupt_enable);
        let pending = iir & IIR_NONE == 0
            && ((iir & IIR_THR_EMPTY != 0 && ier & IER_THR_EMPTY != 0)
                || (iir & IIR_RX_DATA != 0 && ier & IER_RX_DATA != 0));
        if pending {
            tracing::debug!("serial: an enabled interrupt is pending, raising it again");
            if let Err(e) = self.serial.interrupt_evt().trigger() {
                tracing::warn!("serial: cannot raise the interrupt: {e}");
            }
        }
        self.last_activity = Instant::now();
    }

    /// Feeds console input to the guest.
    pub fn enqueue_input(&mut self, input: &[u8]) -> std::io::Result<usize> {
        self.serial
            .enqueue_raw_bytes(input)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The saved registers and receive FIFO of the UART (vm-superio's `SerialState`, which has no
/// serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// Why a UART state cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("cannot restore the serial port: {0}")]
pub struct SerialRestoreError(String);

impl<T: Trigger<E = std::io::Error>> Persist for SerialDevice<T> {
    type State = SerialState;
    type ConstructorArgs = (T, SerialOut);
    type Error = SerialRestoreError;

    fn save(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore((irq, out): (T, SerialOut), s: &SerialState) -> Result<Self, SerialRestoreError> {
        let uart = UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let serial = Serial::from_state(&uart, irq, NoEvents, out)
            .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(Self {
            serial,
            last_activity: Instant::now(),
        })
    }
}

impl<T: Trigger<E = std::io::Error> + Send> BusDevice for SerialDevice<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.last_activity = Instant::now();
        if data.len() == 1 {
            data[0] = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.last_activity = Instant::now();
        if data.len() == 1 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e}");
            }
        }
    }
}

impl<T: Trigger<E = std::io::Error>> Drop for SerialDevice<T> {
    fn drop(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::EventFdTrigger;

    type SerialDevice = super::SerialDevice<EventFdTrigger>;

    #[test]
    fn state_round_trip_keeps_registers_and_input() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(std::io::sink()));
        dev.write(3, &[0x80]); // DLAB
        dev.write(0, &[0x0c]);
        dev.write(3, &[0x03]);
        dev.write(7, &[0x5a]);
        dev.enqueue_input(b"hi").unwrap();
        let state = dev.save();
        let json = serde_json::to_string(&state).unwrap();
        let state: SerialState = serde_json::from_str(&json).unwrap();
        let args = (
            EventFdTrigger::new().unwrap(),
            Box::new(std::io::sink()) as SerialOut,
        );
        let mut restored = SerialDevice::restore(args, &state).unwrap();
        assert_eq!(restored.save(), dev.save());
        let mut b = [0u8];
        restored.read(0, &mut b);
        assert_eq!(b[0], b'h');
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
    }

    /// Whether the interrupt was raised since the last call (drains the eventfd).
    fn raised(dev: &SerialDevice) -> bool {
        dev.serial.interrupt_evt().0.read().is_ok()
    }

    #[test]
    fn an_unanswered_interrupt_is_raised_again() {
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(std::io::sink()));
        dev.write(1, &[IER_THR_EMPTY]);
        assert!(raised(&dev), "enabling THRE interrupts raises one");
        dev.raise_stalled_interrupt();
        assert!(
            !raised(&dev),
            "not raised again while the guest is still busy"
        );
        dev.last_activity -= STALLED_INTERRUPT;
        dev.raise_stalled_interrupt();
        assert!(raised(&dev), "raised again once it went unanswered");

        let mut iir = [0u8];
        dev.read(2, &mut iir);
        assert_eq!(iir[0] & IIR_THR_EMPTY, IIR_THR_EMPTY);
        dev.last_activity -= STALLED_INTERRUPT;
        dev.raise_stalled_interrupt();
        assert!(!raised(&dev), "answered (IIR read): nothing to raise");

        dev.write(0, b"x");
        dev.write(1, &[0]);
        let _ = raised(&dev);
        dev.last_activity -= STALLED_INTERRUPT;
        dev.raise_stalled_interrupt();
        assert!(!raised(&dev), "pending but disabled: nothing to raise");
    }

    #[test]
    fn an_overfull_fifo_is_refused() {
        let dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(std::io::sink()));
        let mut state = dev.save();
        state.in_buffer = vec![0; 4096];
        let args = (
            EventFdTrigger::new().unwrap(),
            Box::new(std::io::sink()) as SerialOut,
        );
        assert!(SerialDevice::restore(args, &state).is_err());
    }
}
