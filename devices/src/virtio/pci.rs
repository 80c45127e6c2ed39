//! The virtio-pci modern transport (virtio 1.x): vendor capabilities for the
//! common, notify, ISR and device-config regions, all in BAR 0 with the
//! MSI-X table and PBA; queue kicks arrive on ioeventfds registered at the
//! notify addresses (a kick that reaches the VMM by MMIO is forwarded too).
//!
//! BAR 0 layout:
//! ```text
//! 0x0000 common config   0x1000 ISR   0x2000 device config
//! 0x3000 notify (4 bytes per queue)   0x4000 MSI-X table   0x6000 PBA
//! ```

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use serde::{Deserialize, Serialize};

use super::*;
use crate::pci::config::{COMMAND_BUS_MASTER, COMMAND_STATUS_REG};
use crate::pci::msix::{self, InterruptRoutes, MsixState, SharedMsix};
use crate::pci::{BarKind, BarMove, PciClass, PciConfig, PciDevice};
use crate::snapshot::{Saved, SnapshotError};

pub const BAR0_SIZE: u64 = 0x8000;
const COMMON_OFF: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFF: u64 = 0x4000;
const MSIX_PBA_OFF: u64 = 0x6000;
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20u8 } else { 16 };
    let mut c = vec![CAP_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

/// Per-queue registers the driver programs before DRIVER_OK.
struct QueueSlot {
    queue: Queue,
    vector: u16,
    evt: EventFd,
}

struct MsixInterrupt {
    msix: SharedMsix,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: Arc<AtomicU8>,
}

impl VirtioInterrupt for MsixInterrupt {
    fn notify_queue(&self, queue: usize) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        if let Some(&v) = self.queue_vectors.get(queue) {
            if v != VIRTIO_MSI_NO_VECTOR {
                self.msix
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .trigger(v);
            }
        }
    }
    fn notify_config(&self) {
        self.isr.fetch_or(2, Ordering::SeqCst);
        if self.config_vector != VIRTIO_MSI_NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(self.config_vector);
        }
    }
}

pub struct VirtioPciDevice {
    config: PciConfig,
    msix_cap_off: usize,
    msix: SharedMsix,
    routes: Arc<dyn InterruptRoutes>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    bar0: u64,
    queues: Vec<QueueSlot>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    queue_select: u16,
    config_generation: u8,
    isr: Arc<AtomicU8>,
    interrupt: Option<Arc<MsixInterrupt>>,
    observer: Option<StatusObserver>,
    /// Stopped because the driver turned bus mastering off while the device ran:
    /// only a reset starts it again.
    dma_off: bool,
    /// The data path is stopped for a pause or a migration; [`VirtioPciDevice::resume`]
    /// starts it again where it stopped.
    paused: bool,
}

/// One queue's registers and position.
#[derive(Serialize, Deserialize)]
pub struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    vector: u16,
}

/// The transport as the guest left it, with the device behind it.
#[derive(Serialize, Deserialize)]
pub struct VirtioPciState {
    config: Vec<u32>,
    msix: msix::MsixTableState,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    queue_select: u16,
    config_generation: u8,
    isr: u8,
    dma_off: bool,
    queues: Vec<QueueRegs>,
    device: Saved,
}

