//! The root bus and its two configuration-access mechanisms.

use std::sync::{Arc, Mutex, Weak};

use thiserror::Error;

use super::config::{BarKind, BarMove, PciClass, PciConfig};
use super::PciDevice;
use crate::bus::{Bus, BusDevice, BusError};

pub const PCI_SLOTS: usize = 32;
pub const CONFIG_IO_PORT: u64 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
/// ECAM covers bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS0_SIZE: u64 = 1 << 20;

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

#[derive(Debug, Error)]
pub enum PciRootError {
    #[error("PCI slot {0} does not exist (0..{PCI_SLOTS})")]
    BadSlot(usize),
    #[error("PCI slot {0} is already in use")]
    SlotBusy(usize),
    #[error("PCI slot {0} is empty")]
    SlotEmpty(usize),
    #[error("no free PCI slot")]
    Full,
    #[error("cannot map BAR {bar} of slot {slot}: {source}")]
    MapBar {
        slot: usize,
        bar: usize,
        source: BusError,
    },
}

/// One BAR of a device in a slot: where the guest placed it and whether it is on the bus.
#[derive(Clone, Copy)]
struct PlacedBar {
    bar: usize,
    kind: BarKind,
    base: u64,
    len: u64,
    /// False when the guest placed it over something else: it is not on the bus, and
    /// removing the device must not unmap what is at `base` (another device's BAR).
    on_bus: bool,
}

struct Slot {
    device: SharedPciDevice,
    bars: Vec<PlacedBar>,
}

/// Bus 0: slot 0 holds the host bridge; devices go in 1..32.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    /// BAR ranges of surprise-removed devices, answered by a [`Tombstone`]
    /// until a device is mapped over them.
    tombstones: Vec<(BarKind, u64, u64)>,
}

