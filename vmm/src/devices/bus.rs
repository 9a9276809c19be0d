//! Address buses (port I/O and MMIO): ranges mapped to devices, dispatched from vCPU exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable from a vCPU through port I/O or MMIO.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

#[derive(Clone)]
struct BusRange {
    base: u64,
    len: u64,
}

/// A set of non-overlapping address ranges, each owned by a device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (BusRange, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(_, (r, _))| r.base + r.len > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (BusRange { base, len }, device));
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (_, (range, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - range.base < range.len).then_some((addr - range.base, dev))
    }

    /// Dispatches a read; returns false when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("bus device lock poisoned")
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("bus device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x10, 8).unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(100))), 0x20, 8)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x14, 8).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x1c, 8).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x20, &[7]));
        assert!(bus.read(0x21, &mut b));
        assert_eq!(b[0], 8);
        assert!(!bus.read(0x18, &mut b));
        assert!(!bus.read(0x28, &mut b));
    }
}
