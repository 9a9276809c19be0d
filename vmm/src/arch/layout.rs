//! The x86_64 guest physical memory map and interrupt assignments used by vmr.

/// GDT (boot) location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (boot, empty) location.
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-map page tables: PML4, PDPT, then [`PDE_COUNT`] page directories of 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First page directory.
pub const PDE_START: u64 = 0xb000;
/// Page directories, 1 GiB each: the boot map covers the first 4 GiB.
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the MP table (in the last KiB of base memory, where the kernel scans for it).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional memory below 1 MiB usable as RAM (EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the hole below 4 GiB for MMIO devices, IOAPIC, LAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the hole (4 GiB): RAM continues here.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Virtio-mmio devices: one 4 KiB window each, from here.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC base address.
pub const APIC_ADDR: u64 = 0xfee0_0000;

/// Legacy COM1 port and IRQ.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1's IRQ line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 ports 0x60..=0x64.
pub const I8042_PORT: u64 = 0x60;
/// First IRQ line given to virtio-mmio devices (one each, upwards).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IRQ line usable by devices (IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
