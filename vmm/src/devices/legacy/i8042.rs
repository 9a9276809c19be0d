//! A minimal i8042 keyboard controller: enough for Linux's driver to probe it quickly (control
//! register, self tests) and for a guest booted with `reboot=k` to reset the machine (command
//! `0xFE`, or bit 0 cleared through "write output port"), which ends the VM cleanly. There is no
//! keyboard behind it: keyboard commands are acknowledged and nothing else happens.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::devices::bus::BusDevice;
use crate::persist::Persist;
use crate::vstate::vcpu::{ExitReason, VmRunState};

/// Offset of the data port (0x60) from the device base.
const OFFSET_DATA: u64 = 0;
/// Offset of the status/command port (0x64) from the device base.
const OFFSET_COMMAND: u64 = 4;

// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
/// Keyboard not inhibited (the "keylock" switch is open).
const SB_KBD_UNLOCKED: u8 = 0x10;
const SB_LAST_WAS_COMMAND: u8 = 0x08;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Control register bits.
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
const KBD_ACK: u8 = 0xfa;
/// Output port with the "system reset" line (bit 0) high and A20 (bit 1) enabled.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

/// What the next write to the data port is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataTarget {
    /// A keyboard command (acknowledged).
    Keyboard,
    /// The control register (after `0x60`).
    ControlRegister,
    /// The output port (after `0xD1`).
    OutputPort,
}

/// The saved state of the [`I8042`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Control register.
    pub control: u8,
    /// Bytes waiting to be read from the data port.
    pub output: Vec<u8>,
    /// What the next data-port write is for.
    pub data_target: DataTarget,
}

/// The i8042 on ports 0x60..=0x64.
pub struct I8042 {
    run_state: Arc<VmRunState>,
    status: u8,
    control: u8,
    output: VecDeque<u8>,
    data_target: DataTarget,
}

impl I8042 {
    /// An i8042 that ends the VM (`run_state`) when the guest resets the machine.
    pub fn new(run_state: Arc<VmRunState>) -> Self {
        Self {
            run_state,
            status: SB_SYSTEM_FLAG | SB_KBD_UNLOCKED,
            control: 0,
            output: VecDeque::new(),
            data_target: DataTarget::Keyboard,
        }
    }

    fn push(&mut self, byte: u8) {
        self.output.push_back(byte);
        self.status |= SB_OUT_DATA_AVAIL;
    }

    /// Ends the VM at once, on the vCPU thread that asked: it must not run on (a guest that
    /// sees no reset soon tries the next method and ends in a triple fault).
    fn reset_machine(&self) {
        tracing::info!("guest reset the machine");
        self.run_state.request_exit(ExitReason::Reset);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR => self.data_target = DataTarget::ControlRegister,
            CMD_DISABLE_AUX => self.control |= CTR_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CTR_AUX_DISABLED,
            CMD_DISABLE_KBD => self.control |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CTR_KBD_DISABLED,
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(PORT_TEST_OK),
            CMD_READ_OUTPUT_PORT => self.push(OUTPUT_PORT_DEFAULT),
            CMD_WRITE_OUTPUT_PORT => self.data_target = DataTarget::OutputPort,
            CMD_RESET_CPU => self.reset_machine(),
            other => tracing::debug!("i8042: ignoring command {other:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match std::mem::replace(&mut self.data_target, DataTarget::Keyboard) {
            DataTarget::ControlRegister => self.control = byte,
            // Pulling the reset line (bit 0) low resets the machine.
            DataTarget::OutputPort if byte & 0x01 == 0 => self.reset_machine(),
            DataTarget::OutputPort => {}
            // No keyboard: acknowledge its commands so that nothing waits for it.
            DataTarget::Keyboard => self.push(KBD_ACK),
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type ConstructorArgs = Arc<VmRunState>;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output: self.output.iter().copied().collect(),
            data_target: self.data_target,
        }
    }

    fn restore(run_state: Arc<VmRunState>, state: &I8042State) -> Result<Self, Self::Error> {
        Ok(Self {
            run_state,
            status: state.status,
            control: state.control,
            output: state.output.iter().copied().collect(),
            data_target: state.data_target,
        })
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            OFFSET_COMMAND => self.status,
            OFFSET_DATA => {
                let byte = self.output.pop_front().unwrap_or(0);
                if self.output.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                }
                byte
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            OFFSET_COMMAND => self.command(data[0]),
            OFFSET_DATA => self.data(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn linux_probe_sequence() {
        let mut dev = I8042::new(run_state());
        assert_eq!(read(&mut dev, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x47]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, OFFSET_DATA), 0x47);
        dev.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, OFFSET_DATA), SELF_TEST_OK);
        dev.write(OFFSET_COMMAND, &[CMD_TEST_KBD]);
        assert_eq!(read(&mut dev, OFFSET_DATA), PORT_TEST_OK);
        dev.write(OFFSET_DATA, &[0xf2]);
        assert_eq!(read(&mut dev, OFFSET_DATA), KBD_ACK);
        assert_eq!(read(&mut dev, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);
    }

    fn run_state() -> Arc<VmRunState> {
        Arc::new(VmRunState::new().unwrap())
    }

    #[test]
    fn reset_by_command_and_by_output_port() {
        let mut dev = I8042::new(run_state());
        dev.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(dev.run_state.exit_reason(), Some(ExitReason::Reset));
        assert!(dev.run_state.stop_requested());

        let mut dev = I8042::new(run_state());
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFFSET_DATA, &[OUTPUT_PORT_DEFAULT]);
        assert!(
            !dev.run_state.stop_requested(),
            "no reset while the line stays high"
        );
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(OFFSET_DATA, &[0x02]);
        assert_eq!(dev.run_state.exit_reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn state_round_trip_mid_command() {
        let mut dev = I8042::new(run_state());
        dev.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        let state = dev.save();
        let json = serde_json::to_string(&state).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        let mut restored = I8042::restore(run_state(), &state).unwrap();
        assert_eq!(restored.save(), dev.save());
        assert_eq!(read(&mut restored, OFFSET_DATA), SELF_TEST_OK);
        restored.write(OFFSET_DATA, &[0x61]);
        restored.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut restored, OFFSET_DATA), 0x61);
    }
}
