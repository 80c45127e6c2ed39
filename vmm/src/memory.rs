//! Guest RAM: one or two regions around the 32-bit PCI hole, with an atomic
//! dirty bitmap so that userspace writes (virtio) are tracked for migration.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{MEM_32BIT_GAP_START, RAM_64BIT_START};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// (start, size) of each RAM region for `size` bytes of guest memory.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MEM_32BIT_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > low {
        regions.push((GuestAddress(RAM_64BIT_START), (size - low) as usize));
    }
    regions
}

/// The first address past the end of RAM.
pub fn ram_end(size: u64) -> u64 {
    ram_regions(size)
        .last()
        .map(|(a, s)| a.0 + *s as u64)
        .unwrap_or(0)
}

pub fn create(size: u64) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_regions(size))
}

/// Give every region to KVM, one slot each (slot = region index), logging dirty
/// pages if `log_dirty`. Called again on the same slots, it switches the log.
pub fn register(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping stays alive as long as `mem`, which the VM
        // owns and drops only after its VmFd is gone.
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_at_the_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(ram_end(4 << 30), 5 << 30);
    }
}
