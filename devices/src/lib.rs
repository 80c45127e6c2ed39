//! Tandem's device models.
//!
//! Every device is reached through a [`bus::Bus`]: port I/O and MMIO exits
//! from the vCPU threads are dispatched by address to a [`bus::BusDevice`].
//! PCI devices additionally implement [`pci::PciDevice`] (config space and
//! BARs); the two traits are deliberately separate.
//!
//! Every device saves and restores its state through [`snapshot::Snapshot`].
//!
//! This crate knows nothing about KVM VM setup, the API or the migration transport: the
//! VMM hands devices the few host resources they need (an interrupt
//! [`Interrupt`], an output sink, an event fd to signal a reset).

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod netlink;
pub mod pci;
pub mod ratelimit;
pub mod rtc;
pub mod sandbox;
pub mod serial;
pub mod snapshot;
pub mod sriov;
pub mod vfio;
pub mod virtio;

use std::io;

/// A way for a device to raise its interrupt line (edge-triggered, usually
/// an irqfd registered on a GSI).
pub trait Interrupt: Send + Sync {
    /// Signal the interrupt to the guest.
    fn trigger(&self) -> io::Result<()>;
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}
