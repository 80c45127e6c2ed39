//! ACPI PCI hotplug in a real guest: the guest's acpiphp registers Tandem's
//! slots; `add-net` puts a virtio-net NIC in a slot and the guest binds it;
//! `remove-device` takes it away in order (eject request, the guest
//! releases it) or by surprise; bad requests change nothing.

use std::time::Duration;

use harness::err;
use harness::guestnet::{netdev_by_mac, up_and_ping, wait_guest};
use harness::tandem::Tandem;

const MAC_A: &str = "52:54:00:aa:01:01";
const MAC_B: &str = "52:54:00:aa:01:02";

/// The `"key": value` of a pretty-printed JSON answer, as text.
fn field(json: &str, key: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get(key).cloned())
        .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
        .unwrap_or_default()
}

harness::guest_test_kernels!(fn tandem_hotplug_add_and_remove_net(env) {
    let _a = env.tap("tdhp0")?;
    let _b = env.tap("tdhp1")?;
    let mut vm = Tandem::spawn(env, "hp", &[])?;
    let events = vm.events()?;
    let mut agent = vm.agent(env, "hp")?;

    // acpiphp found the hotplug slots: one per _SUN, 1..31.
    let slots = agent.run_ok("ls /sys/bus/pci/slots | wc -l")?;
    assert_eq!(slots.trim(), "31", "hotplug slots registered by the guest");
    assert_eq!(agent.run_ok("cat /sys/bus/pci/slots/5/address")?.trim(), "0000:00:05");

    // Hot-add in slot 5: the guest rescans the slot and virtio_net binds.
    let out = vm.remote_args(&["add-net", &format!("id=hp0,tap=tdhp0,mac={MAC_A},slot=5")])?;
    assert_eq!(field(&out, "bdf"), "0000:00:05.0", "{out}");
    wait_guest(&mut agent, "ls /sys/bus/pci/devices/0000:00:05.0/virtio*/net >/dev/null 2>&1", 30)?;
    let dev = netdev_by_mac(&mut agent, MAC_A)?;
    up_and_ping(&mut agent, &dev, "10.0.0.2")?;
    assert!(vm.remote("info")?.contains("hp0"));

    // Refused while in place, nothing changes: the same slot, id or MAC, a
    // missing tap, a body that smuggles a key in.
    for (spec, why) in [
        (format!("id=x,tap=tdhp1,mac={MAC_B},slot=5"), "slot 5"),
        (format!("id=hp0,tap=tdhp1,mac={MAC_B}"), "duplicate id"),
        (format!("id=x,tap=tdhp1,mac={MAC_A}"), "MAC"),
        (format!("id=x,tap=tdnosuch,mac={MAC_B}"), "tdnosuch"),
    ] {
        let e = vm.remote_args(&["add-net", &spec]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(why), "add-net {spec}: want an error naming {why:?}, got {e:?}");
    }
    let e = vm.remote_args(&["remove-device", "nosuch"]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("no device") && e.contains("404"), "{e}");
    assert!(vm.remote("info")?.contains("hp0"));

    // Orderly removal: the answer comes once the guest has released it; the event
    // stream shows each step.
    let out = vm.remote_args(&["remove-device", "hp0"])?;
    assert_eq!(field(&out, "how"), "released", "{out}");
    // Where the time went: the guest reading the request, its release up to _EJ0,
    // Tandem's share after that; together the whole answer, within a few ms.
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| err!("{e}: {out}"))?;
    let part = |k: &str| v["steps"][k].as_f64();
    let (Some(notify), Some(guest), Some(vmm)) = (part("notify_ms"), part("guest_ms"), part("vmm_ms")) else {
        return Err(err!("no steps in the answer: {out}").into());
    };
    let total = v["elapsed_ms"].as_f64().unwrap_or(0.0);
    assert!(
        guest > 0.0 && notify >= 0.0 && vmm >= 0.0 && (notify + guest + vmm - total).abs() <= 5.0,
        "steps {notify} + {guest} + {vmm} ms against {total} ms: {out}"
    );
    let steps = events.sequence_from(|e| e["type"] == "device-added" && e["device"] == "hp0");
    let hp0: Vec<&str> = steps.iter().filter(|(_, d)| d == "hp0").map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        hp0,
        ["device-added", "driver-ready", "eject-requested", "driver-reset", "device-released"],
        "{steps:?}"
    );
    wait_guest(&mut agent, "[ ! -e /sys/bus/pci/devices/0000:00:05.0 ]", 10)?;
    let left = agent.run_ok(&format!("grep -l {MAC_A} /sys/class/net/*/address; true"))?;
    assert!(left.trim().is_empty(), "a netdev with the removed MAC is left: {left}");
    assert!(!vm.remote("info")?.contains("hp0"));

    // The freed slot takes a new NIC (first free slot: 1, none at boot).
    let out = vm.remote_args(&["add-net", &format!("id=hp1,tap=tdhp1,mac={MAC_B}")])?;
    let bdf = field(&out, "bdf");
    assert_eq!(bdf, "0000:00:01.0", "{out}");
    wait_guest(&mut agent, &format!("ls /sys/bus/pci/devices/{bdf}/virtio*/net >/dev/null 2>&1"), 30)?;
    let dev = netdev_by_mac(&mut agent, MAC_B)?;
    up_and_ping(&mut agent, &dev, "10.0.0.3")?;

    // Surprise removal while traffic flows: torn down at once; the guest
    // finds the slot empty and drops the device.
    agent.run_ok(&format!("(ping -i 0.05 -c 200 {} >/dev/null 2>&1 &); sleep 0.3", harness::PEER_IP))?;
    let out = vm.remote_args(&["remove-device", "hp1", "--surprise"])?;
    assert_eq!(field(&out, "how"), "surprise", "{out}");
    wait_guest(&mut agent, &format!("[ ! -e /sys/bus/pci/devices/{bdf} ]"), 20)?;

    // A removal the guest cannot answer in time fails and keeps the device;
    // when the guest gets to the eject request after all, it is released.
    vm.remote_args(&["add-net", &format!("id=hp2,tap=tdhp0,mac={MAC_A},slot=9")])?;
    wait_guest(&mut agent, "ls /sys/bus/pci/devices/0000:00:09.0/virtio*/net >/dev/null 2>&1", 30)?;
    let e = vm.remote_args(&["remove-device", "hp2", "--timeout-ms", "1"]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("504") && e.contains("did not release"), "{e}");
    wait_guest(&mut agent, "[ ! -e /sys/bus/pci/devices/0000:00:09.0 ]", 20)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while vm.remote("info")?.contains("hp2") {
        assert!(std::time::Instant::now() < deadline, "hp2 still listed after the guest ejected it");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The guest is still fine and powers off cleanly.
    assert_eq!(agent.run_ok("echo alive")?.trim(), "alive");
    let _ = agent.run("poweroff -f", Duration::from_secs(2));
    assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0);
    Ok(())
});