impl VirtioPciDevice {
    /// Wrap `device`; BAR 0 starts at `bar0` (the VMM allocated it).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        routes: Arc<dyn InterruptRoutes>,
        bar0: u64,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let nvec = sizes.len() as u16 + 1;
        let msix = Arc::new(Mutex::new(MsixState::new(nvec, routes.clone())?));
        let mut config = PciConfig::new(
            VIRTIO_PCI_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + device.device_type(),
            class_of(device.device_type()),
            1,
        );
        config.set_subsystem(VIRTIO_PCI_VENDOR, 0x40);
        config.add_bar(0, BarKind::Mem32, BAR0_SIZE, bar0, false);
        let caps = [
            virtio_cap(CFG_COMMON, COMMON_OFF, COMMON_LEN, None),
            virtio_cap(CFG_ISR, ISR_OFF, 1, None),
            virtio_cap(CFG_DEVICE, DEVICE_OFF, DEVICE_LEN, None),
            virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFF,
                u64::from(NOTIFY_MULTIPLIER) * sizes.len() as u64,
                Some(NOTIFY_MULTIPLIER),
            ),
        ];
        for c in caps {
            config.add_capability(&c).ok_or_else(|| {
                std::io::Error::other("virtio capabilities overflow config space")
            })?;
        }
        let msix_cap_off = config
            .add_capability(&msix::capability(
                nvec,
                0,
                MSIX_TABLE_OFF as u32,
                MSIX_PBA_OFF as u32,
            ))
            .ok_or_else(|| std::io::Error::other("no room for the MSI-X capability"))?;
        // Message control (upper half of the first dword) is the guest's.
        config.set_writable(msix_cap_off / 4, 0xc000_0000);
        let mut queues = Vec::new();
        for s in sizes {
            let queue = Queue::new(s)
                .map_err(|e| std::io::Error::other(format!("queue size {s}: {e:?}")))?;
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            queues.push(QueueSlot {
                queue,
                vector: VIRTIO_MSI_NO_VECTOR,
                evt,
            });
        }
        let dev = Self {
            config,
            msix_cap_off,
            msix,
            routes,
            device,
            mem,
            bar0,
            queues,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            config_generation: 0,
            isr: Arc::new(AtomicU8::new(0)),
            interrupt: None,
            observer: None,
            dma_off: false,
            paused: false,
        };
        dev.register_ioevents(bar0)?;
        Ok(dev)
    }

    fn notify_addr(base: u64, q: usize) -> u64 {
        base + NOTIFY_OFF + q as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    fn register_ioevents(&self, base: u64) -> std::io::Result<()> {
        for (i, q) in self.queues.iter().enumerate() {
            self.routes
                .register_ioevent(&q.evt, Self::notify_addr(base, i))?;
        }
        Ok(())
    }

    fn unregister_ioevents(&self, base: u64) {
        for (i, q) in self.queues.iter().enumerate() {
            let _ = self
                .routes
                .unregister_ioevent(&q.evt, Self::notify_addr(base, i));
        }
    }

    /// Where BAR 0 is now.
    pub fn bar0(&self) -> u64 {
        self.bar0
    }

    /// The device status as the driver reads it (NEEDS_RESET included).
    pub fn status(&self) -> u8 {
        self.status
            | if self.device.needs_reset() {
                STATUS_NEEDS_RESET
            } else {
                0
            }
    }

    /// Features the driver acknowledged (meaningful once FEATURES_OK).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// See [`VirtioDevice::announce`]; the configuration interrupt is raised here.
    pub fn announce(&mut self) {
        if self.device.announce() {
            if let Some(i) = &self.interrupt {
                i.notify_config();
            }
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Tell the driver the device config changed (e.g. link status).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr.fetch_or(2, Ordering::SeqCst);
        if self.config_vector != VIRTIO_MSI_NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(self.config_vector);
        }
    }

    /// Stop the data path (see [`VirtioDevice::pause`]); the queues keep their
    /// positions for [`VirtioPciDevice::resume`] or a save.
    pub fn pause(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        for (idx, next_avail, next_used) in self.device.pause() {
            if let Some(q) = self.queues.get_mut(idx) {
                q.queue.set_next_avail(next_avail);
                q.queue.set_next_used(next_used);
            }
        }
    }

    /// Start the data path again after [`VirtioPciDevice::pause`] (or a restore). Every
    /// queue is looked at and every vector raised once: a kick or an interrupt that
    /// fell into the pause is not lost (a spurious one is harmless).
    pub fn resume(&mut self) {
        if !std::mem::take(&mut self.paused) || self.interrupt.is_none() {
            return;
        }
        if let Err(e) = self.activate() {
            crate::guest_warn!(
                "virtio device type {}: cannot start again: {e}",
                self.device.device_type()
            );
            self.status |= STATUS_NEEDS_RESET;
            self.config_changed();
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.queue.ready() {
                let _ = q.evt.write(1);
                if let Some(irq) = &self.interrupt {
                    irq.notify_queue(i);
                }
            }
        }
    }

    /// After a migration: have the guest announce itself through this device.
    pub fn announce_moved(&mut self) {
        if self.device.announce_moved() {
            if let Some(i) = &self.interrupt {
                i.notify_config();
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.interrupt = None;
        self.dma_off = false;
        self.paused = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
        self.isr.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.queue.reset();
            q.vector = VIRTIO_MSI_NO_VECTOR;
            let _ = q.evt.read();
        }
    }

    /// Who is told of the driver's status changes (see [`StatusObserver`]).
    pub fn set_status_observer(&mut self, observer: StatusObserver) {
        self.observer = Some(observer);
    }

    fn observe(&self, status: DriverStatus) {
        if let Some(o) = &self.observer {
            o(status);
        }
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            let was = self.status;
            self.reset();
            // The driver writes 0 first when it binds, and after a refused feature set:
            // only a reset that undoes a negotiation is news.
            if was & STATUS_FEATURES_OK != 0 {
                self.observe(DriverStatus::Reset);
            }
            return;
        }
        let newly = v & !self.status;
        let mut v = v;
        if newly & STATUS_FEATURES_OK != 0 {
            if self.device.ack_features(self.driver_features) {
                self.observe(DriverStatus::FeaturesOk(self.driver_features));
            } else {
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
        if newly & STATUS_DRIVER_OK != 0 && self.dma_off {
            // The driver must reset the device before it runs again.
            self.status = (v & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
            return;
        }
        if newly & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK != 0 {
            match self.activate() {
                Ok(()) => self.observe(DriverStatus::DriverOk),
                Err(e) => {
                    crate::guest_warn!("virtio device type {}: {e}", self.device.device_type());
                    self.status |= STATUS_NEEDS_RESET;
                    self.config_changed();
                }
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let interrupt = self.interrupt_for_queues();
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.queue.ready() {
                continue;
            }
            if !q.queue.is_valid(&self.mem) {
                return Err(ActivateError::BadQueues(format!(
                    "queue {i} has rings outside guest memory or a bad size"
                )));
            }
            let copy = Queue::try_from(q.queue.state())
                .map_err(|e| ActivateError::BadQueues(format!("queue {i}: {e:?}")))?;
            queues.push((i, copy, q.evt.try_clone()?));
        }
        tracing::debug!(
            "virtio type {}: activating with queues {:?}, features {:#x}, BAR0 {:#x}",
            self.device.device_type(),
            queues.iter().map(|q| q.0).collect::<Vec<_>>(),
            self.driver_features,
            self.bar0
        );
        self.device.activate(ActivateArgs {
            mem: self.mem.clone(),
            interrupt: interrupt.clone(),
            queues,
            features: self.driver_features,
        })?;
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn interrupt_for_queues(&self) -> Arc<MsixInterrupt> {
        Arc::new(MsixInterrupt {
            msix: self.msix.clone(),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            config_vector: self.config_vector,
            isr: self.isr.clone(),
        })
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize);
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(
                self.status
                    | if self.device.needs_reset() {
                        STATUS_NEEDS_RESET
                    } else {
                        0
                    },
            ),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.queue.size())),
            0x1a => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.queue.ready())),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.queue.desc_table()),
            0x24 => q.map_or(0, |q| q.queue.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.queue.avail_ring()),
            0x2c => q.map_or(0, |q| q.queue.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.queue.used_ring()),
            0x34 => q.map_or(0, |q| q.queue.used_ring() >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v32 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let v16 = v32 as u16;
        // Queue registers are frozen once the driver is running.
        let running = self.status & STATUS_DRIVER_OK != 0;
        let sel = self.queue_select as usize;
        match offset {
            0x00 => self.device_feature_select = v32,
            0x08 => self.driver_feature_select = v32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => self.config_vector = v16,
            0x14 => self.set_status(b[0]),
            0x16 => self.queue_select = v16,
            0x1a => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.vector = if (v16 as usize)
                        < self.msix.lock().unwrap_or_else(|e| e.into_inner()).count()
                    {
                        v16
                    } else {
                        VIRTIO_MSI_NO_VECTOR
                    };
                }
            }
            _ if running => {}
            0x18 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.queue.set_size(v16);
                }
            }
            0x1c => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.queue.set_ready(v16 == 1);
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                let (lo, hi) = if offset.is_multiple_of(8) {
                    (Some(v32), None)
                } else {
                    (None, Some(v32))
                };
                // A 64-bit write covers both halves.
                let hi = if data.len() == 8 {
                    Some(u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
                } else {
                    hi
                };
                match offset & !7 {
                    0x20 => q.queue.set_desc_table_address(lo, hi),
                    0x28 => q.queue.set_avail_ring_address(lo, hi),
                    _ => q.queue.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
        // The config vector must name a vector the table has.
        if self.config_vector != VIRTIO_MSI_NO_VECTOR
            && self.config_vector as usize
                >= self.msix.lock().unwrap_or_else(|e| e.into_inner()).count()
        {
            self.config_vector = VIRTIO_MSI_NO_VECTOR;
        }
    }
}

