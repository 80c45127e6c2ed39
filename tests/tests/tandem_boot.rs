//! Tandem boots the test guest (a Debian kernel and the agent's initramfs)
//! on real KVM: vCPUs, memory, command line, power-off, reboot, pause and
//! resume through the API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{err, Agent, GuestEnv};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `tandem run`, killed when dropped.
struct Tandem {
    child: Child,
    bin: PathBuf,
    api: PathBuf,
    serial: PathBuf,
    stderr: PathBuf,
}

impl Tandem {
    fn spawn(env: &GuestEnv, name: &str, extra: &[&str]) -> harness::Result<Self> {
        let bin = env.tandem_bin()?;
        let api = env.socket_path(&format!("{name}.api"));
        let serial = env.socket_path(&format!("{name}.serial"));
        let stderr = env.workdir.join(format!("{name}.tandem.log"));
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&env.guest.kernel)
            .arg("--initramfs")
            .arg(&env.guest.initramfs)
            .arg("--serial")
            .arg(format!("socket={}", serial.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(extra)
            .env(
                "TANDEM_LOG",
                std::env::var("TANDEM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).map_err(|e| err!("{e}"))?);
        let child = cmd
            .spawn()
            .map_err(|e| err!("cannot start {}: {e}", bin.display()))?;
        Ok(Self {
            child,
            bin,
            api,
            serial,
            stderr,
        })
    }

    fn agent(&mut self, env: &GuestEnv, name: &str) -> harness::Result<Agent> {
        let t0 = Instant::now();
        let agent = Agent::connect_unix(
            &self.serial,
            env.workdir.join(format!("{name}.console.log")),
        )?;
        if let Err(e) = agent.wait_ready(BOOT_TIMEOUT) {
            return Err(err!("{e}; tandem: {}", self.log()));
        }
        eprintln!(
            "{name}: guest agent ready {:.2} s after connecting",
            t0.elapsed().as_secs_f64()
        );
        Ok(agent)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn remote(&self, cmd: &str) -> harness::Result<String> {
        let out = Command::new(&self.bin)
            .args(["remote", "--api-socket"])
            .arg(&self.api)
            .arg(cmd)
            .output()
            .map_err(|e| err!("tandem remote: {e}"))?;
        if !out.status.success() {
            return Err(err!(
                "tandem remote {cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Wait for tandem to exit on its own; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> harness::Result<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| err!("{e}"))? {
                return Ok(st.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return Err(err!(
                    "tandem still running {limit:?} later; log: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mem_total_kib(agent: &mut Agent) -> harness::Result<u64> {
    let line = agent.run_ok("grep MemTotal /proc/meminfo")?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err!("odd meminfo line {line:?}"))
}

harness::guest_test!(fn tandem_boots_linux_with_one_vcpu(env) {
    let cmdline = format!("{} tandem.test=marker42", env.guest.cmdline());
    let mut vm = Tandem::spawn(env, "one", &["--cmdline", &cmdline, "--memory", "size=384M"])?;
    let mut agent = vm.agent(env, "one")?;
    assert_eq!(agent.run_ok("uname -r")?.trim(), env.guest.kernel_version);
    assert_eq!(agent.run_ok("nproc")?.trim(), "1");
    assert!(agent.run_ok("cat /proc/cmdline")?.contains("tandem.test=marker42"));
    let kib = mem_total_kib(&mut agent)?;
    assert!((300 * 1024..384 * 1024).contains(&kib), "MemTotal {kib} KiB for 384M");
    // ACPI was used: the PCI host bridge came from the DSDT, ECAM from MCFG.
    let pci = agent.run_ok("ls /sys/bus/pci/devices; cat /sys/bus/pci/devices/0000:00:00.0/vendor /sys/bus/pci/devices/0000:00:00.0/class")?;
    assert!(pci.contains("0000:00:00.0") && pci.contains("0x8086") && pci.contains("0x060000"), "{pci}");
    let acpi = agent.run_ok("ls /sys/firmware/acpi/tables")?;
    for t in ["APIC", "DSDT", "FACP", "MCFG"] {
        assert!(acpi.contains(t), "ACPI table {t} missing: {acpi}");
    }
    // Power-off from inside the guest ends tandem with status 0.
    let _ = agent.run("poweroff -f", Duration::from_secs(2));
    assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0, "tandem exit status after poweroff");
    Ok(())
});

harness::guest_test!(fn tandem_boots_linux_with_two_vcpus_and_reboots(env) {
    let mut vm = Tandem::spawn(env, "two", &["--cmdline", &env.guest.cmdline(), "--cpus", "boot=2", "--memory", "size=1G"])?;
    let mut agent = vm.agent(env, "two")?;
    assert_eq!(agent.run_ok("nproc")?.trim(), "2", "the agent sees both vCPUs");
    let online = agent.run_ok("cat /sys/devices/system/cpu/online")?;
    assert_eq!(online.trim(), "0-1");
    let kib = mem_total_kib(&mut agent)?;
    assert!(kib > 900 * 1024, "MemTotal {kib} KiB for 1G");
    // Pause/resume through the API leaves the guest working.
    vm.remote("pause")?;
    assert!(vm.remote("info")?.contains("\"paused\""));
    std::thread::sleep(Duration::from_millis(500));
    vm.remote("resume")?;
    assert_eq!(agent.run_ok("echo alive")?.trim(), "alive");
    // reboot inside the guest: the VM resets and boots again.
    let _ = agent.run("reboot -f", Duration::from_secs(2));
    drop(agent);
    let mut agent = vm.agent(env, "two-again")?;
    assert_eq!(agent.run_ok("nproc")?.trim(), "2");
    let info = vm.remote("info")?;
    assert!(info.contains("\"boots\": 2"), "{info}");
    // Shutdown through the API.
    vm.remote("shutdown")?;
    assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0);
    Ok(())
});
