//! The data path of one queue pair: tap → rx queue, tx queue → tap, and the
//! control queue on pair 0. One epoll loop per pair, on its own thread.
//!
//! Frames are copied once, between guest buffers and a per-worker buffer
//! allocated at start (no per-packet allocation). When the guest has posted
//! no rx buffers, the tap leaves the epoll set, so the worker sleeps instead
//! of spinning, and the frame already read waits for the guest's kick.
//! Anything malformed the guest posts (chains outside its memory, loops,
//! frames too short or too long) drops that frame; a corrupt ring index
//! marks the device NEEDS_RESET and stops the worker's use of that queue.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;
use super::NetShared;
use crate::virtio::{GuestMemoryMmap, Queue, VirtioInterrupt};

/// The largest frame: 64 KiB of GSO payload plus headers, plus the vnet header.
pub const MAX_FRAME: usize = 65562;

pub type QueueParts = (usize, Queue, EventFd);

#[derive(Default)]
pub struct PairQueues {
    pub rx: Option<QueueParts>,
    pub tx: Option<QueueParts>,
    pub ctrl: Option<QueueParts>,
}

#[derive(Default)]
pub struct Stats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_dropped: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub bad_chains: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub bad_chains: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            rx_frames: g(&self.rx_frames),
            rx_bytes: g(&self.rx_bytes),
            tx_frames: g(&self.tx_frames),
            tx_bytes: g(&self.tx_bytes),
            rx_dropped: g(&self.rx_dropped),
            tx_dropped: g(&self.tx_dropped),
            bad_chains: g(&self.bad_chains),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

const TOKEN_RX: u64 = 1;
const TOKEN_TX: u64 = 2;
const TOKEN_CTRL: u64 = 3;
const TOKEN_TAP: u64 = 4;
const TOKEN_KILL: u64 = 5;

/// Why a queue cannot be used any more.
#[derive(Debug)]
pub struct QueueBroken(String);

pub struct PairWorker {
    name: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    q: PairQueues,
    tap: File,
    kill: EventFd,
    shared: Arc<NetShared>,
    mrg_rxbuf: bool,
    max_pairs: usize,
    /// A frame read from the tap, waiting for rx buffers (`rx_len` bytes).
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_frame: Vec<u8>,
    tap_polled: bool,
    epoll: i32,
}

