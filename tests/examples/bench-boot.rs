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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{err, Agent, GuestImage, Mode, QemuVm};
use serde::{Deserialize, Serialize};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const RESULT_TAG: &str = "@@BENCH-RESULT@@ ";

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

/// Output of a command's first line, or `?`.
fn cmd_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn kvm_module() -> String {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .map(|m| m.to_string())
        .unwrap_or_else(|| "none".into())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|k| format!("{} MiB", k / 1024))
        .unwrap_or_else(|| "?".into())
}

fn describe_machine(prefix: &str) -> Vec<(String, String)> {
    vec![(
        prefix.to_string(),
        format!(
            "Linux {}, {} x {}, {} RAM, KVM module {}",
            cmd_line("uname", &["-r"]),
            cmd_line("nproc", &[]),
            cpu_model(),
            mem_total(),
            kvm_module()
        ),
    )]
}

/// `target/release/`, from this example's location (`target/release/examples/bench-boot`).
fn profile_dir() -> harness::Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| err!("cannot find this program: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| err!("unexpected location {}", exe.display()))
}

fn tandem_bin() -> harness::Result<PathBuf> {
    let dir = profile_dir()?;
    if dir.file_name().and_then(|n| n.to_str()) != Some("release") {
        return Err(err!(
            "bench-boot measures the release build: run it as `cargo run --release -p tests --example bench-boot` (this is {})",
            dir.display()
        ));
    }
    let bin = dir.join("tandem");
    if !bin.exists() {
        return Err(err!(
            "{} is not built: run `cargo build --release -p vmm --bins` first",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Under `cargo run`, (re)build the release tandem so the benchmark never measures a stale binary.
fn build_tandem() -> harness::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    eprintln!("bench-boot: cargo build --release -p vmm --bins");
    let st = Command::new(cargo)
        .args(["build", "--release", "-p", "vmm", "--bins"])
        .status()
        .map_err(|e| err!("cannot run cargo: {e}"))?;
    if !st.success() {
        return Err(err!("cargo build --release -p vmm --bins failed ({st})"));
    }
    Ok(())
}

/// A running VMM under measurement; killed when dropped.
enum Vmm {
    Tandem(Child),
    Qemu(QemuVm),
}

impl Vmm {
    fn pid(&self) -> u32 {
        match self {
            Vmm::Tandem(c) => c.id(),
            Vmm::Qemu(q) => q.pid(),
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        match self {
            Vmm::Tandem(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Vmm::Qemu(q) => q.kill(),
        }
    }
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

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

struct Dirs {
    /// Sockets (a local filesystem).
    run: PathBuf,
    /// Logs (kept inside the test host's work dir when a boot fails).
    logs: PathBuf,
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
    let console = dirs.logs.join(format!("{name}.console.log"));
    let _ = std::fs::remove_file(&console);
    let vmm_log;
    let t0 = Instant::now();
    let (proc, serial) = if vmm == "tandem" {
        let serial = dirs.run.join(format!("{name}.serial"));
        let api = dirs.run.join(format!("{name}.api"));
        vmm_log = dirs.logs.join(format!("{name}.tandem.log"));
        let f = std::fs::File::create(&vmm_log).map_err(|e| err!("{e}"))?;
        let child = Command::new(tandem)
            .arg("run")
            .arg("--kernel")
            .arg(&guest.kernel)
            .arg("--initramfs")
            .arg(&guest.initramfs)
            .args(["--cmdline", &guest.cmdline()])
            .args(["--cpus", "boot=1", "--memory", "size=512M"])
            .arg("--serial")
            .arg(format!("socket={}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .map_err(|e| err!("cannot start {}: {e}", tandem.display()))?;
        (Vmm::Tandem(child), serial)
    } else {
        let q = QemuVm::builder(guest, &dirs.run, &name)
            .cpus(1)
            .mem_mib(512)
            .spawn()?;
        vmm_log = q.log.clone();
        let serial = q.serial.clone();
        (Vmm::Qemu(q), serial)
    };
    let fail = |e: harness::Error| {
        err!(
            "{e}; console: {:?}; {vmm} log: {:?}",
            tail(&console, 3),
            tail(&vmm_log, 3)
        )
    };
    let mut agent = Agent::connect_unix(&serial, console.clone()).map_err(fail)?;
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
    s.rss_kib = Some(vm_rss_kib(proc.pid())?);
    drop(agent);
    drop(proc);
    Ok(())
}

/// Runs every boot here (direct mode, or inside the test host).
fn measure(args: &Args, mode: Mode, why: &str) -> harness::Result<Report> {
    let tandem = tandem_bin()?;
    let guest = harness::image::test_guest()?;
    let pid = std::process::id();
    let logs = match std::env::var("TANDEM_WORKDIR") {
        Ok(w) => PathBuf::from(w).join("bench-boot"),
        Err(_) => harness::image::target_dir()?
            .join("tandem-runs")
            .join(format!("bench-boot-{pid}")),
    };
    let dirs = Dirs {
        run: PathBuf::from(format!("/tmp/tandem-bench-boot-{pid}")),
        logs,
    };
    for d in [&dirs.run, &dirs.logs] {
        std::fs::create_dir_all(d).map_err(|e| err!("cannot create {}: {e}", d.display()))?;
    }
    // Both VMMs read the same files: read them once so neither pays for a cold cache.
    for f in [&guest.kernel, &guest.initramfs] {
        std::fs::read(f).map_err(|e| err!("cannot read {}: {e}", f.display()))?;
    }
    let where_ = if harness::mode::in_testhost() {
        "L1 (test host)"
    } else {
        "this machine"
    };
    let mut env = vec![
        (
            "date".to_string(),
            cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
        ("mode".to_string(), format!("{mode} ({why})")),
    ];
    env.extend(describe_machine(where_));
    env.push((
        "guest".into(),
        format!(
            "Debian kernel {}, 1 vCPU, 512M, cmdline `{}`",
            if guest.kernel_version.is_empty() {
                "?"
            } else {
                &guest.kernel_version
            },
            guest.cmdline()
        ),
    ));
    env.push((
        "tandem".into(),
        format!(
            "{} ({}, git {})",
            tandem.display(),
            cmd_line(&tandem.display().to_string(), &["--version"]),
            cmd_line("git", &["describe", "--always", "--dirty"])
        ),
    ));
    env.push((
        "qemu".into(),
        format!(
            "{}; -machine q35 -accel kvm -cpu host -nodefaults, SeaBIOS, -kernel/-initrd",
            cmd_line("qemu-system-x86_64", &["--version"])
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
    let _ = std::fs::remove_dir_all(&dirs.run);
    if samples.iter().all(|s| s.error.is_none()) && !harness::mode::in_testhost() {
        let _ = std::fs::remove_dir_all(&dirs.logs);
    }
    Ok(Report { env, samples })
}

fn stats(v: &mut [f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((med, v[0], v[n - 1]))
}

fn print_report(r: &Report) {
    println!();
    println!("Environment");
    for (k, v) in &r.env {
        println!("  {k:<16} {v}");
    }
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
            let mut v: Vec<f64> = r
                .samples
                .iter()
                .filter(|s| s.vmm == vmm && s.error.is_none())
                .filter_map(get)
                .collect();
            stats(&mut v)
        };
        let (t, q) = (col("tandem"), col("qemu"));
        let prec = if unit == "MiB" { 1 } else { 2 };
        let fmt = |x: Option<(f64, f64, f64)>| match x {
            Some((m, lo, hi)) => {
                format!("{m:.prec$} ({lo:.prec$}-{hi:.prec$}) {unit}")
            }
            None => "no successful boot".into(),
        };
        let ratio = match (t, q) {
            (Some((a, _, _)), Some((b, _, _))) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        println!("{name:<42} {:<24} {:<24} {ratio}", fmt(t), fmt(q));
    }
    let failed: Vec<&Sample> = r.samples.iter().filter(|s| s.error.is_some()).collect();
    if !failed.is_empty() {
        println!();
        println!("FAILED boots ({}):", failed.len());
        for s in failed {
            println!(
                "  {} run {}: {}",
                s.vmm,
                s.run,
                s.error.as_deref().unwrap_or("")
            );
        }
    }
}

fn failed(r: &Report) -> bool {
    r.samples.iter().any(|s| s.error.is_some())
}

fn main() {
    let args = parse_args();
    let (mode, why) = match Mode::detect() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bench-boot: {e}");
            std::process::exit(1)
        }
    };
    if harness::mode::in_testhost() || mode == Mode::Direct {
        // Direct mode shares the machine with guest tests: take their lock.
        let _lock = if mode == Mode::Direct {
            eprintln!(
                "bench-boot: mode direct ({why}); waiting for {}",
                harness::testhost::LOCK_PATH
            );
            match build_tandem().and_then(|()| {
                harness::image::FileLock::exclusive(Path::new(harness::testhost::LOCK_PATH))
            }) {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("bench-boot: {e}");
                    std::process::exit(1)
                }
            }
        } else {
            None
        };
        let report = match measure(&args, mode, &why) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bench-boot: {e}");
                std::process::exit(1)
            }
        };
        if harness::mode::in_testhost() {
            match serde_json::to_string(&report) {
                Ok(j) => println!("{RESULT_TAG}{j}"),
                Err(e) => {
                    eprintln!("bench-boot: {e}");
                    std::process::exit(1)
                }
            }
        } else {
            print_report(&report);
        }
        std::process::exit(i32::from(failed(&report)));
    }

    // Test-host mode, outside: build, then re-run this program inside one L1.
    eprintln!("bench-boot: mode testhost ({why}): all boots run inside one test host");
    if let Err(e) = build_tandem().and_then(|()| tandem_bin().map(|_| ())) {
        eprintln!("bench-boot: {e}");
        std::process::exit(1)
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("bench-boot: cannot find this program: {e}");
            std::process::exit(1)
        }
    };
    let argv = vec![
        exe.display().to_string(),
        "--runs".into(),
        args.runs.to_string(),
    ];
    let outcome = match harness::testhost::TestHost::new("bench-boot").run(&argv) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench-boot: {e}");
            std::process::exit(1)
        }
    };
    let Some(mut report) = outcome
        .output
        .lines()
        .find_map(|l| l.strip_prefix(RESULT_TAG))
        .and_then(|j| serde_json::from_str::<Report>(j).ok())
    else {
        eprintln!(
            "bench-boot: the run inside the test host produced no result (exit {}); work dir: {}",
            outcome.status,
            outcome.workdir.display()
        );
        std::process::exit(1)
    };
    let mut outer = describe_machine("outer machine");
    outer.push((
        "L1 (test host)".into(),
        format!(
            "qemu-system-x86_64 -accel tcg -cpu EPYC -machine q35 -smp 1 -m 4G (booted to its job in {:.1} s)",
            outcome.boot_time.as_secs_f64()
        ),
    ));
    outer.append(&mut report.env);
    report.env = outer;
    print_report(&report);
    if outcome.status != 0 || failed(&report) {
        eprintln!(
            "bench-boot: some boots failed; logs kept in {}",
            outcome.workdir.display()
        );
        std::process::exit(1)
    }
}
