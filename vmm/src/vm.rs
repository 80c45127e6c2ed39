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
use devices::snapshot::{self, Saved};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiLayout};
use crate::boot::{self, BootError};
use crate::config::{DeviceSpec, NetSpec, VmConfig};
use crate::cpu::{self, CpuError};
use crate::device_manager::{DeviceError, DeviceManager, DeviceState, OpenAhead};
use crate::events::VmEvents;
use crate::interrupts::KvmRoutes;
use crate::layout::*;
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::{run_vcpu, RunState, VcpuContext, VcpuControl, VcpuControlError};
use crate::vfio::{KvmMapper, VfioHost};
use crate::vmstate::{self, KvmVmState, VcpuState};

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
    #[error(transparent)]
    Snapshot(#[from] devices::snapshot::SnapshotError),
    #[error(transparent)]
    State(#[from] vmstate::StateError),
    #[error("cannot restore the VM: {0}")]
    Restore(String),
    #[error("{0}")]
    Migration(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub struct Vm {
    // Field order is drop order: threads are joined by `stop` before this
    // is dropped; the VM fd goes before the memory it maps.
    vcpu_threads: Vec<JoinHandle<VcpuFd>>,
    pending_vcpus: Vec<VcpuFd>,
    control: Arc<VcpuControl>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: Arc<VmEvents>,
    devices: DeviceManager,
    hotplug: Arc<Mutex<PciHotplug>>,
    legacy: Legacy,
    memory_bytes: u64,
    /// The CPUID each vCPU was given (a migration destination must be able to give it;
    /// what KVM reads back is not always what was set).
    cpuid: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
}

/// The platform devices, kept for saving and restoring their state.
struct Legacy {
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    pm: Arc<Mutex<AcpiPm>>,
    rtc: Arc<Mutex<Rtc>>,
}

/// Everything about a running VM that a migration carries besides its memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub memory_bytes: u64,
    /// Paused by the user when it left: the destination keeps it paused.
    pub paused: bool,
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmVmState,
    pub serial: Saved,
    pub i8042: Saved,
    pub pm: Saved,
    pub rtc: Saved,
    pub hotplug: Saved,
    pub devices: Vec<DeviceState>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A machine made by [`Vm::prepare`], waiting for its state.
pub struct Prepared(Machine);

/// What `Vm::create` and `Vm::restore` share: the KVM VM with its memory, buses,
/// platform devices and an empty PCI device table.
struct Machine {
    vm_fd: Arc<VmFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: DeviceManager,
    hotplug: Arc<Mutex<PciHotplug>>,
    legacy: Legacy,
}

impl Machine {
    fn new(
        kvm_handle: &Kvm,
        memory_bytes: u64,
        mem: &GuestMemoryMmap,
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
        memory::register(&vm_fd, mem, false).map_err(kvm("register guest memory"))?;

        // Buses and the legacy devices.
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm("register the serial irqfd"))?;
        lock(serial).reset(Arc::new(serial_irq));
        pio.insert(serial.clone(), COM1_PORT, 8)?;
        let i8042_reset = events.reset_evt.try_clone().map_err(VmError::EventFd)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(i8042_reset)));
        pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
        let pm = Arc::new(Mutex::new(AcpiPm::new(
            events.shutdown_evt.try_clone().map_err(VmError::EventFd)?,
            events.reset_evt.try_clone().map_err(VmError::EventFd)?,
        )));
        pio.insert(pm.clone(), PM_BASE, PM_LEN)?;
        let rtc = Arc::new(Mutex::new(Rtc::new()));
        pio.insert(rtc.clone(), RTC_PORT, RTC_LEN)?;
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
        let ram_slots = vm_memory::GuestMemoryBackend::num_regions(mem) as u32;
        let mapper = Arc::new(KvmMapper::new(vm_fd.clone(), ram_slots, max_slots));
        let vfio = VfioHost::new(vm_fd.clone(), mem.clone(), routes.clone(), mapper);
        let (mmio64_start, mmio64_size) = mmio64_window(memory_bytes);
        let devices = DeviceManager::new(
            pci,
            routes,
            mem.clone(),
            events.clone(),
            vfio,
            (mmio64_start, mmio64_size),
        );
        Ok(Self {
            vm_fd,
            pio,
            mmio,
            devices,
            hotplug,
            legacy: Legacy {
                serial: serial.clone(),
                i8042,
                pm,
                rtc,
            },
        })
    }

    fn into_vm(
        self,
        vcpus: Vec<VcpuFd>,
        cpuid: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
        events: &Arc<VmEvents>,
        cfg: &VmConfig,
        mem: GuestMemoryMmap,
    ) -> Result<Vm, VmError> {
        Ok(Vm {
            vcpu_threads: vec![],
            pending_vcpus: vcpus,
            control: Arc::new(VcpuControl::new()),
            pio: self.pio,
            mmio: self.mmio,
            events: events.clone(),
            devices: self.devices,
            hotplug: self.hotplug,
            legacy: self.legacy,
            memory_bytes: cfg.memory_bytes,
            cpuid,
            vm_fd: self.vm_fd,
            memory: mem,
        })
    }
}

