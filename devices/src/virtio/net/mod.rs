//! virtio-net over a tap, with VIRTIO_NET_F_STANDBY for failover pairs.
//!
//! Queues: rx0, tx0, rx1, tx1, ..., then the control queue. Each queue pair
//! runs on its own worker thread with its own tap queue; the control queue
//! is served by pair 0's worker. Workers exist only while the driver has
//! the device activated (DRIVER_OK); a reset stops and joins them.

pub mod steering;
pub mod tap;
mod worker;

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;
use thiserror::Error;
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::{
    read_bytes, ActivateArgs, ActivateError, VirtioDevice, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{Saved, SnapshotError};
pub use tap::TapError;

pub const VIRTIO_ID_NET: u16 = 1;

/// Did the driver ack `VIRTIO_NET_F_STANDBY` (bit 62) in `features`?
pub fn acks_standby(features: u64) -> bool {
    features & (1 << VIRTIO_NET_F_STANDBY) != 0
}
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 32768;
pub const CTRL_QUEUE_SIZE: u16 = 64;
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 65535 - 14 - tap::VNET_HDR_LEN as u16;

#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("num_queues={0}: must be an even number from 2 (one rx/tx pair per 2)")]
    QueueCount(u16),
    #[error("queue_size={0}: must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("mtu={0}: must be between {MIN_MTU} and {MAX_MTU}")]
    Mtu(u16),
}

/// What the user configured.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub id: String,
    pub tap: String,
    /// Shown as `52:54:00:12:34:56`, as the user wrote it.
    #[serde(serialize_with = "serialize_mac", deserialize_with = "deserialize_mac")]
    pub mac: [u8; 6],
    pub standby: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub mtu: Option<u16>,
    /// When a failover primary leaves, tell the host network that the guest's MAC
    /// is reachable through this NIC's tap now (see [`Net::announce`]).
    pub announce: bool,
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), NetError> {
        if self.num_queues < 2 || !self.num_queues.is_multiple_of(2) || self.num_queues > 32 {
            return Err(NetError::QueueCount(self.num_queues));
        }
        if !self.queue_size.is_power_of_two()
            || self.queue_size < 2
            || self.queue_size > MAX_QUEUE_SIZE
        {
            return Err(NetError::QueueSize(self.queue_size));
        }
        if let Some(m) = self.mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&m) {
                return Err(NetError::Mtu(m));
            }
        }
        Ok(())
    }

    pub fn pairs(&self) -> usize {
        usize::from(self.num_queues / 2)
    }
}

/// State workers and the config space share.
pub(crate) struct NetShared {
    pub mac: Mutex<[u8; 6]>,
    pub status: Mutex<u16>,
    pub needs_reset: AtomicBool,
    /// One set of counters per queue pair.
    pub stats: Vec<Arc<worker::Stats>>,
    pub queues: tap::TapQueues,
}

#[cfg(feature = "fuzz")]
pub use worker::fuzz;
pub use worker::StatsSnapshot;

/// Reads a NIC's counters without its lock (the API's vm.info reads them while a
/// vCPU may hold the device).
#[derive(Clone)]
pub struct NetStatsSource {
    shared: Arc<NetShared>,
    tap: String,
    tap_dropped_before: u64,
}

