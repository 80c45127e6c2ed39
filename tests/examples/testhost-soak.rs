//! The test-host soaks: `N` fresh test hosts (L1), each running one short scenario,
//! counting how each run ended.
//!
//! ```text
//! cargo run -p tests --example testhost-soak -- [--runs N]
//! TANDEM_TESTHOST_QEMU=$(scripts/qemu-7.2) cargo run -p tests --example testhost-soak -- --runs 100
//! cargo run -p tests --example testhost-soak -- --scenario e1000e --runs 2 --probes 50
//! ```
//!
//! Scenarios:
//! - `tandem` (the default; the L1 freeze soak): a Tandem guest with a virtio-net NIC boots,
//!   pings the peer and powers off.
//! - `e1000e` (the passthrough-probe soak): the reference QEMU boots the test guest with one
//!   of L1's emulated e1000e NICs passed through (VFIO); the guest reloads e1000e with its
//!   default interrupt throttling and probes the NIC `--probes` times (unbind, bind, link
//!   up, ping). QEMU 7.2's emulated e1000e aborted on its throttling timer about once in
//!   35 such probes (`e1000e_intrmgr_on_throttling_timer: Assertion '!msix_enabled'`),
//!   killing L1; this counts probes and aborts for the QEMU that runs L1.
//!
//! A run ends as `ok`, `woken` (L1's heartbeat stopped, the watchdog's wake-up brought it
//! back and the scenario passed: see `stall_kick`), `guest-failed` (the scenario failed
//! inside a live L1: Tandem's or the guest's problem, not the test host's), `froze` (L1's
//! heartbeat stopped for good: the L1 freeze this soak hunts; L1's registers are saved as
//! `l1-registers-stall-1.txt` when it stalled and `l1-registers.txt` at the end), `hung`
//! (L1 alive but past its boot or job timeout), or `died` (the outer QEMU aborted or was
//! killed). The binaries are copied first, so rebuilding the tree during a soak changes
//! nothing. Work dirs of runs that did not end `ok` are kept under `target/tandem-runs/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::guestnet::{netdev_by_mac, up_and_ping};
use harness::tandem::Tandem;
use harness::testhost::{testhost_qemu, Session, TestHost};
use harness::QemuVm;

const MAC: &str = "52:54:00:50:4b:01";

/// Inside L1: boot a Tandem guest with one NIC, ping the peer, power off.
fn inner_tandem() {
    harness::run_guest_test("soak", "testhost_soak", |env| {
        let _tap = env.tap("tdsoak0")?;
        let mut vm = Tandem::spawn(
            env,
            "soak",
            &["--net", &format!("id=net0,tap=tdsoak0,mac={MAC}")],
        )?;
        let mut agent = vm.agent(env, "soak")?;
        let dev = netdev_by_mac(&mut agent, MAC)?;
        up_and_ping(&mut agent, &dev, "10.0.0.2")?;
        let _ = agent.run("poweroff -f", Duration::from_secs(2));
        let st = vm.wait_exit(Duration::from_secs(30))?;
        if st != 0 {
            return Err(harness::err!("tandem exited {st} after poweroff").into());
        }
        Ok(())
    });
    println!("SOAK-RUN-OK");
}