/// The 64-bit BAR window: after RAM, aligned.
fn mmio64_window(memory_bytes: u64) -> (u64, u64) {
    let ram_end = memory::ram_end(memory_bytes);
    (ram_end.next_multiple_of(PCI_MMIO64_ALIGN), PCI_MMIO64_SIZE)
}

impl Vm {
    /// Build and boot-prepare a VM; vCPUs start running on [`Vm::start`].
    pub fn create(
        kvm_handle: &Kvm,
        cfg: &VmConfig,
        serial: &Arc<Mutex<Serial>>,
        events: &Arc<VmEvents>,
    ) -> Result<Self, VmError> {
        let mem = memory::create(cfg.memory_bytes).map_err(|e| VmError::Memory {
            size: cfg.memory_bytes >> 20,
            reason: e.to_string(),
        })?;
        let mut m = Machine::new(kvm_handle, cfg.memory_bytes, &mem, serial, events)?;
        let files = cfg.boot.as_deref().ok_or(BootError::NoKernel)?;
        let entry = boot::load_linux(&mem, files, &cfg.cmdline, cfg.memory_bytes)?;
        boot::write_boot_tables(&mem)?;
        let (mmio64_start, mmio64_size) = mmio64_window(cfg.memory_bytes);
        let layout = AcpiLayout {
            vcpus: cfg.vcpus,
            mmio64_start,
            mmio64_size,
        };
        acpi::write_tables(&mem, &layout)?;

        for d in cfg.devices.iter().filter(|d| d.failover.is_some()) {
            m.devices.reserve(d.slot.unwrap_or(0));
        }
        for n in &cfg.nets {
            m.devices.add_net(&n.net, n.slot)?;
        }
        // Failover primaries wait for their standby's STANDBY ack (the control loop plugs them).
        for d in cfg.devices.iter().filter(|d| d.failover.is_none()) {
            m.devices.add_vfio(&d.id, &d.path, d.slot)?;
        }
        // Meanwhile their functions are opened, and guest RAM mapped for their DMA, on a
        // thread of their own while the guest boots: the plug after the ack takes them
        // over rather than opening them on the control loop, where the API would wait
        // (2.7 s for 512 MiB in the nested test host). The old boot's functions are
        // closed by now: the control loop stops and drops a VM before it boots again.
        let primaries = cfg.devices.iter().filter(|d| d.failover.is_some());
        m.devices
            .open_ahead(primaries.map(|d| d.path.clone()).collect(), false);

        // vCPUs.
        let base_cpuid: CpuId = kvm_handle
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("get supported CPUID"))?;
        let tsc_deadline = kvm_handle.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        let mut cpuids = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = m
                .vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm("create vCPU"))?;
            let cpuid = cpu::setup_cpuid(&vcpu, &base_cpuid, id, cfg.vcpus, tsc_deadline)?;
            cpuids.push(cpuid.as_slice().to_vec());
            cpu::setup_msrs(&vcpu)?;
            cpu::setup_fpu(&vcpu)?;
            cpu::setup_lapic(&vcpu)?;
            if id == 0 {
                cpu::setup_regs(&vcpu, entry.0 .0)?;
                cpu::setup_sregs(&vcpu)?;
            }
            vcpus.push(vcpu);
        }
        m.into_vm(vcpus, cpuids, events, cfg, mem)
    }

    /// The machine of a VM whose state comes later (a migration's destination, as
    /// soon as its memory exists): the KVM VM with `mem`, buses and platform devices;
    /// and the passthrough functions at `open_ahead` are opened, with guest RAM mapped
    /// for their DMA, on a thread of their own while the memory arrives, to be kept
    /// off the bus until their devices are added. Opening and mapping take seconds in
    /// the nested test host: done now, they are not in the way after the guest
    /// resumes (and never in the downtime: nothing waits for them before a plug).
    /// The handle returned, if any, says when they are open: the source waits for
    /// that before it stops the guest.
    pub fn prepare(
        kvm_handle: &Kvm,
        memory_bytes: u64,
        mem: &GuestMemoryMmap,
        serial: &Arc<Mutex<Serial>>,
        events: &Arc<VmEvents>,
        open_ahead: Vec<std::path::PathBuf>,
    ) -> Result<(Prepared, Option<OpenAhead>), VmError> {
        let mut m = Machine::new(kvm_handle, memory_bytes, mem, serial, events)?;
        let opening = m.devices.open_ahead(open_ahead, true);
        Ok((Prepared(m), opening))
    }

    /// Build the VM a migration source saved on `machine` (from [`Vm::prepare`] with
    /// the same memory): `mem` holds its memory already, `cfg` has this host's taps.
    /// Devices come back paused and vCPUs stopped; [`Vm::start`] and
    /// [`Vm::resume_devices`] run them.
    pub fn restore(
        machine: Prepared,
        cfg: &VmConfig,
        mem: GuestMemoryMmap,
        state: VmState,
        events: &Arc<VmEvents>,
    ) -> Result<Self, VmError> {
        if state.vcpus.len() != usize::from(cfg.vcpus) || state.memory_bytes != cfg.memory_bytes {
            return Err(VmError::Restore(format!(
                "the state is of {} vCPUs and {} MiB, the VM has {} and {} MiB",
                state.vcpus.len(),
                state.memory_bytes >> 20,
                cfg.vcpus,
                cfg.memory_bytes >> 20
            )));
        }
        let Prepared(mut m) = machine;
        let t0 = std::time::Instant::now();
        snapshot::restore(&mut *lock(&m.legacy.serial), state.serial)?;
        snapshot::restore(&mut *lock(&m.legacy.i8042), state.i8042)?;
        snapshot::restore(&mut *lock(&m.legacy.pm), state.pm)?;
        snapshot::restore(&mut *lock(&m.legacy.rtc), state.rtc)?;
        for d in state.devices {
            let net = cfg
                .nets
                .iter()
                .find(|n| n.net.id == d.id)
                .ok_or_else(|| VmError::Restore(format!("no NIC {} configured here", d.id)))?;
            m.devices.restore_net(&net.net, d)?;
        }
        let t1 = std::time::Instant::now();
        let mut vcpus = Vec::new();
        for s in &state.vcpus {
            let vcpu = m
                .vm_fd
                .create_vcpu(u64::from(s.id))
                .map_err(kvm("create vCPU"))?;
            vmstate::restore_vcpu(&vcpu, s)?;
            vcpus.push(vcpu);
        }
        let cpuids = state.vcpus.iter().map(|v| v.cpuid.clone()).collect();
        let t2 = std::time::Instant::now();
        vmstate::restore_vm(&m.vm_fd, &state.kvm)?;
        // After the devices: news for slots they are in.
        snapshot::restore(&mut *lock(&m.hotplug), state.hotplug)?;
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1000.0;
        let t3 = std::time::Instant::now();
        tracing::info!(
            "restored the devices in {:.1} ms, {} vCPUs in {:.1} ms, the irqchip, PIT and clock in {:.1} ms",
            ms(t0, t1),
            vcpus.len(),
            ms(t1, t2),
            ms(t2, t3)
        );
        m.into_vm(vcpus, cpuids, events, cfg, mem)
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

    /// Stop the guest: every vCPU parked, then every device's data path (no more
    /// guest memory writes, no interrupts). Undone whole on failure.
    pub fn pause(&self) -> Result<(), VmError> {
        self.control.pause(&self.vcpu_threads)?;
        self.devices.pause_all();
        Ok(())
    }

    pub fn resume(&self) -> Result<(), VmError> {
        if !self.paused() {
            return Err(VcpuControlError::NotPaused.into());
        }
        self.devices.resume_all();
        Ok(self.control.resume()?)
    }

    /// For a migration's last step: the guest paused and its vCPU threads ended,
    /// their vCPUs kept for [`Vm::save`]. Returns whether the guest was paused
    /// already (by the user). [`Vm::thaw`] undoes it.
    pub fn freeze(&mut self) -> Result<bool, VmError> {
        let was_paused = self.paused();
        if !was_paused {
            self.pause()?;
        }
        self.control.stop(&self.vcpu_threads);
        for t in self.vcpu_threads.drain(..) {
            match t.join() {
                Ok(vcpu) => self.pending_vcpus.push(vcpu),
                Err(_) => return Err(VmError::Migration("a vCPU thread panicked".into())),
            }
        }
        self.control = Arc::new(VcpuControl::new());
        Ok(was_paused)
    }

    /// Run again after [`Vm::freeze`] (the migration failed): paused if it was.
    pub fn thaw(&mut self, was_paused: bool) -> Result<(), VmError> {
        self.start()?;
        if was_paused {
            self.control.pause(&self.vcpu_threads)?;
        } else {
            self.devices.resume_all();
        }
        Ok(())
    }

    /// The whole state of a frozen VM (see [`Vm::freeze`]).
    pub fn save(&self, kvm_handle: &Kvm, paused: bool) -> Result<VmState, VmError> {
        if self.pending_vcpus.is_empty() {
            return Err(VmError::Migration("saved while its vCPUs run".into()));
        }
        let mut vcpus = Vec::new();
        for (id, vcpu) in self.pending_vcpus.iter().enumerate() {
            let cpuid = self.cpuid.get(id).cloned().unwrap_or_default();
            vcpus.push(vmstate::save_vcpu(kvm_handle, vcpu, id as u8, cpuid)?);
        }
        Ok(VmState {
            memory_bytes: self.memory_bytes,
            paused,
            vcpus,
            kvm: vmstate::save_vm(&self.vm_fd)?,
            serial: snapshot::save(&*lock(&self.legacy.serial))?,
            i8042: snapshot::save(&*lock(&self.legacy.i8042))?,
            pm: snapshot::save(&*lock(&self.legacy.pm))?,
            rtc: snapshot::save(&*lock(&self.legacy.rtc))?,
            hotplug: snapshot::save(&*self.hotplug())?,
            devices: self.devices.save()?,
        })
    }

    /// The CPUID the guest was given.
    pub fn cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        self.cpuid.first().map_or(&[], Vec::as_slice)
    }

    /// The guest's memory (the migration sends it).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Turn KVM's dirty page log on or off on every RAM slot.
    pub fn log_dirty_pages(&self, on: bool) -> Result<(), VmError> {
        memory::register(&self.vm_fd, &self.memory, on).map_err(kvm("switch dirty logging"))
    }

    /// After a migration: every NIC asks the guest to announce itself.
    pub fn announce_moved(&self) {
        self.devices.announce_moved();
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

    /// Start opening the passthrough function at `path` off the control loop, for a
    /// plug once it is open (see [`DeviceManager::open_for_plug`]).
    pub fn open_for_plug(&mut self, path: &std::path::Path) -> bool {
        self.devices.open_for_plug(path)
    }

    /// Whether passthrough functions are being opened off the control loop.
    pub fn is_opening(&mut self) -> bool {
        self.devices.is_opening()
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

    /// Park the passthrough functions that left the bus, and close those `keep`
    /// does not want kept open (see [`DeviceManager::settle`]).
    pub fn settle_removed(&mut self, keep: impl Fn(&std::path::Path) -> bool) {
        self.devices.settle(keep);
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

    /// Where the time of the last eject of `slot` went (see [`api::ReleaseSteps`]),
    /// if the guest answered a request; the VMM's share runs until now.
    pub fn release_steps(&self, slot: usize) -> Option<api::ReleaseSteps> {
        let t = self.hotplug().release_timing(slot);
        let (requested, read, ejected) = (t.requested?, t.read?, t.ejected?);
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
        Some(api::ReleaseSteps {
            notify_ms: ms(read.saturating_duration_since(requested)),
            guest_ms: ms(ejected.saturating_duration_since(read)),
            vmm_ms: ms(ejected.elapsed()),
        })
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
