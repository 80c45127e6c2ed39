//! The VM's side of VFIO: one container per VM, attached to KVM's VFIO device
//! (so KVM knows the VM does DMA through an IOMMU), with all guest RAM mapped
//! for DMA at IOVA = guest physical address; and the KVM memory slots that put
//! BAR mappings straight into the guest.
//!
//! The container is made when the first passthrough device is opened. RAM is
//! mapped after each device is opened: when every device of a container has
//! gone, the kernel drops its IOMMU context and the next device starts a new
//! one, which needs the mappings again (a mapping already there is `EEXIST`,
//! which is fine).

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::pci::msix::InterruptRoutes;
use devices::vfio::{GuestMapper, VfioPciDevice, VfioPciError};
use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDeviceFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemoryMmap;

/// KVM memory slots for BAR mappings, numbered after guest RAM's.
pub struct KvmMapper {
    vm: Arc<VmFd>,
    slots: Mutex<(u32, Vec<u32>)>,
    max: u32,
}

impl KvmMapper {
    pub fn new(vm: Arc<VmFd>, first: u32, max: u32) -> Self {
        Self {
            vm,
            slots: Mutex::new((first, Vec::new())),
            max,
        }
    }
}

impl GuestMapper for KvmMapper {
    unsafe fn map(&self, gpa: u64, len: u64, host: *mut u8) -> io::Result<u32> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match s.1.pop() {
            Some(n) => n,
            None if s.0 < self.max => {
                s.0 += 1;
                s.0 - 1
            }
            None => return Err(io::Error::other("out of KVM memory slots")),
        };
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller keeps `host..host+len` mapped until `unmap`.
        match unsafe { self.vm.set_user_memory_region(r) } {
            Ok(()) => Ok(slot),
            Err(e) => {
                s.1.push(slot);
                Err(io::Error::from_raw_os_error(e.errno()))
            }
        }
    }

    fn unmap(&self, slot: u32) {
        let r = kvm_userspace_memory_region {
            slot,
            memory_size: 0,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is referenced.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(r) } {
            tracing::warn!("cannot delete KVM memory slot {slot}: {e}");
            return;
        }
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .push(slot);
    }
}

/// The VM's VFIO container and what devices need to be opened in it.
pub struct VfioHost {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    routes: Arc<dyn InterruptRoutes>,
    mapper: Arc<KvmMapper>,
    container: Option<Arc<VfioContainer>>,
}

impl VfioHost {
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemoryMmap,
        routes: Arc<dyn InterruptRoutes>,
        mapper: Arc<KvmMapper>,
    ) -> Self {
        Self {
            vm,
            mem,
            routes,
            mapper,
            container: None,
        }
    }

    fn container(&mut self) -> Result<Arc<VfioContainer>, VfioPciError> {
        if let Some(c) = &self.container {
            return Ok(c.clone());
        }
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let fd = self
            .vm
            .create_device(&mut dev)
            .map_err(|e| VfioPciError::Vfio(format!("cannot create KVM's VFIO device: {e}")))?;
        let c = VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(fd))))
            .map_err(|e| VfioPciError::Vfio(format!("cannot open /dev/vfio/vfio: {e}")))?;
        let c = Arc::new(c);
        self.container = Some(c.clone());
        Ok(c)
    }

    /// Open the device at `sysfs` and make guest RAM reachable by its DMA.
    pub fn open(&mut self, sysfs: &Path) -> Result<VfioPciDevice, VfioPciError> {
        self.opener()?.open(sysfs)
    }

    /// What opening a device needs, for another thread (see [`VfioOpener`]).
    pub fn opener(&mut self) -> Result<VfioOpener, VfioPciError> {
        Ok(VfioOpener {
            container: self.container()?,
            mem: self.mem.clone(),
            routes: self.routes.clone(),
            mapper: self.mapper.clone(),
        })
    }
}

/// Opens passthrough functions in the VM's container, from any thread.
pub struct VfioOpener {
    container: Arc<VfioContainer>,
    mem: GuestMemoryMmap,
    routes: Arc<dyn InterruptRoutes>,
    mapper: Arc<KvmMapper>,
}

impl VfioOpener {
    /// Open the device at `sysfs` and make guest RAM reachable by its DMA.
    pub fn open(&self, sysfs: &Path) -> Result<VfioPciDevice, VfioPciError> {
        let container = &self.container;
        let dev = VfioPciDevice::open(
            sysfs,
            container.clone(),
            self.routes.clone(),
            self.mapper.clone(),
        )?;
        for region in self.mem.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VfioPciError::Vfio(format!("guest memory: {e}")))?;
            // SAFETY: guest RAM stays mapped as long as the VM, which outlives
            // the container's devices (they are dropped with the device manager,
            // before the memory); the device may DMA into it at any time, which
            // is what guest RAM is for: Tandem never holds Rust references into it.
            let r = unsafe {
                container.vfio_dma_map(region.start_addr().0, region.len() as usize, host)
            };
            match r {
                Ok(()) => {}
                Err(vfio_ioctls::VfioError::IommuDmaMap(e)) if e.errno() == libc::EEXIST => {}
                Err(e) => {
                    return Err(VfioPciError::Vfio(format!(
                        "cannot map guest RAM at {:#x} for DMA: {e} ({})",
                        region.start_addr().0,
                        std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                    )))
                }
            }
        }
        Ok(dev)
    }
}
