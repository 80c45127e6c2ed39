//! The demo behind `scripts/demo`: the failover story as far as it exists. Boots the
//! Debian test guest in Tandem (2 vCPUs, 512M) with a failover pair: a virtio-net NIC
//! offering STANDBY and, as its primary, a passthrough NIC (VFIO; in the test host, an
//! emulated e1000e behind L1's vIOMMU) that Tandem keeps hidden until the guest acks
//! STANDBY. It prints the event stream as it goes, shows the guest's net_failover master
//! with both slaves, renames them while UP, pings the peer through the master and shows
//! which slave carried it; removes the primary in order through the API (traffic moves to
//! the standby), adds it back into the same slot (traffic moves back), prints `vm.info`.
//! Then it live-migrates the guest to a second Tandem while the guest pings the peer: Tandem
//! takes the primary off itself once the destination accepted the VM, the guest moves over
//! TCP, and the destination plugs a primary with the same MAC into the same slot. It powers the guest off there and checks that
//! tandem exits 0. Every line is real output.
//! Without a passthrough NIC (direct mode without `TANDEM_VFIO_NICS`) it shows the
//! standby alone and says so.
//!
//! When /dev/kvm cannot boot Linux (software KVM, as on the development machines) the
//! demo runs inside a test host (see tests/README.md); its transcript is relayed here
//! without the `[testhost]` prefix. It is a transcript only: nothing is interactive.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use harness::{err, Agent, Mode};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const RELAY_ENV: &str = "TANDEM_DEMO_RELAY";
const GUEST_COMMANDS: &[&str] = &[
    "uname -a",
    "nproc",
    "free -m",
    "ls /sys/bus/pci/devices",
    // busybox's `ip` has no `-br`; `-o` is its one-line form.
    "ip -o link",
];
/// The pair's MAC: the passthrough NIC's permanent address, which the standby must share.
const MAC0: &str = harness::FAILOVER_MAC;

/// tandem, killed when dropped (unless it already exited).
struct Tandem(Child);

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tandem_bin() -> harness::Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| err!("cannot find this program: {e}"))?;
    // target/<profile>/examples/demo -> target/<profile>/tandem
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("tandem"))
        .ok_or_else(|| err!("unexpected location {}", exe.display()))?;
    if !bin.exists() {
        return Err(err!(
            "{} is not built: run `cargo build --workspace --bins` (scripts/demo does)",
            bin.display()
        ));
    }
    Ok(bin)
}

fn shell_word(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Prints each event of `tandem remote events` as it arrives, one short line each.
fn print_events(tandem: &Path, api: &Path) -> harness::Result<Child> {
    let mut child = Command::new(tandem)
        .args(["remote", "--api-socket"])
        .arg(api)
        .arg("events")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| err!("tandem remote events: {e}"))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| err!("tandem remote events: no stdout"))?;
    std::thread::spawn(move || {
        let mut first = None;
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let ns = e["mono_ns"].as_u64().unwrap_or(0);
            let t0 = *first.get_or_insert(ns);
            let mut text = format!(
                "event> +{:.3} s {}",
                ns.saturating_sub(t0) as f64 / 1e9,
                e["type"].as_str().unwrap_or("?")
            );
            if let Some(d) = e["device"].as_str() {
                text.push_str(&format!(" {d}"));
            }
            for k in ["slot", "asked", "cause", "boot", "reason"] {
                if !e[k].is_null() {
                    text.push_str(&format!(" {k}={}", e[k]));
                }
            }
            println!("{text}");
        }
    });
    Ok(child)
}

