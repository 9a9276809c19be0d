//! Live KVM state: guest memory, the VM and its vCPUs.

pub mod memory;
