//! Boot-time vCPU registers: long mode with an identity map, the GDT, FPU and LAPIC LINTs.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::vstate::memory::GuestMemoryMmap;

// Control register and EFER bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

// LAPIC registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors from setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// `KVM_GET_SREGS` failed.
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    /// `KVM_GET_LAPIC` failed.
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(kvm_ioctls::Error),
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
}

/// A GDT entry from its flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// The boot GDT: null, 64-bit code, data, TSS.
const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` a GDT entry describes, loaded with selector `index * 8`.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Writes the boot GDT, an empty IDT and identity-mapping page tables (the first 4 GiB, MMIO
/// gap included, in 2 MiB pages) into guest memory.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(RegsError::GuestMemory)?;
    mem.write_obj(layout::PDPTE_START | 0x03, GuestAddress(layout::PML4_START))
        .map_err(RegsError::GuestMemory)?;
    for pd in 0..layout::PDE_COUNT {
        let pd_addr = layout::PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x03, GuestAddress(layout::PDPTE_START + pd * 8))
            .map_err(RegsError::GuestMemory)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            let page = ((pd << 9) + i) << 21;
            mem.write_obj(page | 0x83, GuestAddress(pd_addr + i * 8))
                .map_err(RegsError::GuestMemory)?;
        }
    }
    Ok(())
}

/// Puts the vCPU in 64-bit long mode with the boot GDT and page tables.
pub fn setup_long_mode_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// Sets the general-purpose registers for entry at `rip` with `rsi` pointing at the boot
/// parameters (Linux 64-bit boot protocol).
pub fn setup_regs(vcpu: &VcpuFd, rip: u64, rsi: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Default x87 control word and MXCSR.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

fn lapic_reg(state: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would leave them.
pub fn setup_lints(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(RegsError::GetLapic)?;
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT0,
        set_apic_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT1,
        set_apic_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(RegsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_code_segment_is_64_bit() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.type_, 0xb);
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!(tss.s, 0);
        assert_eq!(tss.selector, 0x18);
    }
}
