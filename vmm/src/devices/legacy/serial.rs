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

/// Console bytes held back, at most, before they are written out whatever comes next.
const CONSOLE_LINE_MAX: usize = 1024;

/// How long an enabled interrupt may stay pending, with the guest not touching the UART, before
/// it is raised again.
const STALLED_INTERRUPT: Duration = Duration::from_millis(100);

/// The interrupt enable register's offset.
const IER_OFFSET: u64 = 1;
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
    serial: Serial<T, NoEvents, ConsoleOut>,
    /// When the guest last read or wrote a register, or the interrupt was last raised again.
    last_activity: Instant,
}

impl<T: Trigger<E = std::io::Error>> SerialDevice<T> {
    /// A UART writing to `out`, interrupting through `irq`.
    pub fn new(irq: T, out: SerialOut) -> Self {
        Self {
            serial: Serial::new(irq, ConsoleOut::new(out)),
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

    /// Writes out console output held back (a line not finished yet). Called from the event
    /// loop, so nothing waits longer than its tick.
    pub fn flush_output(&mut self) {
        if let Err(e) = self.serial.writer_mut().write_out() {
            tracing::warn!("serial output failed: {e}");
        }
    }

    /// Feeds console input to the guest.
    pub fn enqueue_input(&mut self, input: &[u8]) -> std::io::Result<usize> {
        self.serial
            .enqueue_raw_bytes(input)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// The console's output, written a line at a time. The UART model writes and flushes every
/// byte the guest sends: one `write` per byte, each waking whoever reads the console (a
/// terminal, a log collector), which then competes with the vCPU still writing the line. Here
/// the bytes wait for the line's end, [`CONSOLE_LINE_MAX`] bytes, or [`ConsoleOut::write_out`]
/// (the guest's driver stopping, the event loop's tick, the device's end).
struct ConsoleOut {
    out: SerialOut,
    held: Vec<u8>,
}

impl ConsoleOut {
    fn new(out: SerialOut) -> Self {
        Self {
            out,
            held: Vec::with_capacity(CONSOLE_LINE_MAX),
        }
    }

    /// Writes out what is held back.
    fn write_out(&mut self) -> std::io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let result = self
            .out
            .write_all(&self.held)
            .and_then(|()| self.out.flush());
        self.held.clear();
        result
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.held.extend_from_slice(data);
        if data.contains(&b'\n') || self.held.len() >= CONSOLE_LINE_MAX {
            self.write_out()?;
        }
        Ok(data.len())
    }

    /// The UART model's flush after every byte: lines go out whole instead (see [`Self::write`]).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
        let serial = Serial::from_state(&uart, irq, NoEvents, ConsoleOut::new(out))
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
            // The guest's driver writes IER when it stops transmitting (the interrupt-driven
            // driver turns "transmitter empty" off, the kernel console puts IER back): what it
            // wrote goes out now, a prompt without a line end too.
            if offset == IER_OFFSET {
                self.flush_output();
            }
        }
    }
}

impl<T: Trigger<E = std::io::Error>> Drop for SerialDevice<T> {
    fn drop(&mut self) {
        self.flush_output();
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

    /// A console output whose bytes, and the writes they came in, the test can see.
    #[derive(Clone, Default)]
    struct Seen(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl Seen {
        fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for Seen {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(data.to_vec());
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_output_goes_out_a_line_at_a_time() {
        let seen = Seen::default();
        let mut dev = SerialDevice::new(EventFdTrigger::new().unwrap(), Box::new(seen.clone()));
        for b in b"VMR-TICK\nprompt# " {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            seen.writes(),
            vec![b"VMR-TICK\n".to_vec()],
            "one write per line"
        );
        // The driver stops transmitting (turns "transmitter empty" off): the prompt goes too.
        dev.write(1, &[IER_RX_DATA]);
        assert_eq!(seen.writes()[1..], [b"prompt# ".to_vec()]);

        dev.write(0, b"x");
        dev.flush_output();
        assert_eq!(seen.writes()[2..], [b"x".to_vec()], "the event loop's tick");
        dev.flush_output();
        assert_eq!(seen.writes().len(), 3, "nothing held: nothing written");

        for _ in 0..CONSOLE_LINE_MAX {
            dev.write(0, b"y");
        }
        assert_eq!(
            seen.writes()[3].len(),
            CONSOLE_LINE_MAX,
            "a long line in pieces"
        );
        dev.write(0, b"z");
        drop(dev);
        assert_eq!(
            seen.writes()[4..],
            [b"z".to_vec()],
            "written out at the end"
        );
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
