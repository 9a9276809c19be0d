//! The Intel MultiProcessor table, through which the kernel finds the vCPUs, the IOAPIC and the
//! ISA interrupt routing (no ACPI in our microVMs).

use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout;
use crate::vstate::memory::GuestMemoryMmap;

const SMP_MAGIC_IDENT: [u8; 4] = *b"_MP_";
const MPC_SIGNATURE: [u8; 4] = *b"PCMP";
const MPC_SPEC: u8 = 4;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
// Family 6, model 0xa, stepping 0; FPU and APIC present.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: plain-old-data structs of integers with no padding (packed).
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}

/// Most vCPUs whose entries fit in the table's 1 KiB window.
pub const MAX_VCPUS: u8 = 32;

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can describe.
    #[error("at most {MAX_VCPUS} vCPUs are supported, {0} asked")]
    TooManyCpus(u8),
    /// Writing into guest memory failed.
    #[error("cannot write the MP table: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b))
}

/// Builds the MP table bytes for `num_cpus` vCPUs, to be placed at `base`.
fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for cpu in 0..num_cpus {
        let entry = MpcCpu {
            type_: MP_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            ..Default::default()
        };
        entries.extend_from_slice(entry.as_slice());
        count += 1;
    }
    let bus = MpcBus {
        type_: MP_BUS,
        busid: 0,
        bustype: *b"ISA   ",
    };
    entries.extend_from_slice(bus.as_slice());
    let ioapic = MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: layout::IOAPIC_ADDR as u32,
    };
    entries.extend_from_slice(ioapic.as_slice());
    count += 2;
    for irq in 0..=layout::IRQ_MAX as u8 {
        let src = MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_IRQ_SRC_INT,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        entries.extend_from_slice(src.as_slice());
        count += 1;
    }
    for (lint, kind) in [(0u8, MP_IRQ_SRC_EXTINT), (1u8, MP_IRQ_SRC_NMI)] {
        let src = MpcIntsrc {
            type_: MP_LINTSRC,
            irqtype: kind,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: 0,
            dstapic: 0xff,
            dstirq: lint,
        };
        entries.extend_from_slice(src.as_slice());
        count += 1;
    }

    let table_base = base + std::mem::size_of::<MpfIntel>() as u64;
    let mut table = MpcTable {
        signature: MPC_SIGNATURE,
        length: (std::mem::size_of::<MpcTable>() + entries.len()) as u16,
        spec: MPC_SPEC,
        oem: *b"VMR     ",
        productid: *b"MICROVM     ",
        oemcount: count,
        lapic: layout::APIC_ADDR as u32,
        ..Default::default()
    };
    table.checksum = 0u8
        .wrapping_sub(checksum(table.as_slice()))
        .wrapping_sub(checksum(&entries));

    let mut mpf = MpfIntel {
        signature: SMP_MAGIC_IDENT,
        physptr: table_base as u32,
        length: 1,
        specification: MPC_SPEC,
        ..Default::default()
    };
    mpf.checksum = 0u8.wrapping_sub(checksum(mpf.as_slice()));

    let mut out = Vec::new();
    out.extend_from_slice(mpf.as_slice());
    out.extend_from_slice(table.as_slice());
    out.extend_from_slice(&entries);
    out
}

/// Writes the MP table for `num_cpus` vCPUs at [`layout::MPTABLE_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let bytes = build(num_cpus, layout::MPTABLE_START);
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_table_fits() {
        for cpus in [1u8, 2, MAX_VCPUS] {
            let bytes = build(cpus, layout::MPTABLE_START);
            assert!(bytes.len() <= 1024, "{} bytes", bytes.len());
            assert_eq!(checksum(&bytes[..16]), 0);
            assert_eq!(checksum(&bytes[16..]), 0);
            assert_eq!(&bytes[16..20], b"PCMP");
        }
    }

    #[test]
    fn too_many_cpus_is_refused() {
        let mem = crate::vstate::memory::create_guest_memory(1 << 20).unwrap();
        assert!(setup_mptable(&mem, MAX_VCPUS + 1).is_err());
        assert!(setup_mptable(&mem, 2).is_ok());
    }
}
