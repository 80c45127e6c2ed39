//! One boot of the guest: the KVM VM, its memory, buses, devices and vCPU
//! threads. A reboot drops the `Vm` and builds a new one; what must outlive
//! it (the serial backend, the API, the event fds) belongs to the control
//! loop.

use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use devices::acpi_pm::{AcpiPm, PM_BASE, PM_LEN};
use devices::bus::{Bus, BusError};
use devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use devices::pci::hotplug::{PciHotplug, HOTPLUG_BASE, HOTPLUG_GSI, HOTPLUG_LEN};
use devices::pci::{
    PciConfigIo, PciConfigMmio, PciRoot, CONFIG_IO_LEN, CONFIG_IO_PORT, ECAM_BUS0_SIZE,
};
use devices::rtc::{Rtc, RTC_LEN, RTC_PORT};
use devices::serial::{Serial, COM1_IRQ, COM1_PORT};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiLayout};
use crate::boot::{self, BootError};
use crate::config::{DeviceSpec, NetSpec, VmConfig};
use crate::cpu::{self, CpuError};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::events::VmEvents;
use crate::interrupts::KvmRoutes;
use crate::layout::*;
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::{run_vcpu, RunState, VcpuContext, VcpuControl, VcpuControlError};
use crate::vfio::{KvmMapper, VfioHost};

