//! Failover hotplug benchmark: Tandem against QEMU (`virtio-net,failover=on` +
//! `vfio-pci,failover_pair_id=`) with the test host's passthrough e1000e as the primary.
//!
//! `cargo run --release -p tests --example bench-hotplug [-- --runs N]`
//!
//! Each run boots the test guest (1 vCPU, 512M) with a failover pair on each of three
//! VMMs in turn: Tandem, Tandem with `announce=off` on the standby, and the reference
//! QEMU. Once the guest's failover master has both slaves and an address, it measures:
//!
//! 1. peer→guest outage on an orderly removal: the peer (the test host) pings the guest
//!    every 10 ms while the primary is removed (Tandem `remove-device`, QEMU
//!    `device_del`); the outage is the longest run of unanswered pings. The bridge keeps
//!    sending to the port where it last saw the guest's MAC until something tells it
//!    otherwise. The removal's latency (API call → released: Tandem's
//!    answer, QEMU's DEVICE_DELETED; both called over their sockets, no process
//!    started) is taken here too, and for Tandem where it went, from its answer's
//!    `steps`: the guest reading the eject request, the guest's own release up to its
//!    `_EJ0` write, and Tandem's tear-down and answer after that write.
//!    Then the same removal under a one-way peer→guest UDP stream the guest does not
//!    answer: the time from the release until the bridge sends the stream to the
//!    standby's tap (capped at 15 s), which only an announce or the guest's own frames
//!    can shorten.
//! 2. plug: API call (Tandem `add-device`, QEMU `device_add`) → the primary carries the
//!    guest's traffic (the first frame of a 10 ms guest ping flood seen on the test
//!    host's uplink, which only the primary's frames reach).
//! 3. guest→peer outage on an orderly removal: the longest gap in the frames of that
//!    flood on the uplink and the standby's tap together (sampled every 2 ms).
//! 4. Tandem only (QEMU has no surprise removal): the same outages on a surprise removal.
//! 5. Tandem only (QEMU does not hide a primary when its standby resets): a plug from
//!    a kept-open function. The standby's driver is unbound in the guest, which hides
//!    the primary (Tandem keeps its function open), then bound again: the time from
//!    the bind until the guest's new master has both slaves, on the guest's clock; and
//!    from Tandem's log, its own share of each plug, from a closed function (open, DMA
//!    map, plug) and from a kept one (reset, plug).
//!
//! When /dev/kvm cannot boot Linux, everything runs inside ONE test host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::bench::{self, Bench, BenchReport, Dirs, VmSpec};
use harness::guestnet::{
    bridge_uplink, failover_master, host_counter, wait_guest, wait_primary_carries,
};
use harness::qmp::Qmp;
use harness::{err, Agent, GuestImage, Mode, VfioNic, FAILOVER_MAC, PEER_IP};
use serde::{Deserialize, Serialize};

const RESULT_TAG: &str = "@@BENCH-RESULT@@ ";
const GUEST_IP: &str = "10.0.0.2";
const SLOT: u32 = 6;

const BENCH: Bench = Bench {
    name: "bench-hotplug",
    result_tag: RESULT_TAG,
    build_hint: "cargo build --release -p vmm --bins",
    testhost_note: "all runs use one test host and its passthrough e1000e",
    failed_note: "some runs failed",
};

