//! The control loop's side of the failover pairs: the `net_failover` machine,
//! the timers it asked for, and the API requests waiting for its answer.
//! `control.rs` feeds the machine and carries out its actions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use net_failover::{Input, Machine, RequestId, TimerToken};

use crate::config::VmConfig;

/// How long a guest gets to release a primary whose standby it reset, before the
/// primary is removed by surprise (it must not stay visible without STANDBY).
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(5);

/// An API removal of a primary, or a migration's hold of one, answered when the
/// machine says so.
pub struct Waiting {
    pub id: String,
    pub slot: usize,
    pub started: Instant,
    pub reply: api::Answer,
    /// A migration's hold (the primary's configuration stays), not an API removal.
    pub hold: bool,
}

pub struct Failover {
    pub machine: Machine,
    timers: Vec<(Instant, TimerToken)>,
    requests: BTreeMap<RequestId, Waiting>,
    next_request: u64,
}

impl Failover {
    /// The pairs of `cfg`; a primary without `slot=` gets the highest slot nobody
    /// asked for (written back into `cfg`, so it keeps it across reboots and
    /// removals).
    pub fn new(cfg: &mut VmConfig) -> Result<Self, net_failover::PairError> {
        let mut machine = Machine::new(UNPLUG_TIMEOUT);
        for n in cfg.nets.iter().filter(|n| n.net.standby) {
            machine.add_standby(&n.net.id)?;
        }
        let mut taken: Vec<usize> = cfg
            .nets
            .iter()
            .filter_map(|n| n.slot)
            .chain(cfg.devices.iter().filter_map(|d| d.slot))
            .collect();
        // Slots the boot's other devices take when they have none: the lowest free ones.
        let unplaced = cfg.nets.iter().filter(|n| n.slot.is_none()).count()
            + cfg
                .devices
                .iter()
                .filter(|d| d.slot.is_none() && d.failover.is_none())
                .count();
        let mut low = 1;
        for _ in 0..unplaced {
            while taken.contains(&low) {
                low += 1;
            }
            taken.push(low);
        }
        for d in cfg.devices.iter_mut() {
            let Some(standby) = d.failover.clone() else {
                continue;
            };
            let slot = match d.slot {
                Some(s) => s,
                None => {
                    let s = (1..devices::pci::PCI_SLOTS)
                        .rev()
                        .find(|s| !taken.contains(s))
                        .unwrap_or(devices::pci::PCI_SLOTS - 1);
                    taken.push(s);
                    d.slot = Some(s);
                    s
                }
            };
            // Hidden at first: nothing to plug before the guest runs.
            machine.add_primary(&standby, &d.id, slot as u8)?;
        }
        Ok(Self {
            machine,
            timers: Vec::new(),
            requests: BTreeMap::new(),
            next_request: 0,
        })
    }

    /// The primary paired with `standby`, if any.
    pub fn primary_of(&self, standby: &str) -> Option<String> {
        self.machine
            .pairs()
            .into_iter()
            .find(|p| p.standby == standby)
            .and_then(|p| p.primary.map(|(id, _, _)| id))
    }

    pub fn start_timer(&mut self, token: TimerToken, after: Duration) {
        self.timers.push((Instant::now() + after, token));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.iter().map(|(t, _)| *t).min()
    }

    /// Timers that have expired, as inputs (a token the machine no longer waits for
    /// is ignored by it).
    pub fn expired_timers(&mut self) -> Vec<Input> {
        let now = Instant::now();
        let (due, keep): (Vec<_>, Vec<_>) = self.timers.drain(..).partition(|(t, _)| *t <= now);
        self.timers = keep;
        due.into_iter()
            .map(|(_, token)| Input::TimerFired { token })
            .collect()
    }

    /// Keep `reply` until the machine answers the request this returns.
    pub fn remember(&mut self, id: &str, slot: usize, reply: api::Answer) -> RequestId {
        self.remember_as(id, slot, reply, false)
    }

    /// [`Failover::remember`] for a migration's hold of primary `id`.
    pub fn remember_hold(&mut self, id: &str, slot: usize, reply: api::Answer) -> RequestId {
        self.remember_as(id, slot, reply, true)
    }

    fn remember_as(&mut self, id: &str, slot: usize, reply: api::Answer, hold: bool) -> RequestId {
        self.next_request += 1;
        let r = RequestId(self.next_request);
        self.requests.insert(
            r,
            Waiting {
                id: id.to_string(),
                slot,
                started: Instant::now(),
                reply,
                hold,
            },
        );
        r
    }

    /// The primaries (failover=) of `cfg`.
    pub fn primaries(cfg: &VmConfig) -> Vec<String> {
        cfg.devices
            .iter()
            .filter(|d| d.failover.is_some())
            .map(|d| d.id.clone())
            .collect()
    }

    pub fn answer(&mut self, request: RequestId) -> Option<Waiting> {
        self.requests.remove(&request)
    }
}
