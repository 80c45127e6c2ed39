//! Virtio: the device-side contract ([`VirtioDevice`]) and the PCI transport
//! ([`pci::VirtioPciDevice`]) that any virtio device plugs into.
//!
//! A device is *inactive* until the driver sets DRIVER_OK; only then does it
//! receive guest memory, its queues, their notification eventfds and an
//! interrupt (see [`ActivateArgs`]). A reset hands everything back, so a
//! STANDBY NIC that the guest resets while its primary comes and goes starts
//! clean each time.

pub mod net;
pub mod pci;

use std::io;
use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::{Saved, SnapshotError};

/// Guest memory as devices see it: with the dirty bitmap migration reads.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub type Queue = virtio_queue::Queue;

pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// What the guest's driver did with a device's status: for whoever watches (the VMM's
/// control loop: the event stream, and the failover pair, which waits for the STANDBY
/// ack on FEATURES_OK).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverStatus {
    /// The device accepted these features (FEATURES_OK).
    FeaturesOk(u64),
    /// DRIVER_OK: the device is running.
    DriverOk,
    /// The driver reset a device whose features it had negotiated (status 0).
    Reset,
}

/// Told of every [`DriverStatus`] change. Called on a vCPU thread with the device's
/// lock held: it must only post the news elsewhere, never act on the device.
pub type StatusObserver = Arc<dyn Fn(DriverStatus) + Send + Sync>;

/// How a device raises its interrupts: per-queue vectors and the
/// configuration-change vector, resolved by the transport.
pub trait VirtioInterrupt: Send + Sync {
    fn notify_queue(&self, queue: usize);
    fn notify_config(&self);
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateArgs {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues the driver enabled, with their index and kick eventfd.
    pub queues: Vec<(usize, Queue, EventFd)>,
    pub features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled an unusable queue set: {0}")]
    BadQueues(String),
    #[error("cannot start the device: {0}")]
    Io(#[from] io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = net).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// The driver acknowledged `features` (FEATURES_OK). Returning false
    /// refuses the set (FEATURES_OK stays clear).
    fn ack_features(&mut self, features: u64) -> bool;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError>;
    /// Stop processing and return to the pre-activation state.
    fn reset(&mut self);
    /// Stop the data path and forget nothing: every worker joined, no more guest
    /// memory access or interrupts. Returns the position (index, next_avail,
    /// next_used) of each queue it ran; chains a worker had taken and not used are
    /// handed back (not counted as taken), so the guest loses no buffer. The next
    /// [`VirtioDevice::activate`] carries on from these positions.
    fn pause(&mut self) -> Vec<(usize, u16, u16)>;
    /// The device's own state (negotiated features, addresses, link...), for migration.
    fn save_device(&self) -> Result<Saved, SnapshotError>;
    /// Take a saved state over; the device is inactive and activated later.
    fn restore_device(&mut self, saved: Saved) -> Result<(), SnapshotError>;
    /// After a migration: tell the network the guest is behind this device now.
    /// True if the guest was asked through the config space (the transport then
    /// raises the configuration-change interrupt).
    fn announce_moved(&mut self) -> bool;
    /// Has a worker hit a fatal guest error (the device needs a reset)?
    fn needs_reset(&self) -> bool {
        false
    }
    /// Tell the network where the guest is now (a NIC whose failover primary left).
    /// True if the guest was asked through the config space: the transport then
    /// raises the configuration-change interrupt.
    fn announce(&mut self) -> bool {
        false
    }
}

/// Copy `src[offset..]` into `data`, zero past the end (config-space reads).
pub fn read_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}
