//! Which queue of a multi-queue tap the host's frames for the guest take, on a real
//! tap in a network namespace of the test's own.
//!
//! First without Tandem's steering program, as the control: the tap sends a flow to
//! the queue the guest last sent that flow on, so when the guest's ACKs change queue
//! the flow's frames change queue too (and may overtake each other, since each queue
//! has its own worker). Then with the program that `Net` gives every multi-queue tap:
//! each flow stays on one queue whatever queue the guest sends on, and flows spread
//! over both queues.
//!
//! Needs root (the namespace and the tap); it says so and skips without it.

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use devices::virtio::net::{steering, tap};

#[path = "support/mod.rs"]
mod support;
use support::{frame, packet_socket, Res, VNET_HDR};

const TAP: &str = "tsteer0";
const FLOWS: u16 = 16;

fn main() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("tap_steering: skipped: needs root (a tap in a network namespace of its own)");
        return;
    }
    match run() {
        Ok(()) => println!("tap_steering: ok"),
        Err(e) => {
            eprintln!("tap_steering: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

/// A UDP frame of flow `flow` (its source port), host to guest, without vnet header.
fn to_guest(flow: u16) -> Vec<u8> {
    let mut f = frame(100, false).split_off(VNET_HDR);
    f[34..36].copy_from_slice(&(6000 + flow).to_be_bytes());
    f
}

/// The same flow the other way, guest to host, behind a zero vnet header: what the
/// guest sends on a queue.
fn from_guest(flow: u16) -> Vec<u8> {
    let there = to_guest(flow);
    let mut f = there.clone();
    f[0..6].copy_from_slice(&there[6..12]);
    f[6..12].copy_from_slice(&there[0..6]);
    f[26..30].copy_from_slice(&there[30..34]);
    f[30..34].copy_from_slice(&there[26..30]);
    f[34..36].copy_from_slice(&there[36..38]);
    f[36..38].copy_from_slice(&there[34..36]);
    let mut out = vec![0u8; VNET_HDR];
    out.extend_from_slice(&f);
    out
}

/// Send flow `flow` from the host and say which queue it came out of.
fn queue_of(sock: &mut File, queues: &mut [File], flow: u16) -> Res<usize> {
    let f = to_guest(flow);
    sock.write_all(&f).map_err(|e| format!("send: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 2048];
    loop {
        for (i, q) in queues.iter_mut().enumerate() {
            match q.read(&mut buf) {
                Ok(n) if n == VNET_HDR + f.len() && buf[VNET_HDR..n] == f[..] => return Ok(i),
                Ok(_) => {} // something else (none expected); keep looking
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("read queue {i}: {e}")),
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "flow {flow}: the frame came out of no queue in 2 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The tap drops what the host sends until the kernel has noticed its carrier (it
/// comes with the first queue opened) and given it a queueing discipline, which
/// happens a little later, off a work queue. Send until a frame comes through.
fn warm_up(sock: &mut File, queues: &mut [File]) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = to_guest(999);
    let mut buf = vec![0u8; 2048];
    loop {
        sock.write_all(&f).map_err(|e| format!("send: {e}"))?;
        std::thread::sleep(Duration::from_millis(50));
        let mut through = false;
        for q in queues.iter_mut() {
            while let Ok(n) = q.read(&mut buf) {
                through |= n > VNET_HDR;
            }
        }
        if through {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the tap passed no frame in 10 s".into());
        }
    }
}

fn guest_sends(queues: &mut [File], q: usize, flow: u16) -> Res<()> {
    queues[q]
        .write_all(&from_guest(flow))
        .map_err(|e| format!("write queue {q}: {e}"))
}

fn run() -> Res<()> {
    support::netns(&[])?;
    support::ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "multi_queue"])?;
    support::ip(&["link", "set", TAP, "up"])?;
    let mut queues = tap::open(TAP, 2).map_err(|e| e.to_string())?;
    let mut sock = packet_socket(TAP, false)?;
    warm_up(&mut sock, &mut queues)?;

    // Control: the queue follows the guest's last send of the flow.
    for q in [1, 0, 1] {
        guest_sends(&mut queues, q, 3)?;
        let got = queue_of(&mut sock, &mut queues, 3)?;
        if got != q {
            return Err(format!(
                "control: without steering the flow should follow the guest's send on \
                 queue {q}, came out of {got}; the test cannot tell steering from none"
            ));
        }
    }

    steering::steer_by_flow(&queues[0]).map_err(|e| e.to_string())?;
    let mut used = [0usize; 2];
    for flow in 0..FLOWS {
        let first = queue_of(&mut sock, &mut queues, flow)?;
        used[first] += 1;
        for q in [0, 1, 1, 0] {
            guest_sends(&mut queues, q, flow)?;
            let got = queue_of(&mut sock, &mut queues, flow)?;
            if got != first {
                return Err(format!(
                    "flow {flow} moved from queue {first} to {got} after the guest sent on {q}"
                ));
            }
        }
    }
    if used.contains(&0) {
        return Err(format!("{FLOWS} flows all on one queue: {used:?}"));
    }
    println!("tap_steering: {FLOWS} flows, per queue {used:?}, none moved");
    Ok(())
}
