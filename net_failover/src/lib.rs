//! The failover pair as a pure state machine: what a VFIO *primary* paired with a
//! virtio-net *standby* (`VIRTIO_NET_F_STANDBY`, bit 62) does, decided in one place.
//!
//! The guest's `net_failover` builds a master over both NICs and sends on the primary
//! while it is present. Two NICs with one MAC are only safe for a guest whose virtio-net
//! driver acked STANDBY, so the primary is on the bus only while the standby's STANDBY
//! is acked; whatever takes the ack away (the driver unbound, the module unloaded, a
//! reboot) takes the primary off the bus again, in order where the guest cooperates and
//! by surprise where it does not in time.
//!
//! This crate does no I/O. The control loop feeds it [`Input`]s (from vCPU threads, the
//! hotplug controller, the API and its timers, always on the control loop's thread) and
//! carries out the [`Action`]s it returns, in order:
//!
//! ```text
//!  guest driver        control loop                  Machine
//!  FEATURES_OK(62) ──▶ Input::StandbyAcked ────────▶ acked = true
//!                      ◀── Event(FailoverNegotiated), Plug{primary, slot},
//!                          Event(PrimaryPlugged)
//!                      hot-add the VFIO device in `slot`, bus-check ──▶ guest enslaves it
//!  status = 0 ───────▶ Input::StandbyReset ────────▶ acked = false, primary Ejecting
//!                      ◀── RequestEject{primary, slot}, StartTimer{token, after},
//!                          Event(EjectRequested)
//!                      Notify(eject request) ─────▶ guest unbinds the primary
//!  _EJ0 ─────────────▶ Input::GuestEjected ────────▶ primary Hidden
//!                      ◀── Unplug{primary, notify_guest: false},
//!                          Event(DeviceReleased), Event(PrimaryHidden)
//!            (or, if the guest does not eject in time)
//!                      Input::TimerFired{token} ──▶ primary Hidden
//!                      ◀── Unplug{primary, notify_guest: true}, Event(SurpriseRemoved),
//!                          Event(PrimaryHidden)
//! ```
//!
//! API removals of a primary take the same path (orderly with a timeout and a policy, or by
//! surprise) and are answered with exactly one [`Action::Reply`]. A guest that ejects the
//! primary on its own parks it: it stays hidden until the standby is negotiated afresh
//! (reset, then acked) or the VM reboots, so Tandem never fights the guest's wish.
//!
//! A live migration holds each primary off the bus before any memory is copied (a
//! passthrough device's DMA writes are not in KVM's dirty log, and the device cannot
//! move): [`Input::HoldPrimary`] takes the same orderly path with reason `Migration`, and
//! the primary stays hidden, whatever the guest's driver does, until [`Input::Unhold`]
//! (the migration failed and the guest stays) lets it back into its slot:
//!
//! ```text
//!  migration (control loop)        Machine                       guest
//!  HoldPrimary{vf0, 10 s} ───────▶ held, Ejecting ──RequestEject──▶ unbinds vf0, _EJ0
//!                        ◀─────── Unplug, Event(DeviceReleased), Reply(Ok)
//!  copy memory, devices; the destination plugs its own primary when the standby acks
//!  (or, on failure) Unhold{vf0} ──▶ not held ──Plug{vf0, slot}──▶ enslaves it again
//! ```
//!
//! Guarantees, checked over every input sequence up to a length by the tests:
//! - no [`Action::Plug`] while the standby's STANDBY is not acked or a migration holds the
//!   primary; a negotiated primary that is neither held nor parked is on the bus;
//! - a primary left on the bus after the ack went away always has its removal under way,
//!   with a timer;
//! - every removal ends exactly once: released by the guest, removed by surprise, or timed
//!   out (then the primary stays, and only an API request or a hold can time out that way);
//! - every API request and hold is answered exactly once, a hold's `Ok` only once the
//!   primary is off the bus;
//! - no action names a device that is not where the action assumes it is (no plug of a
//!   primary on the bus, no eject request or unplug of one that is not).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A device id as the user named it (`--net id=...`, `--device id=...`).
pub type DeviceId = String;

