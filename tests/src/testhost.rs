//! The test host: an L1 Linux under QEMU TCG (AMD CPU model with SVM) where kvm_amd gives
//! real KVM and a vIOMMU lets emulated e1000e NICs be bound to vfio-pci.
//!
//! A [`Session`] is one booted L1 that runs *jobs* one after another:
//!
//! 1. Take `/tmp/tandem-testhost.lock` (test hosts never run concurrently on the 2-core
//!    machines; the session holds it for its whole life) and boot L1 with a fresh work
//!    dir under `target/tandem-runs/`, which L1 mounts read-write over 9p *at the same
//!    path*; the outer root is mounted read-only and chrooted into.
//! 2. L1's init (see `image::test_host`) binds the e1000e NICs to vfio-pci, then waits
//!    in stage `ready` for `jobs/<n>/job.sh` in the work dir, n = 1, 2, ...
//! 3. The harness writes a job; L1 runs it in the chroot with its output on ttyS1
//!    (relayed here live, prefixed `[testhost]`), between `TANDEM-JOB-START n` and
//!    `TANDEM-JOB-END n <status>` lines. Each job script makes its own network namespace
//!    with bridge `br0` (10.0.0.1/24) over L1's uplink, runs the command in it, then
//!    kills whatever is left in the namespace and deletes it: no tap, bridge or process
//!    outlives its job.
//! 4. A `poweroff` file in the work dir ends the loop; L1 powers off.
//!
//! L1 writes `TANDEM-STAGE` markers and a `TANDEM-BEAT` heartbeat every 5 s to its
//! console (`l1-console.log`). The watchdog fails a job, naming the stage, when L1's
//! heartbeat stops (`test host froze`: L1's registers are read from QEMU's monitor and
//! saved as `l1-registers.txt`), when it does not reach `ready` or a job overruns
//! (`test host hung`), or when the outer QEMU dies. Such a session is dead: it is killed
//! and its work dir kept; [`run_shared`] boots a fresh one for the next job.
//!
//! Guest tests use [`run_shared`]: the test binary's guest tests share one L1. One-off
//! runs (benchmarks, `testhost-run`, the freeze soak) use [`TestHost::run`]: a fresh L1
//! for one job.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::image::{self, FileLock};
use crate::{err, Error, Result, FAILOVER_MAC};

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
    /// L1 boot: QEMU start to the `ready` stage marker.
    pub boot_time: Duration,
    /// Wall time of the job (for [`TestHost::run`]: of the whole run, boot included).
    pub total_time: Duration,
    /// The session's work dir (kept when a job failed).
    pub workdir: PathBuf,
}

/// Settings of one test-host run.
pub struct TestHost {
    pub name: String,
    /// Longest time from QEMU start to the `ready` stage.
    pub boot_timeout: Duration,
    /// Longest time one job may run.
    pub job_timeout: Duration,
    /// Longest time L1 may go without a heartbeat on its console before it counts as frozen.
    pub freeze_timeout: Duration,
    /// After this long without a heartbeat the watchdog saves L1's registers and tries to
    /// wake it (a key press, then QEMU's `stop` + `cont`, then an NMI); None: never (see
    /// [`Session::stalls`]).
    pub stall_kick: Option<Duration>,
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

/// Sends `commands` (newline-separated) to QEMU's human monitor at `monitor` and returns
/// what it answered within a few seconds, without the monitor's echo.
pub fn monitor_command(monitor: &Path, commands: &str) -> String {
    use std::os::unix::net::UnixStream;
    let mut s = match UnixStream::connect(monitor) {
        Ok(s) => s,
        Err(e) => return format!("(monitor {}: {e})", monitor.display()),
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
    let _ = s.write_all(format!("{commands}\n").as_bytes());
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
            stall_kick: Some(secs_from_env("TANDEM_TESTHOST_STALL_KICK", 20))
                .filter(|d| !d.is_zero()),
            env: Vec::new(),
        }
    }