fn class_of(device_type: u16) -> PciClass {
    match device_type {
        1 => PciClass::ETHERNET,
        _ => PciClass {
            class: 0xff,
            subclass: 0,
            prog_if: 0,
        },
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        let v = self.config.read(reg);
        if reg == self.msix_cap_off / 4 {
            let ctrl = self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .control();
            return (v & 0xffff) | (u32::from(ctrl) << 16);
        }
        v
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        let master =
            |c: &PciConfig| c.read(COMMAND_STATUS_REG) & u32::from(COMMAND_BUS_MASTER) != 0;
        let was_master = master(&self.config);
        let moved = self.config.write(reg, offset, data);
        if was_master && !master(&self.config) && self.status & STATUS_DRIVER_OK != 0 {
            // No more DMA: the workers stop touching guest memory and raising
            // interrupts, as a real function would (kexec turns bus mastering off
            // before the next kernel reuses the memory). The driver sees DRIVER_OK
            // gone and NEEDS_RESET; a reset starts it again.
            tracing::debug!(
                "virtio type {}: bus mastering off: stopped",
                self.device.device_type()
            );
            self.device.reset();
            self.interrupt = None;
            self.status = (self.status & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
            self.dma_off = true;
        }
        if reg == self.msix_cap_off / 4 {
            let ctrl = (self.config.read(reg) >> 16) as u16;
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(ctrl);
        }
        if let Some(mv) = moved {
            tracing::debug!(
                "virtio: BAR {} moved {:#x} -> {:#x}",
                mv.bar,
                mv.old,
                mv.new
            );
            if mv.bar == 0 {
                self.unregister_ioevents(self.bar0);
                self.bar0 = mv.new;
                if let Err(e) = self.register_ioevents(mv.new) {
                    crate::guest_warn!("virtio: cannot move notifications to {:#x}: {e}", mv.new);
                }
            }
        }
        moved
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_LEN => self.read_common(o, data),
            ISR_OFF => {
                // Reading the ISR acknowledges it.
                let v = self.isr.swap(0, Ordering::SeqCst);
                data.fill(0);
                if let Some(d) = data.first_mut() {
                    *d = v;
                }
            }
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFF, data)
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o - MSIX_TABLE_OFF, data),
            o if (MSIX_PBA_OFF..BAR0_SIZE).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(o - MSIX_PBA_OFF, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_LEN => self.write_common(o, data),
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFF, data)
            }
            o if (NOTIFY_OFF..MSIX_TABLE_OFF).contains(&o) => {
                // Only reached if the ioeventfd is not (yet) registered.
                let q = ((o - NOTIFY_OFF) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                tracing::debug!("virtio: queue {q} notified by MMIO exit");
                if let Some(q) = self.queues.get(q) {
                    let _ = q.evt.write(1);
                }
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(o - MSIX_TABLE_OFF, data),
            _ => {}
        }
    }

    /// Zero: after a reset the virtio driver polls the device status until it
    /// reads 0, and Linux 6.1's virtio-pci would poll all-ones forever.
    fn vanished_fill(&self) -> u8 {
        0
    }
}