impl PciRoot {
    pub fn new(mmio: Arc<Bus>, pio: Arc<Bus>) -> Self {
        let mut root = Self {
            slots: (0..PCI_SLOTS).map(|_| None).collect(),
            mmio,
            pio,
            tombstones: Vec::new(),
        };
        root.slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            bars: vec![],
        });
        root
    }

    /// The lowest free slot, from 1.
    pub fn free_slot(&self) -> Result<usize, PciRootError> {
        (1..PCI_SLOTS)
            .find(|s| self.slots[*s].is_none())
            .ok_or(PciRootError::Full)
    }

    /// Put `device` in `slot` and map its BARs at the bases its config space
    /// holds (the VMM allocated them before).
    pub fn add(
        &mut self,
        slot: usize,
        device: SharedPciDevice,
        bars: &[(usize, BarKind, u64, u64)],
    ) -> Result<(), PciRootError> {
        let entry = self.slots.get(slot).ok_or(PciRootError::BadSlot(slot))?;
        if entry.is_some() {
            return Err(PciRootError::SlotBusy(slot));
        }
        let mut placed: Vec<PlacedBar> = Vec::new();
        for &(bar, kind, base, len) in bars {
            self.clear_tombstones(kind, base, len);
            if let Err(source) = self.map_bar(&device, bar, kind, base, len) {
                for p in &placed {
                    let _ = self.bus(p.kind).remove(p.base);
                }
                return Err(PciRootError::MapBar { slot, bar, source });
            }
            placed.push(PlacedBar {
                bar,
                kind,
                base,
                len,
                on_bus: true,
            });
        }
        self.slots[slot] = Some(Slot {
            device,
            bars: placed,
        });
        Ok(())
    }

    /// Take the device out of `slot`, unmapping its BARs.
    pub fn remove(&mut self, slot: usize) -> Result<SharedPciDevice, PciRootError> {
        if slot == 0 {
            return Err(PciRootError::BadSlot(slot));
        }
        let s = self
            .slots
            .get_mut(slot)
            .ok_or(PciRootError::BadSlot(slot))?
            .take()
            .ok_or(PciRootError::SlotEmpty(slot))?;
        for p in s.bars.iter().filter(|p| p.on_bus) {
            let _ = self.bus(p.kind).remove(p.base);
        }
        Ok(s.device)
    }

    /// Take the device out of `slot` without the guest's consent. Its config
    /// space reads as absent at once, but its BARs stay claimed by a
    /// [`Tombstone`]: the guest's driver, torn down after the fact, still
    /// touches them. The tombstone reads what the device chose
    /// ([`PciDevice::vanished_fill`]): all-ones, as on real hardware, or zero
    /// for a virtio device, whose driver polls its status after a reset until it
    /// reads 0 (all-ones keeps Linux 6.1's virtio-pci in that loop forever). A
    /// device mapped over the range later replaces the tombstone.
    pub fn surprise_remove(&mut self, slot: usize) -> Result<SharedPciDevice, PciRootError> {
        let (placed, fill): (Vec<PlacedBar>, u8) = match self.slots.get(slot) {
            Some(Some(s)) if slot != 0 => (
                s.bars.iter().filter(|p| p.on_bus).copied().collect(),
                s.device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .vanished_fill(),
            ),
            _ => (vec![], 0xff),
        };
        let device = self.remove(slot)?;
        for PlacedBar {
            kind, base, len, ..
        } in placed
        {
            if self
                .bus(kind)
                .insert(Arc::new(Mutex::new(Tombstone(fill, 0))), base, len)
                .is_ok()
            {
                self.tombstones.push((kind, base, len));
            }
        }
        Ok(device)
    }

    /// Drop the tombstones that overlap `base..base+len` on `kind`'s bus.
    fn clear_tombstones(&mut self, kind: BarKind, base: u64, len: u64) {
        let end = base.saturating_add(len);
        let bus_of = |k: BarKind| matches!(k, BarKind::Io);
        let (hit, keep): (Vec<_>, Vec<_>) = self.tombstones.iter().partition(|(k, b, l)| {
            bus_of(*k) == bus_of(kind) && *b < end && base < b.saturating_add(*l)
        });
        for (k, b, _) in hit {
            let _ = self.bus(k).remove(b);
        }
        self.tombstones = keep;
    }

    pub fn occupied(&self, slot: usize) -> bool {
        matches!(self.slots.get(slot), Some(Some(_)))
    }

    fn bus(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            BarKind::Mem32 | BarKind::Mem64 => &self.mmio,
        }
    }

    fn map_bar(
        &self,
        device: &SharedPciDevice,
        bar: usize,
        kind: BarKind,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let region = Arc::new(Mutex::new(BarRegion {
            device: device.clone(),
            bar,
        }));
        self.bus(kind).insert(region, base, len)
    }

    fn config_read(&self, dev: usize, func: usize, reg: usize) -> u32 {
        match self.slots.get(dev) {
            Some(Some(s)) if func == 0 => s
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(reg),
            _ => 0xffff_ffff,
        }
    }

    fn config_write(&mut self, dev: usize, func: usize, reg: usize, offset: usize, data: &[u8]) {
        let Some(Some(s)) = self.slots.get(dev) else {
            return;
        };
        if func != 0 {
            return;
        }
        let device = s.device.clone();
        let moved = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_write(reg, offset, data);
        if let Some(mv) = moved {
            self.move_bar(dev, mv);
        }
    }

    fn move_bar(&mut self, dev: usize, mv: BarMove) {
        let Some(Some(slot)) = self.slots.get(dev) else {
            return;
        };
        let device = slot.device.clone();
        let Some(pos) = slot.bars.iter().position(|p| p.bar == mv.bar) else {
            return;
        };
        let old = slot.bars[pos];
        if old.on_bus {
            let _ = self.bus(old.kind).remove(old.base);
        }
        self.clear_tombstones(old.kind, mv.new, old.len);
        let on_bus = match self.map_bar(&device, old.bar, old.kind, mv.new, old.len) {
            Ok(()) => true,
            Err(e) => {
                // An overlapping placement: the BAR stays unreachable until
                // the guest moves it somewhere sane.
                crate::guest_warn!("slot {dev} BAR {} -> {:#x}: {e}", old.bar, mv.new);
                false
            }
        };
        if let Some(Some(slot)) = self.slots.get_mut(dev) {
            slot.bars[pos] = PlacedBar {
                base: mv.new,
                on_bus,
                ..old
            };
        }
    }
}

/// Forwards bus accesses to one BAR of a PCI device.
struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(self.bar, offset, data);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(self.bar, offset, data);
    }
}

/// What is left at a surprise-removed device's BARs: reads its byte, ignores
/// writes. The first reads are logged (debug): they show what a driver does
/// with a device that vanished under it.
struct Tombstone(u8, u32);

impl BusDevice for Tombstone {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(self.0);
        if self.1 < 8 {
            self.1 += 1;
            tracing::debug!(
                "pci: read of a surprise-removed device's BAR at {base:#x}+{offset:#x}: {:#04x}s",
                self.0
            );
        }
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// 00:00.0, a host bridge with no BARs.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfig::new(0x8086, 0x0d57, PciClass::HOST_BRIDGE, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        self.config.write(reg, offset, data)
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

fn read_part(value: u32, offset: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(offset + i).copied().unwrap_or(0xff);
    }
}

