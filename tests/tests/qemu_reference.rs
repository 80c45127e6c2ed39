//! The reference VMM (QEMU with KVM) boots the test guest: plain, with a VFIO NIC, and
//! with a virtio-net failover pair. These prove the harness and are the baselines.

use std::time::{Duration, Instant};

use harness::{GuestEnv, QemuVm, FAILOVER_MAC};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn boot(env: &GuestEnv, vm: QemuVm, name: &str) -> harness::Result<(QemuVm, harness::Agent)> {
    let t0 = Instant::now();
    let mut vm = vm;
    let agent = vm.agent(env.workdir.join(format!("{name}.console.log")))?;
    if let Err(e) = agent.wait_ready(BOOT_TIMEOUT) {
        let alive = vm.is_running();
        return Err(harness::err!(
            "{e}; QEMU {}: {}",
            if alive { "running" } else { "exited" },
            vm.stderr().trim()
        ));
    }
    eprintln!(
        "{name}: guest agent ready {:.1} s after QEMU started",
        t0.elapsed().as_secs_f64()
    );
    Ok((vm, agent))
}

/// Shell for the guest: bring `$dev` up with 10.0.0.2/24 and ping the peer for up to 30 s.
fn ping_script(dev: &str) -> String {
    format!(
        "dev={dev}; ip link set $dev up; ip addr add 10.0.0.2/24 dev $dev; \
         i=0; while [ $i -lt 60 ]; do ping -c 1 -W 1 {peer} >/dev/null 2>&1 && break; i=$((i+1)); usleep 500000; done; \
         cat /sys/class/net/$dev/carrier; ping -c 3 -W 2 {peer}",
        peer = harness::PEER_IP
    )
}

harness::guest_test!(fn qemu_boots_test_guest(env) {
    let vm = QemuVm::builder(&env.guest, &env.rundir, "boot").cpus(2).mem_mib(512).spawn()?;
    let (_vm, mut agent) = boot(env, vm, "boot")?;
    let release = agent.run_ok("uname -r")?;
    assert_eq!(release.trim(), env.guest.kernel_version, "guest kernel release");
    let nproc = agent.run_ok("nproc")?;
    assert_eq!(nproc.trim(), "2", "guest processor count with -smp 2");
    let st = agent.run("exit 7", Duration::from_secs(10))?;
    assert_eq!(st.status, 7, "the agent reports exit statuses");
    Ok(())
});

harness::guest_test!(fn qemu_vfio_e1000e_pings_peer(env) {
    let Some(nics) = env.vfio_nics_or_skip(1) else { return Ok(()) };
    let nic = nics[0].clone();
    let vm = QemuVm::builder(&env.guest, &env.rundir, "vfio").mem_mib(512).vfio("hostdev0", &nic.bdf, None).spawn()?;
    let (_vm, mut agent) = boot(env, vm, "vfio")?;
    let dev = agent.run_ok(
        "for n in /sys/class/net/*; do d=$(readlink $n/device/driver); [ \"${d##*/}\" = e1000e ] && echo ${n##*/}; done; true",
    )?;
    let dev = dev.trim();
    if dev.is_empty() {
        return Err("no e1000e interface in the guest".into());
    }
    let mac = agent.run_ok(&format!("cat /sys/class/net/{dev}/address"))?;
    assert_eq!(mac.trim(), nic.mac, "the passed-through NIC keeps its permanent MAC");
    // Interrupt throttling must be off: QEMU 7.2's e1000e can abort on its throttling timer.
    let itr = agent.run_ok("dmesg | grep -i 'interrupt throttling rate' || true")?;
    assert!(itr.contains("turned off"), "e1000e InterruptThrottleRate=0 not in effect: {itr:?}");
    let out = agent.run(&ping_script(dev), Duration::from_secs(60))?;
    eprintln!("{}", out.stdout);
    assert_eq!(out.status, 0, "ping from the VFIO e1000e to the peer");
    Ok(())
});

harness::guest_test!(fn qemu_failover_master_pings_peer(env) {
    let Some(nics) = env.vfio_nics_or_skip(1) else { return Ok(()) };
    let nic = nics[0].clone();
    let _tap = env.tap("tdmtap0")?;
    let vm = QemuVm::builder(&env.guest, &env.rundir, "failover")
        .mem_mib(512)
        .virtio_net("net0", "tdmtap0", FAILOVER_MAC, true)
        .vfio("hostdev0", &nic.bdf, Some("net0"))
        .spawn()?;
    let (_vm, mut agent) = boot(env, vm, "failover")?;
    // The standby reports phys_port_name "sby"; its master link names the failover master.
    let found = agent.run(
        "i=0; while [ $i -lt 100 ]; do \
           sby=; for n in /sys/class/net/*; do [ \"$(cat $n/phys_port_name 2>/dev/null)\" = sby ] && sby=${n##*/}; done; \
           if [ -n \"$sby\" ] && [ -e /sys/class/net/$sby/master ]; then \
             m=$(readlink /sys/class/net/$sby/master); m=${m##*/}; \
             [ $(ls -d /sys/class/net/$m/lower_* 2>/dev/null | wc -l) -ge 2 ] && break; fi; \
           i=$((i+1)); usleep 200000; done; \
         echo \"master=$m standby=$sby slaves=$(cd /sys/class/net/$m && ls -d lower_* | tr '\\n' ' ')\"",
        Duration::from_secs(60),
    )?;
    eprintln!("{}", found.stdout);
    let line = found.stdout.lines().last().unwrap_or("").to_string();
    let master = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("master="))
        .filter(|m| !m.is_empty())
        .ok_or_else(|| format!("no failover master in the guest: {line}"))?
        .to_string();
    let slaves = line.split("slaves=").nth(1).unwrap_or("").split_whitespace().count();
    assert_eq!(slaves, 2, "the failover master has the standby and the primary: {line}");
    let out = agent.run(&ping_script(&master), Duration::from_secs(60))?;
    eprintln!("{}", out.stdout);
    assert_eq!(out.status, 0, "ping from the failover master to the peer");
    Ok(())
});