const VMMS: [&str; 3] = ["tandem", "tandem-noannounce", "qemu"];

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sample {
    vmm: String,
    run: usize,
    error: Option<String>,
    /// Orderly removal: API call -> released (s).
    release_s: Option<f64>,
    /// Tandem's answer to that removal: the guest reading the request, the guest's
    /// release up to its `_EJ0` write, Tandem's tear-down and answer after it (ms).
    #[serde(default)]
    release_notify_ms: Option<f64>,
    #[serde(default)]
    release_guest_ms: Option<f64>,
    #[serde(default)]
    release_vmm_ms: Option<f64>,
    /// Orderly removal: longest run of unanswered peer->guest pings (ms).
    p2g_orderly_ms: Option<f64>,
    /// Orderly removal, a one-way peer->guest stream the guest does not answer:
    /// released -> the first frame the bridge sends to the standby's tap (ms).
    oneway_orderly_ms: Option<f64>,
    /// API call -> first frame of the guest's flood through the primary (s).
    plug_s: Option<f64>,
    /// Orderly removal: longest gap in the guest's frames on uplink + tap (ms).
    g2p_orderly_ms: Option<f64>,
    /// Surprise removal (Tandem): the same two outages (ms).
    p2g_surprise_ms: Option<f64>,
    g2p_surprise_ms: Option<f64>,
    /// Tandem's share of a plug (its log), the function closed before: median (ms).
    #[serde(default)]
    plug_cold_ms: Option<f64>,
    /// The same, from a function kept open while the primary was hidden (ms).
    #[serde(default)]
    plug_kept_ms: Option<f64>,
    /// The standby's driver bound again -> the guest's master has both slaves, on
    /// the guest's clock (`/proc/uptime`, 10 ms steps) (ms).
    #[serde(default)]
    rebind_enslaved_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Report {
    env: Vec<(String, String)>,
    samples: Vec<Sample>,
}

/// `--runs N` (default 3) and `--vmm NAME` (repeatable; default all of `VMMS`).
fn parse_args() -> (usize, Vec<String>) {
    let mut runs = 3;
    let mut vmms = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("bench-hotplug: --runs needs a positive number");
                        std::process::exit(2)
                    })
            }
            "--vmm" => match it.next() {
                Some(v) if VMMS.contains(&v.as_str()) => vmms.push(v),
                v => {
                    eprintln!(
                        "bench-hotplug: --vmm needs one of {} (got {v:?})",
                        VMMS.join(", ")
                    );
                    std::process::exit(2)
                }
            },
            "-h" | "--help" => {
                println!(
                    "usage: cargo run --release -p tests --example bench-hotplug [-- --runs N] [--vmm {}]...",
                    VMMS.join("|")
                );
                std::process::exit(0)
            }
            other => {
                eprintln!(
                    "bench-hotplug: unknown argument {other:?} (usage: bench-hotplug [--runs N] [--vmm NAME]...)"
                );
                std::process::exit(2)
            }
        }
    }
    if vmms.is_empty() {
        vmms = VMMS.iter().map(|v| v.to_string()).collect();
    }
    (runs, vmms)
}