impl NetStatsSource {
    /// Counters per queue pair.
    pub fn pairs(&self) -> Vec<StatsSnapshot> {
        self.shared.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// Frames for the guest that the tap itself dropped since this NIC was made,
    /// because its queue was full (the guest posted no rx buffers fast enough); the
    /// kernel counts them per tap, not per queue. None if the tap is gone.
    pub fn tap_dropped(&self) -> Option<u64> {
        tap_tx_dropped(&self.tap).map(|n| n.saturating_sub(self.tap_dropped_before))
    }
}

/// The kernel's count of frames the tap dropped on their way out of the host's
/// network (towards the reader of the tap).
fn tap_tx_dropped(tap: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/tx_dropped"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Called with the acknowledged features when the driver sets FEATURES_OK
/// (`Some`) and when it resets the device (`None`) — the failover pairing
/// listens for STANDBY here.
pub type FeatureListener = Box<dyn Fn(Option<u64>) + Send>;

struct Worker {
    kill: EventFd,
    handle: JoinHandle<worker::PairQueues>,
}

pub struct Net {
    cfg: NetConfig,
    taps: Vec<File>,
    avail_features: u64,
    acked_features: u64,
    shared: Arc<NetShared>,
    workers: Vec<Worker>,
    listener: Option<FeatureListener>,
    /// Queue pairs in use when the data path paused (or on the source): the next
    /// activation keeps them rather than starting on the first pair only.
    resume_pairs: Option<usize>,
}

/// What a migration carries of a NIC besides its queues.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct NetState {
    acked_features: u64,
    mac: [u8; 6],
    status: u16,
    active_pairs: usize,
}

impl Net {
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        cfg.validate()?;
        let taps = tap::open(&cfg.tap, cfg.pairs())?;
        if cfg.pairs() > 1 {
            // Without it a TCP stream's frames follow the queue the guest last sent
            // its ACKs on and arrive out of order (see `steering`); the NIC still
            // works without it, so a kernel that refuses it costs a warning.
            if let Err(e) = steering::steer_by_flow(&taps[0]) {
                tracing::warn!(
                    tap = %cfg.tap,
                    "flow steering unavailable, frames of a flow may take any queue: {e}"
                );
            }
        }
        let dups = taps
            .iter()
            .map(File::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| TapError::Io {
                name: cfg.tap.clone(),
                op: "dup",
                source,
            })?;
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_RING_EVENT_IDX)
            // A tx frame in an indirect table takes one ring slot, not one
            // per fragment: many more frames in flight on the same ring.
            | (1 << VIRTIO_F_RING_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_ECN)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_CTRL_VQ)
            | (1 << VIRTIO_NET_F_CTRL_RX)
            | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
            | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE);
        if cfg.pairs() > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        if cfg.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        if cfg.standby {
            f |= 1 << VIRTIO_NET_F_STANDBY;
        }
        let shared = Arc::new(NetShared {
            mac: Mutex::new(cfg.mac),
            status: Mutex::new(VIRTIO_NET_S_LINK_UP as u16),
            needs_reset: AtomicBool::new(false),
            stats: (0..cfg.pairs()).map(|_| Arc::default()).collect(),
            queues: tap::TapQueues::new(dups, cfg.pairs()),
        });
        Ok(Self {
            cfg,
            taps,
            avail_features: f,
            acked_features: 0,
            shared,
            workers: vec![],
            listener: None,
            resume_pairs: None,
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn set_feature_listener(&mut self, l: FeatureListener) {
        self.listener = Some(l);
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The data path's counters (frames, bytes, drops), with where they come from.
    pub fn stats_source(&self) -> NetStatsSource {
        NetStatsSource {
            shared: self.shared.clone(),
            tap: self.cfg.tap.clone(),
            tap_dropped_before: tap_tx_dropped(&self.cfg.tap).unwrap_or(0),
        }
    }

    /// Ask the guest to announce itself (gratuitous ARP) after a migration.
    /// Returns false when the driver did not negotiate GUEST_ANNOUNCE.
    pub fn request_announce(&self) -> bool {
        if self.acked_features & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) == 0 {
            return false;
        }
        *self.shared.status.lock().unwrap_or_else(|e| e.into_inner()) |=
            VIRTIO_NET_S_ANNOUNCE as u16;
        true
    }

    /// A RARP from the guest's MAC, as the guest would send it (vnet header first):
    /// switches and bridges learn from its source that the MAC is behind this tap.
    fn rarp_frame(mac: &[u8; 6]) -> Vec<u8> {
        let mut f = vec![0u8; tap::VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(mac);
        f.extend_from_slice(&[0x80, 0x35]); // RARP
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]); // Ethernet/IPv4, reverse request
        f.extend_from_slice(mac);
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(mac);
        f.extend_from_slice(&[0; 4]);
        f.resize(tap::VNET_HDR_LEN + 60, 0);
        f
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&*self.shared.mac.lock().unwrap_or_else(|e| e.into_inner()));
        let status = *self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&(self.cfg.pairs() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.cfg.mtu.unwrap_or(1500).to_le_bytes());
        c
    }

    /// Stop and join every worker; where each left its queues.
    fn stop_workers(&mut self) -> Vec<(usize, u16, u16)> {
        let mut at = Vec::new();
        for w in self.workers.drain(..) {
            let _ = w.kill.write(1);
            match w.handle.join() {
                Ok(q) => {
                    for (idx, queue, _) in [q.rx, q.tx, q.ctrl].into_iter().flatten() {
                        at.push((idx, queue.next_avail(), queue.next_used()));
                    }
                }
                Err(_) => tracing::error!("net {}: a worker panicked", self.cfg.id),
            }
        }
        at
    }

    /// RARPs into the tap from the VMM (it works whatever the guest does) and, if the
    /// driver negotiated GUEST_ANNOUNCE, a request that the guest announce itself.
    fn self_announce(&mut self) -> bool {
        let mac = *self.shared.mac.lock().unwrap_or_else(|e| e.into_inner());
        let frame = Self::rarp_frame(&mac);
        if let Some(tap) = self.taps.first() {
            for _ in 0..3 {
                if let Err(e) = std::io::Write::write(&mut &*tap, &frame) {
                    tracing::debug!("net {}: announce on tap {}: {e}", self.cfg.id, self.cfg.tap);
                }
            }
        }
        self.request_announce()
    }

    fn offload_flags(features: u64) -> u32 {
        let has = |b: u32| features & (1 << b) != 0;
        let mut f = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            f |= tap::TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                f |= tap::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                f |= tap::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_ECN) && f & (tap::TUN_F_TSO4 | tap::TUN_F_TSO6) != 0 {
                f |= tap::TUN_F_TSO_ECN;
            }
        }
        f
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut v = vec![self.cfg.queue_size; self.cfg.pairs() * 2];
        v.push(CTRL_QUEUE_SIZE);
        v
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) -> bool {
        if features & !self.avail_features != 0 || features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return false;
        }
        self.acked_features = features;
        if let Some(l) = &self.listener {
            l(Some(features));
        }
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Legacy drivers could write the MAC here; a modern driver uses the
        // control queue. Accept writes that fall inside the MAC field only.
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= 6)
        {
            let mut mac = self.shared.mac.lock().unwrap_or_else(|e| e.into_inner());
            mac[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        self.stop_workers();
        let pairs = self.cfg.pairs();
        let ctrl_index = pairs * 2;
        let mut per_pair: Vec<worker::PairQueues> =
            (0..pairs).map(|_| worker::PairQueues::default()).collect();
        for (idx, queue, evt) in args.queues {
            if idx == ctrl_index {
                per_pair[0].ctrl = Some((idx, queue, evt));
            } else if let Some(p) = per_pair.get_mut(idx / 2) {
                if idx % 2 == 0 {
                    p.rx = Some((idx, queue, evt));
                } else {
                    p.tx = Some((idx, queue, evt));
                }
            }
        }
        let offload = Self::offload_flags(args.features);
        // The driver starts on the first pair; VQ_PAIRS_SET adds the others. A data
        // path that paused (or migrated) goes on with the pairs it had.
        let pairs_now = self.resume_pairs.take().unwrap_or(1);
        if let Err(e) = self.shared.queues.set_active(pairs_now) {
            tracing::warn!(
                "net {}: cannot detach the unused tap queues: {e}",
                self.cfg.id
            );
        }
        for (i, queues) in per_pair.into_iter().enumerate() {
            if queues.rx.is_none() && queues.tx.is_none() && queues.ctrl.is_none() {
                continue;
            }
            let tap = self.taps[i].try_clone()?;
            tap::set_offload(&tap, offload)?;
            let kill = EventFd::new(libc::EFD_NONBLOCK)?;
            let w = worker::PairWorker::new(
                format!("{}-q{i}", self.cfg.id),
                args.mem.clone(),
                args.interrupt.clone(),
                queues,
                tap,
                kill.try_clone()?,
                self.shared.clone(),
                args.features,
                i,
            )?;
            let handle = std::thread::Builder::new()
                .name(format!("net-{}-q{i}", self.cfg.id))
                .spawn(move || w.run())?;
            self.workers.push(Worker { kill, handle });
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        self.resume_pairs = None;
        self.acked_features = 0;
        *self.shared.status.lock().unwrap_or_else(|e| e.into_inner()) = VIRTIO_NET_S_LINK_UP as u16;
        *self.shared.mac.lock().unwrap_or_else(|e| e.into_inner()) = self.cfg.mac;
        self.shared.needs_reset.store(false, Ordering::SeqCst);
        if let Some(l) = &self.listener {
            l(None);
        }
    }

    fn needs_reset(&self) -> bool {
        self.shared.needs_reset.load(Ordering::SeqCst)
    }

    /// Traffic for the guest's MAC must come here now (its failover primary left):
    /// three RARPs into the tap at once, from the VMM (as QEMU's self-announce does),
    /// and a request that the guest announce itself (see [`Net::self_announce`]).
    fn announce(&mut self) -> bool {
        if !self.cfg.announce {
            return false;
        }
        self.self_announce()
    }

    fn announce_moved(&mut self) -> bool {
        self.self_announce()
    }

    fn pause(&mut self) -> Vec<(usize, u16, u16)> {
        if self.workers.is_empty() {
            return Vec::new();
        }
        self.resume_pairs = Some(self.shared.queues.active());
        self.stop_workers()
    }

    fn save_device(&self) -> Result<Saved, SnapshotError> {
        crate::snapshot::save(self)
    }

    fn restore_device(&mut self, saved: Saved) -> Result<(), SnapshotError> {
        crate::snapshot::restore(self, saved)
    }
}

impl crate::snapshot::Snapshot for Net {
    type State = NetState;
    const VERSION: u32 = 1;
    fn snapshot_name(&self) -> String {
        format!("net {}", self.cfg.id)
    }
    fn save(&self) -> Result<NetState, SnapshotError> {
        Ok(NetState {
            acked_features: self.acked_features,
            mac: *self.shared.mac.lock().unwrap_or_else(|e| e.into_inner()),
            status: *self.shared.status.lock().unwrap_or_else(|e| e.into_inner()),
            active_pairs: self
                .resume_pairs
                .unwrap_or_else(|| self.shared.queues.active()),
        })
    }
    fn restore(&mut self, s: NetState) -> Result<(), SnapshotError> {
        let name = self.snapshot_name();
        if s.acked_features & !self.avail_features != 0 {
            return Err(SnapshotError::bad(
                name,
                format!(
                    "the guest negotiated features {:#x} this NIC does not offer ({:#x}): \
                     give it the same options (queues, mtu, standby) as on the source",
                    s.acked_features, self.avail_features
                ),
            ));
        }
        if s.active_pairs == 0 || s.active_pairs > self.cfg.pairs() {
            return Err(SnapshotError::bad(
                name,
                format!(
                    "{} queue pairs in use, this NIC has {}",
                    s.active_pairs,
                    self.cfg.pairs()
                ),
            ));
        }
        self.acked_features = s.acked_features;
        *self.shared.mac.lock().unwrap_or_else(|e| e.into_inner()) = s.mac;
        *self.shared.status.lock().unwrap_or_else(|e| e.into_inner()) = s.status;
        self.resume_pairs = Some(s.active_pairs);
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Parse `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        // Two hex digits (from_str_radix alone would take "+0").
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn serialize_mac<S: serde::Serializer>(m: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_mac(m))
}

fn deserialize_mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    parse_mac(&s).ok_or_else(|| serde::de::Error::custom(format!("bad MAC {s:?}")))
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
