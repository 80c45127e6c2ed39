//! Steering the host's bridge to a failover primary that just came up.
//!
//! While a failover master has a primary, the guest takes in nothing that arrives on
//! the standby (`net_failover`'s receive handler gives such frames to nobody): the
//! network must send to the primary's port. A learning bridge keeps sending the guest's
//! frames to the port where it last saw the guest's MAC, and after a primary is plugged
//! that is often the standby's tap: the standby's announce put it there when the
//! primary left, and the guest sent through the standby until now. It learns the
//! primary's port only from the guest's next frame through the primary, and a guest
//! that only answers sends nothing, since it never sees the questions: in the test host
//! a peer's ping went unanswered 16 to 60 s after a migration's destination plugged its
//! primary (QEMU's as Tandem's), until the peer's ARP gave up and broadcast.
//!
//! So when the guest's driver takes a primary up (its `driver-ready`), Tandem makes the
//! standby tap's bridge forget the guest's MAC on that tap, every [`EVERY`] for
//! [`WINDOW`]: the bridge's next frame for the guest floods, reaches the primary, the
//! guest answers through it, and the bridge learns the primary's port. The window
//! covers the primary's link coming up (until then the guest still sends through the
//! standby, and the bridge learns the tap again). A deletion that finds no entry on the
//! tap changes nothing. It stops as soon as the primary leaves (the announce must then
//! win). A tap that is no bridge port (routed, or an Open vSwitch port) is left alone,
//! said once in the log. `announce=off` on the standby turns this off as well.

use std::time::{Duration, Instant};

/// How long after the primary's driver came up.
pub const WINDOW: Duration = Duration::from_secs(10);
/// How often in that window.
pub const EVERY: Duration = Duration::from_millis(200);

struct Steer {
    primary: String,
    tap: String,
    ifindex: u32,
    mac: [u8; 6],
    until: Instant,
    next: Instant,
    forgot: u32,
}

#[derive(Default)]
pub struct Steering {
    active: Vec<Steer>,
}

impl Steering {
    /// Primary `primary` came up in the guest: steer `tap`'s bridge away from `mac`.
    pub fn start(&mut self, primary: &str, tap: &str, mac: [u8; 6]) {
        self.stop(primary);
        let index = devices::netlink::ifindex(tap);
        if index == 0 {
            tracing::warn!(
                "failover primary {primary}: the standby's tap {tap} is gone; nothing to steer"
            );
            return;
        }
        let now = Instant::now();
        self.active.push(Steer {
            primary: primary.to_string(),
            tap: tap.to_string(),
            ifindex: index,
            mac,
            until: now + WINDOW,
            next: now,
            forgot: 0,
        });
    }

    /// The primary left (or the VM is rebuilt): stop at once.
    pub fn stop(&mut self, primary: &str) {
        self.active.retain(|s| s.primary != primary);
    }

    pub fn clear(&mut self) {
        self.active.clear();
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.active.iter().map(|s| s.next).min()
    }

    /// Does what is due.
    pub fn run(&mut self) {
        let now = Instant::now();
        self.active.retain_mut(|s| {
            if now < s.next {
                return true;
            }
            if now >= s.until {
                tracing::info!(
                    "failover primary {}: the bridge of tap {} forgot the guest's MAC there {} times in the {} s after the primary came up",
                    s.primary,
                    s.tap,
                    s.forgot,
                    WINDOW.as_secs()
                );
                return false;
            }
            match devices::netlink::forget_bridge_entry(s.ifindex, s.mac) {
                Ok(forgot) => {
                    if forgot {
                        s.forgot += 1;
                        tracing::debug!("failover primary {}: tap {}'s bridge forgot the guest's MAC", s.primary, s.tap);
                    }
                    s.next = now + EVERY;
                    true
                }
                Err(e) => {
                    tracing::info!(
                        "failover primary {}: the standby's tap {} is not a port of a Linux bridge that Tandem can steer ({e}); the network learns the primary's port from the guest's own frames",
                        s.primary,
                        s.tap
                    );
                    false
                }
            }
        });
    }
}
