//! bench-datapath: what Tandem's virtio-net data path costs per frame, against the tap's
//! own limit, on this machine and without a guest.
//!
//! A driver thread plays the guest's virtio-net driver over real guest memory (split
//! rings with EVENT_IDX, mergeable rx buffers of 4 KiB, one tx frame per chain, kicks
//! and interrupts through eventfds as KVM would deliver them) against Tandem's own
//! `Net` device on a real tap. Beside it, the same frames go through the same tap with
//! plain `writev` and `readv` in a loop. The figure that matters is the CPU time of the
//! thread that moves the frames (Tandem's queue-pair worker, or the raw loop) per
//! frame, read from the kernel's per-thread run time: it swings far less than wall
//! time with what else the two cores are doing.
//!
//! rx frames come from the kernel side of the tap: a packet socket sends them out of
//! it (GSO frames with a virtio-net header, so the tap hands them up whole, as it does
//! a TCP stream's 64 KiB segments). tx frames the kernel takes in and drops (they are
//! for another MAC), as it drops them for the raw loop.
//!
//! Runs in a network namespace of its own (needs root): the tap and everything else go
//! with the process.
//!
//! `cargo run --release -p devices --example bench-datapath [-- --reps N --secs S]`

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::{tap, Net, NetConfig};
use devices::virtio::{ActivateArgs, GuestMemoryMmap, VirtioDevice};
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[path = "../tests/support/mod.rs"]
mod support;
use support::{
    frame, wait_irq, Irqs, Res, Ring, QSIZE, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VNET_HDR,
};

const TAP: &str = "tbench0";
const RX_BUF: u32 = 4096;
/// Guest memory: rings, then rx buffers at 1 MiB, then one 64 KiB tx slot per
/// descriptor at 16 MiB.
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x8000;
const RX_BUFS: u64 = 0x10_0000;
const TX_SLOTS: u64 = 0x100_0000;
const MEM: usize = 0x200_0000;

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy)]
struct Size {
    name: &'static str,
    /// What `--only` calls it, after the direction: tx-64, rx-64k, ...
    key: &'static str,
    /// Ethernet frame length (no vnet header, no FCS).
    frame: usize,
    gso: bool,
}

const SIZES: [Size; 3] = [
    Size {
        name: "64 B",
        key: "64",
        frame: 64,
        gso: false,
    },
    Size {
        name: "1,514 B",
        key: "1514",
        frame: 1514,
        gso: false,
    },
    Size {
        name: "64 KiB GSO",
        key: "64k",
        frame: 14 + 40 + 44 * 1448,
        gso: true,
    },
];