/// Inside L1: the reference QEMU with a passed-through e1000e; `probes` driver probes
/// with the driver's default interrupt throttling. Prints `PROBE-OK <k>` after each.
fn inner_e1000e(probes: u32) {
    harness::run_guest_test("soak", "e1000e_probe_soak", |env| {
        let Some(nics) = env.vfio_nics_or_skip(1) else {
            return Err("no VFIO NIC in the test host".into());
        };
        let vm = QemuVm::builder(&env.guest, &env.rundir, "probe")
            .mem_mib(512)
            .vfio("hostdev0", &nics[0].bdf, None)
            .spawn()?;
        let mut agent = vm.agent(env.workdir.join("probe.console.log"))?;
        agent.wait_ready(Duration::from_secs(120))?;
        // Reload e1000e without the harness's InterruptThrottleRate=0: the driver's default.
        let itr = agent.run_ok(
            "ko=$(grep /e1000e.ko /etc/tandem-modules | cut -d' ' -f1); rmmod e1000e && insmod $ko && \
             dmesg | grep -i 'interrupt throttling rate' | tail -n 1",
        )?;
        eprintln!("e1000e reloaded: {}", itr.trim());
        let dev = "d=; for n in /sys/class/net/*; do x=$(readlink $n/device/driver); [ \"${x##*/}\" = e1000e ] && d=${n##*/}; done";
        let probe = format!(
            "{dev}; [ -n \"$d\" ] || exit 3; b=$(basename $(readlink -f /sys/class/net/$d/device)); \
             echo $b > /sys/bus/pci/drivers/e1000e/unbind; echo $b > /sys/bus/pci/drivers/e1000e/bind; \
             i=0; while :; do {dev}; [ -n \"$d\" ] && break; i=$((i+1)); [ $i -gt 50 ] && exit 4; usleep 100000; done; \
             ip link set $d up; ip addr add 10.0.0.2/24 dev $d 2>/dev/null; \
             i=0; until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 20 ] && exit 5; done; echo ok",
            peer = harness::PEER_IP
        );
        for k in 1..=probes {
            let t0 = Instant::now();
            let out = agent.run(&probe, Duration::from_secs(90))?;
            if out.status != 0 {
                return Err(harness::err!(
                    "probe {k} failed (status {}): {}",
                    out.status,
                    out.stdout
                )
                .into());
            }
            println!("PROBE-OK {k} {:.1}", t0.elapsed().as_secs_f64());
        }
        Ok(())
    });
    println!("SOAK-RUN-OK");
}

