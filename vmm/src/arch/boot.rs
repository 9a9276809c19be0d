//! The Linux x86 boot protocol: `boot_params` (zero page) with the e820 map, command line
//! and initrd.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout;
use crate::vstate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Where the initrd was loaded.
#[derive(Debug, Clone, Copy)]
pub struct InitrdLocation {
    /// Guest physical address of the initrd.
    pub address: GuestAddress,
    /// Its size in bytes.
    pub size: usize,
}

/// Errors from writing the boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Too many e820 entries for `boot_params`.
    #[error("too many e820 entries")]
    E820Full,
    /// Writing `boot_params` into guest memory failed.
    #[error("cannot write the boot parameters: {0}")]
    WriteBootParams(linux_loader::configurator::Error),
}

fn add_e820_entry(params: &mut boot_params, addr: u64, size: u64) -> Result<(), BootError> {
    let i = params.e820_entries as usize;
    if i >= params.e820_table.len() {
        return Err(BootError::E820Full);
    }
    params.e820_table[i].addr = addr;
    params.e820_table[i].size = size;
    params.e820_table[i].r#type = E820_RAM;
    params.e820_entries += 1;
    Ok(())
}

/// Writes `boot_params` at [`layout::ZERO_PAGE_START`]: the kernel's own setup header when it
/// was a bzImage (else a minimal one), the command line, the initrd and the e820 map (RAM below
/// the EBDA, and everything from 1 MiB up, around the MMIO gap).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<InitrdLocation>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }

    add_e820_entry(&mut params, 0, layout::EBDA_START)?;
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(layout::HIMEM_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            add_e820_entry(&mut params, start, end - start)?;
        }
    }

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::WriteBootParams)
}

/// Where to put an initrd of `size` bytes: page-aligned, at the top of RAM below the MMIO gap
/// (and below 4 GiB, which `ramdisk_image` requires). `None` if it does not fit above the
/// kernel (`kernel_end`).
pub fn initrd_address(mem: &GuestMemoryMmap, kernel_end: u64, size: usize) -> Option<GuestAddress> {
    let low = mem.find_region(GuestAddress(0))?;
    let top = low.last_addr().raw_value() + 1;
    let addr = top.checked_sub(size as u64)? & !0xfff;
    (addr >= kernel_end).then_some(GuestAddress(addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_ram_around_the_gap() {
        let mem = create_guest_memory(layout::MMIO_GAP_START + (64 << 20)).unwrap();
        write_boot_params(&mem, None, 10, None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.e820_entries }, 3);
        assert_eq!({ params.e820_table[1].addr }, layout::HIMEM_START);
        assert_eq!(
            { params.e820_table[1].size },
            layout::MMIO_GAP_START - layout::HIMEM_START
        );
        assert_eq!({ params.e820_table[2].addr }, layout::MMIO_GAP_END);
        assert_eq!({ params.e820_table[2].size }, 64 << 20);
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = create_guest_memory(128 << 20).unwrap();
        let addr = initrd_address(&mem, 16 << 20, 5000).unwrap();
        assert_eq!(addr.raw_value() % 4096, 0);
        assert!(addr.raw_value() + 5000 <= 128 << 20);
        assert!(initrd_address(&mem, 127 << 20, 2 << 20).is_none());
    }
}
