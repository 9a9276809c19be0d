//! Live KVM state: guest memory, the VM and its vCPUs.

pub mod dirty;
pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vm;
