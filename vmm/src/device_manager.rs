//! Places devices on the machine: BAR space, PCI slots, and the virtio-net
//! devices from the configuration. Built to add devices at any time — boot
//! is just the first batch; hotplug (next) calls the same `add_net`.

use std::sync::{Arc, Mutex};

use api::DeviceInfo;
use devices::pci::msix::InterruptRoutes;
use devices::pci::{PciRoot, PciRootError};
use devices::virtio::net::{format_mac, Net, NetConfig, NetError};
use devices::virtio::pci::{VirtioPciDevice, BAR0_SIZE};
use devices::virtio::GuestMemoryMmap;
use thiserror::Error;

use crate::events::VmEvents;
use crate::layout::{PCI_MMIO32_SIZE, PCI_MMIO32_START};

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("--net {id}: {source}")]
    Net { id: String, source: NetError },
    #[error("--net {id}: {source}")]
    Slot { id: String, source: PciRootError },
    #[error("--net {id}: {source}")]
    Io { id: String, source: std::io::Error },
    #[error("no room left in the 32-bit PCI window for a {0}-byte BAR")]
    NoBarSpace(u64),
    #[error("no device with id {0:?}")]
    NoSuchDevice(String),
}

/// Hands out naturally aligned BAR ranges from the 32-bit window.
pub struct BarAllocator {
    next: u64,
    end: u64,
    freed: Vec<(u64, u64)>,
}

impl BarAllocator {
    pub fn new() -> Self {
        Self {
            next: PCI_MMIO32_START,
            end: PCI_MMIO32_START + PCI_MMIO32_SIZE,
            freed: vec![],
        }
    }

    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if let Some(i) = self.freed.iter().position(|(_, s)| *s == size) {
            return Some(self.freed.swap_remove(i).0);
        }
        let base = self.next.next_multiple_of(size);
        let end = base.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(base)
    }

    pub fn free(&mut self, base: u64, size: u64) {
        self.freed.push((base, size));
    }
}

impl Default for BarAllocator {
    fn default() -> Self {
        Self::new()
    }
}

struct NetEntry {
    cfg: NetConfig,
    slot: usize,
    bar0: u64,
    device: Arc<Mutex<VirtioPciDevice>>,
}

pub struct DeviceManager {
    pci: Arc<Mutex<PciRoot>>,
    routes: Arc<dyn InterruptRoutes>,
    mem: GuestMemoryMmap,
    bars: BarAllocator,
    nets: Vec<NetEntry>,
    events: Arc<VmEvents>,
}

impl DeviceManager {
    pub fn new(
        pci: Arc<Mutex<PciRoot>>,
        routes: Arc<dyn InterruptRoutes>,
        mem: GuestMemoryMmap,
        events: Arc<VmEvents>,
    ) -> Self {
        Self {
            pci,
            routes,
            mem,
            bars: BarAllocator::new(),
            nets: vec![],
            events,
        }
    }

    /// Create a virtio-net device and put it in its slot (given or the first free).
    pub fn add_net(&mut self, cfg: &NetConfig, slot: Option<usize>) -> Result<usize, DeviceError> {
        let id = cfg.id.clone();
        let net = Net::new(cfg.clone()).map_err(|source| DeviceError::Net {
            id: id.clone(),
            source,
        })?;
        let mut pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match slot {
            Some(s) => s,
            None => pci.free_slot().map_err(|source| DeviceError::Slot {
                id: id.clone(),
                source,
            })?,
        };
        let bar0 = self
            .bars
            .allocate(BAR0_SIZE)
            .ok_or(DeviceError::NoBarSpace(BAR0_SIZE))?;
        let mut dev = match VirtioPciDevice::new(
            Box::new(net),
            self.mem.clone(),
            self.routes.clone(),
            bar0,
        ) {
            Ok(d) => d,
            Err(source) => {
                self.bars.free(bar0, BAR0_SIZE);
                return Err(DeviceError::Io { id, source });
            }
        };
        let (events, who) = (self.events.clone(), id.clone());
        dev.set_status_observer(Arc::new(move |st| events.driver_status(&who, st)));
        let dev = Arc::new(Mutex::new(dev));
        if let Err(source) = pci.add(
            slot,
            dev.clone(),
            &[(0, devices::pci::BarKind::Mem32, bar0, BAR0_SIZE)],
        ) {
            self.bars.free(bar0, BAR0_SIZE);
            return Err(DeviceError::Slot { id, source });
        }
        self.nets.push(NetEntry {
            cfg: cfg.clone(),
            slot,
            bar0,
            device: dev,
        });
        Ok(slot)
    }

    /// The slot of device `id`.
    pub fn slot_of(&self, id: &str) -> Option<usize> {
        self.nets.iter().find(|n| n.cfg.id == id).map(|n| n.slot)
    }

    /// The id of the device in `slot`.
    pub fn id_in(&self, slot: usize) -> Option<&str> {
        self.nets
            .iter()
            .find(|n| n.slot == slot)
            .map(|n| n.cfg.id.as_str())
    }

    /// Take device `id` off the machine: out of its slot and its BAR off the
    /// bus; dropping it stops its workers and frees its interrupt routes and
    /// notification eventfds. Returns the slot it was in.
    /// `surprise`: the guest did not give the device up, so its BARs stay
    /// claimed by a tombstone (see [`PciRoot::surprise_remove`]).
    pub fn remove(&mut self, id: &str, surprise: bool) -> Result<usize, DeviceError> {
        let i = self
            .nets
            .iter()
            .position(|n| n.cfg.id == id)
            .ok_or_else(|| DeviceError::NoSuchDevice(id.to_string()))?;
        let entry = self.nets.remove(i);
        let mut pci = self.pci.lock().unwrap_or_else(|e| e.into_inner());
        let removed = if surprise {
            pci.surprise_remove(entry.slot)
        } else {
            pci.remove(entry.slot)
        };
        drop(pci);
        if let Err(e) = removed {
            tracing::warn!("device {id}: slot {}: {e}", entry.slot);
        }
        // What the allocator handed out, wherever the guest moved the BAR since.
        self.bars.free(entry.bar0, BAR0_SIZE);
        Ok(entry.slot)
    }

    pub fn info(&self) -> Vec<DeviceInfo> {
        self.nets
            .iter()
            .map(|n| {
                let standby = if n.cfg.standby { ", standby" } else { "" };
                // Never wait for a device: a vCPU or worker stuck while holding
                // it is exactly what vm.info must be able to show.
                let device = match n.device.try_lock() {
                    Ok(d) => Some(d),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                let driver = device.map_or("device busy: held by another thread".into(), |d| {
                    format!(
                        "driver status {:#x}, features {:#x}",
                        d.status(),
                        d.driver_features()
                    )
                });
                DeviceInfo {
                    id: n.cfg.id.clone(),
                    kind: "virtio-net".into(),
                    location: format!(
                        "pci 00:{:02x}.0 (tap {}, mac {}{standby}, {driver})",
                        n.slot,
                        n.cfg.tap,
                        format_mac(&n.cfg.mac),
                    ),
                }
            })
            .collect()
    }
}
