//! The CPUID each vCPU sees: what KVM supports, with its APIC ID, the topology of the VM and the
//! hypervisor bit.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE: u32 = 0x8000_0008;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
/// `tsc_deadline`: KVM emulates the LAPIC's TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`),
/// which KVM does not report in its supported CPUID. Announcing it spares the guest the
/// calibration of the LAPIC timer against the PIT (a second or more when nested).
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    let core_bits = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(index) << 24)
                    | (u32::from(count) << 16)
                    | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1 in EAX[31:26]; one thread per core shares each cache.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((u32::from(count) - 1) << 26);
                entry.eax &= !(0xfff << 14);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = u32::from(index);
                match entry.index {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    // Core level: all vCPUs in one package.
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZE => {
                // NC: number of cores - 1, and the APIC ID size.
                entry.ecx = (core_bits << 12) | (u32::from(count) - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_topology_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xdead_0000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                index: 1,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut cpuid, 1, 2, true);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 1);
        assert_eq!((e[0].ebx >> 16) & 0xff, 2);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[1].ebx, 2);
        assert_eq!(e[1].eax, 1);
        assert_eq!(e[1].edx, 1);
    }
}
