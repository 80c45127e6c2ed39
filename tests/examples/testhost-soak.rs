//! The test-host freeze soak: `N` fresh test hosts (L1), each running one short Tandem
//! guest scenario (boot, ping the peer, power off), counting how each run ended.
//!
//! ```text
//! cargo run -p tests --example testhost-soak -- [--runs N]
//! TANDEM_TESTHOST_QEMU=/opt/tandem/qemu-7.2/qemu-system-x86_64 cargo run -p tests --example testhost-soak -- --runs 100
//! ```
//!
//! A run ends as `ok`, `guest-failed` (the scenario failed inside a live L1: Tandem's or
//! the guest's problem, not the test host's), `froze` (L1's console heartbeat stopped:
//! the L1 freeze this soak hunts; L1's registers are saved as `l1-registers.txt`), `hung`
//! (L1 alive but past its boot or job timeout), or `died` (the outer QEMU aborted). The
//! binaries are copied first, so rebuilding the tree during a soak changes nothing.
//! Work dirs of runs that did not end `ok` are kept under `target/tandem-runs/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::guestnet::{netdev_by_mac, up_and_ping};
use harness::tandem::Tandem;
use harness::testhost::{testhost_qemu, TestHost};

const MAC: &str = "52:54:00:50:4b:01";

/// Inside L1: boot a Tandem guest with one NIC, ping the peer, power off.
fn inner() {
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

fn die(e: impl std::fmt::Display) -> ! {
    eprintln!("testhost-soak: {e}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--inner") {
        inner();
        return;
    }
    let mut runs: u32 = 300;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| die("--runs takes a whole number above 0"))
            }
            other => die(format_args!(
                "unknown argument {other:?} (usage: testhost-soak [--runs N])"
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
    eprintln!("testhost-soak: {runs} fresh test hosts with {qemu} ({version})");
    let started = Instant::now();
    let mut counts: Vec<(&str, u32)> = ["ok", "guest-failed", "froze", "hung", "died", "other"]
        .iter()
        .map(|k| (*k, 0))
        .collect();
    let mut kept = Vec::new();
    let mut boot_secs = Vec::new();
    for i in 1..=runs {
        let mut host = TestHost::new("soak");
        host.job_timeout = Duration::from_secs(300);
        host.env
            .push(("TANDEM_BIN".into(), tandem_bin.display().to_string()));
        let t0 = Instant::now();
        let (kind, detail) = match host.run(&[soak_bin.display().to_string(), "--inner".into()]) {
            Ok(o) if o.status == 0 && o.output.contains("SOAK-RUN-OK") => {
                boot_secs.push(o.boot_time.as_secs_f64());
                (
                    "ok",
                    format!("L1 to job {:.1} s", o.boot_time.as_secs_f64()),
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
    let summary = format!(
        "SOAK {runs} fresh L1 boots with {version}: {}; median L1 boot to job {median:.1} s; {:.0} min\n{}",
        tally.join(", "),
        started.elapsed().as_secs_f64() / 60.0,
        kept.iter().map(|k| format!("  kept: {k}\n")).collect::<String>()
    );
    print!("{summary}");
    let _ = std::fs::write(dir.join("summary.txt"), &summary);
    let bad = counts.iter().any(|(k, n)| *k != "ok" && *n > 0);
    std::process::exit(i32::from(bad));
}
