//! Legacy PC devices on the port I/O bus: the 8250 serial console and the i8042 (reset only).

use vmm_sys_util::eventfd::EventFd;

pub mod i8042;
pub mod serial;

/// A `vm_superio::Trigger` backed by an EventFd (an irqfd, or the monitor's reset event).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    /// A new non-blocking EventFd trigger.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}