impl crate::snapshot::Snapshot for VirtioPciDevice {
    type State = VirtioPciState;
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        format!("virtio-pci device type {}", self.device.device_type())
    }

    fn save(&self) -> Result<VirtioPciState, SnapshotError> {
        if self.interrupt.is_some() && !self.paused {
            return Err(SnapshotError::bad(
                self.snapshot_name(),
                "saved while its data path runs (pause it first)",
            ));
        }
        Ok(VirtioPciState {
            config: self.config.guest_regs(),
            msix: self.msix.lock().unwrap_or_else(|e| e.into_inner()).save(),
            status: self.status,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            config_vector: self.config_vector,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            isr: self.isr.load(Ordering::SeqCst),
            dma_off: self.dma_off,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegs {
                    size: q.queue.size(),
                    ready: q.queue.ready(),
                    desc: q.queue.desc_table(),
                    avail: q.queue.avail_ring(),
                    used: q.queue.used_ring(),
                    next_avail: q.queue.next_avail(),
                    next_used: q.queue.next_used(),
                    vector: q.vector,
                })
                .collect(),
            device: self.device.save_device()?,
        })
    }

    /// On a device just built for the same configuration, not yet on a running VM:
    /// it comes back paused, and [`VirtioPciDevice::resume`] starts its data path.
    fn restore(&mut self, s: VirtioPciState) -> Result<(), SnapshotError> {
        let name = self.snapshot_name();
        let bad = |why: String| SnapshotError::bad(name.clone(), why);
        if s.queues.len() != self.queues.len() {
            return Err(bad(format!(
                "{} queues saved, this device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let nvec = self.msix.lock().unwrap_or_else(|e| e.into_inner()).count();
        let vector_ok = |v: u16| v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < nvec;
        if !vector_ok(s.config_vector) {
            return Err(bad(format!("config vector {}", s.config_vector)));
        }
        for (i, (slot, r)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            if r.size > slot.queue.max_size() || !vector_ok(r.vector) {
                return Err(bad(format!(
                    "queue {i}: size {} vector {}",
                    r.size, r.vector
                )));
            }
            let q = &mut slot.queue;
            q.set_size(r.size);
            q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
            q.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
            q.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
            q.set_next_avail(r.next_avail);
            q.set_next_used(r.next_used);
            q.set_ready(r.ready);
            slot.vector = r.vector;
        }
        let old_bar0 = self.bar0;
        self.config.restore_guest_regs(&s.config).map_err(&bad)?;
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(s.msix)
            .map_err(&bad)?;
        self.device.restore_device(s.device)?;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.config_vector = s.config_vector;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        self.isr.store(s.isr, Ordering::SeqCst);
        self.dma_off = s.dma_off;
        self.status = s.status & !STATUS_NEEDS_RESET;
        if let Some(bar0) = self.config.bar_addr(0).filter(|b| *b != old_bar0) {
            self.unregister_ioevents(old_bar0);
            self.bar0 = bar0;
            self.register_ioevents(bar0)
                .map_err(|e| bad(format!("notifications at {bar0:#x}: {e}")))?;
        }
        if self.status & STATUS_FEATURES_OK != 0 {
            if !self.device.ack_features(self.driver_features) {
                return Err(bad(format!(
                    "features {:#x} refused by this side's device",
                    self.driver_features
                )));
            }
            self.observe(DriverStatus::FeaturesOk(self.driver_features));
        }
        if self.status & STATUS_DRIVER_OK != 0 {
            for (i, q) in self.queues.iter().enumerate() {
                if q.queue.ready() && !q.queue.is_valid(&self.mem) {
                    return Err(bad(format!("queue {i} has rings outside guest memory")));
                }
            }
            // Running on the source: runs here from `resume`.
            self.interrupt = Some(self.interrupt_for_queues());
            self.paused = true;
            self.observe(DriverStatus::DriverOk);
        }
        Ok(())
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
        self.unregister_ioevents(self.bar0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::pci::msix::tests::FakeRoutes;

    /// A device with one queue that takes any feature set but bit 3; counts its
    /// activations and resets.
    #[derive(Default)]
    struct Fake(Arc<Mutex<(u32, u32)>>);
    impl VirtioDevice for Fake {
        fn device_type(&self) -> u16 {
            1
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn features(&self) -> u64 {
            (1 << 62) | (1 << 32) | (1 << 3)
        }
        fn ack_features(&mut self, features: u64) -> bool {
            features & (1 << 3) == 0
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: ActivateArgs) -> Result<(), ActivateError> {
            self.0.lock().unwrap().0 += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().1 += 1;
        }
        fn pause(&mut self) -> Vec<(usize, u16, u16)> {
            vec![(0, 5, 3)]
        }
        fn save_device(&self) -> Result<Saved, SnapshotError> {
            Ok(Saved {
                version: 1,
                state: serde_json::Value::Null,
            })
        }
        fn restore_device(&mut self, _: Saved) -> Result<(), SnapshotError> {
            Ok(())
        }
        fn announce_moved(&mut self) -> bool {
            false
        }
    }

    fn device() -> (VirtioPciDevice, Arc<Mutex<Vec<DriverStatus>>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut dev = VirtioPciDevice::new(
            Box::new(Fake::default()),
            mem,
            Arc::new(FakeRoutes::default()),
            0xc000_0000,
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        dev.set_status_observer(Arc::new(move |st| s.lock().unwrap().push(st)));
        (dev, seen)
    }

    fn write32(dev: &mut VirtioPciDevice, off: u64, v: u32) {
        dev.bar_write(0, off, &v.to_le_bytes());
    }

    fn features(dev: &mut VirtioPciDevice, f: u64) {
        write32(dev, 0x08, 0);
        write32(dev, 0x0c, f as u32);
        write32(dev, 0x08, 1);
        write32(dev, 0x0c, (f >> 32) as u32);
    }

    fn status(dev: &mut VirtioPciDevice, v: u8) {
        dev.bar_write(0, 0x14, &[v]);
    }

    #[test]
    fn the_observer_hears_features_ok_driver_ok_and_reset() {
        let (mut dev, seen) = device();
        // A driver binding writes 0 first: not a reset of a started device.
        status(&mut dev, 0);
        status(&mut dev, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Refused features: FEATURES_OK stays clear and nobody hears of it.
        features(&mut dev, (1 << 32) | (1 << 3));
        status(
            &mut dev,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(dev.status() & STATUS_FEATURES_OK, 0);
        assert!(seen.lock().unwrap().is_empty());
        // STANDBY (bit 62) acked.
        status(&mut dev, 0);
        status(&mut dev, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        features(&mut dev, (1 << 62) | (1 << 32));
        status(
            &mut dev,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        status(
            &mut dev,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        status(&mut dev, 0);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                DriverStatus::FeaturesOk((1 << 62) | (1 << 32)),
                DriverStatus::DriverOk,
                DriverStatus::Reset,
            ]
        );
    }

    /// A running device pauses (its queues keep the positions the data path
    /// reached), saves, and a fresh device takes the state over: same registers,
    /// same queue positions, paused until resumed; a state for another queue count
    /// or with a vector past the table is refused.
    #[test]
    fn a_paused_device_round_trips() {
        let (mut a, _) = device();
        status(&mut a, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        features(&mut a, 1 << 32);
        write32(&mut a, 0x16, 0); // queue_select
        a.bar_write(0, 0x18, &8u16.to_le_bytes());
        write32(&mut a, 0x20, 0x1000);
        write32(&mut a, 0x28, 0x2000);
        write32(&mut a, 0x30, 0x3000);
        a.bar_write(0, 0x1a, &0u16.to_le_bytes());
        a.bar_write(0, 0x1c, &1u16.to_le_bytes());
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        status(&mut a, ok);
        status(&mut a, ok | STATUS_DRIVER_OK);
        assert!(crate::snapshot::save(&a).is_err(), "saved while running");
        a.pause();
        let (mut b, seen) = device();
        crate::snapshot::testing::round_trip(&a, &mut b);
        assert_eq!(b.status(), ok | STATUS_DRIVER_OK);
        assert_eq!(
            b.queues[0].queue.next_avail(),
            5,
            "the position the data path reached"
        );
        assert_eq!(b.queues[0].queue.next_used(), 3);
        assert_eq!(b.queues[0].queue.desc_table(), 0x1000);
        assert_eq!(
            *seen.lock().unwrap(),
            [DriverStatus::FeaturesOk(1 << 32), DriverStatus::DriverOk]
        );
        let mut st = crate::snapshot::save(&a).unwrap();
        st.state["queues"][0]["vector"] = 7.into();
        let (mut c, _) = device();
        assert!(crate::snapshot::restore(&mut c, st.clone()).is_err());
        st.state["queues"] = serde_json::json!([]);
        assert!(crate::snapshot::restore(&mut c, st).is_err());
    }

    #[test]
    fn bus_mastering_off_stops_a_running_device_until_a_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let counts = Arc::new(Mutex::new((0, 0)));
        let mut dev = VirtioPciDevice::new(
            Box::new(Fake(counts.clone())),
            mem,
            Arc::new(FakeRoutes::default()),
            0xc000_0000,
        )
        .unwrap();
        let command = |dev: &mut VirtioPciDevice, v: u16| {
            dev.config_write(COMMAND_STATUS_REG, 0, &v.to_le_bytes());
        };
        let run = |dev: &mut VirtioPciDevice| {
            status(dev, 0);
            status(dev, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            features(dev, 1 << 32);
            let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            status(dev, ok);
            status(dev, ok | STATUS_DRIVER_OK);
        };
        command(&mut dev, 0x6); // memory + bus master
        run(&mut dev);
        assert_eq!(counts.lock().unwrap().0, 1, "activated");
        let resets = counts.lock().unwrap().1;
        // Bus mastering off: stopped, and the driver is told.
        command(&mut dev, 0x2);
        assert_eq!(counts.lock().unwrap().1, resets + 1, "the workers stopped");
        assert_eq!(
            dev.status() & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET),
            STATUS_NEEDS_RESET
        );
        // On again, and DRIVER_OK without a reset: it stays stopped.
        command(&mut dev, 0x6);
        let s = dev.status() & !STATUS_NEEDS_RESET;
        status(&mut dev, s | STATUS_DRIVER_OK);
        assert_eq!(counts.lock().unwrap().0, 1, "not activated again");
        assert_ne!(dev.status() & STATUS_NEEDS_RESET, 0);
        // A reset and a new negotiation: running again.
        run(&mut dev);
        assert_eq!(counts.lock().unwrap().0, 2);
        assert_eq!(dev.status() & STATUS_NEEDS_RESET, 0);
        // Turning bus mastering off while not running changes nothing.
        status(&mut dev, 0);
        let resets = counts.lock().unwrap().1;
        command(&mut dev, 0x2);
        assert_eq!(counts.lock().unwrap().1, resets);
    }
}