/// Names one timer the machine started; a fired token the machine no longer waits for
/// is ignored, so the control loop never has to cancel timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerToken(pub u64);

/// Names one API request, so its answer can come later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What an orderly API removal does when the guest has not ejected in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    /// Answer with an error and keep the primary (as long as the standby stays acked).
    Error,
    /// Remove it by surprise.
    Surprise,
}

/// How the API asks for a primary to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Eject request; the guest releases it, or `on_timeout` after `timeout`.
    Orderly {
        timeout: Duration,
        on_timeout: OnTimeout,
    },
    /// Off the bus at once, then the guest is told.
    Surprise,
}

/// Something that happened, for the machine to decide on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The guest's virtio-net driver set FEATURES_OK on `standby` with STANDBY acked.
    StandbyAcked { standby: DeviceId },
    /// The guest reset `standby` (status 0) or otherwise lost its driver.
    StandbyReset { standby: DeviceId },
    /// The guest wrote the eject register of `device`'s slot (`_EJ0`).
    GuestEjected { device: DeviceId },
    /// A timer the machine asked for expired.
    TimerFired { token: TimerToken },
    /// The VM was reset (reboot): every device left the bus, every driver is gone.
    VmReset,
    /// Carrying out [`Action::Plug`] failed (the host device went away, or refused to
    /// open): the primary is not on the bus. It stays hidden until the standby is
    /// negotiated afresh, like a primary the guest ejected on its own.
    PlugFailed { primary: DeviceId },
    /// The API asks to remove `primary`.
    RemovePrimary {
        request: RequestId,
        primary: DeviceId,
        how: Removal,
    },
    /// A live migration needs `primary` off the bus (its DMA is not in the dirty log)
    /// and kept off until [`Input::Unhold`]. Hidden: held at once. On the bus: an eject
    /// request, answered when it is off (released, or removed by surprise if the
    /// standby's ack goes meanwhile), or `Err(TimedOut)` after `timeout`, when it
    /// stays, no longer held (the migration fails). Being removed by the API:
    /// `Err(AlreadyRemoving)`.
    HoldPrimary {
        request: RequestId,
        primary: DeviceId,
        timeout: Duration,
    },
    /// The migration ended with the guest still here: a held primary comes back, if its
    /// standby is negotiated and the guest did not eject it on its own.
    Unhold { primary: DeviceId },
}

/// Why an eject request was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectReason {
    /// The standby's STANDBY ack went away.
    StandbyReset,
    /// The API asked.
    Api,
    /// A live migration needs it off the bus.
    Migration,
}

/// How a removal ended by surprise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SurpriseCause {
    /// The API asked for a surprise removal.
    Api,
    /// The guest did not eject in time.
    Timeout,
    /// The VM was reset.
    VmReset,
}

/// What the event stream and the log are told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// STANDBY acked on this standby.
    FailoverNegotiated,
    /// The primary was put in its slot.
    PrimaryPlugged { slot: u8 },
    /// The guest was asked to eject the primary.
    EjectRequested { slot: u8, reason: EjectReason },
    /// The guest ejected the primary (asked or on its own).
    DeviceReleased { asked: bool },
    /// The primary was taken off the bus without the guest's release.
    SurpriseRemoved { cause: SurpriseCause },
    /// An API removal timed out and the primary stayed.
    RemovalTimedOut,
    /// The primary is off the bus and stays configured (it comes back with the next ack).
    PrimaryHidden,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub device: DeviceId,
    pub kind: EventKind,
}

/// How an API removal went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removed {
    /// The guest released it.
    Released,
    /// Removed by surprise (asked, or after the timeout with `OnTimeout::Surprise`, or
    /// because the standby's ack went away meanwhile).
    Surprise,
    /// The VM was reset while the removal waited.
    VmReset,
    /// It was hidden (not on the bus): only its configuration went.
    WasHidden,
}

