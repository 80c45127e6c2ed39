//! Saving and restoring device state, for live migration.
//!
//! Every device implements [`Snapshot`]: its guest-visible state as a serde
//! struct with a version. The VMM collects them into one tree, sends it, and
//! on the other side builds the same devices (from the VM's configuration and
//! the destination's host resources) and hands each its state back.
//!
//! A state comes off the network: restoring checks what it is given (sizes,
//! ranges) and refuses it with an error, never panics. Host resources (fds,
//! threads, interrupts) are never part of a state.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} cannot be migrated")]
    NotMigratable(String),
    #[error("{what}: state version {got}, this Tandem restores version {want}")]
    Version { what: String, got: u32, want: u32 },
    #[error("{what}: bad state: {why}")]
    Bad { what: String, why: String },
}

impl SnapshotError {
    pub fn bad(what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        Self::Bad {
            what: what.into(),
            why: why.to_string(),
        }
    }
}

/// A device whose state can be saved and restored.
pub trait Snapshot {
    type State: Serialize + DeserializeOwned;
    /// Raised whenever `State` changes in a way an older Tandem cannot read.
    const VERSION: u32;
    /// What the errors call the device.
    fn snapshot_name(&self) -> String;
    /// The state now. The device must be quiet (vCPUs and workers paused).
    fn save(&self) -> Result<Self::State, SnapshotError>;
    /// Take `state` over (the device was just built and is not running yet).
    fn restore(&mut self, state: Self::State) -> Result<(), SnapshotError>;
}

/// A saved state with its version, as it travels.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub state: serde_json::Value,
}

/// Save `dev` with its version.
pub fn save<D: Snapshot + ?Sized>(dev: &D) -> Result<Saved, SnapshotError> {
    let state = dev.save()?;
    let state =
        serde_json::to_value(state).map_err(|e| SnapshotError::bad(dev.snapshot_name(), e))?;
    Ok(Saved {
        version: D::VERSION,
        state,
    })
}

/// Restore `dev` from `saved`, checking the version and the shape first.
pub fn restore<D: Snapshot + ?Sized>(dev: &mut D, saved: Saved) -> Result<(), SnapshotError> {
    if saved.version != D::VERSION {
        return Err(SnapshotError::Version {
            what: dev.snapshot_name(),
            got: saved.version,
            want: D::VERSION,
        });
    }
    let state = serde_json::from_value(saved.state)
        .map_err(|e| SnapshotError::bad(dev.snapshot_name(), e))?;
    dev.restore(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every device in the tree saves and restores through the one trait (a device
    /// added without it does not compile here); the stateless ones round-trip.
    #[test]
    fn every_device_implements_snapshot() {
        fn is<T: Snapshot>() {}
        is::<crate::serial::Serial>();
        is::<crate::rtc::Rtc>();
        is::<crate::acpi_pm::AcpiPm>();
        is::<crate::i8042::I8042>();
        is::<crate::pci::hotplug::PciHotplug>();
        is::<crate::virtio::pci::VirtioPciDevice>();
        is::<crate::virtio::net::Net>();
        is::<crate::vfio::VfioPciDevice>();
        let evt = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (mut a, mut b) = (
            crate::i8042::I8042::new(evt()),
            crate::i8042::I8042::new(evt()),
        );
        testing::round_trip(&a, &mut b);
        testing::round_trip(&b, &mut a);
        let mut pm = crate::acpi_pm::AcpiPm::new(evt(), evt());
        let pm2 = crate::acpi_pm::AcpiPm::new(evt(), evt());
        testing::round_trip(&pm2, &mut pm);
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;

    /// Save `a`, restore into `b`, save `b`: both saves must be equal.
    pub fn round_trip<D: Snapshot>(a: &D, b: &mut D) {
        let first = save(a).expect("save");
        restore(b, first.clone()).expect("restore");
        let second = save(b).expect("save after restore");
        assert_eq!(
            first.state,
            second.state,
            "{} does not round-trip",
            a.snapshot_name()
        );
        let mut wrong = first;
        wrong.version += 1;
        assert!(matches!(
            restore(b, wrong),
            Err(SnapshotError::Version { .. })
        ));
    }
}