/// Boots the guest here and prints the transcript.
fn demo(mode: Mode, why: &str) -> harness::Result<()> {
    let tandem = tandem_bin()?;
    let env = harness::GuestEnv::new(mode, "demo", harness::GuestKernel::Stable)?;
    let guest = &env.guest;
    let (run, logs) = (env.rundir.clone(), env.workdir.clone());
    let serial = run.join("serial.sock");
    let api = run.join("api.sock");
    let console = logs.join("guest-console.log");
    let tandem_log = logs.join("tandem.log");

    println!("# Tandem demo, mode {mode} ({why})");
    if harness::mode::in_testhost() {
        let l1 = Command::new("uname")
            .arg("-r")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        println!("# the host here is the test host L1 (Linux {l1} under QEMU TCG, kvm_amd)");
    }
    println!(
        "# guest: Debian kernel {}, busybox initramfs with the serial agent",
        guest.kernel_version
    );
    let _tap0 = env.tap("tdemo0")?;
    println!(
        "# tap tdemo0 on bridge {} ({}, the guest's peer)",
        env.bridge, env.peer_ip
    );
    let vf = env.vfio_nics.first().cloned();
    println!("# the guest gets a virtio-net NIC with STANDBY (standby=on): its kernel builds a");
    println!("# net_failover master over it");
    match &vf {
        Some(n) => println!(
            "# and the primary: host NIC {} (bound to vfio-pci, permanent MAC {}), passed through\n# with failover=net0: hidden until the guest's virtio_net acks STANDBY, then plugged in slot 6",
            n.bdf, n.mac
        ),
        None => println!("# (no passthrough NIC here, set TANDEM_VFIO_NICS=BDF=MAC: the standby alone)"),
    }
    let args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        guest.kernel.display().to_string(),
        "--initramfs".into(),
        guest.initramfs.display().to_string(),
        "--cmdline".into(),
        guest.cmdline(),
        "--cpus".into(),
        "boot=2".into(),
        "--memory".into(),
        "size=512M".into(),
        "--serial".into(),
        format!("socket={}", serial.display()),
        "--api-socket".into(),
        api.display().to_string(),
        "--net".into(),
        format!("id=net0,tap=tdemo0,mac={MAC0},standby=on,slot=3"),
    ];
    let mut args = args;
    let dev_spec = vf.as_ref().map(|n| {
        format!(
            "id=vf0,path=/sys/bus/pci/devices/{},failover=net0,slot=6",
            n.bdf
        )
    });
    if let Some(d) = &dev_spec {
        args.extend(["--device".into(), d.clone()]);
    }
    let words: Vec<String> = args.iter().map(|a| shell_word(a)).collect();
    println!("$ {} {} &", tandem.display(), words.join(" "));
    let t0 = Instant::now();
    let child = Command::new(&tandem)
        .args(&args)
        .env("TANDEM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(&tandem_log)
                .map_err(|e| err!("cannot create {}: {e}", tandem_log.display()))?,
        )
        .spawn()
        .map_err(|e| err!("cannot start {}: {e}", tandem.display()))?;
    let mut vm = Tandem(child);
    let log_tail = || {
        let t = std::fs::read_to_string(&tandem_log).unwrap_or_default();
        let v: Vec<&str> = t.lines().collect();
        v[v.len().saturating_sub(5)..].join(" | ")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.exists() {
        if Instant::now() > deadline {
            return Err(err!("no API socket; tandem log: {}", log_tail()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "$ {} remote --api-socket {} events &   # printed as event> lines",
        tandem.display(),
        api.display()
    );
    let mut events = Tandem(print_events(&tandem, &api)?);
    let mut agent = Agent::connect_unix(&serial, console.clone())?;
    let init = agent
        .wait_for_line("TANDEM-INIT ", BOOT_TIMEOUT)
        .map_err(|e| err!("{e}; tandem log: {}", log_tail()))?;
    let init_s = t0.elapsed().as_secs_f64();
    let uptime = init
        .split("TANDEM-INIT ")
        .nth(1)
        .unwrap_or("?")
        .trim()
        .to_string();
    agent
        .wait_ready(BOOT_TIMEOUT)
        .map_err(|e| err!("{e}; tandem log: {}", log_tail()))?;
    let ready_s = t0.elapsed().as_secs_f64();
    println!(
        "# boot: the guest's /init ran {init_s:.2} s after tandem started (guest uptime {uptime} s); agent ready after {ready_s:.2} s"
    );
    println!("# guest commands below go through the agent on the guest's COM1 (tandem --serial socket=...)");
    let guest_cmd = |agent: &mut Agent, cmd: &str| -> harness::Result<String> {
        println!("guest# {cmd}");
        let out = agent.run(cmd, Duration::from_secs(60))?;
        if !out.stdout.is_empty() {
            println!("{}", out.stdout);
        }
        if out.status != 0 {
            println!("# (exit status {})", out.status);
        }
        Ok(out.stdout)
    };
    for cmd in GUEST_COMMANDS {
        guest_cmd(&mut agent, cmd)?;
    }
    let remote_at = |api: &Path, args: &[&str]| -> harness::Result<()> {
        println!(
            "$ {} remote --api-socket {} {}",
            tandem.display(),
            api.display(),
            args.join(" ")
        );
        let out = Command::new(&tandem)
            .args(["remote", "--api-socket"])
            .arg(api)
            .args(args)
            .output()
            .map_err(|e| err!("tandem remote: {e}"))?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.trim().is_empty() {
            println!("{}", stderr.trim_end());
        }
        if !out.status.success() {
            return Err(err!(
                "tandem remote {} failed ({})",
                args.join(" "),
                out.status
            ));
        }
        Ok(())
    };
    let remote = |args: &[&str]| remote_at(&api, args);
    let sby = harness::guestnet::netdev_by_mac(&mut agent, MAC0)?;
    let master = guest_cmd(
        &mut agent,
        &format!("basename $(readlink /sys/class/net/{sby}/master)"),
    )?;
    let master = master.trim().to_string();
    let want = if vf.is_some() { 2 } else { 1 };
    let slaves = |n: usize| {
        format!("i=0; until [ $(ls -d /sys/class/net/{master}/lower_* | wc -l) -eq {n} ] || [ $i -ge 300 ]; do i=$((i+1)); usleep 100000; done; ls -d /sys/class/net/{master}/lower_*")
    };
    println!("# {master} is the failover master, {sby} its standby slave (phys_port_name sby):");
    guest_cmd(
        &mut agent,
        &format!("cat /sys/class/net/{sby}/phys_port_name; {}", slaves(want)),
    )?;
    let primary = if vf.is_some() {
        let p = guest_cmd(
            &mut agent,
            &format!("for l in /sys/class/net/{master}/lower_*; do n=${{l##*lower_}}; [ $n != {sby} ] && echo $n; done; true"),
        )?;
        let p = p.trim().to_string();
        println!("# {p} is the primary (the passed-through NIC, driver e1000e, in slot 6):");
        guest_cmd(&mut agent, &format!("basename $(readlink /sys/class/net/{p}/device/driver); basename $(readlink -f /sys/class/net/{p}/device)"))?;
        Some(p)
    } else {
        None
    };
    println!(
        "# slaves may be renamed while UP (Linux 8065a779): the standby becomes {master}nsby{}",
        if primary.is_some() {
            ", the primary ens6"
        } else {
            ""
        }
    );
    guest_cmd(
        &mut agent,
        "for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 > $f; done",
    )?;
    let mut rename = format!(
        "ip link set {master} up; ip link set {sby} up; ip link set {sby} name {master}nsby"
    );
    if let Some(p) = &primary {
        rename.push_str(&format!("; ip link set {p} up; ip link set {p} name ens6"));
    }
    rename.push_str(&format!("; ip -o link | grep {master}"));
    guest_cmd(&mut agent, &rename)?;
    let p = env.peer_ip.clone();
    let counters = if primary.is_some() {
        format!("for n in ens6 {master}nsby; do echo \"$n tx_packets $(cat /sys/class/net/$n/statistics/tx_packets 2>/dev/null || echo gone)\"; done")
    } else {
        format!("echo \"{master}nsby tx_packets $(cat /sys/class/net/{master}nsby/statistics/tx_packets)\"")
    };
    let ping = |agent: &mut Agent, n: u32| -> harness::Result<String> {
        guest_cmd(
            agent,
            &format!("{counters}; i=0; while ! ping -c 1 -W 1 {p} >/dev/null 2>&1 && [ $i -lt 20 ]; do i=$((i+1)); done; ping -c {n} -i 0.2 -W 2 {p} | tail -2; {counters}"),
        )
    };
    guest_cmd(&mut agent, &format!("ip addr add 10.0.0.2/24 dev {master}"))?;
    ping(&mut agent, 20)?;

    if let Some(spec) = &dev_spec {
        println!(
            "# the primary carried the pings. Now an orderly removal through the API: the guest"
        );
        println!(
            "# is asked to eject it (ACPI), releases it, and net_failover moves to the standby;"
        );
        println!("# Tandem announces the guest's MAC through the standby's tap (RARP) so the bridge follows");
        remote(&["remove-device", "vf0"])?;
        guest_cmd(&mut agent, &slaves(1))?;
        ping(&mut agent, 20)?;
        println!("# and back, into the same slot: re-enslaved, traffic moves back to the primary");
        remote(&["add-device", spec])?;
        guest_cmd(&mut agent, &slaves(2))?;
        guest_cmd(
            &mut agent,
            &format!("for l in /sys/class/net/{master}/lower_*; do n=${{l##*lower_}}; [ $n != {master}nsby ] && ip link set $n name ens6; done; ip link set ens6 up; ip -o link show ens6"),
        )?;
        ping(&mut agent, 20)?;
    }
    remote(&["info"])?;

    // Live migration to a second Tandem on this host, with its own tap.
    println!(
        "# live migration: a passthrough NIC cannot move, so once the destination has accepted"
    );
    println!(
        "# the VM, Tandem takes the primary off itself (orderly eject, net_failover moves to the"
    );
    println!(
        "# standby) before any memory is copied; the guest moves over TCP to a second Tandem with"
    );
    println!(
        "# its own tap (tdemo1) while it pings the peer, and gets a primary with the same MAC in"
    );
    println!(
        "# the same slot there. Had the migration failed, the primary would be plugged back here."
    );
    let _tap1 = env.tap("tdemo1")?;
    let (serial2, api2) = (run.join("serial2.sock"), run.join("api2.sock"));
    let url = "tcp:127.0.0.1:7700";
    let args2: Vec<String> = vec![
        "run".into(),
        "--incoming".into(),
        url.into(),
        "--serial".into(),
        format!("socket={}", serial2.display()),
        "--api-socket".into(),
        api2.display().to_string(),
        "--net".into(),
        "id=net0,tap=tdemo1".into(),
    ];
    // The destination's own primary for the standby (here the test host's second
    // e1000e): plugged into the same slot as soon as the migrated standby reports the
    // guest's STANDBY ack.
    let dest_primary = env.vfio_nics.get(1).map(|n| {
        format!(
            "id=vf0,path=/sys/bus/pci/devices/{},failover=net0,slot=6",
            n.bdf
        )
    });
    let mut args2 = args2;
    if let Some(spec) = &dest_primary {
        args2.extend(["--device".to_string(), spec.clone()]);
    }
    println!("$ {} {} &", tandem.display(), args2.join(" "));
    let tandem_log2 = logs.join("tandem-destination.log");
    let child2 = Command::new(&tandem)
        .args(&args2)
        .env("TANDEM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(&tandem_log2)
                .map_err(|e| err!("cannot create {}: {e}", tandem_log2.display()))?,
        )
        .spawn()
        .map_err(|e| err!("cannot start {}: {e}", tandem.display()))?;
    let vm2 = Tandem(child2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&tandem_log2)
        .unwrap_or_default()
        .contains("waiting for a migration")
    {
        if Instant::now() > deadline {
            return Err(err!("the destination does not listen on {url}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "$ {} remote --api-socket {} events &   # the destination's events (its API answers while it waits)",
        tandem.display(),
        api2.display()
    );
    let events2 = Tandem(print_events(&tandem, &api2)?);
    guest_cmd(
        &mut agent,
        &format!("(ping -i 0.1 {p} > /tmp/ping.log 2>&1 &); sleep 1; tail -1 /tmp/ping.log"),
    )?;
    remote(&["send-migration", url])?;
    let status = vm.0.wait().map_err(|e| err!("{e}"))?;
    let _ = events.0.wait();
    events = events2;
    println!("# the source tandem exited ({status}); the guest runs in the destination now");
    drop(agent);
    let mut agent = Agent::connect_unix(&serial2, logs.join("guest-console-destination.log"))?;
    agent.assume_ready();
    println!("# the ping never stopped: the guest's own count, then its address and slaves");
    guest_cmd(
        &mut agent,
        "killall -INT ping; sleep 0.5; tail -2 /tmp/ping.log",
    )?;
    guest_cmd(
        &mut agent,
        &format!("ip -o -4 addr show {master}; ls -d /sys/class/net/{master}/lower_*"),
    )?;
    if dest_primary.is_some() {
        println!("# the destination's --device: a primary with the same MAC, in the same slot, plugged by");
        println!("# Tandem itself once the migrated standby reported STANDBY acked (no API call)");
        guest_cmd(&mut agent, &slaves(2))?;
        guest_cmd(
            &mut agent,
            &format!("for l in /sys/class/net/{master}/lower_*; do n=${{l##*lower_}}; [ $n != {master}nsby ] && ip link set $n name ens6; done; ip link set ens6 up; ip -o link show ens6"),
        )?;
        ping(&mut agent, 20)?;
    }
    remote_at(&api2, &["info"])?;
    let mut vm = vm2;

    println!("guest# poweroff -f");
    let t_off = Instant::now();
    // The agent never answers: the guest is gone.
    let _ = agent.run("poweroff -f", Duration::from_secs(2));
    let status = loop {
        if let Some(st) = vm.0.try_wait().map_err(|e| err!("{e}"))? {
            break st;
        }
        if t_off.elapsed() > Duration::from_secs(30) {
            return Err(err!(
                "tandem still running 30 s after poweroff -f; log: {}",
                log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The event stream ends with the VMM (vm-shutdown is its last line).
    let _ = events.0.wait();
    println!(
        "# tandem exited ({status}) {:.2} s after poweroff -f",
        t_off.elapsed().as_secs_f64()
    );
    if !status.success() {
        return Err(err!(
            "tandem exited with {status} after poweroff; log: {}",
            log_tail()
        ));
    }
    drop(agent);
    if !harness::mode::in_testhost() {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(())
}

/// Test-host mode, middle process: runs the demo in L1 (its output arrives on stderr as
/// `[testhost] ...` lines, which the parent unwraps).
fn relay() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("demo: cannot find this program: {e}");
            return ExitCode::FAILURE;
        }
    };
    match harness::testhost::TestHost::new("demo").run(&[exe.display().to_string()]) {
        Ok(o) if o.status == 0 => ExitCode::SUCCESS,
        Ok(o) => {
            eprintln!(
                "demo: failed inside the test host (exit {}); work dir kept: {}",
                o.status,
                o.workdir.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let (mode, why) = match Mode::detect() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::var_os(RELAY_ENV).is_some() {
        return relay();
    }
    if mode == Mode::TestHost && !harness::mode::in_testhost() {
        // Outer process: run the relay as a child and print its L1 output unprefixed.
        println!("# /dev/kvm here cannot boot Linux ({why}): running the demo inside a test host");
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("demo: cannot find this program: {e}");
                return ExitCode::FAILURE;
            }
        };
        let t0 = Instant::now();
        let mut child = match Command::new(exe)
            .env(RELAY_ENV, "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("demo: cannot start the relay: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                match line.strip_prefix("[testhost] ") {
                    Some(l) => println!("{l}"),
                    None if line.starts_with("testhost: ") => println!("# {line}"),
                    None => eprintln!("{line}"),
                }
            }
        }
        let ok = child.wait().map(|s| s.success()).unwrap_or(false);
        println!(
            "# whole demo, including any wait for the test-host lock: {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    // Direct mode shares the machine with guest tests: take their lock.
    let _lock = if mode == Mode::Direct {
        match harness::image::FileLock::exclusive(Path::new(harness::testhost::LOCK_PATH)) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("demo: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    match demo(mode, &why) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