/// Why an API removal was refused or failed; nothing changed unless it says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoveError {
    /// No primary with this id.
    NotFound(DeviceId),
    /// Another API removal of it is already waiting for the guest.
    AlreadyRemoving(DeviceId),
    /// The guest did not eject it in time; it stays.
    TimedOut(DeviceId),
}

impl fmt::Display for RemoveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoveError::NotFound(d) => write!(f, "no failover primary `{d}`"),
            RemoveError::AlreadyRemoving(d) => {
                write!(f, "a removal of `{d}` is already waiting for the guest")
            }
            RemoveError::TimedOut(d) => write!(
                f,
                "the guest did not release `{d}` in time; it stays (it goes if the guest ejects it later)"
            ),
        }
    }
}

/// What the control loop is to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put `primary` in `slot` and tell the guest (bus check).
    Plug { primary: DeviceId, slot: u8 },
    /// Ask the guest to eject `primary` from `slot` (eject request).
    RequestEject { primary: DeviceId, slot: u8 },
    /// Take `primary` off the bus (its DMA mappings and interrupts go); if `notify_guest`,
    /// tell the guest its slot is empty (a surprise removal), else the guest already
    /// released it or is being reset.
    Unplug {
        primary: DeviceId,
        slot: u8,
        notify_guest: bool,
    },
    /// Feed `Input::TimerFired { token }` back after `after`.
    StartTimer { token: TimerToken, after: Duration },
    /// Tell the event stream and the log.
    Event(Event),
    /// Answer API request `request`.
    Reply {
        request: RequestId,
        result: Result<Removed, RemoveError>,
    },
}

/// Why a pair could not be set up; nothing changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairError {
    /// `failover=` names a NIC that is not a standby (`standby=on`) or does not exist.
    NotAStandby(DeviceId),
    /// The standby already has a primary.
    StandbyTaken {
        standby: DeviceId,
        primary: DeviceId,
    },
    /// The id is already a standby or a primary.
    DuplicateId(DeviceId),
    /// The standby still has a primary, which must go first.
    StandbyHasPrimary {
        standby: DeviceId,
        primary: DeviceId,
    },
}

impl fmt::Display for PairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairError::NotAStandby(s) => write!(
                f,
                "failover={s}: no virtio-net NIC `{s}` with standby=on to pair with"
            ),
            PairError::StandbyTaken { standby, primary } => write!(
                f,
                "failover={standby}: the standby already has the primary `{primary}`"
            ),
            PairError::DuplicateId(d) => write!(f, "id `{d}` is already in use"),
            PairError::StandbyHasPrimary { standby, primary } => write!(
                f,
                "standby `{standby}` still has the primary `{primary}`: remove the primary first"
            ),
        }
    }
}

impl std::error::Error for PairError {}

/// Where a primary is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrimaryState {
    /// Not on the bus.
    Hidden,
    /// On the bus.
    Plugged,
    /// On the bus, the guest asked to eject it, a timer running.
    Ejecting,
}

/// A pair as the outside sees it (`vm.info`, tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairView {
    pub standby: DeviceId,
    /// The standby's STANDBY is acked by the guest's driver.
    pub negotiated: bool,
    /// The primary, its slot and where it is.
    pub primary: Option<(DeviceId, u8, PrimaryState)>,
    /// The guest ejected the primary on its own; it stays hidden until the next
    /// negotiation.
    pub parked: bool,
    /// A live migration holds the primary off the bus.
    pub held: bool,
}

/// An eject request waiting for the guest.
#[derive(Clone, Debug)]
struct Pending {
    reason: EjectReason,
    timer: TimerToken,
    on_timeout: OnTimeout,
    /// The API request to answer when it ends, if the API asked.
    request: Option<RequestId>,
    /// Drop the primary's configuration when it ends (an API removal), or keep it hidden.
    forget: bool,
}

#[derive(Clone, Debug)]
enum State {
    Hidden,
    Plugged,
    Ejecting(Pending),
}

#[derive(Clone, Debug)]
struct Primary {
    id: DeviceId,
    slot: u8,
    state: State,
    /// Kept off the bus for a live migration (see [`Input::HoldPrimary`]).
    held: bool,
    /// A migration's eject request ran out of time and still stands in the guest: its
    /// late answer brings the primary back instead of parking it.
    late_replug: bool,
}

