//! Boot benchmark: Tandem against QEMU-KVM on the same test guest.
//!
//! `cargo run --release -p tests --example bench-boot [-- --runs N]`
//!
//! Boots the test guest N times (default 5) with `target/release/tandem` and N times with
//! the harness's reference QEMU (`harness::QemuVm`: `-machine q35 -accel kvm -cpu host
//! -nodefaults`, SeaBIOS, direct kernel boot), both with 1 vCPU, 512M and the same kernel,
//! initramfs and command line; runs alternate (Tandem, QEMU, Tandem, ...). Per boot it
//! measures, on the host's wall clock from just before the VMM process is spawned:
//! the guest's `TANDEM-INIT <uptime>` line on the serial socket (and the uptime the guest
//! printed in it), `@@AGENT-READY@@`, and the VMM's VmRSS once the agent has answered a
//! command. When /dev/kvm cannot boot Linux, everything runs inside ONE test host: this
//! program re-executes itself in L1 and prints the table here.
//!
//! A boot that fails is listed with its error and makes the exit status 1.

use std::path::Path;
use std::time::Duration;

use harness::bench::{self, Bench, BenchReport, Dirs, VmSpec};
use harness::{err, GuestImage, Mode};
use serde::{Deserialize, Serialize};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const RESULT_TAG: &str = "@@BENCH-RESULT@@ ";

const BENCH: Bench = Bench {
    name: "bench-boot",
    result_tag: RESULT_TAG,
    build_hint: "cargo build --release -p vmm --bins",
    testhost_note: "all boots run inside one test host",
    failed_note: "some boots failed",
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Sample {
    vmm: String,
    run: usize,
    error: Option<String>,
    /// Host wall clock: spawn to the `TANDEM-INIT` line (s).
    init_s: Option<f64>,
    /// The guest's /proc/uptime printed in that line (s).
    guest_uptime_s: Option<f64>,
    /// Host wall clock: spawn to `@@AGENT-READY@@` (s).
    ready_s: Option<f64>,
    /// The VMM's VmRSS after the agent answered a command (KiB).
    rss_kib: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Report {
    /// (label, value) lines describing where the boots ran.
    env: Vec<(String, String)>,
    samples: Vec<Sample>,
}

struct Args {
    runs: usize,
}

fn parse_args() -> Args {
    let mut runs = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                    eprintln!("bench-boot: --runs needs a positive number");
                    std::process::exit(2)
                })
            }
            "-h" | "--help" => {
                println!("usage: cargo run --release -p tests --example bench-boot [-- --runs N]");
                std::process::exit(0)
            }
            other => {
                eprintln!("bench-boot: unknown argument {other:?} (usage: bench-boot [--runs N])");
                std::process::exit(2)
            }
        }
    }
    if runs == 0 {
        eprintln!("bench-boot: --runs must be at least 1");
        std::process::exit(2)
    }
    Args { runs }
}

fn vm_rss_kib(pid: u32) -> harness::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| err!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| err!("no VmRSS in /proc/{pid}/status"))
}

/// One boot: fills `s` as far as it gets.
fn boot_once(
    vmm: &str,
    run: usize,
    tandem: &Path,
    guest: &GuestImage,
    dirs: &Dirs,
    s: &mut Sample,
) -> harness::Result<()> {
    let name = format!("{vmm}-{run}");
    let spec = VmSpec {
        cpus: 1,
        mem_mib: 512,
        tandem_args: &[],
        qemu_args: &[],
    };
    let proc = bench::spawn_vmm(vmm, &name, tandem, guest, dirs, &spec)?;
    let t0 = proc.t0;
    let fail = |e: harness::Error| proc.fail(e);
    let mut agent = proc.connect()?;
    let line = agent
        .wait_for_line("TANDEM-INIT ", BOOT_TIMEOUT)
        .map_err(fail)?;
    s.init_s = Some(t0.elapsed().as_secs_f64());
    // SeaBIOS leaves escape sequences at the start of QEMU's first line.
    s.guest_uptime_s = line
        .split("TANDEM-INIT ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    if s.guest_uptime_s.is_none() {
        return Err(fail(err!("cannot parse the uptime in {line:?}")));
    }
    agent
        .wait_ready(BOOT_TIMEOUT.saturating_sub(t0.elapsed()))
        .map_err(fail)?;
    s.ready_s = Some(t0.elapsed().as_secs_f64());
    agent.run_ok("cat /proc/uptime").map_err(fail)?;
    s.rss_kib = Some(vm_rss_kib(proc.vmm.pid())?);
    drop(agent);
    drop(proc);
    Ok(())
}

