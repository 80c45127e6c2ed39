//! What the benchmark examples (`bench-boot`, `bench-net`) share: where they run and how
//! that is described, the VMMs they measure, the statistics of the tables, and the `main`
//! that, when /dev/kvm cannot boot Linux, re-executes the benchmark inside ONE test host
//! and prints its result table here.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{err, image, mode, testhost, Agent, Error, GuestImage, Mode, QemuVm, Result};

/// Output of a command's first line, or `?`.
pub fn cmd_line(prog: &str, args: &[&str]) -> String {
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

/// The CPU's model name from /proc/cpuinfo, or `?`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// The loaded KVM module (`kvm_intel`, `kvm_amd`, `kvm_pvm`), or `none`.
pub fn kvm_module() -> String {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .map(|m| m.to_string())
        .unwrap_or_else(|| "none".into())
}

/// The machine's RAM from /proc/meminfo (`N MiB`), or `?`.
pub fn mem_total() -> String {
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

/// An environment line describing this machine (kernel, CPUs, RAM, KVM module), labelled `label`.
pub fn describe_machine(label: &str) -> (String, String) {
    (
        label.to_string(),
        format!(
            "Linux {}, {} x {}, {} RAM, KVM module {}",
            cmd_line("uname", &["-r"]),
            cmd_line("nproc", &[]),
            cpu_model(),
            mem_total(),
            kvm_module()
        ),
    )
}

/// The first environment lines of a report: date, mode, and the machine the measurements run on.
pub fn env_header(mode: Mode, why: &str) -> Vec<(String, String)> {
    let where_ = if mode::in_testhost() {
        "L1 (test host)"
    } else {
        "this machine"
    };
    vec![
        (
            "date".to_string(),
            cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
        ("mode".to_string(), format!("{mode} ({why})")),
        describe_machine(where_),
    ]
}

/// `PATH (VERSION, git DESCRIBE)` for the tandem binary under measurement.
pub fn describe_tandem(tandem: &Path) -> String {
    format!(
        "{} ({}, git {})",
        tandem.display(),
        cmd_line(&tandem.display().to_string(), &["--version"]),
        cmd_line("git", &["describe", "--always", "--dirty"])
    )
}

/// The guest's kernel version, or `?` when unknown.
pub fn kernel_version(guest: &GuestImage) -> &str {
    if guest.kernel_version.is_empty() {
        "?"
    } else {
        &guest.kernel_version
    }
}

/// The last `lines` lines of the file at `path`, joined with ` | ` (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

/// Runs `args[0]` with the rest as arguments; an error carries its stderr.
pub fn sh(args: &[&str]) -> Result<()> {
    crate::sh(args)
}

/// `target/release/`, from the example's location (`target/release/examples/NAME`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| err!("cannot find this program: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| err!("unexpected location {}", exe.display()))
}

/// Where a benchmark keeps its sockets and its logs.
pub struct Dirs {
    /// Sockets (a local filesystem).
    pub run: PathBuf,
    /// Logs (kept inside the test host's work dir when a measurement fails).
    pub logs: PathBuf,
}

impl Dirs {
    /// Removes the sockets, and the logs too when `all_ok` outside the test host.
    pub fn finish(&self, all_ok: bool) {
        let _ = std::fs::remove_dir_all(&self.run);
        if all_ok && !mode::in_testhost() {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

/// A running VMM under measurement; killed when dropped.
pub enum Vmm {
    /// `target/release/tandem run ...`.
    Tandem(Child),
    /// The harness's reference QEMU.
    Qemu(QemuVm),
}

impl Vmm {
    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        match self {
            Vmm::Tandem(c) => c.id(),
            Vmm::Qemu(q) => q.pid(),
        }
    }

    /// Has the VMM process exited?
    pub fn exited(&mut self) -> bool {
        match self {
            Vmm::Tandem(c) => !matches!(c.try_wait(), Ok(None)),
            Vmm::Qemu(q) => !q.is_running(),
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

/// The size of a measured guest and what each VMM adds for it.
pub struct VmSpec<'a> {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Extra `tandem run` arguments, after `--api-socket`.
    pub tandem_args: &'a [String],
    /// Extra QEMU arguments.
    pub qemu_args: &'a [String],
}

/// A VMM just spawned on the test guest, with its serial socket and logs.
pub struct Spawned {
    /// The VMM process.
    pub vmm: Vmm,
    /// Host wall clock just before the VMM process was spawned.
    pub t0: Instant,
    /// The serial socket the guest agent talks on.
    pub serial: PathBuf,
    /// Where the guest console is logged.
    pub console: PathBuf,
    /// The VMM's own log.
    pub log: PathBuf,
    kind: String,
}

impl Spawned {
    /// `e` with the last lines of the guest console and of the VMM's log.
    pub fn fail(&self, e: Error) -> Error {
        err!(
            "{e}; console: {:?}; {} log: {:?}",
            tail(&self.console, 3),
            self.kind,
            tail(&self.log, 3)
        )
    }

    /// Connects to the guest agent on the serial socket.
    pub fn connect(&self) -> Result<Agent> {
        Agent::connect_unix(&self.serial, self.console.clone()).map_err(|e| self.fail(e))
    }
}

/// Spawns `vmm` (`tandem` or `qemu`) as `name` on `guest`: sockets in `dirs.run`, logs in `dirs.logs`.
pub fn spawn_vmm(
    vmm: &str,
    name: &str,
    tandem: &Path,
    guest: &GuestImage,
    dirs: &Dirs,
    spec: &VmSpec,
) -> Result<Spawned> {
    let console = dirs.logs.join(format!("{name}.console.log"));
    let _ = std::fs::remove_file(&console);
    let t0 = Instant::now();
    let (proc, serial, log) = if vmm == "tandem" {
        let serial = dirs.run.join(format!("{name}.serial"));
        let api = dirs.run.join(format!("{name}.api"));
        let log = dirs.logs.join(format!("{name}.tandem.log"));
        let f = std::fs::File::create(&log).map_err(|e| err!("{e}"))?;
        let child = Command::new(tandem)
            .arg("run")
            .arg("--kernel")
            .arg(&guest.kernel)
            .arg("--initramfs")
            .arg(&guest.initramfs)
            .args(["--cmdline", &guest.cmdline()])
            .args(["--cpus", &format!("boot={}", spec.cpus)])
            .args(["--memory", &format!("size={}M", spec.mem_mib)])
            .arg("--serial")
            .arg(format!("socket={}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(spec.tandem_args)
            // Tandem's log in the benchmark's log dir: info (nothing per frame) unless
            // TANDEM_TEST_LOG says otherwise.
            .env(
                "TANDEM_LOG",
                std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .map_err(|e| err!("cannot start {}: {e}", tandem.display()))?;
        (Vmm::Tandem(child), serial, log)
    } else {
        let mut b = QemuVm::builder(guest, &dirs.run, name)
            .cpus(spec.cpus)
            .mem_mib(spec.mem_mib);
        for a in spec.qemu_args {
            b = b.arg(a);
        }
        let q = b.spawn()?;
        let (serial, log) = (q.serial.clone(), q.log.clone());
        (Vmm::Qemu(q), serial, log)
    };
    Ok(Spawned {
        vmm: proc,
        t0,
        serial,
        console,
        log,
        kind: vmm.to_string(),
    })
}

/// (median, min, max) of `v`, or None when it is empty.
pub fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((med, v[0], v[n - 1]))
}

/// `median (min-max) unit`, with `prec` decimals.
pub fn fmt_range((m, lo, hi): (f64, f64, f64), prec: usize, unit: &str) -> String {
    format!("{m:.prec$} ({lo:.prec$}-{hi:.prec$}) {unit}")
}

/// Tandem/QEMU: `a / b` with 2 decimals, or `-` when either is missing or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// The icmp_seq of every reply in `ping`'s output, in order.
pub fn icmp_seqs(ping_output: &str) -> Vec<u64> {
    ping_output
        .lines()
        .filter_map(|l| {
            l.split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Prints the runs that failed, `(vmm, run, error)`, under `FAILED {what} (N):`.
pub fn print_failures<'a>(what: &str, failed: impl IntoIterator<Item = (&'a str, usize, &'a str)>) {
    let failed: Vec<_> = failed.into_iter().collect();
    if failed.is_empty() {
        return;
    }
    println!();
    println!("FAILED {what} ({}):", failed.len());
    for (vmm, run, error) in failed {
        println!("  {vmm} run {run}: {error}");
    }
}

/// Prints the `Environment` block, labels padded to `width`.
pub fn print_env(env: &[(String, String)], width: usize) {
    println!();
    println!("Environment");
    for (k, v) in env {
        println!("  {k:<width$} {v}");
    }
}

/// The stdout line that carries `report` out of the test host: `tag`, then its JSON.
pub fn result_line<T: Serialize>(tag: &str, report: &T) -> Result<String> {
    serde_json::to_string(report)
        .map(|j| format!("{tag}{j}"))
        .map_err(|e| err!("{e}"))
}

/// The report on the first line of `output` that starts with `tag`, if it parses.
pub fn parse_result<T: DeserializeOwned>(tag: &str, output: &str) -> Option<T> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .and_then(|j| serde_json::from_str::<T>(j).ok())
}

/// A benchmark's report: JSON across the test-host boundary, a table on this side.
pub trait BenchReport: Serialize + DeserializeOwned {
    /// The (label, value) lines describing where the measurements ran.
    fn env_mut(&mut self) -> &mut Vec<(String, String)>;
    /// Prints the report on stdout.
    fn print(&self);
    /// Did any measurement fail?
    fn failed(&self) -> bool;
}

/// One benchmark example: its name and the words of its messages.
pub struct Bench {
    /// The example's name (`bench-boot`): message prefix, directory and test-host name.
    pub name: &'static str,
    /// Prefix of the stdout line that carries the JSON report out of the test host.
    pub result_tag: &'static str,
    /// The command suggested when the release tandem is not built.
    pub build_hint: &'static str,
    /// End of the test-host mode line (`all boots run inside one test host`).
    pub testhost_note: &'static str,
    /// Start of the final message when something failed (`some boots failed`).
    pub failed_note: &'static str,
}

impl Bench {
    /// Prints `NAME: e` and exits with status 1.
    pub fn die(&self, e: impl Display) -> ! {
        eprintln!("{}: {e}", self.name);
        std::process::exit(1)
    }

    /// `target/release/tandem`; an error unless this is the release build and tandem is built.
    pub fn tandem_bin(&self) -> Result<PathBuf> {
        let dir = profile_dir()?;
        if dir.file_name().and_then(|n| n.to_str()) != Some("release") {
            return Err(err!(
                "{0} measures the release build: run it as `cargo run --release -p tests --example {0}` (this is {1})",
                self.name,
                dir.display()
            ));
        }
        let bin = dir.join("tandem");
        if !bin.exists() {
            return Err(err!(
                "{} is not built: run `{}` first",
                bin.display(),
                self.build_hint
            ));
        }
        Ok(bin)
    }

    /// Under `cargo run`, (re)build the release tandem so the benchmark never measures a stale binary.
    pub fn build_tandem(&self) -> Result<()> {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return Ok(());
        };
        eprintln!("{}: cargo build --release -p vmm --bins", self.name);
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "vmm", "--bins"])
            .status()
            .map_err(|e| err!("cannot run cargo: {e}"))?;
        if !st.success() {
            return Err(err!("cargo build --release -p vmm --bins failed ({st})"));
        }
        Ok(())
    }

    /// Creates the socket dir `/tmp/tandem-NAME-PID` and the log dir (in the test host's
    /// work dir, else `target/tandem-runs/NAME-PID`).
    pub fn dirs(&self) -> Result<Dirs> {
        let name = self.name;
        let pid = std::process::id();
        let logs = match std::env::var("TANDEM_WORKDIR") {
            Ok(w) => PathBuf::from(w).join(name),
            Err(_) => image::target_dir()?
                .join("tandem-runs")
                .join(format!("{name}-{pid}")),
        };
        let dirs = Dirs {
            run: PathBuf::from(format!("/tmp/tandem-{name}-{pid}")),
            logs,
        };
        for d in [&dirs.run, &dirs.logs] {
            std::fs::create_dir_all(d).map_err(|e| err!("cannot create {}: {e}", d.display()))?;
        }
        Ok(dirs)
    }

    /// The benchmark's `main`. In direct mode (under the guest tests' lock) or inside the
    /// test host, runs `measure` here and prints the report (inside the test host: as the
    /// tagged JSON line); otherwise re-runs this program with `relaunch_args` inside one
    /// test host and prints the report it sends back. Exits 1 when anything failed.
    pub fn main<R: BenchReport>(
        &self,
        relaunch_args: &[String],
        measure: impl FnOnce(Mode, &str) -> Result<R>,
    ) {
        let (mode, why) = Mode::detect().unwrap_or_else(|e| self.die(e));
        if mode::in_testhost() || mode == Mode::Direct {
            // Direct mode shares the machine with guest tests: take their lock.
            let _lock = if mode == Mode::Direct {
                eprintln!(
                    "{}: mode direct ({why}); waiting for {}",
                    self.name,
                    testhost::LOCK_PATH
                );
                match self
                    .build_tandem()
                    .and_then(|()| image::FileLock::exclusive(Path::new(testhost::LOCK_PATH)))
                {
                    Ok(l) => Some(l),
                    Err(e) => self.die(e),
                }
            } else {
                None
            };
            let report = measure(mode, &why).unwrap_or_else(|e| self.die(e));
            if mode::in_testhost() {
                match result_line(self.result_tag, &report) {
                    Ok(l) => println!("{l}"),
                    Err(e) => self.die(e),
                }
            } else {
                report.print();
            }
            std::process::exit(i32::from(report.failed()));
        }

        // Test-host mode, outside: build, then re-run this program inside one L1.
        eprintln!(
            "{}: mode testhost ({why}): {}",
            self.name, self.testhost_note
        );
        if let Err(e) = self
            .build_tandem()
            .and_then(|()| self.tandem_bin().map(|_| ()))
        {
            self.die(e)
        }
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| self.die(format_args!("cannot find this program: {e}")));
        let mut argv = vec![exe.display().to_string()];
        argv.extend_from_slice(relaunch_args);
        let outcome = testhost::TestHost::new(self.name)
            .run(&argv)
            .unwrap_or_else(|e| self.die(e));
        let Some(mut report) = parse_result::<R>(self.result_tag, &outcome.output) else {
            self.die(format_args!(
                "the run inside the test host produced no result (exit {}); work dir: {}",
                outcome.status,
                outcome.workdir.display()
            ))
        };
        let mut outer = vec![
            describe_machine("outer machine"),
            (
                "L1 (test host)".into(),
                format!(
                    "{} -accel tcg -cpu EPYC -machine q35 -smp 1 -m 4G (ready for its job in {:.1} s)",
                    cmd_line(&testhost::testhost_qemu(), &["--version"]),
                    outcome.boot_time.as_secs_f64()
                ),
            ),
        ];
        outer.append(report.env_mut());
        *report.env_mut() = outer;
        report.print();
        if outcome.status != 0 || report.failed() {
            self.die(format_args!(
                "{}; logs kept in {}",
                self.failed_note,
                outcome.workdir.display()
            ))
        }
    }
}
