//! The fuzz target `net_queues` (see `fuzz/`): one queue pair and a control queue over
//! guest memory the fuzzer writes, frames waiting on the tap, every path run once.
//! A child of `worker` so that it drives the worker's private paths directly.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use vm_memory::GuestAddress;

use super::*;

/// Guest memory: the three rings at fixed places in its first 1.5 KiB (so that
/// inputs of libFuzzer's usual sizes reach them all), buffers anywhere.
const MEM: usize = 256 << 10;
/// (descriptor table, avail ring, used ring) of rx, tx and control, 16 entries at most.
const RINGS: [(u64, u64, u64); 3] = [
    (0x000, 0x100, 0x140),
    (0x200, 0x300, 0x340),
    (0x400, 0x500, 0x540),
];
const MAX_LOG: u8 = 4;

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn notify_queue(&self, _: usize) {}
    fn notify_config(&self) {}
}

/// `data`: a flags byte (bit 0 mergeable rx buffers, bit 1 EVENT_IDX, bit 2 a
/// control queue), log2 of the rx and tx queue sizes (4 bits each, 4 at most; the
/// control queue has 16 entries), the number of frames on the
/// tap (0-7) and their sizes (two bytes each); the rest is guest memory from 0.
/// Whatever the bytes, the worker must neither panic nor hang, and never put more
/// entries in a used ring than the driver made available.
pub fn net_queues(data: &[u8]) {
    let [flags, qlog, nframes, rest @ ..] = data else {
        return;
    };
    let nframes = usize::from(nframes & 7);
    if rest.len() < 2 * nframes {
        return;
    }
    let (sizes, image) = rest.split_at(2 * nframes);
    // The setup never fails: a target that quietly did nothing would find nothing.
    #[allow(clippy::unwrap_used)]
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let image = &image[..image.len().min(MEM)];
    #[allow(clippy::unwrap_used)]
    mem.write_slice(image, GuestAddress(0)).unwrap();
    // The used rings are the device's: they start empty, as after a reset.
    for (_, _, u) in RINGS {
        let _ = mem.write_obj(0u16, GuestAddress(u + 2));
    }
    #[allow(clippy::unwrap_used)]
    let (tap, peer) = UnixDatagram::pair().unwrap();
    #[allow(clippy::unwrap_used)]
    tap.set_nonblocking(true)
        .and_then(|()| peer.set_nonblocking(true))
        .unwrap();
    for (i, sz) in sizes.chunks(2).enumerate() {
        let len = usize::from(u16::from_le_bytes([sz[0], sz[1]])).min(MAX_FRAME);
        let _ = peer.send(&vec![i as u8; len]);
    }
    let size = |log: u8| 1u16 << (log & 0xf).min(MAX_LOG);
    #[allow(clippy::unwrap_used)]
    let queue = |i: usize, size: u16| -> Option<QueueParts> {
        let mut q = Queue::new(1 << MAX_LOG).unwrap();
        q.set_size(size);
        let (d, a, u) = RINGS[i];
        q.set_desc_table_address(Some(d as u32), Some(0));
        q.set_avail_ring_address(Some(a as u32), Some(0));
        q.set_used_ring_address(Some(u as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&mem), "queue {i} of {size}");
        Some((i, q, EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    };
    let q = PairQueues {
        rx: queue(0, size(*qlog)),
        tx: queue(1, size(*qlog >> 4)),
        ctrl: if flags & 4 != 0 { queue(2, 16) } else { None },
    };
    let mut features = 0u64;
    if flags & 1 != 0 {
        features |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    if flags & 2 != 0 {
        features |= 1 << crate::virtio::VIRTIO_F_RING_EVENT_IDX;
    }
    #[allow(clippy::unwrap_used)]
    let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let shared = Arc::new(NetShared {
        mac: Mutex::new([0x52, 0x54, 0, 0, 0, 1]),
        status: Mutex::new(1),
        needs_reset: AtomicBool::new(false),
        stats: vec![Arc::default()],
        queues: crate::virtio::net::tap::TapQueues::new(vec![], 1),
    });
    let tap = File::from(OwnedFd::from(tap));
    #[allow(clippy::unwrap_used)]
    let mut w = PairWorker::new(
        "fuzz".into(),
        mem.clone(),
        Arc::new(NoIrq),
        q,
        tap,
        kill,
        shared,
        features,
        0,
    )
    .unwrap();
    let mut iov = Vec::new();
    let _ = w.process_tx(&mut iov);
    let _ = w.process_rx();
    let _ = w.process_ctrl();
    // A second round: what the first left pending (a frame waiting for buffers,
    // spare chains) meets the same rings again.
    let _ = w.process_rx();
    let _ = w.process_tx(&mut iov);
    w.return_spares();
    // The driver made at most a ring's worth of chains available (more and the
    // queue is broken): each may come back used once. (The device's own count: the
    // used index in memory is the guest's to overwrite, with an rx buffer on it.)
    let used = |q: &Option<QueueParts>| q.as_ref().map_or(0, |q| q.1.next_used());
    for (i, n, limit) in [
        (0, used(&w.q.rx), size(*qlog)),
        (1, used(&w.q.tx), size(*qlog >> 4)),
        (2, used(&w.q.ctrl), 16),
    ] {
        assert!(
            n <= limit,
            "queue {i}: {n} used entries from a ring of {limit}"
        );
    }
}