#[derive(Clone, Debug)]
struct Pair {
    acked: bool,
    parked: bool,
    primary: Option<Primary>,
}

/// Every failover pair of one VM.
#[derive(Clone, Debug)]
pub struct Machine {
    /// How long the guest gets to release a primary whose standby lost its ack.
    unplug_timeout: Duration,
    pairs: BTreeMap<DeviceId, Pair>,
    next_timer: u64,
}

impl Machine {
    /// `unplug_timeout`: the bounded wait before a primary whose standby was reset is
    /// removed by surprise.
    pub fn new(unplug_timeout: Duration) -> Self {
        Machine {
            unplug_timeout,
            pairs: BTreeMap::new(),
            next_timer: 0,
        }
    }

    /// A NIC with `standby=on` exists (at boot or hot-added). Its driver has not acked yet.
    pub fn add_standby(&mut self, standby: &str) -> Result<(), PairError> {
        if self.is_known(standby) {
            return Err(PairError::DuplicateId(standby.into()));
        }
        self.pairs.insert(
            standby.into(),
            Pair {
                acked: false,
                parked: false,
                primary: None,
            },
        );
        Ok(())
    }

    /// The standby NIC goes away. Refused while it has a primary.
    pub fn remove_standby(&mut self, standby: &str) -> Result<(), PairError> {
        let pair = self
            .pairs
            .get(standby)
            .ok_or_else(|| PairError::NotAStandby(standby.into()))?;
        if let Some(p) = &pair.primary {
            return Err(PairError::StandbyHasPrimary {
                standby: standby.into(),
                primary: p.id.clone(),
            });
        }
        self.pairs.remove(standby);
        Ok(())
    }

    /// Pairs `primary` (to live in `slot`) with `standby`. Hidden until the standby is
    /// acked; plugged at once (the returned actions) if it already is.
    pub fn add_primary(
        &mut self,
        standby: &str,
        primary: &str,
        slot: u8,
    ) -> Result<Vec<Action>, PairError> {
        if self.is_known(primary) {
            return Err(PairError::DuplicateId(primary.into()));
        }
        let pair = self
            .pairs
            .get_mut(standby)
            .ok_or_else(|| PairError::NotAStandby(standby.into()))?;
        if let Some(p) = &pair.primary {
            return Err(PairError::StandbyTaken {
                standby: standby.into(),
                primary: p.id.clone(),
            });
        }
        pair.primary = Some(Primary {
            id: primary.into(),
            slot,
            state: State::Hidden,
            held: false,
            late_replug: false,
        });
        let mut out = Vec::new();
        Self::plug_if_negotiated(pair, &mut out);
        Ok(out)
    }

    /// Every pair, by standby id.
    pub fn pairs(&self) -> Vec<PairView> {
        self.pairs
            .iter()
            .map(|(standby, p)| PairView {
                standby: standby.clone(),
                negotiated: p.acked,
                primary: p.primary.as_ref().map(|pr| {
                    (
                        pr.id.clone(),
                        pr.slot,
                        match pr.state {
                            State::Hidden => PrimaryState::Hidden,
                            State::Plugged => PrimaryState::Plugged,
                            State::Ejecting(_) => PrimaryState::Ejecting,
                        },
                    )
                }),
                parked: p.parked,
                held: p.primary.as_ref().is_some_and(|pr| pr.held),
            })
            .collect()
    }

    /// True if `id` is a standby or a primary here.
    pub fn is_known(&self, id: &str) -> bool {
        self.pairs.contains_key(id) || self.standby_of(id).is_some()
    }

