//! Live-migration benchmark: Tandem against the reference QEMU, same guest, same host.
//!
//! `cargo run --release -p tests --example bench-migrate [-- --runs N] [--sizes 512,2048] [--pair]`
//!
//! For each guest size (MiB) and load (idle, or two loops rewriting 64 MiB with
//! `dd if=/dev/urandom` the whole time) and each VMM, N runs: boot the test guest (2
//! vCPUs) with a virtio-net NIC on tap `tbm0`, give it an address, start a destination
//! on this host with its own tap `tbm1` (Tandem `--incoming tcp:...`, QEMU `-incoming
//! tcp:...`), and migrate over TCP on the loopback (Tandem `send-migration`, QEMU QMP
//! `migrate`, both with their default 300 ms downtime target). Measured:
//!
//! - total time and the downtime as the VMM reports it, bytes sent;
//! - the pause the guest sees: a guest loop stamps /proc/uptime (10 ms resolution,
//!   the guest's own clock) about every millisecond; the largest step between two
//!   stamps across the migration. If a VMM leaves the guest's clock stopped while
//!   it is paused, the guest sees no pause here; the peer's figure below still does;
//! - the pause the network sees: the peer pings the guest every 10 ms; the longest run
//!   of unanswered pings (ms).
//!
//! With `--pair` the guest instead has a failover pair, on the source and on the
//! destination alike: a virtio-net standby (`standby=on`, QEMU `failover=on`) and a
//! passthrough e1000e of the test host as its primary (the source gets the first, the
//! destination the second). Each VMM takes the primary off the bus before it copies
//! memory and the destination plugs its own after the guest resumes. Measured besides:
//! the call → the primary off the bus (Tandem: its `released by the guest` line; QEMU:
//! the end of its `wait-unplug` status, polled every 20 ms), and the call → the guest's
//! frames leaving through the destination's primary (the test host's uplink, which only
//! primaries reach, grows by 3 frames within 100 ms while the peer pings the guest).
//!
//! Medians with min–max over the runs. When /dev/kvm cannot boot Linux, everything runs
//! inside ONE test host (L1: QEMU TCG, 1 vCPU, 4 GiB): figures are slow in absolute terms
//! and swing between runs; compare the two VMMs, not the numbers with bare metal.

use std::process::{Command, Stdio};
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
const MAC: &str = "52:54:00:bb:00:01";
const PORT: u16 = 7711;

const BENCH: Bench = Bench {
    name: "bench-migrate",
    result_tag: RESULT_TAG,
    build_hint: "cargo build --release -p vmm --bins",
    testhost_note: "all runs use one test host; source and destination both run in it",
    failed_note: "some runs failed",
};

const VMMS: [&str; 2] = ["tandem", "qemu"];
const LOADS: [&str; 2] = ["idle", "dirty"];
/// The load of `--pair`: an idle guest with a failover pair.
const PAIR: &str = "failover pair";
/// The primary's slot, on both sides.
const SLOT: u32 = 6;
/// How long after the migration the guest's frames through the destination's primary are
/// waited for; a run without them counts as "never" in the report.
const BACK_WITHIN: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sample {
    vmm: String,
    mem_mib: u32,
    load: String,
    run: usize,
    error: Option<String>,
    total_ms: Option<f64>,
    reported_downtime_ms: Option<f64>,
    guest_pause_ms: Option<f64>,
    /// The same loop for 3 s with no migration: its largest step is the guest's own
    /// scheduling jitter, the floor under `guest_pause_ms`.
    guest_jitter_ms: Option<f64>,
    ping_gap_ms: Option<f64>,
    mib_sent: Option<f64>,
    /// `--pair`: the call → the source's primary off the bus.
    primary_off_ms: Option<f64>,
    /// `--pair`: the call → the guest's frames through the destination's primary; None
    /// in a run without error: none within [`BACK_WITHIN`].
    primary_back_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Report {
    env: Vec<(String, String)>,
    samples: Vec<Sample>,
}

struct Args {
    runs: usize,
    sizes: Vec<u32>,
    pair: bool,
    vmms: Vec<String>,
    kernel: harness::GuestKernel,
}

fn parse_args() -> Args {
    let mut a = Args {
        runs: 3,
        sizes: vec![512, 2048],
        pair: false,
        vmms: Vec::new(),
        kernel: harness::GuestKernel::Stable,
    };
    let usage = "usage: bench-migrate [--runs N] [--sizes MiB,MiB...] [--pair] [--vmm tandem|qemu]... [--kernel stable|backports]";
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let val = |it: &mut dyn Iterator<Item = String>| {
            it.next().unwrap_or_else(|| {
                eprintln!("bench-migrate: {arg} needs a value ({usage})");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--runs" => {
                a.runs = val(&mut it)
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("bench-migrate: --runs needs a positive number");
                        std::process::exit(2)
                    })
            }
            "--sizes" => {
                let v = val(&mut it);
                a.sizes = v
                    .split(',')
                    .map(|s| s.trim().parse::<u32>().ok().filter(|m| *m >= 128))
                    .collect::<Option<Vec<_>>>()
                    .unwrap_or_else(|| {
                        eprintln!("bench-migrate: --sizes {v}: MiB values of at least 128");
                        std::process::exit(2)
                    });
            }
            "--pair" => a.pair = true,
            "--kernel" => {
                a.kernel = match val(&mut it).as_str() {
                    "stable" => harness::GuestKernel::Stable,
                    "backports" => harness::GuestKernel::Backports,
                    v => {
                        eprintln!("bench-migrate: --kernel needs stable or backports (got {v:?})");
                        std::process::exit(2)
                    }
                }
            }
            "--vmm" => {
                let v = val(&mut it);
                if !VMMS.contains(&v.as_str()) {
                    eprintln!(
                        "bench-migrate: --vmm needs one of {} (got {v:?})",
                        VMMS.join(", ")
                    );
                    std::process::exit(2)
                }
                a.vmms.push(v)
            }
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0)
            }
            other => {
                eprintln!("bench-migrate: unknown argument {other:?} ({usage})");
                std::process::exit(2)
            }
        }
    }
    if a.vmms.is_empty() {
        a.vmms = VMMS.iter().map(|v| v.to_string()).collect();
    }
    a
}

