//! Address-range dispatch for port I/O and MMIO exits.
//!
//! The map is read-locked on every exit and write-locked only when devices are
//! added or removed (hotplug), so vCPUs hitting different devices do not
//! serialise on one lock: each device carries its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device reached by address. `offset` is relative to the base of the range
/// the device was inserted at; `base` lets one model serve several ranges.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes; the device fills `data`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A guest write of `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    map: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        // The closest range starting below `end` is the only one that can overlap.
        if let Some((&other, e)) = map.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Remove the device inserted at `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, u64, SharedDevice)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        if offset.checked_add(size as u64)? > entry.len {
            return None;
        }
        Some((base, offset, entry.device.clone()))
    }

    /// Dispatch a read; returns false (and leaves `data` untouched) when no
    /// device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x100, 8).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        // Straddling the end is not claimed.
        assert!(!bus.read(0x107, &mut b));
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(bus.write(0x100, &[1, 2]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x100, 0, vec![1, 2])]);
    }

    #[test]
    fn overlaps_and_removal() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x100, 8).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x104, 8),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0, 0),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev.clone(), 0x108, 8).unwrap();
        bus.remove(0x100).unwrap();
        assert!(!bus.read(0x100, &mut [0u8; 1]));
        assert_eq!(bus.remove(0x100).err(), Some(BusError::NotFound(0x100)));
    }
}
