//! A type-0 configuration space: 4 KiB of registers with per-bit write masks,
//! six BARs with the sizing protocol, and a capability list.

use serde::{Deserialize, Serialize};

pub const CONFIG_DWORDS: usize = 1024;
const VENDOR_REG: usize = 0;
pub(crate) const COMMAND_STATUS_REG: usize = 1;
const CLASS_REG: usize = 2;
pub(crate) const HEADER_REG: usize = 3;
pub(crate) const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
pub(crate) const CAP_PTR_REG: usize = 13;
pub(crate) const INTERRUPT_REG: usize = 15;
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register: the function may master the bus (DMA, MSI writes).
pub(crate) const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub(crate) const FIRST_CAP_OFFSET: usize = 0x40;
pub(crate) const STD_CONFIG_END: usize = 0x100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Mem32,
    /// Takes two registers: this one and the next.
    Mem64,
}

/// The guest moved BAR `bar` from `old` to `new` (both bases; len bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    pub bar: usize,
    pub kind: BarKind,
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Bar {
    kind: Option<BarKind>,
    size: u64,
}

/// Class code triple: base class, subclass, programming interface.
#[derive(Clone, Copy, Debug)]
pub struct PciClass {
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
}

impl PciClass {
    pub const HOST_BRIDGE: Self = Self {
        class: 0x06,
        subclass: 0x00,
        prog_if: 0,
    };
    pub const ETHERNET: Self = Self {
        class: 0x02,
        subclass: 0x00,
        prog_if: 0,
    };
}

#[derive(Clone, Serialize, Deserialize)]
pub struct PciConfig {
    #[serde(with = "dwords")]
    regs: Vec<u32>,
    #[serde(with = "dwords")]
    writable: Vec<u32>,
    bars: [Bar; 6],
    next_cap: usize,
    last_cap_ptr: usize,
}

mod dwords {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let v = Vec::<u32>::deserialize(d)?;
        if v.len() != super::CONFIG_DWORDS {
            return Err(serde::de::Error::custom("config space must be 1024 dwords"));
        }
        Ok(v)
    }
}

