//! Model-specific registers set at boot.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// The time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// KVM's paravirtual asynchronous page faults: where the guest takes them, and whether at all
/// (bit 0).
pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
/// [`MSR_KVM_ASYNC_PF_EN`]'s enable bit.
pub const KVM_ASYNC_PF_ENABLED: u64 = 1;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// Errors from building MSR lists.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The list could not be allocated.
    #[error("cannot build the MSR list: {0}")]
    Fam(vmm_sys_util::fam::Error),
}

/// The MSRs every vCPU starts with: syscall MSRs cleared, fast strings on, and MTRRs enabled
/// with write-back as the default type (otherwise all of RAM is uncached).
pub fn boot_msrs() -> Result<Msrs, MsrError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ])
    .map_err(MsrError::Fam)
}