    /// The standby `primary` is paired with.
    pub fn standby_of(&self, primary: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(_, p)| p.primary.as_ref().is_some_and(|pr| pr.id == primary))
            .map(|(s, _)| s.as_str())
    }

    /// Decides what `input` means; the control loop carries out the actions in order.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::StandbyAcked { standby } => {
                if let Some(pair) = self.pairs.get_mut(&standby) {
                    if !pair.acked {
                        pair.acked = true;
                        out.push(event(&standby, EventKind::FailoverNegotiated));
                        Self::plug_if_negotiated(pair, &mut out);
                    }
                }
            }
            Input::StandbyReset { standby } => {
                let timer = self.timer();
                let timeout = self.unplug_timeout;
                if let Some(pair) = self.pairs.get_mut(&standby) {
                    if pair.acked {
                        pair.acked = false;
                        // A fresh negotiation lifts a park: the guest's new driver asks anew.
                        pair.parked = false;
                        if let Some(p) = pair.primary.as_mut() {
                            if matches!(p.state, State::Plugged) {
                                let pending = Pending {
                                    reason: EjectReason::StandbyReset,
                                    timer,
                                    on_timeout: OnTimeout::Surprise,
                                    request: None,
                                    forget: false,
                                };
                                Self::request_eject(p, pending, timeout, &mut out);
                            }
                        }
                    } else {
                        pair.parked = false;
                    }
                }
            }
            Input::GuestEjected { device } => {
                if let Some(pair) = self.pair_of_primary(&device) {
                    Self::guest_ejected(pair, &mut out);
                }
            }
            Input::TimerFired { token } => {
                let hit = self.pairs.values_mut().find(|p| {
                    matches!(&p.primary, Some(Primary { state: State::Ejecting(e), .. }) if e.timer == token)
                });
                if let Some(pair) = hit {
                    Self::timed_out(pair, &mut out);
                }
            }
            Input::VmReset => {
                for pair in self.pairs.values_mut() {
                    pair.acked = false;
                    pair.parked = false;
                    Self::reset(pair, &mut out);
                }
            }
            Input::PlugFailed { primary } => {
                if let Some(pair) = self.pair_of_primary(&primary) {
                    if let Some(p) = pair.primary.as_mut() {
                        if matches!(p.state, State::Plugged) {
                            p.state = State::Hidden;
                            pair.parked = true;
                            out.push(event(&primary, EventKind::PrimaryHidden));
                        }
                    }
                }
            }
            Input::RemovePrimary {
                request,
                primary,
                how,
            } => self.requested(request, primary, &mut out, |pair, timer, out| {
                Self::api_remove(pair, request, how, timer, out)
            }),
            Input::HoldPrimary {
                request,
                primary,
                timeout,
            } => self.requested(request, primary, &mut out, |pair, timer, out| {
                Self::hold(pair, request, timeout, timer, out)
            }),
            Input::Unhold { primary } => {
                if let Some(pair) = self.pair_of_primary(&primary) {
                    if let Some(p) = pair.primary.as_mut() {
                        if p.held {
                            p.held = false;
                            Self::plug_if_negotiated(pair, &mut out);
                        }
                    }
                }
            }
        }
        out
    }

    /// A request about `primary`: `then` with its pair and a fresh timer, or answered
    /// `NotFound`.
    fn requested(
        &mut self,
        request: RequestId,
        primary: DeviceId,
        out: &mut Vec<Action>,
        then: impl FnOnce(&mut Pair, TimerToken, &mut Vec<Action>),
    ) {
        let timer = self.timer();
        match self.pair_of_primary(&primary) {
            None => out.push(Action::Reply {
                request,
                result: Err(RemoveError::NotFound(primary)),
            }),
            Some(pair) => then(pair, timer, out),
        }
    }

    fn timer(&mut self) -> TimerToken {
        self.next_timer += 1;
        TimerToken(self.next_timer)
    }

    fn pair_of_primary(&mut self, primary: &str) -> Option<&mut Pair> {
        self.pairs
            .values_mut()
            .find(|p| p.primary.as_ref().is_some_and(|pr| pr.id == primary))
    }

    /// Plugs a hidden primary of a negotiated, unparked pair.
    fn plug_if_negotiated(pair: &mut Pair, out: &mut Vec<Action>) {
        if !pair.acked || pair.parked {
            return;
        }
        if let Some(p) = pair.primary.as_mut() {
            if matches!(p.state, State::Hidden) && !p.held {
                p.state = State::Plugged;
                out.push(Action::Plug {
                    primary: p.id.clone(),
                    slot: p.slot,
                });
                out.push(event(&p.id, EventKind::PrimaryPlugged { slot: p.slot }));
            }
        }
    }

    fn request_eject(p: &mut Primary, pending: Pending, after: Duration, out: &mut Vec<Action>) {
        p.late_replug = false;
        out.push(Action::RequestEject {
            primary: p.id.clone(),
            slot: p.slot,
        });
        out.push(Action::StartTimer {
            token: pending.timer,
            after,
        });
        out.push(event(
            &p.id,
            EventKind::EjectRequested {
                slot: p.slot,
                reason: pending.reason,
            },
        ));
        p.state = State::Ejecting(pending);
    }

    /// Takes the primary off the bus, then says how its removal ended (`end`: the event
    /// and the API answer), then keeps it hidden or, if `forget`, drops it.
    fn take_off(
        pair: &mut Pair,
        notify_guest: bool,
        forget: bool,
        end: Option<(EventKind, Option<RequestId>, Removed)>,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = pair.primary.as_mut() else {
            return;
        };
        let id = p.id.clone();
        out.push(Action::Unplug {
            primary: id.clone(),
            slot: p.slot,
            notify_guest,
        });
        if let Some((kind, request, removed)) = end {
            out.push(event(&id, kind));
            reply(request, Ok(removed), out);
        }
        if forget {
            pair.primary = None;
        } else {
            p.state = State::Hidden;
            p.late_replug = false;
            out.push(event(&id, EventKind::PrimaryHidden));
        }
    }

    fn guest_ejected(pair: &mut Pair, out: &mut Vec<Action>) {
        let Some(p) = pair.primary.as_mut() else {
            return;
        };
        match std::mem::replace(&mut p.state, State::Plugged) {
            // Not on the bus: a stale or made-up eject.
            State::Hidden => p.state = State::Hidden,
            State::Plugged if p.late_replug => {
                // The late answer to a migration's eject request: that migration
                // failed, so the primary comes back at once.
                let end = (
                    EventKind::DeviceReleased { asked: false },
                    None,
                    Removed::Released,
                );
                Self::take_off(pair, false, false, Some(end), out);
                Self::plug_if_negotiated(pair, out);
            }
            State::Plugged => {
                // The guest's own wish: released, and parked until negotiated afresh.
                pair.parked = true;
                let end = (
                    EventKind::DeviceReleased { asked: false },
                    None,
                    Removed::Released,
                );
                Self::take_off(pair, false, false, Some(end), out);
            }
            State::Ejecting(e) => {
                let end = (
                    EventKind::DeviceReleased { asked: true },
                    e.request,
                    Removed::Released,
                );
                Self::take_off(pair, false, e.forget, Some(end), out);
                Self::plug_if_negotiated(pair, out);
            }
        }
    }

    fn timed_out(pair: &mut Pair, out: &mut Vec<Action>) {
        let Some(p) = pair.primary.as_mut() else {
            return;
        };
        let State::Ejecting(e) = std::mem::replace(&mut p.state, State::Plugged) else {
            return;
        };
        let id = p.id.clone();
        if e.reason == EjectReason::Migration {
            // The migration fails; the primary is no longer held, and the guest's late
            // answer to the request brings it back.
            p.held = false;
            p.late_replug = true;
        }
        if e.on_timeout == OnTimeout::Error && pair.acked {
            // The primary stays; the eject request stands in the guest, and its late
            // release counts as the guest's own (parked), or for a migration's request,
            // brings it back.
            out.push(event(&id, EventKind::RemovalTimedOut));
            reply(e.request, Err(RemoveError::TimedOut(id)), out);
            return;
        }
        // Surprise: by policy, or because the standby is no longer negotiated and the
        // primary must not stay visible.
        let cause = SurpriseCause::Timeout;
        let end = (
            EventKind::SurpriseRemoved { cause },
            e.request,
            Removed::Surprise,
        );
        Self::take_off(pair, true, e.forget, Some(end), out);
        Self::plug_if_negotiated(pair, out);
    }

    fn reset(pair: &mut Pair, out: &mut Vec<Action>) {
        let Some(p) = pair.primary.as_mut() else {
            return;
        };
        match std::mem::replace(&mut p.state, State::Plugged) {
            State::Hidden => p.state = State::Hidden,
            State::Plugged => Self::take_off(pair, false, false, None, out),
            State::Ejecting(e) => {
                let cause = SurpriseCause::VmReset;
                let end = (
                    EventKind::SurpriseRemoved { cause },
                    e.request,
                    Removed::VmReset,
                );
                Self::take_off(pair, false, e.forget, Some(end), out);
            }
        }
    }

    fn api_remove(
        pair: &mut Pair,
        request: RequestId,
        how: Removal,
        timer: TimerToken,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = pair.primary.as_mut() else {
            return;
        };
        let id = p.id.clone();
        match (&mut p.state, how) {
            (State::Hidden, _) => {
                pair.primary = None;
                reply(Some(request), Ok(Removed::WasHidden), out);
            }
            (State::Plugged, Removal::Surprise) => {
                let end = (
                    EventKind::SurpriseRemoved {
                        cause: SurpriseCause::Api,
                    },
                    Some(request),
                    Removed::Surprise,
                );
                Self::take_off(pair, true, true, Some(end), out);
            }
            (
                State::Plugged,
                Removal::Orderly {
                    timeout,
                    on_timeout,
                },
            ) => {
                let pending = Pending {
                    reason: EjectReason::Api,
                    timer,
                    on_timeout,
                    request: Some(request),
                    forget: true,
                };
                Self::request_eject(p, pending, timeout, out);
            }
            (State::Ejecting(e), _) if e.request.is_some() => {
                out.push(Action::Reply {
                    request,
                    result: Err(RemoveError::AlreadyRemoving(id)),
                });
            }
            (State::Ejecting(_), Removal::Surprise) => {
                // The standby's reset already asked the guest; the API wants it gone now.
                let end = (
                    EventKind::SurpriseRemoved {
                        cause: SurpriseCause::Api,
                    },
                    Some(request),
                    Removed::Surprise,
                );
                Self::take_off(pair, true, true, Some(end), out);
            }
            (State::Ejecting(e), Removal::Orderly { .. }) => {
                // Join the eject the standby's reset started (its timer and surprise
                // policy stand); this request is answered when it ends, and the primary
                // is forgotten then.
                e.request = Some(request);
                e.forget = true;
            }
        }
    }
}

