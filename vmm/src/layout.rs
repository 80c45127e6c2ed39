//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT, IDT
//! 0x0000_7000  boot_params (the zero page)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  page tables: PML4, PDPT, 4 PDs (identity map of 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 0x10_0000: reserved; RSDP at 0xe_0000, ACPI tables after it
//! 0x0010_0000  kernel (bzImage protected-mode part or ELF), then RAM
//!   ... RAM up to 3 GiB
//! 0xc000_0000  32-bit PCI BAR window (512 MiB)
//! 0xe000_0000  PCI ECAM (bus 0: 1 MiB; 256 MiB reserved)
//! 0xfec0_0000  IOAPIC,  0xfee0_0000 LAPIC
//! 0x1_0000_0000 RAM above 4 GiB, then the 64-bit PCI BAR window
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Identity-mapped at boot: enough for the kernel, boot_params, command line
/// and initramfs wherever they are below 4 GiB.
pub const IDENTITY_MAP_GIB: u64 = 4;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const RSDP_START: u64 = 0xe0000;
pub const ACPI_TABLES_START: u64 = 0xe1000;
pub const ACPI_TABLES_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;

pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_RESERVED: u64 = 0x1000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) sits just below the IOAPIC, inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The 64-bit BAR window starts at this alignment after the end of RAM.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// I/O port window for PCI I/O BARs (inside the DSDT's 0x0d00..0xffff range).
pub const PCI_IO_START: u64 = 0xc000;
pub const PCI_IO_SIZE: u64 = 0x4000;