fn die(e: impl std::fmt::Display) -> ! {
    eprintln!("testhost-soak: {e}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--inner-tandem") => return inner_tandem(),
        Some("--inner-e1000e") => {
            return inner_e1000e(args.get(1).and_then(|p| p.parse().ok()).unwrap_or(1))
        }
        _ => {}
    }
    let mut runs: u32 = 300;
    let mut probes: u32 = 50;
    let mut scenario = String::from("tandem");
    let mut it = args.iter();
    let number = |v: Option<&String>, what: &str| -> u32 {
        v.and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| die(format_args!("{what} takes a whole number above 0")))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = number(it.next(), "--runs"),
            "--probes" => probes = number(it.next(), "--probes"),
            "--scenario" => match it.next().map(String::as_str) {
                Some(s @ ("tandem" | "e1000e")) => scenario = s.to_string(),
                other => die(format_args!("--scenario takes tandem or e1000e, not {other:?}")),
            },
            other => die(format_args!(
                "unknown argument {other:?} (usage: testhost-soak [--runs N] [--scenario tandem|e1000e] [--probes N])"
            )),
        }
    }

    // Copy this program and tandem aside: a rebuild during the soak must not change them.
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| die(format_args!("cannot find this program: {e}")));
    let profile = exe
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| die("unexpected example location"));
    let target = harness::image::target_dir().unwrap_or_else(|e| die(e));
    let dir = target.join(format!("tandem-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(format_args!("{}: {e}", dir.display())));
    let dir = dir.canonicalize().unwrap_or_else(|e| die(e));
    let (soak_bin, tandem_bin) = (dir.join("testhost-soak"), dir.join("tandem"));
    for (from, to) in [
        (exe.clone(), &soak_bin),
        (profile.join("tandem"), &tandem_bin),
    ] {
        std::fs::copy(&from, to).unwrap_or_else(|e| {
            die(format_args!(
                "cannot copy {} ({e}); run `cargo build --workspace --bins` first",
                from.display()
            ))
        });
    }

    let qemu = testhost_qemu();
    let version = harness::bench::cmd_line(&qemu, &["--version"]);
    eprintln!(
        "testhost-soak: scenario {scenario}, {runs} fresh test hosts with {qemu} ({version})"
    );
    let inner: Vec<String> = match scenario.as_str() {
        "e1000e" => vec![
            soak_bin.display().to_string(),
            "--inner-e1000e".into(),
            probes.to_string(),
        ],
        _ => vec![soak_bin.display().to_string(), "--inner-tandem".into()],
    };
    let mut probes_ok = 0usize;
    let started = Instant::now();
    let mut counts: Vec<(&str, u32)> = [
        "ok",
        "woken",
        "guest-failed",
        "froze",
        "hung",
        "died",
        "other",
    ]
    .iter()
    .map(|k| (*k, 0))
    .collect();
    let mut kept = Vec::new();
    let mut boot_secs = Vec::new();
    for i in 1..=runs {
        let mut host = TestHost::new("soak");
        host.job_timeout = Duration::from_secs(300 + 60 * u64::from(probes));
        host.env
            .push(("TANDEM_BIN".into(), tandem_bin.display().to_string()));
        let t0 = Instant::now();
        let (result, text, stalls) = match Session::boot(&host) {
            Ok(mut s) => {
                let r = s.run_job("soak", &inner);
                (r, s.output(), s.stalls().to_vec())
            }
            Err(e) => (Err(e), String::new(), Vec::new()),
        };
        // Probes that passed, also in a run that ended with L1's death.
        probes_ok += text.matches("PROBE-OK ").count();
        let (kind, detail) = match result {
            Ok(o) if o.status == 0 && o.output.contains("SOAK-RUN-OK") && !stalls.is_empty() => {
                kept.push(format!("{}: {}", o.workdir.display(), stalls.join("; ")));
                ("woken", stalls.join("; "))
            }
            Ok(o) if o.status == 0 && o.output.contains("SOAK-RUN-OK") => {
                boot_secs.push(o.boot_time.as_secs_f64());
                (
                    "ok",
                    format!("L1 ready in {:.1} s", o.boot_time.as_secs_f64()),
                )
            }
            Ok(o) => {
                kept.push(o.workdir.display().to_string());
                (
                    "guest-failed",
                    format!("job exit {}, work dir {}", o.status, o.workdir.display()),
                )
            }
            Err(e) => {
                let e = e.to_string();
                let kind = if e.contains("froze") {
                    "froze"
                } else if e.contains("hung") {
                    "hung"
                } else if e.contains("died") {
                    "died"
                } else {
                    "other"
                };
                kept.push(e.clone());
                (kind, e)
            }
        };
        if let Some(c) = counts.iter_mut().find(|(k, _)| *k == kind) {
            c.1 += 1;
        }
        let tally: Vec<String> = counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        eprintln!(
            "testhost-soak: run {i}/{runs}: {kind} in {:.1} s ({detail}); so far {}; {:.0} min elapsed",
            t0.elapsed().as_secs_f64(),
            tally.join(", "),
            started.elapsed().as_secs_f64() / 60.0
        );
    }
    boot_secs.sort_by(f64::total_cmp);
    let median = boot_secs.get(boot_secs.len() / 2).copied().unwrap_or(0.0);
    let tally: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let probed = if scenario == "e1000e" {
        format!("; {probes_ok} e1000e probes passed")
    } else {
        String::new()
    };
    let summary = format!(
        "SOAK {scenario}: {runs} fresh L1 boots with {version}: {}{probed}; median L1 ready in {median:.1} s; {:.0} min\n{}",
        tally.join(", "),
        started.elapsed().as_secs_f64() / 60.0,
        kept.iter().map(|k| format!("  kept: {k}\n")).collect::<String>()
    );
    print!("{summary}");
    let _ = std::fs::write(dir.join("summary.txt"), &summary);
    let bad = counts.iter().any(|(k, n)| *k != "ok" && *n > 0);
    std::process::exit(i32::from(bad));
}
