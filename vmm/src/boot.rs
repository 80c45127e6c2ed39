//! Loading Linux and the state the 64-bit boot protocol expects: the kernel
//! and initramfs in memory, boot_params with the e820 map and command line,
//! an identity-mapped page table and a flat GDT.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader, KernelLoaderResult};
use thiserror::Error;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config::BootFiles;
use crate::layout::*;
use crate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// bzImage's 64-bit entry point is this far past its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("no kernel to boot (a migration destination boots what its source sent)")]
    NoKernel,
    #[error("cannot read the kernel: {0}")]
    ReadKernel(std::io::Error),
    #[error("cannot load the kernel: {0}")]
    LoadKernel(loader::Error),
    #[error("cannot read the initramfs: {0}")]
    Initramfs(std::io::Error),
    #[error("the initramfs ({0} bytes) does not fit in guest memory below the kernel's limit")]
    InitramfsTooLarge(u64),
    #[error("the kernel command line is too long or invalid: {0}")]
    Cmdline(String),
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(String),
}

/// Where the vCPU 0 starts.
#[derive(Debug, Clone, Copy)]
pub struct EntryPoint(pub GuestAddress);

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::Memory(e.to_string())
}

/// Load a bzImage or an ELF vmlinux, its initramfs and command line; write
/// boot_params. Returns the 64-bit entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    files: &BootFiles,
    cmdline: &str,
    mem_size: u64,
) -> Result<EntryPoint, BootError> {
    let mut f = from_start(&files.kernel).map_err(BootError::ReadKernel)?;
    let (result, entry) =
        match loader::elf::Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => {
                let entry = r.kernel_load;
                (r, entry)
            }
            Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
                let r = loader::bzimage::BzImage::load(
                    mem,
                    None,
                    &mut f,
                    Some(GuestAddress(HIMEM_START)),
                )
                .map_err(BootError::LoadKernel)?;
                let entry = r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET);
                (r, entry)
            }
            Err(e) => return Err(BootError::LoadKernel(e)),
        };

    let mut cl = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.acpi_rsdp_addr = RSDP_START;

    if let Some(file) = &files.initramfs {
        let (addr, size) = load_initramfs(mem, file, &result, &params, mem_size)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_map(mem_size);
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(mem_err)?;
    Ok(EntryPoint(entry))
}

/// Place the initramfs as high as the kernel allows (initrd_addr_max), below
/// the 32-bit hole, page aligned.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    file: &File,
    kernel: &KernelLoaderResult,
    params: &boot_params,
    mem_size: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = from_start(file).map_err(BootError::Initramfs)?;
    let size = f.metadata().map_err(BootError::Initramfs)?.len();
    let max = match params.hdr.initrd_addr_max {
        0 => 0x37ff_ffff,
        m => u64::from(m),
    };
    let top = mem_size.min(MEM_32BIT_GAP_START).min(max + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitramfsTooLarge(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::Initramfs(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// A handle on `file` read from its start (it shares the offset with `file`; boots
/// come one at a time, and the migration thread reads with `pread`).
fn from_start(file: &File) -> std::io::Result<File> {
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(0))?;
    Ok(f)
}

/// The e820 map: low RAM, the reserved EBDA/BIOS area (holding the ACPI
/// tables), RAM from 1 MiB to the hole, PCI ECAM reserved, RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MEM_32BIT_GAP_START);
    map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    map.push((PCI_ECAM_START, PCI_ECAM_RESERVED, E820_RESERVED));
    if mem_size > MEM_32BIT_GAP_START {
        map.push((RAM_64BIT_START, mem_size - MEM_32BIT_GAP_START, E820_RAM));
    }
    map
}

/// What sits at the real-mode reset vector F000:FFF0 (physical 0xffff0).
/// There is no BIOS: a guest that resets by jumping there — Linux does, when
/// ACPI is hardware-reduced and there is no EFI (`BOOT_EFI` falls back to
/// `BOOT_BIOS`) — finds 16-bit code that writes the ACPI reset register.
pub const RESET_VECTOR: u64 = 0xffff0;

fn reset_vector_code() -> Vec<u8> {
    let port = (devices::acpi_pm::PM_BASE + devices::acpi_pm::RESET_OFFSET) as u16;
    let mut code = vec![0xba]; // mov dx, imm16
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0xb0, devices::acpi_pm::RESET_VALUE]); // mov al, imm8
    code.extend_from_slice(&[0xee, 0xf4, 0xeb, 0xfd]); // out dx, al; hlt; jmp hlt
    code
}

/// GDT entries: null, 64-bit code, data, TSS.
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

/// Write the GDT, an empty IDT and page tables identity-mapping the first
/// [`IDENTITY_MAP_GIB`] GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(mem_err)?;
    mem.write_slice(&reset_vector_code(), GuestAddress(RESET_VECTOR))
        .map_err(mem_err)?;
    // PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries are 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(mem_err)?;
    for g in 0..IDENTITY_MAP_GIB {
        let pd = PDE_START + g * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + g * 8))
            .map_err(mem_err)?;
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                .map_err(mem_err)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_the_hole() {
        let m = e820_map(512 << 20);
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (512 << 20) - (HIMEM_START - EBDA_START));
        // Nothing overlaps, entries ascend.
        for w in m.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{m:x?}");
        }
        let m = e820_map(6 << 30);
        let high = m.last().unwrap();
        assert_eq!(
            (high.0, high.1, high.2),
            (RAM_64BIT_START, 3 << 30, E820_RAM)
        );
        assert!(m
            .iter()
            .any(|e| e.0 == PCI_ECAM_START && e.2 == E820_RESERVED));
    }

    #[test]
    fn reset_vector_fits_and_writes_the_reset_register() {
        let c = reset_vector_code();
        assert!(
            c.len() <= 16,
            "F000:FFF0 has 16 bytes before the 1 MiB boundary"
        );
        assert_eq!(&c[..3], &[0xba, 0x04, 0x06]);
    }

    #[test]
    fn page_tables_identity_map() {
        let mem = crate::memory::create(64 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // Walk 0x1234_5678: PDPT[0] -> PD[0x91] maps 0x1220_0000.
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 0x91 * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, 0x1220_0000);
        assert_eq!(pde & 0x80, 0x80, "2 MiB page");
        let g3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        let last: u64 = mem.read_obj(GuestAddress((g3 & !0xfff) + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, (4 << 30) - (2 << 20));
    }
}
