//! Guest-side network helpers shared by the network tests: find a NIC by its
//! MAC, bring it up with an address and ping the peer.

use std::time::Duration;

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
