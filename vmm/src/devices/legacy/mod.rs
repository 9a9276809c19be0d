//! Legacy PC devices on the port I/O bus: the 8250 serial console and the i8042 (reset only).

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

pub mod i8042;
pub mod serial;

/// A `vm_superio::Trigger` backed by an EventFd (an irqfd, or where a test sees the interrupts).
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

/// A `vm_superio::Trigger` that pulses an edge-triggered line of KVM's in-kernel irqchip with
/// `KVM_IRQ_LINE`, from the calling thread: the interrupt is in the irqchip when the call
/// returns. (KVM injects an irqfd on such a line from a kernel worker thread: one more thread
/// to wait for on a busy CPU, and a console line takes two or three interrupts.)
#[derive(Debug)]
pub struct IrqLineTrigger {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl IrqLineTrigger {
    /// A trigger for line `gsi` of `vm`'s irqchip.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        Self { vm, gsi }
    }
}

impl vm_superio::Trigger for IrqLineTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        let pulse = |level| {
            self.vm
                .set_irq_line(self.gsi, level)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        pulse(true).and_then(|()| pulse(false))
    }
}
