//! The test host: an L1 Linux under QEMU TCG (AMD CPU model with SVM) where kvm_amd gives
//! real KVM and a vIOMMU lets emulated e1000e NICs be bound to vfio-pci.
//!
//! One run: take `/tmp/tandem-testhost.lock` (test hosts never run concurrently on the
//! 2-core machines), write `job.sh` into a fresh work dir under `target/tandem-runs/`,
//! boot L1. L1's init (see `image::test_host`) mounts the outer root read-only over 9p and
//! the work dir read-write *at the same path*, binds the e1000e NICs to vfio-pci, builds
//! bridge `br0` (10.0.0.1/24) over its uplink, chroots into the outer root, runs job.sh
//! with its output on ttyS1 (relayed here live), writes `exit-status`, powers off.
//! L1's console (stage markers) goes to `l1-console.log`; a watchdog kills a hung L1 and
//! names the stage it hung in.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::image::{self, FileLock, GuestImage};
use crate::{err, Result, FAILOVER_MAC};

/// The lock every test-host run (and every direct-mode guest test) holds.
pub const LOCK_PATH: &str = "/tmp/tandem-testhost.lock";

/// PCI addresses of the passthrough e1000e NICs in L1 (fixed by `addr=` below).
const VFIO_SLOTS: [u32; 2] = [5, 6];

/// What a finished job left behind.
#[derive(Debug)]
pub struct JobOutcome {
    /// The job's exit status inside L1.
    pub status: i32,
    /// Everything the job printed (ttyS1), `\r` removed.
    pub output: String,
    /// L1 boot: QEMU start to the `job` stage marker.
    pub boot_time: Duration,
    /// Total wall time of the run.
    pub total_time: Duration,
    /// The work dir (kept when the job failed).
    pub workdir: PathBuf,
}

/// Settings of one test-host run.
pub struct TestHost {
    pub name: String,
    /// Longest time from QEMU start to the `job` stage.
    pub boot_timeout: Duration,
    /// Longest time the job may run.
    pub job_timeout: Duration,
    /// Longest time L1 may go without a heartbeat on its console before it counts as frozen.
    pub freeze_timeout: Duration,
    /// Extra environment for the job.
    pub env: Vec<(String, String)>,
}

