//! MSI (not MSI-X) for a passthrough device: the capability as the guest sees it,
//! and one KVM route + irqfd per enabled vector, which VFIO signals directly.
//!
//! Layout (PCI 3.0 §6.8.1): control word at +2 (enable bit 0, multiple-message
//! capable bits 1..3, multiple-message enable bits 4..6, 64-bit bit 7, per-vector
//! masking bit 8), address low at +4, address high at +8 if 64-bit, data after the
//! address, then (with per-vector masking) mask and pending dwords.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::msix::{InterruptRoutes, MsiMessage};

pub const MSI_CAP_ID: u8 = 0x05;
const ENABLE: u16 = 1;
const ADDR64: u16 = 1 << 7;
const PER_VECTOR_MASK: u16 = 1 << 8;

pub struct MsiState {
    /// The read-only bits the device declares (MMC, 64-bit, per-vector masking).
    caps: u16,
    control: u16,
    addr: u64,
    data: u16,
    mask: u32,
    vectors: Vec<(u32, EventFd)>,
    routes: Arc<dyn InterruptRoutes>,
}

impl MsiState {
    /// `control`: the device's own message-control word (only its read-only bits count).
    pub fn new(control: u16, routes: Arc<dyn InterruptRoutes>) -> Self {
        Self {
            caps: control & (0x0e | ADDR64 | PER_VECTOR_MASK),
            control: 0,
            addr: 0,
            data: 0,
            mask: 0,
            vectors: Vec::new(),
            routes,
        }
    }

    /// The capability's length in bytes.
    pub fn len(&self) -> usize {
        let mut n = 12;
        if self.caps & ADDR64 != 0 {
            n += 4;
        }
        if self.caps & PER_VECTOR_MASK != 0 {
            n += 8;
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn enabled(&self) -> bool {
        self.control & ENABLE != 0
    }

    fn data_off(&self) -> usize {
        if self.caps & ADDR64 != 0 {
            12
        } else {
            8
        }
    }

    /// Vectors the guest enabled (a power of two, at most what the device declares).
    fn wanted(&self) -> usize {
        let mmc = (self.caps >> 1) & 7;
        let mme = ((self.control >> 4) & 7).min(mmc).min(5);
        1 << mme
    }

    /// The capability's bytes from offset 2 (after ID and next pointer), as the guest reads them.
    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.len()];
        b[2..4].copy_from_slice(&(self.caps | self.control).to_le_bytes());
        b[4..8].copy_from_slice(&(self.addr as u32).to_le_bytes());
        if self.caps & ADDR64 != 0 {
            b[8..12].copy_from_slice(&((self.addr >> 32) as u32).to_le_bytes());
        }
        let d = self.data_off();
        b[d..d + 2].copy_from_slice(&self.data.to_le_bytes());
        if self.caps & PER_VECTOR_MASK != 0 {
            b[d + 4..d + 8].copy_from_slice(&self.mask.to_le_bytes());
        }
        b
    }

    /// Read the dword at `off` (a multiple of 4) within the capability; the first
    /// dword's low half (ID and next pointer) is the caller's.
    pub fn read(&self, off: usize) -> u32 {
        let b = self.bytes();
        let g = |i: usize| b.get(off + i).copied().unwrap_or(0);
        u32::from_le_bytes([g(0), g(1), g(2), g(3)])
    }

    /// A guest write of `data` at byte `off` within the capability. Returns
    /// `Some(true)` when MSI was just enabled (the caller hands [`MsiState::irqfds`] to
    /// the device), `Some(false)` when just disabled, None otherwise.
    pub fn write(&mut self, off: usize, data: &[u8]) -> io::Result<Option<bool>> {
        let mut b = self.bytes();
        let was = self.enabled();
        for (i, v) in data.iter().enumerate() {
            if let Some(x) = b.get_mut(off + i) {
                *x = *v;
            }
        }
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        self.control = u16::from_le_bytes([b[2], b[3]]) & (ENABLE | 0x70);
        self.addr = u64::from(word(4) & !3);
        if self.caps & ADDR64 != 0 {
            self.addr |= u64::from(word(8)) << 32;
        }
        let d = self.data_off();
        self.data = u16::from_le_bytes([b[d], b[d + 1]]);
        if self.caps & PER_VECTOR_MASK != 0 {
            self.mask = word(d + 4);
        }
        let now = self.enabled();
        let change = match (was, now) {
            (false, true) => {
                self.vectors = self.routes.allocate_msi(self.wanted())?;
                Some(true)
            }
            (true, false) => {
                for (gsi, _) in &self.vectors {
                    let _ = self.routes.set_msi_route(*gsi, None);
                }
                self.routes.free_msi(&self.vectors);
                self.vectors.clear();
                Some(false)
            }
            _ => None,
        };
        self.update_routes()?;
        Ok(change)
    }

    fn update_routes(&self) -> io::Result<()> {
        for (i, (gsi, _)) in self.vectors.iter().enumerate() {
            let masked = self.mask & (1 << i) != 0;
            // Multiple messages: vector i sends the data with its low bits set to i.
            let msg = (!masked).then_some(MsiMessage {
                addr: self.addr,
                data: u32::from(self.data) | i as u32,
            });
            self.routes.set_msi_route(*gsi, msg)?;
        }
        Ok(())
    }

    pub fn irqfds(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|(_, e)| e).collect()
    }
}

impl Drop for MsiState {
    fn drop(&mut self) {
        for (gsi, _) in &self.vectors {
            let _ = self.routes.set_msi_route(*gsi, None);
        }
        self.routes.free_msi(&self.vectors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::tests::FakeRoutes;

    #[test]
    fn enable_routes_masks_and_disable() {
        let routes = Arc::new(FakeRoutes::default());
        // 64-bit, per-vector masking, 4 messages capable (MMC = 2).
        let mut m = MsiState::new(ADDR64 | PER_VECTOR_MASK | (2 << 1), routes.clone());
        assert_eq!(m.len(), 24);
        assert_eq!(m.read(0) >> 16, u32::from(ADDR64 | PER_VECTOR_MASK | 4));
        m.write(4, &0xfee0_1000u32.to_le_bytes()).unwrap();
        m.write(12, &0x4041u16.to_le_bytes()).unwrap();
        assert_eq!(m.read(4), 0xfee0_1000);
        assert_eq!(m.read(12) & 0xffff, 0x4041);
        // Enable with 2 messages (MME = 1), vector 1 masked.
        m.write(16, &2u32.to_le_bytes()).unwrap();
        let r = m.write(2, &(ENABLE | (1 << 4)).to_le_bytes()).unwrap();
        assert_eq!(r, Some(true));
        assert_eq!(m.irqfds().len(), 2);
        let got = routes.routes.lock().unwrap().clone();
        let g0 = m.vectors[0].0;
        let g1 = m.vectors[1].0;
        assert_eq!(got[&g0], Some(MsiMessage { addr: 0xfee0_1000, data: 0x4041 }));
        assert_eq!(got[&g1], None, "masked");
        m.write(16, &0u32.to_le_bytes()).unwrap();
        assert_eq!(
            routes.routes.lock().unwrap()[&g1],
            Some(MsiMessage { addr: 0xfee0_1000, data: 0x4041 | 1 })
        );
        // MME beyond MMC is clamped; garbage offsets are ignored.
        m.write(200, &[1, 2, 3]).unwrap();
        assert_eq!(m.write(2, &0u16.to_le_bytes()).unwrap(), Some(false));
        assert!(m.irqfds().is_empty());
        assert_eq!(routes.routes.lock().unwrap()[&g0], None);
    }
}
