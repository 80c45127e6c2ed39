//! Network helpers shared by the network tests and benchmarks: find a NIC by its
//! MAC, bring it up with an address and ping the peer; the guest's failover master;
//! the host side of the test bridge (its uplink, a netdev's counters).

use std::time::{Duration, Instant};

use crate::{err, Agent, Result, PEER_IP};

/// The guest's netdev with this permanent MAC that virtio_net drives and
/// that is not a failover master; with failover, the standby slave.
pub fn netdev_by_mac(agent: &mut Agent, mac: &str) -> Result<String> {
    let out = agent.run_ok(&format!(
        "for n in /sys/class/net/*; do d=$(readlink $n/device/driver 2>/dev/null); \
         [ \"${{d##*/}}\" = virtio_net ] && [ \"$(cat $n/address)\" = {mac} ] && \
         [ \"$(cat $n/phys_port_name 2>/dev/null)\" != \"\" -o ! -e $n/master ] && echo ${{n##*/}}; done; true"
    ))?;
    let devs: Vec<&str> = out.split_whitespace().collect();
    for d in &devs {
        let ppn = agent.run_ok(&format!(
            "cat /sys/class/net/{d}/phys_port_name 2>/dev/null; true"
        ))?;
        if ppn.trim() == "sby" {
            return Ok(d.to_string());
        }
    }
    devs.first()
        .map(|s| s.to_string())
        .ok_or_else(|| err!("no virtio_net netdev with MAC {mac}: {out:?}"))
}

/// Bring `dev` up with `ip`/24 and ping the peer until it answers (the
/// first pings may wait for ARP and the bridge to learn), then three more.
pub fn up_and_ping(agent: &mut Agent, dev: &str, ip: &str) -> Result<String> {
    agent.run_ok(&format!(
        "ip link set {dev} up && ip addr add {ip}/24 dev {dev}"
    ))?;
    let out = agent.run(
        &format!(
            "i=0; while ! ping -c 1 -W 1 {PEER_IP} >/dev/null 2>&1 && [ $i -lt 20 ]; do i=$((i+1)); done; ping -c 3 -W 2 {PEER_IP}"
        ),
        Duration::from_secs(90),
    )?;
    if out.status != 0 {
        return Err(err!("ping from {dev} failed: {}", out.stdout));
    }
    Ok(out.stdout)
}

/// Run `cond` (a shell test) in the guest every 0.2 s until it holds, for
/// at most `secs` seconds; an error if it never does.
pub fn wait_guest(agent: &mut Agent, cond: &str, secs: u32) -> Result<()> {
    let tries = secs * 5;
    let out = agent.run(
        &format!("i=0; until {cond}; do i=$((i+1)); [ $i -ge {tries} ] && exit 1; sleep 0.2; done"),
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    if out.status != 0 {
        return Err(err!("the guest never saw `{cond}` within {secs} s"));
    }
    Ok(())
}

/// The guest's failover master once it has `want` slaves (the standby is the netdev
/// whose `phys_port_name` is `sby`).
pub fn failover_master(agent: &mut Agent, want: usize) -> Result<String> {
    let find = "for n in /sys/class/net/*; do [ \"$(cat $n/phys_port_name 2>/dev/null)\" = sby ] && basename $(readlink $n/master); done; true";
    wait_guest(agent, &format!("m=$({find}) && [ -n \"$m\" ] && [ $(ls -d /sys/class/net/$m/lower_* | wc -l) -eq {want} ]"), 90)?;
    Ok(agent.run_ok(find)?.trim().to_string())
}

/// A host netdev's counter: `dev` (rx_packets) or `dev/STAT`. One that cannot be
/// read counts 0, so that a difference of two readings never underflows into growth.
pub fn host_counter(dev: &str) -> u64 {
    let (dev, stat) = dev.split_once('/').unwrap_or((dev, "rx_packets"));
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{stat}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The port of `bridge` that is none of `taps`: the test host's uplink, the only
/// path a passthrough primary's frames take to the bridge.
pub fn bridge_uplink(bridge: &str, taps: &[&str]) -> Result<String> {
    std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .map_err(|e| err!("{bridge}: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !taps.contains(&n.as_str()))
        .ok_or_else(|| err!("no uplink on {bridge}"))
}

/// Waits (at most 20 s) until the guest's own frames leave through the primary, not the
/// standby: a ping burst from the guest grows the uplink's counter (`up`) and not the
/// standby tap's (`tap`). A primary that is enslaved is not yet carrying (its link
/// comes up later), and a removal measured before it carries measures nothing: the
/// bridge still sends to the tap. The burst also leaves the bridge's entry for the
/// guest's MAC on the uplink.
pub fn wait_primary_carries(agent: &mut Agent, up: &str, tap: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (u0, t0) = (host_counter(up), host_counter(tap));
        agent.run_ok(&format!(
            "ping -q -c 5 -i 0.02 -W 1 {PEER_IP} >/dev/null 2>&1; true"
        ))?;
        let (du, dt) = (
            host_counter(up).saturating_sub(u0),
            host_counter(tap).saturating_sub(t0),
        );
        if du >= 5 && dt < 5 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(err!(
                "the primary did not carry the guest's traffic within 20 s of being enslaved (last burst: {du} frames on the uplink, {dt} on the tap)"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
