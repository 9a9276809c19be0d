//! What this host's KVM can run: hardware virtualization (VT-x/AMD-V) boots stock Linux
//! guests; PVM ("pagetable-based" KVM, no VT-x/AMD-V) runs only PVM-aware guest kernels, and a
//! stock kernel would hang there at boot.

use std::path::Path;

/// The kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// KVM backed by VT-x or AMD-V.
    Hardware,
    /// KVM backed by PVM (the `kvm_pvm` module).
    Pvm,
    /// No usable `/dev/kvm`.
    Missing,
}

/// Probes `/dev/kvm` and the KVM modules loaded.
pub fn probe() -> HostKvm {
    if !Path::new("/dev/kvm").exists() {
        return HostKvm::Missing;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return HostKvm::Pvm;
    }
    HostKvm::Hardware
}

/// Errors that refuse to boot a stock Linux guest on this host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The host's KVM is PVM.
    #[error(
        "this host's KVM is PVM (module kvm_pvm, no VT-x/AMD-V): a stock Linux guest kernel \
         would hang at boot here. Run vmr inside the lab, an emulated host with hardware \
         virtualization: `images/lab -- vmr run ...` (see README.md), or pass --allow-pvm if \
         the guest kernel is PVM-enabled"
    )]
    Pvm,
    /// There is no `/dev/kvm`.
    #[error(
        "/dev/kvm is missing: this host has no KVM. Load kvm-intel or kvm-amd, or run vmr \
         inside the lab: `images/lab -- vmr run ...` (see README.md)"
    )]
    NoKvm,
}

/// Refuses hosts that cannot boot a stock Linux guest, unless `allow_pvm` is set and the host
/// is PVM.
pub fn check_linux_guest_support(allow_pvm: bool) -> Result<HostKvm, HostError> {
    match probe() {
        HostKvm::Hardware => Ok(HostKvm::Hardware),
        HostKvm::Pvm if allow_pvm => Ok(HostKvm::Pvm),
        HostKvm::Pvm => Err(HostError::Pvm),
        HostKvm::Missing => Err(HostError::NoKvm),
    }
}