impl PairWorker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        q: PairQueues,
        tap: File,
        kill: EventFd,
        shared: Arc<NetShared>,
        features: u64,
        max_pairs: usize,
    ) -> Self {
        let event_idx = features & (1 << crate::virtio::VIRTIO_F_RING_EVENT_IDX) != 0;
        let mut q = q;
        for (_, queue, _) in [&mut q.rx, &mut q.tx, &mut q.ctrl].into_iter().flatten() {
            queue.set_event_idx(event_idx);
        }
        Self {
            name,
            mem,
            interrupt,
            q,
            tap,
            kill,
            shared,
            mrg_rxbuf: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            max_pairs,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            tx_frame: vec![0; MAX_FRAME],
            tap_polled: false,
            epoll: -1,
        }
    }

    fn epoll_ctl(&self, op: epoll::ControlOptions, fd: i32, token: u64) -> io::Result<()> {
        epoll::ctl(
            self.epoll,
            op,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, token),
        )
    }

    fn poll_tap(&mut self, on: bool) {
        if on == self.tap_polled {
            return;
        }
        let op = if on {
            epoll::ControlOptions::EPOLL_CTL_ADD
        } else {
            epoll::ControlOptions::EPOLL_CTL_DEL
        };
        match self.epoll_ctl(op, self.tap.as_raw_fd(), TOKEN_TAP) {
            Ok(()) => self.tap_polled = on,
            Err(e) => tracing::error!("{}: epoll on the tap: {e}", self.name),
        }
    }

    fn fail(&self, what: &str, e: QueueBroken) {
        tracing::warn!("{}: {what}: {} — the device needs a reset", self.name, e.0);
        self.shared.needs_reset.store(true, Ordering::SeqCst);
        self.interrupt.notify_config();
    }

    pub fn run(mut self) {
        let epoll = match epoll::create(true) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{}: cannot create epoll: {e}", self.name);
                return;
            }
        };
        self.epoll = epoll;
        let mut ok = self
            .epoll_ctl(
                epoll::ControlOptions::EPOLL_CTL_ADD,
                self.kill.as_raw_fd(),
                TOKEN_KILL,
            )
            .is_ok();
        for (q, token) in [
            (&self.q.rx, TOKEN_RX),
            (&self.q.tx, TOKEN_TX),
            (&self.q.ctrl, TOKEN_CTRL),
        ] {
            if let Some((_, _, evt)) = q {
                ok &= self
                    .epoll_ctl(epoll::ControlOptions::EPOLL_CTL_ADD, evt.as_raw_fd(), token)
                    .is_ok();
            }
        }
        if !ok {
            tracing::error!("{}: cannot register with epoll", self.name);
            // SAFETY: closing the epoll fd this function created.
            unsafe { libc::close(epoll) };
            return;
        }
        if self.q.rx.is_some() {
            self.poll_tap(true);
        }
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 8];
        'outer: loop {
            let n = match epoll::wait(epoll, -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll_wait: {e}", self.name);
                    break;
                }
            };
            for ev in events[..n].to_vec() {
                let data = ev.data;
                tracing::trace!("{}: event {data}", self.name);
                match ev.data {
                    TOKEN_KILL => break 'outer,
                    TOKEN_RX => {
                        if let Some((_, _, e)) = &self.q.rx {
                            let _ = e.read();
                        }
                        self.rx_ready();
                    }
                    TOKEN_TAP => self.rx_ready(),
                    TOKEN_TX => {
                        if let Some((_, _, e)) = &self.q.tx {
                            let _ = e.read();
                        }
                        if let Err(e) = self.process_tx() {
                            self.fail("tx queue", e);
                            self.q.tx = None;
                        }
                    }
                    TOKEN_CTRL => {
                        if let Some((_, _, e)) = &self.q.ctrl {
                            let _ = e.read();
                        }
                        if let Err(e) = self.process_ctrl() {
                            self.fail("control queue", e);
                            self.q.ctrl = None;
                        }
                    }
                    _ => {}
                }
            }
        }
        // SAFETY: closing the epoll fd this function created.
        unsafe { libc::close(epoll) };
    }

    fn rx_ready(&mut self) {
        match self.process_rx() {
            Ok(()) => {}
            Err(e) => {
                self.fail("rx queue", e);
                self.q.rx = None;
                self.poll_tap(false);
            }
        }
    }

    /// Move frames from the tap to the guest until either runs dry.
    fn process_rx(&mut self) -> Result<(), QueueBroken> {
        if self.q.rx.is_none() {
            return Ok(());
        }
        let mut delivered = false;
        loop {
            if self.rx_len == 0 {
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("{}: tap read: {e}", self.name);
                        break;
                    }
                }
            }
            match self.deliver()? {
                true => {
                    delivered = true;
                    self.rx_len = 0;
                }
                false => {
                    // No room: stop polling the tap until the guest posts buffers.
                    self.poll_tap(false);
                    let (idx, queue, _) = self
                        .q
                        .rx
                        .as_mut()
                        .ok_or_else(|| QueueBroken("gone".into()))?;
                    let idx = *idx;
                    let more = queue
                        .enable_notification(&self.mem)
                        .map_err(|e| QueueBroken(format!("{e:?}")))?;
                    if delivered {
                        self.signal_used(idx)?;
                    }
                    if more {
                        // Buffers arrived in the meantime: go round again.
                        delivered = false;
                        continue;
                    }
                    return Ok(());
                }
            }
        }
        self.poll_tap(true);
        if delivered {
            let idx = self.q.rx.as_ref().map(|q| q.0).unwrap_or(0);
            self.signal_used(idx)?;
        }
        Ok(())
    }

    fn signal_used(&mut self, idx: usize) -> Result<(), QueueBroken> {
        let queue = match (self.q.rx.as_mut(), self.q.tx.as_mut(), self.q.ctrl.as_mut()) {
            (Some(q), _, _) if q.0 == idx => &mut q.1,
            (_, Some(q), _) if q.0 == idx => &mut q.1,
            (_, _, Some(q)) if q.0 == idx => &mut q.1,
            _ => return Ok(()),
        };
        if queue
            .needs_notification(&self.mem)
            .map_err(|e| QueueBroken(format!("{e:?}")))?
        {
            self.interrupt.notify_queue(idx);
        }
        Ok(())
    }

    /// Put the pending frame into rx buffers. Ok(false): not enough buffers
    /// (nothing consumed).
    fn deliver(&mut self) -> Result<bool, QueueBroken> {
        let Some((_, queue, _)) = self.q.rx.as_mut() else {
            return Ok(false);
        };
        let frame = &mut self.rx_frame[..self.rx_len];
        let mem = &self.mem;
        // Collect chains (head, capacity) until the frame fits.
        let mut chains: Vec<(u16, virtio_queue::Writer<'_, _>)> = Vec::with_capacity(4);
        let mut capacity = 0usize;
        while capacity < frame.len() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Not enough: put back what we took.
                for _ in 0..chains.len() {
                    queue.go_to_previous_position();
                }
                return Ok(false);
            };
            let head = chain.head_index();
            match chain.writer(mem) {
                Ok(w) if w.available_bytes() > 0 => {
                    capacity += w.available_bytes();
                    chains.push((head, w));
                }
                _ => {
                    // A chain with no writable bytes, or outside guest memory.
                    bump(&self.shared.stats.bad_chains, 1);
                    queue
                        .add_used(mem, head, 0)
                        .map_err(|e| QueueBroken(format!("{e:?}")))?;
                }
            }
            if !self.mrg_rxbuf && !chains.is_empty() {
                break;
            }
        }
        if capacity < frame.len() {
            // Without MRG_RXBUF the one buffer must hold the frame: drop it.
            for (head, _) in chains {
                queue
                    .add_used(mem, head, 0)
                    .map_err(|e| QueueBroken(format!("{e:?}")))?;
            }
            bump(&self.shared.stats.rx_dropped, 1);
            return Ok(true);
        }
        if self.mrg_rxbuf {
            // num_buffers lives at bytes 10..12 of the header.
            frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        }
        let mut rest: &[u8] = frame;
        for (head, mut w) in chains {
            let n = w.available_bytes().min(rest.len());
            let written = match w.write_all(&rest[..n]) {
                Ok(()) => n,
                Err(_) => {
                    bump(&self.shared.stats.bad_chains, 1);
                    0
                }
            };
            rest = &rest[n..];
            queue
                .add_used(mem, head, written as u32)
                .map_err(|e| QueueBroken(format!("{e:?}")))?;
        }
        bump(&self.shared.stats.rx_frames, 1);
        bump(
            &self.shared.stats.rx_bytes,
            (self.rx_len - VNET_HDR_LEN) as u64,
        );
        Ok(true)
    }

    fn process_tx(&mut self) -> Result<(), QueueBroken> {
        let Some((idx, _, _)) = self.q.tx.as_ref() else {
            return Ok(());
        };
        let idx = *idx;
        loop {
            let Some((_, queue, _)) = self.q.tx.as_mut() else {
                return Ok(());
            };
            queue
                .disable_notification(&self.mem)
                .map_err(|e| QueueBroken(format!("{e:?}")))?;
            while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                let len = match chain.reader(&self.mem) {
                    Ok(mut r) => {
                        let n = r.available_bytes();
                        if !(VNET_HDR_LEN..=MAX_FRAME).contains(&n) {
                            None
                        } else {
                            r.read_exact(&mut self.tx_frame[..n]).ok().map(|_| n)
                        }
                    }
                    Err(_) => None,
                };
                match len {
                    Some(n) => match self.tap.write(&self.tx_frame[..n]) {
                        Ok(_) => {
                            bump(&self.shared.stats.tx_frames, 1);
                            bump(&self.shared.stats.tx_bytes, (n - VNET_HDR_LEN) as u64);
                        }
                        // A bad vnet header (EINVAL) or a full tap: drop.
                        Err(_) => bump(&self.shared.stats.tx_dropped, 1),
                    },
                    None => {
                        bump(&self.shared.stats.bad_chains, 1);
                        bump(&self.shared.stats.tx_dropped, 1);
                    }
                }
                queue
                    .add_used(&self.mem, head, 0)
                    .map_err(|e| QueueBroken(format!("{e:?}")))?;
            }
            let more = queue
                .enable_notification(&self.mem)
                .map_err(|e| QueueBroken(format!("{e:?}")))?;
            self.signal_used(idx)?;
            if !more {
                return Ok(());
            }
        }
    }

    fn process_ctrl(&mut self) -> Result<(), QueueBroken> {
        let Some((idx, _, _)) = self.q.ctrl.as_ref() else {
            return Ok(());
        };
        let idx = *idx;
        loop {
            let Some((_, queue, _)) = self.q.ctrl.as_mut() else {
                return Ok(());
            };
            while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                let mut req = [0u8; 64];
                let (n, read_ok) = match chain.clone().reader(&self.mem) {
                    Ok(mut r) => {
                        let n = r.available_bytes().min(req.len());
                        (n, r.read_exact(&mut req[..n]).is_ok())
                    }
                    Err(_) => (0, false),
                };
                let status = if read_ok && n >= 2 {
                    handle_ctrl(&self.shared, self.max_pairs, req[0], req[1], &req[2..n])
                } else {
                    VIRTIO_NET_ERR as u8
                };
                tracing::debug!(
                    "control command {:?}: {}",
                    req.get(..2),
                    if status == 0 { "ok" } else { "refused" }
                );
                let written = match chain.writer(&self.mem) {
                    Ok(mut w) if w.available_bytes() >= 1 => {
                        w.write_all(&[status]).map(|_| 1).unwrap_or(0)
                    }
                    _ => 0,
                };
                queue
                    .add_used(&self.mem, head, written)
                    .map_err(|e| QueueBroken(format!("{e:?}")))?;
            }
            // With EVENT_IDX the driver kicks again only past avail_event,
            // which enable_notification publishes.
            let more = queue
                .enable_notification(&self.mem)
                .map_err(|e| QueueBroken(format!("{e:?}")))?;
            self.signal_used(idx)?;
            if !more {
                return Ok(());
            }
        }
    }
}

/// One control command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
fn handle_ctrl(shared: &NetShared, max_pairs: usize, class: u8, cmd: u8, data: &[u8]) -> u8 {
    let ok = match (u32::from(class), u32::from(cmd)) {
        // The tap delivers everything; rx-mode filtering is the guest's.
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC..=VIRTIO_NET_CTRL_RX_NOBCAST) => {
            !data.is_empty()
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => true,
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => match data.get(..6) {
            Some(m) => {
                shared
                    .mac
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .copy_from_slice(m);
                true
            }
            None => false,
        },
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => {
            *shared.status.lock().unwrap_or_else(|e| e.into_inner()) &=
                !(VIRTIO_NET_S_ANNOUNCE as u16);
            true
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => match data.get(..2) {
            Some(b) => {
                let pairs = usize::from(u16::from_le_bytes([b[0], b[1]]));
                (1..=max_pairs).contains(&pairs)
            }
            None => false,
        },
        _ => false,
    };
    if ok {
        VIRTIO_NET_OK as u8
    } else {
        VIRTIO_NET_ERR as u8
    }
}
