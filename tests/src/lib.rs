//! Tandem's guest-boot harness: guest images, the test host, the guest agent, the
//! reference QEMU, and the `guest_test!` macro that runs one test body in either mode.

pub mod cpio;
pub mod image;
pub mod mode;
pub mod testhost;

/// The MAC of the test guest's failover pair (virtio standby and VFIO primary). The test
/// host's e1000e NICs carry it as their permanent address.
pub const FAILOVER_MAC: &str = "52:54:00:12:34:56";
/// The peer every guest network test talks to (the test host's bridge address).
pub const PEER_IP: &str = "10.0.0.1";

/// One clear, one-line error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

pub type Result<T> = std::result::Result<T, Error>;

/// `err!("fmt", args)` builds an [`Error`].
#[macro_export]
macro_rules! err {
    ($($t:tt)*) => { $crate::Error(format!($($t)*)) };
}
