//! virtio-net benchmark: Tandem against QEMU's userspace virtio-net on the same test guest.
//!
//! `cargo run --release -p tests --example bench-net [-- --time SECS] [--no-mq]`
//!
//! Builds `target/release/tandem`, then boots the test guest (2 vCPUs, 512M, same kernel,
//! initramfs and command line) with a virtio-net NIC on a tap on the test bridge, whose
//! address is the peer 10.0.0.1:
//!
//! - single queue: Tandem `--net id=net0,tap=T,mac=M` and QEMU `-netdev
//!   tap,ifname=T,script=no,downscript=no,vhost=off -device virtio-net-pci` (QEMU's
//!   userspace virtio-net, no vhost), each on a plain tap;
//! - multi-queue (unless `--no-mq`): Tandem `num_queues=4` and QEMU `queues=2,mq=on`, two
//!   queue pairs each, on a `multi_queue` tap.
//!
//! In each guest the NIC gets 10.0.0.2/24; then iperf3 TCP guest->host and host->guest
//! (`-R`), 1 and 4 streams (`-P 4`), each `-t SECS` (default 5) against a one-off `iperf3 -s
//! -1` on the peer, and `ping -c 20 -i 0.05` (average rtt). Around every iperf3 run the
//! VMM's CPU time (utime+stime of the whole process from /proc/PID/stat, which includes
//! the vCPU threads' guest time; guest_time is shown separately) is sampled, and divided
//! by the bytes the receiver got. When /dev/kvm cannot boot Linux, everything runs inside
//! ONE test host: this program re-executes itself in L1 and prints the table here.
//!
//! A failed boot or measurement is listed with its error and makes the exit status 1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::bench::{self, sh, tail, Bench, BenchReport, Dirs, VmSpec, Vmm};
use harness::{err, Agent, GuestImage, Mode, Tap};
use serde::{Deserialize, Serialize};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const RESULT_TAG: &str = "@@BENCH-NET-RESULT@@ ";
const MAC: &str = "52:54:00:bb:00:01";
const GUEST_IP: &str = "10.0.0.2";
const IPERF_PORT: u16 = 5201;
const CPUS: u32 = 2;
const MEM_MIB: u32 = 512;

const BENCH: Bench = Bench {
    name: "bench-net",
    result_tag: RESULT_TAG,
    build_hint: "cargo build --release --workspace --bins",
    testhost_note: "everything runs inside one test host",
    failed_note: "some measurements failed",
};

/// One measured value (or why there is none).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Row {
    /// `single-queue` or `multi-queue`.
    config: String,
    /// `tandem` or `qemu`.
    vmm: String,
    metric: String,
    unit: String,
    /// One value per successful repetition.
    values: Vec<f64>,
    /// Extra figures per repetition (bytes, retransmits, CPU outside guest mode).
    notes: Vec<String>,
    /// Failed or skipped runs, with why.
    errors: Vec<String>,
    /// Runs planned (1 for ping, --reps for the others).
    runs: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Report {
    env: Vec<(String, String)>,
    rows: Vec<Row>,
}

struct Args {
    secs: u32,
    reps: u32,
    mq: bool,
}

fn usage() -> &'static str {
    "usage: cargo run --release -p tests --example bench-net [-- --time SECS] [--reps N] [--no-mq]"
}

fn parse_args() -> Args {
    let mut a = Args {
        secs: 5,
        reps: 3,
        mq: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--time" => {
                a.secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s| (1..=60).contains(&s))
                    .unwrap_or_else(|| {
                        eprintln!("bench-net: --time needs 1 to 60 seconds");
                        std::process::exit(2)
                    })
            }
            "--reps" => {
                a.reps = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| (1..=20).contains(&n))
                    .unwrap_or_else(|| {
                        eprintln!("bench-net: --reps needs 1 to 20");
                        std::process::exit(2)
                    })
            }
            "--no-mq" => a.mq = false,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0)
            }
            other => {
                eprintln!("bench-net: unknown argument {other:?} ({})", usage());
                std::process::exit(2)
            }
        }
    }
    a
}