#[derive(Debug, Error)]
pub enum VmError {
    #[error("KVM {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} MiB of guest memory: {reason}")]
    Memory { size: u64, reason: String },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an event fd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Control(#[from] VcpuControlError),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub struct Vm {
    // Field order is drop order: threads are joined by `stop` before this
    // is dropped; the VM fd goes before the memory it maps.
    vcpu_threads: Vec<JoinHandle<()>>,
    pending_vcpus: Vec<VcpuFd>,
    control: Arc<VcpuControl>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Arc<VmEvents>,
    devices: DeviceManager,
    hotplug: Arc<Mutex<PciHotplug>>,
    _vm_fd: Arc<VmFd>,
    _memory: GuestMemoryMmap,
}

impl Vm {
    /// Build and boot-prepare a VM; vCPUs start running on [`Vm::start`].
    pub fn create(
        kvm_handle: &Kvm,
        cfg: &VmConfig,
        serial: &Arc<Mutex<Serial>>,
        events: &Arc<VmEvents>,
    ) -> Result<Self, VmError> {
        let vm_fd = Arc::new(kvm_handle.create_vm().map_err(kvm("create VM"))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm("set TSS address"))?;
        vm_fd.create_irq_chip().map_err(kvm("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm("create PIT"))?;

        let mem = memory::create(cfg.memory_bytes).map_err(|e| VmError::Memory {
            size: cfg.memory_bytes >> 20,
            reason: e.to_string(),
        })?;
        memory::register(&vm_fd, &mem).map_err(kvm("register guest memory"))?;

        let entry = boot::load_linux(
            &mem,
            &cfg.kernel,
            cfg.initramfs.as_deref(),
            &cfg.cmdline,
            cfg.memory_bytes,
        )?;
        boot::write_boot_tables(&mem)?;
        let ram_end = memory::ram_end(cfg.memory_bytes);
        let layout = AcpiLayout {
            vcpus: cfg.vcpus,
            mmio64_start: ram_end.next_multiple_of(PCI_MMIO64_ALIGN),
            mmio64_size: PCI_MMIO64_SIZE,
        };
        acpi::write_tables(&mem, &layout)?;

        // Buses and the legacy devices.
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm("register the serial irqfd"))?;
        serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset(Arc::new(serial_irq));
        pio.insert(serial.clone(), COM1_PORT, 8)?;
        let i8042_reset = events.reset_evt.try_clone().map_err(VmError::EventFd)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(i8042_reset))),
            I8042_BASE,
            I8042_LEN,
        )?;
        let pm = AcpiPm::new(
            events.shutdown_evt.try_clone().map_err(VmError::EventFd)?,
            events.reset_evt.try_clone().map_err(VmError::EventFd)?,
        );
        pio.insert(Arc::new(Mutex::new(pm)), PM_BASE, PM_LEN)?;
        pio.insert(Arc::new(Mutex::new(Rtc::new())), RTC_PORT, RTC_LEN)?;
        let pci = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), pio.clone())));
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(&pci))),
            CONFIG_IO_PORT,
            CONFIG_IO_LEN,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(&pci))),
            PCI_ECAM_START,
            ECAM_BUS0_SIZE,
        )?;

        // ACPI PCI hotplug: the GED interrupt and the slot registers.
        let hotplug_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&hotplug_irq, HOTPLUG_GSI)
            .map_err(kvm("register the hotplug irqfd"))?;
        let hotplug = Arc::new(Mutex::new(PciHotplug::new(
            hotplug_irq,
            events.eject_evt.try_clone().map_err(VmError::EventFd)?,
        )));
        pio.insert(hotplug.clone(), HOTPLUG_BASE, HOTPLUG_LEN)?;

        let routes = Arc::new(KvmRoutes::new(vm_fd.clone()).map_err(VmError::EventFd)?);
        let max_slots = kvm_handle.get_nr_memslots() as u32;
        let ram_slots = vm_memory::GuestMemoryBackend::num_regions(&mem) as u32;
        let mapper = Arc::new(KvmMapper::new(vm_fd.clone(), ram_slots, max_slots));
        let vfio = VfioHost::new(vm_fd.clone(), mem.clone(), routes.clone(), mapper);
        let mut devices = DeviceManager::new(
            pci.clone(),
            routes,
            mem.clone(),
            events.clone(),
            vfio,
            (layout.mmio64_start, layout.mmio64_size),
        );
        for d in cfg.devices.iter().filter(|d| d.failover.is_some()) {
            devices.reserve(d.slot.unwrap_or(0));
        }
        for n in &cfg.nets {
            devices.add_net(&n.net, n.slot)?;
        }
        // Failover primaries wait for their standby's STANDBY ack (the control loop plugs them).
        for d in cfg.devices.iter().filter(|d| d.failover.is_none()) {
            devices.add_vfio(&d.id, &d.path, d.slot)?;
        }

        // vCPUs.
        let base_cpuid: CpuId = kvm_handle
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("get supported CPUID"))?;
        let tsc_deadline = kvm_handle.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm("create vCPU"))?;
            cpu::setup_cpuid(&vcpu, &base_cpuid, id, cfg.vcpus, tsc_deadline)?;
            cpu::setup_msrs(&vcpu)?;
            cpu::setup_fpu(&vcpu)?;
            cpu::setup_lapic(&vcpu)?;
            if id == 0 {
                cpu::setup_regs(&vcpu, entry.0 .0)?;
                cpu::setup_sregs(&vcpu)?;
            }
            vcpus.push(vcpu);
        }
        let control = Arc::new(VcpuControl::new());
        Ok(Self {
            vcpu_threads: vec![],
            pending_vcpus: vcpus,
            control,
            pio,
            mmio,
            events: events.clone(),
            devices,
            hotplug,
            _vm_fd: vm_fd,
            _memory: mem,
        })
    }

    /// Start one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        for (id, vcpu) in self.pending_vcpus.drain(..).enumerate() {
            let ctx = VcpuContext {
                id: id as u8,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                control: self.control.clone(),
                events: self.events.clone(),
            };
            let t = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(vcpu, ctx))
                .map_err(VmError::Thread)?;
            self.vcpu_threads.push(t);
        }
        Ok(())
    }

    pub fn pause(&self) -> Result<(), VmError> {
        Ok(self.control.pause(&self.vcpu_threads)?)
    }

    pub fn resume(&self) -> Result<(), VmError> {
        Ok(self.control.resume()?)
    }

    pub fn paused(&self) -> bool {
        self.control.state() == RunState::Paused
    }

    /// Registers of each vCPU as it parked (meaningful while paused).
    pub fn parked_at(&self) -> Vec<(u8, String)> {
        self.control.parked_at()
    }

    pub fn vcpus(&self) -> usize {
        self.vcpu_threads.len()
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    fn hotplug(&self) -> std::sync::MutexGuard<'_, PciHotplug> {
        self.hotplug.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hot-add a virtio-net device: put it in its slot, then tell the guest
    /// to look at that slot. Returns the slot.
    pub fn hot_add_net(&mut self, spec: &NetSpec) -> Result<usize, VmError> {
        let slot = self.devices.add_net(&spec.net, spec.slot)?;
        self.hotplug().notify_changed(slot);
        Ok(slot)
    }

    /// Hot-add a passthrough device (a failover primary, or `vm.add-device`).
    pub fn hot_add_vfio(&mut self, spec: &DeviceSpec) -> Result<usize, VmError> {
        let slot = self.devices.add_vfio(&spec.id, &spec.path, spec.slot)?;
        self.hotplug().notify_changed(slot);
        Ok(slot)
    }

    /// Keep `slot` free for a hidden failover primary.
    pub fn reserve_slot(&mut self, slot: usize) {
        self.devices.reserve(slot);
    }

    pub fn release_slot(&mut self, slot: usize) {
        self.devices.release(slot);
    }

    /// Ask the guest to release device `id` (ACPI eject request); the guest
    /// answers through the eject register. Returns the slot.
    pub fn request_eject(&self, id: &str) -> Result<usize, VmError> {
        let slot = self
            .devices
            .slot_of(id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        self.hotplug().request_eject(slot);
        Ok(slot)
    }

    /// Tear device `id` down now. After a surprise removal the guest is told
    /// to rescan the slot, where it finds nothing. Returns the slot.
    pub fn remove_device(&mut self, id: &str, surprise: bool) -> Result<usize, VmError> {
        let slot = self.devices.remove(id, surprise)?;
        if surprise {
            self.hotplug().notify_changed(slot);
        }
        Ok(slot)
    }

    /// Slots flagged for the guest and not yet read by it: (rescan, eject).
    pub fn hotplug_pending(&self) -> (u32, u32) {
        self.hotplug().pending()
    }

    /// Hotplug interrupts raised so far this boot.
    pub fn hotplug_raised(&self) -> u64 {
        self.hotplug().raised()
    }

    /// Raise the hotplug interrupt again if the guest has not read its pending bits;
    /// whether anything is pending.
    pub fn reraise_hotplug(&self) -> bool {
        self.hotplug().reraise_if_pending()
    }

    /// Slots the guest ejected since the last call, with the device in each.
    pub fn take_ejected(&self) -> Vec<(usize, Option<String>)> {
        let bits = self.hotplug().take_ejected();
        (1..devices::pci::PCI_SLOTS)
            .filter(|s| bits & (1 << s) != 0)
            .map(|s| (s, self.devices.id_in(s).map(str::to_string)))
            .collect()
    }

    /// Stop and join every vCPU thread.
    pub fn stop(mut self) {
        self.control.stop(&self.vcpu_threads);
        for t in self.vcpu_threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() {
            self.control.stop(&self.vcpu_threads);
            for t in self.vcpu_threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}
