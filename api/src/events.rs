//! The event stream behind `GET /api/v1/events`: what happened to the VM and its devices,
//! as newline-delimited JSON, to every subscriber at once.
//!
//! The control loop publishes; each subscriber has a bounded queue of its own. A
//! subscriber that does not read fast enough loses events rather than slowing the VM:
//! the events that do not fit are counted, and once there is room again the subscriber
//! first gets an `events-lost` line with the count. Sequence numbers are global, so a
//! gap also shows in `seq`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Events queued for one subscriber before it starts losing them.
pub const QUEUE_LEN: usize = 256;
/// Subscribers at once; one more is refused (503).
pub const MAX_SUBSCRIBERS: usize = 16;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventKind {
    /// The VM (re)booted: `boot` counts boots in this process.
    VmBooted {
        boot: u32,
    },
    VmPaused,
    VmResumed,
    /// The VM is going away (guest power-off, API shutdown, signal).
    VmShutdown {
        reason: String,
    },
    /// A device was put in a PCI slot (hot-added; devices present at boot are in `vm.info`).
    DeviceAdded {
        slot: usize,
        kind: String,
    },
    /// The guest was asked to eject the device (ACPI eject request).
    EjectRequested {
        slot: usize,
    },
    /// The guest ejected the device; `asked` is false for an eject it did on its own.
    DeviceReleased {
        slot: usize,
        asked: bool,
    },
    /// The device was torn down without the guest's release: `cause` is `api` (a
    /// surprise removal), `timeout` (an orderly one that ran out of time) or `reboot`.
    SurpriseRemoved {
        slot: usize,
        cause: String,
    },
    /// An orderly removal ran out of time and the device stays.
    RemovalTimedOut {
        slot: usize,
    },
    /// The guest's driver started the device (virtio DRIVER_OK).
    DriverReady {
        slot: usize,
    },
    /// The guest's driver reset a device it had negotiated (unbound, module unloaded).
    DriverReset {
        slot: usize,
    },
    /// The guest's virtio-net driver acked STANDBY on this standby (FEATURES_OK with
    /// bit 62).
    FailoverNegotiated {
        slot: usize,
    },
    /// A failover primary was put in its slot: its standby's STANDBY is acked.
    PrimaryPlugged {
        slot: usize,
    },
    /// A failover primary left the bus and stays configured: it comes back when the
    /// guest acks STANDBY on its standby again.
    PrimaryHidden {
        slot: usize,
    },
    /// A live migration began: `url` is the destination.
    MigrationStarted {
        url: String,
    },
    /// One pre-copy round sent.
    MigrationProgress(MigrationProgress),
    /// The guest stopped for the last copy (the downtime starts).
    MigrationPaused {
        round: u32,
        pages_left: u64,
    },
    /// The destination runs the guest; this VMM exits.
    MigrationCompleted(MigrationProgress),
    /// The migration stopped; the guest runs on here (`guest` says where it is).
    MigrationFailed {
        reason: String,
        guest: String,
    },
    /// This subscriber could not keep up and lost `count` events before this line.
    EventsLost {
        count: u64,
    },
}

/// Where a migration stands (a `migration-progress` event, and the figures of
/// `migration-completed`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// `precopy`; `wait-destination` (converged, the guest runs on while the destination
    /// opens its passthrough functions); `stop-and-copy`; `done`.
    pub phase: String,
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Dirty pages still to send.
    pub pages_left: u64,
    /// Measured over the last round, in Mbit/s.
    pub rate_mbps: u64,
    /// Time to send what is left at that rate.
    pub estimated_downtime_ms: u64,
    pub elapsed_ms: u64,
    /// Guest stopped to running on the destination (completed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
}

/// One line of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one with every event published (not with `events-lost` lines).
    pub seq: u64,
    /// CLOCK_MONOTONIC in nanoseconds: for intervals between events.
    pub mono_ns: u64,
    /// Wall-clock time, RFC 3339 in UTC with microseconds.
    pub time: String,
    /// The device the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

struct Subscriber {
    tx: mpsc::Sender<Bytes>,
    lost: u64,
}

#[derive(Default)]
struct Hub {
    seq: u64,
    subscribers: Vec<Subscriber>,
}

/// The fan-out: `publish` from the control loop, `subscribe` from the API server.
#[derive(Default)]
pub struct EventHub {
    hub: Mutex<Hub>,
    /// Subscriptions whose connection has not ended yet (the server counts them down).
    streams: AtomicUsize,
}

/// The receiving end of one subscription.
pub struct Subscription {
    pub rx: mpsc::Receiver<Bytes>,
}