    /// Boots a fresh L1, runs `argv` (inside the chroot, cwd = this process's cwd) as its
    /// only job and powers it off. Errors mean the test host itself failed (not the job).
    pub fn run(&self, argv: &[String]) -> Result<JobOutcome> {
        let started = Instant::now();
        let mut session = Session::boot(self)?;
        let mut outcome = session.run_job(&self.name, argv)?;
        drop(session);
        outcome.total_time = started.elapsed();
        eprintln!(
            "testhost: run finished in {:.1} s (job status {})",
            outcome.total_time.as_secs_f64(),
            outcome.status
        );
        Ok(outcome)
    }
}

/// What the watchdog waits for.
enum Wait {
    /// L1 reaching the `ready` stage.
    Ready,
    /// The end marker of job `n`, in the output from byte `from` on.
    Job { n: u32, from: usize },
}

/// One booted L1 running jobs one after another (see the module docs). Dropping it
/// powers L1 off (or kills it) and removes its work dir unless a job failed.
pub struct Session {
    settings: TestHost,
    child: std::process::Child,
    /// Dropping it ends the thread that forked QEMU, whose death kills QEMU (PDEATHSIG).
    anchor: Option<std::sync::mpsc::Sender<()>>,
    _lock: FileLock,
    _monitor_guard: RemoveOnDrop,
    relay: Option<std::thread::JoinHandle<()>>,
    /// Everything L1 wrote on ttyS1.
    output: Arc<Mutex<String>>,
    qemu: String,
    workdir: PathBuf,
    console: PathBuf,
    stderr_log: PathBuf,
    monitor: PathBuf,
    started: Instant,
    boot_time: Duration,
    stage: String,
    beats: usize,
    beat_since: Instant,
    /// The heartbeat stopped: when the last kick was sent and which ones.
    stall: Option<(Instant, Vec<&'static str>)>,
    /// Stalls L1 came out of, one line each.
    stalls: Vec<String>,
    next_job: u32,
    /// A job failed or L1 broke: keep the work dir.
    keep: bool,
    /// L1 is gone or was killed: no more jobs.
    dead: bool,
}

impl Session {
    /// Boots L1 and waits until it is ready for jobs.
    pub fn boot(settings: &TestHost) -> Result<Session> {
        let qemu = testhost_qemu();
        if Command::new(&qemu)
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
        let lock = FileLock::exclusive(Path::new(LOCK_PATH))?;
        let started = Instant::now();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let workdir = image::target_dir()?
            .join("tandem-runs")
            .join(format!("{}-{stamp}", settings.name));
        fs::create_dir_all(workdir.join("jobs"))
            .map_err(|e| err!("cannot create {}: {e}", workdir.display()))?;
        let workdir = workdir
            .canonicalize()
            .map_err(|e| err!("{}: {e}", workdir.display()))?;
        let console = workdir.join("l1-console.log");
        let stderr_log = workdir.join("qemu-stderr.log");
        let stderr_file = fs::File::create(&stderr_log)
            .map_err(|e| err!("cannot create {}: {e}", stderr_log.display()))?;
        let monitor = PathBuf::from(format!(
            "/tmp/tandem-l1-{}-{stamp}.monitor",
            std::process::id()
        ));

        let mut cmd = Command::new(&qemu);
        cmd.args([
            "-accel", "tcg", "-cpu", "EPYC", "-machine", "q35", "-smp", "1", "-m", "4G",
        ])
        // Thread names (`CPU 0/TCG`, ...) for the watchdog's report of a stall.
        .args(["-name", "tandem-l1,debug-threads=on"])
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
            // Not QEMU's default MAC (52:54:00:12:34:56), which is the failover pair's:
            // br0 would hold the guest's MAC as its own on the uplink port, and send
            // every frame for the guest there, never to the standby's tap.
            "-device",
            "virtio-net-pci,netdev=up,mac=52:54:00:fe:00:01",
        ]);
        // An SR-IOV NIC (QEMU's igb, an 82576 with VFs): L1's igb driver owns the PF
        // and its VF table; its VFs can be bound to vfio-pci.
        cmd.args([
            "-netdev",
            "hubport,id=sriov0,hubid=0",
            "-device",
            "igb,netdev=sriov0,addr=0x8,mac=52:54:00:fe:00:08",
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
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
        // the parent; it runs in the child between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // QEMU is forked by a thread that lives as long as this session: its death
        // (the session dropped, or this process exiting in any way) kills QEMU, so
        // no L1 outlives the test binary that booted it.
        let (child_tx, child_rx) = std::sync::mpsc::channel();
        let (anchor_tx, anchor_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("testhost-anchor".into())
            .spawn(move || {
                let _ = child_tx.send(cmd.spawn());
                let _ = anchor_rx.recv();
            })
            .map_err(|e| err!("cannot start the test host's anchor thread: {e}"))?;
        let mut child = child_rx
            .recv()
            .map_err(|_| err!("the test host's anchor thread ended"))?
            .map_err(|e| err!("cannot start {qemu}: {e}"))?;
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
                        // Written to the real stderr, not libtest's capture: live output
                        // (the job markers are for the watchdog, not for people).
                        if !text.starts_with("TANDEM-JOB-") {
                            let _ = std::io::stderr()
                                .write_all(format!("[testhost] {text}").as_bytes());
                        }
                        if let Ok(mut o) = out2.lock() {
                            o.push_str(&text);
                        }
                    }
                }
            }
        });

        let mut session = Session {
            settings: TestHost {
                name: settings.name.clone(),
                env: settings.env.clone(),
                ..*settings
            },
            child,
            anchor: Some(anchor_tx),
            _lock: lock,
            _monitor_guard: RemoveOnDrop(monitor.clone()),
            relay: Some(relay),
            output,
            qemu,
            workdir,
            console,
            stderr_log,
            monitor,
            started,
            boot_time: Duration::ZERO,
            stage: "qemu-start".into(),
            beats: 0,
            beat_since: Instant::now(),
            stall: None,
            stalls: Vec::new(),
            next_job: 1,
            keep: std::env::var("TANDEM_TESTHOST_KEEP").is_ok_and(|v| v == "1"),
            dead: false,
        };
        session.wait_for(Wait::Ready)?;
        session.boot_time = started.elapsed();
        eprintln!(
            "testhost: L1 ready for jobs in {:.1} s ({})",
            session.boot_time.as_secs_f64(),
            session.workdir.display()
        );
        Ok(session)
    }

    /// False once L1 broke or was killed.
    pub fn is_alive(&self) -> bool {
        !self.dead
    }

    /// Everything L1 wrote on its job console so far (every job's output and markers).
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// QEMU's human monitor socket (see [`monitor_command`]).
    pub fn monitor_path(&self) -> &Path {
        &self.monitor
    }

    /// The session's work dir: L1's console log, QEMU's stderr, each job's logs.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Runs `argv` in L1 as the next job. `name` names the job's own log dir in the work
    /// dir (a guest test's `GuestEnv::workdir`), removed when the job passes. An error
    /// means L1 itself failed; the session is then dead.
    pub fn run_job(&mut self, name: &str, argv: &[String]) -> Result<JobOutcome> {
        if self.dead {
            return Err(err!("the test host is gone (an earlier job broke it)"));
        }
        let n = self.next_job;
        self.next_job += 1;
        let dir = self.workdir.join("jobs").join(n.to_string());
        fs::create_dir_all(&dir).map_err(|e| err!("cannot create {}: {e}", dir.display()))?;
        let script = self.job_script(n, name, argv)?;
        let tmp = dir.join("job.sh.tmp");
        fs::write(&tmp, script).map_err(|e| err!("cannot write {}: {e}", tmp.display()))?;
        // Where this job's output starts: taken before L1 can see the job.
        let from = self.output.lock().map(|o| o.len()).unwrap_or(0);
        // Renamed into place: L1 never sees a half-written job.
        fs::rename(&tmp, dir.join("job.sh")).map_err(|e| err!("cannot place job.sh: {e}"))?;
        let t0 = Instant::now();
        let status = match self.wait_for(Wait::Job { n, from }) {
            Ok(st) => st,
            Err(e) => {
                self.keep = true;
                return Err(err!("{e} (job `{name}`)"));
            }
        };
        let text = self
            .output
            .lock()
            .map(|o| o.get(from..).unwrap_or("").to_string())
            .unwrap_or_default();
        let begin = format!("TANDEM-JOB-START {n}\n");
        let output = match text.find(&begin) {
            Some(i) => text[i + begin.len()..].to_string(),
            None => text,
        };
        let end = format!("TANDEM-JOB-END {n} ");
        let output = match output.find(&end) {
            Some(i) => output[..i].to_string(),
            None => output,
        };
        if output.contains(NO_UPLINK) {
            // The job's own result stands, but no later job can build its network
            // here: the next one gets a fresh L1.
            eprintln!(
                "testhost: the test host lost its uplink in job `{name}`; the next job boots a fresh one (work dir kept: {})",
                self.workdir.display()
            );
            self.keep = true;
            self.kill();
            if status == 125 {
                // The job never started: a fault of the test host, not of the test.
                return Err(err!(
                    "test host lost its uplink before job `{name}` started"
                ));
            }
        }
        if status == 0 && !self.keep {
            let _ = fs::remove_dir_all(&dir);
            let _ = fs::remove_dir_all(self.workdir.join(name));
        } else if status != 0 {
            self.keep = true;
            eprintln!(
                "testhost: job `{name}` failed (status {status}); work dir kept: {}",
                self.workdir.display()
            );
        }
        Ok(JobOutcome {
            status,
            output,
            boot_time: self.boot_time,
            total_time: t0.elapsed(),
            workdir: self.workdir.clone(),
        })
    }

    /// Follows L1 until `what` happens; for a job, returns its exit status. Any error
    /// leaves the session dead (L1 killed, work dir kept).
    fn wait_for(&mut self, what: Wait) -> Result<i32> {
        let since = Instant::now();
        loop {
            match self.step(&what, since) {
                Ok(Some(st)) => return Ok(st),
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    self.keep = true;
                    self.kill();
                    return Err(e);
                }
            }
        }
    }

    /// L1 as a whole: an error when its QEMU is gone, its init failed or its heartbeat
    /// stopped.
    fn check_l1(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(st)) => return Err(self.death(st)),
            Ok(None) => {}
            Err(e) => return Err(err!("waiting for {}: {e}", self.qemu)),
        }
        let text = fs::read_to_string(&self.console).unwrap_or_default();
        let beats = text.matches("TANDEM-BEAT ").count();
        if beats != self.beats {
            if let Some((_, kicks)) = self.stall.take() {
                let line = format!(
                    "L1 stalled {:.0} s in stage `{}` and woke after {} (registers at the stall: l1-registers-stall-{}.txt)",
                    self.beat_since.elapsed().as_secs_f64(),
                    self.stage,
                    kicks.join(", then "),
                    self.stalls.len() + 1
                );
                eprintln!("testhost: {line}");
                self.stalls.push(line);
                // Keep the registers and console of the stall.
                self.keep = true;
            }
            self.beats = beats;
            self.beat_since = Instant::now();
        }
        if let Some(kick_after) = self.settings.stall_kick {
            let gap = self.beat_since.elapsed();
            if self.beats > 0 && gap > kick_after {
                self.kick(gap);
            }
        }
        if let Some(last) = text
            .lines()
            .filter_map(|l| l.strip_prefix("TANDEM-STAGE "))
            .next_back()
        {
            let name = last.split_whitespace().next().unwrap_or("");
            if name != self.stage {
                self.stage = name.to_string();
            }
        }
        if let Some(f) = text.lines().find_map(|l| l.strip_prefix("TANDEM-FAIL ")) {
            return Err(err!(
                "test host init failed: {f}; console log kept: {}",
                self.console.display()
            ));
        }
        if self.beats > 0 && self.beat_since.elapsed() > self.settings.freeze_timeout {
            self.dump_registers("l1-registers.txt");
            let kicks = match &self.stall {
                Some((_, k)) => format!(
                    " (tried to wake it: {}; registers before: l1-registers-stall-{}.txt)",
                    k.join(", "),
                    self.stalls.len() + 1
                ),
                None => String::new(),
            };
            return Err(err!(
                "test host froze: no heartbeat for {:.0} s in stage `{}`, {:.0} s after L1 started{kicks}; L1's registers in {}",
                self.beat_since.elapsed().as_secs_f64(),
                self.stage,
                self.started.elapsed().as_secs_f64(),
                self.workdir.join("l1-registers.txt").display(),
            ));
        }
        Ok(())
    }

    /// One look at L1: Some(status) when `what` happened, None to look again.
    fn step(&mut self, what: &Wait, since: Instant) -> Result<Option<i32>> {
        self.check_l1()?;
        match what {
            Wait::Ready => {
                if self.stage == "ready" {
                    return Ok(Some(0));
                }
                if since.elapsed() > self.settings.boot_timeout {
                    self.dump_registers("l1-registers.txt");
                    return Err(err!(
                        "test host hung: not ready for jobs after {:.0} s, stuck in stage `{}`; console log kept: {}",
                        since.elapsed().as_secs_f64(),
                        self.stage,
                        self.console.display()
                    ));
                }
            }
            Wait::Job { n, from } => {
                let end = format!("TANDEM-JOB-END {n} ");
                let status = self.output.lock().ok().and_then(|o| {
                    let o = o.get(*from..)?;
                    let i = o.find(&end)?;
                    let rest = &o[i + end.len()..];
                    let line = rest.lines().next()?;
                    // Only a whole line: the relay may have pushed part of it.
                    rest.contains('\n')
                        .then(|| line.trim().parse::<i32>().ok())?
                });
                if let Some(st) = status {
                    return Ok(Some(st));
                }
                if since.elapsed() > self.settings.job_timeout {
                    self.dump_registers("l1-registers.txt");
                    return Err(err!(
                        "test host hung: job {n} still running after {:.0} s in stage `{}` (L1 itself alive: its heartbeat goes on); work dir kept: {}",
                        since.elapsed().as_secs_f64(),
                        self.stage,
                        self.workdir.display()
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Saves L1's registers (from QEMU's monitor) as `file` in the work dir and prints them.
    fn dump_registers(&self, file: &str) {
        let mut regs = monitor_command(&self.monitor, "info registers\nx/8i $pc\ninfo lapic");
        regs.push_str("\n\n");
        regs.push_str(&crate::l1cpu::report(self.child.id(), &regs));
        let _ = fs::write(self.workdir.join(file), &regs);
        eprintln!("testhost: L1's CPU as the monitor shows it (L1 boots nokaslr: look RIP up in its /proc/kallsyms; the package System.map is a stub):\n{regs}");
    }

    /// L1's heartbeat stopped `gap` ago: the first time, save its registers and press a
    /// key through QEMU's monitor (a device interrupt, which makes L1's LAPIC tell the
    /// CPU again what it holds: the freeze is a halted CPU whose LAPIC has a deliverable
    /// interrupt QEMU's TCG lost the request for, see tests/README.md); 10 s later, if
    /// it still sleeps, stop and continue its CPU (which cured the stalls early in L1's
    /// life); 10 s after that, an NMI.
    fn kick(&mut self, gap: Duration) {
        if self.stall.is_none() {
            eprintln!(
                "testhost: no heartbeat from L1 for {:.0} s in stage `{}`: saving its registers and waking it",
                gap.as_secs_f64(),
                self.stage
            );
            self.dump_registers(&format!("l1-registers-stall-{}.txt", self.stalls.len() + 1));
        }
        let (last, kicks) = self
            .stall
            .get_or_insert_with(|| (Instant::now(), Vec::new()));
        // (what the log calls it, the monitor command), 10 s apart. The key press is a
        // device interrupt: L1's keyboard (i8042, IRQ 1) through the IOAPIC to the LAPIC,
        // which then tells the CPU again what it has pending.
        const KICKS: [(&str, &str); 3] = [
            ("a key press", "sendkey ctrl"),
            ("stop/cont", "stop\ncont"),
            ("an NMI", "nmi"),
        ];
        let Some(&(next, cmd)) = KICKS.get(kicks.len()) else {
            return;
        };
        if !kicks.is_empty() && last.elapsed() <= Duration::from_secs(10) {
            return;
        }
        let _ = monitor_command(&self.monitor, cmd);
        eprintln!("testhost: sent L1 {next}");
        *last = Instant::now();
        kicks.push(next);
    }

    /// The stalls L1 came out of (after a kick or by itself), one line each.
    pub fn stalls(&self) -> &[String] {
        &self.stalls
    }

    /// Why the outer QEMU is gone.
    fn death(&mut self, st: std::process::ExitStatus) -> Error {
        use std::os::unix::process::ExitStatusExt;
        self.dead = true;
        let qemu_err = fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let console = self.console.display();
        let stage = &self.stage;
        if let Some(line) = qemu_err
            .lines()
            .find(|l| l.contains("Assertion") || l.contains("abort"))
        {
            return err!(
                "test host died: outer QEMU aborted in stage `{stage}`: {}; console log kept: {console}",
                line.trim()
            );
        }
        if let Some(sig) = st.signal() {
            return err!(
                "test host died: outer QEMU killed by signal {sig} in stage `{stage}`; console log kept: {console}"
            );
        }
        let text = fs::read_to_string(&self.console).unwrap_or_default();
        if let Some(f) = text.lines().find_map(|l| l.strip_prefix("TANDEM-FAIL ")) {
            return err!("test host init failed: {f}; console log kept: {console}");
        }
        let last = qemu_err
            .lines()
            .rfind(|l| !l.contains("warning:"))
            .unwrap_or("")
            .trim()
            .to_string();
        err!(
            "test host stopped in stage `{stage}` (QEMU {st}{}{last}); console log kept: {console}",
            if last.is_empty() { "" } else { ": " },
        )
    }

    /// Kills L1 at once.
    fn kill(&mut self) {
        self.dead = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn job_script(&self, n: u32, name: &str, argv: &[String]) -> Result<String> {
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
            ("TANDEM_WORKDIR".into(), self.workdir.display().to_string()),
            ("TANDEM_VFIO_NICS".into(), nics.join(",")),
            ("TANDEM_BRIDGE".into(), "br0".into()),
        ];
        env.extend(image::guest_images_env()?);
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
        env.extend(self.settings.env.iter().cloned());
        let mut s = format!("# written by the tandem test harness: job {n} ({name})\n");
        for (k, v) in env {
            s.push_str(&format!("export {k}={}\n", sh_quote(&v)));
        }
        s.push_str(&format!(
            "cd {} || exit 125\n",
            sh_quote(&cwd.display().to_string())
        ));
        let args: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
        s.push_str(
            &JOB_NETNS
                .replace("@NS@", &format!("tandem-job-{n}"))
                .replace("@ARGV@", &args.join(" ")),
        );
        Ok(s)
    }
}

/// The rest of every job script: the job's own network namespace with bridge `br0`
/// (the peer address) over L1's uplink, the command in it, then everything left in
/// the namespace killed and the namespace deleted (the uplink returns to L1's own).
const JOB_NETNS: &str = r#"uplink=
for n in /sys/class/net/*; do
    drv=$(readlink -f "$n/device/driver" 2>/dev/null)
    [ "${drv##*/}" = virtio_net ] && uplink=${n##*/}
done
[ -n "$uplink" ] || { echo "TANDEM-L1-NO-UPLINK: job: no virtio-net uplink in the test host"; exit 125; }
ns=@NS@
ip netns add $ns || exit 125
ip link set "$uplink" netns $ns || exit 125
ip -n $ns link set lo up &&
ip -n $ns link add br0 type bridge &&
ip -n $ns link set "$uplink" master br0 &&
ip -n $ns link set "$uplink" up &&
ip -n $ns link set br0 up &&
ip -n $ns addr add 10.0.0.1/24 dev br0 || { echo "job: cannot build br0 in $ns"; exit 125; }
ip netns exec $ns @ARGV@
st=$?
for p in $(ip netns pids $ns); do kill -9 $p 2>/dev/null; done
# The namespace (and the uplink in it) goes back only when its last process is gone;
# a VMM unmapping a large guest under TCG takes seconds.
i=0
while [ -n "$(ip netns pids $ns)" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
ip netns del $ns
# Once the namespace is gone the uplink is back within a second; if it is not back in
# 15 s the next job gets a fresh L1 (about 10 s), which is cheaper than waiting longer.
i=0
while [ ! -e "/sys/class/net/$uplink" ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
[ -e "/sys/class/net/$uplink" ] ||
    echo "TANDEM-L1-NO-UPLINK: the uplink $uplink did not come back from $ns within 15 s"
exit $st
"#;

impl Drop for Session {
    fn drop(&mut self) {
        if !self.dead {
            // Ask L1 to power off; kill it if it does not within a few seconds.
            let _ = fs::write(self.workdir.join("poweroff"), b"");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.kill();
        }
        self.anchor.take();
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
        if !self.keep {
            let _ = fs::remove_dir_all(&self.workdir);
        }
    }
}

/// The test binary's shared test host: booted by the first guest test that needs it,
/// replaced when a job broke it, stopped when the process exits.
static SHARED: Mutex<Option<Session>> = Mutex::new(None);

/// Powers the shared test host off now (the next [`run_shared`] boots a new one).
pub fn stop_shared() {
    let mut slot = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    drop(slot.take());
}

extern "C" fn stop_shared_at_exit() {
    // At exit: power the shared L1 off and tidy its work dir. A test thread still
    // holding the lock (a test timed out by an outer tool) leaves it to PDEATHSIG.
    if let Ok(mut slot) = SHARED.try_lock() {
        drop(slot.take());
    }
}

/// What a job script prints when L1's uplink is missing (before the job) or did not
/// come back from the job's namespace (after it).
const NO_UPLINK: &str = "TANDEM-L1-NO-UPLINK";

/// Whether `e` says L1 failed in a way no test causes: it froze (no heartbeat, not
/// woken), or it lost its uplink before the job started. A job that failed, hung or
/// crashed L1 is not one of these.
pub fn is_l1_fault(e: &Error) -> bool {
    let e = e.to_string();
    e.starts_with("test host froze") || e.starts_with("test host lost its uplink before")
}

/// Runs `argv` as job `name` in this process's shared test host, booting one first if
/// there is none or the last one broke. Jobs run one at a time, in call order.
pub fn run_shared(name: &str, argv: &[String]) -> Result<JobOutcome> {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function that takes no arguments and
        // does not unwind (Session::drop only ignores errors).
        unsafe { libc::atexit(stop_shared_at_exit) };
    });
    let mut slot = SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = slot.as_mut().filter(|s| s.is_alive()) {
        // Broken while idle between jobs: not the next job's fault.
        if let Err(e) = s.check_l1() {
            eprintln!("testhost: the shared L1 broke between jobs ({e}); booting a fresh one");
            s.keep = true;
            s.kill();
        }
    }
    if !slot.as_ref().is_some_and(Session::is_alive) {
        // Drop a dead session first: it still holds the test-host lock.
        *slot = None;
        let binary = std::env::current_exe()
            .ok()
            .and_then(|e| e.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .map(|s| s.rsplit_once('-').map_or(s.clone(), |(b, _)| b.to_string()))
            .unwrap_or_else(|| "tests".into());
        *slot = Some(Session::boot(&TestHost::new(&format!("l1-{binary}")))?);
    }
    match slot.as_mut() {
        Some(s) => s.run_job(name, argv),
        None => Err(err!("no test host")),
    }
}
