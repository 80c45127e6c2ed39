//! A NIC on a real tap, in a network namespace of the test's own: every frame the host
//! sends towards the guest is either delivered or counted where it was dropped, and
//! the counters say why. A guest that posts no rx buffers makes the tap drop what does
//! not fit in its queue (`tap_dropped`, and the worker counts the wait in
//! `rx_no_buffers`); a frame too big for the only buffer posted is dropped by Tandem
//! (`rx_dropped`).
//!
//! Needs root (the namespace and the tap); it says so and skips without it.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::{Net, NetConfig};
use devices::virtio::{ActivateArgs, GuestMemoryMmap, VirtioDevice};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[path = "support/mod.rs"]
mod support;
use support::{
    frame, wait_irq, Irqs, Res, Ring, QSIZE, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

const TAP: &str = "tdrop0";
const SENT: u64 = 1500;

fn main() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("tap_counters: skipped: needs root (a tap in a network namespace of its own)");
        return;
    }
    match run() {
        Ok(()) => println!("tap_counters: ok"),
        Err(e) => {
            eprintln!("tap_counters: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn evt() -> Res<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())
}

/// A device with one queue pair on the tap, its rings at the start of `mem`.
fn activate(
    net: &mut Net,
    mem: &GuestMemoryMmap,
    features: u64,
    irqs: &Arc<Irqs>,
) -> Res<(Ring, EventFd)> {
    if !net.ack_features(features) {
        return Err(format!("features {features:#x} refused"));
    }
    let rx = Ring::new(mem, 0);
    let tx = Ring::new(mem, 0x8000);
    let kick = evt()?;
    net.activate(ActivateArgs {
        mem: mem.clone(),
        interrupt: irqs.clone(),
        queues: vec![
            (0, rx.queue()?, kick.try_clone().map_err(|e| e.to_string())?),
            (1, tx.queue()?, evt()?),
        ],
        features,
    })
    .map_err(|e| e.to_string())?;
    Ok((rx, kick))
}

fn run() -> Res<()> {
    support::netns(&[TAP])?;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).map_err(|e| e.to_string())?;
    let mut net = Net::new(NetConfig {
        id: "drops".into(),
        tap: TAP.into(),
        mac: [0x52, 0x54, 0, 0, 0, 7],
        standby: false,
        num_queues: 2,
        queue_size: QSIZE,
        mtu: None,
        announce: false,
    })
    .map_err(|e| e.to_string())?;
    let counters = net.stats_source();
    let irqs = Arc::new(Irqs([evt()?, evt()?, evt()?]));
    let features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_F_RING_EVENT_IDX)
        | (1 << VIRTIO_NET_F_MRG_RXBUF);
    let (mut rx, kick) = activate(&mut net, &mem, features, &irqs)?;

    // The host sends while the guest has posted nothing (once the worker is up).
    std::thread::sleep(Duration::from_millis(100));
    let mut sock = support::packet_socket(TAP, false)?;
    let f = frame(1514, false);
    for i in 0..SENT {
        sock.write_all(&f[support::VNET_HDR..])
            .map_err(|e| format!("send {i}: {e}"))?;
    }
    let t0 = Instant::now();
    while counters.pairs()[0].rx_no_buffers == 0 && t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let q = counters.pairs()[0];
    let dropped = counters.tap_dropped().ok_or("no tap counter")?;
    if q.rx_no_buffers == 0 {
        return Err(format!(
            "the wait for rx buffers was not counted (the tap dropped {dropped}): {q:?}"
        ));
    }
    if dropped == 0 || dropped >= SENT {
        return Err(format!(
            "the tap dropped {dropped} of {SENT} frames sent with no rx buffer posted"
        ));
    }
    println!(
        "no rx buffers: the tap dropped {dropped} of {SENT}; waits counted: {}",
        q.rx_no_buffers
    );

    // The guest posts buffers and takes frames until none come: everything not
    // dropped arrives.
    let mut addr = vec![0u64; usize::from(QSIZE)];
    for i in 0..u64::from(QSIZE) {
        let a = 0x10_0000 + i * 4096;
        addr[usize::from(rx.post(a, 4096, true)?)] = a;
    }
    rx.publish(0)?;
    let _ = kick.write(1);
    let mut got = 0u64;
    let mut done = std::collections::VecDeque::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_millis(500) {
        rx.harvest(&mut done)?;
        let old = rx.avail_idx;
        for (id, len) in done.drain(..) {
            if len as usize != f.len() {
                return Err(format!("a frame of {len} bytes arrived, not {}", f.len()));
            }
            got += 1;
            last = Instant::now();
            let a = *addr.get(usize::from(id)).ok_or("bad used id")?;
            rx.free.push(id);
            rx.post(a, 4096, true)?;
        }
        if old != rx.avail_idx && rx.publish(old)? {
            let _ = kick.write(1);
        }
        if !rx.arm()? {
            wait_irq(&irqs.0[0]);
        }
    }
    let q = counters.pairs()[0];
    if got + dropped != SENT || q.rx_frames != got || q.rx_dropped != 0 {
        return Err(format!(
            "sent {SENT}, the guest got {got}, the tap dropped {dropped}: frames unaccounted for ({q:?})"
        ));
    }
    println!("buffers posted: the guest got the other {got}");

    // No mergeable buffers and one 256-byte buffer: a 1,514-byte frame cannot fit and
    // is dropped by Tandem, counted, the buffer returned empty.
    net.reset();
    let mem2 =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).map_err(|e| e.to_string())?;
    let before = counters.pairs()[0].rx_dropped;
    let features = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX);
    let (mut rx, kick) = activate(&mut net, &mem2, features, &irqs)?;
    rx.post(0x10_0000, 256, true)?;
    rx.publish(0)?;
    let _ = kick.write(1);
    sock.write_all(&f[support::VNET_HDR..])
        .map_err(|e| format!("send: {e}"))?;
    let t0 = Instant::now();
    loop {
        rx.harvest(&mut done)?;
        if let Some((_, len)) = done.pop_front() {
            if len != 0 {
                return Err(format!(
                    "a frame too big for its buffer came back with {len} bytes"
                ));
            }
            break;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            return Err("the 256-byte buffer never came back".into());
        }
        if !rx.arm()? {
            wait_irq(&irqs.0[0]);
        }
    }
    let after = counters.pairs()[0].rx_dropped;
    if after != before + 1 {
        return Err(format!(
            "a frame too big for the buffer: rx_dropped {before} -> {after}"
        ));
    }
    println!("a frame too big for the only buffer: dropped and counted");
    let _ = mem.write_obj(0u8, GuestAddress(0));
    net.reset();
    Ok(())
}