/// A tap on the test bridge for the benchmark, deleted on drop.
fn tap(name: &str) -> harness::Result<harness::Tap> {
    harness::tap_on(
        name,
        &std::env::var("TANDEM_BRIDGE").unwrap_or_else(|_| "br0".into()),
        false,
    )
}

/// The longest run of unanswered pings in `ping -D -i 0.01` output, in ms, and when
/// the last reply before it came (wall clock, s since the epoch). `end`: when ping was
/// stopped; a gap that lasted until then counts up to it.
fn ping_gap(log: &str, end: f64) -> Option<(f64, f64)> {
    // By the stamps of the replies, not by icmp_seq: in the test host ping does not keep
    // its 10 ms.
    let replies: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let last = *replies.last()?;
    replies
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .chain(std::iter::once((end - last, last)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(gap, at)| (gap * 1000.0, at))
}

/// Seconds since the epoch, for `ping -D`'s stamps.
fn wall() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Waits (at most [`BACK_WITHIN`]) until the guest's frames leave through a primary again
/// (the peer's ping keeps it answering): the uplink grows by 3 frames within 100 ms,
/// sampled every 5 ms. The time since `t` in ms; None if they never did.
fn primary_back(up: &str, t: Instant) -> Option<f64> {
    let mut seen: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let deadline = Instant::now() + BACK_WITHIN;
    loop {
        let now = Instant::now();
        let c = host_counter(up);
        while seen
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > Duration::from_millis(100))
        {
            seen.pop_front();
        }
        if seen
            .front()
            .is_some_and(|(_, c0)| c.saturating_sub(*c0) >= 3)
        {
            return Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        if now > deadline {
            return None;
        }
        seen.push_back((now, c));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The guest's stamp loop: /proc/uptime about every millisecond into /tmp/up.
const STAMP_START: &str = "rm -f /tmp/up /tmp/stopup; (while [ ! -e /tmp/stopup ]; do read u i < /proc/uptime; echo $u; usleep 1000; done > /tmp/up &); sleep 0.5";
/// Stops it and prints the largest step, the stamp it began at and the first stamp,
/// in seconds of the guest's uptime.
const STAMP_END: &str = "touch /tmp/stopup; sleep 0.2; awk 'NR==1{f=$1} NR>1{d=$1-p; if(d>m){m=d; at=p}} {p=$1} END{printf \"%.3f %.3f %.3f\\n\", m, at, f}' /tmp/up";

/// STAMP_END's answer: (largest step, where it began from the first stamp), seconds.
fn stamp_steps(out: &str) -> Option<(f64, f64)> {
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    match v[..] {
        [step, at, first] => Some((step, at - first)),
        _ => None,
    }
}

fn one(
    vmm: &str,
    mem: u32,
    load: &str,
    run: usize,
    tandem: &std::path::Path,
    guest: &GuestImage,
    dirs: &Dirs,
) -> Sample {
    let mut s = Sample {
        vmm: vmm.into(),
        mem_mib: mem,
        load: load.into(),
        run,
        ..Default::default()
    };
    if let Err(e) = measure_one(vmm, mem, load, run, tandem, guest, dirs, &mut s) {
        s.error = Some(e.to_string());
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn measure_one(
    vmm: &str,
    mem: u32,
    load: &str,
    run: usize,
    tandem: &std::path::Path,
    guest: &GuestImage,
    dirs: &Dirs,
    s: &mut Sample,
) -> harness::Result<()> {
    let _t0 = tap("tbm0")?;
    let _t1 = tap("tbm1")?;
    let name = format!("{vmm}-{mem}-{}-{run}", load.replace(' ', "-"));
    let url = format!("tcp:127.0.0.1:{PORT}");
    // With a pair: the source's primary and the destination's.
    let pair: Option<[VfioNic; 2]> = if load == PAIR {
        match harness::vfio_nics_from_env()?.as_slice() {
            [a, b, ..] => Some([a.clone(), b.clone()]),
            _ => return Err(err!("--pair needs two passthrough NICs (TANDEM_VFIO_NICS); run it where the test host provides them")),
        }
    } else {
        None
    };
    let mac = if pair.is_some() { FAILOVER_MAC } else { MAC };
    // `--net` and `--device` for Tandem, with the destination's tap and NIC.
    let tandem_nics = |tap: &str, side: usize, dest: bool| -> Vec<String> {
        let net = if dest {
            format!("id=net0,tap={tap}")
        } else if pair.is_some() {
            format!("id=net0,tap={tap},mac={mac},standby=on,slot=3")
        } else {
            format!("id=net0,tap={tap},mac={mac}")
        };
        let mut v = vec!["--net".to_string(), net];
        if let Some(p) = &pair {
            v.push("--device".into());
            v.push(format!(
                "id=vf0,path=/sys/bus/pci/devices/{},failover=net0,slot={SLOT}",
                p[side].bdf
            ));
        }
        v
    };
    let qemu_net = |tap: &str, side: usize| -> Vec<String> {
        let mut v = vec![
            "-netdev".to_string(),
            format!("tap,id=nd0,ifname={tap},script=no,downscript=no,vhost=off"),
        ];
        match &pair {
            None => v.extend([
                "-device".into(),
                format!("virtio-net-pci,id=net0,netdev=nd0,mac={mac},romfile="),
            ]),
            Some(p) => v.extend([
                "-device".into(),
                "pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0".into(),
                "-device".into(),
                "pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0".into(),
                "-device".into(),
                format!("virtio-net-pci,id=net0,netdev=nd0,mac={mac},bus=rp1,romfile=,failover=on"),
                "-device".into(),
                format!(
                    "vfio-pci,id=hostdev0,host={},bus=rp2,rombar=0,failover_pair_id=net0",
                    p[side].bdf
                ),
            ]),
        }
        v
    };
    let tandem_args = tandem_nics("tbm0", 0, false);
    let qemu_args = qemu_net("tbm0", 0);
    let spec = VmSpec {
        cpus: 2,
        mem_mib: mem,
        tandem_args: &tandem_args,
        qemu_args: &qemu_args,
    };
    let src = bench::spawn_vmm(vmm, &format!("{name}-src"), tandem, guest, dirs, &spec)?;
    let mut agent = src.connect()?;
    agent
        .wait_ready(Duration::from_secs(180))
        .map_err(|e| src.fail(e))?;
    let bridge = std::env::var("TANDEM_BRIDGE").unwrap_or_else(|_| "br0".into());
    let up = bridge_uplink(&bridge, &["tbm0", "tbm1"])?;
    if pair.is_some() {
        // The failover master carries the address; its primary the traffic.
        let m = failover_master(&mut agent, 2).map_err(|e| src.fail(e))?;
        agent.run_ok(&format!(
            "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done; \
             for l in /sys/class/net/{m}/lower_*; do ip link set ${{l##*lower_}} up; done; \
             ip link set {m} up; ip addr add {GUEST_IP}/24 dev {m}"
        ))?;
        wait_guest(
            &mut agent,
            &format!("ping -c 1 -W 1 {PEER_IP} >/dev/null"),
            60,
        )
        .map_err(|e| src.fail(e))?;
        wait_primary_carries(&mut agent, &up, "tbm0").map_err(|e| src.fail(e))?;
    } else {
        let dev = agent
            .run_ok(&format!("for n in /sys/class/net/*; do [ \"$(cat $n/address)\" = {mac} ] && echo ${{n##*/}}; done; true"))?
            .trim()
            .to_string();
        harness::guestnet::up_and_ping(&mut agent, &dev, GUEST_IP)?;
    }
    if load == "dirty" {
        agent.run_ok(
            "mkdir -p /dev/shm; rm -f /tmp/stop; for f in a b; do \
             (while [ ! -e /tmp/stop ]; do dd if=/dev/urandom of=/dev/shm/$f bs=1M count=32 2>/dev/null; done &); done; sleep 1",
        )?;
    }
    // The destination.
    let dest_serial = dirs.run.join(format!("{name}-dst.serial"));
    let dest_api = dirs.run.join(format!("{name}-dst.api"));
    let dest_log = dirs.logs.join(format!("{name}-dst.log"));
    let _dest: Box<dyn std::any::Any> = if vmm == "tandem" {
        let child = Command::new(tandem)
            .args(["run", "--incoming", &url])
            .args(tandem_nics("tbm1", 1, true))
            .arg("--serial")
            .arg(format!("socket={}", dest_serial.display()))
            .arg("--api-socket")
            .arg(&dest_api)
            .env("TANDEM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&dest_log).map_err(|e| err!("{e}"))?)
            .spawn()
            .map_err(|e| err!("{e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&dest_log)
            .unwrap_or_default()
            .contains("waiting for a migration")
        {
            if Instant::now() > deadline {
                return Err(err!(
                    "the destination tandem does not listen: {}",
                    bench::tail(&dest_log, 3)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Box::new(KillOnDrop(child))
    } else {
        let mut b = harness::qemu::QemuVm::builder(guest, &dirs.run, &format!("{name}-dst"))
            .cpus(2)
            .mem_mib(mem);
        for a in qemu_net("tbm1", 1) {
            b = b.arg(&a);
        }
        let q = b.arg("-incoming").arg(&url).spawn()?;
        std::thread::sleep(Duration::from_secs(1));
        Box::new(q)
    };
    let dest_serial = if vmm == "tandem" {
        dest_serial
    } else {
        dirs.run.join(format!("{name}-dst.serial"))
    };
    // The stamp loop's own jitter, with no migration.
    agent.run_ok(STAMP_START)?;
    std::thread::sleep(Duration::from_secs(3));
    s.guest_jitter_ms = stamp_steps(&agent.run_ok(STAMP_END)?).map(|(v, _)| v * 1000.0);
    // Measure. The first stamp is taken about when the command reaches the guest.
    let stamps_from = wall();
    agent.run_ok(STAMP_START)?;
    let ping_log = dirs.logs.join(format!("{name}-ping.log"));
    let mut ping = Command::new("ping")
        .args(["-D", "-i", "0.01", "-W", "1", GUEST_IP])
        .stdout(std::fs::File::create(&ping_log).map_err(|e| err!("{e}"))?)
        .spawn()
        .map_err(|e| err!("ping: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let t_wall = wall();
    if vmm == "tandem" {
        let src_api = dirs.run.join(format!("{name}-src.api"));
        let mut child = Command::new(tandem)
            .args(["remote", "--api-socket"])
            .arg(&src_api)
            .args(["send-migration", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err!("{e}"))?;
        // Its progress lines as they come, for the moment the primary left.
        let mut text = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains(": released by the guest") {
                    s.primary_off_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                }
                text.push_str(&line);
                text.push('\n');
            }
        }
        let out = child.wait_with_output().map_err(|e| err!("{e}"))?;
        if !out.status.success() {
            return Err(err!(
                "send-migration: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // "migration completed in X ms: downtime Y ms, R rounds, B MiB sent"
        let line = text
            .lines()
            .find(|l| l.contains("completed in"))
            .unwrap_or("");
        let num = |after: &str| -> Option<f64> {
            line.split(after)
                .nth(1)?
                .split_whitespace()
                .next()?
                .trim_end_matches(',')
                .parse()
                .ok()
        };
        s.total_ms = num("completed in ");
        s.reported_downtime_ms = num("downtime ");
        s.mib_sent = line
            .split(" rounds, ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok());
    } else {
        let bench::Vmm::Qemu(q) = &src.vmm else {
            return Err(err!("no QMP socket"));
        };
        let mut qmp = Qmp::connect(&q.qmp, Duration::from_secs(10))?;
        qmp.execute("migrate", serde_json::json!({ "uri": url }))?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut unplugging = false;
        loop {
            let st = qmp.execute("query-migrate", serde_json::json!({}))?;
            let status = st["status"].as_str().unwrap_or("");
            // QEMU waits in `wait-unplug` until the guest released its primaries.
            if status == "wait-unplug" {
                unplugging = true;
            } else if unplugging && s.primary_off_ms.is_none() {
                s.primary_off_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
            }
            match status {
                "completed" => {
                    s.total_ms = st["total-time"].as_f64();
                    s.reported_downtime_ms = st["downtime"].as_f64();
                    s.mib_sent = st["ram"]["transferred"].as_f64().map(|b| b / 1048576.0);
                    break;
                }
                "failed" | "cancelled" => return Err(err!("QEMU migration: {st}")),
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(err!("QEMU migration did not end in 600 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("{name}: migrated in {:.2} s", t.elapsed().as_secs_f64());
    if pair.is_some() {
        s.primary_back_ms = primary_back(&up, t);
        eprintln!(
            "{name}: the destination's primary carries traffic {} s after the call",
            s.primary_back_ms
                .map_or(format!("not within {}", BACK_WITHIN.as_secs()), |v| {
                    format!("{:.2}", v / 1000.0)
                })
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = ping.kill();
    let _ = ping.wait();
    let end = wall();
    if let Some((gap, at)) = ping_gap(&std::fs::read_to_string(&ping_log).unwrap_or_default(), end)
    {
        s.ping_gap_ms = Some(gap);
        eprintln!(
            "{name}: the longest ping gap, {gap:.0} ms, began {:.0} ms after the call",
            (at - t_wall) * 1000.0
        );
    }
    drop(agent);
    let mut agent = Agent::connect_unix(
        &dest_serial,
        dirs.logs.join(format!("{name}-dst.console.log")),
    )?;
    agent.assume_ready();
    let stamps = stamp_steps(&agent.run_ok(STAMP_END)?);
    s.guest_pause_ms = stamps.map(|(v, _)| v * 1000.0);
    if let Some((step, at)) = stamps {
        // On the guest's clock: where a VMM does not advance it by the downtime,
        // what follows the pause shows that much earlier.
        eprintln!(
            "{name}: the guest's longest step, {:.0} ms, began about {:.0} ms after the call",
            step * 1000.0,
            (stamps_from + at - t_wall) * 1000.0
        );
    }
    agent.run_ok("touch /tmp/stop; true")?;
    drop(src);
    Ok(())
}

/// (label, the figure of a sample, decimals, unit).
type Metric = (
    &'static str,
    fn(&Sample) -> Option<f64>,
    usize,
    &'static str,
);

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl BenchReport for Report {
    fn env_mut(&mut self) -> &mut Vec<(String, String)> {
        &mut self.env
    }

    fn print(&self) {
        println!("bench-migrate: live migration, Tandem against the reference QEMU");
        bench::print_env(&self.env, 18);
        let metrics: [Metric; 8] = [
            ("total time", |s| s.total_ms, 0, " ms"),
            (
                "downtime (VMM's own figure)",
                |s| s.reported_downtime_ms,
                0,
                " ms",
            ),
            (
                "pause the guest sees (its clock)",
                |s| s.guest_pause_ms,
                0,
                " ms",
            ),
            (
                "  same loop, no migration (jitter)",
                |s| s.guest_jitter_ms,
                0,
                " ms",
            ),
            (
                "pause the network sees (ping gap)",
                |s| s.ping_gap_ms,
                0,
                " ms",
            ),
            ("sent", |s| s.mib_sent, 0, " MiB"),
            (
                "primary off the bus (from the call)",
                |s| s.primary_off_ms,
                0,
                " ms",
            ),
            (
                "primary carries again (from the call)",
                |s| s.primary_back_ms,
                0,
                " ms",
            ),
        ];
        let mut cases: Vec<(u32, String)> = self
            .samples
            .iter()
            .map(|s| (s.mem_mib, s.load.clone()))
            .collect();
        cases.dedup();
        for (mem, load) in cases {
            println!("\n{mem} MiB guest, {load}:");
            println!(
                "  {:<36} {:>24} {:>24} {:>8}",
                "", "tandem", "qemu", "ratio"
            );
            for (label, get, prec, unit) in metrics {
                if label.starts_with("primary") && load != PAIR {
                    continue;
                }
                let col = |vmm: &str| -> Option<(f64, f64, f64)> {
                    let v: Vec<f64> = self
                        .samples
                        .iter()
                        .filter(|s| s.vmm == vmm && s.mem_mib == mem && s.load == load)
                        .filter_map(get)
                        .collect();
                    bench::stats(&v)
                };
                let (t, q) = (col("tandem"), col("qemu"));
                let show = |v: Option<(f64, f64, f64)>| {
                    v.map_or("-".into(), |v| bench::fmt_range(v, prec, unit))
                };
                println!(
                    "  {label:<36} {:>24} {:>24} {:>8}",
                    show(t),
                    show(q),
                    bench::ratio(t.map(|v| v.0), q.map(|v| v.0))
                );
            }
        }
        for vmm in VMMS {
            let never = self
                .samples
                .iter()
                .filter(|s| {
                    s.vmm == vmm
                        && s.load == PAIR
                        && s.error.is_none()
                        && s.primary_back_ms.is_none()
                })
                .count();
            if never > 0 {
                println!(
                    "{vmm}: in {never} run(s) the guest's frames never went through the destination's primary within {} s (no figure in that run's row; its ping gap counts up to the end of the wait)",
                    BACK_WITHIN.as_secs()
                );
            }
        }
        for s in self.samples.iter().filter(|s| s.error.is_some()) {
            println!(
                "failed: {} {} MiB {} run {}: {}",
                s.vmm,
                s.mem_mib,
                s.load,
                s.run,
                s.error.as_deref().unwrap_or("")
            );
        }
        println!("\nmedian min–max over the runs; ratio = tandem / qemu (medians). Guest 2 vCPUs, virtio-net on a tap, TCP on the loopback.");
        if self.samples.iter().any(|s| s.load == PAIR) {
            println!("failover pair: virtio-net standby + passthrough e1000e (source and destination each their own), primary in slot {SLOT}; VMM's downtime excludes the primary's absence, the ping gap includes it.");
        }
    }

    fn failed(&self) -> bool {
        self.samples.iter().any(|s| s.error.is_some())
    }
}

fn measure(args: &Args, mode: Mode, why: &str) -> harness::Result<Report> {
    let tandem = BENCH.tandem_bin()?;
    let guest = harness::image::test_guest_with(args.kernel)?;
    let dirs = BENCH.dirs()?;
    let mut env = bench::env_header(mode, why);
    env.push(("tandem".into(), bench::describe_tandem(&tandem)));
    env.push((
        "reference".into(),
        bench::cmd_line(&harness::qemu::reference_qemu(), &["--version"]),
    ));
    env.push((
        "guest".into(),
        format!("Debian kernel {}", bench::kernel_version(&guest)),
    ));
    let mut samples = Vec::new();
    for &mem in &args.sizes {
        let loads: &[&str] = if args.pair { &[PAIR] } else { &LOADS };
        for &load in loads {
            for run in 0..args.runs {
                for vmm in args.vmms.iter().map(String::as_str) {
                    let s = one(vmm, mem, load, run, &tandem, &guest, &dirs);
                    eprintln!("bench-migrate: {s:?}");
                    samples.push(s);
                }
            }
        }
    }
    dirs.finish(samples.iter().all(|s| s.error.is_none()));
    Ok(Report { env, samples })
}

fn main() {
    let args = parse_args();
    if std::env::var_os("TANDEM_TESTHOST_JOB_TIMEOUT").is_none() {
        let loads = if args.pair { 1 } else { LOADS.len() };
        let cases = args.sizes.len() * loads * args.vmms.len() * args.runs;
        std::env::set_var(
            "TANDEM_TESTHOST_JOB_TIMEOUT",
            (cases * 240 + 300).to_string(),
        );
    }
    let sizes: Vec<String> = args.sizes.iter().map(u32::to_string).collect();
    let mut relaunch = vec![
        "--runs".to_string(),
        args.runs.to_string(),
        "--sizes".into(),
        sizes.join(","),
    ];
    if args.pair {
        relaunch.push("--pair".into());
    }
    for v in &args.vmms {
        relaunch.extend(["--vmm".to_string(), v.clone()]);
    }
    if args.kernel == harness::GuestKernel::Backports {
        relaunch.extend(["--kernel".to_string(), "backports".into()]);
    }
    BENCH.main(&relaunch, |mode, why| measure(&args, mode, why));
}