impl Machine {
    fn hold(
        pair: &mut Pair,
        request: RequestId,
        timeout: Duration,
        timer: TimerToken,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = pair.primary.as_mut() else {
            return;
        };
        match &mut p.state {
            State::Hidden => {
                p.held = true;
                reply(Some(request), Ok(Removed::WasHidden), out);
            }
            State::Plugged => {
                p.held = true;
                let pending = Pending {
                    reason: EjectReason::Migration,
                    timer,
                    on_timeout: OnTimeout::Error,
                    request: Some(request),
                    forget: false,
                };
                Self::request_eject(p, pending, timeout, out);
            }
            State::Ejecting(e) if e.request.is_some() => out.push(Action::Reply {
                request,
                result: Err(RemoveError::AlreadyRemoving(p.id.clone())),
            }),
            State::Ejecting(e) => {
                // The standby's reset already asked the guest (its timer and surprise
                // policy stand): answered when that ends, and kept off after it.
                p.held = true;
                e.request = Some(request);
            }
        }
    }
}

fn event(device: &str, kind: EventKind) -> Action {
    Action::Event(Event {
        device: device.into(),
        kind,
    })
}

fn reply(request: Option<RequestId>, result: Result<Removed, RemoveError>, out: &mut Vec<Action>) {
    if let Some(request) = request {
        out.push(Action::Reply { request, result });
    }
}

#[cfg(test)]
mod tests;