fn secs_from_env(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Removes a path when dropped.
struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Ask QEMU's monitor for L1's registers and the code at its RIP.
fn l1_registers(monitor: &Path) -> String {
    use std::os::unix::net::UnixStream;
    let mut s = match UnixStream::connect(monitor) {
        Ok(s) => s,
        Err(e) => return format!("(monitor {}: {e})", monitor.display()),
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
    let _ = s.write_all(b"info registers\nx/8i $pc\ninfo lapic\n");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    // Drop the monitor's echo of what was typed (cursor-movement escapes).
    String::from_utf8_lossy(&out)
        .replace('\r', "")
        .lines()
        .filter(|l| !l.contains('\u{1b}'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The QEMU that runs L1: `TANDEM_TESTHOST_QEMU`, else `qemu-system-x86_64` on the PATH.
pub fn testhost_qemu() -> String {
    std::env::var("TANDEM_TESTHOST_QEMU")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "qemu-system-x86_64".into())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl TestHost {
    pub fn new(name: &str) -> Self {
        TestHost {
            name: name.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                "_",
            ),
            boot_timeout: secs_from_env("TANDEM_TESTHOST_BOOT_TIMEOUT", 120),
            job_timeout: secs_from_env("TANDEM_TESTHOST_JOB_TIMEOUT", 900),
            freeze_timeout: secs_from_env("TANDEM_TESTHOST_FREEZE_TIMEOUT", 60),
            env: Vec::new(),
        }
    }

    /// Boots L1, runs `argv` (inside the chroot, cwd = this process's cwd) and returns
    /// its outcome. Errors mean the test host itself failed (not the job).
    pub fn run(&self, argv: &[String]) -> Result<JobOutcome> {
        let qemu = testhost_qemu();
        let qemu = qemu.as_str();
        if Command::new(qemu)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return Err(err!(
                "{qemu} not found: run scripts/setup (installs qemu-system-x86)"
            ));
        }
        let host = image::test_host()?;
        let guest = image::test_guest()?;
        let _lock = FileLock::exclusive(Path::new(LOCK_PATH))?;
        let started = Instant::now();

        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let workdir = image::target_dir()?
            .join("tandem-runs")
            .join(format!("{}-{stamp}", self.name));
        fs::create_dir_all(&workdir)
            .map_err(|e| err!("cannot create {}: {e}", workdir.display()))?;
        let workdir = workdir
            .canonicalize()
            .map_err(|e| err!("{}: {e}", workdir.display()))?;
        fs::write(
            workdir.join("job.sh"),
            self.job_script(argv, &workdir, &guest)?,
        )
        .map_err(|e| err!("cannot write job.sh: {e}"))?;
        let console = workdir.join("l1-console.log");
        let stderr_log = workdir.join("qemu-stderr.log");
        let stderr_file = fs::File::create(&stderr_log)
            .map_err(|e| err!("cannot create {}: {e}", stderr_log.display()))?;

        let monitor = PathBuf::from(format!(
            "/tmp/tandem-l1-{}-{stamp}.monitor",
            std::process::id()
        ));
        let _monitor_guard = RemoveOnDrop(monitor.clone());
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-accel", "tcg", "-cpu", "EPYC", "-machine", "q35", "-smp", "1", "-m", "4G",
        ])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        // A monitor on a short socket path: when L1 hangs, the watchdog asks
        // it where L1's CPU is before killing it.
        .arg("-monitor")
        .arg(format!("unix:{},server,nowait", monitor.display()))
        .arg("-kernel")
        .arg(&host.kernel)
        .arg("-initrd")
        .arg(&host.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 nokaslr intel_iommu=on iommu=pt TANDEM_WORK={}",
            workdir.display()
        ))
        .args(["-device", "intel-iommu,intremap=on,caching-mode=on"])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=work,security_model=none",
            workdir.display()
        ))
        .args([
            "-netdev",
            "hubport,id=up,hubid=0",
            "-device",
            "virtio-net-pci,netdev=up",
        ]);
        for (i, slot) in VFIO_SLOTS.iter().enumerate() {
            cmd.arg("-netdev")
                .arg(format!("hubport,id=vf{i},hubid=0"))
                .arg("-device")
                .arg(format!(
                    "e1000e,netdev=vf{i},mac={FAILOVER_MAC},addr={slot:#x}"
                ));
        }
        cmd.arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr_file);
        let mut child = cmd.spawn().map_err(|e| err!("cannot start {qemu}: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| err!("{qemu}: no stdout pipe"))?;

        let output = Arc::new(Mutex::new(String::new()));
        let out2 = Arc::clone(&output);
        let relay = std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line).replace('\r', "");
                        // Written to the real stderr, not libtest's capture: live output.
                        let _ =
                            std::io::stderr().write_all(format!("[testhost] {text}").as_bytes());
                        if let Ok(mut o) = out2.lock() {
                            o.push_str(&text);
                        }
                    }
                }
            }
        });

        // Watchdog: follow the stage markers on L1's console.
        let mut stage = String::from("qemu-start");
        let mut stage_since = Instant::now();
        let mut boot_time = None;
        let mut beats = 0;
        let mut beat_since = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => {}
                Err(e) => return Err(err!("waiting for {qemu}: {e}")),
            }
            let text = fs::read_to_string(&console).unwrap_or_default();
            let n = text.matches("TANDEM-BEAT ").count();
            if n != beats {
                beats = n;
                beat_since = Instant::now();
            }
            if beats > 0 && beat_since.elapsed() > self.freeze_timeout {
                let where_l1 = l1_registers(&monitor);
                let _ = fs::write(workdir.join("l1-registers.txt"), &where_l1);
                eprintln!("testhost: L1 froze (no heartbeat for {:.0} s); its CPU as the monitor shows it (L1 boots nokaslr: look RIP up in its /proc/kallsyms):\n{where_l1}", beat_since.elapsed().as_secs_f64());
                let _ = child.kill();
                let _ = child.wait();
                let _ = relay.join();
                return Err(err!(
                    "test host froze: no heartbeat for {:.0} s in stage `{stage}`, {:.0} s after start; registers and console log kept: {}",
                    beat_since.elapsed().as_secs_f64(),
                    started.elapsed().as_secs_f64(),
                    workdir.display()
                ));
            }
            if let Some(last) = text
                .lines()
                .filter_map(|l| l.strip_prefix("TANDEM-STAGE "))
                .next_back()
            {
                let name = last.split_whitespace().next().unwrap_or("").to_string();
                if name != stage {
                    stage = name;
                    stage_since = Instant::now();
                    if stage == "job" {
                        boot_time = Some(started.elapsed());
                        eprintln!(
                            "testhost: L1 booted to its job in {:.1} s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            let (limit, what) = if boot_time.is_none() {
                (
                    self.boot_timeout
                        .saturating_sub(started.elapsed().min(self.boot_timeout)),
                    "boot",
                )
            } else {
                (
                    self.job_timeout
                        .saturating_sub(stage_since.elapsed().min(self.job_timeout)),
                    "job",
                )
            };
            if limit.is_zero() {
                let where_l1 = l1_registers(&monitor);
                let _ = fs::write(workdir.join("l1-registers.txt"), &where_l1);
                eprintln!("testhost: L1 hung; its CPU as the monitor shows it (L1 boots nokaslr: look RIP up in its /proc/kallsyms; the package System.map is a stub):\n{where_l1}");
                let _ = child.kill();
                let _ = child.wait();
                let _ = relay.join();
                return Err(err!(
                    "test host hung: {what} timeout, stuck in stage `{stage}` after {:.0} s; console log kept: {}",
                    started.elapsed().as_secs_f64(),
                    console.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let _ = relay.join();
        let total_time = started.elapsed();
        let output = output.lock().map(|o| o.clone()).unwrap_or_default();

        let qemu_err = fs::read_to_string(&stderr_log).unwrap_or_default();
        if let Some(line) = qemu_err
            .lines()
            .find(|l| l.contains("Assertion") || l.contains("abort"))
        {
            return Err(err!(
                "test host died: outer QEMU aborted in stage `{stage}`: {}; console log kept: {}",
                line.trim(),
                console.display()
            ));
        }
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return Err(err!(
                "test host died: outer QEMU killed by signal {sig} in stage `{stage}`; console log kept: {}",
                console.display()
            ));
        }
        let console_text = fs::read_to_string(&console).unwrap_or_default();
        if let Some(f) = console_text
            .lines()
            .find_map(|l| l.strip_prefix("TANDEM-FAIL "))
        {
            return Err(err!(
                "test host init failed: {f}; console log kept: {}",
                console.display()
            ));
        }
        let status_text = fs::read_to_string(workdir.join("exit-status")).map_err(|_| {
            let last = qemu_err.lines().rfind(|l| !l.contains("warning:")).unwrap_or("").trim().to_string();
            err!(
                "test host stopped without a job status in stage `{stage}` (QEMU {status}{}{last}); console log kept: {}",
                if last.is_empty() { "" } else { ": " },
                console.display()
            )
        })?;
        let job_status: i32 = status_text.trim().parse().map_err(|_| {
            err!(
                "bad exit-status {:?} in {}",
                status_text.trim(),
                workdir.display()
            )
        })?;
        eprintln!(
            "testhost: run finished in {:.1} s (job status {job_status})",
            total_time.as_secs_f64()
        );
        if job_status == 0 {
            let _ = fs::remove_dir_all(&workdir);
        } else {
            eprintln!(
                "testhost: job failed; work dir and console log kept: {}",
                workdir.display()
            );
        }
        Ok(JobOutcome {
            status: job_status,
            output,
            boot_time: boot_time.unwrap_or(total_time),
            total_time,
            workdir,
        })
    }

    fn job_script(&self, argv: &[String], workdir: &Path, guest: &GuestImage) -> Result<String> {
        let cwd = std::env::current_dir().map_err(|e| err!("no current dir: {e}"))?;
        let nics: Vec<String> = VFIO_SLOTS
            .iter()
            .map(|s| format!("0000:00:{s:02x}.0={FAILOVER_MAC}"))
            .collect();
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/root".into()),
            ("TANDEM_IN_TESTHOST".into(), "1".into()),
            ("TANDEM_WORKDIR".into(), workdir.display().to_string()),
            (
                "TANDEM_GUEST_KERNEL".into(),
                guest.kernel.display().to_string(),
            ),
            (
                "TANDEM_GUEST_INITRAMFS".into(),
                guest.initramfs.display().to_string(),
            ),
            (
                "TANDEM_GUEST_KERNEL_VERSION".into(),
                guest.kernel_version.clone(),
            ),
            ("TANDEM_VFIO_NICS".into(), nics.join(",")),
            ("TANDEM_BRIDGE".into(), "br0".into()),
        ];
        for pass in [
            "RUST_BACKTRACE",
            "RUST_LOG",
            "CARGO_TARGET_DIR",
            "TANDEM_TEST_LOG",
            "TANDEM_SOAK_RUNS",
            "TANDEM_REFERENCE_QEMU",
            "TANDEM_BIN",
        ] {
            if let Ok(v) = std::env::var(pass) {
                env.push((pass.into(), v));
            }
        }
        env.extend(self.env.iter().cloned());
        let mut s = String::from("# written by the tandem test harness\n");
        for (k, v) in env {
            s.push_str(&format!("export {k}={}\n", sh_quote(&v)));
        }
        s.push_str(&format!(
            "cd {} || exit 125\n",
            sh_quote(&cwd.display().to_string())
        ));
        let args: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        s.push_str(&format!("exec {}\n", args.join(" ")));
        Ok(s)
    }
}
