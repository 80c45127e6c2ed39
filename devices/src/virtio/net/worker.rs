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
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes};
use vmm_sys_util::eventfd::EventFd;

use super::tap::VNET_HDR_LEN;
use super::NetShared;
use crate::virtio::{GuestMemoryMmap, Queue, VirtioInterrupt};

/// The largest frame: 64 KiB of GSO payload plus headers, plus the vnet header.
pub const MAX_FRAME: usize = 65562;

pub type QueueParts = (usize, Queue, EventFd);

#[derive(Clone, Copy)]
enum Queues {
    Rx,
    Tx,
    Ctrl,
}

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
    /// Times a frame from the tap found no rx buffer and waited for the guest (the
    /// tap holds the frames meanwhile, and drops what does not fit in its queue).
    pub rx_no_buffers: AtomicU64,
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
    pub rx_no_buffers: u64,
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
            rx_no_buffers: g(&self.rx_no_buffers),
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
const TOKEN_WAKE: u64 = 6;
/// How many times a queue that had work is looked at again (after a yield)
/// before the worker asks the driver for a kick.
const POLL_ROUNDS: u32 = 8;
/// Chains (tx, control) or frames (rx) served per wake-up. Past it the worker comes
/// back through its own kick after the events already waiting, a kill among them: a
/// guest that keeps the queue full cannot keep the worker from stopping.
const BUDGET: u32 = 256;

/// Why a queue cannot be used any more.
#[derive(Debug)]
pub struct QueueBroken(String);

/// What [`PairWorker::rx_direct`] did.
enum Direct {
    /// A frame went into the guest's buffers.
    Frame,
    /// Nothing usable was read (an empty or interrupted read); read again.
    Runt,
    /// The tap has nothing now.
    Empty,
    /// The frame filled every buffer taken and its tail waits in `rx_frame` for more
    /// (the copying path finishes it).
    Partial,
    /// No buffer, or an unusual one first in line: the copying path takes the next
    /// frame.
    Short,
    /// The tap read failed.
    Failed(io::Error),
}

/// The most pieces of one spare rx chain (Linux posts one buffer per chain).
const SPARE_PIECES: usize = 4;

/// An rx chain taken from the ring ahead of need: its writable buffers as pieces
/// (guest address, address in this process, length), each inside one memory region.
struct Spare {
    head: u16,
    hdr: vm_memory::GuestAddress,
    pieces: [(u64, usize, usize); SPARE_PIECES],
    n: usize,
    cap: usize,
}