fn main() {
    if let Err(e) = run() {
        eprintln!("bench-datapath: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let mut reps = 5usize;
    let mut secs = 2.0f64;
    let mut only: Option<String> = None;
    let mut tap_queue = 32u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| -> Res<String> {
            args.next().ok_or_else(|| format!("{what} needs a value"))
        };
        match a.as_str() {
            "--reps" => {
                reps = val("--reps")?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--reps: a whole number from 1")?
            }
            "--secs" => {
                secs = val("--secs")?
                    .parse()
                    .ok()
                    .filter(|s: &f64| (0.2..=60.0).contains(s))
                    .ok_or("--secs: seconds from 0.2 to 60")?
            }
            "--only" => only = Some(val("--only")?),
            "--tap-queue" => {
                tap_queue = val("--tap-queue")?
                    .parse()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or("--tap-queue: frames from 1 to 100000")?
            }
            "-h" | "--help" => {
                println!("usage: bench-datapath [--reps N (5)] [--secs S per run (2)] [--tap-queue FRAMES (32)] [--only tx|rx|tx-64|tx-1514|tx-64k|rx-64|...]");
                return Ok(());
            }
            _ => return Err(format!("unknown argument `{a}` (try --help)")),
        }
    }
    support::netns(&[TAP])?;
    // rx frames wait in the tap's queue for the mover. The kernel's default of 1000
    // frames is 64 MiB of 64 KiB frames: a mover a little slower than the generator
    // then copies from a backlog that has left the caches, which makes it slower
    // still (the figures flipped between two modes from run to run). A TCP sender
    // keeps its window in flight, not 64 MiB; 32 frames is 2 MiB of them.
    support::ip(&["link", "set", TAP, "txqueuelen", &tap_queue.to_string()])?;
    println!(
        "bench-datapath: {reps} runs of {secs} s per cell, tap queue {tap_queue} frames; CPU time of the thread that moves the frames, per frame (median, min-max); Gbit/s of frames moved (median)"
    );
    println!(
        "{:<4} {:<11} {:>24} {:>24} {:>7} {:>9} {:>9}",
        "dir", "frame", "Tandem ns/frame", "raw tap ns/frame", "ratio", "Tandem", "raw"
    );
    for dir in [Dir::Tx, Dir::Rx] {
        for size in SIZES {
            let cell = format!("{}-{}", if dir == Dir::Tx { "tx" } else { "rx" }, size.key);
            // "rx" takes every rx cell, "rx-64" only rx-64 (not rx-64k).
            if only
                .as_deref()
                .is_some_and(|o| o != cell && !cell.starts_with(&format!("{o}-")))
            {
                continue;
            }
            let mut t = Vec::new();
            let mut r = Vec::new();
            for _ in 0..reps {
                t.push(run_tandem(dir, size, secs)?);
                r.push(run_raw(dir, size, secs)?);
            }
            let (tn, tg) = summary(&t);
            let (rn, rg) = summary(&r);
            println!(
                "{:<4} {:<11} {:>24} {:>24} {:>6.2}x {:>5.2} Gb/s {:>4.2} Gb/s",
                if dir == Dir::Tx { "tx" } else { "rx" },
                size.name,
                tn.0,
                rn.0,
                tn.1 / rn.1,
                tg,
                rg
            );
        }
    }
    Ok(())
}

/// One run: frames moved, their bytes, the mover's CPU time, the wall time.
#[derive(Clone, Copy)]
struct Sample {
    frames: u64,
    bytes: u64,
    cpu_ns: u64,
    wall: Duration,
}

/// ("median (min-max)" ns per frame, median ns) and median Gbit/s.
fn summary(s: &[Sample]) -> ((String, f64), f64) {
    let med = |mut v: Vec<f64>| -> (f64, f64, f64) {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let ns = med(s
        .iter()
        .map(|x| x.cpu_ns as f64 / x.frames.max(1) as f64)
        .collect());
    let gbps = med(s
        .iter()
        .map(|x| x.bytes as f64 * 8.0 / x.wall.as_secs_f64() / 1e9)
        .collect());
    (
        (format!("{:.0} ({:.0}-{:.0})", ns.0, ns.1, ns.2), ns.0),
        gbps.0,
    )
}

/// Nanoseconds thread `tid` of this process has run.
fn thread_cpu_ns(tid: i32) -> Res<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .map_err(|e| format!("schedstat of thread {tid}: {e}"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("schedstat of thread {tid}: `{s}`"))
}

/// The thread of this process named `name`.
fn thread_named(name: &str) -> Res<i32> {
    let dir = std::fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?;
    for d in dir.flatten() {
        let comm = std::fs::read_to_string(d.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            if let Some(tid) = d.file_name().to_str().and_then(|t| t.parse().ok()) {
                return Ok(tid);
            }
        }
    }
    Err(format!("no thread named {name}"))
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Measures the mover thread `tid` between `warm` and `warm + secs`, counting with
/// `count` (frames, bytes); `stop` is set at the end.
fn measure(
    tid: impl Fn() -> Res<i32>,
    count: &dyn Fn() -> (u64, u64),
    secs: f64,
    stop: &AtomicBool,
) -> Res<Sample> {
    std::thread::sleep(Duration::from_millis(300));
    let tid = tid()?;
    let (f0, b0) = count();
    let c0 = thread_cpu_ns(tid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (f1, b1) = count();
    let c1 = thread_cpu_ns(tid)?;
    let wall = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    if f1 == f0 {
        return Err("no frame moved in a whole run".into());
    }
    Ok(Sample {
        frames: f1 - f0,
        bytes: b1 - b0,
        cpu_ns: c1 - c0,
        wall,
    })
}

/// The kernel side of the tap sending frames out of it, until `stop`.
fn generator(size: Size, stop: Arc<AtomicBool>) -> Res<std::thread::JoinHandle<()>> {
    let mut sock = support::packet_socket(TAP, true)?;
    // The packet socket takes virtio_net_hdr without num_buffers.
    let f = frame(size.frame, size.gso);
    let mut pkt = f[..10].to_vec();
    pkt.extend_from_slice(&f[VNET_HDR..]);
    std::thread::Builder::new()
        .name("generator".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // A full tap queue drops (ENOBUFS or silently): the mover reads what
                // got through.
                let _ = sock.write(&pkt);
            }
        })
        .map_err(|e| format!("spawn: {e}"))
}

/// Plain `write`/`read` on the tap, the same frames.
fn run_raw(dir: Dir, size: Size, secs: f64) -> Res<Sample> {
    let mut taps = tap::open(TAP, 1).map_err(|e| e.to_string())?;
    let tapf = taps.remove(0);
    tap::set_offload(&tapf, tap::TUN_F_CSUM | tap::TUN_F_TSO4).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let tid = Arc::new(AtomicU64::new(0));
    let (s2, f2, b2, t2) = (stop.clone(), frames.clone(), bytes.clone(), tid.clone());
    let gen = if dir == Dir::Rx {
        Some(generator(size, stop.clone())?)
    } else {
        None
    };
    // The same memory the driver gives Tandem: one frame slot per tx descriptor,
    // 4 KiB rx buffers filled in ring order, so neither side has warmer caches.
    let f = frame(size.frame, size.gso);
    let mut slots = vec![0u8; usize::from(QSIZE) * 0x10000];
    for s in slots.chunks_mut(0x10000) {
        s[..f.len()].copy_from_slice(&f);
    }
    let flen = f.len();
    let mut bufs = vec![0u8; usize::from(QSIZE) * RX_BUF as usize];
    let mover = std::thread::spawn(move || -> Res<()> {
        t2.store(gettid() as u64, Ordering::SeqCst);
        let tapf = tapf;
        let mut pfd = libc::pollfd {
            fd: tapf.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let per = RX_BUF as usize;
        let nbufs = usize::from(QSIZE);
        // Enough 4 KiB buffers for the largest frame.
        let want = 65562usize.div_ceil(per);
        let mut next = 0usize;
        let mut slot = 0usize;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(want);
        while !s2.load(Ordering::Relaxed) {
            match dir {
                Dir::Tx => {
                    let at = slot * 0x10000;
                    slot = (slot + 1) % nbufs;
                    // writev, as a VMM must: the frame is in guest buffers.
                    let one = [libc::iovec {
                        iov_base: slots[at..].as_mut_ptr().cast(),
                        iov_len: flen,
                    }];
                    // SAFETY: one iovec inside `slots`, which outlives the call; the
                    // kernel only reads it.
                    let r = unsafe { libc::writev(tapf.as_raw_fd(), one.as_ptr(), 1) };
                    if r < 0 {
                        return Err(format!("tap write: {}", io::Error::last_os_error()));
                    }
                    let n = r as usize;
                    f2.fetch_add(1, Ordering::Relaxed);
                    b2.fetch_add((n - VNET_HDR) as u64, Ordering::Relaxed);
                }
                Dir::Rx => {
                    let base = bufs.as_mut_ptr();
                    iov.clear();
                    iov.extend((0..want).map(|i| libc::iovec {
                        // SAFETY: the index is below nbufs, so the offset is inside `bufs`.
                        iov_base: unsafe { base.add(((next + i) % nbufs) * per) }.cast(),
                        iov_len: per,
                    }));
                    // SAFETY: every iovec is a 4 KiB piece of `bufs`, which outlives the call.
                    let r = unsafe { libc::readv(tapf.as_raw_fd(), iov.as_ptr(), want as i32) };
                    if r >= 0 {
                        let n = r as usize;
                        next = (next + n.div_ceil(per)) % nbufs;
                        f2.fetch_add(1, Ordering::Relaxed);
                        b2.fetch_add((n - VNET_HDR) as u64, Ordering::Relaxed);
                        continue;
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(format!("tap read: {e}"));
                    }
                    // SAFETY: one valid pollfd, 100 ms at most.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                }
            }
        }
        Ok(())
    });
    let s = measure(
        || {
            Some(tid.load(Ordering::SeqCst) as i32)
                .filter(|&t| t != 0)
                .ok_or_else(|| "no mover".to_string())
        },
        &|| {
            (
                frames.load(Ordering::Relaxed),
                bytes.load(Ordering::Relaxed),
            )
        },
        secs,
        &stop,
    );
    let joined = mover
        .join()
        .map_err(|_| "the raw loop panicked".to_string())?;
    if let Some(g) = gen {
        let _ = g.join();
    }
    joined?;
    let s = s?;
    if dir == Dir::Rx && s.bytes / s.frames < size.frame as u64 / 2 {
        return Err(format!(
            "the tap split the {} frames ({} bytes each on average)",
            size.name,
            s.bytes / s.frames
        ));
    }
    Ok(s)
}

/// Tandem's `Net` on the tap, one queue pair, driven by a driver thread.
fn run_tandem(dir: Dir, size: Size, secs: f64) -> Res<Sample> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)])
        .map_err(|e| format!("guest memory: {e}"))?;
    let mut net = Net::new(NetConfig {
        id: "bench".into(),
        tap: TAP.into(),
        mac: [0x52, 0x54, 0, 0, 0, 1],
        standby: false,
        num_queues: 2,
        queue_size: QSIZE,
        mtu: None,
        announce: false,
    })
    .map_err(|e| e.to_string())?;
    // What a Linux guest acks that matters here.
    let features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_F_RING_EVENT_IDX)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO4);
    if !net.ack_features(features) {
        return Err("the device refused the features".into());
    }
    let mut rx = Ring::new(&mem, RX_RING);
    let mut tx = Ring::new(&mem, TX_RING);
    let irqs = Arc::new(Irqs([
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
    ]));
    let kick_rx = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let kick_tx = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    // rx buffers posted before the device starts, as Linux does.
    let mut rx_addr = vec![0u64; usize::from(QSIZE)];
    for i in 0..u64::from(QSIZE) {
        let addr = RX_BUFS + i * u64::from(RX_BUF);
        let id = rx.post(addr, RX_BUF, true)?;
        rx_addr[usize::from(id)] = addr;
    }
    rx.publish(0)?;
    // tx frames written once into one slot per descriptor.
    let f = frame(size.frame, size.gso);
    for i in 0..u64::from(QSIZE) {
        mem.write_slice(&f, GuestAddress(TX_SLOTS + i * 0x10000))
            .map_err(|e| e.to_string())?;
    }
    net.activate(ActivateArgs {
        mem: mem.clone(),
        interrupt: irqs.clone(),
        queues: vec![
            (
                0,
                rx.queue()?,
                kick_rx.try_clone().map_err(|e| e.to_string())?,
            ),
            (
                1,
                tx.queue()?,
                kick_tx.try_clone().map_err(|e| e.to_string())?,
            ),
        ],
        features,
    })
    .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let gen = if dir == Dir::Rx {
        Some(generator(size, stop.clone())?)
    } else {
        None
    };
    let (s2, f2, b2, irqs2) = (stop.clone(), frames.clone(), bytes.clone(), irqs.clone());
    let flen = size.frame as u32 + VNET_HDR as u32;
    let driver = std::thread::spawn(move || -> Res<()> {
        let mut done = VecDeque::new();
        match dir {
            Dir::Tx => {
                let kick = kick_tx;
                while !s2.load(Ordering::Relaxed) {
                    tx.harvest(&mut done)?;
                    let n = done.len() as u64;
                    for (id, _) in done.drain(..) {
                        tx.free.push(id);
                    }
                    f2.fetch_add(n, Ordering::Relaxed);
                    b2.fetch_add(n * u64::from(flen - VNET_HDR as u32), Ordering::Relaxed);
                    let old = tx.avail_idx;
                    // Each descriptor id has its own frame slot.
                    while let Some(&id) = tx.free.last() {
                        tx.post(TX_SLOTS + u64::from(id) * 0x10000, flen, false)?;
                    }
                    if old != tx.avail_idx && tx.publish(old)? {
                        let _ = kick.write(1);
                    }
                    if !tx.arm()? {
                        wait_irq(&irqs2.0[1]);
                    }
                }
            }
            Dir::Rx => {
                let kick = kick_rx;
                // Buffers still to come of the frame whose first buffer was seen.
                let mut rest = 0u16;
                while !s2.load(Ordering::Relaxed) {
                    rx.harvest(&mut done)?;
                    let old = rx.avail_idx;
                    let mut n = 0u64;
                    let mut b = 0u64;
                    for (id, len) in done.drain(..) {
                        let addr = *rx_addr.get(usize::from(id)).ok_or("bad used id")?;
                        if rest == 0 {
                            // A frame's first buffer says how many buffers it took.
                            let nb: u16 = rx
                                .mem
                                .read_obj(GuestAddress(addr + 10))
                                .map_err(|e| e.to_string())?;
                            rest = nb.max(1);
                            n += 1;
                            b += u64::from(len).saturating_sub(VNET_HDR as u64);
                        } else {
                            b += u64::from(len);
                        }
                        rest -= 1;
                        // The same buffer goes back under the same id.
                        rx.free.push(id);
                        rx.post(addr, RX_BUF, true)?;
                    }
                    f2.fetch_add(n, Ordering::Relaxed);
                    b2.fetch_add(b, Ordering::Relaxed);
                    if old != rx.avail_idx && rx.publish(old)? {
                        let _ = kick.write(1);
                    }
                    if !rx.arm()? {
                        wait_irq(&irqs2.0[0]);
                    }
                }
            }
        }
        Ok(())
    });
    let s = measure(
        || thread_named("net-bench-q0"),
        &|| {
            (
                frames.load(Ordering::Relaxed),
                bytes.load(Ordering::Relaxed),
            )
        },
        secs,
        &stop,
    );
    let joined = driver
        .join()
        .map_err(|_| "the driver panicked".to_string())?;
    if let Some(g) = gen {
        let _ = g.join();
    }
    net.reset();
    joined?;
    let s = s?;
    if dir == Dir::Rx && s.bytes / s.frames < size.frame as u64 / 2 {
        return Err(format!(
            "the tap split the {} frames ({} bytes each on average)",
            size.name,
            s.bytes / s.frames
        ));
    }
    Ok(s)
}