/// Samples the rx counters of host netdevs every 2 ms: when each of them grew.
struct Sampler {
    stop: Arc<AtomicBool>,
    grew: Arc<Mutex<Vec<(Instant, usize)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(devs: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let grew = Arc::new(Mutex::new(Vec::new()));
        let (s, g) = (stop.clone(), grew.clone());
        let thread = std::thread::spawn(move || {
            let mut last: Vec<u64> = devs.iter().map(|d| host_counter(d)).collect();
            while !s.load(Ordering::Relaxed) {
                for (i, d) in devs.iter().enumerate() {
                    let v = host_counter(d);
                    if v > last[i] {
                        g.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((Instant::now(), i));
                    }
                    last[i] = v;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            stop,
            grew,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(Instant, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let g = self.grew.lock().unwrap_or_else(|e| e.into_inner());
        g.clone()
    }
}

/// The longest gap (ms) between growths at or after `from` (the first growth after
/// `from` counts from `from`).
fn longest_gap(grew: &[(Instant, usize)], from: Instant) -> Option<f64> {
    let mut prev = from;
    let mut gap = Duration::ZERO;
    for (t, _) in grew.iter().filter(|(t, _)| *t >= from) {
        gap = gap.max(t.duration_since(prev));
        prev = *t;
    }
    (prev > from).then_some(gap.as_secs_f64() * 1000.0)
}

/// A one-way UDP stream from the peer to the guest (discard port), a datagram every
/// 10 ms, until the returned flag is set. The guest answers nothing.
fn start_udp_stream() -> harness::Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
    let sock = std::net::UdpSocket::bind("10.0.0.1:0").map_err(|e| err!("udp: {e}"))?;
    // A datagram the kernel cannot take now is dropped, never waited for: the thread
    // must stop when told to.
    sock.set_nonblocking(true).map_err(|e| err!("udp: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let t = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let _ = sock.send_to(b"tandem-bench", (GUEST_IP, 9));
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    Ok((stop, t))
}

/// The host's ping of the guest: every 10 ms for `secs`, in the background.
fn start_peer_ping(secs: u32) -> harness::Result<std::process::Child> {
    std::process::Command::new("ping")
        .args([
            "-i",
            "0.01",
            "-W",
            "1",
            "-c",
            &(secs * 100).to_string(),
            GUEST_IP,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| err!("ping: {e}"))
}

/// The longest run of unanswered pings (ms) in `ping`'s output, after the first reply.
fn peer_outage(child: std::process::Child) -> harness::Result<f64> {
    let out = child.wait_with_output().map_err(|e| err!("ping: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let seqs = bench::icmp_seqs(&text);
    let sent: u64 = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    if seqs.is_empty() {
        return Err(err!("the guest never answered the peer's ping"));
    }
    let mut gap = 0;
    let mut prev = seqs[0];
    for s in seqs.iter().skip(1).chain(std::iter::once(&(sent + 1))) {
        gap = gap.max(s.saturating_sub(prev + 1));
        prev = *s;
    }
    Ok(gap as f64 * 10.0)
}

/// How one VMM adds and removes its primary.
enum Control {
    Tandem {
        bin: std::path::PathBuf,
        api: std::path::PathBuf,
        spec: String,
    },
    Qemu {
        qmp: Qmp,
        bdf: String,
    },
}

impl Control {
    /// Removes the primary; for Tandem's orderly removal, where the time went as
    /// Tandem saw it (the answer's `steps`: notify, guest, Tandem, in ms). Tandem is
    /// called straight over its API socket, as QEMU is over QMP: no process start in
    /// the measured time.
    fn remove(&mut self, surprise: bool) -> harness::Result<Option<[f64; 3]>> {
        match self {
            Control::Tandem { api, .. } => {
                let answer = harness::tandem::api_put(
                    api,
                    "vm.remove-device",
                    &serde_json::json!({ "id": "vf0", "surprise": surprise }),
                )?;
                let st = |k: &str| answer["steps"][k].as_f64();
                Ok(match (st("notify_ms"), st("guest_ms"), st("vmm_ms")) {
                    (Some(n), Some(g), Some(v)) => Some([n, g, v]),
                    _ => None,
                })
            }
            Control::Qemu { qmp, .. } => {
                qmp.clear_events();
                qmp.execute("device_del", serde_json::json!({ "id": "hostdev0" }))?;
                qmp.wait_event(
                    "DEVICE_DELETED",
                    |d| d["device"] == "hostdev0",
                    Duration::from_secs(30),
                )?;
                Ok(None)
            }
        }
    }

    fn add(&mut self) -> harness::Result<()> {
        match self {
            Control::Tandem { bin, api, spec } => remote(bin, api, &["add-device", spec.as_str()]),
            Control::Qemu { qmp, bdf } => {
                qmp.execute(
                    "device_add",
                    serde_json::json!({ "driver": "vfio-pci", "id": "hostdev0", "host": bdf, "bus": "rp2", "failover_pair_id": "net0", "rombar": 0 }),
                )?;
                Ok(())
            }
        }
    }
}

/// `tandem remote --api-socket API ARGS...`, killed if it has not answered within 60 s
/// (an orderly removal waits for the guest at most 10 s by default): a benchmark that
/// stops at a call names the call instead of hanging.
fn remote(bin: &std::path::Path, api: &std::path::Path, args: &[&str]) -> harness::Result<()> {
    let mut child = std::process::Command::new(bin)
        .args(["remote", "--api-socket"])
        .arg(api)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| err!("tandem remote: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait().map_err(|e| err!("tandem remote: {e}"))? {
            Some(st) if st.success() => return Ok(()),
            Some(st) => {
                let mut msg = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut msg);
                }
                return Err(err!(
                    "tandem remote {}: {st}: {}",
                    args.join(" "),
                    msg.trim()
                ));
            }
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err!(
                    "tandem remote {} did not answer within 60 s",
                    args.join(" ")
                ));
            }
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// One line on stderr per measurement, so that a run that stops shows where.
fn step(name: &str, what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench-hotplug: {t:7.1} s {name}: {what}");
}

fn guest_flood(agent: &mut Agent, secs: u32) -> harness::Result<()> {
    agent.run_ok(&format!(
        "(ping -i 0.01 -W 1 -c {} {PEER_IP} >/dev/null 2>&1 &)",
        secs * 100
    ))?;
    Ok(())
}

fn stop_guest_flood(agent: &mut Agent) -> harness::Result<()> {
    agent.run_ok("killall ping 2>/dev/null; true")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_once(
    vmm: &str,
    run: usize,
    tandem: &std::path::Path,
    guest: &GuestImage,
    dirs: &Dirs,
    nic: &VfioNic,
    bridge: &str,
    s: &mut Sample,
) -> harness::Result<()> {
    let name = format!("{vmm}-{run}");
    let tap_name = "tdbhtap0";
    let _tap = harness::tap_on(tap_name, bridge, false)?;
    let up = bridge_uplink(bridge, &[tap_name])?;
    let announce = if vmm == "tandem-noannounce" {
        ",announce=off"
    } else {
        ""
    };
    let spec_dev = format!(
        "id=vf0,path=/sys/bus/pci/devices/{},failover=net0,slot={SLOT}",
        nic.bdf
    );
    let tandem_args = vec![
        "--net".to_string(),
        format!("id=net0,tap={tap_name},mac={FAILOVER_MAC},standby=on,slot=3{announce}"),
        "--device".to_string(),
        spec_dev.clone(),
    ];
    let qemu_args: Vec<String> = vec![
        "-netdev".into(),
        format!("tap,id=nd0,ifname={tap_name},script=no,downscript=no,vhost=off"),
        "-device".into(),
        "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0".into(),
        "-device".into(),
        "pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0".into(),
        "-device".into(),
        format!(
            "virtio-net-pci,id=net0,netdev=nd0,mac={FAILOVER_MAC},bus=rp1,romfile=,failover=on"
        ),
        "-device".into(),
        format!(
            "vfio-pci,id=hostdev0,host={},bus=rp2,rombar=0,failover_pair_id=net0",
            nic.bdf
        ),
    ];
    let spec = VmSpec {
        cpus: 1,
        mem_mib: 512,
        tandem_args: &tandem_args,
        qemu_args: &qemu_args,
    };
    let kind = if vmm == "qemu" { "qemu" } else { "tandem" };
    let proc = bench::spawn_vmm(kind, &name, tandem, guest, dirs, &spec)?;
    let fail = |e: harness::Error| proc.fail(e);
    let mut agent = proc.connect()?;
    agent.wait_ready(Duration::from_secs(120)).map_err(fail)?;
    let mut ctl = if kind == "qemu" {
        let qmp_path = dirs.run.join(format!("{name}.qmp"));
        Control::Qemu {
            qmp: Qmp::connect(&qmp_path, Duration::from_secs(10))?,
            bdf: nic.bdf.clone(),
        }
    } else {
        Control::Tandem {
            bin: tandem.to_path_buf(),
            api: dirs.run.join(format!("{name}.api")),
            spec: spec_dev,
        }
    };
    let m = failover_master(&mut agent, 2).map_err(fail)?;
    agent.run_ok("for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done")?;
    agent.run_ok(&format!(
        "for l in /sys/class/net/{m}/lower_*; do ip link set ${{l##*lower_}} up; done; ip link set {m} up; ip addr add {GUEST_IP}/24 dev {m}"
    ))?;
    wait_guest(
        &mut agent,
        &format!("ping -c 1 -W 1 {PEER_IP} >/dev/null"),
        60,
    )
    .map_err(fail)?;

    // 1. Orderly removal, the peer pinging the guest.
    wait_primary_carries(&mut agent, &up, tap_name).map_err(fail)?;
    step(&name, "orderly removal under the peer's ping");
    let ping = start_peer_ping(8)?;
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let steps = ctl.remove(false).map_err(fail)?;
    s.release_s = Some(t0.elapsed().as_secs_f64());
    if let Some([notify, guest, vmm]) = steps {
        s.release_notify_ms = Some(notify);
        s.release_guest_ms = Some(guest);
        s.release_vmm_ms = Some(vmm);
    }
    s.p2g_orderly_ms = Some(peer_outage(ping)?);
    failover_master(&mut agent, 1).map_err(fail)?;

    // 1b. Back, then an orderly removal under a one-way stream the guest does not answer:
    // only an announce (or the guest's own traffic) tells the bridge where it went.
    step(&name, "re-add, orderly removal under a one-way stream");
    ctl.add().map_err(fail)?;
    failover_master(&mut agent, 2).map_err(fail)?;
    wait_primary_carries(&mut agent, &up, tap_name).map_err(fail)?;
    let (stop, stream) = start_udp_stream()?;
    std::thread::sleep(Duration::from_secs(1));
    let sampler = Sampler::start(vec![format!("{tap_name}/tx_packets")]);
    ctl.remove(false).map_err(fail)?;
    let released = Instant::now();
    let deadline = released + Duration::from_secs(15);
    let mut first = None;
    while Instant::now() < deadline && first.is_none() {
        std::thread::sleep(Duration::from_millis(20));
        first = sampler
            .grew
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(t, _)| *t >= released)
            .map(|(t, _)| t.duration_since(released).as_secs_f64() * 1000.0);
    }
    step(&name, "released; the stream reached the tap or 15 s passed");
    sampler.finish();
    stop.store(true, Ordering::Relaxed);
    let _ = stream.join();
    // None: not within 15 s.
    s.oneway_orderly_ms = Some(first.unwrap_or(15_000.0));
    step(&name, "one-way stream stopped");
    failover_master(&mut agent, 1).map_err(fail)?;

    // 2. Plug, the guest flooding the peer.
    step(&name, "plug under the guest's flood");
    guest_flood(&mut agent, 30)?;
    std::thread::sleep(Duration::from_millis(500));
    let sampler = Sampler::start(vec![up.clone()]);
    let t0 = Instant::now();
    ctl.add().map_err(fail)?;
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut plug = None;
    while Instant::now() < deadline && plug.is_none() {
        std::thread::sleep(Duration::from_millis(50));
        plug = sampler
            .grew
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(t, _)| *t >= t0)
            .map(|(t, _)| t.duration_since(t0).as_secs_f64());
    }
    sampler.finish();
    s.plug_s = plug;
    stop_guest_flood(&mut agent)?;
    failover_master(&mut agent, 2).map_err(fail)?;
    std::thread::sleep(Duration::from_secs(1));

    // 3. Orderly removal, the guest flooding the peer.
    step(&name, "orderly removal under the guest's flood");
    guest_flood(&mut agent, 6)?;
    let sampler = Sampler::start(vec![up.clone(), tap_name.to_string()]);
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    ctl.remove(false).map_err(fail)?;
    std::thread::sleep(Duration::from_secs(3));
    s.g2p_orderly_ms = longest_gap(&sampler.finish(), t0);
    stop_guest_flood(&mut agent)?;
    failover_master(&mut agent, 1).map_err(fail)?;

    // 4. Surprise removals (Tandem only).
    if kind == "tandem" {
        ctl.add().map_err(fail)?;
        failover_master(&mut agent, 2).map_err(fail)?;
        wait_primary_carries(&mut agent, &up, tap_name).map_err(fail)?;
        guest_flood(&mut agent, 6)?;
        let sampler = Sampler::start(vec![up.clone(), tap_name.to_string()]);
        std::thread::sleep(Duration::from_secs(1));
        step(&name, "surprise removal under the guest's flood");
        let t0 = Instant::now();
        ctl.remove(true).map_err(fail)?;
        std::thread::sleep(Duration::from_secs(3));
        s.g2p_surprise_ms = longest_gap(&sampler.finish(), t0);
        stop_guest_flood(&mut agent)?;
        failover_master(&mut agent, 1).map_err(fail)?;
        ctl.add().map_err(fail)?;
        failover_master(&mut agent, 2).map_err(fail)?;
        wait_primary_carries(&mut agent, &up, tap_name).map_err(fail)?;
        let ping = start_peer_ping(8)?;
        std::thread::sleep(Duration::from_secs(2));
        step(&name, "surprise removal under the peer's ping");
        ctl.remove(true).map_err(fail)?;
        s.p2g_surprise_ms = Some(peer_outage(ping)?);
        failover_master(&mut agent, 1).map_err(fail)?;

        // 5. A plug from a kept-open function: the standby's driver unbound (the
        // primary is hidden and its function kept), then bound again.
        step(&name, "standby driver unbound and bound again");
        ctl.add().map_err(fail)?;
        failover_master(&mut agent, 2).map_err(fail)?;
        // The standby is the guest's only virtio-net (the agent is on the serial line).
        agent.run_ok(
            "for v in /sys/bus/virtio/drivers/virtio_net/virtio*; do echo ${v##*/} > /sys/bus/virtio/drivers/virtio_net/unbind; done",
        )?;
        wait_guest(
            &mut agent,
            "! ls /sys/bus/pci/drivers/e1000e/ | grep -q 0000:",
            15,
        )
        .map_err(fail)?;
        // Tandem parks the function at the end of the removal's turn.
        std::thread::sleep(Duration::from_secs(1));
        let out = agent.run(
            "read t0 _ < /proc/uptime; for v in /sys/bus/virtio/devices/*; do [ -e $v/driver ] || echo ${v##*/} > /sys/bus/virtio/drivers/virtio_net/bind; done; \
             n=0; until [ $(ls -d /sys/class/net/*/lower_* 2>/dev/null | wc -l) -ge 2 ]; do n=$((n+1)); [ $n -gt 3000 ] && exit 1; sleep 0.01; done; \
             read t1 _ < /proc/uptime; awk -v a=$t0 -v b=$t1 'BEGIN { printf \"%d\", (b - a) * 1000 }'",
            Duration::from_secs(60),
        )?;
        if out.status != 0 {
            return Err(fail(err!(
                "the primary was not enslaved within 30 s of the standby's rebind"
            )));
        }
        s.rebind_enslaved_ms = out.stdout.trim().parse().ok();
    }
    drop(agent);
    drop(proc);
    // Where Tandem's share of the first orderly removal went, from its own log.
    if kind == "tandem" {
        let log = dirs.logs.join(format!("{name}.tandem.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let (cold, kept) = plug_times(&text);
        s.plug_cold_ms = bench::stats(&cold).map(|st| st.0);
        s.plug_kept_ms = bench::stats(&kept).map(|st| st.0);
        let mut on = false;
        for l in text.lines() {
            on |= l.contains("eject requested");
            if on
                && (l.contains("eject")
                    || l.contains("off the bus")
                    || l.contains("removed from slot"))
            {
                step(&name, l.trim());
            }
            if on && l.contains("removed from slot") {
                break;
            }
        }
    }
    Ok(())
}

/// Tandem's plugs in its log ("passed through in slot S in N ms", "(its function was
/// open already)" for a kept one): the times of plugs from a closed function and
/// from a kept one.
fn plug_times(log: &str) -> (Vec<f64>, Vec<f64>) {
    let (mut cold, mut kept) = (Vec::new(), Vec::new());
    for l in log.lines() {
        let Some(rest) = l.split(" passed through in slot ").nth(1) else {
            continue;
        };
        let Some(ms) = rest
            .split(" in ")
            .nth(1)
            .and_then(|t| t.split(" ms").next()?.parse::<f64>().ok())
        else {
            continue;
        };
        if l.contains("(its function was open already)") {
            kept.push(ms);
        } else {
            cold.push(ms);
        }
    }
    (cold, kept)
}

fn measure(runs: usize, vmms: &[String], mode: Mode, why: &str) -> harness::Result<Report> {
    let tandem = BENCH.tandem_bin()?;
    let guest = harness::image::test_guest()?;
    let dirs = BENCH.dirs()?;
    let nic = harness::vfio_nics_from_env()?
        .into_iter()
        .next()
        .ok_or_else(|| {
            err!("no passthrough NIC (TANDEM_VFIO_NICS); run it where the test host provides one")
        })?;
    let bridge = std::env::var("TANDEM_BRIDGE").unwrap_or_else(|_| "br0".into());
    let mut env = bench::env_header(mode, why);
    env.push((
        "guest".into(),
        format!("Debian kernel {}, 1 vCPU, 512M; failover master over virtio-net standby + passthrough e1000e {}", bench::kernel_version(&guest), nic.bdf),
    ));
    env.push(("tandem".into(), bench::describe_tandem(&tandem)));
    env.push((
        "qemu".into(),
        format!(
            "{}; q35, virtio-net failover=on + vfio-pci failover_pair_id= on PCIe root ports (ACPI hotplug)",
            bench::cmd_line(&harness::qemu::reference_qemu(), &["--version"])
        ),
    ));
    let mut samples = Vec::new();
    for run in 1..=runs {
        for vmm in vmms.iter().map(String::as_str) {
            let mut s = Sample {
                vmm: vmm.into(),
                run,
                ..Sample::default()
            };
            if let Err(e) = run_once(vmm, run, &tandem, &guest, &dirs, &nic, &bridge, &mut s) {
                s.error = Some(e.to_string());
            }
            eprintln!("bench-hotplug: {vmm} run {run}: {s:?}");
            samples.push(s);
        }
    }
    dirs.finish(samples.iter().all(|s| s.error.is_none()));
    Ok(Report { env, samples })
}

fn print_report(r: &Report) {
    bench::print_env(&r.env, 16);
    println!();
    let ok = |vmm: &str| {
        r.samples
            .iter()
            .filter(|s| s.vmm == vmm && s.error.is_none())
            .count()
    };
    let n = |vmm: &str| r.samples.iter().filter(|s| s.vmm == vmm).count();
    println!(
        "Runs ok: Tandem {}/{}, Tandem announce=off {}/{}, QEMU {}/{}",
        ok("tandem"),
        n("tandem"),
        ok("tandem-noannounce"),
        n("tandem-noannounce"),
        ok("qemu"),
        n("qemu")
    );
    type Get = fn(&Sample) -> Option<f64>;
    let metrics: [(&str, Get, &str); 13] = [
        ("orderly removal: API -> released", |s| s.release_s, "s"),
        (
            "  of it: the guest reads the request",
            |s| s.release_notify_ms,
            "ms",
        ),
        (
            "  of it: the guest's release, to _EJ0",
            |s| s.release_guest_ms,
            "ms",
        ),
        ("  of it: Tandem, after _EJ0", |s| s.release_vmm_ms, "ms"),
        (
            "orderly removal: peer->guest outage",
            |s| s.p2g_orderly_ms,
            "ms",
        ),
        (
            "orderly: one-way stream on the tap after",
            |s| s.oneway_orderly_ms,
            "ms",
        ),
        ("plug: API -> primary carries traffic", |s| s.plug_s, "s"),
        (
            "orderly removal: guest->peer outage",
            |s| s.g2p_orderly_ms,
            "ms",
        ),
        (
            "surprise removal: peer->guest outage",
            |s| s.p2g_surprise_ms,
            "ms",
        ),
        (
            "surprise removal: guest->peer outage",
            |s| s.g2p_surprise_ms,
            "ms",
        ),
        (
            "standby rebind -> primary enslaved",
            |s| s.rebind_enslaved_ms,
            "ms",
        ),
        (
            "  Tandem's plug, function kept open",
            |s| s.plug_kept_ms,
            "ms",
        ),
        ("  Tandem's plug, function closed", |s| s.plug_cold_ms, "ms"),
    ];
    println!();
    println!(
        "{:<40} {:<22} {:<22} {:<22} Tandem/QEMU",
        "metric (median (min-max))", "Tandem", "Tandem announce=off", "QEMU"
    );
    for (name, get, unit) in metrics {
        let col = |vmm: &str| {
            let v: Vec<f64> = r
                .samples
                .iter()
                .filter(|s| s.vmm == vmm && s.error.is_none())
                .filter_map(get)
                .collect();
            bench::stats(&v)
        };
        let prec = if unit == "s" {
            2
        } else if name.starts_with("  of it") {
            1
        } else {
            0
        };
        let fmt = |x: Option<(f64, f64, f64)>| {
            x.map_or("-".into(), |st| bench::fmt_range(st, prec, unit))
        };
        let (t, tn, q) = (col("tandem"), col("tandem-noannounce"), col("qemu"));
        let ratio = bench::ratio(t.map(|s| s.0), q.map(|s| s.0));
        println!(
            "{name:<40} {:<22} {:<22} {:<22} {ratio}",
            fmt(t),
            fmt(tn),
            fmt(q)
        );
    }
    bench::print_failures(
        "runs",
        r.samples
            .iter()
            .filter_map(|s| Some((s.vmm.as_str(), s.run, s.error.as_deref()?))),
    );
}

impl BenchReport for Report {
    fn env_mut(&mut self) -> &mut Vec<(String, String)> {
        &mut self.env
    }

    fn print(&self) {
        print_report(self)
    }

    fn failed(&self) -> bool {
        self.samples.iter().any(|s| s.error.is_some())
    }
}

fn main() {
    let (runs, vmms) = parse_args();
    // Three guests per run, about 5 minutes in a nested test host: more than the default
    // 15-minute limit on one test-host job for 3 runs.
    if std::env::var_os("TANDEM_TESTHOST_JOB_TIMEOUT").is_none() {
        std::env::set_var(
            "TANDEM_TESTHOST_JOB_TIMEOUT",
            (runs * 480 + 300).to_string(),
        );
    }
    let mut relaunch = vec!["--runs".to_string(), runs.to_string()];
    for v in &vmms {
        relaunch.extend(["--vmm".to_string(), v.clone()]);
    }
    BENCH.main(&relaunch, |mode, why| measure(runs, &vmms, mode, why));
}