/// Runs every boot here (direct mode, or inside the test host).
fn measure(args: &Args, mode: Mode, why: &str) -> harness::Result<Report> {
    let tandem = BENCH.tandem_bin()?;
    let guest = harness::image::test_guest()?;
    let dirs = BENCH.dirs()?;
    // Both VMMs read the same files: read them once so neither pays for a cold cache.
    for f in [&guest.kernel, &guest.initramfs] {
        std::fs::read(f).map_err(|e| err!("cannot read {}: {e}", f.display()))?;
    }
    let mut env = bench::env_header(mode, why);
    env.push((
        "guest".into(),
        format!(
            "Debian kernel {}, 1 vCPU, 512M, cmdline `{}`",
            bench::kernel_version(&guest),
            guest.cmdline()
        ),
    ));
    env.push(("tandem".into(), bench::describe_tandem(&tandem)));
    env.push((
        "qemu".into(),
        format!(
            "{}; -machine q35 -accel kvm -cpu host -nodefaults, SeaBIOS, -kernel/-initrd",
            bench::cmd_line(&harness::qemu::reference_qemu(), &["--version"])
        ),
    ));

    let mut samples = Vec::new();
    for run in 1..=args.runs {
        for vmm in ["tandem", "qemu"] {
            let mut s = Sample {
                vmm: vmm.into(),
                run,
                ..Sample::default()
            };
            if let Err(e) = boot_once(vmm, run, &tandem, &guest, &dirs, &mut s) {
                s.error = Some(e.to_string());
            }
            match &s.error {
                None => eprintln!(
                    "bench-boot: {vmm} run {run}: TANDEM-INIT {:.2} s (guest uptime {:.2} s), agent ready {:.2} s, VmRSS {} MiB",
                    s.init_s.unwrap_or(0.0),
                    s.guest_uptime_s.unwrap_or(0.0),
                    s.ready_s.unwrap_or(0.0),
                    s.rss_kib.unwrap_or(0) / 1024
                ),
                Some(e) => eprintln!("bench-boot: {vmm} run {run}: FAILED: {e}"),
            }
            samples.push(s);
        }
    }
    dirs.finish(samples.iter().all(|s| s.error.is_none()));
    Ok(Report { env, samples })
}

fn print_report(r: &Report) {
    bench::print_env(&r.env, 16);
    let n = |vmm: &str| r.samples.iter().filter(|s| s.vmm == vmm).count();
    let ok = |vmm: &str| {
        r.samples
            .iter()
            .filter(|s| s.vmm == vmm && s.error.is_none())
            .count()
    };
    println!();
    println!(
        "Boots: Tandem {}/{} ok, QEMU {}/{} ok (alternating, 1 vCPU, 512M)",
        ok("tandem"),
        n("tandem"),
        ok("qemu"),
        n("qemu")
    );
    type Get = fn(&Sample) -> Option<f64>;
    let metrics: [(&str, Get, &str); 5] = [
        ("spawn -> TANDEM-INIT (host wall)", |s| s.init_s, "s"),
        ("guest uptime at TANDEM-INIT", |s| s.guest_uptime_s, "s"),
        (
            "spawn -> kernel clock 0 (wall - uptime)",
            |s| Some(s.init_s? - s.guest_uptime_s?),
            "s",
        ),
        ("spawn -> @@AGENT-READY@@", |s| s.ready_s, "s"),
        (
            "VMM VmRSS after 1st agent command",
            |s| s.rss_kib.map(|k| k as f64 / 1024.0),
            "MiB",
        ),
    ];
    println!();
    println!(
        "{:<42} {:<24} {:<24} Tandem/QEMU",
        "metric", "Tandem median (min-max)", "QEMU median (min-max)"
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
        let (t, q) = (col("tandem"), col("qemu"));
        let prec = if unit == "MiB" { 1 } else { 2 };
        let fmt = |x: Option<(f64, f64, f64)>| match x {
            Some(st) => bench::fmt_range(st, prec, unit),
            None => "no successful boot".into(),
        };
        let ratio = bench::ratio(t.map(|s| s.0), q.map(|s| s.0));
        println!("{name:<42} {:<24} {:<24} {ratio}", fmt(t), fmt(q));
    }
    bench::print_failures(
        "boots",
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
    let args = parse_args();
    let relaunch = ["--runs".to_string(), args.runs.to_string()];
    BENCH.main(&relaunch, |mode, why| measure(&args, mode, why));
}