/// CPU time of process `pid` in seconds: (utime+stime, guest_time), all threads.
fn cpu_secs(pid: u32) -> harness::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| err!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may contain spaces): state is field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| err!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> harness::Result<f64> {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| err!("no field {n} in /proc/{pid}/stat"))
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let hz = if hz > 0.0 { hz } else { 100.0 };
    Ok(((field(14)? + field(15)?) / hz, field(43)? / hz))
}

/// Is something listening on TCP `port` (IPv4 or IPv6)?
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|p| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && format!("{} ", f[1]).ends_with(&want) && f[3] == "0A"
            })
    })
}

/// A one-off `iperf3 -s -1` on the peer address; killed when dropped.
struct IperfServer(Child);

impl IperfServer {
    fn start(peer: &str, log: &Path) -> harness::Result<Self> {
        let f = std::fs::File::create(log).map_err(|e| err!("{}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| err!("{e}"))?;
        let child = Command::new("iperf3")
            .args(["-s", "-1", "-B", peer, "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| err!("cannot start iperf3 -s (run scripts/setup): {e}"))?;
        let mut s = IperfServer(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !listening(IPERF_PORT) {
            if !matches!(s.0.try_wait(), Ok(None)) {
                return Err(err!("iperf3 -s exited at once: {}", tail(log, 3)));
            }
            if Instant::now() > deadline {
                let _ = s.0.kill();
                return Err(err!("iperf3 -s is not listening after 15 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        // With -1 it has usually exited already; give it a moment to finish its report.
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VM configuration to measure.
struct Setup {
    config: &'static str,
    vmm: &'static str,
    tap: &'static str,
    /// Queue pairs (1: plain tap).
    pairs: u32,
}

/// The iperf3 runs: (metric, extra client args).
const IPERF_RUNS: [(&str, &str); 4] = [
    ("TCP guest->host, 1 stream", ""),
    ("TCP guest->host, 4 streams", "-P 4"),
    ("TCP host->guest, 1 stream", "-R"),
    ("TCP host->guest, 4 streams", "-R -P 4"),
];

fn boot(
    s: &Setup,
    tandem: &Path,
    guest: &GuestImage,
    dirs: &Dirs,
) -> harness::Result<(Vmm, Agent, PathBuf)> {
    let name = format!("{}-{}", s.vmm, s.config);
    let mut net = format!("id=net0,tap={},mac={MAC}", s.tap);
    if s.pairs > 1 {
        net.push_str(&format!(",num_queues={}", 2 * s.pairs));
    }
    let (nd_mq, dev_mq) = if s.pairs > 1 {
        (
            format!(",queues={}", s.pairs),
            format!(",mq=on,vectors={}", 2 * s.pairs + 2),
        )
    } else {
        (String::new(), String::new())
    };
    let spec = VmSpec {
        cpus: CPUS,
        mem_mib: MEM_MIB,
        tandem_args: &["--net".into(), net],
        qemu_args: &[
            "-netdev".into(),
            format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off{nd_mq}",
                s.tap
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={MAC},bus=pcie.0,addr=0x3,romfile={dev_mq}"),
        ],
    };
    let vm = bench::spawn_vmm(s.vmm, &name, tandem, guest, dirs, &spec)?;
    let agent = vm.connect()?;
    agent.wait_ready(BOOT_TIMEOUT).map_err(|e| vm.fail(e))?;
    Ok((vm.vmm, agent, vm.log))
}

/// Brings the guest's NIC up with GUEST_IP and waits until the peer answers; returns
/// the netdev and a description (netdev, driver, queues).
fn guest_net_up(agent: &mut Agent, peer: &str) -> harness::Result<(String, String)> {
    let dev = agent.run_ok(&format!(
        "for n in /sys/class/net/*; do [ \"$(cat $n/address)\" = {MAC} ] && echo ${{n##*/}}; done; true"
    ))?;
    let dev = dev
        .split_whitespace()
        .next()
        .ok_or_else(|| err!("the guest has no netdev with MAC {MAC}"))?
        .to_string();
    agent.run_ok(&format!(
        "ip link set {dev} up && ip addr add {GUEST_IP}/24 dev {dev}"
    ))?;
    let out = agent.run(
        &format!("i=0; while ! ping -c 1 -W 1 {peer} >/dev/null 2>&1 && [ $i -lt 30 ]; do i=$((i+1)); done; ping -c 1 -W 2 {peer}"),
        Duration::from_secs(90),
    )?;
    if out.status != 0 {
        return Err(err!("the guest cannot ping {peer}: {}", out.stdout.trim()));
    }
    let driver = agent.run_ok(&format!(
        "basename $(readlink /sys/class/net/{dev}/device/driver); ls /sys/class/net/{dev}/queues | grep -c rx"
    ))?;
    let mut it = driver.split_whitespace();
    let desc = format!(
        "{dev}, driver {}, {} rx queue(s)",
        it.next().unwrap_or("?"),
        it.next().unwrap_or("?")
    );
    Ok((dev, desc))
}

/// Counters of the tap on the host side: "tx_packets/tx_dropped/rx_packets" (tx is
/// towards the guest, rx from it).
fn tap_counters(tap: &str) -> String {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "{}/{}/{}",
        read("tx_packets"),
        read("tx_dropped"),
        read("rx_packets")
    )
}

/// After a failure: does anything still reach the guest? 5 pings, with the guest's rx
/// counter and the tap's TX counters before and after. One line; the full guest view
/// (interrupts, counters) goes to `log`.
fn diagnose(
    agent: &mut Agent,
    pid: u32,
    dev: &str,
    tap: &str,
    peer: &str,
    log: &Path,
) -> (String, bool) {
    let counters = format!(
        "for f in rx_packets rx_dropped tx_packets; do printf '%s ' $(cat /sys/class/net/{dev}/statistics/$f); done"
    );
    let mut full = String::new();
    let tap0 = tap_counters(tap);
    let t0 = Instant::now();
    let cpu0 = cpu_secs(pid).map(|c| c.0).unwrap_or(f64::NAN);
    let before = agent.run(&counters, Duration::from_secs(20));
    let ping = agent.run(
        &format!("ping -c 5 -i 0.2 -W 2 {peer}"),
        Duration::from_secs(30),
    );
    let alive = matches!(&ping, Ok(o) if o.status == 0);
    let ping = ping.map(|mut o| {
        let l: Vec<&str> = o.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        o.stdout = l[l.len().saturating_sub(2)..].join("\n");
        o
    });
    let after = agent.run(&counters, Duration::from_secs(20));
    let tap1 = tap_counters(tap);
    let cpu = cpu_secs(pid).map(|c| c.0).unwrap_or(f64::NAN) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    if let Ok(irq) = agent.run(
        "grep -E 'CPU|virtio' /proc/interrupts",
        Duration::from_secs(20),
    ) {
        full.push_str(&irq.stdout);
        full.push('\n');
    }
    let show = |r: &harness::Result<harness::CmdOutput>| match r {
        Ok(o) => o.stdout.trim().replace('\n', "; "),
        Err(e) => format!("(no answer: {e})"),
    };
    let line = format!(
        "probe after the failure: 5 pings -> {}; guest {dev} rx_packets/rx_dropped/tx_packets {} -> {}; host tap {tap} tx_packets/tx_dropped/rx_packets {tap0} -> {tap1}; VMM CPU {cpu:.2} s in {wall:.1} s",
        show(&ping),
        show(&before),
        show(&after)
    );
    full.push_str(&line);
    let _ = std::fs::write(log, full);
    (line, alive)
}

/// Parses iperf3's `--json` output: (receiver bits/s, receiver bytes, sender retransmits).
fn parse_iperf(json: &str) -> harness::Result<(f64, f64, Option<u64>)> {
    let start = json
        .find('{')
        .ok_or_else(|| err!("no JSON in the iperf3 output: {:?}", json.trim()))?;
    let v: serde_json::Value = serde_json::from_str(&json[start..])
        .map_err(|e| err!("iperf3 JSON: {e}: {:?}", tail_str(json, 300)))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err!("iperf3: {e}"));
    }
    let r = &v["end"]["sum_received"];
    let bps = r["bits_per_second"]
        .as_f64()
        .ok_or_else(|| err!("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    let bytes = r["bytes"]
        .as_f64()
        .ok_or_else(|| err!("iperf3 JSON has no end.sum_received.bytes"))?;
    Ok((bps, bytes, v["end"]["sum_sent"]["retransmits"].as_u64()))
}

fn tail_str(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Parses `ping`'s summary: (avg rtt ms, "min/avg/max ..., loss").
fn parse_ping(out: &str) -> harness::Result<(f64, String)> {
    let rtt = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .map(str::trim)
        .ok_or_else(|| err!("no rtt summary in ping output: {:?}", tail_str(out, 200)))?;
    let avg = rtt
        .split('/')
        .nth(1)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| err!("cannot parse {rtt:?}"))?;
    let loss = out
        .lines()
        .find(|l| l.contains("packet loss"))
        .and_then(|l| l.split(',').find(|p| p.contains("packet loss")))
        .map(str::trim)
        .unwrap_or("loss ?");
    Ok((avg, format!("min/avg/max {rtt}, {loss}")))
}

/// Boots one setup and measures everything on it; every metric gets a row.
/// What every setup shares.
struct Ctx<'a> {
    args: &'a Args,
    tandem: &'a Path,
    guest: &'a GuestImage,
    dirs: &'a Dirs,
    bridge: &'a str,
    peer: &'a str,
}

fn measure_setup(s: &Setup, cx: &Ctx, rows: &mut Vec<Row>, env: &mut Vec<(String, String)>) {
    let Ctx {
        args,
        tandem,
        guest,
        dirs,
        bridge,
        peer,
    } = *cx;
    let row = |metric: &str, unit: &str| Row {
        config: s.config.into(),
        vmm: s.vmm.into(),
        metric: metric.into(),
        unit: unit.into(),
        runs: if unit == "ms" { 1 } else { args.reps as usize },
        ..Row::default()
    };
    // Row order: ping, the iperf3 runs, CPU per GB of each iperf3 run, the sender's
    // TCP retransmits of each (frames lost or reordered on the way).
    const PING: usize = 0;
    const TPUT: usize = 1;
    const CPU: usize = 1 + IPERF_RUNS.len();
    const RETR: usize = 1 + 2 * IPERF_RUNS.len();
    let mut all: Vec<Row> = vec![row("ping avg rtt (20 x 0.05 s, idle)", "ms")];
    for (m, _) in IPERF_RUNS {
        all.push(row(m, "Mbit/s"));
    }
    for (m, _) in IPERF_RUNS {
        all.push(row(&format!("VMM CPU per GB, {}", &m[4..]), "s/GB"));
    }
    for (m, _) in IPERF_RUNS {
        all.push(row(&format!("TCP retransmits, {}", &m[4..]), "retr"));
    }
    let label = format!("{} {}", s.vmm, s.config);
    let file = |what: &str| dirs.logs.join(format!("{}-{}-{what}", s.vmm, s.config));
    // A failure that leaves the guest agent unusable ends the setup; the rest are marked.
    let result = (|| -> harness::Result<()> {
        let _tap = harness::tap_on(s.tap, bridge, s.pairs > 1)?;
        let t0 = Instant::now();
        let (mut vmm, mut agent, log) = boot(s, tandem, guest, dirs)?;
        let (dev, nic) = guest_net_up(&mut agent, peer)
            .map_err(|e| err!("{e}; {} log: {:?}", s.vmm, tail(&log, 3)))?;
        eprintln!(
            "bench-net: {label}: guest up in {:.1} s, NIC {nic}",
            t0.elapsed().as_secs_f64()
        );
        env.push((format!("guest NIC ({label})"), nic));
        let pid = vmm.pid();
        let guest_err = |e: harness::Error, vmm: &mut Vmm| {
            let gone = if vmm.exited() {
                format!(" ({} exited)", s.vmm)
            } else {
                String::new()
            };
            err!("{e}{gone}; {} log: {:?}", s.vmm, tail(&log, 3))
        };
        // Latency first, on an idle NIC.
        let out = agent
            .run(
                &format!("ping -c 20 -i 0.05 -W 2 {peer}"),
                Duration::from_secs(60),
            )
            .map_err(|e| guest_err(e, &mut vmm))?;
        match parse_ping(&out.stdout) {
            Ok((avg, note)) => {
                eprintln!("bench-net: {label}: ping {note}");
                all[PING].values.push(avg);
                all[PING].notes.push(note);
            }
            Err(e) => all[PING].errors.push(e.to_string()),
        }
        for rep in 1..=args.reps {
            for (i, (_, extra)) in IPERF_RUNS.iter().enumerate() {
                let srv_log = file(&format!("rep{rep}-iperf{i}.server.log"));
                let mut agent_lost = false;
                let one = (|| -> harness::Result<()> {
                    let _srv = IperfServer::start(peer, &srv_log)?;
                    let (c0, g0) = cpu_secs(pid)?;
                    let cmd = format!(
                        "timeout {} iperf3 -c {peer} -p {IPERF_PORT} -t {} -i 0 -J {extra} >/tmp/iperf.json 2>&1; echo status $?",
                        args.secs + 40,
                        args.secs
                    );
                    let out = agent
                        .run(&cmd, Duration::from_secs(u64::from(args.secs) + 60))
                        .map_err(|e| {
                            agent_lost = true;
                            guest_err(e, &mut vmm)
                        })?;
                    let (c1, g1) = cpu_secs(pid)?;
                    let json = agent.run_ok("cat /tmp/iperf.json").map_err(|e| {
                        agent_lost = true;
                        guest_err(e, &mut vmm)
                    })?;
                    let (bps, bytes, retr) =
                        parse_iperf(&json).map_err(|e| err!("{e} ({})", out.stdout.trim()))?;
                    let gb = bytes / 1e9;
                    match retr {
                        Some(r) => all[RETR + i].values.push(r as f64),
                        None => all[RETR + i]
                            .errors
                            .push(format!("rep {rep}: iperf3 gave no retransmit count")),
                    }
                    let (cpu, guest_cpu) = (c1 - c0, g1 - g0);
                    all[TPUT + i].values.push(bps / 1e6);
                    all[TPUT + i].notes.push(format!(
                        "{:.0} MB{}",
                        bytes / 1e6,
                        retr.map(|r| format!(", {r} retr")).unwrap_or_default()
                    ));
                    if gb > 0.0 {
                        all[CPU + i].values.push(cpu / gb);
                        all[CPU + i].notes.push(format!(
                            "{cpu:.2} s CPU ({:.2} s/GB outside guest mode)",
                            (cpu - guest_cpu) / gb
                        ));
                    } else {
                        all[CPU + i].errors.push("no bytes moved".into());
                    }
                    eprintln!(
                        "bench-net: {label}: rep {rep} iperf3 {extra:<8} {:>8.1} Mbit/s, {:.0} MB, {cpu:.2} s CPU ({guest_cpu:.2} s guest){}",
                        bps / 1e6,
                        bytes / 1e6,
                        retr.map(|r| format!(", {r} retransmits")).unwrap_or_default()
                    );
                    Ok(())
                })();
                if let Err(e) = one {
                    let mut msg = format!("rep {rep}: {e}");
                    let mut net_dead = false;
                    if !agent_lost {
                        let (line, alive) =
                            diagnose(&mut agent, pid, &dev, s.tap, peer, &file("diag.txt"));
                        net_dead = !alive;
                        msg.push_str("; ");
                        msg.push_str(&line);
                    }
                    eprintln!("bench-net: {label}: iperf3 {extra}: FAILED: {msg}");
                    all[TPUT + i].errors.push(msg);
                    for r in [CPU + i, RETR + i] {
                        all[r].errors.push(format!("rep {rep}: iperf3 run failed"));
                    }
                    if agent_lost {
                        return Err(e);
                    }
                    if net_dead {
                        return Err(err!(
                            "the guest no longer reaches {peer} after rep {rep} `{}` failed",
                            format!("iperf3 {extra}").trim_end()
                        ));
                    }
                }
            }
        }
        drop(agent);
        drop(vmm);
        Ok(())
    })();
    if let Err(e) = result {
        eprintln!("bench-net: {label}: FAILED: {e}");
        for r in &mut all {
            let done = r.values.len() + r.errors.len();
            if done < r.runs {
                r.errors
                    .push(format!("{} run(s) not measured: {e}", r.runs - done));
            }
        }
    }
    rows.extend(all);
}

/// Runs every measurement here (direct mode, or inside the test host).
fn measure(args: &Args, mode: Mode, why: &str) -> harness::Result<Report> {
    let tandem = BENCH.tandem_bin()?;
    let guest = harness::image::test_guest()?;
    let dirs = BENCH.dirs()?;
    let peer = harness::PEER_IP;
    // In the test host, L1's init built br0 with the peer address; in direct mode make ours.
    let (bridge, _bridge_guard) = if harness::mode::in_testhost() {
        (
            std::env::var("TANDEM_BRIDGE").unwrap_or_else(|_| "br0".into()),
            None,
        )
    } else {
        let b = "tdmbr0".to_string();
        let _ = Command::new("ip").args(["link", "del", &b]).output();
        sh(&["ip", "link", "add", &b, "type", "bridge"])?;
        let guard = Tap { name: b.clone() };
        sh(&["ip", "addr", "add", &format!("{peer}/24"), "dev", &b])?;
        sh(&["ip", "link", "set", &b, "up"])?;
        (b, Some(guard))
    };
    let mut env = bench::env_header(mode, why);
    env.push((
        "guest".into(),
        format!(
            "Debian kernel {}, {CPUS} vCPUs, {MEM_MIB}M, cmdline `{}`, {GUEST_IP}/24",
            bench::kernel_version(&guest),
            guest.cmdline()
        ),
    ));
    env.push((
        "tandem".into(),
        format!(
            "{}; --net id=net0,tap=T,mac={MAC}[,num_queues=4]",
            bench::describe_tandem(&tandem)
        ),
    ));
    env.push((
        "qemu".into(),
        format!(
            "{}; -machine q35 -accel kvm -cpu host; -netdev tap,ifname=T,script=no,downscript=no,vhost=off[,queues=2] -device virtio-net-pci,bus=pcie.0[,mq=on,vectors=6]",
            bench::cmd_line(&harness::qemu::reference_qemu(), &["--version"])
        ),
    ));
    env.push((
        "peer".into(),
        format!(
            "{peer} on bridge {bridge}; {} `-s -1` per run; client in the guest: `-t {} -i 0 -J [-R] [-P 4]`",
            bench::cmd_line("iperf3", &["--version"]),
            args.secs
        ),
    ));

    let mut setups = vec![
        Setup {
            config: "single-queue",
            vmm: "tandem",
            tap: "bntap0",
            pairs: 1,
        },
        Setup {
            config: "single-queue",
            vmm: "qemu",
            tap: "bntap0",
            pairs: 1,
        },
    ];
    if args.mq {
        for vmm in ["tandem", "qemu"] {
            setups.push(Setup {
                config: "multi-queue",
                vmm,
                tap: "bnmq0",
                pairs: 2,
            });
        }
    }
    let mut rows = Vec::new();
    for s in &setups {
        let cx = Ctx {
            args,
            tandem: &tandem,
            guest: &guest,
            dirs: &dirs,
            bridge: &bridge,
            peer,
        };
        measure_setup(s, &cx, &mut rows, &mut env);
    }
    dirs.finish(rows.iter().all(|r| r.errors.is_empty()));
    Ok(Report { env, rows })
}

fn print_report(r: &Report) {
    bench::print_env(&r.env, 32);
    let mut configs: Vec<&str> = Vec::new();
    for row in &r.rows {
        if !configs.contains(&row.config.as_str()) {
            configs.push(&row.config);
        }
    }
    for config in configs {
        println!();
        println!(
            "{config}{}; median (min-max) over the repetitions, FAILED = no successful run:",
            if config == "multi-queue" {
                " (2 queue pairs: Tandem num_queues=4, QEMU queues=2; multi_queue tap)"
            } else {
                " (1 queue pair)"
            }
        );
        println!(
            "{:<40} {:>30} {:>30} {:>11}",
            "metric", "Tandem", "QEMU", "Tandem/QEMU"
        );
        let mut metrics: Vec<&str> = Vec::new();
        for row in r.rows.iter().filter(|x| x.config == config) {
            if !metrics.contains(&row.metric.as_str()) {
                metrics.push(&row.metric);
            }
        }
        for m in metrics {
            let get = |vmm: &str| {
                r.rows
                    .iter()
                    .find(|x| x.config == config && x.vmm == vmm && x.metric == m)
            };
            let (t, q) = (get("tandem"), get("qemu"));
            let unit = t.or(q).map(|x| x.unit.as_str()).unwrap_or("");
            let prec = match unit {
                "ms" => 2,
                "retr" => 0,
                _ => 1,
            };
            let cell = |x: Option<&Row>| match x {
                Some(row) => {
                    let failed = if row.values.len() == row.runs {
                        String::new()
                    } else {
                        format!(" [{}/{} ok]", row.values.len(), row.runs)
                    };
                    match bench::stats(&row.values) {
                        Some(st) if row.values.len() > 1 => {
                            format!("{}{failed}", bench::fmt_range(st, prec, unit))
                        }
                        Some((m, _, _)) => format!("{m:.prec$} {unit}{failed}"),
                        None => "FAILED".into(),
                    }
                }
                None => "-".into(),
            };
            let med = |x: Option<&Row>| x.and_then(|x| bench::stats(&x.values)).map(|s| s.0);
            // A ratio of counts that are mostly zero says nothing.
            let ratio = if unit == "retr" {
                "-".to_string()
            } else {
                bench::ratio(med(t), med(q))
            };
            println!("{m:<40} {:>30} {:>30} {ratio:>11}", cell(t), cell(q));
        }
    }
    println!();
    println!("Per run (receiver bytes, sender retransmits; CPU = utime+stime of the whole VMM process, vCPU threads included):");
    for row in r.rows.iter().filter(|x| !x.notes.is_empty()) {
        println!(
            "  {:<6} {:<12} {:<40} {}",
            row.vmm,
            row.config,
            row.metric,
            row.notes.join(" | ")
        );
    }
    let failed: Vec<&Row> = r.rows.iter().filter(|x| !x.errors.is_empty()).collect();
    if !failed.is_empty() {
        println!();
        println!("FAILED measurements:");
        for row in failed {
            for e in &row.errors {
                println!("  {} {} / {}: {e}", row.vmm, row.config, row.metric);
            }
        }
    }
}

impl BenchReport for Report {
    fn env_mut(&mut self) -> &mut Vec<(String, String)> {
        &mut self.env
    }

    fn print(&self) {
        print_report(self)
    }

    fn failed(&self) -> bool {
        self.rows.iter().any(|x| !x.errors.is_empty())
    }
}

fn main() {
    let args = parse_args();
    let mut relaunch = vec![
        "--time".into(),
        args.secs.to_string(),
        "--reps".into(),
        args.reps.to_string(),
    ];
    if !args.mq {
        relaunch.push("--no-mq".into());
    }
    BENCH.main(&relaunch, |mode, why| measure(&args, mode, why));
}
