//! Tandem's virtio-net in a real guest: link, MAC and traffic over a tap on
//! the test bridge; STANDBY and the guest's net_failover master; two NICs;
//! multi-queue.

use std::process::Command;
use std::time::Duration;

use harness::guestnet::{netdev_by_mac, up_and_ping};
use harness::tandem::Tandem;
use harness::{err, Agent, GuestEnv};

const MAC_A: &str = "52:54:00:aa:00:01";
const MAC_B: &str = "52:54:00:aa:00:02";

fn feature_bit(agent: &mut Agent, dev: &str, bit: usize) -> harness::Result<bool> {
    let f = agent.run_ok(&format!("cat /sys/class/net/{dev}/device/features"))?;
    Ok(f.trim().as_bytes().get(bit) == Some(&b'1'))
}

fn boot_with(env: &GuestEnv, name: &str, extra: &[&str]) -> harness::Result<(Tandem, Agent)> {
    let mut vm = Tandem::spawn(env, name, extra)?;
    let agent = vm.agent(env, name)?;
    Ok((vm, agent))
}

harness::guest_test_kernels!(fn tandem_virtio_net_pings_peer(env) {
    let _tap = env.tap("tdtap0")?;
    let (vm, mut agent) = boot_with(env, "net", &["--net", &format!("id=net0,tap=tdtap0,mac={MAC_A}")])?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    assert!(!feature_bit(&mut agent, &dev, 62)?, "STANDBY offered without standby=on");
    assert!(agent.run_ok("ls /sys/class/net")?.split_whitespace().count() == 2, "lo and one NIC, no failover master");
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    assert_eq!(agent.run_ok(&format!("cat /sys/class/net/{dev}/carrier"))?.trim(), "1");
    // A bigger transfer both ways: 2 MB with large frames (TSO/GSO paths).
    let out = agent.run(&format!("ping -c 20 -i 0.05 -s 8000 {}", harness::PEER_IP), Duration::from_secs(60))?;
    assert_eq!(out.status, 0, "large pings: {}", out.stdout);
    let info = vm.remote("info")?;
    assert!(info.contains("virtio-net") && info.contains(MAC_A), "{info}");
    // Host-to-guest bulk traffic: the rx path must keep up when the guest
    // runs short of buffers (bench-net once found it stalling for good).
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-B", harness::PEER_IP])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| err!("iperf3 -s: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let out = agent.run(&format!("iperf3 -c {} -R -t 3", harness::PEER_IP), Duration::from_secs(60))?;
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status, 0, "iperf3 -R: {}", out.stdout);
    let out = agent.run(&format!("ping -c 3 -W 2 {}", harness::PEER_IP), Duration::from_secs(30))?;
    assert_eq!(out.status, 0, "rx still works after bulk traffic: {}", out.stdout);
    // The driver resets the device in the middle of traffic (unbind while
    // pings fly, bind again): the device comes back and works.
    let vdev = agent.run_ok(&format!("basename $(readlink -f /sys/class/net/{dev}/device)"))?;
    let vdev = vdev.trim();
    agent.run_ok(&format!(
        "(ping -c 300 -i 0.01 -s 1400 {p} >/dev/null 2>&1 &); sleep 0.5; \
         echo {vdev} > /sys/bus/virtio/drivers/virtio_net/unbind; sleep 0.2; \
         echo {vdev} > /sys/bus/virtio/drivers/virtio_net/bind",
        p = harness::PEER_IP
    ))?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    Ok(())
});

