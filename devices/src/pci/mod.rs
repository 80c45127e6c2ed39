//! PCI: type-0 configuration space with BARs and capabilities, the root bus
//! (bus 0, 32 slots), and the two ways the guest reaches configuration
//! space: the legacy 0xCF8/0xCFC port pair and ECAM (MMIO).
//!
//! [`PciDevice`] is separate from [`crate::bus::BusDevice`]: a PCI device
//! exposes its config space here and its BARs as bus devices on the MMIO or
//! port I/O bus, placed (and moved, when the guest reprograms a BAR) by
//! [`PciRoot`].

pub(crate) mod config;
pub mod hotplug;
pub mod msix;
mod root;

pub use config::{BarKind, BarMove, PciClass, PciConfig};
pub use root::{
    HostBridge, PciConfigIo, PciConfigMmio, PciRoot, PciRootError, SharedPciDevice, CONFIG_IO_LEN,
    CONFIG_IO_PORT, ECAM_BUS0_SIZE, PCI_SLOTS,
};

/// A device on the PCI bus: its configuration space and its BAR regions.
pub trait PciDevice: Send {
    /// Read the 32-bit configuration register `reg` (dword index, 0..1024).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Write `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`.
    /// Returns the BAR the guest moved, if it moved one.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove>;
    /// An access to BAR `bar` at `offset` from its base.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The byte a read of this device's BARs returns once it has been removed by
    /// surprise (see [`PciRoot::surprise_remove`]). All-ones is what a vanished
    /// function answers on real hardware, and what hardware drivers are written
    /// for: e1000e's register semaphore, say, is granted at once on all-ones, while
    /// zeros make each of its PHY accesses time out and keep the guest's
    /// hot-unplug worker (holding RTNL) busy for a minute.
    fn vanished_fill(&self) -> u8 {
        0xff
    }
}