/// Run `f` on the root a config-space window serves. The windows sit on the
/// buses the root maps BARs on, so they hold the root weakly: a strong
/// reference would make a cycle that keeps every device (and its tap) alive
/// after the VM is gone. None once the root is gone.
fn with_root<T>(root: &Weak<Mutex<PciRoot>>, f: impl FnOnce(&mut PciRoot) -> T) -> Option<T> {
    let root = root.upgrade()?;
    let mut r = root.lock().unwrap_or_else(|e| e.into_inner());
    Some(f(&mut r))
}

/// The legacy mechanism: an address latch at 0xCF8 and data at 0xCFC..0xCFF.
pub struct PciConfigIo {
    root: Weak<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root: Arc::downgrade(root),
            address: 0,
        }
    }

    /// (device, function, register) the latch selects on bus 0, if enabled.
    fn target(&self) -> Option<(usize, usize, usize)> {
        let a = self.address;
        let enabled = a & 0x8000_0000 != 0;
        let bus = (a >> 16) & 0xff;
        (enabled && bus == 0).then_some({
            (
                ((a >> 11) & 0x1f) as usize,
                ((a >> 8) & 7) as usize,
                ((a >> 2) & 0x3f) as usize,
            )
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => read_part(self.address, offset as usize, data),
            4..=7 => {
                let v = self
                    .target()
                    .and_then(|(d, f, r)| with_root(&self.root, |root| root.config_read(d, f, r)))
                    .unwrap_or(0xffff_ffff);
                read_part(v, (offset - 4) as usize, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            4..=7 => {
                let off = (offset - 4) as usize;
                if off + data.len() > 4 {
                    return;
                }
                if let Some((d, f, r)) = self.target() {
                    with_root(&self.root, |root| root.config_write(d, f, r, off, data));
                }
            }
            _ => {}
        }
    }
}

/// ECAM over bus 0.
pub struct PciConfigMmio {
    root: Weak<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root: Arc::downgrade(root),
        }
    }

    fn decode(offset: u64) -> (usize, usize, usize, usize) {
        let dev = ((offset >> 15) & 0x1f) as usize;
        let func = ((offset >> 12) & 7) as usize;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (dev, func, reg, (offset & 3) as usize)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (d, f, r, off) = Self::decode(offset);
        if off + data.len() > 4 || offset >= ECAM_BUS0_SIZE {
            data.fill(0xff);
            return;
        }
        let v = with_root(&self.root, |root| root.config_read(d, f, r)).unwrap_or(0xffff_ffff);
        read_part(v, off, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (d, f, r, off) = Self::decode(offset);
        if off + data.len() > 4 || offset >= ECAM_BUS0_SIZE {
            return;
        }
        with_root(&self.root, |root| root.config_write(d, f, r, off, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct BarDev {
        config: PciConfig,
        last_write: Option<(usize, u64, Vec<u8>)>,
        fill: u8,
    }
    impl PciDevice for BarDev {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read(reg)
        }
        fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
            self.config.write(reg, offset, data)
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn vanished_fill(&self) -> u8 {
            self.fill
        }
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, Arc<Bus>, PciConfigIo, PciConfigMmio) {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), pio)));
        let io = PciConfigIo::new(&root);
        let ecam = PciConfigMmio::new(&root);
        (root, mmio, io, ecam)
    }

    fn cf8(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        io.write(
            0,
            0,
            &(0x8000_0000 | (dev << 11) | (reg << 2)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        io.read(0, 4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_through_both_mechanisms() {
        let (_root, _mmio, mut io, mut ecam) = setup();
        assert_eq!(cf8(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(cf8(&mut io, 3, 0), 0xffff_ffff, "empty slot");
        let mut b = [0u8; 2];
        ecam.read(0, 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0d57);
        // Class code 06/00 at 0x0b/0x0a.
        let mut c = [0u8; 1];
        ecam.read(0, 0xb, &mut c);
        assert_eq!(c[0], 0x06);
        // Disabled latch and other buses read as absent.
        io.write(0, 0, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        ecam.read(0, 1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bars_are_mapped_moved_and_unmapped() {
        let (root, mmio, mut io, _ecam) = setup();
        let mut config = PciConfig::new(0x1af4, 0x1041, PciClass::ETHERNET, 0);
        config.add_bar(0, BarKind::Mem32, 0x1000, 0xc000_0000, false);
        let dev = Arc::new(Mutex::new(BarDev {
            config,
            last_write: None,
            fill: 0xff,
        }));
        root.lock()
            .unwrap()
            .add(3, dev.clone(), &[(0, BarKind::Mem32, 0xc000_0000, 0x1000)])
            .unwrap();
        let mut b = [0u8; 1];
        assert!(mmio.read(0xc000_0005, &mut b));
        assert_eq!(b[0], 0x05);
        assert_eq!(cf8(&mut io, 3, 0), 0x1041_1af4);
        // The guest moves the BAR through 0xCF8/0xCFC.
        io.write(0, 0, &(0x8000_0000u32 | (3 << 11) | (4 << 2)).to_le_bytes());
        io.write(0, 4, &0xc010_0000u32.to_le_bytes());
        assert!(!mmio.read(0xc000_0005, &mut b));
        assert!(mmio.write(0xc010_0004, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0, 4, vec![9])));
        assert!(matches!(
            root.lock().unwrap().add(3, dev.clone(), &[]),
            Err(PciRootError::SlotBusy(3))
        ));
        root.lock().unwrap().remove(3).unwrap();
        assert!(!mmio.read(0xc010_0004, &mut b));
        assert!(matches!(
            root.lock().unwrap().remove(0),
            Err(PciRootError::BadSlot(0))
        ));
        assert_eq!(root.lock().unwrap().free_slot().unwrap(), 1);
    }

    #[test]
    fn a_bar_moved_onto_another_device_does_not_unmap_it_on_removal() {
        let (root, mmio, mut io, _ecam) = setup();
        let mk = |base: u64| {
            let mut config = PciConfig::new(0x1af4, 0x1041, PciClass::ETHERNET, 0);
            config.add_bar(0, BarKind::Mem32, 0x1000, base, false);
            Arc::new(Mutex::new(BarDev {
                config,
                last_write: None,
                fill: 0xff,
            }))
        };
        let (a, b) = (mk(0xc000_0000), mk(0xc001_0000));
        root.lock()
            .unwrap()
            .add(3, a, &[(0, BarKind::Mem32, 0xc000_0000, 0x1000)])
            .unwrap();
        root.lock()
            .unwrap()
            .add(4, b.clone(), &[(0, BarKind::Mem32, 0xc001_0000, 0x1000)])
            .unwrap();
        // The guest moves slot 3's BAR exactly onto slot 4's: the move fails.
        io.write(0, 0, &(0x8000_0000u32 | (3 << 11) | (4 << 2)).to_le_bytes());
        io.write(0, 4, &0xc001_0000u32.to_le_bytes());
        let mut v = [0u8; 1];
        assert!(mmio.read(0xc001_0003, &mut v));
        assert_eq!(v[0], 0x03, "slot 4's BAR still answers");
        // Removing (or surprise-removing) slot 3 leaves slot 4's BAR in place.
        root.lock().unwrap().surprise_remove(3).unwrap();
        assert!(mmio.write(0xc001_0002, &[7]));
        assert_eq!(b.lock().unwrap().last_write, Some((0, 2, vec![7])));
        // A later move of slot 4's BAR to a free place works as usual.
        io.write(0, 0, &(0x8000_0000u32 | (4 << 11) | (4 << 2)).to_le_bytes());
        io.write(0, 4, &0xc002_0000u32.to_le_bytes());
        assert!(mmio.read(0xc002_0001, &mut v));
        root.lock().unwrap().remove(4).unwrap();
        assert!(!mmio.read(0xc002_0001, &mut v));
    }

    #[test]
    fn surprise_removal_leaves_a_tombstone_until_a_device_takes_the_range() {
        let (root, mmio, mut io, _ecam) = setup();
        let mk = || {
            let mut config = PciConfig::new(0x1af4, 0x1041, PciClass::ETHERNET, 0);
            config.add_bar(0, BarKind::Mem32, 0x1000, 0xc000_0000, false);
            Arc::new(Mutex::new(BarDev {
                config,
                last_write: None,
                fill: 0xff,
            }))
        };
        let bars = [(0, BarKind::Mem32, 0xc000_0000, 0x1000)];
        root.lock().unwrap().add(4, mk(), &bars).unwrap();
        root.lock().unwrap().surprise_remove(4).unwrap();
        // Config space says absent; the BAR still answers, with all-ones (what the
        // device asked for: the default).
        assert_eq!(cf8(&mut io, 4, 0), 0xffff_ffff);
        let mut b = [0u8; 4];
        assert!(mmio.read(0xc000_0010, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(mmio.write(0xc000_0010, &[1]));
        // A new device over the same range replaces the tombstone.
        let dev = mk();
        root.lock().unwrap().add(6, dev.clone(), &bars).unwrap();
        let mut b = [0u8; 1];
        assert!(mmio.read(0xc000_0007, &mut b));
        assert_eq!(b[0], 0x07);
        assert!(matches!(
            root.lock().unwrap().surprise_remove(4),
            Err(PciRootError::SlotEmpty(4))
        ));
        // A device that asks for zeros (virtio) gets them.
        dev.lock().unwrap().fill = 0;
        root.lock().unwrap().surprise_remove(6).unwrap();
        let mut b = [0xffu8; 4];
        assert!(mmio.read(0xc000_0010, &mut b));
        assert_eq!(b, [0; 4]);
    }
}