harness::guest_test_kernels!(fn tandem_standby_builds_failover_master(env) {
    let _tap = env.tap("tdtap0")?;
    let mut vm = Tandem::spawn(env, "sby", &["--net", &format!("id=net0,tap=tdtap0,mac={MAC_A},standby=on")])?;
    let events = vm.events()?;
    let mut agent = vm.agent(env, "sby")?;
    // The event stream saw the guest's driver ack STANDBY, then start the device.
    let ev = |t: &'static str| move |e: &serde_json::Value| e["type"] == t && e["device"] == "net0";
    events.wait_for(ev("failover-negotiated"), Duration::from_secs(30))?;
    events.wait_for(ev("driver-ready"), Duration::from_secs(30))?;
    let sby = netdev_by_mac(&mut agent, MAC_A)?;
    assert!(feature_bit(&mut agent, &sby, 62)?, "the guest sees VIRTIO_NET_F_STANDBY (bit 62)");
    assert_eq!(agent.run_ok(&format!("cat /sys/class/net/{sby}/phys_port_name"))?.trim(), "sby");
    let master = agent.run_ok(&format!("basename $(readlink /sys/class/net/{sby}/master)"))?;
    let master = master.trim().to_string();
    assert!(!master.is_empty() && master != sby);
    assert_eq!(agent.run_ok(&format!("cat /sys/class/net/{master}/address"))?.trim(), MAC_A);
    // Failover slaves may be renamed while UP (Linux 8065a779).
    agent.run_ok(&format!("ip link set {master} up; ip link set {sby} up"))?;
    agent.run_ok(&format!("ip link set dev {sby} name ens3nsby"))?;
    // Still administratively up after the rename (IFF_UP in flags).
    let flags = agent.run_ok("cat /sys/class/net/ens3nsby/flags")?;
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).map_err(|e| err!("{e}"))?;
    assert_eq!(flags & 1, 1, "ens3nsby is UP after the rename");
    assert_eq!(agent.run_ok("basename $(readlink /sys/class/net/ens3nsby/master)")?.trim(), master);
    let out = up_and_ping(&mut agent, &master, "10.0.0.2")?;
    assert!(out.contains("0% packet loss"), "{out}");
    // The driver unbound and bound again: the stream shows the reset and a fresh ack
    // (what the failover pair hides and re-plugs its primary on).
    agent.run_ok(
        "v=$(basename $(readlink -f /sys/class/net/ens3nsby/device)); \
         echo $v > /sys/bus/virtio/drivers/virtio_net/unbind; echo $v > /sys/bus/virtio/drivers/virtio_net/bind",
    )?;
    let want: Vec<(String, String)> = ["driver-reset", "failover-negotiated", "driver-ready"]
        .iter()
        .map(|t| (t.to_string(), "net0".to_string()))
        .collect();
    let t0 = std::time::Instant::now();
    loop {
        let got = events.sequence_from(ev("driver-reset"));
        if got.len() >= want.len() {
            assert_eq!(got[..want.len()], want[..], "{got:?}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "after the rebind: {got:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
});

harness::guest_test!(fn tandem_two_nics(env) {
    let _a = env.tap("tdtap0")?;
    let _b = env.tap("tdtap1")?;
    let (vm, mut agent) = boot_with(
        env,
        "two",
        &["--net", &format!("id=a,tap=tdtap0,mac={MAC_A}"), "--net", &format!("id=b,tap=tdtap1,mac={MAC_B},slot=7")],
    )?;
    if let Err(e) = agent.run("echo hi", Duration::from_secs(20)) {
        vm.remote("pause")?;
        return Err(err!("{e}: {}", vm.remote("info")?).into());
    }
    let a = netdev_by_mac(&mut agent, MAC_A)?;
    let b = netdev_by_mac(&mut agent, MAC_B)?;
    assert_ne!(a, b);
    // slot=7 puts the second NIC at 00:07.0.
    let bus = agent.run_ok(&format!("basename $(dirname $(readlink -f /sys/class/net/{b}/device))"))?;
    assert_eq!(bus.trim(), "0000:00:07.0");
    up_and_ping(&mut agent, &a, "10.0.0.2")?;
    // vm.info counts what a's queue pair moved; b moved nothing yet.
    let info: serde_json::Value = serde_json::from_str(&vm.remote("info")?).map_err(|e| err!("{e}"))?;
    let q = |id: &str, what: &str| -> u64 {
        info["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == id))
            .and_then(|d| d["counters"]["queues"][0][what].as_u64())
            .unwrap_or(u64::MAX)
    };
    assert!(q("a", "tx_frames") > 0 && q("a", "tx_frames") != u64::MAX, "{info}");
    assert!(q("a", "rx_frames") > 0 && q("a", "rx_frames") != u64::MAX, "{info}");
    assert_eq!(q("b", "rx_dropped"), 0, "{info}");
    agent.run_ok(&format!("ip link set {a} down"))?;
    up_and_ping(&mut agent, &b, "10.0.0.3")?;
    // b's tap deleted on the host: the device says it needs a reset (status 0x40),
    // and the log says why, instead of going quiet.
    let st = Command::new("ip").args(["link", "del", "tdtap1"]).status().map_err(|e| err!("{e}"))?;
    assert!(st.success());
    let _ = agent.run(&format!("ping -c 2 -W 1 -I {b} {}", harness::PEER_IP), Duration::from_secs(10));
    let t0 = std::time::Instant::now();
    loop {
        let info: serde_json::Value = serde_json::from_str(&vm.remote("info")?).map_err(|e| err!("{e}"))?;
        let loc = info["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == "b"))
            .and_then(|d| d["location"].as_str())
            .unwrap_or("")
            .to_string();
        let status = loc
            .split("driver status ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        if status & 0x40 != 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no NEEDS_RESET after the tap went: {loc}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(vm.log().contains("the tap is gone from the host"), "{}", vm.log());
    // a is unaffected.
    agent.run_ok(&format!("ip link set {b} down"))?;
    up_and_ping(&mut agent, &a, "10.0.0.4")?;
    Ok(())
});

/// A multi-queue tap on the test bridge, deleted when the guard drops.
fn mq_tap(env: &GuestEnv, tap: &str) -> harness::Result<harness::Tap> {
    let sh = |args: &[&str]| -> harness::Result<()> {
        let st = Command::new("ip")
            .args(args)
            .status()
            .map_err(|e| err!("ip: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(err!("ip {args:?} failed"))
        }
    };
    let _ = Command::new("ip").args(["link", "del", tap]).status();
    sh(&["tuntap", "add", "dev", tap, "mode", "tap", "multi_queue"])?;
    let guard = harness::Tap { name: tap.into() };
    sh(&["link", "set", tap, "master", &env.bridge])?;
    sh(&["link", "set", tap, "up"])?;
    Ok(guard)
}

/// How many queues of a tap are attached: the kernel shows one `tx-N`
/// directory per attached queue.
fn tap_queues(tap: &str) -> harness::Result<usize> {
    let dir = format!("/sys/class/net/{tap}/queues");
    let rd = std::fs::read_dir(&dir).map_err(|e| err!("{dir}: {e}"))?;
    Ok(rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("tx-"))
        .count())
}

harness::guest_test!(fn tandem_multiqueue_one_vcpu_uses_one_pair(env) {
    // Two pairs offered, one vCPU: Linux asks for one pair (VQ_PAIRS_SET 1),
    // so the second tap queue is detached and the tap sends nothing there.
    let tap = "tdmq1";
    let _guard = mq_tap(env, tap)?;
    let (_vm, mut agent) = boot_with(
        env,
        "mq1",
        &["--net", &format!("id=net0,tap={tap},mac={MAC_A},num_queues=4")],
    )?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    let queues = agent.run_ok(&format!("ls /sys/class/net/{dev}/queues"))?;
    assert!(!queues.contains("rx-1"), "one vCPU, one pair in use: {queues}");
    assert_eq!(tap_queues(tap)?, 1, "attached tap queues with one pair in use");
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    let out = agent.run(&format!("ping -c 40 -i 0.02 -s 1000 {}", harness::PEER_IP), Duration::from_secs(60))?;
    assert!(out.stdout.contains(" 0% packet loss"), "{}", out.stdout);
    Ok(())
});

harness::guest_test!(fn tandem_multiqueue_uses_both_pairs(env) {
    let tap = "tdmq0";
    let _guard = mq_tap(env, tap)?;
    // loglevel=5: a soft lockup prints its backtrace on the console.
    let cmdline = format!("{} loglevel=5", env.guest.cmdline());
    let (_vm, mut agent) = boot_with(
        env,
        "mq",
        &["--cmdline", &cmdline, "--cpus", "boot=2", "--net", &format!("id=net0,tap={tap},mac={MAC_A},num_queues=4")],
    )?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    let queues = agent.run_ok(&format!("ls /sys/class/net/{dev}/queues"))?;
    assert!(queues.contains("rx-1") && queues.contains("tx-1"), "two queue pairs: {queues}");
    // Two vCPUs: the driver asked for both pairs, so both tap queues are attached.
    assert_eq!(tap_queues(tap)?, 2, "attached tap queues");
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    // Traffic from both vCPUs: each sends on its own tx queue.
    agent.run_ok(&format!(
        "for c in 0 1; do taskset -c $c ping -c 30 -i 0.02 -s 1000 {} >/dev/null & done; wait",
        harness::PEER_IP
    ))?;
    let irqs = agent.run_ok("grep virtio /proc/interrupts")?;
    let count = |name: &str| -> u64 {
        irqs.lines()
            .filter(|l| l.contains(name))
            .map(|l| l.split_whitespace().skip(1).take(2).filter_map(|v| v.parse::<u64>().ok()).sum::<u64>())
            .sum()
    };
    for q in ["input.0", "input.1"] {
        assert!(count(q) > 0, "no interrupts on {q}:\n{irqs}");
    }
    assert!(count("output.0") + count("output.1") > 0 || irqs.contains("output"), "{irqs}");
    Ok(())
});

harness::guest_test!(
    #[ignore = "a soak run for hunting rare hangs: TANDEM_SOAK_RUNS boots (default 20) of a multi-queue guest in one test host, 2 vCPUs and 1 vCPU with STANDBY in turn"]
    fn tandem_net_soak(env) {
    let runs: usize = std::env::var("TANDEM_SOAK_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let tap = "tdsoak0";
    let _guard = mq_tap(env, tap)?;
    for i in 0..runs {
        let t0 = std::time::Instant::now();
        let name = format!("soak{i}");
        // Odd runs: one vCPU and a STANDBY NIC (where the hang was also seen).
        let (cpus, net) = if i % 2 == 0 {
            ("boot=2", format!("id=net0,tap={tap},mac={MAC_A},num_queues=4"))
        } else {
            ("boot=1", format!("id=net0,tap={tap},mac={MAC_A},num_queues=4,standby=on"))
        };
        let (mut vm, mut agent) = boot_with(env, &name, &["--cpus", cpus, "--net", &net])?;
        let mut dev = netdev_by_mac(&mut agent, MAC_A)?;
        if i % 2 == 1 {
            // Traffic goes through the failover master.
            agent.run_ok(&format!("ip link set {dev} up"))?;
            dev = agent.run_ok(&format!("basename $(readlink /sys/class/net/{dev}/master)"))?.trim().to_string();
        }
        up_and_ping(&mut agent, &dev, "10.0.0.2")?;
        agent.run_ok(&format!(
            "for c in $(seq 0 $(($(nproc)-1))); do taskset -c $c ping -c 30 -i 0.02 -s 1000 {} >/dev/null & done; wait",
            harness::PEER_IP
        ))?;
        // The driver resets the device and comes back (where CI once stalled).
        let sby = netdev_by_mac(&mut agent, MAC_A)?;
        let vdev = agent.run_ok(&format!("basename $(readlink -f /sys/class/net/{sby}/device)"))?;
        agent.run_ok(&format!(
            "echo {v} > /sys/bus/virtio/drivers/virtio_net/unbind; echo {v} > /sys/bus/virtio/drivers/virtio_net/bind",
            v = vdev.trim()
        ))?;
        let mut dev = netdev_by_mac(&mut agent, MAC_A)?;
        if i % 2 == 1 {
            agent.run_ok(&format!("ip link set {dev} up"))?;
            dev = agent.run_ok(&format!("basename $(readlink /sys/class/net/{dev}/master)"))?.trim().to_string();
            agent.run_ok(&format!("ip addr flush dev {dev}"))?;
        }
        up_and_ping(&mut agent, &dev, "10.0.0.2")?;
        let _ = agent.run("poweroff -f", Duration::from_secs(2));
        assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0, "tandem exit status after poweroff");
        eprintln!("soak run {i} passed in {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
});

harness::guest_test!(
    #[ignore = "a soak run: TANDEM_SOAK_RUNS (default 20) driver unbind/rebind cycles under a ping flood in one guest, where CI once stalled"]
    fn tandem_net_rebind_soak(env) {
    let runs: usize = std::env::var("TANDEM_SOAK_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let _tap = env.tap("tdrb0")?;
    let (_vm, mut agent) = boot_with(env, "rebind", &["--net", &format!("id=net0,tap=tdrb0,mac={MAC_A}")])?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    for i in 0..runs {
        let t0 = std::time::Instant::now();
        let dev = netdev_by_mac(&mut agent, MAC_A)?;
        let vdev = agent.run_ok(&format!("basename $(readlink -f /sys/class/net/{dev}/device)"))?;
        agent.run_ok(&format!(
            "(ping -c 300 -i 0.01 -s 1400 {p} >/dev/null 2>&1 &); sleep 0.5; \
             echo {v} > /sys/bus/virtio/drivers/virtio_net/unbind; sleep 0.2; \
             echo {v} > /sys/bus/virtio/drivers/virtio_net/bind",
            p = harness::PEER_IP,
            v = vdev.trim()
        ))?;
        let dev = netdev_by_mac(&mut agent, MAC_A)?;
        up_and_ping(&mut agent, &dev, "10.0.0.2")?;
        eprintln!("rebind cycle {i} passed in {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
});

/// A "host" for migration tests: a network namespace with a bridge of its own,
/// joined to the test bridge by a veth, holding tap `tdmtap` and the address `ip`
/// (where its Tandem listens for migrations). Removed on drop.
struct Host {
    ns: String,
    veth: String,
}

impl Host {
    fn new(env: &GuestEnv, name: &str, ip: &str) -> harness::Result<Self> {
        let ns = format!("tdh{name}");
        let veth = format!("tdv{name}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        let host = Host {
            ns: ns.clone(),
            veth: veth.clone(),
        };
        let inner = format!("{veth}p");
        let steps: Vec<Vec<&str>> = vec![
            vec!["ip", "netns", "add", &ns],
            vec![
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", &inner,
            ],
            vec!["ip", "link", "set", &inner, "netns", &ns],
            vec!["ip", "link", "set", &veth, "master", &env.bridge],
            vec!["ip", "link", "set", &veth, "up"],
            vec![
                "ip", "netns", "exec", &ns, "ip", "link", "add", "hbr", "type", "bridge",
            ],
            vec![
                "ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "master", "hbr",
            ],
            vec![
                "ip", "netns", "exec", &ns, "ip", "tuntap", "add", "dev", "tdmtap", "mode", "tap",
            ],
            vec![
                "ip", "netns", "exec", &ns, "ip", "link", "set", "tdmtap", "master", "hbr",
            ],
            vec![
                "ip", "netns", "exec", &ns, "ip", "addr", "add", ip, "dev", "hbr",
            ],
            vec!["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"],
        ];
        for s in steps {
            let out = Command::new(s[0])
                .args(&s[1..])
                .output()
                .map_err(|e| err!("{s:?}: {e}"))?;
            if !out.status.success() {
                return Err(err!("{s:?}: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        for dev in [inner.as_str(), "hbr", "tdmtap"] {
            let st = Command::new("ip")
                .args(["netns", "exec", &ns, "ip", "link", "set", dev, "up"])
                .status()
                .map_err(|e| err!("{e}"))?;
            if !st.success() {
                return Err(err!("cannot bring {dev} up in {ns}"));
            }
        }
        Ok(host)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

type SinkState = std::sync::Arc<std::sync::Mutex<(u64, Option<String>, bool)>>;

/// Counts the bytes of one TCP stream of `0123456789abcdef\n` lines (what `yes`
/// sends) and checks every byte: a lost, repeated or reordered byte, or a reset,
/// is an error. (bytes so far, error, ended) are shared with the test.
fn pattern_sink(addr: &str) -> harness::Result<SinkState> {
    use std::io::Read;
    let l = std::net::TcpListener::bind(addr).map_err(|e| err!("listen {addr}: {e}"))?;
    let state = std::sync::Arc::new(std::sync::Mutex::new((0u64, None::<String>, false)));
    let st = state.clone();
    std::thread::spawn(move || {
        let set_err = |e: String| {
            if let Ok(mut s) = st.lock() {
                s.1.get_or_insert(e);
                s.2 = true;
            }
        };
        let (mut c, _) = match l.accept() {
            Ok(c) => c,
            Err(e) => return set_err(format!("accept: {e}")),
        };
        const LINE: &[u8] = b"0123456789abcdef\n";
        let mut buf = [0u8; 65536];
        let mut at = 0u64;
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    for (i, b) in buf[..n].iter().enumerate() {
                        let want = LINE[((at + i as u64) % LINE.len() as u64) as usize];
                        if *b != want {
                            return set_err(format!(
                                "byte {} is {b:#x}, not {want:#x}",
                                at + i as u64
                            ));
                        }
                    }
                    at += n as u64;
                    if let Ok(mut s) = st.lock() {
                        s.0 = at;
                    }
                }
                Err(e) => return set_err(format!("the stream broke after {at} bytes: {e}")),
            }
        }
        if let Ok(mut s) = st.lock() {
            s.2 = true;
        }
    });
    Ok(state)
}

harness::guest_test_kernels!(fn tandem_live_migration_round_trips(env) {
    // Two hosts on the test network, each a namespace with its own tap; the guest
    // has a STANDBY NIC, so its failover master and renamed standby must survive.
    let hosts = [Host::new(env, "a", "10.0.0.201/24")?, Host::new(env, "b", "10.0.0.202/24")?];
    let ips = ["10.0.0.201", "10.0.0.202"];
    let net = format!("id=net0,tap=tdmtap,mac={MAC_A},standby=on");
    let mut vm = Tandem::spawn_in(env, "mig0", Some(&hosts[0].ns), None, &["--memory", "size=256M", "--net", &net])?;
    let mut agent = vm.agent(env, "mig0")?;
    let sby = netdev_by_mac(&mut agent, MAC_A)?;
    let master = agent.run_ok(&format!("basename $(readlink /sys/class/net/{sby}/master)"))?.trim().to_string();
    agent.run_ok(&format!("ip link set {master} up; ip link set {sby} up; ip link set dev {sby} name ens3nsby"))?;
    up_and_ping(&mut agent, &master, "10.0.0.2")?;
    // An open TCP connection, guest to peer, that must neither reset nor lose a byte.
    let sink = pattern_sink(&format!("{}:7000", harness::PEER_IP))?;
    agent.run_ok(&format!("(yes 0123456789abcdef | nc {} 7000 >/dev/null 2>&1 &); sleep 1", harness::PEER_IP))?;
    // The peer pings the guest throughout.
    let ping_log = env.workdir.join("peer-ping.log");
    let mut ping = Command::new("ping")
        .args(["-i", "0.05", "-W", "1", "10.0.0.2"])
        .stdout(std::fs::File::create(&ping_log).map_err(|e| err!("{e}"))?)
        .spawn()
        .map_err(|e| err!("ping: {e}"))?;
    // At least 10 round trips in one test (issue 11), on Debian 12's kernel; 6.12 checks
    // the same with 3, which keeps CI under 30 minutes (each round trip costs about 14 s
    // in the test host).
    let round_trips = match env.kernel {
        harness::GuestKernel::Stable => 10,
        harness::GuestKernel::Backports => 3,
    };
    let mut downtimes = Vec::new();
    for i in 1..=2 * round_trips {
        let here = i % 2;
        let url = format!("tcp:{}:6000", ips[here]);
        let name = format!("mig{i}");
        let dest = Tandem::spawn_in(env, &name, Some(&hosts[here].ns), Some(&url), &["--net", "id=net0,tap=tdmtap"])?;
        dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
        let before = sink.lock().map(|s| s.0).unwrap_or(0);
        let out = vm.remote_args(&["send-migration", &url])?;
        let line = out.lines().find(|l| l.contains("completed in")).unwrap_or("").to_string();
        assert!(!line.is_empty(), "migration {i}: {out}");
        let code = vm.wait_exit(Duration::from_secs(30))?;
        assert_eq!(code, 0, "migration {i}: the source's exit status; log: {}", vm.log());
        vm = dest;
        agent = vm.migrated_agent(env, &name)?;
        let addr = agent.run_ok(&format!("ip -4 -o addr show dev {master}"))?;
        assert!(addr.contains("10.0.0.2/24"), "migration {i}: the guest's address: {addr}");
        let slaves = agent.run_ok(&format!("ls /sys/class/net/{master}/ | grep lower_ || true; cat /sys/class/net/ens3nsby/operstate"))?;
        assert!(slaves.contains("lower_ens3nsby") && slaves.contains("up"), "migration {i}: the standby slave: {slaves}");
        // The stream goes on.
        let t0 = std::time::Instant::now();
        loop {
            let (n, e, _) = sink.lock().map(|s| s.clone()).map_err(|_| err!("sink"))?;
            if let Some(e) = e {
                return Err(err!("migration {i}: the TCP stream: {e}").into());
            }
            if n > before + 100_000 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "migration {i}: the TCP stream stalled at {n} bytes");
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("migration {i}: {line}");
        downtimes.push(line);
    }
    let _ = ping.kill();
    let _ = ping.wait();
    agent.run_ok("killall yes nc; true")?;
    std::thread::sleep(Duration::from_secs(1));
    let (n, e, _) = sink.lock().map(|s| s.clone()).map_err(|_| err!("sink"))?;
    assert!(e.is_none(), "the TCP stream: {e:?}");
    let log = std::fs::read_to_string(&ping_log).unwrap_or_default();
    let replies = log.lines().filter(|l| l.contains("bytes from")).count();
    let seqs: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let sent = seqs.last().copied().unwrap_or(0);
    eprintln!(
        "{} migrations: {n} bytes streamed without a loss or a reset; the peer's pings: {replies} of {sent} answered",
        2 * round_trips
    );
    assert!(replies as u64 * 10 >= sent * 9, "the peer lost more than 10% of its pings: {replies} of {sent}");
    Ok(())
});

/// `tandem remote send-migration` with options; its stdout, or an error with stderr.
fn send_migration(vm: &Tandem, url: &str, opts: &[&str]) -> harness::Result<String> {
    let mut args = vec!["send-migration", url];
    args.extend_from_slice(opts);
    vm.remote_args(&args)
}

harness::guest_test_kernels!(fn tandem_live_migration_failures_paused_and_busy(env) {
    let hosts = [Host::new(env, "c", "10.0.0.203/24")?, Host::new(env, "d", "10.0.0.204/24")?];
    let net = format!("id=net0,tap=tdmtap,mac={MAC_A}");
    let mut vm = Tandem::spawn_in(
        env,
        "mf0",
        Some(&hosts[0].ns),
        None,
        &["--memory", "size=256M", "--cpus", "boot=2", "--net", &net],
    )?;
    let events = vm.events()?;
    let mut agent = vm.agent(env, "mf0")?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    let url = "tcp:10.0.0.204:6000";
    let dest_args = ["--net", "id=net0,tap=tdmtap"];
    let answers = |agent: &mut harness::Agent, what: &str| -> harness::Result<()> {
        let out = agent.run(&format!("ping -c 2 -W 2 {}", harness::PEER_IP), Duration::from_secs(30))?;
        if out.status != 0 {
            return Err(err!("{what}: the guest on the source does not answer: {}", out.stdout));
        }
        Ok(())
    };

    // 1. The destination dies in the middle of the copy (slowed to 50 Mbit/s).
    let dest = Tandem::spawn_in(env, "mf-killed", Some(&hosts[1].ns), Some(url), &dest_args)?;
    dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
    let killer = std::thread::spawn({
        let pid = dest.child.id();
        move || {
            std::thread::sleep(Duration::from_secs(2));
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let e = send_migration(&vm, url, &["--bandwidth-mbps", "50"]).unwrap_err().to_string();
    let _ = killer.join();
    assert!(e.contains("migration failed") && e.contains("runs on here"), "{e}");
    assert!(
        !e.contains("refused") && dest.log().contains("incoming migration from"),
        "the copy had started when the destination died: {e}"
    );
    answers(&mut agent, "after the destination died")?;
    events.wait_for(|e| e["type"] == "migration-failed", Duration::from_secs(10))?;

    // 2. A cancel in the middle of the copy.
    let dest = Tandem::spawn_in(env, "mf-cancel", Some(&hosts[1].ns), Some(url), &dest_args)?;
    dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
    let canceller = std::thread::spawn({
        let (bin, api) = (vm.bin.clone(), vm.api.clone());
        move || {
            std::thread::sleep(Duration::from_secs(2));
            Command::new(bin).args(["remote", "--api-socket"]).arg(api).arg("cancel-migration").output()
        }
    });
    let e = send_migration(&vm, url, &["--bandwidth-mbps", "50"]).unwrap_err().to_string();
    let cancel = canceller.join().map_err(|_| err!("canceller"))?.map_err(|e| err!("{e}"))?;
    assert!(e.contains("cancelled"), "{e}; dest: {}", dest.log());
    assert!(cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    answers(&mut agent, "after a cancel")?;
    drop(dest);

    // 3. The timeout.
    let dest = Tandem::spawn_in(env, "mf-timeout", Some(&hosts[1].ns), Some(url), &dest_args)?;
    dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
    let e = send_migration(&vm, url, &["--bandwidth-mbps", "50", "--timeout-s", "2"]).unwrap_err().to_string();
    assert!(e.contains("timed out after 2 s"), "{e}");
    answers(&mut agent, "after a timeout")?;
    drop(dest);

    // 4. A destination whose tap does not exist refuses before any memory moves.
    let dest = Tandem::spawn_in(env, "mf-notap", Some(&hosts[1].ns), Some(url), &["--net", "id=net0,tap=nosuchtap"])?;
    dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
    let e = send_migration(&vm, url, &[]).unwrap_err().to_string();
    assert!(e.contains("tap nosuchtap does not exist"), "{e}");
    answers(&mut agent, "after a refusal")?;
    drop(dest);

    // 5. Two vCPUs rewriting 24 MiB over and over: pre-copy goes round after round,
    // and either converges or stops at its bound and says so.
    agent.run_ok(
        "mkdir -p /dev/shm; rm -f /tmp/stop; for f in a b; do \
         (while [ ! -e /tmp/stop ]; do dd if=/dev/urandom of=/dev/shm/$f bs=1M count=12 2>/dev/null; done &) ; done; sleep 1",
    )?;
    let dest = Tandem::spawn_in(env, "mf-busy", Some(&hosts[1].ns), Some(url), &dest_args)?;
    dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
    let out = send_migration(&vm, url, &["--downtime-ms", "100"])?;
    eprintln!("busy guest:\n{out}");
    let rounds = out.lines().filter(|l| l.starts_with("round")).count();
    assert!(rounds >= 2, "a guest dirtying memory needs several rounds: {out}");
    assert!(out.contains("completed in"), "{out}");
    assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0);
    // The source's stream showed every step, in order.
    let kinds: Vec<String> = events
        .all()
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .filter(|t| t.starts_with("migration-"))
        .collect();
    let last = kinds.iter().rposition(|k| k == "migration-started").unwrap_or(0);
    let tail: Vec<&str> = kinds[last..].iter().map(String::as_str).collect();
    assert_eq!(tail.first(), Some(&"migration-started"), "{kinds:?}");
    assert!(tail.contains(&"migration-progress"), "{kinds:?}");
    assert_eq!(&tail[tail.len() - 2..], ["migration-paused", "migration-completed"], "{kinds:?}");
    let mut vm = dest;
    let mut agent = vm.migrated_agent(env, "mf-busy")?;
    agent.run_ok("touch /tmp/stop; sleep 1")?;
    let out = agent.run(&format!("ping -c 2 -W 2 {}", harness::PEER_IP), Duration::from_secs(30))?;
    assert_eq!(out.status, 0, "after the busy migration: {}", out.stdout);

    // 6. A paused guest migrates and stays paused; resumed there, it runs.
    vm.remote("pause")?;
    let url_back = "tcp:10.0.0.203:6000";
    let dest = Tandem::spawn_in(env, "mf-paused", Some(&hosts[0].ns), Some(url_back), &dest_args)?;
    dest.wait_log("waiting for a migration", Duration::from_secs(30))?;
    send_migration(&vm, url_back, &[])?;
    assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0);
    let mut vm = dest;
    let info = vm.remote("info")?;
    assert!(info.contains("\"paused\""), "the destination keeps it paused: {info}");
    vm.remote("resume")?;
    let mut agent = vm.migrated_agent(env, "mf-paused")?;
    let out = agent.run(&format!("ping -c 2 -W 2 {}", harness::PEER_IP), Duration::from_secs(30))?;
    assert_eq!(out.status, 0, "after the paused migration: {}", out.stdout);
    Ok(())
});