impl Spare {
    /// None for a chain the direct path does not take: a read-only buffer, one
    /// outside guest memory, more than [`SPARE_PIECES`] pieces, or a first buffer
    /// too small for the vnet header.
    fn of(
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<Self> {
        use vm_memory::GuestMemoryBackend;
        let head = chain.head_index();
        let mut sp = Spare {
            head,
            hdr: vm_memory::GuestAddress(0),
            pieces: [(0, 0, 0); SPARE_PIECES],
            n: 0,
            cap: 0,
        };
        for (i, d) in chain.enumerate() {
            if !d.is_write_only() || (i == 0 && (d.len() as usize) < VNET_HDR_LEN) {
                return None;
            }
            if i == 0 {
                sp.hdr = d.addr();
            }
            let mut at = d.addr().raw_value();
            for slice in mem.get_slices(d.addr(), d.len() as usize) {
                let slice = slice.ok()?;
                if sp.n == SPARE_PIECES || (i == 0 && sp.n == 0 && slice.len() < VNET_HDR_LEN) {
                    return None;
                }
                sp.pieces[sp.n] = (at, slice.ptr_guard_mut().as_ptr() as usize, slice.len());
                sp.n += 1;
                sp.cap += slice.len();
                at += slice.len() as u64;
            }
        }
        (sp.cap >= VNET_HDR_LEN).then_some(sp)
    }

    /// The first `len` bytes were written behind vm-memory's back (by the kernel):
    /// they go into the dirty bitmap that migration reads.
    fn mark_dirty(&self, mem: &GuestMemoryMmap, len: usize) {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        let mut left = len;
        for &(at, _, plen) in &self.pieces[..self.n] {
            if left == 0 {
                break;
            }
            let l = left.min(plen);
            if let Ok(s) = mem.get_slice(vm_memory::GuestAddress(at), l) {
                s.bitmap().mark_dirty(0, l);
            }
            left -= l;
        }
    }
}

/// Scratch iovecs for reading the tap into guest memory.
struct IoVecs(Vec<libc::iovec>);
// SAFETY: the iovecs are rebuilt before every use, on the thread that uses them;
// between uses they are stale and never dereferenced, so moving the worker to its
// thread moves no pointer anyone follows.
unsafe impl Send for IoVecs {}

pub struct PairWorker {
    name: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    q: PairQueues,
    tap: File,
    kill: EventFd,
    shared: Arc<NetShared>,
    /// This pair's counters.
    stats: Arc<Stats>,
    mrg_rxbuf: bool,
    /// Which queue pair this is; its tap queue is used only while the
    /// driver uses this pair (see `TapQueues`).
    pair: usize,
    wake: EventFd,
    /// A frame read from the tap, waiting for rx buffers (`rx_len` bytes).
    rx_frame: Vec<u8>,
    rx_len: usize,
    /// (head, bytes written) of the chains the pending frame went into.
    rx_heads: Vec<(u16, u32)>,
    /// How much of the pending frame is written, and where its header is.
    rx_off: usize,
    rx_hdr_at: Option<vm_memory::GuestAddress>,
    /// rx chains taken ahead of need, in ring order, that the next frame is read
    /// into straight from the tap (see [`PairWorker::rx_direct`]).
    rx_spare: std::collections::VecDeque<Spare>,
    rx_spare_cap: usize,
    rx_iov: IoVecs,
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
        pair: usize,
    ) -> io::Result<Self> {
        let event_idx = features & (1 << crate::virtio::VIRTIO_F_RING_EVENT_IDX) != 0;
        let rx_size = q.rx.as_ref().map_or(0, |r| r.1.max_size());
        let epoll = epoll::create(true)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        shared.queues.set_wake(pair, wake.try_clone()?);
        let mut q = q;
        for (_, queue, _) in [&mut q.rx, &mut q.tx, &mut q.ctrl].into_iter().flatten() {
            queue.set_event_idx(event_idx);
        }
        Ok(Self {
            name,
            mem,
            interrupt,
            q,
            tap,
            kill,
            stats: shared.stats.get(pair).cloned().unwrap_or_default(),
            shared,
            mrg_rxbuf: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            pair,
            wake,
            rx_frame: vec![0; MAX_FRAME],
            rx_len: 0,
            rx_heads: Vec::with_capacity(usize::from(rx_size)),
            rx_off: 0,
            rx_hdr_at: None,
            rx_spare: std::collections::VecDeque::with_capacity(usize::from(rx_size)),
            rx_spare_cap: 0,
            rx_iov: IoVecs(Vec::with_capacity(64)),
            tap_polled: false,
            epoll,
        })
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
        // The tap queue of a pair the driver does not use is detached.
        let on = on && self.pair < self.shared.queues.active();
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

    /// Serve the queues until killed; then hand them back (see [`PairWorker::give_back`]).
    pub fn run(mut self) -> PairQueues {
        crate::sandbox::enter(crate::sandbox::ThreadKind::NetWorker);
        self.serve();
        self.give_back()
    }

    /// The queues, at the positions the guest may rely on: the chains of a frame
    /// half-written into rx buffers were taken last and are not used, so they are
    /// put back on the ring (the partial frame is dropped, as a full tap would).
    fn give_back(&mut self) -> PairQueues {
        self.return_spares();
        if !self.rx_heads.is_empty() {
            if let Some((_, queue, _)) = self.q.rx.as_mut() {
                let n = self.rx_heads.len() as u16;
                queue.set_next_avail(queue.next_avail().wrapping_sub(n));
            }
            self.rx_heads.clear();
            bump(&self.stats.rx_dropped, 1);
        }
        std::mem::take(&mut self.q)
    }

    fn serve(&mut self) {
        // A kick wakes this thread while the vCPU that kicked usually still
        // holds the guest's tx queue lock. Where the worker shares a CPU with
        // the vCPUs, a normal thread preempts that vCPU on wake-up and the
        // guest's other vCPUs spin on the lock meanwhile; a batch thread waits
        // for the vCPU's time slice to end instead.
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (pid 0) with a
        // valid sched_param; it changes nothing but this thread's policy.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::debug!("{}: SCHED_BATCH: {}", self.name, io::Error::last_os_error());
        }
        let epoll = self.epoll;
        let mut ok = true;
        for (fd, token) in [
            (self.kill.as_raw_fd(), TOKEN_KILL),
            (self.wake.as_raw_fd(), TOKEN_WAKE),
        ] {
            ok &= self
                .epoll_ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, token)
                .is_ok();
        }
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
            return;
        }
        if self.q.rx.is_some() {
            self.poll_tap(true);
        }
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 8];
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(64);
        'outer: loop {
            let n = match epoll::wait(epoll, -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: epoll_wait: {e}", self.name);
                    break;
                }
            };
            for ev in &events[..n] {
                let data = ev.data;
                tracing::trace!("{}: event {data}", self.name);
                match data {
                    TOKEN_KILL => break 'outer,
                    TOKEN_RX => {
                        if let Some((_, _, e)) = &self.q.rx {
                            let _ = e.read();
                        }
                        self.rx_ready();
                    }
                    TOKEN_TAP => self.rx_ready(),
                    TOKEN_WAKE => {
                        // The driver changed how many pairs it uses.
                        let _ = self.wake.read();
                        if self.pair < self.shared.queues.active() {
                            self.rx_ready();
                        } else {
                            self.poll_tap(false);
                        }
                    }
                    TOKEN_TX => {
                        if let Some((_, _, e)) = &self.q.tx {
                            let _ = e.read();
                        }
                        if let Err(e) = self.process_tx(&mut iov) {
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
        let mut frames = 0;
        loop {
            if frames >= BUDGET {
                // The tap stays polled (level-triggered): the worker comes back for
                // the rest after the events already waiting.
                break;
            }
            if self.rx_len == 0 && self.mrg_rxbuf {
                match self.rx_direct()? {
                    Direct::Frame => {
                        delivered = true;
                        frames += 1;
                        continue;
                    }
                    Direct::Runt => continue,
                    Direct::Empty => break,
                    Direct::Short | Direct::Partial => {}
                    Direct::Failed(e) => match self.tap_failed(e) {
                        Some(r) => return r,
                        None => break,
                    },
                }
            }
            if self.rx_len == 0 {
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_len = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => match self.tap_failed(e) {
                        Some(r) => return r,
                        None => break,
                    },
                }
            }
            let avail_before = self.avail_idx(Queues::Rx)?;
            match self.deliver()? {
                true => {
                    delivered = true;
                    self.rx_len = 0;
                    frames += 1;
                }
                false => {
                    // No room: stop polling the tap until the guest posts buffers.
                    bump(&self.stats.rx_no_buffers, 1);
                    self.poll_tap(false);
                    let (idx, queue, _) = self
                        .q
                        .rx
                        .as_mut()
                        .ok_or_else(|| QueueBroken("gone".into()))?;
                    let idx = *idx;
                    queue
                        .enable_notification(&self.mem)
                        .map_err(|e| QueueBroken(format!("{e:?}")))?;
                    if delivered {
                        self.signal_used(idx)?;
                    }
                    // Buffers we put back still count as available, so ask
                    // whether the guest posted new ones, not whether any are there.
                    let more = self.avail_idx(Queues::Rx)? != avail_before;
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

    /// A tap read that failed for good: Some(what process_rx returns), or None to stop
    /// reading for now.
    fn tap_failed(&mut self, e: io::Error) -> Option<Result<(), QueueBroken>> {
        // Detached (the driver stopped using this pair): wait for a wake-up, not for
        // the tap. A queue of a pair in use reads so only when its tap is gone from
        // the host.
        if e.raw_os_error() == Some(libc::EBADFD) {
            self.poll_tap(false);
            if self.pair < self.shared.queues.active() {
                return Some(Err(QueueBroken(format!(
                    "the tap is gone from the host ({e})"
                ))));
            }
            return Some(Ok(()));
        }
        tracing::warn!("{}: tap read: {e}", self.name);
        None
    }

    /// Put the spare chains back on the ring: they were the last taken, so the
    /// driver's view does not change.
    fn return_spares(&mut self) {
        if self.rx_spare.is_empty() {
            return;
        }
        if let Some((_, queue, _)) = self.q.rx.as_mut() {
            let n = self.rx_spare.len() as u16;
            queue.set_next_avail(queue.next_avail().wrapping_sub(n));
        }
        self.rx_spare.clear();
        self.rx_spare_cap = 0;
    }

    /// Read one frame from the tap straight into the guest's rx buffers: the one
    /// copy is the kernel's. Chains are taken ahead (kept as spares from frame to
    /// frame) until they could hold the largest frame the tap can hand over, since
    /// its size is known only once it is read; the frame takes as many as it fills.
    /// With fewer on the ring, the read goes into those and then into `rx_frame`:
    /// a frame that overflows them leaves only its tail to copy, into chains the
    /// driver posts next ([`Direct::Partial`]). [`Direct::Short`] when not one
    /// chain is there or the first in line is one this path does not take.
    fn rx_direct(&mut self) -> Result<Direct, QueueBroken> {
        let Some((_, queue, _)) = self.q.rx.as_mut() else {
            return Ok(Direct::Empty);
        };
        while self.rx_spare_cap < MAX_FRAME {
            let Some(chain) = queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            match Spare::of(&self.mem, chain) {
                Some(sp) => {
                    self.rx_spare_cap += sp.cap;
                    self.rx_spare.push_back(sp);
                }
                None => {
                    // It stays first in line; the copying path takes it.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    break;
                }
            }
        }
        if self.rx_spare.is_empty() {
            return Ok(Direct::Short);
        }
        let iov = &mut self.rx_iov.0;
        iov.clear();
        let mut cap = 0;
        for sp in &self.rx_spare {
            for &(_, host, len) in &sp.pieces[..sp.n] {
                iov.push(libc::iovec {
                    iov_base: host as *mut libc::c_void,
                    iov_len: len,
                });
            }
            cap += sp.cap;
            if cap >= MAX_FRAME {
                break;
            }
        }
        if cap < MAX_FRAME {
            // The rest of the largest frame lands in rx_frame, at the offset it has
            // in the frame.
            let tail = &mut self.rx_frame[cap..MAX_FRAME];
            iov.push(libc::iovec {
                iov_base: tail.as_mut_ptr().cast(),
                iov_len: tail.len(),
            });
        }
        // SAFETY: every iovec but a tail is a piece of a writable rx buffer the
        // driver handed over, translated into this process by `Spare::of` inside a
        // mapping of guest memory that `self.mem` keeps alive; a tail is inside
        // `self.rx_frame`, which nothing else borrows during the call. The kernel
        // writes at most `iov_len` bytes into each.
        let r = unsafe { libc::readv(self.tap.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Ok(match e.kind() {
                io::ErrorKind::WouldBlock => Direct::Empty,
                io::ErrorKind::Interrupted => Direct::Runt,
                _ => Direct::Failed(e),
            });
        }
        let n = r as usize;
        if n <= VNET_HDR_LEN {
            return Ok(Direct::Runt);
        }
        let Some(first) = self.rx_spare.front() else {
            return Ok(Direct::Empty);
        };
        let hdr = first.hdr;
        if n > cap {
            // Every spare is full; the copying path puts the tail into the chains
            // the driver posts next, then writes num_buffers into the header.
            for sp in self.rx_spare.drain(..) {
                sp.mark_dirty(&self.mem, sp.cap);
                self.rx_heads.push((sp.head, sp.cap as u32));
            }
            self.rx_spare_cap = 0;
            self.rx_hdr_at = Some(hdr);
            self.rx_len = n;
            self.rx_off = cap;
            return Ok(Direct::Partial);
        }
        // How many chains the frame filled; the first holds the header.
        let mut left = n;
        let mut used = 0usize;
        for sp in &self.rx_spare {
            used += 1;
            left = left.saturating_sub(sp.cap);
            if left == 0 {
                break;
            }
        }
        self.mem
            .write_obj((used as u16).to_le(), hdr.unchecked_add(10))
            .map_err(|e| QueueBroken(format!("{e}")))?;
        let Some((_, queue, _)) = self.q.rx.as_mut() else {
            return Ok(Direct::Empty);
        };
        let mut left = n;
        for sp in self.rx_spare.drain(..used) {
            let len = left.min(sp.cap);
            left -= len;
            self.rx_spare_cap -= sp.cap;
            sp.mark_dirty(&self.mem, len);
            queue
                .add_used(&self.mem, sp.head, len as u32)
                .map_err(|e| QueueBroken(format!("{e:?}")))?;
        }
        bump(&self.stats.rx_frames, 1);
        bump(&self.stats.rx_bytes, (n - VNET_HDR_LEN) as u64);
        Ok(Direct::Frame)
    }

    /// The driver's avail index, checked: it may run ahead of the device by
    /// at most the queue size. A guest that writes anything else would have
    /// the worker chase entries that do not exist.
    fn avail_idx(&self, which: Queues) -> Result<u16, QueueBroken> {
        let q = match which {
            Queues::Rx => self.q.rx.as_ref(),
            Queues::Tx => self.q.tx.as_ref(),
            Queues::Ctrl => self.q.ctrl.as_ref(),
        };
        let Some((_, queue, _)) = q else { return Ok(0) };
        let avail = queue
            .avail_idx(&self.mem, Ordering::Acquire)
            .map_err(|e| QueueBroken(format!("cannot read the avail index: {e:?}")))?;
        let ahead = avail - std::num::Wrapping(queue.next_avail());
        if ahead.0 > queue.size() {
            return Err(QueueBroken(format!(
                "avail index {} is {} entries ahead of the device in a {}-entry ring",
                avail.0,
                ahead.0,
                queue.size()
            )));
        }
        Ok(avail.0)
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

    /// Put the pending frame into rx buffers, writing as chains are popped
    /// (no per-frame allocation). Ok(false): not enough buffers — every
    /// chain taken is put back. A malformed chain drops the frame.
    fn deliver(&mut self) -> Result<bool, QueueBroken> {
        let Self {
            q,
            mem,
            rx_frame,
            rx_len,
            rx_heads,
            rx_off,
            rx_hdr_at,
            mrg_rxbuf,
            stats,
            ..
        } = self;
        let Some((_, queue, _)) = q.rx.as_mut() else {
            return Ok(false);
        };
        let frame = &mut rx_frame[..*rx_len];
        if !*mrg_rxbuf {
            // One buffer holds the whole frame: num_buffers is 1.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        }
        // A frame already partly written (the guest ran out of buffers in
        // the middle) resumes where it stopped: the chains it holds are not
        // put back, so next_avail stays level with the guest's avail index
        // and the avail_event published while waiting asks for the very
        // next kick. (Putting chains back left avail_event behind buffers
        // the guest had already published; an EVENT_IDX driver then never
        // kicked again and rx stalled for good.)
        let mut off = *rx_off;
        let mut malformed = false;
        while off < frame.len() {
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                if !*mrg_rxbuf && !rx_heads.is_empty() {
                    break;
                }
                *rx_off = off;
                return Ok(false);
            };
            let head = chain.head_index();
            // The header must sit whole in the first buffer.
            let first = chain.clone().writable().next();
            let writer = chain.writer(&*mem);
            match (writer, first) {
                (Ok(mut w), Some(d))
                    if w.available_bytes() > 0 && (off > 0 || d.len() as usize >= VNET_HDR_LEN) =>
                {
                    let n = w.available_bytes().min(frame.len() - off);
                    if w.write_all(&frame[off..off + n]).is_err() {
                        malformed = true;
                        rx_heads.push((head, 0));
                        break;
                    }
                    if off == 0 {
                        *rx_hdr_at = Some(d.addr());
                    }
                    rx_heads.push((head, n as u32));
                    off += n;
                }
                _ => {
                    malformed = true;
                    rx_heads.push((head, 0));
                    break;
                }
            }
            if !*mrg_rxbuf {
                break;
            }
        }
        let hdr_at = rx_hdr_at.take();
        *rx_off = 0;
        let fits = !malformed && off == frame.len();
        if malformed {
            bump(&stats.bad_chains, 1);
        }
        if fits && *mrg_rxbuf {
            if let Some(a) = hdr_at {
                let n = (rx_heads.len() as u16).to_le();
                mem.write_obj(n, a.unchecked_add(10))
                    .map_err(|e| QueueBroken(format!("{e}")))?;
            }
        }
        for (head, len) in rx_heads.drain(..) {
            queue
                .add_used(&*mem, head, if fits { len } else { 0 })
                .map_err(|e| QueueBroken(format!("{e:?}")))?;
        }
        if fits {
            bump(&stats.rx_frames, 1);
            bump(&stats.rx_bytes, (frame.len() - VNET_HDR_LEN) as u64);
        } else {
            bump(&stats.rx_dropped, 1);
        }
        Ok(true)
    }

    /// Serve every chain the driver made available on `which`: `handle`
    /// deals with one chain and returns how many bytes it wrote into it.
    /// Then publish avail_event (with EVENT_IDX the driver kicks again only
    /// past it), signal the driver, and go round again if chains arrived
    /// in the meantime.
    fn drain(
        &mut self,
        which: Queues,
        mut handle: impl FnMut(&GuestMemoryMmap, virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> Result<(), QueueBroken> {
        let broken = |e: virtio_queue::Error| QueueBroken(format!("{e:?}"));
        let mut rounds = 0;
        let mut total = 0;
        loop {
            self.avail_idx(which)?;
            let slot = match which {
                Queues::Rx => &mut self.q.rx,
                Queues::Tx => &mut self.q.tx,
                Queues::Ctrl => &mut self.q.ctrl,
            };
            let Some((idx, queue, kick)) = slot.as_mut() else {
                return Ok(());
            };
            let (idx, mem) = (*idx, &self.mem);
            queue.disable_notification(mem).map_err(broken)?;
            let mut served = 0;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let written = handle(mem, chain);
                queue.add_used(mem, head, written).map_err(broken)?;
                served += 1;
                total += 1;
                if total >= BUDGET {
                    // Come back after whatever else is waiting.
                    let _ = kick.write(1);
                    self.signal_used(idx)?;
                    return Ok(());
                }
            }
            if served > 0 && rounds < POLL_ROUNDS {
                // The driver is busy: give it the CPU for a moment and look
                // again before asking for a kick (each kick is a VM exit).
                rounds += 1;
                self.signal_used(idx)?;
                std::thread::yield_now();
                continue;
            }
            let more = queue.enable_notification(mem).map_err(broken)?;
            self.signal_used(idx)?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Send the guest's tx chains to the tap. Each frame goes out with one
    /// `writev` straight from guest memory (no copy in the VMM); `iov` is
    /// the caller's scratch vector, reused from frame to frame.
    fn process_tx(&mut self, iov: &mut Vec<libc::iovec>) -> Result<(), QueueBroken> {
        let (tap, stats) = (self.tap.as_raw_fd(), self.stats.clone());
        self.drain(Queues::Tx, |mem, chain| {
            let Some(n) = gather_tx(mem, chain, iov) else {
                bump(&stats.bad_chains, 1);
                bump(&stats.tx_dropped, 1);
                return 0;
            };
            // SAFETY: every iovec points into a mapping of guest memory that
            // `mem` keeps alive for the call, and the kernel only reads from
            // it; a guest changing the bytes meanwhile can only garble its
            // own frame.
            let r = unsafe { libc::writev(tap, iov.as_ptr(), iov.len() as i32) };
            if r < 0 {
                // A bad vnet header (EINVAL) or a full tap: drop.
                bump(&stats.tx_dropped, 1);
            } else {
                bump(&stats.tx_frames, 1);
                bump(&stats.tx_bytes, (n - VNET_HDR_LEN) as u64);
            }
            0
        })
    }

    /// Answer the driver's control commands, one status byte each.
    fn process_ctrl(&mut self) -> Result<(), QueueBroken> {
        let shared = self.shared.clone();
        self.drain(Queues::Ctrl, |mem, chain| {
            let mut req = [0u8; 64];
            let (n, read_ok) = match chain.clone().reader(mem) {
                Ok(mut r) => {
                    let n = r.available_bytes().min(req.len());
                    (n, r.read_exact(&mut req[..n]).is_ok())
                }
                Err(_) => (0, false),
            };
            let status = if read_ok && n >= 2 {
                handle_ctrl(&shared, req[0], req[1], &req[2..n])
            } else {
                VIRTIO_NET_ERR as u8
            };
            tracing::debug!(
                "control command {:?}: {}",
                req.get(..2),
                if status == 0 { "ok" } else { "refused" }
            );
            match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= 1 => {
                    w.write_all(&[status]).map(|_| 1).unwrap_or(0)
                }
                _ => 0,
            }
        })
    }
}

impl Drop for PairWorker {
    fn drop(&mut self) {
        // SAFETY: the epoll fd was created by `new` and is closed only here.
        unsafe { libc::close(self.epoll) };
    }
}

/// One control command; returns VIRTIO_NET_OK or VIRTIO_NET_ERR.
fn handle_ctrl(shared: &NetShared, class: u8, cmd: u8, data: &[u8]) -> u8 {
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
                match shared.queues.set_active(pairs) {
                    Ok(()) => true,
                    Err(e) => {
                        crate::guest_warn!("VQ_PAIRS_SET {pairs}: {e}");
                        false
                    }
                }
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

/// The most segments one tx frame may have (the kernel's IOV_MAX).
const MAX_TX_SEGMENTS: usize = 1024;

/// Fill `iov` with the host addresses of a tx chain's buffers and return the
/// frame's length. None — the frame is dropped — when a buffer is
/// write-only or outside guest memory, the chain has more than
/// [`MAX_TX_SEGMENTS`] pieces, or the frame is shorter than its vnet header
/// or longer than [`MAX_FRAME`].
fn gather_tx(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    iov: &mut Vec<libc::iovec>,
) -> Option<usize> {
    use vm_memory::GuestMemoryBackend;
    iov.clear();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() {
            return None;
        }
        total = total.checked_add(d.len() as usize)?;
        if total > MAX_FRAME {
            return None;
        }
        // A buffer may straddle two memory regions: one iovec per piece.
        for slice in mem.get_slices(d.addr(), d.len() as usize) {
            let slice = slice.ok()?;
            if iov.len() == MAX_TX_SEGMENTS {
                return None;
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    (total >= VNET_HDR_LEN).then_some(total)
}

/// The fuzz target `net_queues` (see `fuzz/`).
#[cfg(feature = "fuzz")]
pub mod fuzz;

#[cfg(test)]
mod tests;