impl EventHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscriber, or None when [`MAX_SUBSCRIBERS`] are subscribed.
    pub fn subscribe(&self) -> Option<Subscription> {
        let mut hub = self.hub();
        hub.subscribers.retain(|s| !s.tx.is_closed());
        if hub.subscribers.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        hub.subscribers.push(Subscriber { tx, lost: 0 });
        self.streams.fetch_add(1, Ordering::SeqCst);
        Some(Subscription { rx })
    }

    /// The server finished a subscriber's connection (its last byte is written).
    pub fn stream_ended(&self) {
        let _ = self
            .streams
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Ends every stream (each gets its end, and its connection closes) and waits up to
    /// `wait` for the server to have written them, so that a VMM about to exit sends
    /// its subscribers everything, `vm-shutdown` last. Later publishes reach no one.
    pub fn close(&self, wait: Duration) {
        drop(std::mem::take(&mut self.hub().subscribers));
        let deadline = Instant::now() + wait;
        while self.streams.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        let mut hub = self.hub();
        hub.subscribers.retain(|s| !s.tx.is_closed());
        hub.subscribers.len()
    }

    /// Sends `kind` about `device` to every subscriber and returns the event; never
    /// blocks.
    pub fn publish(&self, device: Option<&str>, kind: EventKind) -> Event {
        let mut hub = self.hub();
        hub.seq += 1;
        let event = Event {
            seq: hub.seq,
            mono_ns: monotonic_ns(),
            time: rfc3339_utc(SystemTime::now()),
            device: device.map(str::to_string),
            kind,
        };
        let line = line_of(&event);
        hub.subscribers.retain_mut(|s| {
            if s.lost > 0 {
                let notice = Event {
                    kind: EventKind::EventsLost { count: s.lost },
                    device: None,
                    ..event.clone()
                };
                match s.tx.try_send(line_of(&notice)) {
                    Ok(()) => s.lost = 0,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        s.lost += 1;
                        return true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            match s.tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lost += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        event
    }
}

fn line_of(event: &Event) -> Bytes {
    let mut s = serde_json::to_string(event).unwrap_or_default();
    s.push('\n');
    Bytes::from(s)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the local `ts` and reads nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `2026-12-03T09:41:44.123456Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn lines(sub: &mut Subscription) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(b) = sub.rx.try_recv() {
            out.push(serde_json::from_slice(&b).unwrap());
        }
        out
    }

    #[test]
    fn every_subscriber_gets_every_event_in_order() {
        let hub = EventHub::new();
        let mut a = hub.subscribe().unwrap();
        hub.publish(None, EventKind::VmPaused);
        let mut b = hub.subscribe().unwrap();
        hub.publish(
            Some("net1"),
            EventKind::DeviceAdded {
                slot: 5,
                kind: "virtio-net".into(),
            },
        );
        let got_a = lines(&mut a);
        let got_b = lines(&mut b);
        assert_eq!(got_a.len(), 2);
        assert_eq!(got_a[0].seq + 1, got_a[1].seq);
        assert_eq!(
            got_a[1], got_b[0],
            "a late subscriber sees what comes after"
        );
        assert_eq!(got_b[0].device.as_deref(), Some("net1"));
        assert!(got_a[0].mono_ns <= got_a[1].mono_ns);
        let json = serde_json::to_value(&got_b[0]).unwrap();
        assert_eq!(json["type"], "device-added");
        assert_eq!(json["slot"], 5);
    }

    #[test]
    fn a_slow_subscriber_loses_events_and_is_told_how_many() {
        let hub = EventHub::new();
        let mut slow = hub.subscribe().unwrap();
        let mut fast = hub.subscribe().unwrap();
        let extra = 10;
        let mut fast_seen = 0;
        for i in 0..QUEUE_LEN + extra {
            hub.publish(None, EventKind::VmBooted { boot: i as u32 });
            fast_seen += lines(&mut fast).len();
        }
        assert_eq!(
            fast_seen,
            QUEUE_LEN + extra,
            "a reader that keeps up loses nothing"
        );
        let first = lines(&mut slow);
        assert_eq!(first.len(), QUEUE_LEN);
        hub.publish(None, EventKind::VmResumed);
        let next = lines(&mut slow);
        assert_eq!(
            next[0].kind,
            EventKind::EventsLost {
                count: extra as u64
            }
        );
        assert_eq!(next[1].kind, EventKind::VmResumed);
        assert_eq!(next[1].seq, (QUEUE_LEN + extra + 1) as u64);
    }

    #[test]
    fn subscribers_are_bounded_and_gone_ones_make_room() {
        let hub = EventHub::new();
        let subs: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| hub.subscribe().unwrap())
            .collect();
        assert!(hub.subscribe().is_none());
        drop(subs);
        let _one = hub.subscribe().unwrap();
        assert_eq!(hub.subscribers(), 1);
    }

    #[test]
    fn wall_clock_is_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_796_290_382, 132_000_000);
        assert_eq!(rfc3339_utc(t), "2026-12-03T09:33:02.132000Z");
        assert_eq!(
            rfc3339_utc(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(rfc3339_utc(leap).starts_with("2000-02-29T00:00:00"));
    }
}