impl PciConfig {
    pub fn new(vendor: u16, device: u16, class: PciClass, revision: u8) -> Self {
        let mut regs = vec![0u32; CONFIG_DWORDS];
        let mut writable = vec![0u32; CONFIG_DWORDS];
        regs[VENDOR_REG] = u32::from(vendor) | (u32::from(device) << 16);
        regs[CLASS_REG] = u32::from(revision)
            | (u32::from(class.prog_if) << 8)
            | (u32::from(class.subclass) << 16)
            | (u32::from(class.class) << 24);
        // Command: I/O, memory, bus master, INTx disable are the guest's.
        writable[COMMAND_STATUS_REG] = 0x0000_0407;
        // Cache line size and latency timer.
        writable[HEADER_REG] = 0x0000_ffff;
        // Interrupt line is a scratch register for the guest.
        writable[INTERRUPT_REG] = 0x0000_00ff;
        Self {
            regs,
            writable,
            bars: [Bar::default(); 6],
            next_cap: FIRST_CAP_OFFSET,
            last_cap_ptr: CAP_PTR_REG * 4,
        }
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.regs[SUBSYSTEM_REG] = u32::from(vendor) | (u32::from(id) << 16);
    }

    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.regs[INTERRUPT_REG] = (self.regs[INTERRUPT_REG] & !0xff00) | (u32::from(pin) << 8);
    }

    /// Declare BAR `idx` of `size` bytes (a power of two) at `addr`.
    pub fn add_bar(&mut self, idx: usize, kind: BarKind, size: u64, addr: u64, prefetch: bool) {
        debug_assert!(size.is_power_of_two() && idx < 6);
        debug_assert!(kind != BarKind::Mem64 || idx < 5);
        let reg = BAR0_REG + idx;
        let mask = !(size - 1);
        self.bars[idx] = Bar {
            kind: Some(kind),
            size,
        };
        match kind {
            BarKind::Io => {
                self.regs[reg] = (addr as u32 & mask as u32) | 1;
                self.writable[reg] = mask as u32 & !0x3;
            }
            BarKind::Mem32 => {
                self.regs[reg] = (addr as u32 & mask as u32) | (u32::from(prefetch) << 3);
                self.writable[reg] = mask as u32 & !0xf;
            }
            BarKind::Mem64 => {
                self.regs[reg] = (addr as u32 & mask as u32) | 0x4 | (u32::from(prefetch) << 3);
                self.writable[reg] = mask as u32 & !0xf;
                self.regs[reg + 1] = (addr >> 32) as u32;
                self.writable[reg + 1] = (mask >> 32) as u32;
            }
        }
    }

    /// The current base of BAR `idx`, if it is declared.
    pub fn bar_addr(&self, idx: usize) -> Option<u64> {
        let reg = BAR0_REG + idx;
        match self.bars.get(idx)?.kind? {
            BarKind::Io => Some(u64::from(self.regs[reg] & !0x3)),
            BarKind::Mem32 => Some(u64::from(self.regs[reg] & !0xf)),
            BarKind::Mem64 => {
                Some(u64::from(self.regs[reg] & !0xf) | (u64::from(self.regs[reg + 1]) << 32))
            }
        }
    }

    pub fn bar_size(&self, idx: usize) -> Option<u64> {
        let b = self.bars.get(idx)?;
        b.kind.map(|_| b.size)
    }

    /// Append a capability: `body` starts with the capability ID; the next
    /// pointer (byte 1) is filled in. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8]) -> Option<usize> {
        let len = body.len().max(2).next_multiple_of(4);
        let off = self.next_cap;
        if off + len > STD_CONFIG_END {
            return None;
        }
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + i, if i == 1 { 0 } else { *b });
        }
        self.set_byte(self.last_cap_ptr, off as u8);
        self.last_cap_ptr = off + 1;
        self.next_cap = off + len;
        self.regs[COMMAND_STATUS_REG] |= STATUS_CAP_LIST;
        Some(off)
    }

    /// Let the guest write the bits of `mask` at dword `reg`.
    pub fn set_writable(&mut self, reg: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg) {
            *w = mask;
        }
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let shift = (off % 4) * 8;
        let r = &mut self.regs[off / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(v) << shift);
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Store a register directly (device-side updates, not guest writes).
    pub fn write_reg(&mut self, reg: usize, v: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = v;
        }
    }

    pub fn command(&self) -> u16 {
        self.regs[COMMAND_STATUS_REG] as u16
    }

    /// A guest write of 1, 2 or 4 bytes at byte `offset` of `reg`, masked by
    /// what is writable. Reports a BAR move once the new base is complete.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        if reg >= CONFIG_DWORDS || offset + data.len() > 4 || !matches!(data.len(), 1 | 2 | 4) {
            return None;
        }
        let mut value = 0u32;
        for (i, b) in data.iter().enumerate() {
            value |= u32::from(*b) << ((offset + i) * 8);
        }
        let bytes_mask = match data.len() {
            4 => u32::MAX,
            n => ((1u32 << (n * 8)) - 1) << (offset * 8),
        };
        let bar = self.bar_of_reg(reg);
        let before = bar.and_then(|b| self.bar_addr(b));
        let mask = self.writable[reg] & bytes_mask;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
        let idx = bar?;
        let old = before?;
        let new = self.bar_addr(idx)?;
        let size = self.bars[idx].size;
        let kind = self.bars[idx].kind?;
        // All-ones written to size the BAR is not a move; neither is the
        // first half of a 64-bit BAR update (its base is not yet complete).
        let sizing_mask = match kind {
            BarKind::Io => u64::from(self.writable[BAR0_REG + idx]),
            BarKind::Mem32 => u64::from(self.writable[BAR0_REG + idx]),
            BarKind::Mem64 => {
                u64::from(self.writable[BAR0_REG + idx])
                    | (u64::from(self.writable[BAR0_REG + idx + 1]) << 32)
            }
        };
        let low_half_of_64 = kind == BarKind::Mem64 && reg == BAR0_REG + idx;
        if new == old || new & sizing_mask == sizing_mask || low_half_of_64 {
            return None;
        }
        Some(BarMove {
            bar: idx,
            kind,
            old,
            new,
            len: size,
        })
    }

    /// Every register as the guest sees it (for migration).
    pub fn guest_regs(&self) -> Vec<u32> {
        self.regs.clone()
    }

    /// Take over what a guest wrote into `saved` (BAR bases, command, interrupt line,
    /// writable capability bits); everything read-only stays as this device built it,
    /// so a state cannot turn the device into another one.
    pub fn restore_guest_regs(&mut self, saved: &[u32]) -> Result<(), String> {
        if saved.len() != CONFIG_DWORDS {
            return Err(format!(
                "config space of {} dwords, not {CONFIG_DWORDS}",
                saved.len()
            ));
        }
        for ((r, w), v) in self.regs.iter_mut().zip(&self.writable).zip(saved) {
            *r = (*r & !w) | (v & w);
        }
        Ok(())
    }

    /// Which BAR a register belongs to (either half of a 64-bit BAR).
    fn bar_of_reg(&self, reg: usize) -> Option<usize> {
        let idx = reg.checked_sub(BAR0_REG).filter(|i| *i < 6)?;
        if self.bars[idx].kind.is_some() {
            return Some(idx);
        }
        let prev = idx.checked_sub(1)?;
        (self.bars[prev].kind == Some(BarKind::Mem64)).then_some(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> PciConfig {
        PciConfig::new(0x1af4, 0x1041, PciClass::ETHERNET, 1)
    }

    #[test]
    fn ids_and_readonly_fields() {
        let mut c = dev();
        assert_eq!(c.read(0), 0x1041_1af4);
        c.write(0, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read(0), 0x1041_1af4, "IDs are read-only");
        assert_eq!(c.read(2) >> 8, 0x02_00_00);
        c.write(1, 0, &[0x07, 0x00]);
        assert_eq!(c.command(), 0x7);
        assert_eq!(c.read(5000), 0xffff_ffff);
        assert_eq!(c.write(5000, 0, &[1]), None);
        assert_eq!(
            c.write(1, 3, &[1, 2]),
            None,
            "crossing the dword is ignored"
        );
    }

    #[test]
    fn bar32_sizing_and_move() {
        let mut c = dev();
        c.add_bar(0, BarKind::Mem32, 0x4000, 0xc000_0000, false);
        assert_eq!(c.write(4, 0, &u32::MAX.to_le_bytes()), None);
        assert_eq!(c.read(4), 0xffff_c000, "size readback");
        let mv = c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            mv,
            Some(BarMove {
                bar: 0,
                kind: BarKind::Mem32,
                old: 0xffff_c000,
                new: 0xd000_0000,
                len: 0x4000
            })
        );
        assert_eq!(c.bar_addr(0), Some(0xd000_0000));
    }

    #[test]
    fn bar64_moves_after_high_half() {
        let mut c = dev();
        c.add_bar(2, BarKind::Mem64, 0x10_0000, 0x1_0000_0000, true);
        assert_eq!(c.read(6) & 0xf, 0xc);
        assert_eq!(c.write(6, 0, &0x2000_0000u32.to_le_bytes()), None);
        let mv = c.write(7, 0, &2u32.to_le_bytes()).unwrap();
        assert_eq!((mv.bar, mv.new), (2, 0x2_2000_0000));
        assert_eq!(c.bar_size(2), Some(0x10_0000));
    }

    /// A restored config space takes what the guest wrote, never the read-only
    /// identity of the device.
    #[test]
    fn restore_takes_only_guest_writable_bits() {
        let with_bar = || {
            let mut c = dev();
            c.add_bar(0, BarKind::Mem32, 0x1000, 0xc000_0000, false);
            c
        };
        let mut a = with_bar();
        a.write(BAR0_REG, 0, &0xd000_0000u32.to_le_bytes());
        a.write(COMMAND_STATUS_REG, 0, &[0x06, 0]);
        let mut saved = a.guest_regs();
        saved[VENDOR_REG] = 0xdead_beef;
        let mut b = with_bar();
        b.restore_guest_regs(&saved).unwrap();
        assert_eq!(b.bar_addr(0), Some(0xd000_0000));
        assert_eq!(b.command(), 0x06);
        assert_eq!(b.read(VENDOR_REG), a.read(VENDOR_REG));
        assert!(b.restore_guest_regs(&saved[..10]).is_err());
    }

    #[test]
    fn capability_chain() {
        let mut c = dev();
        let a = c.add_capability(&[0x09, 0, 4, 0xaa]).unwrap();
        let b = c.add_capability(&[0x11, 0, 1, 2, 3, 4]).unwrap();
        assert_eq!(c.read(13) & 0xff, a as u32);
        assert_eq!((c.read(a / 4) >> 8) & 0xff, b as u32);
        assert_eq!((c.read(b / 4) >> 8) & 0xff, 0);
        assert_ne!(c.read(1) & STATUS_CAP_LIST, 0);
        // The list cannot run past the standard header.
        while c.add_capability(&[0x09; 16]).is_some() {}
        assert!(c.next_cap <= STD_CONFIG_END);
    }
}
