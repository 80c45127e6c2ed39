//! Tandem boots the test guest (a Debian kernel and the agent's initramfs)
//! on real KVM: vCPUs, memory, command line, power-off, reboot, pause and
//! resume through the API.

use std::time::Duration;

use harness::tandem::Tandem;
use harness::{err, Agent};

fn mem_total_kib(agent: &mut Agent) -> harness::Result<u64> {
    let line = agent.run_ok("grep MemTotal /proc/meminfo")?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| err!("odd meminfo line {line:?}"))
}

harness::guest_test_kernels!(fn tandem_boots_linux_with_one_vcpu(env) {
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
